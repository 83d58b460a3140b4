// Llama-family ops: validation (errors name the op and the shapes), kernel dispatch, backward closures
// (activation gradients written on their first contribution, weight gradients accumulated).
#include "runtime/ops_llama.h"

#include <fmt/format.h>

#include <cmath>

#include "runtime/dispatch.h"
#include "kernels/llama.h"
#include "runtime/op_checks.h"

namespace deeplora::ops {
namespace {

using kernels::stat_dtype;

constexpr double kPi = 3.14159265358979323846;

#define DL_LL(dev, fn, ...) DEEPLORA_DISPATCH(dev, fn, __VA_ARGS__)

using detail::defined;
using detail::same_device;
using detail::same_float_dtype;
using detail::wants;

void* ptr_or_null(const GradTarget& g) { return g.g.defined() ? g.g.data() : nullptr; }

}  // namespace

// ---- RMSNorm -------------------------------------------------------------------------------------

Tensor rmsnorm(const Tensor& x, const Tensor& w, double eps) {
  defined("rmsnorm", {&x, &w});
  same_device("rmsnorm", {&x, &w});
  same_float_dtype("rmsnorm", {&x, &w});
  check(x.ndim() >= 1 && x.dim(-1) > 0, "rmsnorm",
        fmt::format("input {} has an empty last dimension (size 0): nothing to normalize over", x.desc()));
  const int64_t C = x.dim(-1), R = x.numel() / C;
  check(w.ndim() == 1 && w.dim(0) == C, "rmsnorm", fmt::format("weight {} must be [{}] for input {}", w.desc(), C, x.desc()));
  check(eps >= 0 && std::isfinite(eps), "rmsnorm", fmt::format("eps {} must be finite and >= 0", eps));
  Device d = x.device();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), d);
  Tensor rs = Tensor::empty(Shape{R}, stat_dtype(x.dtype()), d);
  DL_LL(d, rmsnorm_fwd, x.dtype(), x.data(), w.data(), y.data(), rs.data(), R, C, eps, stream_for(d));
  if (needs_grad({&x, &w})) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [x, w, rs, yi, d, R, C] {
      Tensor gy(yi->grad);
      GradTarget gx = wants(x) ? grad_target(x) : GradTarget{};
      void* dw = wants(w) ? grad_buffer(w).data() : nullptr;
      DL_LL(d, rmsnorm_bwd, x.dtype(), x.data(), w.data(), rs.data(), gy.data(), ptr_or_null(gx), dw, R, C, !gx.fresh,
            stream_for(d));
    });
  }
  return y;
}

// ---- rotary embeddings ---------------------------------------------------------------------------

std::vector<double> rope_inv_freq(int64_t head_dim, double theta, const RopeScaling& sc) {
  check(head_dim > 0 && head_dim % 2 == 0, "rope_inv_freq", fmt::format("head_dim {} must be even and positive", head_dim));
  check(theta > 0 && std::isfinite(theta), "rope_inv_freq", fmt::format("rope_theta {} must be positive", theta));
  std::vector<double> f(size_t(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i) f[size_t(i)] = 1.0 / std::pow(theta, double(2 * i) / double(head_dim));
  if (sc.type == "default" || sc.type.empty()) return f;
  check(sc.type == "llama3", "rope_inv_freq",
        fmt::format("rope_scaling type \"{}\" is not supported (\"default\" or \"llama3\")", sc.type));
  check(sc.factor > 0 && sc.original_max_position_embeddings > 0 && sc.low_freq_factor > 0 &&
            sc.high_freq_factor > sc.low_freq_factor,
        "rope_inv_freq",
        fmt::format("llama3 rope_scaling needs factor > 0, original_max_position_embeddings > 0 and "
                    "high_freq_factor > low_freq_factor > 0 (got factor={} low={} high={} original={})",
                    sc.factor, sc.low_freq_factor, sc.high_freq_factor, sc.original_max_position_embeddings));
  // transformers' _compute_llama3_parameters: long wavelengths divided by factor, short ones kept,
  // the band between blended by a smooth factor.
  const double old_len = double(sc.original_max_position_embeddings);
  const double low_wavelen = old_len / sc.low_freq_factor, high_wavelen = old_len / sc.high_freq_factor;
  for (double& v : f) {
    const double wavelen = 2.0 * kPi / v;
    const double scaled = wavelen > low_wavelen ? v / sc.factor : v;
    const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
    if (medium) {
      const double smooth = (old_len / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor);
      v = (1.0 - smooth) * scaled / sc.factor + smooth * scaled;
    } else {
      v = scaled;
    }
  }
  return f;
}

Tensor rope_inv_freq_tensor(int64_t head_dim, double theta, const RopeScaling& scaling, Device dev) {
  const std::vector<double> f = rope_inv_freq(head_dim, theta, scaling);
  return Tensor::from_vector(f, Shape{int64_t(f.size())}, DType::f32, dev);
}

Tensor rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq) {
  defined("rope", {&x, &positions, &inv_freq});
  same_device("rope", {&x, &positions, &inv_freq});
  same_float_dtype("rope", {&x});
  check(x.ndim() == 3, "rope", fmt::format("x must be [B, T, H * hd], got {}", x.desc()));
  check(inv_freq.dtype() == DType::f32 && inv_freq.ndim() == 1 && inv_freq.dim(0) > 0, "rope",
        fmt::format("inv_freq must be f32 [hd / 2] (rope_inv_freq_tensor), got {}", inv_freq.desc()));
  const int64_t B = x.dim(0), T = x.dim(1), hd = 2 * inv_freq.dim(0);
  check(x.dim(2) > 0 && x.dim(2) % hd == 0, "rope",
        fmt::format("the last dim of {} must be a positive multiple of the head size {} (inv_freq {})", x.desc(), hd,
                    inv_freq.desc()));
  check(positions.dtype() == DType::i32 && positions.ndim() == 2 && positions.dim(0) == B && positions.dim(1) == T,
        "rope", fmt::format("positions must be i32 [B={}, T={}] for x {}, got {}", B, T, x.desc(), positions.desc()));
  const int64_t H = x.dim(2) / hd, rows = B * T;
  Device d = x.device();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), d);
  DL_LL(d, rope, x.dtype(), x.data(), positions.data_as<int32_t>(), inv_freq.data_as<float>(), y.data(), rows, H, hd,
        false, false, stream_for(d));
  if (needs_grad({&x})) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [x, positions, inv_freq, yi, d, rows, H, hd] {
      GradTarget gx = grad_target(x);  // the inverse rotation of the output's gradient
      DL_LL(d, rope, x.dtype(), Tensor(yi->grad).data(), positions.data_as<int32_t>(), inv_freq.data_as<float>(),
            gx.g.data(), rows, H, hd, true, !gx.fresh, stream_for(d));
    });
  }
  return y;
}

