// The dense-GEMM compressed step (runtime/lowrank_dense.h): cuBLASLt GEMMs (kernels/matmul.h) for every
// product with rows or cols in it, the mask pass and the K update of kernels/lowrank_dense.h.
#include "runtime/lowrank_dense.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

#include "runtime/dispatch.h"
#include "kernels/llama.h"
#include "kernels/lowrank_dense.h"
#include "runtime/blas.h"
#include "runtime/ops.h"

namespace deeplora {
namespace {

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("LowrankDenseStep: " + what); }

}  // namespace

int64_t LowrankDenseStep::auto_block_rows(int64_t rows, int64_t cols, int64_t elem_size, int64_t bytes) {
  return std::clamp<int64_t>(bytes / std::max<int64_t>(1, cols * elem_size), 1, std::max<int64_t>(1, rows));
}

LowrankDenseStep::LowrankDenseStep(const SparsePattern& pat, const Tensor& U, const Tensor& V, const Tensor& A,
                                   const Tensor& B, const std::vector<Tensor>& K, double alpha, int64_t block_rows)
    : dev_(A.device()), dt_(A.dtype()), alpha_(alpha), A_(A), B_(B), K_(K) {
  if (dt_ != DType::f64 && dt_ != DType::f32) bad(fmt::format("A is {}: f32 or f64 only", dtype_name(dt_)));
  if (!pat.defined() || pat.device() != dev_) bad("the pattern must live on A's device");
  rows_ = pat.rows;
  cols_ = pat.cols;
  if (A.ndim() != 2 || A.dim(0) != rows_) bad(fmt::format("A {} must be [{}, k]", A.desc(), rows_));
  k_ = A.dim(1);
  if (U.ndim() != 2 || U.dim(0) != rows_) bad(fmt::format("U {} must be [{}, r]", U.desc(), rows_));
  r_ = U.dim(1);
  if (k_ < 1 || k_ > 64) bad(fmt::format("the width k = {} must be in [1, 64]", k_));
  auto same = [&](const Tensor& t, const char* what, const Shape& s) {
    if (!t.defined() || t.device() != dev_ || t.dtype() != dt_ || t.shape() != s)
      bad(fmt::format("{} must be {} {} on {} (got {})", what, dtype_name(dt_), s.str(), device_name(dev_),
                      t.defined() ? t.desc() : std::string("undefined")));
  };
  same(B, "B", Shape{cols_, k_});
  same(U, "U", Shape{rows_, r_});
  same(V, "V", Shape{cols_, r_});
  if (K.empty() || int64_t(K.size()) > kernels::kKChainMaxL)
    bad(fmt::format("{} inner factors (1 to {})", K.size(), kernels::kKChainMaxL));
  for (const Tensor& kl : K) same(kl, "each K_l", Shape{k_, k_});
  if (block_rows < 0) bad(fmt::format("block_rows {} must be >= 0", block_rows));
  block_ = block_rows ? std::min(block_rows, rows_) : auto_block_rows(rows_, cols_, int64_t(dtype_size(dt_)));

  // The observed set as bits, row by row.
  const int64_t words = kernels::mask_words(cols_);
  std::vector<int32_t> bits(size_t(rows_ * words), 0);
  for (int64_t i = 0; i < rows_; ++i)
    for (int32_t e = pat.h_row_ptr[size_t(i)]; e < pat.h_row_ptr[size_t(i) + 1]; ++e) {
      const int64_t j = pat.h_col_idx[size_t(e)];
      auto& w = reinterpret_cast<uint32_t&>(bits[size_t(i * words + j / 32)]);
      w |= 1u << (j % 32);
    }
  bits_ = Tensor::from_ints(bits, Shape{rows_, words}, dev_);

  const int64_t w = k_ + r_;
  X_ = Tensor::zeros(Shape{rows_, w}, dt_, dev_);
  Y_ = Tensor::zeros(Shape{cols_, w}, dt_, dev_);  // B's columns are written by refresh()
  Tensor negU = ops::scale(U, -1.0);
  cudaStream_t s = stream_for(dev_);
  DEEPLORA_DISPATCH(dev_, copy_cols, dt_, negU.data(), r_, static_cast<char*>(X_.data()) + k_ * dtype_size(dt_), w,
                    rows_, r_, false, s);
  DEEPLORA_DISPATCH(dev_, copy_cols, dt_, V.data(), r_, static_cast<char*>(Y_.data()) + k_ * dtype_size(dt_), w,
                    cols_, r_, false, s);
  R_ = Tensor::zeros(Shape{block_, cols_}, dt_, dev_);
  GB_ = Tensor::zeros(Shape{rows_, k_}, dt_, dev_);
  GtP_ = Tensor::zeros(Shape{cols_, k_}, dt_, dev_);
  nparts_ = kernels::gram_parts(rows_);
  gKp_ = Tensor::zeros(Shape{nparts_, k_, k_}, dt_, dev_);
  Kp_ = Tensor::zeros(Shape{k_, k_}, dt_, dev_);
  kwork_ = Tensor::zeros(Shape{kernels::k_update_work_elems(k_, int64_t(K.size()))}, dt_, dev_);
  ks_.L = int64_t(K_.size());
  ks_.k = k_;
  for (size_t l = 0; l < K_.size(); ++l) ks_.K[l] = K_[l].data();
  refresh();
}

