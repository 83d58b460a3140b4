// AdamW: flat master/m/v and gradient buffers, gradient views installed into the parameters, one
// fused kernel launch per parameter dtype driven by a chunk table built once.
#include "runtime/optim.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>
#include <unordered_set>

#include "runtime/dispatch.h"
#include "kernels/optim.h"

namespace deeplora {
namespace {

// Every segment of a flat buffer starts at a multiple of 16 elements: 16-byte aligned (or more) for
// every dtype, so the kernels' vector loads apply and bucketed all-reduces see aligned ranges.
constexpr int64_t kPad = 16;
int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// Flat-buffer order of the parameter dtypes (and of flat_grads()).
constexpr DType kParamDtypes[] = {DType::f32, DType::bf16, DType::f64};
int dtype_slot(DType dt) { return dt == DType::f32 ? 0 : dt == DType::bf16 ? 1 : 2; }
DType state_dtype_of(DType param_dt) { return param_dt == DType::f64 ? DType::f64 : DType::f32; }

Tensor flat_view(const Tensor& flat, int64_t offset, const Shape& shape) {
  return flat.slice0(offset, offset + shape.numel()).reshape(shape);
}

const char* kSuffixes[] = {".master", ".m", ".v"};

}  // namespace

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWConfig cfg) : groups_(std::move(groups)), cfg_(cfg) {
  check(cfg_.beta1 >= 0 && cfg_.beta1 < 1 && cfg_.beta2 >= 0 && cfg_.beta2 < 1 && cfg_.eps >= 0, "AdamW",
        fmt::format("betas must lie in [0, 1) and eps be >= 0, got beta1={} beta2={} eps={}", cfg_.beta1,
                    cfg_.beta2, cfg_.eps));
  std::unordered_set<const TensorImpl*> seen;
  std::unordered_set<std::string> names;
  int64_t grad_n[3] = {0, 0, 0};
  int64_t state_n[2] = {0, 0}, master_n[2] = {0, 0};
  bool first = true;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    const ParamGroup& grp = groups_[gi];
    for (size_t pi = 0; pi < grp.params.size(); ++pi) {
      const Tensor& p = grp.params[pi];
      const std::string where = fmt::format("parameter #{} of group '{}'", pi, grp.name);
      check(p.defined(), "AdamW", where + " is an undefined tensor");
      const std::string what = fmt::format("{} ({})", where, p.desc());
      check(!p.name().empty(), "AdamW",
            what + " has no name; name it with set_name (checkpoints key optimizer state by name)");
      check(p.dtype() == DType::f32 || p.dtype() == DType::bf16 || p.dtype() == DType::f64, "AdamW",
            what + " is not a float tensor (f32, bf16 or f64)");
      check(p.requires_grad(), "AdamW",
            what + " does not require grad; frozen tensors belong in no group (or call set_requires_grad(true))");
      check(p.impl()->is_leaf, "AdamW", what + " is not a leaf (it was computed by an op); pass the parameter itself");
      check(seen.insert(p.impl()).second, "AdamW", what + " appears twice; a parameter belongs to one group once");
      check(names.insert(p.name()).second, "AdamW",
            what + " shares its name with another parameter; names key the optimizer state and must be unique");
      if (first) device_ = p.device();
      check(p.device() == device_, "AdamW",
            fmt::format("{} is on {} but earlier parameters are on {}; all must share one device", what,
                        device_name(p.device()), device_name(device_)));
      first = false;

      Slot s;
      s.param = p;
      s.group = int(gi);
      const int di = dtype_slot(p.dtype());
      s.grad_offset = grad_n[di];
      grad_n[di] += padded(p.numel());
      const int ci = p.dtype() == DType::f64 ? 1 : 0;
      s.state_class = ci;  // remapped to the compacted index below
      s.state_offset = state_n[ci];
      state_n[ci] += padded(p.numel());
      if (state_dtype_of(p.dtype()) != p.dtype()) {
        s.master_offset = master_n[ci];
        master_n[ci] += padded(p.numel());
      }
      s.grad_buffer = di;  // remapped below
      slots_.push_back(std::move(s));
      n_params_ += p.numel();
    }
  }

  // Allocate only what is used: gradient buffers for the dtypes present, state classes likewise.
  int grad_index[3] = {-1, -1, -1};
  bool used_dt[3] = {false, false, false};
  bool used_cls[2] = {false, false};
  for (const Slot& s : slots_) {
    used_dt[s.grad_buffer] = true;
    used_cls[s.state_class] = true;
  }
  for (int di = 0; di < 3; ++di) {
    if (!used_dt[di]) continue;
    grad_index[di] = int(grads_.size());
    grads_.push_back(Tensor::zeros(Shape{grad_n[di]}, kParamDtypes[di], device_));
  }
  int cls_index[2] = {-1, -1};
  for (int ci = 0; ci < 2; ++ci) {
    if (!used_cls[ci]) continue;
    cls_index[ci] = int(state_.size());
    StateClass c;
    c.dtype = ci == 1 ? DType::f64 : DType::f32;
    c.state_n = state_n[ci];
    c.master_n = master_n[ci];
    c.m = Tensor::zeros(Shape{state_n[ci]}, c.dtype, device_);
    c.v = Tensor::zeros(Shape{state_n[ci]}, c.dtype, device_);
    if (master_n[ci] > 0) c.master = Tensor::empty(Shape{master_n[ci]}, c.dtype, device_);
    state_.push_back(std::move(c));
  }
  for (Slot& s : slots_) {
    s.grad_buffer = grad_index[s.grad_buffer];
    s.state_class = cls_index[s.state_class];
    s.grad_view = flat_view(grads_[s.grad_buffer], s.grad_offset, s.param.shape());
    if (s.master_offset >= 0) master_view(s).copy_from(s.param);
  }
  ensure_grad_views(/*keep_values=*/true);  // a gradient accumulated before construction is kept
  build_launches();
}

