// Optimizer tests: AdamW against a plain f64 scalar reference (two groups, weight decay, clipping),
// the bf16 working copy, the gradient norm, zero_grad and the flat gradient views, checkpoint state
// round trips and errors, and CPU-vs-CUDA agreement of the fused kernels.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/device.h"
#include "runtime/ops.h"
#include "runtime/optim.h"
#include "test_util.h"

using namespace deeplora;

namespace {
using test::error_of;

// Values are drawn on the CPU (and copied), so a CPU and a CUDA run start from the same bits.
Tensor make_param(const std::string& name, const Shape& s, DType dt, uint64_t seed, Device dev = Device::cpu) {
  Tensor t = Tensor::randn(s, seed, dt, Device::cpu, 0.5).to(dev);
  t.set_requires_grad(true).set_name(name);
  return t;
}

// Writes a seeded gradient into p's grad (the optimizer's view) and returns the values as stored.
std::vector<double> set_grad(const Tensor& p, uint64_t seed, double stddev = 1.0) {
  Tensor g = p.grad();
  REQUIRE(g.defined());
  g.copy_from(Tensor::randn(p.shape(), seed, p.dtype(), Device::cpu, stddev));
  return g.to_double();
}

// torch.optim.AdamW, one parameter, in double.
struct RefAdamW {
  std::vector<double> p, m, v;
  double lr_scale = 1, wd = 0;
  void step(const std::vector<double>& grad, int64_t t, double lr, double scale, const AdamWConfig& c) {
    const double bc1 = 1 - std::pow(c.beta1, double(t)), bc2 = 1 - std::pow(c.beta2, double(t));
    const double a = lr * lr_scale;
    for (size_t i = 0; i < p.size(); ++i) {
      const double g = grad[i] * scale;
      m[i] = c.beta1 * m[i] + (1 - c.beta1) * g;
      v[i] = c.beta2 * v[i] + (1 - c.beta2) * g * g;
      const double mhat = m[i] / bc1, vhat = v[i] / bc2;
      p[i] -= a * (mhat / (std::sqrt(vhat) + c.eps) + wd * p[i]);
    }
  }
};

std::map<std::string, Tensor> state_map(AdamW& opt) {
  std::map<std::string, Tensor> out;
  for (auto& [k, t] : opt.state_tensors()) out.emplace(k, t);
  return out;
}

void check_close(const std::vector<double>& got, const std::vector<double>& want, double rel, double abs_tol,
                 const std::string& what) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO(what << "[" << i << "]: got " << got[i] << ", want " << want[i]);
    CHECK(std::abs(got[i] - want[i]) <= abs_tol + rel * std::abs(want[i]));
  }
}

}  // namespace

TEST_CASE("AdamW: matches a scalar f64 reference over 5 steps (two groups, weight decay)") {
  for (DType dt : {DType::f64, DType::f32}) {
    const std::string dt_name = dtype_name(dt);
    CAPTURE(dt_name);
    Tensor a = make_param("a", Shape{3, 7}, dt, 1);
    Tensor b = make_param("b", Shape{5}, dt, 2);
    Tensor c = make_param("c", Shape{2, 2, 9}, dt, 3);
    Tensor frozen = Tensor::randn(Shape{4}, 4, dt).set_name("frozen");
    const std::vector<double> frozen0 = frozen.to_double();
    AdamWConfig cfg;
    cfg.beta1 = 0.85;
    cfg.beta2 = 0.99;
    cfg.eps = 1e-6;
    AdamW opt({ParamGroup{{a, b}, 1.0, 0.1, "decay"}, ParamGroup{{c}, 0.5, 0.0, "no_decay"}}, cfg);
    CHECK(opt.n_params() == 21 + 5 + 36);
    std::vector<Tensor> ps = {a, b, c};
    std::vector<RefAdamW> ref(3);
    for (int i = 0; i < 3; ++i) {
      ref[i].p = ps[i].to_double();
      ref[i].m.assign(ref[i].p.size(), 0.0);
      ref[i].v.assign(ref[i].p.size(), 0.0);
    }
    ref[0].wd = ref[1].wd = 0.1;
    ref[2].lr_scale = 0.5;
    for (int t = 1; t <= 5; ++t) {
      opt.zero_grad();
      const double lr = 1e-2 * (1.0 + 0.2 * t);
      for (int i = 0; i < 3; ++i) ref[i].step(set_grad(ps[i], 100 * t + i), t, lr, 1.0, cfg);
      opt.step(lr);
      CHECK(opt.step_count() == t);
    }
    // f32: a few ulps of parameters ~0.5 per step; f64: round-off only.
    const double rel = dt == DType::f64 ? 1e-12 : 2e-6, abs_tol = dt == DType::f64 ? 1e-15 : 2e-7;
    auto st = state_map(opt);
    for (int i = 0; i < 3; ++i) {
      const std::string n = ps[i].name();
      check_close(ps[i].to_double(), ref[i].p, rel, abs_tol, n);
      check_close(st.at(n + ".master").to_double(), ref[i].p, rel, abs_tol, n + ".master");
      check_close(st.at(n + ".m").to_double(), ref[i].m, rel * 10, abs_tol * 0.1, n + ".m");
      check_close(st.at(n + ".v").to_double(), ref[i].v, rel * 10, abs_tol * 0.1, n + ".v");
    }
    CHECK(frozen.to_double() == frozen0);
    CHECK(!frozen.grad().defined());
    CHECK(st.size() == 9);
    CHECK(st.count("frozen.m") == 0);
  }
}

