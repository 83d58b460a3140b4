// libFuzzer target: the safetensors reader (header validation, then every tensor's data, F16/BF16
// conversion). Any std::exception is an accepted outcome; a crash, leak or sanitizer report is not.
#include <exception>

#include "fuzz/fuzz_util.h"
#include "runtime/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string p = deeplora::fuzz::write_input("x.safetensors", deeplora::fuzz::as_view(data, size));
  try {
    deeplora::SafetensorsFile f = deeplora::load_safetensors(p);
    for (auto& [name, t] : f.tensors) (void)t.numel();
  } catch (const std::exception&) {
  }
  return 0;
}
