// Optimizer kernels: the fused AdamW update over a table of chunks (one launch covers every parameter
// of one dtype, whatever its group), and the deterministic sum of squares behind gradient clipping.
#pragma once
#include <cmath>

#include "kernels/common.h"

namespace deeplora::kernels {

// One block's share of an AdamW step: n consecutive elements of one parameter. A parameter longer
// than kAdamWChunk is cut into several chunks; chunk starts are multiples of kAdamWChunk elements, so
// a chunk of a 16-byte aligned buffer is 16-byte aligned and the kernel can use vector loads.
// Pointers are to the device the launcher runs on (host memory for kernels::cpu, device memory for
// kernels::cuda), and so is the table itself.
struct AdamWChunk {
  const void* grad;  // param dtype
  void* master;      // state dtype: the fp32 (f64) master; the parameter itself when it is its own master
  void* m;           // state dtype
  void* v;           // state dtype
  void* work;        // param dtype working copy, rewritten from the master; null when master is the param
  int64_t n;
  double lr_scale;      // per group
  double weight_decay;  // per group, decoupled (torch.optim.AdamW)
};
inline constexpr int64_t kAdamWChunk = int64_t(1) << 14;

// Per-step scalars, the same for every chunk. bias_corr1/2 = 1 - beta1^t, 1 - beta2^t.
struct AdamWStep {
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double bias_corr1 = 1, bias_corr2 = 1;
  double grad_scale = 1;  // gradients are multiplied by this first (clipping: min(1, max_norm / norm))
};

// The per-step scalars in device memory, for a step captured once into a CUDA graph and replayed:
// the host writes lr and the bias corrections before each replay; adamw_clip writes the rest on the
// device from the gradients' sums of squares (and the step's losses), and adamw_dev reads it all.
struct AdamWStepDev {
  double lr = 0, bias_corr1 = 1, bias_corr2 = 1;  // host-written
  double max_norm = 0;                            // host-written: clip the global norm to this (0: off)
  double norm = 0;                                // device-written: the gradients' global L2 norm
  double grad_scale = 1;                          // device-written: min(1, max_norm / norm)
  int32_t skip = 0;                               // device-written: a non-finite norm or loss; no update
  int32_t pad = 0;
};
// What adamw_clip reads: each flat gradient buffer's sum of squares (one element, f32 or f64, as sumsq
// writes it) and the step's micro-batch losses (f32 or f64), any of which being non-finite skips it.
struct NormSources {
  const void* sumsq[3] = {nullptr, nullptr, nullptr};
  bool sumsq_f64[3] = {false, false, false};
  int n_sumsq = 0;
  const void* losses = nullptr;
  bool losses_f64 = false;
  int64_t n_losses = 0;
};

namespace detail {
#if defined(__CUDACC__)
#define DEEPLORA_OPTIM_HD __host__ __device__ __forceinline__
#else
#define DEEPLORA_OPTIM_HD inline
#endif
// The update math, shared by both backends so that CPU and CUDA agree bit for bit: every
// multiply-add is an explicit fma (nvcc would otherwise contract some of them and g++ none), and
// division and sqrt are correctly rounded on both.
DEEPLORA_OPTIM_HD float dl_fma(float a, float b, float c) { return fmaf(a, b, c); }
DEEPLORA_OPTIM_HD double dl_fma(double a, double b, double c) { return fma(a, b, c); }
DEEPLORA_OPTIM_HD float dl_sqrt(float a) { return sqrtf(a); }
DEEPLORA_OPTIM_HD double dl_sqrt(double a) { return sqrt(a); }
DEEPLORA_OPTIM_HD bool dl_finite(double a) {
#if defined(__CUDA_ARCH__)
  return isfinite(a);
#else
  return std::isfinite(a);
#endif
}

template <class S> struct AdamWScalars {
  S beta1, one_m_beta1, beta2, one_m_beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale;
};

// Computed in double from the step and the chunk's group, rounded once into the state type.
template <class S>
DEEPLORA_OPTIM_HD AdamWScalars<S> adamw_scalars(const AdamWStep& st, double lr_scale, double weight_decay) {
  const double lr = st.lr * lr_scale;
  AdamWScalars<S> k;
  k.beta1 = S(st.beta1);
  k.one_m_beta1 = S(1.0 - st.beta1);
  k.beta2 = S(st.beta2);
  k.one_m_beta2 = S(1.0 - st.beta2);
  k.eps = S(st.eps);
  k.step_size = S(lr / st.bias_corr1);
  k.inv_sqrt_bc2 = S(1.0 / dl_sqrt(st.bias_corr2));
  k.decay = S(dl_fma(-lr, weight_decay, 1.0));
  k.grad_scale = S(st.grad_scale);
  return k;
}

// torch.optim.AdamW's order: p *= 1 - lr*wd; m, v updated; p -= step_size * m / (sqrt(v)/sqrt(bc2) + eps).
template <class S> DEEPLORA_OPTIM_HD void adamw_update(S grad, S& p, S& m, S& v, const AdamWScalars<S>& k) {
  const S g = grad * k.grad_scale;
  m = dl_fma(k.beta1, m, k.one_m_beta1 * g);
  v = dl_fma(k.beta2, v, (k.one_m_beta2 * g) * g);
  const S denom = dl_fma(dl_sqrt(v), k.inv_sqrt_bc2, k.eps);
  p = dl_fma(-k.step_size, m / denom, p * k.decay);
}
// The step adamw_dev runs: the device-resident scalars with the optimizer's betas and eps.
DEEPLORA_OPTIM_HD AdamWStep step_from_dev(const AdamWStepDev& d, double beta1, double beta2, double eps) {
  AdamWStep st;
  st.lr = d.lr;
  st.beta1 = beta1;
  st.beta2 = beta2;
  st.eps = eps;
  st.bias_corr1 = d.bias_corr1;
  st.bias_corr2 = d.bias_corr2;
  st.grad_scale = d.grad_scale;
  return st;
}

// adamw_clip's arithmetic, shared by both backends (and by AdamW's host path).
DEEPLORA_OPTIM_HD void clip_from_sums(const NormSources& src, AdamWStepDev& st) {
  double total = 0;
  for (int i = 0; i < src.n_sumsq; ++i)
    total += src.sumsq_f64[i] ? static_cast<const double*>(src.sumsq[i])[0] : double(static_cast<const float*>(src.sumsq[i])[0]);
  const double norm = dl_sqrt(total);
  bool bad = !dl_finite(norm);
  for (int64_t i = 0; i < src.n_losses; ++i) {
    const double l = src.losses_f64 ? static_cast<const double*>(src.losses)[i] : double(static_cast<const float*>(src.losses)[i]);
    bad = bad || !dl_finite(l);
  }
  st.norm = norm;
  st.skip = bad ? 1 : 0;
  st.grad_scale = st.max_norm > 0 && norm > st.max_norm ? st.max_norm / norm : 1.0;
}
}  // namespace detail
#undef DEEPLORA_OPTIM_HD

}  // namespace deeplora::kernels

