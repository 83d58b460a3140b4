// The kernels of the dense-GEMM compressed step (kernels/lowrank_dense.h) against f64 references
// written here, and CPU vs CUDA at the shapes that select their code paths: the mask pass over
// rows longer than one grid row of blocks and with a ragged last word; the K update at k = 10 (the
// paper's), 20, 40 and 64, depths 1 to 5, with lr = 0 (product only).
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "runtime/dispatch.h"
#include "kernels/lowrank_dense.h"
#include "runtime/device.h"
#include "runtime/tensor.h"

using namespace deeplora;

namespace {

std::vector<double> mm(const std::vector<double>& a, bool ta, const std::vector<double>& b, bool tb, int64_t k) {
  std::vector<double> c(size_t(k * k), 0.0);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      double s = 0;
      for (int64_t t = 0; t < k; ++t)
        s += (ta ? a[size_t(t * k + i)] : a[size_t(i * k + t)]) * (tb ? b[size_t(j * k + t)] : b[size_t(t * k + j)]);
      c[size_t(i * k + j)] = s;
    }
  return c;
}
std::vector<double> eye(int64_t k) {
  std::vector<double> e(size_t(k * k), 0.0);
  for (int64_t i = 0; i < k; ++i) e[size_t(i * k + i)] = 1.0;
  return e;
}
double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0, s = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(a[i] - b[i]));
    s = std::max(s, std::abs(b[i]));
  }
  return m / std::max(s, 1e-300);
}

struct KOut {
  std::vector<std::vector<double>> K;
  std::vector<double> Kp;
};

KOut run_k_update(Device dev, DType dt, int64_t k, int64_t L, double lr) {
  std::vector<Tensor> K;
  kernels::KChain ks;
  ks.L = L;
  ks.k = k;
  for (int64_t l = 0; l < L; ++l) {
    K.push_back(Tensor::randn(Shape{k, k}, 100 + uint64_t(l), dt, dev, 1.0 / std::sqrt(double(k))));
    ks.K[l] = K.back().data();
  }
  // ∂f/∂Kp in three partials (summed by the kernel).
  Tensor g = Tensor::randn(Shape{3, k, k}, 99, dt, dev), Kp = Tensor::zeros(Shape{k, k}, dt, dev);
  Tensor w = Tensor::full(Shape{kernels::k_update_work_elems(k, L)}, std::nan(""), dt, dev);  // any content
  DEEPLORA_DISPATCH(dev, lowrank_k_update, dt, ks, g.data(), 3, lr, Kp.data(), w.data(), stream_for(dev));
  KOut o;
  for (auto& t : K) o.K.push_back(t.to_double());
  o.Kp = Kp.to_double();
  return o;
}

// The update in f64 from its definition: ∂f/∂K_l = (K_L⋯K_{l+1})ᵀ·G·(K_{l−1}⋯K_1)ᵀ.
KOut reference_k_update(int64_t k, int64_t L, double lr) {
  std::vector<std::vector<double>> K;
  for (int64_t l = 0; l < L; ++l)
    K.push_back(Tensor::randn(Shape{k, k}, 100 + uint64_t(l), DType::f64, Device::cpu, 1.0 / std::sqrt(double(k))).to_double());
  std::vector<double> parts = Tensor::randn(Shape{3, k, k}, 99, DType::f64, Device::cpu).to_double();
  std::vector<double> g(size_t(k * k), 0.0);
  for (size_t e = 0; e < g.size(); ++e) g[e] = parts[e] + parts[g.size() + e] + parts[2 * g.size() + e];
  KOut o;
  for (int64_t l = 0; l < L; ++l) {
    std::vector<double> suf = eye(k), pre = eye(k);
    for (int64_t m = L - 1; m > l; --m) suf = mm(suf, false, K[size_t(m)], false, k);
    for (int64_t m = l - 1; m >= 0; --m) pre = mm(pre, false, K[size_t(m)], false, k);
    std::vector<double> gl = mm(mm(suf, true, g, false, k), false, pre, true, k), kl = K[size_t(l)];
    for (size_t e = 0; e < kl.size(); ++e) kl[e] -= lr * gl[e];
    o.K.push_back(kl);
  }
  o.Kp = o.K[0];
  for (int64_t l = 1; l < L; ++l) o.Kp = mm(o.K[size_t(l)], false, o.Kp, false, k);
  return o;
}

}  // namespace

