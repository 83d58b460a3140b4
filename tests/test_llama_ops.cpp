// The Llama-family ops (RMSNorm, RoPE, SwiGLU, GQA attention) and the layout ops (transpose, concat,
// slice, split): finite differences in f64 on the CPU for every float input, CPU vs CUDA forward and
// backward in f32 and bf16 at shapes that select each CUDA path, exact checks against hand
// computations and transformers' formulas, and the errors bad inputs raise.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/llama.h"
#include "runtime/device.h"
#include "runtime/ops.h"
#include "runtime/ops_layout.h"
#include "runtime/ops_llama.h"
#include "test_util.h"

using namespace deeplora;
using test::rel_err;

namespace {

struct In {
  Shape shape;
  bool is_int = false;  // i32 values in [lo, lo + range)
  int64_t range = 0, lo = 0;
  double scale = 1.0;       // stddev of float inputs
  bool misalign = false;    // a view one element into its storage: the CUDA kernels' unaligned paths
};

struct Case {
  std::string name;
  std::vector<In> inputs;
  std::function<Tensor(const std::vector<Tensor>&)> fn;
  double grad_tol = 1e-6;  // relative, f64 finite differences
  bool fd = true;          // false: too large for finite differences (CPU vs CUDA only)
};

In F(Shape s, double scale = 1.0) { return In{s, false, 0, 0, scale, false}; }
In Fu(Shape s, double scale = 1.0) { return In{s, false, 0, 0, scale, true}; }  // unaligned
In Pos(Shape s, int64_t range, int64_t lo = 0) { return In{s, true, range, lo, 1.0, false}; }

Tensor rope_with(const Tensor& x, const Tensor& pos, int64_t hd, double theta, const ops::RopeScaling& sc = {}) {
  return ops::rope(x, pos, ops::rope_inv_freq_tensor(hd, theta, sc, x.device()));
}

ops::RopeScaling llama3(double factor = 32.0, int64_t orig = 8192) {
  ops::RopeScaling s;
  s.type = "llama3";
  s.factor = factor;
  s.low_freq_factor = 1.0;
  s.high_freq_factor = 4.0;
  s.original_max_position_embeddings = orig;
  return s;
}

// (b Hq hd) shapes of q and of k, v.
Shape qs(int64_t B, int64_t T, int64_t H, int64_t hd) { return Shape{B, T, H * hd}; }

std::vector<Case> layout_cases() {
  std::vector<Case> c;
  c.push_back({"transpose 2-D", {F({5, 7})}, [](auto& x) { return ops::transpose(x[0]); }});
  c.push_back({"transpose 3-D", {F({3, 4, 6})}, [](auto& x) { return ops::transpose(x[0]); }});
  c.push_back({"transpose 4-D", {F({2, 3, 5, 2})}, [](auto& x) { return ops::transpose(x[0]); }});
  c.push_back({"transpose twice is the identity", {F({2, 3, 4})},
               [](auto& x) { return ops::transpose(ops::transpose(x[0])); }});
  // Tiles of 32: 33 x 70 spans partial tiles on both sides.
  c.push_back({"transpose partial tiles", {F({2, 33, 70})}, [](auto& x) { return ops::transpose(x[0]); }, 1e-6, false});
  c.push_back({"transpose unaligned", {Fu({37, 41})}, [](auto& x) { return ops::transpose(x[0]); }, 1e-6, false});
  c.push_back({"transpose into an existing gradient", {F({4, 6})}, [](auto& x) {
                 Tensor t = ops::transpose(x[0]);
                 Tensor s = ops::scale(x[0], 0.3);
                 return ops::add(ops::sum(ops::mul(t, t)), ops::sum(ops::mul(s, s)));
               }});
  c.push_back({"concat two", {F({3, 4}), F({3, 5})}, [](auto& x) { return ops::concat({x[0], x[1]}); }});
  c.push_back({"concat three 3-D with an empty piece", {F({2, 3, 2}), F({2, 3, 0}), F({2, 3, 3})},
               [](auto& x) { return ops::concat({x[0], x[1], x[2]}); }});
  c.push_back({"concat a tensor with itself", {F({2, 3})}, [](auto& x) { return ops::concat({x[0], x[0], x[0]}); }});
  // 16- and 32-column pieces: the 16-byte path in f32 and bf16; 3 + 5 columns: the scalar path.
  c.push_back({"concat aligned", {F({9, 16}), F({9, 32})}, [](auto& x) { return ops::concat({x[0], x[1]}); }, 1e-6,
               false});
  c.push_back({"concat unaligned", {F({9, 3}), Fu({9, 5})}, [](auto& x) { return ops::concat({x[0], x[1]}); }, 1e-6,
               false});
  c.push_back({"slice_last", {F({3, 2, 9})}, [](auto& x) { return ops::slice_last(x[0], 2, 7); }});
  c.push_back({"slice_last whole and prefix", {F({4, 5})},
               [](auto& x) { return ops::concat({ops::slice_last(x[0], 0, 5), ops::slice_last(x[0], 0, 2)}); }});
  c.push_back({"slice_last aligned", {F({6, 64})}, [](auto& x) { return ops::slice_last(x[0], 16, 48); }, 1e-6, false});
  c.push_back({"slice_last into an existing gradient", {F({3, 8})}, [](auto& x) {
                 Tensor s = ops::slice_last(x[0], 1, 6);
                 Tensor t = ops::scale(x[0], -0.5);
                 return ops::add(ops::sum(ops::mul(s, s)), ops::sum(ops::mul(t, t)));
               }});
  c.push_back({"split_last all pieces used", {F({2, 3, 10})}, [](auto& x) {
                 auto p = ops::split_last(x[0], {3, 0, 7});
                 return ops::concat({p[2], p[0], p[1]});
               }});
  // The middle piece gets no gradient: a fresh input gradient is zero there.
  c.push_back({"split_last unused piece", {F({4, 9})}, [](auto& x) {
                 auto p = ops::split_last(x[0], {2, 3, 4});
                 return ops::concat({p[0], p[2]});
               }});
  c.push_back({"split_last unused piece into an existing gradient", {F({4, 9})}, [](auto& x) {
                 auto p = ops::split_last(x[0], {2, 3, 4});
                 Tensor t = ops::scale(x[0], 0.7);
                 return ops::add(ops::sum(ops::mul(ops::concat({p[0], p[2]}), ops::concat({p[0], p[2]}))),
                                 ops::sum(ops::mul(t, t)));
               }});
  c.push_back({"split_last aligned and unaligned pieces", {F({5, 72})}, [](auto& x) {
                 auto p = ops::split_last(x[0], {32, 8, 29, 3});
                 return ops::concat({p[3], p[1], p[0], p[2]});
               }, 1e-6, false});
  return c;
}

std::vector<Case> llama_cases() {
  std::vector<Case> c;
  // RMSNorm: C % 8 == 0 takes the 16-byte path on CUDA (f32 and bf16), C = 33 the scalar one.
  c.push_back({"rmsnorm", {F({3, 4, 16}, 2.0), F({16})}, [](auto& x) { return ops::rmsnorm(x[0], x[1], 1e-5); }, 1e-5});
  c.push_back({"rmsnorm odd C", {F({5, 33}), F({33})}, [](auto& x) { return ops::rmsnorm(x[0], x[1]); }, 1e-5});
  c.push_back({"rmsnorm one row", {F({1, 7}, 3.0), F({7})}, [](auto& x) { return ops::rmsnorm(x[0], x[1], 0.1); }, 1e-5});
  c.push_back({"rmsnorm into an existing gradient", {F({4, 8}), F({8})}, [](auto& x) {
                 Tensor y = ops::rmsnorm(x[0], x[1]);
                 Tensor t = ops::scale(x[0], 0.3);
                 Tensor u = ops::scale(x[1], -0.2);  // w's gradient already exists too
                 return ops::add(ops::add(ops::sum(ops::mul(y, y)), ops::sum(ops::mul(t, t))), ops::sum(ops::mul(u, u)));
               }, 1e-5});
  c.push_back({"rmsnorm C=64 many rows", {F({2, 150, 64}), F({64})}, [](auto& x) { return ops::rmsnorm(x[0], x[1]); },
               1e-5, false});
  c.push_back({"rmsnorm C=1000", {F({70, 1000}), F({1000})}, [](auto& x) { return ops::rmsnorm(x[0], x[1]); }, 1e-5,
               false});
  c.push_back({"rmsnorm unaligned", {Fu({9, 64}), F({64})}, [](auto& x) { return ops::rmsnorm(x[0], x[1]); }, 1e-5,
               false});

  // RoPE: hd 8 and 64 (the 16-byte path: hd/2 a multiple of 8 elements), hd 6 (scalar).
  c.push_back({"rope hd=8 H=3", {F({2, 5, 24}), Pos({2, 5}, 50)},
               [](auto& x) { return rope_with(x[0], x[1], 8, 10000.0); }});
  c.push_back({"rope hd=6 H=1 theta=500000 llama3", {F({2, 3, 6}), Pos({2, 3}, 9000)},
               [](auto& x) { return rope_with(x[0], x[1], 6, 500000.0, llama3(8.0, 16)); }});
  c.push_back({"rope negative positions", {F({1, 4, 8}), Pos({1, 4}, 40, -20)},
               [](auto& x) { return rope_with(x[0], x[1], 8, 10000.0); }});
  c.push_back({"rope into an existing gradient", {F({1, 3, 16}), Pos({1, 3}, 10)}, [](auto& x) {
                 Tensor y = rope_with(x[0], x[1], 16, 10000.0);
                 Tensor t = ops::scale(x[0], 0.3);
                 return ops::add(ops::sum(ops::mul(y, y)), ops::sum(ops::mul(t, t)));
               }});
  c.push_back({"rope hd=64 H=4 long positions", {F({2, 40, 4 * 64}), Pos({2, 40}, 8000)},
               [](auto& x) { return rope_with(x[0], x[1], 64, 500000.0, llama3()); }, 1e-6, false});
  c.push_back({"rope hd=128 H=2", {F({1, 33, 256}), Pos({1, 33}, 300)},
               [](auto& x) { return rope_with(x[0], x[1], 128, 10000.0); }, 1e-6, false});
  c.push_back({"rope unaligned", {Fu({2, 7, 2 * 64}), Pos({2, 7}, 100)},
               [](auto& x) { return rope_with(x[0], x[1], 64, 10000.0); }, 1e-6, false});

  // SwiGLU: 1003 elements leave a tail after the 16-byte packs.
  c.push_back({"swiglu", {F({3, 5}, 3.0), F({3, 5})}, [](auto& x) { return ops::swiglu(x[0], x[1]); }});
  c.push_back({"swiglu gate and up one tensor", {F({11}, 2.0)}, [](auto& x) { return ops::swiglu(x[0], x[0]); }});
  c.push_back({"swiglu into existing gradients", {F({2, 6}, 2.0), F({2, 6})}, [](auto& x) {
                 Tensor y = ops::swiglu(x[0], x[1]);
                 Tensor t = ops::mul(x[0], x[1]);
                 return ops::add(ops::sum(ops::mul(y, y)), ops::sum(t));
               }});
  c.push_back({"swiglu 1003 elements", {F({1003}, 4.0), F({1003})}, [](auto& x) { return ops::swiglu(x[0], x[1]); },
               1e-6, false});
  c.push_back({"swiglu unaligned", {Fu({4, 40}, 4.0), F({4, 40})}, [](auto& x) { return ops::swiglu(x[0], x[1]); },
               1e-6, false});

  // GQA attention, small (finite differences): Hq/Hkv = 4/2 and 3/1, odd T, head sizes 8 and 16.
  c.push_back({"gqa 4/2 hd=8 T=5", {F(qs(2, 5, 4, 8)), F(qs(2, 5, 2, 8)), F(qs(2, 5, 2, 8))},
               [](auto& x) { return ops::gqa_attention(x[0], x[1], x[2], 4, 2); }, 1e-5});
  c.push_back({"gqa 3/1 hd=16 T=7", {F(qs(1, 7, 3, 16)), F(qs(1, 7, 1, 16)), F(qs(1, 7, 1, 16))},
               [](auto& x) { return ops::gqa_attention(x[0], x[1], x[2], 3, 1); }, 1e-5});
  c.push_back({"gqa 2/2 hd=8 T=1", {F(qs(3, 1, 2, 8)), F(qs(3, 1, 2, 8)), F(qs(3, 1, 2, 8))},
               [](auto& x) { return ops::gqa_attention(x[0], x[1], x[2], 2, 2); }, 1e-5});
  c.push_back({"gqa q, k, v one tensor", {F(qs(1, 6, 2, 8))},
               [](auto& x) { return ops::gqa_attention(x[0], x[0], x[0], 2, 2); }, 1e-5});
  c.push_back({"gqa into existing gradients", {F(qs(1, 4, 2, 8)), F(qs(1, 4, 1, 8)), F(qs(1, 4, 1, 8))}, [](auto& x) {
                 Tensor o = ops::gqa_attention(x[0], x[1], x[2], 2, 1);
                 Tensor t = ops::add(ops::sum(ops::mul(x[0], x[0])), ops::sum(ops::mul(x[1], x[2])));
                 return ops::add(ops::sum(ops::mul(o, o)), t);
               }, 1e-5});
  // GQA, CUDA paths: head-size buckets 32 (hd 8, 24), 64 and 128 (hd 128, and 72 zero-padded to 128);
  // T past one tile (64 rows for f32 hd <= 64, 32-key tiles at hd 128), unaligned inputs.
  c.push_back({"gqa hd=64 4/2 T=130", {F(qs(2, 130, 4, 64)), F(qs(2, 130, 2, 64)), F(qs(2, 130, 2, 64))},
               [](auto& x) { return ops::gqa_attention(x[0], x[1], x[2], 4, 2); }, 1e-5, false});
  c.push_back({"gqa hd=64 8/1 T=257", {F(qs(1, 257, 8, 64)), F(qs(1, 257, 1, 64)), F(qs(1, 257, 1, 64))},
               [](auto& x) { return ops::gqa_attention(x[0], x[1], x[2], 8, 1); }, 1e-5, false});
  c.push_back({"gqa hd=128 6/2 T=100", {F(qs(1, 100, 6, 128)), F(qs(1, 100, 2, 128)), F(qs(1, 100, 2, 128))},
               [](auto& x) { return ops::gqa_attention(x[0], x[1], x[2], 6, 2); }, 1e-5, false});
  c.push_back({"gqa hd=72 3/1 T=70", {F(qs(2, 70, 3, 72)), F(qs(2, 70, 1, 72)), F(qs(2, 70, 1, 72))},
               [](auto& x) { return ops::gqa_attention(x[0], x[1], x[2], 3, 1); }, 1e-5, false});
  c.push_back({"gqa hd=24 2/1 T=65", {F(qs(1, 65, 2, 24)), F(qs(1, 65, 1, 24)), F(qs(1, 65, 1, 24))},
               [](auto& x) { return ops::gqa_attention(x[0], x[1], x[2], 2, 1); }, 1e-5, false});
  c.push_back({"gqa hd=64 unaligned", {Fu(qs(1, 50, 2, 64)), F(qs(1, 50, 1, 64)), F(qs(1, 50, 1, 64))},
               [](auto& x) { return ops::gqa_attention(x[0], x[1], x[2], 2, 1); }, 1e-5, false});
  c.push_back({"gqa hd=128 into existing gradients", {F(qs(1, 40, 2, 128)), F(qs(1, 40, 1, 128)), F(qs(1, 40, 1, 128))},
               [](auto& x) {
                 Tensor o = ops::gqa_attention(x[0], x[1], x[2], 2, 1);
                 Tensor t = ops::add(ops::sum(ops::mul(x[0], x[0])), ops::sum(ops::mul(x[1], x[2])));
                 return ops::add(ops::sum(ops::mul(o, o)), t);
               }, 1e-5, false});
  return c;
}

// Inputs drawn in f64 on the CPU from a per-case seed, then converted (the same values on each device).
std::vector<Tensor> make_inputs(const Case& c, uint64_t seed, DType dt, Device dev) {
  std::vector<Tensor> xs;
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    const In& in = c.inputs[i];
    if (in.is_int) {
      std::vector<int32_t> v(size_t(in.shape.numel()));
      uint64_t s = seed * 7919 + i;
      for (auto& e : v) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        e = int32_t(in.lo + int64_t((s >> 33) % uint64_t(in.range)));
      }
      xs.push_back(Tensor::from_ints(v, in.shape, dev));
      continue;
    }
    Tensor t = Tensor::randn(in.shape, seed * 131 + i, DType::f64, Device::cpu, in.scale).to(dt).to(dev);
    if (in.misalign) {
      Tensor flat = Tensor::zeros(Shape{in.shape.numel() + 1}, dt, dev);
      Tensor view = flat.slice0(1, in.shape.numel() + 1).reshape(in.shape);
      view.copy_from(t);
      t = view;
    }
    t.set_requires_grad(true);
    xs.push_back(t);
  }
  return xs;
}

