// deeplora_probe: a measurement tool for the few-shot study. Fine-tunes a compressed Deep LoRA on a
// task's training subset (as tools/study does) and logs, per step, the spectral norms of the inner
// factors K_i and of their product K = K_L...K_1 (with A, B orthonormal, ‖ΔW‖₂ = ‖K‖₂ up to the
// outer factors' drift), the largest over the adapted layers, with the loss and gradient norm:
// where the dynamics go unstable and how that depends on the width and the learning rate.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "models/adapters.h"
#include "models/inference.h"
#include "models/study.h"
#include "models/tokenizer.h"
#include "models/trainer.h"
#include "runtime/tape.h"

namespace {

using namespace deeplora;

// ‖M‖₂ of a small square matrix (host power iteration on MᵀM).
double spectral_norm(const Tensor& m) {
  const int64_t k = m.dim(0);
  std::vector<double> a = m.to_double(), v(static_cast<size_t>(k), 1.0), w(static_cast<size_t>(k));
  double s = 0;
  for (int it = 0; it < 60; ++it) {
    std::vector<double> u(static_cast<size_t>(k), 0.0);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) u[size_t(i)] += a[size_t(i * k + j)] * v[size_t(j)];
    std::fill(w.begin(), w.end(), 0.0);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) w[size_t(j)] += a[size_t(i * k + j)] * u[size_t(i)];
    double n = 0;
    for (double x : w) n += x * x;
    n = std::sqrt(n);
    if (n == 0) return 0;
    for (int64_t j = 0; j < k; ++j) v[size_t(j)] = w[size_t(j)] / n;
    s = std::sqrt(n);
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::string model_dir, task_dir, device = "auto", dtype = "auto";
  int64_t n = 16, seed = 0, steps = 50, batch = 16;
  AdapterOptions a;
  a.kind = "deeplora";
  double lr = 1e-2;
  CLI::App app{"deeplora deeplora_probe: per-step spectral norms of Deep LoRA's inner factors during a few-shot fine-tune"};
  app.add_option("--model", model_dir, "base model (HF directory)")->required();
  app.add_option("--task", task_dir, "task directory (train.jsonl is the pool)")->required();
  app.add_option("--n", n, "training examples")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "subset and init seed")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--steps", steps, "optimizer steps")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--batch", batch, "batch")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--lr", lr, "learning rate")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--rank", a.rank, "r (width 2r)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--depth", a.depth, "L")->capture_default_str()->check(CLI::Range(2, 64));
  app.add_option("--eps", a.eps, "K_i(0) = eps I")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--outer-lr-scale", a.outer_lr_scale, "gamma")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--width-lr-ref", a.width_lr_ref, "inner lr x ref / width (0: off)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--deeplora-init", a.init, "gradsvd or random")->capture_default_str();
  app.add_option("--device", device, "auto, cpu or cuda")->capture_default_str();
  app.add_option("--dtype", dtype, "auto, bf16, f32 or f64")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    const Device dev = device_from_flag(device);
    const DType dt = dtype_from_flag(dtype, dev);
    LoadedModel lm = load_for_inference(model_dir, "", dt, dev);
    CausalLM& model = *lm.model;
    Tokenizer tok = Tokenizer::from_dir(resolve_vocab_dir("", model_dir));
    StudyTask task = load_study_task(task_dir, tok, model.max_positions());
    TrainInputs in;
    in.model = &model;
    in.tokenizer = &tok;
    int64_t longest = 0;
    for (int64_t i : training_subset(int64_t(task.pool.examples.size()), n, seed)) {
      const McExample& m = task.pool.examples[size_t(i)];
      Example e;
      e.tokens = m.prompt;
      e.n_prompt = int64_t(m.prompt.size());
      e.tokens.insert(e.tokens.end(), m.choices[size_t(m.label)].begin(), m.choices[size_t(m.label)].end());
      longest = std::max<int64_t>(longest, int64_t(e.tokens.size()) - 1);
      in.train.push_back(std::move(e));
    }
    TrainOptions o;
    o.out_dir = "";
    o.quiet = true;
    o.sample_tokens = 0;
    o.val_fraction = 0;
    o.batch = std::min(batch, n);
    o.seq_len = std::min<int64_t>(model.max_positions(), (longest + 15) / 16 * 16);
    o.steps = steps;
    o.lr = lr;
    o.warmup = std::floor(0.1 * double(steps));
    o.seed = 1000 + uint64_t(seed);
    o.dtype = dtype_name(dt);
    o.adapter = a;
    // Before each step (and once after the last): the inner factors' norms over the adapted layers.
    auto probe = [&](int64_t step) {
      NoGrad ng;
      double k_max = 0, ki_max = 0, k_sum = 0;
      int64_t layers = 0;
      for (Linear* l : model.linears()) {
        auto* d = dynamic_cast<DeepLoraAdapter*>(l->adapter.get());
        if (!d) continue;
        const double s = spectral_norm(d->K_product());
        k_max = std::max(k_max, s);
        k_sum += s;
        for (int i = 1; i <= d->depth(); ++i) ki_max = std::max(ki_max, spectral_norm(d->K(i)));
        ++layers;
      }
      fmt::print("{}\n", nlohmann::json{{"step", step}, {"K_norm_max", k_max}, {"K_norm_mean", layers ? k_sum / double(layers) : 0.0},
                                        {"Ki_norm_max", ki_max}}.dump());
    };
    o.on_step = probe;
    TrainResult r = train(o, in);
    probe(steps);
    for (size_t i = 0; i < r.losses.size(); ++i)
      fmt::print("{}\n", nlohmann::json{{"step", i + 1}, {"loss", r.losses[i]}}.dump());
    McScores val = score_mc(model, task.val);
    fmt::print("{}\n", nlohmann::json{{"rank", a.rank}, {"width", a.width()}, {"lr", lr}, {"val_acc", val.acc}}.dump());
  } catch (const std::exception& e) {
    fmt::print(stderr, "deeplora_probe: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