// ---- SwiGLU --------------------------------------------------------------------------------------

Tensor swiglu(const Tensor& gate, const Tensor& up) {
  defined("swiglu", {&gate, &up});
  same_device("swiglu", {&gate, &up});
  same_float_dtype("swiglu", {&gate, &up});
  check(gate.shape() == up.shape(), "swiglu", fmt::format("shape mismatch: gate {} vs up {}", gate.desc(), up.desc()));
  Device d = gate.device();
  Tensor y = Tensor::empty(gate.shape(), gate.dtype(), d);
  DL_LL(d, swiglu_fwd, gate.dtype(), gate.data(), up.data(), y.data(), y.numel(), stream_for(d));
  if (needs_grad({&gate, &up})) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [gate, up, yi, d] {
      // gate first: when gate and up are one tensor the kernel writes da, then adds db to it.
      GradTarget ga = wants(gate) ? grad_target(gate) : GradTarget{};
      GradTarget gb = wants(up) ? grad_target(up) : GradTarget{};
      DL_LL(d, swiglu_bwd, gate.dtype(), gate.data(), up.data(), Tensor(yi->grad).data(), ptr_or_null(ga),
            ptr_or_null(gb), gate.numel(), !ga.fresh, !gb.fresh, stream_for(d));
    });
  }
  return y;
}

// ---- attention with grouped KV heads -------------------------------------------------------------

Tensor gqa_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t n_head, int64_t n_kv_head) {
  defined("gqa_attention", {&q, &k, &v});
  same_device("gqa_attention", {&q, &k, &v});
  same_float_dtype("gqa_attention", {&q, &k, &v});
  const std::string shapes = fmt::format("q {}, k {}, v {}, n_head {}, n_kv_head {}", q.desc(), k.desc(), v.desc(),
                                         n_head, n_kv_head);
  check(q.ndim() == 3 && k.ndim() == 3 && k.shape() == v.shape() && k.dim(0) == q.dim(0) && k.dim(1) == q.dim(1),
        "gqa_attention", "q must be [B, T, n_head * hd] and k, v [B, T, n_kv_head * hd]; got " + shapes);
  check(n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0, "gqa_attention",
        "n_head must be a positive multiple of n_kv_head; got " + shapes);
  check(q.dim(2) > 0 && q.dim(2) % n_head == 0, "gqa_attention",
        "n_head must divide the last dim of q; got " + shapes);
  const int64_t B = q.dim(0), T = q.dim(1), hd = q.dim(2) / n_head;
  check(hd % 8 == 0 && hd <= 128, "gqa_attention",
        fmt::format("head size {} must be a multiple of 8 and at most 128; got {}", hd, shapes));
  check(k.dim(2) == n_kv_head * hd, "gqa_attention",
        fmt::format("k and v must have n_kv_head * hd = {} channels; got {}", n_kv_head * hd, shapes));
  Device d = q.device();
  Tensor out = Tensor::empty(q.shape(), q.dtype(), d);
  Tensor lse = Tensor::empty(Shape{B, n_head, T}, stat_dtype(q.dtype()), d);
  DL_LL(d, gqa_attention_fwd, q.dtype(), q.data(), k.data(), v.data(), out.data(), lse.data(), B, T, n_head, n_kv_head,
        hd, stream_for(d));
  if (needs_grad({&q, &k, &v})) {
    auto oi = out.impl_ptr();
    Tensor out_saved = out.detach();  // the closure must not keep the output's grad slot alive
    tape().record({oi}, [q, k, v, out_saved, lse, oi, d, B, T, n_head, n_kv_head, hd] {
      // In the kernels' write order (dq, dk, dv): one tensor passed twice is written, then added to.
      GradTarget gq = wants(q) ? grad_target(q) : GradTarget{};
      GradTarget gk = wants(k) ? grad_target(k) : GradTarget{};
      GradTarget gv = wants(v) ? grad_target(v) : GradTarget{};
      DL_LL(d, gqa_attention_bwd, q.dtype(), q.data(), k.data(), v.data(), out_saved.data(), lse.data(),
            Tensor(oi->grad).data(), ptr_or_null(gq), ptr_or_null(gk), ptr_or_null(gv), B, T, n_head, n_kv_head, hd,
            !gq.fresh, !gk.fresh, !gv.fresh, stream_for(d));
    });
  }
  return out;
}

}  // namespace deeplora::ops
