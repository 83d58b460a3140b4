// dist_check: a small training run through deeplora::train whose per-step losses rank 0 prints as
// one JSON line, so tests (and the GPU machine) can compare `mpirun -np N dist_check --batch b`
// against one process with --batch N*b. --fail-rank/--fail-step make one rank throw on purpose.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <csignal>
#include <cstdio>
#include <algorithm>
#include <cmath>
#include <exception>
#include <nlohmann/json.hpp>

#include "models/trainer.h"
#include "runtime/dist.h"
#include "runtime/optim.h"
#include "tools/cli_ranges.h"

int main(int argc, char** argv) {
  deeplora::TrainOptions o;
  o.preset = "tiny";
  o.vocab_dir = "";
  o.batch = 4;
  o.seq_len = 16;
  o.steps = 20;
  o.lr = 3e-3;
  o.warmup = 2;
  o.weight_decay = 0.1;
  o.val_fraction = 0.1;
  o.dtype = "f32";
  o.device = "cpu";
  o.save_final = false;
  o.log_every = 0;
  o.out_dir = "out/dist_check";
  int fail_rank = -1;
  int64_t fail_step = -1;
  bool verbose = false, fail_kill = false;
  CLI::App app{"deeplora dist_check: tiny data-parallel training; rank 0 prints the losses as JSON"};
  std::vector<int64_t> nan_steps;
  const auto count = CLI::Range(int64_t(0), int64_t(1) << 40);
  app.add_option("--data", o.data, "llm.c shards (*.bin), text or JSONL examples")->required();
  app.add_option("--val-data", o.val_data, "validation data (default: --val-fraction of --data)");
  app.add_option("--val-fraction", o.val_fraction, "held-out fraction")->capture_default_str()->check(deeplora::cli::real_range(0, 1, false, true));
  app.add_option("--vocab-dir", o.vocab_dir, "tokenizer directory (text and JSONL data)");
  app.add_option("--preset", o.preset, "model preset")->capture_default_str();
  app.add_option("--model", o.model_dir, "HF model directory instead of --preset");
  app.add_option("--batch", o.batch, "sequences per micro-batch per rank")
      ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--seq-len", o.seq_len, "tokens per sequence")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--grad-accum", o.grad_accum, "micro-batches per step")
      ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--steps", o.steps, "optimizer steps")->capture_default_str()->check(count);
  app.add_option("--lr", o.lr, "peak learning rate")->capture_default_str()->check(deeplora::cli::positive(1e6));
  app.add_option("--warmup", o.warmup, "warm-up steps")->capture_default_str()->check(deeplora::cli::real_range(0, 1e12));
  app.add_option("--clip", o.clip, "gradient-norm clip (0: off)")->capture_default_str()->check(deeplora::cli::real_range(0, 1e12));
  app.add_option("--eval-every", o.eval_every, "evaluate every N steps")->capture_default_str()->check(count);
  app.add_option("--eval-batches", o.eval_batches, "validation batches per eval")
      ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 30));
  app.add_option("--ckpt-every", o.ckpt_every, "checkpoint every N steps")->capture_default_str()->check(count);
  app.add_flag("--resume", o.resume, "continue from <out>/latest");
  app.add_flag("--overwrite", o.overwrite, "replace the run already in --out");
  app.add_option("--stop-after", o.stop_after, "stop after this many steps of this run")->capture_default_str()->check(count);
  app.add_option("--max-bad-steps", o.max_bad_steps, "non-finite steps skipped before the run stops")
      ->capture_default_str()->check(count);
  app.add_option("--nan-grad-steps", nan_steps, "steps (0-based) whose gradient is poisoned with a NaN on every rank "
                                                "(tests the non-finite guard)")->check(count);
  app.add_option("--seed", o.seed, "seed")->capture_default_str();
  app.add_option("--dtype", o.dtype, "bf16, f32 or f64")->capture_default_str()->check(CLI::IsMember({"bf16", "f32", "f64"}));
  app.add_option("--device", o.device, "auto, cpu or cuda")->capture_default_str()->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--bucket-mb", o.bucket_mb, "gradient all-reduce bucket size (MiB)")
      ->capture_default_str()->check(deeplora::cli::positive(1e6));
  app.add_option("--out", o.out_dir, "output directory")->capture_default_str();
  app.add_option("--adapter", o.adapter.kind, "lora | deeplora | none")
      ->capture_default_str()->check(CLI::IsMember({"lora", "deeplora", "none"}));
  app.add_option("--rank", o.adapter.rank, "adapter rank / width")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(65536)));
  app.add_option("--fail-rank", fail_rank, "this rank throws at --fail-step (tests the abort path)")->check(CLI::Range(0, 1 << 20));
  app.add_option("--fail-step", fail_step, "step (0-based) at which --fail-rank throws")->check(count);
  app.add_flag("--fail-kill", fail_kill, "--fail-rank dies of SIGKILL instead of throwing");
  app.add_flag("--verbose", verbose, "per-step log on rank 0");
  CLI11_PARSE(app, argc, argv);
  o.quiet = !verbose;
  if (verbose) o.log_every = 1;
  try {
    const deeplora::dist::Context& dc = deeplora::dist::init();
    o.on_step = [&](int64_t step) {
      if (dc.rank != fail_rank || step != fail_step) return;
      if (fail_kill) std::raise(SIGKILL);
      throw std::runtime_error(fmt::format("dist_check: failing on purpose at step {}", step));
    };
    o.on_grads = [&](int64_t step, deeplora::AdamW& opt) {
      if (std::find(nan_steps.begin(), nan_steps.end(), step) == nan_steps.end()) return;
      deeplora::Tensor g = opt.flat_grads().at(0).slice0(0, 1);
      g.fill(NAN);
    };
    auto r = deeplora::train(o);
    if (dc.rank == 0) {
      nlohmann::json j = {{"world", dc.world},           {"losses", r.losses}, {"bad_steps", r.bad_steps},
                          {"val_losses", r.val_losses},  {"final_step", r.final_step},
                          {"tokens_per_second", r.tokens_per_second}, {"seconds", r.seconds}};
      fmt::print("{}\n", j.dump());
      std::fflush(stdout);
    }
    deeplora::dist::finalize();
  } catch (const deeplora::Interrupted& e) {
    fmt::print(stderr, "{}\n", e.what());
    return 128 + e.signal;
  } catch (const std::exception& e) {
    fmt::print(stderr, "dist_check: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
