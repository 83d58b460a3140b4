// GPT-2 (Hugging Face GPT2LMHeadModel layout): learned positions, pre-LayerNorm blocks, fused qkv,
// GELU(tanh) MLP, final ln_f, lm_head tied to wte (or its own lm_head.weight when
// tie_word_embeddings is false). Parameters are f32 masters with HF names; the
// forward runs in the compute dtype (bf16 casts recorded on the tape, like autocast).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime/tensor.h"

namespace deeplora {

struct GptConfig {
  int64_t n_layer = 12, n_head = 12, n_embd = 768, vocab_size = 50257, n_positions = 1024;
  double layer_norm_epsilon = 1e-5;
  bool tie_word_embeddings = true;  // false: a separate lm_head.weight [vocab, n_embd] (HF's untied head)
  // "gpt2" / "gpt2-small" (124M), "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny" (2x64, vocab 512).
  static GptConfig preset(const std::string& name);
  static GptConfig from_json_file(const std::string& path);  // HF config.json
  void save_json_file(const std::string& path) const;
  void validate() const;  // throws naming the bad field
  int64_t n_params() const;
  std::string str() const;
  // wte's rows: the vocabulary rounded up to a multiple of 64 (50257 -> 50304, as llm.c), so the
  // lm_head GEMM's leading dimension is aligned (cuBLASLt runs 5x slower at N = 50257). Padding rows
  // stay zero: cross_entropy gives them no probability and no gradient.
  int64_t padded_vocab() const { return (vocab_size + 63) / 64 * 64; }
};

// Extra path added to a linear layer's output (LoRA, Deep LoRA): y' = y + adapter(x).
class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  // x: the layer input [.., in] in the compute dtype; y: the base output [.., out]. Returns y'.
  virtual Tensor forward(const Tensor& x, const Tensor& y) = 0;
};

// Keys and values of every layer for incremental decoding: k[l], v[l] are [B, H, T_max, hd] in the
// compute dtype. Row b's positions 0..len-1 hold its tokens so far; positions past them may hold
// anything (a decode step writes position p before it attends over 0..p).
struct KvCache {
  std::vector<Tensor> k, v;
  int64_t B = 0, T_max = 0;
};

// A batch for a loss on the device: tokens [B, T] with next-token targets [B, T] (-100: ignored),
// or, for example data, the loss rows [N] (flat indices into [B*T]) and their targets [N]: only those
// rows reach the lm_head (Gpt::loss_at).
struct LossBatch {
  Tensor tokens, targets, rows;
  LossBatch() = default;
  LossBatch(Tensor tok, Tensor tgt, Tensor r = Tensor()) : tokens(std::move(tok)), targets(std::move(tgt)), rows(std::move(r)) {}
  LossBatch(const std::pair<Tensor, Tensor>& p) : tokens(p.first), targets(p.second) {}  // NOLINT: implicit on purpose
};

struct Param {
  Tensor master;  // f32 (f64 for f64 models); requires_grad when trainable
  Tensor frozen_work;  // cached compute-dtype copy of a frozen master (filled on demand)
  bool trainable = true;
};

struct Linear {
  std::string name;  // HF module path, e.g. "h.3.mlp.c_fc"
  Param* w = nullptr;  // [out, in]
  Param* b = nullptr;  // [out]
  std::shared_ptr<LinearAdapter> adapter;
  int64_t in_features() const { return w->master.dim(1); }
  int64_t out_features() const { return w->master.dim(0); }
};

class Gpt {
 public:
  // Random init as HF (normal 0.02, c_proj weights 0.02/sqrt(2 n_layer), biases 0, LN 1/0).
  Gpt(const GptConfig& cfg, DType compute, Device dev, uint64_t seed = 0);
  Gpt(const Gpt&) = delete;  // Linear holds pointers into the blocks
  Gpt& operator=(const Gpt&) = delete;

  const GptConfig& config() const { return cfg_; }
  DType compute_dtype() const { return compute_; }
  Device device() const { return dev_; }

