// The op harness (after ggml's test-backend-ops): one table of op cases, each checked (a) by finite
// differences in f64 on the CPU and (b) CPU vs CUDA forward and backward in f32 and bf16. Then
// kernels::gemm's addend apart from C (Cin) and caller's workspace, both backends against a double loop.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "runtime/dispatch.h"
#include "kernels/matmul.h"
#include "runtime/device.h"
#include "runtime/ops.h"
#include "test_util.h"
#ifdef DEEPLORA_HAVE_CUDA
#include "kernels/cuda_check.h"
#endif

using namespace deeplora;
using test::rel_err;

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
  // Intermediate (non-leaf) inputs reach the backward's hand-over and first-write paths: an addend
  // takes the output's gradient, an input used twice gets a write then an add.
  c.push_back({"linear+bias+addend", {F({2, 3, 8}), F({6, 8}), F({6}), F({2, 3, 6})},
               [](auto& x) { return ops::linear(x[0], x[1], x[2], ops::scale(x[3], 1.5)); }});
  c.push_back({"linear, input also the addend", {F({4, 6}), F({6, 6})}, [](auto& x) {
                 Tensor t = ops::scale(x[0], 0.5);
                 return ops::linear(t, x[1], Tensor(), t);
               }});
  c.push_back({"add chain with a repeated input", {F({3, 5}), F({3, 5})}, [](auto& x) {
                 Tensor a = ops::scale(x[0], 2.0), b = ops::mul(x[1], x[1]);
                 Tensor s = ops::add(a, a);
                 return ops::add(ops::add(s, b), ops::mul(a, b));
               }});
  c.push_back({"matmul of an intermediate with itself", {F({5, 5})}, [](auto& x) {
                 Tensor a = ops::scale(x[0], 0.5);
                 return ops::matmul(a, a, false, true);
               }});
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
  // The input also feeds a scale whose backward runs first: layernorm and gelu then add into an existing
  // gradient (the plain cases write a fresh one).
  // (Recorded in statement order: the scale after, so its backward runs before.)
  c.push_back({"layernorm into an existing gradient", {F({3, 16}, 2.0), F({16}), F({16})}, [](auto& x) {
                 Tensor l = ops::layernorm(x[0], x[1], x[2]);
                 Tensor t = ops::scale(x[0], 0.3);
                 return ops::add(l, t);
               }, 1e-5});
  c.push_back({"gelu into an existing gradient", {F({4, 9}, 2.0)}, [](auto& x) {
                 Tensor g = ops::gelu(x[0]);
                 Tensor t = ops::scale(x[0], -0.4);
                 return ops::add(g, t);
               }});
  c.push_back({"attention into an existing gradient (hd=64)", {F({2, 40, 3 * 128})}, [](auto& x) {
                 Tensor o = ops::attention(x[0], 2);
                 Tensor t = ops::scale(x[0], 0.3);
                 return ops::add(ops::sum(ops::mul(o, o)), ops::sum(ops::mul(t, t)));
               }, 1e-5});
  // The logits also feed another op, whose backward runs first: cross-entropy then adds into a
  // gradient that exists (the other cases write a fresh one, padding and ignored rows as zeros).
  c.push_back({"cross_entropy into an existing gradient", {F({6, 16}, 3.0), I({6}, 11, true)}, [](auto& x) {
                 Tensor ce = ops::cross_entropy(x[0], x[1], -100, 11);  // f32 for bf16 logits
                 return ops::add(ce, ops::cast(ops::mean(ops::scale(x[0], 0.3)), ce.dtype()));
               }});
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

// ---------------------------------------------------------------------------------------------
// kernels::gemm with the addend apart from C (Gemm::Cin) and a caller's workspace

