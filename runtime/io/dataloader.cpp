// Data loading: text, llm.c shards, JSONL examples; seeded per-epoch shuffles, rank sharding.
#include "runtime/io/dataloader.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <stdexcept>

#include "runtime/io/token_shards.h"

namespace deeplora {

int64_t Batch::n_loss_tokens() const {
  return std::count_if(targets.begin(), targets.end(), [](int32_t t) { return t != -100; });
}

static std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(fmt::format("{}: cannot open", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<Example> load_jsonl_examples(const std::string& path, const TextEncoder& enc) {
  if (!enc.encode) throw std::invalid_argument(fmt::format("{}: JSONL data needs a tokenizer (--vocab-dir)", path));
  std::ifstream f(path);
  if (!f) throw std::runtime_error(fmt::format("{}: cannot open", path));
  std::vector<Example> out;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("{}:{}: not valid JSON: {}", path, lineno, e.what()));
    }
    if (!j.is_object() || !j.contains("prompt") || !j.contains("completion") || !j["prompt"].is_string() ||
        !j["completion"].is_string())
      throw std::runtime_error(fmt::format("{}:{}: expected an object with string fields \"prompt\" and \"completion\"",
                                           path, lineno));
    Example ex;
    ex.line = lineno;
    enc.encode(j["prompt"].get<std::string>(), ex.tokens);
    ex.n_prompt = int64_t(ex.tokens.size());
    enc.encode(j["completion"].get<std::string>(), ex.tokens);
    if (enc.eot >= 0) ex.tokens.push_back(enc.eot);
    out.push_back(std::move(ex));
  }
  if (out.empty()) throw std::runtime_error(fmt::format("{}: no examples", path));
  return out;
}

int64_t fit_examples(std::vector<Example>& examples, int64_t T, const std::string& what) {
  int64_t n_cut = 0;
  for (Example& ex : examples) {
    const int64_t n = int64_t(ex.tokens.size()), completion = n - ex.n_prompt;
    if (completion > T)
      throw std::runtime_error(fmt::format("{}:{}: the completion has {} tokens; at most the sequence length {} fit "
                                           "(raise --seq-len or shorten it)",
                                           what, ex.line, completion, T));
    if (n > T + 1) {
      const int64_t cut = n - (T + 1);
      ex.tokens.erase(ex.tokens.begin(), ex.tokens.begin() + cut);
      ex.n_prompt -= cut;
      ++n_cut;
    }
  }
  return n_cut;
}

std::vector<int32_t> load_token_stream(const std::vector<std::string>& paths, const TextEncoder* enc) {
  std::vector<int32_t> out;
  for (const std::string& p : paths) {
    const bool shard = p.size() > 4 && p.compare(p.size() - 4, 4, ".bin") == 0;
    if (shard) {
      auto t = read_token_shard(p);
      out.insert(out.end(), t.begin(), t.end());
    } else {
      if (!enc || !enc->encode) throw std::runtime_error(fmt::format("{}: text data needs a tokenizer (--vocab-dir)", p));
      const std::string text = read_text(p);
      // Each text file is one document, followed by <|endoftext|>.
      enc->encode(text, out);
      if (enc->eot >= 0) out.push_back(enc->eot);
    }
  }
  return out;
}

DataLoader DataLoader::make(int64_t B, int64_t T, uint64_t seed, int rank, int world, const std::string& what) {
  if (B <= 0 || T <= 0)
    throw std::invalid_argument(fmt::format("{}: batch {} and sequence length {} must be positive", what, B, T));
  DataLoader d;
  d.B_ = B;
  d.T_ = T;
  d.seed_ = seed;
  d.rank_ = rank;
  d.world_ = world;
  return d;
}

DataLoader DataLoader::from_tokens(std::vector<int32_t> tokens, int64_t B, int64_t T, uint64_t seed, int rank,
                                   int world, std::string what) {
  DataLoader d = make(B, T, seed, rank, world, what);
  d.tokens_ = std::move(tokens);
  if (d.batches_per_epoch() < 1)
    throw std::runtime_error(fmt::format(
        "{}: {} tokens make {} windows of {}+1 tokens, fewer than one global batch of {} x {} ranks; use a smaller "
        "--batch / --seq-len or more data",
        what, d.tokens_.size(), d.n_rows(), T, B, world));
  d.shuffle();
  return d;
}

DataLoader DataLoader::from_examples(std::vector<Example> examples, int64_t B, int64_t T, int32_t pad_id, uint64_t seed,
                                     int rank, int world, std::string what) {
  DataLoader d = make(B, T, seed, rank, world, what);
  for (const Example& ex : examples)
    if (int64_t(ex.tokens.size()) > T + 1)
      throw std::invalid_argument(fmt::format("{}: an example of {} tokens (line {}) does not fit {} + 1; fit_examples "
                                              "first",
                                              what, ex.tokens.size(), ex.line, T));
  d.examples_ = std::move(examples);
  d.is_examples_ = true;
  d.pad_ = pad_id;
  if (d.batches_per_epoch() < 1)
    throw std::runtime_error(fmt::format("{}: {} examples, fewer than one global batch of {} x {} ranks", what,
                                         d.examples_.size(), B, world));
  d.shuffle();
  return d;
}

int64_t DataLoader::n_rows() const {
  if (is_examples_) return int64_t(examples_.size());
  return tokens_.size() > 1 ? (int64_t(tokens_.size()) - 1) / T_ : 0;
}

void DataLoader::shuffle() {
  order_.resize(size_t(n_rows()));
  for (size_t i = 0; i < order_.size(); ++i) order_[i] = int64_t(i);
  std::mt19937_64 rng(seed_ * 0x9E3779B97F4A7C15ULL + uint64_t(epoch_) + 1);
  // Fisher-Yates with our own draw: std::shuffle's algorithm is implementation-defined.
  for (size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[size_t(rng() % i)]);
}

void DataLoader::seek(int64_t epoch, int64_t position) {
  if (epoch < 0 || position < 0 || position > batches_per_epoch())
    throw std::invalid_argument(fmt::format("data loader: cannot seek to epoch {} batch {} ({} batches per epoch)",
                                            epoch, position, batches_per_epoch()));
  epoch_ = epoch;
  pos_ = position;
  shuffle();
}

Batch DataLoader::next() {
  if (pos_ >= batches_per_epoch()) {
    ++epoch_;
    pos_ = 0;
    shuffle();
  }
  Batch b;
  b.B = B_;
  b.T = T_;
  b.inputs.assign(size_t(B_ * T_), pad_);
  b.targets.assign(size_t(B_ * T_), -100);
  const int64_t first = (pos_ * world_ + rank_) * B_;
  for (int64_t r = 0; r < B_; ++r) {
    const int64_t row = order_[size_t(first + r)];
    int32_t* in = b.inputs.data() + r * T_;
    int32_t* tg = b.targets.data() + r * T_;
    if (!is_examples_) {
      const int32_t* w = tokens_.data() + row * T_;
      std::copy(w, w + T_, in);
      std::copy(w + 1, w + T_ + 1, tg);
    } else {
      const Example& ex = examples_[size_t(row)];
      const int64_t n = std::min<int64_t>(int64_t(ex.tokens.size()), T_ + 1);
      for (int64_t t = 0; t + 1 < n; ++t) {
        in[t] = ex.tokens[size_t(t)];
        if (t + 1 >= ex.n_prompt) tg[t] = ex.tokens[size_t(t + 1)];
      }
      if (n == 1) in[0] = ex.tokens[0];
    }
  }
  ++pos_;
  return b;
}

}  // namespace deeplora
