// runtime/blas.h: shape checks, then kernels::gemm on the tensors' device.
#include "runtime/blas.h"

#include <fmt/format.h>

#include <stdexcept>

#include "kernels/matmul.h"
#include "runtime/dispatch.h"

namespace deeplora {

namespace {

kernels::Gemm make_gemm(DType dt, bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const void* A,
                        int64_t lda, const void* B, int64_t ldb, double beta, void* C, int64_t ldc) {
  kernels::Gemm g;
  g.dt = dt;
  g.ta = ta;
  g.tb = tb;
  g.M = M;
  g.N = N;
  g.K = K;
  g.A = A;
  g.lda = lda;
  g.B = B;
  g.ldb = ldb;
  g.C = C;
  g.ldc = ldc;
  g.alpha = alpha;
  g.beta = beta;
  return g;
}

}  // namespace

void gemm_ptr(Device dev, DType dt, bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const void* A,
              int64_t lda, const void* B, int64_t ldb, double beta, void* C, int64_t ldc, cudaStream_t s) {
  DEEPLORA_DISPATCH(dev, gemm, make_gemm(dt, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc),
                    s ? s : stream_for(dev));
}

void gemm_into(const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C, double alpha, const Tensor* Cin,
               cudaStream_t s, const Tensor& workspace) {
  auto bad = [](const std::string& m) { throw std::invalid_argument("gemm_into: " + m); };
  if (!A.defined() || !B.defined() || !C.defined()) bad("undefined operand");
  if (A.ndim() != 2 || B.ndim() != 2 || C.ndim() != 2)
    bad(fmt::format("2-D operands only (A {}, B {}, C {})", A.desc(), B.desc(), C.desc()));
  const Device dev = C.device();
  const DType dt = C.dtype();
  for (const Tensor* t : {&A, &B})
    if (t->device() != dev || t->dtype() != dt) bad(fmt::format("{} must be {} on {}", t->desc(), dtype_name(dt), device_name(dev)));
  const int64_t M = ta ? A.dim(1) : A.dim(0), K = ta ? A.dim(0) : A.dim(1);
  const int64_t KB = tb ? B.dim(1) : B.dim(0), N = tb ? B.dim(0) : B.dim(1);
  if (K != KB) bad(fmt::format("inner dimensions differ: op(A) {}x{}, op(B) {}x{}", M, K, KB, N));
  if (C.dim(0) != M || C.dim(1) != N) bad(fmt::format("C {} must be [{}, {}]", C.desc(), M, N));
  if (Cin && (!Cin->defined() || Cin->shape() != C.shape() || Cin->dtype() != dt || Cin->device() != dev))
    bad(fmt::format("Cin must be laid out like C {}", C.desc()));
  kernels::Gemm g = make_gemm(dt, ta, tb, M, N, K, alpha, A.data(), A.dim(1), B.data(), B.dim(1), Cin ? 1.0 : 0.0,
                              C.data(), N);
  g.Cin = Cin ? Cin->data() : nullptr;
  if (workspace.defined()) {
    if (workspace.device() != dev || workspace.nbytes() < gemm_workspace_bytes(dev))
      bad(fmt::format("the workspace must hold {} bytes on {}", gemm_workspace_bytes(dev), device_name(dev)));
    g.workspace = workspace.data();
  }
  DEEPLORA_DISPATCH(dev, gemm, g, s ? s : stream_for(dev));
}

size_t gemm_workspace_bytes(Device dev) { return DEEPLORA_DISPATCH(dev, gemm_workspace_bytes); }

}  // namespace deeplora
