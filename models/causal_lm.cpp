// The causal-LM interface's shared parts (trainable flags, HF save) and the family registry.
#include "models/causal_lm.h"

#include <fmt/format.h>

#include <map>
#include <unordered_map>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "runtime/ops.h"
#include "runtime/tape.h"

namespace deeplora {
namespace fs = std::filesystem;

std::vector<CausalLMFamily> builtin_families();  // models/families.cpp

namespace {

struct Registry {
  std::mutex mu;
  std::vector<std::unique_ptr<CausalLMFamily>> families;  // entries never move or go away
};

void add_family(Registry& r, CausalLMFamily f) {
  if (f.model_type.empty()) throw std::invalid_argument("register_family: empty model_type");
  if (!f.random_init) throw std::invalid_argument(fmt::format("register_family: family '{}' has no random_init", f.model_type));
  for (auto& e : r.families)
    if (e->model_type == f.model_type)
      throw std::invalid_argument(fmt::format("register_family: model_type '{}' is registered already", f.model_type));
  r.families.push_back(std::make_unique<CausalLMFamily>(std::move(f)));
}

Registry& registry() {
  static Registry* r = [] {
    auto* x = new Registry;  // never destroyed: families stay valid through static destruction
    for (CausalLMFamily& f : builtin_families()) add_family(*x, std::move(f));
    return x;
  }();
  return *r;
}

std::string known_types(const Registry& r) {
  std::string s;
  for (size_t i = 0; i < r.families.size(); ++i) s += (i ? ", " : "") + r.families[i]->model_type;
  return s;
}

}  // namespace

void register_family(CausalLMFamily f) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lk(r.mu);
  add_family(r, std::move(f));
}

const CausalLMFamily& causal_lm_family(const std::string& model_type) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lk(r.mu);
  for (auto& e : r.families)
    if (e->model_type == model_type) return *e;
  throw std::invalid_argument(
      fmt::format("model_type '{}' is not a known model family (known: {})", model_type, known_types(r)));
}

std::vector<std::string> registered_families() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lk(r.mu);
  std::vector<std::string> v;
  for (auto& e : r.families) v.push_back(e->model_type);
  return v;
}

Tensor compute_tensor(Param& p, DType compute) {
  if (!p.master.defined()) return Tensor();
  if (p.master.dtype() == compute) return p.master;
  if (!p.trainable) {
    if (!p.frozen_work.defined()) {
      NoGrad ng;
      p.frozen_work = p.master.to(compute);
    }
    return p.frozen_work;
  }
  return compute_copy(p.master, compute);
}

Tensor compute_copy(const Tensor& master, DType compute) {
  if (master.dtype() == compute) return master;
  if (Tensor w = WorkScope::find(master); w.defined() && w.dtype() == compute) return w;
  return ops::cast(master, compute);
}

namespace {
thread_local std::unordered_map<const TensorImpl*, Tensor>* g_work = nullptr;
constexpr int64_t kGroupMaxElems = int64_t(1) << 20;  // larger tensors: one vectorized cast each
}  // namespace

struct WorkScope::Impl {
  std::unordered_map<const TensorImpl*, Tensor> copies;
};

WorkScope::WorkScope(CausalLM& model, DType compute) {
  if (g_work) return;  // nested: the outer scope's copies serve
  std::vector<Tensor> want;
  for (auto& [name, p] : model.named_params())
    if (p->trainable && p->master.defined() && p->master.dtype() != compute) want.push_back(p->master);
  for (Linear* l : model.linears())
    if (l->adapter)
      for (const Tensor& t : l->adapter->cast_inputs())
        if (t.defined() && t.dtype() != compute) want.push_back(t);
  if (want.empty()) return;
  impl_ = std::make_unique<Impl>();
  std::map<DType, std::vector<Tensor>> small;  // by master dtype
  for (const Tensor& t : want) {
    auto [it, fresh] = impl_->copies.emplace(t.impl(), Tensor());
    if (!fresh) continue;  // read twice (tied embeddings): one copy
    if (t.numel() > kGroupMaxElems) it->second = ops::cast(t, compute);
    else small[t.dtype()].push_back(t);
  }
  for (auto& [dt, xs] : small) {
    std::vector<Tensor> ys = ops::cast_group(xs, compute);
    for (size_t i = 0; i < xs.size(); ++i) impl_->copies[xs[i].impl()] = ys[i];
  }
  g_work = &impl_->copies;
}

WorkScope::~WorkScope() {
  if (impl_ && g_work == &impl_->copies) g_work = nullptr;
}

Tensor WorkScope::find(const Tensor& master) {
  if (!g_work || !master.defined()) return Tensor();
  auto it = g_work->find(master.impl());
  return it == g_work->end() ? Tensor() : it->second;
}

