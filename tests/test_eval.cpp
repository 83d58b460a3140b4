// Evaluation and generation: multiple-choice scores against a direct computation through
// Gpt::forward, token-stream loss, bad multiple-choice files, KV-cache greedy decoding against full
// recomputation, sampling; the trainer's multiple-choice data, eval accuracy, best model, summary,
// written config (read back by `train --config`) and the model flags.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "models/eval.h"
#include "models/generate.h"
#include "models/gpt.h"
#include "models/gpt_io.h"
#include "models/inference.h"
#include "models/tokenizer.h"
#include "models/trainer.h"
#include "runtime/device.h"
#include "runtime/ops.h"
#include "runtime/tape.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;
using test::contains;
using test::error_of;

namespace {

GptConfig tiny() { return GptConfig::preset("tiny"); }  // 2 x 64, vocab 512, 128 positions

// A small classification file in the multiple-choice format: prompts of varied length, choices of
// three to six byte tokens (" ya" and " yb" share all but their last), labels spread over the choices.
std::string write_mc(const test::TempDir& dir, const std::string& name, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::vector<std::string> words = {"apple", "river", "stone", "cloud", "night", "green", "table", "song"};
  std::string text;
  for (int i = 0; i < n; ++i) {
    std::string prompt = "Q" + std::to_string(i) + ":";
    for (int w = 0, nw = 1 + int(rng() % 6); w < nw; ++w) prompt += " " + words[rng() % words.size()];
    prompt += "\nA:";
    nlohmann::json j = {{"prompt", prompt}, {"choices", {" ya", " yb", " no", " maybe"}}, {"label", int(rng() % 4)}};
    text += j.dump() + "\n";
  }
  return dir.write(name, text);
}

// log p(choice | prompt) in double from the full logits of Gpt::forward on prompt + choice[:-1].
double direct_logprob(Gpt& model, const std::vector<int32_t>& prompt, const std::vector<int32_t>& choice) {
  NoGrad ng;
  std::vector<int32_t> row = prompt;
  row.insert(row.end(), choice.begin(), choice.end() - 1);
  const int64_t T = int64_t(row.size()), V = model.config().vocab_size;
  std::vector<double> l = model.forward(Tensor::from_ints(row, Shape{1, T}, model.device())).to_double();
  double lp = 0;
  for (size_t j = 0; j < choice.size(); ++j) {
    const double* r = l.data() + (int64_t(prompt.size()) - 1 + int64_t(j)) * V;
    double mx = r[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, r[v]);
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(r[v] - mx);
    lp += r[choice[j]] - mx - std::log(z);
  }
  return lp;
}

// Greedy decoding by full recomputation of the whole sequence for every new token (the reference).
std::vector<int32_t> greedy_full(Gpt& model, std::vector<int32_t> seq, int64_t n_new) {
  NoGrad ng;
  const int64_t V = model.config().vocab_size, n0 = int64_t(seq.size());
  for (int64_t i = 0; i < n_new; ++i) {
    const int64_t T = int64_t(seq.size());
    std::vector<double> l = model.forward(Tensor::from_ints(seq, Shape{1, T}, model.device())).to_double();
    const double* r = l.data() + (T - 1) * V;
    seq.push_back(int32_t(std::max_element(r, r + V) - r));
  }
  return std::vector<int32_t>(seq.begin() + n0, seq.end());
}

}  // namespace

TEST_CASE("eval: per-choice log-probs and accuracy equal a direct computation through Gpt::forward (f32)") {
  test::TempDir dir;
  Tokenizer tok = Tokenizer::from_dir(test::write_byte_vocab(dir.path / "vocab"));
  Gpt model(tiny(), DType::f32, Device::cpu, 7);
  McData data = load_mc_jsonl(write_mc(dir, "mc.jsonl", 23, 3), tok, 64);
  REQUIRE(data.examples.size() == 23);
  CHECK(data.choice_set == std::vector<std::string>{" ya", " yb", " no", " maybe"});
  // A small token budget: several batches of different padded lengths.
  McScores s = score_mc(model, data, McScoreOptions{256, 16});
  CHECK(s.forwards > 3);
  CHECK(s.rows == 23 * 3);  // " ya" and " yb" are read off one row
  double worst = 0;
  int64_t hits = 0, hits_norm = 0;
  for (size_t e = 0; e < data.examples.size(); ++e) {
    const McExample& ex = data.examples[e];
    std::vector<double> lp;
    for (const auto& ch : ex.choices) lp.push_back(direct_logprob(model, ex.prompt, ch));
    for (size_t c = 0; c < lp.size(); ++c) worst = std::max(worst, std::abs(s.logprob[e][c] - lp[c]) / std::abs(lp[c]));
    const int best = int(std::max_element(lp.begin(), lp.end()) - lp.begin());
    int best_norm = 0;
    for (size_t c = 1; c < lp.size(); ++c)
      if (lp[c] / double(ex.choice_chars[c]) > lp[size_t(best_norm)] / double(ex.choice_chars[size_t(best_norm)]))
        best_norm = int(c);
    CHECK(s.pred[e] == best);
    CHECK(s.pred_norm[e] == best_norm);
    hits += best == ex.label;
    hits_norm += best_norm == ex.label;
  }
  CHECK(worst <= 1e-6);
  CHECK(s.acc == doctest::Approx(double(hits) / 23.0));
  CHECK(s.acc_norm == doctest::Approx(double(hits_norm) / 23.0));
  CHECK(data.examples[0].choice_chars == std::vector<int64_t>{3, 3, 3, 6});
  MESSAGE(fmt::format("eval vs Gpt::forward: worst per-choice log-prob rel err {:.2e} over {} rows", worst, s.rows));
  // The same scores whatever the batch budget (one row per forward).
  McScores one = score_mc(model, data, McScoreOptions{1, 1});
  CHECK(one.pred == s.pred);
  CHECK(test::rel_err(one.logprob[5], s.logprob[5]) <= 1e-6);
}

