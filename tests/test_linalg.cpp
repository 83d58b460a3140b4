// Linear algebra: top-k SVD, orthonormalize, random orthonormal matrices. CPU reference against
// known constructions (A = U diag(s) Vᵀ from orthonormal factors made here), rank-deficient and
// zero inputs, bad input; then cuSOLVER against the CPU reference on the GPU machine.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/device.h"
#include "runtime/linalg.h"
#include "test_util.h"

using namespace deeplora;

namespace {

// Host row-major f64 matrix for the checks (independent of the code under test).
struct HMat {
  int64_t rows = 0, cols = 0;
  std::vector<double> v;
  HMat(int64_t r, int64_t c) : rows(r), cols(c), v(size_t(r * c), 0.0) {}
  double& operator()(int64_t i, int64_t j) { return v[size_t(i * cols + j)]; }
  double operator()(int64_t i, int64_t j) const { return v[size_t(i * cols + j)]; }
};

HMat host(const Tensor& t) {
  REQUIRE(t.ndim() == 2);
  HMat m(t.dim(0), t.dim(1));
  m.v = t.to_double();
  return m;
}

Tensor tensor(const HMat& m, DType dt, Device dev = Device::cpu) {
  return Tensor::from_vector(m.v, Shape{m.rows, m.cols}, dt, dev);
}

HMat mul(const HMat& a, const HMat& b) {
  REQUIRE(a.cols == b.rows);
  HMat c(a.rows, b.cols);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t p = 0; p < a.cols; ++p) {
      double x = a(i, p);
      for (int64_t j = 0; j < b.cols; ++j) c(i, j) += x * b(p, j);
    }
  return c;
}

HMat tr(const HMat& a) {
  HMat t(a.cols, a.rows);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) t(j, i) = a(i, j);
  return t;
}

double fro(const HMat& a) {
  double s = 0;
  for (double x : a.v) s += x * x;
  return std::sqrt(s);
}

double diff(const HMat& a, const HMat& b) {
  REQUIRE(a.rows == b.rows);
  REQUIRE(a.cols == b.cols);
  double s = 0;
  for (size_t i = 0; i < a.v.size(); ++i) s += (a.v[i] - b.v[i]) * (a.v[i] - b.v[i]);
  return std::sqrt(s);
}

// ||QᵀQ - I||_F
double orth_err(const HMat& q) {
  HMat g = mul(tr(q), q);
  for (int64_t i = 0; i < g.rows; ++i) g(i, i) -= 1;
  return fro(g);
}

HMat gaussian(int64_t r, int64_t c, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  HMat m(r, c);
  for (double& x : m.v) x = nd(gen);
  return m;
}

// r x c with orthonormal columns (c <= r): modified Gram-Schmidt, twice.
HMat orthonormal_cols(int64_t r, int64_t c, uint64_t seed) {
  HMat q = gaussian(r, c, seed);
  for (int64_t j = 0; j < c; ++j)
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t p = 0; p < j; ++p) {
        double d = 0;
        for (int64_t i = 0; i < r; ++i) d += q(i, p) * q(i, j);
        for (int64_t i = 0; i < r; ++i) q(i, j) -= d * q(i, p);
      }
      double n = 0;
      for (int64_t i = 0; i < r; ++i) n += q(i, j) * q(i, j);
      n = std::sqrt(n);
      for (int64_t i = 0; i < r; ++i) q(i, j) /= n;
    }
  return q;
}

struct Known {
  HMat A, U, V;
  std::vector<double> s;
};

// A = U diag(s) Vᵀ with U [m, p], V [n, p] orthonormal, p = s.size().
Known known(int64_t m, int64_t n, std::vector<double> s, uint64_t seed) {
  const int64_t p = int64_t(s.size());
  Known k{HMat(m, n), orthonormal_cols(m, p, seed), orthonormal_cols(n, p, seed + 1000), s};
  HMat us = k.U;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < p; ++j) us(i, j) *= s[j];
  k.A = mul(us, tr(k.V));
  return k;
}

HMat first_cols(const HMat& a, int64_t c) {
  HMat b(a.rows, c);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < c; ++j) b(i, j) = a(i, j);
  return b;
}

