// Deep matrix completion: the original and the compressed deep factorizations, the compressed
// initialization (exact for moderate d, implicit for large d) and the step cost model (the target is
// models/deep_mc_target.cpp).
#include "models/deep_mc.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <unordered_set>

#include "kernels/rng.h"
#include "kernels/lowrank_dense.h"
#include "kernels/sparse.h"
#include "runtime/blas.h"
#include "runtime/dispatch.h"
#include "runtime/linalg.h"
#include "runtime/ops.h"

namespace deeplora::deep_mc {
namespace {

// [d, ka] | [d, kb] -> [d, ka + kb] through the host (initialization only).
Tensor hcat(const Tensor& a, const Tensor& b) {
  const int64_t d = a.dim(0), ka = a.dim(1), kb = b.dim(1);
  std::vector<double> x = a.to_double(), y = b.to_double(), out(size_t(d * (ka + kb)));
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t c = 0; c < ka; ++c) out[size_t(i * (ka + kb) + c)] = x[size_t(i * ka + c)];
    for (int64_t c = 0; c < kb; ++c) out[size_t(i * (ka + kb) + ka + c)] = y[size_t(i * kb + c)];
  }
  return Tensor::from_vector(out, Shape{d, ka + kb}, a.dtype(), a.device());
}

// Inverse of a small n x n matrix (Gauss-Jordan, partial pivoting).
Tensor small_inverse(const Tensor& R) {
  const int64_t n = R.dim(0);
  std::vector<double> a = R.to_double(), inv(size_t(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) inv[size_t(i * n + i)] = 1.0;
  for (int64_t c = 0; c < n; ++c) {
    int64_t piv = c;
    for (int64_t r = c + 1; r < n; ++r)
      if (std::abs(a[size_t(r * n + c)]) > std::abs(a[size_t(piv * n + c)])) piv = r;
    if (std::abs(a[size_t(piv * n + c)]) < 1e-300) throw std::runtime_error("deep_mc init: singular basis matrix");
    for (int64_t j = 0; j < n; ++j) {
      std::swap(a[size_t(c * n + j)], a[size_t(piv * n + j)]);
      std::swap(inv[size_t(c * n + j)], inv[size_t(piv * n + j)]);
    }
    const double s = 1.0 / a[size_t(c * n + c)];
    for (int64_t j = 0; j < n; ++j) {
      a[size_t(c * n + j)] *= s;
      inv[size_t(c * n + j)] *= s;
    }
    for (int64_t r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = a[size_t(r * n + c)];
      if (f == 0.0) continue;
      for (int64_t j = 0; j < n; ++j) {
        a[size_t(r * n + j)] -= f * a[size_t(c * n + j)];
        inv[size_t(r * n + j)] -= f * inv[size_t(c * n + j)];
      }
    }
  }
  return Tensor::from_vector(inv, R.shape(), R.dtype(), R.device());
}

// Dense 0/1 mask of a pattern (the original model and the exact init are d x d anyway).
Tensor dense_mask(const SparsePattern& p, DType dt, Device dev, bool complement) {
  std::vector<double> m(size_t(p.rows * p.cols), complement ? 1.0 : 0.0);
  for (int64_t i = 0; i < p.rows; ++i)
    for (int32_t e = p.h_row_ptr[size_t(i)]; e < p.h_row_ptr[size_t(i) + 1]; ++e)
      m[size_t(i * p.cols + p.h_col_idx[size_t(e)])] = complement ? 0.0 : 1.0;
  return Tensor::from_vector(m, Shape{p.rows, p.cols}, dt, dev);
}

Tensor identity(int64_t k, double s, DType dt, Device dev) {
  std::vector<double> v(size_t(k * k), 0.0);
  for (int64_t i = 0; i < k; ++i) v[size_t(i * k + i)] = s;
  return Tensor::from_vector(v, Shape{k, k}, dt, dev);
}


}  // namespace

uint64_t seed_of(uint64_t seed, uint64_t k) { return rng::bits(seed, k); }

const char* impl_name(Impl i) {
  switch (i) {
    case Impl::automatic: return "auto";
    case Impl::fused: return "fused";
    case Impl::dense: return "dense";
    case Impl::tape: return "tape";
  }
  return "?";
}

