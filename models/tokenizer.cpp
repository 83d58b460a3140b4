// Byte-level BPE: added tokens taken out first, optional NFC, PCRE2 pre-tokenizer stages, the
// byte-to-unicode vocab spelling, merges applied by rank with a heap (same order as HF tokenizers'
// word.rs) and a per-word cache; loaders for GPT-2's vocab.json + merges.txt and HF's tokenizer.json.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "models/tokenizer.h"

#include "runtime/io/dataloader.h"

#include <fmt/format.h>
#include <pcre2.h>
#ifdef DEEPLORA_HAVE_ICU
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/stringpiece.h>
#include <unicode/utypes.h>
#endif

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <utility>

namespace deeplora {

namespace {

using json = nlohmann::json;

// Unicode White_Space, which is what HF's Oniguruma means by \s. PCRE2's UCP \s also takes U+180E
// (via \h), so the class is written out to keep ids identical: in GPT-2's pattern here, and in the
// Oniguruma patterns of tokenizer.json files (onig_to_pcre2).
#define WS "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
constexpr const char* kWhiteSpace = WS;
constexpr const char* kPattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|[" WS "]+(?![^" WS "])|[" WS "]+";
#undef WS

constexpr size_t kCacheMaxEntries = 1 << 17;
constexpr size_t kCacheMaxWordBytes = 128;

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += char(0xE0 | (cp >> 12));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xF0 | (cp >> 18));
    s += char(0x80 | ((cp >> 12) & 0x3F));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  }
}

// Length of the UTF-8 sequence at p: a valid one (ok = true), or the maximal invalid subpart
// (ok = false, length >= 1), following the Unicode standard's table of well-formed sequences.
size_t utf8_step(const unsigned char* p, size_t n, bool& ok, uint32_t* cp = nullptr) {
  unsigned char c = p[0];
  ok = true;
  if (c < 0x80) {
    if (cp) *cp = c;
    return 1;
  }
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    ok = false;
    return 1;
  }
  uint32_t v = c & (len == 2 ? 0x1F : len == 3 ? 0x0F : 0x07);
  for (size_t i = 1; i < len; ++i) {
    if (i >= n || p[i] < lo || p[i] > hi) {
      ok = false;
      return i;
    }
    v = (v << 6) | (p[i] & 0x3F);
    lo = 0x80;
    hi = 0xBF;
  }
  if (cp) *cp = v;
  return len;
}

// Bytes of the character at s[i] (1 for an invalid byte or at the end).
size_t char_len(std::string_view s, size_t i) {
  if (i >= s.size()) return 1;
  bool ok;
  return utf8_step(reinterpret_cast<const unsigned char*>(s.data()) + i, s.size() - i, ok);
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the rest to U+0100 onwards.
std::array<uint32_t, 256> bytes_to_unicode() {
  std::array<uint32_t, 256> m{};
  std::array<bool, 256> direct{};
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  uint32_t n = 0;
  for (int b = 0; b < 256; ++b) m[b] = direct[b] ? uint32_t(b) : 256 + n++;
  return m;
}

std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(fmt::format("{}: cannot open {}", path, what));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw std::runtime_error(fmt::format("{}: read error", path));
  return ss.str();
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

// One merges line: exactly two non-empty tokens separated by one space (HF's line.split(' ')).
bool split_merge_line(std::string_view line, std::string_view& a, std::string_view& b) {
  size_t sp = line.find(' ');
  if (sp == std::string_view::npos || sp == 0 || sp + 1 == line.size() || line.find(' ', sp + 1) != std::string_view::npos)
    return false;
  a = line.substr(0, sp);
  b = line.substr(sp + 1);
  return true;
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR msg[256];
  pcre2_get_error_message(code, msg, sizeof msg);
  return reinterpret_cast<char*>(msg);
}

// A compiled PCRE2 pattern, JIT-compiled where the platform allows.
class Regex {
 public:
  // `what` starts the error message when the pattern does not compile.
  Regex(const std::string& pattern, uint32_t options, const std::string& what) {
    int err = 0;
    PCRE2_SIZE off = 0;
    re_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options, &err, &off, nullptr);
    if (!re_) throw std::runtime_error(fmt::format("{}: PCRE2 cannot compile it at offset {}: {}", what, off, pcre2_message(err)));
    jit_ = pcre2_jit_compile(re_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() {
    if (re_) pcre2_code_free(re_);
  }
  Regex(Regex&& o) noexcept : re_(std::exchange(o.re_, nullptr)), jit_(o.jit_) {}
  Regex& operator=(Regex&&) = delete;
  Regex(const Regex&) = delete;

  // The first match at or after `from` in s (valid UTF-8, not checked again): [b, e).
  bool find(std::string_view s, size_t from, pcre2_match_data* md, size_t& b, size_t& e) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    int rc = jit_ ? pcre2_jit_match(re_, subject, s.size(), from, PCRE2_NO_UTF_CHECK, md, nullptr) : PCRE2_ERROR_JIT_STACKLIMIT;
    // The interpreter keeps its backtracking frames on the heap: it takes what JIT's stack cannot.
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) rc = pcre2_match(re_, subject, s.size(), from, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0) throw std::runtime_error(fmt::format("tokenizer: pre-tokenizer regex failed at byte {}: {}", from, pcre2_message(rc)));
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);  // rc 0: a match, captures not kept
    b = ov[0];
    e = ov[1];
    return true;
  }

 private:
  pcre2_code* re_ = nullptr;
  bool jit_ = false;
};

// Room for the whole match only (captures are never read); one per encode call, shared by stages.
struct MatchData {
  pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
  MatchData() {
    if (!md) throw std::bad_alloc();
  }
  ~MatchData() { pcre2_match_data_free(md); }
  MatchData(const MatchData&) = delete;
  MatchData& operator=(const MatchData&) = delete;
};