// ||P_a - P_b||_F for the projectors onto the column spans (sign- and rotation-free).
double subspace_dist(const HMat& a, const HMat& b) { return diff(mul(a, tr(a)), mul(b, tr(b))); }

// U diag(S) Vᵀ
HMat reconstruct(const linalg::Svd& r) {
  HMat u = host(r.U), v = host(r.V);
  std::vector<double> s = r.S.to_double();
  for (int64_t i = 0; i < u.rows; ++i)
    for (int64_t j = 0; j < u.cols; ++j) u(i, j) *= s[size_t(j)];
  return mul(u, tr(v));
}

// The sign convention: in each column of U the entry of largest magnitude is positive.
bool signs_ok(const HMat& u) {
  for (int64_t j = 0; j < u.cols; ++j) {
    int64_t imax = 0;
    for (int64_t i = 1; i < u.rows; ++i)
      if (std::abs(u(i, j)) > std::abs(u(imax, j))) imax = i;
    if (u(imax, j) < 0) return false;
  }
  return true;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return std::string("invalid_argument: ") + e.what();
  } catch (const std::exception& e) {
    return std::string("other: ") + e.what();
  }
  return "";
}

using test::contains;

// Checks one svd_topk result against a known construction with distinct singular values.
void check_known_svd(const linalg::Svd& r, const Known& kn, int64_t k, double tol_s, double tol_orth, double tol_sub) {
  std::vector<double> S = r.S.to_double();
  REQUIRE(int64_t(S.size()) == k);
  for (int64_t j = 0; j < k; ++j) CHECK(std::abs(S[size_t(j)] - kn.s[size_t(j)]) <= tol_s * kn.s[0]);
  HMat U = host(r.U), V = host(r.V);
  CHECK(U.rows == kn.A.rows);
  CHECK(V.rows == kn.A.cols);
  CHECK(orth_err(U) <= tol_orth);
  CHECK(orth_err(V) <= tol_orth);
  CHECK(subspace_dist(U, first_cols(kn.U, k)) <= tol_sub);
  CHECK(subspace_dist(V, first_cols(kn.V, k)) <= tol_sub);
  CHECK(signs_ok(U));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CPU reference

TEST_CASE("linalg: random_orthonormal is orthonormal, sign-fixed and deterministic") {
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{5, 9}, {9, 5}, {7, 7}, {1, 4}, {4, 1}, {40, 130}, {130, 40}}) {
    CAPTURE(m);
    CAPTURE(n);
    Tensor o = linalg::random_orthonormal(m, n, 11, DType::f64);
    REQUIRE(o.shape() == Shape{m, n});
    HMat O = host(o);
    // Orthonormal rows (m <= n) or columns (m > n).
    CHECK(orth_err(m <= n ? tr(O) : O) <= 1e-12);
    // It is the Q of the Gaussian's QR with diag(R) >= 0: R = O Gᵀ (m <= n) or Oᵀ G (m > n) is
    // upper triangular with a non-negative diagonal.
    HMat G = host(Tensor::randn(Shape{m, n}, 11, DType::f64));
    HMat R = m <= n ? mul(O, tr(G)) : mul(tr(O), G);
    for (int64_t i = 0; i < R.rows; ++i) {
      CHECK(R(i, i) >= 0);
      for (int64_t j = 0; j < i; ++j) CHECK(std::abs(R(i, j)) <= 1e-12 * fro(G));
    }
    CHECK(linalg::random_orthonormal(m, n, 11, DType::f64).to_double() == o.to_double());
    if (m * n > 1) CHECK(linalg::random_orthonormal(m, n, 12, DType::f64).to_double() != o.to_double());
  }
  Tensor f = linalg::random_orthonormal(30, 70, 3, DType::f32);
  CHECK(f.dtype() == DType::f32);
  CHECK(orth_err(tr(host(f))) <= 1e-5);
}

