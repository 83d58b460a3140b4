// Kernels of the dense-GEMM step of compressed deep matrix completion (runtime/lowrank_dense.h):
// the residual over a block of rows, masked to the observed set and scaled, and the update of the
// inner factors K_1..K_L from ∂f/∂(K_L⋯K_1). The big products of that step are cuBLASLt GEMMs
// (kernels/matmul.h); these two kernels are what a GEMM cannot do.
#pragma once
#include <cstddef>

#include "kernels/common.h"

namespace deeplora::kernels {

constexpr int kKChainMaxL = 16;
// The inner factors of W = A·K_L⋯K_1·Bᵀ, k x k row-major each.
struct KChain {
  void* K[kKChainMaxL] = {};
  int64_t L = 0, k = 0;
};
// Elements of dt the K update needs as scratch (CPU: prefix, suffix, two temporaries and the new K
// per layer; CUDA: the same in k x (k + 1) padded tiles, used when they do not fit in shared memory).
inline int64_t k_update_work_elems(int64_t k, int64_t L) { return (5 * L + 3) * k * (k + 1); }
// Elements of a row's observed-set bitmask: bit j % 32 of word j / 32 is set when (i, j) is observed.
inline int64_t mask_words(int64_t cols) { return (cols + 31) / 32; }

// Row chunks of the partial Gram products (lowrank_gram_partials): at most 32, about 64 rows each.
inline int64_t gram_parts(int64_t rows) {
  const int64_t p = rows / 64;
  return p < 1 ? 1 : p > 32 ? 32 : p;
}

}  // namespace deeplora::kernels

#define DEEPLORA_LOWRANK_DENSE_DECLS                                                                \
  /* R[i * ldr + j] = bit(row0 + i, j) ? alpha * R[i * ldr + j] : 0 for i < rows, j < cols. bits:   \
     [*, mask_words(cols)] uint32 words, row-major. Unobserved entries become exactly 0 (also from   \
     inf / NaN residuals, which the observed ones keep). */                                          \
  void mask_scale_rows(DType dt, const uint32_t* bits, int64_t row0, int64_t rows, int64_t cols,     \
                       double alpha, void* R, int64_t ldr, cudaStream_t s);                          \
  /* out[b] = Σ_{i in chunk b} X_iᵀ·Y_i (k x k each, b < nparts; X, Y [rows, k] row-major), chunk b \
     = rows [b·c, min((b+1)·c, rows)), c = ceil(rows / nparts); each sum in ascending i. */          \
  void lowrank_gram_partials(DType dt, const void* X, const void* Y, int64_t rows, int64_t k,        \
                             int64_t nparts, void* out, cudaStream_t s);                             \
  /* p[i, c] -= lr * g[i, c]; dst[i * dst_ld + c] = the new p[i, c]  (p, g [rows, k] row-major). */  \
  void axpy_copy_cols(DType dt, void* p, const void* g, double lr, int64_t rows, int64_t k, void* dst,   \
                      int64_t dst_ld, cudaStream_t s);                                               \
  /* With gKp = Σ_b gKp_parts[b] (nparts k x k partials, summed in order b = 0, 1, ...), for every l  \
     (all from the current K): K_l -= lr * (K_L⋯K_{l+1})ᵀ · gKp · (K_{l-1}⋯K_1)ᵀ; then              \
     Kp = K_L⋯K_1 of the updated factors. lr = 0 leaves K untouched (gKp is not read) and only forms \
     Kp. work: k_update_work_elems(k, L) elements of dt. Every product sums over its inner index in \
     ascending order: deterministic. One block on the GPU. */                                        \
  void lowrank_k_update(DType dt, const KChain& ks, const void* gKp_parts, int64_t nparts, double lr, \
                        void* Kp, void* work, cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_LOWRANK_DENSE_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_LOWRANK_DENSE_DECLS
}
