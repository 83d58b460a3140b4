// Differentiable ops: validation, kernel dispatch, backward closures.
#include "runtime/ops.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "runtime/dispatch.h"
#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#include "kernels/nn.h"
#include "runtime/graph.h"
#include "runtime/op_checks.h"

namespace deeplora::ops {
namespace {

using kernels::Gemm;
using kernels::stat_dtype;

#define DL_K(dev, fn, ...) DEEPLORA_DISPATCH(dev, fn, __VA_ARGS__)

using detail::defined;
using detail::same_device;
using detail::same_float_dtype;
using detail::wants;

Tensor like(const Tensor& t) { return Tensor::empty(t.shape(), t.dtype(), t.device()); }

// Output impls to hand to the tape.
std::vector<std::shared_ptr<TensorImpl>> outs(std::initializer_list<const Tensor*> ts) {
  std::vector<std::shared_ptr<TensorImpl>> v;
  for (const Tensor* t : ts) v.push_back(t->impl_ptr());
  return v;
}

// Rows of a [..., C] tensor. An empty last dimension (C = 0) is an error naming the op and the tensor
// (rows = numel / C would divide by zero); zero rows of a non-empty C are fine.
int64_t rows_of(const Tensor& t, const char* op) {
  check(t.ndim() >= 1 && t.dim(-1) > 0, op,
        fmt::format("input {} has an empty last dimension (size 0): nothing to compute over", t.desc()));
  return t.numel() / t.dim(-1);
}

// grad(t) += g for a g of t's shape and dtype: handed over whole (grad_take) when `may_take` and t
// can take it, copied on t's first contribution, added otherwise. At most one input of a node may
// take its output's gradient, and only after every use of it in that node's closure.
void grad_add(const Tensor& t, const Tensor& g, bool may_take) {
  if (may_take && grad_take(t, g)) return;
  GradTarget gt = grad_target(t);
  if (gt.fresh) gt.g.copy_from(g);
  else DL_K(t.device(), acc, t.dtype(), g.data(), gt.g.data(), t.numel(), 1.0, stream_for(t.device()));
}

void elementwise_check(const char* op, const Tensor& a, const Tensor& b) {
  defined(op, {&a, &b});
  same_device(op, {&a, &b});
  same_float_dtype(op, {&a, &b});
  check(a.shape() == b.shape(), op, fmt::format("shape mismatch: {} vs {}", a.desc(), b.desc()));
}

}  // namespace

Tensor add(const Tensor& a, const Tensor& b) {
  elementwise_check("add", a, b);
  Tensor y = like(a);
  Device d = a.device();
  DL_K(d, add, a.dtype(), a.data(), b.data(), y.data(), y.numel(), stream_for(d));
  if (needs_grad({&a, &b})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [a, b, yi] {
      // b first: a (the residual stream, in a residual add) may then take gy as its own gradient.
      Tensor gy(yi->grad);
      if (wants(b)) grad_add(b, gy, false);
      if (wants(a)) grad_add(a, gy, true);
    });
  }
  return y;
}

Tensor mul(const Tensor& a, const Tensor& b) {
  elementwise_check("mul", a, b);
  Tensor y = like(a);
  Device d = a.device();
  DL_K(d, mul, a.dtype(), a.data(), b.data(), y.data(), y.numel(), stream_for(d));
  if (needs_grad({&a, &b})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [a, b, yi, d] {
      Tensor gy(yi->grad);
      if (wants(a)) DL_K(d, mul_acc, a.dtype(), gy.data(), b.data(), grad_buffer(a).data(), a.numel(), stream_for(d));
      if (wants(b)) DL_K(d, mul_acc, b.dtype(), gy.data(), a.data(), grad_buffer(b).data(), b.numel(), stream_for(d));
    });
  }
  return y;
}

