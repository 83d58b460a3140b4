// The training loop: reads top to bottom (data, model, optimizer, then the step loop with logging,
// eval, samples and checkpoints).
#include "models/trainer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "models/generate.h"
#include "models/gpt.h"
#include "models/gpt_io.h"
#include "models/tokenizer.h"
#include "runtime/device.h"
#include "runtime/dist.h"
#include "runtime/io/atomic_file.h"
#include "runtime/io/dataloader.h"
#include "runtime/io/safetensors.h"
#include "runtime/io/staging.h"
#include "runtime/ops.h"
#include "runtime/optim.h"
#include "runtime/tape.h"

namespace deeplora {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double lr_at(const TrainOptions& o, int64_t step, int64_t total) {
  if (o.warmup > 0 && step < o.warmup) return o.lr * double(step + 1) / o.warmup;
  const double span = std::max<double>(1.0, double(total) - o.warmup);
  const double progress = std::clamp((double(step) - o.warmup) / span, 0.0, 1.0);
  const double min_lr = o.lr * o.min_lr_ratio;
  return min_lr + 0.5 * (o.lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

std::string human_time(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 60) return fmt::format("{:.0f}s", s);
  if (s < 3600) return fmt::format("{:.0f}m{:02.0f}s", std::floor(s / 60), std::fmod(s, 60));
  return fmt::format("{:.0f}h{:02.0f}m", std::floor(s / 3600), std::fmod(s / 60, 60));
}

struct Data {
  std::optional<DataLoader> train, val;
  int32_t pad = 50256;
  int64_t n_cut = 0;  // training examples whose prompt was cut from the left
};

bool ends_with(const std::string& s, const char* suf) {
  const size_t n = std::strlen(suf);
  return s.size() >= n && s.compare(s.size() - n, n, suf) == 0;
}

// Data files by extension: .jsonl examples, .bin llm.c shards, anything else text; .json is refused
// (a JSON document is not a training format) and JSONL never mixes with streams.
bool examples_data(const std::vector<std::string>& paths, const char* flag) {
  size_t n_jsonl = 0;
  for (const std::string& p : paths) {
    if (ends_with(p, ".json"))
      throw std::invalid_argument(fmt::format("{} {}: a .json file is not a data format here; give JSONL (one "
                                              "{{\"prompt\", \"completion\"}} or {{\"prompt\", \"choices\", "
                                              "\"label\"}} object per line, extension .jsonl), text or *.bin shards",
                                              flag, p));
    n_jsonl += ends_with(p, ".jsonl");
  }
  if (n_jsonl > 0 && n_jsonl != paths.size())
    throw std::invalid_argument(fmt::format("{}: JSONL files cannot be mixed with text or shard files", flag));
  return n_jsonl > 0;
}

// Splits data into train / val: examples by count, token streams by position (the tail is val).
// DP: train and val are sharded by rank; a val batch is shrunk so every rank gets at least one.
Data make_data(const TrainOptions& o, const TrainInputs& in, const Tokenizer* tok, int64_t V,
               const dist::Context& dc) {
  Data d;
  if (tok && tok->eot_id() >= 0) d.pad = tok->eot_id();
  auto check_ids = [&](const std::vector<int32_t>& toks, const std::string& what) {
    for (size_t i = 0; i < toks.size(); ++i)
      if (toks[i] < 0 || toks[i] >= V)
        throw std::runtime_error(fmt::format("{}: token id {} at position {} is outside the model's vocabulary ({})",
                                             what, toks[i], i, V));
  };
  const bool in_memory = !in.train.empty();
  if (!in_memory && o.data.empty()) throw std::invalid_argument("train: no --data given");
  const bool examples = in_memory || examples_data(o.data, "--data");
  if (!o.val_data.empty() && examples_data(o.val_data, "--val-data") != examples)
    throw std::invalid_argument("--val-data must be in the format of --data (JSONL examples, or text / shards)");
  if (examples) {
    std::vector<Example> ex, val;
    if (in_memory) {
      ex = in.train;
      val = in.val;
    } else {
      if (!tok) throw std::invalid_argument(fmt::format("{}: JSONL data needs a tokenizer (--vocab-dir)", o.data[0]));
      ex = load_examples(o.data, *tok, o.seq_len, &d.n_cut);
      if (!o.val_data.empty()) val = load_examples(o.val_data, *tok, o.seq_len);
      else if (o.val_fraction > 0 && ex.size() >= 2) {
        size_t nv = std::max<size_t>(1, size_t(double(ex.size()) * o.val_fraction));
        val.assign(ex.end() - int64_t(nv), ex.end());
        ex.resize(ex.size() - nv);
      }
    }
    for (const auto* set : {&ex, &val})
      for (const Example& e : *set) check_ids(e.tokens, fmt::format("{} (line {})", o.data.empty() ? "data" : o.data[0], e.line));
    const std::string what = o.data.empty() ? std::string("training examples") : o.data[0];
    d.train = DataLoader::from_examples(std::move(ex), o.batch, o.seq_len, d.pad, o.seed, dc.rank, dc.world, what);
    if (const int64_t vb = std::min<int64_t>(o.batch, int64_t(val.size()) / dc.world); vb > 0)
      d.val = DataLoader::from_examples(std::move(val), vb, o.seq_len, d.pad, 0, dc.rank, dc.world, "validation data");
  } else {
    auto toks = load_token_stream(o.data, tok);
    check_ids(toks, o.data[0]);
    std::vector<int32_t> val;
    if (!o.val_data.empty()) {
      val = load_token_stream(o.val_data, tok);
      check_ids(val, o.val_data[0]);
    } else if (o.val_fraction > 0) {
      size_t nv = size_t(double(toks.size()) * o.val_fraction);
      if (nv > size_t(o.seq_len) + 1) {
        val.assign(toks.end() - int64_t(nv), toks.end());
        toks.resize(toks.size() - nv);
      }
    }
    d.train = DataLoader::from_tokens(std::move(toks), o.batch, o.seq_len, o.seed, dc.rank, dc.world, o.data[0]);
    if (val.size() > size_t(o.seq_len) + 1) {
      int64_t vb = std::min<int64_t>(o.batch, int64_t(val.size() - 1) / o.seq_len / dc.world);
      if (vb > 0) d.val = DataLoader::from_tokens(std::move(val), vb, o.seq_len, 0, dc.rank, dc.world, "validation data");
    }
  }
  return d;
}

// --eval-prompts: one prompt per line, or JSONL objects with a "prompt" field.
std::vector<std::vector<int32_t>> load_prompts(const std::string& path, const Tokenizer& tok) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(fmt::format("{}: cannot open", path));
  std::vector<std::vector<int32_t>> out;
  std::string line;
  int64_t lineno = 0;
  const bool jsonl = ends_with(path, ".jsonl");
  while (std::getline(f, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::string text = line;
    if (jsonl) {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const std::exception& e) {
        throw std::runtime_error(fmt::format("{}:{}: not valid JSON: {}", path, lineno, e.what()));
      }
      if (!j.is_object() || !j.contains("prompt") || !j["prompt"].is_string())
        throw std::runtime_error(fmt::format("{}:{}: expected an object with a string field \"prompt\"", path, lineno));
      text = j["prompt"].get<std::string>();
    }
    out.push_back(tok.encode(sanitize_utf8(text)));
    if (out.back().empty()) throw std::runtime_error(fmt::format("{}:{}: the prompt has no tokens", path, lineno));
  }
  if (out.empty()) throw std::runtime_error(fmt::format("{}: no prompts", path));
  return out;
}

// A batch on the device. Example batches carry only their loss positions (rows, compact targets):
// the lm_head then runs on those alone (Gpt::loss_at).
struct Tensors2 {
  Tensor in, tgt, rows;
};
struct LossRows {
  std::vector<int32_t> rows, targets;
};
LossRows loss_rows(const Batch& b) {
  LossRows r;
  for (size_t i = 0; i < b.targets.size(); ++i)
    if (b.targets[i] != -100) {
      r.rows.push_back(int32_t(i));
      r.targets.push_back(b.targets[i]);
    }
  if (r.rows.empty()) {  // a batch without loss tokens: one ignored row keeps the shapes valid
    r.rows.push_back(0);
    r.targets.push_back(-100);
  }
  return r;
}
Tensors2 to_device(const Batch& b, Device dev, bool sparse) {
  Tensors2 t{Tensor::from_ints(b.inputs, Shape{b.B, b.T}, dev), Tensor(), Tensor()};
  if (!sparse) {
    t.tgt = Tensor::from_ints(b.targets, Shape{b.B, b.T}, dev);
    return t;
  }
  LossRows r = loss_rows(b);
  const int64_t n = int64_t(r.rows.size());
  t.rows = Tensor::from_ints(r.rows, Shape{n}, dev);
  t.tgt = Tensor::from_ints(r.targets, Shape{n}, dev);
  return t;
}
Tensor batch_loss(Gpt& model, const Tensors2& t) {
  return t.rows.defined() ? model.loss_at(t.in, t.rows, t.tgt) : model.loss(t.in, t.tgt);
}

double evaluate(Gpt& model, DataLoader& val, int64_t n_batches) {
  NoGrad ng;
  val.seek(0, 0);
  const int64_t n = std::min<int64_t>(n_batches, val.batches_per_epoch());
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    auto t = to_device(val.next(), model.device(), val.is_examples());
    sum += batch_loss(model, t).item();
  }
  // DP: each rank took its shard of the same n global batches; the mean is over all of them.
  const int world = dist::ctx().world;
  return dist::all_reduce_scalar(sum) / double(std::max<int64_t>(n, 1) * world);
}

