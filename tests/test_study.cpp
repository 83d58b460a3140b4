// The few-shot study runner's bookkeeping, on a random tiny base and a synthetic task: the plan, the
// paired training subsets, lr selection from validation alone, repeatability, resuming, grid errors,
// and every run's test accuracy against a fresh evaluation of its exported adapter or model.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "models/eval.h"
#include "models/gpt_io.h"
#include "models/inference.h"
#include "models/study.h"
#include "models/tokenizer.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;
using json = nlohmann::json;
using test::contains;
using test::error_of;

namespace {

// A two-class task a tiny model can learn a little: the label is whether the text has more a's than b's.
void write_task(const fs::path& dir, uint64_t seed) {
  fs::create_directories(dir);
  std::mt19937_64 rng(seed);
  auto split = [&](const char* name, int n) {
    std::ofstream f(dir / name);
    for (int i = 0; i < n; ++i) {
      std::string text;
      int a = 0;
      for (int k = 0, len = 3 + int(rng() % 8); k < len; ++k) {
        const bool is_a = rng() % 2 == 0;
        a += is_a ? 1 : -1;
        text += is_a ? "a" : "b";
      }
      f << json{{"prompt", "x: " + text + "\nA:"}, {"choices", {" yes", " no"}}, {"label", a > 0 ? 0 : 1}}.dump() << "\n";
    }
  };
  split("train.jsonl", 80);
  split("val.jsonl", 16);
  split("test.jsonl", 20);
}

struct Fixture {
  test::TempDir dir;
  std::string base, task;
  Fixture() {
    base = (dir.path / "base").string();
    Gpt model(GptConfig::preset("tiny"), DType::f32, Device::cpu, 11);
    save_hf_gpt(model, base);
    test::write_byte_vocab(base);  // the base directory carries its tokenizer, as train's final/ does
    task = (dir.path / "toy").string();
    write_task(task, 5);
  }
  StudyGrid grid() const {
    json j = {{"base", base},
              {"tasks", {task}},
              {"n", {8, 16}},
              {"seeds", 2},
              {"rank", 2},
              {"ranks", {1, 2}},
              {"rank_n", {8}},
              {"min_steps", 4},
              {"max_steps", 4},
              {"batch", 8},
              {"methods",
               {{{"like", "lora"}, {"lr", {1e-3, 3e-2}}},
                {{"like", "deeplora"}, {"lr", {3e-2}}, {"rank_sweep", false}},
                {{"like", "full"}, {"lr", {1e-3}}, {"n", {8}}}}}};
    return StudyGrid::from_json(j, "test grid");
  }
};

std::vector<json> read_lines(const fs::path& p) {
  std::vector<json> v;
  std::ifstream f(p);
  for (std::string line; std::getline(f, line);) v.push_back(json::parse(line));
  return v;
}

}  // namespace

TEST_CASE("study: the plan covers the grid once; subsets are seeded, distinct and shared by the methods") {
  Fixture fx;
  StudyGrid g = fx.grid();
  std::vector<StudyRun> plan = plan_study(g);
  // lora: n=8 ranks {2, 1} x 2 seeds x 2 lrs = 8, n=16 rank 2: 4; deeplora 2 n x 2 seeds = 4; full n=8: 2.
  CHECK(plan.size() == 18);
  std::set<std::string> keys;
  for (const StudyRun& r : plan) CHECK(keys.insert(r.key()).second);
  CHECK(g.steps_for(g.methods[0], 16) == 4);
  std::vector<int64_t> a = training_subset(80, 16, 3), b = training_subset(80, 16, 3), c = training_subset(80, 16, 4);
  CHECK(a == b);
  CHECK(a != c);
  CHECK(std::set<int64_t>(a.begin(), a.end()).size() == 16);
  for (int64_t i : a) CHECK((i >= 0 && i < 80));
  CHECK(contains(error_of([] { training_subset(10, 11, 0); }), "training set of 11 examples requested from a pool of 10"));
  // Defaults: the five methods, the paper's sizes, 5 seeds.
  StudyGrid d = StudyGrid::from_json(json::object(), "defaults");
  CHECK(d.methods.size() == 5);
  CHECK(d.seeds == 5);
  CHECK(d.ns == std::vector<int64_t>{16, 64, 256, 1024});
  CHECK(d.methods[1].alpha_is_rank);
}