namespace {

using kernels::Gemm;

// C = alpha op(A) op(B) + beta Cin (+ bias). Leading dimensions are padded by 3 and batch entries
// 5 elements apart, so reads and writes outside the live elements show.
struct GemmCase {
  enum class In { apart, alias, unset };  // Cin another buffer, Cin == C, Cin null
  std::string name;
  bool ta = false, tb = false;
  int64_t M = 0, N = 0, K = 0, batch = 1;
  double alpha = 1.0, beta = 1.0;
  In cin = In::apart;
  bool bias = false;
};

std::vector<GemmCase> gemm_cases() {
  using In = GemmCase::In;
  std::vector<GemmCase> c;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      c.push_back({fmt::format("apart ta={} tb={}", ta, tb), bool(ta), bool(tb), 5, 7, 9, 1, -0.3, 1.0});
      c.push_back({fmt::format("apart batched ta={} tb={}", ta, tb), bool(ta), bool(tb), 6, 4, 11, 3, 0.8, -0.6});
    }
  c.push_back({"apart batched +bias", false, true, 7, 5, 8, 2, 1.0, 0.5, In::apart, true});
  c.push_back({"apart beta=0 ignores Cin", false, false, 4, 3, 5, 1, 1.0, 0.0});
  c.push_back({"alias sgd-like (alpha=-lr, beta=1)", false, false, 6, 9, 4, 2, -0.01, 1.0, In::alias});
  c.push_back({"alias ta tb +bias", true, true, 5, 6, 7, 1, 0.7, 0.25, In::alias, true});
  c.push_back({"unset batched", true, false, 4, 5, 6, 2, 1.5, 0.5, In::unset});
  c.push_back({"K=0 apart batched", false, false, 4, 6, 0, 3, 1.0, 0.7});
  c.push_back({"K=0 apart +bias", true, true, 3, 5, 0, 1, 1.0, -2.0, In::apart, true});
  c.push_back({"K=0 alias batched", false, false, 5, 4, 0, 2, 1.0, 0.5, In::alias});
  c.push_back({"K=0 beta=0 ignores Cin", false, false, 3, 4, 0, 2, 1.0, 0.0, In::apart, true});
  // Work >= 2^22 splits the CPU product over threads by rows; N > 256 spans two column tiles.
  c.push_back({"apart large ta tb", true, true, 64, 300, 220, 1, -0.5, 1.0});
  return c;
}

struct GemmBuffers {
  Tensor A, B, C, Cin, bias;                      // flat, on the device of the product
  std::vector<double> a, b, c0, cin0, bias0;      // their stored values before it
  int64_t lda = 0, ldb = 0, ldc = 0, sA = 0, sB = 0, sC = 0;
};

// n random values stored in dt (vals: what was stored), or n NaNs.
Tensor stored(std::vector<double>& vals, int64_t n, uint64_t seed, DType dt, Device dev) {
  Tensor t = Tensor::randn(Shape{n}, seed, DType::f64).to(dt);
  vals = t.to_double();
  return t.to(dev);
}
Tensor nans(std::vector<double>& vals, int64_t n, DType dt, Device dev) {
  vals.assign(size_t(n), NAN);
  return Tensor::full(Shape{n}, NAN, dt, dev);
}

GemmBuffers gemm_buffers(const GemmCase& k, DType dt, Device dev, uint64_t seed) {
  GemmBuffers b;
  const int64_t ar = k.ta ? k.K : k.M, ac = k.ta ? k.M : k.K, br = k.tb ? k.N : k.K, bc = k.tb ? k.K : k.N;
  const int64_t gap = k.batch > 1 ? 5 : 0;
  b.lda = ac + 3, b.ldb = bc + 3, b.ldc = k.N + 3;
  b.sA = ar * b.lda + gap, b.sB = br * b.ldb + gap, b.sC = k.M * b.ldc + gap;
  auto extent = [&](int64_t rows, int64_t ld, int64_t stride) { return (k.batch - 1) * stride + rows * ld; };
  if (k.K > 0) {  // K == 0 passes null A and B: nothing may read them
    b.A = stored(b.a, extent(ar, b.lda, b.sA), seed, dt, dev);
    b.B = stored(b.b, extent(br, b.ldb, b.sB), seed + 1, dt, dev);
  }
  const int64_t nc = extent(k.M, b.ldc, b.sC);
  if (k.cin == GemmCase::In::apart) {
    b.C = nans(b.c0, nc, dt, dev);  // output only: every live element must be written
    b.Cin = k.beta != 0.0 ? stored(b.cin0, nc, seed + 2, dt, dev) : nans(b.cin0, nc, dt, dev);
  } else {
    b.C = stored(b.c0, nc, seed + 2, dt, dev);
    b.cin0 = b.c0;
  }
  if (k.bias) b.bias = stored(b.bias0, k.N, seed + 3, dt, dev);
  return b;
}

