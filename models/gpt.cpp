// GPT-2 model: config, parameters with HF names, forward, loss, generation.
#include "models/gpt.h"

#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <algorithm>
#include <cstring>
#include <random>
#include <stdexcept>

#include "runtime/io/atomic_file.h"
#include "runtime/ops.h"
#include "runtime/ops_cache.h"
#include "runtime/ops_layout.h"
#include "runtime/tape.h"

namespace deeplora {

GptConfig GptConfig::preset(const std::string& name) {
  GptConfig c;
  if (name == "gpt2" || name == "gpt2-small" || name == "d12") return c;
  if (name == "gpt2-medium") { c.n_layer = 24; c.n_head = 16; c.n_embd = 1024; return c; }
  if (name == "gpt2-large") { c.n_layer = 36; c.n_head = 20; c.n_embd = 1280; return c; }
  if (name == "gpt2-xl") { c.n_layer = 48; c.n_head = 25; c.n_embd = 1600; return c; }
  if (name == "tiny") { c.n_layer = 2; c.n_head = 4; c.n_embd = 64; c.vocab_size = 512; c.n_positions = 128; return c; }
  if (name == "small-cpu") { c.n_layer = 4; c.n_head = 4; c.n_embd = 128; c.n_positions = 256; return c; }
  throw std::invalid_argument(fmt::format(
      "unknown model preset '{}' (expected gpt2, gpt2-medium, gpt2-large, gpt2-xl, small-cpu or tiny)", name));
}

void GptConfig::validate() const {
  auto pos = [](int64_t v, const char* f) {
    if (v <= 0) throw std::invalid_argument(fmt::format("GPT config: {} must be positive, got {}", f, v));
  };
  pos(n_layer, "n_layer");
  pos(n_head, "n_head");
  pos(n_embd, "n_embd");
  pos(vocab_size, "vocab_size");
  pos(n_positions, "n_positions");
  if (n_embd % n_head != 0)
    throw std::invalid_argument(fmt::format("GPT config: n_head {} does not divide n_embd {}", n_head, n_embd));
  if (!(layer_norm_epsilon > 0))
    throw std::invalid_argument("GPT config: layer_norm_epsilon must be positive");
}

GptConfig GptConfig::from_json_file(const std::string& path) {
  nlohmann::json j = read_config_json(path);
  GptConfig c;
  auto get = [&](const char* key, int64_t& dst, bool required) {
    if (!j.contains(key)) {
      if (required) throw std::runtime_error(fmt::format("{}: missing field '{}'", path, key));
      return;
    }
    if (!j[key].is_number_integer()) throw std::runtime_error(fmt::format("{}: field '{}' is not an integer", path, key));
    dst = j[key].get<int64_t>();
  };
  if (j.contains("model_type") && j["model_type"] != "gpt2")
    throw std::runtime_error(fmt::format("{}: model_type is {}, only gpt2 is supported", path, j["model_type"].dump()));
  get("n_layer", c.n_layer, true);
  get("n_head", c.n_head, true);
  get("n_embd", c.n_embd, true);
  get("vocab_size", c.vocab_size, true);
  get("n_positions", c.n_positions, false);
  if (j.contains("layer_norm_epsilon")) {
    if (!j["layer_norm_epsilon"].is_number())
      throw std::runtime_error(fmt::format("{}: field 'layer_norm_epsilon' is not a number", path));
    c.layer_norm_epsilon = j["layer_norm_epsilon"].get<double>();
  }
  if (j.contains("tie_word_embeddings")) {
    if (!j["tie_word_embeddings"].is_boolean())
      throw std::runtime_error(fmt::format("{}: field 'tie_word_embeddings' is not true or false", path));
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  }
  if (j.contains("activation_function") && j["activation_function"] != "gelu_new")
    throw std::runtime_error(fmt::format("{}: activation_function {} is not supported (gelu_new only)", path,
                                         j["activation_function"].dump()));
  try {
    c.validate();
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: {}", path, e.what()));
  }
  return c;
}

void GptConfig::save_json_file(const std::string& path) const {
  nlohmann::json j = {{"model_type", "gpt2"},       {"architectures", {"GPT2LMHeadModel"}},
                      {"n_layer", n_layer},         {"n_head", n_head},
                      {"n_embd", n_embd},           {"vocab_size", vocab_size},
                      {"n_positions", n_positions}, {"n_ctx", n_positions},
                      {"layer_norm_epsilon", layer_norm_epsilon},
                      {"activation_function", "gelu_new"},
                      {"resid_pdrop", 0.0},         {"embd_pdrop", 0.0},
                      {"attn_pdrop", 0.0},          {"initializer_range", 0.02},
                      {"tie_word_embeddings", tie_word_embeddings}, {"bos_token_id", 50256},
                      {"eos_token_id", 50256}};
  write_file_atomic(path, j.dump(2) + "\n");
}

int64_t GptConfig::n_params() const {
  const int64_t C = n_embd;
  const int64_t block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C);
  return vocab_size * C * (tie_word_embeddings ? 1 : 2) + n_positions * C + n_layer * block + 2 * C;
}