// HF compiles Split patterns with Oniguruma (Ruby syntax). This rewrites one into PCRE2 (UTF, UCP)
// syntax of the same meaning: \s and \S as Unicode White_Space, "." as Oniguruma's (not \n), \v,
// \uHHHH and {,n}. Constructs whose meanings differ and that it does not translate (\w \d \b \h,
// POSIX brackets, nested classes, anchors, inline options other than i) throw
// std::invalid_argument, so that no pattern silently matches differently.
[[noreturn]] void unsupported(std::string_view what, std::string_view why) {
  throw std::invalid_argument(fmt::format("{} is not supported ({})", what, why));
}

std::string onig_to_pcre2(std::string_view re) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < re.size();) {
    const char c = re[i];
    if (c == '\\') {
      if (i + 1 == re.size()) unsupported("a trailing backslash", "nothing to escape");
      const char d = re[i + 1];
      i += 2;
      switch (d) {
        case 's':
          out += in_class ? kWhiteSpace : fmt::format("[{}]", kWhiteSpace);
          break;
        case 'S':
          if (in_class) unsupported("\\S inside a character class", "PCRE2 has no class for it to stand for");
          out += fmt::format("[^{}]", kWhiteSpace);
          break;
        case 'v':  // Oniguruma: the vertical tab; PCRE2: any vertical space
          out += "\\x{0B}";
          break;
        case 'u': {  // Oniguruma's \uHHHH is PCRE2's \x{HHHH}
          if (i + 4 > re.size() || !std::all_of(re.begin() + long(i), re.begin() + long(i) + 4, [](char h) { return std::isxdigit(uint8_t(h)); }))
            unsupported("\\u without four hex digits", "Oniguruma reads \\uHHHH");
          out += fmt::format("\\x{{{}}}", re.substr(i, 4));
          i += 4;
          break;
        }
        case 'p': case 'P': case 'x': case 'k': {  // \p{L}, \P{^N}, \x{41}, \k<name>: the same in both
          out += '\\';
          out += d;
          const char close = i < re.size() && re[i] == '{' ? '}' : i < re.size() && re[i] == '<' ? '>' : 0;
          if (close) {
            const size_t end = re.find(close, i);
            if (end == std::string_view::npos) unsupported(fmt::format("an unclosed \\{}{}", d, re[i]), "no closing bracket");
            out += re.substr(i, end + 1 - i);
            i = end + 1;
          }
          break;
        }
        case 't': case 'n': case 'r': case 'f': case 'a': case 'e':
        case '0': case '1': case '2': case '3': case '4': case '5': case '6': case '7': case '8': case '9':
          out += '\\';
          out += d;
          break;
        case 'A': case 'z': case 'Z': case 'G':
          if (in_class) unsupported(fmt::format("\\{} inside a character class", d), "an anchor");
          out += '\\';
          out += d;
          break;
        default:
          if (std::isalnum(uint8_t(d)))
            unsupported(fmt::format("the escape \\{}", d), "Oniguruma's meaning differs from PCRE2's or is not translated");
          out += '\\';  // an escaped punctuation or non-ASCII character: itself in both
          out += d;
      }
      continue;
    }
    if (in_class) {
      if (c == ']') {
        in_class = false;
      } else if (c == '[') {
        unsupported(re.substr(i, 2) == "[:" ? "a POSIX bracket [:name:]" : "a nested character class",
                    "Oniguruma's meaning differs from PCRE2's");
      } else if (c == '&' && i + 1 < re.size() && re[i + 1] == '&') {
        unsupported("class intersection &&", "PCRE2 has none");
      }
      out += c;
      ++i;
      continue;
    }
    switch (c) {
      case '[':
        in_class = true;
        out += c;
        ++i;
        if (i < re.size() && re[i] == '^') out += re[i++];
        if (i < re.size() && re[i] == ']') unsupported("a class starting with ']'", "read differently by the two engines");
        break;
      case '.':
        out += "[^\\n]";
        ++i;
        break;
      case '^': case '$':
        unsupported(fmt::format("the anchor {}", c), "Oniguruma's line anchors are not translated");
        break;
      case '(':
        out += c;
        ++i;
        if (i + 1 < re.size() && re[i] == '?' && (std::isalpha(uint8_t(re[i + 1])) || re[i + 1] == '-')) {
          size_t k = i + 1;
          while (k < re.size() && (std::isalpha(uint8_t(re[k])) || re[k] == '-')) ++k;
          std::string_view flags = re.substr(i + 1, k - i - 1);
          if (flags.find_first_not_of("i-") != std::string_view::npos)
            unsupported(fmt::format("the inline option (?{}", flags), "only i means the same to both engines");
        }
        break;
      case '{':
        out += c;
        ++i;
        if (i < re.size() && re[i] == ',') out += '0';  // Oniguruma's {,n} is {0,n}
        break;
      default:
        out += c;
        ++i;
    }
  }
  return out;
}

#ifdef DEEPLORA_HAVE_ICU
std::string nfc(std::string_view s) {
  if (std::all_of(s.begin(), s.end(), [](char c) { return uint8_t(c) < 0x80; })) return std::string(s);  // ASCII is NFC
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* n = icu::Normalizer2::getNFCInstance(status);
  std::string out;
  if (U_SUCCESS(status)) {
    icu::StringByteSink<std::string> sink(&out, int32_t(s.size()));
    n->normalizeUTF8(0, icu::StringPiece(s.data(), int32_t(s.size())), sink, nullptr, status);
  }
  if (U_FAILURE(status)) throw std::runtime_error(fmt::format("tokenizer: ICU's NFC normalization failed: {}", u_errorName(status)));
  return out;
}
#endif

