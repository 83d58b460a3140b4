// Adapters: LoRA, compressed Deep LoRA (closed-form gradient-SVD init, DEEP_LORA.md), the wide deep
// reference, optimizer groups, checkpoint state and merging. Export/import: adapter_export.cpp.
#include "models/adapters.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cfloat>
#include <cmath>
#include <stdexcept>

#include "runtime/device.h"
#include "runtime/dist.h"
#include "runtime/linalg.h"
#include "runtime/ops.h"
#include "runtime/ops_adapter.h"
#include "runtime/ops_layout.h"
#include "runtime/tape.h"

namespace deeplora {
namespace {

using Clock = std::chrono::steady_clock;

// splitmix64: one seed per (run seed, layer, purpose), so O, random A/B, LoRA A and the wide
// factors never share Gaussian streams.
uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
enum Purpose : uint64_t { kO = 1, kRandA = 2, kRandB = 3, kLoraA = 4, kWideQ = 16 };
uint64_t seed_for(uint64_t seed, int64_t layer, uint64_t purpose) {
  return mix64(seed ^ mix64(uint64_t(layer) * 1024 + purpose));
}

// Compute-dtype view of a master: the forward's WorkScope copy, or a recorded cast when the dtypes
// differ (as the models' work()).
Tensor work(const Tensor& p, DType dt) { return compute_copy(p, dt); }

Tensor eye(int64_t k, double v, DType dt, Device dev) {
  std::vector<double> e(size_t(k * k), 0.0);
  for (int64_t i = 0; i < k; ++i) e[size_t(i * k + i)] = v;
  return Tensor::from_vector(e, Shape{k, k}, dt, dev);
}

// [a, b] side by side (same rows) and Xᵀ, on the device, exact copies (runtime/ops_layout.h). Not
// recorded.
Tensor hcat(const Tensor& a, const Tensor& b) {
  NoGrad ng;
  return ops::concat({a, b});
}
Tensor transpose(const Tensor& x) {
  NoGrad ng;
  return ops::transpose(x);
}

void sync_if_cuda(Device d) {
  if (d == Device::cuda) cuda_sync();
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

// ---- options ------------------------------------------------------------------------------------

void AdapterOptions::validate() const {
  auto bad = [](const std::string& m) { throw std::invalid_argument(m); };
  if (kind != "lora" && kind != "deeplora" && kind != "none")
    bad(fmt::format("--adapter '{}': expected lora, deeplora or none", kind));
  if (kind == "none") return;
  if (adapt != "attn" && adapt != "attn-mlp" && adapt != "all")
    bad(fmt::format("--adapt '{}': expected attn (c_attn), attn-mlp (c_attn, c_fc, mlp.c_proj) or all", adapt));
  if (rank < 1) bad(fmt::format("--rank {}: must be at least 1", rank));
  if (wide && kind != "deeplora") bad("--wide applies to --adapter deeplora only");
  if (kind == "lora") {
    if (!(alpha > 0) || !std::isfinite(alpha)) bad(fmt::format("--alpha {}: must be positive", alpha));
    return;
  }
  if (depth < 2) bad(fmt::format("--depth {}: deeplora needs at least 2 factors", depth));
  if (!(eps > 0) || !std::isfinite(eps)) bad(fmt::format("--eps {}: must be positive", eps));
  if (!(width_lr_ref >= 0) || !std::isfinite(width_lr_ref))
    bad(fmt::format("--width-lr-ref {}: must be >= 0 (0: off)", width_lr_ref));
  if (!(outer_lr_scale >= 0) || !std::isfinite(outer_lr_scale))
    bad(fmt::format("--outer-lr-scale {}: must be >= 0 (0 freezes A and B)", outer_lr_scale));
  if (init != "gradsvd" && init != "random") bad(fmt::format("--deeplora-init '{}': expected gradsvd or random", init));
  if (svd_batches < 1) bad(fmt::format("--svd-batches {}: must be at least 1", svd_batches));
}

std::string AdapterOptions::str() const {
  if (kind == "none") return "adapter: none (full fine-tuning)";
  if (kind == "lora") return fmt::format("adapter: lora r={} alpha={} adapt={}", rank, alpha, adapt);
  if (wide) return fmt::format("adapter: deeplora --wide (uncompressed reference) L={} eps={} adapt={}", depth, eps, adapt);
  return fmt::format("adapter: deeplora r={} (width {}) L={} eps={} init={} outer-lr-scale={}{} adapt={}{}", rank, width(),
                     depth, eps, init, outer_lr_scale,
                     width_lr_ref > 0 ? fmt::format(" inner lr x {}/{}", width_lr_ref, width()) : "", adapt, init == "gradsvd" ? fmt::format(" svd-batches={}", svd_batches) : "");
}

std::string AdapterInitReport::str() const {
  std::string s = fmt::format("adapters: {} layers, {} trainable parameters ({:.3f}M) | init: gradient pass {:.3f} s, "
                              "SVD + closed form {:.3f} s",
                              n_layers, n_trainable, double(n_trainable) / 1e6, grad_seconds, svd_seconds);
  if (n_null_singular > 0)
    s += fmt::format(" | {} top-r singular values of the gradients are zero (those singular vectors are random)",
                     n_null_singular);
  if (n_completed > 0)
    s += fmt::format(" | rank-deficient [V_r, O^T U_r]: {} basis columns completed with random orthonormal directions",
                     n_completed);
  return s;
}

// ---- Adapter base -------------------------------------------------------------------------------

Tensor& Adapter::add_param(const std::string& short_name, Tensor t, Role role) {
  const char* tag = role == Role::lora ? "lora" : role == Role::wide ? "deeplora_wide" : "deeplora";
  t.set_name(fmt::format("{}.{}.{}", module_, tag, short_name));
  t.set_requires_grad(true);
  params_.push_back(NamedParam{t.name(), t, role});
  return params_.back().tensor;
}

Tensor& Adapter::param(const std::string& short_name) {
  for (auto& p : params_)
    if (p.name.size() > short_name.size() &&
        p.name.compare(p.name.size() - short_name.size() - 1, std::string::npos, "." + short_name) == 0)
      return p.tensor;
  throw std::invalid_argument(fmt::format("adapter of {}: no parameter '{}'", module_, short_name));
}

int64_t Adapter::n_params(bool trainable_only) const {
  int64_t n = 0;
  for (auto& p : params_)
    if (!trainable_only || p.tensor.requires_grad()) n += p.tensor.numel();
  return n;
}

// ---- LoRA ---------------------------------------------------------------------------------------

LoraAdapter::LoraAdapter(const std::string& module, int64_t out_features, int64_t in_features, int64_t r, double alpha,
                         uint64_t seed, DType master, Device dev)
    : Adapter(module, out_features, in_features), r_(r), alpha_(alpha) {
  // kaiming_uniform_(a=sqrt(5)) on [r, in]: gain sqrt(2/(1+5)), bound gain*sqrt(3/in) = 1/sqrt(in).
  const double bound = 1.0 / std::sqrt(double(in_features));
  add_param("A", Tensor::uniform(Shape{r, in_features}, seed, -bound, bound, master, dev), Role::lora);
  add_param("B", Tensor::zeros(Shape{out_features, r}, master, dev), Role::lora);
}

Tensor LoraAdapter::forward(const Tensor& x, const Tensor& y) {
  const DType dt = x.dtype();
  // Scale the rank-r intermediate, not the [.., out] result: same math, r/out of the traffic.
  Tensor t = ops::scale(ops::linear(x, work(params_[0].tensor, dt)), scaling());
  return ops::linear(t, work(params_[1].tensor, dt), Tensor(), y);  // y + t Bᵀ in the GEMM's epilogue
}

Tensor LoraAdapter::delta_weight() const {
  NoGrad ng;
  return ops::scale(ops::matmul(params_[1].tensor, params_[0].tensor), alpha_ / double(r_));
}

// ---- compressed Deep LoRA -----------------------------------------------------------------------

DeepLoraAdapter::DeepLoraAdapter(const std::string& module, const Tensor& A, const Tensor& B, int depth, double eps)
    : Adapter(module, A.dim(0), B.dim(0)), k_(A.dim(1)), depth_(depth) {
  check(A.ndim() == 2 && B.ndim() == 2 && A.dim(1) == B.dim(1), "DeepLoraAdapter",
        fmt::format("{}: A {} and B {} must be [m, k] and [n, k]", module, A.desc(), B.desc()));
  check(depth >= 2, "DeepLoraAdapter", fmt::format("depth {} < 2", depth));
  NoGrad ng;
  add_param("A", A.clone(), Role::outer);
  add_param("Bt", transpose(B), Role::outer);
  for (int i = 1; i <= depth; ++i) add_param(fmt::format("K{}", i), eye(k_, eps, A.dtype(), A.device()), Role::inner);
}

Tensor DeepLoraAdapter::forward(const Tensor& x, const Tensor& y) {
  const DType dt = x.dtype();
  // x B Kᵀ Aᵀ with K = K_L...K_1: W = K Bt [k, n] is formed once per forward in the master dtype and
  // cast to the compute dtype in one fused op (runtime/ops_adapter.h), so the branch costs two
  // activation GEMMs, as LoRA's: u = x Wᵀ [.., k], then y + u Aᵀ in the GEMM's epilogue.
  std::vector<Tensor> K;
  for (int i = 1; i <= depth_; ++i) K.push_back(params_[size_t(1 + i)].tensor);
  Tensor u = ops::linear(x, ops::deeplora_product(K, params_[1].tensor, dt));
  return ops::linear(u, work(params_[0].tensor, dt), Tensor(), y);
}

Tensor DeepLoraAdapter::K_product() const {
  NoGrad ng;
  Tensor K = params_[2].tensor;
  for (int i = 2; i <= depth_; ++i) K = ops::matmul(params_[size_t(1 + i)].tensor, K);
  return K;
}

Tensor DeepLoraAdapter::B() const {
  NoGrad ng;
  return transpose(params_[1].tensor);
}

Tensor DeepLoraAdapter::delta_weight() const {
  NoGrad ng;
  return ops::matmul(ops::matmul(params_[0].tensor, K_product()), params_[1].tensor);  // (A K) Bᵀ
}

// ---- wide deep reference ------------------------------------------------------------------------

WideDeepLoraAdapter::WideDeepLoraAdapter(const std::string& module, std::vector<Tensor> W)
    : Adapter(module, W.empty() ? 0 : W.back().dim(0), W.empty() ? 0 : W.front().dim(1)) {
  check(W.size() >= 2, "WideDeepLoraAdapter", fmt::format("{}: needs at least 2 factors", module));
  for (size_t i = 0; i < W.size(); ++i) {
    check(W[i].ndim() == 2 && (i == 0 || W[i].dim(1) == W[i - 1].dim(0)), "WideDeepLoraAdapter",
          fmt::format("{}: factor W{} {} does not chain", module, i + 1, W[i].desc()));
    add_param(fmt::format("W{}", i + 1), W[i], Role::wide);
  }
}

Tensor WideDeepLoraAdapter::forward(const Tensor& x, const Tensor& y) {
  const DType dt = x.dtype();
  Tensor h = x;
  for (size_t i = 0; i + 1 < params_.size(); ++i) h = ops::linear(h, work(params_[i].tensor, dt));
  return ops::linear(h, work(params_.back().tensor, dt), Tensor(), y);  // y + the chain, in one GEMM
}

Tensor WideDeepLoraAdapter::delta_weight() const {
  NoGrad ng;
  Tensor P = params_[0].tensor;
  for (size_t i = 1; i < params_.size(); ++i) P = ops::matmul(params_[i].tensor, P);
  return P;
}

// ---- initialization -----------------------------------------------------------------------------

std::vector<Linear*> adapted_linears(CausalLM& model, const std::string& adapt) {
  auto ends = [](const std::string& s, const std::string& x) {
    return s == x || (s.size() > x.size() && s.compare(s.size() - x.size() - 1, std::string::npos, "." + x) == 0);
  };
  if (adapt != "attn" && adapt != "attn-mlp" && adapt != "all")
    throw std::invalid_argument(
        fmt::format("--adapt '{}': expected attn (c_attn), attn-mlp (c_attn, c_fc, mlp.c_proj) or all", adapt));
  const AdapterTargets& t = model.family().targets;
  auto any_of = [&](const std::string& name, const std::vector<std::string>& mods) {
    for (const std::string& m : mods)
      if (ends(name, m)) return true;
    return false;
  };
  std::vector<Linear*> v;
  for (Linear* l : model.linears()) {
    const bool attn = any_of(l->name, t.attn), mlp = any_of(l->name, t.mlp);
    if (adapt == "all" || attn || (adapt == "attn-mlp" && mlp)) v.push_back(l);
  }
  return v;
}

std::vector<Tensor> weight_gradients(CausalLM& model, const std::vector<Linear*>& layers,
                                     const std::function<LossBatch()>& next_batch, int n_batches) {
  check(n_batches >= 1, "weight_gradients", fmt::format("n_batches {} < 1", n_batches));
  check(bool(next_batch), "weight_gradients", "no batch source given (needed for the gradient-SVD init)");
  std::vector<std::string> names;
  for (Linear* l : layers) names.push_back(l->name + ".weight");
  // Only these weights require grad during the pass: no other gradient is computed or kept.
  std::vector<std::pair<std::string, bool>> was;
  for (auto& [n, p] : model.named_params()) was.emplace_back(n, p->trainable);
  auto restore = [&] {
    for (auto& [n, t] : was) model.set_trainable(n, t);
  };
  for (auto& [n, t] : was) model.set_trainable(n, false);
  for (auto& n : names) model.set_trainable(n, true);
  std::vector<Tensor> G;
  try {
    for (int b = 0; b < n_batches; ++b) {
      Tensor loss = model.loss(next_batch());
      backward(n_batches > 1 ? ops::scale(loss, 1.0 / double(n_batches)) : loss);
    }
    for (size_t i = 0; i < names.size(); ++i) {
      Tensor g = model.param(names[i]).master.grad();
      if (!g.defined()) g = Tensor::zeros(model.param(names[i]).master.shape(), model.param(names[i]).master.dtype(), model.device());
      G.push_back(g);
    }
  } catch (...) {
    tape().clear();
    restore();
    throw;
  }
  restore();  // drops the models' references to the gradients; G keeps them alive
  return G;
}

Tensor deeplora_O(int64_t m, int64_t n, uint64_t seed, int64_t layer, DType dt, Device dev) {
  return linalg::random_orthonormal(m, n, seed_for(seed, layer, kO), dt, dev);
}

DeepLoraFactors deeplora_closed_form(const Tensor& U, const Tensor& V, const Tensor& O) {
  const int64_t m = O.dim(0), n = O.dim(1), r = U.dim(1);
  check(U.ndim() == 2 && V.ndim() == 2 && U.dim(0) == m && V.dim(0) == n && V.dim(1) == r, "deeplora_closed_form",
        fmt::format("U_r {} and V_r {} do not match O {}", U.desc(), V.desc(), O.desc()));
  check(2 * r <= std::min(m, n), "deeplora_closed_form",
        fmt::format("2r = {} exceeds min(m, n) = {}", 2 * r, std::min(m, n)));
  NoGrad ng;
  DeepLoraFactors f;
  if (m <= n) {
    f.B = linalg::orthonormalize(hcat(V, ops::matmul(O, U, true, false)), &f.n_completed);  // orth([V_r, Oᵀ U_r])
    f.A = ops::matmul(O, f.B);
  } else {
    f.A = linalg::orthonormalize(hcat(U, ops::matmul(O, V)), &f.n_completed);  // orth([U_r, O V_r])
    f.B = ops::matmul(O, f.A, true, false);
  }
  return f;
}

namespace {

// W_1..W_L of the wide reference with W_L...W_1 = eps^L O exactly: L-1 independent random orthogonal
// d x d factors, and the remaining (rectangular) factor chosen so the product is O — the same
// distribution as independent Haar factors, and the compressed adapter of this layer sees the same O.
std::vector<Tensor> wide_factors(const Tensor& O, int depth, double eps, uint64_t seed, int64_t layer) {
  NoGrad ng;
  const int64_t m = O.dim(0), n = O.dim(1), d = std::max(m, n);
  std::vector<Tensor> Q(static_cast<size_t>(depth));
  for (int l = 0; l < depth; ++l)
    if ((m <= n && l < depth - 1) || (m > n && l > 0))
      Q[size_t(l)] = linalg::random_orthonormal(d, d, seed_for(seed, layer, kWideQ + uint64_t(l)), O.dtype(), O.device());
  if (m <= n) {  // Q_1..Q_{L-1} square; W_L = O (Q_{L-1}...Q_1)ᵀ
    Tensor P = Q[0];
    for (int l = 1; l < depth - 1; ++l) P = ops::matmul(Q[size_t(l)], P);
    Q[size_t(depth - 1)] = ops::matmul(O, P, false, true);
  } else {  // Q_2..Q_L square; W_1 = (Q_L...Q_2)ᵀ O
    Tensor P = Q[1];
    for (int l = 2; l < depth; ++l) P = ops::matmul(Q[size_t(l)], P);
    Q[0] = ops::matmul(P, O, true, false);
  }
  for (auto& q : Q) q = ops::scale(q, eps);
  return Q;
}

void set_outer_trainable(const Adapters& adapters, bool t) {
  for (auto& a : adapters)
    for (auto& p : a->params())
      if (p.role == Adapter::Role::outer) {
        p.tensor.set_requires_grad(t);
        p.tensor.zero_grad();
      }
}

}  // namespace

DeepLoraInit deeplora_gradsvd_init(CausalLM& model, const AdapterOptions& o, const std::function<LossBatch()>& next_batch) {
  o.validate();
  check(o.kind == "deeplora" && !o.wide, "deeplora_gradsvd_init", "needs --adapter deeplora (compressed)");
  std::vector<Linear*> layers = adapted_linears(model, o.adapt);
  const Device dev = model.device();
  DeepLoraInit out;
  auto t0 = Clock::now();
  std::vector<Tensor> G = weight_gradients(model, layers, next_batch, o.svd_batches);
  // Data parallel: average G over the ranks' batches, so every rank derives the same A, B (the
  // SVD and O are deterministic given G and the seed). A no-op for a world of one.
  if (dist::ctx().world > 1) {
    NoGrad ng;
    for (Tensor& g : G) {
      dist::all_reduce_sum(g);
      g = ops::scale(g, 1.0 / double(dist::ctx().world));
    }
  }
  sync_if_cuda(dev);
  out.report.grad_seconds = seconds_since(t0);
  t0 = Clock::now();
  std::vector<linalg::Svd> svd = linalg::svd_topk_batched(G, o.rank);
  G.clear();
  for (size_t j = 0; j < layers.size(); ++j) {
    Linear* l = layers[j];
    Tensor O = deeplora_O(l->out_features(), l->in_features(), o.seed, int64_t(j), l->w->master.dtype(), dev);
    DeepLoraFactors f = deeplora_closed_form(svd[j].U, svd[j].V, O);
    out.report.n_completed += f.n_completed;
    out.A.push_back(f.A);
    out.B.push_back(f.B);
  }
  for (size_t j = 0; j < layers.size(); ++j) {  // one small download per layer, after all the work is queued
    std::vector<double> S = svd[j].S.to_double();
    const double tol = double(std::max(layers[j]->out_features(), layers[j]->in_features())) *
                       (svd[j].S.dtype() == DType::f64 ? DBL_EPSILON : double(FLT_EPSILON));
    for (double s : S)
      if (!(s > tol * S[0])) ++out.report.n_null_singular;
  }
  sync_if_cuda(dev);
  out.report.svd_seconds = seconds_since(t0);
  out.report.n_layers = int64_t(layers.size());
  return out;
}

Adapters attach_adapters(CausalLM& model, const AdapterOptions& o,
                         const std::function<LossBatch()>& next_batch, AdapterInitReport* report,
                         const DeepLoraInit* given) {
  o.validate();
  AdapterInitReport rep;
  if (o.kind == "none") {
    if (report) *report = rep;
    return {};
  }
  std::vector<Linear*> layers = adapted_linears(model, o.adapt);
  for (Linear* l : model.linears())
    if (l->adapter)
      throw std::invalid_argument(fmt::format("attach_adapters: layer {} already has an adapter (merge or detach first)", l->name));
  if (!o.wide)
    for (Linear* l : layers) {
      const int64_t m = l->out_features(), n = l->in_features();
      const int64_t per = o.width() / o.rank;  // factors of width r (LoRA) or 2r (Deep LoRA)
      if (o.width() > std::min(m, n))
        throw std::invalid_argument(fmt::format(
            "--rank {}: {} factors of width {} exceed min(out, in) = {} of layer {} ([{}, {}]); use --rank <= {}", o.rank,
            o.kind, o.width(), std::min(m, n), l->name, m, n, std::min(m, n) / per));
    }
  model.freeze_all();
  const Device dev = model.device();
  Adapters out;
  if (o.kind == "lora") {
    for (size_t j = 0; j < layers.size(); ++j) {
      Linear* l = layers[j];
      out.push_back(std::make_shared<LoraAdapter>(l->name, l->out_features(), l->in_features(), o.rank, o.alpha,
                                                  seed_for(o.seed, int64_t(j), kLoraA), l->w->master.dtype(), dev));
    }
  } else if (o.wide) {
    const auto t0 = Clock::now();
    for (size_t j = 0; j < layers.size(); ++j) {
      Linear* l = layers[j];
      Tensor O = deeplora_O(l->out_features(), l->in_features(), o.seed, int64_t(j), l->w->master.dtype(), dev);
      out.push_back(std::make_shared<WideDeepLoraAdapter>(l->name, wide_factors(O, o.depth, o.eps, o.seed, int64_t(j))));
    }
    sync_if_cuda(dev);
    rep.svd_seconds = seconds_since(t0);
  } else if (o.init == "random") {
    const auto t0 = Clock::now();
    for (size_t j = 0; j < layers.size(); ++j) {
      Linear* l = layers[j];
      const DType mdt = l->w->master.dtype();
      Tensor A = linalg::random_orthonormal(l->out_features(), o.width(), seed_for(o.seed, int64_t(j), kRandA), mdt, dev);
      Tensor B = linalg::random_orthonormal(l->in_features(), o.width(), seed_for(o.seed, int64_t(j), kRandB), mdt, dev);
      out.push_back(std::make_shared<DeepLoraAdapter>(l->name, A, B, o.depth, o.eps));
    }
    sync_if_cuda(dev);
    rep.svd_seconds = seconds_since(t0);
  } else {  // gradsvd: DEEP_LORA.md steps 1-5 (steps 1-4 possibly done before, once for many runs)
    DeepLoraInit computed;
    if (!given) computed = deeplora_gradsvd_init(model, o, next_batch);
    const DeepLoraInit& f = given ? *given : computed;
    check(f.A.size() == layers.size() && f.B.size() == layers.size(), "attach_adapters",
          fmt::format("the given Deep LoRA init has {} layers, --adapt {} selects {}", f.A.size(), o.adapt, layers.size()));
    for (size_t j = 0; j < layers.size(); ++j) {
      Linear* l = layers[j];
      check(f.A[j].shape() == Shape{l->out_features(), o.width()} && f.B[j].shape() == Shape{l->in_features(), o.width()},
            "attach_adapters",
            fmt::format("the given Deep LoRA init for {} has A {} and B {}, --rank {} needs [{}, {}] and [{}, {}]", l->name,
                        f.A[j].desc(), f.B[j].desc(), o.rank, l->out_features(), o.width(), l->in_features(), o.width()));
      out.push_back(std::make_shared<DeepLoraAdapter>(l->name, f.A[j], f.B[j], o.depth, o.eps));
    }
    rep.grad_seconds = f.report.grad_seconds;
    rep.svd_seconds = f.report.svd_seconds;
    rep.n_completed = f.report.n_completed;
    rep.n_null_singular = f.report.n_null_singular;
  }
  if (o.kind == "deeplora" && !o.wide && o.outer_lr_scale == 0) set_outer_trainable(out, false);
  for (auto& a : out) a->set_family(&model.family());
  for (size_t j = 0; j < layers.size(); ++j) layers[j]->adapter = out[j];
  rep.n_layers = int64_t(out.size());
  rep.n_trainable = n_adapter_params(out, true);
  if (report) *report = rep;
  return out;
}

// ---- optimizer groups, state, merging -----------------------------------------------------------

std::vector<ParamGroup> adapter_param_groups(const Adapters& adapters, double outer_lr_scale, double width_lr_ref) {
  double inner_scale = 1.0;
  if (width_lr_ref > 0)
    for (auto& a : adapters)
      if (auto* d = dynamic_cast<const DeepLoraAdapter*>(a.get())) inner_scale = width_lr_ref / double(d->width());
  ParamGroup inner{{}, inner_scale, 0.0, "adapter_inner"}, outer{{}, outer_lr_scale, 0.0, "adapter_outer"},
      lora{{}, 1.0, 0.0, "lora"}, wide{{}, 1.0, 0.0, "deeplora_wide"};
  for (auto& a : adapters)
    for (auto& p : a->params()) {
      if (!p.tensor.requires_grad()) continue;
      switch (p.role) {
        case Adapter::Role::inner: inner.params.push_back(p.tensor); break;
        case Adapter::Role::outer:
          if (outer_lr_scale != 0) outer.params.push_back(p.tensor);
          break;
        case Adapter::Role::lora: lora.params.push_back(p.tensor); break;
        case Adapter::Role::wide: wide.params.push_back(p.tensor); break;
      }
    }
  std::vector<ParamGroup> g;
  for (auto* x : {&inner, &outer, &lora, &wide})
    if (!x->params.empty()) g.push_back(*x);
  return g;
}

int64_t n_adapter_params(const Adapters& adapters, bool trainable_only) {
  int64_t n = 0;
  for (auto& a : adapters) n += a->n_params(trainable_only);
  return n;
}

NamedTensors adapter_state(const Adapters& adapters) {
  NamedTensors v;
  for (auto& a : adapters)
    for (auto& p : a->params()) v.emplace_back(p.name, p.tensor);
  return v;
}

void load_adapter_state(const Adapters& adapters, const std::map<std::string, Tensor>& state, const std::string& source) {
  for (auto& a : adapters)
    for (auto& p : a->params()) {
      auto it = state.find(p.name);
      if (it == state.end()) throw std::runtime_error(fmt::format("{}: missing adapter tensor '{}'", source, p.name));
      if (it->second.shape() != p.tensor.shape())
        throw std::runtime_error(fmt::format("{}: adapter tensor '{}' has shape {}, the adapter needs {}", source, p.name,
                                             it->second.shape().str(), p.tensor.shape().str()));
    }
  NoGrad ng;
  for (auto& a : adapters)
    for (auto& p : a->params()) p.tensor.copy_from(state.at(p.name));
}

int64_t merge_adapters(CausalLM& model) {
  int64_t n = 0;
  {
    NoGrad ng;
    for (Linear* l : model.linears()) {
      auto a = std::dynamic_pointer_cast<Adapter>(l->adapter);
      if (!a) continue;
      Tensor& W = l->w->master;
      Tensor dW = a->delta_weight();
      check(dW.shape() == W.shape(), "merge_adapters",
            fmt::format("{}: ΔW {} does not match W0 {}", l->name, dW.shape().str(), W.shape().str()));
      W.copy_from(ops::add(W, dW.dtype() == W.dtype() ? dW : dW.to(W.dtype())));
      l->adapter.reset();
      ++n;
    }
  }
  model.invalidate_frozen_cache();
  return n;
}

void detach_adapters(CausalLM& model) {
  for (Linear* l : model.linears()) l->adapter.reset();
}

}  // namespace deeplora