TEST_CASE("study: lr is chosen from validation accuracy alone; ties keep the smaller lr") {
  auto rec = [](double lr, int64_t seed, double val, double test) {
    RunRecord r;
    r.run = {"t", "m", "", 16, seed, 8, lr, 0, 0};
    r.val_acc = val;
    r.test_acc = test;
    return r;
  };
  std::vector<RunRecord> runs = {rec(1e-3, 0, 0.50, 0.90), rec(1e-3, 1, 0.60, 0.90), rec(1e-2, 0, 0.70, 0.10),
                                 rec(1e-2, 1, 0.60, 0.20), rec(1e-1, 0, 0.65, 0.99), rec(1e-1, 1, 0.65, 0.99)};
  std::vector<CellChoice> c = select_lrs(runs);
  REQUIRE(c.size() == 1);
  CHECK(c[0].lr == 1e-2);  // mean val .65 ties with 1e-1: the smaller wins; 1e-3's .55 loses despite its test .90
  CHECK(c[0].val_acc_mean == doctest::Approx(0.65));
  CHECK(c[0].test_acc_mean == doctest::Approx(0.15));
  CHECK(c[0].test_acc_std == doctest::Approx(std::sqrt(0.005)));
  CHECK(c[0].lrs == std::vector<double>{1e-3, 1e-2, 1e-1});
  // Scrambling every test accuracy changes no choice.
  std::vector<RunRecord> scrambled = runs;
  for (size_t i = 0; i < scrambled.size(); ++i) scrambled[i].test_acc = double((i * 7) % 5) / 5.0;
  CHECK(select_lrs(scrambled)[0].lr == c[0].lr);
  // An lr with fewer seeds than the cell's others is not eligible.
  runs.push_back(rec(1.0, 0, 0.99, 0.5));
  CHECK(select_lrs(runs)[0].lr == 1e-2);
}

TEST_CASE("study: a miniature study runs, repeats exactly, resumes, and every run equals a fresh eval of its export") {
  Fixture fx;
  StudyGrid g = fx.grid();
  StudyOptions o;
  o.quiet = true;
  o.device = "cpu";
  o.out_dir = (fx.dir.path / "a").string();
  o.export_dir = (fx.dir.path / "exports").string();
  StudySummary s = run_study(g, o);
  CHECK(s.complete);
  CHECK(s.done == 18);
  std::vector<json> runs = read_lines(fs::path(o.out_dir) / "runs.jsonl");
  REQUIRE(runs.size() == 18);
  for (const json& r : runs)
    for (const char* k : {"task", "method", "n", "seed", "rank", "lr", "steps", "train_loss", "val_acc", "test_acc",
                          "seconds", "options"})
      CHECK_MESSAGE(r.contains(k), k);
  CHECK(runs[0]["task"] == "toy");
  // selection.jsonl: one line per cell, each the validation argmax of its cell.
  std::vector<json> sel = read_lines(fs::path(o.out_dir) / "selection.jsonl");
  CHECK(sel.size() == 6);  // lora (8, r2) (8, r1) (16, r2); deeplora 8, 16; full 8
  json study = json::parse(std::ifstream(fs::path(o.out_dir) / "study.json"));
  CHECK(study["complete"] == true);
  CHECK(study["runs_done"] == 18);
  CHECK(study["classes"]["toy"] == 2);
  CHECK(study.contains("seconds_by_part"));

  // Every run's test accuracy equals a fresh evaluation of what it exported (base + adapter, or the model).
  Tokenizer tok = Tokenizer::from_dir(fx.base);
  McData test_set = load_mc_jsonl((fs::path(fx.task) / "test.jsonl").string(), tok, 128);
  for (size_t i = 0; i < runs.size(); ++i) {
    const fs::path d = fs::path(o.export_dir) / fmt::format("{:05d}", i);
    CAPTURE(runs[i]["method"]);
    const bool full = runs[i]["rank"].is_null();
    LoadedModel lm = full ? load_for_inference(d.string(), "", DType::f32, Device::cpu)
                          : load_for_inference("", d.string(), DType::f32, Device::cpu);  // the adapter names its base
    CHECK(score_mc(*lm.model, test_set).acc == runs[i]["test_acc"].get<double>());
  }
  // The eval binary says the same for one exported adapter.
  test::Run ev = test::run_command(fmt::format("{} --adapter {}/00000 --data {}/test.jsonl --device cpu --dtype f32",
                                               (fs::path(DEEPLORA_BUILD_DIR) / "eval").string(), o.export_dir, fx.task));
  REQUIRE_MESSAGE(ev.status == 0, ev.output);
  const json evj = json::parse(ev.output.substr(ev.output.find('{')));
  CHECK(evj["accuracy"].get<double>() == runs[0]["test_acc"].get<double>());

  // The same grid again: identical results (seconds aside).
  StudyOptions o2 = o;
  o2.out_dir = (fx.dir.path / "b").string();
  o2.export_dir = "";
  run_study(g, o2);
  std::vector<json> again = read_lines(fs::path(o2.out_dir) / "runs.jsonl");
  REQUIRE(again.size() == runs.size());
  for (size_t i = 0; i < runs.size(); ++i)
    for (const char* k : {"train_loss", "val_acc", "test_acc", "test_acc_norm", "lr", "seed"}) CHECK(again[i][k] == runs[i][k]);

  // Resume: a tiny budget stops after one run (exit status 3 from the tool), --resume finishes without repeats.
  StudyOptions o3 = o2;
  o3.out_dir = (fx.dir.path / "c").string();
  o3.time_budget = 1e-9;
  StudySummary part = run_study(g, o3);
  CHECK_FALSE(part.complete);
  CHECK(part.done == 1);
  CHECK(contains(error_of([&] { run_study(g, o3); }), "runs.jsonl exists: pass --resume"));
  o3.time_budget = 0;
  o3.resume = true;
  StudySummary rest = run_study(g, o3);
  CHECK(rest.complete);
  CHECK(rest.skipped == 1);
  CHECK(rest.done == 17);
  std::vector<json> resumed = read_lines(fs::path(o3.out_dir) / "runs.jsonl");
  REQUIRE(resumed.size() == runs.size());
  for (size_t i = 0; i < runs.size(); ++i) CHECK(resumed[i]["test_acc"] == runs[i]["test_acc"]);
  json st = json::parse(std::ifstream(fs::path(o3.out_dir) / "study.json"));
  CHECK(st["calls"].size() == 2);

  // A method whose options or steps changed under the same name is refused on resume (the key would
  // skip its runs and mix two settings under one label), naming runs.jsonl, the row and both settings.
  for (int what = 0; what < 2; ++what) {
    StudyGrid g2 = g;
    for (StudyMethod& m : g2.methods)
      if (m.adapter.kind == "deeplora") {
        if (what == 0) m.adapter.eps *= 10;
        else m.steps = 7;
      }
    const std::string e = error_of([&] { run_study(g2, o3); });
    CHECK_MESSAGE(contains(e, "runs.jsonl line "), e);
    CHECK_MESSAGE(contains(e, "was recorded with options"), e);
    CHECK_MESSAGE(contains(e, "new \"variant\" name"), e);
  }
  CHECK(read_lines(fs::path(o3.out_dir) / "runs.jsonl").size() == runs.size());  // nothing written
}