Tensor scale(const Tensor& a, double s) {
  defined("scale", {&a});
  same_float_dtype("scale", {&a});
  Tensor y = like(a);
  Device d = a.device();
  DL_K(d, scale, a.dtype(), a.data(), y.data(), y.numel(), s, stream_for(d));
  if (needs_grad({&a})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [a, yi, d, s] {
      DL_K(d, acc, a.dtype(), Tensor(yi->grad).data(), grad_buffer(a).data(), a.numel(), s, stream_for(d));
    });
  }
  return y;
}

Tensor gelu(const Tensor& x) {
  defined("gelu", {&x});
  same_float_dtype("gelu", {&x});
  Tensor y = like(x);
  Device d = x.device();
  DL_K(d, gelu_fwd, x.dtype(), x.data(), y.data(), y.numel(), stream_for(d));
  if (needs_grad({&x})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [x, yi, d] {
      GradTarget gx = grad_target(x);  // written on its first contribution, no zero fill
      DL_K(d, gelu_bwd, x.dtype(), x.data(), Tensor(yi->grad).data(), gx.g.data(), x.numel(), !gx.fresh, stream_for(d));
    });
  }
  return y;
}

static Tensor sum_scaled(const char* op, const Tensor& x, double alpha) {
  defined(op, {&x});
  same_float_dtype(op, {&x});
  Device d = x.device();
  Tensor y = Tensor::empty(Shape{}, x.dtype(), d);
  DL_K(d, sum, x.dtype(), x.data(), x.numel(), y.data(), stream_for(d));
  if (alpha != 1.0) DL_K(d, scale, y.dtype(), y.data(), y.data(), 1, alpha, stream_for(d));
  if (needs_grad({&x})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [x, yi, d, alpha] {
      DL_K(d, acc_broadcast, x.dtype(), Tensor(yi->grad).data(), grad_buffer(x).data(), x.numel(), alpha, stream_for(d));
    });
  }
  return y;
}

Tensor sum(const Tensor& x) { return sum_scaled("sum", x, 1.0); }

Tensor mean(const Tensor& x) {
  check(x.defined() && x.numel() > 0, "mean", "empty tensor");
  return sum_scaled("mean", x, 1.0 / double(x.numel()));
}

Tensor cast(const Tensor& x, DType dt) {
  defined("cast", {&x});
  Device d = x.device();
  Tensor y = Tensor::empty(x.shape(), dt, d);
  DL_K(d, cast, x.dtype(), x.data(), dt, y.data(), x.numel(), stream_for(d));
  if (is_float(dt) && needs_grad({&x})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [x, yi, d, dt] {
      Tensor gy(yi->grad);
      Tensor gx = grad_buffer(x);
      if (dt == x.dtype()) {
        DL_K(d, acc, dt, gy.data(), gx.data(), x.numel(), 1.0, stream_for(d));
      } else {
        DL_K(d, cast_acc, dt, gy.data(), x.dtype(), gx.data(), x.numel(), stream_for(d));
      }
    });
  }
  return y;
}

