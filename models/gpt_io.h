// GPT-2 checkpoints in the Hugging Face layout: a directory with config.json + model.safetensors,
// HF tensor names (with or without the "transformer." prefix), Conv1D weights stored [in, out].
#pragma once
#include <memory>
#include <string>

#include "models/gpt.h"
#include "runtime/io/safetensors.h"

namespace deeplora {

// Reads config.json from `dir` and the weights from dir/model.safetensors into a new model (GPT-2 code;
// the generic loader is load_hf_causal_lm).
std::unique_ptr<Gpt> load_hf_gpt(const std::string& dir, DType compute, Device dev);
// Copies the weights of an HF safetensors file into `model`. Throws naming the file and tensor on a
// missing, unexpected, mis-shaped or non-finite tensor.
void load_hf_weights(Gpt& model, const std::string& safetensors_path);
// Writes dir/config.json and dir/model.safetensors (f32 unless `as` says bf16/f16), loadable by
// transformers' GPT2LMHeadModel.from_pretrained. Atomic per file.
void save_hf_gpt(Gpt& model, const std::string& dir, SafeDType as = SafeDType::f32);
// Host f32 tensors under HF names, Conv1D weights transposed to [in, out]: what save_hf_gpt writes.
NamedTensors hf_state_dict(Gpt& model);
// The registry entry of GPT-2 ("gpt2"; models/families.cpp lists it).
CausalLMFamily gpt2_family();
// Row-major 2-D transpose on the host (f32/f64/bf16 preserved).
Tensor transpose2d_host(const Tensor& t);

}  // namespace deeplora
