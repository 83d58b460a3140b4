// The base both layers include (kernels/dtype.h, kernels/cuda_check.h): dtype names and the CUDA /
// cuBLASLt / cuSOLVER error helpers, defined here in the lowest layer.
#include <fmt/format.h>

#include <stdexcept>
#include <string>

#include "kernels/dtype.h"
#ifdef DEEPLORA_HAVE_CUDA
#include "kernels/cuda_check.h"
#endif

namespace deeplora {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
  }
  return "?";
}

DType dtype_from_name(const char* s) {
  std::string n(s);
  if (n == "f32" || n == "float32" || n == "fp32") return DType::f32;
  if (n == "bf16" || n == "bfloat16") return DType::bf16;
  if (n == "f64" || n == "float64" || n == "fp64") return DType::f64;
  if (n == "i32" || n == "int32") return DType::i32;
  throw std::invalid_argument(fmt::format("unknown dtype '{}' (expected f32, bf16, f64 or i32)", n));
}

#ifdef DEEPLORA_HAVE_CUDA

void throw_cuda_error(const char* what, const char* err, const char* file, int line) {
  throw std::runtime_error(fmt::format("{}:{}: {} failed: {}", file, line, what, err));
}

const char* cublas_status_string(cublasStatus_t s) { return cublasLtGetStatusString(s); }

const char* cusolver_status_string(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cusolver error";
  }
}

#endif  // DEEPLORA_HAVE_CUDA

}  // namespace deeplora
