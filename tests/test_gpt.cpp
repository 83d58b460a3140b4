// GPT-2 model and trainer: HF checkpoint round trip, bad checkpoints, resume equality, crash safety
// of checkpoint writes (kill -9), and the transformers fixture (tests/data/hf_tiny, made on the GPU
// machine by tools/hf_crosscheck.py).
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "models/gpt.h"
#include "models/gpt_io.h"
#include "models/trainer.h"
#include "runtime/device.h"
#include "runtime/io/safetensors.h"
#include "runtime/io/token_shards.h"
#include "runtime/ops.h"
#include "runtime/optim.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;

namespace {
using test::error_of;

TrainOptions tiny_opts(const fs::path& dir, const std::string& shard) {
  TrainOptions o;
  o.preset = "tiny";
  o.data = {shard};
  o.val_fraction = 0.1;
  o.vocab_dir = "";
  o.batch = 4;
  o.seq_len = 16;
  o.steps = 8;
  o.lr = 3e-3;
  o.warmup = 2;
  o.weight_decay = 0.1;
  o.out_dir = (dir / "run").string();
  o.dtype = "f32";
  o.device = "cpu";
  o.quiet = true;
  o.save_final = false;
  return o;
}

}  // namespace

TEST_CASE("gpt: HF save/load round trip gives identical logits") {
  fs::path d = test::fresh_dir("hf-roundtrip");
  Gpt a(GptConfig::preset("tiny"), DType::f32, Device::cpu, 3);
  Tensor tok = Tensor::from_ints({1, 5, 9, 200, 7, 3}, Shape{2, 3});
  std::vector<double> la;
  {
    NoGrad ng;
    la = a.forward(tok).to_double();
  }
  save_hf_gpt(a, (d / "m").string());
  auto b = load_hf_gpt((d / "m").string(), DType::f32, Device::cpu);
  NoGrad ng;
  CHECK(b->forward(tok).to_double() == la);
  // The file stores Conv1D weights as [in, out] like transformers.
  auto h = read_safetensors_header((d / "m" / "model.safetensors").string());
  CHECK(h.find("transformer.h.0.attn.c_attn.weight")->shape == std::vector<int64_t>{64, 192});
  CHECK(h.find("transformer.h.1.mlp.c_proj.weight")->shape == std::vector<int64_t>{256, 64});
}

TEST_CASE("gpt: bad checkpoints give errors naming the file and the tensor") {
  fs::path d = test::fresh_dir("hf-bad");
  Gpt a(GptConfig::preset("tiny"), DType::f32, Device::cpu, 3);
  save_hf_gpt(a, (d / "m").string());
  auto sd = hf_state_dict(a);
  std::string st = (d / "m" / "model.safetensors").string();
  // Missing tensor.
  NamedTensors missing(sd.begin() + 1, sd.end());
  save_safetensors(st, missing);
  std::string e = error_of([&] { load_hf_gpt((d / "m").string(), DType::f32, Device::cpu); });
  CHECK(e.find("model.safetensors") != std::string::npos);
  CHECK(e.find("missing tensor") != std::string::npos);
  // Wrong shape.
  NamedTensors wrong = sd;
  wrong[0].second = Tensor::zeros(Shape{3, 3}, DType::f32);
  save_safetensors(st, wrong);
  e = error_of([&] { load_hf_gpt((d / "m").string(), DType::f32, Device::cpu); });
  CHECK(e.find("has shape [3, 3]") != std::string::npos);
  // Extra tensor.
  NamedTensors extra = sd;
  extra.emplace_back("transformer.h.9.mlp.c_fc.weight", Tensor::zeros(Shape{2}, DType::f32));
  save_safetensors(st, extra);
  e = error_of([&] { load_hf_gpt((d / "m").string(), DType::f32, Device::cpu); });
  CHECK(e.find("unexpected tensor 'transformer.h.9.mlp.c_fc.weight'") != std::string::npos);
  // Config that disagrees with the weights.
  save_safetensors(st, sd);
  GptConfig c = GptConfig::preset("tiny");
  c.n_embd = 32;
  c.save_json_file((d / "m" / "config.json").string());
  e = error_of([&] { load_hf_gpt((d / "m").string(), DType::f32, Device::cpu); });
  CHECK(e.find("has shape") != std::string::npos);
  // Broken config.
  std::ofstream((d / "m" / "config.json").string()) << "{\"n_layer\": 2";
  e = error_of([&] { load_hf_gpt((d / "m").string(), DType::f32, Device::cpu); });
  CHECK(e.find("config.json: not valid JSON") != std::string::npos);
}