TEST_CASE("eval: long prompts are cut from the left and counted; bad files name the file and line") {
  test::TempDir dir;
  Tokenizer tok = Tokenizer::from_dir(test::write_byte_vocab(dir.path / "vocab"));
  // prompt 40 bytes, longest choice 5: seq_len 20 keeps the last 16 prompt tokens (16 + 5 = 21 = T + 1).
  std::string p = dir.write("long.jsonl", nlohmann::json({{"prompt", std::string(30, 'a') + "0123456789"},
                                                           {"choices", {" x", " yyyy"}},
                                                           {"label", 1}}).dump() +
                                              "\n" +
                                              nlohmann::json({{"prompt", "short"}, {"choices", {" x", " y"}}, {"label", 0}})
                                                  .dump() +
                                              "\n");
  McData d = load_mc_jsonl(p, tok, 20);
  CHECK(d.n_truncated == 1);
  CHECK(d.examples[0].n_cut == 24);
  REQUIRE(d.examples[0].prompt.size() == 16);
  CHECK(tok.decode(d.examples[0].prompt) == std::string(6, 'a') + "0123456789");
  CHECK(d.examples[1].n_cut == 0);
  CHECK(d.choice_set.empty());  // the lines have different choices
  // Bad input.
  auto err = [&](const std::string& line, int64_t T = 64) {
    return error_of([&] { load_mc_jsonl(dir.write("bad.jsonl", "\n" + line + "\n"), tok, T); });
  };
  CHECK(contains(err(R"({"prompt": "a", "choices": [], "label": 0})"), "bad.jsonl:2: \"choices\" is empty"));
  CHECK(contains(err(R"({"prompt": "a", "choices": [" x", " y"], "label": 2})"), "bad.jsonl:2: label 2 is out of range for 2 choices"));
  CHECK(contains(err(R"({"prompt": "a", "choices": [" x", " y"], "label": -1})"), "label -1 is out of range"));
  CHECK(contains(err(R"({"choices": [" x"], "label": 0})"), "bad.jsonl:2: missing string field \"prompt\""));
  CHECK(contains(err(R"({"prompt": "a", "label": 0})"), "bad.jsonl:2: missing field \"choices\""));
  CHECK(contains(err(R"({"prompt": "a", "choices": [" x", " y"]})"), "bad.jsonl:2: missing field \"label\""));
  CHECK(contains(err(R"({"prompt": "a", "choices": [" x", 3], "label": 0})"), "choice 1 is not a string"));
  CHECK(contains(err(R"({"prompt": "a", "choices": [" x", " x"], "label": 0})"), "choice 1 (\" x\") appears twice"));
  CHECK(contains(err(R"({"prompt": "a", "choices": [" x", ""], "label": 0})"), "choice 1 is an empty string"));
  CHECK(contains(err(R"({"prompt": "a", "choices": [" x"], "label": "0"})"), "\"label\" must be an integer"));
  CHECK(contains(err(R"({"prompt": "a", "choices": [" xxxxxxxxxx"], "label": 0})", 8),
                 "bad.jsonl:2: a choice has 11 tokens; at most the sequence length 8 fit"));
  CHECK(contains(err(R"({"prompt": "a", "choices": [" x")"), "bad.jsonl:2: not valid JSON"));
  CHECK(contains(err(R"(["a"])"), "bad.jsonl:2: expected a JSON object"));
  CHECK(contains(error_of([&] { load_mc_jsonl(dir.file("none.jsonl"), tok, 64); }), "none.jsonl: cannot open"));
  CHECK(contains(error_of([&] { load_mc_jsonl(dir.write("empty.jsonl", "\n\n"), tok, 64); }), "empty.jsonl: no examples"));
  // An empty prompt scores the choice after <|endoftext|> (lm-evaluation-harness's convention).
  McData e = load_mc_jsonl(dir.write("e.jsonl", R"({"prompt": "", "choices": [" x"], "label": 0})"), tok, 64);
  CHECK(e.examples[0].prompt == std::vector<int32_t>{256});
  CHECK(jsonl_kind(p) == JsonlKind::multiple_choice);
  CHECK(jsonl_kind(dir.write("pc.jsonl", R"({"prompt": "a", "completion": "b"})")) == JsonlKind::prompt_completion);
  CHECK(contains(error_of([&] { jsonl_kind(dir.write("x.jsonl", R"({"text": "a"})")); }), "x.jsonl:1: expected"));
}

