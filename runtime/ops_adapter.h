// The compressed Deep LoRA product as one differentiable op (kernels/adapter.h).
#pragma once
#include <vector>

#include "runtime/tape.h"
#include "runtime/tensor.h"

namespace deeplora::ops {

// W = (K_L ... K_1) Bt in dtype `compute`: K = {K_1, ..., K_L}, each [k, k], and Bt [k, n], masters of
// one float dtype on one device; W [k, n]. Gradients reach every K_i and Bt that requires one. Fused
// (one launch forward, two backward) where the kernels take the shape (CPU: always; CUDA: f32 masters,
// k <= 64, L <= 8); otherwise the same value through matmul and cast.
Tensor deeplora_product(const std::vector<Tensor>& K, const Tensor& Bt, DType compute);
bool deeplora_product_fused(Device d, DType master, DType compute, int64_t k, int depth);

}  // namespace deeplora::ops
