// Reliability against a hostile user: a table of bad inputs and faults run against the binaries
// (train, tokenize, deep_mc, gpt_logits, dist_check, eval, generate, study, bench), each asserting the
// exit code, that the message names the file or flag, and that nothing already written changed (every
// file of a prepared tree hashed before and after). Then the faults that need more than one command:
// non-finite steps, checkpoints that fail their check, output directories shared by two runs, signals,
// an untied lm_head, empty dimensions, the tape after Gpt::forward.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "models/gpt.h"
#include "models/gpt_io.h"
#include "models/trainer.h"
#include "runtime/io/run_dir.h"
#include "runtime/io/safetensors.h"
#include "runtime/io/token_shards.h"
#include "runtime/ops.h"
#include "runtime/optim.h"
#include "runtime/tape.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;
using test::contains;
using test::Run;
using test::run_command;

namespace {

const std::string kBuild = DEEPLORA_BUILD_DIR;

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// FNV-1a of every regular file under root, by relative path.
std::map<std::string, uint64_t> hash_tree(const fs::path& root) {
  std::map<std::string, uint64_t> h;
  for (auto& e : fs::recursive_directory_iterator(root)) {
    if (!e.is_regular_file()) continue;
    uint64_t x = 1469598103934665603ULL;
    for (unsigned char c : slurp(e.path())) x = (x ^ c) * 1099511628211ULL;
    h[fs::relative(e.path(), root).string()] = x;
  }
  return h;
}

// What changed between two hashes of a tree: files removed or rewritten (new files are not listed).
std::string changed(const std::map<std::string, uint64_t>& before, const std::map<std::string, uint64_t>& after) {
  std::string out;
  for (auto& [p, x] : before) {
    auto it = after.find(p);
    if (it == after.end()) out += " removed " + p + ";";
    else if (it->second != x) out += " rewrote " + p + ";";
  }
  return out;
}

void write_shard(const fs::path& p, int64_t n, uint64_t seed, int alphabet = 64) {
  std::vector<uint16_t> t(static_cast<size_t>(n));
  uint64_t s = seed;
  for (auto& x : t) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    x = uint16_t((s >> 33) % uint64_t(alphabet));
  }
  write_token_shard(p.string(), std::span<const uint16_t>(t));
}

// A vocabulary whose ids lie beyond the tiny model's 512: byte b is id 600 + b.
void write_far_vocab(const fs::path& dir) {
  fs::create_directories(dir);
  std::string v = "{";
  for (int b = 0; b < 256; ++b) v += fmt::format("\"{}\": {}, ", test::json_escape(test::byte_token(b)), 600 + b);
  v += "\"<|endoftext|>\": 900}";
  std::ofstream(dir / "vocab.json") << v;
  std::ofstream(dir / "merges.txt") << "#version: 0.2\n";
}

std::string jsonl_lines(int n, int completion_len = 6) {
  std::string s;
  for (int i = 0; i < n; ++i)
    s += fmt::format("{{\"prompt\": \"q{} abc\", \"completion\": \"{}\"}}\n", i, std::string(size_t(completion_len), char('a' + i % 26)));
  return s;
}

std::string mc_lines(int n) {
  std::string s;
  for (int i = 0; i < n; ++i)
    s += fmt::format("{{\"prompt\": \"which {}?\", \"choices\": [\" yes\", \" no\"], \"label\": {}}}\n", i, i % 2);
  return s;
}