TEST_CASE("trainer: the loss falls and --resume continues with the same losses") {
  fs::path d = test::fresh_dir("resume");
  std::string shard = test::random_shard(d, 4000, 7);
  TrainOptions full = tiny_opts(d / "a", shard);
  auto r_full = train(full);
  REQUIRE(r_full.losses.size() == 8);
  CHECK(r_full.losses.back() < r_full.losses.front());

  TrainOptions first = tiny_opts(d / "b", shard);
  first.ckpt_every = 4;
  first.stop_after = 4;
  auto r1 = train(first);
  REQUIRE(r1.losses.size() == 4);
  TrainOptions second = first;
  second.stop_after = 0;
  second.resume = true;
  auto r2 = train(second);
  REQUIRE(r2.losses.size() == 4);
  for (int i = 0; i < 4; ++i) {
    CHECK(r1.losses[size_t(i)] == r_full.losses[size_t(i)]);
    CHECK(r2.losses[size_t(i)] == doctest::Approx(r_full.losses[size_t(i + 4)]).epsilon(1e-12));
  }
}

TEST_CASE("trainer: kill -9 during checkpoint writes leaves a loadable previous checkpoint") {
  fs::path d = test::fresh_dir("kill");
  std::string shard = test::random_shard(d, 4000, 9);
  TrainOptions o = tiny_opts(d, shard);
  o.steps = 100000;
  o.ckpt_every = 1;  // the child spends most of its time writing checkpoints
  int killed = 0;
  for (int trial = 0; trial < 4; ++trial) {
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      try {
        TrainOptions c = o;
        c.resume = trial > 0;
        train(c);
      } catch (...) {
        _exit(3);
      }
      _exit(0);
    }
    // The first kill waits for a first checkpoint (slow builds, e.g. ASan, need longer than 0.4 s).
    for (int w = 0; trial == 0 && w < 600 && !fs::exists(fs::path(o.out_dir) / "latest"); ++w) usleep(100000);
    usleep(useconds_t(400000 + 150000 * trial));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    killed += WIFSIGNALED(status) ? 1 : 0;
    // Whatever moment the kill hit, `latest` names a complete checkpoint that resumes.
    TrainOptions r = o;
    r.resume = true;
    r.stop_after = 1;
    r.ckpt_every = 0;
    CHECK_NOTHROW(train(r));
  }
  CHECK(killed == 4);
}

TEST_CASE("gpt: matches transformers on the committed fixture (tests/data/hf_tiny)") {
  fs::path fx = fs::path(DEEPLORA_TEST_DATA) / "hf_tiny";
  if (!fs::exists(fx / "expected.safetensors")) {
    MESSAGE("skipped: no fixture at " << fx.string() << " (made on the GPU machine by tools/hf_crosscheck.py)");
    return;
  }
  auto model = load_hf_gpt(fx.string(), DType::f32, Device::cpu);
  SafetensorsFile ex = load_safetensors((fx / "expected.safetensors").string());
  Tensor tok = ex.at("input_ids").to(DType::i32);
  Tensor tgt = ex.at("labels").to(DType::i32);
  auto rel = [](const std::vector<double>& a, const std::vector<double>& b) {
    double n = 0, d = 0;
    for (size_t i = 0; i < a.size(); ++i) n += (a[i] - b[i]) * (a[i] - b[i]), d += b[i] * b[i];
    return std::sqrt(n / std::max(d, 1e-300));
  };
  Tensor logits = model->forward(tok);
  const double logit_err = rel(logits.to_double(), ex.at("logits").to_double());
  CHECK(logit_err <= 1e-4);
  Tensor loss = ops::cross_entropy(logits, tgt);
  CHECK(loss.item() == doctest::Approx(ex.at("loss").item()).epsilon(1e-4));
  backward(loss);
  auto sd = model->named_params();
  int checked = 0;
  double worst_grad = 0;
  for (auto& [name, p] : sd) {
    std::string key = "grad." + name;
    if (!ex.contains(key)) continue;
    Tensor g = ex.at(key);
    std::vector<double> ours = p->master.grad().to_double();
    if (g.shape() != p->master.shape()) ours = transpose2d_host(p->master.grad()).to_double();
    const double e = rel(ours, g.to_double());
    worst_grad = std::max(worst_grad, e);
    CHECK_MESSAGE(e <= 1e-3, name);
    ++checked;
  }
  CHECK(checked == int(sd.size()));
  // Ten AdamW steps (lr 1e-3, weight decay 0.01 on every tensor: torch.optim.AdamW defaults).
  std::vector<Tensor> params;
  for (auto& [name, p] : sd) params.push_back(p->master);
  AdamW opt({ParamGroup{params, 1.0, 0.01, "all"}}, AdamWConfig{0.9, 0.999, 1e-8});
  std::vector<double> expected = ex.at("adamw_losses").to_double();
  double worst_loss = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    opt.zero_grad();
    Tensor l = model->loss(tok, tgt);
    worst_loss = std::max(worst_loss, std::abs(l.item() - expected[i]) / std::abs(expected[i]));
    CHECK_MESSAGE(l.item() == doctest::Approx(expected[i]).epsilon(1e-4), "adamw step ", i);
    backward(l);
    opt.step(1e-3);
  }
  MESSAGE(fmt::format("vs transformers (f32, CPU): logits rel err {:.2e}, worst grad rel err {:.2e} over {} tensors, "
                      "worst AdamW-step loss rel err {:.2e} over {} steps",
                      logit_err, worst_grad, checked, worst_loss, expected.size()));
}

