// The training loop: reads top to bottom (data, model, optimizer, then the step loop with logging,
// eval, samples and checkpoints).
#include "models/trainer.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

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
};

// Splits data into train / val: examples by count, token streams by position (the tail is val).
// DP: train and val are sharded by rank; a val batch is shrunk so every rank gets at least one.
Data make_data(const TrainOptions& o, const Tokenizer* tok, int64_t V, const dist::Context& dc) {
  Data d;
  if (o.data.empty()) throw std::invalid_argument("train: no --data given");
  const bool jsonl = o.data.size() == 1 && o.data[0].size() > 6 && o.data[0].compare(o.data[0].size() - 6, 6, ".jsonl") == 0;
  if (tok && tok->eot_id() >= 0) d.pad = tok->eot_id();
  if (jsonl) {
    if (!tok) throw std::invalid_argument(fmt::format("{}: JSONL data needs a tokenizer (--vocab-dir)", o.data[0]));
    auto ex = load_jsonl_examples(o.data[0], *tok);
    std::vector<Example> val;
    if (!o.val_data.empty()) val = load_jsonl_examples(o.val_data[0], *tok);
    else if (o.val_fraction > 0 && ex.size() >= 2) {
      size_t nv = std::max<size_t>(1, size_t(double(ex.size()) * o.val_fraction));
      val.assign(ex.end() - int64_t(nv), ex.end());
      ex.resize(ex.size() - nv);
    }
    d.train = DataLoader::from_examples(std::move(ex), o.batch, o.seq_len, d.pad, o.seed, dc.rank, dc.world, o.data[0]);
    if (const int64_t vb = std::min<int64_t>(o.batch, int64_t(val.size()) / dc.world); vb > 0)
      d.val = DataLoader::from_examples(std::move(val), vb, o.seq_len, d.pad, 0, dc.rank, dc.world, "validation data");
  } else {
    auto toks = load_token_stream(o.data, tok);
    for (size_t i = 0; i < toks.size(); ++i)
      if (toks[i] < 0 || toks[i] >= V)
        throw std::runtime_error(fmt::format("{}: token id {} at position {} is outside the model's vocabulary ({})",
                                             o.data[0], toks[i], i, V));
    std::vector<int32_t> val;
    if (!o.val_data.empty()) val = load_token_stream(o.val_data, tok);
    else if (o.val_fraction > 0) {
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

struct Tensors2 {
  Tensor in, tgt;
};
Tensors2 to_device(const Batch& b, Device dev) {
  return {Tensor::from_ints(b.inputs, Shape{b.B, b.T}, dev), Tensor::from_ints(b.targets, Shape{b.B, b.T}, dev)};
}

double evaluate(Gpt& model, DataLoader& val, int64_t n_batches) {
  NoGrad ng;
  val.seek(0, 0);
  const int64_t n = std::min<int64_t>(n_batches, val.batches_per_epoch());
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    auto t = to_device(val.next(), model.device());
    sum += model.loss(t.in, t.tgt).item();
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

}  // namespace

namespace {
TrainResult train_impl(const TrainOptions& o, const dist::Context& dc);
}

// DP: rank and world from mpirun (a world of one without it). An exception on one rank of several
// must not leave the others blocked in an all-reduce: abort_all names the rank and tears all down.
TrainResult train(const TrainOptions& o) {
  const dist::Context& dc = dist::init();
  if (dc.world == 1) return train_impl(o, dc);
  try {
    return train_impl(o, dc);
  } catch (const std::exception& e) {
    dist::abort_all(dc.rank, e.what());
  }
}

namespace {
TrainResult train_impl(const TrainOptions& o, const dist::Context& dc) {
  // ---- device, dtype, tokenizer -------------------------------------------------------------------
  Device dev = o.device == "cpu" ? Device::cpu
               : o.device == "cuda" ? Device::cuda
               : cuda_available() ? Device::cuda : Device::cpu;
  if (o.device != "auto" && o.device != "cpu" && o.device != "cuda")
    throw std::invalid_argument(fmt::format("--device must be auto, cpu or cuda, got '{}'", o.device));
  if (dev == Device::cuda && !cuda_available())
    throw std::runtime_error("--device cuda: " + cuda_unavailable_reason());
  DType dt = dtype_from_name(o.dtype.c_str());
  check(dt != DType::i32, "train", "--dtype must be bf16, f32 or f64");
  auto say = [&](const std::string& s) {
    if (!o.quiet && dc.rank == 0) fmt::print("{}\n", s);  // DP: rank 0 alone logs
  };
  std::unique_ptr<Tokenizer> tok;
  if (!o.vocab_dir.empty() && fs::exists(fs::path(o.vocab_dir) / "vocab.json"))
    tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(o.vocab_dir));

  // ---- model ----------------------------------------------------------------------------------------
  std::unique_ptr<Gpt> model;
  if (!o.model_dir.empty()) model = load_hf_gpt(o.model_dir, dt, dev);
  else model = std::make_unique<Gpt>(GptConfig::preset(o.init.empty() ? "small-cpu" : o.init), dt, dev, o.seed);
  const GptConfig& cfg = model->config();
  check(o.seq_len <= cfg.n_positions, "train",
        fmt::format("--seq-len {} exceeds the model's n_positions {}", o.seq_len, cfg.n_positions));
  say(fmt::format("model: {} | {} {} | device {}", cfg.str(), dtype_name(dt), o.model_dir.empty() ? "random init" : o.model_dir,
                  device_name(dev)));

  // ---- data -------------------------------------------------------------------------------------------
  Data data = make_data(o, tok.get(), cfg.vocab_size, dc);
  DataLoader& dl = *data.train;
  const int64_t tokens_per_step = o.batch * o.seq_len * o.grad_accum * dc.world;  // DP: global
  const int64_t total_steps =
      o.steps > 0 ? o.steps : std::max<int64_t>(1, int64_t(o.epochs * double(dl.batches_per_epoch()) / double(o.grad_accum)));
  say(fmt::format("data: {} rows, {} batches/epoch of {}x{} | val: {} | {} steps of {} tokens", dl.n_rows(),
                  dl.batches_per_epoch(), o.batch, o.seq_len, data.val ? fmt::format("{} rows", data.val->n_rows()) : "none",
                  total_steps, tokens_per_step));

  // ---- adapters: the base model is frozen; deeplora+gradsvd runs its initialization pass here --------
  AdapterOptions ao = o.adapter;
  ao.seed = o.seed;
  Adapters adapters;
  TrainResult res;
  if (!o.adapter_init.empty()) {
    adapters = load_adapters(*model, o.adapter_init, ao, &ao);
    say(fmt::format("{} | loaded from {}", ao.str(), o.adapter_init));
  } else if (ao.kind != "none") {
    AdapterOptions init = ao;
    // On resume the values come from the checkpoint: skip the gradient pass.
    if (o.resume && init.kind == "deeplora" && !init.wide) init.init = "random";
    AdapterInitReport rep;
    adapters = attach_adapters(*model, init, [&] {
      auto t = to_device(dl.next(), dev);
      return std::make_pair(t.in, t.tgt);
    }, &rep);
    dl.seek(0, 0);  // the init pass read the first batch(es)
    res.adapter_grad_seconds = rep.grad_seconds;
    res.adapter_svd_seconds = rep.svd_seconds;
    say(ao.str());
    say(rep.str());
  }

  // ---- optimizer: full training decays matrices only (GPT-2 / nanoGPT); adapters per DEEP_LORA.md ----
  std::vector<ParamGroup> groups;
  if (!adapters.empty()) {
    groups = adapter_param_groups(adapters, ao.outer_lr_scale);
  } else {
    ParamGroup decay{{}, 1.0, o.weight_decay, "decay"}, no_decay{{}, 1.0, 0.0, "no_decay"};
    for (Tensor& t : model->trainable_tensors()) (t.ndim() >= 2 ? decay : no_decay).params.push_back(t);
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

  if (dc.rank == 0) fs::create_directories(o.out_dir);  // DP: rank 0 alone writes
  int64_t step = 0;
  if (o.resume) {
    step = load_checkpoint(o, *model, adapters, opt, dl);
    say(fmt::format("resumed from step {} (epoch {}, batch {})", step, dl.epoch(), dl.position()));
  }
  std::ofstream metrics;  // DP: left closed (writes go nowhere) on ranks other than 0
  if (dc.rank == 0) metrics.open(fs::path(o.out_dir) / "metrics.jsonl", o.resume ? std::ios::app : std::ios::trunc);

  // FLOPs per token: 6N + 12 L C T (PaLM appendix B); a frozen base skips the weight-gradient GEMMs
  // (4N). MFU against the measured bf16 peak.
  const double flops_per_token = (adapters.empty() ? 6.0 : 4.0) * double(cfg.n_params()) +
                                 12.0 * double(cfg.n_layer * cfg.n_embd * o.seq_len);

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
    p.t = {staging.upload(b.inputs, Shape{b.B, b.T}, dev), staging.upload(b.targets, Shape{b.B, b.T}, dev)};
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
      Tensor loss = model->loss(cur.t.in, cur.t.tgt);
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
      say(fmt::format("step {:>5}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | {:.1f}K tok/s | MFU {} | ETA {}",
                      step + 1, total_steps, loss, lr, norm, tok_s / 1e3,
                      std::isfinite(mfu) ? fmt::format("{:.1f}%", 100 * mfu) : "-", human_time(eta)));
    metrics << nlohmann::json{{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm},
                              {"tokens_per_s", tok_s}, {"mfu", std::isfinite(mfu) ? mfu : 0.0}}.dump()
            << "\n";
    const bool last = step + 1 == total_steps;
    if (data.val && o.eval_every > 0 && ((step + 1) % o.eval_every == 0 || last)) {
      const double vl = evaluate(*model, *data.val, o.eval_batches);
      res.val_losses.push_back(vl);
      std::string sample;
      if (tok && o.sample_tokens > 0 && dc.rank == 0) {
        auto ids = model->generate({int32_t(tok->eot_id())}, o.sample_tokens, o.top_k, o.seed + uint64_t(step));
        sample = sanitize_utf8(tok->decode(ids));
      }
      say(fmt::format("eval step {} | val loss {:.4f}{}", step + 1, vl, sample.empty() ? "" : " | sample: " + nlohmann::json(sample).dump()));
      metrics << nlohmann::json{{"step", step + 1}, {"val_loss", vl}, {"sample", sample}}.dump() << "\n";
    }
    metrics.flush();
    if (o.ckpt_every > 0 && ((step + 1) % o.ckpt_every == 0 || last)) {
      if (dc.rank == 0)
        save_checkpoint(o, *model, adapters, opt, step + 1, pending ? pending->epoch : dl.epoch(),
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
  if (o.save_final && step >= total_steps && dc.rank == 0) {
    if (!adapters.empty()) {
      save_adapters(adapters, ao, (fs::path(o.out_dir) / "adapter").string(),
                    o.model_dir.empty() ? o.init : o.model_dir);
      say(fmt::format("saved {} ({} adapter)", (fs::path(o.out_dir) / "adapter").string(), ao.kind));
      merge_adapters(*model);  // final/ is a plain HF GPT-2 with the update merged
    }
    save_hf_gpt(*model, (fs::path(o.out_dir) / "final").string());
    say(fmt::format("saved {} (HF layout)", (fs::path(o.out_dir) / "final").string()));
  }
  return res;
}
}  // namespace

}  // namespace deeplora