TEST_CASE("AdamW: bf16 working copy is the rounded f32 master") {
  Tensor w = make_param("w", Shape{6, 11}, DType::bf16, 7);
  Tensor bias = make_param("bias", Shape{11}, DType::f32, 8);
  AdamW opt({ParamGroup{{w, bias}, 1.0, 0.01, "all"}});
  auto st = state_map(opt);
  CHECK(st.at("w.master").dtype() == DType::f32);
  CHECK(st.at("w.master").to_double() == w.to_double());  // bf16 -> f32 is exact
  CHECK(st.at("bias.master").data() == bias.data());      // f32 is its own master
  RefAdamW ref;
  ref.p = w.to_double();
  ref.m.assign(ref.p.size(), 0.0);
  ref.v.assign(ref.p.size(), 0.0);
  ref.wd = 0.01;
  for (int t = 1; t <= 5; ++t) {
    opt.zero_grad();
    ref.step(set_grad(w, 10 + t), t, 3e-2, 1.0, opt.config());
    set_grad(bias, 20 + t);
    opt.step(3e-2);
    // The working copy is exactly the master rounded to nearest even.
    CHECK(w.to_double() == st.at("w.master").to(DType::bf16).to_double());
  }
  check_close(st.at("w.master").to_double(), ref.p, 2e-6, 1e-7, "w.master");
  CHECK(w.to_double() != st.at("w.master").to_double());  // master keeps the bits bf16 loses
}

TEST_CASE("AdamW: grad_norm is the global L2 norm over every dtype's buffer") {
  Tensor a = make_param("a", Shape{17}, DType::f32, 1);
  Tensor b = make_param("b", Shape{3, 5}, DType::bf16, 2);
  Tensor c = make_param("c", Shape{9}, DType::f64, 3);
  Tensor d = make_param("d", Shape{40}, DType::bf16, 4);
  AdamW opt({ParamGroup{{a, b}, 1.0, 0.0, "g0"}, ParamGroup{{c, d}, 2.0, 0.0, "g1"}});
  CHECK(opt.grad_norm() == 0.0);
  double hand = 0;
  uint64_t seed = 50;
  for (const Tensor& p : {a, b, c, d})
    for (double g : set_grad(p, seed++)) hand += g * g;
  CHECK(opt.grad_norm() == doctest::Approx(std::sqrt(hand)).epsilon(1e-6));
  // One flat buffer per dtype: f32, bf16, f64; every range 16-byte aligned and inside its buffer.
  auto flats = opt.flat_grads();
  REQUIRE(flats.size() == 3);
  CHECK(flats[0].dtype() == DType::f32);
  CHECK(flats[1].dtype() == DType::bf16);
  CHECK(flats[2].dtype() == DType::f64);
  for (const auto& r : opt.grad_ranges()) {
    CAPTURE(r.name);
    CHECK((r.offset * int64_t(dtype_size(flats[r.buffer].dtype()))) % 16 == 0);
    CHECK(r.offset + r.numel <= flats[r.buffer].numel());
  }
  // The flat buffers hold the gradients (padding stays zero), so their sum of squares is the same.
  double flat = 0;
  for (const Tensor& f : flats)
    for (double g : f.to_double()) flat += g * g;
  CHECK(flat == doctest::Approx(hand).epsilon(1e-12));
}