// ---- the cost model ------------------------------------------------------------------------------------
// Fitted to the H200 grid in NOTES.md ("Deep MC at every shape", f64, CUDA graphs on, µs per iteration):
// - fused: 5.5 + 2.8e-3·d + 1.4e-5·|Ω|·(KK/10)^1.55 (KK = lowrank_kk(k), the register bound it runs at):
//   the grid barrier and every block's K chain, the rows' and columns' passes, and the entries'
//   gathers (e.g. d = 2000, r = 5: 14.2 / 25.1 / 40.1 µs at p = 0.05 / 0.2 / 0.5, model 13.9 / 22.3 / 39);
// - dense: 45 + 1.1·(k − 10)⁺ + 1.2e-5·d²·(1 + k/40): ~10 launches, the one-block K update (grows with
//   k), and the passes over the d² residual (e.g. d = 2000: 101 / 117 / 168 µs at k = 10 / 20 / 40).
// Measured, the fused kernel wins wherever it exists (its sampled gathers cost less than d² passes at
// every grid point up to p = 0.5); the dense step replaces the tape where it does not (k = 2r > 16 at
// L = 3: 117 µs against the tape's 330 µs at d = 2000, r = 10). f32 is charged 0.7 of the fused and
// 0.6 of the dense d² cost (not fitted: the grid is f64). On the CPU the sampled reference is always
// cheaper than d² work when it exists, so auto picks it there too.
namespace {
struct CostConsts {
  double fused_fixed_us = 5.5, fused_per_d_us = 2.8e-3, fused_entry_us = 1.4e-5, fused_kk_exp = 1.55;
  double dense_fixed_us = 45.0, dense_per_k_us = 1.1, dense_elem_us = 1.2e-5;
};
constexpr CostConsts kCost{};
}  // namespace

StepCost step_cost(Device dev, DType dt, int64_t d, int64_t nnz, int64_t k, int64_t r, int64_t L, int64_t block_rows) {
  (void)r;
  StepCost c;
  c.fused_ok = kernels::lowrank_step_supported(dt, k, L);
  c.dense_ok = (dt == DType::f64 || dt == DType::f32) && L >= 1 && L <= kernels::kKChainMaxL && k >= 1 && k <= 64;
  const double kk = double(kernels::lowrank_kk(std::min<int64_t>(k, 32)));
  c.fused_us = kCost.fused_fixed_us + kCost.fused_per_d_us * double(d) +
               double(nnz) * kCost.fused_entry_us * (dt == DType::f32 ? 0.7 : 1.0) * std::pow(kk / 10.0, kCost.fused_kk_exp);
  const int64_t es = int64_t(dtype_size(dt));
  const int64_t br = block_rows > 0 ? std::min(block_rows, d) : LowrankDenseStep::auto_block_rows(d, d, es);
  const double blocks = std::ceil(double(d) / double(std::max<int64_t>(1, br)));
  const double d2 = double(d) * double(d);
  c.dense_us = kCost.dense_fixed_us + 4.0 * 2.5 * (blocks - 1.0) + kCost.dense_per_k_us * double(std::max<int64_t>(0, k - 10)) +
               kCost.dense_elem_us * d2 * (1.0 + double(k) / 40.0) * (dt == DType::f32 ? 0.6 : 1.0);
  if (dev == Device::cpu) c.pick = c.fused_ok ? Impl::fused : c.dense_ok ? Impl::dense : Impl::tape;
  else if (c.fused_ok && c.dense_ok) c.pick = c.fused_us <= c.dense_us ? Impl::fused : Impl::dense;
  else c.pick = c.fused_ok ? Impl::fused : c.dense_ok ? Impl::dense : Impl::tape;
  return c;
}

Tensor orthogonal_init(int64_t d, int64_t l, uint64_t seed, DType dt, Device dev) {
  return linalg::random_orthonormal(d, d, seed_of(seed, 100 + uint64_t(l)), dt, dev);
}

// ---- original ---------------------------------------------------------------------------------------

