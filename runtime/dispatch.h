// Picks the backend of a kernel launcher by device. Without CUDA in the build, CUDA tensors cannot
// exist, so only the CPU twin is referenced (and the CUDA symbols need not link).
#pragma once
#include "runtime/device.h"
#include "runtime/tensor.h"

#ifdef DEEPLORA_HAVE_CUDA
#define DEEPLORA_DISPATCH(dev, fn, ...)                                                     \
  ((dev) == ::deeplora::Device::cuda ? ::deeplora::kernels::cuda::fn(__VA_ARGS__)           \
                                     : ::deeplora::kernels::cpu::fn(__VA_ARGS__))
namespace deeplora {
inline cudaStream_t stream_for(Device d) { return d == Device::cuda ? cuda_ctx().stream : nullptr; }
}
#else
#define DEEPLORA_DISPATCH(dev, fn, ...) ::deeplora::kernels::cpu::fn(__VA_ARGS__)
namespace deeplora {
inline cudaStream_t stream_for(Device) { return nullptr; }
}
#endif
