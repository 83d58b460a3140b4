// HF tokenizer.json loading: GPT-2 rebuilt as a tokenizer.json against the vocab.json + merges.txt
// tokenizer; the Llama 3 / Qwen2 / SmolLM2 pre-tokenizers on inputs where they differ from GPT-2's
// (expected pieces worked out by hand from the regexes); ignore_merges, added tokens, NFC; a table
// of refused files; and the fixtures tools/hf_crosscheck.py trains with HF tokenizers.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "models/tokenizer.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;
using json = nlohmann::json;
using V = std::vector<int32_t>;
using Pieces = std::vector<std::string>;

namespace {

using test::contains;

// The vocab spelling (GPT-2's byte-to-unicode) of raw bytes: sp(" w") == "Ġw".
std::string sp(const std::string& bytes) {
  std::string s;
  for (unsigned char c : bytes) s += test::byte_token(c);
  return s;
}

std::vector<int32_t> bytes_of(const std::string& s) {
  std::vector<int32_t> v;
  for (unsigned char c : s) v.push_back(c);
  return v;
}

// A pre-tokenizer Split stage as HF writes it.
json split_regex(const std::string& re) {
  return {{"type", "Split"}, {"pattern", {{"Regex", re}}}, {"behavior", "Isolated"}, {"invert", false}};
}
json byte_level(bool use_regex, bool add_prefix_space = false) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", add_prefix_space}, {"trim_offsets", true}, {"use_regex", use_regex}};
}
json sequence(std::vector<json> stages) { return {{"type", "Sequence"}, {"pretokenizers", stages}}; }

// The patterns of Llama 3's and Qwen2's tokenizer.json (Oniguruma syntax), as HF ships them.
const char* kLlama3 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char* kQwen2 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// A byte-level BPE tokenizer.json: the 256 byte tokens (id = byte value), then one token per merge
// (raw bytes, spelled here) in merge order, then `extra` vocab tokens (raw bytes).
json mini(const json& pre_tokenizer, const std::vector<std::pair<std::string, std::string>>& merges = {},
          const std::vector<std::string>& extra = {}) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[test::byte_token(b)] = b;
  json m = json::array();
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(sp(a + b))) vocab[sp(a + b)] = vocab.size();
    m.push_back(json::array({sp(a), sp(b)}));
  }
  for (const auto& t : extra) vocab[sp(t)] = vocab.size();
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", pre_tokenizer},
          {"post_processor", byte_level(true)},
          {"decoder", byte_level(true)},
          {"model",
           {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
            {"vocab", vocab}, {"merges", m}}}};
}

json added(int id, const std::string& content, bool special, bool normalized = false) {
  return {{"id", id},         {"content", content}, {"single_word", false}, {"lstrip", false},
          {"rstrip", false},  {"normalized", normalized}, {"special", special}};
}

Tokenizer load(const test::TempDir& dir, const json& j, const std::string& name = "tokenizer.json") {
  return Tokenizer::from_tokenizer_json(dir.write(name, j.dump()));
}

