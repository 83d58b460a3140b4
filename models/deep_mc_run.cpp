// The deep_mc tool's library half: flags, validation, and the training loop (graph capture of the
// step and of the evaluation, logging, CSV, JSON summary).
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>

#include "models/deep_mc.h"
#include "runtime/device.h"
#include "runtime/graph.h"

namespace deeplora::deep_mc {
namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

constexpr double kDivergedFactor = 1e6;  // a train loss this far above its minimum: diverged

int64_t parse_int(const std::string& flag, const std::string& v) {
  size_t pos = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &pos);
  } catch (...) {
    pos = 0;
  }
  if (pos == 0 || pos != v.size()) bad(fmt::format("--{}: '{}' is not an integer", flag, v));
  return int64_t(x);
}

double parse_num(const std::string& flag, const std::string& v) {
  size_t pos = 0;
  double x = 0;
  try {
    x = std::stod(v, &pos);
  } catch (...) {
    pos = 0;
  }
  if (pos == 0 || pos != v.size()) bad(fmt::format("--{}: '{}' is not a number", flag, v));
  return x;
}

bool parse_onoff(const std::string& flag, const std::string& v) {
  if (v == "on" || v == "1" || v == "true") return true;
  if (v == "off" || v == "0" || v == "false") return false;
  bad(fmt::format("--{}: '{}' must be on or off", flag, v));
}

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

void sync(Device dev) {
  if (dev == Device::cuda) cuda_sync();
}

std::string json_num(double v) {
  if (std::isnan(v)) return "\"nan\"";
  if (std::isinf(v)) return v > 0 ? "\"inf\"" : "\"-inf\"";
  return fmt::format("{:.6g}", v);
}

}  // namespace

std::string usage() {
  return R"(usage: deep_mc [flags]   (--name value or --name=value)
  --d N            matrix size (default 1000)         --r N        target rank; the compressed width is 2r (5)
  --p X            observed fraction in (0, 1] (0.2)  --obs-per-row N  exactly N observed entries per row instead
  --L N            depth, >= 2 (3)                    --eps X      init scale (1e-3)
  --lr X|auto      step size η on the mean loss (5e3; auto: 5e3·(d/1000)^(4/3)·(0.2/p))
                                                      --gamma X    outer-factor step scale γ for A, B (0.01)
  --iters N        iterations (20000)                 --tol X      stop once the recovery error <= X (0: never)
  --seed N         target, mask and init seed (0)     --method original|compressed|both (both)
  --dtype f64|f32  (f64)                              --device cpu|cuda|auto (auto)
  --graph on|off   capture the step as a CUDA graph (on)
  --log-every N    log interval (1000)                --csv PATH   trajectory CSV
  --target FILE    load M and the mask (format: models/deep_mc.h)   --save-target FILE
  --impl auto|fused|dense|tape   compressed step: the cost model's pick, the sampled fused kernel, dense GEMMs
                   over row blocks, or op by op on the tape (auto; the original runs fused unless tape)
  --block-rows N   dense step: residual rows formed at once (0: automatic, ~16 MiB)
  --init auto|exact|implicit   compressed init (auto)
  --eval-sample N  recovery error on N sampled unobserved entries (0 exact; default exact up to d = 20000)
  --svd-iters N    power iterations of the sparse randomized SVD (8)   --quiet
exit status: 0 ok, 2 bad input, 3 diverged (a non-finite loss, or one 1e6x above its minimum), 1 other errors)";
}