std::string GptConfig::str() const {
  return fmt::format("GPT-2 n_layer={} n_head={} n_embd={} vocab={} n_positions={}{} ({:.1f}M params)", n_layer, n_head,
                     n_embd, vocab_size, n_positions, tie_word_embeddings ? "" : " untied lm_head",
                     double(n_params()) / 1e6);
}

// ---- model ----------------------------------------------------------------------------------------

Gpt::Gpt(const GptConfig& cfg, DType compute, Device dev, uint64_t seed) : cfg_(cfg), compute_(compute), dev_(dev) {
  cfg_.validate();
  const DType mdt = compute == DType::f64 ? DType::f64 : DType::f32;
  const int64_t C = cfg_.n_embd, V = cfg_.vocab_size, Vp = cfg_.padded_vocab();
  uint64_t counter = seed * 1000003ULL;
  auto normal = [&](Param& p, Shape s, double std) {
    p.master = Tensor::randn(s, ++counter, mdt, dev, std);
  };
  auto constant = [&](Param& p, Shape s, double v) {
    ++counter;
    p.master = Tensor::full(s, v, mdt, dev);
  };
  const double proj_std = 0.02 / std::sqrt(2.0 * double(cfg_.n_layer));
  normal(wte_, {Vp, C}, 0.02);
  if (Vp > V) wte_.master.slice0(V, Vp).fill(0.0);
  normal(wpe_, {cfg_.n_positions, C}, 0.02);
  blocks_.resize(size_t(cfg_.n_layer));
  for (auto& b : blocks_) {
    constant(b.ln1_w, {C}, 1.0);
    constant(b.ln1_b, {C}, 0.0);
    normal(b.attn_w, {3 * C, C}, 0.02);
    constant(b.attn_b, {3 * C}, 0.0);
    normal(b.proj_w, {C, C}, proj_std);
    constant(b.proj_b, {C}, 0.0);
    constant(b.ln2_w, {C}, 1.0);
    constant(b.ln2_b, {C}, 0.0);
    normal(b.fc_w, {4 * C, C}, 0.02);
    constant(b.fc_b, {4 * C}, 0.0);
    normal(b.mproj_w, {C, 4 * C}, proj_std);
    constant(b.mproj_b, {C}, 0.0);
  }
  constant(lnf_w_, {C}, 1.0);
  constant(lnf_b_, {C}, 0.0);
  if (!cfg_.tie_word_embeddings) {  // HF initializes an untied head like wte (normal 0.02)
    normal(lm_head_, {Vp, C}, 0.02);
    if (Vp > V) lm_head_.master.slice0(V, Vp).fill(0.0);
  }
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& b = blocks_[i];
    std::string h = fmt::format("h.{}.", i);
    b.c_attn = Linear{h + "attn.c_attn", &b.attn_w, &b.attn_b, nullptr};
    b.c_proj = Linear{h + "attn.c_proj", &b.proj_w, &b.proj_b, nullptr};
    b.c_fc = Linear{h + "mlp.c_fc", &b.fc_w, &b.fc_b, nullptr};
    b.mlp_proj = Linear{h + "mlp.c_proj", &b.mproj_w, &b.mproj_b, nullptr};
  }
  for (auto& [name, p] : named_params()) {
    p->master.set_name(name);
    p->master.set_requires_grad(true);
  }
}