TEST_CASE("study: the tool runs a grid file; grid and task errors name the file and field") {
  Fixture fx;
  const std::string study = (fs::path(DEEPLORA_BUILD_DIR) / "study").string();
  json j = fx.grid().to_json();
  j["methods"] = json::array({{{"like", "lora"}, {"lr", {1e-3}}, {"rank_sweep", false}},
                              {{"like", "deeplora"}, {"lr", {3e-2}}, {"rank_sweep", false}}});
  j["n"] = {16};
  const std::string grid = fx.dir.write("grid.json", j.dump());
  test::Run r = test::run_command(fmt::format("{} --grid {} --out {}/s --device cpu --quiet", study, grid, fx.dir.path.string()));
  REQUIRE_MESSAGE(r.status == 0, r.output);
  CHECK(read_lines(fx.dir.path / "s" / "runs.jsonl").size() == 4);
  test::Run dry = test::run_command(fmt::format("{} --grid {} --dry-run", study, grid));
  CHECK(contains(dry.output, "4 runs"));
  auto err = [&](const json& bad) {
    return error_of([&] { StudyGrid::from_json(bad, "g.json"); });
  };
  CHECK(contains(err({{"seed", 3}}), "g.json: unknown field \"seed\""));
  CHECK(contains(err({{"seeds", 0}}), "\"seeds\" must be >= 1"));
  CHECK(contains(err({{"n", {16, -1}}}), "\"n\" values must be positive"));
  CHECK(contains(err({{"methods", {{{"like", "dora"}}}}}), "no default method named 'dora'"));
  CHECK(contains(err({{"methods", {{{"like", "lora"}, {"lr", json::array()}}}}}), "\"lr\" must list at least one"));
  CHECK(contains(err({{"methods", {{{"like", "lora"}, {"lr", {-1}}}}}}), "learning rate -1 must be positive"));
  CHECK(contains(err({{"methods", {{{"like", "deeplora"}, {"depth", 1}}}}}), "--depth 1"));
  CHECK(contains(err({{"methods", {{{"like", "lora"}}, {{"like", "lora"}}}}}), "appears twice"));
  CHECK(contains(err({{"dtype", "f16"}}), "\"dtype\" must be auto"));
  CHECK(contains(err({{"rank", "8"}}), "field \"rank\""));
  test::TempDir t2;
  fs::create_directories(t2.path / "empty");
  Tokenizer tok = Tokenizer::from_dir(fx.base);
  CHECK(contains(error_of([&] { load_study_task((t2.path / "empty").string(), tok, 64); }), "no train.jsonl"));
}