// An added token (HF's AddedToken with single_word, lstrip and rstrip false).
struct AddedToken {
  std::string content;  // what it matches (NFC-normalized first when it is matched on normalized text)
  int32_t id;
  bool special;
};

// Finds added tokens as HF's AddedVocabulary does (aho-corasick, leftmost-longest): the leftmost
// position where one starts, the longest of those starting there.
class AddedMatcher {
 public:
  void build(std::vector<AddedToken> tokens) {
    std::sort(tokens.begin(), tokens.end(), [](const AddedToken& a, const AddedToken& b) {
      return a.content[0] != b.content[0] ? uint8_t(a.content[0]) < uint8_t(b.content[0]) : a.content.size() > b.content.size();
    });
    tokens_ = std::move(tokens);
    for (int c = 0, t = 0; c <= 256; ++c) {
      while (size_t(t) < tokens_.size() && uint8_t(tokens_[size_t(t)].content[0]) < c) ++t;
      first_[size_t(c)] = uint32_t(t);
    }
    any_ordinary_ = std::any_of(tokens_.begin(), tokens_.end(), [](const AddedToken& t) { return !t.special; });
  }
  bool empty() const { return tokens_.empty(); }
  bool any_ordinary() const { return any_ordinary_; }  // any not special (matched even without allow_special)

  // The first occurrence starting at or after `from`, nullptr when none; `at` receives its offset.
  const AddedToken* find(std::string_view s, size_t from, size_t& at) const {
    for (size_t i = from; i < s.size(); ++i) {
      const uint8_t c = uint8_t(s[i]);
      for (uint32_t t = first_[c]; t < first_[c + 1u]; ++t) {
        if (s.compare(i, tokens_[t].content.size(), tokens_[t].content) == 0) {
          at = i;
          return &tokens_[t];
        }
      }
    }
    return nullptr;
  }

 private:
  std::vector<AddedToken> tokens_;  // by first byte, the longest first
  std::array<uint32_t, 257> first_{};  // tokens_[first_[c], first_[c + 1]) start with byte c
  bool any_ordinary_ = false;
};

// One pre-tokenizer stage: HF's Split with behavior Isolated (each match and each stretch of text
// between matches is a piece) applied to every piece of the stage before. `prefix_space` is
// ByteLevel's add_prefix_space: a space goes before each piece that does not start with one.
struct Stage {
  std::optional<Regex> re;  // none: the piece passes whole
  bool prefix_space = false;
};

// Reads a tokenizer.json; every error names the file and the field ("model.merges[3]").
struct JsonFile {
  std::string path;

  [[noreturn]] void fail(std::string_view field, std::string_view msg) const {
    throw std::runtime_error(fmt::format("{}: {}: {}", path, field, msg));
  }
  static std::string field(std::string_view parent, std::string_view key) {
    return parent.empty() ? std::string(key) : fmt::format("{}.{}", parent, key);
  }
  static std::string item(std::string_view parent, size_t i) { return fmt::format("{}[{}]", parent, i); }
  // obj[key], nullptr when absent or null.
  static const json* get(const json& obj, const char* key) {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  const json& object(const json& obj, std::string_view parent, const char* key) const {
    const json* v = get(obj, key);
    if (!v) fail(field(parent, key), "missing");
    if (!v->is_object()) fail(field(parent, key), fmt::format("expected an object, got {}", v->type_name()));
    return *v;
  }
  const json& array(const json& obj, std::string_view parent, const char* key) const {
    const json* v = get(obj, key);
    if (!v) fail(field(parent, key), "missing");
    if (!v->is_array()) fail(field(parent, key), fmt::format("expected an array, got {}", v->type_name()));
    return *v;
  }
  std::string string(const json& obj, std::string_view parent, const char* key) const {
    const json* v = get(obj, key);
    if (!v) fail(field(parent, key), "missing");
    if (!v->is_string()) fail(field(parent, key), fmt::format("expected a string, got {}", v->dump()));
    return v->get<std::string>();
  }
  // A bool field; `dflt` when absent (missing is an error without one).
  bool flag(const json& obj, std::string_view parent, const char* key, std::optional<bool> dflt) const {
    const json* v = get(obj, key);
    if (!v) {
      if (!dflt) fail(field(parent, key), "missing");
      return *dflt;
    }
    if (!v->is_boolean()) fail(field(parent, key), fmt::format("expected true or false, got {}", v->dump()));
    return v->get<bool>();
  }
  // A field that must be absent, null or `allowed` (what HF's defaults mean).
  void only(const json& obj, std::string_view parent, const char* key, const json& allowed, std::string_view why) const {
    const json* v = get(obj, key);
    if (v && *v != allowed) fail(field(parent, key), fmt::format("{} is not supported ({})", v->dump(), why));
  }
  std::string type(const json& obj, std::string_view parent) const { return string(obj, parent, "type"); }
};

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> id_to_token;  // vocab spelling (byte-to-unicode); an added token's content
  std::vector<std::string> id_to_bytes;  // what the token stands for
  std::vector<bool> in_model;            // the model's vocab has the id (what ignore_merges looks up)
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> token_to_id;
  std::array<int32_t, 256> byte_id{};
  std::array<std::string, 256> byte_spelling;  // each byte's vocab spelling, UTF-8
  struct Merge {
    int32_t rank, merged;
  };
  std::unordered_map<uint64_t, Merge> merges;
  size_t n_merges = 0;
  bool ignore_merges = false;
  // Added tokens matched on the text as given, and on its normalized pieces.
  AddedMatcher added_raw, added_normalized;
  bool nfc = false;
  std::vector<Stage> stages;
  int32_t eot = -1;
  std::optional<int32_t> bos;

  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache;