TEST_CASE("eval: token-stream loss is the token-weighted mean NLL (a short last window included)") {
  Gpt model(tiny(), DType::f32, Device::cpu, 2);
  std::vector<int32_t> toks;
  for (int i = 0; i < 70; ++i) toks.push_back(int32_t((i * 37 + 11) % 300));
  LmLoss l = lm_loss(model, toks, 16, 3);  // 69 predictions: windows of 16, 16, 16, 16, 5
  CHECK(l.tokens == 69);
  NoGrad ng;
  double sum = 0;
  for (int64_t start = 0; start < 69; start += 16) {
    const int64_t n = std::min<int64_t>(16, 69 - start);
    std::vector<int32_t> in(toks.begin() + start, toks.begin() + start + n), tg(toks.begin() + start + 1,
                                                                                 toks.begin() + start + n + 1);
    sum += model.loss(Tensor::from_ints(in, Shape{1, n}), Tensor::from_ints(tg, Shape{1, n})).item() * double(n);
  }
  CHECK(l.loss == doctest::Approx(sum / 69.0).epsilon(1e-6));
  CHECK(l.ppl == doctest::Approx(std::exp(l.loss)));
  CHECK(contains(error_of([&] { lm_loss(model, {1, 600}, 16, 1); }), "token id 600 at position 1"));
}

TEST_CASE("generate: KV-cache greedy decoding gives exactly the tokens of full recomputation (3 prompts x 32)") {
  for (DType dt : {DType::f32, DType::f64}) {
    CAPTURE(dtype_name(dt));
    Gpt model(tiny(), dt, Device::cpu, 5);
    std::vector<std::vector<int32_t>> prompts = {{5, 17, 300, 2}, {42}, {7, 7, 7, 7, 7, 7, 7, 7, 100, 200, 3}};
    GenerateOptions o;
    o.max_new_tokens = 32;
    o.stop_id = -1;
    GenerateResult r = generate(model, prompts, o);
    REQUIRE(r.tokens.size() == 3);
    for (size_t i = 0; i < prompts.size(); ++i) {
      CAPTURE(i);
      CHECK(r.tokens[i] == greedy_full(model, prompts[i], 32));
    }
    CHECK(r.decode_steps == 31);
    CHECK(r.prefill_tokens == 16);
    // Alone or batched: the same tokens.
    GenerateResult one = generate(model, {prompts[2]}, o);
    CHECK(one.tokens[0] == r.tokens[2]);
  }
}

TEST_CASE("generate: exactly max_new_tokens new tokens for empty and non-empty prompts (an empty one starts from BOS)") {
  // GPT-2's vocabulary, so its bos_token_id 50256 is a token of the model (tiny's 512 lack it).
  GptConfig c = tiny();
  c.n_layer = 1;
  c.vocab_size = 50257;
  Gpt model(c, DType::f32, Device::cpu, 11);
  REQUIRE(model.bos_token_id() == 50256);
  const std::vector<std::vector<int32_t>> prompts = {{}, {5, 17, 300}, {}};
  for (int64_t n : {1, 2, 7}) {
    CAPTURE(n);
    GenerateOptions o;
    o.max_new_tokens = n;
    o.stop_id = -1;
    GenerateResult r = generate(model, prompts, o);
    REQUIRE(r.tokens.size() == 3);
    for (const auto& t : r.tokens) CHECK(int64_t(t.size()) == n);
    // As transformers: the empty prompt is [bos_token_id]; the BOS is context, not a new token.
    CHECK(r.tokens[0] == greedy_full(model, {50256}, n));
    CHECK(r.tokens[1] == greedy_full(model, prompts[1], n));
    CHECK(r.tokens[2] == r.tokens[0]);
    CHECK(r.prefill_tokens == 5);
    CHECK(r.decode_steps == n - 1);
    CHECK(generate(model, {{}}, o).tokens == std::vector<std::vector<int32_t>>{r.tokens[0]});
    o.temperature = 1.0;  // sampling: the same count
    for (const auto& t : generate(model, prompts, o).tokens) CHECK(int64_t(t.size()) == n);
  }
  // A stop token ends a row early (kept); an empty prompt fits n_positions with its BOS.
  GenerateOptions o;
  o.max_new_tokens = 7;
  o.stop_id = -1;
  const std::vector<int32_t> seven = generate(model, {{}}, o).tokens[0];
  o.stop_id = seven[2];
  const std::vector<int32_t> stopped = generate(model, {{}}, o).tokens[0];
  const auto at = std::find(seven.begin(), seven.end(), o.stop_id);
  CHECK(stopped == std::vector<int32_t>(seven.begin(), at + 1));
  o.stop_id = -1;
  o.max_new_tokens = c.n_positions - 1;
  CHECK(int64_t(generate(model, {{}}, o).tokens[0].size()) == c.n_positions - 1);
  o.max_new_tokens = c.n_positions;
  CHECK(contains(error_of([&] { generate(model, {{}}, o); }), "prompt 0 has 1 tokens; with --max-new-tokens 128"));
}

