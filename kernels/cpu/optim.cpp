// CPU reference twins of kernels/optim.h. The AdamW update runs the same per-element math as the
// CUDA kernel (kernels/optim.h detail::adamw_update), so the two agree bit for bit; the sum of squares
// accumulates in double, as every CPU reduction does.
#include "kernels/optim.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>
#include <type_traits>

#include "kernels/dtype.h"

namespace deeplora::kernels::cpu {
namespace {

template <class P, class S> void adamw_chunks(const AdamWChunk* chunks, int64_t n_chunks, const AdamWStep& st) {
  for (int64_t c = 0; c < n_chunks; ++c) {
    const AdamWChunk& ch = chunks[c];
    const auto k = detail::adamw_scalars<S>(st, ch.lr_scale, ch.weight_decay);
    const P* g = static_cast<const P*>(ch.grad);
    S* p = static_cast<S*>(ch.master);
    S* m = static_cast<S*>(ch.m);
    S* v = static_cast<S*>(ch.v);
    P* w = static_cast<P*>(ch.work);
    for (int64_t i = 0; i < ch.n; ++i) {
      S gi;
      if constexpr (std::is_same_v<P, bf16>) gi = float(g[i]);
      else gi = S(g[i]);
      detail::adamw_update<S>(gi, p[i], m[i], v[i], k);
      if constexpr (!std::is_same_v<P, S>) w[i] = P(p[i]);
    }
  }
}

}  // namespace

void adamw(DType param_dt, DType state_dt, const AdamWChunk* chunks, int64_t n_chunks, const AdamWStep& step,
           cudaStream_t) {
  if (param_dt == DType::f32 && state_dt == DType::f32) return adamw_chunks<float, float>(chunks, n_chunks, step);
  if (param_dt == DType::bf16 && state_dt == DType::f32) return adamw_chunks<bf16, float>(chunks, n_chunks, step);
  if (param_dt == DType::f64 && state_dt == DType::f64) return adamw_chunks<double, double>(chunks, n_chunks, step);
  throw std::invalid_argument(fmt::format(
      "kernels::cpu::adamw: param dtype {} with state dtype {} is not supported (f32/f32, bf16/f32, f64/f64)",
      dtype_name(param_dt), dtype_name(state_dt)));
}

void adamw_dev(DType param_dt, DType state_dt, const AdamWChunk* chunks, int64_t n_chunks, double beta1,
               double beta2, double eps, const AdamWStepDev* st, cudaStream_t s) {
  if (st->skip) return;
  const AdamWStep step = detail::step_from_dev(*st, beta1, beta2, eps);
  adamw(param_dt, state_dt, chunks, n_chunks, step, s);
}

void adamw_clip(const NormSources& src, AdamWStepDev* st, cudaStream_t) { detail::clip_from_sums(src, *st); }

void sumsq(DType dt, const void* x, int64_t n, void* out, cudaStream_t) {
  double s = 0.0;
  switch (dt) {
    case DType::f32: {
      const float* p = static_cast<const float*>(x);
      for (int64_t i = 0; i < n; ++i) s += double(p[i]) * double(p[i]);
      *static_cast<float*>(out) = float(s);
      return;
    }
    case DType::bf16: {
      const bf16* p = static_cast<const bf16*>(x);
      for (int64_t i = 0; i < n; ++i) {
        const double v = float(p[i]);
        s += v * v;
      }
      *static_cast<float*>(out) = float(s);
      return;
    }
    case DType::f64: {
      const double* p = static_cast<const double*>(x);
      for (int64_t i = 0; i < n; ++i) s += p[i] * p[i];
      *static_cast<double*>(out) = s;
      return;
    }
    default:
      throw std::invalid_argument(fmt::format("kernels::cpu::sumsq: dtype {} is not supported (f32, bf16 or f64)",
                                              dtype_name(dt)));
  }
}

}  // namespace deeplora::kernels::cpu
