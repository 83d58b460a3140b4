// The training loop behind tools/train: data, model, optimizer, schedule, eval (loss, multiple-choice
// accuracy, samples), metrics, checkpoints, best model and resume. A library function so tests and
// the few-shot study runner (in-process fine-tunes on a loaded base) can call it.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "models/adapters.h"
#include "models/eval.h"
#include "runtime/io/dataloader.h"
#include "runtime/tensor.h"

namespace deeplora {

class Tokenizer;
class AdamW;

struct TrainOptions {
  // Model: an HF directory (config.json + model.safetensors) to fine-tune, or a random init from a
  // preset, an HF config.json and/or explicit sizes (which override the preset's / the file's).
  std::string model_dir;
  std::string preset;        // gpt2 | gpt2-medium | gpt2-large | gpt2-xl | small-cpu | tiny
  std::string model_config;  // an HF config.json (its model_type picks the family)
  int64_t n_layer = 0, n_head = 0, n_embd = 0, n_positions = 0;  // 0: as the preset / config
  // Data: text files, llm.c shards (*.bin), or JSONL files (prompt/completion or multiple choice).
  std::vector<std::string> data;
  std::vector<std::string> val_data;
  double val_fraction = 0.05;  // held out from `data` when no val_data is given
  std::vector<std::string> eval_data;  // multiple-choice JSONL scored (acc, acc_norm) at every eval
  std::string eval_prompts;            // prompts (one per line, or JSONL "prompt") for the eval samples
  std::string save_best;               // "" | acc | loss: keep <out>/best (by the first eval_data / val loss)
  std::string vocab_dir = "data/gpt2";
  int64_t batch = 8, seq_len = 256, grad_accum = 1;
  int64_t steps = 0;     // 0: use epochs
  double epochs = 1.0;
  double lr = 3e-4, warmup = 0, min_lr_ratio = 0.1, weight_decay = 0.0, clip = 1.0;
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
  double adapter_adam_eps = 1e-6;  // AdamW eps when adapters are trained (DEEP_LORA.md; the authors' optax eps)
  int64_t eval_every = 0, eval_batches = 8, ckpt_every = 0, log_every = 1;  // eval_every 0: at the end only
  int64_t sample_tokens = 32;
  int top_k = 0;
  std::string out_dir = "out/run";  // "" writes nothing (in-process runs)
  bool resume = false;
  bool overwrite = false;  // a new run may replace the run files already in out_dir (else: refused)
  // Non-finite loss or gradient norm: the step is skipped (no update) and counted; more than this many
  // in a run stop it with an error naming the step.
  int64_t max_bad_steps = 10;
  bool cuda_graph = true;  // capture the training step into a CUDA graph (CUDA; models/train_step.h)
  bool save_final = true;  // out_dir/final in the HF layout (+ out_dir/adapter)
  uint64_t seed = 1337;
  std::string dtype = "bf16";   // compute dtype: bf16 | f32 | f64
  std::string device = "auto";  // auto | cpu | cuda
  bool quiet = false;
  int64_t stop_after = 0;  // stop (as if killed) after this many steps of this run, for tests
  double peak_tflops = 790;  // bf16 dense peak measured on the H200, for MFU
  // Adapters (kind "none": full training).
  AdapterOptions adapter = [] {
    AdapterOptions a;
    a.kind = "none";
    return a;
  }();
  std::string adapter_init;  // load adapters from a saved adapter directory (ours or PEFT)
  // Data parallel (mpirun -np N; runtime/dist.h): --batch is per rank, the global batch is N x batch.
  double bucket_mb = 25;  // gradient all-reduce bucket size (MiB)
  std::string config_text;  // the resolved options as a config file: written to <out>/config.toml
  std::function<void(int64_t step)> on_step;  // called as each step starts; tests inject failures here
  // Called after backward (and the data-parallel all-reduce), before the non-finite check and the
  // update: tests poison gradients here.
  std::function<void(int64_t step, AdamW& opt)> on_grads;
};

// Thrown by train() when SIGINT / SIGTERM asked it to stop (only runs with an out_dir listen): the
// current step was finished and checkpointed. what() is the one line to print; exit with 128 + signal.
struct Interrupted : std::runtime_error {
  int signal;
  Interrupted(int sig, const std::string& msg) : std::runtime_error(msg), signal(sig) {}
};

// What an in-process caller (tools/study) hands over instead of paths: a loaded model, tokenized data.
struct TrainInputs {
  CausalLM* model = nullptr;                // trained as is; adapters stay attached (TrainResult::adapters)
  const Tokenizer* tokenizer = nullptr;
  std::vector<Example> train, val;      // used when train is non-empty (then --data is not read)
  std::vector<const McData*> eval;      // used instead of --eval-data when non-empty
};

struct EvalRecord {
  int64_t step = 0;
  double val_loss = NAN;               // NaN without validation data
  std::vector<McScores> mc;            // one per eval set
};

struct TrainResult {
  std::vector<double> losses;      // per step: the token-weighted mean over micro-batches and ranks (NaN: skipped)
  std::vector<double> val_losses;  // per eval
  std::vector<EvalRecord> evals;
  int64_t final_step = 0;
  int64_t bad_steps = 0;           // steps skipped for a non-finite loss or gradient norm
  double tokens_per_second = 0;    // median over the run's steps after the first
  double step_ms = 0;              // median step time over the same steps
  bool cuda_graph = false;         // the step ran as a captured CUDA graph
  int64_t graph_nodes = 0;         // of that graph (kernels, copies, memsets)
  double seconds = 0;
  double adapter_grad_seconds = 0, adapter_svd_seconds = 0;  // initialization pass (deeplora gradsvd)
  int64_t n_trainable = 0;
  int64_t n_prompts_cut = 0;       // training examples whose prompt was cut from the left to fit
  int64_t best_step = 0;           // --save-best: the step kept in <out>/best
  double best_value = NAN;
  size_t gpu_peak_bytes = 0;       // allocator high-water mark during the run (0 on the CPU)
  Adapters adapters;               // the run's adapters (still attached to the model)
};

TrainResult train(const TrainOptions& o, const TrainInputs& in = {});

// The model a TrainOptions asks for: load --model (any registered family), or random-init from
// --preset / --model-config / the size flags (the family of the preset or of the config's model_type). Throws naming the flag when none is given or they conflict.
std::unique_ptr<CausalLM> make_model(const TrainOptions& o, DType dt, Device dev);

// Training examples from JSONL files (prompt/completion or multiple choice: prompt + the labelled
// choice, loss on the choice), each fitted to seq_len (fit_examples). *n_cut: prompts cut.
std::vector<Example> load_examples(const std::vector<std::string>& paths, const Tokenizer& tok, int64_t seq_len,
                                   int64_t* n_cut = nullptr);

}  // namespace deeplora
