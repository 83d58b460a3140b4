// generate: continues prompts with a model (an HF directory, optionally with an unmerged adapter),
// batched, with a KV cache: greedy, temperature, top-k, top-p; stops at <|endoftext|>. Prints each
// completion, then a JSON summary line with prefill and decode throughput.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "models/generate.h"
#include "models/inference.h"
#include "models/tokenizer.h"
#include "runtime/device.h"
#include "runtime/io/jsonl.h"

namespace {

// One prompt per line, or JSONL objects with a "prompt" field (for prompts with newlines).
std::vector<std::string> read_prompts(const std::string& path) {
  std::vector<std::string> out;
  if (path.size() > 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0) {
    deeplora::for_each_jsonl(path, [&](const nlohmann::json& j, int64_t line) {
      if (!j.is_object() || !j.contains("prompt") || !j["prompt"].is_string())
        throw std::runtime_error(fmt::format("{}:{}: expected an object with a string field \"prompt\"", path, line));
      out.push_back(j["prompt"].get<std::string>());
      return true;
    });
  } else {
    std::ifstream f(path);
    if (!f) throw std::runtime_error(fmt::format("{}: cannot open", path));
    for (std::string line; std::getline(f, line);) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!line.empty()) out.push_back(line);
    }
  }
  if (out.empty()) throw std::runtime_error(fmt::format("{}: no prompts", path));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace deeplora;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::string model_dir, adapter_dir, vocab_dir, prompts_file, device = "auto", dtype = "auto", graph = "on", out_path;
  std::vector<std::string> prompt_text;
  GenerateOptions go;
  int64_t batch = 16;
  bool no_stop = false, quiet = false;
  CLI::App app{"deeplora generate: continue prompts with a KV cache (greedy, temperature, top-k, top-p)"};
  app.add_option("--model", model_dir, "HF model directory (default: the --adapter's recorded base)");
  app.add_option("--adapter", adapter_dir, "adapter directory (ours or PEFT LoRA), applied unmerged");
  app.add_option("--prompt", prompt_text, "a prompt (repeat for several)");
  app.add_option("--prompts", prompts_file, "a file of prompts: one per line, or JSONL with \"prompt\"");
  std::string ids_file;
  app.add_option("--prompt-ids", ids_file, "a JSON file holding a list of token-id lists (benchmarks: exact prompts)");
  app.add_option("--vocab-dir", vocab_dir, "tokenizer directory (default: the model's, else data/gpt2)");
  app.add_option("--max-new-tokens", go.max_new_tokens, "tokens to generate per prompt")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--temperature", go.temperature, "0: greedy; > 0: sample from softmax(logits / T)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--top-k", go.top_k, "sampling: keep the k most likely tokens (0: all)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--top-p", go.top_p, "sampling: nucleus probability (1: all)")
      ->capture_default_str()->check(CLI::Range(1e-9, 1.0));
  app.add_option("--seed", go.seed, "sampling seed (each prompt has its own stream)")->capture_default_str();
  app.add_option("--batch", batch, "prompts per batch")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_flag("--no-stop", no_stop, "do not stop at <|endoftext|> (always max-new-tokens)");
  app.add_option("--dtype", dtype, "auto (bf16 on CUDA, f32 on the CPU), bf16, f32 or f64")
      ->capture_default_str()->check(CLI::IsMember({"auto", "bf16", "f32", "f64"}));
  app.add_option("--device", device, "auto, cpu or cuda")->capture_default_str()->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--cuda-graph", graph, "capture the decode step in a CUDA graph")
      ->capture_default_str()->check(CLI::IsMember({"on", "off"}));
  app.add_option("--out", out_path, "write {\"prompt\", \"completion\", \"tokens\"} JSON lines here");
  app.add_flag("--quiet", quiet, "print only the summary line");
  CLI11_PARSE(app, argc, argv);
  try {
    if (int(!prompt_text.empty()) + int(!prompts_file.empty()) + int(!ids_file.empty()) != 1)
      throw std::invalid_argument("give one of --prompt, --prompts or --prompt-ids");
    std::vector<std::vector<int32_t>> given_ids;
    if (!ids_file.empty()) {
      std::ifstream f(ids_file);
      if (!f) throw std::runtime_error(fmt::format("--prompt-ids {}: cannot open", ids_file));
      try {
        given_ids = nlohmann::json::parse(f).get<std::vector<std::vector<int32_t>>>();
      } catch (const std::exception& e) {
        throw std::runtime_error(fmt::format("--prompt-ids {}: expected a JSON list of token-id lists: {}", ids_file, e.what()));
      }
      if (given_ids.empty()) throw std::runtime_error(fmt::format("--prompt-ids {}: no prompts", ids_file));
    }
    if (go.temperature == 0 && (go.top_k > 0 || go.top_p < 1))
      throw std::invalid_argument("--top-k / --top-p sample: give a --temperature > 0 too (0 is greedy)");
    std::vector<std::string> texts = !prompt_text.empty() ? prompt_text
                                     : !prompts_file.empty() ? read_prompts(prompts_file)
                                                             : std::vector<std::string>(given_ids.size());
    const Device dev = device_from_flag(device);
    const DType dt = dtype_from_flag(dtype, dev);
    LoadedModel lm = load_for_inference(model_dir, adapter_dir, dt, dev);
    Tokenizer tok = Tokenizer::from_dir(resolve_vocab_dir(vocab_dir, lm.model_dir));
    go.stop_id = no_stop ? -1 : tok.eot_id();
    go.cuda_graph = graph == "on";
    go.n_vocab = tok.vocab_size();
    std::ofstream out;
    if (!out_path.empty()) {
      out.open(out_path, std::ios::trunc);
      if (!out) throw std::runtime_error(fmt::format("--out {}: cannot write", out_path));
    }
    if (dev == Device::cuda) reset_gpu_peak();
    int64_t prefill_tokens = 0, decode_tokens = 0, new_tokens = 0;
    double prefill_s = 0, decode_s = 0;
    bool graph_used = false;
    const bool model_has_bos = lm.model->bos_token_id() >= 0 && lm.model->bos_token_id() < lm.model->vocab_size();
    const std::string prompt_flag = !prompt_text.empty() ? std::string("--prompt")
                                    : !prompts_file.empty() ? "--prompts " + prompts_file
                                                            : "--prompt-ids " + ids_file;
    for (size_t b0 = 0; b0 < texts.size(); b0 += size_t(batch)) {
      std::vector<std::vector<int32_t>> ids;
      const size_t b1 = std::min(texts.size(), b0 + size_t(batch));
      for (size_t i = b0; i < b1; ++i) {
        ids.push_back(given_ids.empty() ? tok.encode(sanitize_utf8(texts[i])) : given_ids[i]);
        if (!given_ids.empty()) texts[i] = sanitize_utf8(tok.decode(given_ids[i]));
        if (ids.back().empty() && !model_has_bos) {
          // generate starts an empty prompt from the model's bos_token_id; without one (small-vocabulary
          // GPT-2 presets), from the tokenizer's <|endoftext|>: a new document.
          if (tok.eot_id() < 0 || tok.eot_id() >= lm.model->vocab_size())
            throw std::invalid_argument(fmt::format(
                "{}: prompt {} is empty, and neither the model (bos_token_id) nor the tokenizer (<|endoftext|>) has a "
                "token to start it from; give a non-empty prompt",
                prompt_flag, i + 1));
          ids.back().push_back(tok.eot_id());
        }
      }
      GenerateResult r = generate(*lm.model, ids, go);
      prefill_tokens += r.prefill_tokens;
      decode_tokens += r.decode_steps * int64_t(ids.size());
      prefill_s += r.prefill_seconds;
      decode_s += r.decode_seconds;
      graph_used = graph_used || r.graph_used;
      for (size_t i = 0; i < ids.size(); ++i) {
        const std::string completion = sanitize_utf8(tok.decode(r.tokens[i]));
        new_tokens += int64_t(r.tokens[i].size());
        if (!quiet) fmt::print("{}{}\n---\n", texts[b0 + i], completion);
        if (out)
          out << nlohmann::json{{"prompt", texts[b0 + i]}, {"completion", completion}, {"tokens", r.tokens[i]}}.dump()
              << "\n";
      }
    }
    nlohmann::json s = {{"prompts", texts.size()},
                        {"new_tokens", new_tokens},
                        {"prefill_tokens", prefill_tokens},
                        {"prefill_seconds", prefill_s},
                        {"prefill_tokens_per_s", prefill_s > 0 ? double(prefill_tokens) / prefill_s : 0.0},
                        {"decode_tokens", decode_tokens},
                        {"decode_seconds", decode_s},
                        {"decode_tokens_per_s", decode_s > 0 ? double(decode_tokens) / decode_s : 0.0},
                        {"batch", batch},
                        {"cuda_graph", graph_used},
                        {"dtype", dtype_name(dt)},
                        {"device", device_name(dev)}};
    const GpuMemory mem = gpu_memory();
    if (mem.valid)
      s["gpu_memory"] = {{"allocator_peak_bytes", mem.allocator_peak}, {"device_used_bytes", mem.device_used}};
    fmt::print("{}\n", s.dump());
  } catch (const std::exception& e) {
    fmt::print(stderr, "generate: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