// A scalar loss with a fixed random weighting, so every output element gets a distinct gradient.
Tensor weighted_loss(const Tensor& y, uint64_t seed) {
  if (y.numel() == 1) return ops::sum(y);
  Tensor w = Tensor::randn(y.shape(), seed, DType::f64, Device::cpu).to(y.dtype()).to(y.device());
  return ops::sum(ops::mul(y, w));
}

uint64_t seed_of(const std::string& name) { return std::hash<std::string>{}(name) % 100000; }

// Finite differences on at most 96 evenly spaced elements of every float input; returns the checks made.
int gradcheck(const std::vector<Case>& cases) {
  int n = 0;
  for (const Case& c : cases) {
    if (!c.fd) continue;
    CAPTURE(c.name);
    const uint64_t seed = seed_of(c.name);
    auto xs = make_inputs(c, seed, DType::f64, Device::cpu);
    backward(weighted_loss(c.fn(xs), seed + 1));
    for (size_t i = 0; i < xs.size(); ++i) {
      if (c.inputs[i].is_int) continue;
      CAPTURE(i);
      REQUIRE(xs[i].grad().defined());
      const std::vector<double> full = xs[i].grad().to_double();
      const size_t len = full.size(), stride = std::max<size_t>(1, len / 96);
      std::vector<double> analytic, numeric;
      double* p = xs[i].data_as<double>();
      for (size_t j = 0; j < len; j += stride) {
        NoGrad ng;
        const double orig = p[j], h = 1e-6;
        p[j] = orig + h;
        const double fp = weighted_loss(c.fn(xs), seed + 1).item();
        p[j] = orig - h;
        const double fm = weighted_loss(c.fn(xs), seed + 1).item();
        p[j] = orig;
        analytic.push_back(full[j]);
        numeric.push_back((fp - fm) / (2 * h));
      }
      const double err = rel_err(analytic, numeric);
      CHECK_MESSAGE(err <= c.grad_tol, fmt::format("{} input {}: relative error {:.3g}", c.name, i, err));
      ++n;
    }
  }
  return n;
}

