// Adapter files: LoRA as PEFT's adapter_model.safetensors + adapter_config.json (lora_A [r, in],
// lora_B [out, r] in nn.Linear layout; module names, prefix and fan_in_fan_out from the model's family:
// GPT-2's Conv1D targets have fan_in_fan_out = true), Deep LoRA as
// our own pair of files with the spec's A [m, k], B [n, k], K_i [k, k] (or the wide W_i); and loading
// either back onto a model with every layer and shape checked.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "models/adapters.h"
#include "runtime/io/atomic_file.h"
#include "runtime/io/safetensors.h"
#include "runtime/tape.h"

namespace deeplora {
namespace fs = std::filesystem;

namespace {

constexpr const char* kPeftRoot = "base_model.model.";

Tensor host_f32(const Tensor& t) { return t.to(Device::cpu).to(DType::f32); }
// Deeplora files keep the master dtype (f32; f64 for f64 experiments, so they round-trip exactly).
Tensor host(const Tensor& t) { return t.to(Device::cpu); }

// PEFT target_modules (suffix match on module names): for each adapted module within a block, in the
// family's order, the shortest dotted suffix that matches adapted modules only (GPT-2: c_proj exists in
// attn and mlp, so it is qualified unless both are adapted).
std::vector<std::string> peft_targets(const Adapters& adapters, const CausalLMFamily& fam) {
  auto ends = [](const std::string& s, const std::string& x) {
    return s == x || (s.size() > x.size() && s.compare(s.size() - x.size() - 1, std::string::npos, "." + x) == 0);
  };
  std::set<std::string> have;
  for (auto& a : adapters) have.insert(block_module(a->module()));
  std::vector<std::string> v;
  for (const std::string& m : fam.block_linears) {
    if (!have.count(m)) continue;
    std::string suffix = m;
    for (size_t dot = m.rfind('.'); ; dot = m.rfind('.', dot - 1)) {
      const std::string s = dot == std::string::npos ? m : m.substr(dot + 1);
      bool only_adapted = true;
      for (const std::string& other : fam.block_linears)
        if (ends(other, s) && !have.count(other)) only_adapted = false;
      if (only_adapted) {
        suffix = s;
        break;
      }
      if (dot == std::string::npos || dot == 0) break;
    }
    if (std::find(v.begin(), v.end(), suffix) == v.end()) v.push_back(suffix);
  }
  return v;
}

const CausalLMFamily& family_of(const Adapters& adapters) {
  const CausalLMFamily* f = adapters.front()->family();
  check(f != nullptr, "save_adapters",
        "the adapters do not record their model family (make them with attach_adapters or load_adapters)");
  for (auto& a : adapters)
    check(a->family() == f, "save_adapters", "adapters of different model families");
  return *f;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  if (!f)
    throw std::runtime_error(fmt::format("{}: cannot open (expected a directory written by save_adapters or PEFT)", p.string()));
  try {
    return nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: not valid JSON: {}", p.string(), e.what()));
  }
}

[[noreturn]] void mismatch(const std::string& file, const std::string& msg) {
  throw std::runtime_error(fmt::format("{}: {} (the adapter was made for another model?)", file, msg));
}

// The model's layer `module` with the shape the file claims, or a clear error.
Linear& layer_of(CausalLM& model, const std::string& file, const std::string& module) {
  for (Linear* l : model.linears())
    if (l->name == module) return *l;
  mismatch(file, fmt::format("layer '{}' does not exist in this model ({} layers of width {})", module,
                             model.n_layer(), model.hidden_size()));
}

void expect_shape(const std::string& file, const std::string& name, const Tensor& t, Shape want) {
  if (t.shape() != want)
    mismatch(file, fmt::format("tensor '{}' has shape {}, this model needs {}", name, t.shape().str(), want.str()));
  for (double v : t.to_double())
    if (!std::isfinite(v)) throw std::runtime_error(fmt::format("{}: tensor '{}' has non-finite values", file, name));
}

Tensor on(const Tensor& t, const Tensor& like) { return t.to(like.dtype()).to(like.device()); }

}  // namespace

void save_adapters(const Adapters& adapters, const AdapterOptions& o, const std::string& dir,
                   const std::string& base_model) {
  check(!adapters.empty(), "save_adapters", "no adapters to save");
  const std::string kind = adapters.front()->kind();
  for (auto& a : adapters)
    check(a->kind() == kind, "save_adapters", fmt::format("mixed adapter kinds ({} and {})", kind, a->kind()));
  fs::create_directories(dir);
  const std::string st_path = (fs::path(dir) / "adapter_model.safetensors").string();
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  NamedTensors tensors;
  nlohmann::json cfg;
  if (kind == "lora") {
    const CausalLMFamily& fam = family_of(adapters);
    const std::string prefix = kPeftRoot + fam.hf_module_prefix;
    auto* first = static_cast<LoraAdapter*>(adapters.front().get());
    for (auto& a : adapters) {
      auto* l = static_cast<LoraAdapter*>(a.get());
      check(l->rank() == first->rank() && l->alpha() == first->alpha(), "save_adapters",
            "PEFT export needs one rank and alpha for all layers");
      tensors.emplace_back(prefix + a->module() + ".lora_A.weight", host_f32(l->A()));
      tensors.emplace_back(prefix + a->module() + ".lora_B.weight", host_f32(l->B()));
    }
    const double alpha = first->alpha();
    cfg = {{"peft_type", "LORA"},
           {"task_type", "CAUSAL_LM"},
           {"base_model_name_or_path", base_model},
           {"r", first->rank()},
           {"target_modules", peft_targets(adapters, fam)},
           {"fan_in_fan_out", fam.fan_in_fan_out},  // GPT-2's Conv1D stores W as [in, out]
           {"lora_dropout", 0.0},
           {"bias", "none"},
           {"use_rslora", false},
           {"use_dora", false},
           {"init_lora_weights", true},
           {"inference_mode", true},
           {"modules_to_save", nullptr},
           {"layers_to_transform", nullptr},
           {"layers_pattern", nullptr},
           {"rank_pattern", nlohmann::json::object()},
           {"alpha_pattern", nlohmann::json::object()}};
    if (alpha == std::floor(alpha)) cfg["lora_alpha"] = int64_t(alpha);
    else cfg["lora_alpha"] = alpha;
  } else {
    const bool wide = kind == "deeplora-wide";
    std::vector<std::string> layers;
    int depth = 0;
    int64_t k = 0;
    for (auto& a : adapters) {
      layers.push_back(a->module());
      if (wide) {
        auto* w = static_cast<WideDeepLoraAdapter*>(a.get());
        depth = w->depth();
        for (auto& p : a->params()) tensors.emplace_back(p.name, host(p.tensor));
      } else {
        auto* d = static_cast<DeepLoraAdapter*>(a.get());
        depth = d->depth();
        k = d->width();
        const std::string pre = a->module() + ".deeplora.";
        tensors.emplace_back(pre + "A", host(d->A()));
        tensors.emplace_back(pre + "B", host(d->B()));
        for (int i = 1; i <= d->depth(); ++i) tensors.emplace_back(pre + fmt::format("K{}", i), host(d->K(i)));
      }
    }
    cfg = {{"adapter_type", "deeplora"}, {"format_version", 2},     {"wide", wide},
           {"rank", wide ? 0 : k / 2},   {"width", wide ? 0 : k},   {"depth", depth},          {"eps", o.eps},
           {"init", o.init},             {"adapt", o.adapt},        {"outer_lr_scale", o.outer_lr_scale},
           {"seed", o.seed},             {"layers", layers},        {"base_model_name_or_path", base_model},
           {"delta_weight", wide ? "W_L ... W_1" : "A K_L ... K_1 B^T (no scaling)"}};
  }
  save_safetensors(st_path, tensors, {{"format", "pt"}});
  write_file_atomic(cfg_path, cfg.dump(2) + "\n");
}

Adapters load_adapters(CausalLM& model, const std::string& dir, const AdapterOptions& o, AdapterOptions* loaded) {
  const fs::path cfg_path = fs::path(dir) / "adapter_config.json";
  const std::string st_path = (fs::path(dir) / "adapter_model.safetensors").string();
  if (!fs::is_directory(dir))
    throw std::runtime_error(fmt::format("{}: not a directory (expected adapter_config.json + adapter_model.safetensors)", dir));
  nlohmann::json cfg = read_json(cfg_path);
  if (!fs::exists(st_path)) throw std::runtime_error(fmt::format("{}: no adapter_model.safetensors", dir));
  SafetensorsFile f = load_safetensors(st_path);
  for (Linear* l : model.linears())
    if (l->adapter)
      throw std::invalid_argument(fmt::format("load_adapters: layer {} already has an adapter (merge or detach first)", l->name));
  const CausalLMFamily& fam = model.family();
  const std::string peft_prefix = kPeftRoot + fam.hf_module_prefix;
  AdapterOptions lo = o;
  Adapters out;
  std::vector<Linear*> targets;
  const Device dev = model.device();
  try {
    if (cfg.contains("peft_type")) {
      if (cfg["peft_type"] != "LORA") mismatch(cfg_path.string(), fmt::format("peft_type {} is not LORA", cfg["peft_type"].dump()));
      for (const char* flag : {"use_dora", "use_rslora"})
        if (cfg.value(flag, false)) mismatch(cfg_path.string(), fmt::format("{} = true is not supported", flag));
      for (const char* pat : {"rank_pattern", "alpha_pattern"})
        if (cfg.contains(pat) && cfg[pat].is_object() && !cfg[pat].empty())
          mismatch(cfg_path.string(), fmt::format("per-layer {} is not supported", pat));
      lo.kind = "lora";
      lo.wide = false;
      lo.rank = cfg.at("r").get<int64_t>();
      lo.alpha = cfg.at("lora_alpha").get<double>();
      // Layers from the tensors present (layers_to_transform etc. need no interpretation then).
      std::vector<std::string> modules;
      std::set<std::string> seen;
      for (auto& [key, t] : f.tensors) {
        std::string k = key;
        for (const std::string& p : {std::string(kPeftRoot), fam.hf_module_prefix})
          if (!p.empty() && k.rfind(p, 0) == 0) k = k.substr(p.size());
        std::string mod;
        for (const char* suf : {".lora_A.weight", ".lora_B.weight"}) {
          std::string s(suf);
          if (k.size() > s.size() && k.compare(k.size() - s.size(), s.size(), s) == 0) mod = k.substr(0, k.size() - s.size());
        }
        if (mod.empty()) mismatch(st_path, fmt::format("unexpected tensor '{}' (not a LoRA A/B of a linear layer)", key));
        if (seen.insert(mod).second) modules.push_back(mod);
      }
      if (modules.empty()) mismatch(st_path, "no LoRA tensors");
      for (const std::string& mod : modules) {
        Linear& l = layer_of(model, st_path, mod);
        auto get = [&](const char* which) -> const Tensor& {
          for (const std::string& key : {peft_prefix + mod + which, kPeftRoot + mod + which})
            if (f.contains(key)) return f.tensors.at(key);
          mismatch(st_path, fmt::format("missing tensor '{}{}{}'", peft_prefix, mod, which));
        };
        const Tensor& A = get(".lora_A.weight");
        const Tensor& B = get(".lora_B.weight");
        expect_shape(st_path, mod + ".lora_A.weight", A, Shape{lo.rank, l.in_features()});
        expect_shape(st_path, mod + ".lora_B.weight", B, Shape{l.out_features(), lo.rank});
        auto a = std::make_shared<LoraAdapter>(l.name, l.out_features(), l.in_features(), lo.rank, lo.alpha, 0,
                                               l.w->master.dtype(), dev);
        NoGrad ng;
        a->A().copy_from(A);
        a->B().copy_from(B);
        out.push_back(a);
        targets.push_back(&l);
      }
    } else if (cfg.value("adapter_type", "") == "deeplora") {
      lo.kind = "deeplora";
      lo.wide = cfg.at("wide").get<bool>();
      lo.depth = cfg.at("depth").get<int>();
      // "width" (k = 2r) since format 2 of the options' meaning; format-1 files stored k as "rank".
      const int64_t width = cfg.contains("width") ? cfg.at("width").get<int64_t>() : cfg.at("rank").get<int64_t>();
      if (!lo.wide && (width < 2 || width % 2 != 0))
        mismatch(cfg_path.string(), fmt::format("width {} is not an even number >= 2", width));
      lo.rank = width / 2;
      lo.eps = cfg.value("eps", lo.eps);
      lo.init = cfg.value("init", lo.init);
      lo.adapt = cfg.value("adapt", lo.adapt);
      lo.seed = cfg.value("seed", lo.seed);
      if (lo.depth < 2) mismatch(cfg_path.string(), fmt::format("depth {} < 2", lo.depth));
      std::set<std::string> used;
      auto get = [&](const std::string& name) -> const Tensor& {
        if (!f.contains(name)) mismatch(st_path, fmt::format("missing tensor '{}'", name));
        used.insert(name);
        return f.tensors.at(name);
      };
      for (const std::string& mod : cfg.at("layers").get<std::vector<std::string>>()) {
        Linear& l = layer_of(model, st_path, mod);
        const int64_t m = l.out_features(), n = l.in_features(), k = 2 * lo.rank;
        const DType mdt = l.w->master.dtype();
        if (lo.wide) {
          const int64_t d = std::max(m, n);
          std::vector<Tensor> W;
          for (int i = 1; i <= lo.depth; ++i) {
            const std::string name = fmt::format("{}.deeplora_wide.W{}", mod, i);
            const Tensor& t = get(name);
            expect_shape(st_path, name, t, Shape{i == lo.depth ? m : d, i == 1 ? n : d});
            W.push_back(t.to(mdt).to(dev));
          }
          out.push_back(std::make_shared<WideDeepLoraAdapter>(l.name, W));
        } else {
          const std::string pre = mod + ".deeplora.";
          const Tensor& A = get(pre + "A");
          const Tensor& B = get(pre + "B");
          expect_shape(st_path, pre + "A", A, Shape{m, k});
          expect_shape(st_path, pre + "B", B, Shape{n, k});
          auto a = std::make_shared<DeepLoraAdapter>(l.name, A.to(mdt).to(dev), B.to(mdt).to(dev), lo.depth, lo.eps);
          NoGrad ng;
          for (int i = 1; i <= lo.depth; ++i) {
            const std::string name = pre + fmt::format("K{}", i);
            const Tensor& K = get(name);
            expect_shape(st_path, name, K, Shape{k, k});
            Tensor dst = a->K(i);
            dst.copy_from(on(K, dst));
          }
          out.push_back(a);
        }
        targets.push_back(&l);
      }
      for (auto& [key, t] : f.tensors)
        if (!used.count(key)) mismatch(st_path, fmt::format("unexpected tensor '{}' (no such layer in adapter_config.json)", key));
    } else {
      throw std::runtime_error(fmt::format("{}: neither a PEFT LoRA config (peft_type) nor a deeplora one (adapter_type)",
                                           cfg_path.string()));
    }
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(fmt::format("{}: {}", cfg_path.string(), e.what()));
  }
  model.freeze_all();
  if (lo.kind == "deeplora" && !lo.wide && lo.outer_lr_scale == 0)
    for (auto& a : out)
      for (auto& p : a->params())
        if (p.role == Adapter::Role::outer) p.tensor.set_requires_grad(false);
  for (auto& a : out) a->set_family(&fam);
  for (size_t j = 0; j < out.size(); ++j) targets[j]->adapter = out[j];
  if (loaded) *loaded = lo;
  return out;
}

}  // namespace deeplora
