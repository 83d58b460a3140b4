// AdamW with mixed precision (as llm.c / PyTorch AMP): bf16 (or f32, f64) working parameters, an f32
// master copy (f64 for f64 parameters), m and v, all in flat buffers updated by one fused launch per
// parameter dtype. Gradients live in flat buffers too, so zeroing is one fill and a data-parallel
// all-reduce can move them in buckets.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "runtime/tensor.h"

namespace deeplora {

struct ParamGroup {
  std::vector<Tensor> params;  // trainable leaves (requires_grad), named uniquely; frozen tensors go nowhere
  double lr_scale = 1.0;       // this group's lr = step's lr * lr_scale
  double weight_decay = 0.0;   // decoupled, as torch.optim.AdamW
  std::string name;
};

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
};

class AdamW {
 public:
  // Where a parameter's gradient lives: elements [offset, offset + numel) of flat_grads()[buffer].
  struct GradRange {
    std::string name;
    int buffer = 0;
    int64_t offset = 0;  // elements; 16-byte aligned
    int64_t numel = 0;
  };

  // Allocates the flat state and gradient buffers on the parameters' device (all must share one)
  // and installs views of the gradient buffers as the parameters' grads (keeping any gradient they
  // already had). Throws naming the parameter if one is frozen, not a leaf, unnamed, duplicated,
  // not a float tensor or on another device.
  explicit AdamW(std::vector<ParamGroup> groups, AdamWConfig cfg = {});
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;
  AdamW(AdamW&&) = default;
  AdamW& operator=(AdamW&&) = default;

  // One fill per flat gradient buffer. (Tensor::zero_grad() on a parameter drops its view instead;
  // that still works, the next call here puts the view back, but costs an allocation a step.)
  void zero_grad();
  // Global L2 norm over every gradient: deterministic, accumulated in f32 (f64 for f64 parameters),
  // the per-buffer partial sums added in double on the host. Synchronizes with the device.
  double grad_norm();
  // One AdamW step: grads are multiplied by grad_scale first (clipping: min(1, max_norm / norm)),
  // then param -= lr*lr_scale*(mhat/(sqrt(vhat)+eps) + wd*param) on the master, and the working
  // copy is refreshed from it (rounded to nearest even into bf16).
  void step(double lr, double grad_scale = 1.0);

  // The same step with its scalars in device memory, so that it can be captured in a CUDA graph
  // (models/train_step.h). On the host, before the step: set_step(lr, max_norm) writes lr and the bias
  // corrections of the next step count (counted now). In the step: step_on_device(losses) computes the
  // global norm, the clip factor and a skip flag (non-finite norm, or a non-finite value in `losses`)
  // on the device, then updates unless skipped; no host sync. After it: last_step() (synchronizes)
  // says what happened; a skipped step is taken back from the count. Same results as step(lr,
  // min(1, max_norm / grad_norm())) bit for bit.
  void set_step(double lr, double max_norm);
  void step_on_device(const Tensor& losses = Tensor());
  struct StepInfo {
    double norm = 0, grad_scale = 1;
    bool skipped = false;
  };
  StepInfo last_step();

  int64_t step_count() const { return step_; }
  void set_step_count(int64_t t);
  int64_t n_params() const { return n_params_; }  // trainable elements
  Device device() const { return device_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  const AdamWConfig& config() const { return cfg_; }

  // Checkpoint state: "<param>.master", "<param>.m", "<param>.v" for every parameter, views of the
  // live buffers (for a parameter that is its own master, ".master" is the parameter's storage).
  std::vector<std::pair<std::string, Tensor>> state_tensors();
  // The inverse: every name above must be present with the parameter's shape, and nothing else
  // (any dtype and device; values are converted). Validates everything before copying anything;
  // throws naming the tensor. Working copies are refreshed from the loaded masters.
  void load_state(const std::vector<std::pair<std::string, Tensor>>& state);

  // The flat gradient buffers (1-D, one per parameter dtype present, f32 then bf16 then f64),
  // padding between parameters included and always zero; and each parameter's range in them.
  std::vector<Tensor> flat_grads();
  std::vector<GradRange> grad_ranges() const;

 private:
  struct Slot {
    Tensor param;
    int group = 0;
    int grad_buffer = 0;     // index into grads_
    int state_class = 0;     // index into state_
    int64_t grad_offset = 0;   // elements
    int64_t state_offset = 0;  // elements of m, v
    int64_t master_offset = -1;  // elements of the master buffer; -1: the param is its own master
    Tensor grad_view;          // installed as param's grad
    void* data = nullptr;      // param.data() when the chunk tables were built
  };
  struct StateClass {  // parameters sharing a state dtype (f32 for f32/bf16, f64 for f64)
    DType dtype = DType::f32;
    int64_t state_n = 0, master_n = 0;
    Tensor master, m, v;  // flat
  };
  struct Launch {  // one fused kernel launch: every parameter of one dtype
    DType param_dtype = DType::f32, state_dtype = DType::f32;
    Tensor table;  // AdamWChunk[n_chunks] on the device, as raw words
    int64_t n_chunks = 0;
  };

  Tensor master_view(const Slot& s) const;
  Tensor state_view(const Slot& s, const Tensor& flat) const;
  void ensure_grad_views(bool keep_values);
  void build_launches();

  std::vector<ParamGroup> groups_;
  AdamWConfig cfg_;
  Device device_ = Device::cpu;
  std::vector<Slot> slots_;
  std::vector<StateClass> state_;
  std::vector<Tensor> grads_;
  std::vector<Launch> launches_;
  Tensor dev_step_;             // kernels::AdamWStepDev on device_, as i32 words
  bool counted_ = false;        // set_step counted a step that last_step has not yet confirmed
  std::vector<Tensor> sumsq_;   // per gradient buffer: its sum of squares (for step_on_device)
  int64_t step_ = 0;
  int64_t n_params_ = 0;
};

}  // namespace deeplora
