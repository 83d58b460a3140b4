// The few-shot study's grid (JSON, defaults), its plan, the run records and the lr selection.
#include "models/study.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <tuple>

namespace deeplora {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

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
  a.wide = get<bool>(j, "wide", a.wide, what);
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
  m.adam_eps = get<double>(j, "adam_eps", m.adam_eps, what);
  const std::string w = fmt::format("{} (method {}{})", what, m.name, m.variant.empty() ? "" : "[" + m.variant + "]");
  if (m.lrs.empty()) bad(w, "\"lr\" must list at least one learning rate");
  for (double lr : m.lrs)
    if (!(lr > 0) || !std::isfinite(lr)) bad(w, fmt::format("learning rate {} must be positive", lr));
  if (m.steps < 0) bad(w, "\"steps\" must be >= 0");
  if (!(m.adam_eps >= 0) || !(m.adam_eps <= 1)) bad(w, "\"adam_eps\" must be in [0, 1]");
  try {
    AdapterOptions probe = a;
    probe.rank = 1;
    probe.validate();
  } catch (const std::exception& e) {
    bad(w, e.what());
  }
  return m;
}

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
    if (adapter.wide) j["wide"] = true;
    if (svd_all) j["svd_batches"] = "all";
  }
  if (adapter.kind != "none") j["adapt"] = adapter.adapt;
  if (weight_decay != 0) j["weight_decay"] = weight_decay;
  if (adam_eps != 1e-6 && !is_full()) j["adam_eps"] = adam_eps;
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
  dl.adapter.outer_lr_scale = 0.01;  // the published setting (train's default is 1: AdapterOptions)
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
          if (!m.is_full()) {
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
            {"n_trainable", n_trainable},
            {"bad_steps", bad_steps}};
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
    r.bad_steps = j.value("bad_steps", int64_t(0));
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

}  // namespace deeplora
