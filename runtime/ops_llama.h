// Differentiable ops of the Llama family (RMSNorm, rotary embeddings, SwiGLU, causal attention with
// grouped KV heads) and the host-side rotary frequencies, with HF transformers' conventions.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tape.h"
#include "runtime/tensor.h"

namespace deeplora::ops {

// HF LlamaRMSNorm over the last dim: y = w * dtype(x / sqrt(mean(x^2) + eps)), statistics in f32
// (f64 for f64) even for bf16 x. w: [C], the dtype and device of x.
Tensor rmsnorm(const Tensor& x, const Tensor& w, double eps = 1e-6);

// config.json's rope_scaling: type "default" (no scaling) or "llama3" (Llama 3.1 / 3.2).
struct RopeScaling {
  std::string type = "default";
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};
// inv_freq[i] = theta^(-2i / head_dim) for i < head_dim / 2, then llama3's scaling, in double, as
// transformers' _compute_default_rope_parameters / _compute_llama3_parameters (which use f32).
std::vector<double> rope_inv_freq(int64_t head_dim, double theta, const RopeScaling& scaling = {});
// The same as the f32 [head_dim / 2] tensor that rope() reads (HF keeps inv_freq in f32), on dev.
// Made once per model, not per step.
Tensor rope_inv_freq_tensor(int64_t head_dim, double theta, const RopeScaling& scaling, Device dev);

// Rotary embedding (HF rotate_half: dim i pairs with i + hd/2) of x [B, T, H * hd], the layout a
// q/k projection produces (no transpose to [B, H, T, hd] before or after). positions: i32 [B, T] on
// x's device (a decode step passes each row's cache position; negative positions rotate backwards).
// inv_freq: f32 [hd / 2] on x's device (rope_inv_freq_tensor). Angles are f32(pos) * inv_freq in
// f32 as HF computes them; cos/sin are not rounded to bf16 (HF rounds them to the input dtype).
Tensor rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq);

// SwiGLU's gating: dtype(silu(gate)) * up, one pass (HF's act_fn(gate_proj(x)) * up_proj(x)).
Tensor swiglu(const Tensor& gate, const Tensor& up);

// Causal self-attention with grouped KV heads: q [B, T, n_head * hd], k and v [B, T, n_kv_head * hd]
// (n_head a multiple of n_kv_head; query head h reads KV head h / (n_head / n_kv_head), as HF's
// repeat_kv); hd a multiple of 8 in [8, 128]; scale 1/sqrt(hd). Returns [B, T, n_head * hd].
Tensor gqa_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t n_head, int64_t n_kv_head);

}  // namespace deeplora::ops
