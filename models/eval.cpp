// Multiple-choice scoring and token-stream loss (see eval.h).
#include "models/eval.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>

#include "models/tokenizer.h"
#include "runtime/io/dataloader.h"
#include "runtime/io/jsonl.h"
#include "runtime/device.h"
#include "runtime/ops.h"
#include "runtime/tape.h"

namespace deeplora {
namespace {

using Clock = std::chrono::steady_clock;

int64_t utf8_chars(const std::string& s) {
  return std::count_if(s.begin(), s.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; });
}

[[noreturn]] void bad_line(const std::string& path, int64_t line, const std::string& msg) {
  throw std::runtime_error(fmt::format("{}:{}: {}", path, line, msg));
}

}  // namespace

JsonlKind jsonl_kind(const std::string& path) {
  std::optional<JsonlKind> kind;
  for_each_jsonl(path, [&](const nlohmann::json& j, int64_t line) {
    if (j.is_object() && j.contains("choices")) kind = JsonlKind::multiple_choice;
    else if (j.is_object() && j.contains("completion")) kind = JsonlKind::prompt_completion;
    else
      bad_line(path, line,
               "expected {\"prompt\", \"completion\"} (prompt/completion) or {\"prompt\", \"choices\", \"label\"} "
               "(multiple choice)");
    return false;  // the first line decides
  });
  if (!kind) throw std::runtime_error(fmt::format("{}: no examples (empty file)", path));
  return *kind;
}

McData load_mc_jsonl(const std::string& path, const Tokenizer& tok, int64_t seq_len, bool need_labels) {
  if (seq_len < 2) throw std::invalid_argument(fmt::format("{}: sequence length {} is too short to score", path, seq_len));
  McData d;
  d.path = path;
  bool same_choices = true;
  std::vector<std::string> first_choices;
  for_each_jsonl(path, [&](const nlohmann::json& j, int64_t lineno) {
    if (!j.is_object()) bad_line(path, lineno, "expected a JSON object {\"prompt\", \"choices\", \"label\"}");
    if (!j.contains("prompt") || !j["prompt"].is_string()) bad_line(path, lineno, "missing string field \"prompt\"");
    if (!j.contains("choices") || !j["choices"].is_array())
      bad_line(path, lineno, "missing field \"choices\" (an array of strings)");
    const auto& jc = j["choices"];
    if (jc.empty()) bad_line(path, lineno, "\"choices\" is empty");
    McExample ex;
    ex.line = lineno;
    std::vector<std::string> choices;
    for (size_t c = 0; c < jc.size(); ++c) {
      if (!jc[c].is_string()) bad_line(path, lineno, fmt::format("choice {} is not a string", c));
      std::string s = sanitize_utf8(jc[c].get<std::string>());
      if (s.empty()) bad_line(path, lineno, fmt::format("choice {} is an empty string", c));
      if (std::find(choices.begin(), choices.end(), s) != choices.end())
        bad_line(path, lineno, fmt::format("choice {} ({}) appears twice", c, nlohmann::json(s).dump()));
      choices.push_back(s);
    }
    if (j.contains("label")) {
      if (!j["label"].is_number_integer()) bad_line(path, lineno, "\"label\" must be an integer (index into choices)");
      const int64_t label = j["label"].get<int64_t>();
      if (label < 0 || label >= int64_t(choices.size()))
        bad_line(path, lineno, fmt::format("label {} is out of range for {} choices", label, choices.size()));
      ex.label = int(label);
    } else if (need_labels) {
      bad_line(path, lineno, "missing field \"label\"");
    }
    tok.encode_append(sanitize_utf8(j["prompt"].get<std::string>()), ex.prompt);
    if (ex.prompt.empty()) {
      if (tok.eot_id() < 0) bad_line(path, lineno, "empty prompt and the vocabulary has no <|endoftext|>");
      ex.prompt.push_back(tok.eot_id());
    }
    int64_t longest = 0;
    for (size_t c = 0; c < choices.size(); ++c) {
      ex.choices.push_back(tok.encode(choices[c]));
      ex.choice_chars.push_back(utf8_chars(choices[c]));
      longest = std::max<int64_t>(longest, int64_t(ex.choices.back().size()));
    }
    if (longest > seq_len)
      bad_line(path, lineno, fmt::format("a choice has {} tokens; at most the sequence length {} fit", longest, seq_len));
    const int64_t over = int64_t(ex.prompt.size()) + longest - (seq_len + 1);
    if (over > 0) {
      ex.prompt.erase(ex.prompt.begin(), ex.prompt.begin() + over);
      ex.n_cut = over;
      ++d.n_truncated;
    }
    if (d.examples.empty()) first_choices = choices;
    else if (choices != first_choices) same_choices = false;
    d.examples.push_back(std::move(ex));
    return true;
  });
  if (d.examples.empty()) throw std::runtime_error(fmt::format("{}: no examples", path));
  if (same_choices) d.choice_set = first_choices;
  return d;
}

