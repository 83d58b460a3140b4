// The causal-LM interface that the trainer, eval, generate, the adapters, the study and the HF / PEFT
// export work through, and the registry of model families keyed by config.json's "model_type".
// A family (GPT-2: models/gpt.*, the "gpt2" entry) implements CausalLM and registers a
// CausalLMFamily; adding one adds its files and a line in models/families.cpp, nothing else
// (docs/MODEL_INTERFACE.md).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "runtime/io/safetensors.h"
#include "runtime/tensor.h"

namespace deeplora {

// Extra path added to a linear layer's output (LoRA, Deep LoRA): y' = y + adapter(x).
class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  // x: the layer input [.., in] in the compute dtype; y: the base output [.., out]. Returns y'.
  virtual Tensor forward(const Tensor& x, const Tensor& y) = 0;
  // The master tensors forward() casts to the compute dtype (a WorkScope casts them all at once).
  virtual std::vector<Tensor> cast_inputs() const { return {}; }
};

// Keys and values of every layer for incremental decoding: k[l], v[l] are [B, H, T_max, hd] in the
// compute dtype (H: the family's key/value heads). Row b's positions 0..len-1 hold its tokens so far;
// positions past them may hold anything (a decode step writes position p before it attends over 0..p).
struct KvCache {
  std::vector<Tensor> k, v;
  int64_t B = 0, T_max = 0;
};

// A batch for a loss on the device: tokens [B, T] with next-token targets [B, T] (-100: ignored),
// or, for example data, the loss rows [N] (flat indices into [B*T]) and their targets [N]: only those
// rows reach the lm_head (CausalLM::loss_at).
struct LossBatch {
  Tensor tokens, targets, rows;
  LossBatch() = default;
  LossBatch(Tensor tok, Tensor tgt, Tensor r = Tensor()) : tokens(std::move(tok)), targets(std::move(tgt)), rows(std::move(r)) {}
  LossBatch(const std::pair<Tensor, Tensor>& p) : tokens(p.first), targets(p.second) {}  // NOLINT: implicit on purpose
};

struct Param {
  Tensor master;  // f32 (f64 for f64 models); requires_grad when trainable
  Tensor frozen_work;  // cached compute-dtype copy of a frozen master (filled on demand)
  bool trainable = true;
};

// An adaptable linear layer: y = x Wᵀ + b (W [out, in] in the nn.Linear layout whatever the HF file
// stores), plus its adapter's branch when one is attached.
struct Linear {
  std::string name;  // HF module path without the decoder prefix, e.g. "h.3.mlp.c_fc"
  Param* w = nullptr;  // [out, in]
  Param* b = nullptr;  // [out]; null for a linear without bias
  std::shared_ptr<LinearAdapter> adapter;
  int64_t in_features() const { return w->master.dim(1); }
  int64_t out_features() const { return w->master.dim(0); }
};

// The tensor a forward in `compute` uses for p: the master itself when it is already in that dtype;
// for a frozen one a compute-dtype copy made once and cached (no cast, no gradient); for a trainable
// one a recorded cast, so the gradient reaches the master. Undefined for an undefined master.
Tensor compute_tensor(Param& p, DType compute);
// A compute-dtype view of a trainable master for code outside the models (the adapters): the active
// WorkScope's copy when it holds one, else a recorded cast (the master itself when dtypes agree).
Tensor compute_copy(const Tensor& master, DType compute);
// y = x Wᵀ + b (+ residual, in the GEMM's addend), then the adapter's branch, in `compute`.
Tensor apply_linear(Linear& l, const Tensor& x, const Tensor& residual, DType compute);

struct CausalLMFamily;
class CausalLM;

// The compute-dtype copies of every trainable tensor a forward pass reads (the model's trainable
// parameters and its adapters' cast_inputs()), made when the pass begins: one grouped cast
// (ops::cast_group: a launch per 32 tensors, forward and backward) for the small ones, one cast each
// for tensors above 1M elements (the vectorized kernel), and a tensor read twice (tied embeddings)
// cast once. While it is alive on this thread, compute_tensor() and compute_copy() take their copy
// from it. Opened by the models' forward entry points; a nested scope does nothing.
class WorkScope {
 public:
  WorkScope(CausalLM& model, DType compute);
  ~WorkScope();
  WorkScope(const WorkScope&) = delete;
  WorkScope& operator=(const WorkScope&) = delete;
  static Tensor find(const Tensor& master);  // the active scope's copy, or undefined

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A decoder-only language model with HF-named f32 master parameters, run in its compute dtype.
// Batches are right-padded: attention is causal, so a position never sees the padding after it and
// padded rows need no mask (the loss ignores padded positions through target -100).
class CausalLM {
 public:
  virtual ~CausalLM() = default;