void LowrankDenseStep::refresh() {
  DEEPLORA_DISPATCH(dev_, copy_cols, dt_, B_.data(), k_, Y_.data(), k_ + r_, cols_, k_, false, stream_for(dev_));
  DEEPLORA_DISPATCH(dev_, lowrank_k_update, dt_, ks_, gKp_.data(), nparts_, 0.0, Kp_.data(), kwork_.data(),
                    stream_for(dev_));
}

void LowrankDenseStep::step(double lr_inner, double lr_outer) {
  cudaStream_t s = stream_for(dev_);
  const int64_t w = k_ + r_, es = int64_t(dtype_size(dt_));
  auto at = [&](const Tensor& t, int64_t elems) { return static_cast<char*>(t.data()) + elems * es; };
  auto gemm = [&](const void* A, int64_t lda, bool ta, const void* B, int64_t ldb, bool tb, void* C, int64_t ldc,
                  int64_t M, int64_t N, int64_t K, double alpha, double beta) {
    gemm_ptr(dev_, dt_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, s);
  };
  // X = [A·Kp | −U]; Y = [B | V] is kept current by the B update.
  gemm(A_.data(), k_, false, Kp_.data(), k_, false, X_.data(), w, rows_, k_, k_, 1.0, 0.0);
  for (int64_t i0 = 0; i0 < rows_; i0 += block_) {
    const int64_t nb = std::min(block_, rows_ - i0);
    gemm(at(X_, i0 * w), w, false, Y_.data(), w, true, R_.data(), cols_, nb, cols_, w, 1.0, 0.0);
    DEEPLORA_DISPATCH(dev_, mask_scale_rows, dt_, reinterpret_cast<const uint32_t*>(bits_.data()), i0, nb, cols_,
                      alpha_, R_.data(), cols_, s);
    gemm(R_.data(), cols_, false, B_.data(), k_, false, at(GB_, i0 * k_), k_, nb, k_, cols_, 1.0, 0.0);
    gemm(R_.data(), cols_, true, at(X_, i0 * w), w, false, GtP_.data(), k_, cols_, k_, nb, 1.0, i0 ? 1.0 : 0.0);
  }
  // gKp = Aᵀ·GB in row-chunk partials (summed by the K update): a k x k product over `rows` that
  // cuBLASLt runs as split-K with a slow reduction (108 us at d = 2000, k = 20 on the H200).
  DEEPLORA_DISPATCH(dev_, lowrank_gram_partials, dt_, A_.data(), GB_.data(), rows_, k_, nparts_, gKp_.data(), s);
  gemm(GB_.data(), k_, false, Kp_.data(), k_, true, A_.data(), k_, rows_, k_, k_, -lr_outer, 1.0);
  DEEPLORA_DISPATCH(dev_, axpy_copy_cols, dt_, B_.data(), GtP_.data(), lr_outer, cols_, k_, Y_.data(), w, s);
  DEEPLORA_DISPATCH(dev_, lowrank_k_update, dt_, ks_, gKp_.data(), nparts_, lr_inner, Kp_.data(), kwork_.data(), s);
}

}  // namespace deeplora
