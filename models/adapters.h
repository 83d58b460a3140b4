// Adapters on the frozen linear layers of a CausalLM: LoRA (PEFT convention) and compressed Deep LoRA
// (../shared/DEEP_LORA.md) with its gradient-SVD initialization, the wide deep reference, optimizer
// groups, merging, and export/import (PEFT files for LoRA, our own files for Deep LoRA).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/causal_lm.h"
#include "runtime/io/safetensors.h"
#include "runtime/optim.h"
#include "runtime/tensor.h"

namespace deeplora {

struct AdapterOptions {
  std::string kind = "deeplora";  // lora | deeplora | none
  int64_t rank = 8;               // r: LoRA's rank; Deep LoRA's top-r singular vectors, factors of width k = 2r
  int depth = 3;                  // Deep LoRA L >= 2 (number of K_i; of W_i with --wide)
  double eps = 1e-3;              // K_i(0) = eps * I (W_i(0) = eps * orthogonal with --wide)
  double alpha = 16;              // LoRA only: scale alpha / r
  // gamma: A, B train at gamma * lr; 0 freezes them. 1 (not the paper's 0.01): in the few-shot study
  // (docs/fewshot/h200) gamma = 1 beat 0.01 by 6-12 points at n = 16 and 64 on two tasks, with every
  // paired 95% interval above 0; with A, B nearly frozen the run fits its data (at 500 steps) without
  // generalizing. The study's "deeplora" method keeps 0.01, the published setting.
  double outer_lr_scale = 1.0;
  // Deep LoRA: > 0 trains the inner factors at lr * width_lr_ref / width. Adam moves every entry of a
  // k x k factor by about lr, so a factor's spectral step grows with k (NOTES.md: at lr 3e-2 the
  // product K_L...K_1 reached ||K|| ~ 1e3 at width 64 against ~2 at width 8); this keeps it fixed.
  // 16 leaves the default width (r = 8) at its lr. 0: off (the paper's training).
  double width_lr_ref = 0;
  std::string init = "gradsvd";   // gradsvd | random (deeplora)
  bool wide = false;              // deeplora: uncompressed W_L...W_1 of width max(m, n) (reference)
  std::string adapt = "all";      // attn (c_attn) | attn-mlp (c_attn, c_fc, mlp.c_proj) | all
  int svd_batches = 1;            // batches averaged into the initialization gradient
  uint64_t seed = 0;
  // Throws std::invalid_argument naming the flag. Model-dependent checks happen in attach_adapters.
  void validate() const;
  // The factors' inner width: r for LoRA, 2r for compressed Deep LoRA.
  int64_t width() const { return kind == "deeplora" && !wide ? 2 * rank : rank; }
  std::string str() const;
};

// One adapted linear layer. y' = y + delta(x); the parameters are master tensors (f32, f64 for f64
// models) named "<module>.<kind>.<name>", cast to the compute dtype in forward (recorded on the tape).
class Adapter : public LinearAdapter {
 public:
  enum class Role { lora, inner, outer, wide };  // which optimizer group a parameter belongs to
  struct NamedParam {
    std::string name;  // full name, e.g. "h.0.attn.c_attn.deeplora.K1"
    Tensor tensor;
    Role role;
  };
  Adapter(std::string module, int64_t out_features, int64_t in_features)
      : module_(std::move(module)), out_(out_features), in_(in_features) {}
  const std::string& module() const { return module_; }
  int64_t out_features() const { return out_; }  // m
  int64_t in_features() const { return in_; }    // n
  virtual std::string kind() const = 0;           // "lora" | "deeplora" | "deeplora-wide"
  std::vector<NamedParam>& params() { return params_; }
  const std::vector<NamedParam>& params() const { return params_; }
  Tensor& param(const std::string& short_name);   // by the part after "<module>.<kind>."
  int64_t n_params(bool trainable_only = false) const;
  // The update ΔW [out, in] in the master dtype, computed without recording (export, tests).
  virtual Tensor delta_weight() const = 0;
  // The family of the model it was made for (attach_adapters and load_adapters set it): the PEFT
  // export takes the module prefix, fan_in_fan_out and target_modules' names from it.
  const CausalLMFamily* family() const { return family_; }
  void set_family(const CausalLMFamily* f) { family_ = f; }