Tensor AdamW::master_view(const Slot& s) const {
  if (s.master_offset < 0) return s.param.detach();
  return flat_view(state_[s.state_class].master, s.master_offset, s.param.shape());
}

Tensor AdamW::state_view(const Slot& s, const Tensor& flat) const {
  return flat_view(flat, s.state_offset, s.param.shape());
}

// Puts each parameter's view of the flat gradient buffer back if something replaced it: Tensor::
// zero_grad() drops it (the gradient is zero), and a backward after that allocates a fresh buffer
// (whose values are copied in when keep_values).
void AdamW::ensure_grad_views(bool keep_values) {
  for (Slot& s : slots_) {
    std::shared_ptr<TensorImpl>& g = s.param.impl()->grad;
    if (g == s.grad_view.impl_ptr()) continue;
    if (g && keep_values) {
      Tensor cur(g);
      check(cur.numel() == s.param.numel(), "AdamW",
            fmt::format("gradient of {} is {}, expected the parameter's shape", s.param.desc(), cur.desc()));
      s.grad_view.copy_from(cur);
    } else {
      s.grad_view.fill(0.0);
    }
    g = s.grad_view.impl_ptr();
  }
}

void AdamW::build_launches() {
  launches_.clear();
  for (DType pdt : kParamDtypes) {
    std::vector<kernels::AdamWChunk> chunks;
    for (Slot& s : slots_) {
      if (s.param.dtype() != pdt) continue;
      s.data = s.param.data();
      const StateClass& c = state_[s.state_class];
      const size_t pe = dtype_size(pdt), se = dtype_size(c.dtype);
      char* grad = static_cast<char*>(grads_[s.grad_buffer].data()) + size_t(s.grad_offset) * pe;
      char* m = static_cast<char*>(c.m.data()) + size_t(s.state_offset) * se;
      char* v = static_cast<char*>(c.v.data()) + size_t(s.state_offset) * se;
      char* param = static_cast<char*>(s.param.data());
      const bool own = s.master_offset < 0;
      char* master = own ? param : static_cast<char*>(c.master.data()) + size_t(s.master_offset) * se;
      const ParamGroup& grp = groups_[s.group];
      for (int64_t off = 0; off < s.param.numel(); off += kernels::kAdamWChunk) {
        kernels::AdamWChunk ch{};
        ch.grad = grad + size_t(off) * pe;
        ch.master = master + size_t(off) * se;
        ch.m = m + size_t(off) * se;
        ch.v = v + size_t(off) * se;
        ch.work = own ? nullptr : param + size_t(off) * pe;
        ch.n = std::min(kernels::kAdamWChunk, s.param.numel() - off);
        ch.lr_scale = grp.lr_scale;
        ch.weight_decay = grp.weight_decay;
        chunks.push_back(ch);
      }
    }
    if (chunks.empty()) continue;
    static_assert(sizeof(kernels::AdamWChunk) % 4 == 0);
    const int64_t words = int64_t(chunks.size() * sizeof(kernels::AdamWChunk) / 4);
    Tensor host = Tensor::empty(Shape{words}, DType::i32, Device::cpu);
    std::memcpy(host.data(), chunks.data(), chunks.size() * sizeof(kernels::AdamWChunk));
    Launch l;
    l.param_dtype = pdt;
    l.state_dtype = state_dtype_of(pdt);
    l.table = host.to(device_);
    l.n_chunks = int64_t(chunks.size());
    launches_.push_back(std::move(l));
  }
}