// Checkpoints: out/ckpt-<step>/{model,optim}.safetensors + trainer.json, then out/latest names the
// directory (written atomically last), so a crash anywhere leaves the previous checkpoint in force.
// (epoch, position): where the data loader resumes, i.e. before any batch fetched ahead.
void save_checkpoint(const TrainOptions& o, Gpt& model, const Adapters& adapters, AdamW& opt, int64_t step,
                     int64_t epoch, int64_t position) {
  fs::path dir = fs::path(o.out_dir) / fmt::format("ckpt-{:08d}", step);
  fs::create_directories(dir);
  NamedTensors weights;
  for (auto& [name, p] : model.named_params()) weights.emplace_back(name, p->master);
  for (auto& [n, t] : adapter_state(adapters)) weights.emplace_back(n, t);
  save_safetensors((dir / "model.safetensors").string(), weights);
  save_safetensors((dir / "optim.safetensors").string(), opt.state_tensors());
  nlohmann::json j = {{"step", step}, {"epoch", epoch}, {"position", position}, {"seed", o.seed},
                      {"optimizer_steps", opt.step_count()}};
  write_file_atomic((dir / "trainer.json").string(), j.dump(2));
  model.config().save_json_file((dir / "config.json").string());
  std::string prev;
  if (std::ifstream f(fs::path(o.out_dir) / "latest"); f) std::getline(f, prev);
  write_file_atomic((fs::path(o.out_dir) / "latest").string(), dir.filename().string() + "\n");
  // Keep the previous checkpoint too; drop older ones.
  for (auto& e : fs::directory_iterator(o.out_dir)) {
    std::string n = e.path().filename().string();
    if (n.rfind("ckpt-", 0) == 0 && n != dir.filename().string() && n != prev) fs::remove_all(e.path());
  }
}