std::vector<Tensor> cast_group(const std::vector<Tensor>& xs, DType dt) {
  std::vector<Tensor> ys;
  if (xs.empty()) return ys;
  for (const Tensor& x : xs) {
    check(x.defined() && x.dtype() == xs[0].dtype() && x.device() == xs[0].device(), "cast_group",
          fmt::format("every tensor must be defined, {} on {}; got {}", dtype_name(xs[0].dtype()),
                      device_name(xs[0].device()), x.defined() ? x.desc() : std::string("undefined")));
    check(is_float(x.dtype()) && is_float(dt), "cast_group", fmt::format("float tensors only, got {} to {}", x.desc(), dtype_name(dt)));
  }
  const Device d = xs[0].device();
  const DType src = xs[0].dtype();
  if (src == dt) {  // copies whose gradients pass through
    for (const Tensor& x : xs) ys.push_back(cast(x, dt));
    return ys;
  }
  for (const Tensor& x : xs) ys.push_back(Tensor::empty(x.shape(), dt, d));
  auto launch = [d](DType from, DType to, const std::vector<const void*>& in, const std::vector<void*>& out,
                    const std::vector<int64_t>& n, bool accumulate) {
    for (size_t b = 0; b < in.size(); b += kernels::kCastGroupMax) {
      kernels::CastGroup g;
      for (size_t i = b; i < in.size() && g.count < kernels::kCastGroupMax; ++i, ++g.count) {
        g.src[g.count] = in[i];
        g.dst[g.count] = out[i];
        g.n[g.count] = n[i];
      }
      DL_K(d, cast_group, from, to, g, accumulate, stream_for(d));
    }
  };
  std::vector<const void*> in;
  std::vector<void*> out;
  std::vector<int64_t> n;
  bool grads = false;
  for (size_t i = 0; i < xs.size(); ++i) {
    in.push_back(xs[i].data());
    out.push_back(ys[i].data());
    n.push_back(xs[i].numel());
    grads = needs_grad({&xs[i]}) || grads;
  }
  launch(src, dt, in, out, n, false);
  if (grads) {
    std::vector<std::shared_ptr<TensorImpl>> yi;
    for (const Tensor& y : ys) yi.push_back(y.impl_ptr());
    tape().record(yi, [xs, yi, d, src, dt, launch] {
      std::vector<const void*> gin;
      std::vector<void*> gout;
      std::vector<int64_t> gn;
      for (size_t i = 0; i < xs.size(); ++i) {
        if (!yi[i]->grad || !wants(xs[i])) continue;
        gin.push_back(Tensor(yi[i]->grad).data());
        gout.push_back(grad_buffer(xs[i]).data());
        gn.push_back(xs[i].numel());
      }
      launch(dt, src, gin, gout, gn, true);
    });
  }
  return ys;
}

Tensor reshape(const Tensor& x, const Shape& s) {
  defined("reshape", {&x});
  Tensor y = x.reshape(s);  // view sharing storage
  if (needs_grad({&x})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [x, yi] {
      Tensor gy(yi->grad);
      Device d = x.device();
      DL_K(d, acc, x.dtype(), gy.data(), grad_buffer(x).data(), x.numel(), 1.0, stream_for(d));
    });
  }
  return y;
}

// ---- matmul / linear ----------------------------------------------------------------------------