// Forward and every input gradient on the CPU and on CUDA: f32 within 1e-5, bf16 within 1e-2.
int cpu_vs_cuda(const std::vector<Case>& cases) {
  int n = 0;
  for (DType dt : {DType::f32, DType::bf16}) {
    const double tol = dt == DType::f32 ? 1e-5 : 1e-2;
    for (const Case& c : cases) {
      CAPTURE(c.name);
      CAPTURE(dtype_name(dt));
      const uint64_t seed = seed_of(c.name) + 17;
      std::vector<std::vector<double>> res[2];
      for (Device dev : {Device::cpu, Device::cuda}) {
        auto xs = make_inputs(c, seed, dt, dev);
        Tensor y = c.fn(xs);
        res[int(dev)].push_back(y.to_double());
        backward(weighted_loss(y, seed + 1));
        for (size_t i = 0; i < xs.size(); ++i)
          if (!c.inputs[i].is_int) res[int(dev)].push_back(xs[i].grad().to_double());
      }
      for (size_t k = 0; k < res[0].size(); ++k) {
        // Relative to the reference, with the norm floored at 0.1 per element (inputs, weights and the
        // gradients of the other cases are O(1) per element): a gradient that is zero in exact arithmetic
        // (T = 1: one key, the softmax is 1, so dq = dk = 0) holds only the cancellation residue of
        // dS = P (dP - D), ~1e-7 per element in f32 on CUDA; relative to ~0 that measured 6e23.
        // An empty piece (concat with a zero-width input) has an empty gradient: nothing to differ.
        REQUIRE(res[1][k].size() == res[0][k].size());
        double num = 0, den = 0;
        bool finite = true;
        for (size_t i = 0; i < res[0][k].size(); ++i) {
          finite = finite && std::isfinite(res[1][k][i]);
          num += (res[1][k][i] - res[0][k][i]) * (res[1][k][i] - res[0][k][i]);
          den += res[0][k][i] * res[0][k][i];
        }
        const double floor = 0.1 * std::sqrt(double(res[0][k].size()));
        const double err = !finite                ? INFINITY
                           : res[0][k].empty() ? 0.0
                                               : std::sqrt(num) / std::max(std::sqrt(den), floor);
        CHECK_MESSAGE(err <= tol, fmt::format("{} {} {}: relative error {:.3g} > {}", c.name, dtype_name(dt),
                                              k == 0 ? "forward" : fmt::format("grad of input {}", k - 1), err, tol));
      }
      ++n;
    }
  }
  return n;
}