Config parse_args(const std::vector<std::string>& args) {
  Config c;
  std::map<std::string, std::function<void(const std::string&)>> set;
  set["d"] = [&](const std::string& v) { c.d = parse_int("d", v); };
  set["r"] = [&](const std::string& v) { c.r = parse_int("r", v); };
  set["p"] = [&](const std::string& v) { c.p = parse_num("p", v); };
  set["obs-per-row"] = [&](const std::string& v) { c.obs_per_row = parse_int("obs-per-row", v); };
  set["L"] = [&](const std::string& v) { c.L = parse_int("L", v); };
  set["eps"] = [&](const std::string& v) { c.eps = parse_num("eps", v); };
  set["lr"] = [&](const std::string& v) {
    c.lr_auto = v == "auto";
    if (!c.lr_auto) c.lr = parse_num("lr", v);
  };
  set["gamma"] = [&](const std::string& v) { c.gamma = parse_num("gamma", v); };
  set["iters"] = [&](const std::string& v) { c.iters = parse_int("iters", v); };
  set["tol"] = [&](const std::string& v) { c.tol = parse_num("tol", v); };
  set["seed"] = [&](const std::string& v) {
    const int64_t s = parse_int("seed", v);
    if (s < 0) bad(fmt::format("--seed: {} must be >= 0", s));
    c.seed = uint64_t(s);
  };
  set["method"] = [&](const std::string& v) {
    if (v == "original") c.method = Method::original;
    else if (v == "compressed") c.method = Method::compressed;
    else if (v == "both") c.method = Method::both;
    else bad(fmt::format("--method: '{}' must be original, compressed or both", v));
  };
  set["dtype"] = [&](const std::string& v) {
    if (v == "f64") c.dtype = DType::f64;
    else if (v == "f32") c.dtype = DType::f32;
    else bad(fmt::format("--dtype: '{}' must be f64 or f32", v));
  };
  set["device"] = [&](const std::string& v) {
    if (v != "cpu" && v != "cuda" && v != "auto") bad(fmt::format("--device: '{}' must be cpu, cuda or auto", v));
    c.device = v;
  };
  set["graph"] = [&](const std::string& v) { c.graph = parse_onoff("graph", v); };
  set["log-every"] = [&](const std::string& v) { c.log_every = parse_int("log-every", v); };
  set["csv"] = [&](const std::string& v) { c.csv = v; };
  set["target"] = [&](const std::string& v) { c.target = v; };
  set["save-target"] = [&](const std::string& v) { c.save_target = v; };
  set["impl"] = [&](const std::string& v) {
    if (v == "auto") c.impl = Impl::automatic;
    else if (v == "fused") c.impl = Impl::fused;
    else if (v == "dense") c.impl = Impl::dense;
    else if (v == "tape") c.impl = Impl::tape;
    else bad(fmt::format("--impl: '{}' must be auto, fused, dense or tape", v));
  };
  set["block-rows"] = [&](const std::string& v) { c.block_rows = parse_int("block-rows", v); };
  set["init"] = [&](const std::string& v) {
    if (v == "auto") c.init = InitMode::automatic;
    else if (v == "exact") c.init = InitMode::exact;
    else if (v == "implicit") c.init = InitMode::implicit;
    else bad(fmt::format("--init: '{}' must be auto, exact or implicit", v));
  };
  set["eval-sample"] = [&](const std::string& v) { c.eval_sample = parse_int("eval-sample", v); };
  set["svd-iters"] = [&](const std::string& v) { c.svd_iters = parse_int("svd-iters", v); };
  for (size_t i = 0; i < args.size(); ++i) {
    std::string a = args[i];
    if (a == "--quiet") {
      c.quiet = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) bad(fmt::format("unexpected argument '{}' (flags start with --; see --help)", a));
    std::string name = a.substr(2), value;
    const size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
    } else {
      if (i + 1 >= args.size()) bad(fmt::format("--{} needs a value", name));
      value = args[++i];
    }
    auto it = set.find(name);
    if (it == set.end()) bad(fmt::format("unknown flag --{} (see --help)", name));
    it->second(value);
  }
  validate(c);
  return c;
}

void validate(const Config& c) {
  if (c.target.empty() && (c.d < 4 || c.d > (int64_t(1) << 30)))
    bad(fmt::format("--d {} is out of range [4, 2^30]", c.d));
  if (c.r < 1) bad(fmt::format("--r {} must be >= 1", c.r));
  if (c.target.empty() && 2 * c.r >= c.d)
    bad(fmt::format("--r {} must be < d/2 = {} (the compressed width 2r must stay below d)", c.r, double(c.d) / 2));
  if (c.obs_per_row < 0 || (c.target.empty() && c.obs_per_row > c.d))
    bad(fmt::format("--obs-per-row {} must be in [1, d = {}]", c.obs_per_row, c.d));
  if (c.obs_per_row == 0 && !(c.p > 0.0 && c.p <= 1.0))
    bad(fmt::format("--p {} must be in (0, 1] (the observed fraction)", c.p));
  if (c.L < 2) bad(fmt::format("--L {} must be >= 2 (a deep factorization has at least two factors)", c.L));
  if (c.L > 64) bad(fmt::format("--L {} is too deep (at most 64)", c.L));
  if (!(std::isfinite(c.eps) && c.eps > 0)) bad(fmt::format("--eps {} must be a positive finite number", c.eps));
  if (!(std::isfinite(c.lr) && c.lr > 0)) bad(fmt::format("--lr {} must be a positive finite number", c.lr));
  if (!(std::isfinite(c.gamma) && c.gamma >= 0)) bad(fmt::format("--gamma {} must be finite and >= 0", c.gamma));
  constexpr int64_t kMaxCount = int64_t(1) << 40;
  if (c.iters < 0) bad(fmt::format("--iters {} must be >= 0", c.iters));
  if (c.iters > kMaxCount) bad(fmt::format("--iters {} must be at most 2^40", c.iters));
  if (!(std::isfinite(c.tol) && c.tol >= 0)) bad(fmt::format("--tol {} must be finite and >= 0", c.tol));
  if (c.log_every < 1) bad(fmt::format("--log-every {} must be >= 1", c.log_every));
  if (c.log_every > kMaxCount) bad(fmt::format("--log-every {} must be at most 2^40", c.log_every));
  if (c.block_rows < 0) bad(fmt::format("--block-rows {} must be >= 0 (0: automatic)", c.block_rows));
  if (c.svd_iters < 0 || c.svd_iters > 1000) bad(fmt::format("--svd-iters {} must be in [0, 1000]", c.svd_iters));
  if (c.target.empty() && c.method != Method::compressed && c.d > 20000)
    bad(fmt::format("--d {} is too large for the original model (L dense d x d factors); use --method compressed", c.d));
  if (c.eval_sample < -1) bad(fmt::format("--eval-sample {} must be >= 0", c.eval_sample));
  if (c.eval_sample > (int64_t(1) << 31)) bad(fmt::format("--eval-sample {} must be at most 2^31", c.eval_sample));
}

