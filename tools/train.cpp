// train: fine-tune or train a GPT-2-family model. `train --help` lists the flags.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <cstring>
#include <exception>

#include "models/trainer.h"
#include "runtime/dist.h"
#include "tools/cli_ranges.h"

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a redirected log keeps every line even if the run is killed
  // --init used to mean both the model preset and the Deep LoRA initialization.
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--init") == 0 || std::strncmp(argv[i], "--init=", 7) == 0) {
      fmt::print(stderr, "train: error: --init was split in two: --preset NAME picks a random-init model (gpt2, "
                         "small-cpu, ...), --deeplora-init gradsvd|random the Deep LoRA initialization\n");
      return 2;
    }
  deeplora::TrainOptions o;
  CLI::App app{"deeplora train: fine-tune (or train from scratch) a GPT-2-family model"};
  app.set_config("--config", "", "read options from a TOML file (<out>/config.toml of a run holds all of its own)");
  app.allow_config_extras(CLI::config_extras_mode::error);  // a misspelt key is an error, not silently ignored
  app.add_option("--model", o.model_dir, "HF model directory (config.json + model.safetensors) to fine-tune");
  app.add_option("--preset", o.preset, "random init from a preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl, small-cpu, tiny");
  app.add_option("--model-config", o.model_config, "random init from an HF GPT-2 config.json");
  app.add_option("--n-layer", o.n_layer, "random init: layers (0: the preset's / config's)")
      ->capture_default_str()->check(CLI::Range(int64_t(0), int64_t(1024)));
  app.add_option("--n-head", o.n_head, "random init: attention heads")
      ->capture_default_str()->check(CLI::Range(int64_t(0), int64_t(1024)));
  app.add_option("--n-embd", o.n_embd, "random init: width")->capture_default_str()->check(CLI::Range(int64_t(0), int64_t(65536)));
  app.add_option("--n-positions", o.n_positions, "random init: context length")
      ->capture_default_str()->check(CLI::Range(int64_t(0), int64_t(1) << 20));
  app.add_option("--data", o.data,
                 "training data: text files, llm.c shards (*.bin), or JSONL files of {\"prompt\", \"completion\"} or "
                 "multiple-choice {\"prompt\", \"choices\", \"label\"} objects (trained on prompt + the labelled choice). "
                 "An example longer than --seq-len keeps its completion: the prompt is cut from the left (counted in "
                 "the log); a completion alone longer than --seq-len is an error naming the line")
      ->required();
  app.add_option("--val-data", o.val_data, "validation data (default: the last --val-fraction of --data)");
  app.add_option("--val-fraction", o.val_fraction, "held-out fraction when no --val-data")
      ->capture_default_str()->check(deeplora::cli::real_range(0, 1, false, true));
  app.add_option("--eval-data", o.eval_data, "multiple-choice JSONL scored at every eval (accuracy, acc_norm)");
  app.add_option("--save-best", o.save_best, "keep <out>/best: acc (first --eval-data) or loss (validation loss)")
      ->check(CLI::IsMember({"acc", "loss"}));
  app.add_option("--eval-prompts", o.eval_prompts, "eval samples start from these prompts (one per line, or JSONL \"prompt\")");
  app.add_option("--vocab-dir", o.vocab_dir, "tokenizer directory (tokenizer.json, or vocab.json + merges.txt); default: the --model directory's, else data/gpt2")->capture_default_str();
  app.add_option("--batch", o.batch, "sequences per micro-batch")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--seq-len", o.seq_len, "tokens per sequence (at most the model's n_positions)")
      ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--grad-accum", o.grad_accum, "micro-batches per optimizer step")
      ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--steps", o.steps, "optimizer steps (0: from --epochs)")
      ->capture_default_str()->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  app.add_option("--epochs", o.epochs, "passes over the data when --steps is 0")
      ->capture_default_str()->check(deeplora::cli::positive(1e6));
  app.add_option("--lr", o.lr, "peak learning rate")->capture_default_str()->check(deeplora::cli::positive(1e6));
  app.add_option("--warmup", o.warmup, "linear warm-up steps")->capture_default_str()->check(deeplora::cli::real_range(0, 1e12));
  app.add_option("--min-lr-ratio", o.min_lr_ratio, "cosine decay ends at lr * this")
      ->capture_default_str()->check(deeplora::cli::real_range(0, 1));
  app.add_option("--weight-decay", o.weight_decay, "AdamW decoupled weight decay (matrices only)")
      ->capture_default_str()->check(deeplora::cli::real_range(0, 1e6));
  app.add_option("--adam-eps", o.adam_eps, "AdamW eps of full training")
      ->capture_default_str()->check(deeplora::cli::real_range(0, 1));
  app.add_option("--adapter-adam-eps", o.adapter_adam_eps, "AdamW eps when training adapters")
      ->capture_default_str()->check(deeplora::cli::real_range(0, 1));
  app.add_option("--clip", o.clip, "global gradient-norm clip (0: off)")->capture_default_str()->check(deeplora::cli::real_range(0, 1e12));
  const auto count = CLI::Range(int64_t(0), int64_t(1) << 40);
  app.add_option("--eval-every", o.eval_every, "evaluate (and print samples) every N steps; 0: at the end only")
      ->capture_default_str()->check(count);
  app.add_option("--eval-batches", o.eval_batches, "validation batches per eval")
      ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 30));
  app.add_option("--ckpt-every", o.ckpt_every, "checkpoint every N steps (0: none)")->capture_default_str()->check(count);
  app.add_option("--log-every", o.log_every, "log every N steps (0: none)")->capture_default_str()->check(count);
  app.add_option("--sample-tokens", o.sample_tokens, "tokens generated per sample at each eval (0: none; below n_positions)")
      ->capture_default_str()->check(CLI::Range(int64_t(0), int64_t(1) << 20));
  app.add_option("--top-k", o.top_k, "samples: 0/1 greedy, k > 1 top-k sampling")
      ->capture_default_str()->check(CLI::Range(0, 1 << 20));
  app.add_option("--max-bad-steps", o.max_bad_steps,
                 "steps with a non-finite loss or gradient norm are skipped (no update); more than this many stop the run")
      ->capture_default_str()->check(count);
  app.add_option("--out", o.out_dir, "output directory: config.toml, metrics.jsonl, summary.json, checkpoints, final/")
      ->capture_default_str();
  app.add_flag("--resume", o.resume, "continue from <out>/latest (falls back to the newest good checkpoint)");
  app.add_flag("--overwrite", o.overwrite, "replace the run already in --out (a new run into it is refused otherwise)");
  app.add_option("--seed", o.seed, "seed for init, data order and sampling")->capture_default_str();
  app.add_option("--dtype", o.dtype, "compute dtype")->capture_default_str()->check(CLI::IsMember({"bf16", "f32", "f64"}));
  app.add_option("--device", o.device, "device")->capture_default_str()->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--peak-tflops", o.peak_tflops, "device peak for MFU")->capture_default_str()->check(deeplora::cli::positive(1e9));
  app.add_flag("--quiet", o.quiet, "no per-step log");
  std::string cuda_graph = "on";
  app.add_option("--cuda-graph", cuda_graph, "CUDA: capture the whole training step into a CUDA graph and replay it")
      ->capture_default_str()->check(CLI::IsMember({"on", "off"}));
  app.add_option("--bucket-mb", o.bucket_mb, "data parallel: gradient all-reduce bucket size (MiB)")
      ->capture_default_str()->check(deeplora::cli::positive(1e6));
  auto& a = o.adapter;
  app.add_option("--adapter", a.kind, "lora | deeplora | none (full training)")
      ->capture_default_str()->check(CLI::IsMember({"lora", "deeplora", "none"}));
  app.add_option("--rank", a.rank,
                 "r: LoRA's rank; Deep LoRA's subspace rank (top-r singular vectors per side, factors of width 2r)")
      ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(65536)));
  app.add_option("--depth", a.depth, "Deep LoRA depth L (>= 2)")->capture_default_str()->check(CLI::Range(2, 64));
  app.add_option("--eps", a.eps, "Deep LoRA: K_i(0) = eps I")->capture_default_str()->check(deeplora::cli::positive(1e6));
  app.add_option("--alpha", a.alpha, "LoRA alpha (scale alpha/r)")->capture_default_str()->check(deeplora::cli::positive(1e9));
  app.add_option("--outer-lr-scale", a.outer_lr_scale, "Deep LoRA: A, B train at this x lr (0 freezes them)")
      ->capture_default_str()->check(deeplora::cli::real_range(0, 1e6));
  app.add_option("--deeplora-init", a.init, "Deep LoRA initialization: gradsvd (the method) or random (the narrow ablation)")
      ->capture_default_str()->check(CLI::IsMember({"gradsvd", "random"}));
  app.add_flag("--wide", a.wide, "Deep LoRA: uncompressed W_L..W_1 of width max(m,n) (reference)");
  app.add_option("--adapt", a.adapt, "adapted layers: attn | attn-mlp | all")
      ->capture_default_str()->check(CLI::IsMember({"attn", "attn-mlp", "all"}));
  app.add_option("--svd-batches", a.svd_batches, "batches averaged into the initialization gradient (at most the data's)")
      ->capture_default_str()->check(CLI::Range(1, 10000));
  app.add_option("--adapter-init", o.adapter_init, "load adapters from a saved adapter directory (ours or PEFT)");
  CLI11_PARSE(app, argc, argv);
  o.cuda_graph = cuda_graph == "on";
  // Every option with its value (defaults too), minus unset strings and lists, which read back as "",
  // and minus the two that say what to do with an existing --out.
  std::string cfg = app.config_to_str(true, true), kept;
  for (size_t a = 0, b; a < cfg.size(); a = b + 1) {
    b = cfg.find('\n', a);
    if (b == std::string::npos) b = cfg.size();
    const std::string line = cfg.substr(a, b - a);
    // --resume / --overwrite act on one --out; a config read back for another run must not carry them.
    if (line.rfind("resume=", 0) == 0 || line.rfind("overwrite=", 0) == 0) continue;
    if (line.size() < 3 || line.compare(line.size() - 3, 3, "=\"\"") != 0) kept += line + "\n";
  }
  o.config_text = kept;
  try {
    auto r = deeplora::train(o);
    if (deeplora::dist::ctx().rank == 0)
      fmt::print("done: {} steps, final loss {:.4f}, {:.1f}K tok/s (median), {:.1f} s, step {:.3f} ms (median){}{}\n",
                 r.final_step, r.losses.empty() ? 0.0 : r.losses.back(), r.tokens_per_second / 1e3, r.seconds, r.step_ms,
                 r.gpu_peak_bytes ? fmt::format(", GPU peak {:.2f} GiB", double(r.gpu_peak_bytes) / double(1 << 30)) : "",
                 r.cuda_graph ? fmt::format(", CUDA graph of {} nodes", r.graph_nodes) : "");
  } catch (const deeplora::Interrupted& e) {
    fmt::print(stderr, "{}\n", e.what());  // where the checkpoint is; 130 for SIGINT, 143 for SIGTERM
    return 128 + e.signal;
  } catch (const std::exception& e) {
    fmt::print(stderr, "train: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
