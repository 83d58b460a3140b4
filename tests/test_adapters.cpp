// Adapters on the tiny GPT (CPU, f64 unless noted): the Deep LoRA closed form (ΔW(0) = eps^L A Bᵀ,
// span(B) ⊇ V_r, A = O B), compressed vs wide vs narrow-random loss trajectories under gradient
// descent, LoRA against a hand computation, parameter counts and frozen bases, bad input, and the
// export round trips (deeplora files, PEFT files, merged weights).
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "models/adapters.h"
#include "models/gpt.h"
#include "runtime/io/safetensors.h"
#include "runtime/linalg.h"
#include "runtime/ops.h"
#include "runtime/optim.h"
#include "runtime/tape.h"
#include "test_util.h"

using namespace deeplora;
namespace fs = std::filesystem;

namespace {
using test::error_of;

GptConfig tiny() { return GptConfig::preset("tiny"); }

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / fmt::format("deeplora-adapters-{}-{}", name, getpid());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

struct TokBatch {
  Tensor tokens, targets;
};

TokBatch random_batch(int64_t B, int64_t T, uint64_t seed, int64_t V = 512) {
  std::vector<int32_t> t(size_t(B * (T + 1)));
  uint64_t s = seed * 2654435761ULL + 12345;
  for (auto& x : t) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    x = int32_t((s >> 33) % uint64_t(V));
  }
  std::vector<int32_t> in, tg;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < T; ++i) {
      in.push_back(t[size_t(b * (T + 1) + i)]);
      tg.push_back(t[size_t(b * (T + 1) + i + 1)]);
    }
  return {Tensor::from_ints(in, Shape{B, T}), Tensor::from_ints(tg, Shape{B, T})};
}

std::function<LossBatch()> fixed(const TokBatch& b) {
  return [b] { return std::make_pair(b.tokens, b.targets); };
}

// Host row-major f64 matrices, independent of the code under test.
struct HMat {
  int64_t rows = 0, cols = 0;
  std::vector<double> v;
  HMat(int64_t r, int64_t c) : rows(r), cols(c), v(size_t(r * c), 0.0) {}
  explicit HMat(const Tensor& t) : rows(t.dim(0)), cols(t.dim(1)), v(t.to_double()) {}
  double& operator()(int64_t i, int64_t j) { return v[size_t(i * cols + j)]; }
  double operator()(int64_t i, int64_t j) const { return v[size_t(i * cols + j)]; }
};

HMat mul(const HMat& a, const HMat& b, bool ta = false, bool tb = false) {
  const int64_t M = ta ? a.cols : a.rows, K = ta ? a.rows : a.cols, N = tb ? b.rows : b.cols;
  REQUIRE(K == (tb ? b.cols : b.rows));
  HMat c(M, N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t p = 0; p < K; ++p) {
      const double x = ta ? a(p, i) : a(i, p);
      for (int64_t j = 0; j < N; ++j) c(i, j) += x * (tb ? b(j, p) : b(p, j));
    }
  return c;
}

double fro(const HMat& a) {
  double s = 0;
  for (double x : a.v) s += x * x;
  return std::sqrt(s);
}

double max_rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / std::max(den, 1e-300);
}

// ‖(I − QQᵀ) X‖_F with Q an orthonormal basis of span(S).
double outside_span(const Tensor& S, const Tensor& X) {
  HMat Q(linalg::orthonormalize(S));
  HMat x(X);
  HMat p = mul(Q, mul(Q, x, true, false));
  for (size_t i = 0; i < p.v.size(); ++i) p.v[i] = x.v[i] - p.v[i];
  return fro(p);
}

std::vector<double> logits_of(Gpt& m, const TokBatch& b) {
  NoGrad ng;
  return m.forward(b.tokens).to_double();
}

// Plain gradient descent on the adapters (inner/LoRA/wide at lr, outer at outer_scale * lr).
std::vector<double> gd_losses(const AdapterOptions& o, const TokBatch& batch, int steps, double lr) {
  Gpt model(tiny(), DType::f64, Device::cpu, 7);
  Adapters ad = attach_adapters(model, o, fixed(batch));
  std::vector<double> losses;
  for (int s = 0; s <= steps; ++s) {
    Tensor loss = model.loss(batch.tokens, batch.targets);
    losses.push_back(loss.item());
    if (s == steps) break;
    backward(loss);
    for (auto& a : ad)
      for (auto& p : a->params()) {
        if (!p.tensor.requires_grad()) continue;
        Tensor g = p.tensor.grad();
        REQUIRE(g.defined());
        const double step = lr * (p.role == Adapter::Role::outer ? o.outer_lr_scale : 1.0);
        double* w = p.tensor.data_as<double>();
        const double* gp = g.data_as<double>();
        for (int64_t i = 0; i < p.tensor.numel(); ++i) w[i] -= step * gp[i];
        p.tensor.zero_grad();
      }
  }
  return losses;
}

}  // namespace