Original::Original(const Target& t, const Config& c, Device dev) : dev_(dev) {
  NoGrad ng;
  const DType dt = t.U.dtype();
  const int64_t d = t.d;
  alpha_ = 1.0 / (double(d) * double(d));
  lr_ = c.lr;
  for (int64_t l = 1; l <= c.L; ++l) {
    Tensor w = ops::scale(orthogonal_init(d, l, c.seed, dt, dev), c.eps);
    w.set_name(fmt::format("W{}", l)).set_requires_grad(true);
    W.push_back(w);
  }
  M_ = ops::matmul(t.U, t.V, false, true);
  unmask_ = dense_mask(t.omega, dt, dev, true);
  omega_ = t.omega;
  m_csr_ = t.m_csr;
  n_unobs_ = double(d) * double(d) - double(t.omega.nnz);
  train_out_ = Tensor::zeros(Shape{}, dt, dev);
  rec_out_ = Tensor::zeros(Shape{}, dt, dev);
  fused_ = c.impl != Impl::tape;
  if (fused_) {
    for (int64_t l = 0; l < c.L; ++l) Wn_.push_back(Tensor::zeros(Shape{d, d}, dt, dev));
    for (int64_t l = 1; l < c.L; ++l) P_.push_back(Tensor::zeros(Shape{d, d}, dt, dev));
    for (int64_t l = 2; l < c.L; ++l) H_.push_back(Tensor::zeros(Shape{d, d}, dt, dev));
    G_ = Tensor::zeros(Shape{d, d}, dt, dev);  // stays zero off Ω: only Ω's entries are ever written
    side_ = std::make_unique<SideStream>(dev == Device::cuda);
    const size_t wsb = gemm_workspace_bytes(dev);
    if (wsb) ws_ = Tensor::zeros(Shape{int64_t(wsb / 8)}, DType::f64, dev);
  }
}

Original::~Original() = default;

Tensor Original::product() const {
  Tensor P = W[0];
  for (size_t l = 1; l < W.size(); ++l) P = ops::matmul(W[l], P);
  return P;
}

// The loss reads W only at Ω (a gather; its backward scatters into the zero-filled gradient of W):
// about a third of the memory traffic of a dense masked loss over d² entries.
void Original::step() {
  if (fused_) {
    fused_step(W, Wn_);
    for (size_t l = 0; l < W.size(); ++l) W[l].copy_from(Wn_[l]);
    return;
  }
  Tensor loss = ops::sq_error(ops::at_pattern(product(), omega_), m_csr_, alpha_);
  backward(loss);
  sgd_step(W, std::vector<double>(W.size(), lr_));
}

void Original::step_block() {
  if (!fused_) return step();
  fused_step(W, Wn_);
  fused_step(Wn_, W);
}

void Original::fused_step(const std::vector<Tensor>& from, const std::vector<Tensor>& to) {
  const size_t L = from.size();
  cudaStream_t main = stream_for(dev_), side = side_->get();
  // C = alpha·op(A)·op(B) + beta·Cin, all d x d; products on the side stream use their own workspace.
  auto mm = [&](const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C, double alpha, const Tensor* Cin,
                cudaStream_t s, bool on_side) { gemm_into(A, ta, B, tb, C, alpha, Cin, s, on_side ? ws_ : Tensor()); };
  auto P = [&](size_t l) -> const Tensor& { return l == 0 ? from[0] : P_[l - 1]; };  // P_{l+1}, 0-based
  auto H = [&](size_t l) -> const Tensor& { return l == L - 1 ? G_ : H_[l - 1]; };     // H_{l+1}, l >= 1
  for (size_t l = 1; l < L; ++l) mm(from[l], false, P(l - 1), false, P_[l - 1], 1.0, nullptr, main, false);
  pattern_residual_into(omega_, P(L - 1), m_csr_, alpha_, G_, main);
  for (size_t l = L - 1; l >= 1; --l) {
    side_->fork();  // H_{l+1} is ready
    mm(H(l), false, P(l - 1), true, to[l], -lr_, &from[l], side, true);
    if (l >= 2) mm(from[l], true, H(l), false, H_[l - 2], 1.0, nullptr, main, false);
  }
  mm(from[1], true, H(1), false, to[0], -lr_, &from[0], main, false);
  side_->join();
}
void Original::evaluate_async() {
  NoGrad ng;
  Tensor P = product();
  train_out_.copy_from(ops::sq_error(ops::at_pattern(P, omega_), m_csr_, alpha_));
  rec_out_.copy_from(ops::sq_error(P, M_, n_unobs_ > 0 ? 1.0 / n_unobs_ : 0.0, unmask_));
}

Metrics Original::read_metrics() const { return Metrics{train_out_.item(), rec_out_.item(), false}; }

