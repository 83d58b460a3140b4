// GPT-2 byte-level BPE tokenizer from an HF vocab.json + merges.txt; gives the same ids as
// transformers' GPT2TokenizerFast (GPT-2's pre-tokenizer regex, byte-to-unicode map, ranked merges).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace deeplora {

class Tokenizer {
 public:
  // vocab.json: {"token": id, ...} with tokens in GPT-2's byte-to-unicode form; merges.txt: one
  // "left right" pair per line by rank, an optional first line "#version...". Every one of the 256
  // byte tokens must be in the vocab. Tokens of `special_tokens` present in the vocab are recognized
  // in text by encode(..., allow_special = true). Throws std::runtime_error naming the file (and line).
  Tokenizer(const std::string& vocab_path, const std::string& merges_path,
            const std::vector<std::string>& special_tokens = {"<|endoftext|>"});
  // dir/vocab.json + dir/merges.txt.
  static Tokenizer from_dir(const std::string& dir);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Text must be valid UTF-8 (else std::runtime_error with the byte offset; see sanitize_utf8).
  // Without allow_special a special token's text is encoded as ordinary text (tiktoken's
  // encode_ordinary); with it, it becomes its id (what GPT2TokenizerFast does). Thread-safe.
  std::vector<int32_t> encode(std::string_view text, bool allow_special = false) const;
  void encode_append(std::string_view text, std::vector<int32_t>& out, bool allow_special = false) const;

  // The bytes the ids stand for (may end inside a UTF-8 character when a sequence is cut; HF's
  // decode would show U+FFFD there). Throws std::out_of_range for an id outside the vocab.
  std::string decode(std::span<const int32_t> ids) const;
  std::string decode(const std::vector<int32_t>& ids) const { return decode(std::span<const int32_t>(ids)); }
  const std::string& token_bytes(int32_t id) const;

  int32_t vocab_size() const;  // largest id + 1
  size_t n_merges() const;
  int32_t eot_id() const;  // id of "<|endoftext|>"; -1 when the vocab lacks it
  // Id of a token given in vocab.json's (byte-to-unicode) spelling, e.g. "\u0120world".
  std::optional<int32_t> token_to_id(std::string_view vocab_token) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Valid UTF-8 is returned unchanged; each maximal invalid subsequence becomes U+FFFD (as Python's
// bytes.decode("utf-8", "replace")). `n_replaced`, if given, receives the number of replacements.
std::string sanitize_utf8(std::string_view s, size_t* n_replaced = nullptr);
// Byte offset of the first invalid UTF-8 sequence, or npos when the text is valid.
size_t find_invalid_utf8(std::string_view s);

}  // namespace deeplora