#define DEEPLORA_OPTIM_DECLS                                                                        \
  /* One AdamW step over every chunk of the table (see AdamWChunk). (param_dt, state_dt) is one of  \
     (f32, f32): the param is its own master, work must be null; (bf16, f32): fp32 master, bf16     \
     working copy rounded to nearest even; (f64, f64): everything f64, work null. Grads have the     \
     param dtype. The CUDA launcher reads `chunks` from device memory. */                           \
  void adamw(DType param_dt, DType state_dt, const AdamWChunk* chunks, int64_t n_chunks,           \
             const AdamWStep& step, cudaStream_t s);                                                \
  /* The same update with its scalars read from st (device memory); nothing changes when st->skip.   \
     Bit for bit the update adamw gives for the same values. */                                      \
  void adamw_dev(DType param_dt, DType state_dt, const AdamWChunk* chunks, int64_t n_chunks,        \
                 double beta1, double beta2, double eps, const AdamWStepDev* st, cudaStream_t s);   \
  /* st->norm = sqrt(sum over buffers, in order, of double(sumsq)); st->skip = the norm or a loss is  \
     not finite; st->grad_scale = max_norm / norm when 0 < max_norm < norm, else 1 (one thread). */  \
  void adamw_clip(const NormSources& src, AdamWStepDev* st, cudaStream_t s);                        \
  /* out[0] = sum x[i]^2, deterministic (fixed tree order, no atomics); accumulated in f32 for f32   \
     and bf16 (f64 for f64); out has stat_dtype(dt). */                                             \
  void sumsq(DType dt, const void* x, int64_t n, void* out, cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_OPTIM_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_OPTIM_DECLS
}