TEST_CASE("adapters: deeplora gradsvd closed form: ΔW(0) = eps^L A Bᵀ, span(B) ⊇ V_r, A = O B") {
  Gpt model(tiny(), DType::f64, Device::cpu, 3);
  TokBatch batch = random_batch(2, 16, 1);
  std::vector<double> base = logits_of(model, batch);
  AdapterOptions o;
  o.rank = 4;  // r: factors of width 8
  o.depth = 3;
  o.eps = 1e-3;
  o.seed = 11;
  // G computed independently first (the init pass must leave no trace on the model).
  std::vector<Linear*> layers = adapted_linears(model, "all");
  std::vector<Tensor> G = weight_gradients(model, layers, fixed(batch), 1);
  for (auto& [n, p] : model.named_params()) CHECK_MESSAGE(!p->master.grad().defined(), n);
  AdapterInitReport rep;
  Adapters ad = attach_adapters(model, o, fixed(batch), &rep);
  REQUIRE(ad.size() == 8);
  CHECK(rep.n_layers == 8);
  CHECK(rep.n_completed == 0);
  CHECK(rep.n_null_singular == 0);
  CHECK(rep.grad_seconds >= 0);
  CHECK(rep.svd_seconds > 0);
  const double epsL = std::pow(o.eps, o.depth);
  for (size_t j = 0; j < ad.size(); ++j) {
    auto* d = dynamic_cast<DeepLoraAdapter*>(ad[j].get());
    REQUIRE(d);
    const int64_t m = d->out_features(), n = d->in_features();
    CAPTURE(d->module());
    linalg::Svd s = linalg::svd_topk(G[j], o.rank);
    // span(B) ⊇ V_r and span(A) ⊇ U_r (both hold in either orientation of the closed form).
    CHECK(outside_span(d->B(), s.V) <= 1e-10);
    CHECK(outside_span(d->A(), s.U) <= 1e-10);
    // The spec's construction: A = O B (m <= n) or B = Oᵀ A (m > n), with orthonormal B resp. A.
    HMat O(deeplora_O(m, n, o.seed, int64_t(j), DType::f64, Device::cpu));
    HMat A(d->A()), B(d->B());
    HMat orthonormal = m <= n ? B : A;
    HMat I = mul(orthonormal, orthonormal, true, false);
    for (int64_t i = 0; i < I.rows; ++i) I(i, i) -= 1.0;
    CHECK(fro(I) <= 1e-12);
    HMat derived = m <= n ? mul(O, B) : mul(O, A, true, false);
    HMat diff = m <= n ? A : B;
    for (size_t i = 0; i < diff.v.size(); ++i) diff.v[i] -= derived.v[i];
    CHECK(fro(diff) <= 1e-12);
    // K_i = eps I and ΔW(0) = eps^L A Bᵀ, through delta_weight() and through the forward itself.
    for (int i = 1; i <= o.depth; ++i) {
      HMat K(d->K(i));
      for (int64_t a = 0; a < K.rows; ++a)
        for (int64_t b = 0; b < K.cols; ++b) CHECK(K(a, b) == (a == b ? o.eps : 0.0));
    }
    HMat dW = mul(A, B, false, true);
    for (double& x : dW.v) x *= epsL;
    CHECK(max_rel_diff(d->delta_weight().to_double(), dW.v) <= 1e-12);
    Tensor x = Tensor::randn(Shape{2, 5, n}, 100 + j, DType::f64);
    Tensor y = Tensor::randn(Shape{2, 5, m}, 200 + j, DType::f64);
    std::vector<double> got;
    {
      NoGrad ng;
      got = d->forward(x, y).to_double();
    }
    HMat want = mul(HMat(x.reshape(Shape{10, n})), dW, false, true);  // x ΔWᵀ
    std::vector<double> yv = y.to_double(), delta(got.size());
    for (size_t i = 0; i < got.size(); ++i) delta[i] = got[i] - yv[i];
    CHECK(max_rel_diff(delta, want.v) <= 1e-6);  // the subtraction y' - y cancels ~9 digits of y
  }
  // The adapted model starts (almost) where the base was: ΔW ~ 1e-9.
  CHECK(max_rel_diff(logits_of(model, batch), base) <= 1e-6);
}