  // Loading. `where` starts the error messages ("vocab.json path", "path: model.vocab").
  void load_vocab(const json& j, const std::string& where);
  bool add_merge(std::string_view a, std::string_view b);  // false: a, b or a+b is not in the vocab
  void add_tokens(const std::vector<AddedToken>& tokens);  // ids checked free, or the vocab's own token
  void set_eot(std::initializer_list<std::string_view> names);
  // tokenizer.json's model (BPE), and its added_tokens (after the normalizer is known).
  void load_bpe(const JsonFile& f, const json& model);
  void load_added_tokens(const JsonFile& f, const json& list);

  std::string normalize(std::string_view s) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  // The pieces of text from pre-tokenizer stage k on, each handed to emit.
  template <class Emit>
  void split(size_t k, std::string_view text, pcre2_match_data* md, Emit& emit) const;
  // Text between occurrences of `matcher`'s tokens to `segment`, the tokens' ids to out.
  template <class Segment>
  void extract(const AddedMatcher& matcher, std::string_view text, bool allow_special, std::vector<int32_t>& out,
               Segment&& segment) const;
  void encode(std::string_view text, bool allow_special, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::load_vocab(const json& j, const std::string& where) {
  if (!j.is_object()) throw std::runtime_error(fmt::format("{}: vocab is not a JSON object of token -> id", where));
  const auto b2u = bytes_to_unicode();
  std::unordered_map<uint32_t, uint8_t> u2b;
  for (int b = 0; b < 256; ++b) u2b[b2u[b]] = uint8_t(b);
  int64_t max_id = -1;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!it.value().is_number_unsigned() || it.value().get<uint64_t>() > uint64_t(INT32_MAX))
      throw std::runtime_error(fmt::format("{}: token '{}' has id {}, not a non-negative int32", where, it.key(), it.value().dump()));
    max_id = std::max<int64_t>(max_id, it.value().get<int64_t>());
  }
  if (max_id < 0) throw std::runtime_error(fmt::format("{}: empty vocab", where));
  if (max_id >= int64_t(4) * int64_t(j.size()) + 1024)
    throw std::runtime_error(fmt::format("{}: id {} is far beyond the {} tokens (corrupt vocab?)", where, max_id, j.size()));
  id_to_token.resize(size_t(max_id + 1));
  id_to_bytes.resize(size_t(max_id + 1));
  in_model.resize(size_t(max_id + 1));
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& tok = it.key();
    int32_t id = it.value().get<int32_t>();
    if (in_model[size_t(id)])
      throw std::runtime_error(fmt::format("{}: id {} is given to both '{}' and '{}'", where, id, id_to_token[size_t(id)], tok));
    in_model[size_t(id)] = true;
    id_to_token[size_t(id)] = tok;
    token_to_id.emplace(tok, id);
    // Characters outside the byte alphabet (added tokens of some models) stand for themselves.
    std::string bytes;
    const auto* p = reinterpret_cast<const unsigned char*>(tok.data());
    for (size_t i = 0; i < tok.size();) {
      bool ok;
      uint32_t cp = 0;
      size_t k = utf8_step(p + i, tok.size() - i, ok, &cp);
      auto u = ok ? u2b.find(cp) : u2b.end();
      if (u != u2b.end()) bytes += char(u->second);
      else bytes.append(tok, i, k);
      i += k;
    }
    id_to_bytes[size_t(id)] = std::move(bytes);
  }
  for (int b = 0; b < 256; ++b) {
    std::string& s = byte_spelling[size_t(b)];
    append_utf8(s, b2u[b]);
    auto it = token_to_id.find(s);
    if (it == token_to_id.end())
      throw std::runtime_error(fmt::format("{}: byte 0x{:02x} has no token '{}' (not a byte-level BPE vocab)", where, b, s));
    byte_id[size_t(b)] = it->second;
  }
}

bool Tokenizer::Impl::add_merge(std::string_view a, std::string_view b) {
  auto ia = token_to_id.find(a), ib = token_to_id.find(b);
  std::string ab = std::string(a) + std::string(b);
  auto iab = token_to_id.find(ab);
  if (ia == token_to_id.end() || ib == token_to_id.end() || iab == token_to_id.end()) return false;
  // A repeated pair takes its later rank, as HF's merge map does.
  merges[pair_key(ia->second, ib->second)] = {int32_t(n_merges++), iab->second};
  return true;
}

void Tokenizer::Impl::add_tokens(const std::vector<AddedToken>& tokens) {
  for (const AddedToken& t : tokens) {
    if (size_t(t.id) >= id_to_token.size()) {
      id_to_token.resize(size_t(t.id) + 1);
      id_to_bytes.resize(size_t(t.id) + 1);
      in_model.resize(size_t(t.id) + 1);
    }
    if (in_model[size_t(t.id)]) continue;  // also a vocab token (same spelling, checked): decodes as one
    id_to_token[size_t(t.id)] = t.content;
    id_to_bytes[size_t(t.id)] = t.content;  // decodes to its text, as it was taken from the text
    token_to_id.emplace(t.content, t.id);
  }
}

void Tokenizer::Impl::set_eot(std::initializer_list<std::string_view> names) {
  for (std::string_view name : names) {
    if (auto it = token_to_id.find(name); it != token_to_id.end()) {
      eot = it->second;
      return;
    }
  }
}