// The prepared tree every case runs against.
struct Fixture {
  fs::path d;
  Fixture() {
    d = test::fresh_dir("cli");
    test::write_byte_vocab(d / "vocab");
    write_far_vocab(d / "farvocab");
    write_shard(d / "train.bin", 6000, 1);
    write_shard(d / "val.bin", 1000, 2);
    {  // a shard whose token 77 is outside the tiny model's vocabulary
      std::vector<uint16_t> t(3000, 5);
      t[77] = 600;
      write_token_shard((d / "big_ids.bin").string(), std::span<const uint16_t>(t));
    }
    std::string shard = slurp(d / "train.bin");
    std::ofstream(d / "truncated.bin", std::ios::binary) << shard.substr(0, shard.size() - 7);
    std::string bad = shard;
    bad[0] = 'X';
    std::ofstream(d / "badmagic.bin", std::ios::binary) << bad;
    std::ofstream(d / "ok.jsonl") << jsonl_lines(40);
    std::ofstream(d / "ok2.jsonl") << jsonl_lines(12, 3);
    std::ofstream(d / "mc.jsonl") << mc_lines(20);
    std::ofstream(d / "bad_json.jsonl") << jsonl_lines(2) << "{\"prompt\": \"x\", \"completion\": \n" << jsonl_lines(3);
    std::ofstream(d / "missing_field.jsonl") << jsonl_lines(2) << "{\"prompt\": \"x\"}\n";
    std::ofstream(d / "long_completion.jsonl") << jsonl_lines(3, 200);
    std::ofstream(d / "empty.jsonl") << "\n\n";
    std::ofstream(d / "doc.json") << "{\"prompt\": \"a\", \"completion\": \"b\"}";
    std::ofstream(d / "text.txt") << "some plain text for training, long enough to make a few windows of sixteen "
                                     "tokens each with the byte vocabulary. " << std::string(600, 'z');
    std::ofstream(d / "prompts.txt") << "hello\n";
    std::ofstream(d / "afile") << "not a directory";
    std::ofstream(d / "bad.toml") << "no-such-option = 3\n";
    std::ofstream(d / "bad_vocab.json") << "{\"a\": ";
    // Models: a good tiny one, a corrupt safetensors, a bad config, an untied config without its head.
    GptConfig c = GptConfig::preset("tiny");
    Gpt m(c, DType::f32, Device::cpu, 3);
    save_hf_gpt(m, (d / "model").string());
    fs::create_directories(d / "model_corrupt");
    fs::copy_file(d / "model" / "config.json", d / "model_corrupt" / "config.json");
    std::string st = slurp(d / "model" / "model.safetensors");
    std::ofstream(d / "model_corrupt" / "model.safetensors", std::ios::binary) << st.substr(0, st.size() / 2);
    fs::create_directories(d / "model_badcfg");
    fs::copy_file(d / "model" / "model.safetensors", d / "model_badcfg" / "model.safetensors");
    std::ofstream(d / "model_badcfg" / "config.json")
        << "{\"model_type\": \"gpt2\", \"n_layer\": 2, \"n_head\": 5, \"n_embd\": 64, \"vocab_size\": 512}";
    fs::create_directories(d / "model_untied_nohead");
    fs::copy_file(d / "model" / "model.safetensors", d / "model_untied_nohead" / "model.safetensors");
    std::ofstream(d / "model_untied_nohead" / "config.json")
        << "{\"model_type\": \"gpt2\", \"n_layer\": 2, \"n_head\": 4, \"n_embd\": 64, \"vocab_size\": 512, "
           "\"n_positions\": 128, \"tie_word_embeddings\": false}";
    // gpt_logits inputs: ids with one outside the vocabulary, and a file without input_ids.
    save_safetensors((d / "ids_bad.safetensors").string(),
                     NamedTensors{{"input_ids", Tensor::from_ints({1, 2, 9999, 3}, Shape{1, 4})}});
    save_safetensors((d / "ids_none.safetensors").string(),
                     NamedTensors{{"tokens", Tensor::from_ints({1, 2, 3, 4}, Shape{1, 4})}});
    // deep_mc target files: truncated, and one with a repeated observed entry.
    std::ofstream(d / "target_truncated.txt") << "deep_mc_target 1\nd 10\nrank 2\nU\n1 2\n3 4\n";
    std::ofstream(d / "target_garbage.txt") << "hello world\n";
    // A previous run (checkpoints, final/, metrics) and an empty directory locked by nobody yet.
    Run r = run_command(fmt::format("{}/train --preset tiny --device cpu --dtype f32 --data {} --batch 2 --seq-len 16 "
                                    "--steps 4 --ckpt-every 2 --out {} --quiet",
                                    kBuild, (d / "train.bin").string(), (d / "prev").string()));
    if (r.status != 0) throw std::runtime_error("fixture: the previous run failed:\n" + r.output);
    fs::create_directories(d / "locked");
    { RunDirLock l((d / "locked").string()); }
  }
  ~Fixture() {
    std::error_code ec;
    fs::remove_all(d, ec);
  }
};

struct Case {
  std::string cmd;  // {B} build dir, {D} fixture dir, {N} a fresh output path, {T} train's common prefix
  int code;
  std::vector<std::string> says;  // each must appear in the output (flag or file names)
  bool hold_lock = false;         // the test holds the lock of {D}/locked meanwhile
};

std::string expand(std::string s, const std::map<std::string, std::string>& vars) {
  for (bool again = true; again;) {
    again = false;
    for (auto& [k, v] : vars)
      for (size_t at; (at = s.find(k)) != std::string::npos;) {
        s.replace(at, k.size(), v);
        again = true;
      }
  }
  return s;
}