TEST_CASE("gpt: a vocabulary padded to a multiple of 64 changes nothing but speed") {
  GptConfig c = GptConfig::preset("tiny");
  c.vocab_size = 500;  // padded to 512 rows of wte
  REQUIRE(c.padded_vocab() == 512);
  Gpt m(c, DType::f64, Device::cpu, 5);
  Tensor tok = Tensor::from_ints({1, 499, 7, 3, 250, 0}, Shape{2, 3});
  Tensor tgt = Tensor::from_ints({499, 2, -100, 4, 5, 6}, Shape{2, 3});
  Tensor logits = m.forward(tok);
  CHECK(logits.shape() == Shape{2, 3, 500});
  double unpadded = ops::cross_entropy(logits, tgt).item();
  Tensor loss = m.loss(tok, tgt);
  CHECK(loss.item() == doctest::Approx(unpadded).epsilon(1e-12));
  backward(loss);
  Tensor g = m.param("wte.weight").master.grad();
  for (double v : g.slice0(500, 512).to_double()) CHECK(v == 0.0);
  // Ids in the padding rows are not tokens: rejected, not silently embedded as zeros.
  bool threw = false;
  try {
    m.forward(Tensor::from_ints({1, 505}, Shape{1, 2}));
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("out of range [0, 500)") != std::string::npos;
  }
  CHECK(threw);
  fs::path d = test::fresh_dir("padded");
  save_hf_gpt(m, (d / "m").string());
  CHECK(read_safetensors_header((d / "m" / "model.safetensors").string()).find("transformer.wte.weight")->shape ==
        std::vector<int64_t>{500, 64});
  auto back = load_hf_gpt((d / "m").string(), DType::f64, Device::cpu);
  NoGrad ng;
  auto a = back->forward(tok).to_double(), b = m.forward(tok).to_double();
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == doctest::Approx(b[i]).epsilon(1e-5));  // saved as f32
}

namespace {

// Logits, loss and gradients of `runs` against transformers' f32 on the hf_tiny fixture (bf16 within
// 2e-2, f32 within 1e-4 / 1e-3).
void check_vs_transformers_fixture(const std::vector<std::pair<DType, Device>>& runs) {
  fs::path fx = fs::path(DEEPLORA_TEST_DATA) / "hf_tiny";
  if (!fs::exists(fx / "expected.safetensors")) {
    MESSAGE("skipped: no fixture at " << fx.string());
    return;
  }
  SafetensorsFile ex = load_safetensors((fx / "expected.safetensors").string());
  auto rel = [](const std::vector<double>& a, const std::vector<double>& b) {
    double n = 0, d = 0;
    for (size_t i = 0; i < a.size(); ++i) n += (a[i] - b[i]) * (a[i] - b[i]), d += b[i] * b[i];
    return std::sqrt(n / std::max(d, 1e-300));
  };
  for (auto [dt, dev] : runs) {
    const std::string what = std::string(dtype_name(dt)) + " on " + device_name(dev);
    CAPTURE(what);
    const double tol = dt == DType::bf16 ? 2e-2 : 1e-4;
    auto model = load_hf_gpt(fx.string(), dt, dev);
    Tensor tok = ex.at("input_ids").to(DType::i32).to(dev), tgt = ex.at("labels").to(DType::i32).to(dev);
    Tensor logits = model->forward(tok);
    const double le = rel(logits.to_double(), ex.at("logits").to_double());
    CHECK(le <= tol);
    Tensor loss = ops::cross_entropy(logits, tgt);
    CHECK(loss.item() == doctest::Approx(ex.at("loss").item()).epsilon(tol));
    backward(loss);
    double worst = 0;
    for (auto& [name, p] : model->named_params()) {
      const double e = rel(p->master.grad().to_double(), ex.at("grad." + name).to_double());
      worst = std::max(worst, e);
    }
    CHECK(worst <= (dt == DType::bf16 ? 2e-2 : 1e-3));
    MESSAGE(fmt::format("vs transformers f32, deeplora {} on {}: logits {:.2e}, worst gradient {:.2e}", dtype_name(dt),
                        device_name(dev), le, worst));
  }
}

}  // namespace

TEST_CASE("gpt: bf16 compute stays within 2e-2 of transformers' f32 on the fixture (CPU)") {
  check_vs_transformers_fixture({{DType::bf16, Device::cpu}});
}

TEST_CASE("gpt on CUDA: f32 and bf16 compute stay within 1e-4 and 2e-2 of transformers' f32 on the fixture") {
  if (!cuda_available()) {
    MESSAGE("skipped: " << cuda_unavailable_reason());
    return;
  }
  check_vs_transformers_fixture({{DType::f32, Device::cuda}, {DType::bf16, Device::cuda}});
}
