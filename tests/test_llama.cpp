// The Llama family (models/llama.*): gradients against finite differences (f64), HF save -> load
// round trips (tied, untied, qwen2's q/k/v biases, bf16 files, sharded checkpoints), KV-cache greedy
// decoding against full recomputation, LoRA and Deep LoRA through the family's target table, eval's
// score_mc, config errors, and (when present) the transformers fixture tests/data/llama_tiny.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <algorithm>

#include "models/adapters.h"
#include "models/eval.h"
#include "models/generate.h"
#include "models/llama.h"
#include "models/tokenizer.h"
#include "runtime/ops.h"
#include "runtime/optim.h"
#include "runtime/tape.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;
using test::contains;
using test::error_of;

namespace {

// 2 layers, hidden 32, 4 heads over 2 KV heads of 8, intermediate 48, vocab 50 (padded to 64).
LlamaConfig tiny(const std::string& type = "llama", bool tied = false) {
  LlamaConfig c;
  c.model_type = type;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.vocab_size = 50;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = tied;
  c.qkv_bias = type == "qwen2";
  if (type == "qwen2") c.rope_theta = 1e6;
  return c;
}

struct Batch {
  Tensor tokens, targets;
};

Batch random_batch(int64_t B, int64_t T, uint64_t seed, int64_t V) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(size_t(B * T)), y(size_t(B * T));
  for (auto& x : t) x = int32_t(rng() % uint64_t(V));
  for (auto& x : y) x = int32_t(rng() % uint64_t(V));
  y[0] = y[1] = -100;
  return {Tensor::from_ints(t, Shape{B, T}), Tensor::from_ints(y, Shape{B, T})};
}

// Every parameter moved off its init (norms not 1, biases not 0), so each one matters.
void perturb(Llama& m, uint64_t seed) {
  NoGrad ng;
  uint64_t k = seed;
  for (auto& [n, p] : m.named_params()) {
    Tensor r = Tensor::randn(p->master.shape(), ++k, p->master.dtype(), Device::cpu, 0.05);
    if (n == "embed_tokens.weight" || n == "lm_head.weight") r.slice0(m.vocab_size(), m.padded_vocab()).fill(0.0);
    p->master.copy_from(ops::add(p->master, r));
  }
  m.invalidate_frozen_cache();
}

std::vector<double> logits_of(CausalLM& m, const Tensor& tokens) {
  NoGrad ng;
  return m.forward(tokens).to_double();
}

std::vector<int32_t> greedy_full(CausalLM& model, std::vector<int32_t> seq, int64_t n_new) {
  NoGrad ng;
  const int64_t V = model.vocab_size(), n0 = int64_t(seq.size());
  for (int64_t i = 0; i < n_new; ++i) {
    const int64_t T = int64_t(seq.size());
    std::vector<double> l = model.forward(Tensor::from_ints(seq, Shape{1, T}, model.device())).to_double();
    const double* r = l.data() + (T - 1) * V;
    seq.push_back(int32_t(std::max_element(r, r + V) - r));
  }
  return std::vector<int32_t>(seq.begin() + n0, seq.end());
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double n = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) n += (a[i] - b[i]) * (a[i] - b[i]), d += b[i] * b[i];
  return std::sqrt(n / std::max(d, 1e-300));
}

std::vector<std::string> names(const std::vector<Linear*>& ls) {
  std::vector<std::string> v;
  for (Linear* l : ls) v.push_back(l->name);
  return v;
}

std::string config_json(const nlohmann::json& over) {
  nlohmann::json j = {{"model_type", "llama"},       {"hidden_size", 32},        {"intermediate_size", 48},
                      {"num_hidden_layers", 2},      {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                      {"vocab_size", 50},            {"max_position_embeddings", 64}};
  for (auto& [k, v] : over.items()) {
    if (v.is_null()) j.erase(k);
    else j[k] = v;
  }
  return j.dump();
}

}  // namespace