namespace {
// op(X) for a stored row-major matrix X of `rows x cols`, transposed when t.
struct Operand {
  const void* p;
  int64_t rows, cols;  // as stored
  bool t;
  int64_t stride;
  int64_t op_rows() const { return t ? cols : rows; }
  int64_t op_cols() const { return t ? rows : cols; }
};

void run_gemm(Device d, DType dt, const Operand& a, const Operand& b, void* c, int64_t batch, double beta,
              int64_t strideC, const void* bias = nullptr, const void* cin = nullptr) {
  Gemm g;
  g.dt = dt;
  g.ta = a.t;
  g.tb = b.t;
  g.M = a.op_rows();
  g.K = a.op_cols();
  g.N = b.op_cols();
  g.A = a.p; g.lda = a.cols; g.strideA = a.stride;
  g.B = b.p; g.ldb = b.cols; g.strideB = b.stride;
  g.C = c; g.ldc = g.N; g.strideC = strideC;
  g.batch = batch;
  g.alpha = 1.0;
  g.beta = beta;
  g.bias = bias;
  g.Cin = cin;
  if (d == Device::cuda) {
#ifdef DEEPLORA_HAVE_CUDA
    kernels::cuda::gemm(g, cuda_ctx().stream);
#endif
  } else {
    kernels::cpu::gemm(g, nullptr);
  }
}
}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b, bool ta, bool tb) {
  defined("matmul", {&a, &b});
  same_device("matmul", {&a, &b});
  same_float_dtype("matmul", {&a, &b});
  check((a.ndim() == 2 && b.ndim() == 2) || (a.ndim() == 3 && b.ndim() == 3 && a.dim(0) == b.dim(0)), "matmul",
        fmt::format("expected two 2-D or two 3-D tensors with equal batch, got {} and {}", a.desc(), b.desc()));
  const bool batched = a.ndim() == 3;
  const int64_t batch = batched ? a.dim(0) : 1;
  const int o = batched ? 1 : 0;
  Operand A{a.data(), a.dim(o), a.dim(o + 1), ta, a.dim(o) * a.dim(o + 1)};
  Operand B{b.data(), b.dim(o), b.dim(o + 1), tb, b.dim(o) * b.dim(o + 1)};
  check(A.op_cols() == B.op_rows(), "matmul",
        fmt::format("inner dimensions differ: {}{} x {}{}", a.desc(), ta ? "^T" : "", b.desc(), tb ? "^T" : ""));
  const int64_t M = A.op_rows(), N = B.op_cols(), K = A.op_cols();
  Tensor y = batched ? Tensor::empty(Shape{batch, M, N}, a.dtype(), a.device())
                     : Tensor::empty(Shape{M, N}, a.dtype(), a.device());
  Device d = a.device();
  if (K == 0) y.fill(0.0);
  else run_gemm(d, a.dtype(), A, B, y.data(), batch, 0.0, M * N);
  if (needs_grad({&a, &b})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [a, b, A, B, yi, d, batch, M, N, K] {
      Tensor gy(yi->grad);
      DType dt = a.dtype();
      Operand G{gy.data(), M, N, false, M * N};
      // A gradient's first contribution is written (beta = 0), later ones added (beta = 1).
      if (wants(a)) {
        GradTarget ga = grad_target(a);
        const double beta = ga.fresh ? 0.0 : 1.0;
        if (!A.t) run_gemm(d, dt, G, Operand{B.p, B.rows, B.cols, !B.t, B.stride}, ga.g.data(), batch, beta, M * K);
        else run_gemm(d, dt, B, Operand{G.p, M, N, true, M * N}, ga.g.data(), batch, beta, M * K);
      }
      if (wants(b)) {
        GradTarget gb = grad_target(b);
        const double beta = gb.fresh ? 0.0 : 1.0;
        if (!B.t) run_gemm(d, dt, Operand{A.p, A.rows, A.cols, !A.t, A.stride}, G, gb.g.data(), batch, beta, K * N);
        else run_gemm(d, dt, Operand{G.p, M, N, true, M * N}, A, gb.g.data(), batch, beta, K * N);
      }
    });
  }
  return y;
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& addend) {
  defined("linear", {&x, &w});
  same_device("linear", {&x, &w, &b, &addend});
  same_float_dtype("linear", {&x, &w, &b, &addend});
  check(w.ndim() == 2, "linear", fmt::format("weight must be 2-D [out, in], got {}", w.desc()));
  check(x.ndim() >= 1 && x.dim(-1) == w.dim(1), "linear",
        fmt::format("input {} does not match weight {} (last dim must equal {})", x.desc(), w.desc(), w.dim(1)));
  check(!b.defined() || (b.ndim() == 1 && b.dim(0) == w.dim(0)), "linear",
        fmt::format("bias {} must be [{}]", b.desc(), w.dim(0)));
  const int64_t R = rows_of(x, "linear"), K = w.dim(1), N = w.dim(0);
  Shape ys = x.shape();
  ys[-1] = N;
  check(!addend.defined() || addend.shape() == ys, "linear",
        fmt::format("addend {} must have the output's shape {}", addend.desc(), ys.str()));
  Tensor y = Tensor::empty(ys, x.dtype(), x.device());
  Device d = x.device();
  Operand X{x.data(), R, K, false, 0}, W{w.data(), N, K, true, 0};
  if (R > 0) {
    if (K == 0) {
      if (addend.defined()) y.copy_from(addend);
      else y.fill(0.0);
      if (b.defined()) DL_K(d, add_rowvec, y.dtype(), b.data(), y.data(), R, N, stream_for(d));
    } else if (addend.defined()) {  // the addend enters in the GEMM's epilogue: no extra pass
      run_gemm(d, x.dtype(), X, W, y.data(), 1, 1.0, 0, b.defined() ? b.data() : nullptr, addend.data());
    } else {
      run_gemm(d, x.dtype(), X, W, y.data(), 1, 0.0, 0, b.defined() ? b.data() : nullptr);
    }
  }
  if (needs_grad({&x, &w, &b, &addend})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [x, w, b, addend, yi, d, R, K, N] {
      Tensor gy(yi->grad);
      DType dt = x.dtype();
      Operand G{gy.data(), R, N, false, 0};
      // A gradient's first contribution is written (beta = 0), later ones added (beta = 1).
      if (wants(x)) {
        GradTarget gx = grad_target(x);
        run_gemm(d, dt, G, Operand{w.data(), N, K, false, 0}, gx.g.data(), 1, gx.fresh ? 0.0 : 1.0, 0);
      }
      if (wants(w)) {
        GradTarget gw = grad_target(w);
        run_gemm(d, dt, Operand{gy.data(), R, N, true, 0}, Operand{x.data(), R, K, false, 0}, gw.g.data(), 1,
                 gw.fresh ? 0.0 : 1.0, 0);
      }
      if (wants(b)) DL_K(d, colsum_acc, dt, gy.data(), R, N, grad_buffer(b).data(), stream_for(d));
      if (wants(addend)) grad_add(addend, gy, true);  // last: it may take gy itself
    });
  }
  return y;
}

