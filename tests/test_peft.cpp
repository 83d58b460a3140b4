// LoRA vs PEFT on a committed fixture (tests/data/peft_tiny, made on the GPU machine by
// tools/hf_crosscheck.py peft_fixture): the PEFT adapter loads through load_adapters, and the forward
// and the LoRA gradients equal PEFT's.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>
#include <filesystem>

#include "models/adapters.h"
#include "models/gpt_io.h"
#include "runtime/io/safetensors.h"
#include "runtime/ops.h"

using namespace deeplora;
namespace fs = std::filesystem;

TEST_CASE("lora: forward and gradients match PEFT on the committed fixture (tests/data/peft_tiny)") {
  fs::path base = fs::path(DEEPLORA_TEST_DATA) / "hf_tiny", fx = fs::path(DEEPLORA_TEST_DATA) / "peft_tiny";
  if (!fs::exists(fx / "expected.safetensors")) {
    MESSAGE("skipped: no fixture at " << fx.string() << " (made on the GPU machine by tools/hf_crosscheck.py peft_fixture)");
    return;
  }
  auto model = load_hf_gpt(base.string(), DType::f32, Device::cpu);
  AdapterOptions o;
  o.kind = "lora";
  AdapterOptions loaded;
  Adapters ad = load_adapters(*model, (fx / "adapter").string(), o, &loaded);
  CHECK(loaded.kind == "lora");
  CHECK(loaded.rank == 4);
  CHECK(ad.size() == 8);  // c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 layers
  SafetensorsFile in = load_safetensors((base / "expected.safetensors").string());
  SafetensorsFile ex = load_safetensors((fx / "expected.safetensors").string());
  auto rel = [](const std::vector<double>& a, const std::vector<double>& b) {
    double n = 0, d = 0;
    for (size_t i = 0; i < a.size(); ++i) n += (a[i] - b[i]) * (a[i] - b[i]), d += b[i] * b[i];
    return std::sqrt(n / std::max(d, 1e-300));
  };
  Tensor logits = model->forward(in.at("input_ids").to(DType::i32));
  const double le = rel(logits.to_double(), ex.at("logits").to_double());
  CHECK(le <= 1e-5);
  Tensor loss = ops::cross_entropy(logits, in.at("labels").to(DType::i32));
  CHECK(loss.item() == doctest::Approx(ex.at("loss").item()).epsilon(1e-5));
  backward(loss);
  int n = 0;
  double worst = 0;
  for (auto& a : ad)
    for (auto& p : a->params()) {
      CAPTURE(p.name);
      REQUIRE(ex.contains("grad." + p.name));
      REQUIRE(p.tensor.grad().defined());
      const double e = rel(p.tensor.grad().to_double(), ex.at("grad." + p.name).to_double());
      worst = std::max(worst, e);
      CHECK(e <= 1e-4);
      ++n;
    }
  CHECK(n == 16);
  MESSAGE(fmt::format("vs PEFT (f32, CPU): logits rel err {:.2e}, worst LoRA grad rel err {:.2e} over {} tensors", le,
                      worst, n));
}