TEST_CASE("generate: stop token, sampling reproducible per row, top-k / top-p, bad options") {
  Gpt model(tiny(), DType::f32, Device::cpu, 9);
  std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}, {4}};
  GenerateOptions g;
  g.max_new_tokens = 10;
  g.stop_id = -1;
  GenerateResult greedy = generate(model, prompts, g);
  // A stop id the greedy path emits ends that row there (the stop token is kept).
  GenerateOptions st = g;
  st.stop_id = greedy.tokens[0][3];
  GenerateResult stopped = generate(model, prompts, st);
  const auto& row0 = greedy.tokens[0];
  const size_t first = size_t(std::find(row0.begin(), row0.end(), st.stop_id) - row0.begin());
  CHECK(stopped.tokens[0] == std::vector<int32_t>(row0.begin(), row0.begin() + int64_t(first) + 1));
  // top-k 1 is greedy; sampling with a seed repeats, and a row does not depend on its batch.
  GenerateOptions s = g;
  s.temperature = 1.0;
  s.top_k = 1;
  CHECK(generate(model, prompts, s).tokens == greedy.tokens);
  s.top_k = 40;
  s.top_p = 0.9;
  s.seed = 3;
  GenerateResult a = generate(model, prompts, s), b = generate(model, prompts, s);
  CHECK(a.tokens == b.tokens);
  CHECK(generate(model, {prompts[0]}, s).tokens[0] == a.tokens[0]);
  // sample_token: never outside the top-k; top-p keeps the smallest set reaching p.
  std::vector<float> logits = {0.0f, 5.0f, 1.0f, 4.9f, -3.0f};
  uint64_t rng = 1;
  for (int i = 0; i < 200; ++i) {
    int32_t t = sample_token(logits.data(), 5, 1.0, 2, 1.0, rng);
    CHECK((t == 1 || t == 3));
  }
  std::vector<float> peaked = {0.0f, 10.0f, 1.0f};
  for (int i = 0; i < 50; ++i) CHECK(sample_token(peaked.data(), 3, 1.0, 0, 0.5, rng) == 1);
  // Bad options and prompts.
  GenerateOptions bad = g;
  bad.max_new_tokens = 0;
  CHECK(contains(error_of([&] { generate(model, prompts, bad); }), "--max-new-tokens 0"));
  bad = g;
  bad.top_p = 0;
  CHECK(contains(error_of([&] { generate(model, prompts, bad); }), "--top-p 0"));
  bad = g;
  bad.temperature = -1;
  CHECK(contains(error_of([&] { generate(model, prompts, bad); }), "--temperature -1"));
  CHECK(contains(error_of([&] { generate(model, {{1}, {}}, g); }),
                 "prompt 1 is empty and the model's bos_token_id 50256 is outside its vocabulary (512)"));
  CHECK(contains(error_of([&] { generate(model, {{1, 999}}, g); }), "prompt 0 has token id 999"));
  GenerateOptions longer = g;
  longer.max_new_tokens = 120;
  CHECK(contains(error_of([&] { generate(model, {std::vector<int32_t>(10, 1)}, longer); }),
                 "prompt 0 has 10 tokens; with --max-new-tokens 120 that exceeds the model's n_positions 128"));
}

