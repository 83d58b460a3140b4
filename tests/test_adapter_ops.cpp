// The fused Deep LoRA product (runtime/ops_adapter.h): its value and every gradient equal the op-by-op
// composition (matmul chain, matmul, cast) in f64 on the CPU at depths 1..5 and widths that leave a
// partial column tile; frozen factors get no gradient; on CUDA the fused kernels equal the CPU op at
// the shapes the adapters use (k = 16, 64; n = 768, 3072 and a ragged 45) in f32 and bf16, and a
// shape beyond the kernels' limits takes the fallback with the same result.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>

#include "runtime/device.h"
#include "runtime/ops.h"
#include "runtime/ops_adapter.h"
#include "runtime/tape.h"
#include "test_util.h"

using namespace deeplora;
using test::rel_err;

namespace {

struct Factors {
  std::vector<Tensor> K;
  Tensor Bt, probe;  // probe: the loss weights sum(W * probe)
};

Factors make(int64_t k, int64_t n, int depth, uint64_t seed, DType dt, Device dev, bool freeze_bt = false,
             int frozen_k = -1) {
  Factors f;
  for (int i = 0; i < depth; ++i) {
    f.K.push_back(Tensor::randn(Shape{k, k}, seed + uint64_t(i), DType::f64, Device::cpu, 1.0 / std::sqrt(double(k))).to(dt).to(dev));
    f.K.back().set_requires_grad(i != frozen_k);
  }
  f.Bt = Tensor::randn(Shape{k, n}, seed + 100, DType::f64, Device::cpu, 1.0).to(dt).to(dev);
  f.Bt.set_requires_grad(!freeze_bt);
  f.probe = Tensor::randn(Shape{k, n}, seed + 200, DType::f64, Device::cpu, 1.0);
  return f;
}

// The loss sum(W * probe) through either path; returns W, then the gradients of K_1..K_L and Bt (empty
// where none).
std::vector<std::vector<double>> run(Factors& f, DType compute, bool fused) {
  for (Tensor& t : f.K) t.zero_grad();
  f.Bt.zero_grad();
  Tensor W;
  if (fused) {
    W = ops::deeplora_product(f.K, f.Bt, compute);
  } else {
    Tensor P = f.K[0];
    for (size_t i = 1; i < f.K.size(); ++i) P = ops::matmul(f.K[i], P);
    W = ops::matmul(P, f.Bt);
    if (W.dtype() != compute) W = ops::cast(W, compute);
  }
  Tensor probe = f.probe.to(compute).to(W.device());
  backward(ops::sum(ops::mul(W, probe)));
  std::vector<std::vector<double>> out{W.to_double()};
  for (Tensor& t : f.K) out.push_back(t.grad().defined() ? t.grad().to_double() : std::vector<double>());
  out.push_back(f.Bt.grad().defined() ? f.Bt.grad().to_double() : std::vector<double>());
  return out;
}

}  // namespace

TEST_CASE("deeplora_product: value and gradients equal the op-by-op chain (f64 CPU, depths 1..5, ragged tiles)") {
  for (int depth : {1, 2, 3, 5})
    for (int64_t n : {int64_t(1), int64_t(45), int64_t(96)}) {
      CAPTURE(depth);
      CAPTURE(n);
      const int64_t k = 6;
      Factors a = make(k, n, depth, 7, DType::f64, Device::cpu), b = make(k, n, depth, 7, DType::f64, Device::cpu);
      auto want = run(a, DType::f64, false), got = run(b, DType::f64, true);
      REQUIRE(want.size() == got.size());
      for (size_t i = 0; i < want.size(); ++i) {
        CAPTURE(i);
        REQUIRE(got[i].size() == want[i].size());
        CHECK(rel_err(got[i], want[i]) < 1e-13);
      }
    }
}

TEST_CASE("deeplora_product: frozen factors get no gradient; the others are unchanged by the freeze") {
  const int64_t k = 4, n = 33;
  Factors all = make(k, n, 3, 11, DType::f64, Device::cpu), part = make(k, n, 3, 11, DType::f64, Device::cpu, true, 1);
  auto a = run(all, DType::f64, true), p = run(part, DType::f64, true);
  CHECK(p[2].empty());  // K_2 frozen
  CHECK(p[4].empty());  // Bt frozen
  CHECK(rel_err(p[1], a[1]) < 1e-15);
  CHECK(rel_err(p[3], a[3]) < 1e-15);
  CHECK(test::contains(test::error_of([&] { ops::deeplora_product({all.K[0], Tensor::zeros(Shape{k + 1, k + 1}, DType::f64)}, all.Bt, DType::f64); }),
                       "every K_i must be [4, 4]"));
}