std::string gpt2_vocab_dir() {
  if (const char* env = std::getenv("DEEPLORA_GPT2_VOCAB_DIR")) return env;
  return std::string(DEEPLORA_TEST_DATA) + "/../../data/gpt2";
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// About 1 MB of real English text: the licenses Debian installs, then packages' copyright files.
std::string real_text(size_t want = 1 << 20) {
  std::vector<fs::path> files;
  std::error_code ec;
  for (const char* root : {"/usr/share/common-licenses", "/usr/share/doc"}) {
    std::vector<fs::path> found;
    for (auto it = fs::recursive_directory_iterator(root, fs::directory_options::skip_permission_denied, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      const fs::path& p = it->path();
      if (it->is_regular_file(ec) && !it->is_symlink(ec) &&
          (std::string(root) == "/usr/share/common-licenses" || p.filename() == "copyright"))
        found.push_back(p);
    }
    std::sort(found.begin(), found.end());
    files.insert(files.end(), found.begin(), found.end());
  }
  std::string text;
  for (const auto& p : files) {
    if (text.size() >= want) break;
    text += sanitize_utf8(read_file(p));
  }
  return text;
}

// Texts that stress pre-tokenization: whitespace runs, CRLF, Unicode spaces (U+0085 and U+3000 are
// White_Space, U+180E is not), combining marks, emoji ZWJ sequences, digit runs, contractions.
const std::vector<std::string> kHostile = {
    "I'll  go\n\n  to   the store's 123 café 🙂",
    "a\xc2\x85" "b\xe1\xa0\x8e" "c\xe3\x80\x80 d\t\n",
    "Don't STOP: x=1.5e-3; y's!! HE'S WE'RE we'Ll",
    "line one\r\nline two\r\n\r\n  \r\n\tindented\r\n",
    "e\xcc\x81 a\xcc\x8a\xcc\x81 \xe1\x84\x80\xe1\x85\xa1 n\xcc\x83o",  // combining marks, Hangul jamo
    "family 👨\u200d👩\u200d👧\u200d👦 flag 🏳\ufe0f\u200d🌈 skin 👍🏽",
    "0 12 345 6789 1234567890 3.14159 1,000,000 ١٢٣ ½",
    "      leading and trailing      ",
    "\n\n\n\t\t\t   \u2003\u2003x\u00a0\u00a0y\u202f",
    "<|endoftext|>The end.<|endoftext|>\nnot <|endoftext| special",
    "$hello @world #tag ...!!! ?? (x) [y] {z} a--b",
    std::string("nul\0byte", 8),
    "",
};

}  // namespace

TEST_CASE("tokenizer.json: GPT-2 as a tokenizer.json gives the vocab.json + merges.txt ids") {
  const std::string dir = gpt2_vocab_dir();
  if (!fs::exists(dir + "/vocab.json") || !fs::exists(dir + "/merges.txt")) {
    MESSAGE("skipped: GPT-2 vocab.json/merges.txt not in '" << dir << "' (set DEEPLORA_GPT2_VOCAB_DIR or run the setup script)");
    return;
  }
  const Tokenizer ref = Tokenizer::from_dir(dir);
  // The tokenizer.json HF writes for GPT-2, merges in both encodings ("a b" and ["a", "b"]).
  json pairs = json::array(), lines = json::array();
  {
    std::istringstream in(read_file(dir + "/merges.txt"));
    for (std::string line; std::getline(in, line);) {
      if (line.empty() || line.starts_with("#version")) continue;
      const size_t space = line.find(' ');
      lines.push_back(line);
      pairs.push_back(json::array({line.substr(0, space), line.substr(space + 1)}));
    }
  }
  json j = {{"version", "1.0"},
            {"truncation", nullptr},
            {"padding", nullptr},
            {"added_tokens", json::array({added(50256, "<|endoftext|>", true, true)})},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
            {"post_processor", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}}},
            {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
            {"model",
             {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", ""},
              {"end_of_word_suffix", ""}, {"fuse_unk", false}, {"byte_fallback", false},
              {"vocab", json::parse(read_file(dir + "/vocab.json"))}, {"merges", lines}}}};
  test::TempDir tmp;
  const Tokenizer from_lines = load(tmp, j, "lines.json");
  j["model"]["merges"] = pairs;
  j["model"].erase("type");  // older files have no model type: HF reads a model with merges as BPE
  const Tokenizer from_pairs = load(tmp, j, "pairs.json");

  const std::string big = real_text();
  CHECK(big.size() > 200000);
  auto mb_per_s = [&](const Tokenizer& tok) {
    const auto t0 = std::chrono::steady_clock::now();
    const size_t n = tok.encode(big).size();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return fmt::format("{:.1f} MB/s ({} ids)", double(big.size()) / s / 1e6, n);
  };
  MESSAGE(fmt::format("{} bytes of real text, cold cache: vocab.json + merges.txt {}, tokenizer.json {}", big.size(),
                      mb_per_s(ref), mb_per_s(from_lines)));
  for (const Tokenizer* tok : {&from_lines, &from_pairs}) {
    CHECK(tok->vocab_size() == 50257);
    CHECK(tok->n_merges() == 50000);
    CHECK(tok->eot_id() == 50256);
    CHECK_FALSE(tok->bos_id().has_value());
    CHECK(tok->encode("Hello world") == V{15496, 995});
    CHECK(tok->encode("<|endoftext|>", true) == V{50256});
    for (const std::string& text : kHostile) {
      INFO(text);
      CHECK(tok->encode(text) == ref.encode(text));
      CHECK(tok->encode(text, true) == ref.encode(text, true));
      CHECK(tok->pre_tokenize(text) == ref.pre_tokenize(text));
    }
    CHECK(tok->encode(big) == ref.encode(big));
  }
  // Same ids from several threads at once (the word cache is shared).
  const V want = ref.encode(big);
  std::vector<V> got(4);
  const Tokenizer fresh = load(tmp, j, "threads.json");
  std::vector<std::thread> threads;
  for (auto& g : got) threads.emplace_back([&] { g = fresh.encode(big); });
  for (auto& t : threads) t.join();
  for (const auto& g : got) CHECK(g == want);
}

