// GPT-2 byte-level BPE: PCRE2 pre-tokenizer, byte-to-unicode vocab spelling, merges applied by rank
// with a heap (same order as HF tokenizers' word.rs), and a per-word cache.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "models/tokenizer.h"

#include <fmt/format.h>
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

namespace deeplora {

namespace {

// GPT-2's pattern with \s spelled out as Unicode White_Space, which is what HF's Oniguruma means by
// \s. PCRE2's UCP \s also takes U+180E (via \h), so the class is written out to keep ids identical.
#define WS "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
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

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> id_to_token;  // vocab spelling (byte-to-unicode)
  std::vector<std::string> id_to_bytes;  // what the token stands for
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> token_to_id;
  std::array<int32_t, 256> byte_id{};
  struct Merge {
    int32_t rank, merged;
  };
  std::unordered_map<uint64_t, Merge> merges;
  size_t n_merges = 0;
  std::vector<std::pair<std::string, int32_t>> specials;  // text, id
  int32_t eot = -1;

  pcre2_code* re = nullptr;
  bool jit = false;

  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache;

  ~Impl() {
    if (re) pcre2_code_free(re);
  }

  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void encode_ordinary(std::string_view text, std::vector<int32_t>& out) const;
};

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
  size_t start = out.size();
  for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(id[i]);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    if (cache.size() < kCacheMaxEntries) cache.emplace(std::string(word), std::vector<int32_t>(out.begin() + long(start), out.end()));
  }
}

void Tokenizer::Impl::encode_ordinary(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  size_t bad = find_invalid_utf8(text);
  if (bad != std::string_view::npos)
    throw std::runtime_error(fmt::format("tokenizer: text is not valid UTF-8 at byte {} (sanitize_utf8 replaces such bytes)", bad));
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(re, nullptr);
  if (!md) throw std::bad_alloc();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
  size_t pos = 0;
  while (pos < text.size()) {
    int rc = jit ? pcre2_jit_match(re, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr)
                 : pcre2_match(re, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) {  // cannot happen: the alternatives cover every character
      bpe(text.substr(pos), out);
      break;
    }
    if (rc < 0) {
      pcre2_match_data_free(md);
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      throw std::runtime_error(fmt::format("tokenizer: pre-tokenizer regex failed at byte {}: {}", pos, reinterpret_cast<char*>(msg)));
    }
    size_t b = ov[0], e = ov[1];
    if (b > pos) bpe(text.substr(pos, b - pos), out);
    if (e == b) {  // empty match: cannot happen either, but never loop forever
      bool ok;
      e = b + utf8_step(reinterpret_cast<const unsigned char*>(text.data()) + b, text.size() - b, ok);
    }
    bpe(text.substr(b, e - b), out);
    pos = e;
  }
  pcre2_match_data_free(md);
}

