// The causal-LM interface and the family registry: config.json's model_type picks the family (an
// unknown one is an error naming the file and the type), GPT-2's target-module table, a family added
// by registration alone (its own table drives the adapters and the PEFT export), and the trainer,
// eval, generate and the captured step running through a CausalLM reference.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "models/adapters.h"
#include "models/causal_lm.h"
#include "models/eval.h"
#include "models/generate.h"
#include "models/gpt.h"
#include "models/gpt_io.h"
#include "models/inference.h"
#include "models/tokenizer.h"
#include "models/train_step.h"
#include "models/trainer.h"
#include "runtime/optim.h"
#include "runtime/tape.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;
using test::contains;
using test::error_of;

namespace {

GptConfig tiny() { return GptConfig::preset("tiny"); }  // 2 x 64, vocab 512, 128 positions

std::vector<std::string> names(const std::vector<Linear*>& v) {
  std::vector<std::string> n;
  for (Linear* l : v) n.push_back(l->name);
  return n;
}

std::vector<double> logits(CausalLM& m, const std::vector<int32_t>& ids) {
  NoGrad ng;
  return m.forward(Tensor::from_ints(ids, Shape{1, int64_t(ids.size())}, m.device())).to_double();
}

// A GPT-2 under another model_type with its own adapter table and PEFT names: what registering a
// family changes, with no edit to the adapters or the export.
class AliasLM : public Gpt {
 public:
  using Gpt::Gpt;
  std::string model_type() const override { return "test-gpt2-alias"; }
};

void register_alias_once() {
  static const bool done = [] {
    CausalLMFamily f = gpt2_family();
    f.model_type = "test-gpt2-alias";
    f.architecture = "AliasForCausalLM";
    f.random_init = [](const std::string& config_path, const std::string&, const ModelSizes&, DType dt, Device dev,
                       uint64_t seed) -> std::unique_ptr<CausalLM> {
      GptConfig c = tiny();
      if (!config_path.empty()) {  // sizes from the file; its model_type is ours, not GptConfig's
        nlohmann::json j = nlohmann::json::parse(std::ifstream(config_path));
        c.n_layer = j.at("n_layer").get<int64_t>();
      }
      return std::make_unique<AliasLM>(c, dt, dev, seed);
    };
    f.presets = {};
    f.preset_aliases = {};
    f.targets.attn = {"mlp.c_fc"};  // deliberately not GPT-2's
    f.targets.mlp = {};
    f.targets.peft_default = {"c_fc"};
    f.hf_module_prefix = "";
    f.fan_in_fan_out = false;
    register_family(f);
    return true;
  }();
  (void)done;
}

}  // namespace

TEST_CASE("causal_lm registry: gpt2 is built in, with PEFT's target modules and the --adapt table") {
  const std::vector<std::string> fams = registered_families();
  CHECK(std::find(fams.begin(), fams.end(), "gpt2") != fams.end());
  const CausalLMFamily& f = causal_lm_family("gpt2");
  CHECK(f.model_type == "gpt2");
  CHECK(f.architecture == "GPT2LMHeadModel");
  CHECK(f.targets.peft_default == std::vector<std::string>{"c_attn"});
  CHECK(f.targets.attn == std::vector<std::string>{"attn.c_attn"});
  CHECK(f.targets.mlp == std::vector<std::string>{"mlp.c_fc", "mlp.c_proj"});
  CHECK(f.block_linears == std::vector<std::string>{"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"});
  CHECK(f.hf_module_prefix == "transformer.");
  CHECK(f.fan_in_fan_out);
  CHECK(block_module("h.11.attn.c_proj") == "attn.c_proj");
  CHECK(block_module("model.layers.3.self_attn.q_proj") == "self_attn.q_proj");
  CHECK(block_module("lm_head") == "lm_head");

  Gpt g(tiny(), DType::f32, Device::cpu, 1);
  CausalLM& m = g;
  CHECK(&m.family() == &f);
  CHECK(names(adapted_linears(m, "attn")) == std::vector<std::string>{"h.0.attn.c_attn", "h.1.attn.c_attn"});
  CHECK(names(adapted_linears(m, "attn-mlp")) ==
        std::vector<std::string>{"h.0.attn.c_attn", "h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.attn.c_attn", "h.1.mlp.c_fc",
                                 "h.1.mlp.c_proj"});
  CHECK(adapted_linears(m, "all").size() == 8);

  CHECK(family_of_preset("tiny").model_type == "gpt2");
  CHECK(family_of_preset("gpt2-small").model_type == "gpt2");
  CHECK(error_of([] { family_of_preset("nope"); }) ==
        "unknown model preset 'nope' (expected gpt2, gpt2-medium, gpt2-large, gpt2-xl, small-cpu or tiny)");
  CHECK(contains(error_of([] { register_family(gpt2_family()); }), "model_type 'gpt2' is registered already"));
  CHECK(contains(error_of([] { causal_lm_family("mamba"); }), "model_type 'mamba' is not a known model family (known: gpt2"));
}

