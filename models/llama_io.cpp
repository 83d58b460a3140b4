// Llama-family HF checkpoints: "model." tensor names, nn.Linear weights [out, in] (stored as they are),
// single-file or sharded (model.safetensors.index.json) safetensors in f32, bf16 or f16; the registry
// entries of llama, qwen2 and mistral.
#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <map>
#include <set>
#include <stdexcept>

#include "models/llama.h"
#include "runtime/tape.h"

namespace deeplora {
namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& x) {
  return s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
}

// Every tensor of a single file, or of every shard an index lists (shards relative to the index).
std::map<std::string, Tensor> read_checkpoint(const std::string& path, std::map<std::string, std::string>& origin) {
  std::map<std::string, Tensor> all;
  if (!ends_with(path, ".json")) {
    SafetensorsFile f = load_safetensors(path);
    for (auto& [k, t] : f.tensors) origin[k] = path;
    return std::move(f.tensors);
  }
  std::ifstream in(path);
  if (!in) throw std::runtime_error(fmt::format("{}: cannot open the safetensors index", path));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: not valid JSON: {}", path, e.what()));
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw std::runtime_error(fmt::format("{}: missing field 'weight_map'", path));
  std::map<std::string, std::set<std::string>> by_shard;
  for (auto& [name, shard] : j["weight_map"].items()) {
    if (!shard.is_string()) throw std::runtime_error(fmt::format("{}: weight_map['{}'] is not a file name", path, name));
    const std::string s = shard.get<std::string>();
    if (s.find('/') != std::string::npos || s.find("..") != std::string::npos)
      throw std::runtime_error(fmt::format("{}: weight_map['{}'] = '{}' is not a file in the index's directory", path, name, s));
    by_shard[s].insert(name);
  }
  const fs::path dir = fs::path(path).parent_path();
  for (auto& [shard, names] : by_shard) {
    const std::string sp = (dir / shard).string();
    SafetensorsFile f = load_safetensors(sp);
    for (const std::string& n : names)
      if (!f.contains(n)) throw std::runtime_error(fmt::format("{}: tensor '{}' (listed in {}) is not in the shard", sp, n, path));
    for (auto& [k, t] : f.tensors) {
      if (!names.count(k)) throw std::runtime_error(fmt::format("{}: tensor '{}' is not listed for this shard in {}", sp, k, path));
      origin[k] = sp;
      all.emplace(k, t);
    }
  }
  return all;
}

}  // namespace

void Llama::load_hf_weights(const std::string& path) {
  std::map<std::string, std::string> origin;
  std::map<std::string, Tensor> tensors = read_checkpoint(path, origin);
  std::set<std::string> used;
  for (auto& [name, p] : named_params()) {
    const std::string full = name == "lm_head.weight" ? name : "model." + name;
    std::string key;
    for (const std::string& k : {full, name})
      if (tensors.count(k)) {
        key = k;
        break;
      }
    if (key.empty())
      throw std::runtime_error(fmt::format("{}: missing tensor '{}'{}", path, full,
                                           name == "lm_head.weight" ? " (config.json says tie_word_embeddings: false, "
                                                                      "so the model has its own head)"
                                                                    : ""));
    used.insert(key);
    const std::string& file = origin[key];
    Tensor t = tensors.at(key);
    const int64_t Vp = cfg_.padded_vocab(), V = cfg_.vocab_size;
    const bool vocab_rows = name == "embed_tokens.weight" || name == "lm_head.weight";
    if (vocab_rows && Vp != V && t.ndim() == 2 && t.dim(0) == V && t.dim(1) == p->master.dim(1)) {
      Tensor padded = Tensor::zeros(p->master.shape(), t.dtype(), Device::cpu);
      padded.slice0(0, V).copy_from(t);
      t = padded;
    }
    if (t.shape() != p->master.shape()) {
      Shape want = p->master.shape();
      if (vocab_rows) want = Shape{V, p->master.dim(1)};
      throw std::runtime_error(
          fmt::format("{}: tensor '{}' has shape {}, expected {}", file, key, tensors.at(key).shape().str(), want.str()));
    }
    if (!is_float(t.dtype()))
      throw std::runtime_error(fmt::format("{}: tensor '{}' has dtype {}, expected a float type", file, key, dtype_name(t.dtype())));
    for (double v : t.to_double())
      if (!std::isfinite(v)) throw std::runtime_error(fmt::format("{}: tensor '{}' has non-finite values", file, key));
    NoGrad ng;
    p->master.copy_from(t);
  }
  for (auto& [key, t] : tensors) {
    if (used.count(key)) continue;
    if (ends_with(key, "rotary_emb.inv_freq")) continue;  // a buffer older transformers saved
    if (key == "lm_head.weight" && cfg_.tie_word_embeddings) continue;  // a tied head's copy: ignored, as transformers
    throw std::runtime_error(fmt::format("{}: unexpected tensor '{}' (not part of a {} with this config)", origin[key], key,
                                         cfg_.model_type));
  }
  invalidate_frozen_cache();
}