Tensor apply_linear(Linear& l, const Tensor& x, const Tensor& residual, DType compute) {
  Tensor y = ops::linear(x, compute_tensor(*l.w, compute), l.b ? compute_tensor(*l.b, compute) : Tensor(), residual);
  if (l.adapter) y = l.adapter->forward(x, y);
  return y;
}

nlohmann::json read_config_json(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(fmt::format("{}: cannot open config", path));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: not valid JSON: {}", path, e.what()));
  }
  return j;
}

std::string read_model_type(const std::string& path) {
  const nlohmann::json j = read_config_json(path);
  if (!j.is_object() || !j.contains("model_type")) return "gpt2";  // the family's parser names what is missing
  const nlohmann::json& t = j["model_type"];
  const std::string type = t.is_string() ? t.get<std::string>() : t.dump();
  try {
    causal_lm_family(type);
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: {}", path, e.what()));
  }
  return type;
}

const CausalLMFamily& family_of_preset(const std::string& preset) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lk(r.mu);
  std::vector<std::string> all;
  for (auto& e : r.families) {
    for (const auto* list : {&e->presets, &e->preset_aliases})
      for (const std::string& p : *list)
        if (p == preset) return *e;
    all.insert(all.end(), e->presets.begin(), e->presets.end());
  }
  std::string list;
  for (size_t i = 0; i < all.size(); ++i) list += (i == 0 ? "" : i + 1 == all.size() ? " or " : ", ") + all[i];
  throw std::invalid_argument(fmt::format("unknown model preset '{}' (expected {})", preset, list));
}

std::unique_ptr<CausalLM> causal_lm_from_config(const std::string& config_path, DType compute, Device dev, uint64_t seed,
                                                const ModelSizes& sizes) {
  return causal_lm_family(read_model_type(config_path)).random_init(config_path, "", sizes, compute, dev, seed);
}

std::unique_ptr<CausalLM> load_hf_causal_lm(const std::string& dir, DType compute, Device dev) {
  fs::path d(dir);
  if (!fs::is_directory(d)) throw std::runtime_error(fmt::format("{}: not a directory (expected an HF model dir)", dir));
  auto model = causal_lm_from_config((d / "config.json").string(), compute, dev, 0);
  fs::path st = d / "model.safetensors";
  if (!fs::exists(st)) throw std::runtime_error(fmt::format("{}: no model.safetensors", dir));
  model->load_hf_weights(st.string());
  return model;
}

std::string block_module(const std::string& module) {
  size_t start = 0;
  while (start < module.size()) {
    size_t end = module.find('.', start);
    if (end == std::string::npos) break;
    bool digits = end > start;
    for (size_t i = start; i < end; ++i) digits = digits && std::isdigit(static_cast<unsigned char>(module[i]));
    if (digits) return module.substr(end + 1);
    start = end + 1;
  }
  return module;
}

// ---- CausalLM's shared parts ------------------------------------------------------------------------

const CausalLMFamily& CausalLM::family() const { return causal_lm_family(model_type()); }

Param& CausalLM::param(const std::string& name) {
  for (auto& [n, p] : named_params())
    if (n == name) return *p;
  throw std::invalid_argument(fmt::format("{}: no parameter named '{}'", model_type(), name));
}

Linear& CausalLM::linear(const std::string& module) {
  for (Linear* l : linears())
    if (l->name == module) return *l;
  throw std::invalid_argument(fmt::format("{}: no linear layer named '{}'", model_type(), module));
}

void CausalLM::freeze_all() {
  for (auto& [n, p] : named_params()) set_trainable(n, false);
}

void CausalLM::set_trainable(const std::string& name, bool t) {
  Param& p = param(name);
  p.trainable = t;
  p.master.set_requires_grad(t);
  p.master.zero_grad();
  p.frozen_work = Tensor();
}

std::vector<Tensor> CausalLM::trainable_tensors() {
  std::vector<Tensor> v;
  for (auto& [n, p] : named_params())
    if (p->trainable) v.push_back(p->master);
  return v;
}

int64_t CausalLM::n_trainable() const {
  int64_t n = 0;
  for (auto& [name, p] : const_cast<CausalLM*>(this)->named_params())
    if (p->trainable) n += p->master.numel();
  return n;
}

void CausalLM::invalidate_frozen_cache() {
  for (auto& [n, p] : named_params()) p->frozen_work = Tensor();
}

void CausalLM::save_hf(const std::string& dir, SafeDType as) {
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "model.safetensors").string(), hf_state_dict(), {{"format", "pt"}}, as);
  save_config((fs::path(dir) / "config.json").string());
}

}  // namespace deeplora
