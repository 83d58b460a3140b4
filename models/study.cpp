// The few-shot study runner (see study.h).
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
#include <tuple>

#include "models/gpt_io.h"
#include "models/inference.h"
#include "models/tokenizer.h"
#include "models/trainer.h"
#include "runtime/device.h"
#include "runtime/io/atomic_file.h"
#include "runtime/tape.h"

namespace deeplora {
namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

[[noreturn]] void bad(const std::string& what, const std::string& msg) {
  throw std::invalid_argument(fmt::format("{}: {}", what, msg));
}

template <class T> T get(const json& j, const char* key, const T& dflt, const std::string& what) {
  if (!j.contains(key)) return dflt;
  try {
    return j.at(key).get<T>();
  } catch (const std::exception& e) {
    bad(what, fmt::format("field \"{}\": {}", key, e.what()));
  }
}

StudyMethod method_from_json(const json& j, const std::vector<StudyMethod>& defaults, const std::string& what) {
  if (!j.is_object()) bad(what, "each entry of \"methods\" must be an object");
  StudyMethod m;
  const std::string like = get<std::string>(j, "like", "", what);
  if (!like.empty()) {
    auto it = std::find_if(defaults.begin(), defaults.end(), [&](const StudyMethod& d) { return d.name == like; });
    if (it == defaults.end()) bad(what, fmt::format("\"like\": no default method named '{}'", like));
    m = *it;
  }
  m.name = get<std::string>(j, "name", m.name, what);
  if (m.name.empty()) bad(what, "a method needs a \"name\" (or \"like\")");
  m.variant = get<std::string>(j, "variant", m.variant, what);
  AdapterOptions& a = m.adapter;
  a.kind = get<std::string>(j, "adapter", like.empty() ? std::string("deeplora") : a.kind, what);
  if (j.contains("alpha")) {
    if (j["alpha"].is_string() && j["alpha"] == "r") m.alpha_is_rank = true;
    else {
      m.alpha_is_rank = false;
      a.alpha = get<double>(j, "alpha", a.alpha, what);
    }
  }
  a.init = get<std::string>(j, "init", a.init, what);
  a.depth = get<int>(j, "depth", a.depth, what);
  a.eps = get<double>(j, "eps", a.eps, what);
  a.outer_lr_scale = get<double>(j, "outer_lr_scale", a.outer_lr_scale, what);
  a.width_lr_ref = get<double>(j, "width_lr_ref", a.width_lr_ref, what);
  a.adapt = get<std::string>(j, "adapt", a.adapt, what);
  if (j.contains("svd_batches") && j["svd_batches"].is_string()) {
    if (j["svd_batches"] != "all") bad(what, "\"svd_batches\": a number, or \"all\" (the whole training set)");
    m.svd_all = true;
  } else {
    a.svd_batches = get<int>(j, "svd_batches", a.svd_batches, what);
  }
  m.lrs = get<std::vector<double>>(j, "lr", m.lrs, what);
  m.rank_sweep = get<bool>(j, "rank_sweep", m.rank_sweep, what);
  m.ns = get<std::vector<int64_t>>(j, "n", m.ns, what);
  m.steps = get<int64_t>(j, "steps", m.steps, what);
  m.weight_decay = get<double>(j, "weight_decay", m.weight_decay, what);
  const std::string w = fmt::format("{} (method {}{})", what, m.name, m.variant.empty() ? "" : "[" + m.variant + "]");
  if (m.lrs.empty()) bad(w, "\"lr\" must list at least one learning rate");
  for (double lr : m.lrs)
    if (!(lr > 0) || !std::isfinite(lr)) bad(w, fmt::format("learning rate {} must be positive", lr));
  if (m.steps < 0) bad(w, "\"steps\" must be >= 0");
  try {
    AdapterOptions probe = a;
    probe.rank = 1;
    probe.validate();
  } catch (const std::exception& e) {
    bad(w, e.what());
  }
  return m;
}

bool full_finetune(const StudyMethod& m) { return m.adapter.kind == "none"; }

}  // namespace