TEST_CASE("linalg: orthonormalize of a full-rank matrix is its sign-fixed thin QR") {
  for (DType dt : {DType::f64, DType::f32}) {
    CAPTURE(dtype_name(dt));
    const double tol = dt == DType::f64 ? 1e-12 : 1e-5;
    HMat A = gaussian(50, 8, 5);
    Tensor a = tensor(A, dt);
    int64_t completed = -1;
    Tensor q = linalg::orthonormalize(a, &completed);
    CHECK(completed == 0);
    CHECK(q.dtype() == dt);
    REQUIRE(q.shape() == Shape{50, 8});
    HMat Q = host(q), Af = host(a);
    CHECK(orth_err(Q) <= tol);
    HMat R = mul(tr(Q), Af);
    for (int64_t i = 0; i < R.rows; ++i) {
      CHECK(R(i, i) > 0);
      for (int64_t j = 0; j < i; ++j) CHECK(std::abs(R(i, j)) <= tol * fro(Af));
    }
    CHECK(diff(mul(Q, R), Af) <= tol * fro(Af));
  }
  // Square and single-column edge cases.
  CHECK(orth_err(host(linalg::orthonormalize(tensor(gaussian(6, 6, 1), DType::f64)))) <= 1e-12);
  HMat one = host(linalg::orthonormalize(tensor(gaussian(9, 1, 2), DType::f64)));
  CHECK(std::abs(fro(one) - 1) <= 1e-14);
}

TEST_CASE("linalg: orthonormalize completes rank-deficient input with random directions") {
  HMat A = gaussian(40, 6, 8);
  for (int64_t i = 0; i < A.rows; ++i) {
    A(i, 3) = A(i, 0) + 2 * A(i, 1);  // dependent column
    A(i, 5) = 0;                      // zero column
  }
  int64_t completed = 0;
  Tensor q = linalg::orthonormalize(tensor(A, DType::f64), &completed);
  CHECK(completed == 2);
  HMat Q = host(q);
  CHECK(orth_err(Q) <= 1e-12);
  CHECK(diff(mul(Q, mul(tr(Q), A)), A) <= 1e-12 * fro(A));  // span(A) inside span(Q)
  CHECK(linalg::orthonormalize(tensor(A, DType::f64)).to_double() == q.to_double());  // deterministic

  // All zero: every column is a completion. A zero first column: only it.
  completed = 0;
  Tensor z = linalg::orthonormalize(Tensor::zeros(Shape{10, 4}, DType::f64), &completed);
  CHECK(completed == 4);
  CHECK(orth_err(host(z)) <= 1e-12);
  HMat B = gaussian(12, 3, 9);
  for (int64_t i = 0; i < B.rows; ++i) B(i, 0) = 0;
  Tensor zb = linalg::orthonormalize(tensor(B, DType::f64), &completed);
  CHECK(completed == 1);
  HMat ZB = host(zb);
  CHECK(orth_err(ZB) <= 1e-12);
  CHECK(diff(mul(ZB, mul(tr(ZB), B)), B) <= 1e-12 * fro(B));
  // f32 input: the dependent column is caught at f32's tolerance.
  Tensor qf = linalg::orthonormalize(tensor(A, DType::f32), &completed);
  CHECK(completed == 2);
  CHECK(orth_err(host(qf)) <= 1e-5);
}

TEST_CASE("linalg: svd_topk recovers a known construction (both orientations)") {
  const std::vector<double> s{10, 7, 5, 3, 2, 1, 0.5, 0.1};
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{60, 40}, {40, 60}, {30, 30}, {8, 50}}) {
    CAPTURE(m);
    CAPTURE(n);
    Known kn = known(m, n, s, uint64_t(m * 100 + n));
    for (int64_t k : {int64_t(1), int64_t(5), int64_t(8)}) {
      CAPTURE(k);
      linalg::Svd r = linalg::svd_topk(tensor(kn.A, DType::f64), k);
      CHECK(r.U.dtype() == DType::f64);
      check_known_svd(r, kn, k, 1e-12, 1e-12, 1e-10);
    }
    // f32 input: f32 results (computed in f64 from the rounded input).
    linalg::Svd rf = linalg::svd_topk(tensor(kn.A, DType::f32), 5);
    CHECK(rf.S.dtype() == DType::f32);
    check_known_svd(rf, kn, 5, 1e-5, 1e-5, 1e-4);
  }
}

