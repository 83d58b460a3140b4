// Private to kernels/cuda: the fused (flash-style) causal attention forward for bf16 heads of size 64.
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace deeplora::kernels::cuda::detail {
// True when the fused kernel takes this call: head size 64 and qkv 16-byte aligned.
bool flash_fwd_supported(const void* qkv, const void* out, int64_t C, int64_t H);
// Same contract as attention_fwd for dt = bf16; lse is f32 [B, H, T].
void flash_fwd_bf16(const void* qkv, void* out, float* lse, int64_t B, int64_t T, int64_t C, int64_t H,
                    cudaStream_t s);
}  // namespace deeplora::kernels::cuda::detail
