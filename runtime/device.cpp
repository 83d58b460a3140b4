// The per-process CUDA context and the caching allocator; CPU aligned allocation.
#include "runtime/device.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <new>
#include <stdexcept>

#ifdef DEEPLORA_HAVE_CUDA
#include "kernels/cuda_check.h"
#endif

namespace deeplora {

std::string GpuMemory::str() const {
  if (!valid) return "no GPU in use";
  const double g = double(1 << 30);
  return fmt::format("peak {:.2f} GiB (allocator), {:.2f} GiB reserved, {:.2f} / {:.1f} GiB used on the device",
                     double(allocator_peak) / g, double(allocator_reserved) / g, double(device_used) / g,
                     double(device_total) / g);
}

// Large host blocks are cached: a training step frees and re-allocates the same activations every
// step, and fresh pages from the kernel cost more than the step's arithmetic (a tiny model's logits,
// 100 MB at batch 512 tokens, took half the step in page faults and zeroing). Blocks of >= 1 MiB are
// rounded to 1 MiB and kept in size-keyed free lists, at most kCpuCacheMax bytes in all.
namespace {
constexpr size_t kCpuCacheMin = size_t(1) << 20, kCpuCacheMax = size_t(4) << 30;
struct CpuCache {
  std::mutex mu;
  std::multimap<size_t, void*> free;
  std::unordered_map<void*, size_t> size_of;  // every cached-size block handed out or free
  size_t cached = 0;
};
CpuCache& cpu_cache() {
  static CpuCache* c = new CpuCache();  // never destroyed: tensors freed at exit still find it
  return *c;
}
}  // namespace

void* cpu_alloc(size_t bytes) {
  if (bytes < kCpuCacheMin) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return p;
  }
  const size_t sz = (bytes + kCpuCacheMin - 1) / kCpuCacheMin * kCpuCacheMin;
  CpuCache& c = cpu_cache();
  {
    std::lock_guard<std::mutex> lk(c.mu);
    auto it = c.free.lower_bound(sz);
    if (it != c.free.end() && it->first <= 2 * sz) {
      void* p = it->second;
      c.cached -= it->first;
      c.free.erase(it);
      return p;
    }
  }
  void* p = std::aligned_alloc(64, sz);
  if (!p) throw std::bad_alloc();
  std::lock_guard<std::mutex> lk(c.mu);
  c.size_of[p] = sz;
  return p;
}

void cpu_free(void* p) {
  if (!p) return;
  CpuCache& c = cpu_cache();
  std::lock_guard<std::mutex> lk(c.mu);
  auto it = c.size_of.find(p);
  if (it == c.size_of.end()) {
    std::free(p);
    return;
  }
  while (c.cached + it->second > kCpuCacheMax && !c.free.empty()) {  // drop the largest first
    auto big = std::prev(c.free.end());
    c.size_of.erase(big->second);
    std::free(big->second);
    c.cached -= big->first;
    c.free.erase(big);
  }
  c.free.emplace(it->second, p);
  c.cached += it->second;
}

#ifdef DEEPLORA_HAVE_CUDA

static std::string g_unavailable;
static bool g_ctx_created = false;
static int g_selected_device = 0;

static bool probe_cuda() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    g_unavailable = fmt::format("no CUDA device: {}", cudaGetErrorString(e));
    cudaGetLastError();
    return false;
  }
  if (n == 0) {
    g_unavailable = "no CUDA device: cudaGetDeviceCount returned 0";
    return false;
  }
  return true;
}

bool cuda_available() {
  static bool ok = probe_cuda();
  return ok;
}

std::string cuda_unavailable_reason() {
  cuda_available();
  return g_unavailable.empty() ? "CUDA is available" : g_unavailable;
}

void select_device(int device) { g_selected_device = device; }

