// Kernels of the Llama-family ops and the layout copies: transpose, column-block copies (concat,
// slice, split), RMSNorm, rotary embeddings, SwiGLU and causal attention with grouped KV heads.
// "(+)=" below: += when the accumulate flag is set, = otherwise (the output may hold garbage before).
#pragma once
#include "kernels/common.h"

#define DEEPLORA_LLAMA_DECLS                                                                          \
  /* y[b, c, r] (+)= x[b, r, c] for b < batch, x [batch, R, C]. Any dtype; accumulate: floats only. */ \
  void transpose_last2(DType dt, const void* x, void* y, int64_t batch, int64_t R, int64_t C,         \
                       bool accumulate, cudaStream_t s);                                              \
  /* dst[r * dst_ld + c] (+)= src[r * src_ld + c] for r < rows, c < cols. src null: dst = 0 (not with \
     accumulate). Any dtype; accumulate: floats only. src and dst must not overlap. */               \
  void copy_cols(DType dt, const void* src, int64_t src_ld, void* dst, int64_t dst_ld, int64_t rows,  \
                 int64_t cols, bool accumulate, cudaStream_t s);                                      \
  /* HF LlamaRMSNorm over the last dim C: rstd = 1/sqrt(mean(x^2) + eps) in stat_dtype(dt), then      \
     y = w * dt(x * rstd) (the normalized row rounded to dt before the weight multiply, as HF does).  \
     w may be null (1). rstd [rows] may be null. */                                                   \
  void rmsnorm_fwd(DType dt, const void* x, const void* w, void* y, void* rstd, int64_t rows,         \
                   int64_t C, double eps, cudaStream_t s);                                            \
  /* With n = x * rstd: dx (+)= rstd (g - n mean_c(g n)), g = dy * w (dx_accumulate picks +=);        \
     dw += sum over rows of dy * dt(n). dx, dw may be null; w may be null (1). */                     \
  void rmsnorm_bwd(DType dt, const void* x, const void* w, const void* rstd, const void* dy,          \
                   void* dx, void* dw, int64_t rows, int64_t C, bool dx_accumulate, cudaStream_t s);  \
  /* Rotary embedding, HF rotate_half pairing, on x [rows, H * hd] (row r = (b, t), pos[r] its        \
     position): for i < hd/2, angle = f32(pos) * inv_freq[i] in f32 (HF's f32 product), c = cos,      \
     s = sin (accurate, of that f32 angle; negated when inverse), and per head                        \
     y[i] (+)= x[i] c - x[i + hd/2] s,  y[i + hd/2] (+)= x[i + hd/2] c + x[i] s.                      \
     inv_freq: hd/2 f32 on the device of x. y may be x (not with accumulate). */                      \
  void rope(DType dt, const void* x, const int32_t* pos, const float* inv_freq, void* y, int64_t rows, \
            int64_t H, int64_t hd, bool inverse, bool accumulate, cudaStream_t s);                    \
  /* y = dt(silu(a)) * b, silu(a) = a / (1 + exp(-a)) (the activation rounded to dt first, as HF's    \
     act_fn(gate) * up). */                                                                           \
  void swiglu_fwd(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t s);        \
  /* da (+)= dy b silu'(a), db (+)= dy dt(silu(a)); either may be null. da is written before db is    \
     read, so da and db may be the same buffer (a and b one tensor). */                               \
  void swiglu_bwd(DType dt, const void* a, const void* b, const void* dy, void* da, void* db,         \
                  int64_t n, bool da_accumulate, bool db_accumulate, cudaStream_t s);                 \
  /* Causal attention with grouped KV heads: q [B, T, Hq * hd], k, v [B, T, Hkv * hd], query head h   \
     reads KV head h / (Hq / Hkv); scale 1/sqrt(hd). out [B, T, Hq * hd]; lse [B, Hq, T] in           \
     stat_dtype(dt) (natural log-sum-exp of the scaled scores). hd a multiple of 8, at most 128;      \
     Hq a multiple of Hkv. */                                                                         \
  void gqa_attention_fwd(DType dt, const void* q, const void* k, const void* v, void* out, void* lse, \
                         int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, cudaStream_t s);  \
  /* dq, dk, dv (+)= the gradients from the saved out and lse (each flag picks += for its buffer);    \
     dk, dv summed over the query heads of each KV head. Any of dq, dk, dv may be null. Written in    \
     the order dq, dk, dv (per element), so aliased inputs (q, k, v one tensor) get correct sums. */  \
  void gqa_attention_bwd(DType dt, const void* q, const void* k, const void* v, const void* out,      \
                         const void* lse, const void* dout, void* dq, void* dk, void* dv, int64_t B,  \
                         int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, bool dq_accumulate,          \
                         bool dk_accumulate, bool dv_accumulate, cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_LLAMA_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_LLAMA_DECLS
}
