// The Llama family: config.json, parameters with HF names, forward, loss, the KV cache.
#include "models/llama.h"

#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "runtime/io/atomic_file.h"
#include "runtime/ops.h"
#include "runtime/ops_cache.h"
#include "runtime/ops_layout.h"
#include "runtime/ops_llama.h"
#include "runtime/tape.h"

namespace deeplora {

// ---- config ---------------------------------------------------------------------------------------

void LlamaConfig::validate() const {
  auto pos = [&](int64_t v, const char* f) {
    if (v <= 0) throw std::invalid_argument(fmt::format("{} config: {} must be positive, got {}", model_type, f, v));
  };
  pos(hidden_size, "hidden_size");
  pos(intermediate_size, "intermediate_size");
  pos(num_hidden_layers, "num_hidden_layers");
  pos(num_attention_heads, "num_attention_heads");
  pos(vocab_size, "vocab_size");
  pos(max_position_embeddings, "max_position_embeddings");
  if (num_key_value_heads < 0 || head_dim < 0 || sliding_window < 0)
    throw std::invalid_argument(fmt::format("{} config: num_key_value_heads, head_dim and sliding_window must not be negative", model_type));
  if (head_dim == 0 && hidden_size % num_attention_heads != 0)
    throw std::invalid_argument(fmt::format("{} config: num_attention_heads {} does not divide hidden_size {}", model_type,
                                            num_attention_heads, hidden_size));
  if (num_attention_heads % kv_heads() != 0)
    throw std::invalid_argument(fmt::format("{} config: num_key_value_heads {} does not divide num_attention_heads {}",
                                            model_type, kv_heads(), num_attention_heads));
  const int64_t d = hd();
  if (d % 8 != 0 || d > 128)
    throw std::invalid_argument(
        fmt::format("{} config: head_dim {} must be a multiple of 8 and at most 128 (the attention kernels)", model_type, d));
  if (!(rms_norm_eps > 0)) throw std::invalid_argument(fmt::format("{} config: rms_norm_eps must be positive", model_type));
  if (!(rope_theta > 0)) throw std::invalid_argument(fmt::format("{} config: rope_theta must be positive", model_type));
  if (rope_scaling.type != "default" && rope_scaling.type != "llama3")
    throw std::invalid_argument(fmt::format("{} config: rope_scaling type '{}' is not supported (default or llama3)",
                                            model_type, rope_scaling.type));
}

std::string LlamaConfig::architecture() const {
  if (model_type == "qwen2") return "Qwen2ForCausalLM";
  if (model_type == "mistral") return "MistralForCausalLM";
  return "LlamaForCausalLM";
}

LlamaConfig LlamaConfig::from_json_file(const std::string& path) {
  nlohmann::json j = read_config_json(path);
  if (!j.is_object()) throw std::runtime_error(fmt::format("{}: not a JSON object", path));
  LlamaConfig c;
  if (!j.contains("model_type") || !j["model_type"].is_string())
    throw std::runtime_error(fmt::format("{}: missing field 'model_type'", path));
  c.model_type = j["model_type"].get<std::string>();
  if (c.model_type != "llama" && c.model_type != "qwen2" && c.model_type != "mistral")
    throw std::runtime_error(fmt::format("{}: model_type '{}' is not llama, qwen2 or mistral", path, c.model_type));
  auto present = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  auto geti = [&](const char* key, int64_t& dst, bool required) {
    if (!present(key)) {
      if (required) throw std::runtime_error(fmt::format("{}: missing field '{}'", path, key));
      return;
    }
    if (!j[key].is_number_integer()) throw std::runtime_error(fmt::format("{}: field '{}' is not an integer", path, key));
    dst = j[key].get<int64_t>();
  };
  auto getd = [&](const nlohmann::json& o, const char* key, double& dst) {
    if (!o.contains(key) || o[key].is_null()) return;
    if (!o[key].is_number()) throw std::runtime_error(fmt::format("{}: field '{}' is not a number", path, key));
    dst = o[key].get<double>();
  };
  auto getb = [&](const char* key, bool& dst) {
    if (!present(key)) return;
    if (!j[key].is_boolean()) throw std::runtime_error(fmt::format("{}: field '{}' is not true or false", path, key));
    dst = j[key].get<bool>();
  };
  geti("hidden_size", c.hidden_size, true);
  geti("intermediate_size", c.intermediate_size, true);
  geti("num_hidden_layers", c.num_hidden_layers, true);
  geti("num_attention_heads", c.num_attention_heads, true);
  geti("vocab_size", c.vocab_size, true);
  geti("num_key_value_heads", c.num_key_value_heads, false);
  geti("head_dim", c.head_dim, false);
  geti("max_position_embeddings", c.max_position_embeddings, false);
  getd(j, "rms_norm_eps", c.rms_norm_eps);
  getd(j, "rope_theta", c.rope_theta);
  getd(j, "initializer_range", c.initializer_range);
  getb("tie_word_embeddings", c.tie_word_embeddings);
  getb("attention_bias", c.attention_bias);
  c.qkv_bias = c.model_type == "qwen2";  // Qwen2Attention: q/k/v with bias, o_proj without
  if (c.model_type == "qwen2" && c.attention_bias)
    throw std::runtime_error(fmt::format("{}: field 'attention_bias' is not a qwen2 field (its q/k/v biases are implied)", path));
  bool mlp_bias = false;
  getb("mlp_bias", mlp_bias);
  if (mlp_bias) throw std::runtime_error(fmt::format("{}: field 'mlp_bias' true is not supported", path));
  if (present("hidden_act") && j["hidden_act"] != "silu")
    throw std::runtime_error(fmt::format("{}: field 'hidden_act' {} is not supported (silu only)", path, j["hidden_act"].dump()));
  if (present("pretraining_tp") && j["pretraining_tp"] != 1)
    throw std::runtime_error(fmt::format("{}: field 'pretraining_tp' must be 1", path));
  // Sliding windows: Mistral's sliding_window (null in v0.2+), Qwen2's use_sliding_window (false in
  // its released models). Not implemented: sequences are limited to the window instead.
  bool use_sw = c.model_type == "mistral";
  if (c.model_type == "qwen2") getb("use_sliding_window", use_sw);
  if (use_sw) geti("sliding_window", c.sliding_window, false);
  // RoPE: transformers 4.x writes "rope_theta" + "rope_scaling" (null or {rope_type, factor, ...});
  // transformers 5 writes "rope_parameters" ({rope_theta, rope_type, factor, ...}). Both are read; where
  // both are present, rope_parameters wins (it is what transformers 5 itself reads).
  auto rope = [&](const char* field) {
    const nlohmann::json& r = j[field];
    if (!r.is_object()) throw std::runtime_error(fmt::format("{}: field '{}' is not an object", path, field));
    std::string type = "default";
    for (const char* k : {"rope_type", "type"})
      if (r.contains(k)) {
        if (!r[k].is_string()) throw std::runtime_error(fmt::format("{}: field '{}.{}' is not a string", path, field, k));
        type = r[k].get<std::string>();
        break;
      }
    if (type != "llama3" && type != "default")
      throw std::runtime_error(fmt::format("{}: field '{}' type '{}' is not supported (default or llama3)", path, field, type));
    c.rope_scaling.type = type;
    getd(r, "rope_theta", c.rope_theta);
    getd(r, "factor", c.rope_scaling.factor);
    getd(r, "low_freq_factor", c.rope_scaling.low_freq_factor);
    getd(r, "high_freq_factor", c.rope_scaling.high_freq_factor);
    if (r.contains("original_max_position_embeddings")) {
      if (!r["original_max_position_embeddings"].is_number_integer())
        throw std::runtime_error(
            fmt::format("{}: field '{}.original_max_position_embeddings' is not an integer", path, field));
      c.rope_scaling.original_max_position_embeddings = r["original_max_position_embeddings"].get<int64_t>();
    }
  };
  if (present("rope_parameters")) rope("rope_parameters");
  else if (present("rope_scaling")) rope("rope_scaling");
  if (present("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"].get<int64_t>();
  if (present("eos_token_id") && j["eos_token_id"].is_number_integer()) c.eos_token_id = j["eos_token_id"].get<int64_t>();
  try {
    c.validate();
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: {}", path, e.what()));
  }
  return c;
}

void LlamaConfig::save_json_file(const std::string& path) const {
  nlohmann::json j = {{"model_type", model_type},
                      {"architectures", {architecture()}},
                      {"hidden_size", hidden_size},
                      {"intermediate_size", intermediate_size},
                      {"num_hidden_layers", num_hidden_layers},
                      {"num_attention_heads", num_attention_heads},
                      {"num_key_value_heads", kv_heads()},
                      {"head_dim", hd()},
                      {"vocab_size", vocab_size},
                      {"max_position_embeddings", max_position_embeddings},
                      {"rms_norm_eps", rms_norm_eps},
                      {"rope_theta", rope_theta},
                      {"hidden_act", "silu"},
                      {"initializer_range", initializer_range},
                      {"attention_dropout", 0.0},
                      {"tie_word_embeddings", tie_word_embeddings},
                      {"torch_dtype", "float32"}};
  if (model_type == "llama") {
    j["attention_bias"] = attention_bias;
    j["mlp_bias"] = false;
    j["pretraining_tp"] = 1;
  }
  if (model_type == "qwen2") {
    j["use_sliding_window"] = sliding_window > 0;
    j["sliding_window"] = sliding_window > 0 ? nlohmann::json(sliding_window) : nlohmann::json(nullptr);
  }
  if (model_type == "mistral")
    j["sliding_window"] = sliding_window > 0 ? nlohmann::json(sliding_window) : nlohmann::json(nullptr);
  if (rope_scaling.type == "llama3")
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", rope_scaling.factor},
                         {"low_freq_factor", rope_scaling.low_freq_factor},
                         {"high_freq_factor", rope_scaling.high_freq_factor},
                         {"original_max_position_embeddings", rope_scaling.original_max_position_embeddings}};
  else
    j["rope_scaling"] = nullptr;
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_id >= 0) j["eos_token_id"] = eos_token_id;
  write_file_atomic(path, j.dump(2) + "\n");
}