std::string Tokenizer::Impl::normalize(std::string_view s) const {
#ifdef DEEPLORA_HAVE_ICU
  if (nfc) return deeplora::nfc(s);
#endif
  return std::string(s);  // a file asking for NFC is refused without ICU (from_tokenizer_json)
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  const size_t n = word.size();
  if (n == 1) {
    out.push_back(byte_id[uint8_t(word[0])]);
    return;
  }
  const bool cacheable = n <= kCacheMaxWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache.find(word);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t start = out.size();
  std::optional<int32_t> whole;
  if (ignore_merges) {  // HF's BPE with ignore_merges: a word that is a token is that token
    std::string spelling;
    for (char c : word) spelling += byte_spelling[uint8_t(c)];
    auto it = token_to_id.find(spelling);
    if (it != token_to_id.end() && in_model[size_t(it->second)]) whole = it->second;
  }
  if (whole) {
    out.push_back(*whole);
  } else {
    // Symbols form a linked list over the word's bytes; a merge keeps the left symbol's slot.
    std::vector<int32_t> id(n), prev(n), next(n);
    for (size_t i = 0; i < n; ++i) {
      id[i] = byte_id[uint8_t(word[i])];
      prev[i] = int32_t(i) - 1;
      next[i] = i + 1 < n ? int32_t(i + 1) : -1;
    }
    struct Cand {
      int32_t rank, pos, left, right, merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto consider = [&](int32_t l) {
      int32_t r = next[l];
      if (l < 0 || r < 0) return;
      auto it = merges.find(pair_key(id[l], id[r]));
      if (it != merges.end()) heap.push({it->second.rank, l, id[l], id[r], it->second.merged});
    };
    for (size_t i = 0; i + 1 < n; ++i) consider(int32_t(i));
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      int32_t l = c.pos, r = next[l];
      // Stale candidates: the left symbol was absorbed (id changed) or its neighbour changed.
      if (id[l] != c.left || r < 0 || id[r] != c.right) continue;
      id[l] = c.merged;
      id[r] = -1;
      next[l] = next[r];
      if (next[r] >= 0) prev[next[r]] = l;
      if (prev[l] >= 0) consider(prev[l]);
      consider(l);
    }
    for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(id[i]);
  }
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    if (cache.size() < kCacheMaxEntries) cache.emplace(std::string(word), std::vector<int32_t>(out.begin() + long(start), out.end()));
  }
}

template <class Emit>
void Tokenizer::Impl::split(size_t k, std::string_view text, pcre2_match_data* md, Emit& emit) const {
  if (k == stages.size()) {
    emit(text);
    return;
  }
  const Stage& st = stages[k];
  std::string prefixed;
  if (st.prefix_space && text[0] != ' ') {
    prefixed.assign(1, ' ').append(text);
    text = prefixed;
  }
  if (!st.re) {
    split(k + 1, text, md, emit);
    return;
  }
  // Matches and the stretches between them are pieces (HF drops empty ones). As Oniguruma's
  // find_iter, an empty match right where the last match ended is skipped; any other only marks
  // a boundary.
  size_t prev = 0, from = 0, last_end = std::string_view::npos, b, e;
  while (from <= text.size() && st.re->find(text, from, md, b, e)) {
    if (b > prev) split(k + 1, text.substr(prev, b - prev), md, emit);
    if (e > b) {
      split(k + 1, text.substr(b, e - b), md, emit);
      from = e;
    } else {
      from = e + char_len(text, e);
    }
    if (e > b || e != last_end) prev = last_end = e;
  }
  if (prev < text.size()) split(k + 1, text.substr(prev), md, emit);
}

template <class Segment>
void Tokenizer::Impl::extract(const AddedMatcher& matcher, std::string_view text, bool allow_special,
                              std::vector<int32_t>& out, Segment&& segment) const {
  if (text.empty()) return;
  if (matcher.empty() || (!allow_special && !matcher.any_ordinary())) {
    segment(text);
    return;
  }
  size_t prev = 0, from = 0, at = 0;
  while (const AddedToken* t = matcher.find(text, from, at)) {
    from = at + t->content.size();
    // Without allow_special a special token is text; as in HF (encode_special_tokens), the added
    // tokens overlapping it are not looked for either.
    if (t->special && !allow_special) continue;
    if (at > prev) segment(text.substr(prev, at - prev));
    out.push_back(t->id);
    prev = from;
  }
  if (prev < text.size()) segment(text.substr(prev));
}

void Tokenizer::Impl::encode(std::string_view text, bool allow_special, std::vector<int32_t>& out) const {
  size_t bad = find_invalid_utf8(text);
  if (bad != std::string_view::npos)
    throw std::runtime_error(fmt::format("tokenizer: text is not valid UTF-8 at byte {} (sanitize_utf8 replaces such bytes)", bad));
  MatchData md;
  auto word = [&](std::string_view w) { bpe(w, out); };
  auto pre_tokenize = [&](std::string_view s) { split(0, s, md.md, word); };
  // HF's AddedVocabulary::extract_and_normalize: tokens with normalized = false come out of the
  // text as given, the others out of each normalized stretch between them.
  extract(added_raw, text, allow_special, out, [&](std::string_view s) {
    if (nfc) {
      const std::string normalized = normalize(s);
      extract(added_normalized, normalized, allow_special, out, pre_tokenize);
    } else {
      extract(added_normalized, s, allow_special, out, pre_tokenize);
    }
  });
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Tokenizer::Tokenizer(const std::string& vocab_path, const std::string& merges_path,
                     const std::vector<std::string>& special_tokens)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  {
    auto j = json::parse(read_text_file(vocab_path, "vocab.json"), nullptr, false);
    if (j.is_discarded()) throw std::runtime_error(fmt::format("{}: vocab is not valid JSON", vocab_path));
    m.load_vocab(j, vocab_path);
  }
  {
    std::string text = read_text_file(merges_path, "merges.txt");
    size_t pos = 0, line_no = 0;
    while (pos < text.size()) {
      size_t nl = text.find('\n', pos);
      std::string_view line(text.data() + pos, (nl == std::string::npos ? text.size() : nl) - pos);
      pos = nl == std::string::npos ? text.size() : nl + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty() || line.starts_with("#version")) continue;
      std::string_view a, b;
      if (!split_merge_line(line, a, b))
        throw std::runtime_error(fmt::format("{}:{}: expected two tokens separated by one space, got '{}'", merges_path, line_no, line));
      if (!m.add_merge(a, b))
        throw std::runtime_error(fmt::format("{}:{}: merge '{}' uses or makes a token missing from {}", merges_path, line_no,
                                             line, vocab_path));
    }
  }
  std::vector<AddedToken> specials;
  for (const auto& s : special_tokens) {
    auto it = m.token_to_id.find(s);
    if (!s.empty() && it != m.token_to_id.end()) specials.push_back({s, it->second, true});
  }
  m.added_raw.build(std::move(specials));
  m.set_eot({"<|endoftext|>"});
  m.stages.push_back({Regex(kPattern, PCRE2_UTF | PCRE2_UCP, "tokenizer: GPT-2's pattern"), false});
}

