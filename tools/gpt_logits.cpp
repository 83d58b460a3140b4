// gpt_logits: logits of an HF GPT-2 directory for the input_ids tensor of a safetensors file, written
// as a safetensors file (for cross-checks against transformers: tools/hf_crosscheck.py).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cmath>
#include <vector>

#include "models/gpt_io.h"
#include "runtime/device.h"
#include "runtime/io/safetensors.h"
#include "runtime/tape.h"

int main(int argc, char** argv) {
  using namespace deeplora;
  std::string model, ids, out, device = "cpu", dtype = "f32";
  CLI::App app{"deeplora gpt_logits: logits of an HF GPT-2 model for given input_ids"};
  app.add_option("--model", model, "HF model directory")->required();
  app.add_option("--ids", ids, "safetensors file with an i32 tensor input_ids [B, T]")->required();
  app.add_option("--out", out, "output safetensors file (tensor logits, f32)")->required();
  app.add_option("--device", device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--dtype", dtype, "f32, bf16 or f64")->capture_default_str()->check(CLI::IsMember({"f32", "bf16", "f64"}));
  CLI11_PARSE(app, argc, argv);
  try {
    Device dev = device == "cuda" ? Device::cuda : Device::cpu;
    auto m = load_hf_gpt(model, dtype_from_name(dtype.c_str()), dev);
    const Tensor raw = load_safetensors(ids).at("input_ids");
    if (raw.ndim() != 2 || raw.numel() == 0 || raw.dim(1) > m->config().n_positions)
      throw std::runtime_error(fmt::format("{}: input_ids {} must be [B, T] with B, T > 0 and T <= n_positions {}", ids,
                                           raw.shape().str(), m->config().n_positions));
    const std::vector<double> v = raw.to_double();
    for (size_t i = 0; i < v.size(); ++i)
      if (!(v[i] >= 0 && v[i] < double(m->config().vocab_size) && v[i] == std::floor(v[i])))
        throw std::runtime_error(fmt::format("{}: input_ids element {} is {}, not a token id of the model's "
                                             "vocabulary of {}", ids, i, v[i], m->config().vocab_size));
    Tensor tok = raw.to(DType::i32).to(dev);
    NoGrad ng;
    Tensor logits = m->forward(tok).to(DType::f32).to(Device::cpu);
    save_safetensors(out, NamedTensors{{"logits", logits}});
    fmt::print("wrote {} logits {}\n", out, logits.shape().str());
  } catch (const std::exception& e) {
    fmt::print(stderr, "gpt_logits: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
