// Linear algebra entry points and the float64 CPU reference: Householder QR and one-sided Jacobi
// SVD (Hestenes) of the QR's R factor. Jacobi is slow (O(n^3) per sweep) but accurate to working
// precision in every singular triplet, which is what a reference is for.
#include "runtime/linalg.h"

#include <fmt/format.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <numbers>
#include <numeric>
#include <stdexcept>

namespace deeplora::linalg {
namespace detail {

double dtype_eps(DType dt) { return dt == DType::f64 ? DBL_EPSILON : double(FLT_EPSILON); }

void check_matrix(const Tensor& A, const char* op) {
  check(A.defined(), op, "undefined tensor");
  check(A.ndim() == 2, op, fmt::format("expected a 2-D matrix, got {}", A.desc()));
  check(A.dtype() == DType::f32 || A.dtype() == DType::f64, op,
        fmt::format("expected f32 or f64, got {}", A.desc()));
  check(A.dim(0) >= 1 && A.dim(1) >= 1, op, fmt::format("empty matrix {}", A.desc()));
  if (A.is_cuda()) return;
  const int64_t n = A.numel();
  bool finite = true;
  if (A.dtype() == DType::f32) {
    const float* p = A.data_as<float>();
    for (int64_t i = 0; i < n && finite; ++i) finite = std::isfinite(p[i]);
  } else {
    const double* p = A.data_as<double>();
    for (int64_t i = 0; i < n && finite; ++i) finite = std::isfinite(p[i]);
  }
  check(finite, op, fmt::format("{} has non-finite entries (NaN or Inf)", A.desc()));
}

namespace {

// splitmix64: the completion directions depend only on (seed, column, row).
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

double gauss(uint64_t seed, uint64_t col, uint64_t row) {
  uint64_t a = mix(seed ^ mix(col * 0x632be59bd9b4e019ull + row));
  uint64_t b = mix(a);
  double u1 = (double(a >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
  double u2 = double(b >> 11) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

double dot(const double* x, const double* y, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// x -= (q . x) q for each listed unit column q, twice (classical Gram-Schmidt needs the second pass).
void project_out(double* x, const std::vector<double>& Q, int64_t m, const std::vector<int64_t>& cols) {
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t c : cols) {
      const double* q = Q.data() + c * m;
      double d = dot(q, x, m);
      for (int64_t i = 0; i < m; ++i) x[i] -= d * q[i];
    }
}

// A seeded random unit vector orthogonal to the listed columns. Needs cols.size() < m.
void random_unit_orthogonal(double* x, const std::vector<double>& Q, int64_t m,
                            const std::vector<int64_t>& cols, uint64_t seed, uint64_t col) {
  for (uint64_t attempt = 0; attempt < 64; ++attempt) {
    for (int64_t i = 0; i < m; ++i) x[i] = gauss(seed + attempt * 0x9e37ull, col, uint64_t(i));
    project_out(x, Q, m, cols);
    double nrm = std::sqrt(dot(x, x, m));
    if (nrm > 1e-3 * std::sqrt(double(m))) {  // a fresh Gaussian keeps most of its norm (~sqrt(m))
      for (int64_t i = 0; i < m; ++i) x[i] /= nrm;
      return;
    }
  }
  throw std::runtime_error(fmt::format("linalg: could not complete column {} of an orthonormal basis in R^{}", col, m));
}

// Householder QR of a column-major M x N matrix (M >= N), LAPACK's convention: R on and above the
// diagonal, the reflectors' tails (leading 1 implied) below it, R_jj = -sign(alpha) * ||x||.
struct HouseholderQR {
  int64_t M, N;
  std::vector<double> a, tau;

  HouseholderQR(std::vector<double> x, int64_t rows, int64_t cols) : M(rows), N(cols), a(std::move(x)), tau(cols, 0.0) {
    for (int64_t j = 0; j < N; ++j) {
      double* col = a.data() + j * M;
      double alpha = col[j];
      double sigma2 = 0;
      for (int64_t i = j + 1; i < M; ++i) sigma2 += col[i] * col[i];
      if (sigma2 == 0) continue;  // already upper triangular here: H = I
      double beta = -std::copysign(std::sqrt(alpha * alpha + sigma2), alpha);
      tau[j] = (beta - alpha) / beta;
      double inv = 1.0 / (alpha - beta);
      for (int64_t i = j + 1; i < M; ++i) col[i] *= inv;
      col[j] = beta;
      for (int64_t c = j + 1; c < N; ++c) apply_reflector(j, a.data() + c * M);
    }
  }

  // y <- (I - tau_j v_j v_jᵀ) y for one column y of length M.
  void apply_reflector(int64_t j, double* y) const {
    if (tau[j] == 0) return;
    const double* v = a.data() + j * M;
    double w = y[j];
    for (int64_t i = j + 1; i < M; ++i) w += v[i] * y[i];
    w *= tau[j];
    y[j] -= w;
    for (int64_t i = j + 1; i < M; ++i) y[i] -= w * v[i];
  }

  double r(int64_t i, int64_t j) const { return a[j * M + i]; }

  // C (M x c, column-major) <- Q C.
  void apply_q(std::vector<double>& C, int64_t c) const {
    for (int64_t j = N - 1; j >= 0; --j)
      for (int64_t col = 0; col < c; ++col) apply_reflector(j, C.data() + col * M);
  }

  // Thin Q (M x N) with columns scaled by sign(R_jj) so that diag(R) >= 0.
  std::vector<double> thin_q_signfixed() const {
    std::vector<double> Q(size_t(M * N), 0.0);
    for (int64_t j = 0; j < N; ++j) Q[j * M + j] = r(j, j) < 0 ? -1.0 : 1.0;
    apply_q(Q, N);
    return Q;
  }
};

// One-sided Jacobi (Hestenes) on the columns of W (N x N, column-major): W <- W J, V <- V J until all
// column pairs are orthogonal to working precision. Then W's column norms are the singular values.
void jacobi_columns(std::vector<double>& W, std::vector<double>& V, int64_t R, int64_t N) {
  const double tol = std::sqrt(double(R)) * DBL_EPSILON;
  constexpr int kMaxSweeps = 80;
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    int64_t rotations = 0;
    for (int64_t p = 0; p < N - 1; ++p)
      for (int64_t q = p + 1; q < N; ++q) {
        double* wp = W.data() + p * R;
        double* wq = W.data() + q * R;
        double alpha = 0, beta = 0, gamma = 0;
        for (int64_t i = 0; i < R; ++i) {
          alpha += wp[i] * wp[i];
          beta += wq[i] * wq[i];
          gamma += wp[i] * wq[i];
        }
        if (alpha == 0 || beta == 0 || std::abs(gamma) <= tol * std::sqrt(alpha) * std::sqrt(beta)) continue;
        ++rotations;
        double zeta = (beta - alpha) / (2 * gamma);
        double t = std::copysign(1.0, zeta) / (std::abs(zeta) + std::hypot(1.0, zeta));
        double c = 1 / std::sqrt(1 + t * t), s = c * t;
        for (int64_t i = 0; i < R; ++i) {
          double x = wp[i], y = wq[i];
          wp[i] = c * x - s * y;
          wq[i] = s * x + c * y;
        }
        double* vp = V.data() + p * N;
        double* vq = V.data() + q * N;
        for (int64_t i = 0; i < N; ++i) {
          double x = vp[i], y = vq[i];
          vp[i] = c * x - s * y;
          vq[i] = s * x + c * y;
        }
      }
    if (rotations == 0) return;
  }
  throw std::runtime_error(fmt::format("svd_topk (CPU Jacobi): no convergence in {} sweeps on a {}x{} matrix", kMaxSweeps, R, N));
}

// Row-major m x n buffer -> column-major (the transpose's row-major buffer).
std::vector<double> transpose(const std::vector<double>& x, int64_t m, int64_t n) {
  std::vector<double> y(x.size());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) y[j * m + i] = x[i * n + j];
  return y;
}

void check_k(const Tensor& A, int64_t k, const char* op) {
  check(k >= 1 && k <= std::min(A.dim(0), A.dim(1)), op,
        fmt::format("k = {} out of range [1, min(m, n) = {}] for {}", k, std::min(A.dim(0), A.dim(1)), A.desc()));
}

Svd svd_topk_cpu(const Tensor& A, int64_t k) {
  const int64_t m = A.dim(0), n = A.dim(1);
  // Work on the tall orientation X (M x N, M >= N): row-major A read column-major is Aᵀ.
  std::vector<double> a = A.to_double();
  const bool tall = m >= n;
  const int64_t M = tall ? m : n, N = tall ? n : m;
  HouseholderQR qr(tall ? transpose(a, m, n) : std::move(a), M, N);
  std::vector<double> W(size_t(N * N), 0.0), Vn(size_t(N * N), 0.0);
  for (int64_t j = 0; j < N; ++j) {
    for (int64_t i = 0; i <= j; ++i) W[j * N + i] = qr.r(i, j);
    Vn[j * N + j] = 1.0;
  }
  jacobi_columns(W, Vn, N, N);
  std::vector<double> sig(N);
  for (int64_t j = 0; j < N; ++j) sig[j] = std::sqrt(dot(W.data() + j * N, W.data() + j * N, N));
  std::vector<int64_t> order(N);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return sig[x] > sig[y]; });

