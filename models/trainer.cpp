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
#include "models/causal_lm.h"
#include "models/tokenizer.h"
#include "models/train_step.h"
#include "runtime/device.h"
#include "runtime/dist.h"
#include "runtime/io/atomic_file.h"
#include "runtime/io/dataloader.h"
#include "runtime/io/run_dir.h"
#include "runtime/io/safetensors.h"
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

// Every input file exists and is a regular file: a directory or a typo is an error naming the flag,
// before anything is loaded.
void check_input_file(const std::string& p, const char* flag) {
  std::error_code ec;
  const fs::file_status st = fs::status(p, ec);
  if (!fs::exists(st)) throw std::invalid_argument(fmt::format("{} {}: no such file", flag, p));
  if (fs::is_directory(st))
    throw std::invalid_argument(fmt::format("{} {}: is a directory; give the files in it (e.g. {}/*.bin or "
                                            "{}/*.jsonl)", flag, p, p, p));
  if (!fs::is_regular_file(st)) throw std::invalid_argument(fmt::format("{} {}: not a regular file", flag, p));
}

// Token ids against the model's vocabulary (V rows of wte): the first bad one names the file and
// where it is (a line of JSONL, a token position of a stream).
void check_ids(const std::vector<int32_t>& toks, int64_t V, const std::string& where, const Tokenizer* tok) {
  for (size_t i = 0; i < toks.size(); ++i)
    if (toks[i] < 0 || toks[i] >= V)
      throw std::runtime_error(fmt::format(
          "{}: token id {} at position {} is outside the model's vocabulary of {}{}", where, toks[i], i, V,
          tok ? fmt::format(" (the tokenizer has {} ids: give the model's own --vocab-dir)", tok->vocab_size()) : ""));
}
void check_example_ids(const std::vector<Example>& ex, int64_t V, const std::string& path, const Tokenizer* tok) {
  for (const Example& e : ex) check_ids(e.tokens, V, e.line ? fmt::format("{}:{}", path, e.line) : path, tok);
}

// Splits data into train / val: examples by count, token streams by position (the tail is val).
// DP: train and val are sharded by rank; a val batch is shrunk so every rank gets at least one.
// Every token id of both is checked against the vocabulary here, before step 1.
Data make_data(const TrainOptions& o, const TrainInputs& in, const Tokenizer* tok, int64_t V,
               const dist::Context& dc) {
  Data d;
  if (tok && tok->eot_id() >= 0) d.pad = tok->eot_id();
  if (d.pad >= V) d.pad = 0;  // padding is masked out of the loss, but must still index wte
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
      check_example_ids(ex, V, "training examples", tok);
      check_example_ids(val, V, "validation examples", tok);
    } else {
      if (!tok) throw std::invalid_argument(fmt::format("{}: JSONL data needs a tokenizer (--vocab-dir)", o.data[0]));
      // File by file, so an error names the file the example came from.
      auto load = [&](const std::vector<std::string>& paths, std::vector<Example>& dst, int64_t* n_cut) {
        for (const std::string& p : paths) {
          int64_t cut = 0;
          std::vector<Example> e = load_examples({p}, *tok, o.seq_len, &cut);
          check_example_ids(e, V, p, tok);
          if (n_cut) *n_cut += cut;
          dst.insert(dst.end(), std::make_move_iterator(e.begin()), std::make_move_iterator(e.end()));
        }
      };
      load(o.data, ex, &d.n_cut);
      if (!o.val_data.empty()) load(o.val_data, val, nullptr);
      else if (o.val_fraction > 0 && ex.size() >= 2) {
        const size_t nv = std::min(ex.size() - 1, std::max<size_t>(1, size_t(double(ex.size()) * o.val_fraction)));
        val.assign(ex.end() - int64_t(nv), ex.end());
        ex.resize(ex.size() - nv);
      }
    }
    const std::string what = o.data.empty() ? std::string("training examples") : o.data[0];
    d.train = DataLoader::from_examples(std::move(ex), o.batch, o.seq_len, d.pad, o.seed, dc.rank, dc.world, what);
    if (const int64_t vb = std::min<int64_t>(o.batch, int64_t(val.size()) / dc.world); vb > 0)
      d.val = DataLoader::from_examples(std::move(val), vb, o.seq_len, d.pad, 0, dc.rank, dc.world, "validation data");
  } else {
    auto load = [&](const std::vector<std::string>& paths) {
      std::vector<int32_t> all;
      for (const std::string& p : paths) {
        const TextEncoder enc = tok ? tok->text_encoder() : TextEncoder{};
        std::vector<int32_t> t = load_token_stream({p}, tok ? &enc : nullptr);
        check_ids(t, V, p, ends_with(p, ".bin") ? nullptr : tok);
        all.insert(all.end(), t.begin(), t.end());
      }
      return all;
    };
    auto toks = load(o.data);
    std::vector<int32_t> val;
    if (!o.val_data.empty()) {
      val = load(o.val_data);
    } else if (o.val_fraction > 0) {
      size_t nv = size_t(double(toks.size()) * o.val_fraction);
      if (nv > size_t(o.seq_len) + 1 && nv < toks.size()) {
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
// the lm_head then runs on those alone (CausalLM::loss_at).
struct Tensors2 {
  Tensor in, tgt, rows;
};
Tensors2 to_device(const Batch& b, Device dev, bool sparse) {
  Tensors2 t{Tensor::from_ints(b.inputs, Shape{b.B, b.T}, dev), Tensor(), Tensor()};
  if (!sparse) {
    t.tgt = Tensor::from_ints(b.targets, Shape{b.B, b.T}, dev);
    return t;
  }
  LossRows r = loss_rows(b);
  if (r.rows.empty()) {  // a batch without loss tokens: one ignored row keeps the shapes valid
    r.rows.push_back(0);
    r.targets.push_back(-100);
  }
  const int64_t n = int64_t(r.rows.size());
  t.rows = Tensor::from_ints(r.rows, Shape{n}, dev);
  t.tgt = Tensor::from_ints(r.targets, Shape{n}, dev);
  return t;
}
Tensor batch_loss(CausalLM& model, const Tensors2& t) {
  return t.rows.defined() ? model.loss_at(t.in, t.rows, t.tgt) : model.loss(t.in, t.tgt);
}

// The validation loss: the mean over every loss token of the first n batches (token-weighted, so one
// process and N ranks at the same global batch agree for examples of varied lengths too).
double evaluate(CausalLM& model, DataLoader& val, int64_t n_batches) {
  NoGrad ng;
  val.seek(0, 0);
  const int64_t n = std::min<int64_t>(n_batches, val.batches_per_epoch());
  double sum = 0, count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Batch b = val.next();
    const double k = double(b.n_loss_tokens());
    if (k == 0) continue;
    auto t = to_device(b, model.device(), val.is_examples());
    sum += batch_loss(model, t).item() * k;
    count += k;
  }
  // DP: each rank took its shard of the same n global batches.
  sum = dist::all_reduce_scalar(sum);
  count = dist::all_reduce_scalar(count);
  return count > 0 ? sum / count : NAN;
}

// ---- checkpoints -----------------------------------------------------------------------------------

// The first non-finite element of a host tensor (f32, bf16, f64; i32 has none), or -1.
int64_t first_non_finite(const Tensor& h) {
  const int64_t n = h.numel();
  switch (h.dtype()) {
    case DType::f32: {
      const float* p = h.data_as<float>();
      for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(p[i])) return i;
      return -1;
    }
    case DType::f64: {
      const double* p = h.data_as<double>();
      for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(p[i])) return i;
      return -1;
    }
    case DType::bf16: {
      const uint16_t* p = h.data_as<uint16_t>();
      for (int64_t i = 0; i < n; ++i)
        if ((p[i] & 0x7F80u) == 0x7F80u) return i;  // exponent all ones: inf or NaN
      return -1;
    }
    default: return -1;
  }
}

