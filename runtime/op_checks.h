// Input checks shared by the differentiable ops' translation units (ops.cpp, ops_llama.cpp, ...):
// errors name the op and the tensors (runtime/tensor.h's check).
#pragma once
#include <fmt/format.h>

#include <initializer_list>

#include "runtime/tensor.h"

namespace deeplora::ops::detail {

// Every defined tensor of ts on one device.
inline void same_device(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    if (!t || !t->defined()) continue;
    if (!first) first = t;
    else
      check(t->device() == first->device(), op,
            fmt::format("tensors on different devices: {} and {}", first->desc(), t->desc()));
  }
}

// Every defined tensor of ts a float tensor, all of one dtype.
inline void same_float_dtype(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    if (!t || !t->defined()) continue;
    check(is_float(t->dtype()), op, fmt::format("{} must be a float tensor", t->desc()));
    if (!first) first = t;
    else
      check(t->dtype() == first->dtype(), op,
            fmt::format("dtype mismatch: {} and {}", first->desc(), t->desc()));
  }
}

inline void defined(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) check(t->defined(), op, "undefined input tensor");
}

// A gradient is wanted for t.
inline bool wants(const Tensor& t) { return t.defined() && t.requires_grad(); }

}  // namespace deeplora::ops::detail
