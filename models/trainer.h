// The training loop behind tools/train: data, model, optimizer, schedule, eval, samples, metrics,
// checkpoints and resume. A library function so tests can run it (and compare resumed runs).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "models/adapters.h"
#include "runtime/tensor.h"

namespace deeplora {

struct TrainOptions {
  // Model: an HF directory (config.json + model.safetensors) or a preset for random init.
  std::string model_dir;
  std::string init = "";  // gpt2 | gpt2-medium | ... | small-cpu | tiny
  // Data: text files, llm.c shards (*.bin) or one JSONL of prompt/completion examples.
  std::vector<std::string> data;
  std::vector<std::string> val_data;
  double val_fraction = 0.05;  // held out from `data` when no val_data is given
  std::string vocab_dir = "data/gpt2";
  int64_t batch = 8, seq_len = 256, grad_accum = 1;
  int64_t steps = 0;     // 0: use epochs
  double epochs = 1.0;
  double lr = 3e-4, warmup = 0, min_lr_ratio = 0.1, weight_decay = 0.0, clip = 1.0;
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
  int64_t eval_every = 0, eval_batches = 8, ckpt_every = 0, log_every = 1;
  int64_t sample_tokens = 32;
  int top_k = 0;
  std::string out_dir = "out/run";
  bool resume = false;
  bool save_final = true;  // out_dir/final in the HF layout
  uint64_t seed = 1337;
  std::string dtype = "bf16";   // compute dtype: bf16 | f32 | f64
  std::string device = "auto";  // auto | cpu | cuda
  bool quiet = false;
  int64_t stop_after = 0;  // stop (as if killed) after this many steps of this run, for tests
  double peak_tflops = 790;  // bf16 dense peak measured on the H200, for MFU
  // Adapters (kind "none": full training). --init gradsvd|random selects adapter.init.
  AdapterOptions adapter = [] {
    AdapterOptions a;
    a.kind = "none";
    return a;
  }();
  std::string adapter_init;  // load adapters from a saved adapter directory (ours or PEFT)
  // Data parallel (mpirun -np N; runtime/dist.h): --batch is per rank, the global batch is N x batch.
  double bucket_mb = 25;  // gradient all-reduce bucket size (MiB)
  std::function<void(int64_t step)> on_step;  // called as each step starts; tests inject failures here
};

struct TrainResult {
  std::vector<double> losses;      // per optimizer step (mean over micro-batches)
  std::vector<double> val_losses;  // per eval
  int64_t final_step = 0;
  double tokens_per_second = 0;    // median over the run's steps after the first
  double seconds = 0;
  double adapter_grad_seconds = 0, adapter_svd_seconds = 0;  // initialization pass (deeplora gradsvd)
  int64_t n_trainable = 0;
};

TrainResult train(const TrainOptions& o);

}  // namespace deeplora
