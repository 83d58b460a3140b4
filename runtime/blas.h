// Matrix products into given buffers, for hand-fused steps that fold an update into the product
// (W_new = W_old − lr·X·Y in one GEMM) and run products on side streams: the runtime's face of
// kernels/matmul.h, checked on tensors (ops::matmul allocates its result and records on the tape; this
// does neither).
#pragma once
#include <cstddef>

#include "kernels/common.h"
#include "runtime/tensor.h"

namespace deeplora {

// C = alpha·op(A)·op(B) + beta·Cin (beta = 1 with Cin, which may be C itself; else 0), 2-D row-major
// tensors of one dtype and device: op(A) [M, K], op(B) [K, N], C [M, N]. On stream s (nullptr: the
// device's stream), with `workspace` as cuBLASLt's scratch when given (products that may run at once
// on different streams need one each; gemm_workspace_bytes() of it). Throws std::invalid_argument
// naming the operand on a mismatch.
void gemm_into(const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C, double alpha,
               const Tensor* Cin = nullptr, cudaStream_t s = nullptr, const Tensor& workspace = Tensor());
// The same on raw row-major buffers with leading dimensions (sub-blocks of tensors), unchecked:
// C = alpha·op(A)·op(B) + beta·C (the contract of kernels::Gemm, Cin = C).
void gemm_ptr(Device dev, DType dt, bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const void* A,
              int64_t lda, const void* B, int64_t ldb, double beta, void* C, int64_t ldc, cudaStream_t s = nullptr);
// Bytes of a private cuBLASLt workspace on `dev` (0 on the CPU).
size_t gemm_workspace_bytes(Device dev);

}  // namespace deeplora