std::vector<Case> cases() {
  const int kVal = 105, kReq = 106;  // CLI11's exit codes: a failed check, a missing required option
  return {
      // ---- train: numeric flags, range-checked at parse time, naming the flag ----
      {"{T} --steps -3", kVal, {"--steps"}},
      {"{T} --epochs -1", kVal, {"--epochs"}},
      {"{T} --epochs 0", kVal, {"--epochs"}},
      {"{T} --grad-accum 0", kVal, {"--grad-accum"}},
      {"{T} --grad-accum -2", kVal, {"--grad-accum"}},
      {"{T} --lr -1", kVal, {"--lr", "(0, 1e+06]"}},
      {"{T} --lr 0", kVal, {"--lr"}},
      {"{T} --lr nan", kVal, {"--lr"}},
      {"{T} --lr inf", kVal, {"--lr"}},
      {"{T} --warmup -5", kVal, {"--warmup"}},
      {"{T} --min-lr-ratio 2", kVal, {"--min-lr-ratio"}},
      {"{T} --min-lr-ratio -0.1", kVal, {"--min-lr-ratio"}},
      {"{T} --weight-decay -0.1", kVal, {"--weight-decay"}},
      {"{T} --clip -1", kVal, {"--clip"}},
      {"{T} --val-fraction 2", kVal, {"--val-fraction", "[0, 1)"}},
      {"{T} --val-fraction 1", kVal, {"--val-fraction"}},
      {"{T} --val-fraction -0.5", kVal, {"--val-fraction"}},
      {"{T} --batch 0", kVal, {"--batch"}},
      {"{T} --seq-len 0", kVal, {"--seq-len"}},
      {"{T} --eval-batches 0", kVal, {"--eval-batches"}},
      {"{T} --eval-every -1", kVal, {"--eval-every"}},
      {"{T} --ckpt-every -1", kVal, {"--ckpt-every"}},
      {"{T} --log-every -1", kVal, {"--log-every"}},
      {"{T} --sample-tokens -1", kVal, {"--sample-tokens"}},
      {"{T} --top-k -2", kVal, {"--top-k"}},
      {"{T} --max-bad-steps -1", kVal, {"--max-bad-steps"}},
      {"{T} --bucket-mb 0", kVal, {"--bucket-mb"}},
      {"{T} --peak-tflops 0", kVal, {"--peak-tflops"}},
      {"{T} --n-layer -1", kVal, {"--n-layer"}},
      {"{T} --n-embd 1000000", kVal, {"--n-embd"}},
      {"{T} --adapter lora --rank 0", kVal, {"--rank"}},
      {"{T} --adapter lora --alpha -1", kVal, {"--alpha"}},
      {"{T} --adapter deeplora --depth 1000", kVal, {"--depth"}},
      {"{T} --adapter deeplora --depth 1", kVal, {"--depth"}},
      {"{T} --adapter deeplora --eps 0", kVal, {"--eps"}},
      {"{T} --adapter deeplora --outer-lr-scale -1", kVal, {"--outer-lr-scale"}},
      {"{T} --adapter deeplora --svd-batches 100000", kVal, {"--svd-batches"}},
      {"{T} --device tpu", kVal, {"--device"}},
      {"{T} --dtype f16", kVal, {"--dtype"}},
      {"{T} --adapter qlora", kVal, {"--adapter"}},
      {"{T} --save-best best", kVal, {"--save-best"}},
      {"{B}/train --preset tiny --device cpu", kReq, {"--data"}},
      {"{T} --config {D}/bad.toml", 110, {"no-such-option"}},
      // ---- train: flags bounded by the model or the data, contradictory flags ----
      {"{T} --adapter deeplora --svd-batches 5000", 1, {"--svd-batches", "batches"}},
      {"{T} --sample-tokens 400", 1, {"--sample-tokens", "n_positions"}},
      {"{B}/train --preset tiny --device cpu --data {D}/train.bin --seq-len 1000", 1, {"--seq-len", "n_positions"}},
      {"{B}/train --init gpt2 --data {D}/train.bin", 2, {"--init", "--preset"}},
      {"{B}/train --model {D}/model --preset tiny --data {D}/train.bin --out {N}", 1, {"--model", "--preset"}},
      {"{B}/train --preset tiny --model-config {D}/model/config.json --data {D}/train.bin --out {N}", 1,
       {"--preset", "--model-config"}},
      {"{B}/train --data {D}/train.bin --device cpu --out {N}", 1, {"--model", "--preset"}},
      {"{T} --resume --overwrite", 1, {"--resume", "--overwrite"}},
      {"{T} --save-best acc", 1, {"--save-best", "--eval-data"}},
      // ---- train: data ----
      {"{P} --data {D} --out {N}", 1, {"--data", "is a directory"}},
      {"{P} --data {D}/nope.bin --out {N}", 1, {"nope.bin", "no such file"}},
      {"{P} --data {D}/train.bin --val-data {D}/vocab --out {N}", 1, {"--val-data", "is a directory"}},
      {"{P} --data {D}/doc.json --out {N}", 1, {"doc.json", "JSONL"}},
      {"{P} --data {D}/ok.jsonl {D}/train.bin --out {N}", 1, {"--data", "mixed"}},
      {"{P} --data {D}/ok.jsonl --val-data {D}/val.bin --out {N}", 1, {"--val-data"}},
      {"{P} --data {D}/big_ids.bin --out {N}", 1, {"big_ids.bin", "position 77", "600"}},
      {"{P} --data {D}/train.bin --val-data {D}/big_ids.bin --out {N}", 1, {"big_ids.bin", "position 77"}},
      {"{P} --data {D}/train.bin {D}/big_ids.bin --out {N}", 1, {"big_ids.bin", "position 77"}},
      {"{P} --data {D}/ok.jsonl --vocab-dir {D}/farvocab --out {N}", 1, {"ok.jsonl:1", "vocabulary"}},
      {"{P} --data {D}/ok.jsonl --val-data {D}/ok2.jsonl --vocab-dir {D}/farvocab --out {N}", 1, {"ok.jsonl:1"}},
      {"{P} --data {D}/text.txt --vocab-dir {D}/farvocab --out {N}", 1, {"text.txt", "position 0"}},
      {"{P} --data {D}/train.bin --eval-data {D}/mc.jsonl --vocab-dir {D}/farvocab --out {N}", 1, {"mc.jsonl:1"}},
      {"{P} --data {D}/train.bin --eval-prompts {D}/prompts.txt --vocab-dir {D}/farvocab --out {N}", 1,
       {"prompts.txt"}},
      {"{P} --data {D}/bad_json.jsonl --out {N}", 1, {"bad_json.jsonl:3", "JSON"}},
      {"{P} --data {D}/missing_field.jsonl --out {N}", 1, {"missing_field.jsonl:3", "completion"}},
      {"{P} --data {D}/long_completion.jsonl --out {N}", 1, {"long_completion.jsonl:1", "--seq-len"}},
      {"{P} --data {D}/empty.jsonl --out {N}", 1, {"empty.jsonl"}},
      {"{P} --data {D}/truncated.bin --out {N}", 1, {"truncated.bin"}},
      {"{P} --data {D}/badmagic.bin --out {N}", 1, {"badmagic.bin", "magic"}},
      {"{P} --data {D}/train.bin --eval-data {D}/ok.jsonl --out {N}", 1, {"--eval-data", "ok.jsonl"}},
      {"{P} --data {D}/train.bin --eval-prompts {D}/nope.txt --out {N}", 1, {"--eval-prompts", "nope.txt"}},
      {"{P} --data {D}/text.txt --vocab-dir {D}/novocab --out {N}", 1, {"text.txt", "tokenizer"}},
      // ---- train: models ----
      {"{M} --model {D}/nope --out {N}", 1, {"nope"}},
      {"{M} --model {D}/model_corrupt --out {N}", 1, {"model_corrupt/model.safetensors"}},
      {"{M} --model {D}/model_badcfg --out {N}", 1, {"model_badcfg/config.json", "n_head"}},
      {"{M} --model {D}/model_untied_nohead --out {N}", 1, {"lm_head.weight", "tie_word_embeddings"}},
      {"{M} --model {D}/model --adapter lora --adapter-init {D}/nope --out {N}", 1, {"--adapter-init"}},
      // ---- train: output directories ----
      {"{T} --out {D}/prev", 1, {"--out", "prev", "--resume", "--overwrite"}},
      {"{T} --out {D}/prev/", 1, {"--resume", "--overwrite"}},
      {"{B}/train --preset tiny --device cpu --data {D}/train.bin --batch 2 --seq-len 16 --steps 2 --resume --out {N}", 1,
       {"--resume", "no checkpoint"}},
      {"{B}/train --preset tiny --device cpu --data {D}/train.bin --batch 2 --seq-len 16 --steps 2 --out {D}/afile", 1,
       {"afile", "not a directory"}},
      {"{B}/train --preset tiny --device cpu --data {D}/train.bin --batch 2 --seq-len 16 --steps 2 --out {D}/locked", 1,
       {"locked", "another run"}, true},
      // ---- tokenize ----
      {"{K} --threads -1 {D}/text.txt", 1, {"--threads"}},
      {"{K} --threads 5000 {D}/text.txt", 1, {"--threads"}},
      {"{K} --val-fraction 1.5 {D}/text.txt", 1, {"--val-fraction"}},
      {"{K} --shard-tokens 0 {D}/text.txt", 1, {"--shard-tokens"}},
      {"{K} --shard-tokens abc {D}/text.txt", 1, {"--shard-tokens"}},
      {"{K} {D}", 1, {"is a directory"}},
      {"{K} {D}/nope.txt", 1, {"nope.txt"}},
      {"{K}", 1, {"no input files"}},
      {"{B}/tokenize --vocab {D}/bad_vocab.json --merges {D}/vocab/merges.txt --out-dir {N} {D}/text.txt", 1,
       {"bad_vocab.json"}},
      {"{K} --name a/b {D}/text.txt", 1, {"--name"}},
      {"{B}/tokenize --vocab {D}/vocab/vocab.json --merges {D}/vocab/merges.txt --out-dir {D}/afile {D}/text.txt", 1,
       {"--out-dir", "afile"}},
      // ---- deep_mc ----
      {"{C} --L 100", 2, {"--L"}},
      {"{C} --L 1", 2, {"--L"}},
      {"{C} --d 2", 2, {"--d"}},
      {"{C} --p 0", 2, {"--p"}},
      {"{C} --lr -1", 2, {"--lr"}},
      {"{C} --eps nan", 2, {"--eps"}},
      {"{C} --iters -5", 2, {"--iters"}},
      {"{C} --log-every 0", 2, {"--log-every"}},
      {"{C} --r 600 --d 1000", 2, {"--r"}},
      {"{C} --svd-iters 5000", 2, {"--svd-iters"}},
      {"{C} --method fast", 2, {"--method"}},
      {"{C} --target {D}/nope.txt", 2, {"nope.txt"}},
      {"{C} --target {D}/target_truncated.txt", 2, {"target_truncated.txt"}},
      {"{C} --target {D}/target_garbage.txt", 2, {"target_garbage.txt"}},
      // a loss that explodes but stays finite (0.02 -> 1e14 by iteration 55) is a divergence
      {"{C} --d 40 --r 2 --L 3 --iters 56 --log-every 1 --lr 1e4 --method compressed", 3, {"diverged", "--lr"}},
      // ---- gpt_logits ----
      {"{B}/gpt_logits --model {D}/model --ids {D}/ids_bad.safetensors --out {N}.st", 1, {"ids_bad.safetensors", "9999"}},
      {"{B}/gpt_logits --model {D}/model --ids {D}/ids_none.safetensors --out {N}.st", 1, {"input_ids"}},
      {"{B}/gpt_logits --model {D}/nope --ids {D}/ids_bad.safetensors --out {N}.st", 1, {"nope"}},
      {"{B}/gpt_logits --model {D}/model --ids {D}/ids_bad.safetensors --out {N}.st --dtype f16", kVal, {"--dtype"}},
      // ---- dist_check ----
      {"{B}/dist_check --data {D}/train.bin --batch 0 --out {N}", kVal, {"--batch"}},
      {"{B}/dist_check --data {D}/train.bin --lr -3 --out {N}", kVal, {"--lr"}},
      {"{B}/dist_check --data {D}/train.bin --out {D}/prev", 1, {"--resume", "--overwrite"}},
      // ---- eval, generate, study, bench: range checks at parse time ----
      {"{B}/eval --model {D}/model --data {D}/mc.jsonl --batch 0", kVal, {"--batch"}},
      {"{B}/eval --model {D}/model --data {D}/mc.jsonl --batch-tokens -1", kVal, {"--batch-tokens"}},
      {"{B}/eval --model {D}/model --data {D}/mc.jsonl --seq-len -4", kVal, {"--seq-len"}},
      {"{B}/generate --model {D}/model --prompt hi --max-new-tokens 0", kVal, {"--max-new-tokens"}},
      {"{B}/generate --model {D}/model --prompt hi --top-p 2", kVal, {"--top-p"}},
      {"{B}/generate --model {D}/model --prompt hi --temperature -1", kVal, {"--temperature"}},
      {"{B}/study --seeds 0 --dry-run", kVal, {"--seeds"}},
      {"{B}/study --time-budget -1 --dry-run", kVal, {"--time-budget"}},
      {"{B}/bench --reps 0", kVal, {"--reps"}},
      {"{B}/bench --n-layer -1", kVal, {"--n-layer"}},
      {"{B}/bench --copy-gib 0", kVal, {"--copy-gib"}},
  };
}

}  // namespace