static DeviceContext* create_ctx() {
  if (!cuda_available()) throw std::runtime_error("CUDA context requested but " + cuda_unavailable_reason());
  auto* c = new DeviceContext();
  c->device = g_selected_device;
  CUDA_CHECK(cudaSetDevice(c->device));
  CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasLtCreate(&c->cublaslt));
  c->lt_workspace_bytes = size_t(64) << 20;  // Hopper kernels want >= 32 MiB for split-K etc.
  CUDA_CHECK(cudaMalloc(&c->lt_workspace, c->lt_workspace_bytes));
  CUSOLVER_CHECK(cusolverDnCreate(&c->cusolver));
  CUSOLVER_CHECK(cusolverDnSetStream(c->cusolver, c->stream));
  CUDA_CHECK(cudaDeviceGetAttribute(&c->sm_count, cudaDevAttrMultiProcessorCount, c->device));
  g_ctx_created = true;
  return c;
}

DeviceContext& cuda_ctx() {
  // Never destroyed: tensors freed during static destruction still find their allocator.
  static DeviceContext* c = create_ctx();
  return *c;
}

void cuda_sync() { CUDA_CHECK(cudaStreamSynchronize(cuda_ctx().stream)); }

size_t CudaAllocator::round(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = size_t(2) << 20;
  if (bytes <= (size_t(1) << 20)) return (bytes + kSmall - 1) / kSmall * kSmall;
  return (bytes + kLarge - 1) / kLarge * kLarge;
}

void* CudaAllocator::allocate(size_t bytes) {
  size_t sz = round(bytes);
  std::lock_guard<std::mutex> lk(mu_);
  ++st_.n_allocs;
  // Best fit, but never hand out a block more than twice the request (keeps big blocks for big asks).
  auto it = free_.lower_bound(sz);
  if (it != free_.end() && it->first <= 2 * sz) {
    void* p = it->second;
    size_t got = it->first;
    free_.erase(it);
    st_.cached -= got;
    live_[p] = got;
    if (capture_pool_ > 0) owners_[p].push_back(capture_pool_);
    st_.in_use += got;
    st_.peak = std::max(st_.peak, st_.in_use);
    return p;
  }
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, sz);
  if (e != cudaSuccess) {
    // Out of memory: give the cache back to the driver and try once more.
    cudaGetLastError();
    for (auto& [s, q] : free_) cudaFree(q);
    free_.clear();
    st_.reserved -= st_.cached;
    st_.cached = 0;
    e = cudaMalloc(&p, sz);
    if (e != cudaSuccess)
      throw std::runtime_error(fmt::format("CUDA allocator: cudaMalloc of {} bytes failed ({}); in use {} bytes",
                                           sz, cudaGetErrorString(e), st_.in_use));
  }
  ++st_.n_device_allocs;
  st_.reserved += sz;
  live_[p] = sz;
  if (capture_pool_ > 0) owners_[p].push_back(capture_pool_);
  st_.in_use += sz;
  st_.peak = std::max(st_.peak, st_.in_use);
  return p;
}

void CudaAllocator::deallocate(void* p) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = live_.find(p);
  if (it == live_.end()) return;  // not ours (should not happen)
  size_t sz = it->second;
  live_.erase(it);
  st_.in_use -= sz;
  if (capture_pool_ > 0) {  // freed inside a capture: the graph uses it on every replay
    std::vector<int>& o = owners_[p];
    if (std::find(o.begin(), o.end(), capture_pool_) == o.end()) o.push_back(capture_pool_);
  }
  if (auto o = owners_.find(p); o != owners_.end()) {
    held_[p] = sz;
    return;
  }
  free_.emplace(sz, p);
  st_.cached += sz;
}

int CudaAllocator::begin_capture() {
  std::lock_guard<std::mutex> lk(mu_);
  if (capture_pool_ > 0) throw std::runtime_error("CUDA allocator: a capture is already in progress");
  capture_pool_ = ++next_pool_;
  return capture_pool_;
}

void CudaAllocator::end_capture() {
  std::lock_guard<std::mutex> lk(mu_);
  capture_pool_ = 0;
}