int64_t LlamaConfig::n_params() const {
  const int64_t C = hidden_size, I = intermediate_size, H = num_attention_heads, K = kv_heads(), d = hd();
  int64_t attn = C * H * d + 2 * C * K * d + H * d * C;
  if (has_qkv_bias()) attn += H * d + 2 * K * d;
  if (attention_bias) attn += C;
  const int64_t layer = 2 * C + attn + 3 * C * I;
  return vocab_size * C * (tie_word_embeddings ? 1 : 2) + num_hidden_layers * layer + C;
}

std::string LlamaConfig::str() const {
  return fmt::format("{} layers={} hidden={} heads={} kv_heads={} head_dim={} intermediate={} vocab={} max_pos={}{}{} "
                     "({:.1f}M params)",
                     model_type, num_hidden_layers, hidden_size, num_attention_heads, kv_heads(), hd(), intermediate_size,
                     vocab_size, max_position_embeddings, tie_word_embeddings ? " tied" : "",
                     has_qkv_bias() ? " qkv-bias" : "", double(n_params()) / 1e6);
}

// ---- model ----------------------------------------------------------------------------------------

Llama::Llama(const LlamaConfig& cfg, DType compute, Device dev, uint64_t seed) : cfg_(cfg), compute_(compute), dev_(dev) {
  cfg_.validate();
  const DType mdt = compute == DType::f64 ? DType::f64 : DType::f32;
  const int64_t C = cfg_.hidden_size, I = cfg_.intermediate_size, V = cfg_.vocab_size, Vp = cfg_.padded_vocab();
  const int64_t qd = cfg_.num_attention_heads * cfg_.hd(), kd = cfg_.kv_heads() * cfg_.hd();
  const double sd = cfg_.initializer_range;
  uint64_t counter = seed * 1000003ULL + 17;
  auto normal = [&](Param& p, Shape s) { p.master = Tensor::randn(s, ++counter, mdt, dev, sd); };
  auto constant = [&](Param& p, Shape s, double v) {
    ++counter;
    p.master = Tensor::full(s, v, mdt, dev);
  };
  normal(embed_, {Vp, C});
  if (Vp > V) embed_.master.slice0(V, Vp).fill(0.0);
  layers_.resize(size_t(cfg_.num_hidden_layers));
  for (auto& l : layers_) {
    constant(l.in_norm, {C}, 1.0);
    normal(l.q_w, {qd, C});
    normal(l.k_w, {kd, C});
    normal(l.v_w, {kd, C});
    if (cfg_.has_qkv_bias()) {
      constant(l.q_b, {qd}, 0.0);
      constant(l.k_b, {kd}, 0.0);
      constant(l.v_b, {kd}, 0.0);
    }
    normal(l.o_w, {C, qd});
    if (cfg_.attention_bias) constant(l.o_b, {C}, 0.0);
    constant(l.post_norm, {C}, 1.0);
    normal(l.gate_w, {I, C});
    normal(l.up_w, {I, C});
    normal(l.down_w, {C, I});
  }
  constant(norm_, {C}, 1.0);
  if (!cfg_.tie_word_embeddings) {
    normal(lm_head_, {Vp, C});
    if (Vp > V) lm_head_.master.slice0(V, Vp).fill(0.0);
  }
  const bool qkvb = cfg_.has_qkv_bias();
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& l = layers_[i];
    const std::string p = fmt::format("layers.{}.", i);
    l.q = Linear{p + "self_attn.q_proj", &l.q_w, qkvb ? &l.q_b : nullptr, nullptr};
    l.k = Linear{p + "self_attn.k_proj", &l.k_w, qkvb ? &l.k_b : nullptr, nullptr};
    l.v = Linear{p + "self_attn.v_proj", &l.v_w, qkvb ? &l.v_b : nullptr, nullptr};
    l.o = Linear{p + "self_attn.o_proj", &l.o_w, cfg_.attention_bias ? &l.o_b : nullptr, nullptr};
    l.gate = Linear{p + "mlp.gate_proj", &l.gate_w, nullptr, nullptr};
    l.up = Linear{p + "mlp.up_proj", &l.up_w, nullptr, nullptr};
    l.down = Linear{p + "mlp.down_proj", &l.down_w, nullptr, nullptr};
  }
  for (auto& [name, p] : named_params()) {
    p->master.set_name(name);
    p->master.set_requires_grad(true);
  }
  inv_freq_ = ops::rope_inv_freq_tensor(cfg_.hd(), cfg_.rope_theta, cfg_.rope_scaling, dev_);
}

