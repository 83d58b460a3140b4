// Step capture: record a step function (forward, tape backward, optimizer update: anything whose
// tensors keep their shapes from one call to the next) into a CUDA graph once, then replay it.
//
// How it cooperates with the rest of the runtime:
// - Warm-up: the first `warmup` calls run eagerly (lazily created state such as gradient buffers
//   and GEMM plans exists before the capture; the caching allocator has blocks of the right sizes).
// - Capture: begins a private pool of the caching allocator that lasts as long as this StepGraph:
//   blocks handed out or freed inside the capture are never handed to anyone else, so the addresses
//   baked into the graph stay valid across replays; tensors the step keeps (parameters updated in
//   place, gradient buffers, persistent outputs) are ordinary live allocations. The capture runs in
//   cudaStreamCaptureModeRelaxed so that the allocator may still cudaMalloc a new block inside it
//   (as PyTorch's private pools do). Code that allocates between replays (an eval) is not the pool's:
//   its blocks are reused as usual.
// - What the step may not do: synchronize with the host (Tensor::item, to_double, a device-to-host
//   copy, cudaStreamSynchronize), use another stream other than a SideStream forked from and joined
//   back to the context's stream (runtime/device.h), or depend on host values that change between
//   calls (they are frozen into the graph). A sync inside the capture throws std::runtime_error
//   naming the graph and the likely cause; the failed capture is discarded.
// On the CPU, or with capture disabled, run() simply calls the function.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "runtime/tensor.h"

namespace deeplora {

class StepGraph {
 public:
  struct Options {
    bool enabled = true;   // false: always eager (e.g. --graph off)
    int warmup = 1;        // eager calls before the capture (>= 0)
    std::string name = "step";
  };

  StepGraph(std::function<void()> fn, Device dev, Options opt);
  StepGraph(std::function<void()> fn, Device dev) : StepGraph(std::move(fn), dev, Options{}) {}
  ~StepGraph();
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

  // Runs the step once: eagerly, or by launching the graph (capturing it first if due). Asynchronous
  // on the GPU like any launch.
  void run();
  bool captured() const;
  int64_t calls() const { return calls_; }
  int64_t replays() const { return replays_; }
  int64_t nodes() const;  // nodes of the captured graph (kernels, copies, memsets); 0 before capture
  const std::string& name() const { return opt_.name; }

  // True while a StepGraph on this thread is capturing: code that must not run inside a capture can
  // check it and throw a clear message.
  static bool capturing();

 private:
  struct Impl;
  std::function<void()> fn_;
  Device dev_;
  Options opt_;
  std::unique_ptr<Impl> impl_;
  int64_t calls_ = 0, replays_ = 0;
};

// Throws std::runtime_error("<what>: not allowed while a CUDA graph is being captured ...") when
// StepGraph::capturing().
void check_not_capturing(const char* what);

}  // namespace deeplora