std::vector<double> vals(const Tensor& t) { return t.to_double(); }

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// The message of the std::invalid_argument f throws ("" if none; other exceptions propagate).
std::string invalid_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("layout ops: finite-difference gradients in f64 on the CPU") {
  const int n = gradcheck(layout_cases());
  MESSAGE(fmt::format("layout ops: {} gradient checks", n));
}

TEST_CASE("llama ops: finite-difference gradients in f64 on the CPU") {
  const int n = gradcheck(llama_cases());
  MESSAGE(fmt::format("llama ops: {} gradient checks", n));
}

TEST_CASE("layout ops: CPU vs CUDA forward and backward (f32, bf16)") {
  if (!cuda_available()) {
    MESSAGE("skipped " << 2 * layout_cases().size() << " layout CPU-vs-CUDA cases: " << cuda_unavailable_reason());
    return;
  }
  const int n = cpu_vs_cuda(layout_cases());
  MESSAGE(fmt::format("layout ops: {} CPU-vs-CUDA cases", n));
}

TEST_CASE("llama ops: CPU vs CUDA forward and backward (f32, bf16)") {
  if (!cuda_available()) {
    MESSAGE("skipped " << 2 * llama_cases().size() << " llama CPU-vs-CUDA cases: " << cuda_unavailable_reason());
    return;
  }
  const int n = cpu_vs_cuda(llama_cases());
  MESSAGE(fmt::format("llama ops: {} CPU-vs-CUDA cases", n));
}

