// libFuzzer target: deep_mc target files (models/deep_mc.h, load_target) into f64 CPU tensors.
#include <exception>

#include "fuzz/fuzz_util.h"
#include "models/deep_mc.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string p = deeplora::fuzz::write_input("target.txt", deeplora::fuzz::as_view(data, size));
  try {
    deeplora::deep_mc::Target t = deeplora::deep_mc::load_target(p, deeplora::DType::f64, deeplora::Device::cpu);
    (void)t.p();
  } catch (const std::exception&) {
  }
  return 0;
}
