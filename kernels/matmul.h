// Matrix products (cuBLASLt on the GPU: bf16 in / fp32 accumulate, f32 strict fp32, f64 fp64) and
// causal multi-head self-attention.
#pragma once
#include <cstddef>

#include "kernels/common.h"

namespace deeplora::kernels {
// Row-major GEMM description. C[b] = alpha * op(A[b]) op(B[b]) + beta * Cin[b] (+ bias[n] per row),
// Cin = C unless set. op(A) is M x K: A is stored M x K (lda >= K), or K x M when ta (lda >= M).
// Likewise B: K x N, or N x K when tb. C: M x N (ldc >= N). Strides are element offsets between
// batch entries. A, B, C, Cin, bias all have dtype dt. beta = 1 accumulates (backward passes rely
// on it); beta = 0 never reads Cin (it may hold NaN garbage).
struct Gemm {
  DType dt = DType::f32;
  bool ta = false, tb = false;
  int64_t M = 0, N = 0, K = 0;
  double alpha = 1.0, beta = 0.0;
  const void* A = nullptr; int64_t lda = 0, strideA = 0;
  const void* B = nullptr; int64_t ldb = 0, strideB = 0;
  void* C = nullptr; int64_t ldc = 0, strideC = 0;
  int64_t batch = 1;
  const void* bias = nullptr;  // length N, added to every row of C (forward only)
  // The addend, laid out like C (ldc, strideC); null means C. Lets W_new = W_old - lr X Y go to
  // another buffer in one product (alpha = -lr, beta = 1, Cin = W_old, C = W_new). Either C itself
  // or not overlapping it.
  const void* Cin = nullptr;
  // CUDA only: cuBLASLt's scratch, gemm_workspace_bytes() of device memory (256-byte aligned), used
  // instead of the device context's shared one. Products that may run at once on different streams
  // need one each; the context's is safe only for products on one stream. The CPU ignores it.
  void* workspace = nullptr;
};
}  // namespace deeplora::kernels

#define DEEPLORA_MATMUL_DECLS                                                                       \
  void gemm(const Gemm& g, cudaStream_t s);                                                         \
  /* Size of Gemm::workspace: the CUDA context's cuBLASLt workspace size (plans are picked for it), \
     0 on the CPU. The CUDA one creates the device context on first use. */                         \
  size_t gemm_workspace_bytes();                                                                    \
  /* Causal self-attention over qkv [B, T, 3C] laid out (q | k | v), heads of size C/H inside each. \
     out [B, T, C]; lse [B, H, T] in stat_dtype(dt) (log-sum-exp of the scaled scores per query). \
     Scale 1/sqrt(C/H). */                                                                          \
  void attention_fwd(DType dt, const void* qkv, void* out, void* lse, int64_t B, int64_t T,         \
                     int64_t C, int64_t H, cudaStream_t s);                                         \
  /* dqkv += d(out)/d(qkv) applied to dout, from the saved out and lse; !accumulate: = (dqkv may   \
     hold garbage before). */                                                                       \
  void attention_bwd(DType dt, const void* qkv, const void* out, const void* lse, const void* dout, \
                     void* dqkv, int64_t B, int64_t T, int64_t C, int64_t H, bool accumulate,       \
                     cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_MATMUL_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_MATMUL_DECLS
}