TEST_CASE("adapters: compressed deeplora follows the wide deep adapter under GD; narrow random does not") {
  // One fixed batch of 8 tokens ("few data"): the gradients have rank <= 8 = r, so the compressed
  // subspace holds them at t = 0, and the claim is that the dynamics stay there early on. Plain GD,
  // K_i (and every wide W_i) at lr, A and B at 0.01 lr. Two regimes: smooth descent (eps 0.1) and the
  // small-init plateau followed by a fast drop (eps 0.03).
  // Stated tolerance: at every step |L_compressed - L_wide| <= 10% of the wide model's loss drop over
  // the window, and the narrow-random ablation deviates at least 5x more than the compressed one.
  TokBatch batch = random_batch(1, 8, 5);
  struct Regime {
    double eps, lr;
  };
  for (Regime g : {Regime{0.1, 1.0}, Regime{0.03, 10.0}}) {
    CAPTURE(g.eps);
    AdapterOptions o;
    o.rank = 8;  // width 16
    o.depth = 3;
    o.eps = g.eps;
    o.outer_lr_scale = 0.01;
    o.seed = 3;
    const int steps = 8;
    AdapterOptions w = o;
    w.wide = true;
    AdapterOptions nr = o;
    nr.init = "random";
    std::vector<double> lc = gd_losses(o, batch, steps, g.lr), lw = gd_losses(w, batch, steps, g.lr),
                        ln = gd_losses(nr, batch, steps, g.lr);
    double dc = 0, dn = 0;
    for (int s = 0; s <= steps; ++s) {
      dc = std::max(dc, std::abs(lc[size_t(s)] - lw[size_t(s)]));
      dn = std::max(dn, std::abs(ln[size_t(s)] - lw[size_t(s)]));
    }
    const double drop = lw[0] - lw[size_t(steps)];
    MESSAGE(fmt::format("eps {} lr {}: wide loss {:.5f} -> {:.5f} (drop {:.4f}); compressed -> {:.5f}, max |compressed "
                        "- wide| {:.2e}; narrow random -> {:.5f}, max |narrow - wide| {:.2e}",
                        g.eps, g.lr, lw[0], lw[size_t(steps)], drop, lc[size_t(steps)], dc, ln[size_t(steps)], dn));
    CHECK(drop > 0.1);  // the window shows real learning
    // ΔW(0): eps^L O (wide) vs eps^L A Bᵀ = eps^L O B Bᵀ (compressed, m <= n): O restricted to the subspace.
    CHECK(std::abs(lc[0] - lw[0]) <= 1e-6);
    CHECK(dc <= 0.1 * drop);
    CHECK(dn >= 5 * dc);
  }
}

TEST_CASE("adapters: wide reference starts at eps^L O with orthogonal factors of width max(m, n)") {
  Gpt model(tiny(), DType::f64, Device::cpu, 1);
  AdapterOptions o;
  o.wide = true;
  o.depth = 3;
  o.eps = 0.5;
  o.seed = 9;
  Adapters ad = attach_adapters(model, o, nullptr);
  REQUIRE(ad.size() == 8);
  for (size_t j = 0; j < ad.size(); ++j) {
    auto* w = dynamic_cast<WideDeepLoraAdapter*>(ad[j].get());
    REQUIRE(w);
    const int64_t m = w->out_features(), n = w->in_features(), d = std::max(m, n);
    CAPTURE(w->module());
    CHECK(w->params()[0].tensor.shape() == Shape{d, n});
    CHECK(w->params()[1].tensor.shape() == Shape{d, d});
    CHECK(w->params()[2].tensor.shape() == Shape{m, d});
    HMat O(deeplora_O(m, n, o.seed, int64_t(j), DType::f64, Device::cpu));
    for (double& x : O.v) x *= std::pow(o.eps, 3);
    CHECK(max_rel_diff(w->delta_weight().to_double(), O.v) <= 1e-12);
    for (auto& p : w->params()) {  // eps * (semi-)orthogonal: WᵀW = eps² I or WWᵀ = eps² I
      HMat W(p.tensor);
      HMat G = W.rows >= W.cols ? mul(W, W, true, false) : mul(W, W, false, true);
      for (int64_t i = 0; i < G.rows; ++i) G(i, i) -= o.eps * o.eps;
      CHECK(fro(G) <= 1e-12);
    }
  }
}

