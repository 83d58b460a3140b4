// GPT-2 tokenizer: a handmade vocab (always runs) for merge order, pre-tokenization, specials and
// errors; the real GPT-2 files (when installed) against ids from HF GPT2TokenizerFast.
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "models/tokenizer.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;

namespace {


using test::byte_token;
using test::json_escape;

// Byte tokens get id = byte value; merged tokens follow in merge order; <|endoftext|> last.
struct MiniVocab {
  std::vector<std::pair<std::string, std::string>> merges = {
      {"l", "l"}, {"h", "e"}, {"he", "ll"}, {"hell", "o"}, {"Ġ", "w"}, {"o", "r"}, {"Ġw", "or"},
      {"e", "l"},  // would fire on "hello" if merges were applied left to right instead of by rank
      {"Ġ", "Ġ"}, {"I", "'"}, {"'", "ll"},
  };
  std::map<std::string, int> ids;
  std::string vocab_json, merges_txt;
  int eot = 0;
  MiniVocab() {
    for (int b = 0; b < 256; ++b) ids[byte_token(b)] = b;
    int next = 256;
    merges_txt = "#version: 0.2\n";
    for (auto& [a, b] : merges) {
      ids.emplace(a + b, next++);
      merges_txt += a + " " + b + "\n";
    }
    eot = next;
    ids["<|endoftext|>"] = eot;
    std::vector<std::string> entries;
    for (auto& [t, i] : ids) entries.push_back(fmt::format("\"{}\": {}", json_escape(t), i));
    vocab_json = fmt::format("{{{}}}", fmt::join(entries, ", "));
  }
  int id(const std::string& t) const { return ids.at(t); }
};

using test::contains;
std::string error_of(const std::function<void()>& f) { return test::runtime_error_of(f); }

std::vector<int32_t> bytes_of(const std::string& s) {
  std::vector<int32_t> v;
  for (unsigned char c : s) v.push_back(c);
  return v;
}

std::string gpt2_vocab_dir() {
  if (const char* env = std::getenv("DEEPLORA_GPT2_VOCAB_DIR")) return env;
#ifdef DEEPLORA_TEST_DATA
  return std::string(DEEPLORA_TEST_DATA) + "/../../data/gpt2";
#else
  return "data/gpt2";
#endif
}

}  // namespace