// Host copies of `ts`, throwing naming `what` and the tensor if any holds a non-finite value: what a
// checkpoint, final/ or best/ is written from, so none is ever written holding one.
NamedTensors finite_host_copies(const NamedTensors& ts, const std::string& what) {
  NamedTensors out;
  out.reserve(ts.size());
  for (const auto& [name, t] : ts) {
    Tensor h = t.to(Device::cpu);  // the tensor itself when it is on the host already
    if (const int64_t i = first_non_finite(h); i >= 0)
      throw std::runtime_error(fmt::format("{}: tensor '{}' holds a non-finite value (element {} of {})", what, name, i,
                                           h.shape().str()));
    out.emplace_back(name, h);
  }
  return out;
}
NamedTensors model_state(CausalLM& model, const Adapters& adapters) {
  NamedTensors w;
  for (auto& [name, p] : model.named_params()) w.emplace_back(name, p->master);
  for (auto& [n, t] : adapter_state(adapters)) w.emplace_back(n, t);
  return w;
}

// Checkpoints: out/ckpt-<step>/{model,optim}.safetensors + trainer.json, then out/latest names the
// directory (written atomically last), so a crash anywhere leaves the previous checkpoint in force.
// Every tensor is checked finite first: a checkpoint that would hold a NaN is not written at all and
// the run stops (latest still names the last good one).
// (epoch, position): where the data loader resumes, i.e. before any batch fetched ahead.
void save_checkpoint(const TrainOptions& o, CausalLM& model, const Adapters& adapters, AdamW& opt, int64_t step,
                     int64_t epoch, int64_t position) {
  const fs::path dir = fs::path(o.out_dir) / fmt::format("ckpt-{:08d}", step);
  std::string prev;
  if (std::ifstream f(fs::path(o.out_dir) / "latest"); f) std::getline(f, prev);
  NamedTensors weights, state;
  try {
    weights = finite_host_copies(model_state(model, adapters), dir.string() + "/model.safetensors");
    state = finite_host_copies(opt.state_tensors(), dir.string() + "/optim.safetensors");
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format(
        "train: the checkpoint of step {} was not written: the weights went non-finite ({}); lower --lr (now {}), add "
        "--warmup or --clip, or train in --dtype f32{}",
        step, e.what(), o.lr, prev.empty() ? "" : fmt::format("; {}/latest still names {}", o.out_dir, prev)));
  }
  fs::create_directories(dir);
  save_safetensors((dir / "model.safetensors").string(), weights);
  save_safetensors((dir / "optim.safetensors").string(), state);
  nlohmann::json j = {{"step", step}, {"epoch", epoch}, {"position", position}, {"seed", o.seed},
                      {"optimizer_steps", opt.step_count()}};
  write_file_atomic((dir / "trainer.json").string(), j.dump(2));
  model.save_config((dir / "config.json").string());
  write_file_atomic((fs::path(o.out_dir) / "latest").string(), dir.filename().string() + "\n");
  // Keep the previous checkpoint too; drop older ones.
  for (auto& e : fs::directory_iterator(o.out_dir)) {
    std::string n = e.path().filename().string();
    if (n.rfind("ckpt-", 0) == 0 && n != dir.filename().string() && n != prev) fs::remove_all(e.path());
  }
}

