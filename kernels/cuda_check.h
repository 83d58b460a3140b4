// Error checks for CUDA, cuBLASLt, cuSOLVER and NCCL calls: throw with file:line and the library's
// error string. Include only from code compiled with DEEPLORA_HAVE_CUDA.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <stdexcept>
#include <string>

namespace deeplora {
[[noreturn]] void throw_cuda_error(const char* what, const char* err, const char* file, int line);
const char* cublas_status_string(cublasStatus_t s);
const char* cusolver_status_string(cusolverStatus_t s);
}  // namespace deeplora

#define CUDA_CHECK(call)                                                                     \
  do {                                                                                       \
    cudaError_t err_ = (call);                                                               \
    if (err_ != cudaSuccess) ::deeplora::throw_cuda_error(#call, cudaGetErrorString(err_), __FILE__, __LINE__); \
  } while (0)
#define CUBLAS_CHECK(call)                                                                   \
  do {                                                                                       \
    cublasStatus_t st_ = (call);                                                             \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                        \
      ::deeplora::throw_cuda_error(#call, ::deeplora::cublas_status_string(st_), __FILE__, __LINE__); \
  } while (0)
#define CUSOLVER_CHECK(call)                                                                 \
  do {                                                                                       \
    cusolverStatus_t st_ = (call);                                                           \
    if (st_ != CUSOLVER_STATUS_SUCCESS)                                                      \
      ::deeplora::throw_cuda_error(#call, ::deeplora::cusolver_status_string(st_), __FILE__, __LINE__); \
  } while (0)
// After a kernel launch: launch-configuration errors surface here, at the right line.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