TEST_CASE("AdamW: clipping through grad_scale") {
  Tensor a = make_param("a", Shape{8, 3}, DType::f64, 1);
  Tensor b = make_param("b", Shape{8, 3}, DType::f64, 1);  // same values as a
  AdamW opt_a({ParamGroup{{a}, 1.0, 0.05, "a"}});
  AdamW opt_b({ParamGroup{{b}, 1.0, 0.05, "b"}});
  RefAdamW ref;
  ref.p = a.to_double();
  ref.m.assign(ref.p.size(), 0.0);
  ref.v.assign(ref.p.size(), 0.0);
  ref.wd = 0.05;
  const double max_norm = 1.0;
  for (int t = 1; t <= 3; ++t) {
    opt_a.zero_grad();
    opt_b.zero_grad();
    auto g = set_grad(a, 70 + t, 3.0);  // norm ~ 15: clipped
    const double norm = opt_a.grad_norm();
    double hand = 0;
    for (double x : g) hand += x * x;
    CHECK(norm == doctest::Approx(std::sqrt(hand)).epsilon(1e-12));
    const double scale = std::min(1.0, max_norm / norm);
    CHECK(scale < 0.2);
    opt_a.step(1e-2, scale);
    ref.step(g, t, 1e-2, scale, opt_a.config());
    // The same step with pre-scaled gradients and no grad_scale.
    std::vector<double> gs(g.size());
    for (size_t i = 0; i < g.size(); ++i) gs[i] = g[i] * scale;
    b.grad().copy_from(Tensor::from_vector(gs, b.shape(), DType::f64));
    opt_b.step(1e-2);
  }
  check_close(a.to_double(), ref.p, 1e-12, 1e-15, "a");
  CHECK(a.to_double() == b.to_double());
  CHECK(error_of([&] { opt_a.step(1e-2, std::nan("")); }).find("finite") != std::string::npos);
}

TEST_CASE("AdamW: state round trip gives an identical next step") {
  auto build = [](uint64_t seed) {
    std::vector<Tensor> ps = {make_param("h.0.attn.w", Shape{4, 6}, DType::bf16, seed),
                              make_param("h.0.ln.w", Shape{6}, DType::f32, seed + 1),
                              make_param("lora.A", Shape{3, 5}, DType::f32, seed + 2)};
    return ps;
  };
  auto groups_of = [](const std::vector<Tensor>& ps) {
    return std::vector<ParamGroup>{ParamGroup{{ps[0], ps[1]}, 1.0, 0.1, "base"},
                                   ParamGroup{{ps[2]}, 4.0, 0.0, "lora"}};
  };
  std::vector<Tensor> p1 = build(1);
  AdamW opt1(groups_of(p1));
  for (int t = 1; t <= 3; ++t) {
    opt1.zero_grad();
    for (size_t i = 0; i < p1.size(); ++i) set_grad(p1[i], 10 * t + i);
    opt1.step(1e-2);
  }
  // Save as a checkpoint would: host f32 copies by name.
  std::vector<std::pair<std::string, Tensor>> saved;
  for (auto& [k, t] : opt1.state_tensors()) saved.emplace_back(k, t.to(Device::cpu).to(DType::f32).clone());
  CHECK(saved.size() == 9);

  std::vector<Tensor> p2 = build(99);  // different initial values: load_state must set them
  AdamW opt2(groups_of(p2));
  opt2.load_state(saved);
  opt2.set_step_count(opt1.step_count());
  for (size_t i = 0; i < p1.size(); ++i) CHECK(p2[i].to_double() == p1[i].to_double());

  opt1.zero_grad();
  opt2.zero_grad();
  for (size_t i = 0; i < p1.size(); ++i) {
    set_grad(p1[i], 500 + i);
    set_grad(p2[i], 500 + i);
  }
  opt1.step(1e-2);
  opt2.step(1e-2);
  for (size_t i = 0; i < p1.size(); ++i) CHECK(p2[i].to_double() == p1[i].to_double());
  auto s1 = opt1.state_tensors(), s2 = opt2.state_tensors();
  REQUIRE(s1.size() == s2.size());
  for (size_t i = 0; i < s1.size(); ++i) {
    CAPTURE(s1[i].first);
    CHECK(s1[i].first == s2[i].first);
    CHECK(s1[i].second.to_double() == s2[i].second.to_double());
  }

  // Errors name the tensor; a failed load changes nothing.
  const auto before = p2[2].to_double();
  auto missing = saved;
  missing.erase(missing.begin() + 4);  // h.0.ln.w.m
  CHECK(error_of([&] { opt2.load_state(missing); }).find("missing 'h.0.ln.w.m'") != std::string::npos);
  auto bad_shape = saved;
  bad_shape[6].second = Tensor::zeros(Shape{5, 3}, DType::f32);  // lora.A.master
  std::string e = error_of([&] { opt2.load_state(bad_shape); });
  CHECK(e.find("'lora.A.master' has shape [5, 3], expected [3, 5]") != std::string::npos);
  auto extra = saved;
  extra.emplace_back("wte.m", Tensor::zeros(Shape{2}, DType::f32));
  CHECK(error_of([&] { opt2.load_state(extra); }).find("unexpected 'wte.m'") != std::string::npos);
  CHECK(p2[2].to_double() == before);
  CHECK(error_of([&] { opt2.set_step_count(-1); }).find("set_step_count") != std::string::npos);
}

