// Evaluation: multiple-choice / classification data scored by the log-probability of each choice
// (lm-evaluation-harness's acc and acc_norm), and token-weighted loss / perplexity of token streams.
// The choices of many examples go through one padded forward (one row for all choices that share
// all but their last token); only the positions that predict a choice token reach the lm_head.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/causal_lm.h"

namespace deeplora {

class Tokenizer;

// One labelled example: {"prompt": "...", "choices": [" a", " b", ...], "label": 1}.
struct McExample {
  std::vector<int32_t> prompt;                // context tokens, cut from the left to fit (n_cut)
  std::vector<std::vector<int32_t>> choices;  // continuation tokens of each choice
  std::vector<int64_t> choice_chars;          // characters (code points) of each choice: acc_norm's divisor
  int label = -1;                             // -1: the file has no labels
  int64_t line = 0;                           // 1-based line in the file
  int64_t n_cut = 0;                          // prompt tokens dropped from the left
};

struct McData {
  std::string path;
  std::vector<McExample> examples;
  int64_t n_truncated = 0;              // examples whose prompt was cut from the left
  std::vector<std::string> choice_set;  // the choices when every line has the same ones (classification)
};

enum class JsonlKind { prompt_completion, multiple_choice };
// The format of a JSONL file, from its first non-blank line; throws naming the file and line.
JsonlKind jsonl_kind(const std::string& path);

// Reads multiple-choice JSONL. Rows are prompt + choice and must fit `seq_len` model inputs
// (prompt + choice <= seq_len + 1 tokens): a prompt too long is cut from the left (counted in
// n_truncated and n_cut, never silently dropping a choice token); a choice longer than seq_len is an
// error naming the line. An empty prompt becomes <|endoftext|> (as lm-evaluation-harness does).
// Errors (bad JSON, missing or mistyped fields, no or empty choices, label out of range, duplicate
// choices) name the file and line. need_labels: a line without "label" is an error.
McData load_mc_jsonl(const std::string& path, const Tokenizer& tok, int64_t seq_len, bool need_labels = true);

struct McScoreOptions {
  int64_t max_batch_tokens = 16384;  // rows x padded length per forward
  int64_t pad_multiple = 16;         // padded lengths are multiples of this (few distinct shapes)
};

struct McScores {
  std::vector<std::vector<double>> logprob;  // [example][choice]: summed log-probability of its tokens
  std::vector<int> pred, pred_norm;          // argmax of logprob, and of logprob / choice characters
  int64_t n = 0, n_labeled = 0;
  double acc = 0, acc_norm = 0;              // over labelled examples (0 when none)
  double label_nll = 0;                      // mean per-token NLL of the labelled choices' tokens
  int64_t rows = 0, forwards = 0;            // distinct input rows (choices sharing all but their last
                                             // token share one), batched forwards
  int64_t tokens = 0;                        // real (unpadded) input tokens
  double seconds = 0;
};

// Scores every choice of every example. Runs under NoGrad; the model is left as it was.
McScores score_mc(CausalLM& model, const McData& data, const McScoreOptions& o = {});

struct LmLoss {
  double loss = 0, ppl = 0;  // token-weighted mean NLL (nats) and exp of it
  int64_t tokens = 0;        // predicted tokens
  double seconds = 0;
};
// Next-token loss over a token stream cut into windows of seq_len + 1 tokens that overlap by one,
// so every token after the first is predicted exactly once (the last window may be short).
LmLoss lm_loss(CausalLM& model, const std::vector<int32_t>& tokens, int64_t seq_len, int64_t batch);

// Token-weighted loss over the completion tokens of prompt/completion examples (each at most
// n_positions + 1 tokens: fit_examples), batched like score_mc.
struct Example;
LmLoss example_loss(CausalLM& model, const std::vector<Example>& examples, const McScoreOptions& o = {});

}  // namespace deeplora