TEST_CASE("trainer: multiple-choice JSONL trains on prompt + the labelled choice; eval accuracy, best, summary") {
  test::TempDir dir;
  const std::string vocab = test::write_byte_vocab(dir.path / "vocab");
  Tokenizer tok = Tokenizer::from_dir(vocab);
  const std::string mc = write_mc(dir, "train.jsonl", 40, 1), ev = write_mc(dir, "eval.jsonl", 16, 2);
  // load_examples: the choice is the completion, no <|endoftext|> after it.
  std::vector<Example> ex = load_examples({mc}, tok, 64);
  McData d = load_mc_jsonl(mc, tok, 64);
  REQUIRE(ex.size() == 40);
  for (size_t i = 0; i < ex.size(); ++i) {
    std::vector<int32_t> want = d.examples[i].prompt;
    const auto& ch = d.examples[i].choices[size_t(d.examples[i].label)];
    want.insert(want.end(), ch.begin(), ch.end());
    CHECK(ex[i].tokens == want);
    CHECK(ex[i].n_prompt == int64_t(d.examples[i].prompt.size()));
    CHECK(ex[i].line == int64_t(i) + 1);
  }
  TrainOptions o;
  o.preset = "tiny";
  o.data = {mc};
  o.eval_data = {ev};
  o.vocab_dir = vocab;
  o.batch = 8;
  o.seq_len = 64;
  o.steps = 12;
  o.lr = 3e-3;
  o.eval_every = 4;
  o.save_best = "acc";
  o.dtype = "f32";
  o.device = "cpu";
  o.quiet = true;
  o.sample_tokens = 4;
  o.out_dir = (dir.path / "run").string();
  o.config_text = "# test\n";
  TrainResult r = train(o);
  REQUIRE(r.evals.size() == 3);
  for (auto& e : r.evals) {
    REQUIRE(e.mc.size() == 1);
    CHECK(e.mc[0].n == 16);
  }
  CHECK(r.best_step > 0);
  double best = 0;
  for (auto& e : r.evals) best = std::max(best, e.mc[0].acc);
  CHECK(r.best_value == best);
  const fs::path run = dir.path / "run";
  nlohmann::json info = nlohmann::json::parse(std::ifstream(run / "best" / "info.json"));
  CHECK(info["step"] == r.best_step);
  CHECK(fs::exists(run / "best" / "model.safetensors"));  // full training: the HF model
  CHECK(fs::exists(run / "final" / "vocab.json"));        // final/ carries the tokenizer
  CHECK(fs::exists(run / "final" / "merges.txt"));
  CHECK(fs::exists(run / "config.toml"));
  nlohmann::json sum = nlohmann::json::parse(std::ifstream(run / "summary.json"));
  CHECK(sum["final_step"] == 12);
  CHECK(sum["val_acc"] == r.evals.back().mc[0].acc);
  // Metrics: accuracy on every eval row, no MFU on the CPU.
  std::ifstream mf(run / "metrics.jsonl");
  std::string line;
  int n_eval = 0, n_step = 0;
  while (std::getline(mf, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("val_acc")) ++n_eval;
    if (j.contains("loss")) {
      ++n_step;
      CHECK_FALSE(j.contains("mfu"));
    }
  }
  CHECK(n_eval == 3);
  CHECK(n_step == 12);
  // The scores of the final model equal a fresh eval of final/.
  auto fin = load_hf_gpt((run / "final").string(), DType::f32, Device::cpu);
  McScores fresh = score_mc(*fin, load_mc_jsonl(ev, tok, 64));
  CHECK(fresh.acc == r.evals.back().mc[0].acc);
}

