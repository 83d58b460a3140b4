// libFuzzer target: JSONL training / eval examples in both formats through the trainer's loader
// (prompt/completion or multiple choice, fitted to a short sequence length) and the eval loader,
// tokenized by a small BPE with merges (so arbitrary text also exercises encode).
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>

#include "fuzz/fuzz_util.h"
#include "models/eval.h"
#include "models/tokenizer.h"
#include "models/trainer.h"

namespace {

// GPT-2's byte-to-unicode spelling of byte b, as UTF-8.
std::string byte_token(int b) {
  auto direct = [](int x) { return (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF); };
  int cp = b;
  if (!direct(b)) {
    int n = 0;
    for (int x = 0; x < b; ++x) n += !direct(x);
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) s += char(cp);
  else {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

const deeplora::Tokenizer& tokenizer() {
  static std::unique_ptr<deeplora::Tokenizer> tok = [] {
    std::string v = "{";
    for (int b = 0; b < 256; ++b) {
      std::string t = byte_token(b);
      std::string esc;
      for (char c : t) {
        if (c == '"' || c == '\\') esc += '\\';
        esc += c;
      }
      v += "\"" + esc + "\": " + std::to_string(b) + ", ";
    }
    v += "\"ab\": 256, \"abc\": 257, \"\\u0120t\": 258, \"\\u0120the\": 259, \"he\": 260, \"<|endoftext|>\": 261}";
    const std::string vp = deeplora::fuzz::write_input("jsonl_vocab.json", v);
    const std::string mp = deeplora::fuzz::write_input("jsonl_merges.txt", "#version: 0.2\na b\nab c\nh e\n\xc4\xa0t he\n");
    return std::make_unique<deeplora::Tokenizer>(vp, mp);
  }();
  return *tok;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const deeplora::Tokenizer& tok = tokenizer();
  const std::string p = deeplora::fuzz::write_input("x.jsonl", deeplora::fuzz::as_view(data, size));
  try {
    int64_t cut = 0;
    auto ex = deeplora::load_examples({p}, tok, 24, &cut);
    for (const auto& e : ex) (void)e.tokens.size();
  } catch (const std::exception&) {
  }
  try {
    (void)deeplora::jsonl_kind(p);
    deeplora::McData mc = deeplora::load_mc_jsonl(p, tok, 24, /*need_labels=*/false);
    (void)mc.examples.size();
  } catch (const std::exception&) {
  }
  return 0;
}