TEST_CASE("tokenizer.json: Llama 3 and Qwen2 Split patterns cut where GPT-2's does not") {
  test::TempDir dir;
  // The pieces feed BPE: merges that only fire when a pre-tokenizer keeps their bytes together.
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"$", "hello"}, {"'", "S"}, {"\r", "\n"}};
  const Tokenizer gpt2 = load(dir, mini(byte_level(true), merges), "gpt2.json");
  const Tokenizer llama = load(dir, mini(sequence({split_regex(kLlama3), byte_level(false)}), merges), "llama.json");
  const Tokenizer qwen = load(dir, mini(sequence({split_regex(kQwen2), byte_level(false)}), merges), "qwen.json");
  const int32_t hello = 259, dollar_hello = 260, quote_S = 261, crlf = 262;

  // Digits: Llama 3 groups up to 3 (\p{N}{1,3}), Qwen2 takes one at a time; GPT-2 keeps a run, with
  // the space before it.
  CHECK(llama.pre_tokenize("12345 678") == Pieces{"123", "45", " ", "678"});
  CHECK(qwen.pre_tokenize("12345 678") == Pieces{"1", "2", "3", "4", "5", " ", "6", "7", "8"});
  CHECK(gpt2.pre_tokenize("12345 678") == Pieces{"12345", " 678"});
  // Contractions are case-insensitive in (?i:...): "'S" and "'RE" are pieces; GPT-2's are not.
  CHECK(llama.pre_tokenize("HE'S we're WE'RE") == Pieces{"HE", "'S", " we", "'re", " WE", "'RE"});
  CHECK(qwen.pre_tokenize("HE'S we're WE'RE") == Pieces{"HE", "'S", " we", "'re", " WE", "'RE"});
  CHECK(gpt2.pre_tokenize("HE'S we're WE'RE") == Pieces{"HE", "'", "S", " we", "'re", " WE", "'", "RE"});
  CHECK(llama.encode("HE'S") == V{'H', 'E', quote_S});
  CHECK(gpt2.encode("HE'S") == V{'H', 'E', '\'', 'S'});
  // [^\r\n\p{L}\p{N}]?\p{L}+: one leading non-letter joins the letters ("$hello", and U+3000, which
  // is no \r or \n); GPT-2 only takes a plain space.
  CHECK(llama.pre_tokenize("$hello") == Pieces{"$hello"});
  CHECK(gpt2.pre_tokenize("$hello") == Pieces{"$", "hello"});
  CHECK(llama.encode("$hello") == V{dollar_hello});
  CHECK(gpt2.encode("$hello") == V{'$', hello});
  CHECK(llama.pre_tokenize("\u3000x") == Pieces{"\u3000x"});
  CHECK(gpt2.pre_tokenize("\u3000x") == Pieces{"\u3000", "x"});
  // \s*[\r\n]+ keeps "\r\n" whole, with the whitespace before it; GPT-2's \s+(?!\S) leaves the
  // last whitespace character to its own piece.
  CHECK(llama.pre_tokenize("a\r\nb") == Pieces{"a", "\r\n", "b"});
  CHECK(gpt2.pre_tokenize("a\r\nb") == Pieces{"a", "\r", "\n", "b"});
  CHECK(llama.encode("a\r\nb") == V{'a', crlf, 'b'});
  CHECK(gpt2.encode("a\r\nb") == V{'a', '\r', '\n', 'b'});
  CHECK(llama.pre_tokenize("x  \ny") == Pieces{"x", "  \n", "y"});
  CHECK(gpt2.pre_tokenize("x  \ny") == Pieces{"x", "  ", "\n", "y"});
  // ` ?[^\s\p{L}\p{N}]+[\r\n]*`: punctuation takes the newlines after it.
  CHECK(llama.pre_tokenize("x!!\n\ny") == Pieces{"x", "!!\n\n", "y"});
  CHECK(gpt2.pre_tokenize("x!!\n\ny") == Pieces{"x", "!!", "\n", "\n", "y"});
  // Runs of spaces: \s+(?!\S) leaves the last one to the word, as in GPT-2.
  CHECK(llama.pre_tokenize("a   b") == Pieces{"a", "  ", " b"});
  // U+180E is not White_Space, so it is \S and belongs to [^\s\p{L}\p{N}]+; PCRE2's own \s takes it.
  // With PCRE2's \s in the class, "\u180E" and "!" would be apart (\s+ takes U+180E alone).
  CHECK(llama.pre_tokenize("x\u180E!") == Pieces{"x", "\u180E!"});
  // With PCRE2's \S, \s+(?!\S) would take both spaces (U+180E not being \S), leaving "\u180E".
  CHECK(llama.pre_tokenize("  \u180E") == Pieces{" ", " \u180E"});
  // With both, \s+(?!\S) would take the first U+180E alone: "\u180E", "\u180Ez".
  CHECK(llama.pre_tokenize("a\u180E\u180Ez") == Pieces{"a", "\u180E\u180E", "z"});
  CHECK(qwen.pre_tokenize("a\u180E\u180Ez") == Pieces{"a", "\u180E\u180E", "z"});
  // U+0085 is White_Space: "\u0085\u0085" before "b" splits as whitespace does.
  CHECK(llama.pre_tokenize("a\u0085\u0085 b") == Pieces{"a", "\u0085\u0085", " b"});

  for (const std::string& text : kHostile) {
    INFO(text);
    for (const Tokenizer* tok : {&llama, &qwen}) {
      CHECK(tok->decode(tok->encode(text)) == text);
      std::string joined;
      for (const auto& p : tok->pre_tokenize(text)) joined += p;
      CHECK(joined == text);
    }
  }
  // A long whitespace run and a long word: no regex stack limit.
  const std::string spaces(200000, ' '), letters(200000, 'x');
  CHECK(llama.pre_tokenize(spaces + "a") == Pieces{std::string(199999, ' '), " a"});
  CHECK(llama.decode(llama.encode(letters + "\n" + spaces)) == letters + "\n" + spaces);
}