Gemm gemm_of(const GemmCase& k, DType dt, const GemmBuffers& b, void* workspace) {
  auto ptr = [](const Tensor& t) -> void* { return t.defined() ? t.data() : nullptr; };
  Gemm g;
  g.dt = dt, g.ta = k.ta, g.tb = k.tb, g.M = k.M, g.N = k.N, g.K = k.K, g.alpha = k.alpha, g.beta = k.beta;
  g.A = ptr(b.A), g.lda = b.lda, g.strideA = b.sA;
  g.B = ptr(b.B), g.ldb = b.ldb, g.strideB = b.sB;
  g.C = ptr(b.C), g.ldc = b.ldc, g.strideC = b.sC;
  g.batch = k.batch;
  g.bias = ptr(b.bias);
  g.Cin = k.cin == GemmCase::In::apart ? ptr(b.Cin) : k.cin == GemmCase::In::alias ? ptr(b.C) : nullptr;
  g.workspace = workspace;
  return g;
}

// rel: the largest |C - reference| over the live elements over the largest |reference| (NaN if
// any is NaN); stray: elements outside them that changed (C's padding and gaps, any of an apart Cin).
struct GemmErr {
  double rel = 0;
  int64_t stray = 0;
};
GemmErr gemm_error(const GemmCase& k, const GemmBuffers& b) {
  const std::vector<double> c = b.C.to_double();
  std::vector<char> live(c.size(), 0);
  double err = 0, top = 0;
  for (int64_t bi = 0; bi < k.batch; ++bi)
    for (int64_t i = 0; i < k.M; ++i)
      for (int64_t j = 0; j < k.N; ++j) {
        double ref = 0;
        for (int64_t q = 0; q < k.K; ++q)
          ref += b.a[size_t(bi * b.sA + (k.ta ? q * b.lda + i : i * b.lda + q))] *
                 b.b[size_t(bi * b.sB + (k.tb ? j * b.ldb + q : q * b.ldb + j))];
        ref *= k.alpha;
        const size_t at = size_t(bi * b.sC + i * b.ldc + j);
        if (k.beta != 0.0) ref += k.beta * b.cin0[at];
        if (k.bias) ref += b.bias0[size_t(j)];
        const double e = std::abs(c[at] - ref);
        if (!(e <= err)) err = e;  // a NaN sticks
        top = std::max(top, std::abs(ref));
        live[at] = 1;
      }
  auto same = [](double x, double y) { return x == y || (std::isnan(x) && std::isnan(y)); };
  GemmErr r;
  r.rel = err / std::max(top, 1e-30);
  for (size_t q = 0; q < c.size(); ++q)
    if (!live[q] && !same(c[q], b.c0[q])) ++r.stray;
  if (k.cin == GemmCase::In::apart) {
    const std::vector<double> cin = b.Cin.to_double();
    for (size_t q = 0; q < cin.size(); ++q)
      if (!same(cin[q], b.cin0[q])) ++r.stray;
  }
  return r;
}

// Against a double loop: f64 to rounding, f32 strict FP32 on the GPU, bf16 its output rounding.
double gemm_tol(DType dt) { return dt == DType::f64 ? 1e-12 : dt == DType::f32 ? 1e-5 : 1e-2; }

void check_gemm_case(const GemmCase& k, DType dt, const GemmBuffers& b, const char* where) {
  const GemmErr e = gemm_error(k, b);
  CHECK_MESSAGE(e.rel <= gemm_tol(dt), fmt::format("{} {} {}: relative error {:.3g} > {}", where, k.name,
                                                   dtype_name(dt), e.rel, gemm_tol(dt)));
  CHECK_MESSAGE(e.stray == 0, fmt::format("{} {} {}: {} elements outside the product changed", where, k.name,
                                          dtype_name(dt), e.stray));
}

}  // namespace