Tensor Original::dense_W() const {
  NoGrad ng;
  return product().detach();
}

int64_t Original::n_params() const { return int64_t(W.size()) * W[0].numel(); }

std::string Original::describe() const {
  return fmt::format("original (L = {}, step {})", W.size(),
                     fused_ ? "fused: updates folded into the GEMMs, two streams" : "op by op on the tape");
}

// ---- compressed -------------------------------------------------------------------------------------

Compressed::Compressed(const Target& t, const Config& c, Device dev) : dev_(dev), dt_(t.U.dtype()) {
  NoGrad ng;
  d_ = t.d;
  k_ = 2 * c.r;
  alpha_ = 1.0 / (double(d_) * double(d_));
  lr_ = c.lr;
  gamma_ = c.gamma;
  omega_ = t.omega;
  m_csr_ = t.m_csr;
  m_csc_ = t.m_csc;
  U_ = t.U;
  V_ = t.V;
  used_exact_init = c.init == InitMode::exact || (c.init == InitMode::automatic && d_ <= 4096);
  if (used_exact_init) init_exact(t, c);
  else init_implicit(t, c);
  A.set_name("A").set_requires_grad(true);
  B.set_name("B").set_requires_grad(true);
  for (int64_t l = 1; l <= c.L; ++l) {
    Tensor kl = identity(k_, c.eps, dt_, dev);
    kl.set_name(fmt::format("K{}", l)).set_requires_grad(true);
    K.push_back(kl);
  }
  cost_ = step_cost(dev, dt_, d_, omega_.nnz, k_, t.U.dim(1), c.L, c.block_rows);
  switch (c.impl) {
    case Impl::automatic: impl_ = cost_.pick; break;
    case Impl::fused:
      if (!cost_.fused_ok)
        throw std::invalid_argument(fmt::format(
            "--impl fused: the fused kernel does not support k = 2r = {}, L = {} in {} (k <= 32, L <= 16, f32/f64); "
            "use --impl dense or auto", k_, c.L, dtype_name(dt_)));
      impl_ = Impl::fused;
      break;
    case Impl::dense:
      if (!cost_.dense_ok)
        throw std::invalid_argument(
            fmt::format("--impl dense: the dense step supports L <= {} in f32/f64 (got L = {}, {})",
                        kernels::kKChainMaxL, c.L, dtype_name(dt_)));
      impl_ = Impl::dense;
      break;
    case Impl::tape: impl_ = Impl::tape; break;
  }
  fused_ = impl_ == Impl::fused;
  if (impl_ == Impl::dense) {
    dense_ = std::make_unique<LowrankDenseStep>(omega_, U_, V_, A, B, K, alpha_, c.block_rows);
    for (int b = 50; b >= 1; --b)
      if (c.log_every % b == 0) {
        block_ = b;
        break;
      }
  }
  if (fused_) {
    A2_ = Tensor::zeros(A.shape(), dt_, dev);
    B2_ = Tensor::zeros(B.shape(), dt_, dev);
    const size_t bytes = kernels::lowrank_step_workspace_bytes(k_);
    work_ = Tensor::zeros(Shape{int64_t((bytes + 3) / 4)}, DType::i32, dev);
    loss_out_ = Tensor::zeros(Shape{}, dt_, dev);
    for (int b = 250; b >= 1; --b)
      if (c.log_every % b == 0) {
        block_ = b;
        break;
      }
  }
  // Recovery error: exact (a pass over all d² entries, O(d² k)), or on a fixed random sample.
  n_unobs_ = double(d_) * double(d_) - double(omega_.nnz);
  const int64_t ns = c.eval_sample < 0 ? (d_ <= 20000 ? 0 : 1000000) : c.eval_sample;
  eval_sampled_ = ns > 0;
  if (eval_sampled_) {
    const int64_t n = int64_t(std::min<double>(double(ns), n_unobs_));
    std::vector<int32_t> si, sj;
    std::unordered_set<int64_t> seen;
    const uint64_t s = seed_of(c.seed, 400);
    const auto& rp = omega_.h_row_ptr;
    const auto& ci = omega_.h_col_idx;
    for (uint64_t ctr = 0; int64_t(si.size()) < n; ctr += 2) {
      const int64_t i = std::min<int64_t>(int64_t(rng::u01(s, ctr) * double(d_)), d_ - 1);
      const int64_t j = std::min<int64_t>(int64_t(rng::u01(s, ctr + 1) * double(d_)), d_ - 1);
      if (std::binary_search(ci.begin() + rp[size_t(i)], ci.begin() + rp[size_t(i) + 1], int32_t(j))) continue;
      if (!seen.insert(i * d_ + j).second) continue;
      si.push_back(int32_t(i));
      sj.push_back(int32_t(j));
    }
    sample_ = SparsePattern::from_pairs(d_, d_, si, sj, dev, "recovery sample");
    m_sample_ = ops::sampled_dot(U_, V_, sample_);
  }
  train_out_ = Tensor::zeros(Shape{}, dt_, dev);
  rec_out_ = Tensor::zeros(Shape{}, DType::f64, dev);
}

