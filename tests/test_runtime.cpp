// Runtime tests: tensors, views, RNG, the tape (order, accumulation, NoGrad, frozen tensors),
// the caching allocator, and the error messages for bad input.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>

#include "runtime/device.h"
#include "runtime/ops.h"
#include "test_util.h"

using namespace deeplora;

using test::error_of;

TEST_CASE("tensor: creation, casts, views") {
  Tensor t = Tensor::from_vector({1, 2, 3, 4, 5, 6}, Shape{2, 3}, DType::f32);
  CHECK(t.numel() == 6);
  CHECK(t.shape() == Shape{2, 3});
  CHECK(t.to(DType::bf16).to(DType::f64).to_double() == std::vector<double>{1, 2, 3, 4, 5, 6});
  Tensor r = t.reshape(Shape{3, 2});
  CHECK(r.data() == t.data());
  Tensor s = t.slice0(1, 2);
  CHECK(s.to_double() == std::vector<double>{4, 5, 6});
  s.fill(9);
  CHECK(t.to_double() == std::vector<double>{1, 2, 3, 9, 9, 9});
  CHECK(Tensor::from_ints({1, -2}, Shape{2}).to_double() == std::vector<double>{1, -2});
  // bf16 rounding: 1 + 2^-8 is halfway between two bf16 values and rounds to even (1.0).
  CHECK(Tensor::full(Shape{1}, 1.0 + 1.0 / 256, DType::bf16).item() == 1.0);
  CHECK(Tensor::full(Shape{1}, 1.0 + 3.0 / 256, DType::bf16).item() == doctest::Approx(1.0 + 4.0 / 256));
}

TEST_CASE("tensor: seeded RNG is reproducible and has the right moments") {
  Tensor a = Tensor::randn(Shape{100000}, 42, DType::f64);
  Tensor b = Tensor::randn(Shape{100000}, 42, DType::f64);
  Tensor c = Tensor::randn(Shape{100000}, 43, DType::f64);
  CHECK(a.to_double() == b.to_double());
  CHECK(a.to_double() != c.to_double());
  auto v = a.to_double();
  double m = 0, s2 = 0;
  for (double x : v) m += x;
  m /= double(v.size());
  for (double x : v) s2 += (x - m) * (x - m);
  s2 /= double(v.size());
  CHECK(std::abs(m) < 0.02);
  CHECK(std::abs(s2 - 1.0) < 0.02);
  auto u = Tensor::uniform(Shape{1000}, 1, -2, 3, DType::f32).to_double();
  for (double x : u) {
    CHECK(x >= -2);
    CHECK(x <= 3);
  }
  if (cuda_available()) {
    auto g = Tensor::randn(Shape{1000}, 42, DType::f64, Device::cuda).to_double();
    auto h = Tensor::randn(Shape{1000}, 42, DType::f64, Device::cpu).to_double();
    for (size_t i = 0; i < g.size(); ++i) CHECK(g[i] == doctest::Approx(h[i]).epsilon(1e-12));
  }
}

TEST_CASE("tape: backward runs in reverse order and gradients accumulate") {
  Tensor x = Tensor::from_vector({1, 2, 3}, Shape{3}, DType::f64);
  x.set_requires_grad(true);
  // y = sum(x*x) + sum(3x): dy/dx = 2x + 3; x is used by two ops, so its gradient sums both.
  Tensor y = ops::add(ops::sum(ops::mul(x, x)), ops::sum(ops::scale(x, 3.0)));
  CHECK(tape().size() == 5);
  backward(y);
  CHECK(tape().size() == 0);
  CHECK(x.grad().to_double() == std::vector<double>{5, 7, 9});
  // A second backward accumulates into the same buffer until zero_grad.
  backward(ops::sum(x));
  CHECK(x.grad().to_double() == std::vector<double>{6, 8, 10});
  x.zero_grad();
  CHECK(!x.grad().defined());
}

TEST_CASE("tape: NoGrad records nothing; frozen tensors get no gradient") {
  Tensor w = Tensor::randn(Shape{4, 3}, 1, DType::f64);  // frozen: requires_grad false
  Tensor x = Tensor::randn(Shape{2, 3}, 2, DType::f64);
  x.set_requires_grad(true);
  {
    NoGrad ng;
    Tensor y = ops::linear(x, w);
    CHECK(!y.requires_grad());
    CHECK(tape().size() == 0);
  }
  Tensor y = ops::sum(ops::linear(x, w));
  backward(y);
  CHECK(x.grad().defined());
  CHECK(!w.grad().defined());
  // Intermediate results do not keep gradients after backward.
  Tensor z = ops::gelu(x);
  Tensor l = ops::sum(z);
  backward(l);
  CHECK(!z.grad().defined());
  CHECK(error_of([&] { backward(ops::sum(w)); }).find("does not require grad") != std::string::npos);
}

