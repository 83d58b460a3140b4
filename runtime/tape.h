// The autodiff tape: ops append backward closures in execution order; backward(loss) runs them in
// reverse. Gradients accumulate into TensorImpl::grad. No graph library, no operator overloading.
#pragma once
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "runtime/tensor.h"

namespace deeplora {

class Tape {
 public:
  // `outputs`: the op's results; after their node has run, non-leaf outputs drop their grad.
  void record(std::vector<std::shared_ptr<TensorImpl>> outputs, std::function<void()> backward);
  // Seeds d(loss)/d(loss) = 1 (loss must be a one-element float tensor), runs every node in reverse,
  // then clears the tape (saved activations are released).
  void backward(const Tensor& loss);
  void clear();
  size_t size() const { return nodes_.size(); }

  // Index of the first node recorded (since the last backward) that read the leaf `t`, or -1.
  // Its gradient is complete once backward has run that node: data-parallel reducers use this to
  // launch a bucket's all-reduce while the rest of backward runs.
  int64_t first_use(const TensorImpl* t) const;
  void note_use(const TensorImpl* t);
  // Called after each node's backward with the node's index (nodes run from size()-1 down to 0).
  void set_post_node_hook(std::function<void(size_t)> hook) { hook_ = std::move(hook); }

 private:
  struct Node {
    std::vector<std::shared_ptr<TensorImpl>> outputs;
    std::function<void()> backward;
  };
  std::vector<Node> nodes_;
  std::unordered_map<const TensorImpl*, int64_t> first_use_;
  std::function<void(size_t)> hook_;
};

// The thread's tape (one per thread; training runs one thread per GPU).
Tape& tape();
// Whether ops record on the tape (thread-local; on by default).
bool grad_enabled();

// RAII: ops inside record nothing and produce tensors that do not require grad.
class NoGrad {
 public:
  NoGrad();
  ~NoGrad();
  NoGrad(const NoGrad&) = delete;
  NoGrad& operator=(const NoGrad&) = delete;

 private:
  bool prev_;
};

// True if grad mode is on and any input requires grad: then the op must record a node.
bool needs_grad(std::initializer_list<const Tensor*> inputs);
// The gradient buffer of t, allocated as zeros on first use; backward kernels accumulate into it.
Tensor grad_buffer(const Tensor& t);
// A backward closure's target for t's gradient: the buffer, and `fresh` when this is t's first
// contribution. A fresh buffer is uninitialized: the closure writes it whole (a GEMM with beta = 0, a
// copy) instead of zero-filling it and accumulating.
struct GradTarget {
  Tensor g;
  bool fresh = false;
};
GradTarget grad_target(const Tensor& t);
// Gives t the gradient g (a node's output gradient, dropped once the node has run) as its own, with no
// copy, when t is an intermediate (not a leaf: leaves keep their gradients after backward) that has no
// gradient yet and matches g in shape, dtype and device. Returns false, doing nothing, otherwise.
bool grad_take(const Tensor& t, const Tensor& g);

void backward(const Tensor& loss);  // tape().backward(loss)

}  // namespace deeplora
