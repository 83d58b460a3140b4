// Kernels of the compressed Deep LoRA product (models/adapters.h): for an adapter with inner factors
// K_1..K_L [k, k] and the outer factor Bt [k, n] (masters, f32 or f64), the forward forms
//   P = K_L ... K_1 (the master dtype, saved for the backward) and W = P Bt [k, n] (compute dtype),
// so that the adapter's branch is x Wᵀ Aᵀ: two activation GEMMs, as LoRA's, instead of three plus a
// chain of k x k products and three casts, each a launch of its own. The backward takes gW [k, n]
// (compute dtype) and accumulates
//   gBt += Pᵀ gW,   gK_i += S_iᵀ (gW Btᵀ) P_{i-1}ᵀ   (S_i = K_L...K_{i+1}, P_{i-1} = K_{i-1}...K_1).
// One launch per direction (two for the backward: column tiles, then the k x k chain); partial sums in
// a fixed order (no floating-point atomics). CUDA: k <= kDeepLoraMaxK, L <= kDeepLoraMaxDepth.
#pragma once
#include "kernels/common.h"

namespace deeplora::kernels {

inline constexpr int kDeepLoraMaxDepth = 8;
inline constexpr int64_t kDeepLoraMaxK = 64;
inline constexpr int64_t kDeepLoraTile = 32;  // columns of Bt per block

struct DeepLoraChain {
  const void* K[kDeepLoraMaxDepth] = {};  // K_1..K_L, [k, k], master dtype
  const void* Bt = nullptr;               // [k, n], master dtype
  void* P = nullptr;                      // [k, k], master dtype: written by fwd, read by bwd
  void* W = nullptr;                      // [k, n], compute dtype (fwd)
  const void* gW = nullptr;               // [k, n], compute dtype (bwd)
  void* gBt = nullptr;                    // [k, n], master dtype, accumulated; null: not wanted
  void* gK[kDeepLoraMaxDepth] = {};       // [k, k], master dtype, accumulated; null: not wanted
  int64_t k = 0, n = 0;
  int depth = 0;
};

// Scratch elements (of the master dtype) the backward needs: one k x k partial per column tile, and
// the prefix products P_1..P_{L-1}.
inline size_t deeplora_chain_scratch_elems(const DeepLoraChain& c) {
  const int64_t tiles = (c.n + kDeepLoraTile - 1) / kDeepLoraTile;
  return size_t((tiles + c.depth) * c.k * c.k);
}

}  // namespace deeplora::kernels

#define DEEPLORA_ADAPTER_DECLS                                                                          \
  /* P = K_L...K_1, W = compute(P Bt). */                                                               \
  void deeplora_chain_fwd(DType master, DType compute, const DeepLoraChain& c, cudaStream_t s);         \
  /* gBt += Pᵀ gW, gK_i += S_iᵀ (gW Btᵀ) P_{i-1}ᵀ; scratch: deeplora_chain_scratch_elems(c)            \
     elements of the master dtype. */                                                                     \
  void deeplora_chain_bwd(DType master, DType compute, const DeepLoraChain& c, void* scratch, cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_ADAPTER_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_ADAPTER_DECLS
}