NamedTensors Llama::hf_state_dict() {
  NamedTensors out;
  for (auto& [name, p] : named_params()) {
    Tensor h = p->master.to(Device::cpu).to(DType::f32);
    if (name == "embed_tokens.weight" || name == "lm_head.weight") h = h.slice0(0, cfg_.vocab_size).clone();
    out.emplace_back(name == "lm_head.weight" ? name : "model." + name, h);
  }
  return out;
}

std::unique_ptr<Llama> load_hf_llama(const std::string& dir, DType compute, Device dev) {
  fs::path d(dir);
  if (!fs::is_directory(d)) throw std::runtime_error(fmt::format("{}: not a directory (expected an HF model dir)", dir));
  LlamaConfig cfg = LlamaConfig::from_json_file((d / "config.json").string());
  auto model = std::make_unique<Llama>(cfg, compute, dev, 0);
  fs::path st = d / "model.safetensors", idx = d / "model.safetensors.index.json";
  if (fs::exists(st))
    model->load_hf_weights(st.string());
  else if (fs::exists(idx))
    model->load_hf_weights(idx.string());
  else
    throw std::runtime_error(fmt::format("{}: no model.safetensors or model.safetensors.index.json", dir));
  return model;
}

// ---- registry entries ---------------------------------------------------------------------------------

static CausalLMFamily llama_like(const std::string& type, const std::string& arch) {
  CausalLMFamily f;
  f.model_type = type;
  f.architecture = arch;
  f.random_init = [type](const std::string& config_path, const std::string& preset, const ModelSizes& sizes, DType dt,
                         Device dev, uint64_t seed) -> std::unique_ptr<CausalLM> {
    if (config_path.empty())
      throw std::invalid_argument(
          fmt::format("{}: no presets (preset '{}'); give an HF config.json (--model-config)", type, preset));
    LlamaConfig c = LlamaConfig::from_json_file(config_path);
    if (sizes.n_layer < 0 || sizes.n_head < 0 || sizes.n_embd < 0 || sizes.n_positions < 0)
      throw std::invalid_argument("model size flags must be positive");
    if (sizes.n_layer > 0) c.num_hidden_layers = sizes.n_layer;
    if (sizes.n_head > 0) c.num_attention_heads = sizes.n_head;
    if (sizes.n_embd > 0) c.hidden_size = sizes.n_embd;
    if (sizes.n_positions > 0) c.max_position_embeddings = sizes.n_positions;
    if (sizes.n_head > 0 || sizes.n_embd > 0) {
      c.head_dim = 0;  // derived again from the new sizes
      if (c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads != 0) c.num_key_value_heads = 0;
    }
    try {
      c.validate();
    } catch (const std::exception& e) {
      throw std::invalid_argument(fmt::format("model size flags over {}: {}", config_path, e.what()));
    }
    return std::make_unique<Llama>(c, dt, dev, seed);
  };
  f.block_linears = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  f.targets.attn = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"};
  f.targets.mlp = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
  f.targets.peft_default = {"q_proj", "v_proj"};  // PEFT's mapping for llama, qwen2 and mistral
  f.hf_module_prefix = "model.";
  f.fan_in_fan_out = false;  // nn.Linear
  return f;
}

CausalLMFamily llama_family() { return llama_like("llama", "LlamaForCausalLM"); }
CausalLMFamily qwen2_family() { return llama_like("qwen2", "Qwen2ForCausalLM"); }
CausalLMFamily mistral_family() { return llama_like("mistral", "MistralForCausalLM"); }

}  // namespace deeplora
