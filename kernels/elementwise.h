// Elementwise kernels, casts, RNG fills, reductions. "acc" launchers accumulate (y += ...), which is
// how every backward kernel writes: gradient buffers start at zero and sum their contributions.
#pragma once
#include "kernels/common.h"

namespace deeplora::kernels {
// Up to kCastGroupMax tensors of one source and one destination dtype, converted in one launch (the
// pointers travel by value in the launch's parameters, as PyTorch's multi_tensor_apply does, so the
// launch is capturable without a device-side table). n[i] = 0 skips entry i.
inline constexpr int kCastGroupMax = 32;
struct CastGroup {
  const void* src[kCastGroupMax] = {};
  void* dst[kCastGroupMax] = {};
  int64_t n[kCastGroupMax] = {};
  int count = 0;
};
}  // namespace deeplora::kernels

#define DEEPLORA_ELEMENTWISE_DECLS                                                                  \
  /* y[i] = v */                                                                                    \
  void fill(DType dt, void* y, int64_t n, double v, cudaStream_t s);                                \
  /* Counter-based RNG (splitmix64 of seed and i, Box-Muller for normals): the same numbers on      \
     every backend. */                                                                              \
  void rand_normal(DType dt, void* y, int64_t n, uint64_t seed, double stddev, cudaStream_t s);     \
  void rand_uniform(DType dt, void* y, int64_t n, uint64_t seed, double lo, double hi, cudaStream_t s); \
  /* y = x converted (round to nearest even into bf16; i32 <-> float by value). */                  \
  void cast(DType src, const void* x, DType dst, void* y, int64_t n, cudaStream_t s);               \
  /* y += x converted to y's dtype, added in y's precision (a cast's backward: one pass, no temporary; \
     floats only). */                                                                               \
  void cast_acc(DType src, const void* x, DType dst, void* y, int64_t n, cudaStream_t s);           \
  /* dst[i] = (or += with accumulate) src[i] converted, for every entry of g, in one launch. */       \
  void cast_group(DType src, DType dst, const CastGroup& g, bool accumulate, cudaStream_t s);       \
  /* y = a + b */                                                                                   \
  void add(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t s);             \
  /* y += alpha * x */                                                                              \
  void acc(DType dt, const void* x, void* y, int64_t n, double alpha, cudaStream_t s);              \
  /* y = a * b */                                                                                   \
  void mul(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t s);             \
  /* y += a * b */                                                                                  \
  void mul_acc(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t s);         \
  /* y = alpha * x */                                                                               \
  void scale(DType dt, const void* x, void* y, int64_t n, double alpha, cudaStream_t s);            \
  /* y[i] += alpha * g[0]  (g: one element of dtype dt, on the same device) */                      \
  void acc_broadcast(DType dt, const void* g, void* y, int64_t n, double alpha, cudaStream_t s);    \
  /* GELU, tanh form as GPT-2: y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */               \
  void gelu_fwd(DType dt, const void* x, void* y, int64_t n, cudaStream_t s);                       \
  /* dx += gelu'(x) * dy (accumulate), or dx = gelu'(x) * dy (dx may hold garbage before) */        \
  void gelu_bwd(DType dt, const void* x, const void* dy, void* dx, int64_t n, bool accumulate,      \
                cudaStream_t s);                                                                    \
  /* out[0] = sum x (deterministic tree order; accumulates in f32, f64 for f64), out dtype = dt */  \
  void sum(DType dt, const void* x, int64_t n, void* out, cudaStream_t s);                          \
  /* y[c] += sum_r x[r, c]  (bias gradients), deterministic */                                      \
  void colsum_acc(DType dt, const void* x, int64_t rows, int64_t cols, void* y, cudaStream_t s);    \
  /* y[r, c] += b[c]  (bias add when no GEMM epilogue is used) */                                   \
  void add_rowvec(DType dt, const void* b, void* y, int64_t rows, int64_t cols, cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_ELEMENTWISE_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_ELEMENTWISE_DECLS
}