int64_t load_checkpoint(const TrainOptions& o, Gpt& model, const Adapters& adapters, AdamW& opt, DataLoader& dl) {
  fs::path latest = fs::path(o.out_dir) / "latest";
  std::ifstream f(latest);
  if (!f) throw std::runtime_error(fmt::format("{}: no checkpoint to resume from", latest.string()));
  std::string name;
  std::getline(f, name);
  fs::path dir = fs::path(o.out_dir) / name;
  if (name.empty() || !fs::is_directory(dir))
    throw std::runtime_error(fmt::format("{}: names '{}', which is not a checkpoint directory", latest.string(), name));
  std::ifstream tj(dir / "trainer.json");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(tj);
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: {}", (dir / "trainer.json").string(), e.what()));
  }
  SafetensorsFile w = load_safetensors((dir / "model.safetensors").string());
  for (auto& [pname, p] : model.named_params()) {
    const Tensor& t = w.at(pname);
    if (t.shape() != p->master.shape())
      throw std::runtime_error(fmt::format("{}: tensor '{}' has shape {}, the model needs {}",
                                           (dir / "model.safetensors").string(), pname, t.shape().str(),
                                           p->master.shape().str()));
    NoGrad ng;
    p->master.copy_from(t);
  }
  model.invalidate_frozen_cache();
  if (!adapters.empty()) load_adapter_state(adapters, w.tensors, (dir / "model.safetensors").string());
  SafetensorsFile os = load_safetensors((dir / "optim.safetensors").string());
  std::vector<std::pair<std::string, Tensor>> st(os.tensors.begin(), os.tensors.end());
  opt.load_state(st);
  opt.set_step_count(j.at("optimizer_steps").get<int64_t>());
  dl.seek(j.at("epoch").get<int64_t>(), j.at("position").get<int64_t>());
  return j.at("step").get<int64_t>();
}


// --save-best: <out>/best holds the adapter (adapter runs) or the HF model (full training) of the best
// eval so far, and best/info.json its step and value; written to best.tmp, then swapped in.
void save_best(const TrainOptions& o, Gpt& model, const Adapters& adapters, const AdapterOptions& ao,
               const std::string& base, int64_t step, double value) {
  const fs::path dir = fs::path(o.out_dir) / "best", tmp = fs::path(o.out_dir) / "best.tmp";
  fs::remove_all(tmp);
  if (!adapters.empty()) save_adapters(adapters, ao, (tmp / "adapter").string(), base);
  else save_hf_gpt(model, tmp.string());
  write_file_atomic((tmp / "info.json").string(),
                    nlohmann::json{{"step", step}, {"metric", o.save_best}, {"value", value}}.dump(2) + "\n");
  fs::remove_all(dir);
  fs::rename(tmp, dir);
}

