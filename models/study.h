// The few-shot study: many fine-tunes of one base model in one process (method x training-set size x
// rank x seed x learning rate on classification tasks), each scored on the task's validation and
// test splits. The learning rate of every (task, method, variant, n, rank) cell is then chosen by
// mean validation accuracy over seeds; test accuracy is only reported for that choice.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "models/adapters.h"
#include "models/eval.h"

namespace deeplora {

class Tokenizer;

// One method of the grid: an adapter configuration, its learning-rate grid and where it runs.
struct StudyMethod {
  std::string name;            // lora | lora-noscale | deeplora | deeplora-random | full | any label
  std::string variant;         // "" for the default options, else a short label ("gamma=0")
  AdapterOptions adapter;      // kind "none": full fine-tuning (no rank)
  bool alpha_is_rank = false;  // LoRA with scale 1 at every rank (alpha = r)
  std::vector<double> lrs;
  bool rank_sweep = false;     // also runs at StudyGrid::ranks for n in StudyGrid::rank_ns
  std::vector<int64_t> ns;     // training-set sizes (empty: the grid's)
  int64_t steps = 0;           // fixed optimizer steps (0: the grid's rule)
  double weight_decay = 0;
  double adam_eps = 1e-6;       // AdamW eps of the adapters (full fine-tuning: 1e-8)
  bool svd_all = false;        // Deep LoRA: the initialization gradient over the whole training set
  bool is_full() const { return adapter.kind == "none"; }
  nlohmann::json options() const;  // what runs.jsonl records of it
};

struct StudyGrid {
  std::string base;                // HF model directory
  std::vector<std::string> tasks;  // directories with train.jsonl (the pool), val.jsonl, test.jsonl
  std::vector<int64_t> ns = {16, 64, 256, 1024};
  int64_t seeds = 5;
  int64_t rank = 8;  // the main rank
  std::vector<int64_t> ranks = {2, 4, 8, 16, 32, 64};
  std::vector<int64_t> rank_ns = {16, 64};
  std::vector<StudyMethod> methods;
  // Optimizer steps of a run: clamp(round(epochs * n / batch), min_steps, max_steps).
  double epochs = 20;
  int64_t min_steps = 50, max_steps = 200;
  int64_t batch = 16;
  double warmup_frac = 0.1, min_lr_ratio = 0.1, clip = 1.0;
  std::string dtype = "auto";  // bf16 on CUDA, f32 on the CPU
  // The default methods: lora (alpha 16), lora-noscale, deeplora, deeplora-random, full.
  static std::vector<StudyMethod> default_methods();
  // A JSON grid: every field optional (the defaults above otherwise). Throws naming the file and field.
  static StudyGrid from_json(const nlohmann::json& j, const std::string& what);
  static StudyGrid from_json_file(const std::string& path);
  nlohmann::json to_json() const;
  int64_t steps_for(const StudyMethod& m, int64_t n) const;
};

// One planned fine-tune.
struct StudyRun {
  std::string task, method, variant;  // task: the directory's name
  int64_t n = 0, seed = 0, rank = 0;  // rank 0: full fine-tuning
  double lr = 0;
  size_t method_index = 0, task_index = 0;
  std::string key() const;  // unique per run; what --resume matches
};

// Every run of the grid in execution order: task, n and seed outermost (one training subset each).
std::vector<StudyRun> plan_study(const StudyGrid& g);

struct StudyTask {
  std::string name, dir;
  McData pool, val, test;
  int64_t n_classes = 0;
};
// dir/train.jsonl, dir/val.jsonl, dir/test.jsonl in the multiple-choice format (labels required).
StudyTask load_study_task(const std::string& dir, const Tokenizer& tok, int64_t seq_len);

// The training subset of a seed: n distinct pool indices from a seeded Fisher-Yates shuffle, the same
// for every method, so runs of one seed are paired. Throws when n exceeds the pool.
std::vector<int64_t> training_subset(int64_t pool_size, int64_t n, int64_t seed);

struct RunRecord {
  StudyRun run;
  nlohmann::json options;  // the method's options
  int64_t steps = 0, batch = 0, n_trainable = 0;
  int64_t bad_steps = 0;  // steps the trainer skipped for a non-finite loss or gradient norm (a diverging run)
  double train_loss = 0, val_acc = 0, val_acc_norm = 0, test_acc = 0, test_acc_norm = 0;
  double seconds = 0, train_seconds = 0, eval_seconds = 0;
  nlohmann::json to_json() const;
  static RunRecord from_json(const nlohmann::json& j, const std::string& where);  // throws naming where
};

// The lr of one cell, chosen from validation accuracy alone.
struct CellChoice {
  std::string task, method, variant;
  int64_t n = 0, rank = 0;
  double lr = 0;
  std::vector<double> lrs;  // the grid tried
  double val_acc_mean = 0, test_acc_mean = 0, test_acc_std = 0;
  int64_t seeds = 0;
  nlohmann::json to_json() const;
};
// Per cell: the lr whose mean validation accuracy over seeds is highest (ties: the smaller lr; an lr
// with fewer seeds than the cell's most is not eligible). Test accuracy is read only to report the
// chosen lr's mean and sample std.
std::vector<CellChoice> select_lrs(const std::vector<RunRecord>& runs);

struct StudyOptions {
  std::string out_dir = "docs/fewshot";  // runs.jsonl, selection.jsonl, study.json
  bool resume = false;                   // skip runs already in out_dir/runs.jsonl
  std::string export_dir;                // save each run's adapter (or model) under export_dir/<index>
  double time_budget = 0;                // seconds; stop (resumably) after the run that crosses it (0: none)
  std::string vocab_dir;                 // tokenizer (default: the base's directory, else data/gpt2)
  std::string device = "auto";
  bool quiet = false;
  std::function<void(const RunRecord&)> on_run;  // after each run (tests)
};

struct StudySummary {
  int64_t planned = 0, done = 0, skipped = 0;  // skipped: already in runs.jsonl
  bool complete = false;                       // every planned run is in runs.jsonl
  double seconds = 0;
};

// Runs (the rest of) the grid: loads the base and the tasks once, then every run: a fresh adapter or
// the base's own weights restored, train, score val and test, append a line to runs.jsonl. Finally
// writes selection.jsonl (from every run in runs.jsonl) and study.json (grid, timing by part).
StudySummary run_study(const StudyGrid& g, const StudyOptions& o);

}  // namespace deeplora