// Exact: the wide model's O = O_L⋯O_1 and its gradient at t = 0, both d x d, formed once.
void Compressed::init_exact(const Target& t, const Config& c) {
  Tensor O = orthogonal_init(d_, 1, c.seed, dt_, dev_);
  for (int64_t l = 2; l <= c.L; ++l) O = ops::matmul(orthogonal_init(d_, l, c.seed, dt_, dev_), O);
  Tensor W0 = ops::scale(O, std::pow(c.eps, double(c.L)));
  Tensor M = ops::matmul(t.U, t.V, false, true);
  Tensor G = ops::scale(ops::mul(ops::add(W0, ops::scale(M, -1.0)), dense_mask(t.omega, dt_, dev_, false)), alpha_);
  linalg::Svd s = linalg::svd_topk(G, c.r);
  Ur = s.U;
  Vr = s.V;
  B = linalg::orthonormalize(hcat(Vr, ops::matmul(O, Ur, true, false)), &n_completed);
  A = ops::matmul(O, B);
}

// Implicit, for large d (nothing d x d is formed):
// - G is supported on Ω; its values are taken at W(0) ≈ 0, i.e. g_e = −m_e/d² (the ε^L·O term is
//   ~ε^L/sqrt(d) per entry, far below the solver's accuracy). U_r, V_r come from a randomized
//   subspace iteration (r + 10 columns, svd_iters rounds) with sparse-dense products, then a small
//   dense SVD (linalg::svd_topk of the d x (r+10) matrix Gᵀ·Q).
// - O is never drawn. Only the pair (B = orth([V_r, OᵀU_r]), A = O·B) enters the method, and for a
//   Haar-random O: Z = OᵀU_r is a Haar-random orthonormal d x r frame, and given Z, O maps the
//   orthonormal frame Y = orth((I − ZZᵀ)V_r) to a random orthonormal frame Y' ⊥ U_r. So we draw
//   Z and Y' (seeded), write [V_r, Z] = B·R (QR), O·V_r = U_r·(ZᵀV_r) + Y'·(Yᵀ(I − ZZᵀ)V_r), and
//   A = [O·V_r, U_r]·R⁻¹ = O·B for an orthogonal O consistent with everything used.
void Compressed::init_implicit(const Target&, const Config& c) {
  const int64_t r = c.r, q = std::min<int64_t>(r + 10, d_);
  Tensor g = ops::scale(m_csr_, -alpha_);
  Tensor Q = linalg::orthonormalize(ops::spmm(omega_, g, Tensor::randn(Shape{d_, q}, seed_of(c.seed, 300), dt_, dev_)));
  for (int64_t it = 0; it < c.svd_iters; ++it) {
    Tensor Z = linalg::orthonormalize(ops::spmm(omega_, g, Q, true));
    Q = linalg::orthonormalize(ops::spmm(omega_, g, Z));
  }
  linalg::Svd s = linalg::svd_topk(ops::spmm(omega_, g, Q, true), r);  // Gᵀ Q = Ub S Vbᵀ  =>  G ≈ (Q Vb) S Ubᵀ
  Ur = ops::matmul(Q, s.V);
  Vr = s.U;
  Tensor Z = linalg::random_orthonormal(d_, r, seed_of(c.seed, 200), dt_, dev_);
  Tensor C0 = hcat(Vr, Z);
  B = linalg::orthonormalize(C0, &n_completed);
  Tensor R = ops::matmul(B, C0, true, false);
  Tensor ZtV = ops::matmul(Z, Vr, true, false);
  Tensor Yr = ops::add(Vr, ops::scale(ops::matmul(Z, ZtV), -1.0));
  Tensor Y = linalg::orthonormalize(Yr);
  Tensor Cy = ops::matmul(Y, Yr, true, false);
  Tensor N = Tensor::randn(Shape{d_, r}, seed_of(c.seed, 201), dt_, dev_);
  Tensor Yp = linalg::orthonormalize(ops::add(N, ops::scale(ops::matmul(Ur, ops::matmul(Ur, N, true, false)), -1.0)));
  Tensor OV = ops::add(ops::matmul(Ur, ZtV), ops::matmul(Yp, Cy));
  A = ops::matmul(hcat(OV, Ur), small_inverse(R));
}