// final/ loads in eval and generate without --vocab-dir: the tokenizer's files travel with it.
void copy_tokenizer_files(const std::string& vocab_dir, const fs::path& dst) {
  for (const char* f : {"vocab.json", "merges.txt"}) {
    const fs::path src = fs::path(vocab_dir) / f;
    if (fs::exists(src)) fs::copy_file(src, dst / f, fs::copy_options::overwrite_existing);
  }
}

// What save_adapters records as base_model_name_or_path: an absolute model directory (the adapter
// still finds its base when moved), or the random-init recipe.
std::string base_model_name(const TrainOptions& o) {
  if (!o.model_dir.empty()) return fs::absolute(o.model_dir).lexically_normal().string();
  return fmt::format("random init ({}, seed {})", !o.model_config.empty() ? o.model_config : o.preset, o.seed);
}

TrainResult train_impl(const TrainOptions& o, const TrainInputs& in, const dist::Context& dc);

}  // namespace

std::unique_ptr<Gpt> make_model(const TrainOptions& o, DType dt, Device dev) {
  const bool random = !o.preset.empty() || !o.model_config.empty() || o.n_layer || o.n_head || o.n_embd || o.n_positions;
  if (!o.model_dir.empty()) {
    if (random)
      throw std::invalid_argument("--model loads a trained model; --preset, --model-config and --n-layer/--n-head/"
                                  "--n-embd/--n-positions are for a random init: give one or the other");
    return load_hf_gpt(o.model_dir, dt, dev);
  }
  if (!random)
    throw std::invalid_argument("train: no model: give --model DIR (an HF GPT-2 directory to fine-tune), or a random "
                                "init with --preset NAME, --model-config config.json or --n-layer/--n-head/--n-embd");
  if (!o.preset.empty() && !o.model_config.empty())
    throw std::invalid_argument("--preset and --model-config both describe the model: give one");
  GptConfig c = !o.model_config.empty() ? GptConfig::from_json_file(o.model_config)
                : GptConfig::preset(o.preset.empty() ? "gpt2" : o.preset);
  for (auto [v, dst, flag] : {std::tuple{o.n_layer, &c.n_layer, "--n-layer"}, {o.n_head, &c.n_head, "--n-head"},
                              {o.n_embd, &c.n_embd, "--n-embd"}, {o.n_positions, &c.n_positions, "--n-positions"}}) {
    if (v < 0) throw std::invalid_argument(fmt::format("{} {}: must be positive", flag, v));
    if (v > 0) *dst = v;
  }
  try {
    c.validate();
  } catch (const std::exception& e) {
    throw std::invalid_argument(fmt::format("model size flags: {}", e.what()));
  }
  return std::make_unique<Gpt>(c, dt, dev, o.seed);
}

std::vector<Example> load_examples(const std::vector<std::string>& paths, const Tokenizer& tok, int64_t seq_len,
                                   int64_t* n_cut) {
  std::vector<Example> all;
  int64_t cut = 0;
  for (const std::string& p : paths) {
    std::vector<Example> ex;
    if (jsonl_kind(p) == JsonlKind::multiple_choice) {
      // Train on prompt + the labelled choice, loss on the choice's tokens (no <|endoftext|>: scoring
      // reads only the choice tokens). load_mc_jsonl already cut prompts that were too long.
      McData mc = load_mc_jsonl(p, tok, seq_len);
      for (McExample& m : mc.examples) {
        Example e;
        e.tokens = std::move(m.prompt);
        e.n_prompt = int64_t(e.tokens.size());
        const auto& ch = m.choices[size_t(m.label)];
        e.tokens.insert(e.tokens.end(), ch.begin(), ch.end());
        e.line = m.line;
        ex.push_back(std::move(e));
      }
      cut += mc.n_truncated;
    } else {
      ex = load_jsonl_examples(p, tok);
    }
    cut += fit_examples(ex, seq_len, p);
    all.insert(all.end(), std::make_move_iterator(ex.begin()), std::make_move_iterator(ex.end()));
  }
  if (n_cut) *n_cut = cut;
  return all;
}

// DP: rank and world from mpirun (a world of one without it). An exception on one rank of several
// must not leave the others blocked in an all-reduce: abort_all names the rank and tears all down.
TrainResult train(const TrainOptions& o, const TrainInputs& in) {
  const dist::Context& dc = dist::init();
  if (dc.world == 1) return train_impl(o, in, dc);
  try {
    return train_impl(o, in, dc);
  } catch (const std::exception& e) {
    dist::abort_all(dc.rank, e.what());
  }
}