int64_t Llama::max_positions() const {
  int64_t m = cfg_.max_position_embeddings;
  if (cfg_.sliding_window > 0 && cfg_.sliding_window < m) m = cfg_.sliding_window;
  return m;
}

std::vector<std::pair<std::string, Param*>> Llama::named_params() {
  std::vector<std::pair<std::string, Param*>> v;
  v.emplace_back("embed_tokens.weight", &embed_);
  const bool qkvb = cfg_.has_qkv_bias();
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& l = layers_[i];
    const std::string p = fmt::format("layers.{}.", i);
    v.emplace_back(p + "input_layernorm.weight", &l.in_norm);
    v.emplace_back(p + "self_attn.q_proj.weight", &l.q_w);
    if (qkvb) v.emplace_back(p + "self_attn.q_proj.bias", &l.q_b);
    v.emplace_back(p + "self_attn.k_proj.weight", &l.k_w);
    if (qkvb) v.emplace_back(p + "self_attn.k_proj.bias", &l.k_b);
    v.emplace_back(p + "self_attn.v_proj.weight", &l.v_w);
    if (qkvb) v.emplace_back(p + "self_attn.v_proj.bias", &l.v_b);
    v.emplace_back(p + "self_attn.o_proj.weight", &l.o_w);
    if (cfg_.attention_bias) v.emplace_back(p + "self_attn.o_proj.bias", &l.o_b);
    v.emplace_back(p + "post_attention_layernorm.weight", &l.post_norm);
    v.emplace_back(p + "mlp.gate_proj.weight", &l.gate_w);
    v.emplace_back(p + "mlp.up_proj.weight", &l.up_w);
    v.emplace_back(p + "mlp.down_proj.weight", &l.down_w);
  }
  v.emplace_back("norm.weight", &norm_);
  if (!cfg_.tie_word_embeddings) v.emplace_back("lm_head.weight", &lm_head_);
  return v;
}