namespace {

// transpose, concat, slice_last and split_last on `dev`: exact values, i32 tensors, zero-size results.
void check_layout_exact(Device dev) {
  // [2, 3] -> [3, 2]
  Tensor a = Tensor::from_vector({1, 2, 3, 4, 5, 6}, Shape{2, 3}, DType::f32, dev);
  CHECK(vals(ops::transpose(a)) == std::vector<double>{1, 4, 2, 5, 3, 6});
  CHECK(ops::transpose(a).shape() == Shape{3, 2});
  Tensor b = Tensor::from_vector({7, 8}, Shape{2, 1}, DType::f32, dev);
  CHECK(vals(ops::concat({a, b})) == std::vector<double>{1, 2, 3, 7, 4, 5, 6, 8});
  CHECK(vals(ops::slice_last(a, 1, 3)) == std::vector<double>{2, 3, 5, 6});
  auto parts = ops::split_last(a, {1, 2});
  CHECK(vals(parts[0]) == std::vector<double>{1, 4});
  CHECK(vals(parts[1]) == std::vector<double>{2, 3, 5, 6});
  // i32 (token ids, positions) move unchanged, forward only; 3-D and 4-D batched transposes.
  std::vector<int32_t> iv(2 * 3 * 37 * 33);
  for (size_t i = 0; i < iv.size(); ++i) iv[i] = int32_t(i * 7919 % 100003) - 50000;
  Tensor ti = Tensor::from_ints(iv, Shape{2, 3, 37, 33}, dev);
  const std::vector<int32_t> tr = ops::transpose(ti).to_int();
  bool ok = true;
  for (int64_t bb = 0; bb < 6; ++bb)
    for (int64_t r = 0; r < 37; ++r)
      for (int64_t cc = 0; cc < 33; ++cc) ok &= tr[size_t((bb * 33 + cc) * 37 + r)] == iv[size_t((bb * 37 + r) * 33 + cc)];
  CHECK(ok);
  Tensor i2 = Tensor::from_ints({1, 2, 3, 4}, Shape{2, 2}, dev), i3 = Tensor::from_ints({9, 8}, Shape{2, 1}, dev);
  CHECK(ops::concat({i2, i3}).to_int() == std::vector<int32_t>{1, 2, 9, 3, 4, 8});
  CHECK(ops::slice_last(i2, 1, 2).to_int() == std::vector<int32_t>{2, 4});
  // Zero-size results.
  CHECK(ops::slice_last(a, 2, 2).numel() == 0);
  CHECK(ops::transpose(Tensor::zeros(Shape{0, 4}, DType::f32, dev)).shape() == Shape{4, 0});
}

}  // namespace

TEST_CASE("layout ops: exact values and i32 tensors (CPU)") { check_layout_exact(Device::cpu); }

TEST_CASE("layout ops on CUDA: exact values and i32 tensors") {
  if (!cuda_available()) {
    MESSAGE("skipped: " << cuda_unavailable_reason());
    return;
  }
  check_layout_exact(Device::cuda);
}