namespace {

void check_options(const TrainOptions& o) {
  auto bad = [](const std::string& m) { throw std::invalid_argument(m); };
  if (o.save_best != "" && o.save_best != "acc" && o.save_best != "loss")
    bad(fmt::format("--save-best '{}': expected acc or loss", o.save_best));
  if (o.save_best == "acc" && o.eval_data.empty()) bad("--save-best acc needs --eval-data (multiple-choice JSONL)");
  if (!o.save_best.empty() && o.out_dir.empty()) bad("--save-best needs an output directory");
  if (!(o.val_fraction >= 0 && o.val_fraction < 1))
    bad(fmt::format("--val-fraction {}: must be in [0, 1)", o.val_fraction));
}

TrainResult train_impl(const TrainOptions& o, const TrainInputs& in, const dist::Context& dc) {
  check_options(o);
  // ---- device, dtype, tokenizer -------------------------------------------------------------------
  if (o.device != "auto" && o.device != "cpu" && o.device != "cuda")
    throw std::invalid_argument(fmt::format("--device must be auto, cpu or cuda, got '{}'", o.device));
  Device dev = in.model ? in.model->device()
               : o.device == "cpu" ? Device::cpu
               : o.device == "cuda" ? Device::cuda
               : cuda_available() ? Device::cuda : Device::cpu;
  if (dev == Device::cuda && !cuda_available())
    throw std::runtime_error("--device cuda: " + cuda_unavailable_reason());
  DType dt = dtype_from_name(o.dtype.c_str());
  check(dt != DType::i32, "train", "--dtype must be bf16, f32 or f64");
  const bool writes = !o.out_dir.empty() && dc.rank == 0;  // DP: rank 0 alone writes
  auto say = [&](const std::string& s) {
    if (!o.quiet && dc.rank == 0) fmt::print("{}\n", s);  // DP: rank 0 alone logs
  };
  std::unique_ptr<Tokenizer> own_tok;
  const Tokenizer* tok = in.tokenizer;
  if (!tok && !o.vocab_dir.empty() && fs::exists(fs::path(o.vocab_dir) / "vocab.json")) {
    own_tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(o.vocab_dir));
    tok = own_tok.get();
  }

  // ---- model ----------------------------------------------------------------------------------------
  std::unique_ptr<Gpt> own_model;
  if (!in.model) own_model = make_model(o, dt, dev);
  Gpt& model = in.model ? *in.model : *own_model;
  const GptConfig& cfg = model.config();
  check(o.seq_len <= cfg.n_positions, "train",
        fmt::format("--seq-len {} exceeds the model's n_positions {}", o.seq_len, cfg.n_positions));
  if (dev == Device::cuda) reset_gpu_peak();
  say(fmt::format("model: {} | {} {} | device {}", cfg.str(), dtype_name(dt),
                  in.model ? "given" : o.model_dir.empty() ? "random init" : o.model_dir, device_name(dev)));

  // ---- data -------------------------------------------------------------------------------------------
  Data data = make_data(o, in, tok, cfg.vocab_size, dc);
  DataLoader& dl = *data.train;
  const int64_t tokens_per_step = o.batch * o.seq_len * o.grad_accum * dc.world;  // DP: global
  const int64_t total_steps =
      o.steps > 0 ? o.steps : std::max<int64_t>(1, int64_t(o.epochs * double(dl.batches_per_epoch()) / double(o.grad_accum)));
  say(fmt::format("data: {} rows, {} batches/epoch of {}x{} | val: {} | {} steps of {} tokens{}", dl.n_rows(),
                  dl.batches_per_epoch(), o.batch, o.seq_len, data.val ? fmt::format("{} rows", data.val->n_rows()) : "none",
                  total_steps, tokens_per_step,
                  data.n_cut ? fmt::format(" | {} prompts cut from the left to fit --seq-len", data.n_cut) : ""));
  // Multiple-choice eval sets and sample prompts.
  std::vector<McData> own_eval;
  std::vector<const McData*> eval_sets = in.eval;
  if (eval_sets.empty() && !o.eval_data.empty()) {
    if (!tok) throw std::invalid_argument("--eval-data needs a tokenizer (--vocab-dir)");
    for (const std::string& p : o.eval_data) {
      if (!ends_with(p, ".jsonl") || jsonl_kind(p) != JsonlKind::multiple_choice)
        throw std::invalid_argument(fmt::format("--eval-data {}: expected multiple-choice JSONL ({{\"prompt\", "
                                                "\"choices\", \"label\"}} per line)", p));
      own_eval.push_back(load_mc_jsonl(p, *tok, o.seq_len));
    }
    for (const McData& m : own_eval) eval_sets.push_back(&m);
  }
  for (const McData* m : eval_sets)
    for (const McExample& e : m->examples) {
      std::vector<int32_t> all = e.prompt;
      for (const auto& c : e.choices) all.insert(all.end(), c.begin(), c.end());
      for (int32_t t : all)
        if (t < 0 || t >= cfg.vocab_size)
          throw std::runtime_error(fmt::format("{}:{}: token id {} is outside the model's vocabulary ({})", m->path,
                                               e.line, t, cfg.vocab_size));
    }
  std::vector<std::vector<int32_t>> prompts;
  if (!o.eval_prompts.empty()) {
    if (!tok) throw std::invalid_argument("--eval-prompts needs a tokenizer (--vocab-dir)");
    prompts = load_prompts(o.eval_prompts, *tok);
  } else if (tok && tok->eot_id() >= 0 && tok->eot_id() < cfg.vocab_size) {
    prompts = {{tok->eot_id()}};
  }
  for (auto& p : prompts)
    if (int64_t(p.size()) + o.sample_tokens > cfg.n_positions)
      p.erase(p.begin(), p.end() - std::max<int64_t>(1, cfg.n_positions - o.sample_tokens));