TEST_CASE("llama: loss gradients match central finite differences (f64; GQA, qwen2 biases, llama3 rope, tied)") {
  struct Case {
    std::string type;
    bool tied, llama3;
  };
  for (const Case& c : {Case{"llama", false, true}, Case{"qwen2", true, false}, Case{"llama", true, false}}) {
    CAPTURE(c.type);
    CAPTURE(c.tied);
    LlamaConfig cfg = tiny(c.type, c.tied);
    if (c.llama3) {
      cfg.rope_scaling.type = "llama3";
      cfg.rope_scaling.original_max_position_embeddings = 16;
    }
    Llama m(cfg, DType::f64, Device::cpu, 3);
    perturb(m, 11);
    Batch b = random_batch(2, 9, 5, cfg.vocab_size);
    Tensor loss = m.loss(b.tokens, b.targets);
    backward(loss);
    std::vector<std::string> checked = {"embed_tokens.weight",        "layers.0.input_layernorm.weight",
                                        "layers.0.self_attn.q_proj.weight", "layers.1.self_attn.k_proj.weight",
                                        "layers.0.self_attn.v_proj.weight", "layers.1.self_attn.o_proj.weight",
                                        "layers.0.post_attention_layernorm.weight", "layers.0.mlp.gate_proj.weight",
                                        "layers.1.mlp.up_proj.weight",      "layers.1.mlp.down_proj.weight",
                                        "norm.weight"};
    if (!c.tied) checked.push_back("lm_head.weight");
    if (c.type == "qwen2")
      for (const char* n : {"layers.0.self_attn.q_proj.bias", "layers.1.self_attn.k_proj.bias", "layers.0.self_attn.v_proj.bias"})
        checked.push_back(n);
    double worst = 0;
    for (const std::string& name : checked) {
      CAPTURE(name);
      Param& p = m.param(name);
      REQUIRE(p.master.grad().defined());
      std::vector<double> g = p.master.grad().to_double();
      double* w = p.master.data_as<double>();
      const int64_t n = std::min<int64_t>(p.master.numel(), name == "embed_tokens.weight" ? 50 * 32 : p.master.numel());
      for (int k = 0; k < 4; ++k) {
        const int64_t i = (int64_t(k) * 7919 + 13) % n;
        const double w0 = w[i], h = 1e-5;
        double lp, lm;
        {
          NoGrad ng;
          w[i] = w0 + h;
          lp = m.loss(b.tokens, b.targets).item();
          w[i] = w0 - h;
          lm = m.loss(b.tokens, b.targets).item();
          w[i] = w0;
        }
        const double fd = (lp - lm) / (2 * h);
        // Relative, with a floor of 1e-3: k_proj's bias barely moves the loss (softmax is shift-invariant
        // up to rope's rotation), so its ~1e-7 gradients are compared against the difference's noise.
        const double err = std::abs(fd - g[size_t(i)]) / std::max(1e-3, std::abs(fd) + std::abs(g[size_t(i)]));
        worst = std::max(worst, err);
        CHECK_MESSAGE(err <= 1e-6, name, "[", i, "]: fd ", fd, " vs ", g[size_t(i)]);
      }
    }
    MESSAGE(fmt::format("{}{}: worst relative fd error {:.2e} over {} tensors", c.type, c.tied ? " tied" : "", worst,
                        checked.size()));
  }
}

