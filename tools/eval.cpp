// eval: scores a model (an HF directory, optionally with an unmerged adapter) on data files:
// multiple-choice JSONL -> accuracy (acc, acc_norm as lm-evaluation-harness), prompt/completion
// JSONL -> completion loss, text / llm.c shards -> token-weighted loss and perplexity. One JSON line
// per file on stdout.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "models/eval.h"
#include "models/inference.h"
#include "models/tokenizer.h"
#include "models/trainer.h"
#include "runtime/device.h"
#include "runtime/io/atomic_file.h"
#include "runtime/io/dataloader.h"

int main(int argc, char** argv) {
  using namespace deeplora;
  namespace fs = std::filesystem;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::string model_dir, adapter_dir, vocab_dir, device = "auto", dtype = "auto", predictions;
  std::vector<std::string> data;
  int64_t seq_len = 0, batch_tokens = 16384, batch = 8;
  bool merge = false;
  CLI::App app{"deeplora eval: accuracy (multiple-choice JSONL) or loss / perplexity (text, shards, prompt/completion)"};
  app.add_option("--model", model_dir, "HF model directory (default: the --adapter's recorded base)");
  app.add_option("--adapter", adapter_dir, "adapter directory (ours or PEFT LoRA), applied unmerged");
  app.add_option("--data", data, "data files: *.jsonl (multiple choice or prompt/completion), *.bin shards, text")
      ->required();
  app.add_option("--vocab-dir", vocab_dir, "tokenizer directory (default: the model's, else data/gpt2)");
  app.add_option("--seq-len", seq_len, "longest row in tokens (0: the model's n_positions); longer prompts are cut "
                                       "from the left and counted")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--batch-tokens", batch_tokens, "rows x padded length per forward (multiple choice, JSONL)")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--batch", batch, "windows per forward (text, shards)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--dtype", dtype, "auto (bf16 on CUDA, f32 on the CPU), bf16, f32 or f64")
      ->capture_default_str()->check(CLI::IsMember({"auto", "bf16", "f32", "f64"}));
  app.add_option("--device", device, "auto, cpu or cuda")->capture_default_str()->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--predictions", predictions,
                 "write one JSON line per multiple-choice example: file, line, label, chosen index (acc and acc_norm), "
                 "every choice's log-probability");
  app.add_flag("--merge", merge, "merge the adapter into the weights first (faster; rounds differently in bf16)");
  CLI11_PARSE(app, argc, argv);
  try {
    const Device dev = device_from_flag(device);
    const DType dt = dtype_from_flag(dtype, dev);
    LoadedModel lm = load_for_inference(model_dir, adapter_dir, dt, dev, merge);
    CausalLM& model = *lm.model;
    const int64_t T = seq_len > 0 ? seq_len : model.max_positions();
    if (T > model.max_positions())
      throw std::invalid_argument(fmt::format("--seq-len {} exceeds the model's n_positions {}", T,
                                              model.max_positions()));
    std::unique_ptr<Tokenizer> tok;
    auto tokenizer = [&]() -> const Tokenizer& {
      if (!tok) tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(resolve_vocab_dir(vocab_dir, lm.model_dir)));
      return *tok;
    };
    std::ofstream pred;
    if (!predictions.empty()) {
      pred.open(predictions, std::ios::trunc);
      if (!pred) throw std::runtime_error(fmt::format("--predictions {}: cannot write", predictions));
    }
    const McScoreOptions so{batch_tokens, 16};
    for (const std::string& path : data) {
      if (dev == Device::cuda) reset_gpu_peak();
      nlohmann::json out = {{"file", path}, {"model", lm.model_dir}};
      if (!adapter_dir.empty()) out["adapter"] = adapter_dir;
      const bool jsonl = path.size() > 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0;
      if (jsonl && jsonl_kind(path) == JsonlKind::multiple_choice) {
        McData d = load_mc_jsonl(path, tokenizer(), T, /*need_labels=*/false);
        McScores s = score_mc(model, d, so);
        out["kind"] = "multiple_choice";
        out["examples"] = s.n;
        out["labeled"] = s.n_labeled;
        if (s.n_labeled > 0) {
          out["accuracy"] = s.acc;
          out["acc_norm"] = s.acc_norm;
          out["loss"] = s.label_nll;
        }
        out["prompts_cut"] = d.n_truncated;
        out["rows"] = s.rows;
        out["forwards"] = s.forwards;
        out["seconds"] = s.seconds;
        out["examples_per_s"] = double(s.n) / s.seconds;
        out["tokens_per_s"] = double(s.tokens) / s.seconds;
        if (pred)
          for (int64_t e = 0; e < s.n; ++e) {
            const McExample& ex = d.examples[size_t(e)];
            nlohmann::json j = {{"file", path},         {"line", ex.line},   {"label", ex.label},
                                {"pred", s.pred[size_t(e)]}, {"pred_norm", s.pred_norm[size_t(e)]},
                                {"logprobs", s.logprob[size_t(e)]}};
            if (ex.label < 0) j["label"] = nullptr;
            pred << j.dump() << "\n";
          }
      } else if (jsonl) {
        int64_t cut = 0;
        std::vector<Example> ex = load_examples({path}, tokenizer(), T, &cut);
        LmLoss l = example_loss(model, ex, so);
        out.update({{"kind", "prompt_completion"}, {"examples", ex.size()}, {"tokens", l.tokens}, {"loss", l.loss},
                    {"ppl", l.ppl}, {"prompts_cut", cut}, {"seconds", l.seconds},
                    {"tokens_per_s", double(l.tokens) / l.seconds}});
      } else {
        const bool shard = path.size() > 4 && path.compare(path.size() - 4, 4, ".bin") == 0;
        const TextEncoder enc = shard ? TextEncoder{} : tokenizer().text_encoder();
        std::vector<int32_t> toks = load_token_stream({path}, shard ? nullptr : &enc);
        LmLoss l = lm_loss(model, toks, T, batch);
        out.update({{"kind", shard ? "shards" : "text"}, {"tokens", l.tokens}, {"loss", l.loss}, {"ppl", l.ppl},
                    {"seconds", l.seconds}, {"tokens_per_s", double(l.tokens) / l.seconds}});
      }
      const GpuMemory mem = gpu_memory();
      if (mem.valid)
        out["gpu_memory"] = {{"allocator_peak_bytes", mem.allocator_peak}, {"device_used_bytes", mem.device_used}};
      fmt::print("{}\n", out.dump());
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "eval: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