TEST_CASE("tokenizer.json: Digits, Split strings, empty matches and ByteLevel's add_prefix_space") {
  test::TempDir dir;
  // SmolLM2's pre-tokenizer: Digits (one at a time), then GPT-2's regex on each piece.
  const Tokenizer smol = load(dir, mini(sequence({{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true)})), "a.json");
  CHECK(smol.pre_tokenize("abc123 456") == Pieces{"abc", "1", "2", "3", " ", "4", "5", "6"});
  const Tokenizer runs = load(dir, mini(sequence({{{"type", "Digits"}, {"individual_digits", false}}, byte_level(true)})), "b.json");
  CHECK(runs.pre_tokenize("abc123 456") == Pieces{"abc", "123", " ", "456"});
  // A String pattern is a literal ("." is no wildcard).
  json literal = {{"type", "Split"}, {"pattern", {{"String", "."}}}, {"behavior", "Isolated"}, {"invert", false}};
  const Tokenizer dots = load(dir, mini(sequence({literal, byte_level(false)})), "c.json");
  CHECK(dots.pre_tokenize("a.b..c") == Pieces{"a", ".", "b", ".", ".", "c"});
  // Empty matches mark boundaries only (Oniguruma's find_iter): "(?=b)" cuts before each b.
  const Tokenizer before_b = load(dir, mini(sequence({split_regex("(?=b)"), byte_level(false)})), "d.json");
  CHECK(before_b.pre_tokenize("abab") == Pieces{"a", "ba", "b"});
  // Oniguruma's "." is any character but \n; \v the vertical tab; \uHHHH a code point; {,n} is {0,n}.
  const Tokenizer dot = load(dir, mini(sequence({split_regex("x.|\\v|\\u00e9|y{,2}"), byte_level(false)})), "e.json");
  CHECK(dot.pre_tokenize("x\nxzz\x0b\xc3\xa9yyy") == Pieces{"x", "\n", "xz", "z", "\x0b", "\xc3\xa9", "yy", "y"});
  // add_prefix_space: HF puts a space before every piece of the stage that lacks one.
  const Tokenizer prefixed = load(dir, mini(byte_level(true, true), {{" ", "h"}}), "f.json");
  CHECK(prefixed.pre_tokenize("hi there") == Pieces{" hi", " there"});
  CHECK(prefixed.pre_tokenize(" hi") == Pieces{" hi"});
  CHECK(prefixed.encode("hi") == V{256, 'i'});
  CHECK(prefixed.decode(prefixed.encode("hi")) == " hi");
}