TEST_CASE("AdamW: zero_grad, gradient views and backward into the flat buffer") {
  Tensor x = make_param("x", Shape{5}, DType::f64, 1);
  Tensor y = make_param("y", Shape{3}, DType::f64, 2);
  AdamW opt({ParamGroup{{x, y}, 1.0, 0.0, "all"}});
  auto flats = opt.flat_grads();
  REQUIRE(flats.size() == 1);
  auto ranges = opt.grad_ranges();
  REQUIRE(ranges.size() == 2);
  // The params' grads are views of the flat buffer at their ranges.
  CHECK(x.grad().data() == static_cast<char*>(flats[0].data()) + ranges[0].offset * 8);
  CHECK(y.grad().data() == static_cast<char*>(flats[0].data()) + ranges[1].offset * 8);

  // Backward accumulates straight into the flat buffer: d/dx sum(x*x) = 2x, twice.
  backward(ops::sum(ops::mul(x, x)));
  backward(ops::sum(ops::mul(x, x)));
  auto xv = x.to_double();
  auto fv = flats[0].to_double();
  for (int i = 0; i < 5; ++i) CHECK(fv[size_t(ranges[0].offset + i)] == doctest::Approx(4 * xv[size_t(i)]));
  CHECK(opt.grad_norm() > 0);

  opt.zero_grad();
  for (double v : flats[0].to_double()) CHECK(v == 0.0);
  CHECK(x.grad().data() == static_cast<char*>(flats[0].data()) + ranges[0].offset * 8);
  CHECK(opt.grad_norm() == 0.0);

  // Tensor::zero_grad drops the view; a later backward allocates a fresh buffer; the optimizer copies
  // it back in and reinstalls the view before using it.
  x.zero_grad();
  backward(ops::sum(ops::scale(x, 3.0)));
  CHECK(x.grad().data() != static_cast<char*>(flats[0].data()) + ranges[0].offset * 8);
  CHECK(opt.grad_norm() == doctest::Approx(3.0 * std::sqrt(5.0)));
  CHECK(x.grad().data() == static_cast<char*>(flats[0].data()) + ranges[0].offset * 8);
  y.zero_grad();
  CHECK(opt.grad_norm() == doctest::Approx(3.0 * std::sqrt(5.0)));
  CHECK(y.grad().defined());
}