Tokenizer::Tokenizer(const std::string& vocab_path, const std::string& merges_path,
                     const std::vector<std::string>& special_tokens)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  const auto b2u = bytes_to_unicode();
  std::unordered_map<uint32_t, uint8_t> u2b;
  for (int b = 0; b < 256; ++b) u2b[b2u[b]] = uint8_t(b);

  // vocab.json
  {
    auto j = nlohmann::json::parse(read_text_file(vocab_path, "vocab.json"), nullptr, false);
    if (j.is_discarded()) throw std::runtime_error(fmt::format("{}: vocab is not valid JSON", vocab_path));
    if (!j.is_object()) throw std::runtime_error(fmt::format("{}: vocab is not a JSON object of token -> id", vocab_path));
    int64_t max_id = -1;
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!it.value().is_number_unsigned() || it.value().get<uint64_t>() > uint64_t(INT32_MAX))
        throw std::runtime_error(fmt::format("{}: token '{}' has id {}, not a non-negative int32", vocab_path, it.key(), it.value().dump()));
      max_id = std::max<int64_t>(max_id, it.value().get<int64_t>());
    }
    if (max_id < 0) throw std::runtime_error(fmt::format("{}: empty vocab", vocab_path));
    if (max_id >= int64_t(4) * int64_t(j.size()) + 1024)
      throw std::runtime_error(fmt::format("{}: id {} is far beyond the {} tokens (corrupt vocab?)", vocab_path, max_id, j.size()));
    m.id_to_token.resize(size_t(max_id + 1));
    m.id_to_bytes.resize(size_t(max_id + 1));
    std::vector<bool> seen(size_t(max_id + 1));
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& tok = it.key();
      int32_t id = it.value().get<int32_t>();
      if (seen[size_t(id)])
        throw std::runtime_error(fmt::format("{}: id {} is given to both '{}' and '{}'", vocab_path, id, m.id_to_token[size_t(id)], tok));
      seen[size_t(id)] = true;
      m.id_to_token[size_t(id)] = tok;
      m.token_to_id.emplace(tok, id);
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
      m.id_to_bytes[size_t(id)] = std::move(bytes);
    }
    for (int b = 0; b < 256; ++b) {
      std::string s;
      append_utf8(s, b2u[b]);
      auto it = m.token_to_id.find(s);
      if (it == m.token_to_id.end())
        throw std::runtime_error(fmt::format("{}: byte 0x{:02x} has no token '{}' (not a byte-level BPE vocab)", vocab_path, b, s));
      m.byte_id[b] = it->second;
    }
  }

  // merges.txt
  {
    std::string text = read_text_file(merges_path, "merges.txt");
    size_t pos = 0, line_no = 0;
    int32_t rank = 0;
    while (pos < text.size()) {
      size_t nl = text.find('\n', pos);
      std::string_view line(text.data() + pos, (nl == std::string::npos ? text.size() : nl) - pos);
      pos = nl == std::string::npos ? text.size() : nl + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty() || line.starts_with("#version")) continue;
      size_t sp = line.find(' ');
      if (sp == std::string_view::npos || sp == 0 || sp + 1 == line.size() || line.find(' ', sp + 1) != std::string_view::npos)
        throw std::runtime_error(fmt::format("{}:{}: expected two tokens separated by one space, got '{}'", merges_path, line_no, line));
      std::string_view a = line.substr(0, sp), b = line.substr(sp + 1);
      auto ia = m.token_to_id.find(a), ib = m.token_to_id.find(b);
      std::string ab = std::string(a) + std::string(b);
      auto iab = m.token_to_id.find(ab);
      if (ia == m.token_to_id.end() || ib == m.token_to_id.end() || iab == m.token_to_id.end())
        throw std::runtime_error(fmt::format("{}:{}: merge '{}' uses or makes a token missing from {}", merges_path, line_no,
                                             line, vocab_path));
      // A repeated pair takes its later rank, as HF's merge map does.
      m.merges[pair_key(ia->second, ib->second)] = {rank++, iab->second};
    }
    m.n_merges = size_t(rank);
  }

  for (const auto& s : special_tokens) {
    auto it = m.token_to_id.find(s);
    if (it != m.token_to_id.end()) m.specials.emplace_back(s, it->second);
  }
  if (auto it = m.token_to_id.find(std::string_view("<|endoftext|>")); it != m.token_to_id.end()) m.eot = it->second;

  int err = 0;
  PCRE2_SIZE err_off = 0;
  m.re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr);
  if (!m.re) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw std::runtime_error(fmt::format("tokenizer: PCRE2 cannot compile the GPT-2 pattern at {}: {}", err_off, reinterpret_cast<char*>(msg)));
  }
  m.jit = pcre2_jit_compile(m.re, PCRE2_JIT_COMPLETE) == 0;
}

Tokenizer Tokenizer::from_dir(const std::string& dir) { return Tokenizer(dir + "/vocab.json", dir + "/merges.txt"); }

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
  if (!allow_special || impl_->specials.empty()) {
    impl_->encode_ordinary(text, out);
    return;
  }
  // Split on the leftmost (then longest) special token; the pieces between are ordinary text.
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t best = std::string_view::npos, best_len = 0;
    int32_t best_id = -1;
    for (const auto& [s, id] : impl_->specials) {
      size_t f = text.find(s, pos);
      if (f != std::string_view::npos && (f < best || (f == best && s.size() > best_len))) {
        best = f;
        best_len = s.size();
        best_id = id;
      }
    }
    if (best == std::string_view::npos) {
      impl_->encode_ordinary(text.substr(pos), out);
      return;
    }
    impl_->encode_ordinary(text.substr(pos, best - pos), out);
    out.push_back(best_id);
    pos = best + best_len;
  }
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