std::vector<Linear*> Llama::linears() {
  std::vector<Linear*> v;
  for (auto& l : layers_)
    for (Linear* x : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) v.push_back(x);
  return v;
}

Tensor Llama::work(Param& p) { return compute_tensor(p, compute_); }

Tensor Llama::apply_linear(Linear& l, const Tensor& x, const Tensor& residual) {
  return deeplora::apply_linear(l, x, residual, compute_);
}

Tensor Llama::head_weight(const Tensor& embed) { return cfg_.tie_word_embeddings ? embed : work(lm_head_); }

void Llama::check_tokens(const Tensor& tokens, const char* op) const {
  check(tokens.dtype() == DType::i32 && tokens.ndim() == 2, op, fmt::format("tokens must be i32 [B, T], got {}", tokens.desc()));
  check(tokens.dim(1) <= max_positions(), op,
        fmt::format("sequence length {} exceeds {} {}", tokens.dim(1),
                    max_positions() < cfg_.max_position_embeddings ? "sliding_window" : "max_position_embeddings",
                    max_positions()));
}

Tensor Llama::decoder(const Tensor& tokens, const Tensor& positions, const Tensor& embed,
                      const std::function<Tensor(size_t, const Tensor&, const Tensor&, const Tensor&)>& attn) {
  const double eps = cfg_.rms_norm_eps;
  Tensor x = ops::embedding(tokens, embed, Tensor(), cfg_.vocab_size);
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& l = layers_[i];
    Tensor h = ops::rmsnorm(x, work(l.in_norm), eps);
    Tensor q = ops::rope(apply_linear(l.q, h), positions, inv_freq_);
    Tensor k = ops::rope(apply_linear(l.k, h), positions, inv_freq_);
    Tensor v = apply_linear(l.v, h);
    x = apply_linear(l.o, attn(i, q, k, v), x);
    h = ops::rmsnorm(x, work(l.post_norm), eps);
    Tensor m = ops::swiglu(apply_linear(l.gate, h), apply_linear(l.up, h));
    x = apply_linear(l.down, m, x);
  }
  return ops::rmsnorm(x, work(norm_), eps);
}