TEST_CASE("causal_lm registry: config.json's model_type picks the family; an unknown one names the file and the type") {
  test::TempDir dir;
  Gpt a(tiny(), DType::f32, Device::cpu, 5);
  save_hf_gpt(a, (dir.path / "m").string());
  const std::string cfg = (dir.path / "m" / "config.json").string();
  CHECK(read_model_type(cfg) == "gpt2");

  std::unique_ptr<CausalLM> b = load_hf_causal_lm((dir.path / "m").string(), DType::f32, Device::cpu);
  CHECK(b->model_type() == "gpt2");
  auto* bg = dynamic_cast<Gpt*>(b.get());
  REQUIRE(bg != nullptr);
  CHECK(bg->config().str() == a.config().str());
  CHECK(b->describe() == a.config().str());
  CHECK(b->vocab_size() == 512);
  CHECK(b->padded_vocab() == 512);
  CHECK(b->max_positions() == 128);
  CHECK(b->n_layer() == 2);
  CHECK(b->hidden_size() == 64);
  CHECK(b->n_params() == a.config().n_params());
  const std::vector<int32_t> ids = {3, 1, 4, 1, 5, 9, 2, 6};
  CHECK(logits(*b, ids) == logits(a, ids));  // f32 file, same weights: the same logits bit for bit

  std::unique_ptr<CausalLM> r = causal_lm_from_config(cfg, DType::f32, Device::cpu, 5);
  CHECK(logits(*r, ids) == logits(a, ids));  // the same seed: HF's init, as Gpt's constructor

  // An unknown model_type: the loader, the trainer's --model-config and --model all name the file.
  fs::create_directories(dir.path / "mamba");
  const std::string bad = dir.write("mamba/config.json", R"({"model_type": "mamba", "hidden_size": 64})");
  const std::string e = error_of([&] { load_hf_causal_lm((dir.path / "mamba").string(), DType::f32, Device::cpu); });
  CHECK(contains(e, bad));
  CHECK(contains(e, "model_type 'mamba' is not a known model family (known: gpt2"));
  TrainOptions o;
  o.model_config = bad;
  CHECK(contains(error_of([&] { make_model(o, DType::f32, Device::cpu); }), bad + ": model_type 'mamba'"));
  o = TrainOptions{};
  o.model_dir = (dir.path / "mamba").string();
  CHECK(contains(error_of([&] { make_model(o, DType::f32, Device::cpu); }), "'mamba' is not a known model family"));
  const std::string num = dir.write("num.json", R"({"model_type": 7})");
  CHECK(contains(error_of([&] { read_model_type(num); }), num + ": model_type '7' is not a known model family"));
  CHECK(contains(error_of([&] { read_model_type(dir.file("none.json")); }), "none.json: cannot open config"));
}