TEST_CASE("trainer: model flags, data formats and example fitting give clear errors") {
  test::TempDir dir;
  const std::string vocab = test::write_byte_vocab(dir.path / "vocab");
  TrainOptions o;
  o.vocab_dir = vocab;
  o.device = "cpu";
  o.dtype = "f32";
  o.quiet = true;
  o.out_dir = "";
  o.batch = 2;
  o.seq_len = 16;
  o.steps = 1;
  o.data = {write_mc(dir, "mc.jsonl", 8, 1)};
  CHECK(contains(error_of([&] { train(o); }), "no model: give --model DIR"));
  TrainOptions p = o;
  p.preset = "tiny";
  p.model_config = "x.json";
  CHECK(contains(error_of([&] { train(p); }), "--preset and --model-config both describe the model"));
  p = o;
  p.n_layer = 3;
  p.n_embd = 48;
  p.n_head = 4;
  p.n_positions = 32;
  p.preset = "tiny";
  std::unique_ptr<CausalLM> made = make_model(p, DType::f32, Device::cpu);
  auto* m = dynamic_cast<Gpt*>(made.get());
  REQUIRE(m != nullptr);
  CHECK(m->config().n_layer == 3);
  CHECK(m->config().n_embd == 48);
  CHECK(m->config().n_positions == 32);
  CHECK(m->config().vocab_size == 512);
  p.n_head = 5;
  CHECK(contains(error_of([&] { make_model(p, DType::f32, Device::cpu); }), "n_head 5 does not divide n_embd 48"));
  p = o;
  p.preset = "tiny";
  p.model_dir = "somewhere";
  CHECK(contains(error_of([&] { train(p); }), "--model loads a trained model"));
  // Formats: .json refused, JSONL never mixed with text, several JSONL files concatenated.
  p = o;
  p.preset = "tiny";
  p.data = {dir.write("d.json", "{}")};
  CHECK(contains(error_of([&] { train(p); }), "d.json: a .json file is not a data format here"));
  p.data = {o.data[0], dir.write("t.txt", "some text")};
  CHECK(contains(error_of([&] { train(p); }), "JSONL files cannot be mixed"));
  p.data = {o.data[0], write_mc(dir, "mc2.jsonl", 8, 2)};
  p.val_fraction = 0;
  p.seq_len = 64;
  p.batch = 16;
  CHECK_NOTHROW(train(p));  // 16 examples from two files make one batch of 16
  // A completion longer than --seq-len is an error naming the line; a long prompt is cut and counted.
  p.data = {dir.write("pc.jsonl", R"({"prompt": "x", "completion": "a long completion"})" "\n" +
                                      std::string(R"({"prompt": "a much longer prompt than fits", "completion": "ok"})") + "\n")};
  p.batch = 1;
  p.seq_len = 12;
  CHECK(contains(error_of([&] { train(p); }), "pc.jsonl:1: the completion has 18 tokens"));
  Tokenizer tok = Tokenizer::from_dir(vocab);
  std::vector<Example> ex = load_jsonl_examples(p.data[0], tok.text_encoder());
  ex.erase(ex.begin());
  CHECK(fit_examples(ex, 12, "f") == 1);
  CHECK(ex[0].tokens.size() == 13);
  CHECK(ex[0].n_prompt == 13 - 3);  // "ok" + <|endoftext|> kept whole
  p.val_fraction = 2;
  CHECK(contains(error_of([&] { train(p); }), "--val-fraction 2: must be in [0, 1)"));
  p.val_fraction = 0;
  p.save_best = "acc";
  CHECK(contains(error_of([&] { train(p); }), "--save-best acc needs --eval-data"));
}

TEST_CASE("train binary: the written config.toml reads back with --config to the same run; old --init is refused") {
  test::TempDir dir;
  const std::string vocab = test::write_byte_vocab(dir.path / "vocab");
  const std::string mc = write_mc(dir, "mc.jsonl", 24, 4);
  const std::string train = (fs::path(DEEPLORA_BUILD_DIR) / "train").string();
  const std::string a = (dir.path / "a").string(), b = (dir.path / "b").string();
  test::Run r1 = test::run_command(fmt::format(
      "{} --preset tiny --n-layer 1 --data {} --vocab-dir {} --batch 4 --seq-len 48 --steps 3 --lr 2e-3 --dtype f32 "
      "--device cpu --adapter lora --rank 2 --eval-data {} --out {}",
      train, mc, vocab, mc, a));
  REQUIRE_MESSAGE(r1.status == 0, r1.output);
  std::ifstream cf(fs::path(a) / "config.toml");
  std::string cfg((std::istreambuf_iterator<char>(cf)), std::istreambuf_iterator<char>());
  CHECK(contains(cfg, "rank=2"));
  CHECK(contains(cfg, "n-layer=1"));
  CHECK(contains(cfg, "adapter=\"lora\""));
  test::Run r2 = test::run_command(fmt::format("{} --config {}/config.toml --out {}", train, a, b));
  REQUIRE_MESSAGE(r2.status == 0, r2.output);
  auto losses = [](const std::string& d) {
    std::vector<double> v;
    std::ifstream f(fs::path(d) / "metrics.jsonl");
    for (std::string line; std::getline(f, line);) {
      auto j = nlohmann::json::parse(line);
      if (j.contains("loss")) v.push_back(j["loss"]);
    }
    return v;
  };
  CHECK(losses(a).size() == 3);
  CHECK(losses(a) == losses(b));
  // The adapter records its base; the run's final/ carries the tokenizer: eval and generate need no more.
  nlohmann::json ac = nlohmann::json::parse(std::ifstream(fs::path(a) / "adapter" / "adapter_config.json"));
  CHECK(contains(ac["base_model_name_or_path"].get<std::string>(), "random init (tiny"));
  test::Run ev = test::run_command(fmt::format("{} --model {}/final --data {} --device cpu",
                                               (fs::path(DEEPLORA_BUILD_DIR) / "eval").string(), a, mc));
  REQUIRE_MESSAGE(ev.status == 0, ev.output);
  CHECK(contains(ev.output, "\"kind\":\"multiple_choice\""));
  test::Run gen = test::run_command(fmt::format("{} --model {}/final --prompt hello --max-new-tokens 4 --device cpu",
                                                (fs::path(DEEPLORA_BUILD_DIR) / "generate").string(), a));
  REQUIRE_MESSAGE(gen.status == 0, gen.output);
  CHECK(contains(gen.output, "\"decode_tokens\":3"));
  // An empty prompt gets its --max-new-tokens like any other (tiny has no BOS in its vocabulary: it
  // starts from the tokenizer's <|endoftext|>).
  test::Run empty = test::run_command(
      fmt::format("{} --model {}/final --prompt '' --prompt hello --max-new-tokens 4 --no-stop --device cpu",
                  (fs::path(DEEPLORA_BUILD_DIR) / "generate").string(), a));
  REQUIRE_MESSAGE(empty.status == 0, empty.output);
  CHECK(contains(empty.output, "\"new_tokens\":8"));
  // Old and conflicting spellings.
  test::Run old = test::run_command(fmt::format("{} --init tiny --data {}", train, mc));
  CHECK(old.status != 0);
  CHECK(contains(old.output, "--init was split in two: --preset NAME"));
  test::Run none = test::run_command(fmt::format("{} --data {} --vocab-dir {} --out {}/c", train, mc, vocab, dir.path.string()));
  CHECK(none.status != 0);
  CHECK(contains(none.output, "no model: give --model DIR"));
  test::Run neg = test::run_command(fmt::format("{} --preset tiny --data {} --steps -3", train, mc));
  CHECK(neg.status != 0);
  CHECK(contains(neg.output, "--steps"));
}