TEST_CASE("adapters: lora forward equals a hand computation (PEFT init and scaling)") {
  const int64_t m = 6, n = 5, r = 3;
  const double alpha = 16;
  LoraAdapter a("h.0.attn.c_attn", m, n, r, alpha, 42, DType::f64, Device::cpu);
  CHECK(a.A().name() == "h.0.attn.c_attn.lora.A");
  CHECK(a.A().shape() == Shape{r, n});
  CHECK(a.B().shape() == Shape{m, r});
  for (double v : a.A().to_double()) CHECK(std::abs(v) <= 1.0 / std::sqrt(double(n)));
  for (double v : a.B().to_double()) CHECK(v == 0.0);
  {
    NoGrad ng;
    a.B().copy_from(Tensor::randn(Shape{m, r}, 43, DType::f64));
  }
  Tensor x = Tensor::randn(Shape{2, 4, n}, 1, DType::f64), y = Tensor::randn(Shape{2, 4, m}, 2, DType::f64);
  std::vector<double> got;
  {
    NoGrad ng;
    got = a.forward(x, y).to_double();
  }
  HMat X(x.reshape(Shape{8, n})), A(a.A()), B(a.B());
  HMat d = mul(mul(X, A, false, true), B, false, true);  // (x Aᵀ) Bᵀ
  std::vector<double> yv = y.to_double(), want(yv.size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = yv[i] + alpha / double(r) * d.v[i];
  CHECK(max_rel_diff(got, want) <= 1e-14);
  HMat dW = mul(B, A);
  for (double& v : dW.v) v *= alpha / double(r);
  CHECK(max_rel_diff(a.delta_weight().to_double(), dW.v) <= 1e-14);

  // Attached with B = 0 the model is unchanged, exactly.
  Gpt model(tiny(), DType::f64, Device::cpu, 2);
  TokBatch batch = random_batch(2, 8, 3);
  std::vector<double> base = logits_of(model, batch);
  AdapterOptions o;
  o.kind = "lora";
  o.rank = 4;
  attach_adapters(model, o, nullptr);
  CHECK(logits_of(model, batch) == base);
}

TEST_CASE("adapters: trainable counts, frozen base without gradient buffers, optimizer groups") {
  // Tiny GPT: per block c_attn [192, 64], attn.c_proj [64, 64], c_fc [256, 64], mlp.c_proj [64, 256]:
  // sum of (m + n) over the 8 layers = 2048.
  TokBatch batch = random_batch(2, 8, 4);
  SUBCASE("deeplora") {
    Gpt model(tiny(), DType::f64, Device::cpu, 1);
    AdapterOptions o;
    o.rank = 4;  // width 8
    AdapterInitReport rep;
    Adapters ad = attach_adapters(model, o, fixed(batch), &rep);
    CHECK(rep.n_trainable == 8 * 2048 + 8 * 3 * 64);
    CHECK(n_adapter_params(ad) == rep.n_trainable);
    CHECK(model.n_trainable() == 0);
    CHECK(ad[0]->params()[0].name == "h.0.attn.c_attn.deeplora.A");
    CHECK(ad[0]->params()[2].name == "h.0.attn.c_attn.deeplora.K1");
    Tensor loss = model.loss(batch.tokens, batch.targets);
    backward(loss);
    for (auto& [n, p] : model.named_params()) {
      CHECK_MESSAGE(!p->master.grad().defined(), n);
      CHECK_MESSAGE(!p->master.requires_grad(), n);
    }
    for (auto& a : ad)
      for (auto& p : a->params()) CHECK_MESSAGE(p.tensor.grad().defined(), p.name);
    auto groups = adapter_param_groups(ad, 0.01);
    REQUIRE(groups.size() == 2);
    CHECK(groups[0].name == "adapter_inner");
    CHECK(groups[0].lr_scale == 1.0);
    CHECK(adapter_param_groups(ad, 0.01, 16)[0].lr_scale == 2.0);  // width 8: inner lr x 16/8
    CHECK(adapter_param_groups(ad, 0.01, 16)[1].lr_scale == 0.01);
    CHECK(groups[0].params.size() == 8 * 3);
    CHECK(groups[1].name == "adapter_outer");
    CHECK(groups[1].lr_scale == 0.01);
    CHECK(groups[1].params.size() == 8 * 2);
    for (auto& g : groups) CHECK(g.weight_decay == 0.0);
    AdamW opt(groups);
    CHECK(opt.n_params() == rep.n_trainable);
  }
  SUBCASE("deeplora, outer-lr-scale 0 freezes A and B") {
    Gpt model(tiny(), DType::f64, Device::cpu, 1);
    AdapterOptions o;
    o.rank = 4;
    o.outer_lr_scale = 0;
    o.init = "random";
    AdapterInitReport rep;
    Adapters ad = attach_adapters(model, o, nullptr, &rep);
    CHECK(rep.n_trainable == 8 * 3 * 64);
    auto groups = adapter_param_groups(ad, 0);
    REQUIRE(groups.size() == 1);
    CHECK(groups[0].name == "adapter_inner");
    backward(model.loss(batch.tokens, batch.targets));
    for (auto& a : ad)
      for (auto& p : a->params()) CHECK(p.tensor.grad().defined() == (p.role == Adapter::Role::inner));
  }
  SUBCASE("lora, attn only") {
    Gpt model(tiny(), DType::f64, Device::cpu, 1);
    AdapterOptions o;
    o.kind = "lora";
    o.rank = 4;
    o.adapt = "attn";
    Adapters ad = attach_adapters(model, o, nullptr);
    REQUIRE(ad.size() == 2);
    CHECK(n_adapter_params(ad) == 2 * 4 * (192 + 64));
    auto groups = adapter_param_groups(ad, 0.01);
    REQUIRE(groups.size() == 1);
    CHECK(groups[0].name == "lora");
    CHECK(groups[0].lr_scale == 1.0);
  }
  SUBCASE("attn-mlp selects c_attn, c_fc, mlp.c_proj") {
    Gpt model(tiny(), DType::f64, Device::cpu, 1);
    std::vector<std::string> names;
    for (Linear* l : adapted_linears(model, "attn-mlp")) names.push_back(l->name);
    CHECK(names == std::vector<std::string>{"h.0.attn.c_attn", "h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.attn.c_attn",
                                            "h.1.mlp.c_fc", "h.1.mlp.c_proj"});
  }
}

TEST_CASE("adapters: gradients of A, Bt, K_i and of LoRA's A, B match finite differences (f64)") {
  TokBatch batch = random_batch(2, 8, 12);
  for (const char* kind : {"deeplora", "lora"}) {
    CAPTURE(kind);
    Gpt model(tiny(), DType::f64, Device::cpu, 3);
    AdapterOptions o;
    o.kind = kind;
    o.rank = 4;
    o.init = "random";
    Adapters ad = attach_adapters(model, o, nullptr);
    {  // a generic point: every factor O(1)
      NoGrad ng;
      uint64_t s = 300;
      for (auto& a : ad)
        for (auto& p : a->params())
          if (p.role == Adapter::Role::inner || p.name.find(".lora.B") != std::string::npos)
            p.tensor.copy_from(Tensor::randn(p.tensor.shape(), ++s, DType::f64, Device::cpu, 0.5));
    }
    backward(model.loss(batch.tokens, batch.targets));
    int checked = 0;
    for (size_t j : {size_t(0), size_t(6)})
      for (auto& p : ad[j]->params()) {
        std::vector<double> g = p.tensor.grad().to_double();
        double* w = p.tensor.data_as<double>();
        for (int64_t i : {int64_t(0), p.tensor.numel() / 2 + 1, p.tensor.numel() - 1}) {
          const double h = 1e-5, keep = w[i];
          double lp, lm;
          {
            NoGrad ng;
            w[i] = keep + h;
            lp = model.loss(batch.tokens, batch.targets).item();
            w[i] = keep - h;
            lm = model.loss(batch.tokens, batch.targets).item();
            w[i] = keep;
          }
          const double fd = (lp - lm) / (2 * h);
          CHECK_MESSAGE(std::abs(fd - g[size_t(i)]) <= 1e-6 * std::max(1.0, std::abs(fd)), p.name, "[", i, "]");
          ++checked;
        }
      }
    CHECK(checked == (std::string(kind) == "lora" ? 2 * 2 * 3 : 2 * 5 * 3));
  }
}

TEST_CASE("adapters: bf16 compute casts the f32 masters on the tape; gradients reach them") {
  Gpt model(tiny(), DType::bf16, Device::cpu, 1);
  TokBatch batch = random_batch(2, 8, 6);
  AdapterOptions o;
  o.rank = 4;
  Adapters ad = attach_adapters(model, o, fixed(batch));
  for (auto& a : ad)
    for (auto& p : a->params()) CHECK(p.tensor.dtype() == DType::f32);
  Tensor loss = model.loss(batch.tokens, batch.targets);
  CHECK(std::isfinite(loss.item()));
  backward(loss);
  for (auto& a : ad)
    for (auto& p : a->params()) {
      REQUIRE(p.tensor.grad().defined());
      CHECK(p.tensor.grad().dtype() == DType::f32);
    }
  for (auto& [n, p] : model.named_params()) CHECK_MESSAGE(!p->master.grad().defined(), n);
}

TEST_CASE("adapters: svd_batches averages the initialization gradient over batches") {
  Gpt model(tiny(), DType::f64, Device::cpu, 1);
  TokBatch b1 = random_batch(2, 8, 10), b2 = random_batch(2, 8, 11);
  auto layers = adapted_linears(model, "attn");
  auto g1 = weight_gradients(model, layers, fixed(b1), 1);
  auto g2 = weight_gradients(model, layers, fixed(b2), 1);
  int call = 0;
  auto both = [&] {
    const TokBatch& b = call++ == 0 ? b1 : b2;
    return std::make_pair(b.tokens, b.targets);
  };
  auto g = weight_gradients(model, layers, both, 2);
  for (size_t j = 0; j < layers.size(); ++j) {
    std::vector<double> a = g1[j].to_double(), b = g2[j].to_double(), avg(a.size());
    for (size_t i = 0; i < a.size(); ++i) avg[i] = 0.5 * (a[i] + b[i]);
    CHECK(max_rel_diff(g[j].to_double(), avg) <= 1e-12);
  }
}

TEST_CASE("adapters: bad options and mismatched adapter files give clear errors") {
  Gpt model(tiny(), DType::f64, Device::cpu, 1);
  TokBatch batch = random_batch(1, 8, 1);
  auto err = [&](AdapterOptions o) { return error_of([&] { attach_adapters(model, o, fixed(batch)); }); };
  AdapterOptions o;
  o.rank = 0;
  CHECK(err(o).find("--rank 0: must be at least 1") != std::string::npos);
  o.rank = 33;  // width 66 > min(m, n) = 64 of every tiny layer
  CHECK(err(o).find("--rank 33: deeplora factors of width 66 exceed min(out, in) = 64 of layer h.0.attn.c_attn") != std::string::npos);
  o = AdapterOptions{};
  o.kind = "lora";
  o.rank = 65;
  CHECK(err(o).find("--rank 65") != std::string::npos);
  o = AdapterOptions{};
  o.adapt = "mlp-only";
  CHECK(err(o).find("--adapt 'mlp-only'") != std::string::npos);
  o = AdapterOptions{};
  o.depth = 1;
  CHECK(err(o).find("--depth 1") != std::string::npos);
  o = AdapterOptions{};
  o.kind = "dora";
  CHECK(err(o).find("--adapter 'dora'") != std::string::npos);
  o = AdapterOptions{};
  o.init = "pissa";
  CHECK(err(o).find("--deeplora-init 'pissa'") != std::string::npos);
  o = AdapterOptions{};
  o.kind = "lora";
  o.wide = true;
  CHECK(err(o).find("--wide") != std::string::npos);
  o = AdapterOptions{};
  o.width_lr_ref = -1;
  CHECK(err(o).find("--width-lr-ref -1") != std::string::npos);
  o = AdapterOptions{};
  o.svd_batches = 0;
  CHECK(err(o).find("--svd-batches") != std::string::npos);
  CHECK(model.n_trainable() == model.config().n_params());  // a refused attach leaves the model alone
  o = AdapterOptions{};
  o.init = "random";
  attach_adapters(model, o, nullptr);
  CHECK(err(o).find("already has an adapter") != std::string::npos);

  // Adapter files that do not match the model.
  fs::path d = temp_dir("mismatch");
  Adapters ad;
  for (Linear* l : model.linears())
    ad.push_back(std::dynamic_pointer_cast<Adapter>(l->adapter));
  save_adapters(ad, o, (d / "dl").string());
  GptConfig one = tiny();
  one.n_layer = 1;
  Gpt shallow(one, DType::f64, Device::cpu, 1);
  std::string e = error_of([&] { load_adapters(shallow, (d / "dl").string(), AdapterOptions{}); });
  CHECK(e.find("layer 'h.1.attn.c_attn' does not exist in this model") != std::string::npos);
  CHECK(e.find("adapter_model.safetensors") != std::string::npos);
  GptConfig narrow = tiny();
  narrow.n_embd = 32;
  Gpt thin(narrow, DType::f64, Device::cpu, 1);
  e = error_of([&] { load_adapters(thin, (d / "dl").string(), AdapterOptions{}); });
  CHECK(e.find("tensor 'h.0.attn.c_attn.deeplora.A' has shape [192, 16], this model needs [96, 16]") != std::string::npos);
  for (Linear* l : thin.linears()) CHECK(!l->adapter);  // nothing attached after a failed load
  e = error_of([&] { load_adapters(thin, (d / "nowhere").string(), AdapterOptions{}); });
  CHECK(e.find("nowhere: not a directory") != std::string::npos);
  fs::create_directories(d / "empty");
  e = error_of([&] { load_adapters(thin, (d / "empty").string(), AdapterOptions{}); });
  CHECK(e.find("adapter_config.json: cannot open") != std::string::npos);
  // A file with a tensor the config does not list.
  {
    SafetensorsFile f = load_safetensors((d / "dl" / "adapter_model.safetensors").string());
    NamedTensors t(f.tensors.begin(), f.tensors.end());
    t.emplace_back("h.0.attn.c_attn.deeplora.K9", Tensor::zeros(Shape{8, 8}, DType::f32));
    save_safetensors((d / "dl" / "adapter_model.safetensors").string(), t);
    Gpt fresh(tiny(), DType::f64, Device::cpu, 1);
    e = error_of([&] { load_adapters(fresh, (d / "dl").string(), AdapterOptions{}); });
    CHECK(e.find("unexpected tensor 'h.0.attn.c_attn.deeplora.K9'") != std::string::npos);
  }
  fs::remove_all(d);
}

TEST_CASE("adapters: deeplora save -> load gives identical logits; merged weights equal the adapted model") {
  fs::path d = temp_dir("deeplora-export");
  TokBatch batch = random_batch(2, 16, 8);
  AdapterOptions o;
  o.rank = 4;  // width 8
  o.seed = 5;
  Gpt model(tiny(), DType::f64, Device::cpu, 4);
  std::vector<double> base = logits_of(model, batch);
  Adapters ad = attach_adapters(model, o, fixed(batch));
  {  // move away from ΔW ~ 1e-9 so the comparisons mean something
    NoGrad ng;
    uint64_t s = 50;
    for (auto& a : ad)
      for (auto& p : a->params())
        if (p.role == Adapter::Role::inner) {
          Tensor k = Tensor::randn(p.tensor.shape(), ++s, DType::f64, Device::cpu, 0.6);
          p.tensor.copy_from(k);
        }
  }
  std::vector<double> adapted = logits_of(model, batch);
  CHECK(max_rel_diff(adapted, base) > 1e-3);
  save_adapters(ad, o, (d / "dl").string(), "tiny-test");
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(d / "dl" / "adapter_config.json"));
  CHECK(cfg["adapter_type"] == "deeplora");
  CHECK(cfg["rank"] == 4);
  CHECK(cfg["width"] == 8);
  CHECK(cfg["depth"] == 3);
  CHECK(cfg["layers"].size() == 8);
  SafetensorsHeader h = read_safetensors_header((d / "dl" / "adapter_model.safetensors").string());
  CHECK(h.entries.size() == 8 * 5);
  REQUIRE(h.find("h.1.mlp.c_proj.deeplora.B"));
  CHECK(h.find("h.1.mlp.c_proj.deeplora.B")->shape == std::vector<int64_t>{256, 8});
  CHECK(h.find("h.1.mlp.c_proj.deeplora.A")->shape == std::vector<int64_t>{64, 8});
  CHECK(h.find("h.1.mlp.c_proj.deeplora.K3")->shape == std::vector<int64_t>{8, 8});

  Gpt fresh(tiny(), DType::f64, Device::cpu, 4);
  AdapterOptions loaded;
  Adapters back = load_adapters(fresh, (d / "dl").string(), AdapterOptions{}, &loaded);
  CHECK(loaded.kind == "deeplora");
  CHECK(loaded.rank == 4);
  {  // format 1 (before --rank meant r for Deep LoRA too) stored the width as "rank"
    nlohmann::json old = cfg;
    old.erase("width");
    old["rank"] = 8;
    old["format_version"] = 1;
    fs::create_directories(d / "dl1");
    fs::copy_file(d / "dl" / "adapter_model.safetensors", d / "dl1" / "adapter_model.safetensors");
    std::ofstream(d / "dl1" / "adapter_config.json") << old.dump();
    Gpt f1(tiny(), DType::f64, Device::cpu, 4);
    AdapterOptions l1;
    load_adapters(f1, (d / "dl1").string(), AdapterOptions{}, &l1);
    CHECK(l1.rank == 4);
    CHECK(logits_of(f1, batch) == adapted);
  }
  CHECK(back.size() == 8);
  CHECK(logits_of(fresh, batch) == adapted);
  CHECK(n_adapter_params(back) == n_adapter_params(ad));
  CHECK(fresh.n_trainable() == 0);

  // Checkpoint state (names unique, shapes checked) round trips too.
  NamedTensors st = adapter_state(ad);
  std::map<std::string, Tensor> m(st.begin(), st.end());
  CHECK(m.size() == st.size());
  load_adapter_state(back, m, "state");
  CHECK(logits_of(fresh, batch) == adapted);

  // Merge: W0 += A K Bᵀ, adapters removed, logits unchanged (f64).
  CHECK(merge_adapters(model) == 8);
  for (Linear* l : model.linears()) CHECK(!l->adapter);
  CHECK(max_rel_diff(logits_of(model, batch), adapted) <= 1e-6);
  MESSAGE(fmt::format("merged vs adapted logits: max rel diff {:.2e}", max_rel_diff(logits_of(model, batch), adapted)));
  fs::remove_all(d);
}

