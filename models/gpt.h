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

#include "models/causal_lm.h"
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

// The "gpt2" family of the CausalLM interface (models/causal_lm.h); GPT-2-specific code keeps this API.
class Gpt : public CausalLM {
 public:
  // Random init as HF (normal 0.02, c_proj weights 0.02/sqrt(2 n_layer), biases 0, LN 1/0).
  Gpt(const GptConfig& cfg, DType compute, Device dev, uint64_t seed = 0);
  Gpt(const Gpt&) = delete;  // Linear holds pointers into the blocks
  Gpt& operator=(const Gpt&) = delete;

  const GptConfig& config() const { return cfg_; }

  // ---- CausalLM ----
  std::string model_type() const override { return "gpt2"; }
  DType compute_dtype() const override { return compute_; }
  Device device() const override { return dev_; }
  int64_t vocab_size() const override { return cfg_.vocab_size; }
  int64_t padded_vocab() const override { return cfg_.padded_vocab(); }
  int64_t max_positions() const override { return cfg_.n_positions; }
  int64_t bos_token_id() const override { return 50256; }  // what save_json_file writes (<|endoftext|>)
  int64_t n_layer() const override { return cfg_.n_layer; }
  int64_t hidden_size() const override { return cfg_.n_embd; }
  int64_t n_params() const override { return cfg_.n_params(); }
  std::string describe() const override { return cfg_.str(); }
  void save_config(const std::string& path) const override { cfg_.save_json_file(path); }

  // tokens [B, T] i32 on the model's device -> logits [B, T, V] in the compute dtype.
  Tensor forward(const Tensor& tokens) override;
  // The same over the padded vocabulary: [B, T, padded_vocab()] (what training uses).
  Tensor forward_padded(const Tensor& tokens) override;
  // The final hidden states (after ln_f) [B, T, C], and the padded logits of any hidden rows
  // [..., C] -> [..., padded_vocab()]: forward_padded(t) == lm_head(hidden(t)). Scoring code gathers
  // the few rows it needs between the two (the lm_head GEMM is most of a small model's forward).
  Tensor hidden(const Tensor& tokens) override;
  Tensor lm_head(const Tensor& h) override;
  // Incremental forward over a KV cache (inference only, under NoGrad): tokens [B, Tn] at positions
  // `positions` [B, Tn] (i32, on the model's device; row b's tokens at start[b] .. start[b]+Tn-1,
  // start [B] i32 on the device). Writes their keys/values into the cache and returns the hidden
  // states [B, Tn, C] (after ln_f). prefill: every row starts at 0, so the new tokens attend among
  // themselves (the flash kernel) while their keys/values still go to the cache.
  KvCache make_cache(int64_t B, int64_t T_max) const override;
  Tensor hidden_cached(const Tensor& tokens, const Tensor& positions, const Tensor& start, KvCache& cache,
                       bool prefill = false) override;
  // The same mean loss from selected positions only: rows [N] i32 flat indices into [B*T] with their
  // targets [N] (-100: ignored). Only those rows reach the lm_head (prompt/completion fine-tuning
  // scores a few positions per row); equals loss() when every other target is ignored.
  Tensor loss_at(const Tensor& tokens, const Tensor& rows, const Tensor& targets) override;
  using CausalLM::loss;  // loss(const LossBatch&)
  // Mean cross-entropy of next-token targets [B, T] (i32, -100 = ignore), f32 (f64 for f64 models).
  Tensor loss(const Tensor& tokens, const Tensor& targets) override;
  // All parameters in HF order with HF names ("wte.weight", "h.0.ln_1.weight", ..., "ln_f.bias", and
  // "lm_head.weight" last when the head is untied; it is padded to padded_vocab() rows like wte).
  std::vector<std::pair<std::string, Param*>> named_params() override;
  std::vector<Linear*> linears() override;  // every linear of the blocks, in order
  // HF GPT2LMHeadModel files (models/gpt_io.cpp): "transformer." names, Conv1D weights [in, out].
  void load_hf_weights(const std::string& safetensors_path) override;
  NamedTensors hf_state_dict() override;

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