  // ---- what it is ----
  virtual std::string model_type() const = 0;  // config.json's "model_type", e.g. "gpt2"
  const CausalLMFamily& family() const;        // its registry entry
  virtual DType compute_dtype() const = 0;
  virtual Device device() const = 0;
  virtual int64_t vocab_size() const = 0;      // the real vocabulary (HF's vocab_size)
  // Rows of the logits training and scoring use (>= vocab_size; padding columns get no probability
  // through cross_entropy(..., vocab_size)).
  virtual int64_t padded_vocab() const = 0;
  virtual int64_t max_positions() const = 0;   // longest sequence (GPT-2: n_positions)
  // config.json's bos_token_id: the token generate starts an empty prompt from, as transformers'
  // generate does when input_ids is empty (GPT-2: 50256); -1 when the model has none.
  virtual int64_t bos_token_id() const { return -1; }
  virtual int64_t n_layer() const = 0;
  virtual int64_t hidden_size() const = 0;     // C of the hidden states
  virtual int64_t n_params() const = 0;        // every parameter element (real vocabulary rows)
  virtual std::string describe() const = 0;    // one line: family, sizes, parameter count
  virtual void save_config(const std::string& path) const = 0;  // HF config.json, atomic

  // ---- forward and loss ----
  // tokens [B, T] i32 on the model's device -> logits [B, T, vocab_size()] in the compute dtype.
  virtual Tensor forward(const Tensor& tokens) = 0;
  // The same over the padded vocabulary: [B, T, padded_vocab()] (what training uses).
  virtual Tensor forward_padded(const Tensor& tokens) = 0;
  // The final hidden states [B, T, C], and the padded logits of any hidden rows [..., C] ->
  // [..., padded_vocab()]: forward_padded(t) == lm_head(hidden(t)).
  virtual Tensor hidden(const Tensor& tokens) = 0;
  virtual Tensor lm_head(const Tensor& h) = 0;
  // Mean cross-entropy of next-token targets [B, T] (i32, -100 = ignore), f32 (f64 for f64 models).
  virtual Tensor loss(const Tensor& tokens, const Tensor& targets) = 0;
  // The same from selected positions only: rows [N] i32 flat indices into [B*T], targets [N].
  virtual Tensor loss_at(const Tensor& tokens, const Tensor& rows, const Tensor& targets) = 0;
  // loss_at for a batch with rows, loss otherwise.
  Tensor loss(const LossBatch& b) { return b.rows.defined() ? loss_at(b.tokens, b.rows, b.targets) : loss(b.tokens, b.targets); }

  // ---- incremental decoding (models/generate.cpp), inference only (NoGrad) ----
  virtual KvCache make_cache(int64_t B, int64_t T_max) const = 0;
  // tokens [B, Tn] at positions [B, Tn] (row b's tokens at start[b] .. start[b]+Tn-1, start [B]);
  // writes their keys/values into the cache and returns the hidden states [B, Tn, C]. prefill: every
  // row starts at 0 and the new tokens attend among themselves.
  virtual Tensor hidden_cached(const Tensor& tokens, const Tensor& positions, const Tensor& start, KvCache& cache,
                               bool prefill = false) = 0;

  // ---- parameters and adaptable linears ----
  // Every parameter in HF order under its HF name (without the decoder prefix the HF file may add).
  virtual std::vector<std::pair<std::string, Param*>> named_params() = 0;
  // Every linear of the blocks, in order, under its HF module name (what adapters attach to).
  virtual std::vector<Linear*> linears() = 0;
  Param& param(const std::string& name);         // throws naming the parameter
  Linear& linear(const std::string& module);     // throws naming the module
  // Trainable flags: freeze_all() then mark adapters' own tensors trainable; frozen params cache their
  // compute-dtype copy and get no gradient buffer (no weight-gradient GEMMs).
  void freeze_all();
  void set_trainable(const std::string& name, bool t);
  std::vector<Tensor> trainable_tensors();
  int64_t n_trainable() const;
  // Called after master weights change outside the optimizer (load, merge): drops cached frozen copies.
  void invalidate_frozen_cache();