TEST_CASE("causal_lm registry: a registered family's own table drives the adapters and the PEFT export") {
  register_alias_once();
  test::TempDir dir;
  AliasLM model(tiny(), DType::f32, Device::cpu, 2);
  CausalLM& m = model;
  CHECK(m.family().architecture == "AliasForCausalLM");
  // Its "attn" is mlp.c_fc (the table, not GPT-2's names in the adapter code).
  CHECK(names(adapted_linears(m, "attn")) == std::vector<std::string>{"h.0.mlp.c_fc", "h.1.mlp.c_fc"});
  AdapterOptions o;
  o.kind = "lora";
  o.rank = 2;
  o.adapt = "attn";
  Adapters ad = attach_adapters(m, o, nullptr);
  REQUIRE(ad.size() == 2);
  save_adapters(ad, o, (dir.path / "peft").string());
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(dir.path / "peft" / "adapter_config.json"));
  CHECK(cfg["target_modules"].get<std::vector<std::string>>() == std::vector<std::string>{"c_fc"});
  CHECK(cfg["fan_in_fan_out"] == false);
  SafetensorsFile f = load_safetensors((dir.path / "peft" / "adapter_model.safetensors").string());
  CHECK(f.contains("base_model.model.h.0.mlp.c_fc.lora_A.weight"));  // no "transformer." prefix here
  detach_adapters(m);
  AliasLM fresh(tiny(), DType::f32, Device::cpu, 2);
  Adapters back = load_adapters(fresh, (dir.path / "peft").string(), AdapterOptions{});
  REQUIRE(back.size() == 2);
  CHECK(back[0]->module() == "h.0.mlp.c_fc");
  CHECK(back[0]->family() == &fresh.family());

  // Loading by model_type reaches the family's random_init (then the HF weights).
  Gpt src(tiny(), DType::f32, Device::cpu, 9);
  save_hf_gpt(src, (dir.path / "alias").string());
  {
    nlohmann::json j = nlohmann::json::parse(std::ifstream(dir.path / "alias" / "config.json"));
    j["model_type"] = "test-gpt2-alias";
    std::ofstream(dir.path / "alias" / "config.json") << j.dump();
  }
  std::unique_ptr<CausalLM> loaded = load_hf_causal_lm((dir.path / "alias").string(), DType::f32, Device::cpu);
  CHECK(loaded->model_type() == "test-gpt2-alias");
  CHECK(dynamic_cast<AliasLM*>(loaded.get()) != nullptr);
  const std::vector<int32_t> ids = {7, 8, 9};
  CHECK(logits(*loaded, ids) == logits(src, ids));
}