json StudyMethod::options() const {
  json j = {{"adapter", adapter.kind}};
  if (adapter.kind == "lora") {
    if (alpha_is_rank) j["alpha"] = "r";
    else j["alpha"] = adapter.alpha;
  } else if (adapter.kind == "deeplora") {
    j.update({{"init", adapter.init}, {"depth", adapter.depth}, {"eps", adapter.eps},
              {"outer_lr_scale", adapter.outer_lr_scale}, {"svd_batches", adapter.svd_batches}});
    if (adapter.width_lr_ref > 0) j["width_lr_ref"] = adapter.width_lr_ref;
    if (svd_all) j["svd_batches"] = "all";
  }
  if (adapter.kind != "none") j["adapt"] = adapter.adapt;
  if (weight_decay != 0) j["weight_decay"] = weight_decay;
  if (steps > 0) j["steps"] = steps;
  return j;
}

std::vector<StudyMethod> StudyGrid::default_methods() {
  std::vector<StudyMethod> v;
  StudyMethod lora;
  lora.name = "lora";
  lora.adapter.kind = "lora";
  lora.adapter.alpha = 16;
  lora.lrs = {3e-4, 1e-3, 3e-3, 1e-2};
  lora.rank_sweep = true;
  v.push_back(lora);
  StudyMethod noscale = lora;
  noscale.name = "lora-noscale";
  noscale.alpha_is_rank = true;
  v.push_back(noscale);
  StudyMethod dl;
  dl.name = "deeplora";
  dl.adapter.kind = "deeplora";
  dl.lrs = {3e-3, 1e-2, 3e-2, 1e-1};
  dl.rank_sweep = true;
  v.push_back(dl);
  StudyMethod dr = dl;
  dr.name = "deeplora-random";
  dr.adapter.init = "random";
  dr.rank_sweep = false;
  v.push_back(dr);
  StudyMethod full;
  full.name = "full";
  full.adapter.kind = "none";
  full.lrs = {1e-5, 3e-5, 1e-4, 3e-4};
  v.push_back(full);
  return v;
}

