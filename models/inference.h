// What the inference tools (eval, generate) share: a model directory with or without an unmerged
// adapter (ours or PEFT), the device and dtype flags, and where the tokenizer is.
#pragma once
#include <memory>
#include <string>

#include "models/adapters.h"
#include "models/causal_lm.h"

namespace deeplora {

struct LoadedModel {
  std::unique_ptr<CausalLM> model;  // any registered family (config.json's model_type)
  Adapters adapters;       // attached (unmerged) unless merged at load
  AdapterOptions adapter;  // what the adapter directory holds (kind "none" without one)
  std::string model_dir;   // the base actually loaded (from the adapter's record when not given)
};

// model_dir may be empty when adapter_dir records its base (base_model_name_or_path, a directory).
// merge: fold the adapter into the weights (faster; rounds differently in bf16).
LoadedModel load_for_inference(const std::string& model_dir, const std::string& adapter_dir, DType dt, Device dev,
                               bool merge = false);
// --device auto|cpu|cuda, --dtype auto|bf16|f32|f64 (auto: bf16 on CUDA, f32 on the CPU). Throws naming the flag.
Device device_from_flag(const std::string& flag);
DType dtype_from_flag(const std::string& flag, Device dev);
// The tokenizer directory (for Tokenizer::from_dir): the flag when given, else the model directory
// when it holds tokenizer.json or vocab.json + merges.txt (train's final/ does), else data/gpt2.
// Throws naming both places when neither has one.
std::string resolve_vocab_dir(const std::string& flag, const std::string& model_dir);

}  // namespace deeplora