TEST_CASE("tokenizer.json: ignore_merges takes a vocab word whole, merges or not") {
  test::TempDir dir;
  // "abc" is in the vocab but no merge makes it: (a, b) is the only merge.
  json j = mini(byte_level(true), {{"a", "b"}}, {"abc", " xyz"});
  const Tokenizer merging = load(dir, j, "merging.json");
  j["model"]["ignore_merges"] = true;
  const Tokenizer ignoring = load(dir, j, "ignoring.json");
  const int32_t ab = 256, abc = 257, xyz = 258;
  CHECK(merging.encode("abc") == V{ab, 'c'});
  CHECK(ignoring.encode("abc") == V{abc});
  CHECK(merging.encode("abc xyz") == V{ab, 'c', ' ', 'x', 'y', 'z'});
  CHECK(ignoring.encode("abc xyz") == V{abc, xyz});
  // Words that are not tokens still go through the merges.
  CHECK(ignoring.encode("zabc") == V{'z', ab, 'c'});
  CHECK(ignoring.decode(ignoring.encode("abc xyz abcd")) == "abc xyz abcd");
}

TEST_CASE("tokenizer.json: added tokens, special or not, beyond the model's vocab") {
  test::TempDir dir;
  json j = mini(byte_level(true), {{"a", "b"}});
  j["added_tokens"] = json::array({added(1000, "<|begin_of_text|>", true), added(1001, "<tool>", true),
                                   added(1002, "tool>", false), added(1003, "<|a|>", true), added(1004, "<|a|>!", true),
                                   added(1005, "<|end_of_text|>", true)});
  j["post_processor"] = {
      {"type", "Sequence"},
      {"processors",
       json::array({byte_level(true),
                    {{"type", "TemplateProcessing"},
                     {"single", json::array({{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                                             {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                     {"pair", json::array()},
                     {"special_tokens",
                      {{"<|begin_of_text|>", {{"id", "<|begin_of_text|>"}, {"ids", json::array({1000})}, {"tokens", json::array({"<|begin_of_text|>"})}}}}}}})}};
  const Tokenizer tok = load(dir, j);
  CHECK(tok.vocab_size() == 1006);
  CHECK(tok.eot_id() == 1005);  // Llama 3's name, for want of <|endoftext|>
  CHECK(tok.bos_id() == 1000);
  CHECK(tok.token_to_id("<tool>") == 1001);
  CHECK(tok.encode("ab") == V{256});  // encode never adds the BOS

  // Special tokens only with allow_special.
  CHECK(tok.encode("x<|begin_of_text|>ab", true) == V{'x', 1000, 256});
  V ordinary = bytes_of("x<|begin_of_text|>");  // "<|", "begin", "_", ... "|>", then "ab" merged
  ordinary.push_back(256);
  CHECK(tok.encode("x<|begin_of_text|>ab") == ordinary);
  // Non-special ones always, as in HF.
  CHECK(tok.encode("x tool>") == V{'x', ' ', 1002});
  CHECK(tok.encode("x tool>", true) == V{'x', ' ', 1002});
  // Leftmost, then longest.
  CHECK(tok.encode("<|a|>!<|a|>?", true) == V{1004, 1003, '?'});
  CHECK(tok.encode("<tool>", true) == V{1001});
  // Without allow_special "<tool>" is text, and (as with HF's encode_special_tokens) the "tool>"
  // inside it is not looked for: the match of the special token hides it.
  CHECK(tok.encode("<tool>") == bytes_of("<tool>"));
  CHECK(tok.decode(V{1000, 'h', 'i', 1002}) == "<|begin_of_text|>hitool>");
  CHECK_THROWS_AS(tok.decode(V{1006}), std::out_of_range);
}

TEST_CASE("tokenizer.json: the NFC normalizer") {
  test::TempDir dir;
  // U+00E9 is the bytes C3 A9: one merge makes it a token.
  json j = mini(byte_level(true), {{"\xc3", "\xa9"}});
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFC"}}})}};
  j["added_tokens"] = json::array({added(300, "caf\u00e9!", false, true), added(301, "<e\xcc\x81>", true, false)});
  const std::string path = dir.write("nfc.json", j.dump());
#ifdef DEEPLORA_HAVE_ICU
  const Tokenizer tok = Tokenizer::from_tokenizer_json(path);
  const int32_t e_acute = 256;
  CHECK(tok.encode("e\xcc\x81") == V{e_acute});  // e + U+0301 composes to U+00E9
  CHECK(tok.encode("\xc3\xa9") == V{e_acute});
  CHECK(tok.pre_tokenize("Cafe\xcc\x81 A\xcc\x8a") == Pieces{"Caf\xc3\xa9", " \xc3\x85"});
  // A normalized added token matches the normalized text; a non-normalized one the text as given.
  CHECK(tok.encode("cafe\xcc\x81!") == V{300});
  CHECK(tok.encode("caf\xc3\xa9!") == V{300});
  CHECK(tok.encode("<e\xcc\x81>", true) == V{301});
  CHECK(tok.encode("<\xc3\xa9>", true) == V{'<', e_acute, '>'});
  j["normalizer"] = nullptr;
  const Tokenizer plain = load(dir, j, "plain.json");
  CHECK(plain.encode("e\xcc\x81") == V{'e', 0xcc, 0x81});
#else
  const std::string err = test::runtime_error_of([&] { Tokenizer::from_tokenizer_json(path); });
  CHECK(contains(err, path));
  CHECK(contains(err, "normalizer"));
  CHECK(contains(err, "NFC"));
  CHECK(contains(err, "ICU"));
  MESSAGE("built without ICU: NFC tokenizer.json files are refused (checked)");
#endif
}

TEST_CASE("tokenizer.json: unsupported or broken files are refused, naming the file and the field") {
  test::TempDir dir;
  const json good = mini(sequence({split_regex(kLlama3), byte_level(false)}), {{"a", "b"}});
  CHECK_NOTHROW(load(dir, good));
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = good;
    edit(j);
    return j.dump();
  };
  auto split_with = [&](const std::string& re) {
    return with([&](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = re; });
  };
  struct Bad {
    std::string name, text;
    std::vector<std::string> says;  // besides the file's path
  };
  const std::vector<Bad> table = {
      {"not_json", "{\"model\": ", {"not valid JSON"}},
      {"array", "[]", {"expected a JSON object"}},
      {"no_model", with([](json& j) { j.erase("model"); }), {"model: missing"}},
      {"wordpiece", with([](json& j) { j["model"]["type"] = "WordPiece"; }), {"model.type", "WordPiece"}},
      {"unigram", with([](json& j) { j["model"]["type"] = "Unigram"; }), {"model.type", "Unigram"}},
      {"byte_fallback", with([](json& j) { j["model"]["byte_fallback"] = true; }), {"model.byte_fallback"}},
      {"dropout", with([](json& j) { j["model"]["dropout"] = 0.1; }), {"model.dropout"}},
      {"unk", with([](json& j) { j["model"]["unk_token"] = "<unk>"; }), {"model.unk_token"}},
      {"prefix", with([](json& j) { j["model"]["continuing_subword_prefix"] = "##"; }), {"model.continuing_subword_prefix"}},
      {"suffix", with([](json& j) { j["model"]["end_of_word_suffix"] = "</w>"; }), {"model.end_of_word_suffix"}},
      {"ignore_merges_type", with([](json& j) { j["model"]["ignore_merges"] = "yes"; }), {"model.ignore_merges"}},
      {"vocab_array", with([](json& j) { j["model"]["vocab"] = json::array(); }), {"model.vocab"}},
      {"vocab_negative", with([](json& j) { j["model"]["vocab"]["zz"] = -3; }), {"model.vocab", "zz"}},
      {"vocab_duplicate_id", with([](json& j) { j["model"]["vocab"]["zz"] = 7; }), {"model.vocab", "id 7"}},
      {"no_byte_token", with([](json& j) { j["model"]["vocab"].erase(sp("q")); }), {"model.vocab", "byte 0x71"}},
      {"merge_unknown", with([](json& j) { j["model"]["merges"].push_back(json::array({"zz", "b"})); }), {"model.merges[1]", "zz"}},
      {"merge_result_unknown", with([](json& j) { j["model"]["merges"].push_back("b c"); }), {"model.merges[1]"}},
      {"merge_three", with([](json& j) { j["model"]["merges"].push_back("a b c"); }), {"model.merges[1]"}},
      {"merge_number", with([](json& j) { j["model"]["merges"].push_back(3); }), {"model.merges[1]"}},
      {"whitespace_pre", with([](json& j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; }), {"pre_tokenizer.type", "Whitespace"}},
      {"metaspace_in_seq", with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Metaspace"}}; }),
       {"pre_tokenizer.pretokenizers[0].type", "Metaspace"}},
      {"no_pre", with([](json& j) { j["pre_tokenizer"] = nullptr; }), {"pre_tokenizer", "ByteLevel"}},
      {"byte_level_not_last", with([](json& j) { j["pre_tokenizer"]["pretokenizers"].push_back(split_regex("a")); }),
       {"pre_tokenizer.pretokenizers[2].type", "ByteLevel must come last"}},
      {"removed", with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; }),
       {"pre_tokenizer.pretokenizers[0].behavior", "Removed"}},
      {"invert", with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["invert"] = true; }),
       {"pre_tokenizer.pretokenizers[0].invert"}},
      {"bad_regex", split_with("(unclosed"), {"pre_tokenizer.pretokenizers[0].pattern.Regex", "(unclosed"}},
      {"S_in_class", split_with("[^\\S\\n]+"), {"pre_tokenizer.pretokenizers[0].pattern.Regex", "\\S inside a character class"}},
      {"w_escape", split_with("\\w+"), {"pattern.Regex", "\\w"}},
      {"d_escape", split_with("\\d+"), {"pattern.Regex", "\\d"}},
      {"h_escape", split_with("\\h+"), {"pattern.Regex", "\\h"}},
      {"posix", split_with("[[:alpha:]]+"), {"pattern.Regex", "POSIX"}},
      {"anchor", split_with("^a"), {"pattern.Regex", "anchor"}},
      {"option_m", split_with("(?m:a.)"), {"pattern.Regex", "(?m"}},
      {"pattern_kind", with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Glob", "*"}}; }),
       {"pre_tokenizer.pretokenizers[0].pattern"}},
      {"lowercase", with([](json& j) { j["normalizer"] = {{"type", "Lowercase"}}; }), {"normalizer.type", "Lowercase"}},
      {"nfkc_in_seq", with([](json& j) { j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}, {{"type", "NFKC"}}}}}; }),
       {"normalizer.normalizers[1].type", "NFKC"}},
      {"decoder", with([](json& j) { j["decoder"] = {{"type", "Metaspace"}}; }), {"decoder.type", "Metaspace"}},
      {"no_decoder", with([](json& j) { j["decoder"] = nullptr; }), {"decoder"}},
      {"post_roberta", with([](json& j) { j["post_processor"] = {{"type", "RobertaProcessing"}}; }), {"post_processor.type", "RobertaProcessing"}},
      {"added_lstrip", with([](json& j) { j["added_tokens"] = {added(300, "<x>", true)}; j["added_tokens"][0]["lstrip"] = true; }),
       {"added_tokens[0].lstrip"}},
      {"added_single_word", with([](json& j) { j["added_tokens"] = {added(300, "<x>", true)}; j["added_tokens"][0]["single_word"] = true; }),
       {"added_tokens[0].single_word"}},
      {"added_same_id", with([](json& j) { j["added_tokens"] = {added(300, "<x>", true), added(300, "<y>", true)}; }),
       {"added_tokens[1].id", "300"}},
      {"added_twice", with([](json& j) { j["added_tokens"] = {added(300, "<x>", true), added(301, "<x>", true)}; }),
       {"added_tokens[1].content", "<x>"}},
      {"added_vocab_id", with([](json& j) { j["added_tokens"] = {added(65, "<x>", true)}; }), {"added_tokens[0].id", "65"}},
      {"added_other_id", with([](json& j) { j["added_tokens"] = {added(300, "A", true)}; }), {"added_tokens[0].id", "'A' is id 65"}},
      {"added_empty", with([](json& j) { j["added_tokens"] = {added(300, "", true)}; }), {"added_tokens[0].content"}},
      {"added_id_type", with([](json& j) { j["added_tokens"] = {added(300, "<x>", true)}; j["added_tokens"][0]["id"] = "300"; }),
       {"added_tokens[0].id"}},
      {"added_far", with([](json& j) { j["added_tokens"] = {added(2000000000, "<x>", true)}; }), {"added_tokens", "far beyond"}},
  };
  for (const Bad& b : table) {
    INFO(b.name);
    const std::string path = dir.write(b.name + ".json", b.text);
    const std::string err = test::runtime_error_of([&] { Tokenizer::from_tokenizer_json(path); });
    INFO(err);
    CHECK(contains(err, path));
    for (const auto& s : b.says) CHECK(contains(err, s));
  }
  const std::string missing = dir.file("missing.json");
  CHECK(contains(test::runtime_error_of([&] { Tokenizer::from_tokenizer_json(missing); }), missing));
  // from_dir prefers tokenizer.json, so a broken one is not passed over for vocab.json + merges.txt.
  test::TempDir both;
  test::write_byte_vocab(both.path);
  CHECK(Tokenizer::from_dir(both.path.string()).vocab_size() == 257);
  both.write("tokenizer.json", "{}");
  CHECK(contains(test::runtime_error_of([&] { Tokenizer::from_dir(both.path.string()); }), "tokenizer.json: model: missing"));
  both.write("tokenizer.json", good.dump());
  CHECK(Tokenizer::from_dir(both.path.string()).vocab_size() == 257);  // 256 bytes + "ab"
}