TEST_CASE("linalg: svd_topk reconstructs rank-k matrices and random ones") {
  Known kn = known(45, 25, {4, 3, 2.5, 1, 0.25}, 21);
  linalg::Svd r = linalg::svd_topk(tensor(kn.A, DType::f64), 5);
  CHECK(diff(reconstruct(r), kn.A) <= 1e-12 * fro(kn.A));
  // Full SVD of a Gaussian matrix: exact reconstruction, descending values, ||S|| = ||A||_F.
  HMat G = gaussian(30, 20, 4);
  linalg::Svd g = linalg::svd_topk(tensor(G, DType::f64), 20);
  CHECK(diff(reconstruct(g), G) <= 1e-12 * fro(G));
  std::vector<double> S = g.S.to_double();
  double ss = 0;
  for (size_t j = 0; j < S.size(); ++j) {
    ss += S[j] * S[j];
    if (j) CHECK(S[j] <= S[j - 1]);
  }
  CHECK(std::abs(std::sqrt(ss) - fro(G)) <= 1e-12 * fro(G));
  CHECK(orth_err(host(g.U)) <= 1e-12);
  CHECK(orth_err(host(g.V)) <= 1e-12);
  CHECK(signs_ok(host(g.U)));
}

TEST_CASE("linalg: svd_topk on rank-deficient and zero matrices keeps U, V orthonormal") {
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{30, 20}, {20, 30}}) {
    CAPTURE(m);
    Known kn = known(m, n, {3, 2, 1}, 31);  // rank 3
    linalg::Svd r = linalg::svd_topk(tensor(kn.A, DType::f64), 6);
    std::vector<double> S = r.S.to_double();
    for (int j = 0; j < 3; ++j) CHECK(std::abs(S[size_t(j)] - kn.s[size_t(j)]) <= 1e-12 * 3);
    for (int j = 3; j < 6; ++j) CHECK(std::abs(S[size_t(j)]) <= 1e-12 * 3);
    HMat U = host(r.U), V = host(r.V);
    CHECK(orth_err(U) <= 1e-12);
    CHECK(orth_err(V) <= 1e-12);
    CHECK(subspace_dist(first_cols(U, 3), kn.U) <= 1e-10);
    CHECK(diff(reconstruct(r), kn.A) <= 1e-12 * fro(kn.A));
  }
  linalg::Svd z = linalg::svd_topk(Tensor::zeros(Shape{7, 5}, DType::f64), 3);
  for (double x : z.S.to_double()) CHECK(x == 0);
  CHECK(orth_err(host(z.U)) <= 1e-12);
  CHECK(orth_err(host(z.V)) <= 1e-12);
}

TEST_CASE("linalg: svd_topk_batched equals one-by-one") {
  std::vector<Tensor> as{tensor(gaussian(12, 7, 1), DType::f64), tensor(gaussian(7, 12, 2), DType::f64),
                         tensor(gaussian(12, 7, 3), DType::f64), tensor(gaussian(9, 9, 4), DType::f32)};
  std::vector<linalg::Svd> b = linalg::svd_topk_batched(as, 4);
  REQUIRE(b.size() == as.size());
  for (size_t i = 0; i < as.size(); ++i) {
    linalg::Svd one = linalg::svd_topk(as[i], 4);
    CHECK(b[i].S.to_double() == one.S.to_double());
    CHECK(b[i].U.to_double() == one.U.to_double());
    CHECK(b[i].V.to_double() == one.V.to_double());
  }
  CHECK(linalg::svd_topk_batched({}, 3).empty());
}

