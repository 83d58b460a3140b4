// Shared by the nn kernels (embedding, layernorm, cross-entropy): block shape and accurate/fast math
// helpers. Device code only; each .cu includes it inside its own translation unit.
#pragma once
#include <cmath>

#include "kernels/cuda/cuda_utils.cuh"

namespace deeplora::kernels::cuda {
namespace {


using namespace util;

constexpr int kWarpsPerBlock = 8;
constexpr int kRowThreads = 32 * kWarpsPerBlock;

__device__ __forceinline__ int lane_id() { return int(threadIdx.x & 31); }
__device__ __forceinline__ int warp_id() { return int(threadIdx.x >> 5); }

// Accurate enough for softmax (2 ulp near 0, where the dominant terms are) and cheap enough to keep
// cross-entropy memory-bound; f64 uses the full-precision exp.
__device__ __forceinline__ float fast_exp(float v) { return __expf(v); }
__device__ __forceinline__ double fast_exp(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

}  // namespace
}  // namespace deeplora::kernels::cuda