namespace {

// tokenizer.json's pre_tokenizer into stages (a Sequence flattened); ByteLevel must come last.
void parse_pre_tokenizer(const JsonFile& f, const json& pt, const std::string& at, std::vector<Stage>& stages,
                         bool& byte_level) {
  if (!pt.is_object()) f.fail(at, fmt::format("expected an object, got {}", pt.type_name()));
  const std::string type = f.type(pt, at);
  if (byte_level) f.fail(JsonFile::field(at, "type"), fmt::format("{} after ByteLevel: ByteLevel must come last", type));
  const uint32_t options = PCRE2_UTF | PCRE2_UCP;
  if (type == "Sequence") {
    const json& list = f.array(pt, at, "pretokenizers");
    const std::string list_at = JsonFile::field(at, "pretokenizers");
    for (size_t i = 0; i < list.size(); ++i) parse_pre_tokenizer(f, list[i], JsonFile::item(list_at, i), stages, byte_level);
  } else if (type == "ByteLevel") {
    Stage st;
    st.prefix_space = f.flag(pt, at, "add_prefix_space", std::nullopt);
    if (f.flag(pt, at, "use_regex", true))
      st.re.emplace(kPattern, options, fmt::format("{}: {}: GPT-2's pattern", f.path, at));
    if (st.prefix_space || st.re) stages.push_back(std::move(st));
    byte_level = true;
  } else if (type == "Split") {
    const std::string behavior = f.string(pt, at, "behavior");
    if (behavior != "Isolated")
      f.fail(JsonFile::field(at, "behavior"), fmt::format("'{}' is not supported (only Isolated)", behavior));
    if (f.flag(pt, at, "invert", std::nullopt)) f.fail(JsonFile::field(at, "invert"), "true is not supported");
    const json& pattern = f.object(pt, at, "pattern");
    const std::string pattern_at = JsonFile::field(at, "pattern");
    Stage st;
    if (JsonFile::get(pattern, "Regex")) {
      const std::string field = JsonFile::field(pattern_at, "Regex");
      const std::string re = f.string(pattern, pattern_at, "Regex");
      std::string translated;
      try {
        translated = onig_to_pcre2(re);
      } catch (const std::invalid_argument& e) {
        f.fail(field, fmt::format("in '{}': {}", re, e.what()));
      }
      st.re.emplace(translated, options, fmt::format("{}: {} '{}'", f.path, field, re));
    } else if (JsonFile::get(pattern, "String")) {
      const std::string literal = f.string(pattern, pattern_at, "String");
      st.re.emplace(literal, PCRE2_UTF | PCRE2_LITERAL, fmt::format("{}: {}", f.path, JsonFile::field(pattern_at, "String")));
    } else {
      f.fail(pattern_at, "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    stages.push_back(std::move(st));
  } else if (type == "Digits") {
    // Rust's char::is_numeric is \p{N}; Contiguous (individual_digits false) joins neighbours.
    const bool individual = f.flag(pt, at, "individual_digits", std::nullopt);
    stages.push_back({Regex(individual ? "\\p{N}" : "\\p{N}+", options, fmt::format("{}: {}", f.path, at)), false});
  } else {
    f.fail(JsonFile::field(at, "type"),
           fmt::format("pre-tokenizer '{}' is not supported (ByteLevel, or a Sequence of Split, Digits and ByteLevel)", type));
  }
}

// null, NFC, or a Sequence of those: whether NFC is asked for.
bool parse_normalizer(const JsonFile& f, const json& n, const std::string& at) {
  if (n.is_null()) return false;
  if (!n.is_object()) f.fail(at, fmt::format("expected an object or null, got {}", n.type_name()));
  const std::string type = f.type(n, at);
  if (type == "NFC") return true;
  if (type == "Sequence") {
    const json& list = f.array(n, at, "normalizers");
    bool any = false;
    for (size_t i = 0; i < list.size(); ++i)
      any = parse_normalizer(f, list[i], JsonFile::item(JsonFile::field(at, "normalizers"), i)) || any;
    return any;
  }
  f.fail(JsonFile::field(at, "type"), fmt::format("normalizer '{}' is not supported (only NFC)", type));
}

// null, ByteLevel, TemplateProcessing or a Sequence of those; a template's leading special token to bos.
void parse_post_processor(const JsonFile& f, const json& p, const std::string& at, std::optional<int32_t>& bos) {
  if (p.is_null()) return;
  if (!p.is_object()) f.fail(at, fmt::format("expected an object or null, got {}", p.type_name()));
  const std::string type = f.type(p, at);
  if (type == "ByteLevel") return;  // trims offsets, adds nothing
  if (type == "Sequence") {
    const json& list = f.array(p, at, "processors");
    for (size_t i = 0; i < list.size(); ++i)
      parse_post_processor(f, list[i], JsonFile::item(JsonFile::field(at, "processors"), i), bos);
    return;
  }
  if (type != "TemplateProcessing")
    f.fail(JsonFile::field(at, "type"),
           fmt::format("post-processor '{}' is not supported (ByteLevel, TemplateProcessing or a Sequence of them)", type));
  const json& single = f.array(p, at, "single");
  const std::string single_at = JsonFile::field(at, "single");
  if (single.empty() || !single[0].is_object()) return;
  const json* lead = JsonFile::get(single[0], "SpecialToken");
  if (!lead) return;  // starts with the text ({"Sequence": ...}): no BOS
  const std::string name = f.string(*lead, JsonFile::field(JsonFile::item(single_at, 0), "SpecialToken"), "id");
  const json& specials = f.object(p, at, "special_tokens");
  const std::string specials_at = JsonFile::field(at, "special_tokens");
  const json& entry = f.object(specials, specials_at, name.c_str());
  const json& ids = f.array(entry, JsonFile::field(specials_at, name), "ids");
  if (ids.size() != 1 || !ids[0].is_number_unsigned() || ids[0].get<uint64_t>() > uint64_t(INT32_MAX))
    f.fail(JsonFile::field(JsonFile::field(specials_at, name), "ids"), fmt::format("expected one token id, got {}", ids.dump()));
  bos = ids[0].get<int32_t>();
}

}  // namespace

void Tokenizer::Impl::load_bpe(const JsonFile& f, const json& model) {
  if (const json* type = JsonFile::get(model, "type")) {
    if (*type != "BPE") f.fail("model.type", fmt::format("{} is not supported (only BPE)", type->dump()));
  } else if (!JsonFile::get(model, "merges")) {
    f.fail("model.type", "missing");  // HF reads a typeless model with merges as BPE
  }
  const json* dropout = JsonFile::get(model, "dropout");
  if (dropout && *dropout != 0.0) f.fail("model.dropout", fmt::format("{} is not supported (BPE dropout is random)", dropout->dump()));
  f.only(model, "model", "unk_token", nullptr, "a byte-level vocab has no unknown token");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    f.only(model, "model", key, "", "byte-level BPE marks no word boundaries");
  if (f.flag(model, "model", "byte_fallback", false)) f.fail("model.byte_fallback", "true is not supported (a byte-level vocab needs none)");
  ignore_merges = f.flag(model, "model", "ignore_merges", false);
  load_vocab(f.object(model, "model", "vocab"), fmt::format("{}: model.vocab", f.path));
  const json& list = f.array(model, "model", "merges");
  for (size_t i = 0; i < list.size(); ++i) {
    const json& e = list[i];
    std::string_view a, b;
    if (e.is_string()) {
      if (!split_merge_line(e.get_ref<const std::string&>(), a, b))
        f.fail(JsonFile::item("model.merges", i), fmt::format("expected two tokens separated by one space, got {}", e.dump()));
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get_ref<const std::string&>();
      b = e[1].get_ref<const std::string&>();
    } else {
      f.fail(JsonFile::item("model.merges", i), fmt::format("expected \"a b\" or [\"a\", \"b\"], got {}", e.dump()));
    }
    if (!add_merge(a, b))
      f.fail(JsonFile::item("model.merges", i), fmt::format("merge {} uses or makes a token missing from model.vocab", e.dump()));
  }
}

void Tokenizer::Impl::load_added_tokens(const JsonFile& f, const json& list) {
  std::vector<AddedToken> as_given, raw, normalized;  // the last two as matched: on the text, or normalized
  std::unordered_map<int32_t, std::string> by_id;
  std::unordered_map<std::string, int32_t> by_content;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string at = JsonFile::item("added_tokens", i);
    const json& t = list[i];
    if (!t.is_object()) f.fail(at, fmt::format("expected an object, got {}", t.type_name()));
    const json* id_json = JsonFile::get(t, "id");
    if (!id_json || !id_json->is_number_unsigned() || id_json->get<uint64_t>() > uint64_t(INT32_MAX))
      f.fail(JsonFile::field(at, "id"), fmt::format("expected a non-negative int32, got {}", id_json ? id_json->dump() : "nothing"));
    const int32_t id = id_json->get<int32_t>();
    const std::string content = f.string(t, at, "content");
    if (content.empty()) f.fail(JsonFile::field(at, "content"), "empty");
    const bool special = f.flag(t, at, "special", false);
    for (const char* key : {"single_word", "lstrip", "rstrip"})
      if (f.flag(t, at, key, false)) f.fail(JsonFile::field(at, key), "true is not supported");
    // HF's AddedToken default: special tokens are not normalized, others are.
    const bool norm = f.flag(t, at, "normalized", !special);
    if (auto it = by_content.find(content); it != by_content.end())
      f.fail(JsonFile::field(at, "content"), fmt::format("'{}' is added twice (ids {} and {})", content, it->second, id));
    if (auto it = by_id.find(id); it != by_id.end())
      f.fail(JsonFile::field(at, "id"), fmt::format("id {} is given to both '{}' and '{}'", id, it->second, content));
    if (auto it = token_to_id.find(content); it != token_to_id.end() && it->second != id)
      f.fail(JsonFile::field(at, "id"), fmt::format("'{}' is id {} in model.vocab, not {}", content, it->second, id));
    if (size_t(id) < in_model.size() && in_model[size_t(id)] && id_to_token[size_t(id)] != content)
      f.fail(JsonFile::field(at, "id"), fmt::format("id {} is model.vocab's '{}', not '{}'", id, id_to_token[size_t(id)], content));
    by_id.emplace(id, content);
    by_content.emplace(content, id);
    as_given.push_back({content, id, special});
    // The content HF matches on normalized text is itself normalized.
    (norm ? normalized : raw).push_back({norm ? normalize(content) : content, id, special});
  }
  if (!by_id.empty()) {
    const int32_t max_id = std::max_element(by_id.begin(), by_id.end())->first;
    const size_t n = token_to_id.size() + by_id.size();
    if (int64_t(max_id) >= 4 * int64_t(n) + 1024)
      f.fail("added_tokens", fmt::format("id {} is far beyond the {} tokens (corrupt file?)", max_id, n));
  }
  add_tokens(as_given);
  added_raw.build(std::move(raw));
  added_normalized.build(std::move(normalized));
}

Tokenizer Tokenizer::from_tokenizer_json(const std::string& path) {
  const JsonFile f{path};
  json root;
  try {
    root = json::parse(read_text_file(path, "tokenizer.json"));
  } catch (const json::parse_error& e) {
    throw std::runtime_error(fmt::format("{}: not valid JSON: {}", path, e.what()));
  }
  if (!root.is_object()) throw std::runtime_error(fmt::format("{}: expected a JSON object, got {}", path, root.type_name()));
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.load_bpe(f, f.object(root, "", "model"));

  const json* normalizer = JsonFile::get(root, "normalizer");
  m.nfc = normalizer && parse_normalizer(f, *normalizer, "normalizer");
#ifndef DEEPLORA_HAVE_ICU
  if (m.nfc) f.fail("normalizer", "NFC normalization needs ICU, and this build has none (install libicu-dev and reconfigure)");
#endif
  if (JsonFile::get(root, "added_tokens")) m.load_added_tokens(f, f.array(root, "", "added_tokens"));

  bool byte_level = false;
  if (const json* pre = JsonFile::get(root, "pre_tokenizer")) parse_pre_tokenizer(f, *pre, "pre_tokenizer", m.stages, byte_level);
  if (!byte_level) f.fail("pre_tokenizer", "no ByteLevel pre-tokenizer: not a byte-level BPE tokenizer");

  const json* decoder = JsonFile::get(root, "decoder");
  if (!decoder) f.fail("decoder", "missing (only ByteLevel is supported)");
  if (!decoder->is_object()) f.fail("decoder", fmt::format("expected an object, got {}", decoder->type_name()));
  if (const std::string type = f.type(*decoder, "decoder"); type != "ByteLevel")
    f.fail("decoder.type", fmt::format("decoder '{}' is not supported (only ByteLevel)", type));

  if (const json* post = JsonFile::get(root, "post_processor")) parse_post_processor(f, *post, "post_processor", m.bos);
  if (m.bos && (size_t(*m.bos) >= m.id_to_token.size() || m.id_to_token[size_t(*m.bos)].empty()))
    f.fail("post_processor", fmt::format("the template's first token, id {}, is not in the vocab", *m.bos));
  // truncation and padding are per-call settings (transformers sets them on every call): not read.
  m.set_eot({"<|endoftext|>", "<|end_of_text|>"});
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_dir(const std::string& dir) {
  const std::string json_path = dir + "/tokenizer.json";
  if (std::filesystem::exists(json_path)) return from_tokenizer_json(json_path);
  return Tokenizer(dir + "/vocab.json", dir + "/merges.txt");
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  encode_append(text, out, allow_special);
  return out;
}

void Tokenizer::encode_append(std::string_view text, std::vector<int32_t>& out, bool allow_special) const {
  impl_->encode(text, allow_special, out);
}

std::vector<std::string> Tokenizer::pre_tokenize(std::string_view text) const {
  size_t bad = find_invalid_utf8(text);
  if (bad != std::string_view::npos) throw std::runtime_error(fmt::format("tokenizer: text is not valid UTF-8 at byte {}", bad));
  std::vector<std::string> pieces;
  if (text.empty()) return pieces;
  MatchData md;
  auto emit = [&](std::string_view piece) { pieces.emplace_back(piece); };
  const std::string normalized = impl_->normalize(text);
  impl_->split(0, normalized, md.md, emit);
  return pieces;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->id_to_bytes.size())
    throw std::out_of_range(fmt::format("tokenizer: id {} is outside the vocab [0, {})", id, impl_->id_to_bytes.size()));
  return impl_->id_to_bytes[size_t(id)];
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string s;
  for (int32_t id : ids) s += token_bytes(id);
  return s;
}

int32_t Tokenizer::vocab_size() const { return int32_t(impl_->id_to_token.size()); }
size_t Tokenizer::n_merges() const { return impl_->n_merges; }
int32_t Tokenizer::eot_id() const { return impl_->eot; }

TextEncoder Tokenizer::text_encoder() const {
  return TextEncoder{[this](std::string_view text, std::vector<int32_t>& out) { encode_append(sanitize_utf8(text), out); },
                     eot_id()};
}
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view vocab_token) const {
  auto it = impl_->token_to_id.find(vocab_token);
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, n = s.size();
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    bool ok;
    size_t k = utf8_step(p + i, n - i, ok);
    if (!ok) return i;
    i += k;
  }
  return std::string_view::npos;
}

std::string sanitize_utf8(std::string_view s, size_t* n_replaced) {
  size_t bad = find_invalid_utf8(s);
  if (n_replaced) *n_replaced = 0;
  if (bad == std::string_view::npos) return std::string(s);
  std::string out(s.substr(0, bad));
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = bad; i < s.size();) {
    bool ok;
    size_t k = utf8_step(p + i, s.size() - i, ok);
    if (ok) {
      out.append(s.substr(i, k));
    } else {
      out += "\xEF\xBF\xBD";
      if (n_replaced) ++*n_replaced;
    }
    i += k;
  }
  return out;
}

}  // namespace deeplora