std::vector<std::pair<std::string, Param*>> Gpt::named_params() {
  std::vector<std::pair<std::string, Param*>> v;
  v.emplace_back("wte.weight", &wte_);
  v.emplace_back("wpe.weight", &wpe_);
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& b = blocks_[i];
    std::string h = fmt::format("h.{}.", i);
    v.emplace_back(h + "ln_1.weight", &b.ln1_w);
    v.emplace_back(h + "ln_1.bias", &b.ln1_b);
    v.emplace_back(h + "attn.c_attn.weight", &b.attn_w);
    v.emplace_back(h + "attn.c_attn.bias", &b.attn_b);
    v.emplace_back(h + "attn.c_proj.weight", &b.proj_w);
    v.emplace_back(h + "attn.c_proj.bias", &b.proj_b);
    v.emplace_back(h + "ln_2.weight", &b.ln2_w);
    v.emplace_back(h + "ln_2.bias", &b.ln2_b);
    v.emplace_back(h + "mlp.c_fc.weight", &b.fc_w);
    v.emplace_back(h + "mlp.c_fc.bias", &b.fc_b);
    v.emplace_back(h + "mlp.c_proj.weight", &b.mproj_w);
    v.emplace_back(h + "mlp.c_proj.bias", &b.mproj_b);
  }
  v.emplace_back("ln_f.weight", &lnf_w_);
  v.emplace_back("ln_f.bias", &lnf_b_);
  if (!cfg_.tie_word_embeddings) v.emplace_back("lm_head.weight", &lm_head_);
  return v;
}

std::vector<Linear*> Gpt::linears() {
  std::vector<Linear*> v;
  for (auto& b : blocks_) {
    v.push_back(&b.c_attn);
    v.push_back(&b.c_proj);
    v.push_back(&b.c_fc);
    v.push_back(&b.mlp_proj);
  }
  return v;
}

Tensor Gpt::work(Param& p) { return compute_tensor(p, compute_); }

Tensor Gpt::apply_linear(Linear& l, const Tensor& x, const Tensor& residual) {
  return deeplora::apply_linear(l, x, residual, compute_);
}

Tensor Gpt::forward(const Tensor& tokens) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  const int64_t V = cfg_.vocab_size, Vp = cfg_.padded_vocab();
  if (Vp == V) return forward_padded(tokens);
  // Drop the padding columns (a last-dim slice on the device). forward() serves tools and tests,
  // training uses the padded form, so the whole forward runs without the tape, as it always has.
  NoGrad ng;
  return ops::slice_last(forward_padded(tokens), 0, V);
}

Tensor Gpt::forward_padded(const Tensor& tokens) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  Tensor wte = work(wte_);  // used twice (embedding and tied lm_head): one cast per step
  return ops::linear(hidden_with(tokens, wte), head(wte));
}

Tensor Gpt::head(const Tensor& wte) { return cfg_.tie_word_embeddings ? wte : work(lm_head_); }

Tensor Gpt::blocks(Tensor x, const std::function<Tensor(size_t, const Tensor&)>& attn) {
  const double eps = cfg_.layer_norm_epsilon;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& b = blocks_[i];
    Tensor h = ops::layernorm(x, work(b.ln1_w), work(b.ln1_b), eps);
    Tensor a = attn(i, apply_linear(b.c_attn, h));
    x = apply_linear(b.c_proj, a, x);
    h = ops::layernorm(x, work(b.ln2_w), work(b.ln2_b), eps);
    Tensor m = ops::gelu(apply_linear(b.c_fc, h));
    x = apply_linear(b.mlp_proj, m, x);
  }
  return ops::layernorm(x, work(lnf_w_), work(lnf_b_), eps);
}

Tensor Gpt::hidden(const Tensor& tokens) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  return hidden_with(tokens, work(wte_));
}

