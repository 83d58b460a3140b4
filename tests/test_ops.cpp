// The op harness (after ggml's test-backend-ops): one table of op cases, each checked (a) by finite
// differences in f64 on the CPU and (b) CPU vs CUDA forward and backward in f32 and bf16.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "runtime/device.h"
#include "runtime/ops.h"

using namespace deeplora;

namespace {

struct Input {
  Shape shape;
  bool is_int = false;  // token ids in [0, range), a few set to -100 when with_ignore
  int64_t range = 0;
  bool with_ignore = false;
  double scale = 1.0;  // stddev of float inputs
};

struct OpCase {
  std::string name;
  std::vector<Input> inputs;
  std::function<Tensor(const std::vector<Tensor>&)> fn;
  double grad_tol = 1e-6;  // relative, f64 finite differences
  double bf16_tol = 1e-2;
  double fd_step = 1e-6;  // larger where the op rounds (casts)
};

Input F(Shape s, double scale = 1.0) { return Input{s, false, 0, false, scale}; }
Input I(Shape s, int64_t range, bool ignore = false) { return Input{s, true, range, ignore, 1.0}; }

std::vector<OpCase> op_cases() {
  std::vector<OpCase> c;
  c.push_back({"add", {F({3, 4}), F({3, 4})}, [](auto& x) { return ops::add(x[0], x[1]); }});
  c.push_back({"mul", {F({2, 3, 5}), F({2, 3, 5})}, [](auto& x) { return ops::mul(x[0], x[1]); }});
  c.push_back({"scale", {F({7})}, [](auto& x) { return ops::scale(x[0], -0.7); }});
  c.push_back({"gelu", {F({4, 33}, 2.0)}, [](auto& x) { return ops::gelu(x[0]); }});
  c.push_back({"sum", {F({5, 6})}, [](auto& x) { return ops::sum(x[0]); }});
  c.push_back({"mean", {F({1000})}, [](auto& x) { return ops::mean(x[0]); }});
  c.push_back({"reshape", {F({2, 6})}, [](auto& x) { return ops::reshape(x[0], Shape{3, 4}); }});
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      const int64_t M = 5, K = 7, N = 3;
      Shape sa = ta ? Shape{K, M} : Shape{M, K}, sb = tb ? Shape{N, K} : Shape{K, N};
      c.push_back({fmt::format("matmul ta={} tb={}", ta, tb), {F(sa), F(sb)},
                   [ta, tb](auto& x) { return ops::matmul(x[0], x[1], ta, tb); }});
      Shape ba = ta ? Shape{2, K, M} : Shape{2, M, K}, bb = tb ? Shape{2, N, K} : Shape{2, K, N};
      c.push_back({fmt::format("matmul batched ta={} tb={}", ta, tb), {F(ba), F(bb)},
                   [ta, tb](auto& x) { return ops::matmul(x[0], x[1], ta, tb); }});
    }
  c.push_back({"linear+bias", {F({2, 3, 8}), F({6, 8}), F({6})},
               [](auto& x) { return ops::linear(x[0], x[1], x[2]); }});
  c.push_back({"linear", {F({4, 16}), F({12, 16})}, [](auto& x) { return ops::linear(x[0], x[1]); }});
  c.push_back({"layernorm", {F({3, 4, 16}, 2.0), F({16}), F({16})},
               [](auto& x) { return ops::layernorm(x[0], x[1], x[2]); }, 1e-5});
  c.push_back({"embedding", {I({2, 5}, 11), F({11, 8}), F({7, 8})},
               [](auto& x) { return ops::embedding(x[0], x[1], x[2]); }});
  c.push_back({"embedding no wpe", {I({3, 4}, 6), F({6, 5})}, [](auto& x) { return ops::embedding(x[0], x[1]); }});
  c.push_back({"attention", {F({2, 6, 3 * 12})}, [](auto& x) { return ops::attention(x[0], 3); }, 1e-5});
  c.push_back({"attention 1 head T=1", {F({3, 1, 3 * 8})}, [](auto& x) { return ops::attention(x[0], 1); }, 1e-5});
  // Head size 64 reaches the fused (flash) CUDA kernels in bf16; T = 100 and 1 exercise the tails.
  c.push_back({"attention hd=64 T=100", {F({2, 100, 3 * 128})}, [](auto& x) { return ops::attention(x[0], 2); }, 1e-5});
  c.push_back({"attention hd=64 T=1", {F({2, 1, 3 * 64})}, [](auto& x) { return ops::attention(x[0], 1); }, 1e-5});
  c.push_back({"cross_entropy", {F({2, 5, 13}, 3.0), I({2, 5}, 13, true)},
               [](auto& x) { return ops::cross_entropy(x[0], x[1]); }});
  c.push_back({"cross_entropy padded classes", {F({6, 16}, 3.0), I({6}, 11, true)},
               [](auto& x) { return ops::cross_entropy(x[0], x[1], -100, 11); }});
  c.push_back({"cast f64->f32->f64", {F({9})},
               [](auto& x) { return ops::cast(ops::cast(x[0], DType::f32), x[0].dtype()); }, 1e-4, 1e-2, 1e-2});
  return c;
}