// A checkpoint read and checked whole (trainer.json, both safetensors files, every shape the model
// needs, every value finite) before anything is copied into the model.
struct Checkpoint {
  fs::path dir;
  nlohmann::json trainer;
  SafetensorsFile weights, optim;
};

Checkpoint read_checkpoint(const fs::path& dir, CausalLM& model) {
  Checkpoint c;
  c.dir = dir;
  if (!fs::is_directory(dir)) throw std::runtime_error(fmt::format("{}: not a checkpoint directory", dir.string()));
  const fs::path tj = dir / "trainer.json";
  std::ifstream f(tj);
  if (!f) throw std::runtime_error(fmt::format("{}: cannot open", tj.string()));
  try {
    c.trainer = nlohmann::json::parse(f);
    for (const char* k : {"step", "epoch", "position", "optimizer_steps"})
      if (!c.trainer.contains(k) || !c.trainer[k].is_number_integer() || c.trainer[k].get<int64_t>() < 0)
        throw std::runtime_error(fmt::format("field '{}' is missing or not a non-negative integer", k));
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: {}", tj.string(), e.what()));
  }
  c.weights = load_safetensors((dir / "model.safetensors").string());
  for (auto& [pname, p] : model.named_params()) {
    const Tensor& t = c.weights.at(pname);
    if (t.shape() != p->master.shape())
      throw std::runtime_error(fmt::format("{}: tensor '{}' has shape {}, the model needs {}",
                                           (dir / "model.safetensors").string(), pname, t.shape().str(),
                                           p->master.shape().str()));
  }
  c.optim = load_safetensors((dir / "optim.safetensors").string());
  for (const SafetensorsFile* sf : {&c.weights, &c.optim})
    finite_host_copies(NamedTensors(sf->tensors.begin(), sf->tensors.end()), sf->header.path);
  return c;
}

void apply_checkpoint(const Checkpoint& c, CausalLM& model, const Adapters& adapters, AdamW& opt, DataLoader& dl) {
  for (auto& [pname, p] : model.named_params()) {
    NoGrad ng;
    p->master.copy_from(c.weights.at(pname));
  }
  model.invalidate_frozen_cache();
  if (!adapters.empty()) load_adapter_state(adapters, c.weights.tensors, (c.dir / "model.safetensors").string());
  std::vector<std::pair<std::string, Tensor>> st(c.optim.tensors.begin(), c.optim.tensors.end());
  opt.load_state(st);
  opt.set_step_count(c.trainer.at("optimizer_steps").get<int64_t>());
  dl.seek(c.trainer.at("epoch").get<int64_t>(), c.trainer.at("position").get<int64_t>());
}

// --resume: the checkpoint out/latest names; if it fails its check (missing or corrupt file, a
// non-finite value, a shape the model does not have), the newest other ckpt-* that passes, saying
// so. Returns the step it resumes after.
int64_t load_checkpoint(const TrainOptions& o, CausalLM& model, const Adapters& adapters, AdamW& opt, DataLoader& dl,
                        bool writes, const std::function<void(const std::string&)>& say) {
  const fs::path out(o.out_dir), latest = out / "latest";
  std::string name;
  if (std::ifstream f(latest); f) std::getline(f, name);
  std::vector<fs::path> candidates;
  if (!name.empty()) candidates.push_back(out / name);
  std::vector<fs::path> others;
  if (fs::is_directory(out))
    for (auto& e : fs::directory_iterator(out)) {
      const std::string n = e.path().filename().string();
      if (n.rfind("ckpt-", 0) == 0 && n != name && e.is_directory()) others.push_back(e.path());
    }
  std::sort(others.begin(), others.end(), std::greater<>());  // ckpt-<8-digit step>: newest first
  candidates.insert(candidates.end(), others.begin(), others.end());
  if (candidates.empty())
    throw std::runtime_error(fmt::format("--resume: {} has no checkpoint to resume from (no {}, no ckpt-*)", o.out_dir,
                                         latest.string()));
  std::string failures;
  for (size_t i = 0; i < candidates.size(); ++i) {
    try {
      Checkpoint c = read_checkpoint(candidates[i], model);
      apply_checkpoint(c, model, adapters, opt, dl);
      const int64_t step = c.trainer.at("step").get<int64_t>();
      if (!failures.empty()) {
        say(fmt::format("resume: falling back to {} (step {}):{}", candidates[i].string(), step, failures));
        if (writes) write_file_atomic(latest.string(), candidates[i].filename().string() + "\n");
      }
      return step;
    } catch (const std::exception& e) {
      failures += fmt::format(" {} failed its check ({});", candidates[i].filename().string(), e.what());
    }
  }
  throw std::runtime_error(fmt::format("--resume: no usable checkpoint in {}:{}", o.out_dir, failures));
}