StudyGrid StudyGrid::from_json(const json& j, const std::string& what) {
  if (!j.is_object()) bad(what, "a study grid is a JSON object");
  static const std::set<std::string> known = {"base",  "tasks",     "n",           "seeds",        "rank",
                                              "ranks", "rank_n",    "methods",     "epochs",       "min_steps",
                                              "max_steps", "batch", "warmup_frac", "min_lr_ratio", "clip",
                                              "dtype", "comment"};
  for (auto& [k, v] : j.items())
    if (!known.count(k)) bad(what, fmt::format("unknown field \"{}\"", k));
  StudyGrid g;
  g.base = get<std::string>(j, "base", g.base, what);
  g.tasks = get<std::vector<std::string>>(j, "tasks", g.tasks, what);
  g.ns = get<std::vector<int64_t>>(j, "n", g.ns, what);
  g.seeds = get<int64_t>(j, "seeds", g.seeds, what);
  g.rank = get<int64_t>(j, "rank", g.rank, what);
  g.ranks = get<std::vector<int64_t>>(j, "ranks", g.ranks, what);
  g.rank_ns = get<std::vector<int64_t>>(j, "rank_n", g.rank_ns, what);
  g.epochs = get<double>(j, "epochs", g.epochs, what);
  g.min_steps = get<int64_t>(j, "min_steps", g.min_steps, what);
  g.max_steps = get<int64_t>(j, "max_steps", g.max_steps, what);
  g.batch = get<int64_t>(j, "batch", g.batch, what);
  g.warmup_frac = get<double>(j, "warmup_frac", g.warmup_frac, what);
  g.min_lr_ratio = get<double>(j, "min_lr_ratio", g.min_lr_ratio, what);
  g.clip = get<double>(j, "clip", g.clip, what);
  g.dtype = get<std::string>(j, "dtype", g.dtype, what);
  const std::vector<StudyMethod> defaults = default_methods();
  if (j.contains("methods")) {
    if (!j["methods"].is_array() || j["methods"].empty()) bad(what, "\"methods\" must be a non-empty array");
    for (size_t i = 0; i < j["methods"].size(); ++i)
      g.methods.push_back(method_from_json(j["methods"][i], defaults, fmt::format("{}: methods[{}]", what, i)));
  } else {
    g.methods = defaults;
  }
  auto positive = [&](const std::vector<int64_t>& v, const char* f) {
    for (int64_t x : v)
      if (x < 1) bad(what, fmt::format("\"{}\" values must be positive, got {}", f, x));
  };
  positive(g.ns, "n");
  positive(g.ranks, "ranks");
  positive(g.rank_ns, "rank_n");
  if (g.ns.empty()) bad(what, "\"n\" is empty");
  if (g.seeds < 1) bad(what, fmt::format("\"seeds\" must be >= 1, got {}", g.seeds));
  if (g.rank < 1) bad(what, fmt::format("\"rank\" must be >= 1, got {}", g.rank));
  if (g.batch < 1) bad(what, fmt::format("\"batch\" must be >= 1, got {}", g.batch));
  if (!(g.epochs > 0)) bad(what, "\"epochs\" must be positive");
  if (g.min_steps < 1 || g.max_steps < g.min_steps) bad(what, "need 1 <= \"min_steps\" <= \"max_steps\"");
  if (!(g.warmup_frac >= 0 && g.warmup_frac < 1)) bad(what, "\"warmup_frac\" must be in [0, 1)");
  if (!(g.min_lr_ratio >= 0 && g.min_lr_ratio <= 1)) bad(what, "\"min_lr_ratio\" must be in [0, 1]");
  if (!(g.clip >= 0)) bad(what, "\"clip\" must be >= 0");
  if (g.dtype != "auto" && g.dtype != "bf16" && g.dtype != "f32" && g.dtype != "f64")
    bad(what, "\"dtype\" must be auto (bf16 on CUDA, f32 on the CPU), bf16, f32 or f64");
  std::set<std::string> names;
  for (const StudyMethod& m : g.methods)
    if (!names.insert(m.name + "[" + m.variant + "]").second)
      bad(what, fmt::format("method {} variant '{}' appears twice", m.name, m.variant));
  return g;
}

StudyGrid StudyGrid::from_json_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(fmt::format("{}: cannot open", path));
  json j;
  try {
    j = json::parse(f);
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: not valid JSON: {}", path, e.what()));
  }
  return from_json(j, path);
}

json StudyGrid::to_json() const {
  json ms = json::array();
  for (const StudyMethod& m : methods) {
    json o = m.options();
    o.update({{"name", m.name}, {"variant", m.variant}, {"lr", m.lrs}, {"rank_sweep", m.rank_sweep}});
    if (!m.ns.empty()) o["n"] = m.ns;
    ms.push_back(o);
  }
  return {{"base", base},       {"tasks", tasks},        {"n", ns},
          {"seeds", seeds},     {"rank", rank},          {"ranks", ranks},
          {"rank_n", rank_ns},  {"epochs", epochs},      {"min_steps", min_steps},
          {"max_steps", max_steps}, {"batch", batch},    {"warmup_frac", warmup_frac},
          {"min_lr_ratio", min_lr_ratio}, {"clip", clip}, {"dtype", dtype},
          {"methods", ms}};
}

int64_t StudyGrid::steps_for(const StudyMethod& m, int64_t n) const {
  if (m.steps > 0) return m.steps;
  const int64_t b = std::min(batch, n);
  return std::clamp<int64_t>(int64_t(std::llround(epochs * double(n) / double(b))), min_steps, max_steps);
}

std::string StudyRun::key() const {
  return fmt::format("{}|{}|{}|n={}|r={}|s={}|lr={:.6g}", task, method, variant, n, rank, seed, lr);
}