// Inputs drawn in f64 on the CPU from a per-case seed, then converted.
std::vector<Tensor> make_inputs(const OpCase& c, uint64_t seed, DType dt, Device dev, bool grads) {
  std::vector<Tensor> xs;
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    const Input& in = c.inputs[i];
    if (in.is_int) {
      std::vector<int32_t> v(in.shape.numel());
      uint64_t s = seed * 7919 + i;
      for (size_t j = 0; j < v.size(); ++j) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        v[j] = int32_t((s >> 33) % uint64_t(in.range));
        if (in.with_ignore && j % 4 == 1) v[j] = -100;
      }
      xs.push_back(Tensor::from_ints(v, in.shape, dev));
    } else {
      Tensor t = Tensor::randn(in.shape, seed * 131 + i, DType::f64, Device::cpu, in.scale).to(dt).to(dev);
      if (grads) t.set_requires_grad(true);
      xs.push_back(t);
    }
  }
  return xs;
}

// A scalar loss with a fixed random weighting, so every output element gets a distinct gradient.
Tensor weighted_loss(const Tensor& y, uint64_t seed) {
  if (y.numel() == 1) return ops::sum(y);
  Tensor w = Tensor::randn(y.shape(), seed, DType::f64, Device::cpu).to(y.dtype()).to(y.device());
  return ops::sum(ops::mul(y, w));
}

double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

int g_gradchecks = 0, g_devchecks = 0, g_skipped = 0;

}  // namespace

TEST_CASE("op harness: finite-difference gradient check in f64 on the CPU") {
  for (const OpCase& c : op_cases()) {
    CAPTURE(c.name);
    const uint64_t seed = std::hash<std::string>{}(c.name) % 100000;
    auto xs = make_inputs(c, seed, DType::f64, Device::cpu, true);
    Tensor y = c.fn(xs);
    Tensor loss = weighted_loss(y, seed + 1);
    backward(loss);
    for (size_t i = 0; i < xs.size(); ++i) {
      if (c.inputs[i].is_int) continue;
      CAPTURE(i);
      REQUIRE(xs[i].grad().defined());
      std::vector<double> full = xs[i].grad().to_double();
      // Finite differences on at most 256 evenly spaced elements (large cases exist for the fused
      // GPU kernels' paths; every element of the small ones).
      const size_t n = full.size(), stride = std::max<size_t>(1, n / 256);
      std::vector<size_t> idx;
      for (size_t j = 0; j < n; j += stride) idx.push_back(j);
      std::vector<double> analytic, numeric(idx.size());
      for (size_t j : idx) analytic.push_back(full[j]);
      const double h = c.fd_step;
      double* p = xs[i].data_as<double>();
      for (size_t q = 0; q < idx.size(); ++q) {
        const size_t j = idx[q];
        NoGrad ng;
        const double orig = p[j];
        p[j] = orig + h;
        double fp = weighted_loss(c.fn(xs), seed + 1).item();
        p[j] = orig - h;
        double fm = weighted_loss(c.fn(xs), seed + 1).item();
        p[j] = orig;
        numeric[q] = (fp - fm) / (2 * h);
      }
      double err = rel_err(analytic, numeric);
      CHECK_MESSAGE(err <= c.grad_tol, fmt::format("{} input {}: relative error {:.3g}", c.name, i, err));
      ++g_gradchecks;
    }
  }
  MESSAGE(fmt::format("op harness: {} gradient checks over {} op cases", g_gradchecks, op_cases().size()));
}

TEST_CASE("op harness: CPU vs CUDA forward and backward (f32, bf16)") {
  if (!cuda_available()) {
    g_skipped = int(op_cases().size()) * 2;
    MESSAGE("skipped " << g_skipped << " CPU-vs-CUDA cases: " << cuda_unavailable_reason());
    return;
  }
  for (DType dt : {DType::f32, DType::bf16}) {
    const double tol = dt == DType::f32 ? 1e-5 : 1e-2;
    for (const OpCase& c : op_cases()) {
      if (c.name.rfind("cast", 0) == 0 && dt == DType::bf16) continue;
      CAPTURE(c.name);
      CAPTURE(dtype_name(dt));
      const uint64_t seed = std::hash<std::string>{}(c.name) % 100000 + 17;
      std::vector<std::vector<double>> res[2];
      for (Device dev : {Device::cpu, Device::cuda}) {
        auto xs = make_inputs(c, seed, dt, dev, true);
        Tensor y = c.fn(xs);
        res[int(dev)].push_back(y.to_double());
        backward(weighted_loss(y, seed + 1));
        for (size_t i = 0; i < xs.size(); ++i)
          if (!c.inputs[i].is_int) res[int(dev)].push_back(xs[i].grad().to_double());
      }
      for (size_t k = 0; k < res[0].size(); ++k) {
        double err = rel_err(res[1][k], res[0][k]);
        double t = dt == DType::bf16 ? c.bf16_tol : tol;
        CHECK_MESSAGE(err <= t, fmt::format("{} {} {}: relative error {:.3g} > {}", c.name, dtype_name(dt),
                                            k == 0 ? "forward" : fmt::format("grad of input {}", k - 1), err, t));
      }
      ++g_devchecks;
    }
  }
  MESSAGE(fmt::format("op harness: {} CPU-vs-CUDA cases checked", g_devchecks));
}