  // ---- adapters: the base model is frozen; deeplora+gradsvd runs its initialization pass here --------
  AdapterOptions ao = o.adapter;
  ao.seed = o.seed;
  Adapters adapters;
  TrainResult res;
  res.n_prompts_cut = data.n_cut;
  if (!o.adapter_init.empty()) {
    adapters = load_adapters(model, o.adapter_init, ao, &ao);
    say(fmt::format("{} | loaded from {}", ao.str(), o.adapter_init));
  } else if (ao.kind != "none") {
    AdapterOptions init = ao;
    // On resume the values come from the checkpoint: skip the gradient pass.
    if (o.resume && init.kind == "deeplora" && !init.wide) init.init = "random";
    AdapterInitReport rep;
    adapters = attach_adapters(model, init, [&] {
      auto t = to_device(dl.next(), dev, false);
      return std::make_pair(t.in, t.tgt);
    }, &rep);
    dl.seek(0, 0);  // the init pass read the first batch(es)
    res.adapter_grad_seconds = rep.grad_seconds;
    res.adapter_svd_seconds = rep.svd_seconds;
    say(ao.str());
    say(rep.str());
  }
  res.adapters = adapters;

  // ---- optimizer: full training decays matrices only (GPT-2 / nanoGPT); adapters per DEEP_LORA.md ----
  std::vector<ParamGroup> groups;
  if (!adapters.empty()) {
    groups = adapter_param_groups(adapters, ao.outer_lr_scale);
  } else {
    ParamGroup decay{{}, 1.0, o.weight_decay, "decay"}, no_decay{{}, 1.0, 0.0, "no_decay"};
    for (Tensor& t : model.trainable_tensors()) (t.ndim() >= 2 ? decay : no_decay).params.push_back(t);
    for (auto* g : {&decay, &no_decay})
      if (!g->params.empty()) groups.push_back(*g);
  }
  check(!groups.empty(), "train", "nothing to train (every parameter is frozen)");
  // Adapters use AdamW eps 1e-6 (DEEP_LORA.md); full training keeps --adam-eps.
  AdamW opt(groups, AdamWConfig{o.beta1, o.beta2, adapters.empty() ? o.adam_eps : 1e-6});
  res.n_trainable = opt.n_params();
  say(fmt::format("trainable parameters: {} ({:.2f}M of {:.1f}M)", opt.n_params(), double(opt.n_params()) / 1e6,
                  double(cfg.n_params()) / 1e6));
  // DP: gradients averaged over ranks in buckets, overlapped with backward.
  std::unique_ptr<dist::GradReducer> reducer;
  if (dc.world > 1) {
    check(o.bucket_mb > 0, "train", fmt::format("--bucket-mb must be > 0, got {}", o.bucket_mb));
    reducer = std::make_unique<dist::GradReducer>(opt, size_t(o.bucket_mb * double(1 << 20)));
    say(fmt::format("data parallel: {} ranks ({} on this node) | global batch {}x{} | {} gradient buckets",
                    dc.world, dc.local_size, dc.world * o.batch, o.seq_len, reducer->buckets().size()));
  }

  if (writes) {
    fs::create_directories(o.out_dir);
    if (!o.config_text.empty()) write_file_atomic((fs::path(o.out_dir) / "config.toml").string(), o.config_text);
  }
  int64_t step = 0;
  if (o.resume) {
    check(!o.out_dir.empty(), "train", "--resume needs --out");
    step = load_checkpoint(o, model, adapters, opt, dl);
    say(fmt::format("resumed from step {} (epoch {}, batch {})", step, dl.epoch(), dl.position()));
  }
  std::ofstream metrics;  // left closed (writes go nowhere) on ranks other than 0 and without --out
  if (writes) metrics.open(fs::path(o.out_dir) / "metrics.jsonl", o.resume ? std::ios::app : std::ios::trunc);

  // FLOPs per token: 6N + 12 L C T (PaLM appendix B); a frozen base skips the weight-gradient GEMMs
  // (4N). MFU against the measured bf16 peak.
  const double flops_per_token = (adapters.empty() ? 6.0 : 4.0) * double(cfg.n_params()) +
                                 12.0 * double(cfg.n_layer * cfg.n_embd * o.seq_len);