Tensor Compressed::kprod() const {
  Tensor Kp = K[0];
  for (size_t l = 1; l < K.size(); ++l) Kp = ops::matmul(K[l], Kp);
  return Kp;
}

void Compressed::fused_steps(int64_t n) {
  lowrank_step(omega_, m_csr_, m_csc_, A, B, A2_, B2_, K, alpha_, lr_, gamma_ * lr_, loss_out_, work_, n);
}

void Compressed::dense_steps(int64_t n) {
  for (int64_t i = 0; i < n; ++i) dense_->step(lr_, gamma_ * lr_);
}

void Compressed::step() {
  if (fused_) return fused_steps(1);
  if (dense_) return dense_steps(1);
  Tensor pred = ops::sampled_dot(ops::matmul(A, kprod()), B, omega_);
  backward(ops::sq_error(pred, m_csr_, alpha_));
  std::vector<Tensor> params{A, B};
  std::vector<double> lrs{gamma_ * lr_, gamma_ * lr_};
  for (const Tensor& k : K) {
    params.push_back(k);
    lrs.push_back(lr_);
  }
  sgd_step(params, lrs);
}

void Compressed::step_block() {
  if (fused_) return fused_steps(block_);
  if (dense_) return dense_steps(block_);
  step();
}

void Compressed::evaluate_async() {
  NoGrad ng;
  Tensor P = ops::matmul(A, kprod());
  train_out_.copy_from(ops::sq_error(ops::sampled_dot(P, B, omega_), m_csr_, alpha_));
  if (eval_sampled_) {
    rec_out_.copy_from(ops::sq_error(ops::sampled_dot(P, B, sample_), m_sample_, 1.0 / double(sample_.nnz)));
  } else {
    lowrank_unobserved_sq_sum(omega_, P, B, U_, V_, rec_out_);
  }
}

Metrics Compressed::read_metrics() const {
  Metrics m;
  m.train_loss = train_out_.item();
  m.recovery = eval_sampled_ ? rec_out_.item() : (n_unobs_ > 0 ? 0.5 * rec_out_.item() / n_unobs_ : 0.0);
  m.recovery_estimated = eval_sampled_;
  return m;
}

Tensor Compressed::dense_W() const {
  NoGrad ng;
  return ops::matmul(ops::matmul(A, kprod()), B, false, true).detach();
}

int64_t Compressed::n_params() const { return A.numel() + B.numel() + int64_t(K.size()) * k_ * k_; }

std::string Compressed::describe() const {
  return fmt::format("compressed (k = {}, init {}{}, step {}{}, recovery {})", k_, used_exact_init ? "exact" : "implicit",
                     n_completed ? fmt::format(", {} basis columns completed at random", n_completed) : "",
                     fused_   ? fmt::format("fused kernel, {} iterations a launch", block_)
                     : dense_ ? fmt::format("dense GEMMs, {} row block(s) of {}, {} iterations a call", dense_->n_blocks(),
                                            dense_->block_rows(), block_)
                              : std::string("op by op on the tape"),
                     cost_.fused_ok || cost_.dense_ok
                         ? fmt::format(" [cost model: fused {}, dense {}]",
                                       cost_.fused_ok ? fmt::format("{:.1f} us", cost_.fused_us) : "n/a",
                                       cost_.dense_ok ? fmt::format("{:.1f} us", cost_.dense_us) : "n/a")
                         : std::string(),
                     eval_sampled_ ? fmt::format("estimated on {} unobserved entries", sample_.nnz) : "exact");
}

}  // namespace deeplora::deep_mc