TEST_CASE("linalg: bad input names the routine and the shape") {
  Tensor a = Tensor::randn(Shape{4, 3}, 1, DType::f64);
  std::string e = error_of([&] { linalg::svd_topk(a, 4); });
  CHECK(contains(e, "invalid_argument"));
  CHECK(contains(e, "svd_topk"));
  CHECK(contains(e, "[4, 3]"));
  CHECK(contains(error_of([&] { linalg::svd_topk(a, 0); }), "invalid_argument: svd_topk"));
  CHECK(contains(error_of([&] { linalg::svd_topk(Tensor::randn(Shape{2, 3, 4}, 1, DType::f64), 1); }), "2-D"));
  CHECK(contains(error_of([&] { linalg::svd_topk(Tensor::zeros(Shape{4, 3}, DType::bf16), 1); }), "f32 or f64"));
  CHECK(contains(error_of([&] { linalg::svd_topk(Tensor::from_ints({1, 2, 3, 4}, Shape{2, 2}), 1); }), "f32 or f64"));
  CHECK(contains(error_of([&] { linalg::svd_topk(Tensor(), 1); }), "invalid_argument"));
  Tensor nan = Tensor::from_vector({1, 2, NAN, 4}, Shape{2, 2}, DType::f32);
  e = error_of([&] { linalg::svd_topk(nan, 1); });
  CHECK(contains(e, "invalid_argument"));
  CHECK(contains(e, "non-finite"));
  CHECK(contains(error_of([&] { linalg::orthonormalize(nan); }), "invalid_argument: orthonormalize"));
  e = error_of([&] { linalg::orthonormalize(Tensor::randn(Shape{3, 5}, 1, DType::f64)); });
  CHECK(contains(e, "invalid_argument: orthonormalize"));
  CHECK(contains(e, "[3, 5]"));
  e = error_of([&] { linalg::svd_topk_batched({a, Tensor::randn(Shape{2, 2}, 1, DType::f64)}, 3); });
  CHECK(contains(e, "matrix 1"));
  CHECK(contains(e, "[2, 2]"));
  CHECK(contains(error_of([&] { linalg::random_orthonormal(0, 3, 1, DType::f64); }), "random_orthonormal"));
  CHECK(contains(error_of([&] { linalg::random_orthonormal(3, 3, 1, DType::bf16); }), "random_orthonormal"));
}

// ---------------------------------------------------------------------------------------------
// cuSOLVER against the CPU reference

#define SKIP_WITHOUT_CUDA()                                                \
  if (!cuda_available()) {                                                 \
    MESSAGE("skipped: " << cuda_unavailable_reason());                     \
    return;                                                                \
  }

TEST_CASE("linalg cuda: svd_topk matches the CPU reference") {
  SKIP_WITHOUT_CUDA();
  const std::vector<double> s{10, 8, 6.5, 5, 4, 3, 2, 1.5, 1, 0.5, 0.2, 0.1};
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{60, 40}, {40, 60}, {35, 35}, {12, 100}, {100, 12}, {5, 3}}) {
    for (DType dt : {DType::f64, DType::f32}) {
      CAPTURE(m);
      CAPTURE(n);
      CAPTURE(dtype_name(dt));
      const int64_t p = std::min<int64_t>({m, n, int64_t(s.size())});
      Known kn = known(m, n, std::vector<double>(s.begin(), s.begin() + p), uint64_t(7 * m + n));
      const int64_t k = std::min<int64_t>(p, 6);
      Tensor a = tensor(kn.A, dt);
      linalg::Svd c = linalg::svd_topk(a, k);
      linalg::Svd g = linalg::svd_topk(a.to(Device::cuda), k);
      REQUIRE(g.U.is_cuda());
      CHECK(g.S.dtype() == dt);
      const double tol_s = dt == DType::f64 ? 1e-10 : 1e-4, tol_v = dt == DType::f64 ? 1e-10 : 1e-4;
      std::vector<double> sc = c.S.to_double(), sg = g.S.to_double();
      for (int64_t j = 0; j < k; ++j) CHECK(std::abs(sg[size_t(j)] - sc[size_t(j)]) <= tol_s * sc[0]);
      HMat Ug = host(g.U), Uc = host(c.U), Vg = host(g.V), Vc = host(c.V);
      CHECK(subspace_dist(Ug, Uc) <= tol_v);
      CHECK(subspace_dist(Vg, Vc) <= tol_v);
      // Same sign convention, distinct singular values: the vectors themselves agree.
      CHECK(diff(Ug, Uc) <= tol_v);
      CHECK(diff(Vg, Vc) <= tol_v);
      CHECK(orth_err(Ug) <= (dt == DType::f64 ? 1e-12 : 1e-5));
      CHECK(orth_err(Vg) <= (dt == DType::f64 ? 1e-12 : 1e-5));
    }
  }
}