 protected:
  Tensor& add_param(const std::string& short_name, Tensor t, Role role);
  std::string module_;
  int64_t out_, in_;
  std::vector<NamedParam> params_;
  const CausalLMFamily* family_ = nullptr;
};

// PEFT LoRA: A [r, in] Kaiming-uniform (bound 1/sqrt(in)), B [out, r] = 0,
// y' = y + (alpha/r) (x Aᵀ) Bᵀ. Parameters "<module>.lora.A", "<module>.lora.B".
class LoraAdapter : public Adapter {
 public:
  LoraAdapter(const std::string& module, int64_t out_features, int64_t in_features, int64_t r, double alpha,
              uint64_t seed, DType master, Device dev);
  std::string kind() const override { return "lora"; }
  Tensor forward(const Tensor& x, const Tensor& y) override;
  std::vector<Tensor> cast_inputs() const override { return {params_[0].tensor, params_[1].tensor}; }
  Tensor delta_weight() const override;
  int64_t rank() const { return r_; }
  double alpha() const { return alpha_; }
  double scaling() const { return alpha_ / double(r_); }
  Tensor& A() { return param("A"); }
  Tensor& B() { return param("B"); }

 private:
  int64_t r_;
  double alpha_;
};

// Compressed Deep LoRA: ΔW = A K_L...K_1 Bᵀ, A [m, k], B [n, k], K_i [k, k], no scaling.
// B is stored transposed ("<module>.deeplora.Bt", [k, n], the Linear weight layout) so the forward is
// three linear ops with no reshape: t = x B, u = t Kᵀ (K formed once per forward, k x k), y += u Aᵀ.
// Parameters: "A", "Bt" (Role::outer), "K1".."KL" (Role::inner).
class DeepLoraAdapter : public Adapter {
 public:
  // A [m, k], B [n, k] (not transposed); K_i = eps I. Copies the values.
  DeepLoraAdapter(const std::string& module, const Tensor& A, const Tensor& B, int depth, double eps);
  std::string kind() const override { return "deeplora"; }
  Tensor forward(const Tensor& x, const Tensor& y) override;
  std::vector<Tensor> cast_inputs() const override { return {params_[0].tensor}; }  // A (K, Bt: the product op)
  Tensor delta_weight() const override;
  int64_t width() const { return k_; }
  int depth() const { return depth_; }
  Tensor A() const { return params_[0].tensor; }
  Tensor Bt() const { return params_[1].tensor; }
  Tensor B() const;  // [n, k], a copy
  Tensor K(int i) const { return params_[size_t(1 + i)].tensor; }  // i = 1..L
  Tensor K_product() const;  // K_L...K_1, not recorded