TEST_CASE("adapters: lora exports PEFT files (keys, shapes, config) that load back to identical logits") {
  fs::path d = temp_dir("lora-export");
  TokBatch batch = random_batch(2, 16, 9);
  Gpt model(tiny(), DType::f32, Device::cpu, 4);
  AdapterOptions o;
  o.kind = "lora";
  o.rank = 4;
  o.alpha = 8;
  o.adapt = "attn-mlp";
  Adapters ad = attach_adapters(model, o, nullptr);
  {
    NoGrad ng;
    uint64_t s = 70;
    for (auto& a : ad) static_cast<LoraAdapter*>(a.get())->B().copy_from(Tensor::randn(a->params()[1].tensor.shape(), ++s, DType::f32, Device::cpu, 0.1));
  }
  std::vector<double> adapted = logits_of(model, batch);
  save_adapters(ad, o, (d / "peft").string(), "gpt2");
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(d / "peft" / "adapter_config.json"));
  CHECK(cfg["peft_type"] == "LORA");
  CHECK(cfg["task_type"] == "CAUSAL_LM");
  CHECK(cfg["r"] == 4);
  CHECK(cfg["lora_alpha"] == 8);
  CHECK(cfg["fan_in_fan_out"] == true);
  CHECK(cfg["base_model_name_or_path"] == "gpt2");
  CHECK(cfg["target_modules"] == nlohmann::json({"c_attn", "c_fc", "mlp.c_proj"}));
  SafetensorsHeader h = read_safetensors_header((d / "peft" / "adapter_model.safetensors").string());
  CHECK(h.entries.size() == 6 * 2);
  const auto* A = h.find("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight");
  const auto* B = h.find("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight");
  REQUIRE(A);
  REQUIRE(B);
  CHECK(A->shape == std::vector<int64_t>{4, 64});   // [r, in]
  CHECK(B->shape == std::vector<int64_t>{192, 4});  // [out, r]
  CHECK(A->dtype == SafeDType::f32);
  REQUIRE(h.find("base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"));
  CHECK(h.find("base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight")->shape == std::vector<int64_t>{4, 256});

  Gpt fresh(tiny(), DType::f32, Device::cpu, 4);
  AdapterOptions loaded;
  Adapters back = load_adapters(fresh, (d / "peft").string(), AdapterOptions{}, &loaded);
  CHECK(loaded.kind == "lora");
  CHECK(loaded.alpha == 8);
  CHECK(back.size() == 6);
  CHECK(logits_of(fresh, batch) == adapted);
  // Merged LoRA equals the adapted model (f32: rounding of W0 + ΔW only).
  merge_adapters(model);
  CHECK(max_rel_diff(logits_of(model, batch), adapted) <= 1e-5);
  fs::remove_all(d);
}