std::vector<StudyRun> plan_study(const StudyGrid& g) {
  std::vector<StudyRun> v;
  for (size_t ti = 0; ti < g.tasks.size(); ++ti) {
    const std::string task = fs::path(g.tasks[ti]).lexically_normal().filename().string();
    for (int64_t n : g.ns)
      for (int64_t seed = 0; seed < g.seeds; ++seed)
        for (size_t mi = 0; mi < g.methods.size(); ++mi) {
          const StudyMethod& m = g.methods[mi];
          if (!m.ns.empty() && std::find(m.ns.begin(), m.ns.end(), n) == m.ns.end()) continue;
          std::vector<int64_t> ranks;
          if (!full_finetune(m)) {
            ranks.push_back(g.rank);
            if (m.rank_sweep && std::find(g.rank_ns.begin(), g.rank_ns.end(), n) != g.rank_ns.end())
              for (int64_t r : g.ranks)
                if (r != g.rank) ranks.push_back(r);
          } else {
            ranks.push_back(0);
          }
          for (int64_t r : ranks)
            for (double lr : m.lrs) v.push_back({task, m.name, m.variant, n, seed, r, lr, mi, ti});
        }
  }
  return v;
}

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

json RunRecord::to_json() const {
  json j = {{"task", run.task},
            {"method", run.method},
            {"variant", run.variant},
            {"n", run.n},
            {"seed", run.seed},
            {"rank", run.rank > 0 ? json(run.rank) : json(nullptr)},
            {"lr", run.lr},
            {"options", options},
            {"steps", steps},
            {"batch", batch},
            {"train_loss", train_loss},
            {"val_acc", val_acc},
            {"val_acc_norm", val_acc_norm},
            {"test_acc", test_acc},
            {"test_acc_norm", test_acc_norm},
            {"seconds", seconds},
            {"train_seconds", train_seconds},
            {"eval_seconds", eval_seconds},
            {"n_trainable", n_trainable}};
  return j;
}

RunRecord RunRecord::from_json(const json& j, const std::string& where) {
  RunRecord r;
  try {
    r.run.task = j.at("task").get<std::string>();
    r.run.method = j.at("method").get<std::string>();
    r.run.variant = j.value("variant", "");
    r.run.n = j.at("n").get<int64_t>();
    r.run.seed = j.at("seed").get<int64_t>();
    r.run.rank = j.at("rank").is_null() ? 0 : j.at("rank").get<int64_t>();
    r.run.lr = j.at("lr").get<double>();
    r.options = j.value("options", json::object());
    r.steps = j.value("steps", int64_t(0));
    r.batch = j.value("batch", int64_t(0));
    r.train_loss = j.at("train_loss").get<double>();
    r.val_acc = j.at("val_acc").get<double>();
    r.val_acc_norm = j.value("val_acc_norm", 0.0);
    r.test_acc = j.at("test_acc").get<double>();
    r.test_acc_norm = j.value("test_acc_norm", 0.0);
    r.seconds = j.value("seconds", 0.0);
    r.train_seconds = j.value("train_seconds", 0.0);
    r.eval_seconds = j.value("eval_seconds", 0.0);
    r.n_trainable = j.value("n_trainable", int64_t(0));
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: {}", where, e.what()));
  }
  return r;
}

json CellChoice::to_json() const {
  return {{"task", task},
          {"method", method},
          {"variant", variant},
          {"n", n},
          {"rank", rank > 0 ? json(rank) : json(nullptr)},
          {"lr", lr},
          {"lrs", lrs},
          {"val_acc_mean", val_acc_mean},
          {"test_acc_mean", test_acc_mean},
          {"test_acc_std", test_acc_std},
          {"seeds", seeds}};
}