TEST_CASE("llama ops: RMSNorm against a hand computation and HF's bf16 rounding order") {
  Tensor x = Tensor::from_vector({1, 2, 3, 4, -2, 0, 0, 2}, Shape{2, 4}, DType::f64);
  Tensor w = Tensor::from_vector({1, 0.5, 2, -1}, Shape{4}, DType::f64);
  const double eps = 1e-6;
  const double r0 = 1 / std::sqrt(7.5 + eps), r1 = 1 / std::sqrt(2.0 + eps);
  const std::vector<double> want{1 * r0, 1 * r0, 6 * r0, -4 * r0, -2 * r1, 0, 0, -2 * r1};
  CHECK(max_abs_diff(vals(ops::rmsnorm(x, w, eps)), want) < 1e-14);
  // bf16: the normalized row is rounded to bf16, then multiplied by w and rounded again (HF's order).
  Tensor xb = Tensor::randn(Shape{3, 40}, 5, DType::f64, Device::cpu, 2.0).to(DType::bf16);
  Tensor wb = Tensor::randn(Shape{40}, 6, DType::f64, Device::cpu, 1.5).to(DType::bf16);
  const std::vector<double> yb = vals(ops::rmsnorm(xb, wb, 1e-5)), xv = vals(xb), wv = vals(wb);
  int mismatches = 0;
  for (int64_t r = 0; r < 3; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < 40; ++c) ss += xv[r * 40 + c] * xv[r * 40 + c];
    const double rs = 1 / std::sqrt(ss / 40 + 1e-5);
    for (int64_t c = 0; c < 40; ++c) {
      using kernels::cpu::bf16_from_double;  // correctly rounded, as the CPU twin stores
      const double n = double(float(bf16_from_double(xv[r * 40 + c] * rs)));
      const double y = double(float(bf16_from_double(wv[c] * n)));
      mismatches += y != yb[size_t(r * 40 + c)];
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("llama ops: RoPE exact checks (position 0, p then -p, a hand rotation)") {
  const int64_t B = 2, T = 3, H = 2, hd = 8;
  Tensor x = Tensor::randn(Shape{B, T, H * hd}, 11, DType::f64);
  Tensor inv = ops::rope_inv_freq_tensor(hd, 10000.0, {}, Device::cpu);
  // Position 0 is the identity, exactly (also in f32 and bf16).
  for (DType dt : {DType::f64, DType::f32, DType::bf16}) {
    Tensor xd = x.to(dt);
    CHECK(vals(ops::rope(xd, Tensor::zeros(Shape{B, T}, DType::i32), inv)) == vals(xd));
  }
  // Rotating by p and then by -p gives x back.
  std::vector<int32_t> p{0, 5, 1000, 7, 123456, 31};
  std::vector<int32_t> mp(p.size());
  for (size_t i = 0; i < p.size(); ++i) mp[i] = -p[i];
  Tensor pos = Tensor::from_ints(p, Shape{B, T}), neg = Tensor::from_ints(mp, Shape{B, T});
  Tensor back = ops::rope(ops::rope(x, pos, inv), neg, inv);
  CHECK(max_abs_diff(vals(back), vals(x)) < 1e-12);
  // Hand rotation: hd = 4, theta = 100 (inv_freq 1, 0.1), position 3: pairs (0, 2) and (1, 3).
  Tensor h = Tensor::from_vector({1, 2, 3, 4}, Shape{1, 1, 4}, DType::f64);
  Tensor y = ops::rope(h, Tensor::from_ints({3}, Shape{1, 1}), ops::rope_inv_freq_tensor(4, 100.0, {}, Device::cpu));
  const double a0 = double(3.0f * 1.0f), a1 = double(3.0f * float(0.1));  // angles as f32 products
  const std::vector<double> want{1 * std::cos(a0) - 3 * std::sin(a0), 2 * std::cos(a1) - 4 * std::sin(a1),
                                 3 * std::cos(a0) + 1 * std::sin(a0), 4 * std::cos(a1) + 2 * std::sin(a1)};
  CHECK(max_abs_diff(vals(y), want) < 1e-15);
  // Rotations preserve each pair's norm.
  const std::vector<double> yv = vals(y);
  CHECK(std::abs(yv[0] * yv[0] + yv[2] * yv[2] - 10.0) < 1e-13);
}

TEST_CASE("llama ops: RoPE inverse frequencies against transformers' formulas") {
  // _compute_default_rope_parameters: 1 / base^(arange(0, dim, 2) / dim).
  const std::vector<double> d = ops::rope_inv_freq(64, 10000.0);
  REQUIRE(d.size() == 32);
  for (size_t i = 0; i < d.size(); ++i) CHECK(d[i] == doctest::Approx(std::pow(10000.0, -double(2 * i) / 64.0)).epsilon(1e-15));
  // _compute_llama3_parameters, written out again here (Llama 3.2: theta 500000, factor 32, low 1,
  // high 4, original context 8192).
  const double factor = 32, low = 1, high = 4, old_len = 8192, theta = 500000;
  const int64_t dim = 64;
  const std::vector<double> got = ops::rope_inv_freq(dim, theta, llama3(factor, 8192));
  int n_high = 0, n_low = 0, n_mid = 0;
  for (int64_t i = 0; i < dim / 2; ++i) {
    const double f = 1.0 / std::pow(theta, double(2 * i) / double(dim));
    const double wavelen = 2 * 3.14159265358979323846 / f;
    double want;
    if (wavelen < old_len / high) {
      want = f;  // high frequency: unchanged
      ++n_high;
    } else if (wavelen > old_len / low) {
      want = f / factor;  // low frequency: divided by factor
      ++n_low;
    } else {
      const double smooth = (old_len / wavelen - low) / (high - low);
      want = (1 - smooth) * f / factor + smooth * f;
      ++n_mid;
      CHECK(want > f / factor);
      CHECK(want < f);
    }
    CHECK(got[size_t(i)] == doctest::Approx(want).epsilon(1e-14));
  }
  CHECK(n_high > 0);
  CHECK(n_low > 0);
  CHECK(n_mid > 0);  // every regime is exercised
  CHECK(got[0] == 1.0);
  // The tensor the op reads holds the same values in f32.
  const std::vector<double> t = vals(ops::rope_inv_freq_tensor(dim, theta, llama3(factor, 8192), Device::cpu));
  for (size_t i = 0; i < t.size(); ++i) CHECK(t[i] == double(float(got[i])));
}

TEST_CASE("llama ops: SwiGLU against a hand computation") {
  Tensor g = Tensor::from_vector({1, -2, 0, 30}, Shape{4}, DType::f64);
  Tensor u = Tensor::from_vector({2, 3, 5, -1}, Shape{4}, DType::f64);
  auto silu = [](double a) { return a * (1 / (1 + std::exp(-a))); };
  const std::vector<double> want{silu(1) * 2, silu(-2) * 3, 0, -silu(30)};
  CHECK(max_abs_diff(vals(ops::swiglu(g, u)), want) < 1e-13);
  CHECK(silu(1) == doctest::Approx(0.7310585786300049));
}

TEST_CASE("llama ops: GQA equals MHA with repeated KV heads, and ops::attention when Hq == Hkv") {
  const int64_t B = 2, T = 9, Hq = 6, Hkv = 2, hd = 8, G = Hq / Hkv;
  // With KV heads repeated (HF's repeat_kv: query head h reads KV head h / G), built with slice/concat
  // so the gradients flow back to the grouped k and v.
  auto repeat_kv = [&](const Tensor& t) {
    std::vector<Tensor> heads;
    for (int64_t h = 0; h < Hq; ++h) heads.push_back(ops::slice_last(t, (h / G) * hd, (h / G + 1) * hd));
    return ops::concat(heads);
  };
  std::vector<std::vector<double>> res[2];
  for (int way = 0; way < 2; ++way) {
    Tensor q = Tensor::randn(qs(B, T, Hq, hd), 1, DType::f64).set_requires_grad(true);
    Tensor k = Tensor::randn(qs(B, T, Hkv, hd), 2, DType::f64).set_requires_grad(true);
    Tensor v = Tensor::randn(qs(B, T, Hkv, hd), 3, DType::f64).set_requires_grad(true);
    Tensor o = way == 0 ? ops::gqa_attention(q, k, v, Hq, Hkv) : ops::gqa_attention(q, repeat_kv(k), repeat_kv(v), Hq, Hq);
    res[way] = {vals(o)};
    backward(weighted_loss(o, 99));
    for (const Tensor* t : {&q, &k, &v}) res[way].push_back(vals(t->grad()));
  }
  for (size_t i = 0; i < res[0].size(); ++i) CHECK(rel_err(res[0][i], res[1][i]) < 1e-13);

  // Hq == Hkv: the fused-qkv MHA op on concat(q, k, v).
  for (int way = 0; way < 2; ++way) {
    Tensor q = Tensor::randn(qs(B, T, 3, 16), 4, DType::f64).set_requires_grad(true);
    Tensor k = Tensor::randn(qs(B, T, 3, 16), 5, DType::f64).set_requires_grad(true);
    Tensor v = Tensor::randn(qs(B, T, 3, 16), 6, DType::f64).set_requires_grad(true);
    Tensor o = way == 0 ? ops::gqa_attention(q, k, v, 3, 3) : ops::attention(ops::concat({q, k, v}), 3);
    res[way] = {vals(o)};
    backward(weighted_loss(o, 98));
    for (const Tensor* t : {&q, &k, &v}) res[way].push_back(vals(t->grad()));
  }
  for (size_t i = 0; i < res[0].size(); ++i) CHECK(rel_err(res[0][i], res[1][i]) < 1e-13);
}

TEST_CASE("llama ops: bad inputs throw std::invalid_argument naming the op and the shapes") {
  auto f32 = [](Shape s) { return Tensor::zeros(s, DType::f32); };
  auto pos = [](int64_t B, int64_t T) { return Tensor::zeros(Shape{B, T}, DType::i32); };
  Tensor inv8 = ops::rope_inv_freq_tensor(8, 10000.0, {}, Device::cpu);
  struct Bad {
    const char* what;
    std::function<void()> f;
    std::vector<std::string> parts;  // each must appear in the message
  };
  const std::vector<Bad> bad{
      {"rmsnorm weight shape", [&] { ops::rmsnorm(f32({2, 8}), f32({7})); }, {"rmsnorm", "[2, 8]", "[7]"}},
      {"rmsnorm dtype mismatch", [&] { ops::rmsnorm(f32({2, 8}), Tensor::zeros(Shape{8}, DType::bf16)); },
       {"rmsnorm", "dtype mismatch", "[2, 8]"}},
      {"rmsnorm i32 input", [&] { ops::rmsnorm(Tensor::zeros(Shape{2, 8}, DType::i32), f32({8})); }, {"rmsnorm", "[2, 8]"}},
      {"rmsnorm empty last dim", [&] { ops::rmsnorm(f32({2, 0}), f32({0})); }, {"rmsnorm", "[2, 0]"}},
      {"rope positions shape", [&] { ops::rope(f32({2, 3, 16}), pos(2, 4), inv8); }, {"rope", "[2, 3, 16]", "[2, 4]"}},
      {"rope positions dtype", [&] { ops::rope(f32({2, 3, 16}), f32({2, 3}), inv8); }, {"rope", "[2, 3]"}},
      {"rope inv_freq dtype", [&] { ops::rope(f32({2, 3, 16}), pos(2, 3), Tensor::zeros(Shape{4}, DType::f64)); },
       {"rope", "inv_freq", "[4]"}},
      {"rope channels not heads", [&] { ops::rope(f32({2, 3, 12}), pos(2, 3), inv8); }, {"rope", "[2, 3, 12]", "8"}},
      {"rope 2-D x", [&] { ops::rope(f32({3, 16}), pos(1, 3), inv8); }, {"rope", "[3, 16]"}},
      {"rope_inv_freq odd head_dim", [&] { ops::rope_inv_freq(7, 10000.0); }, {"rope_inv_freq", "7"}},
      {"rope_inv_freq unknown scaling",
       [&] {
         ops::RopeScaling s;
         s.type = "yarn";
         ops::rope_inv_freq(8, 10000.0, s);
       },
       {"rope_inv_freq", "yarn"}},
      {"rope_inv_freq bad llama3 factors",
       [&] {
         ops::RopeScaling s = llama3();
         s.high_freq_factor = 1.0;
         ops::rope_inv_freq(8, 10000.0, s);
       },
       {"rope_inv_freq", "high_freq_factor"}},
      {"swiglu shape mismatch", [&] { ops::swiglu(f32({2, 3}), f32({3, 2})); }, {"swiglu", "[2, 3]", "[3, 2]"}},
      {"swiglu dtype mismatch", [&] { ops::swiglu(f32({2, 3}), Tensor::zeros(Shape{2, 3}, DType::f64)); },
       {"swiglu", "[2, 3]"}},
      {"gqa Hq not a multiple of Hkv", [&] { ops::gqa_attention(f32({1, 4, 24}), f32({1, 4, 16}), f32({1, 4, 16}), 3, 2); },
       {"gqa_attention", "[1, 4, 24]", "[1, 4, 16]", "n_head 3", "n_kv_head 2"}},
      {"gqa odd head size", [&] { ops::gqa_attention(f32({1, 4, 24}), f32({1, 4, 12}), f32({1, 4, 12}), 2, 1); },
       {"gqa_attention", "head size 12", "[1, 4, 24]"}},
      {"gqa head size above 128", [&] { ops::gqa_attention(f32({1, 2, 136}), f32({1, 2, 136}), f32({1, 2, 136}), 1, 1); },
       {"gqa_attention", "136"}},
      {"gqa k and v differ", [&] { ops::gqa_attention(f32({1, 4, 32}), f32({1, 4, 16}), f32({1, 4, 32}), 2, 1); },
       {"gqa_attention", "[1, 4, 16]", "[1, 4, 32]"}},
      {"gqa k channels", [&] { ops::gqa_attention(f32({1, 4, 32}), f32({1, 4, 32}), f32({1, 4, 32}), 2, 1); },
       {"gqa_attention", "n_kv_head * hd = 16"}},
      {"gqa T mismatch", [&] { ops::gqa_attention(f32({1, 4, 32}), f32({1, 5, 16}), f32({1, 5, 16}), 2, 1); },
       {"gqa_attention", "[1, 5, 16]"}},
      {"gqa 2-D q", [&] { ops::gqa_attention(f32({4, 32}), f32({4, 16}), f32({4, 16}), 2, 1); }, {"gqa_attention", "[4, 32]"}},
      {"gqa dtype mismatch",
       [&] { ops::gqa_attention(f32({1, 4, 16}), Tensor::zeros(Shape{1, 4, 16}, DType::f64), f32({1, 4, 16}), 2, 2); },
       {"gqa_attention", "dtype mismatch"}},
      {"transpose 1-D", [&] { ops::transpose(f32({5})); }, {"transpose", "[5]"}},
      {"concat leading dims", [&] { ops::concat({f32({2, 3}), f32({3, 3})}); }, {"concat", "[2, 3]", "[3, 3]"}},
      {"concat dtypes", [&] { ops::concat({f32({2, 3}), Tensor::zeros(Shape{2, 3}, DType::bf16)}); }, {"concat", "bf16"}},
      {"concat nothing", [&] { ops::concat({}); }, {"concat"}},
      {"slice_last range", [&] { ops::slice_last(f32({2, 5}), 3, 6); }, {"slice_last", "[3, 6)", "[2, 5]"}},
      {"split_last sizes", [&] { ops::split_last(f32({2, 5}), {2, 2}); }, {"split_last", "2, 2", "[2, 5]"}},
  };
  for (const Bad& b : bad) {
    CAPTURE(b.what);
    const std::string msg = invalid_of(b.f);
    CHECK_MESSAGE(!msg.empty(), fmt::format("{}: no std::invalid_argument", b.what));
    for (const std::string& p : b.parts) CHECK_MESSAGE(test::contains(msg, p), fmt::format("{}: \"{}\" lacks \"{}\"", b.what, msg, p));
  }
  if (cuda_available()) {  // device mismatches
    Tensor xc = Tensor::zeros(Shape{2, 8}, DType::f32, Device::cuda);
    CHECK(test::contains(invalid_of([&] { ops::rmsnorm(xc, f32({8})); }), "different devices"));
    CHECK(test::contains(invalid_of([&] { ops::rope(xc.reshape(Shape{1, 2, 8}), pos(1, 2), inv8); }), "different devices"));
    CHECK(test::contains(invalid_of([&] { ops::concat({xc, f32({2, 8})}); }), "concat"));
  }
}
