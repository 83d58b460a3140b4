// Inference-only ops for incremental decoding: a per-layer KV cache written and attended to in place,
// and the row argmax of greedy sampling. Nothing is recorded on the tape.
#pragma once
#include <cstdint>

#include "runtime/tape.h"
#include "runtime/tensor.h"

namespace deeplora::ops {

// Layouts: qkv [B, Tn, 3C] laid out (q | k | v) as for ops::attention; k_cache, v_cache
// [B, n_head, Tmax, C/n_head] in qkv's dtype and device; start i32 [B] on the same device: row b's
// Tn new tokens sit at positions start[b] .. start[b]+Tn-1. The head size C/n_head must be a
// multiple of 8 and at most 256 (on every device, so a CPU model runs on the GPU unchanged).
// start is read on the device, so a CUDA graph of one decode step serves every position; for that
// reason positions are checked against Tmax only when start lives on the CPU (on the GPU, positions
// outside [0, Tmax) are skipped by the write and clamped by the attention).
// Both throw std::logic_error when grad mode is on and an input requires grad (wrap in NoGrad).

// Copies the keys and values of qkv into the caches at each row's positions.
void attention_cache_write(const Tensor& qkv, Tensor& k_cache, Tensor& v_cache, const Tensor& start,
                           int64_t n_head);
// Causal attention of qkv's queries over the caches (which must already hold the new tokens: call
// attention_cache_write first): [B, Tn, C], equal to ops::attention over the whole sequence.
Tensor attention_cached(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, const Tensor& start,
                        int64_t n_head);
// x [..., stride] (leading dims flattened into rows) -> i32 [rows]: per row the index of the largest
// of the first n_valid columns (0: all; the rest is padding), the smallest on ties, NaN never chosen
// unless the whole row is NaN (then 0).
Tensor argmax_rows(const Tensor& x, int64_t n_valid = 0);

}  // namespace deeplora::ops