void CudaAllocator::release_pool(int id) {
  std::lock_guard<std::mutex> lk(mu_);
  if (capture_pool_ == id) capture_pool_ = 0;
  for (auto it = owners_.begin(); it != owners_.end();) {
    std::vector<int>& o = it->second;
    o.erase(std::remove(o.begin(), o.end(), id), o.end());
    if (!o.empty()) {
      ++it;
      continue;
    }
    if (auto h = held_.find(it->first); h != held_.end()) {  // freed already: reusable now
      free_.emplace(h->second, h->first);
      st_.cached += h->second;
      held_.erase(h);
    }
    it = owners_.erase(it);
  }
}

void CudaAllocator::reset_peak() {
  std::lock_guard<std::mutex> lk(mu_);
  st_.peak = st_.in_use;
}

GpuMemory gpu_memory() {
  GpuMemory m;
  if (!g_ctx_created) return m;
  AllocatorStats st = cuda_ctx().allocator.stats();
  m.allocator_peak = st.peak;
  m.allocator_reserved = st.reserved;
  size_t free_b = 0, total = 0;
  if (cudaMemGetInfo(&free_b, &total) == cudaSuccess) {
    m.device_used = total - free_b;
    m.device_total = total;
  } else {
    cudaGetLastError();
  }
  m.valid = true;
  return m;
}

void reset_gpu_peak() {
  if (g_ctx_created) cuda_ctx().allocator.reset_peak();
}

void CudaAllocator::empty_cache() {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& [s, p] : free_) cudaFree(p);
  free_.clear();
  st_.reserved -= st_.cached;
  st_.cached = 0;
}

AllocatorStats CudaAllocator::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return st_;
}

CudaAllocator::~CudaAllocator() = default;

SideStream::SideStream(bool on_gpu) {
  if (!on_gpu) return;
  cuda_ctx();
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  cudaEvent_t f = nullptr, j = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&f, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&j, cudaEventDisableTiming));
  fork_event_ = f;
  join_event_ = j;
}

SideStream::~SideStream() {
  if (!stream_) return;
  cudaEventDestroy(static_cast<cudaEvent_t>(fork_event_));
  cudaEventDestroy(static_cast<cudaEvent_t>(join_event_));
  cudaStreamDestroy(stream_);  // queued work still completes
}

void SideStream::fork() {
  if (!stream_) return;
  CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(fork_event_), cuda_ctx().stream));
  CUDA_CHECK(cudaStreamWaitEvent(stream_, static_cast<cudaEvent_t>(fork_event_), 0));
}

void SideStream::join() {
  if (!stream_) return;
  CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(join_event_), stream_));
  CUDA_CHECK(cudaStreamWaitEvent(cuda_ctx().stream, static_cast<cudaEvent_t>(join_event_), 0));
}

#else  // no CUDA in this build

bool cuda_available() { return false; }
std::string cuda_unavailable_reason() { return "this build has no CUDA (DEEPLORA_CUDA=OFF or no nvcc)"; }
void select_device(int) {}
DeviceContext& cuda_ctx() { throw std::runtime_error("cuda_ctx: " + cuda_unavailable_reason()); }
void cuda_sync() {}
void* CudaAllocator::allocate(size_t) { throw std::runtime_error("CUDA allocator: " + cuda_unavailable_reason()); }
void CudaAllocator::deallocate(void*) {}
int CudaAllocator::begin_capture() { return 0; }
void CudaAllocator::end_capture() {}
void CudaAllocator::release_pool(int) {}
void CudaAllocator::empty_cache() {}
void CudaAllocator::reset_peak() {}
GpuMemory gpu_memory() { return {}; }
void reset_gpu_peak() {}
AllocatorStats CudaAllocator::stats() const { return st_; }
CudaAllocator::~CudaAllocator() = default;
SideStream::SideStream(bool on_gpu) {
  if (on_gpu) throw std::runtime_error("SideStream: " + cuda_unavailable_reason());
}
SideStream::~SideStream() = default;
void SideStream::fork() {}
void SideStream::join() {}

#endif

}  // namespace deeplora
