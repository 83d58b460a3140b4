// train: fine-tune or train a GPT-2-family model. `train --help` lists the flags.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <exception>

#include "models/trainer.h"
#include "runtime/dist.h"

int main(int argc, char** argv) {
  deeplora::TrainOptions o;
  CLI::App app{"deeplora train: fine-tune (or train from scratch) a GPT-2-family model"};
  app.add_option("--model", o.model_dir, "HF model directory (config.json + model.safetensors)");
  app.add_option("--init", o.init, "random init from a preset instead of --model (gpt2, gpt2-medium, gpt2-large, gpt2-xl, small-cpu, tiny); with --adapter deeplora, gradsvd or random picks the adapter initialization");
  app.add_option("--data", o.data, "training data: text files, llm.c shards (*.bin) or one JSONL of prompt/completion")->required();
  app.add_option("--val-data", o.val_data, "validation data (default: the last --val-fraction of --data)");
  app.add_option("--val-fraction", o.val_fraction, "held-out fraction when no --val-data")->capture_default_str();
  app.add_option("--vocab-dir", o.vocab_dir, "directory with GPT-2's vocab.json + merges.txt")->capture_default_str();
  app.add_option("--batch", o.batch, "sequences per micro-batch")->capture_default_str();
  app.add_option("--seq-len", o.seq_len, "tokens per sequence")->capture_default_str();
  app.add_option("--grad-accum", o.grad_accum, "micro-batches per optimizer step")->capture_default_str();
  app.add_option("--steps", o.steps, "optimizer steps (0: from --epochs)")->capture_default_str();
  app.add_option("--epochs", o.epochs, "passes over the data when --steps is 0")->capture_default_str();
  app.add_option("--lr", o.lr, "peak learning rate")->capture_default_str();
  app.add_option("--warmup", o.warmup, "linear warm-up steps")->capture_default_str();
  app.add_option("--min-lr-ratio", o.min_lr_ratio, "cosine decay ends at lr * this")->capture_default_str();
  app.add_option("--weight-decay", o.weight_decay, "AdamW decoupled weight decay (matrices only)")->capture_default_str();
  app.add_option("--clip", o.clip, "global gradient-norm clip (0: off)")->capture_default_str();
  app.add_option("--eval-every", o.eval_every, "evaluate (and print a sample) every N steps")->capture_default_str();
  app.add_option("--eval-batches", o.eval_batches, "validation batches per eval")->capture_default_str();
  app.add_option("--ckpt-every", o.ckpt_every, "checkpoint every N steps (0: only at the end if >0)")->capture_default_str();
  app.add_option("--log-every", o.log_every, "log every N steps")->capture_default_str();
  app.add_option("--sample-tokens", o.sample_tokens, "tokens generated at each eval")->capture_default_str();
  app.add_option("--top-k", o.top_k, "sampling: 0/1 greedy, k > 1 top-k")->capture_default_str();
  app.add_option("--out", o.out_dir, "output directory: metrics.jsonl, checkpoints, final/")->capture_default_str();
  app.add_flag("--resume", o.resume, "continue from <out>/latest");
  app.add_option("--seed", o.seed, "seed for init, data order and sampling")->capture_default_str();
  app.add_option("--dtype", o.dtype, "compute dtype: bf16, f32 or f64")->capture_default_str();
  app.add_option("--device", o.device, "auto, cpu or cuda")->capture_default_str();
  app.add_option("--peak-tflops", o.peak_tflops, "device peak for MFU")->capture_default_str();
  app.add_flag("--quiet", o.quiet, "no per-step log");
  app.add_option("--bucket-mb", o.bucket_mb, "data parallel: gradient all-reduce bucket size (MiB)")->capture_default_str();
  auto& a = o.adapter;
  app.add_option("--adapter", a.kind, "lora | deeplora | none (full training)")->capture_default_str();
  app.add_option("--rank", a.rank, "LoRA r, or Deep LoRA width k = 2r (even)")->capture_default_str();
  app.add_option("--depth", a.depth, "Deep LoRA depth L (>= 2)")->capture_default_str();
  app.add_option("--eps", a.eps, "Deep LoRA: K_i(0) = eps I")->capture_default_str();
  app.add_option("--alpha", a.alpha, "LoRA alpha (scale alpha/r)")->capture_default_str();
  app.add_option("--outer-lr-scale", a.outer_lr_scale, "Deep LoRA: A, B train at this x lr (0 freezes them)")->capture_default_str();
  app.add_flag("--wide", a.wide, "Deep LoRA: uncompressed W_L..W_1 of width max(m,n) (reference)");
  app.add_option("--adapt", a.adapt, "adapted layers: attn | attn-mlp | all")->capture_default_str();
  app.add_option("--svd-batches", a.svd_batches, "batches averaged into the initialization gradient")->capture_default_str();
  app.add_option("--adapter-init", o.adapter_init, "load adapters from a saved adapter directory (ours or PEFT)");
  CLI11_PARSE(app, argc, argv);
  // --init is the model preset, or the Deep LoRA initialization (gradsvd | random).
  if (o.init == "gradsvd" || o.init == "random") {
    a.init = o.init;
    o.init.clear();
  }
  try {
    auto r = deeplora::train(o);
    if (deeplora::dist::ctx().rank == 0)
      fmt::print("done: {} steps, final loss {:.4f}, {:.1f}K tok/s (median), {:.1f} s\n", r.final_step,
               r.losses.empty() ? 0.0 : r.losses.back(), r.tokens_per_second / 1e3, r.seconds);
  } catch (const std::exception& e) {
    fmt::print(stderr, "train: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
