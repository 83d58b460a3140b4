// The few-shot study runner (see study.h): tasks, training subsets, and the in-process sweep.
#include "models/study.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <stdexcept>

#include "models/causal_lm.h"
#include "models/inference.h"
#include "models/tokenizer.h"
#include "models/trainer.h"
#include "runtime/device.h"
#include "runtime/io/atomic_file.h"
#include "runtime/io/jsonl.h"
#include "runtime/tape.h"

namespace deeplora {
namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

StudyTask load_study_task(const std::string& dir, const Tokenizer& tok, int64_t seq_len) {
  StudyTask t;
  t.dir = dir;
  t.name = fs::path(dir).lexically_normal().filename().string();
  for (const char* f : {"train.jsonl", "val.jsonl", "test.jsonl"})
    if (!fs::exists(fs::path(dir) / f))
      throw std::runtime_error(fmt::format("task {}: no {} (a task directory holds train.jsonl, val.jsonl and "
                                           "test.jsonl in the multiple-choice format)",
                                           dir, f));
  t.pool = load_mc_jsonl((fs::path(dir) / "train.jsonl").string(), tok, seq_len);
  t.val = load_mc_jsonl((fs::path(dir) / "val.jsonl").string(), tok, seq_len);
  t.test = load_mc_jsonl((fs::path(dir) / "test.jsonl").string(), tok, seq_len);
  for (const McData* d : {&t.pool, &t.val, &t.test})
    for (const McExample& e : d->examples) t.n_classes = std::max<int64_t>(t.n_classes, int64_t(e.choices.size()));
  return t;
}

std::vector<int64_t> training_subset(int64_t pool_size, int64_t n, int64_t seed) {
  if (n > pool_size)
    throw std::invalid_argument(fmt::format("training set of {} examples requested from a pool of {}", n, pool_size));
  std::vector<int64_t> idx(static_cast<size_t>(pool_size));
  for (int64_t i = 0; i < pool_size; ++i) idx[size_t(i)] = i;
  std::mt19937_64 rng(0x5EED0000ull + uint64_t(seed));
  for (int64_t i = 0; i < n; ++i) std::swap(idx[size_t(i)], idx[size_t(i + int64_t(rng() % uint64_t(pool_size - i)))]);
  idx.resize(size_t(n));
  return idx;
}

namespace {

std::vector<RunRecord> read_runs(const fs::path& p) {
  std::vector<RunRecord> v;
  std::ifstream f(p);
  std::string line;
  int64_t n = 0;
  while (std::getline(f, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("{}:{}: not valid JSON ({}); a run cut off mid-line? remove that line",
                                           p.string(), n, e.what()));
    }
    v.push_back(RunRecord::from_json(j, fmt::format("{}:{}", p.string(), n)));
  }
  return v;
}

// The example a training set holds for a pool entry: prompt + the labelled choice, loss on the choice.
Example training_example(const McExample& m) {
  Example e;
  e.tokens = m.prompt;
  e.n_prompt = int64_t(m.prompt.size());
  const auto& ch = m.choices[size_t(m.label)];
  e.tokens.insert(e.tokens.end(), ch.begin(), ch.end());
  e.line = m.line;
  return e;
}

}  // namespace