TEST_CASE("llama: save_hf -> load_hf_causal_lm gives identical logits (tied, untied, qwen2; bf16 files; shards)") {
  test::TempDir dir;
  const Tensor tok = Tensor::from_ints({3, 1, 4, 1, 5, 9, 2, 6, 49, 0, 7, 7}, Shape{2, 6});
  for (auto [type, tied] : {std::pair{std::string("llama"), false}, {"llama", true}, {"qwen2", true}, {"qwen2", false},
                            {"mistral", false}}) {
    CAPTURE(type);
    CAPTURE(tied);
    Llama a(tiny(type, tied), DType::f32, Device::cpu, 9);
    perturb(a, 4);
    const std::string d = (dir.path / fmt::format("{}_{}", type, tied)).string();
    a.save_hf(d);
    const nlohmann::json cj = nlohmann::json::parse(std::ifstream(d + "/config.json"));
    CHECK(cj["model_type"] == type);
    CHECK(cj["tie_word_embeddings"] == tied);
    CHECK(cj["architectures"][0] == a.config().architecture());
    SafetensorsHeader h = read_safetensors_header(d + "/model.safetensors");
    CHECK(h.find("model.embed_tokens.weight") != nullptr);
    CHECK(h.find("model.embed_tokens.weight")->shape == std::vector<int64_t>{50, 32});  // no padding rows
    CHECK(h.find("model.layers.0.self_attn.k_proj.weight")->shape == std::vector<int64_t>{16, 32});  // [out, in]
    CHECK((h.find("lm_head.weight") != nullptr) == !tied);
    CHECK((h.find("model.layers.1.self_attn.q_proj.bias") != nullptr) == (type == "qwen2"));
    CHECK(h.find("model.layers.1.self_attn.o_proj.bias") == nullptr);

    std::unique_ptr<CausalLM> b = load_hf_causal_lm(d, DType::f32, Device::cpu);
    CHECK(b->model_type() == type);
    auto* bl = dynamic_cast<Llama*>(b.get());
    REQUIRE(bl != nullptr);
    CHECK(bl->config().str() == a.config().str());
    CHECK(b->n_params() == a.n_params());
    CHECK(logits_of(*b, tok) == logits_of(a, tok));

    // bf16 file: the masters are the bf16 roundings of the f32 ones.
    a.save_hf(d + "_bf16", SafeDType::bf16);
    std::unique_ptr<CausalLM> c = load_hf_causal_lm(d + "_bf16", DType::f32, Device::cpu);
    for (auto& [n, p] : a.named_params()) {
      CAPTURE(n);
      CHECK(c->param(n).master.to_double() == p->master.to(DType::bf16).to(DType::f32).to_double());
    }
    CHECK(max_abs_diff(logits_of(*c, tok), logits_of(a, tok)) < 5e-2);
    // f16 file too.
    a.save_hf(d + "_f16", SafeDType::f16);
    CHECK(max_abs_diff(logits_of(*load_hf_causal_lm(d + "_f16", DType::f32, Device::cpu), tok), logits_of(a, tok)) < 5e-2);
  }

  // A sharded checkpoint: model.safetensors.index.json over two shards.
  Llama a(tiny("llama", false), DType::f32, Device::cpu, 2);
  perturb(a, 8);
  const fs::path d = dir.path / "sharded";
  fs::create_directories(d);
  a.save_config((d / "config.json").string());
  NamedTensors all = a.hf_state_dict(), s1, s2;
  nlohmann::json wm = nlohmann::json::object();
  for (size_t i = 0; i < all.size(); ++i) {
    const bool first = i < all.size() / 2;
    (first ? s1 : s2).push_back(all[i]);
    wm[all[i].first] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  save_safetensors((d / "model-00001-of-00002.safetensors").string(), s1);
  save_safetensors((d / "model-00002-of-00002.safetensors").string(), s2);
  std::ofstream(d / "model.safetensors.index.json") << nlohmann::json{{"metadata", {{"total_size", 0}}}, {"weight_map", wm}}.dump();
  auto sh = load_hf_llama(d.string(), DType::f32, Device::cpu);
  CHECK(logits_of(*sh, tok) == logits_of(a, tok));
  // A tensor the index does not list for its shard, and a missing shard, name the files.
  wm["model.norm.weight"] = "model-00001-of-00002.safetensors";
  std::ofstream(d / "model.safetensors.index.json") << nlohmann::json{{"weight_map", wm}}.dump();
  std::string e = error_of([&] { load_hf_llama(d.string(), DType::f32, Device::cpu); });
  CHECK(contains(e, "model.norm.weight"));
  CHECK(contains(e, "model-0000"));
}

TEST_CASE("llama: bad configs and checkpoints give errors naming the file and the field or tensor") {
  test::TempDir dir;
  auto err = [&](const std::string& name, const nlohmann::json& over) {
    const std::string p = dir.write(name, config_json(over));
    std::string e = error_of([&] { LlamaConfig::from_json_file(p); });
    CHECK_MESSAGE(contains(e, p), e);
    // The registry's loader reaches the same parser and message.
    fs::create_directories(dir.path / (name + "_d"));
    fs::copy_file(p, dir.path / (name + "_d") / "config.json");
    CHECK(contains(error_of([&] { load_hf_causal_lm((dir.path / (name + "_d")).string(), DType::f32, Device::cpu); }),
                   "config.json"));
    return e;
  };
  CHECK(contains(err("heads.json", {{"num_attention_heads", 5}, {"num_key_value_heads", 5}}),
                 "num_attention_heads 5 does not divide hidden_size 32"));
  CHECK(contains(err("kv.json", {{"num_key_value_heads", 3}}), "num_key_value_heads 3 does not divide num_attention_heads 4"));
  CHECK(contains(err("missing.json", {{"intermediate_size", nullptr}}), "missing field 'intermediate_size'"));
  CHECK(contains(err("missing2.json", {{"num_hidden_layers", nullptr}}), "missing field 'num_hidden_layers'"));
  CHECK(contains(err("type.json", {{"hidden_size", "32"}}), "field 'hidden_size' is not an integer"));
  CHECK(contains(err("act.json", {{"hidden_act", "gelu"}}), "field 'hidden_act' \"gelu\" is not supported"));
  CHECK(contains(err("rope.json", {{"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}}}), "rope_scaling"));
  CHECK(contains(err("rope5.json", {{"rope_parameters", {{"rope_type", "yarn"}, {"rope_theta", 1e4}}}}),
                 "field 'rope_parameters' type 'yarn' is not supported"));
  CHECK(contains(err("rope5t.json", {{"rope_parameters", {{"rope_type", "default"}, {"rope_theta", "big"}}}}),
                 "field 'rope_theta' is not a number"));
  CHECK(contains(err("hd.json", {{"head_dim", 12}}), "head_dim 12 must be a multiple of 8"));
  CHECK(contains(err("zero.json", {{"vocab_size", 0}}), "vocab_size must be positive"));

  // A checkpoint missing a tensor, with a mis-shaped one, or with an extra one.
  Llama a(tiny(), DType::f32, Device::cpu, 1);
  const std::string d = (dir.path / "ck").string();
  a.save_hf(d);
  NamedTensors sd = a.hf_state_dict();
  auto write_without = [&](const std::string& drop, const std::string& reshape, const std::string& extra) {
    NamedTensors v;
    for (auto& [n, t] : sd) {
      if (n == drop) continue;
      v.emplace_back(n, n == reshape ? Tensor::zeros(Shape{3, 3}, DType::f32) : t);
    }
    if (!extra.empty()) v.emplace_back(extra, Tensor::zeros(Shape{2}, DType::f32));
    save_safetensors(d + "/model.safetensors", v);
  };
  write_without("model.layers.1.mlp.up_proj.weight", "", "");
  std::string e = error_of([&] { load_hf_causal_lm(d, DType::f32, Device::cpu); });
  CHECK(contains(e, d + "/model.safetensors"));
  CHECK(contains(e, "missing tensor 'model.layers.1.mlp.up_proj.weight'"));
  write_without("lm_head.weight", "", "");
  CHECK(contains(error_of([&] { load_hf_causal_lm(d, DType::f32, Device::cpu); }), "tie_word_embeddings: false"));
  write_without("", "model.norm.weight", "");
  CHECK(contains(error_of([&] { load_hf_causal_lm(d, DType::f32, Device::cpu); }),
                 "tensor 'model.norm.weight' has shape [3, 3], expected [32]"));
  write_without("", "", "model.layers.0.self_attn.o_proj.bias");
  CHECK(contains(error_of([&] { load_hf_causal_lm(d, DType::f32, Device::cpu); }),
                 "unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"));
  // No preset: random init needs a config.json.
  CHECK(contains(error_of([] { causal_lm_family("llama").random_init("", "tiny", {}, DType::f32, Device::cpu, 0); }),
                 "--model-config"));
  // causal_lm_from_config reaches the family with size flags over the file.
  const std::string ok = dir.write("ok.json", config_json({}));
  auto r = causal_lm_from_config(ok, DType::f32, Device::cpu, 0, ModelSizes{3, 0, 0, 0});
  CHECK(r->n_layer() == 3);
  CHECK(r->model_type() == "llama");
  // transformers 5 writes the rope settings as "rope_parameters" (rope_theta inside); 4.x as
  // "rope_theta" + "rope_scaling". Both read the same.
  const nlohmann::json scaling = {{"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                                  {"original_max_position_embeddings", 16}};
  nlohmann::json v4 = scaling, v5 = scaling;
  v4["rope_type"] = "llama3";
  v5["rope_type"] = "llama3";
  v5["rope_theta"] = 5e5;
  const LlamaConfig c4 = LlamaConfig::from_json_file(dir.write("v4.json", config_json({{"rope_theta", 5e5}, {"rope_scaling", v4}})));
  const LlamaConfig c5 = LlamaConfig::from_json_file(dir.write("v5.json", config_json({{"rope_parameters", v5}})));
  for (const LlamaConfig* c : {&c4, &c5}) {
    CHECK(c->rope_theta == 5e5);
    CHECK(c->rope_scaling.type == "llama3");
    CHECK(c->rope_scaling.factor == 8.0);
    CHECK(c->rope_scaling.high_freq_factor == 4.0);
    CHECK(c->rope_scaling.original_max_position_embeddings == 16);
  }
}

TEST_CASE("llama: KV-cache greedy generate gives exactly the tokens of full recomputation (GQA, qwen2)") {
  for (const std::string type : {"llama", "qwen2"}) {
    for (DType dt : {DType::f32, DType::f64}) {
      CAPTURE(type);
      CAPTURE(dtype_name(dt));
      Llama model(tiny(type, type == "qwen2"), dt, Device::cpu, 5);
      if (dt == DType::f64) perturb(model, 6);
      std::vector<std::vector<int32_t>> prompts = {{5, 17, 30, 2}, {42}, {7, 7, 7, 7, 7, 7, 7, 7, 10, 20, 3}};
      GenerateOptions o;
      o.max_new_tokens = 24;
      o.stop_id = -1;
      GenerateResult r = generate(model, prompts, o);
      REQUIRE(r.tokens.size() == 3);
      for (size_t i = 0; i < prompts.size(); ++i) {
        CAPTURE(i);
        CHECK(r.tokens[i] == greedy_full(model, prompts[i], 24));
      }
      CHECK(r.decode_steps == 23);
      CHECK(r.prefill_tokens == 16);
      GenerateResult one = generate(model, {prompts[2]}, o);
      CHECK(one.tokens[0] == r.tokens[2]);
    }
  }
}

TEST_CASE("llama: generate gives max_new_tokens new tokens for an empty prompt, started from bos_token_id") {
  LlamaConfig c = tiny();
  c.bos_token_id = 1;
  Llama model(c, DType::f32, Device::cpu, 7);
  GenerateOptions o;
  o.max_new_tokens = 6;
  o.stop_id = -1;
  GenerateResult r = generate(model, {{}, {5, 17}}, o);
  REQUIRE(r.tokens.size() == 2);
  CHECK(r.tokens[0] == greedy_full(model, {1}, 6));
  CHECK(r.tokens[1] == greedy_full(model, {5, 17}, 6));
  // A config without bos_token_id (as many Qwen2 ones): an empty prompt is an error naming it.
  Llama none(tiny("qwen2"), DType::f32, Device::cpu, 7);
  CHECK(contains(error_of([&] { generate(none, {{3}, {}}, o); }),
                 "prompt 1 is empty and the model has no bos_token_id to start it from"));
}

TEST_CASE("llama: LoRA and Deep LoRA attach through the family table and train (loss falls); PEFT names") {
  CHECK(causal_lm_family("llama").targets.peft_default == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK(causal_lm_family("qwen2").hf_module_prefix == "model.");
  CHECK(!causal_lm_family("mistral").fan_in_fan_out);
  Llama probe(tiny(), DType::f64, Device::cpu, 7);
  CHECK(names(adapted_linears(probe, "attn")) ==
        std::vector<std::string>{"layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj",
                                 "layers.0.self_attn.o_proj", "layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj",
                                 "layers.1.self_attn.v_proj", "layers.1.self_attn.o_proj"});
  CHECK(adapted_linears(probe, "attn-mlp").size() == 14);
  CHECK(adapted_linears(probe, "all").size() == 14);

  test::TempDir dir;
  Batch b = random_batch(2, 12, 3, 50);
  auto next = [b] { return LossBatch(b.tokens, b.targets); };
  for (const std::string kind : {"lora", "deeplora"}) {
    for (const std::string type : {"llama", "qwen2"}) {
      CAPTURE(kind);
      CAPTURE(type);
      Llama m(tiny(type, type == "qwen2"), DType::f64, Device::cpu, 7);
      perturb(m, 2);
      AdapterOptions o;
      o.kind = kind;
      o.rank = 2;
      o.adapt = kind == "lora" ? "attn" : "attn-mlp";
      Adapters ad = attach_adapters(m, o, next);
      CHECK(ad.size() == (kind == "lora" ? 8u : 14u));
      CHECK(m.n_trainable() == 0);  // the base is frozen
      AdamW opt(adapter_param_groups(ad, o.outer_lr_scale), AdamWConfig{0.9, 0.999, 1e-8});
      std::vector<double> losses;
      for (int s = 0; s < 12; ++s) {
        opt.zero_grad();
        Tensor l = m.loss(b.tokens, b.targets);
        losses.push_back(l.item());
        backward(l);
        opt.step(kind == "lora" ? 1e-2 : 3e-2);
      }
      MESSAGE(fmt::format("{} on {}: loss {:.4f} -> {:.4f}", kind, type, losses.front(), losses.back()));
      CHECK(losses.back() < losses.front() - 1e-3);
      if (kind == "lora") {
        const std::string out = (dir.path / type).string();
        save_adapters(ad, o, out, "tiny-" + type);
        const nlohmann::json cfg = nlohmann::json::parse(std::ifstream(out + "/adapter_config.json"));
        CHECK(cfg["fan_in_fan_out"] == false);
        std::vector<std::string> tm = cfg["target_modules"].get<std::vector<std::string>>();
        std::sort(tm.begin(), tm.end());
        CHECK(tm == std::vector<std::string>{"k_proj", "o_proj", "q_proj", "v_proj"});
        SafetensorsHeader h = read_safetensors_header(out + "/adapter_model.safetensors");
        CHECK(h.find("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") != nullptr);
        const std::vector<double> want = logits_of(m, b.tokens);
        Llama fresh(tiny(type, type == "qwen2"), DType::f64, Device::cpu, 7);
        perturb(fresh, 2);
        Adapters back = load_adapters(fresh, out, o);
        CHECK(back.size() == 8);
        CHECK(max_abs_diff(logits_of(fresh, b.tokens), want) < 1e-5);
      }
    }
  }
}

TEST_CASE("llama: eval's score_mc runs on it and equals a direct computation") {
  test::TempDir dir;
  Tokenizer tok = Tokenizer::from_dir(test::write_byte_vocab(dir.path / "vocab"));
  LlamaConfig c = tiny("qwen2", true);
  c.vocab_size = 260;  // the byte tokenizer's 257 ids
  c.max_position_embeddings = 128;
  Llama model(c, DType::f32, Device::cpu, 4);
  std::string lines;
  for (int i = 0; i < 9; ++i)
    lines += nlohmann::json{{"prompt", fmt::format("Q{}: is it?\nA:", i)}, {"choices", {" yes", " no", " maybe"}},
                            {"label", i % 3}}.dump() + "\n";
  McData data = load_mc_jsonl(dir.write("mc.jsonl", lines), tok, 64);
  REQUIRE(data.examples.size() == 9);
  McScores s = score_mc(model, data, McScoreOptions{128, 4});
  CHECK(s.acc >= 0.0);
  CHECK(s.acc <= 1.0);
  double worst = 0;
  for (size_t e = 0; e < data.examples.size(); ++e) {
    const McExample& ex = data.examples[e];
    for (size_t ch = 0; ch < ex.choices.size(); ++ch) {
      std::vector<int32_t> row = ex.prompt;
      row.insert(row.end(), ex.choices[ch].begin(), ex.choices[ch].end() - 1);
      std::vector<double> l = logits_of(model, Tensor::from_ints(row, Shape{1, int64_t(row.size())}));
      double lp = 0;
      for (size_t j = 0; j < ex.choices[ch].size(); ++j) {
        const double* r = l.data() + (int64_t(ex.prompt.size()) - 1 + int64_t(j)) * c.vocab_size;
        double mx = *std::max_element(r, r + c.vocab_size), z = 0;
        for (int64_t v = 0; v < c.vocab_size; ++v) z += std::exp(r[v] - mx);
        lp += r[ex.choices[ch][j]] - mx - std::log(z);
      }
      worst = std::max(worst, std::abs(s.logprob[e][ch] - lp) / std::abs(lp));
    }
  }
  CHECK(worst <= 1e-5);
}

TEST_CASE("llama: matches transformers on the committed fixtures (tests/data/llama_tiny/{llama,qwen2})") {
  const fs::path root = fs::path(DEEPLORA_TEST_DATA) / "llama_tiny";
  for (const std::string name : {"llama", "qwen2"}) {
    const fs::path fx = root / name;
    if (!fs::exists(fx / "expected.safetensors")) {
      MESSAGE("skipped: no fixture at " << fx.string() << " (made on the GPU machine by tools/hf_crosscheck.py llama_fixture "
                                        << root.string() << ")");
      continue;
    }
    CAPTURE(name);
    auto model = load_hf_causal_lm(fx.string(), DType::f32, Device::cpu);
    CHECK(model->model_type() == name);
    SafetensorsFile ex = load_safetensors((fx / "expected.safetensors").string());
    Tensor tok = ex.at("input_ids").to(DType::i32);
    Tensor tgt = ex.at("labels").to(DType::i32);
    Tensor logits = model->forward(tok);
    const double logit_err = rel(logits.to_double(), ex.at("logits").to_double());
    CHECK(logit_err <= 1e-4);
    Tensor loss = model->loss(tok, tgt);
    CHECK(loss.item() == doctest::Approx(ex.at("loss").item()).epsilon(1e-4));
    backward(loss);
    auto sd = model->named_params();
    int checked = 0;
    double worst_grad = 0;
    for (auto& [pn, p] : sd) {
      const std::string key = "grad." + pn;
      if (!ex.contains(key)) continue;
      std::vector<double> ours = p->master.grad().to_double();
      if (pn == "embed_tokens.weight" || pn == "lm_head.weight")
        ours.resize(size_t(model->vocab_size() * model->hidden_size()));  // the padding rows
      const double e = rel(ours, ex.at(key).to_double());
      worst_grad = std::max(worst_grad, e);
      CHECK_MESSAGE(e <= 1e-3, pn);
      ++checked;
    }
    CHECK(checked == int(sd.size()));
    std::vector<Tensor> params;
    for (auto& [pn, p] : sd) params.push_back(p->master);
    AdamW opt({ParamGroup{params, 1.0, 0.01, "all"}}, AdamWConfig{0.9, 0.999, 1e-8});
    std::vector<double> expected = ex.at("adamw_losses").to_double();
    double worst_loss = 0;
    for (size_t i = 0; i < expected.size(); ++i) {
      opt.zero_grad();
      Tensor l = model->loss(tok, tgt);
      worst_loss = std::max(worst_loss, std::abs(l.item() - expected[i]) / std::abs(expected[i]));
      CHECK_MESSAGE(l.item() == doctest::Approx(expected[i]).epsilon(1e-4), "adamw step ", i);
      backward(l);
      opt.step(1e-3);
    }
    MESSAGE(fmt::format("{} vs transformers (f32, CPU): logits rel err {:.2e}, worst grad rel err {:.2e} over {} tensors, "
                        "worst AdamW-step loss rel err {:.2e}",
                        name, logit_err, worst_grad, checked, worst_loss));
  }
}
