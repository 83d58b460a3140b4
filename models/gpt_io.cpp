// HF GPT-2 checkpoint load/save.
#include "models/gpt_io.h"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <set>
#include <stdexcept>
#include <tuple>

#include "runtime/tape.h"

namespace deeplora {
namespace fs = std::filesystem;

static bool is_conv1d_weight(const std::string& name) {
  auto ends = [&](const char* s) {
    std::string x(s);
    return name.size() >= x.size() && name.compare(name.size() - x.size(), x.size(), x) == 0;
  };
  return ends("attn.c_attn.weight") || ends("attn.c_proj.weight") || ends("mlp.c_fc.weight") ||
         ends("mlp.c_proj.weight");
}

Tensor transpose2d_host(const Tensor& t) {
  check(t.ndim() == 2, "transpose2d_host", fmt::format("{} is not 2-D", t.desc()));
  Tensor h = t.to(Device::cpu).to(DType::f64);
  const int64_t R = h.dim(0), C = h.dim(1);
  Tensor o = Tensor::empty(Shape{C, R}, DType::f64, Device::cpu);
  const double* src = h.data_as<double>();
  double* dst = o.data_as<double>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) dst[c * R + r] = src[r * C + c];
  return o.to(t.dtype());
}

void load_hf_weights(Gpt& model, const std::string& path) { model.load_hf_weights(path); }

void Gpt::load_hf_weights(const std::string& path) {
  Gpt& model = *this;
  SafetensorsFile f = load_safetensors(path);
  std::set<std::string> used;
  auto lookup = [&](const std::string& name) -> const Tensor* {
    for (const std::string& key : {"transformer." + name, name})
      if (f.contains(key)) {
        used.insert(key);
        return &f.tensors.at(key);
      }
    return nullptr;
  };
  for (auto& [name, p] : model.named_params()) {
    const Tensor* src = lookup(name);
    if (!src)
      throw std::runtime_error(fmt::format("{}: missing tensor '{}' (or 'transformer.{}'){}", path, name, name,
                                           name == "lm_head.weight" ? " (config.json says tie_word_embeddings: false, "
                                                                      "so the model has its own head)"
                                                                    : ""));
    Tensor t = is_conv1d_weight(name) && src->ndim() == 2 ? transpose2d_host(*src) : *src;
    // wte is stored padded to a multiple of 64 rows here; HF files hold the real vocabulary.
    const int64_t Vp = model.config().padded_vocab(), V = model.config().vocab_size;
    const bool vocab_rows = name == "wte.weight" || name == "lm_head.weight";
    if (vocab_rows && Vp != V && t.ndim() == 2 && t.dim(0) == V && t.dim(1) == p->master.dim(1)) {
      Tensor padded = Tensor::zeros(p->master.shape(), t.dtype(), Device::cpu);
      padded.slice0(0, V).copy_from(t);
      t = padded;
    }
    if (t.shape() != p->master.shape())
      throw std::runtime_error(fmt::format("{}: tensor '{}' has shape {} (HF layout), expected {}", path, name,
                                           src->shape().str(),
                                           (is_conv1d_weight(name) ? transpose2d_host(p->master) : p->master).shape().str()));
    if (!is_float(t.dtype()))
      throw std::runtime_error(fmt::format("{}: tensor '{}' has dtype {}, expected a float type", path, name,
                                           dtype_name(t.dtype())));
    for (double v : t.to_double())
      if (!std::isfinite(v)) throw std::runtime_error(fmt::format("{}: tensor '{}' has non-finite values", path, name));
    NoGrad ng;
    p->master.copy_from(t);
  }
  // Buffers and the tied head that HF files may carry.
  for (auto& [key, t] : f.tensors) {
    if (used.count(key)) continue;
    std::string k = key.rfind("transformer.", 0) == 0 ? key.substr(12) : key;
    bool buffer = k.find(".attn.bias") != std::string::npos || k.find(".attn.masked_bias") != std::string::npos;
    if (buffer) continue;
    // A tied head (tie_word_embeddings true, HF's default) is wte: a stored copy is ignored, as
    // transformers does. An untied one is loaded above as lm_head.weight.
    if (k == "lm_head.weight" && model.config().tie_word_embeddings) continue;
    throw std::runtime_error(fmt::format("{}: unexpected tensor '{}' (not part of a GPT-2 with this config)", path, key));
  }
  model.invalidate_frozen_cache();
}