// ---- normalization, embedding, attention, loss --------------------------------------------------

Tensor layernorm(const Tensor& x, const Tensor& w, const Tensor& b, double eps) {
  defined("layernorm", {&x, &w, &b});
  same_device("layernorm", {&x, &w, &b});
  same_float_dtype("layernorm", {&x, &w, &b});
  const int64_t R = rows_of(x, "layernorm"), C = x.dim(-1);
  check(w.ndim() == 1 && w.dim(0) == C && b.shape() == w.shape(), "layernorm",
        fmt::format("weight {} and bias {} must be [{}] for input {}", w.desc(), b.desc(), C, x.desc()));
  Device d = x.device();
  Tensor y = like(x);
  DType st = stat_dtype(x.dtype());
  Tensor mu = Tensor::empty(Shape{R}, st, d), rs = Tensor::empty(Shape{R}, st, d);
  DL_K(d, layernorm_fwd, x.dtype(), x.data(), w.data(), b.data(), y.data(), mu.data(), rs.data(), R, C, eps, stream_for(d));
  if (needs_grad({&x, &w, &b})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [x, w, b, mu, rs, yi, d, R, C] {
      Tensor gy(yi->grad);
      GradTarget gx = wants(x) ? grad_target(x) : GradTarget{};  // dx written on its first contribution
      void* dw = wants(w) ? grad_buffer(w).data() : nullptr;
      void* db = wants(b) ? grad_buffer(b).data() : nullptr;
      DL_K(d, layernorm_bwd, x.dtype(), x.data(), w.data(), mu.data(), rs.data(), gy.data(),
           gx.g.defined() ? gx.g.data() : nullptr, dw, db, R, C, !gx.fresh, stream_for(d));
    });
  }
  return y;
}

static thread_local int g_trusted_ids = 0;
TrustedIds::TrustedIds() { ++g_trusted_ids; }
TrustedIds::~TrustedIds() { --g_trusted_ids; }