TEST_CASE("cli: a table of bad inputs and faults: exit code, a message naming the flag or file, nothing changed") {
  Fixture fx;
  const std::string D = fx.d.string();
  const std::map<std::string, std::string> vars = {
      {"{T}", "{P} --data {D}/train.bin"},
      {"{P}", "{B}/train --preset tiny --device cpu --dtype f32 --batch 2 --seq-len 16 --steps 2"},
      {"{M}", "{B}/train --device cpu --dtype f32 --data {D}/train.bin --batch 2 --seq-len 16 --steps 2"},
      {"{K}", "{B}/tokenize --vocab {D}/vocab/vocab.json --merges {D}/vocab/merges.txt --out-dir {N}"},
      {"{C}", "{B}/deep_mc --device cpu --quiet"},
      {"{B}", kBuild},
      {"{D}", D},
  };
  const auto table = cases();
  CHECK(table.size() >= 60);
  int n_ok = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    const Case& c = table[i];
    const fs::path fresh = fx.d / fmt::format("fresh_{:03d}", i);
    auto v = vars;
    v["{N}"] = fresh.string();
    std::string cmd = expand(c.cmd, v);
    // Every train / dist_check run gets its own fresh --out (never the default out/run of the working
    // directory) and, for text and JSONL, the byte vocabulary unless the case names one.
    const bool trainer = contains(cmd, kBuild + "/train ") || contains(cmd, kBuild + "/dist_check ");
    if (trainer && !contains(cmd, " --out ")) cmd += " --out " + fresh.string();
    if (trainer && !contains(cmd, " --vocab-dir ")) cmd += " --vocab-dir " + D + "/vocab";
    const auto before = hash_tree(fx.d);
    std::optional<RunDirLock> lock;
    if (c.hold_lock) lock.emplace(D + "/locked");
    Run r = run_command(cmd + " < /dev/null");
    lock.reset();
    const auto after = hash_tree(fx.d);
    INFO("case " << i << ": " << c.cmd << "\n$ " << cmd << "\n" << r.output);
    bool ok = true;
    ok &= r.status == c.code;
    CHECK(r.status == c.code);
    for (const std::string& s : c.says) {
      ok &= contains(r.output, expand(s, v));
      CHECK_MESSAGE(contains(r.output, expand(s, v)), "the message should name '" << s << "'");
    }
    const std::string diff = changed(before, after);
    ok &= diff.empty();
    CHECK_MESSAGE(diff.empty(), "changed:" << diff);
    // A run that failed left no run files in its fresh output directory either.
    ok &= run_files(fresh.string()).empty();
    CHECK(run_files(fresh.string()).empty());
    n_ok += ok;
  }
  MESSAGE(n_ok << " of " << table.size() << " bad inputs and faults handled as expected");
}

