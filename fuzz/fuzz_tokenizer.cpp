// libFuzzer target: vocab.json + merges.txt. The input is vocab.json, then an optional line
// "#merges" after which comes merges.txt (without it merges.txt is just its version line). A
// tokenizer that loads then encodes and decodes a fixed text (special token included).
#include <exception>
#include <string>

#include "fuzz/fuzz_util.h"
#include "models/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(deeplora::fuzz::as_view(data, size));
  const std::string sep = "\n#merges\n";
  const size_t at = in.find(sep);
  const std::string vocab = at == std::string::npos ? in : in.substr(0, at);
  const std::string merges = at == std::string::npos ? std::string("#version: 0.2\n") : in.substr(at + sep.size());
  const std::string vp = deeplora::fuzz::write_input("vocab.json", vocab);
  const std::string mp = deeplora::fuzz::write_input("merges.txt", merges);
  try {
    deeplora::Tokenizer tok(vp, mp);
    for (bool special : {false, true}) {
      std::vector<int32_t> ids = tok.encode("hello world, the <|endoftext|> 123 \xc3\xa9t\xc3\xa9!", special);
      (void)tok.decode(ids);
    }
    (void)tok.vocab_size();
  } catch (const std::exception&) {
  }
  return 0;
}