// Counting bad ids synchronizes with the host, which a CUDA graph capture cannot do: a captured step
// (and a TrustedIds scope) relies on ids validated where they were made (data loading, argmax over
// the real vocabulary).
static void check_ids(const char* op, const Tensor& ids, int64_t V, int64_t ignore) {
  if (StepGraph::capturing() || (g_trusted_ids > 0 && ids.device() == Device::cuda)) return;
  Device d = ids.device();
  int64_t bad = DL_K(d, count_out_of_range, ids.data_as<int32_t>(), ids.numel(), V, ignore, stream_for(d));
  if (bad > 0) {
    auto v = ids.to_int();
    for (size_t i = 0; i < v.size(); ++i)
      if ((v[i] < 0 || v[i] >= V) && v[i] != ignore)
        throw std::invalid_argument(fmt::format("{}: {} id(s) out of range [0, {}) in {}; first: {} at flat index {}",
                                                op, bad, V, ids.desc(), v[i], i));
  }
}

Tensor embedding(const Tensor& tokens, const Tensor& wte, const Tensor& wpe, int64_t n_valid) {
  defined("embedding", {&tokens, &wte});
  same_device("embedding", {&tokens, &wte, &wpe});
  same_float_dtype("embedding", {&wte, &wpe});
  check(tokens.dtype() == DType::i32 && tokens.ndim() == 2, "embedding",
        fmt::format("tokens must be i32 [B, T], got {}", tokens.desc()));
  check(wte.ndim() == 2, "embedding", fmt::format("wte must be [V, C], got {}", wte.desc()));
  const int64_t B = tokens.dim(0), T = tokens.dim(1), V = wte.dim(0), C = wte.dim(1);
  check(!wpe.defined() || (wpe.ndim() == 2 && wpe.dim(1) == C && wpe.dim(0) >= T), "embedding",
        fmt::format("wpe {} must be [>= {}, {}] for tokens {}", wpe.desc(), T, C, tokens.desc()));
  check(n_valid <= V, "embedding", fmt::format("n_valid {} exceeds the rows of {}", n_valid, wte.desc()));
  check_ids("embedding", tokens, n_valid > 0 ? n_valid : V, std::numeric_limits<int64_t>::min());
  Device d = wte.device();
  Tensor y = Tensor::empty(Shape{B, T, C}, wte.dtype(), d);
  DL_K(d, embedding_fwd, wte.dtype(), tokens.data_as<int32_t>(), wte.data(), wpe.defined() ? wpe.data() : nullptr,
       y.data(), B, T, C, stream_for(d));
  if (needs_grad({&wte, &wpe})) {
    auto yi = y.impl_ptr();
    tape().record(outs({&y}), [tokens, wte, wpe, yi, d, B, T, C, V] {
      void* dwte = wants(wte) ? grad_buffer(wte).data() : nullptr;
      void* dwpe = wants(wpe) ? grad_buffer(wpe).data() : nullptr;
      DL_K(d, embedding_bwd, wte.dtype(), tokens.data_as<int32_t>(), Tensor(yi->grad).data(), dwte, dwpe, B, T, C, V,
           stream_for(d));
    });
  }
  return y;
}

Tensor attention(const Tensor& qkv, int64_t n_head) {
  defined("attention", {&qkv});
  same_float_dtype("attention", {&qkv});
  check(qkv.ndim() == 3 && qkv.dim(2) % 3 == 0, "attention", fmt::format("qkv must be [B, T, 3C], got {}", qkv.desc()));
  const int64_t B = qkv.dim(0), T = qkv.dim(1), C = qkv.dim(2) / 3;
  check(C > 0, "attention", fmt::format("qkv {} has an empty channel dimension", qkv.desc()));
  check(n_head > 0 && C % n_head == 0, "attention",
        fmt::format("n_head {} must divide the channel count {} of {}", n_head, C, qkv.desc()));
  Device d = qkv.device();
  Tensor out = Tensor::empty(Shape{B, T, C}, qkv.dtype(), d);
  Tensor lse = Tensor::empty(Shape{B, n_head, T}, stat_dtype(qkv.dtype()), d);
  DL_K(d, attention_fwd, qkv.dtype(), qkv.data(), out.data(), lse.data(), B, T, C, n_head, stream_for(d));
  if (needs_grad({&qkv})) {
    auto oi = out.impl_ptr();
    // Save a detached handle to out: the closure must not keep the output's grad slot alive.
    Tensor out_saved = out.detach();
    tape().record(outs({&out}), [qkv, out_saved, lse, oi, d, B, T, C, n_head] {
      GradTarget gq = grad_target(qkv);  // written on its first contribution, no zero fill
      DL_K(d, attention_bwd, qkv.dtype(), qkv.data(), out_saved.data(), lse.data(), Tensor(oi->grad).data(),
           gq.g.data(), B, T, C, n_head, !gq.fresh, stream_for(d));
    });
  }
  return out;
}