double auto_lr(int64_t d, double p) { return 5e3 * std::pow(double(d) / 1000.0, 4.0 / 3.0) * (0.2 / p); }

Device resolve_device(const std::string& name) {
  if (name == "cpu") return Device::cpu;
  if (name == "cuda") {
    if (!cuda_available()) bad("--device cuda: " + cuda_unavailable_reason());
    return Device::cuda;
  }
  if (name == "auto") return cuda_available() ? Device::cuda : Device::cpu;
  bad(fmt::format("--device: '{}' must be cpu, cuda or auto", name));
}

std::vector<RunResult> run(const Config& c0, std::FILE* out) {
  validate(c0);
  Config c = c0;
  const Device dev = resolve_device(c.device);
  auto say = [&](const std::string& s) {
    if (!c.quiet && out) {
      std::fputs(s.c_str(), out);
      std::fflush(out);
    }
  };
  const double t_target = now_s();
  Target t = c.target.empty() ? make_target(c.d, c.r, c.p, c.obs_per_row, c.seed, c.dtype, dev)
                              : load_target(c.target, c.dtype, dev);
  if (!c.target.empty()) {
    c.d = t.d;
    if (c.method != Method::compressed && c.d > 20000)
      bad(fmt::format("d = {} from target file '{}' is too large for the original model; use --method compressed", c.d,
                      c.target));
    if (2 * c.r >= c.d)
      bad(fmt::format("--r {} must be < d/2 = {} (d = {} from target file '{}')", c.r, double(c.d) / 2, c.d, c.target));
  }
  if (!c.save_target.empty()) save_target(t, c.save_target);
  if (c.lr_auto) c.lr = auto_lr(c.d, t.p());
  say(fmt::format("deep_mc: {}; {} observed entries (p = {:.4g}); L {}, eps {}, lr {:.6g}{}, gamma {}; device {}, {}, "
                  "graph {}; target built in {:.2f} s\n",
                  t.source, t.omega.nnz, t.p(), c.L, c.eps, c.lr, c.lr_auto ? " (auto)" : "", c.gamma, device_name(dev),
                  dtype_name(c.dtype), c.graph ? "on" : "off", now_s() - t_target));
  std::FILE* csv = nullptr;
  if (!c.csv.empty()) {
    csv = std::fopen(c.csv.c_str(), "w");
    if (!csv) bad(fmt::format("--csv: cannot open '{}' for writing", c.csv));
    std::fputs("method,iter,train_loss,recovery,elapsed_s\n", csv);
  }
  struct CsvCloser {
    std::FILE* f;
    ~CsvCloser() {
      if (f) std::fclose(f);
    }
  } closer{csv};

  std::vector<Method> methods;
  if (c.method != Method::compressed) methods.push_back(Method::original);
  if (c.method != Method::original) methods.push_back(Method::compressed);
  std::vector<RunResult> results;
  for (Method m : methods) {
    RunResult res;
    const double t_init = now_s();
    std::unique_ptr<Model> model;
    if (m == Method::original) model = std::make_unique<Original>(t, c, dev);
    else model = std::make_unique<Compressed>(t, c, dev);
    sync(dev);
    res.init_seconds = now_s() - t_init;
    res.method = model->name();
    if (auto* cm = dynamic_cast<Compressed*>(model.get())) res.impl = impl_name(cm->impl());
    else res.impl = c.impl == Impl::tape ? "tape" : "fused";
    res.n_params = model->n_params();
    say(fmt::format("[{}] {}; {} parameters; init {:.2f} s\n", res.method, model->describe(), res.n_params,
                    res.init_seconds));
    {
      // The evaluation is captured too (when the graph is on), so nothing allocates between replays.
      StepGraph eval(
          [&] { model->evaluate_async(); }, dev,
          StepGraph::Options{c.graph, 1, res.method + " evaluation"});
      StepGraph train(
          [&] { model->step_block(); }, dev,
          StepGraph::Options{c.graph, 1, res.method + " step"});
      const int bs = model->block_steps();
      double train_s = 0;
      int64_t it = 0;
      Metrics met;
      double min_loss = -1, first_loss = 0;  // lowest train loss logged so far (-1: none yet)
      auto log_point = [&] {
        eval.run();
        met = model->read_metrics();
        say(fmt::format("[{}] iter {:>7}  train {:.6e}  recovery {:.6e}{}  elapsed {:.3f} s\n", res.method, it,
                        met.train_loss, met.recovery, met.recovery_estimated ? " (sampled)" : "", train_s));
        if (csv) std::fprintf(csv, "%s,%lld,%.17g,%.17g,%.6f\n", res.method.c_str(), (long long)it, met.train_loss,
                              met.recovery, train_s);
        if (!std::isfinite(met.train_loss) || !std::isfinite(met.recovery))
          throw Diverged(fmt::format("{} diverged by iteration {}: train loss {}, recovery error {} (lower --lr {})",
                                     res.method, it, met.train_loss, met.recovery, c.lr));
        // A loss that explodes but stays finite (0.1 -> 1e10) has diverged too: 1e6 x its lowest value so
        // far. The floor (1e-12 of the first loss) keeps round-off around a converged ~0 from counting.
        if (min_loss < 0) {
          first_loss = min_loss = met.train_loss;
        } else {
          if (met.train_loss > kDivergedFactor * std::max(min_loss, 1e-12 * first_loss))
            throw Diverged(fmt::format("{} diverged by iteration {}: train loss {:.6g} is more than {:g}x its lowest "
                                       "{:.6g} (lower --lr {})",
                                       res.method, it, met.train_loss, kDivergedFactor, min_loss, c.lr));
          min_loss = std::min(min_loss, met.train_loss);
        }
      };
      eval.run();  // warm-up of the evaluation graph (it is captured on the next call)
      log_point();
      while (it < c.iters && !(c.tol > 0 && met.recovery <= c.tol)) {
        const int64_t next = std::min(c.iters, (it / c.log_every + 1) * c.log_every);
        sync(dev);
        const double t0 = now_s();
        for (; it + bs <= next; it += bs) train.run();
        for (; it < next; ++it) model->step();
        sync(dev);
        train_s += now_s() - t0;
        log_point();
      }
      res.iters = it;
      res.train_loss = met.train_loss;
      res.recovery = met.recovery;
      res.recovery_estimated = met.recovery_estimated;
      res.reached_tol = c.tol > 0 && met.recovery <= c.tol;
      res.seconds = train_s;
      say(fmt::format("[{}] done: {} iterations in {:.3f} s ({:.2f} us/iter), graph replays {}\n", res.method, it,
                      train_s, it ? 1e6 * train_s / double(it) : 0.0, train.replays()));
    }
    results.push_back(res);
  }
  // One JSON line, always printed (also with --quiet).
  std::string j = fmt::format("{{\"tool\":\"deep_mc\",\"d\":{},\"r\":{},\"p\":{},\"nnz\":{},\"L\":{},\"eps\":{},\"lr\":{},"
                              "\"gamma\":{},\"seed\":{},\"dtype\":\"{}\",\"device\":\"{}\",\"graph\":{},\"runs\":[",
                              c.d, c.r, json_num(t.p()), t.omega.nnz, c.L, json_num(c.eps), json_num(c.lr),
                              json_num(c.gamma), c.seed, dtype_name(c.dtype), device_name(dev), c.graph ? "true" : "false");
  for (size_t i = 0; i < results.size(); ++i) {
    const RunResult& r = results[i];
    j += fmt::format("{}{{\"method\":\"{}\",\"impl\":\"{}\",\"iters\":{},\"train_loss\":{},\"recovery\":{},\"recovery_estimated\":{},"
                     "\"seconds\":{},\"us_per_iter\":{},\"init_seconds\":{},\"params\":{},\"reached_tol\":{}}}",
                     i ? "," : "", r.method, r.impl, r.iters, json_num(r.train_loss), json_num(r.recovery),
                     r.recovery_estimated ? "true" : "false", json_num(r.seconds),
                     json_num(r.iters ? 1e6 * r.seconds / double(r.iters) : 0.0), json_num(r.init_seconds), r.n_params,
                     r.reached_tol ? "true" : "false");
  }
  j += "]";
  if (results.size() == 2 && results[1].seconds > 0 && results[1].iters == results[0].iters)
    j += fmt::format(",\"speedup_compressed_vs_original\":{}", json_num(results[0].seconds / results[1].seconds));
  j += "}\n";
  if (out) {
    std::fputs(j.c_str(), out);
    std::fflush(out);
  }
  return results;
}

}  // namespace deeplora::deep_mc
