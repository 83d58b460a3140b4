// Batched text generation with a KV cache: one prefill forward over the prompts, then one token per
// row and step attending over cached keys and values (never recomputing the prefix). Greedy,
// temperature, top-k and top-p sampling; stops at <|endoftext|>. On CUDA the decode step can be
// captured once into a CUDA graph and replayed.
#pragma once
#include <cstdint>
#include <vector>

#include "models/causal_lm.h"

namespace deeplora {

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  double temperature = 0;  // 0: greedy (argmax on the device); > 0: sample from softmax(logits / T)
  int64_t top_k = 0;       // sampling: keep the k most likely tokens (0: all)
  double top_p = 1.0;      // sampling: keep the smallest set with probability >= top_p (1: all)
  uint64_t seed = 0;       // sampling: row i draws from its own stream (seed, i): batching changes nothing
  int32_t stop_id = 50256; // a row ends after emitting it (kept in its output); -1: never
  bool cuda_graph = true;  // capture the decode step (CUDA only)
  int64_t n_vocab = 0;     // draw from ids below this (0: the model's vocabulary; a smaller tokenizer's size
                           // keeps every token decodable)
  // Throws std::invalid_argument naming the flag.
  void validate() const;
};

struct GenerateResult {
  std::vector<std::vector<int32_t>> tokens;  // new tokens of each prompt (ending with stop_id if it stopped)
  int64_t prefill_tokens = 0;                // prompt tokens processed (an empty prompt's BOS included)
  int64_t decode_steps = 0;                  // batched decode steps after the prefill
  double prefill_seconds = 0, decode_seconds = 0;
  bool graph_used = false;
  // Throughput: prompt tokens / prefill time; rows x steps / decode time.
  double prefill_tokens_per_s() const;
  double decode_tokens_per_s() const;
};

// Each prompt gets exactly max_new_tokens new tokens, fewer only when it emits stop_id. An empty
// prompt starts from the model's bos_token_id(), as transformers' generate starts from bos_token_id
// when input_ids is empty (std::invalid_argument when the model has none in its vocabulary). Every
// prompt must fit n_positions together with max_new_tokens (its BOS counted), and hold only token
// ids of the vocabulary (else std::invalid_argument naming the prompt). Runs under NoGrad.
GenerateResult generate(CausalLM& model, const std::vector<std::vector<int32_t>>& prompts, const GenerateOptions& o);

// Picks a token from one row of logits (n values) as generate does with temperature > 0: softmax of
// logits / temperature restricted to top_k, then to top_p (HF's order), one draw from rng.
int32_t sample_token(const float* logits, int64_t n, double temperature, int64_t top_k, double top_p, uint64_t& rng);

}  // namespace deeplora