McScores score_mc(CausalLM& model, const McData& data, const McScoreOptions& o) {
  check(o.max_batch_tokens > 0 && o.pad_multiple > 0, "score_mc", "max_batch_tokens and pad_multiple must be positive");
  NoGrad ng;
  const auto t0 = Clock::now();
  const Device dev = model.device();
  const int64_t V = model.vocab_size(), n_pos = model.max_positions();
  const int32_t pad = int32_t(std::min<int64_t>(50256, V - 1));
  McScores s;
  s.n = int64_t(data.examples.size());
  s.logprob.resize(size_t(s.n));
  // One row per distinct input: choices that share all but their last token (every single-token
  // choice of an example, say) are read off the same row's positions.
  struct Row {
    int64_t ex, len;                 // len: input tokens = prompt + the shared choice prefix
    std::vector<int32_t> prefix;     // choice[:-1] of the choices this row scores
    std::vector<int64_t> choices;
  };
  std::vector<Row> rows;
  for (int64_t e = 0; e < s.n; ++e) {
    const McExample& ex = data.examples[size_t(e)];
    s.logprob[size_t(e)].assign(ex.choices.size(), 0.0);
    const size_t first = rows.size();
    for (size_t c = 0; c < ex.choices.size(); ++c) {
      std::vector<int32_t> prefix(ex.choices[c].begin(), ex.choices[c].end() - 1);
      size_t r = first;
      while (r < rows.size() && rows[r].prefix != prefix) ++r;
      if (r == rows.size()) rows.push_back({e, int64_t(ex.prompt.size() + prefix.size()), std::move(prefix), {}});
      rows[r].choices.push_back(int64_t(c));
    }
  }
  // Longest first (stable): neighbours have similar lengths, so little padding.
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.len > b.len; });
  s.rows = int64_t(rows.size());
  for (size_t i = 0; i < rows.size();) {
    const int64_t T = std::min<int64_t>(n_pos, (rows[i].len + o.pad_multiple - 1) / o.pad_multiple * o.pad_multiple);
    check(rows[i].len <= T, "score_mc",
          fmt::format("{}:{}: {} tokens exceed the model's n_positions {}", data.path,
                      data.examples[size_t(rows[i].ex)].line, rows[i].len, n_pos));
    const int64_t B = std::min<int64_t>(int64_t(rows.size() - i), std::max<int64_t>(1, o.max_batch_tokens / T));
    std::vector<int32_t> in(static_cast<size_t>(B * T), pad), gather, targets;
    for (int64_t r = 0; r < B; ++r) {
      const Row& row = rows[i + size_t(r)];
      const McExample& ex = data.examples[size_t(row.ex)];
      const int64_t P = int64_t(ex.prompt.size());
      int32_t* dst = in.data() + r * T;
      std::copy(ex.prompt.begin(), ex.prompt.end(), dst);
      std::copy(row.prefix.begin(), row.prefix.end(), dst + P);
      // Input position P-1+j predicts choice token j.
      for (int64_t c : row.choices) {
        const auto& ch = ex.choices[size_t(c)];
        for (size_t j = 0; j < ch.size(); ++j) {
          gather.push_back(int32_t(r * T + P - 1 + int64_t(j)));
          targets.push_back(ch[j]);
        }
      }
      s.tokens += row.len;
    }
    const int64_t N = int64_t(gather.size());
    Tensor h = model.hidden(Tensor::from_ints(in, Shape{B, T}, dev));
    const int64_t C = h.dim(2);
    Tensor picked = ops::embedding(Tensor::from_ints(gather, Shape{1, N}, dev), h.reshape(Shape{B * T, C}));
    Tensor nll = ops::token_nll(model.lm_head(picked.reshape(Shape{N, C})), Tensor::from_ints(targets, Shape{N}, dev),
                                -100, V);
    std::vector<double> v = nll.to_double();
    size_t k = 0;
    for (int64_t r = 0; r < B; ++r) {
      const Row& row = rows[i + size_t(r)];
      for (int64_t c : row.choices) {
        const size_t n = data.examples[size_t(row.ex)].choices[size_t(c)].size();
        double sum = 0;
        for (size_t j = 0; j < n; ++j) sum += v[k + j];
        k += n;
        s.logprob[size_t(row.ex)][size_t(c)] = -sum;
      }
    }
    ++s.forwards;
    i += size_t(B);
  }
  // Predictions: first index on ties (numpy's argmax, as lm-evaluation-harness).
  double nll_sum = 0;
  int64_t nll_count = 0, hits = 0, hits_norm = 0;
  s.pred.resize(size_t(s.n));
  s.pred_norm.resize(size_t(s.n));
  for (int64_t e = 0; e < s.n; ++e) {
    const McExample& ex = data.examples[size_t(e)];
    const auto& lp = s.logprob[size_t(e)];
    int best = 0, best_norm = 0;
    for (size_t c = 1; c < lp.size(); ++c) {
      if (lp[c] > lp[size_t(best)]) best = int(c);
      if (lp[c] / double(ex.choice_chars[c]) > lp[size_t(best_norm)] / double(ex.choice_chars[size_t(best_norm)]))
        best_norm = int(c);
    }
    s.pred[size_t(e)] = best;
    s.pred_norm[size_t(e)] = best_norm;
    if (ex.label >= 0) {
      ++s.n_labeled;
      hits += best == ex.label;
      hits_norm += best_norm == ex.label;
      nll_sum -= lp[size_t(ex.label)];
      nll_count += int64_t(ex.choices[size_t(ex.label)].size());
    }
  }
  if (s.n_labeled > 0) {
    s.acc = double(hits) / double(s.n_labeled);
    s.acc_norm = double(hits_norm) / double(s.n_labeled);
    s.label_nll = nll_sum / double(nll_count);
  }
  s.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return s;
}