TEST_CASE("generate on CUDA: the captured decode step gives the eager tokens, and both the CPU's (f32)") {
  if (!cuda_available()) {
    MESSAGE("skipped: " << cuda_unavailable_reason());
    return;
  }
  Gpt cpu(tiny(), DType::f32, Device::cpu, 5), gpu(tiny(), DType::f32, Device::cuda, 5);
  std::vector<std::vector<int32_t>> prompts = {{5, 17, 300, 2}, {42}, {7, 7, 7, 100, 200, 3}};
  GenerateOptions o;
  o.max_new_tokens = 32;
  o.stop_id = -1;
  GenerateResult want = generate(cpu, prompts, o);
  o.cuda_graph = false;
  GenerateResult eager = generate(gpu, prompts, o);
  o.cuda_graph = true;
  GenerateResult graphed = generate(gpu, prompts, o);
  CHECK(graphed.graph_used);
  CHECK_FALSE(eager.graph_used);
  CHECK(eager.tokens == want.tokens);
  CHECK(graphed.tokens == eager.tokens);
  for (size_t i = 0; i < prompts.size(); ++i) CHECK(greedy_full(gpu, prompts[i], 32) == want.tokens[i]);
  // Sampling on the GPU: the host draws from the device's logits, seeded per row.
  o.temperature = 0.8;
  o.top_k = 20;
  o.seed = 4;
  CHECK(generate(gpu, prompts, o).tokens == generate(gpu, prompts, o).tokens);
  // Multiple-choice scores on the GPU equal the CPU's (f32).
  test::TempDir dir;
  Tokenizer tok = Tokenizer::from_dir(test::write_byte_vocab(dir.path / "vocab"));
  McData data = load_mc_jsonl(write_mc(dir, "mc.jsonl", 40, 8), tok, 64);
  McScores sc = score_mc(cpu, data), sg = score_mc(gpu, data);
  CHECK(sg.pred == sc.pred);
  double worst = 0;
  for (size_t e = 0; e < data.examples.size(); ++e) worst = std::max(worst, test::rel_err(sg.logprob[e], sc.logprob[e]));
  CHECK(worst <= 1e-5);
}

TEST_CASE("Gpt::loss_at: the loss and gradients of the selected positions equal loss() with the rest ignored (f64)") {
  Gpt model(tiny(), DType::f64, Device::cpu, 3);
  const int64_t B = 3, T = 10;
  std::vector<int32_t> in(B * T), tg(B * T, -100), rows, compact;
  for (int64_t i = 0; i < B * T; ++i) in[size_t(i)] = int32_t((i * 53 + 7) % 500);
  for (int64_t i : {4, 5, 9, 17, 25, 26, 27}) {
    tg[size_t(i)] = int32_t((i * 31) % 500);
    rows.push_back(int32_t(i));
    compact.push_back(tg[size_t(i)]);
  }
  auto grads = [&](bool sparse) {
    for (auto& [n, p] : model.named_params()) p->master.zero_grad();
    Tensor tok = Tensor::from_ints(in, Shape{B, T});
    Tensor loss = sparse ? model.loss_at(tok, Tensor::from_ints(rows, Shape{7}), Tensor::from_ints(compact, Shape{7}))
                         : model.loss(tok, Tensor::from_ints(tg, Shape{B, T}));
    const double l = loss.item();
    backward(loss);
    std::vector<double> g = {l};
    for (auto& [n, p] : model.named_params())
      for (double x : p->master.grad().to_double()) g.push_back(x);
    return g;
  };
  std::vector<double> full = grads(false), sparse = grads(true);
  CHECK(std::abs(full[0] - sparse[0]) <= 1e-12 * std::abs(full[0]));
  CHECK(test::rel_err(sparse, full) <= 1e-12);
}