// --save-best: <out>/best holds the adapter (adapter runs) or the HF model (full training) of the best
// eval so far, and best/info.json its step and value; written to best.tmp, then swapped in.
void save_best(const TrainOptions& o, CausalLM& model, const Adapters& adapters, const AdapterOptions& ao,
               const std::string& base, int64_t step, double value) {
  const fs::path dir = fs::path(o.out_dir) / "best", tmp = fs::path(o.out_dir) / "best.tmp";
  finite_host_copies(model_state(model, adapters), dir.string());
  fs::remove_all(tmp);
  if (!adapters.empty()) save_adapters(adapters, ao, (tmp / "adapter").string(), base);
  else model.save_hf(tmp.string());
  write_file_atomic((tmp / "info.json").string(),
                    nlohmann::json{{"step", step}, {"metric", o.save_best}, {"value", value}}.dump(2) + "\n");
  fs::remove_all(dir);
  fs::rename(tmp, dir);
}

// final/ loads in eval and generate without --vocab-dir: the tokenizer's files travel with it.
void copy_tokenizer_files(const std::string& vocab_dir, const fs::path& dst) {
  for (const char* f : {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}) {
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

std::unique_ptr<CausalLM> make_model(const TrainOptions& o, DType dt, Device dev) {
  const bool random = !o.preset.empty() || !o.model_config.empty() || o.n_layer || o.n_head || o.n_embd || o.n_positions;
  if (!o.model_dir.empty()) {
    if (random)
      throw std::invalid_argument("--model loads a trained model; --preset, --model-config and --n-layer/--n-head/"
                                  "--n-embd/--n-positions are for a random init: give one or the other");
    return load_hf_causal_lm(o.model_dir, dt, dev);
  }
  if (!random)
    throw std::invalid_argument("train: no model: give --model DIR (an HF GPT-2 directory to fine-tune), or a random "
                                "init with --preset NAME, --model-config config.json or --n-layer/--n-head/--n-embd");
  if (!o.preset.empty() && !o.model_config.empty())
    throw std::invalid_argument("--preset and --model-config both describe the model: give one");
  const ModelSizes sizes{o.n_layer, o.n_head, o.n_embd, o.n_positions};
  if (!o.model_config.empty())
    return causal_lm_family(read_model_type(o.model_config)).random_init(o.model_config, "", sizes, dt, dev, o.seed);
  const std::string preset = o.preset.empty() ? "gpt2" : o.preset;
  return family_of_preset(preset).random_init("", preset, sizes, dt, dev, o.seed);
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
      ex = load_jsonl_examples(p, tok.text_encoder());
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
  } catch (const Interrupted&) {
    throw;  // every rank stops at the same step (the stop request is all-reduced): a clean exit
  } catch (const std::exception& e) {
    dist::abort_all(dc.rank, e.what());
  }
}

namespace {

// What the CLI range-checks, checked again for in-process callers (tests, the study runner): each
// message names the flag and its range.
void check_options(const TrainOptions& o) {
  auto bad = [](const std::string& m) { throw std::invalid_argument(m); };
  if (o.save_best != "" && o.save_best != "acc" && o.save_best != "loss")
    bad(fmt::format("--save-best '{}': expected acc or loss", o.save_best));
  if (o.save_best == "acc" && o.eval_data.empty()) bad("--save-best acc needs --eval-data (multiple-choice JSONL)");
  if (!o.save_best.empty() && o.out_dir.empty()) bad("--save-best needs an output directory");
  if (!(o.val_fraction >= 0 && o.val_fraction < 1))
    bad(fmt::format("--val-fraction {}: must be in [0, 1)", o.val_fraction));
  if (o.resume && o.overwrite)
    bad("--resume continues the run in --out and --overwrite replaces it: give one of them");
  if (o.resume && o.out_dir.empty()) bad("--resume needs --out (the run to continue)");
  for (auto [v, lo, hi, flag] : {std::tuple{o.batch, int64_t(1), int64_t(1) << 20, "--batch"},
                                 {o.seq_len, 1, int64_t(1) << 20, "--seq-len"},
                                 {o.grad_accum, 1, int64_t(1) << 20, "--grad-accum"},
                                 {o.steps, 0, int64_t(1) << 40, "--steps"},
                                 {o.eval_every, 0, int64_t(1) << 40, "--eval-every"},
                                 {o.eval_batches, 1, int64_t(1) << 30, "--eval-batches"},
                                 {o.ckpt_every, 0, int64_t(1) << 40, "--ckpt-every"},
                                 {o.log_every, 0, int64_t(1) << 40, "--log-every"},
                                 {o.sample_tokens, 0, int64_t(1) << 20, "--sample-tokens"},
                                 {int64_t(o.top_k), 0, int64_t(1) << 20, "--top-k"},
                                 {o.max_bad_steps, 0, int64_t(1) << 40, "--max-bad-steps"},
                                 {o.stop_after, 0, int64_t(1) << 40, "stop_after"},
                                 {int64_t(o.adapter.depth), 2, 64, "--depth"},
                                 {int64_t(o.adapter.svd_batches), 1, 10000, "--svd-batches"}})
    if (v < lo || v > hi) bad(fmt::format("{} {}: must be in [{}, {}]", flag, v, lo, hi));
  auto real = [&](double v, double lo, double hi, bool open_lo, const char* flag) {
    if (!std::isfinite(v) || v < lo || v > hi || (open_lo && v == lo))
      bad(fmt::format("{} {}: must be in {}{}, {}]", flag, v, open_lo ? "(" : "[", lo, hi));
  };
  real(o.epochs, 0, 1e6, true, "--epochs");
  real(o.lr, 0, 1e6, true, "--lr");
  real(o.warmup, 0, 1e12, false, "--warmup");
  real(o.min_lr_ratio, 0, 1, false, "--min-lr-ratio");
  real(o.weight_decay, 0, 1e6, false, "--weight-decay");
  real(o.clip, 0, 1e12, false, "--clip");
  real(o.adam_eps, 0, 1, false, "--adam-eps");
  real(o.adapter_adam_eps, 0, 1, false, "--adapter-adam-eps");
  real(o.bucket_mb, 0, 1e6, true, "--bucket-mb");
}

// A new run refuses an --out holding another run's files (it would replace them); --resume continues
// it, --overwrite replaces it. Checked read-only before the work starts, and again under the lock.
void check_out_dir(const TrainOptions& o) {
  if (o.resume) {
    const fs::path out(o.out_dir);
    bool any = fs::exists(out / "latest");
    if (!any && fs::is_directory(out))
      for (auto& e : fs::directory_iterator(out)) any = any || e.path().filename().string().rfind("ckpt-", 0) == 0;
    if (!any)
      throw std::invalid_argument(fmt::format("--resume: {} holds no checkpoint (no latest, no ckpt-*); drop --resume to "
                                              "start a new run there", o.out_dir));
    return;
  }
  if (o.overwrite) return;
  const std::vector<std::string> files = run_files(o.out_dir);
  if (files.empty()) return;
  std::string list;
  for (size_t i = 0; i < files.size() && i < 6; ++i) list += (i ? ", " : "") + files[i];
  if (files.size() > 6) list += ", ...";
  throw std::invalid_argument(fmt::format("--out {} holds another run ({}): --resume to continue it, --overwrite to "
                                          "replace it, or choose another --out",
                                          o.out_dir, list));
}

TrainResult train_impl(const TrainOptions& o, const TrainInputs& in, const dist::Context& dc) {
  check_options(o);
  // Only runs that write (an out_dir) listen to SIGINT / SIGTERM; in-process callers without one keep
  // their own signal handling. Restored when train() returns.
  std::optional<StopSignals> signals;
  if (!o.out_dir.empty()) signals.emplace();
  if (in.train.empty())
    for (const std::string& p : o.data) check_input_file(p, "--data");
  for (const std::string& p : o.val_data) check_input_file(p, "--val-data");
  if (in.eval.empty())
    for (const std::string& p : o.eval_data) check_input_file(p, "--eval-data");
  if (!o.eval_prompts.empty()) check_input_file(o.eval_prompts, "--eval-prompts");
  if (!o.adapter_init.empty() && !fs::is_directory(o.adapter_init))
    throw std::invalid_argument(fmt::format("--adapter-init {}: not a directory (expected a saved adapter)", o.adapter_init));
  if (!o.out_dir.empty() && dc.rank == 0) check_out_dir(o);
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
  // The tokenizer: --vocab-dir when given; else the model directory's own (tokenizer.json, or
  // vocab.json + merges.txt: a Llama-family model ships only tokenizer.json), else data/gpt2.
  auto has_tokenizer = [](const fs::path& d) {
    return fs::exists(d / "tokenizer.json") || (fs::exists(d / "vocab.json") && fs::exists(d / "merges.txt"));
  };
  const std::string vocab_dir =
      !o.model_dir.empty() && o.vocab_dir == TrainOptions{}.vocab_dir && has_tokenizer(o.model_dir) ? o.model_dir : o.vocab_dir;
  std::unique_ptr<Tokenizer> own_tok;
  const Tokenizer* tok = in.tokenizer;
  if (!tok && !vocab_dir.empty() && has_tokenizer(vocab_dir)) {
    own_tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(vocab_dir));
    tok = own_tok.get();
  }

  // ---- model ----------------------------------------------------------------------------------------
  std::unique_ptr<CausalLM> own_model;
  if (!in.model) own_model = make_model(o, dt, dev);
  CausalLM& model = in.model ? *in.model : *own_model;
  const int64_t n_positions = model.max_positions(), vocab_size = model.vocab_size();
  if (o.seq_len > n_positions)
    throw std::invalid_argument(fmt::format("--seq-len {} exceeds the model's n_positions {}", o.seq_len, n_positions));
  if (o.sample_tokens >= n_positions)
    throw std::invalid_argument(fmt::format("--sample-tokens {}: must be below the model's n_positions {} (a sample "
                                            "starts from at least one prompt token)",
                                            o.sample_tokens, n_positions));
  if (dev == Device::cuda) reset_gpu_peak();
  say(fmt::format("model: {} | {} {} | device {}", model.describe(), dtype_name(dt),
                  in.model ? "given" : o.model_dir.empty() ? "random init" : o.model_dir, device_name(dev)));

  // ---- data -------------------------------------------------------------------------------------------
  Data data = make_data(o, in, tok, vocab_size, dc);
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
      check_ids(all, vocab_size, fmt::format("{}:{}", m->path, e.line), tok);
    }
  std::vector<std::vector<int32_t>> prompts;
  if (!o.eval_prompts.empty()) {
    if (!tok) throw std::invalid_argument("--eval-prompts needs a tokenizer (--vocab-dir)");
    prompts = load_prompts(o.eval_prompts, *tok);
    for (size_t i = 0; i < prompts.size(); ++i)
      check_ids(prompts[i], vocab_size, fmt::format("{} (prompt {})", o.eval_prompts, i + 1), tok);
  } else if (tok && tok->eot_id() >= 0 && tok->eot_id() < vocab_size) {
    prompts = {{tok->eot_id()}};
  }
  for (auto& p : prompts)
    if (int64_t(p.size()) + o.sample_tokens > n_positions)
      p.erase(p.begin(), p.end() - std::max<int64_t>(1, n_positions - o.sample_tokens));

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
    if (init.kind == "deeplora" && init.init == "gradsvd" && init.svd_batches > dl.batches_per_epoch())
      throw std::invalid_argument(fmt::format("--svd-batches {}: the training data has only {} batches of {}x{} per "
                                              "epoch; give at most that",
                                              init.svd_batches, dl.batches_per_epoch(), o.batch, o.seq_len));
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
    groups = adapter_param_groups(adapters, ao.outer_lr_scale, ao.width_lr_ref);
  } else {
    ParamGroup decay{{}, 1.0, o.weight_decay, "decay"}, no_decay{{}, 1.0, 0.0, "no_decay"};
    for (Tensor& t : model.trainable_tensors()) (t.ndim() >= 2 ? decay : no_decay).params.push_back(t);
    for (auto* g : {&decay, &no_decay})
      if (!g->params.empty()) groups.push_back(*g);
  }
  check(!groups.empty(), "train", "nothing to train (every parameter is frozen)");
  // Adapters use AdamW eps --adapter-adam-eps (1e-6, DEEP_LORA.md); full training keeps --adam-eps.
  AdamW opt(groups, AdamWConfig{o.beta1, o.beta2, adapters.empty() ? o.adam_eps : o.adapter_adam_eps});
  res.n_trainable = opt.n_params();
  say(fmt::format("trainable parameters: {} ({:.2f}M of {:.1f}M)", opt.n_params(), double(opt.n_params()) / 1e6,
                  double(model.n_params()) / 1e6));
  // DP: gradients averaged over ranks in buckets, overlapped with backward.
  std::unique_ptr<dist::GradReducer> reducer;
  if (dc.world > 1) {
    check(o.bucket_mb > 0, "train", fmt::format("--bucket-mb must be > 0, got {}", o.bucket_mb));
    reducer = std::make_unique<dist::GradReducer>(opt, size_t(o.bucket_mb * double(1 << 20)));
    say(fmt::format("data parallel: {} ranks ({} on this node) | global batch {}x{} | {} gradient buckets",
                    dc.world, dc.local_size, dc.world * o.batch, o.seq_len, reducer->buckets().size()));
  }

  // ---- the output directory: locked for the run's lifetime; nothing in it changes before this point --
  std::optional<RunDirLock> lock;
  if (writes) {
    lock.emplace(o.out_dir);
    check_out_dir(o);  // again, under the lock: another run may have finished writing meanwhile
    if (o.overwrite && !run_files(o.out_dir).empty()) {
      say(fmt::format("--overwrite: removing the previous run in {}", o.out_dir));
      remove_run_files(o.out_dir);
    }
  }
  int64_t step = 0;
  if (o.resume) {
    step = load_checkpoint(o, model, adapters, opt, dl, writes, say);
    say(fmt::format("resumed from step {} (epoch {}, batch {})", step, dl.epoch(), dl.position()));
  }
  if (writes && !o.config_text.empty()) write_file_atomic((fs::path(o.out_dir) / "config.toml").string(), o.config_text);
  LineFile metrics;  // discards its lines on ranks other than 0 and without --out
  if (writes) metrics = LineFile((fs::path(o.out_dir) / "metrics.jsonl").string(), !o.resume);

  // FLOPs per token: 6N + 12 L C T (PaLM appendix B); a frozen base skips the weight-gradient GEMMs
  // (4N). MFU against the measured bf16 peak.
  const double flops_per_token = (adapters.empty() ? 6.0 : 4.0) * double(model.n_params()) +
                                 12.0 * double(model.n_layer() * model.hidden_size() * o.seq_len);

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
    metrics.line(row.dump());
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
  // The step (models/train_step.h): static device buffers, zero-grad, forward/backward of every
  // micro-batch, clip and AdamW with the non-finite guard on the device; on CUDA captured into a CUDA
  // graph and replayed (--cuda-graph). Example data pads each micro-batch to the most loss positions
  // any batch of these examples can hold, so every step has the same shapes.
  TrainStep::Options so;
  so.batch = o.batch;
  so.seq_len = o.seq_len;
  so.grad_accum = o.grad_accum;
  so.loss_rows = dl.is_examples() ? max_loss_rows(dl.examples(), o.batch, o.seq_len) : 0;
  so.clip = o.clip;
  so.cuda_graph = o.cuda_graph;
  if (reducer) {
    so.before_last_backward = [&] { reducer->arm(); };  // DP: all-reduce in the last backward only
    so.reduce_losses = [](Tensor& l) { dist::all_reduce_sum(l); };  // every rank skips a bad step together
  }
  int64_t cur_step = 0;
  if (reducer || o.on_grads)
    so.after_backward = [&] {
      if (reducer) reducer->finish();  // DP: grads now averaged over ranks (before the norm and clip)
      if (o.on_grads) o.on_grads(cur_step, opt);
    };
  TrainStep train_step(model, opt, so);
  // The next step's batches are read while the GPU works on the current one. `pending` remembers
  // where the loader stood before them (a checkpoint resumes there).
  struct Pending {
    std::vector<Batch> micro;
    int64_t epoch = 0, pos = 0;
  };
  auto fetch = [&] {
    Pending p;
    p.epoch = dl.epoch();
    p.pos = dl.position();
    for (int64_t i = 0; i < o.grad_accum; ++i) p.micro.push_back(dl.next());
    return p;
  };
  std::optional<Pending> pending;
  const int64_t first_step = step;
  int64_t last_ckpt = o.resume ? step : -1;
  // SIGINT / SIGTERM: the step in flight is finished, checkpointed (with an out_dir), and train()
  // throws Interrupted. DP: the request is all-reduced, so every rank stops after the same step.
  auto stop_signal = [&]() -> int {
    int sig = signals ? signals->pending() : 0;
    if (dc.world > 1 && dist::all_reduce_scalar(sig ? 1.0 : 0.0) > 0 && sig == 0) sig = SIGTERM;
    return sig;
  };
  auto checkpoint = [&](int64_t at) {
    if (dc.rank == 0)
      save_checkpoint(o, model, adapters, opt, at, pending ? pending->epoch : dl.epoch(),
                      pending ? pending->pos : dl.position());
    dist::barrier();  // DP: every rank may resume from it once this step is over
    last_ckpt = at;
  };
  auto interrupted = [&](int sig) {
    const char* name = StopSignals::name(sig);
    if (step == first_step)
      throw Interrupted(sig, fmt::format("train: stopped by {} before step {}: {}", name, step + 1,
                                         o.resume ? fmt::format("{}/latest is unchanged", o.out_dir)
                                                  : std::string("nothing was trained")));
    if (o.out_dir.empty())
      throw Interrupted(sig, fmt::format("train: stopped by {} after step {} of {} (no --out: nothing saved)", name,
                                         step, total_steps));
    if (last_ckpt != step) checkpoint(step);
    throw Interrupted(sig, fmt::format("train: stopped by {} after step {} of {}: checkpoint {}; continue with --resume "
                                       "--out {}",
                                       name, step, total_steps,
                                       (fs::path(o.out_dir) / fmt::format("ckpt-{:08d}", step)).string(), o.out_dir));
  };
  if (int sig = stop_signal()) interrupted(sig);
  for (; step < total_steps; ++step) {
    const auto t0 = Clock::now();
    if (o.on_step) o.on_step(step);
    const double lr = lr_at(o, step, total_steps);
    cur_step = step;
    // The loss is the mean over all loss tokens of the step (every micro-batch, every rank), so
    // micro-batch i weighs n_i / N. With token streams all n_i are equal (1 / grad_accum, as before);
    // with examples of varied lengths this is what makes N ranks x batch b x grad-accum k equal one
    // process at batch N*b*k.
    Pending cur = pending ? std::move(*pending) : fetch();
    pending.reset();
    std::vector<double> n_loss;
    double n_local = 0;
    for (const Batch& b : cur.micro) n_local += double(n_loss.emplace_back(double(b.n_loss_tokens())));
    const double n_global = dc.world > 1 ? dist::all_reduce_scalar(n_local) : n_local;
    std::vector<double> weights;  // DP: the reducer averages over ranks, hence the factor world
    for (double n : n_loss) weights.push_back(n_global > 0 ? n * double(dc.world) / n_global : 0.0);
    train_step.start(cur.micro, lr, weights);
    if (step + 1 < total_steps) pending = fetch();  // overlaps the GPU's work
    const TrainStep::Result sr = train_step.finish();
    double loss_sum = 0;  // sum over this rank's micro-batches of n_i * loss_i
    for (size_t i = 0; i < n_loss.size(); ++i)
      if (n_loss[i] > 0) loss_sum += sr.micro_losses[i] * n_loss[i];
    const double loss_all = dc.world > 1 ? dist::all_reduce_scalar(loss_sum) : loss_sum;
    const double loss = n_global > 0 ? loss_all / n_global : NAN;
    const double norm = sr.norm;
    // The non-finite guard (on the device): such a step never reached the weights (every rank sees
    // the same all-reduced losses and gradients, so all skipped it together).
    const bool bad = sr.skipped;
    if (bad) {
      ++res.bad_steps;
      if (res.bad_steps > o.max_bad_steps)
        throw std::runtime_error(fmt::format(
            "train: step {}: loss {}, gradient norm {}: {} steps were non-finite in this run (more than "
            "--max-bad-steps {}); none of them changed the weights{}. Lower --lr (now {:g}), add --warmup or --clip, "
            "or train in --dtype f32",
            step + 1, loss, norm, res.bad_steps, o.max_bad_steps,
            last_ckpt > 0 ? fmt::format("; the last checkpoint is {}",
                                        (fs::path(o.out_dir) / fmt::format("ckpt-{:08d}", last_ckpt)).string())
                          : "",
            o.lr));
      auto num = [](double v) { return std::isfinite(v) ? fmt::format("{:.4f}", v) : fmt::format("{}", v); };
      say(fmt::format("step {:>5}/{} | skipped: loss {}, grad norm {} (non-finite; {} of at most {} with "
                      "--max-bad-steps)",
                      step + 1, total_steps, num(loss), num(norm), res.bad_steps, o.max_bad_steps));
    }
    const double dt_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const double tok_s = double(tokens_per_step) / dt_s;
    if (run_steps > 0) tps.push_back(tok_s);
    res.losses.push_back(loss);
    ++run_steps;
    const double mfu = dev == Device::cuda ? flops_per_token * tok_s / (o.peak_tflops * 1e12 * dc.world) : NAN;
    const double elapsed = std::chrono::duration<double>(Clock::now() - t_start).count();
    const double eta = elapsed / double(run_steps) * double(total_steps - step - 1);
    if (!bad && o.log_every > 0 && (step % o.log_every == 0 || step + 1 == total_steps))
      say(fmt::format("step {:>5}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | {:.1f}K tok/s{} | ETA {}", step + 1,
                      total_steps, loss, lr, norm, tok_s / 1e3,
                      std::isfinite(mfu) ? fmt::format(" | MFU {:.1f}%", 100 * mfu) : "", human_time(eta)));
    nlohmann::json row = {{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm}, {"tokens_per_s", tok_s}};
    if (bad) row["skipped"] = true;  // loss / grad_norm read null there (JSON has no NaN)
    if (std::isfinite(mfu)) row["mfu"] = mfu;  // absent where not measured (the CPU)
    metrics.line(row.dump());
    const bool last = step + 1 == total_steps;
    const bool have_eval = data.val || !eval_sets.empty();
    if (have_eval && (last || (o.eval_every > 0 && (step + 1) % o.eval_every == 0))) run_eval(step + 1);
    if (!o.out_dir.empty() && o.ckpt_every > 0 && ((step + 1) % o.ckpt_every == 0 || last)) checkpoint(step + 1);
    if (o.stop_after > 0 && run_steps >= o.stop_after) {
      ++step;
      break;
    }
    if (int sig = stop_signal()) {
      ++step;
      interrupted(sig);
    }
  }
  res.final_step = step;
  res.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  if (!tps.empty()) {
    std::nth_element(tps.begin(), tps.begin() + int64_t(tps.size() / 2), tps.end());
    res.tokens_per_second = tps[tps.size() / 2];
    res.step_ms = 1e3 * double(tokens_per_step) / res.tokens_per_second;
  }
  res.cuda_graph = train_step.captured();
  res.graph_nodes = train_step.graph_nodes();
  const GpuMemory mem = gpu_memory();
  res.gpu_peak_bytes = mem.allocator_peak;
  if (o.save_final && writes && step >= total_steps) {
    const fs::path out(o.out_dir);
    finite_host_copies(model_state(model, adapters), (out / "final").string());  // never a NaN in final/
    if (!adapters.empty()) {
      save_adapters(adapters, ao, (out / "adapter").string(), base);
      say(fmt::format("saved {} ({} adapter)", (out / "adapter").string(), ao.kind));
      merge_adapters(model);  // final/ is a plain HF model with the update merged
      res.adapters.clear();
    }
    model.save_hf((out / "final").string());
    copy_tokenizer_files(vocab_dir, out / "final");
    say(fmt::format("saved {} (HF layout{})", (out / "final").string(),
                    fs::exists(out / "final" / "vocab.json") ? ", with the tokenizer" : ""));
  }
  if (writes) {
    nlohmann::json sj = {{"final_step", res.final_step},
                         {"final_loss", res.losses.empty() ? nlohmann::json(nullptr) : nlohmann::json(res.losses.back())},
                         {"tokens_per_s", res.tokens_per_second},
                         {"step_ms", res.step_ms},
                         {"cuda_graph", res.cuda_graph},
                         {"graph_nodes", res.graph_nodes},
                         {"seconds", res.seconds},
                         {"n_trainable", res.n_trainable},
                         {"bad_steps", res.bad_steps}};
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
