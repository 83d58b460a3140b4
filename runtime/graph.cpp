// StepGraph: warm-up, capture into a CUDA graph inside an allocator private pool, replay.
#include "runtime/graph.h"

#include <fmt/format.h>

#include <stdexcept>

#include "runtime/device.h"
#include "runtime/tape.h"
#ifdef DEEPLORA_HAVE_CUDA
#include "kernels/cuda_check.h"
#endif

namespace deeplora {
namespace {

thread_local int g_capturing = 0;

constexpr const char* kHint =
    "Inside a captured step nothing may synchronize with the host (Tensor::item / to_double, a device-to-host "
    "copy, cudaStreamSynchronize) or use another stream except through SideStream fork/join; run the step eagerly (--graph off) to find the culprit";

}  // namespace

struct StepGraph::Impl {
#ifdef DEEPLORA_HAVE_CUDA
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
#endif
  int pool = 0;  // the allocator pool of this graph's capture (released in the destructor)
};

bool StepGraph::capturing() { return g_capturing > 0; }

void check_not_capturing(const char* what) {
  if (StepGraph::capturing())
    throw std::runtime_error(fmt::format("{}: not allowed while a CUDA graph is being captured (it synchronizes "
                                         "with the host or allocates); move it out of the captured step",
                                         what));
}

StepGraph::StepGraph(std::function<void()> fn, Device dev, Options opt)
    : fn_(std::move(fn)), dev_(dev), opt_(std::move(opt)), impl_(std::make_unique<Impl>()) {
  if (!fn_) throw std::invalid_argument(fmt::format("StepGraph '{}': empty step function", opt_.name));
  if (opt_.warmup < 0) throw std::invalid_argument(fmt::format("StepGraph '{}': warmup must be >= 0", opt_.name));
}

StepGraph::~StepGraph() {
#ifdef DEEPLORA_HAVE_CUDA
  if (impl_->exec) cudaGraphExecDestroy(impl_->exec);
  if (impl_->graph) cudaGraphDestroy(impl_->graph);
  if (impl_->pool) cuda_ctx().allocator.release_pool(impl_->pool);
#endif
}

bool StepGraph::captured() const {
#ifdef DEEPLORA_HAVE_CUDA
  return impl_->exec != nullptr;
#else
  return false;
#endif
}

int64_t StepGraph::nodes() const {
#ifdef DEEPLORA_HAVE_CUDA
  size_t n = 0;
  if (impl_->graph && cudaGraphGetNodes(impl_->graph, nullptr, &n) == cudaSuccess) return int64_t(n);
#endif
  return 0;
}

void StepGraph::run() {
  ++calls_;
#ifdef DEEPLORA_HAVE_CUDA
  if (dev_ != Device::cuda || !opt_.enabled) {
    fn_();
    return;
  }
  DeviceContext& ctx = cuda_ctx();
  if (impl_->exec) {
    CUDA_CHECK(cudaGraphLaunch(impl_->exec, ctx.stream));
    ++replays_;
    return;
  }
  if (calls_ <= opt_.warmup) {
    fn_();
    if (calls_ == opt_.warmup) cuda_sync();  // surface asynchronous errors of the eager steps first
    return;
  }
  // Capture, then launch once (this call's step).
  impl_->pool = ctx.allocator.begin_capture();
  // A failed capture launched nothing: its blocks go back to the cache at once.
  auto drop_pool = [&] {
    ctx.allocator.release_pool(impl_->pool);
    impl_->pool = 0;
  };
  if (cudaError_t e = cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeRelaxed); e != cudaSuccess) {
    drop_pool();
    CUDA_CHECK(e);
  }
  ++g_capturing;
  try {
    fn_();
  } catch (const std::exception& e) {
    --g_capturing;
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(ctx.stream, &g);
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    tape().clear();
    drop_pool();
    throw std::runtime_error(
        fmt::format("StepGraph '{}': the step failed while being captured into a CUDA graph: {}. {}", opt_.name,
                    e.what(), kHint));
  }
  --g_capturing;
  ctx.allocator.end_capture();
  cudaGraph_t g = nullptr;
  cudaError_t err = cudaStreamEndCapture(ctx.stream, &g);
  if (err != cudaSuccess || g == nullptr) {
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    drop_pool();
    throw std::runtime_error(fmt::format("StepGraph '{}': the capture was invalidated ({}). {}", opt_.name,
                                         cudaGetErrorString(err), kHint));
  }
  impl_->graph = g;
  CUDA_CHECK(cudaGraphInstantiate(&impl_->exec, g, 0));
  CUDA_CHECK(cudaGraphLaunch(impl_->exec, ctx.stream));
  ++replays_;
#else
  fn_();
#endif
}

}  // namespace deeplora