TEST_CASE("tokenizer.json: HF tokenizers' ids on the fixtures of tools/hf_crosscheck.py") {
  for (const char* name : {"llama3_style", "qwen2_style"}) {
    const fs::path dir = fs::path(DEEPLORA_TEST_DATA) / "tokenizer_json" / name;
    if (!fs::exists(dir / "expected.json")) {
      MESSAGE(fmt::format("skipped: no {} (made by `python3 tools/hf_crosscheck.py tokenizer_json_fixture tests/data/tokenizer_json`)",
                          (dir / "expected.json").string()));
      continue;
    }
    const json expected = json::parse(read_file(dir / "expected.json"));
    const std::string path = (dir / "tokenizer.json").string();
#ifndef DEEPLORA_HAVE_ICU
    if (expected.value("nfc", false)) {
      CHECK(contains(test::runtime_error_of([&] { Tokenizer::from_tokenizer_json(path); }), "ICU"));
      MESSAGE(fmt::format("skipped {}: its NFC normalizer needs ICU (the refusal is checked)", name));
      continue;
    }
#endif
    const Tokenizer tok = Tokenizer::from_tokenizer_json(path);
    INFO(name);
    CHECK(tok.vocab_size() == expected.at("vocab_size").get<int32_t>());
    CHECK(tok.bos_id() == (expected.at("bos_id").is_null() ? std::nullopt : std::optional<int32_t>(expected.at("bos_id").get<int32_t>())));
    size_t n_ids = 0;
    for (const json& c : expected.at("cases")) {
      const std::string text = c.at("text").get<std::string>();
      INFO(text.substr(0, 200));
      const V want = c.at("ids").get<V>();
      CHECK(tok.encode(text, true) == want);
      if (c.contains("ids_ordinary")) CHECK(tok.encode(text) == c.at("ids_ordinary").get<V>());
      n_ids += want.size();
    }
    MESSAGE(fmt::format("{}: {} texts, {} ids identical to HF tokenizers {}", name, expected.at("cases").size(), n_ids,
                        expected.value("tokenizers_version", "?")));
  }
}
