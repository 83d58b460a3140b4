// The training step over static buffers (models/train_step.h): the same parameters, bit for bit, as
// the host-driven step (grad_norm on the host, clip, AdamW::step) on token streams and example data
// with gradient accumulation and clipping; non-finite steps skipped without touching anything; and
// on CUDA, the captured step's losses and weights equal the eager step's.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>
#include <random>

#include "models/adapters.h"
#include "models/gpt.h"
#include "models/train_step.h"
#include "models/trainer.h"
#include "runtime/device.h"
#include "runtime/ops.h"
#include "runtime/optim.h"
#include "runtime/tape.h"
#include "test_util.h"

using namespace deeplora;

namespace {

GptConfig tiny() { return GptConfig::preset("tiny"); }

Batch make_batch(int64_t B, int64_t T, uint64_t seed, bool examples) {
  std::mt19937_64 rng(seed);
  Batch b;
  b.B = B;
  b.T = T;
  b.inputs.resize(size_t(B * T));
  b.targets.assign(size_t(B * T), -100);
  for (auto& t : b.inputs) t = int32_t(rng() % 500);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t t = 0; t < T; ++t)
      if (!examples || t >= T - 1 - int64_t(rng() % 3)) b.targets[size_t(r * T + t)] = int32_t(rng() % 500);
  return b;
}

std::vector<double> all_params(Gpt& m) {
  std::vector<double> v;
  for (auto& [n, p] : m.named_params())
    for (double x : p->master.to_double()) v.push_back(x);
  return v;
}

// The reference: the trainer's former host-driven step (example batches padded to the same number of
// loss rows as TrainStep's, so both run the same products).
double host_step(Gpt& model, AdamW& opt, const std::vector<Batch>& micro, double lr, double clip, int64_t loss_rows) {
  const bool examples = loss_rows > 0;
  opt.zero_grad();
  double sum = 0;
  for (const Batch& b : micro) {
    Tensor tok = Tensor::from_ints(b.inputs, Shape{b.B, b.T}, model.device());
    Tensor loss;
    if (examples) {
      std::vector<int32_t> rows, tg;
      for (size_t i = 0; i < b.targets.size(); ++i)
        if (b.targets[i] != -100) {
          rows.push_back(int32_t(i));
          tg.push_back(b.targets[i]);
        }
      rows.resize(size_t(loss_rows), 0);
      tg.resize(size_t(loss_rows), -100);
      loss = model.loss_at(tok, Tensor::from_ints(rows, Shape{loss_rows}, model.device()),
                           Tensor::from_ints(tg, Shape{loss_rows}, model.device()));
    } else {
      loss = model.loss(tok, Tensor::from_ints(b.targets, Shape{b.B, b.T}, model.device()));
    }
    sum += loss.item() / double(micro.size());
    backward(micro.size() > 1 ? ops::scale(loss, 1.0 / double(micro.size())) : loss);
  }
  const double norm = opt.grad_norm();
  opt.step(lr, clip > 0 && norm > clip ? clip / norm : 1.0);
  return sum;
}

}  // namespace

TEST_CASE("TrainStep: the same weights as the host-driven step, bit for bit (f32 CPU; streams and examples)") {
  for (bool examples : {false, true})
    for (int64_t accum : {int64_t(1), int64_t(2)}) {
      CAPTURE(examples);
      CAPTURE(accum);
      const int64_t B = 3, T = 12;
      Gpt a(tiny(), DType::f32, Device::cpu, 4), b(tiny(), DType::f32, Device::cpu, 4);
      AdapterOptions lo;
      lo.kind = "lora";
      lo.rank = 2;
      lo.seed = 3;
      Adapters ad_a = attach_adapters(a, lo, nullptr), ad_b = attach_adapters(b, lo, nullptr);
      AdamW oa(adapter_param_groups(ad_a, 1.0), AdamWConfig{0.9, 0.999, 1e-6});
      AdamW ob(adapter_param_groups(ad_b, 1.0), AdamWConfig{0.9, 0.999, 1e-6});
      TrainStep::Options so;
      so.batch = B;
      so.seq_len = T;
      so.grad_accum = accum;
      so.loss_rows = examples ? B * 3 : 0;
      so.clip = 0.05;  // small: the clip acts
      TrainStep ts(b, ob, so);
      for (int step = 0; step < 4; ++step) {
        std::vector<Batch> micro;
        for (int64_t m = 0; m < accum; ++m) micro.push_back(make_batch(B, T, uint64_t(step * 10 + m), examples));
        const double lr = 3e-3 * (step + 1);
        const double want = host_step(a, oa, micro, lr, so.clip, so.loss_rows);
        TrainStep::Result r = ts.run(micro, lr);
        CHECK_FALSE(r.skipped);
        CHECK(r.loss == doctest::Approx(want).epsilon(1e-12));
        CHECK(r.grad_scale < 1.0);
      }
      std::vector<double> pa, pb;
      for (auto& x : adapter_state(ad_a))
        for (double v : x.second.to_double()) pa.push_back(v);
      for (auto& x : adapter_state(ad_b))
        for (double v : x.second.to_double()) pb.push_back(v);
      CHECK(pa == pb);
      CHECK(oa.step_count() == ob.step_count());
    }
}