  std::vector<double> S(k), Ux(size_t(M * k), 0.0), Vx(size_t(N * k));
  for (int64_t j = 0; j < k; ++j) {
    const int64_t o = order[j];
    S[j] = sig[o];
    for (int64_t i = 0; i < N; ++i) {
      Ux[j * M + i] = S[j] > 0 ? W[o * N + i] / S[j] : 0.0;
      Vx[j * N + i] = Vn[o * N + i];
    }
  }
  qr.apply_q(Ux, k);  // U of X = Q [U_R; 0]
  std::vector<double>& U = tall ? Ux : Vx;
  std::vector<double>& V = tall ? Vx : Ux;
  finish_svd(U, S, V, m, n, k, double(std::max(m, n)) * DBL_EPSILON);
  const DType dt = A.dtype();
  return Svd{colmajor_to_tensor(U, m, k, dt, Device::cpu), Tensor::from_vector(S, Shape{k}, dt, Device::cpu),
             colmajor_to_tensor(V, n, k, dt, Device::cpu)};
}

Tensor orthonormalize_cpu(const Tensor& A, int64_t* n_completed, double tol) {
  const int64_t m = A.dim(0), k = A.dim(1);
  const std::vector<double> a = transpose(A.to_double(), m, k);  // column-major
  // Drop the first negligible column and factor again until none is left: an unpivoted QR gives
  // a dependent column an arbitrary direction, and later columns would lean on it.
  std::vector<int64_t> good(k);
  std::iota(good.begin(), good.end(), 0);
  std::vector<double> Qg;
  while (!good.empty()) {
    std::vector<double> x;
    for (int64_t j : good) x.insert(x.end(), a.begin() + j * m, a.begin() + (j + 1) * m);
    const int64_t kk = int64_t(good.size());
    HouseholderQR qr(std::move(x), m, kk);
    std::vector<double> d(kk);
    for (int64_t j = 0; j < kk; ++j) d[j] = qr.r(j, j);
    int64_t drop = first_negligible(d, tol);
    if (drop < 0) {
      Qg = qr.thin_q_signfixed();
      break;
    }
    if (drop == kk) good.clear();  // all zero
    else good.erase(good.begin() + drop);
  }
  std::vector<double> Q = place_columns(Qg, good, m, k);
  if (n_completed) *n_completed = k - int64_t(good.size());
  return colmajor_to_tensor(Q, m, k, A.dtype(), Device::cpu);
}

Tensor random_orthonormal_cpu(int64_t m, int64_t n, uint64_t seed, DType dt) {
  // Draw in dt (the numbers the GPU path sees), factor in f64.
  std::vector<double> g = Tensor::randn(Shape{m, n}, seed, dt, Device::cpu).to_double();
  if (m <= n) {
    // Row-major G read column-major is Gᵀ (n x m); its thin Q read back row-major is O = Qᵀ.
    HouseholderQR qr(std::move(g), n, m);
    return Tensor::from_vector(qr.thin_q_signfixed(), Shape{m, n}, dt, Device::cpu);
  }
  HouseholderQR qr(transpose(g, m, n), m, n);
  return colmajor_to_tensor(qr.thin_q_signfixed(), m, n, dt, Device::cpu);
}

}  // namespace

int64_t first_negligible(const std::vector<double>& d, double tol) {
  double scale = 0;
  for (double x : d) scale = std::max(scale, std::abs(x));
  if (scale == 0) return int64_t(d.size());
  for (size_t j = 0; j < d.size(); ++j)
    if (std::abs(d[j]) <= tol * scale) return int64_t(j);
  return -1;
}

std::vector<double> place_columns(const std::vector<double>& Qg, const std::vector<int64_t>& good, int64_t m, int64_t k) {
  std::vector<double> Q(size_t(m * k), 0.0);
  std::vector<bool> bad(k, true);
  for (size_t c = 0; c < good.size(); ++c) {
    std::copy(Qg.begin() + int64_t(c) * m, Qg.begin() + int64_t(c + 1) * m, Q.begin() + good[c] * m);
    bad[good[c]] = false;
  }
  if (int64_t(good.size()) < k) complete_columns(Q, m, k, bad, 0x0e7a0c01ull);
  return Q;
}

Tensor colmajor_to_tensor(const std::vector<double>& x, int64_t m, int64_t n, DType dt, Device dev) {
  return Tensor::from_vector(transpose(x, n, m), Shape{m, n}, dt, dev);
}

void complete_columns(std::vector<double>& Q, int64_t m, int64_t k, const std::vector<bool>& bad, uint64_t seed) {
  std::vector<int64_t> keep;
  for (int64_t j = 0; j < k; ++j)
    if (!bad[j]) keep.push_back(j);
  for (int64_t j = 0; j < k; ++j) {
    if (!bad[j]) continue;
    random_unit_orthogonal(Q.data() + j * m, Q, m, keep, seed, uint64_t(j));
    keep.push_back(j);
  }
}

// Re-orthogonalize the trailing columns from j0 on against all earlier ones; a column that loses
// most of its norm (it was noise, or zero) is replaced by a random direction.
static void fix_trailing(std::vector<double>& Q, int64_t m, int64_t k, int64_t j0, uint64_t seed) {
  std::vector<int64_t> prev;
  for (int64_t j = 0; j < j0; ++j) prev.push_back(j);
  for (int64_t j = j0; j < k; ++j) {
    double* x = Q.data() + j * m;
    double before = std::sqrt(dot(x, x, m));
    bool ok = std::isfinite(before) && before > 0;
    if (ok) {
      project_out(x, Q, m, prev);
      double after = std::sqrt(dot(x, x, m));
      ok = after > 0.5 * before;
      if (ok)
        for (int64_t i = 0; i < m; ++i) x[i] /= after;
    }
    if (!ok) random_unit_orthogonal(x, Q, m, prev, seed, uint64_t(j));
    prev.push_back(j);
  }
}

void finish_svd(std::vector<double>& U, std::vector<double>& S, std::vector<double>& V, int64_t m, int64_t n,
                int64_t k, double rel_tol) {
  int64_t j0 = k;  // first numerically-null singular value (S is descending)
  for (int64_t j = 0; j < k; ++j)
    if (!(S[j] > rel_tol * S[0])) {
      j0 = j;
      break;
    }
  if (j0 < k) {
    fix_trailing(U, m, k, j0, 0x5eed1ull);
    fix_trailing(V, n, k, j0, 0x5eed2ull);
  }
  for (int64_t j = 0; j < k; ++j) {
    double* u = U.data() + j * m;
    int64_t imax = 0;
    for (int64_t i = 1; i < m; ++i)
      if (std::abs(u[i]) > std::abs(u[imax])) imax = i;
    if (u[imax] < 0) {
      for (int64_t i = 0; i < m; ++i) u[i] = -u[i];
      double* v = V.data() + j * n;
      for (int64_t i = 0; i < n; ++i) v[i] = -v[i];
    }
  }
}

}  // namespace detail