TEST_CASE("deeplora_product on CUDA: the fused kernels equal the CPU op (f32 masters; f32 and bf16 compute)") {
  if (!cuda_available()) {
    MESSAGE("skipped: " << cuda_unavailable_reason());
    return;
  }
  struct Case {
    int64_t k, n;
    int depth;
  };
  for (Case c : {Case{16, 768, 3}, Case{16, 3072, 2}, Case{64, 768, 3}, Case{8, 45, 1}, Case{64, 45, 8}, Case{65, 100, 3}})
    for (DType compute : {DType::f32, DType::bf16}) {
      CAPTURE(c.k);
      CAPTURE(c.n);
      CAPTURE(c.depth);
      CAPTURE(dtype_name(compute));
      CHECK(ops::deeplora_product_fused(Device::cuda, DType::f32, compute, c.k, c.depth) == (c.k <= 64));
      Factors h = make(c.k, c.n, c.depth, 21, DType::f32, Device::cpu), g = make(c.k, c.n, c.depth, 21, DType::f32, Device::cuda);
      auto want = run(h, compute, true), got = run(g, compute, true);
      const double tol = compute == DType::bf16 ? 1e-2 : 1e-4;
      for (size_t i = 0; i < want.size(); ++i) {
        CAPTURE(i);
        REQUIRE(got[i].size() == want[i].size());
        CHECK(rel_err(got[i], want[i]) < (i == 0 ? tol : 1e-4));  // same compute-dtype gradient on both sides
      }
    }
}

namespace {

// 40 f32 tensors (two launches of kCastGroupMax) of sizes around the 4096-element chunk, cast to bf16
// by cast_group and one by one; the loss sum(y * probe) gives each its gradient.
std::vector<std::vector<double>> cast_group_run(Device dev, bool grouped) {
  std::vector<Tensor> xs;
  for (int i = 0; i < 40; ++i) {
    const int64_t n = i % 7 == 0 ? 4096 * 3 + 5 : 17 + 300 * i;
    xs.push_back(Tensor::randn(Shape{n}, uint64_t(50 + i), DType::f32, Device::cpu).to(dev));
    xs.back().set_requires_grad(i != 3);  // one frozen: no gradient
  }
  std::vector<Tensor> ys;
  if (grouped) {
    ys = ops::cast_group(xs, DType::bf16);
  } else {
    for (const Tensor& x : xs) ys.push_back(ops::cast(x, DType::bf16));
  }
  Tensor loss;
  for (size_t i = 0; i < ys.size(); ++i) {
    if (i == 5) continue;  // one output unused: its input gets no gradient from it
    Tensor probe = Tensor::randn(ys[i].shape(), uint64_t(90 + i), DType::f32, Device::cpu).to(DType::bf16).to(dev);
    Tensor li = ops::sum(ops::mul(ys[i], probe));
    loss = loss.defined() ? ops::add(loss, li) : li;
  }
  backward(loss);
  std::vector<std::vector<double>> out;
  for (size_t i = 0; i < xs.size(); ++i) {
    out.push_back(ys[i].to_double());
    out.push_back(xs[i].grad().defined() ? xs[i].grad().to_double() : std::vector<double>());
  }
  return out;
}

}  // namespace

TEST_CASE("cast_group: the same copies and gradients as one cast per tensor (CPU)") {
  auto want = cast_group_run(Device::cpu, false), got = cast_group_run(Device::cpu, true);
  REQUIRE(want.size() == got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i] == want[i]);  // bit for bit
  }
  CHECK(got[2 * 3 + 1].empty());  // the frozen tensor
  CHECK(test::contains(test::error_of([] { ops::cast_group({Tensor::zeros(Shape{2}, DType::f32), Tensor::zeros(Shape{2}, DType::f64)}, DType::bf16); }),
                       "cast_group"));
}

TEST_CASE("cast_group on CUDA: the same copies and gradients as one cast per tensor on the CPU") {
  if (!cuda_available()) {
    MESSAGE("skipped: " << cuda_unavailable_reason());
    return;
  }
  auto want = cast_group_run(Device::cpu, false), gpu = cast_group_run(Device::cuda, true);
  REQUIRE(want.size() == gpu.size());
  for (size_t i = 0; i < want.size(); ++i) {
    CAPTURE(i);
    CHECK(gpu[i] == want[i]);
  }
}