// The checks cross_entropy and token_nll share; returns the number of classes.
static int64_t check_loss_inputs(const char* op, const Tensor& logits, const Tensor& targets, int32_t ignore_index,
                                 int64_t n_classes) {
  defined(op, {&logits, &targets});
  same_device(op, {&logits, &targets});
  same_float_dtype(op, {&logits});
  check(targets.dtype() == DType::i32, op, fmt::format("targets must be i32, got {}", targets.desc()));
  const int64_t R = rows_of(logits, op), stride = logits.dim(-1);
  const int64_t V = n_classes > 0 ? n_classes : stride;
  check(V <= stride, op, fmt::format("n_classes {} exceeds the last dim of {}", V, logits.desc()));
  check(targets.numel() == R, op,
        fmt::format("targets {} do not match logits {} ({} rows)", targets.desc(), logits.desc(), R));
  check_ids(op, targets, V, ignore_index);
  return V;
}

Tensor token_nll(const Tensor& logits, const Tensor& targets, int32_t ignore_index, int64_t n_classes) {
  const int64_t V = check_loss_inputs("token_nll", logits, targets, ignore_index, n_classes);
  const int64_t stride = logits.dim(-1), R = rows_of(logits, "token_nll");
  Device d = logits.device();
  DType st = stat_dtype(logits.dtype());
  Tensor lse = Tensor::empty(Shape{R}, st, d), rl = Tensor::empty(Shape{R}, st, d);
  DL_K(d, cross_entropy_fwd, logits.dtype(), logits.data(), targets.data_as<int32_t>(), lse.data(), rl.data(), R, V,
       stride, ignore_index, stream_for(d));
  return rl;
}

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index, int64_t n_classes) {
  const int64_t V = check_loss_inputs("cross_entropy", logits, targets, ignore_index, n_classes);
  const int64_t stride = logits.dim(-1), R = rows_of(logits, "cross_entropy");
  Device d = logits.device();
  DType st = stat_dtype(logits.dtype());
  Tensor lse = Tensor::empty(Shape{R}, st, d), rl = Tensor::empty(Shape{R}, st, d);
  Tensor loss = Tensor::empty(Shape{}, st, d), count = Tensor::empty(Shape{}, st, d);
  DL_K(d, cross_entropy_fwd, logits.dtype(), logits.data(), targets.data_as<int32_t>(), lse.data(), rl.data(), R, V,
       stride, ignore_index, stream_for(d));
  DL_K(d, cross_entropy_reduce, logits.dtype(), rl.data(), targets.data_as<int32_t>(), R, ignore_index, loss.data(),
       count.data(), stream_for(d));
  if (needs_grad({&logits})) {
    auto li = loss.impl_ptr();
    tape().record(outs({&loss}), [logits, targets, lse, count, li, d, R, V, stride, ignore_index] {
      // The logits' gradient (the largest activation gradient, [rows, padded vocabulary]) is written
      // on its first contribution: no zero fill and no read of the old values.
      GradTarget gl = grad_target(logits);
      DL_K(d, cross_entropy_bwd, logits.dtype(), logits.data(), targets.data_as<int32_t>(), lse.data(),
           Tensor(li->grad).data(), count.data(), gl.g.data(), R, V, stride, ignore_index, !gl.fresh,
           stream_for(d));
    });
  }
  return loss;
}

}  // namespace deeplora::ops
