// Generation with a KV cache (see generate.h).
#include "models/generate.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <optional>
#include <stdexcept>

#include "runtime/device.h"
#include "runtime/graph.h"
#include "runtime/io/staging.h"
#include "runtime/ops.h"
#include "runtime/ops_cache.h"
#include "runtime/tape.h"

namespace deeplora {
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
double uniform01(uint64_t& s) { return double(splitmix(s) >> 11) * 0x1.0p-53; }

}  // namespace

void GenerateOptions::validate() const {
  auto bad = [](const std::string& m) { throw std::invalid_argument(m); };
  if (max_new_tokens < 1) bad(fmt::format("--max-new-tokens {}: must be at least 1", max_new_tokens));
  if (!(temperature >= 0) || !std::isfinite(temperature))
    bad(fmt::format("--temperature {}: must be >= 0 (0: greedy)", temperature));
  if (top_k < 0) bad(fmt::format("--top-k {}: must be >= 0 (0: off)", top_k));
  if (!(top_p > 0 && top_p <= 1)) bad(fmt::format("--top-p {}: must be in (0, 1] (1: off)", top_p));
  if (n_vocab < 0) bad(fmt::format("generate: n_vocab {} must be >= 0", n_vocab));
}

double GenerateResult::prefill_tokens_per_s() const {
  return prefill_seconds > 0 ? double(prefill_tokens) / prefill_seconds : 0.0;
}
double GenerateResult::decode_tokens_per_s() const {
  return decode_seconds > 0 ? double(decode_steps) * double(tokens.size()) / decode_seconds : 0.0;
}

int32_t sample_token(const float* logits, int64_t n, double temperature, int64_t top_k, double top_p, uint64_t& rng) {
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  int64_t keep = n;
  if (top_k > 0 && top_k < n) {
    std::nth_element(idx.begin(), idx.begin() + top_k, idx.end(), by_logit);
    keep = top_k;
  }
  std::sort(idx.begin(), idx.begin() + keep, by_logit);
  std::vector<double> p(static_cast<size_t>(keep));
  const double mx = logits[idx[0]];
  double z = 0;
  for (int64_t i = 0; i < keep; ++i) z += p[size_t(i)] = std::exp((double(logits[idx[size_t(i)]]) - mx) / temperature);
  if (top_p < 1) {  // the smallest prefix whose probability reaches top_p (at least one token)
    double cum = 0;
    int64_t k = 0;
    while (k < keep && cum < top_p * z) cum += p[size_t(k++)];
    keep = std::max<int64_t>(k, 1);
    z = cum > 0 ? cum : p[0];
  }
  double u = uniform01(rng) * z;
  for (int64_t i = 0; i < keep; ++i) {
    u -= p[size_t(i)];
    if (u < 0) return idx[size_t(i)];
  }
  return idx[size_t(keep - 1)];
}