TEST_CASE("tokenizer: handmade vocab — merges by rank, pre-tokenization, specials, round trips") {
  test::TempDir dir;
  MiniVocab mv;
  Tokenizer tok(dir.write("vocab.json", mv.vocab_json), dir.write("merges.txt", mv.merges_txt));
  CHECK(tok.vocab_size() == mv.eot + 1);
  CHECK(tok.n_merges() == mv.merges.size());
  CHECK(tok.eot_id() == mv.eot);
  CHECK(tok.token_to_id("Ġwor") == mv.id("Ġwor"));
  CHECK_FALSE(tok.token_to_id("zzz").has_value());

  // "hello": (l,l) rank 0 and (h,e) rank 1 go first, so (e,l) never gets a chance.
  CHECK(tok.encode("hello") == std::vector<int32_t>{mv.id("hello")});
  CHECK(tok.encode("hello world") == std::vector<int32_t>{mv.id("hello"), mv.id("Ġwor"), 'l', 'd'});
  CHECK(tok.encode("hel") == std::vector<int32_t>{mv.id("he"), 'l'});
  // Pre-tokenization: "I" and "'ll" are separate words, so (I, ') must not merge.
  CHECK(tok.encode("I'll") == std::vector<int32_t>{'I', mv.id("'ll")});
  // Whitespace: "a   b" -> "a", "  " (the run minus the space that joins " b"), " b".
  CHECK(tok.encode("a   b") == std::vector<int32_t>{'a', mv.id("ĠĠ"), ' ', 'b'});
  CHECK(tok.encode("") == std::vector<int32_t>{});

  // Specials are text unless asked for.
  CHECK(tok.encode("a<|endoftext|>b", true) == std::vector<int32_t>{'a', mv.eot, 'b'});
  CHECK(tok.encode("<|endoftext|><|endoftext|>", true) == std::vector<int32_t>{mv.eot, mv.eot});
  CHECK(tok.encode("a<|endoftext|>b") == bytes_of("a<|endoftext|>b"));
  CHECK(tok.decode(std::vector<int32_t>{'a', mv.eot}) == "a<|endoftext|>");

  for (std::string text : std::vector<std::string>{"héllo wörld 你好 🙂\n\n\tend", "x  \n  y's 3.14 !!", std::string("nul\0byte", 8), "\xc2\x85\xe1\xa0\x8e"}) {
    INFO(text);
    CHECK(tok.decode(tok.encode(text)) == text);
    CHECK(tok.decode(tok.encode(text, true)) == text);
  }
  CHECK_THROWS_AS(tok.decode(std::vector<int32_t>{mv.eot + 1}), std::out_of_range);
  CHECK_THROWS_AS(tok.decode(std::vector<int32_t>{-1}), std::out_of_range);

  // Invalid UTF-8 is refused with the offset; sanitize_utf8 replaces it like Python's "replace".
  CHECK(contains(error_of([&] { tok.encode("ab\xff"); }), "byte 2"));
  size_t n = 0;
  CHECK(sanitize_utf8("a\xff" "b", &n) == "a\xEF\xBF\xBD" "b");
  CHECK(n == 1);
  CHECK(sanitize_utf8("\xe2\x82", &n) == "\xEF\xBF\xBD");  // truncated 3-byte sequence: one U+FFFD
  CHECK(n == 1);
  CHECK(sanitize_utf8("\xed\xa0\x80", &n) == "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  CHECK(n == 3);
  CHECK(sanitize_utf8("\xc0\xaf") == "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong
  CHECK(sanitize_utf8("ok \xf0\x9f\x99\x82") == "ok \xf0\x9f\x99\x82");
  CHECK(find_invalid_utf8("plain ascii text, long enough for the fast path") == std::string_view::npos);
  CHECK(find_invalid_utf8("0123456789\x80") == 10);
}

TEST_CASE("tokenizer: bad vocab or merges files name the file") {
  test::TempDir dir;
  MiniVocab mv;
  const std::string vocab = dir.write("vocab.json", mv.vocab_json), merges = dir.write("merges.txt", mv.merges_txt);
  auto err = [&](const std::string& v, const std::string& m) { return error_of([&] { Tokenizer t(v, m); }); };

  std::string p = dir.write("notjson.json", "{\"a\": ");
  CHECK(contains(err(p, merges), p));
  p = dir.write("array.json", "[1, 2]");
  CHECK(contains(err(p, merges), p));
  p = dir.write("negid.json", "{\"a\": -1}");
  CHECK(contains(err(p, merges), p));
  p = dir.write("nobytes.json", "{\"a\": 0, \"b\": 1}");
  CHECK(contains(err(p, merges), "byte 0x"));
  CHECK(contains(err(dir.path.string() + "/missing.json", merges), "missing.json"));

  p = dir.write("unknown_merge.txt", "#version: 0.2\nl l\nq zz\n");
  std::string msg = err(vocab, p);
  CHECK(contains(msg, p + ":3"));
  p = dir.write("bad_line.txt", "#version: 0.2\nl l x\n");
  CHECK(contains(err(vocab, p), p + ":2"));
  p = dir.write("one_token.txt", "#version: 0.2\nll\n");
  CHECK(contains(err(vocab, p), p + ":2"));
  CHECK(contains(err(vocab, dir.path.string() + "/nope.txt"), "nope.txt"));
}

TEST_CASE("tokenizer: real GPT-2 vocab gives HF GPT2TokenizerFast's ids") {
  const std::string dir = gpt2_vocab_dir();
  if (!fs::exists(dir + "/vocab.json") || !fs::exists(dir + "/merges.txt")) {
    MESSAGE("skipped: GPT-2 vocab.json/merges.txt not in '" << dir << "' (set DEEPLORA_GPT2_VOCAB_DIR or run the setup script)");
    return;
  }
  Tokenizer tok = Tokenizer::from_dir(dir);
  CHECK(tok.vocab_size() == 50257);
  CHECK(tok.n_merges() == 50000);
  CHECK(tok.eot_id() == 50256);

  using V = std::vector<int32_t>;
  CHECK(tok.encode("Hello world") == V{15496, 995});
  CHECK(tok.encode(" Hello") == V{18435});
  CHECK(tok.encode("<|endoftext|>", true) == V{50256});
  CHECK(tok.encode("<|endoftext|>") != V{50256});
  // Expected ids recorded from transformers' GPT2TokenizerFast (HF tokenizers).
  CHECK(tok.encode("I'll  go\n\n  to   the store's 123 café 🙂") ==
        V{40, 1183, 220, 467, 628, 220, 284, 220, 220, 262, 3650, 338, 17031, 40304, 32485});
  // U+0085 is whitespace to HF's regex engine, U+180E is not (PCRE2's \s would say otherwise).
  CHECK(tok.encode("a\xc2\x85" "b\xe1\xa0\x8e" "c\xe3\x80\x80 d\t\n") ==
        V{64, 126, 227, 65, 157, 254, 236, 66, 5099, 222, 288, 197, 198});
  CHECK(tok.encode("Don't STOP: x=1.5e-3; y's!!") ==
        V{3987, 470, 44934, 25, 2124, 28, 16, 13, 20, 68, 12, 18, 26, 331, 338, 3228});
  CHECK(tok.encode("<|endoftext|>The end.<|endoftext|>\n", true) == V{50256, 464, 886, 13, 50256, 198});
  CHECK(tok.decode(V{15496, 995}) == "Hello world");

  // Round trip and throughput on a larger mixed text.
  std::string text;
  for (int i = 0; i < 2000; ++i)
    text += fmt::format("Paragraph {}: the quick brown fox's {} jumps — über café naïve 日本語 🙂\n\n    code(x{}) = [{}];\n", i,
                        i * 37 % 1000, i, i % 7);
  auto t0 = std::chrono::steady_clock::now();
  auto ids = tok.encode(text);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(tok.decode(ids) == text);
  MESSAGE(fmt::format("GPT-2 tokenizer: {:.2f} MB/s on {} bytes (first pass, cold cache)", text.size() / secs / 1e6, text.size()));
}