void AdamW::zero_grad() {
  for (Tensor& g : grads_) g.fill(0.0);
  ensure_grad_views(/*keep_values=*/false);
}

double AdamW::grad_norm() {
  ensure_grad_views(/*keep_values=*/true);
  double total = 0.0;
  for (const Tensor& g : grads_) {
    Tensor out = Tensor::empty(Shape{1}, kernels::stat_dtype(g.dtype()), device_);
    DEEPLORA_DISPATCH(device_, sumsq, g.dtype(), g.data(), g.numel(), out.data(), stream_for(device_));
    total += out.item();
  }
  return std::sqrt(total);
}

void AdamW::step(double lr, double grad_scale) {
  check(std::isfinite(lr) && std::isfinite(grad_scale), "AdamW::step",
        fmt::format("lr ({}) and grad_scale ({}) must be finite; skip the step when the gradient norm is not",
                    lr, grad_scale));
  ensure_grad_views(/*keep_values=*/true);
  bool moved = false;
  for (const Slot& s : slots_) moved |= s.param.data() != s.data;
  if (moved) build_launches();  // a parameter's storage was replaced: re-point the chunk table
  ++step_;
  kernels::AdamWStep st;
  st.lr = lr;
  st.beta1 = cfg_.beta1;
  st.beta2 = cfg_.beta2;
  st.eps = cfg_.eps;
  st.bias_corr1 = 1.0 - std::pow(cfg_.beta1, double(step_));
  st.bias_corr2 = 1.0 - std::pow(cfg_.beta2, double(step_));
  st.grad_scale = grad_scale;
  for (const Launch& l : launches_)
    DEEPLORA_DISPATCH(device_, adamw, l.param_dtype, l.state_dtype,
                      static_cast<const kernels::AdamWChunk*>(l.table.data()), l.n_chunks, st, stream_for(device_));
}

void AdamW::set_step(double lr, double max_norm) {
  check(std::isfinite(lr) && std::isfinite(max_norm) && max_norm >= 0, "AdamW::set_step",
        fmt::format("lr ({}) must be finite and max_norm ({}) finite and >= 0", lr, max_norm));
  ++step_;
  counted_ = true;
  kernels::AdamWStepDev st;
  st.lr = lr;
  st.bias_corr1 = 1.0 - std::pow(cfg_.beta1, double(step_));
  st.bias_corr2 = 1.0 - std::pow(cfg_.beta2, double(step_));
  st.max_norm = max_norm;
  static_assert(sizeof(st) % 4 == 0);
  constexpr int64_t words = int64_t(sizeof(st) / 4);
  if (!dev_step_.defined()) dev_step_ = Tensor::zeros(Shape{words}, DType::i32, device_);
  Tensor h = Tensor::empty(Shape{words}, DType::i32, Device::cpu);
  std::memcpy(h.data(), &st, sizeof(st));
  dev_step_.copy_from(h);
}

void AdamW::step_on_device(const Tensor& losses) {
  check(dev_step_.defined(), "AdamW::step_on_device", "call set_step(lr, max_norm) first");
  ensure_grad_views(/*keep_values=*/true);
  bool moved = false;
  for (const Slot& s : slots_) moved |= s.param.data() != s.data;
  if (moved) build_launches();
  kernels::NormSources src;
  for (size_t i = 0; i < grads_.size(); ++i) {
    const DType sd = kernels::stat_dtype(grads_[i].dtype());
    if (sumsq_.size() <= i) sumsq_.push_back(Tensor::empty(Shape{1}, sd, device_));
    DEEPLORA_DISPATCH(device_, sumsq, grads_[i].dtype(), grads_[i].data(), grads_[i].numel(), sumsq_[i].data(),
                      stream_for(device_));
    src.sumsq[i] = sumsq_[i].data();
    src.sumsq_f64[i] = sd == DType::f64;
  }
  src.n_sumsq = int(grads_.size());
  if (losses.defined()) {
    check(losses.device() == device_ && (losses.dtype() == DType::f32 || losses.dtype() == DType::f64),
          "AdamW::step_on_device", fmt::format("losses {} must be f32 or f64 on the optimizer's device", losses.desc()));
    src.losses = losses.data();
    src.losses_f64 = losses.dtype() == DType::f64;
    src.n_losses = losses.numel();
  }
  auto* st = static_cast<kernels::AdamWStepDev*>(dev_step_.data());
  DEEPLORA_DISPATCH(device_, adamw_clip, src, st, stream_for(device_));
  for (const Launch& l : launches_)
    DEEPLORA_DISPATCH(device_, adamw_dev, l.param_dtype, l.state_dtype,
                      static_cast<const kernels::AdamWChunk*>(l.table.data()), l.n_chunks, cfg_.beta1, cfg_.beta2,
                      cfg_.eps, st, stream_for(device_));
}

