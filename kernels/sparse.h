// Sparse-pattern kernels for (deep) matrix completion: sampled dense-dense products, sparse-dense
// products over CSR/CSC, squared-error losses, a multi-tensor SGD step, the fused step of the
// compressed deep factorization, and the recovery-error sum over the unobserved entries.
// Determinism: every output element (a row of a sparse-dense product, a loss) is owned by one
// thread / warp / block and summed in a fixed order; no float atomics anywhere.
#pragma once
#include <cstddef>

#include "kernels/common.h"

namespace deeplora::kernels {

// One tensor of a multi-tensor SGD step: p -= lr * g, then g = 0 (when zero_grad).
struct SgdItem {
  void* p = nullptr;
  void* g = nullptr;
  int64_t n = 0;
  double lr = 0.0;
};
constexpr int kSgdMaxItems = 8;  // per launch; sgd_multi takes any number and launches in groups

// The fused steps of compressed deep matrix completion, W = A · K_L ⋯ K_1 · Bᵀ, on the loss
// f = ½·alpha·Σ_{e∈Ω} (W[i_e, j_e] − vals[e])²: `steps` gradient-descent iterations in one launch.
// On the GPU it is a persistent cooperative kernel (one grid barrier per iteration). Each iteration:
// with Kp = K_L⋯K_1 (every block holds the K_l and Kp in shared memory),
// - row-owner warps: P_i = A_i·Kp, residuals r_e = P_i·B_{j_e} − vals[e] over their row (CSR),
//   gP_i = alpha·Σ_e r_e·B_{j_e}, A'_i = A_i − lr_outer·gP_i·Kpᵀ, and the block's partial of
//   gKp = Σ_i A_iᵀ·gP_i and of the loss;
// - column-owner warps: Q_j = Kp·B_jᵀ, r_e = A_{i_e}·Q_j − vals[e] over their column (CSC),
//   B'_j = B_j − lr_outer·alpha·(Σ_e r_e·A_{i_e})·Kp;
// - grid barrier; then every block sums the partials in block order (the same order in every block,
//   so all blocks hold bit-identical K_l), forms
//   gK_l = (K_L⋯K_{l+1})ᵀ·gKp·(K_{l−1}⋯K_1)ᵀ and updates its K_l. The next iterate of A, B lives in
//   A_tmp, B_tmp (ping-pong); after the last iteration the result is in A, B (an odd count ends with a
//   copy), K_l are written back, and `loss` holds the loss of the last iteration's input iterate. No
//   float atomics: the result does not depend on timing. Within a row (column) the entries may come in
//   any order; for small d the kernel keeps each block's entries in shared memory, reordered so that
//   the lanes of a quarter-warp gather from different shared-memory banks.
constexpr int kLowrankMaxL = 16;
constexpr int kLowrankThreads = 512;       // threads of a block of the fused kernel
constexpr int kLowrankMaxRowBlocks = 128;  // row-owner blocks (bounds the partials each block sums)
struct LowrankStep {
  DType dt = DType::f64;
  int64_t rows = 0, cols = 0, k = 0, L = 0;
  int64_t nnz = 0;  // entries of the pattern (sizes the shared-memory copy of the entries; 0: no copy)
  int64_t steps = 1;
  const int32_t* row_ptr = nullptr;  // CSR [rows + 1]
  const int32_t* col_idx = nullptr;  // CSR [nnz]
  const int32_t* col_ptr = nullptr;  // CSC [cols + 1]
  const int32_t* csc_row = nullptr;  // CSC [nnz]
  const void* vals_csr = nullptr;    // targets at Ω in CSR order
  const void* vals_csc = nullptr;    // the same in CSC order
  void* A = nullptr;                 // [rows, k], updated in place
  void* B = nullptr;                 // [cols, k], updated in place
  void* A_tmp = nullptr;             // scratch of A's shape (must not alias A or B)
  void* B_tmp = nullptr;             // scratch of B's shape
  void* K[kLowrankMaxL] = {};        // K_1 .. K_L, [k, k] each, updated in place
  double alpha = 1.0, lr_inner = 0.0, lr_outer = 0.0;
  void* loss = nullptr;  // one element of dt
  void* work = nullptr;  // lowrank_step_workspace_bytes(k) bytes of device memory (any content)
};
// The register-array bound the fused kernel is compiled for: k itself for the common widths (k = 2r = 10
// is the paper's), else the next bound up (entries past k are predicated off).
inline int64_t lowrank_kk(int64_t k) {
  return k <= 2 ? 2 : k <= 4 ? 4 : k <= 8 ? 8 : k <= 10 ? 10 : k <= 16 ? 16 : 32;
}
// Shared memory of the fused kernel, in elements of dt (besides the staged factor and entries): per-warp
// rows (own row, its product with Kp, the reduced gradient and loss), the K_l, their update, prefix and
// suffix products, the back-propagated gKp products and Kp (each padded to lowrank_kk(k)² elements),
// the loss, per-warp gKp shares, and the split sums of the partials.
inline int64_t lowrank_step_smem_elems(int64_t k, int64_t L) {
  const int64_t kk = k * k, KK = lowrank_kk(k), warps = kLowrankThreads / 32;
  return warps * (3 * KK + 2) + (5 * L + 1) * KK * KK + 2 + warps * (kk + 1) +
         (kk + 1 > kLowrankThreads ? kk + 1 : kLowrankThreads);
}
// The staged factor (GPU, small d): max(rows, cols) x k elements, rounded up to 16 bytes. Staged
// when it takes at most kLowrankStageBytes.
constexpr int64_t kLowrankStageBytes = 120 * 1024;
inline int64_t lowrank_stage_elems(int64_t rows, int64_t cols, int64_t k, int64_t elem_size) {
  const int64_t n = (rows > cols ? rows : cols) * k;
  const int64_t per16 = 16 / elem_size;
  return (n + per16 - 1) / per16 * per16;
}
// Limits of the fused kernel (else use the op-by-op path): k in [1, 32], 1 <= L <= 16, shared memory
// within 96 KiB (k = 10, L = 3 in f64 takes 34 KiB).
inline bool lowrank_step_supported(DType dt, int64_t k, int64_t L) {
  if (dt != DType::f64 && dt != DType::f32) return false;
  if (k < 1 || k > 32 || L < 1 || L > kLowrankMaxL) return false;
  return lowrank_step_smem_elems(k, L) * int64_t(dtype_size(dt)) <= 96 * 1024;
}
// Two buffers of per-block partials (gKp and the loss), alternating between iterations.
inline size_t lowrank_step_workspace_bytes(int64_t k) {
  return size_t(2) * kLowrankMaxRowBlocks * size_t(k * k + 1) * 8;
}

}  // namespace deeplora::kernels

