// KV-cache decode ops: validation (errors name the op and the shapes) and kernel dispatch.
#include "runtime/ops_cache.h"

#include <fmt/format.h>

#include <stdexcept>
#include <vector>

#include "kernels/attention_cache.h"
#include "runtime/dispatch.h"

namespace deeplora::ops {
namespace {

#define DL_CK(dev, fn, ...) DEEPLORA_DISPATCH(dev, fn, __VA_ARGS__)

struct CacheDims {
  int64_t B, Tn, C, H, Tmax, hd;
};

// Everything both cache ops require of their inputs; returns the sizes.
CacheDims check_cache(const char* op, const Tensor& qkv, const Tensor& kc, const Tensor& vc, const Tensor& start,
                      int64_t n_head) {
  check(qkv.defined() && kc.defined() && vc.defined() && start.defined(), op, "undefined input tensor");
  if (needs_grad({&qkv, &kc, &vc}))
    throw std::logic_error(fmt::format("{}: inference only, but grad mode is on and an input requires grad ({}); "
                                       "run it under NoGrad",
                                       op, qkv.requires_grad() ? qkv.desc() : kc.requires_grad() ? kc.desc() : vc.desc()));
  check(is_float(qkv.dtype()), op, fmt::format("qkv {} must be a float tensor", qkv.desc()));
  check(qkv.ndim() == 3 && qkv.dim(2) % 3 == 0 && qkv.dim(2) > 0, op,
        fmt::format("qkv must be [B, Tn, 3C], got {}", qkv.desc()));
  CacheDims d{qkv.dim(0), qkv.dim(1), qkv.dim(2) / 3, n_head, 0, 0};
  check(n_head > 0 && d.C % n_head == 0, op,
        fmt::format("n_head {} must divide the channel count {} of {}", n_head, d.C, qkv.desc()));
  d.hd = d.C / n_head;
  check(d.hd % 8 == 0 && d.hd <= 256, op,
        fmt::format("head size {} (C={} / n_head={}) must be a multiple of 8 and at most 256", d.hd, d.C, n_head));
  for (const Tensor* t : {&kc, &vc}) {
    check(t->dtype() == qkv.dtype() && t->device() == qkv.device(), op,
          fmt::format("cache {} must have the dtype and device of qkv {}", t->desc(), qkv.desc()));
    check(t->ndim() == 4 && t->dim(0) == d.B && t->dim(1) == n_head && t->dim(3) == d.hd && t->dim(2) > 0, op,
          fmt::format("cache {} must be [B={}, n_head={}, Tmax > 0, hd={}] for qkv {}", t->desc(), d.B, n_head, d.hd,
                      qkv.desc()));
  }
  check(kc.shape() == vc.shape(), op, fmt::format("k cache {} and v cache {} differ in shape", kc.desc(), vc.desc()));
  d.Tmax = kc.dim(2);
  check(start.dtype() == DType::i32 && start.ndim() == 1 && start.dim(0) == d.B, op,
        fmt::format("start must be i32 [B={}], got {}", d.B, start.desc()));
  check(start.device() == qkv.device(), op,
        fmt::format("start {} must be on the device of qkv {}", start.desc(), qkv.desc()));
  if (start.device() == Device::cpu) {  // on the GPU this would need a sync: the kernels skip / clamp instead
    const int32_t* s = start.data_as<int32_t>();
    for (int64_t b = 0; b < d.B; ++b)
      check(s[b] >= 0 && int64_t(s[b]) + d.Tn <= d.Tmax, op,
            fmt::format("row {}: positions {} .. {} are outside the cache {} (Tmax = {})", b, s[b],
                        int64_t(s[b]) + d.Tn - 1, kc.desc(), d.Tmax));
  }
  return d;
}

}  // namespace

void attention_cache_write(const Tensor& qkv, Tensor& k_cache, Tensor& v_cache, const Tensor& start, int64_t n_head) {
  const CacheDims d = check_cache("attention_cache_write", qkv, k_cache, v_cache, start, n_head);
  check(k_cache.data() != v_cache.data(), "attention_cache_write",
        fmt::format("k cache {} and v cache {} share memory", k_cache.desc(), v_cache.desc()));
  const Device dev = qkv.device();
  DL_CK(dev, attention_cache_write, qkv.dtype(), qkv.data(), k_cache.data(), v_cache.data(),
        start.data_as<int32_t>(), d.B, d.Tn, d.C, d.H, d.Tmax, stream_for(dev));
}

Tensor attention_cached(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, const Tensor& start,
                        int64_t n_head) {
  const CacheDims d = check_cache("attention_cached", qkv, k_cache, v_cache, start, n_head);
  const Device dev = qkv.device();
  Tensor out = Tensor::empty(Shape{d.B, d.Tn, d.C}, qkv.dtype(), dev);
  DL_CK(dev, attention_cache_fwd, qkv.dtype(), qkv.data(), k_cache.data(), v_cache.data(), start.data_as<int32_t>(),
        out.data(), d.B, d.Tn, d.C, d.H, d.Tmax, stream_for(dev));
  return out;
}

Tensor argmax_rows(const Tensor& x, int64_t n_valid) {
  check(x.defined(), "argmax_rows", "undefined input tensor");
  check(is_float(x.dtype()) && x.ndim() >= 1 && x.dim(-1) > 0, "argmax_rows",
        fmt::format("x must be a float tensor [..., stride > 0], got {}", x.desc()));
  const int64_t stride = x.dim(-1), rows = x.numel() / stride, n = n_valid == 0 ? stride : n_valid;
  check(n > 0 && n <= stride, "argmax_rows",
        fmt::format("n_valid {} must be in [1, {}] (the last dim of {}), or 0 for all", n_valid, stride, x.desc()));
  const Device dev = x.device();
  Tensor out = Tensor::empty(Shape{rows}, DType::i32, dev);
  DL_CK(dev, argmax_rows, x.dtype(), x.data(), rows, n, stride, out.data_as<int32_t>(), stream_for(dev));
  return out;
}

}  // namespace deeplora::ops
