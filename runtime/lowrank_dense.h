// The dense-GEMM step of compressed deep matrix completion (models/deep_mc.h, --impl dense): one
// gradient-descent iteration on W = A·K_L⋯K_1·Bᵀ under f = ½·alpha·Σ_Ω (W − M)², M = U·Vᵀ, where the
// residual is formed with GEMMs instead of being gathered entry by entry. Per iteration, with
// Kp = K_L⋯K_1 and P = A·Kp:
//   X = [P | −U], Y = [B | V]                         (rows x (k + r), cols x (k + r); M never formed)
//   for each block of rows I:                          (the block is sized to stay in L2)
//     R_I  = mask_I ∘ alpha·(X_I·Yᵀ)                  one GEMM + one mask pass: ∂f/∂W on the block
//     GB_I = R_I·B,   GtP (+)= R_Iᵀ·P_I               two GEMMs reading R_I while it is cached
//   gKp = Aᵀ·GB;  A ← A − η_o·GB·Kpᵀ;  B ← B − η_o·GtP (and into Y);  K_l ← K_l − η_i·∂f/∂K_l,
//   Kp ← K_L⋯K_1 (one block: kernels::lowrank_k_update).
// Cost ~ rows·cols·(3k + r) multiply-adds on the tensor cores plus two passes over each R block,
// independent of |Ω|: it beats the sampled kernel (kernels::lowrank_step) when Ω is dense enough
// (the cost model in models/deep_mc.cpp). Deterministic: fixed blocks, fixed GEMM plans, no atomics.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/lowrank_dense.h"
#include "runtime/ops_sparse.h"
#include "runtime/tensor.h"

namespace deeplora {

class LowrankDenseStep {
 public:
  // A [rows, k], B [cols, k] (k <= 64), K (1..16 of [k, k]) are updated in place by step(); U [rows, r] and
  // V [cols, r] define the target. block_rows: rows of R formed at once (0: automatic, R blocks of at
  // most ~16 MiB). Throws std::invalid_argument naming the tensor on mismatched shapes or devices.
  LowrankDenseStep(const SparsePattern& pat, const Tensor& U, const Tensor& V, const Tensor& A, const Tensor& B,
                   const std::vector<Tensor>& K, double alpha, int64_t block_rows = 0);
  // One iteration; no host sync, the same launches and no allocation every call (capturable).
  void step(double lr_inner, double lr_outer);
  // Y's copy of B and Kp = K_L⋯K_1 again (after B or K were changed from outside; step() keeps both
  // current itself).
  void refresh();
  int64_t block_rows() const { return block_; }
  int64_t n_blocks() const { return (rows_ + block_ - 1) / block_; }
  // The automatic block: rows such that rows x cols elements take at most `bytes`.
  static int64_t auto_block_rows(int64_t rows, int64_t cols, int64_t elem_size, int64_t bytes = int64_t(16) << 20);

 private:
  Device dev_;
  DType dt_;
  int64_t rows_ = 0, cols_ = 0, k_ = 0, r_ = 0, block_ = 0, nparts_ = 1;
  double alpha_ = 0;
  Tensor A_, B_;
  std::vector<Tensor> K_;
  Tensor bits_;             // i32 [rows, mask_words(cols)]: the observed set as bits
  Tensor X_, Y_;            // [rows, k + r], [cols, k + r]
  Tensor R_;                // [block, cols]
  kernels::KChain ks_;  // pointers to K_'s buffers (fixed for the step's life)
  Tensor GB_, GtP_, gKp_, Kp_, kwork_;  // gKp_: kernels::gram_parts(rows) partials of Aᵀ·GB
};

}  // namespace deeplora
