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
inline int64_t k_update_work_elems(int64_t k, int64_t L) { return (5 * L + 2) * k * (k + 1); }
// Elements of a row's observed-set bitmask: bit j % 32 of word j / 32 is set when (i, j) is observed.
inline int64_t mask_words(int64_t cols) { return (cols + 31) / 32; }

}  // namespace deeplora::kernels

#define DEEPLORA_LOWRANK_DENSE_DECLS                                                                \
  /* R[i * ldr + j] = bit(row0 + i, j) ? alpha * R[i * ldr + j] : 0 for i < rows, j < cols. bits:   \
     [*, mask_words(cols)] uint32 words, row-major. Unobserved entries become exactly 0 (also from   \
     inf / NaN residuals, which the observed ones keep). */                                          \
  void mask_scale_rows(DType dt, const uint32_t* bits, int64_t row0, int64_t rows, int64_t cols,     \
                       double alpha, void* R, int64_t ldr, cudaStream_t s);                          \
  /* For every l (all from the current K): K_l -= lr * (K_L⋯K_{l+1})ᵀ · gKp · (K_{l-1}⋯K_1)ᵀ; then \
     Kp = K_L⋯K_1 of the updated factors. lr = 0 leaves K untouched (gKp is not read) and only forms \
     Kp. work: k_update_work_elems(k, L) elements of dt. Every product sums over its inner index in \
     ascending order: deterministic. One block on the GPU. */                                        \
  void lowrank_k_update(DType dt, const KChain& ks, const void* gKp, double lr, void* Kp, void* work, \
                        cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_LOWRANK_DENSE_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_LOWRANK_DENSE_DECLS
}
