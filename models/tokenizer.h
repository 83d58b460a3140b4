// Byte-level BPE tokenizer giving HF tokenizers' ids: GPT-2's vocab.json + merges.txt (the ids of
// transformers' GPT2TokenizerFast), or an HF tokenizer.json of a byte-level BPE model (GPT-2,
// SmolLM2, Qwen2/2.5, Llama 3: added tokens, NFC normalizer, Split/Digits/ByteLevel pre-tokenizers).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace deeplora {

struct TextEncoder;  // runtime/io/dataloader.h

class Tokenizer {
 public:
  // vocab.json: {"token": id, ...} with tokens in GPT-2's byte-to-unicode form; merges.txt: one
  // "left right" pair per line by rank, an optional first line "#version...". Every one of the 256
  // byte tokens must be in the vocab. Tokens of `special_tokens` present in the vocab are recognized
  // in text by encode(..., allow_special = true). Throws std::runtime_error naming the file (and line).
  Tokenizer(const std::string& vocab_path, const std::string& merges_path,
            const std::vector<std::string>& special_tokens = {"<|endoftext|>"});
  // An HF tokenizers tokenizer.json. Supported, with HF's semantics:
  //  - model: BPE with `vocab` and `merges` ("a b" strings or ["a", "b"] pairs), `ignore_merges`
  //    (a pre-tokenized word that is itself in the vocab becomes that id, merges unused); dropout,
  //    unk_token, continuing_subword_prefix and end_of_word_suffix unset, byte_fallback false.
  //    All 256 byte tokens must be in the vocab.
  //  - added_tokens (single_word, lstrip and rstrip false): taken out of the text first, leftmost
  //    then longest, the ones with normalized = true from the normalized text. Ids may lie beyond
  //    the model's vocab. Non-special ones always; special ones only with allow_special (see encode).
  //  - normalizer: null or NFC (also in a Sequence); NFC needs a build with ICU (DEEPLORA_HAVE_ICU),
  //    without it such a file is refused.
  //  - pre_tokenizer: ByteLevel (GPT-2's regex when use_regex; add_prefix_space as HF: a space
  //    before every piece that lacks one), or a Sequence of Split (a Regex in Oniguruma syntax,
  //    translated to PCRE2, or a String; behavior Isolated, invert false) and Digits stages ending
  //    with ByteLevel. Each stage splits the pieces of the one before.
  //  - decoder: ByteLevel. post_processor: null, ByteLevel, TemplateProcessing or a Sequence of
  //    them; a template that starts with a special token gives bos_id() (encode never adds it).
  // Anything else is refused. Throws std::runtime_error naming the file and the JSON field.
  static Tokenizer from_tokenizer_json(const std::string& path);
  // dir/tokenizer.json when it exists, else dir/vocab.json + dir/merges.txt.
  static Tokenizer from_dir(const std::string& dir);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Text must be valid UTF-8 (else std::runtime_error with the byte offset; see sanitize_utf8).
  // Without allow_special a special token's text is encoded as ordinary text (tiktoken's
  // encode_ordinary; HF's encode_special_tokens = true); with it, it becomes its id (what
  // GPT2TokenizerFast does). A tokenizer.json's non-special added tokens become their ids either
  // way, as in HF. Never adds the post-processor's BOS (bos_id). Thread-safe.
  std::vector<int32_t> encode(std::string_view text, bool allow_special = false) const;
  void encode_append(std::string_view text, std::vector<int32_t>& out, bool allow_special = false) const;

  // The bytes the ids stand for (may end inside a UTF-8 character when a sequence is cut; HF's
  // decode would show U+FFFD there); an added token stands for its content. Throws
  // std::out_of_range for an id outside the vocab.
  std::string decode(std::span<const int32_t> ids) const;
  std::string decode(const std::vector<int32_t>& ids) const { return decode(std::span<const int32_t>(ids)); }
  const std::string& token_bytes(int32_t id) const;

  int32_t vocab_size() const;  // largest id + 1 (added tokens included)
  size_t n_merges() const;
  // Id of "<|endoftext|>" (for a tokenizer.json without it, of Llama 3's "<|end_of_text|>"); -1
  // when there is none.
  int32_t eot_id() const;
  // The loaders' view of this tokenizer (runtime/io/dataloader.h); refers to *this, which must outlive it.
  TextEncoder text_encoder() const;
  // The token a tokenizer.json's post-processor puts first (Llama 3's <|begin_of_text|>), if any.
  std::optional<int32_t> bos_id() const;
  // Id of a token given in vocab.json's (byte-to-unicode) spelling, e.g. "\u0120world", or of an
  // added token given by its content.
  std::optional<int32_t> token_to_id(std::string_view vocab_token) const;
  // The pieces (bytes) the pre-tokenizer cuts ordinary text into after normalization, each of
  // which BPE encodes on its own; no added tokens are taken out. For tests and diagnostics.
  std::vector<std::string> pre_tokenize(std::string_view text) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Valid UTF-8 is returned unchanged; each maximal invalid subsequence becomes U+FFFD (as Python's
// bytes.decode("utf-8", "replace")). `n_replaced`, if given, receives the number of replacements.
std::string sanitize_utf8(std::string_view s, size_t* n_replaced = nullptr);
// Byte offset of the first invalid UTF-8 sequence, or npos when the text is valid.
size_t find_invalid_utf8(std::string_view s);

}  // namespace deeplora