// ---- non-finite steps and checkpoints ---------------------------------------------------------------

namespace {

TrainOptions tiny_run(const fs::path& out, const std::string& shard) {
  TrainOptions o;
  o.preset = "tiny";
  o.vocab_dir = "";
  o.data = {shard};
  o.batch = 2;
  o.seq_len = 16;
  o.steps = 8;
  o.lr = 3e-3;
  o.dtype = "f32";
  o.device = "cpu";
  o.quiet = true;
  o.save_final = false;
  o.out_dir = out.string();
  return o;
}

std::vector<nlohmann::json> metrics_rows(const fs::path& dir) {
  std::vector<nlohmann::json> rows;
  std::ifstream f(dir / "metrics.jsonl");
  std::string line;
  while (std::getline(f, line)) rows.push_back(nlohmann::json::parse(line));  // throws on a torn line
  return rows;
}

}  // namespace

TEST_CASE("trainer: a NaN gradient never reaches the weights: the step is skipped, counted, logged") {
  fs::path d = test::fresh_dir("nan-skip");
  const std::string shard = (d / "train.bin").string();
  write_shard(shard, 4000, 3);
  TrainOptions o = tiny_run(d / "run", shard);
  Gpt model(GptConfig::preset("tiny"), DType::f32, Device::cpu, 1);
  TrainInputs in;
  in.model = &model;
  std::vector<double> before;
  o.on_step = [&](int64_t step) {
    if (step == 3) before = model.param("h.0.mlp.c_fc.weight").master.to_double();
  };
  o.on_grads = [&](int64_t step, AdamW& opt) {
    if (step == 3) opt.flat_grads()[0].slice0(5, 6).fill(NAN);
  };
  bool checked = false;
  auto o2 = o;
  o2.on_step = [&](int64_t step) {
    o.on_step(step);
    if (step == 4) {  // step 3 (logged as step 4) changed nothing
      CHECK(model.param("h.0.mlp.c_fc.weight").master.to_double() == before);
      checked = true;
    }
  };
  TrainResult r = train(o2, in);
  CHECK(checked);
  CHECK(r.bad_steps == 1);
  CHECK(r.final_step == 8);
  for (auto& [n, p] : model.named_params())
    for (double x : p->master.to_double()) REQUIRE(std::isfinite(x));
  auto rows = metrics_rows(d / "run");
  REQUIRE(rows.size() >= 8);
  CHECK(rows[3].at("step") == 4);
  CHECK(rows[3].value("skipped", false));
  CHECK(rows[3].at("grad_norm").is_null());
  CHECK_FALSE(rows[4].value("skipped", false));
}

TEST_CASE("trainer: more than --max-bad-steps non-finite steps stop the run naming the step, the loss and the fix") {
  fs::path d = test::fresh_dir("nan-stop");
  const std::string shard = (d / "train.bin").string();
  write_shard(shard, 4000, 4);
  TrainOptions o = tiny_run(d / "run", shard);
  o.steps = 20;
  o.max_bad_steps = 2;
  o.ckpt_every = 2;
  o.on_grads = [](int64_t step, AdamW& opt) {
    if (step >= 5) opt.flat_grads()[0].fill(NAN);
  };
  const std::string e = test::error_of([&] { train(o); });
  INFO(e);
  CHECK(contains(e, "step 8"));  // steps 6, 7 and 8 (1-based, as logged) were bad: the third is one too many
  CHECK(contains(e, "--max-bad-steps 2"));
  CHECK(contains(e, "--lr"));
  CHECK(contains(e, "ckpt-00000006"));
  CHECK(slurp(d / "run" / "latest") == "ckpt-00000006\n");
}

