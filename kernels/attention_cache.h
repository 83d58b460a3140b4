// KV cache for incremental decoding: write new keys/values into per-head caches, causal attention of
// new queries over the cache, and a row argmax for greedy sampling on the device.
#pragma once
#include "kernels/common.h"

// Layouts: qkv [B, Tn, 3C] laid out (q | k | v), heads of size hd = C/H inside each (as attention_fwd);
// caches [B, H, Tmax, hd] in the same dtype; start: B i32 on the tensors' device, row b's new tokens
// at positions start[b] .. start[b]+Tn-1. Nothing reads start on the host, so one captured step
// serves every position.
#define DEEPLORA_ATTENTION_CACHE_DECLS                                                                 \
  /* cache[b, h, start[b]+t, :] = k / v of qkv[b, t] for head h. Positions outside [0, Tmax) are      \
     skipped (not written). */                                                                       \
  void attention_cache_write(DType dt, const void* qkv, void* kcache, void* vcache,                   \
                             const int32_t* start, int64_t B, int64_t Tn, int64_t C, int64_t H,       \
                             int64_t Tmax, cudaStream_t s);                                           \
  /* out [B, Tn, C]: the query of qkv[b, t] (head h) at p = start[b]+t attends over cache positions   \
     0 .. min(p, Tmax-1); scale 1/sqrt(hd); f32 math (f64 for f64). p < 0 gives zeros. Equals         \
     attention_fwd over the whole sequence once the cache holds it. CUDA: hd <= 256, a multiple of 8, \
     caches 16-byte aligned. */                                                                      \
  void attention_cache_fwd(DType dt, const void* qkv, const void* kcache, const void* vcache,         \
                           const int32_t* start, void* out, int64_t B, int64_t Tn, int64_t C,         \
                           int64_t H, int64_t Tmax, cudaStream_t s);                                  \
  /* out[r] = argmax of x[r*row_stride + 0 .. n_valid): the smallest index on ties; NaN is never      \
     chosen unless the whole row is NaN (then 0). n_valid >= 1. */                                    \
  void argmax_rows(DType dt, const void* x, int64_t rows, int64_t n_valid, int64_t row_stride,        \
                   int32_t* out, cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_ATTENTION_CACHE_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_ATTENTION_CACHE_DECLS
}