StudySummary run_study(const StudyGrid& g, const StudyOptions& o) {
  const auto t_all = Clock::now();
  if (g.base.empty()) throw std::invalid_argument("study: no base model (\"base\" in the grid, or --base)");
  if (g.tasks.empty()) throw std::invalid_argument("study: no tasks (\"tasks\" in the grid, or --task)");
  if (o.out_dir.empty()) throw std::invalid_argument("study: no output directory");
  const fs::path out(o.out_dir), runs_path = out / "runs.jsonl";
  fs::create_directories(out);
  std::vector<RunRecord> done;
  if (fs::exists(runs_path)) {
    if (!o.resume)
      throw std::runtime_error(fmt::format("{} exists: pass --resume to continue that study, or choose another --out",
                                           runs_path.string()));
    done = read_runs(runs_path);
  }
  std::set<std::string> done_keys;
  for (const RunRecord& r : done) done_keys.insert(r.run.key());
  const std::vector<StudyRun> plan = plan_study(g);
  // A run is skipped on resume by its key (task, method, variant, n, rank, seed, lr), so a grid whose
  // method now means other options or steps (a changed default, an edited variant) would silently mix
  // two settings under one label: refuse, naming the row.
  {
    std::map<std::string, size_t> row_of;
    for (size_t i = 0; i < done.size(); ++i) row_of.emplace(done[i].run.key(), i);
    for (const StudyRun& run : plan) {
      auto it = row_of.find(run.key());
      if (it == row_of.end()) continue;
      const StudyMethod& m = g.methods[run.method_index];
      json want = m.options();
      if (m.alpha_is_rank) want["alpha"] = double(run.rank);
      const RunRecord& r = done[it->second];
      const int64_t steps = g.steps_for(m, run.n);
      if (r.options != want || r.steps != steps)
        throw std::runtime_error(fmt::format(
            "{} line {}: run {} was recorded with options {} and {} steps, but the grid now gives {} and {} steps; "
            "give the changed method a new \"variant\" name, or use another --out",
            runs_path.string(), it->second + 1, run.key(), r.options.dump(), r.steps, want.dump(), steps));
    }
  }
  StudySummary sum;
  sum.planned = int64_t(plan.size());
  auto say = [&](const std::string& s) {
    if (!o.quiet) fmt::print("{}\n", s);
  };

  // ---- the base and the tasks, once -------------------------------------------------------------
  auto t0 = Clock::now();
  const Device dev = device_from_flag(o.device);
  const DType dt = dtype_from_flag(g.dtype, dev);
  LoadedModel lm = load_for_inference(g.base, "", dt, dev);
  CausalLM& model = *lm.model;
  Tokenizer tok = Tokenizer::from_dir(resolve_vocab_dir(o.vocab_dir, g.base));
  const int64_t n_pos = model.max_positions();
  std::vector<StudyTask> tasks;
  for (const std::string& d : g.tasks) tasks.push_back(load_study_task(d, tok, n_pos));
  std::set<std::string> task_names;
  for (const StudyTask& t : tasks)
    if (!task_names.insert(t.name).second)
      throw std::invalid_argument(fmt::format("study: two tasks are named '{}' (task names are directory names)", t.name));
  // Full fine-tuning changes the base: its masters are restored from this copy after each such run.
  std::vector<Tensor> base_masters;
  const bool any_full = std::any_of(g.methods.begin(), g.methods.end(), [](const StudyMethod& m) { return m.is_full(); });
  if (any_full) {
    NoGrad ng;
    for (auto& [name, p] : model.named_params()) base_masters.push_back(p->master.clone());
  }
  const double load_seconds = since(t0);
  say(fmt::format("study: base {} ({}) | {} tasks | {} runs planned, {} already done | {} on {}", g.base,
                  model.describe(), tasks.size(), plan.size(), done_keys.size(), dtype_name(dt), device_name(dev)));

  std::ofstream runs_out(runs_path, std::ios::app);
  if (!runs_out) throw std::runtime_error(fmt::format("{}: cannot write", runs_path.string()));
  double train_s = 0, eval_s = 0, export_s = 0;
  std::map<std::string, double> method_s;
  int64_t index = int64_t(done.size());
  bool out_of_time = false;
  for (const StudyRun& run : plan) {
    if (done_keys.count(run.key())) {
      ++sum.skipped;
      continue;
    }
    if (o.time_budget > 0 && sum.done > 0 && since(t_all) > o.time_budget) {  // every call makes progress
      out_of_time = true;
      break;
    }
    const auto t_run = Clock::now();
    const StudyMethod& m = g.methods[run.method_index];
    const StudyTask& task = tasks[run.task_index];
    std::vector<Example> train_set;
    int64_t longest = 0;
    for (int64_t i : training_subset(int64_t(task.pool.examples.size()), run.n, run.seed)) {
      train_set.push_back(training_example(task.pool.examples[size_t(i)]));
      longest = std::max<int64_t>(longest, int64_t(train_set.back().tokens.size()) - 1);
    }
    TrainOptions to;
    to.out_dir = "";
    to.quiet = true;
    to.sample_tokens = 0;
    to.val_fraction = 0;
    to.batch = std::min<int64_t>(g.batch, run.n);
    to.seq_len = std::min<int64_t>(n_pos, (longest + 15) / 16 * 16);
    to.steps = g.steps_for(m, run.n);
    to.lr = run.lr;
    to.warmup = std::floor(g.warmup_frac * double(to.steps));
    to.min_lr_ratio = g.min_lr_ratio;
    to.clip = g.clip;
    to.weight_decay = m.weight_decay;
    to.adapter_adam_eps = m.adam_eps;
    to.seed = 1000 + uint64_t(run.seed);
    to.dtype = dtype_name(dt);
    // A diverging run is a result, not an error: its non-finite steps are skipped (the weights keep their
    // last finite values), counted in the record, and the run is scored like any other.
    to.max_bad_steps = to.steps;
    to.adapter = m.adapter;
    if (!m.is_full()) {
      to.adapter.rank = run.rank;
      if (m.svd_all) to.adapter.svd_batches = int(std::max<int64_t>(1, run.n / to.batch));  // every example once
      if (m.alpha_is_rank) to.adapter.alpha = double(run.rank);
    }
    if (m.is_full())
      for (auto& [name, p] : model.named_params()) model.set_trainable(name, true);
    TrainInputs in;
    in.model = &model;
    in.tokenizer = &tok;
    in.train = std::move(train_set);
    TrainResult res = train(to, in);
    const double t_train = since(t_run);
    const auto t_eval = Clock::now();
    McScores val = score_mc(model, task.val), test = score_mc(model, task.test);
    const double t_ev = since(t_eval);
    RunRecord rec;
    rec.run = run;
    rec.options = m.options();
    if (m.alpha_is_rank) rec.options["alpha"] = double(run.rank);
    rec.steps = to.steps;
    rec.batch = to.batch;
    rec.n_trainable = res.n_trainable;
    rec.bad_steps = res.bad_steps;
    // Train loss: the mean over the last tenth of the steps (one step is noisy at small n).
    const size_t tail = std::max<size_t>(1, res.losses.size() / 10);
    for (size_t i = res.losses.size() - tail; i < res.losses.size(); ++i) rec.train_loss += res.losses[i] / double(tail);
    rec.val_acc = val.acc;
    rec.val_acc_norm = val.acc_norm;
    rec.test_acc = test.acc;
    rec.test_acc_norm = test.acc_norm;
    rec.train_seconds = t_train;
    rec.eval_seconds = t_ev;
    if (!o.export_dir.empty()) {
      const auto t_ex = Clock::now();
      const fs::path d = fs::path(o.export_dir) / fmt::format("{:05d}", index);
      if (!res.adapters.empty()) {
        AdapterOptions ao = to.adapter;
        ao.seed = to.seed;
        save_adapters(res.adapters, ao, d.string(), fs::absolute(g.base).lexically_normal().string());
      } else {
        model.save_hf(d.string());
      }
      write_file_atomic((d / "run.json").string(), rec.to_json().dump(2) + "\n");
      export_s += since(t_ex);
    }
    // Back to the base: adapters off, full fine-tuning's weights restored, everything frozen.
    detach_adapters(model);
    if (m.is_full()) {
      NoGrad ng;
      size_t i = 0;
      for (auto& [name, p] : model.named_params()) p->master.copy_from(base_masters[i++]);
    }
    for (auto& [name, p] : model.named_params()) model.set_trainable(name, false);
    rec.seconds = since(t_run);
    train_s += t_train;
    eval_s += t_ev;
    method_s[m.name + (m.variant.empty() ? "" : "[" + m.variant + "]")] += rec.seconds;
    runs_out << rec.to_json().dump() << "\n";
    runs_out.flush();
    if (o.on_run) o.on_run(rec);
    done.push_back(rec);
    done_keys.insert(run.key());
    ++sum.done;
    ++index;
    say(fmt::format("[{}/{}] {} | steps {}{} | train loss {:.4f} | val {:.3f} | test {:.3f} | {:.2f} s", done.size(),
                    plan.size(), run.key(), to.steps,
                    rec.bad_steps ? fmt::format(" ({} skipped: non-finite)", rec.bad_steps) : std::string(),
                    rec.train_loss, rec.val_acc, rec.test_acc, rec.seconds));
  }
  runs_out.close();

  // ---- selection (validation only) and the study's record ----------------------------------------
  std::vector<CellChoice> sel = select_lrs(done);
  std::string sel_text;
  for (const CellChoice& c : sel) sel_text += c.to_json().dump() + "\n";
  write_file_atomic((out / "selection.jsonl").string(), sel_text);
  sum.complete = !out_of_time && int64_t(done_keys.size()) >= sum.planned;
  sum.seconds = since(t_all);
  json study = json::object();
  if (fs::exists(out / "study.json")) {
    try {
      study = json::parse(std::ifstream(out / "study.json"));
    } catch (...) {
      study = json::object();
    }
    if (!study.is_object()) study = json::object();
  }
  json calls = study.value("calls", json::array());
  json by_method = json::object();
  for (auto& [k, v] : method_s) by_method[k] = v;
  calls.push_back({{"runs", sum.done},
                   {"seconds", sum.seconds},
                   {"seconds_by_part", {{"load", load_seconds}, {"train", train_s}, {"eval", eval_s}, {"export", export_s}}},
                   {"seconds_by_method", by_method},
                   {"device", device_name(dev)}});
  double total = 0;
  json parts = {{"load", 0.0}, {"train", 0.0}, {"eval", 0.0}, {"export", 0.0}};
  for (const json& c : calls) {
    total += c.value("seconds", 0.0);
    for (auto& [k, v] : c["seconds_by_part"].items()) parts[k] = parts.value(k, 0.0) + v.get<double>();
  }
  json classes = json::object();
  json task_info = json::array();
  for (const StudyTask& t : tasks) {
    classes[t.name] = t.n_classes;
    task_info.push_back({{"name", t.name},
                         {"dir", t.dir},
                         {"pool", t.pool.examples.size()},
                         {"val", t.val.examples.size()},
                         {"test", t.test.examples.size()},
                         {"classes", t.n_classes},
                         {"prompts_cut", t.pool.n_truncated + t.val.n_truncated + t.test.n_truncated}});
  }
  study["grid"] = g.to_json();
  study["base"] = g.base;
  study["base_config"] = model.describe();
  if (fs::exists(fs::path(g.base).parent_path() / "summary.json")) {
    try {
      json bs = json::parse(std::ifstream(fs::path(g.base).parent_path() / "summary.json"));
      if (bs.contains("val_loss")) study["base_val_loss"] = bs["val_loss"];
    } catch (...) {
    }
  }
  study["tasks"] = task_info;
  study["classes"] = classes;
  study["runs_planned"] = sum.planned;
  study["runs_done"] = int64_t(done.size());
  study["complete"] = sum.complete;
  study["calls"] = calls;
  study["seconds_total"] = total;
  study["seconds_by_part"] = parts;
  study["selection_rule"] =
      "per (task, method, variant, n, rank): the lr with the highest mean validation accuracy over seeds (ties: the "
      "smaller lr); test accuracy is never read for a choice";
  write_file_atomic((out / "study.json").string(), study.dump(2) + "\n");
  say(fmt::format("study: {} runs this call ({} skipped as done), {}, {:.1f} s | {}", sum.done, sum.skipped,
                  sum.complete ? "complete" : "NOT complete (run again with --resume)", sum.seconds,
                  (out / "runs.jsonl").string()));
  return sum;
}

}  // namespace deeplora