  // One eval: validation loss, every multiple-choice set, samples; logged, recorded, best kept.
  const std::string base = base_model_name(o);
  auto run_eval = [&](int64_t at) {
    EvalRecord rec;
    rec.step = at;
    nlohmann::json row = {{"step", at}};
    std::string line = fmt::format("eval step {}", at);
    if (data.val) {
      rec.val_loss = evaluate(model, *data.val, o.eval_batches);
      res.val_losses.push_back(rec.val_loss);
      row["val_loss"] = rec.val_loss;
      line += fmt::format(" | val loss {:.4f}", rec.val_loss);
    }
    for (size_t i = 0; i < eval_sets.size(); ++i) {
      McScores sc = score_mc(model, *eval_sets[i]);
      const std::string key = i == 0 ? "val" : fmt::format("eval{}", i);
      row[key + "_acc"] = sc.acc;
      row[key + "_acc_norm"] = sc.acc_norm;
      line += fmt::format(" | {} acc {:.4f} acc_norm {:.4f} ({} examples)",
                          i == 0 ? "eval" : fs::path(eval_sets[i]->path).filename().string(), sc.acc, sc.acc_norm, sc.n);
      rec.mc.push_back(std::move(sc));
    }
    if (tok && o.sample_tokens > 0 && dc.rank == 0 && !prompts.empty()) {
      GenerateOptions go;
      go.max_new_tokens = o.sample_tokens;
      go.temperature = o.top_k > 1 ? 1.0 : 0.0;
      go.top_k = o.top_k > 1 ? o.top_k : 0;
      go.seed = o.seed + uint64_t(at);
      go.stop_id = tok->eot_id();
      go.cuda_graph = false;  // a few short samples: not worth a capture
      go.n_vocab = tok->vocab_size();
      GenerateResult g = generate(model, prompts, go);
      std::vector<std::string> samples;
      for (auto& t : g.tokens) samples.push_back(sanitize_utf8(tok->decode(t)));
      row["sample"] = samples.size() == 1 ? nlohmann::json(samples[0]) : nlohmann::json(samples);
      line += " | sample: " + nlohmann::json(samples[0]).dump();
    }
    say(line);
    metrics << row.dump() << "\n";
    if (!o.save_best.empty()) {
      const double v = o.save_best == "acc" ? rec.mc.at(0).acc : rec.val_loss;
      const bool better = std::isfinite(v) && (!std::isfinite(res.best_value) ||
                                               (o.save_best == "acc" ? v > res.best_value : v < res.best_value));
      if (better) {
        res.best_value = v;
        res.best_step = at;
        if (writes) save_best(o, model, adapters, ao, base, at, v);
      }
    }
    res.evals.push_back(std::move(rec));
  };

