// Training data: token streams (llm.c shards or tokenized text) cut into windows of T+1 tokens, or
// prompt/completion examples (JSONL) where only completion tokens carry loss. Shuffled per epoch
// from a seed and sharded by rank: in one epoch no two ranks see the same window.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace deeplora {

// What the loaders need of a tokenizer (the runtime does not know the models' tokenizers;
// models/tokenizer.h makes one with Tokenizer::text_encoder()): text -> ids appended to `out`, and the
// end-of-text id appended after each document or example (< 0: none). Text comes as read from the
// files: the encoder handles invalid UTF-8 (the tokenizer's replaces it, as Python's "replace").
struct TextEncoder {
  std::function<void(std::string_view text, std::vector<int32_t>& out)> encode;
  int32_t eot = -1;
};

struct Batch {
  int64_t B = 0, T = 0;
  std::vector<int32_t> inputs;   // B*T
  std::vector<int32_t> targets;  // B*T, -100 where no loss
  int64_t n_loss_tokens() const;
};

struct Example {
  std::vector<int32_t> tokens;  // prompt + completion
  int64_t n_prompt = 0;         // the first n_prompt tokens carry no loss
  int64_t line = 0;             // 1-based line of the JSONL file it came from (0: not from a file)
};

// Reads prompt/completion JSONL ({"prompt": ..., "completion": ...} per line). Throws naming the file
// and line on bad JSON or missing fields.
std::vector<Example> load_jsonl_examples(const std::string& path, const TextEncoder& enc);
// Makes every example fit T + 1 tokens (T model inputs) without losing a completion token: a prompt
// too long is cut from the left; a completion longer than T is an error naming `what` and the line.
// Returns the number of examples whose prompt was cut.
int64_t fit_examples(std::vector<Example>& examples, int64_t T, const std::string& what);
// Tokens of text files (each file one document, followed by <|endoftext|>) or llm.c shards (*.bin),
// by extension. enc may be null when every path is a shard.
std::vector<int32_t> load_token_stream(const std::vector<std::string>& paths, const TextEncoder* enc);

class DataLoader {
 public:
  // Token stream: windows start every T tokens; a window gives inputs w[0..T) and targets w[1..T].
  static DataLoader from_tokens(std::vector<int32_t> tokens, int64_t B, int64_t T, uint64_t seed, int rank = 0,
                                int world = 1, std::string what = "data");
  // Examples: one row each, padded with pad_id (no loss on padding); an example longer than T+1
  // tokens is an error (fit_examples first).
  static DataLoader from_examples(std::vector<Example> examples, int64_t B, int64_t T, int32_t pad_id,
                                  uint64_t seed, int rank = 0, int world = 1, std::string what = "data");

  Batch next();  // this rank's next batch; moves to the next epoch (reshuffled) when one is used up
  int64_t batches_per_epoch() const { return n_rows() / (B_ * world_); }
  int64_t epoch() const { return epoch_; }
  int64_t position() const { return pos_; }  // global batches taken in this epoch
  void seek(int64_t epoch, int64_t position);  // resume exactly where a checkpoint left off
  int64_t n_rows() const;                      // windows or examples in the data
  bool is_examples() const { return is_examples_; }
  const std::vector<Example>& examples() const { return examples_; }  // empty for token streams
  int64_t B() const { return B_; }
  int64_t T() const { return T_; }

 private:
  static DataLoader make(int64_t B, int64_t T, uint64_t seed, int rank, int world, const std::string& what);
  void shuffle();
  int64_t B_ = 0, T_ = 0;
  uint64_t seed_ = 0;
  int rank_ = 0, world_ = 1;
  std::vector<int32_t> tokens_;
  std::vector<Example> examples_;
  int32_t pad_ = 0;
  bool is_examples_ = false;
  std::vector<int64_t> order_;
  int64_t epoch_ = 0, pos_ = 0;
};

}  // namespace deeplora
