// The autodiff tape and grad mode.
#include "runtime/tape.h"

#include <fmt/format.h>

#include <stdexcept>

namespace deeplora {

static thread_local bool g_grad_enabled = true;

Tape& tape() {
  static thread_local Tape t;
  return t;
}

bool grad_enabled() { return g_grad_enabled; }

NoGrad::NoGrad() : prev_(g_grad_enabled) { g_grad_enabled = false; }
NoGrad::~NoGrad() { g_grad_enabled = prev_; }

bool needs_grad(std::initializer_list<const Tensor*> inputs) {
  if (!g_grad_enabled) return false;
  bool any = false;
  for (const Tensor* t : inputs)
    if (t && t->defined() && t->requires_grad()) {
      any = true;
      if (t->impl()->is_leaf) tape().note_use(t->impl());
    }
  return any;
}

Tensor grad_buffer(const Tensor& t) {
  TensorImpl* impl = t.impl();
  if (!impl->grad) {
    Tensor g = Tensor::zeros(t.shape(), t.dtype(), t.device());
    impl->grad = g.impl_ptr();
  }
  return Tensor(impl->grad);
}

GradTarget grad_target(const Tensor& t) {
  TensorImpl* impl = t.impl();
  if (impl->grad) return GradTarget{Tensor(impl->grad), false};
  Tensor g = Tensor::empty(t.shape(), t.dtype(), t.device());
  impl->grad = g.impl_ptr();
  return GradTarget{g, true};
}

bool grad_take(const Tensor& t, const Tensor& g) {
  TensorImpl* impl = t.impl();
  if (impl->grad || impl->is_leaf || !g.defined() || t.shape() != g.shape() || t.dtype() != g.dtype() ||
      t.device() != g.device())
    return false;
  impl->grad = g.impl_ptr();
  return true;
}

void Tape::record(std::vector<std::shared_ptr<TensorImpl>> outputs, std::function<void()> backward) {
  for (auto& o : outputs) {
    o->requires_grad = true;
    o->is_leaf = false;
  }
  nodes_.push_back(Node{std::move(outputs), std::move(backward)});
}

void Tape::backward(const Tensor& loss) {
  if (!loss.defined() || loss.numel() != 1 || !is_float(loss.dtype()))
    throw std::invalid_argument(fmt::format("backward: loss must be a one-element float tensor, got {}", loss.desc()));
  if (!loss.requires_grad())
    throw std::invalid_argument("backward: the loss does not require grad (no parameter requires grad, or it was computed under NoGrad)");
  grad_buffer(loss).fill(1.0);
  NoGrad ng;  // backward closures use ops only through kernels; nothing records
  size_t index = nodes_.size();
  for (auto it = nodes_.rbegin(); it != nodes_.rend(); ++it) {
    --index;
    bool any = false;
    for (auto& o : it->outputs) any |= bool(o->grad);
    if (any) it->backward();
    // Intermediate gradients are dead once their producer has consumed them.
    for (auto& o : it->outputs)
      if (!o->is_leaf) o->grad.reset();
    it->backward = nullptr;  // release saved activations early
    if (hook_) hook_(index);
  }
  nodes_.clear();
  first_use_.clear();
}

void Tape::clear() {
  nodes_.clear();
  first_use_.clear();
}

int64_t Tape::first_use(const TensorImpl* t) const {
  auto it = first_use_.find(t);
  return it == first_use_.end() ? -1 : it->second;
}

void Tape::note_use(const TensorImpl* t) { first_use_.emplace(t, int64_t(nodes_.size())); }

void backward(const Tensor& loss) { tape().backward(loss); }

}  // namespace deeplora