TEST_CASE("trainer: no checkpoint is ever written holding a non-finite value; latest keeps the last good one") {
  fs::path d = test::fresh_dir("nan-ckpt");
  const std::string shard = (d / "train.bin").string();
  write_shard(shard, 4000, 5);
  TrainOptions o = tiny_run(d / "run", shard);
  o.ckpt_every = 2;
  o.steps = 10;
  Gpt model(GptConfig::preset("tiny"), DType::f32, Device::cpu, 2);
  TrainInputs in;
  in.model = &model;
  o.on_step = [&](int64_t step) {  // the weights themselves go bad (as an overflowing update would)
    if (step == 4) model.param("wpe.weight").master.slice0(3, 4).fill(INFINITY);
  };
  const std::string e = test::error_of([&] { train(o, in); });
  INFO(e);
  CHECK(contains(e, "checkpoint of step 6 was not written"));
  CHECK(contains(e, "wpe.weight"));
  CHECK(contains(e, "ckpt-00000004"));
  CHECK(slurp(d / "run" / "latest") == "ckpt-00000004\n");
  CHECK_FALSE(fs::exists(d / "run" / "ckpt-00000006"));
  CHECK(fs::exists(d / "run" / "ckpt-00000004" / "model.safetensors"));
}

TEST_CASE("train: --resume from a checkpoint that fails its check falls back to the newest good one and says so") {
  fs::path d = test::fresh_dir("resume-fallback");
  const std::string shard = (d / "train.bin").string();
  write_shard(shard, 4000, 6);
  Run first = run_command(fmt::format("{}/train --preset tiny --device cpu --dtype f32 --data {} --batch 2 --seq-len 16 "
                                      "--steps 6 --ckpt-every 2 --out {} --vocab-dir '' --quiet",
                                      kBuild, shard, (d / "run").string()));
  REQUIRE_MESSAGE(first.status == 0, first.output);
  CHECK(slurp(d / "run" / "latest") == "ckpt-00000006\n");
  // The newest checkpoint gets a NaN in its weights (a disk error, a bad copy).
  const std::string bad = (d / "run" / "ckpt-00000006" / "model.safetensors").string();
  SafetensorsFile f = load_safetensors(bad);
  NamedTensors ts(f.tensors.begin(), f.tensors.end());
  for (auto& [n, t] : ts)
    if (n == "wte.weight") {
      t = t.clone();
      t.slice0(0, 1).fill(NAN);
    }
  save_safetensors(bad, ts);
  Run r = run_command(fmt::format("{}/train --preset tiny --device cpu --dtype f32 --data {} --batch 2 --seq-len 16 "
                                  "--steps 8 --ckpt-every 2 --out {} --vocab-dir '' --resume",
                                  kBuild, shard, (d / "run").string()));
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(contains(r.output, "falling back to"));
  CHECK(contains(r.output, "ckpt-00000004"));
  CHECK(contains(r.output, "non-finite"));
  CHECK(contains(r.output, "resumed from step 4"));
  CHECK(slurp(d / "run" / "latest") == "ckpt-00000008\n");
  // Every checkpoint bad: an error naming each, nothing trained.
  REQUIRE(fs::exists(d / "run" / "ckpt-00000006"));  // the previous one is kept beside the newest
  std::ofstream(d / "run" / "ckpt-00000008" / "trainer.json") << "{";
  std::ofstream(d / "run" / "ckpt-00000006" / "optim.safetensors") << "short";
  Run z = run_command(fmt::format("{}/train --preset tiny --device cpu --dtype f32 --data {} --batch 2 --seq-len 16 "
                                  "--steps 8 --out {} --vocab-dir '' --resume",
                                  kBuild, shard, (d / "run").string()));
  INFO(z.output);
  CHECK(z.status == 1);
  CHECK(contains(z.output, "no usable checkpoint"));
  CHECK(contains(z.output, "ckpt-00000008/trainer.json"));
  CHECK(contains(z.output, "ckpt-00000006/optim.safetensors"));
}

// ---- output directories -------------------------------------------------------------------------------