static Tensor arange_positions(int64_t B, int64_t T, Device dev) {
  std::vector<int32_t> p(size_t(B * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) p[size_t(b * T + t)] = int32_t(t);
  return Tensor::from_ints(p, Shape{B, T}, dev);
}

Tensor Llama::hidden_with(const Tensor& tokens, const Tensor& embed) {
  check_tokens(tokens, "Llama::forward");
  const int64_t H = cfg_.num_attention_heads, K = cfg_.kv_heads();
  Tensor& pos = positions_[{tokens.dim(0), tokens.dim(1)}];
  if (!pos.defined()) pos = arange_positions(tokens.dim(0), tokens.dim(1), dev_);
  return decoder(tokens, pos, embed, [H, K](size_t, const Tensor& q, const Tensor& k, const Tensor& v) {
    return ops::gqa_attention(q, k, v, H, K);
  });
}

Tensor Llama::hidden(const Tensor& tokens) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  return hidden_with(tokens, work(embed_));
}

Tensor Llama::lm_head(const Tensor& h) {
  return ops::linear(h, head_weight(work(embed_)));
}

Tensor Llama::forward_padded(const Tensor& tokens) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  Tensor e = work(embed_);
  return ops::linear(hidden_with(tokens, e), head_weight(e));
}

Tensor Llama::forward(const Tensor& tokens) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  const int64_t V = cfg_.vocab_size, Vp = cfg_.padded_vocab();
  if (Vp == V) return forward_padded(tokens);
  NoGrad ng;  // as Gpt::forward: tools and tests; training uses the padded form
  return ops::slice_last(forward_padded(tokens), 0, V);
}

