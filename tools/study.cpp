// study: the few-shot study runner. Fine-tunes one base model many times in one process (methods x
// training-set sizes x ranks x seeds x learning rates on classification tasks), scores validation and
// test accuracy, picks each cell's learning rate on validation only, and writes runs.jsonl,
// selection.jsonl and study.json (tools/study_report.py turns them into report.md and plots).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>

#include "models/study.h"

int main(int argc, char** argv) {
  using namespace deeplora;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::string grid_file, base;
  std::vector<std::string> tasks;
  std::vector<int64_t> ns;
  int64_t seeds = 0;
  bool dry_run = false;
  StudyOptions o;
  CLI::App app{"deeplora study: few-shot fine-tuning sweeps with learning rates chosen on validation"};
  app.add_option("--grid", grid_file, "JSON grid (fields: base, tasks, n, seeds, rank, ranks, rank_n, methods, epochs, "
                                      "min_steps, max_steps, batch, warmup_frac, min_lr_ratio, clip, dtype); "
                                      "default: the built-in default study");
  app.add_option("--base", base, "HF model directory to fine-tune (overrides the grid's)");
  app.add_option("--task", tasks, "task directories with train.jsonl, val.jsonl, test.jsonl (override the grid's)");
  app.add_option("--n", ns, "training-set sizes (override the grid's)")->check(CLI::PositiveNumber);
  app.add_option("--seeds", seeds, "seeds per cell (override the grid's)")->check(CLI::PositiveNumber);
  app.add_option("--out", o.out_dir, "output directory")->capture_default_str();
  app.add_flag("--resume", o.resume, "continue a study: skip the runs already in <out>/runs.jsonl");
  app.add_option("--time-budget", o.time_budget, "seconds: stop after the run that crosses it (resume later)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--export-runs", o.export_dir, "save every run's adapter (or model) under this directory");
  app.add_option("--vocab-dir", o.vocab_dir, "tokenizer directory (default: the base's, else data/gpt2)");
  app.add_option("--device", o.device, "auto, cpu or cuda")->capture_default_str()->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_flag("--quiet", o.quiet, "print only the summary");
  app.add_flag("--dry-run", dry_run, "print the plan's size and exit");
  CLI11_PARSE(app, argc, argv);
  try {
    StudyGrid g = grid_file.empty() ? StudyGrid::from_json(nlohmann::json::object(), "default grid")
                                    : StudyGrid::from_json_file(grid_file);
    if (!base.empty()) g.base = base;
    if (!tasks.empty()) g.tasks = tasks;
    if (!ns.empty()) g.ns = ns;
    if (seeds > 0) g.seeds = seeds;
    if (dry_run) {
      auto plan = plan_study(g);
      int64_t steps = 0;
      for (const auto& r : plan) steps += g.steps_for(g.methods[r.method_index], r.n);
      fmt::print("{} runs, {} optimizer steps in all, {} methods, {} tasks\n", plan.size(), steps, g.methods.size(),
                 g.tasks.size());
      return 0;
    }
    StudySummary s = run_study(g, o);
    return s.complete ? 0 : 3;  // 3: stopped by --time-budget; --resume continues
  } catch (const std::exception& e) {
    fmt::print(stderr, "study: error: {}\n", e.what());
    return 1;
  }
}