TEST_CASE("bad input: errors name the op, the shapes and the problem") {
  Tensor a = Tensor::zeros(Shape{2, 3}, DType::f32), b = Tensor::zeros(Shape{3, 2}, DType::f32);
  std::string e = error_of([&] { ops::add(a, b); });
  CHECK(e.find("add") != std::string::npos);
  CHECK(e.find("[2, 3]") != std::string::npos);
  CHECK(e.find("[3, 2]") != std::string::npos);
  e = error_of([&] { ops::matmul(a, a); });
  CHECK(e.find("matmul: inner dimensions differ") != std::string::npos);
  e = error_of([&] { ops::add(a, Tensor::zeros(Shape{2, 3}, DType::f64)); });
  CHECK(e.find("dtype mismatch") != std::string::npos);
  e = error_of([&] { ops::linear(a, Tensor::zeros(Shape{4, 5}, DType::f32)); });
  CHECK(e.find("linear") != std::string::npos);
  Tensor wte = Tensor::zeros(Shape{10, 4}, DType::f32);
  e = error_of([&] { ops::embedding(Tensor::from_ints({1, 10, 3, 4}, Shape{2, 2}), wte); });
  CHECK(e.find("embedding") != std::string::npos);
  CHECK(e.find("out of range [0, 10)") != std::string::npos);
  e = error_of([&] { ops::embedding(Tensor::zeros(Shape{2, 2}, DType::f32), wte); });
  CHECK(e.find("tokens must be i32") != std::string::npos);
  e = error_of([&] {
    ops::cross_entropy(Tensor::zeros(Shape{2, 5}, DType::f32), Tensor::from_ints({0, -3}, Shape{2}));
  });
  CHECK(e.find("cross_entropy") != std::string::npos);
  CHECK(e.find("-3") != std::string::npos);
  e = error_of([&] { ops::attention(Tensor::zeros(Shape{1, 2, 12}, DType::f32), 3); });
  CHECK(e.find("n_head 3 must divide") != std::string::npos);
  e = error_of([&] { Tensor::from_vector({1, 2}, Shape{3}, DType::f32); });
  CHECK(e.find("2 values for shape [3]") != std::string::npos);
  if (cuda_available()) {
    Tensor g = Tensor::zeros(Shape{2, 3}, DType::f32, Device::cuda);
    e = error_of([&] { ops::add(a, g); });
    CHECK(e.find("different devices") != std::string::npos);
  } else {
    e = error_of([&] { Tensor::zeros(Shape{2}, DType::f32, Device::cuda); });
    CHECK(e.find("CUDA tensor requested") != std::string::npos);
  }
}

TEST_CASE("cross-entropy ignores masked rows and matches a hand computation") {
  Tensor logits = Tensor::from_vector({0, 0, std::log(3.0), 1, 2, 3}, Shape{2, 3}, DType::f64);
  Tensor tgt = Tensor::from_ints({2, -100}, Shape{2});
  double loss = ops::cross_entropy(logits, tgt).item();
  CHECK(loss == doctest::Approx(std::log(5.0) - std::log(3.0)).epsilon(1e-12));
  Tensor all_ignored = Tensor::from_ints({-100, -100}, Shape{2});
  CHECK(ops::cross_entropy(logits, all_ignored).item() == 0.0);
}

TEST_CASE("caching allocator on CUDA: no cudaMalloc after warm-up") {
  if (!cuda_available()) {
    MESSAGE("skipped: " << cuda_unavailable_reason());
    return;
  }
  auto step = [] {
    Tensor a = Tensor::randn(Shape{256, 512}, 1, DType::f32, Device::cuda);
    Tensor w = Tensor::randn(Shape{128, 512}, 2, DType::f32, Device::cuda).set_requires_grad(true);
    backward(ops::mean(ops::gelu(ops::linear(a, w))));
  };
  step();
  auto before = cuda_ctx().allocator.stats();
  for (int i = 0; i < 5; ++i) step();
  auto after = cuda_ctx().allocator.stats();
  CHECK(after.n_device_allocs == before.n_device_allocs);
  CHECK(after.n_allocs > before.n_allocs);
  CHECK(after.peak >= after.in_use);
  CHECK(after.cached > 0);
}

TEST_CASE("CPU GEMM split over threads equals the plain sum (bit for bit)") {
  const int64_t M = 300, N = 200, K = 90;  // large enough to be split over the cores
  for (int ta = 0; ta < 2; ++ta) {
    Tensor a = Tensor::randn(ta ? Shape{K, M} : Shape{M, K}, 3, DType::f64);
    Tensor b = Tensor::randn(Shape{K, N}, 4, DType::f64);
    std::vector<double> y = ops::matmul(a, b, ta, false).to_double(), av = a.to_double(), bv = b.to_double();
    bool same = true;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += (ta ? av[k * M + i] : av[i * K + k]) * bv[k * N + j];
        same &= s == y[i * N + j];
      }
    CHECK(same);
  }
}
