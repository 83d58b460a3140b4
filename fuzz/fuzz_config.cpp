// libFuzzer target: an HF GPT-2 config.json (GptConfig::from_json_file, validate, str, n_params).
#include <exception>

#include "fuzz/fuzz_util.h"
#include "models/gpt.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string p = deeplora::fuzz::write_input("config.json", deeplora::fuzz::as_view(data, size));
  try {
    deeplora::GptConfig c = deeplora::GptConfig::from_json_file(p);
    (void)c.str();
    (void)c.padded_vocab();
  } catch (const std::exception&) {
  }
  return 0;
}