TEST_CASE("linalg cuda: svd_topk on rank-deficient and zero matrices") {
  SKIP_WITHOUT_CUDA();
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{30, 20}, {20, 30}}) {
    CAPTURE(m);
    Known kn = known(m, n, {3, 2, 1}, 41);
    linalg::Svd g = linalg::svd_topk(tensor(kn.A, DType::f64, Device::cuda), 6);
    std::vector<double> S = g.S.to_double();
    for (int j = 0; j < 3; ++j) CHECK(std::abs(S[size_t(j)] - kn.s[size_t(j)]) <= 1e-10 * 3);
    for (int j = 3; j < 6; ++j) CHECK(std::abs(S[size_t(j)]) <= 1e-6 * 3);  // ~sqrt(eps) s0 via AᵀA
    HMat U = host(g.U), V = host(g.V);
    CHECK(orth_err(U) <= 1e-12);
    CHECK(orth_err(V) <= 1e-12);
    CHECK(subspace_dist(first_cols(U, 3), kn.U) <= 1e-10);
    CHECK(subspace_dist(first_cols(V, 3), kn.V) <= 1e-10);
    // The null part's singular values come out at ~sqrt(eps) * s0 (eigenvalues of AᵀA).
    CHECK(diff(reconstruct(g), kn.A) <= 1e-7 * fro(kn.A));
  }
  linalg::Svd z = linalg::svd_topk(Tensor::zeros(Shape{7, 5}, DType::f32, Device::cuda), 3);
  for (double x : z.S.to_double()) CHECK(x == 0);
  CHECK(orth_err(host(z.U)) <= 1e-5);
  CHECK(orth_err(host(z.V)) <= 1e-5);
}

TEST_CASE("linalg cuda: svd_topk_batched matches the CPU reference") {
  SKIP_WITHOUT_CUDA();
  std::vector<Tensor> as;
  std::vector<Known> kns;
  const std::vector<double> s{5, 4, 3, 2, 1, 0.5};
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{24, 40}, {40, 24}, {24, 40}, {40, 24}, {24, 40}, {16, 16}}) {
    kns.push_back(known(m, n, s, uint64_t(as.size() + 1)));
    as.push_back(tensor(kns.back().A, DType::f64, Device::cuda));
  }
  as.push_back(tensor(kns[0].A, DType::f32, Device::cuda));
  kns.push_back(kns[0]);
  std::vector<linalg::Svd> g = linalg::svd_topk_batched(as, 4);
  REQUIRE(g.size() == as.size());
  for (size_t i = 0; i < as.size(); ++i) {
    CAPTURE(i);
    const bool f64 = as[i].dtype() == DType::f64;
    check_known_svd(g[i], kns[i], 4, f64 ? 1e-10 : 1e-5, f64 ? 1e-12 : 1e-5, f64 ? 1e-10 : 1e-4);
    linalg::Svd c = linalg::svd_topk(as[i].to(Device::cpu), 4);
    CHECK(diff(host(g[i].U), host(c.U)) <= (f64 ? 1e-10 : 1e-4));
  }
}