TEST_CASE("lowrank_k_update: the inner factors' step and their product against an f64 reference (CPU)") {
  for (int64_t k : {1, 10, 20}) {
    for (int64_t L : {1, 2, 3, 5}) {
      for (double lr : {0.0, 0.3}) {
        CAPTURE(k);
        CAPTURE(L);
        CAPTURE(lr);
        KOut a = run_k_update(Device::cpu, DType::f64, k, L, lr), b = reference_k_update(k, L, lr);
        for (int64_t l = 0; l < L; ++l) CHECK(max_rel(a.K[size_t(l)], b.K[size_t(l)]) <= 1e-13);
        CHECK(max_rel(a.Kp, b.Kp) <= 1e-13);
        KOut f = run_k_update(Device::cpu, DType::f32, k, L, lr);
        CHECK(max_rel(f.Kp, b.Kp) <= 1e-5);
      }
    }
  }
}

TEST_CASE("lowrank_gram_partials and axpy_copy_cols against f64 references (CPU)") {
  const int64_t rows = 203, k = 7, parts = 4;  // chunks of 51, the last one 50 rows
  std::vector<double> X = Tensor::randn(Shape{rows, k}, 1, DType::f64, Device::cpu).to_double();
  std::vector<double> Y = Tensor::randn(Shape{rows, k}, 2, DType::f64, Device::cpu).to_double();
  std::vector<double> out(size_t(parts * k * k), -1.0);
  kernels::cpu::lowrank_gram_partials(DType::f64, X.data(), Y.data(), rows, k, parts, out.data(), nullptr);
  std::vector<double> total(size_t(k * k), 0.0), sum(size_t(k * k), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) total[size_t(i * k + j)] += X[size_t(r * k + i)] * Y[size_t(r * k + j)];
  for (int64_t b = 0; b < parts; ++b)
    for (int64_t e = 0; e < k * k; ++e) sum[size_t(e)] += out[size_t(b * k * k + e)];
  CHECK(max_rel(sum, total) <= 1e-13);
  // More parts than rows: the empty chunks are zero.
  std::vector<double> few(size_t(5 * k * k), -1.0);
  kernels::cpu::lowrank_gram_partials(DType::f64, X.data(), Y.data(), 3, k, 5, few.data(), nullptr);
  for (int64_t e = 3 * k * k; e < 5 * k * k; ++e) CHECK(few[size_t(e)] == 0.0);
  std::vector<double> p = X, dst(size_t(rows * (k + 2)), 5.0);
  kernels::cpu::axpy_copy_cols(DType::f64, p.data(), Y.data(), 0.5, rows, k, dst.data(), k + 2, nullptr);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < k + 2; ++c) {
      const double want = X[size_t(r * k + std::min(c, k - 1))] - 0.5 * Y[size_t(r * k + std::min(c, k - 1))];
      if (c < k) {
        CHECK(p[size_t(r * k + c)] == want);
        CHECK(dst[size_t(r * (k + 2) + c)] == want);
      } else {
        CHECK(dst[size_t(r * (k + 2) + c)] == 5.0);
      }
    }
}

TEST_CASE("mask_scale_rows: scales the observed entries, zeroes the rest (inf and NaN included)") {
  const int64_t rows = 3, cols = 37, words = kernels::mask_words(cols);  // a ragged last word
  REQUIRE(words == 2);
  std::vector<uint32_t> bits(size_t(5 * words), 0);
  auto set = [&](int64_t i, int64_t j) { bits[size_t(i * words + j / 32)] |= 1u << (j % 32); };
  set(2, 0);
  set(2, 31);
  set(3, 32);
  set(3, 36);
  set(4, 5);
  std::vector<double> R(size_t(rows * 40), 2.0);  // ld 40 > cols: the padding stays untouched
  R[size_t(0 * 40 + 1)] = std::numeric_limits<double>::quiet_NaN();
  R[size_t(1 * 40 + 36)] = std::numeric_limits<double>::infinity();  // observed: kept as inf
  R[size_t(1 * 40 + 35)] = std::numeric_limits<double>::infinity();  // unobserved: 0
  kernels::cpu::mask_scale_rows(DType::f64, bits.data(), 2, rows, cols, 0.5, R.data(), 40, nullptr);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < 40; ++j) {
      CAPTURE(i);
      CAPTURE(j);
      const double v = R[size_t(i * 40 + j)];
      if (j >= cols) CHECK(v == 2.0);
      else if ((i == 0 && (j == 0 || j == 31)) || (i == 1 && j == 32) || (i == 2 && j == 5)) CHECK(v == 1.0);
      else if (i == 1 && j == 36) CHECK(std::isinf(v));
      else CHECK(v == 0.0);
    }
}