TEST_CASE("train: one run per --out: a new run is refused, --overwrite replaces, a concurrent run is locked out") {
  fs::path d = test::fresh_dir("outdir");
  const std::string shard = (d / "train.bin").string();
  write_shard(shard, 6000, 7);
  const std::string out = (d / "run").string();
  const std::string cmd = fmt::format("{}/train --preset tiny --device cpu --dtype f32 --data {} --batch 2 --seq-len 16 "
                                      "--vocab-dir '' --out {}",
                                      kBuild, shard, out);
  Run a = run_command(cmd + " --steps 3 --quiet");
  REQUIRE_MESSAGE(a.status == 0, a.output);
  const std::string metrics = slurp(fs::path(out) / "metrics.jsonl");
  Run b = run_command(cmd + " --steps 3");
  CHECK(b.status == 1);
  CHECK(contains(b.output, "--overwrite"));
  CHECK(slurp(fs::path(out) / "metrics.jsonl") == metrics);
  Run c = run_command(cmd + " --steps 5 --overwrite");
  CHECK(c.status == 0);
  CHECK(contains(c.output, "removing the previous run"));
  CHECK(metrics_rows(out).size() == 6);  // 5 steps + the eval; the old rows are gone
  CHECK(nlohmann::json::parse(slurp(fs::path(out) / "summary.json")).at("final_step") == 5);

  // Two at once: the second one is locked out while the first trains; the first's metrics stay whole.
  const std::string out2 = (d / "race").string();
  const std::string log = (d / "race.log").string();
  const std::string long_run = fmt::format("{}/train --preset tiny --device cpu --dtype f32 --data {} --batch 2 "
                                           "--seq-len 16 --vocab-dir '' --out {} --steps 400 --log-every 1",
                                           kBuild, shard, out2);
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    execl("/bin/sh", "sh", "-c", ("exec " + long_run).c_str(), (char*)nullptr);
    _exit(127);
  }
  for (int i = 0; i < 400 && !contains(slurp(log), "step     3/"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  Run second = run_command(fmt::format("{}/train --preset tiny --device cpu --dtype f32 --data {} --batch 2 --seq-len 16 "
                                       "--vocab-dir '' --out {} --steps 3 --overwrite",
                                       kBuild, shard, out2));
  CHECK(second.status == 1);
  CHECK(contains(second.output, "another run"));
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  auto rows = metrics_rows(out2);
  CHECK(rows.size() == 401);
  for (size_t i = 0; i + 1 < rows.size(); ++i) CHECK(rows[i].at("step") == int64_t(i + 1));
}

// ---- signals --------------------------------------------------------------------------------------------

namespace {

// Starts argv with stdout and stderr to log; default signal dispositions (exec resets handlers).
pid_t spawn(const std::string& cmd, const std::string& log) {
  pid_t pid = fork();
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), (char*)nullptr);
    _exit(127);
  }
  return pid;
}

bool wait_for(const std::string& log, const std::string& text, double seconds) {
  const auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds) {
    if (contains(slurp(log), text)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

}  // namespace

TEST_CASE("train: SIGINT / SIGTERM finish the step, write a checkpoint, exit 130 / 143 saying where; --resume goes on") {
  fs::path d = test::fresh_dir("signals");
  const std::string shard = (d / "train.bin").string();
  write_shard(shard, 6000, 8);
  for (int sig : {SIGINT, SIGTERM}) {
    CAPTURE(sig);
    const fs::path out = d / fmt::format("run{}", sig);
    const std::string log = (d / fmt::format("log{}", sig)).string();
    const std::string cmd = fmt::format("{}/train --preset tiny --device cpu --dtype f32 --data {} --batch 2 --seq-len 16 "
                                        "--vocab-dir '' --out {} --log-every 1",
                                        kBuild, shard, out.string());
    pid_t pid = spawn(cmd + " --steps 100000", log);
    REQUIRE(pid > 0);
    REQUIRE(wait_for(log, "step     5/", 60));  // the log is line-buffered: it shows up while it runs
    kill(pid, sig);
    int status = 0;
    waitpid(pid, &status, 0);
    const std::string text = slurp(log);
    INFO(text);
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 128 + sig);
    CHECK(contains(text, sig == SIGINT ? "stopped by SIGINT" : "stopped by SIGTERM"));
    std::string latest = slurp(out / "latest");
    REQUIRE(latest.size() > 6);
    latest.pop_back();
    CHECK(contains(text, (out / latest).string()));
    const int64_t step = std::stoll(latest.substr(5));
    CHECK(step >= 5);
    CHECK(metrics_rows(out).size() == size_t(step));
    Run r = run_command(cmd + fmt::format(" --steps {} --resume --quiet", step + 2));
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK(metrics_rows(out).back().at("step") == step + 2);
  }
}

TEST_CASE("trainer: in-process train() without an out_dir leaves the process's signal handlers alone") {
  fs::path d = test::fresh_dir("nosignals");
  const std::string shard = (d / "train.bin").string();
  write_shard(shard, 3000, 9);
  struct sigaction before {}, during {}, after {};
  sigaction(SIGINT, nullptr, &before);
  TrainOptions o = tiny_run("", shard);
  o.out_dir = "";
  o.steps = 2;
  o.on_step = [&](int64_t) { sigaction(SIGINT, nullptr, &during); };
  for (int i = 0; i < 3; ++i) train(o);
  sigaction(SIGINT, nullptr, &after);
  CHECK((during.sa_handler == before.sa_handler));
  CHECK((after.sa_handler == before.sa_handler));
  // With an out_dir the handler is installed for the call and taken down after it.
  TrainOptions w = tiny_run(d / "run", shard);
  w.steps = 2;
  w.on_step = [&](int64_t) { sigaction(SIGINT, nullptr, &during); };
  train(w);
  sigaction(SIGINT, nullptr, &after);
  CHECK((during.sa_handler != before.sa_handler));
  CHECK((after.sa_handler == before.sa_handler));
}

TEST_CASE("train: a run killed with -9 keeps its log (stdout is line-buffered when redirected)") {
  fs::path d = test::fresh_dir("linebuf");
  const std::string shard = (d / "train.bin").string();
  write_shard(shard, 6000, 10);
  const std::string log = (d / "log").string();
  pid_t pid = spawn(fmt::format("{}/train --preset tiny --device cpu --dtype f32 --data {} --batch 2 --seq-len 16 "
                                "--vocab-dir '' --out {} --steps 100000 --log-every 1",
                                kBuild, shard, (d / "run").string()),
                    log);
  const bool seen = wait_for(log, "step     3/", 60);
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  CHECK(seen);
  CHECK(contains(slurp(log), "model: GPT-2"));
}

// ---- data --------------------------------------------------------------------------------------------