  // ---- the loop ---------------------------------------------------------------------------------------
  std::vector<double> tps;
  const auto t_start = Clock::now();
  int64_t run_steps = 0;
  // Batches go up through pinned buffers without a host sync; the next one is read and queued while
  // the GPU still works on the current one. `pending` remembers where the loader stood before it.
  PinnedStaging staging;
  struct Pending {
    Tensors2 t;
    int64_t epoch = 0, pos = 0;
  };
  auto fetch = [&] {
    Pending p;
    p.epoch = dl.epoch();
    p.pos = dl.position();
    Batch b = dl.next();
    p.t.in = staging.upload(b.inputs, Shape{b.B, b.T}, dev);
    if (dl.is_examples()) {
      LossRows r = loss_rows(b);
      const int64_t n = int64_t(r.rows.size());
      p.t.rows = staging.upload(r.rows, Shape{n}, dev);
      p.t.tgt = staging.upload(r.targets, Shape{n}, dev);
    } else {
      p.t.tgt = staging.upload(b.targets, Shape{b.B, b.T}, dev);
    }
    return p;
  };
  std::optional<Pending> pending;
  for (; step < total_steps; ++step) {
    const auto t0 = Clock::now();
    if (o.on_step) o.on_step(step);
    const double lr = lr_at(o, step, total_steps);
    opt.zero_grad();
    double loss_sum = 0;
    for (int64_t micro = 0; micro < o.grad_accum; ++micro) {
      Pending cur = pending ? std::move(*pending) : fetch();
      pending.reset();
      Tensor loss = batch_loss(model, cur.t);
      if (reducer && micro + 1 == o.grad_accum) reducer->arm();  // DP: all-reduce in the last backward only
      backward(o.grad_accum > 1 ? ops::scale(loss, 1.0 / double(o.grad_accum)) : loss);
      if (micro + 1 < o.grad_accum || step + 1 < total_steps) pending = fetch();  // overlaps the GPU's work
      loss_sum += loss.item();
    }
    if (reducer) reducer->finish();  // DP: grads now averaged over ranks (before the norm and clip)
    const double loss = dist::all_reduce_scalar(loss_sum) / double(o.grad_accum * dc.world);
    if (!std::isfinite(loss))
      throw std::runtime_error(fmt::format("train: loss is {} at step {} (diverged; lower --lr)", loss, step));
    const double norm = opt.grad_norm();
    const double scale = o.clip > 0 && norm > o.clip ? o.clip / norm : 1.0;
    opt.step(lr, scale);
    if (dev == Device::cuda) cuda_sync();
    const double dt_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const double tok_s = double(tokens_per_step) / dt_s;
    if (run_steps > 0) tps.push_back(tok_s);
    res.losses.push_back(loss);
    ++run_steps;
    const double mfu = dev == Device::cuda ? flops_per_token * tok_s / (o.peak_tflops * 1e12 * dc.world) : NAN;
    const double elapsed = std::chrono::duration<double>(Clock::now() - t_start).count();
    const double eta = elapsed / double(run_steps) * double(total_steps - step - 1);
    if (o.log_every > 0 && (step % o.log_every == 0 || step + 1 == total_steps))
      say(fmt::format("step {:>5}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | {:.1f}K tok/s{} | ETA {}", step + 1,
                      total_steps, loss, lr, norm, tok_s / 1e3,
                      std::isfinite(mfu) ? fmt::format(" | MFU {:.1f}%", 100 * mfu) : "", human_time(eta)));
    nlohmann::json row = {{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm}, {"tokens_per_s", tok_s}};
    if (std::isfinite(mfu)) row["mfu"] = mfu;  // absent where not measured (the CPU)
    metrics << row.dump() << "\n";
    const bool last = step + 1 == total_steps;
    const bool have_eval = data.val || !eval_sets.empty();
    if (have_eval && (last || (o.eval_every > 0 && (step + 1) % o.eval_every == 0))) run_eval(step + 1);
    metrics.flush();
    if (!o.out_dir.empty() && o.ckpt_every > 0 && ((step + 1) % o.ckpt_every == 0 || last)) {
      if (dc.rank == 0)
        save_checkpoint(o, model, adapters, opt, step + 1, pending ? pending->epoch : dl.epoch(),
                        pending ? pending->pos : dl.position());
      dist::barrier();  // DP: every rank may resume from it once this step is over
    }
    if (o.stop_after > 0 && run_steps >= o.stop_after) {
      ++step;
      break;
    }
  }
  res.final_step = step;
  res.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  if (!tps.empty()) {
    std::nth_element(tps.begin(), tps.begin() + int64_t(tps.size() / 2), tps.end());
    res.tokens_per_second = tps[tps.size() / 2];
  }
  const GpuMemory mem = gpu_memory();
  res.gpu_peak_bytes = mem.allocator_peak;
  if (o.save_final && writes && step >= total_steps) {
    const fs::path out(o.out_dir);
    if (!adapters.empty()) {
      save_adapters(adapters, ao, (out / "adapter").string(), base);
      say(fmt::format("saved {} ({} adapter)", (out / "adapter").string(), ao.kind));
      merge_adapters(model);  // final/ is a plain HF GPT-2 with the update merged
      res.adapters.clear();
    }
    save_hf_gpt(model, (out / "final").string());
    copy_tokenizer_files(o.vocab_dir, out / "final");
    say(fmt::format("saved {} (HF layout{})", (out / "final").string(),
                    fs::exists(out / "final" / "vocab.json") ? ", with the tokenizer" : ""));
  }
  if (writes) {
    nlohmann::json sj = {{"final_step", res.final_step},
                         {"final_loss", res.losses.empty() ? nlohmann::json(nullptr) : nlohmann::json(res.losses.back())},
                         {"tokens_per_s", res.tokens_per_second},
                         {"seconds", res.seconds},
                         {"n_trainable", res.n_trainable}};
    if (!res.evals.empty()) {
      const EvalRecord& e = res.evals.back();
      if (std::isfinite(e.val_loss)) sj["val_loss"] = e.val_loss;
      if (!e.mc.empty()) {
        sj["val_acc"] = e.mc[0].acc;
        sj["val_acc_norm"] = e.mc[0].acc_norm;
      }
    }
    if (res.best_step > 0) sj["best"] = {{"step", res.best_step}, {"metric", o.save_best}, {"value", res.best_value}};
    if (mem.valid)
      sj["gpu_memory"] = {{"allocator_peak_bytes", mem.allocator_peak},
                          {"allocator_reserved_bytes", mem.allocator_reserved},
                          {"device_used_bytes", mem.device_used}};
    write_file_atomic((fs::path(o.out_dir) / "summary.json").string(), sj.dump(2) + "\n");
  }
  if (mem.valid) say(fmt::format("GPU memory: {}", mem.str()));
  return res;
}
}  // namespace

}  // namespace deeplora