Tensor Gpt::hidden_with(const Tensor& tokens, const Tensor& wte) {
  check(tokens.dtype() == DType::i32 && tokens.ndim() == 2, "Gpt::forward",
        fmt::format("tokens must be i32 [B, T], got {}", tokens.desc()));
  check(tokens.dim(1) <= cfg_.n_positions, "Gpt::forward",
        fmt::format("sequence length {} exceeds n_positions {}", tokens.dim(1), cfg_.n_positions));
  Tensor x = ops::embedding(tokens, wte, work(wpe_), cfg_.vocab_size);
  const int64_t H = cfg_.n_head;
  return blocks(x, [H](size_t, const Tensor& qkv) { return ops::attention(qkv, H); });
}

Tensor Gpt::lm_head(const Tensor& h) {
  return ops::linear(h, cfg_.tie_word_embeddings ? work(wte_) : work(lm_head_));
}

KvCache Gpt::make_cache(int64_t B, int64_t T_max) const {
  check(B > 0 && T_max > 0 && T_max <= cfg_.n_positions, "Gpt::make_cache",
        fmt::format("batch {} and length {} must be positive, the length at most n_positions {}", B, T_max,
                    cfg_.n_positions));
  KvCache c;
  c.B = B;
  c.T_max = T_max;
  const int64_t H = cfg_.n_head, hd = cfg_.n_embd / H;
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    c.k.push_back(Tensor::empty(Shape{B, H, T_max, hd}, compute_, dev_));
    c.v.push_back(Tensor::empty(Shape{B, H, T_max, hd}, compute_, dev_));
  }
  return c;
}

Tensor Gpt::hidden_cached(const Tensor& tokens, const Tensor& positions, const Tensor& start, KvCache& cache,
                          bool prefill) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  check(!grad_enabled(), "Gpt::hidden_cached", "inference only: call it under NoGrad");
  check(tokens.dtype() == DType::i32 && tokens.ndim() == 2 && positions.shape() == tokens.shape(),
        "Gpt::hidden_cached",
        fmt::format("tokens {} and positions {} must be i32 [B, Tn] alike", tokens.desc(), positions.desc()));
  check(tokens.dim(0) == cache.B && int64_t(cache.k.size()) == cfg_.n_layer, "Gpt::hidden_cached",
        fmt::format("tokens {} do not match the cache (batch {}, {} layers)", tokens.desc(), cache.B, cache.k.size()));
  Tensor x = ops::add(ops::embedding(tokens, work(wte_), Tensor(), cfg_.vocab_size),
                      ops::embedding(positions, work(wpe_), Tensor(), cache.T_max));
  const int64_t H = cfg_.n_head;
  return blocks(x, [&](size_t l, const Tensor& qkv) {
    ops::attention_cache_write(qkv, cache.k[l], cache.v[l], start, H);
    return prefill ? ops::attention(qkv, H) : ops::attention_cached(qkv, cache.k[l], cache.v[l], start, H);
  });
}

Tensor Gpt::loss_at(const Tensor& tokens, const Tensor& rows, const Tensor& targets) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  check(rows.dtype() == DType::i32 && rows.ndim() == 1 && targets.shape() == rows.shape(), "Gpt::loss_at",
        fmt::format("rows {} and targets {} must be i32 [N] alike", rows.desc(), targets.desc()));
  const int64_t B = tokens.dim(0), T = tokens.dim(1), N = rows.dim(0);
  Tensor wte = work(wte_);
  Tensor h = hidden_with(tokens, wte);
  Tensor picked = ops::embedding(rows.reshape(Shape{1, N}), ops::reshape(h, Shape{B * T, cfg_.n_embd}));
  return ops::cross_entropy(ops::linear(picked, head(wte)), targets.reshape(Shape{1, N}), -100, cfg_.vocab_size);
}

Tensor Gpt::loss(const Tensor& tokens, const Tensor& targets) {
  WorkScope ws(*this, compute_);  // every trainable cast of this pass in one grouped op
  return ops::cross_entropy(forward_padded(tokens), targets, -100, cfg_.vocab_size);
}

}  // namespace deeplora