  // tokens [B, T] i32 on the model's device -> logits [B, T, V] in the compute dtype.
  Tensor forward(const Tensor& tokens);
  // The same over the padded vocabulary: [B, T, padded_vocab()] (what training uses).
  Tensor forward_padded(const Tensor& tokens);
  // The final hidden states (after ln_f) [B, T, C], and the padded logits of any hidden rows
  // [..., C] -> [..., padded_vocab()]: forward_padded(t) == lm_head(hidden(t)). Scoring code gathers
  // the few rows it needs between the two (the lm_head GEMM is most of a small model's forward).
  Tensor hidden(const Tensor& tokens);
  Tensor lm_head(const Tensor& h);
  // Incremental forward over a KV cache (inference only, under NoGrad): tokens [B, Tn] at positions
  // `positions` [B, Tn] (i32, on the model's device; row b's tokens at start[b] .. start[b]+Tn-1,
  // start [B] i32 on the device). Writes their keys/values into the cache and returns the hidden
  // states [B, Tn, C] (after ln_f). prefill: every row starts at 0, so the new tokens attend among
  // themselves (the flash kernel) while their keys/values still go to the cache.
  KvCache make_cache(int64_t B, int64_t T_max) const;
  Tensor hidden_cached(const Tensor& tokens, const Tensor& positions, const Tensor& start, KvCache& cache,
                       bool prefill = false);
  // The same mean loss from selected positions only: rows [N] i32 flat indices into [B*T] with their
  // targets [N] (-100: ignored). Only those rows reach the lm_head (prompt/completion fine-tuning
  // scores a few positions per row); equals loss() when every other target is ignored.
  Tensor loss_at(const Tensor& tokens, const Tensor& rows, const Tensor& targets);
  // loss_at for a batch with rows, loss otherwise.
  Tensor loss(const LossBatch& b) { return b.rows.defined() ? loss_at(b.tokens, b.rows, b.targets) : loss(b.tokens, b.targets); }
  // Mean cross-entropy of next-token targets [B, T] (i32, -100 = ignore), f32 (f64 for f64 models).
  Tensor loss(const Tensor& tokens, const Tensor& targets);
  // All parameters in HF order with HF names ("wte.weight", "h.0.ln_1.weight", ..., "ln_f.bias", and
  // "lm_head.weight" last when the head is untied; it is padded to padded_vocab() rows like wte).
  std::vector<std::pair<std::string, Param*>> named_params();
  Param& param(const std::string& name);  // throws naming the parameter
  std::vector<Linear*> linears();  // every linear of the blocks, in order
  Linear& linear(const std::string& module);

  // Trainable flags: freeze_all() then mark adapters' own tensors trainable; frozen params cache their
  // compute-dtype copy and get no gradient buffer (no weight-gradient GEMMs).
  void freeze_all();
  void set_trainable(const std::string& name, bool t);
  std::vector<Tensor> trainable_tensors();
  int64_t n_trainable() const;
  // Called after master weights change outside the optimizer (load): drops cached frozen copies.
  void invalidate_frozen_cache();

 private:
  struct Block {
    Param ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mproj_w, mproj_b;
    Linear c_attn, c_proj, c_fc, mlp_proj;
  };
  Tensor work(Param& p);  // the compute-dtype tensor of p for this forward
  Tensor head(const Tensor& wte);  // the lm_head's weight: wte's work tensor when tied
  // The blocks and ln_f over embedded x [B, T, C]; attn(layer, qkv) is the attention of one block.
  Tensor hidden_with(const Tensor& tokens, const Tensor& wte);
  Tensor blocks(Tensor x, const std::function<Tensor(size_t, const Tensor&)>& attn);
  // l(x) (+ its adapter's branch) + residual: the residual enters in the base GEMM's epilogue.
  Tensor apply_linear(Linear& l, const Tensor& x, const Tensor& residual = Tensor());

  GptConfig cfg_;
  DType compute_;
  Device dev_;
  Param wte_, wpe_, lnf_w_, lnf_b_;
  Param lm_head_;  // untied head only (cfg_.tie_word_embeddings false)
  std::vector<Block> blocks_;
};

}  // namespace deeplora