std::vector<CellChoice> select_lrs(const std::vector<RunRecord>& runs) {
  using Cell = std::tuple<std::string, std::string, std::string, int64_t, int64_t>;
  std::map<Cell, std::map<double, std::vector<const RunRecord*>>> cells;
  for (const RunRecord& r : runs) cells[{r.run.task, r.run.method, r.run.variant, r.run.n, r.run.rank}][r.run.lr].push_back(&r);
  std::vector<CellChoice> out;
  for (auto& [cell, by_lr] : cells) {
    size_t most = 0;
    for (auto& [lr, rs] : by_lr) most = std::max(most, rs.size());
    CellChoice c;
    std::tie(c.task, c.method, c.variant, c.n, c.rank) = cell;
    double best = -1;
    for (auto& [lr, rs] : by_lr) {  // ascending lr: a tie keeps the smaller one
      c.lrs.push_back(lr);
      if (rs.size() < most) continue;
      double mean = 0;
      for (const RunRecord* r : rs) mean += r->val_acc;
      mean /= double(rs.size());
      if (mean > best + 1e-9) {  // accuracies are ratios: equal means may differ in their last bits
        best = mean;
        c.lr = lr;
      }
    }
    c.val_acc_mean = best;
    const auto& chosen = by_lr.at(c.lr);
    c.seeds = int64_t(chosen.size());
    double m = 0, ss = 0;
    for (const RunRecord* r : chosen) m += r->test_acc;
    m /= double(chosen.size());
    for (const RunRecord* r : chosen) ss += (r->test_acc - m) * (r->test_acc - m);
    c.test_acc_mean = m;
    c.test_acc_std = chosen.size() > 1 ? std::sqrt(ss / double(chosen.size() - 1)) : 0.0;
    out.push_back(std::move(c));
  }
  return out;
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
  Gpt& model = *lm.model;
  Tokenizer tok = Tokenizer::from_dir(resolve_vocab_dir(o.vocab_dir, g.base));
  const int64_t n_pos = model.config().n_positions;
  std::vector<StudyTask> tasks;
  for (const std::string& d : g.tasks) tasks.push_back(load_study_task(d, tok, n_pos));
  std::set<std::string> task_names;
  for (const StudyTask& t : tasks)
    if (!task_names.insert(t.name).second)
      throw std::invalid_argument(fmt::format("study: two tasks are named '{}' (task names are directory names)", t.name));
  // Full fine-tuning changes the base: its masters are restored from this copy after each such run.
  std::vector<Tensor> base_masters;
  const bool any_full = std::any_of(g.methods.begin(), g.methods.end(), full_finetune);
  if (any_full) {
    NoGrad ng;
    for (auto& [name, p] : model.named_params()) base_masters.push_back(p->master.clone());
  }
  const double load_seconds = since(t0);
  say(fmt::format("study: base {} ({}) | {} tasks | {} runs planned, {} already done | {} on {}", g.base,
                  model.config().str(), tasks.size(), plan.size(), done_keys.size(), dtype_name(dt), device_name(dev)));

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
    to.seed = 1000 + uint64_t(run.seed);
    to.dtype = dtype_name(dt);
    to.adapter = m.adapter;
    if (!full_finetune(m)) {
      to.adapter.rank = run.rank;
      if (m.svd_all) to.adapter.svd_batches = int(std::max<int64_t>(1, run.n / to.batch));  // every example once
      if (m.alpha_is_rank) to.adapter.alpha = double(run.rank);
    }
    if (full_finetune(m))
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
        save_hf_gpt(model, d.string());
      }
      write_file_atomic((d / "run.json").string(), rec.to_json().dump(2) + "\n");
      export_s += since(t_ex);
    }
    // Back to the base: adapters off, full fine-tuning's weights restored, everything frozen.
    detach_adapters(model);
    if (full_finetune(m)) {
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
    say(fmt::format("[{}/{}] {} | steps {} | train loss {:.4f} | val {:.3f} | test {:.3f} | {:.2f} s", done.size(),
                    plan.size(), run.key(), to.steps, rec.train_loss, rec.val_acc, rec.test_acc, rec.seconds));
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
  study["base_config"] = model.config().str();
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