#define DEEPLORA_SPARSE_DECLS                                                                       \
  /* out[e] = sum_c P[row[e], c] * Q[col[e], c]   (out = ... when !accumulate, += otherwise).        \
     P [*, k], Q [*, k] row-major. */                                                               \
  void sampled_dot(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* P,    \
                   const void* Q, int64_t k, void* out, bool accumulate, cudaStream_t s);           \
  /* out[e] = X[row[e] * ld + col[e]]  (X dense, leading dimension ld) */                           \
  void gather_pattern(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* X,  \
                      int64_t ld, void* out, cudaStream_t s);                                       \
  /* Y[row[e] * ld + col[e]] = alpha * (X[row[e] * ld + col[e]] - vals[e]): the gradient of        \
     ½ alpha Σ_e (X − vals)² at the pattern, written in place (Y's other entries are untouched). */ \
  void pattern_residual(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* X, \
                        const void* vals, double alpha, int64_t ld, void* Y, cudaStream_t s);      \
  /* Y[row[e] * ld + col[e]] += vals[e]; positions are distinct, so each has one writer. */        \
  void scatter_pattern_acc(DType dt, const int32_t* row, const int32_t* col, int64_t nnz,           \
                           const void* vals, int64_t ld, void* Y, cudaStream_t s);                  \
  /* Y[i, :] += alpha * sum_{e in [ptr[i], ptr[i+1])} vals[perm ? perm[e] : e] * X[idx[e], :]       \
     for i < n_out: the CSR of S gives Y += alpha S X; the CSC of S (ptr = col_ptr, idx = csc_row,  \
     perm = csc_to_csr) gives Y += alpha Sᵀ X. One owner per output element, entries in order. */   \
  void spmm_acc(DType dt, const int32_t* ptr, const int32_t* idx, const int32_t* perm,              \
                const void* vals, int64_t n_out, const void* X, int64_t k, void* Y, double alpha,   \
                cudaStream_t s);                                                                    \
  /* out[0] = ½ alpha sum_i w[i] (x[i] - t[i])^2, w null -> 1. Deterministic. */                    \
  void sq_error_fwd(DType dt, const void* x, const void* t, const void* w, int64_t n, double alpha, \
                    void* out, cudaStream_t s);                                                     \
  /* gx[i] += g[0] * alpha * w[i] * (x[i] - t[i]);  gt (nullable) gets the negative. */             \
  void sq_error_bwd(DType dt, const void* x, const void* t, const void* w, int64_t n, double alpha, \
                    const void* g, void* gx, void* gt, cudaStream_t s);                             \
  /* For each item: p -= lr * g; g = 0 if zero_grad. Items share dt. */                             \
  void sgd_multi(DType dt, const SgdItem* items, int n_items, bool zero_grad, cudaStream_t s);      \
  /* The fused compressed steps (struct LowrankStep above). */                                       \
  void lowrank_step(const LowrankStep& a, cudaStream_t s);                                          \
  /* out[0] (f64) = sum over (i, j) NOT in the pattern (CSR row_ptr/col_idx, sorted columns) of    \
     (X1[i]·Y1[j] - X2[i]·Y2[j])^2, X1 [rows,k1], Y1 [cols,k1], X2 [rows,k2], Y2 [cols,k2]          \
     (k2 may be 0). Exact, O(rows·cols·(k1+k2)); deterministic. */                                  \
  void lowrank_unobserved_sq_sum(DType dt, const int32_t* row_ptr, const int32_t* col_idx,          \
                                 int64_t rows, int64_t cols, const void* X1, const void* Y1,        \
                                 int64_t k1, const void* X2, const void* Y2, int64_t k2, void* out, \
                                 cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_SPARSE_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_SPARSE_DECLS
}