  // ---- Hugging Face files ----
  // Copies the weights of an HF safetensors file into the model. Throws naming the file and tensor on a
  // missing, unexpected, mis-shaped or non-finite tensor.
  virtual void load_hf_weights(const std::string& safetensors_path) = 0;
  // Host f32 tensors under the HF file's names and layouts (what save_hf writes).
  virtual NamedTensors hf_state_dict() = 0;
  // dir/config.json + dir/model.safetensors (f32 unless `as` says bf16/f16), loadable by transformers.
  void save_hf(const std::string& dir, SafeDType as = SafeDType::f32);
};

// Which linears the --adapt selections cover, as module names within a block (the part after the
// layer index: "attn.c_attn" of "h.3.attn.c_attn"); --adapt all is every linear of linears().
struct AdapterTargets {
  std::vector<std::string> attn;  // --adapt attn
  std::vector<std::string> mlp;   // added by --adapt attn-mlp
  // PEFT's default target_modules for the family (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
  std::vector<std::string> peft_default;
};

// Size flags over a preset or a config file (0: as given there).
struct ModelSizes {
  int64_t n_layer = 0, n_head = 0, n_embd = 0, n_positions = 0;
};

// A registry entry: how to make, load and adapt one model family.
struct CausalLMFamily {
  std::string model_type;    // config.json's "model_type"
  std::string architecture;  // the HF class, e.g. "GPT2LMHeadModel"
  // A random-init model (as HF initializes it) from an HF config.json (config_path non-empty) or a
  // preset name, with `sizes` over it. Throws naming the file or the flag.
  std::function<std::unique_ptr<CausalLM>(const std::string& config_path, const std::string& preset,
                                          const ModelSizes& sizes, DType compute, Device dev, uint64_t seed)>
      random_init;
  std::vector<std::string> presets;         // listed in errors
  std::vector<std::string> preset_aliases;  // accepted, not listed
  // The module names within a block of every linear, in model order (PEFT target_modules are suffixes
  // of these).
  std::vector<std::string> block_linears;
  AdapterTargets targets;
  // Where the decoder's modules sit in the HF state dict: PEFT keys are
  // "base_model.model.<hf_module_prefix><module>.lora_A.weight".
  std::string hf_module_prefix;
  bool fan_in_fan_out = false;  // PEFT's flag: the HF base layer stores W as [in, out] (GPT-2's Conv1D)
};

// Adds a family; throws if its model_type is taken. Entries live as long as the program.
void register_family(CausalLMFamily f);
// The family of a model_type; throws naming the type and the known ones.
const CausalLMFamily& causal_lm_family(const std::string& model_type);
std::vector<std::string> registered_families();
// config.json's model_type ("gpt2" when the field is absent, as old GPT-2 configs are); throws naming
// the file when it cannot be read, is not JSON or names no registered family.
std::string read_model_type(const std::string& config_path);
// A config file parsed as JSON; throws naming the file when it cannot be opened or is not JSON. What
// the document must hold is the caller's to check (every family's config parser reads through this).
nlohmann::json read_config_json(const std::string& path);
// The family whose presets (or aliases) hold `preset`; throws listing every preset.
const CausalLMFamily& family_of_preset(const std::string& preset);
// An HF model directory (config.json + model.safetensors) of any registered family.
std::unique_ptr<CausalLM> load_hf_causal_lm(const std::string& dir, DType compute, Device dev);
// A random-init model from an HF config.json of any registered family (sizes over it).
std::unique_ptr<CausalLM> causal_lm_from_config(const std::string& config_path, DType compute, Device dev,
                                                uint64_t seed = 0, const ModelSizes& sizes = {});

// The part of a module name after its layer index ("h.3.attn.c_proj" -> "attn.c_proj"); the name
// itself when it has no numeric component.
std::string block_module(const std::string& module);

}  // namespace deeplora