TEST_CASE("causal_lm: the trainer, eval, generate and the captured step run through a CausalLM reference") {
  test::TempDir dir;
  Gpt direct(tiny(), DType::f32, Device::cpu, 3);
  std::unique_ptr<CausalLM> generic = std::make_unique<Gpt>(tiny(), DType::f32, Device::cpu, 3);
  CausalLM& g = *generic;

  // generate
  GenerateOptions go;
  go.max_new_tokens = 6;
  go.stop_id = -1;
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}, {4, 5}};
  GenerateResult ga = generate(direct, prompts, go), gb = generate(g, prompts, go);
  CHECK(gb.tokens == ga.tokens);
  CHECK(gb.tokens[0].size() == 6);

  // eval: multiple choice, token-stream loss and example loss
  Tokenizer tok = Tokenizer::from_dir(test::write_byte_vocab(dir.path / "vocab"));
  std::string text;
  for (int i = 0; i < 6; ++i)
    text += nlohmann::json{{"prompt", fmt::format("Q{} is", i)}, {"choices", {" a", " bb", " c"}}, {"label", i % 3}}.dump() +
            "\n";
  McData data = load_mc_jsonl(dir.write("mc.jsonl", text), tok, 32);
  McScores sa = score_mc(direct, data), sb = score_mc(g, data);
  CHECK(sb.logprob == sa.logprob);
  CHECK(sb.acc == sa.acc);
  std::vector<int32_t> stream;
  for (int i = 0; i < 100; ++i) stream.push_back((i * 37) % 200);
  CHECK(lm_loss(g, stream, 16, 2).loss == lm_loss(direct, stream, 16, 2).loss);
  std::vector<Example> ex = {Example{{1, 2, 3, 4, 5}, 2}, Example{{6, 7, 8}, 1}};
  CHECK(example_loss(g, ex).loss == example_loss(direct, ex).loss);

  // the captured step (eager on the CPU)
  {
    Gpt a(tiny(), DType::f32, Device::cpu, 4);
    std::unique_ptr<CausalLM> b = std::make_unique<Gpt>(tiny(), DType::f32, Device::cpu, 4);
    AdamW oa({ParamGroup{a.trainable_tensors(), 1.0, 0.0, "all"}}), ob({ParamGroup{b->trainable_tensors(), 1.0, 0.0, "all"}});
    TrainStep::Options so;
    so.batch = 2;
    so.seq_len = 8;
    TrainStep sa_(a, oa, so), sb_(*b, ob, so);
    Batch batch;
    batch.B = 2;
    batch.T = 8;
    for (int i = 0; i < 16; ++i) {
      batch.inputs.push_back(i * 5 % 64);
      batch.targets.push_back((i * 5 + 1) % 64);
    }
    CHECK(sb_.run({batch}, 1e-3).loss == sa_.run({batch}, 1e-3).loss);
    CHECK(b->param("h.0.mlp.c_fc.weight").master.to_double() == a.param("h.0.mlp.c_fc.weight").master.to_double());
  }

  // the trainer: an in-process model given as CausalLM*, with a LoRA adapter and an eval set
  const std::string shard = test::random_shard(dir.path, 3000, 7);
  auto run = [&](CausalLM* model) {
    TrainOptions o;
    o.vocab_dir = "";
    o.data = {shard};
    o.batch = 2;
    o.seq_len = 16;
    o.steps = 4;
    o.lr = 3e-3;
    o.dtype = "f32";
    o.device = "cpu";
    o.quiet = true;
    o.save_final = false;
    o.out_dir = "";
    o.adapter.kind = "lora";
    o.adapter.rank = 2;
    TrainInputs in;
    in.model = model;
    in.eval = {&data};
    return train(o, in);
  };
  TrainResult ra = run(&direct), rb = run(generic.get());
  CHECK(rb.losses == ra.losses);
  REQUIRE(rb.evals.size() == 1);
  CHECK(rb.evals[0].mc.at(0).logprob == ra.evals[0].mc.at(0).logprob);
  CHECK(rb.adapters.size() == 8);
  for (auto& a : rb.adapters) CHECK(a->family() == &g.family());

  // inference loading: LoadedModel holds a CausalLM of the directory's family
  save_hf_gpt(direct, (dir.path / "m").string());
  LoadedModel lm = load_for_inference((dir.path / "m").string(), "", DType::f32, Device::cpu);
  CHECK(lm.model->model_type() == "gpt2");
  CHECK(score_mc(*lm.model, data).logprob.size() == data.examples.size());
}

TEST_CASE("gpt: forward() is forward_padded()'s first vocab_size columns (a last-dim slice on the device)") {
  GptConfig c = tiny();
  c.vocab_size = 500;  // padded to 512
  Gpt m(c, DType::f32, Device::cpu, 5);
  REQUIRE(m.padded_vocab() == 512);
  Tensor tok = Tensor::from_ints({1, 2, 3, 4, 5, 6}, Shape{2, 3});
  std::vector<double> full, cut;
  {
    NoGrad ng;
    full = m.forward_padded(tok).to_double();
  }
  Tensor out = m.forward(tok);
  CHECK(out.shape() == Shape{2, 3, 500});
  cut = out.to_double();
  bool same = true;
  for (int64_t r = 0; r < 6; ++r)
    for (int64_t v = 0; v < 500; ++v) same = same && cut[size_t(r * 500 + v)] == full[size_t(r * 512 + v)];
  CHECK(same);
}