TEST_CASE("linalg cuda: GPT-2 shapes (768x2304, 3072x768) against a known construction") {
  SKIP_WITHOUT_CUDA();
  // Gradient-like spectrum: 16 dominant values and a flat tail of 48 small ones.
  std::vector<double> s;
  for (int j = 0; j < 16; ++j) s.push_back(100.0 / (1 + j));
  for (int j = 0; j < 48; ++j) s.push_back(0.5 - 0.01 * j);
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{768, 2304}, {3072, 768}}) {
    CAPTURE(m);
    Known kn = known(m, n, s, uint64_t(m + n));
    std::vector<Tensor> as{tensor(kn.A, DType::f32, Device::cuda), tensor(kn.A, DType::f32, Device::cuda)};
    std::vector<linalg::Svd> g = linalg::svd_topk_batched(as, 8);
    for (auto& r : g) {
      std::vector<double> S = r.S.to_double();
      for (int j = 0; j < 8; ++j) CHECK(std::abs(S[size_t(j)] - s[size_t(j)]) <= 1e-5 * s[0]);
      HMat U = host(r.U), V = host(r.V);
      CHECK(orth_err(U) <= 1e-5);
      CHECK(orth_err(V) <= 1e-5);
      CHECK(subspace_dist(U, first_cols(kn.U, 8)) <= 1e-4);
      CHECK(subspace_dist(V, first_cols(kn.V, 8)) <= 1e-4);
      // Residual A V - U diag(S), relative to s0.
      HMat R = mul(kn.A, V);
      for (int64_t i = 0; i < R.rows; ++i)
        for (int64_t j = 0; j < R.cols; ++j) R(i, j) -= U(i, j) * S[size_t(j)];
      CHECK(fro(R) <= 1e-5 * s[0]);
    }
    CHECK(g[0].U.to_double() == g[1].U.to_double());
  }
}

TEST_CASE("linalg cuda: orthonormalize matches the CPU reference") {
  SKIP_WITHOUT_CUDA();
  for (DType dt : {DType::f64, DType::f32}) {
    CAPTURE(dtype_name(dt));
    const double tol = dt == DType::f64 ? 1e-12 : 1e-5;
    Tensor a = tensor(gaussian(70, 9, 6), dt);
    int64_t completed = -1;
    Tensor qg = linalg::orthonormalize(a.to(Device::cuda), &completed);
    CHECK(completed == 0);
    REQUIRE(qg.is_cuda());
    CHECK(diff(host(qg), host(linalg::orthonormalize(a))) <= 10 * tol);
    CHECK(orth_err(host(qg)) <= tol);
  }
  HMat A = gaussian(40, 6, 8);
  for (int64_t i = 0; i < A.rows; ++i) {
    A(i, 3) = A(i, 0) - A(i, 2);
    A(i, 5) = 0;
  }
  int64_t completed = 0;
  HMat Q = host(linalg::orthonormalize(tensor(A, DType::f64, Device::cuda), &completed));
  CHECK(completed == 2);
  CHECK(orth_err(Q) <= 1e-12);
  CHECK(diff(mul(Q, mul(tr(Q), A)), A) <= 1e-12 * fro(A));
}

TEST_CASE("linalg cuda: random_orthonormal matches the CPU reference") {
  SKIP_WITHOUT_CUDA();
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{64, 200}, {200, 64}, {33, 33}, {1, 7}}) {
    for (DType dt : {DType::f64, DType::f32}) {
      CAPTURE(m);
      CAPTURE(n);
      CAPTURE(dtype_name(dt));
      const double tol = dt == DType::f64 ? 1e-12 : 1e-5;
      Tensor g = linalg::random_orthonormal(m, n, 77, dt, Device::cuda);
      REQUIRE(g.is_cuda());
      REQUIRE(g.shape() == Shape{m, n});
      HMat G = host(g);
      CHECK(orth_err(m <= n ? tr(G) : G) <= tol);
      CHECK(diff(G, host(linalg::random_orthonormal(m, n, 77, dt))) <= (dt == DType::f64 ? 1e-10 : 1e-4));
      CHECK(linalg::random_orthonormal(m, n, 77, dt, Device::cuda).to_double() == g.to_double());
    }
  }
}

TEST_CASE("linalg cuda: bad input") {
  SKIP_WITHOUT_CUDA();
  Tensor nan = Tensor::from_vector({1, 2, NAN, 4, 5, 6}, Shape{3, 2}, DType::f32, Device::cuda);
  std::string e = error_of([&] { linalg::svd_topk(nan, 1); });
  CHECK(contains(e, "invalid_argument: svd_topk"));
  CHECK(contains(e, "non-finite"));
  CHECK(contains(error_of([&] { linalg::orthonormalize(nan); }), "invalid_argument: orthonormalize"));
  CHECK(contains(error_of([&] { linalg::svd_topk(nan, 3); }), "[3, 2]"));
}
