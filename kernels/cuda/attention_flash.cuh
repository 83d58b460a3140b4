// Private to kernels/cuda: the fused (flash-style) causal attention forward for bf16 heads of size 64.
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace deeplora::kernels::cuda::detail {
// The head size both fused kernels are built for, and the softmax scale that follows from it:
// scores are q·k / sqrt(hd); the kernels exponentiate in base 2, so they also take log2(e) / sqrt(hd).
constexpr int kFlashHd = 64;
constexpr double kLog2e = 1.4426950408889634;
inline float flash_scale() { return float(1.0 / __builtin_sqrt(double(kFlashHd))); }
inline float flash_scale_log2() { return float(kLog2e / __builtin_sqrt(double(kFlashHd))); }
// True when the fused kernel takes this call: head size 64 and qkv 16-byte aligned.
bool flash_fwd_supported(const void* qkv, const void* out, int64_t C, int64_t H);
// Same contract as attention_fwd for dt = bf16; lse is f32 [B, H, T].
void flash_fwd_bf16(const void* qkv, void* out, float* lse, int64_t B, int64_t T, int64_t C, int64_t H,
                    cudaStream_t s);
// True when the fused backward takes this call: head size 64, qkv / out / dout 16-byte aligned, dqkv 4-byte.
bool flash_bwd_supported(const void* qkv, const void* out, const void* dout, const void* dqkv, int64_t C,
                         int64_t H);
// Same contract as attention_bwd for dt = bf16 (dqkv += when accumulate, else =; every element is
// stored once); lse is f32 [B, H, T]. Deterministic.
void flash_bwd_bf16(const void* qkv, const void* out, const float* lse, const void* dout, void* dqkv, int64_t B,
                    int64_t T, int64_t C, int64_t H, bool accumulate, cudaStream_t s);
}  // namespace deeplora::kernels::cuda::detail