TEST_CASE("lowrank_dense kernels: CPU vs CUDA at their real shapes (f64, f32)") {
  if (!cuda_available()) {
    MESSAGE("skipped the CPU-vs-CUDA lowrank_dense checks: " << cuda_unavailable_reason());
    return;
  }
  for (DType dt : {DType::f64, DType::f32}) {
    const std::string dname = dtype_name(dt);
    CAPTURE(dname);
    const double tol = dt == DType::f64 ? 1e-13 : 1e-5;
    // k = 64, L = 5 does not fit in shared memory: the work-buffer path.
    for (int64_t k : {10, 20, 40, 64})
      for (int64_t L : {1, 2, 3, 5})
        for (double lr : {0.0, 0.3}) {
          CAPTURE(k);
          CAPTURE(L);
          CAPTURE(lr);
          KOut a = run_k_update(Device::cpu, dt, k, L, lr), b = run_k_update(Device::cuda, dt, k, L, lr);
          for (int64_t l = 0; l < L; ++l) CHECK(max_rel(b.K[size_t(l)], a.K[size_t(l)]) <= tol);
          CHECK(max_rel(b.Kp, a.Kp) <= tol);
        }
    // Gram partials at the dense step's shapes (d = 2000 in 31 parts; k = 10, 40), and the B update.
    for (int64_t k : {10, 40}) {
      const int64_t rows = 2000, parts = kernels::gram_parts(rows);
      Tensor X0 = Tensor::randn(Shape{rows, k}, 11, dt, Device::cpu), Y0 = Tensor::randn(Shape{rows, k}, 12, dt, Device::cpu);
      std::vector<double> g[2], pv[2], dv[2];
      for (Device dev : {Device::cpu, Device::cuda}) {
        Tensor X = X0.to(dev), Y = Y0.to(dev), o = Tensor::zeros(Shape{parts, k, k}, dt, dev);
        DEEPLORA_DISPATCH(dev, lowrank_gram_partials, dt, X.data(), Y.data(), rows, k, parts, o.data(), stream_for(dev));
        g[int(dev)] = o.to_double();
        Tensor P = Tensor::from_vector(X0.to_double(), X0.shape(), dt, dev), D = Tensor::zeros(Shape{rows, k + 3}, dt, dev);
        DEEPLORA_DISPATCH(dev, axpy_copy_cols, dt, P.data(), Y.data(), 0.25, rows, k, D.data(), k + 3, stream_for(dev));
        pv[int(dev)] = P.to_double();
        dv[int(dev)] = D.to_double();
      }
      CHECK(max_rel(g[1], g[0]) <= tol);
      CHECK(max_rel(pv[1], pv[0]) <= tol);  // p − lr·g: one rounding apart (the GPU contracts to an fma)
      CHECK(max_rel(dv[1], dv[0]) <= tol);
    }
    // The mask pass: 5000 columns (more than 16 blocks of 256 per row), 300 rows from row 40 of a
    // 400-row mask, a random quarter observed.
    const int64_t rows = 300, cols = 5000, words = kernels::mask_words(cols), ld = 5003;
    std::vector<int32_t> bits(size_t(400 * words));
    uint64_t x = 7;
    for (auto& b : bits) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      b = int32_t(uint32_t(x >> 32) & uint32_t(x >> 16));  // ~1/4 of the bits
    }
    Tensor R0 = Tensor::randn(Shape{rows, ld}, 5, dt, Device::cpu);
    std::vector<double> out[2];
    for (Device dev : {Device::cpu, Device::cuda}) {
      Tensor b = Tensor::from_ints(bits, Shape{400, words}, dev);
      Tensor R = Tensor::from_vector(R0.to_double(), R0.shape(), dt, dev);  // a fresh copy on each device
      DEEPLORA_DISPATCH(dev, mask_scale_rows, dt, reinterpret_cast<const uint32_t*>(b.data()), 40, rows, cols, 0.25,
                        R.data(), ld, stream_for(dev));
      out[int(dev)] = R.to_double();
    }
    CHECK(out[0] == out[1]);
  }
}
