// Private to kernels/cuda: the cuBLASLt GEMM behind kernels::cuda::gemm, open to a wider output type
// so attention can keep bf16 products' scores and gradients in f32.
#pragma once
#include "kernels/matmul.h"

namespace deeplora::kernels::cuda::detail {
// gemm() with C (and Cin, bias) of dtype c_dt while A and B have g.dt. Supported (A/B, C):
// (f32, f32), (bf16, bf16), (bf16, f32), (f64, f64); anything else throws.
void gemm_mixed(const Gemm& g, DType c_dt, cudaStream_t s);
}  // namespace deeplora::kernels::cuda::detail
