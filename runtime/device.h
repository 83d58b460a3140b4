// Per-process CUDA context: device, stream, cuBLASLt and cuSOLVER handles, the caching allocator.
// Declared without CUDA headers so CPU-only code can include it; handles are opaque here.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
struct cublasLtContext;
struct cusolverDnContext;

namespace deeplora {

// True when this build has CUDA and a GPU can be used. Never throws.
bool cuda_available();
// Why cuda_available() is false ("built without CUDA", "no CUDA device: ..."), for skip messages.
std::string cuda_unavailable_reason();

struct AllocatorStats {
  size_t in_use = 0;        // bytes handed out and not yet freed
  size_t peak = 0;          // max of in_use
  size_t cached = 0;        // bytes held in free lists
  size_t reserved = 0;      // bytes obtained from cudaMalloc in all
  size_t n_device_allocs = 0;  // cudaMalloc calls
  size_t n_allocs = 0;      // allocate() calls
};

// Caching allocator: blocks are rounded up (512 B small, 2 MiB large) and kept in size-keyed free
// lists; after warm-up a training step does no cudaMalloc/cudaFree. Frees are stream-ordered on the
// context's single stream, so a freed block may be reused by the next kernel without a sync.
class CudaAllocator {
 public:
  void* allocate(size_t bytes);
  void deallocate(void* p);
  void empty_cache();  // cudaFree every cached block
  AllocatorStats stats() const;
  ~CudaAllocator();
  // Private pools, one per captured CUDA graph, so that the addresses baked into the graph stay valid
  // across its replays. Between begin_capture and end_capture every block handed out or freed belongs
  // to the pool; a freed block of a live pool is kept aside (reused by no one) until release_pool.
  // Blocks allocated and freed by other code between replays are not the pool's: they are reused as
  // usual (an eval between training steps does not grow the cache).
  int begin_capture();  // a new pool, capturing from now on; returns its id
  void end_capture();
  void release_pool(int id);  // the graph is gone: its held blocks go back to the free lists
  void reset_peak();

 private:
  static size_t round(size_t bytes);
  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_;           // size -> block
  std::unordered_map<void*, size_t> live_;      // block -> size
  std::unordered_map<void*, std::vector<int>> owners_;  // block -> live pools that captured it
  std::unordered_map<void*, size_t> held_;  // freed blocks some live pool still owns
  int capture_pool_ = 0, next_pool_ = 0;
  AllocatorStats st_;
};

struct DeviceContext {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasLtContext* cublaslt = nullptr;
  void* lt_workspace = nullptr;
  size_t lt_workspace_bytes = 0;
  cusolverDnContext* cusolver = nullptr;
  CudaAllocator allocator;
  int sm_count = 0;
};

// A second stream for work that may overlap the context's stream, ordered against it by events
// only: fork() makes it wait for everything queued so far on the context's stream, join() makes the
// context's stream wait for everything queued so far on it. Both are captured by a CUDA graph like
// any launch (a forked stream joins the capture; join before the capture ends). Tensors used on it
// must be allocated before and freed after (the caching allocator orders frees on the context's
// stream only). On the CPU, or without CUDA, get() is null and fork/join do nothing: work runs in
// the order it is issued.
class SideStream {
 public:
  explicit SideStream(bool on_gpu);
  ~SideStream();
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  cudaStream_t get() const { return stream_; }
  void fork();
  void join();

 private:
  cudaStream_t stream_ = nullptr;
  void* fork_event_ = nullptr;  // cudaEvent_t
  void* join_event_ = nullptr;
};

// GPU memory for run summaries: the caching allocator's high-water mark and reservation, and the
// device's use as cudaMemGetInfo reports it (other processes and the CUDA context included). All zero
// when no CUDA context exists (CPU runs).
struct GpuMemory {
  size_t allocator_peak = 0, allocator_reserved = 0, device_used = 0, device_total = 0;
  bool valid = false;
  std::string str() const;  // "peak 1.23 GiB (allocator), 2.00 GiB reserved, 3.10 / 139.8 GiB on the device"
};
GpuMemory gpu_memory();
// Starts the allocator's high-water mark afresh (at the current use).
void reset_gpu_peak();

// The process's context, created on first use on `select_device` (default 0). Throws if no GPU.
DeviceContext& cuda_ctx();
void select_device(int device);  // before first cuda_ctx(); used by the distributed launcher
void cuda_sync();                // cudaStreamSynchronize(ctx.stream), throws on a pending error
void* cpu_alloc(size_t bytes);
void cpu_free(void* p);

}  // namespace deeplora