 private:
  int64_t k_;
  int depth_;
};

// The uncompressed deep reference: ΔW = W_L...W_1, W_1 [d, n], W_2..W_{L-1} [d, d], W_L [m, d],
// d = max(m, n), W_i(0) = eps * (orthogonal) with W_L(0)...W_1(0) = eps^L O for the O that the
// compressed adapter of the same layer and seed uses. Parameters "W1".."WL" (Role::wide).
class WideDeepLoraAdapter : public Adapter {
 public:
  WideDeepLoraAdapter(const std::string& module, std::vector<Tensor> W);  // takes the tensors
  std::string kind() const override { return "deeplora-wide"; }
  Tensor forward(const Tensor& x, const Tensor& y) override;
  std::vector<Tensor> cast_inputs() const override {
    std::vector<Tensor> v;
    for (const auto& p : params_) v.push_back(p.tensor);
    return v;
  }
  Tensor delta_weight() const override;
  int depth() const { return int(params_.size()); }
};

using Adapters = std::vector<std::shared_ptr<Adapter>>;

struct AdapterInitReport {
  double grad_seconds = 0;   // forward/backward over svd_batches batches (deeplora gradsvd)
  double svd_seconds = 0;    // SVDs, random O, closed form, parameter creation
  int64_t n_layers = 0;      // adapted layers
  int64_t n_trainable = 0;   // trainable adapter elements (A, B excluded when outer_lr_scale = 0)
  int64_t n_completed = 0;   // basis columns completed with random directions (rank-deficient [V_r, Oᵀ U_r])
  int64_t n_null_singular = 0;  // top-r singular values of G that are zero to working precision
  std::string str() const;   // one log line; mentions completion when it happened
};

// The layers `adapt` selects, in model order, by the family's target table (CausalLMFamily::targets).
// Throws naming the bad value.
std::vector<Linear*> adapted_linears(CausalLM& model, const std::string& adapt);

// ∂loss/∂W0 [out, in] (master dtype) for each layer, averaged over n_batches batches from next_batch.
// Only those weights require grad during the pass; afterwards every parameter's trainable flag is
// what it was before, and no gradient is left on the model.
std::vector<Tensor> weight_gradients(CausalLM& model, const std::vector<Linear*>& layers,
                                     const std::function<LossBatch()>& next_batch, int n_batches);

// DEEP_LORA.md step 3: O [m, n] with orthonormal rows (m <= n) or columns (m > n) for layer index
// `layer` (position in adapted_linears) — shared by the compressed and the wide adapter.
Tensor deeplora_O(int64_t m, int64_t n, uint64_t seed, int64_t layer, DType dt, Device dev);

// DEEP_LORA.md step 4: from U_r [m, r], V_r [n, r] and O [m, n]: A [m, 2r], B [n, 2r].
// m <= n: B = orth([V_r, Oᵀ U_r]), A = O B;  m > n: A = orth([U_r, O V_r]), B = Oᵀ A.
struct DeepLoraFactors {
  Tensor A, B;
  int64_t n_completed = 0;
};
DeepLoraFactors deeplora_closed_form(const Tensor& U_r, const Tensor& V_r, const Tensor& O);

// DEEP_LORA.md steps 1-4 for every layer o.adapt selects: the factors A [m, 2r] and B [n, 2r] of a
// gradient-SVD Deep LoRA (the gradient pass over o.svd_batches batches, the SVDs, O, the closed form).
// They depend on the batches, o.rank, o.seed, o.svd_batches and o.adapt alone, not on the depth, eps
// or any learning rate: a sweep computes them once per training set and attaches many adapters.
// The model is left as it was.
struct DeepLoraInit {
  std::vector<Tensor> A, B;      // per adapted layer, in model order
  AdapterInitReport report;      // grad_seconds, svd_seconds, n_completed, n_null_singular, n_layers
};
DeepLoraInit deeplora_gradsvd_init(CausalLM& model, const AdapterOptions& o, const std::function<LossBatch()>& next_batch);

// Validates o against the model, freezes the base model (model.freeze_all()), builds one adapter per
// selected layer and installs it as the layer's adapter. deeplora + gradsvd runs the initialization
// pass first (next_batch gives a LossBatch on the model's device; dropout does not exist here).
// kind "none" attaches nothing and leaves the model as it is. Throws std::invalid_argument with the
// flag's name on bad options, and if the model already has adapters.
// `given`: the factors of deeplora_gradsvd_init (same rank and adapt), used instead of running it.
Adapters attach_adapters(CausalLM& model, const AdapterOptions& o,
                         const std::function<LossBatch()>& next_batch,
                         AdapterInitReport* report = nullptr, const DeepLoraInit* given = nullptr);

// Optimizer groups (weight decay 0): "adapter_inner" (K_i, lr_scale 1, or width_lr_ref / width when
// width_lr_ref > 0), "adapter_outer" (A, Bt,
// lr_scale outer_lr_scale; left out when 0 — those tensors do not require grad then), "lora" (1),
// "deeplora_wide" (1). Only tensors that require grad; empty groups are left out.
std::vector<ParamGroup> adapter_param_groups(const Adapters& adapters, double outer_lr_scale, double width_lr_ref = 0);
int64_t n_adapter_params(const Adapters& adapters, bool trainable_only = true);

// Every adapter master under its unique name (for training checkpoints), and the inverse (same
// names and shapes; throws naming the tensor otherwise).
NamedTensors adapter_state(const Adapters& adapters);
void load_adapter_state(const Adapters& adapters, const std::map<std::string, Tensor>& state,
                        const std::string& source);

// W0 += ΔW for every adapted layer (in the master dtype), then removes the adapters from the model,
// so save_hf writes a plain HF checkpoint. Returns the number of layers merged.
int64_t merge_adapters(CausalLM& model);
// Removes the adapters from the model's layers without merging.
void detach_adapters(CausalLM& model);

// Export. lora: PEFT's adapter_model.safetensors + adapter_config.json in `dir` (loadable by
// peft.PeftModel.from_pretrained on the family's HF class, e.g. GPT2LMHeadModel; names from the
// adapters' family). deeplora (and the wide reference): our own
// adapter_model.safetensors (A [m,k], B [n,k], K1..KL [k,k] per layer; W1..WL for wide) +
// adapter_config.json. base_model: recorded as base_model_name_or_path.
void save_adapters(const Adapters& adapters, const AdapterOptions& o, const std::string& dir,
                   const std::string& base_model = "gpt2");

// Reads a directory written by save_adapters (or by PEFT for a LoRA of the model's family), checks every layer and
// shape against the model (throws std::runtime_error naming the file, layer and shapes), freezes the
// base model and attaches the adapters. The structure (kind, rank, depth, layers) comes from the
// file; only outer_lr_scale is taken from `o` (A, B frozen when 0). *loaded receives the file's
// options (with o's outer_lr_scale) when given.
Adapters load_adapters(CausalLM& model, const std::string& dir, const AdapterOptions& o,
                       AdapterOptions* loaded = nullptr);

}  // namespace deeplora
