// Pinned staging buffers for batch uploads.
#include "runtime/io/staging.h"

#include <cstring>

#include "runtime/device.h"
#ifdef DEEPLORA_HAVE_CUDA
#include "kernels/cuda_check.h"
#endif

namespace deeplora {

PinnedStaging::~PinnedStaging() {
#ifdef DEEPLORA_HAVE_CUDA
  for (Slot& s : slots_) {
    if (s.done) cudaEventDestroy(static_cast<cudaEvent_t>(s.done));
    if (s.host) cudaFreeHost(s.host);
  }
#endif
}

Tensor PinnedStaging::upload(const std::vector<int32_t>& v, const Shape& s, Device dev) {
  if (dev == Device::cpu) return Tensor::from_ints(v, s, Device::cpu);
#ifdef DEEPLORA_HAVE_CUDA
  check(int64_t(v.size()) == s.numel(), "PinnedStaging::upload", "size does not match the shape");
  Slot& slot = slots_[next_++ % slots_.size()];
  const size_t bytes = v.size() * sizeof(int32_t);
  if (slot.done) CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(slot.done)));
  if (slot.bytes < bytes) {
    if (slot.host) CUDA_CHECK(cudaFreeHost(slot.host));
    CUDA_CHECK(cudaHostAlloc(&slot.host, bytes, cudaHostAllocDefault));
    slot.bytes = bytes;
  }
  if (!slot.done) {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    slot.done = e;
  }
  std::memcpy(slot.host, v.data(), bytes);
  Tensor t = Tensor::empty(s, DType::i32, Device::cuda);
  CUDA_CHECK(cudaMemcpyAsync(t.data(), slot.host, bytes, cudaMemcpyHostToDevice, cuda_ctx().stream));
  CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(slot.done), cuda_ctx().stream));
  return t;
#else
  return Tensor::from_ints(v, s, dev);
#endif
}

}  // namespace deeplora