Tensor Llama::loss(const Tensor& tokens, const Tensor& targets) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  return ops::cross_entropy(forward_padded(tokens), targets, -100, cfg_.vocab_size);
}

Tensor Llama::loss_at(const Tensor& tokens, const Tensor& rows, const Tensor& targets) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  check(rows.dtype() == DType::i32 && rows.ndim() == 1 && targets.shape() == rows.shape(), "Llama::loss_at",
        fmt::format("rows {} and targets {} must be i32 [N] alike", rows.desc(), targets.desc()));
  const int64_t B = tokens.dim(0), T = tokens.dim(1), N = rows.dim(0);
  Tensor e = work(embed_);
  Tensor h = hidden_with(tokens, e);
  Tensor picked = ops::embedding(rows.reshape(Shape{1, N}), ops::reshape(h, Shape{B * T, cfg_.hidden_size}));
  return ops::cross_entropy(ops::linear(picked, head_weight(e)), targets.reshape(Shape{1, N}), -100, cfg_.vocab_size);
}

KvCache Llama::make_cache(int64_t B, int64_t T_max) const {
  check(B > 0 && T_max > 0 && T_max <= max_positions(), "Llama::make_cache",
        fmt::format("batch {} and length {} must be positive, the length at most {}", B, T_max, max_positions()));
  KvCache c;
  c.B = B;
  c.T_max = T_max;
  const int64_t H = cfg_.num_attention_heads, hd = cfg_.hd();
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    c.k.push_back(Tensor::empty(Shape{B, H, T_max, hd}, compute_, dev_));
    c.v.push_back(Tensor::empty(Shape{B, H, T_max, hd}, compute_, dev_));
  }
  return c;
}

// [B, T, K * hd] -> [B, T, H * hd], KV head j repeated for query heads j*g .. j*g+g-1 (HF repeat_kv).
static Tensor repeat_kv(const Tensor& x, int64_t K, int64_t g) {
  if (g == 1) return x;
  const int64_t hd = x.dim(2) / K;
  std::vector<Tensor> parts = ops::split_last(x, std::vector<int64_t>(size_t(K), hd));
  std::vector<Tensor> rep;
  rep.reserve(size_t(K * g));
  for (const Tensor& p : parts)
    for (int64_t r = 0; r < g; ++r) rep.push_back(p);
  return ops::concat(rep);
}

Tensor Llama::hidden_cached(const Tensor& tokens, const Tensor& positions, const Tensor& start, KvCache& cache,
                            bool prefill) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  check(!grad_enabled(), "Llama::hidden_cached", "inference only: call it under NoGrad");
  check(tokens.dtype() == DType::i32 && tokens.ndim() == 2 && positions.shape() == tokens.shape(), "Llama::hidden_cached",
        fmt::format("tokens {} and positions {} must be i32 [B, Tn] alike", tokens.desc(), positions.desc()));
  check(tokens.dim(0) == cache.B && int64_t(cache.k.size()) == cfg_.num_hidden_layers, "Llama::hidden_cached",
        fmt::format("tokens {} do not match the cache (batch {}, {} layers)", tokens.desc(), cache.B, cache.k.size()));
  const int64_t H = cfg_.num_attention_heads, K = cfg_.kv_heads();
  return decoder(tokens, positions, work(embed_), [&](size_t l, const Tensor& q, const Tensor& k, const Tensor& v) {
    Tensor qkv = ops::concat({q, repeat_kv(k, K, H / K), repeat_kv(v, K, H / K)});
    ops::attention_cache_write(qkv, cache.k[l], cache.v[l], start, H);
    return prefill ? ops::gqa_attention(q, k, v, H, K) : ops::attention_cached(qkv, cache.k[l], cache.v[l], start, H);
  });
}

}  // namespace deeplora