TEST_CASE("gemm: Cin (the addend apart from C) on the CPU against a double loop") {
  int n = 0;
  for (DType dt : {DType::f64, DType::f32, DType::bf16})
    for (const GemmCase& k : gemm_cases()) {
      CAPTURE(k.name);
      CAPTURE(dtype_name(dt));
      GemmBuffers b = gemm_buffers(k, dt, Device::cpu, 1000 + 10 * uint64_t(n));
      kernels::cpu::gemm(gemm_of(k, dt, b, nullptr), nullptr);
      check_gemm_case(k, dt, b, "cpu");
      ++n;
    }
  // The CPU has no workspace and ignores one given.
  CHECK(kernels::cpu::gemm_workspace_bytes() == 0);
  const GemmCase k = gemm_cases()[1];
  GemmBuffers b = gemm_buffers(k, DType::f32, Device::cpu, 7), w = gemm_buffers(k, DType::f32, Device::cpu, 7);
  std::vector<double> junk(4);
  kernels::cpu::gemm(gemm_of(k, DType::f32, b, nullptr), nullptr);
  kernels::cpu::gemm(gemm_of(k, DType::f32, w, junk.data()), nullptr);
  check_gemm_case(k, DType::f32, w, "cpu, workspace given");
  const std::vector<double> cw = w.C.to_double(), cb = b.C.to_double();
  auto same = [](double x, double y) { return x == y || (std::isnan(x) && std::isnan(y)); };
  CHECK(std::equal(cw.begin(), cw.end(), cb.begin(), same));
  MESSAGE(fmt::format("gemm Cin: {} CPU cases checked", n));
}

TEST_CASE("gemm: Cin and a caller's workspace on CUDA against a double loop (and two streams at once)") {
  if (!cuda_available()) {
    MESSAGE("skipped the CUDA gemm Cin/workspace checks: " << cuda_unavailable_reason());
    return;
  }
#ifdef DEEPLORA_HAVE_CUDA
  const size_t wsb = kernels::cuda::gemm_workspace_bytes();
  CHECK(wsb > 0);
  CHECK(wsb == cuda_ctx().lt_workspace_bytes);
  auto workspace = [&] { return Tensor::empty(Shape{int64_t((wsb + 7) / 8)}, DType::f64, Device::cuda); };
  Tensor ws = workspace();
  int n = 0;
  for (DType dt : {DType::f64, DType::f32, DType::bf16})
    for (const GemmCase& k : gemm_cases())
      for (bool own_ws : {false, true}) {
        CAPTURE(k.name);
        CAPTURE(dtype_name(dt));
        CAPTURE(own_ws);
        GemmBuffers b = gemm_buffers(k, dt, Device::cuda, 1000 + 10 * uint64_t(n / 2));
        kernels::cuda::gemm(gemm_of(k, dt, b, own_ws ? ws.data() : nullptr), cuda_ctx().stream);
        check_gemm_case(k, dt, b, own_ws ? "cuda, own workspace" : "cuda");
        ++n;
      }
  {
    const GemmCase k = gemm_cases()[0];
    GemmBuffers b = gemm_buffers(k, DType::f32, Device::cuda, 5);
    CHECK_THROWS_AS(kernels::cuda::gemm(gemm_of(k, DType::f32, b, static_cast<char*>(ws.data()) + 16),
                                        cuda_ctx().stream),
                    std::invalid_argument);
  }
  // Two long-K products (split-K wants workspace) on two streams at once, each with its own workspace,
  // relaunched a few times; both results must still be right.
  const std::vector<GemmCase> pair{{"stream 0", false, true, 64, 64, 16384, 1, -0.25, 1.0},
                                   {"stream 1", true, false, 96, 48, 12288, 1, 0.5, 0.5}};
  Tensor ws2 = workspace();
  cudaStream_t st[2] = {nullptr, nullptr};
  for (auto& s : st) CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (DType dt : {DType::f32, DType::bf16}) {
    CAPTURE(dtype_name(dt));
    GemmBuffers b[2] = {gemm_buffers(pair[0], dt, Device::cuda, 31), gemm_buffers(pair[1], dt, Device::cuda, 37)};
    cuda_sync();  // inputs are written on the context's stream
    for (int rep = 0; rep < 4; ++rep)
      for (int i = 0; i < 2; ++i) kernels::cuda::gemm(gemm_of(pair[i], dt, b[i], (i ? ws2 : ws).data()), st[i]);
    for (auto& s : st) CUDA_CHECK(cudaStreamSynchronize(s));
    for (int i = 0; i < 2; ++i) check_gemm_case(pair[i], dt, b[i], "cuda, two streams");
  }
  for (auto& s : st) CUDA_CHECK(cudaStreamDestroy(s));
  MESSAGE(fmt::format("gemm Cin/workspace: {} CUDA cases checked", n));
#endif
}