std::unique_ptr<Gpt> load_hf_gpt(const std::string& dir, DType compute, Device dev) {
  fs::path d(dir);
  if (!fs::is_directory(d)) throw std::runtime_error(fmt::format("{}: not a directory (expected an HF model dir)", dir));
  GptConfig cfg = GptConfig::from_json_file((d / "config.json").string());
  auto model = std::make_unique<Gpt>(cfg, compute, dev, 0);
  fs::path st = d / "model.safetensors";
  if (!fs::exists(st)) throw std::runtime_error(fmt::format("{}: no model.safetensors", dir));
  load_hf_weights(*model, st.string());
  return model;
}

NamedTensors hf_state_dict(Gpt& model) { return model.hf_state_dict(); }

NamedTensors Gpt::hf_state_dict() {
  Gpt& model = *this;
  NamedTensors out;
  for (auto& [name, p] : model.named_params()) {
    Tensor h = p->master.to(Device::cpu).to(DType::f32);
    if (name == "wte.weight" || name == "lm_head.weight")
      h = h.slice0(0, model.config().vocab_size).clone();  // drop the padding rows
    // HF keeps the head outside the transformer module: "lm_head.weight", not "transformer.lm_head.weight".
    out.emplace_back(name == "lm_head.weight" ? name : "transformer." + name, is_conv1d_weight(name) ? transpose2d_host(h) : h);
  }
  return out;
}

void save_hf_gpt(Gpt& model, const std::string& dir, SafeDType as) { model.save_hf(dir, as); }

// ---- the "gpt2" family ------------------------------------------------------------------------------

CausalLMFamily gpt2_family() {
  CausalLMFamily f;
  f.model_type = "gpt2";
  f.architecture = "GPT2LMHeadModel";
  f.random_init = [](const std::string& config_path, const std::string& preset, const ModelSizes& sizes, DType dt,
                     Device dev, uint64_t seed) -> std::unique_ptr<CausalLM> {
    GptConfig c = !config_path.empty() ? GptConfig::from_json_file(config_path) : GptConfig::preset(preset);
    if (sizes.n_layer == 0 && sizes.n_head == 0 && sizes.n_embd == 0 && sizes.n_positions == 0)
      return std::make_unique<Gpt>(c, dt, dev, seed);
    for (auto [v, dst, flag] : {std::tuple{sizes.n_layer, &c.n_layer, "--n-layer"}, {sizes.n_head, &c.n_head, "--n-head"},
                                {sizes.n_embd, &c.n_embd, "--n-embd"}, {sizes.n_positions, &c.n_positions, "--n-positions"}}) {
      if (v < 0) throw std::invalid_argument(fmt::format("{} {}: must be positive", flag, v));
      if (v > 0) *dst = v;
    }
    try {
      c.validate();
    } catch (const std::exception& e) {
      throw std::invalid_argument(fmt::format("model size flags: {}", e.what()));
    }
    return std::make_unique<Gpt>(c, dt, dev, seed);
  };
  f.presets = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "small-cpu", "tiny"};
  f.preset_aliases = {"gpt2-small", "d12"};
  f.block_linears = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"};
  f.targets.attn = {"attn.c_attn"};
  f.targets.mlp = {"mlp.c_fc", "mlp.c_proj"};
  f.targets.peft_default = {"c_attn"};  // PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["gpt2"]
  f.hf_module_prefix = "transformer.";
  f.fan_in_fan_out = true;  // Conv1D stores W as [in, out]
  return f;
}

}  // namespace deeplora
