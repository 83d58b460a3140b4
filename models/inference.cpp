// Loading for the inference tools (see inference.h).
#include "models/inference.h"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "models/causal_lm.h"
#include "runtime/device.h"

namespace deeplora {
namespace fs = std::filesystem;

LoadedModel load_for_inference(const std::string& model_dir, const std::string& adapter_dir, DType dt, Device dev,
                               bool merge) {
  LoadedModel lm;
  lm.model_dir = model_dir;
  lm.adapter.kind = "none";
  if (lm.model_dir.empty()) {
    if (adapter_dir.empty()) throw std::invalid_argument("no model: give --model DIR (and optionally --adapter DIR)");
    const fs::path cfg = fs::path(adapter_dir) / "adapter_config.json";
    std::ifstream f(cfg);
    if (!f) throw std::runtime_error(fmt::format("{}: cannot open (is --adapter an adapter directory?)", cfg.string()));
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(f);
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("{}: not valid JSON: {}", cfg.string(), e.what()));
    }
    const std::string base = j.value("base_model_name_or_path", "");
    if (base.empty() || !fs::is_directory(base))
      throw std::invalid_argument(fmt::format("{}: the recorded base model '{}' is not a directory here; give --model DIR",
                                              cfg.string(), base));
    lm.model_dir = base;
  }
  lm.model = load_hf_causal_lm(lm.model_dir, dt, dev);
  if (!adapter_dir.empty()) {
    AdapterOptions o;
    o.outer_lr_scale = 0;  // inference: nothing trains
    lm.adapters = load_adapters(*lm.model, adapter_dir, o, &lm.adapter);
    if (merge) {
      merge_adapters(*lm.model);
      lm.adapters.clear();
    }
  }
  return lm;
}

Device device_from_flag(const std::string& flag) {
  if (flag == "cpu") return Device::cpu;
  if (flag == "cuda") {
    if (!cuda_available()) throw std::runtime_error("--device cuda: " + cuda_unavailable_reason());
    return Device::cuda;
  }
  if (flag == "auto") return cuda_available() ? Device::cuda : Device::cpu;
  throw std::invalid_argument(fmt::format("--device '{}': expected auto, cpu or cuda", flag));
}

DType dtype_from_flag(const std::string& flag, Device dev) {
  if (flag == "auto") return dev == Device::cuda ? DType::bf16 : DType::f32;
  if (flag == "bf16") return DType::bf16;
  if (flag == "f32") return DType::f32;
  if (flag == "f64") return DType::f64;
  throw std::invalid_argument(fmt::format("--dtype '{}': expected auto, bf16, f32 or f64", flag));
}

std::string resolve_vocab_dir(const std::string& flag, const std::string& model_dir) {
  // What Tokenizer::from_dir reads: tokenizer.json, else vocab.json + merges.txt.
  auto has = [](const fs::path& d) {
    return fs::exists(d / "tokenizer.json") || (fs::exists(d / "vocab.json") && fs::exists(d / "merges.txt"));
  };
  if (!flag.empty()) {
    if (!has(flag)) throw std::runtime_error(fmt::format("--vocab-dir {}: no tokenizer.json, nor vocab.json + merges.txt, there", flag));
    return flag;
  }
  if (!model_dir.empty() && has(model_dir)) return model_dir;
  if (has("data/gpt2")) return "data/gpt2";
  throw std::runtime_error(fmt::format("no tokenizer: neither {} nor data/gpt2 holds tokenizer.json or vocab.json + "
                                       "merges.txt; give --vocab-dir",
                                       model_dir.empty() ? "the model directory" : model_dir));
}

}  // namespace deeplora