TEST_CASE("AdamW: constructor errors name the parameter") {
  Tensor ok = make_param("ok", Shape{2}, DType::f32, 1);
  Tensor frozen = Tensor::zeros(Shape{2}, DType::f32).set_name("frozen");
  Tensor unnamed = Tensor::zeros(Shape{2}, DType::f32);
  unnamed.set_requires_grad(true);
  Tensor twin = make_param("ok", Shape{3}, DType::f32, 2);
  CHECK(error_of([&] { AdamW({ParamGroup{{ok, frozen}, 1, 0, "g"}}); }).find("frozen") != std::string::npos);
  CHECK(error_of([&] { AdamW({ParamGroup{{unnamed}, 1, 0, "g"}}); }).find("no name") != std::string::npos);
  CHECK(error_of([&] { AdamW({ParamGroup{{ok}, 1, 0, "a"}, ParamGroup{{ok}, 1, 0, "b"}}); })
            .find("appears twice") != std::string::npos);
  CHECK(error_of([&] { AdamW({ParamGroup{{ok, twin}, 1, 0, "g"}}); }).find("shares its name") != std::string::npos);
  AdamW empty(std::vector<ParamGroup>{});
  CHECK(empty.n_params() == 0);
  empty.zero_grad();
  CHECK(empty.grad_norm() == 0.0);
  empty.step(1e-3);
  CHECK(empty.state_tensors().empty());
}

TEST_CASE("AdamW: CPU and CUDA agree bit for bit") {
  if (!cuda_available()) {
    MESSAGE("skipped: " << cuda_unavailable_reason());
    return;
  }
  // Sizes span several chunks and leave vector tails; one f32 param sits at a 4-byte offset (the
  // kernel's unaligned path).
  struct Spec {
    std::string name;
    Shape shape;
    DType dt;
  };
  const std::vector<Spec> specs = {{"wte", Shape{301, 129}, DType::bf16}, {"ln", Shape{37}, DType::f32},
                                   {"lora", Shape{50001}, DType::f32},   {"deep", Shape{3, 333}, DType::f64},
                                   {"tail", Shape{7}, DType::bf16}};
  auto build = [&](Device dev) {
    std::vector<Tensor> ps;
    for (size_t i = 0; i < specs.size(); ++i) ps.push_back(make_param(specs[i].name, specs[i].shape, specs[i].dt, i, dev));
    Tensor big = Tensor::randn(Shape{3, 5}, 77, DType::f32, Device::cpu).to(dev);
    Tensor odd = big.slice0(1, 3);  // 20 bytes in: not 16-byte aligned
    odd.set_requires_grad(true).set_name("odd");
    ps.push_back(odd);
    return ps;
  };
  std::vector<Tensor> pc = build(Device::cpu), pg = build(Device::cuda);
  auto groups_of = [](const std::vector<Tensor>& ps) {
    return std::vector<ParamGroup>{ParamGroup{{ps[0], ps[1], ps[3]}, 1.0, 0.1, "decay"},
                                   ParamGroup{{ps[2], ps[4], ps[5]}, 0.25, 0.0, "other"}};
  };
  AdamW oc(groups_of(pc)), og(groups_of(pg));
  for (int t = 1; t <= 3; ++t) {
    oc.zero_grad();
    og.zero_grad();
    for (size_t i = 0; i < pc.size(); ++i) {
      set_grad(pc[i], 1000 * t + i, 2.0);
      set_grad(pg[i], 1000 * t + i, 2.0);
    }
    const double nc = oc.grad_norm(), ng = og.grad_norm();
    CHECK(ng == doctest::Approx(nc).epsilon(1e-5));
    CHECK(og.grad_norm() == ng);  // deterministic
    const double scale = std::min(1.0, 50.0 / nc);
    oc.step(1e-2, scale);
    og.step(1e-2, scale);
  }
  for (size_t i = 0; i < pc.size(); ++i) {
    CAPTURE(pc[i].name());
    CHECK(pg[i].to_double() == pc[i].to_double());
  }
  auto sc = oc.state_tensors(), sg = og.state_tensors();
  REQUIRE(sc.size() == sg.size());
  for (size_t i = 0; i < sc.size(); ++i) {
    CAPTURE(sc[i].first);
    CHECK(sg[i].second.to_double() == sc[i].second.to_double());
  }
}