GenerateResult generate(CausalLM& model, const std::vector<std::vector<int32_t>>& prompts, const GenerateOptions& o) {
  o.validate();
  check(!prompts.empty(), "generate", "no prompts");
  NoGrad ng;
  const Device dev = model.device();
  const int64_t B = int64_t(prompts.size()), Vp = model.padded_vocab(), n_positions = model.max_positions();
  const int64_t vocab = model.vocab_size();
  const int64_t V = o.n_vocab > 0 ? std::min(o.n_vocab, vocab) : vocab;
  // The rows as run: an empty prompt is the model's BOS alone, as transformers' generate starts from
  // bos_token_id when input_ids is empty. The BOS is context, not output: every row still gets
  // max_new_tokens new tokens (fewer only when it emits stop_id).
  std::vector<std::vector<int32_t>> rows = prompts;
  const int64_t bos = model.bos_token_id();
  int64_t Tp = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    auto& p = rows[i];
    if (p.empty()) {
      if (bos < 0)
        throw std::invalid_argument(
            fmt::format("generate: prompt {} is empty and the model has no bos_token_id to start it from", i));
      if (bos >= vocab)
        throw std::invalid_argument(fmt::format(
            "generate: prompt {} is empty and the model's bos_token_id {} is outside its vocabulary ({})", i, bos, vocab));
      p.push_back(int32_t(bos));
    }
    if (int64_t(p.size()) + o.max_new_tokens > n_positions)
      throw std::invalid_argument(fmt::format("generate: prompt {} has {} tokens; with --max-new-tokens {} that exceeds "
                                              "the model's n_positions {}",
                                              i, p.size(), o.max_new_tokens, n_positions));
    for (int32_t t : p)
      if (t < 0 || t >= vocab)
        throw std::invalid_argument(
            fmt::format("generate: prompt {} has token id {} outside the vocabulary ({})", i, t, vocab));
    Tp = std::max<int64_t>(Tp, int64_t(p.size()));
  }
  GenerateResult r;
  r.tokens.resize(size_t(B));
  const int64_t T_max = Tp + o.max_new_tokens;
  KvCache cache = model.make_cache(B, T_max);
  const bool greedy = o.temperature == 0;
  std::vector<uint64_t> rng(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) rng[size_t(b)] = o.seed * 0x100000001b3ull + uint64_t(b);
  std::vector<bool> done(static_cast<size_t>(B), false);
  // Next tokens from padded logits [B, Vp]: argmax on the device, or a host copy for sampling.
  auto pick = [&](const std::vector<int32_t>& greedy_ids, const std::vector<float>& host_logits) {
    for (int64_t b = 0; b < B; ++b) {
      if (done[size_t(b)]) continue;
      const int32_t t = greedy ? greedy_ids[size_t(b)]
                               : sample_token(host_logits.data() + b * Vp, V, o.temperature, o.top_k, o.top_p,
                                              rng[size_t(b)]);
      r.tokens[size_t(b)].push_back(t);
      done[size_t(b)] = t == o.stop_id || int64_t(r.tokens[size_t(b)].size()) >= o.max_new_tokens;
    }
  };
  auto host_f32 = [](const Tensor& t) {
    Tensor h = t.to(Device::cpu).to(DType::f32);
    return std::vector<float>(h.data_as<float>(), h.data_as<float>() + h.numel());
  };

  // ---- prefill: the prompts right-padded, all from position 0 ------------------------------------
  auto t0 = Clock::now();
  {
    std::vector<int32_t> tok(static_cast<size_t>(B * Tp)), pos(static_cast<size_t>(B * Tp)), last(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const auto& p = rows[size_t(b)];
      for (int64_t t = 0; t < Tp; ++t) {
        tok[size_t(b * Tp + t)] = p[size_t(std::min<int64_t>(t, int64_t(p.size()) - 1))];
        pos[size_t(b * Tp + t)] = int32_t(t);
      }
      last[size_t(b)] = int32_t(b * Tp + int64_t(p.size()) - 1);
      r.prefill_tokens += int64_t(p.size());
    }
    Tensor h = model.hidden_cached(Tensor::from_ints(tok, Shape{B, Tp}, dev), Tensor::from_ints(pos, Shape{B, Tp}, dev),
                                   Tensor::zeros(Shape{B}, DType::i32, dev), cache, /*prefill=*/true);
    const int64_t C = h.dim(2);
    Tensor picked = ops::embedding(Tensor::from_ints(last, Shape{1, B}, dev), h.reshape(Shape{B * Tp, C}));
    Tensor logits = model.lm_head(picked.reshape(Shape{B, C}));
    if (greedy) pick(ops::argmax_rows(logits, V).to_int(), {});
    else pick({}, host_f32(logits));
  }
  r.prefill_seconds = since(t0);

  // ---- decode: one token per row and step over the cache ------------------------------------------
  t0 = Clock::now();
  Tensor dtok = Tensor::zeros(Shape{B, 1}, DType::i32, dev), dpos = Tensor::zeros(Shape{B, 1}, DType::i32, dev);
  Tensor dnext = Tensor::zeros(Shape{B}, DType::i32, dev);
  Tensor dlogits = greedy ? Tensor() : Tensor::empty(Shape{B, Vp}, DType::f32, dev);
  auto step = [&] {
    Tensor h = model.hidden_cached(dtok, dpos, dpos.reshape(Shape{B}), cache, /*prefill=*/false);
    Tensor logits = model.lm_head(h.reshape(Shape{B, h.dim(2)}));
    if (greedy) dnext.copy_from(ops::argmax_rows(logits, V));
    else dlogits.copy_from(logits);
  };
  StepGraph graph(step, dev, StepGraph::Options{o.cuda_graph && dev == Device::cuda, 1, "decode step"});
  PinnedStaging staging;
  std::vector<int32_t> tokv(static_cast<size_t>(B)), posv(static_cast<size_t>(B));
  for (int64_t s = 1; s < o.max_new_tokens; ++s) {
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    for (int64_t b = 0; b < B; ++b) {
      // A finished row keeps feeding its last token (its output is no longer read).
      tokv[size_t(b)] = r.tokens[size_t(b)].back();
      posv[size_t(b)] = int32_t(int64_t(rows[size_t(b)].size()) + s - 1);
    }
    dtok.copy_from(staging.upload(tokv, Shape{B, 1}, dev));
    dpos.copy_from(staging.upload(posv, Shape{B, 1}, dev));
    graph.run();
    if (greedy) pick(dnext.to_int(), {});
    else pick({}, host_f32(dlogits));
    ++r.decode_steps;
  }
  r.decode_seconds = since(t0);
  r.graph_used = graph.captured();
  return r;
}

}  // namespace deeplora