using namespace detail;

Svd svd_topk(const Tensor& A, int64_t k) {
  check_matrix(A, "svd_topk");
  check_k(A, k, "svd_topk");
#ifdef DEEPLORA_HAVE_CUDA
  if (A.is_cuda()) return svd_topk_cuda(A, k);
#endif
  return svd_topk_cpu(A, k);
}

std::vector<Svd> svd_topk_batched(const std::vector<Tensor>& As, int64_t k) {
  if (As.empty()) return {};
  for (size_t i = 0; i < As.size(); ++i) {
    std::string op = fmt::format("svd_topk_batched (matrix {})", i);
    check_matrix(As[i], op.c_str());
    check_k(As[i], k, op.c_str());
    check(As[i].device() == As[0].device(), op.c_str(),
          fmt::format("{} is not on the device of matrix 0 ({})", As[i].desc(), As[0].desc()));
  }
#ifdef DEEPLORA_HAVE_CUDA
  if (As[0].is_cuda()) return svd_topk_batched_cuda(As, k);
#endif
  std::vector<Svd> out;
  out.reserve(As.size());
  for (const Tensor& A : As) out.push_back(svd_topk_cpu(A, k));
  return out;
}

Tensor orthonormalize(const Tensor& A, int64_t* n_completed, double tol) {
  check_matrix(A, "orthonormalize");
  check(A.dim(0) >= A.dim(1), "orthonormalize",
        fmt::format("needs at least as many rows as columns (m >= k), got {}", A.desc()));
  if (tol < 0) tol = 1000 * dtype_eps(A.dtype());
#ifdef DEEPLORA_HAVE_CUDA
  if (A.is_cuda()) return orthonormalize_cuda(A, n_completed, tol);
#endif
  return orthonormalize_cpu(A, n_completed, tol);
}

Tensor random_orthonormal(int64_t m, int64_t n, uint64_t seed, DType dt, Device dev) {
  check(m >= 1 && n >= 1, "random_orthonormal", fmt::format("bad shape [{}, {}]", m, n));
  check(dt == DType::f32 || dt == DType::f64, "random_orthonormal",
        fmt::format("expected f32 or f64, got {}", dtype_name(dt)));
#ifdef DEEPLORA_HAVE_CUDA
  if (dev == Device::cuda) return random_orthonormal_cuda(m, n, seed, dt);
#endif
  Tensor out = random_orthonormal_cpu(m, n, seed, dt);
  return dev == Device::cpu ? out : out.to(dev);
}

}  // namespace deeplora::linalg
