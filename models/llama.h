// The Llama family (Hugging Face LlamaForCausalLM layout; "qwen2" is Llama with q/k/v biases, a
// "mistral" config loads as Llama): token embeddings, pre-RMSNorm blocks with rotary attention over
// grouped KV heads and a SwiGLU MLP, a final norm, lm_head tied to embed_tokens or its own. f32 masters
// under HF names, the forward in the compute dtype (as models/gpt.*). Notes: docs/LLAMA.md.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/causal_lm.h"
#include "runtime/ops_llama.h"
#include "runtime/tensor.h"

namespace deeplora {

struct LlamaConfig {
  std::string model_type = "llama";  // "llama", "qwen2" or "mistral"
  int64_t hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0, num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // 0 in a file that omits it: num_attention_heads (no GQA)
  int64_t head_dim = 0;             // 0: hidden_size / num_attention_heads
  int64_t vocab_size = 0, max_position_embeddings = 2048;
  int64_t sliding_window = 0;       // mistral / qwen2 with a window: sequences longer are refused
  double rms_norm_eps = 1e-6, rope_theta = 10000.0, initializer_range = 0.02;
  ops::RopeScaling rope_scaling;    // "default" or "llama3"
  bool tie_word_embeddings = false;
  bool attention_bias = false;      // Llama's attention_bias: q, k, v and o_proj biases
  bool qkv_bias = false;            // Qwen2: q, k, v biases (o_proj none)
  int64_t bos_token_id = -1, eos_token_id = -1;  // written back when the file had them

  static LlamaConfig from_json_file(const std::string& path);  // HF config.json; throws naming file and field
  void save_json_file(const std::string& path) const;
  void validate() const;  // throws naming the bad field
  int64_t hd() const { return head_dim > 0 ? head_dim : hidden_size / num_attention_heads; }
  int64_t kv_heads() const { return num_key_value_heads > 0 ? num_key_value_heads : num_attention_heads; }
  bool has_qkv_bias() const { return attention_bias || qkv_bias; }
  int64_t n_params() const;
  std::string str() const;
  int64_t padded_vocab() const { return (vocab_size + 63) / 64 * 64; }  // as GptConfig
  std::string architecture() const;
};

class Llama : public CausalLM {
 public:
  // Random init as HF (normal(0, initializer_range) for linears and embeddings, biases 0, norms 1).
  Llama(const LlamaConfig& cfg, DType compute, Device dev, uint64_t seed = 0);
  Llama(const Llama&) = delete;
  Llama& operator=(const Llama&) = delete;

  const LlamaConfig& config() const { return cfg_; }

  std::string model_type() const override { return cfg_.model_type; }
  DType compute_dtype() const override { return compute_; }
  Device device() const override { return dev_; }
  int64_t vocab_size() const override { return cfg_.vocab_size; }
  int64_t padded_vocab() const override { return cfg_.padded_vocab(); }
  int64_t max_positions() const override;
  int64_t bos_token_id() const override { return cfg_.bos_token_id; }
  int64_t n_layer() const override { return cfg_.num_hidden_layers; }
  int64_t hidden_size() const override { return cfg_.hidden_size; }
  int64_t n_params() const override { return cfg_.n_params(); }
  std::string describe() const override { return cfg_.str(); }
  void save_config(const std::string& path) const override { cfg_.save_json_file(path); }

  Tensor forward(const Tensor& tokens) override;
  Tensor forward_padded(const Tensor& tokens) override;
  Tensor hidden(const Tensor& tokens) override;
  Tensor lm_head(const Tensor& h) override;
  Tensor loss(const Tensor& tokens, const Tensor& targets) override;
  Tensor loss_at(const Tensor& tokens, const Tensor& rows, const Tensor& targets) override;
  using CausalLM::loss;

  // The cache holds keys/values expanded to num_attention_heads heads (HF's repeat_kv applied before
  // the write), so the GPT-2 cache ops serve it: [B, n_head, T_max, head_dim] per layer.
  KvCache make_cache(int64_t B, int64_t T_max) const override;
  Tensor hidden_cached(const Tensor& tokens, const Tensor& positions, const Tensor& start, KvCache& cache,
                       bool prefill = false) override;

  // HF names without the "model." prefix ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight",
  // ..., "norm.weight"), then "lm_head.weight" when untied.
  std::vector<std::pair<std::string, Param*>> named_params() override;
  std::vector<Linear*> linears() override;
  // A single safetensors file, or a sharded checkpoint's model.safetensors.index.json (its shards are
  // read from the index's directory).
  void load_hf_weights(const std::string& path) override;
  NamedTensors hf_state_dict() override;

 private:
  struct Layer {
    Param in_norm, post_norm, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, gate_w, up_w, down_w;
    Linear q, k, v, o, gate, up, down;
  };
  Tensor work(Param& p);
  Tensor apply_linear(Linear& l, const Tensor& x, const Tensor& residual = Tensor());
  Tensor head_weight(const Tensor& embed);
  void check_tokens(const Tensor& tokens, const char* op) const;
  // The decoder over token ids at `positions`; attn(layer, q, k, v) after rope.
  Tensor decoder(const Tensor& tokens, const Tensor& positions, const Tensor& embed,
                 const std::function<Tensor(size_t, const Tensor&, const Tensor&, const Tensor&)>& attn);
  Tensor hidden_with(const Tensor& tokens, const Tensor& embed);

  LlamaConfig cfg_;
  DType compute_;
  Device dev_;
  Param embed_, norm_, lm_head_;
  std::vector<Layer> layers_;
  Tensor inv_freq_;  // f32 [head_dim / 2] on dev_
  // Positions 0..T-1 of a [B, T] batch on dev_, made once per shape: no host upload inside a forward
  // after the first of its shape, so the captured train step (CUDA graph at its second call) has none.
  std::map<std::pair<int64_t, int64_t>, Tensor> positions_;
};

// A directory with config.json and model.safetensors or model.safetensors.index.json (sharded).
std::unique_ptr<Llama> load_hf_llama(const std::string& dir, DType compute, Device dev);
// Registry entries (models/families.cpp).
CausalLMFamily llama_family();
CausalLMFamily qwen2_family();
CausalLMFamily mistral_family();

}  // namespace deeplora