AdamW::StepInfo AdamW::last_step() {
  check(dev_step_.defined(), "AdamW::last_step", "no device step has run");
  Tensor h = dev_step_.to(Device::cpu);
  kernels::AdamWStepDev st;
  std::memcpy(&st, h.data(), sizeof(st));
  StepInfo info{st.norm, st.grad_scale, st.skip != 0};
  if (info.skipped && counted_) --step_;  // the bias corrections of a skipped step are used again
  counted_ = false;
  return info;
}

void AdamW::set_step_count(int64_t t) {
  check(t >= 0, "AdamW::set_step_count", fmt::format("step count must be >= 0, got {}", t));
  step_ = t;
}

std::vector<std::pair<std::string, Tensor>> AdamW::state_tensors() {
  std::vector<std::pair<std::string, Tensor>> out;
  out.reserve(slots_.size() * 3);
  for (const Slot& s : slots_) {
    const StateClass& c = state_[s.state_class];
    Tensor views[3] = {master_view(s), state_view(s, c.m), state_view(s, c.v)};
    for (int k = 0; k < 3; ++k) {
      std::string key = s.param.name() + kSuffixes[k];
      views[k].set_name(key);
      out.emplace_back(std::move(key), views[k]);
    }
  }
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
  std::map<std::string, const Tensor*> given;
  for (const auto& [name, t] : state) {
    check(t.defined(), "AdamW::load_state", fmt::format("'{}' is an undefined tensor", name));
    check(given.emplace(name, &t).second, "AdamW::load_state", fmt::format("'{}' is given twice", name));
  }
  // Validate everything first, so a bad checkpoint leaves the optimizer as it was.
  std::vector<std::pair<Tensor, const Tensor*>> copies;
  std::set<std::string> used;
  for (const Slot& s : slots_) {
    const StateClass& c = state_[s.state_class];
    Tensor views[3] = {master_view(s), state_view(s, c.m), state_view(s, c.v)};
    for (int k = 0; k < 3; ++k) {
      const std::string key = s.param.name() + kSuffixes[k];
      auto it = given.find(key);
      check(it != given.end(), "AdamW::load_state",
            fmt::format("missing '{}' (optimizer state of {}); the checkpoint holds {} optimizer tensors", key,
                        s.param.desc(), state.size()));
      const Tensor& src = *it->second;
      check(src.shape() == s.param.shape(), "AdamW::load_state",
            fmt::format("'{}' has shape {}, expected {} (the shape of {})", key, src.shape().str(),
                        s.param.shape().str(), s.param.desc()));
      check(is_float(src.dtype()), "AdamW::load_state", fmt::format("'{}' is {}, not a float tensor", key, src.desc()));
      used.insert(key);
      copies.emplace_back(views[k], &src);
    }
  }
  for (const auto& [name, t] : given)
    check(used.count(name) != 0, "AdamW::load_state",
          fmt::format("unexpected '{}': no trainable parameter of this optimizer has that state", name));
  for (auto& [dst, src] : copies)
    if (dst.data() != src->data() || dst.device() != src->device()) dst.copy_from(*src);
  for (const Slot& s : slots_)
    if (s.master_offset >= 0) s.param.detach().copy_from(master_view(s));
}

std::vector<Tensor> AdamW::flat_grads() {
  ensure_grad_views(/*keep_values=*/true);
  return grads_;
}

std::vector<AdamW::GradRange> AdamW::grad_ranges() const {
  std::vector<GradRange> out;
  out.reserve(slots_.size());
  for (const Slot& s : slots_) out.push_back(GradRange{s.param.name(), s.grad_buffer, s.grad_offset, s.param.numel()});
  return out;
}

}  // namespace deeplora