TEST_CASE("adapters: a precomputed gradient-SVD init attaches the same Deep LoRA as computing it, at any depth") {
  TokBatch batch = random_batch(2, 16, 21);
  AdapterOptions o;
  o.rank = 4;
  o.seed = 9;
  Gpt ref(tiny(), DType::f64, Device::cpu, 2), reuse(tiny(), DType::f64, Device::cpu, 2);
  DeepLoraInit init = deeplora_gradsvd_init(reuse, o, fixed(batch));
  CHECK(init.A.size() == 8);
  CHECK(init.report.n_layers == 8);
  for (auto& [n, p] : reuse.named_params()) CHECK_MESSAGE(!p->master.grad().defined(), n);  // no trace left
  for (int depth : {3, 2}) {
    CAPTURE(depth);
    o.depth = depth;
    Adapters a = attach_adapters(ref, o, fixed(batch));
    Adapters b = attach_adapters(reuse, o, nullptr, nullptr, &init);
    REQUIRE(a.size() == b.size());
    for (size_t j = 0; j < a.size(); ++j) CHECK(a[j]->delta_weight().to_double() == b[j]->delta_weight().to_double());
    detach_adapters(ref);
    detach_adapters(reuse);
  }
  AdapterOptions wrong = o;
  wrong.rank = 2;
  CHECK(error_of([&] { attach_adapters(reuse, wrong, nullptr, nullptr, &init); }).find("--rank 2 needs") != std::string::npos);
}