TEST_CASE("trainer: several JSONL files are read as JSONL (prompts masked), each error naming its own file") {
  fs::path d = test::fresh_dir("multi-jsonl");
  test::write_byte_vocab(d / "vocab");
  std::ofstream(d / "a.jsonl") << jsonl_lines(10);
  std::ofstream(d / "b.jsonl") << mc_lines(10);
  TrainOptions o = tiny_run("", "");
  o.out_dir = "";
  o.vocab_dir = (d / "vocab").string();
  o.data = {(d / "a.jsonl").string(), (d / "b.jsonl").string()};
  o.steps = 2;
  o.val_fraction = 0;
  TrainResult r = train(o);
  CHECK(r.losses.size() == 2);
  std::ofstream(d / "c.jsonl") << jsonl_lines(2) << "not json\n";
  o.data.push_back((d / "c.jsonl").string());
  const std::string e = test::error_of([&] { train(o); });
  CHECK(contains(e, "c.jsonl:3"));
}

// ---- correctness -------------------------------------------------------------------------------------

TEST_CASE("gpt: an untied lm_head (tie_word_embeddings false) is loaded, used, trained and saved") {
  fs::path d = test::fresh_dir("untied");
  GptConfig c = GptConfig::preset("tiny");
  c.vocab_size = 500;  // padded to 512: the head's padding rows too
  c.tie_word_embeddings = false;
  Gpt m(c, DType::f32, Device::cpu, 4);
  CHECK(m.n_trainable() == c.n_params() + (c.padded_vocab() - c.vocab_size) * 2 * c.n_embd);
  save_hf_gpt(m, (d / "m").string());
  const auto j = nlohmann::json::parse(slurp(d / "m" / "config.json"));
  CHECK(j.at("tie_word_embeddings") == false);
  SafetensorsFile f = load_safetensors((d / "m" / "model.safetensors").string());
  REQUIRE(f.contains("lm_head.weight"));
  CHECK(f.at("lm_head.weight").shape() == Shape{500, 64});
  auto back = load_hf_gpt((d / "m").string(), DType::f32, Device::cpu);
  CHECK_FALSE(back->config().tie_word_embeddings);
  Tensor tok = Tensor::from_ints({1, 7, 42, 499}, Shape{1, 4});
  {
    NoGrad ng;
    const std::vector<double> a = m.forward(tok).to_double(), b = back->forward(tok).to_double();
    CHECK(test::rel_err(b, a) < 1e-12);
    // The logits are the head's, not wte's: h . lm_head^T.
    Tensor h = back->hidden(tok);
    const std::vector<double> direct = ops::linear(h, back->param("lm_head.weight").master.slice0(0, 500)).to_double();
    CHECK(test::rel_err(b, direct) < 1e-6);
    const std::vector<double> tied = ops::linear(h, back->param("wte.weight").master.slice0(0, 500)).to_double();
    CHECK(test::rel_err(tied, direct) > 0.1);
  }
  // Trained: the head has its own gradient and moves.
  const std::vector<double> head0 = back->param("lm_head.weight").master.to_double();
  std::vector<uint16_t> toks(2000);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = uint16_t((i * 7) % 50);
  write_token_shard((d / "t.bin").string(), std::span<const uint16_t>(toks));
  TrainOptions o = tiny_run("", (d / "t.bin").string());
  o.out_dir = "";
  o.steps = 2;
  TrainInputs in;
  in.model = back.get();
  train(o, in);
  CHECK(test::rel_err(back->param("lm_head.weight").master.to_double(), head0) > 1e-4);
  // A tied model's file may carry an lm_head.weight copy (transformers writes one): ignored, as there.
  Gpt tm(GptConfig::preset("tiny"), DType::f32, Device::cpu, 6);
  NamedTensors st = hf_state_dict(tm);
  st.emplace_back("lm_head.weight", tm.param("wte.weight").master.clone());
  fs::create_directories(d / "tied");
  save_safetensors((d / "tied" / "model.safetensors").string(), st);
  tm.config().save_json_file((d / "tied" / "config.json").string());
  CHECK_NOTHROW(load_hf_gpt((d / "tied").string(), DType::f32, Device::cpu));
}

TEST_CASE("ops: an empty last dimension is a named error, not a division by zero") {
  Tensor x = Tensor::zeros(Shape{3, 0}, DType::f32);
  Tensor w = Tensor::zeros(Shape{4, 0}, DType::f32);
  Tensor lw = Tensor::zeros(Shape{0}, DType::f32);
  CHECK(contains(test::error_of([&] { ops::linear(x, w); }), "linear"));
  CHECK(contains(test::error_of([&] { ops::linear(x, w); }), "empty"));
  CHECK(contains(test::error_of([&] { ops::layernorm(x, lw, lw); }), "layernorm"));
  Tensor t = Tensor::from_ints({0, 0, 0}, Shape{3});
  CHECK(contains(test::error_of([&] { ops::cross_entropy(x, t); }), "cross_entropy"));
  CHECK(contains(test::error_of([&] { ops::token_nll(x, t); }), "token_nll"));
  Tensor q = Tensor::zeros(Shape{1, 2, 0}, DType::f32);
  CHECK(contains(test::error_of([&] { ops::attention(q, 1); }), "attention"));
}

TEST_CASE("gpt: forward with a padded vocabulary leaves nothing on the tape") {
  GptConfig c = GptConfig::preset("tiny");
  c.vocab_size = 500;
  Gpt m(c, DType::f32, Device::cpu, 5);
  tape().clear();
  const size_t before = tape().size();
  Tensor logits = m.forward(Tensor::from_ints({1, 2, 3}, Shape{1, 3}));
  CHECK(logits.shape() == Shape{1, 3, 500});
  CHECK(tape().size() == before);
  // Unpadded (vocab a multiple of 64): forward stays differentiable.
  Gpt t(GptConfig::preset("tiny"), DType::f32, Device::cpu, 5);
  Tensor l2 = t.forward(Tensor::from_ints({1, 2, 3}, Shape{1, 3}));
  CHECK(tape().size() > before);
  tape().clear();
}
