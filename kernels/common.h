// Shared by every kernel family: the stream type (opaque without CUDA headers) and the rule for
// statistics' precision. Each family header declares the same launchers in kernels::cpu (plain C++
// reference) and kernels::cuda (.cu); ops pick one by the tensors' device.
#pragma once
#include <cstdint>

#include "kernels/dtype.h"

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace deeplora::kernels {
// Per-row statistics (layernorm mean/rstd, softmax log-sum-exp, per-row losses) are kept in f64 for
// f64 tensors and in f32 otherwise.
inline DType stat_dtype(DType t) { return t == DType::f64 ? DType::f64 : DType::f32; }
}  // namespace deeplora::kernels