TEST_CASE("TrainStep: a non-finite loss or norm skips the step and leaves weights, state and count alone") {
  const int64_t B = 2, T = 8;
  Gpt model(tiny(), DType::f32, Device::cpu, 6);
  std::vector<Tensor> params = model.trainable_tensors();
  AdamW opt({ParamGroup{params, 1.0, 0.0, "all"}});
  TrainStep::Options so;
  so.batch = B;
  so.seq_len = T;
  TrainStep ts(model, opt, so);
  TrainStep::Result ok = ts.run({make_batch(B, T, 1, false)}, 1e-3);
  CHECK_FALSE(ok.skipped);
  CHECK(opt.step_count() == 1);
  const std::vector<double> before = all_params(model);
  {  // a NaN in the weights makes the loss NaN
    NoGrad ng;
    model.param("h.0.mlp.c_fc.bias").master.fill(NAN);
  }
  TrainStep::Result bad = ts.run({make_batch(B, T, 2, false)}, 1e-3);
  CHECK(bad.skipped);
  CHECK(std::isnan(bad.loss));
  CHECK(opt.step_count() == 1);  // the skipped step is not counted
  std::vector<double> after = all_params(model);
  size_t changed = 0;
  for (size_t i = 0; i < after.size(); ++i) changed += !(after[i] == before[i]) && !std::isnan(after[i]);
  CHECK(changed == 0);
  CHECK(max_loss_rows({Example{{1, 2, 3, 4}, 2}, Example{{1, 2, 3, 4, 5, 6}, 1}, Example{{1, 2}, 1}}, 2, 4) == 4 + 2);
  CHECK(test::contains(test::error_of([&] { ts.run({make_batch(B, T + 1, 3, false)}, 1e-3); }), "the step was built for 2 x 8"));
}

TEST_CASE("TrainStep on CUDA: the captured step gives the eager step's losses and weights (f32, bf16)") {
  if (!cuda_available()) {
    MESSAGE("skipped: " << cuda_unavailable_reason());
    return;
  }
  for (DType dt : {DType::f32, DType::bf16})
    for (const char* kind : {"lora", "deeplora", "none"}) {
      CAPTURE(dtype_name(dt));
      CAPTURE(kind);
      const int64_t B = 4, T = 16;
      auto run = [&](bool graph) {
        Gpt model(tiny(), dt, Device::cuda, 8);
        AdapterOptions o;
        o.kind = kind;
        o.rank = 2;
        o.init = "random";
        o.seed = 1;
        Adapters ad = attach_adapters(model, o, nullptr);
        std::vector<ParamGroup> groups = ad.empty() ? std::vector<ParamGroup>{{model.trainable_tensors(), 1.0, 0.0, "all"}}
                                                    : adapter_param_groups(ad, 0.01);
        AdamW opt(groups, AdamWConfig{0.9, 0.999, 1e-6});
        TrainStep::Options so;
        so.batch = B;
        so.seq_len = T;
        so.grad_accum = 2;
        so.loss_rows = B * 3;
        so.clip = 1.0;
        so.cuda_graph = graph;
        TrainStep ts(model, opt, so);
        std::vector<double> losses;
        for (int s = 0; s < 5; ++s)
          losses.push_back(ts.run({make_batch(B, T, uint64_t(2 * s), true), make_batch(B, T, uint64_t(2 * s + 1), true)},
                                  1e-3)
                               .loss);
        CHECK(ts.captured() == graph);
        std::vector<double> w;
        for (auto& x : adapter_state(ad))
          for (double v : x.second.to_double()) w.push_back(v);
        if (ad.empty()) w = all_params(model);
        return std::make_pair(losses, w);
      };
      auto eager = run(false), graphed = run(true);
      CHECK(graphed.first == eager.first);
      CHECK(graphed.second == eager.second);
    }
}

TEST_CASE("train on CUDA: --cuda-graph on replays the captured step and gives the eager run's losses (full, LoRA, Deep LoRA)") {
  if (!cuda_available()) {
    MESSAGE("skipped: " << cuda_unavailable_reason());
    return;
  }
  const auto dir = test::fresh_dir("train-graph");
  const std::string shard = test::random_shard(dir, 6000, 5);
  for (const char* kind : {"none", "lora", "deeplora"})
    for (const char* dtype : {"f32", "bf16"}) {
      CAPTURE(kind);
      CAPTURE(dtype);
      std::vector<double> losses[2];
      bool used[2] = {false, false};
      for (int g = 0; g < 2; ++g) {
        TrainOptions o;
        o.preset = "tiny";
        o.vocab_dir = "";
        o.data = {shard};
        o.val_fraction = 0;
        o.batch = 4;
        o.seq_len = 32;
        o.grad_accum = 2;
        o.steps = 6;
        o.lr = 3e-3;
        o.clip = 0.5;
        o.dtype = dtype;
        o.device = "cuda";
        o.quiet = true;
        o.save_final = false;
        o.out_dir = "";
        o.cuda_graph = g == 1;
        o.adapter.kind = kind;
        o.adapter.rank = 4;
        TrainResult r = train(o);
        losses[g] = r.losses;
        used[g] = r.cuda_graph;
      }
      CHECK_FALSE(used[0]);
      CHECK(used[1]);
      REQUIRE(losses[0].size() == 6);
      CHECK(losses[1] == losses[0]);  // the same kernels in the same order: bit for bit
    }
}
