// Differentiable ops: check shapes/dtypes/devices (errors name the op and the shapes), run the
// kernel for the tensors' device, and record one backward closure on the tape when needed.
#pragma once
#include <cstdint>
#include <vector>

#include "runtime/tape.h"
#include "runtime/tensor.h"

namespace deeplora::ops {

// While one is alive on this thread, embedding and the losses skip their check for out-of-range ids
// on CUDA (a count that synchronizes with the host): for callers that validated the ids where they
// were made (TrainStep checks every micro-batch on the host). The CPU check is kept (it costs no sync).
class TrustedIds {
 public:
  TrustedIds();
  ~TrustedIds();
  TrustedIds(const TrustedIds&) = delete;
  TrustedIds& operator=(const TrustedIds&) = delete;
};

Tensor add(const Tensor& a, const Tensor& b);   // same shape, dtype, device
Tensor mul(const Tensor& a, const Tensor& b);   // elementwise
Tensor scale(const Tensor& a, double s);
Tensor gelu(const Tensor& x);                   // tanh form (GPT-2)
// Each x converted to dt, in one launch per kCastGroupMax tensors forward and backward (the gradient
// of each x accumulated from its output's); all xs of one dtype and device. Outputs in input order.
std::vector<Tensor> cast_group(const std::vector<Tensor>& xs, DType dt);
Tensor sum(const Tensor& x);                    // one element, dtype of x
Tensor mean(const Tensor& x);
Tensor cast(const Tensor& x, DType dt);
Tensor reshape(const Tensor& x, const Shape& s);

// a [M, K] (or [K, M] if ta) times b [K, N] (or [N, K] if tb) -> [M, N]; 3-D inputs: batched with the
// same leading dim.
Tensor matmul(const Tensor& a, const Tensor& b, bool ta = false, bool tb = false);
// x [..., K], w [N, K] (PyTorch Linear layout), optional b [N] -> [..., N], plus an optional addend of
// the output's shape (added in the GEMM's epilogue: a LoRA branch's y + t·Bᵀ in one pass). A frozen w
// (no requires_grad) gets no weight-gradient GEMM.
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b = Tensor(), const Tensor& addend = Tensor());
// Over the last dim; w, b: [C].
Tensor layernorm(const Tensor& x, const Tensor& w, const Tensor& b, double eps = 1e-5);
// tokens [B, T] i32 -> wte[tokens] + wpe[0..T) : [B, T, C]. wpe may be undefined. Token ids must be
// below n_valid (0: wte's row count; a padded vocabulary passes its real size).
Tensor embedding(const Tensor& tokens, const Tensor& wte, const Tensor& wpe = Tensor(), int64_t n_valid = 0);
// Causal multi-head self-attention: qkv [B, T, 3C] -> [B, T, C].
Tensor attention(const Tensor& qkv, int64_t n_head);
// Mean softmax cross-entropy over the rows whose target != ignore_index. logits [..., Vp],
// targets [...] i32. Only the first n_classes columns are classes (0: all); the rest is padding
// (a vocabulary padded for fast GEMMs) that gets no probability and no gradient. Returns one
// element in f32 (f64 for f64 logits).
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index = -100, int64_t n_classes = 0);

// Per-row negative log-likelihood lse(logits[r, :n_classes]) - logits[r, targets[r]] (0 where the
// target is ignore_index), [rows] in f32 (f64 for f64 logits). Inference only: records nothing.
Tensor token_nll(const Tensor& logits, const Tensor& targets, int32_t ignore_index = -100, int64_t n_classes = 0);

}  // namespace deeplora::ops