TEST_CASE("eval and generate vs transformers on the committed fixture (tests/data/hf_tiny/evalgen_expected.json)") {
  const fs::path fixture = fs::path(DEEPLORA_TEST_DATA) / "hf_tiny" / "evalgen_expected.json";
  if (!fs::exists(fixture)) {
    MESSAGE("skipped: " << fixture.string() << " is missing (made on the GPU machine by tools/device_check.sh evalgen)");
    return;
  }
  const nlohmann::json ex = nlohmann::json::parse(std::ifstream(fixture));
  test::TempDir dir;
  Tokenizer tok = Tokenizer::from_dir(test::write_byte_vocab(dir.path / "vocab"));  // id = byte, as the fixture's ids
  std::string lines;
  for (const auto& e : ex["examples"])
    lines += nlohmann::json{{"prompt", e["prompt"]}, {"choices", e["choices"]}, {"label", e["label"]}}.dump() + "\n";
  const std::string mc = dir.write("mc.jsonl", lines);
  std::vector<Device> devs = {Device::cpu};
  if (cuda_available()) devs.push_back(Device::cuda);
  for (Device dev : devs) {
    CAPTURE(device_name(dev));
    auto model = load_hf_gpt((fs::path(DEEPLORA_TEST_DATA) / "hf_tiny").string(), DType::f32, dev);
    McData data = load_mc_jsonl(mc, tok, 128);
    REQUIRE(data.examples.size() == ex["examples"].size());
    McScores s = score_mc(*model, data);
    double worst = 0;
    int64_t hits = 0;
    for (size_t i = 0; i < data.examples.size(); ++i) {
      std::vector<double> want = ex["examples"][i]["logprobs"].get<std::vector<double>>();
      for (size_t c = 0; c < want.size(); ++c) worst = std::max(worst, std::abs(s.logprob[i][c] - want[c]) / std::abs(want[c]));
      hits += int64_t(std::max_element(want.begin(), want.end()) - want.begin()) == ex["examples"][i]["label"].get<int64_t>();
    }
    CHECK(worst <= 1e-4);
    CHECK(s.acc == doctest::Approx(double(hits) / double(data.examples.size())));
    MESSAGE(fmt::format("vs transformers on {}: {} examples, worst per-choice log-prob rel err {:.2e}, accuracy {:.4f}",
                        device_name(dev), data.examples.size(), worst, s.acc));
    std::vector<std::vector<int32_t>> prompts;
    for (const auto& g : ex["generate"]) prompts.push_back(g["prompt"].get<std::vector<int32_t>>());
    GenerateOptions o;
    o.max_new_tokens = 64;
    o.stop_id = -1;
    GenerateResult r = generate(*model, prompts, o);
    for (size_t i = 0; i < prompts.size(); ++i) {
      CAPTURE(i);
      CHECK(r.tokens[i] == ex["generate"][i]["tokens"].get<std::vector<int32_t>>());
    }
  }
}

TEST_CASE("eval: a PEFT LoRA directory loads unmerged onto its base and changes the scores") {
  const std::string base = (fs::path(DEEPLORA_TEST_DATA) / "hf_tiny").string();
  const std::string peft = (fs::path(DEEPLORA_TEST_DATA) / "peft_tiny" / "adapter").string();
  test::TempDir dir;
  Tokenizer tok = Tokenizer::from_dir(test::write_byte_vocab(dir.path / "vocab"));
  McData data = load_mc_jsonl(write_mc(dir, "mc.jsonl", 12, 6), tok, 64);
  LoadedModel plain = load_for_inference(base, "", DType::f32, Device::cpu);
  LoadedModel lora = load_for_inference(base, peft, DType::f32, Device::cpu);
  CHECK(lora.adapter.kind == "lora");
  CHECK(lora.adapters.size() > 0);
  McScores a = score_mc(*plain.model, data), b = score_mc(*lora.model, data);
  CHECK(test::rel_err(b.logprob[0], a.logprob[0]) > 1e-4);  // the adapter is applied
  // Merged at load: the same scores to rounding.
  LoadedModel merged = load_for_inference(base, peft, DType::f32, Device::cpu, /*merge=*/true);
  CHECK(merged.adapters.empty());
  McScores c = score_mc(*merged.model, data);
  for (size_t e = 0; e < data.examples.size(); ++e) CHECK(test::rel_err(c.logprob[e], b.logprob[e]) <= 1e-5);
  CHECK(test::contains(test::error_of([&] { load_for_inference("", dir.path.string(), DType::f32, Device::cpu); }),
                       "adapter_config.json: cannot open"));
}
