// Host-to-device upload of token batches through pinned (page-locked) staging buffers: the copy is
// queued on the compute stream without a host sync, so it runs in order with the kernels while the
// host goes on preparing the next batch. CPU tensors are plain copies.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "runtime/tensor.h"

namespace deeplora {

class PinnedStaging {
 public:
  PinnedStaging() = default;
  ~PinnedStaging();
  PinnedStaging(const PinnedStaging&) = delete;
  PinnedStaging& operator=(const PinnedStaging&) = delete;
  // An i32 tensor of shape s on dev holding v. On CUDA the copy is asynchronous: the staging buffer
  // (two in rotation) is reused only once the copy that used it last has completed.
  Tensor upload(const std::vector<int32_t>& v, const Shape& s, Device dev);

 private:
  struct Slot {
    void* host = nullptr;
    size_t bytes = 0;
    void* done = nullptr;  // cudaEvent_t recorded after the copy
  };
  std::array<Slot, 4> slots_{};
  size_t next_ = 0;
};

}  // namespace deeplora