LmLoss lm_loss(CausalLM& model, const std::vector<int32_t>& tokens, int64_t seq_len, int64_t batch) {
  check(seq_len > 0 && batch > 0, "lm_loss", "sequence length and batch must be positive");
  check(seq_len <= model.max_positions(), "lm_loss",
        fmt::format("sequence length {} exceeds the model's n_positions {}", seq_len, model.max_positions()));
  check(tokens.size() >= 2, "lm_loss", fmt::format("{} tokens: need at least 2 to predict one", tokens.size()));
  const int64_t V = model.vocab_size();
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || tokens[i] >= V)
      throw std::runtime_error(
          fmt::format("lm_loss: token id {} at position {} is outside the model's vocabulary ({})", tokens[i], i, V));
  NoGrad ng;
  const auto t0 = Clock::now();
  const Device dev = model.device();
  const int64_t n_pred = int64_t(tokens.size()) - 1;
  const int64_t n_windows = (n_pred + seq_len - 1) / seq_len;
  double sum = 0;
  for (int64_t w0 = 0; w0 < n_windows; w0 += batch) {
    const int64_t B = std::min(batch, n_windows - w0);
    // The last window may be short: pad it and ignore its padding.
    const int64_t T = std::min(seq_len, n_pred - w0 * seq_len);
    std::vector<int32_t> in(size_t(B * T), 0), tg(size_t(B * T), -100);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t start = (w0 + b) * seq_len;
      const int64_t n = std::min(T, n_pred - start);
      for (int64_t t = 0; t < n; ++t) {
        in[size_t(b * T + t)] = tokens[size_t(start + t)];
        tg[size_t(b * T + t)] = tokens[size_t(start + t + 1)];
      }
    }
    Tensor logits = model.forward_padded(Tensor::from_ints(in, Shape{B, T}, dev));
    Tensor nll = ops::token_nll(logits, Tensor::from_ints(tg, Shape{B, T}, dev), -100, V);
    for (double x : nll.to_double()) sum += x;
  }
  LmLoss r;
  r.tokens = n_pred;
  r.loss = sum / double(n_pred);
  r.ppl = std::exp(r.loss);
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

LmLoss example_loss(CausalLM& model, const std::vector<Example>& examples, const McScoreOptions& o) {
  check(o.max_batch_tokens > 0 && o.pad_multiple > 0, "example_loss", "max_batch_tokens and pad_multiple must be positive");
  NoGrad ng;
  const auto t0 = Clock::now();
  const Device dev = model.device();
  const int64_t V = model.vocab_size(), n_pos = model.max_positions();
  std::vector<size_t> order(examples.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return examples[a].tokens.size() > examples[b].tokens.size(); });
  LmLoss r;
  double sum = 0;
  for (size_t i = 0; i < order.size();) {
    const int64_t len = int64_t(examples[order[i]].tokens.size()) - 1;
    check(len >= 1 && len <= n_pos, "example_loss",
          fmt::format("example (line {}) has {} tokens; 2 .. n_positions + 1 = {} fit", examples[order[i]].line, len + 1,
                      n_pos + 1));
    const int64_t T = std::min<int64_t>(n_pos, (len + o.pad_multiple - 1) / o.pad_multiple * o.pad_multiple);
    const int64_t B = std::min<int64_t>(int64_t(order.size() - i), std::max<int64_t>(1, o.max_batch_tokens / T));
    std::vector<int32_t> in(static_cast<size_t>(B * T), 0), tg(static_cast<size_t>(B * T), -100);
    for (int64_t b = 0; b < B; ++b) {
      const Example& ex = examples[order[i + size_t(b)]];
      for (int64_t t = 0; t + 1 < int64_t(ex.tokens.size()); ++t) {
        in[size_t(b * T + t)] = ex.tokens[size_t(t)];
        if (t + 1 >= ex.n_prompt) {
          tg[size_t(b * T + t)] = ex.tokens[size_t(t + 1)];
          ++r.tokens;
        }
      }
    }
    Tensor logits = model.forward_padded(Tensor::from_ints(in, Shape{B, T}, dev));
    for (double x : ops::token_nll(logits, Tensor::from_ints(tg, Shape{B, T}, dev), -100, V).to_double()) sum += x;
    i += size_t(B);
  }
  check(r.tokens > 0, "example_loss", "no completion tokens to score");
  r.loss = sum / double(r.tokens);
  r.ppl = std::exp(r.loss);
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

}  // namespace deeplora
