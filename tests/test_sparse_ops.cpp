// Sparse ops (runtime/ops_sparse.h, kernels/sparse.h) and step capture (runtime/graph.h):
// finite-difference gradient checks in f64 on the CPU, the fused compressed step against the same
// step op by op through the tape, and CPU-vs-CUDA checks that skip with a message without a GPU.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "runtime/dispatch.h"
#include "kernels/rng.h"
#include "kernels/sparse.h"
#include "runtime/device.h"
#include "runtime/graph.h"
#include "runtime/ops.h"
#include "runtime/ops_sparse.h"
#include "test_util.h"

using namespace deeplora;
using test::rel_err;

namespace {

// A random pattern with about `fill` of the entries, at least one per row; fixed by seed.
SparsePattern random_pattern(int64_t rows, int64_t cols, double fill, uint64_t seed, Device dev) {
  std::vector<int32_t> r, c;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      if (j == (i * 7) % cols || rng::u01(seed, uint64_t(i * cols + j)) < fill) {
        r.push_back(int32_t(i));
        c.push_back(int32_t(j));
      }
  // Shuffle the input order: from_pairs must sort.
  for (size_t e = r.size(); e > 1; --e) {
    const size_t k = size_t(rng::u01(seed + 1, e) * double(e));
    std::swap(r[e - 1], r[k]);
    std::swap(c[e - 1], c[k]);
  }
  return SparsePattern::from_pairs(rows, cols, r, c, dev);
}

// Finite differences of a scalar function of f64 CPU leaves, against the tape's gradients.
void grad_check(const std::string& name, std::vector<Tensor> xs, const std::function<Tensor(std::vector<Tensor>&)>& f,
                double tol = 1e-7) {
  CAPTURE(name);
  for (Tensor& x : xs) x.set_requires_grad(true);
  Tensor loss = f(xs);
  backward(loss);
  for (size_t i = 0; i < xs.size(); ++i) {
    REQUIRE(xs[i].grad().defined());
    std::vector<double> analytic = xs[i].grad().to_double(), numeric(analytic.size());
    double* p = xs[i].data_as<double>();
    for (size_t j = 0; j < analytic.size(); ++j) {
      NoGrad ng;
      const double h = 1e-6, o = p[j];
      p[j] = o + h;
      const double fp = f(xs).item();
      p[j] = o - h;
      const double fm = f(xs).item();
      p[j] = o;
      numeric[j] = (fp - fm) / (2 * h);
    }
    const double err = rel_err(analytic, numeric);
    CHECK_MESSAGE(err <= tol, fmt::format("{}: input {}: relative error {:.3g}", name, i, err));
  }
}

Tensor weighted_sum(const Tensor& y, uint64_t seed) {
  Tensor w = Tensor::randn(y.shape(), seed, DType::f64, Device::cpu).to(y.dtype()).to(y.device());
  return ops::sum(ops::mul(y, w));
}

Tensor randn(Shape s, uint64_t seed, Device dev = Device::cpu, DType dt = DType::f64, double sd = 1.0) {
  return Tensor::randn(s, seed, DType::f64, Device::cpu, sd).to(dt).to(dev);
}

// `steps` compressed steps op by op (the tape path): returns A, B, K_l after them and the loss of
// the last step's input.
struct StepOut {
  std::vector<double> A, B, loss;
  std::vector<std::vector<double>> K;
};
StepOut tape_step(const SparsePattern& pat, const Tensor& vals, Tensor A, Tensor B, std::vector<Tensor> K, double alpha,
                  double lr_in, double lr_out, int steps = 1) {
  A = A.clone().set_requires_grad(true);
  B = B.clone().set_requires_grad(true);
  for (Tensor& k : K) k = k.clone().set_requires_grad(true);
  StepOut o;
  for (int s = 0; s < steps; ++s) {
    Tensor Kp = K[0];
    for (size_t l = 1; l < K.size(); ++l) Kp = ops::matmul(K[l], Kp);
    Tensor loss = ops::sq_error(ops::sampled_dot(ops::matmul(A, Kp), B, pat), vals, alpha);
    o.loss = loss.to_double();
    backward(loss);
    std::vector<Tensor> ps{A, B};
    std::vector<double> lrs{lr_out, lr_out};
    for (Tensor& k : K) {
      ps.push_back(k);
      lrs.push_back(lr_in);
    }
    sgd_step(ps, lrs);
  }
  o.A = A.to_double();
  o.B = B.to_double();
  for (Tensor& k : K) o.K.push_back(k.to_double());
  return o;
}

StepOut fused_step(const SparsePattern& pat, const Tensor& vals, const Tensor& A0, const Tensor& B0,
                   const std::vector<Tensor>& K0, double alpha, double lr_in, double lr_out, int steps = 1) {
  const Device dev = A0.device();
  std::vector<Tensor> K;
  for (const Tensor& k : K0) K.push_back(k.clone());
  Tensor A = A0.clone(), B = B0.clone();
  Tensor At = Tensor::zeros(A.shape(), A.dtype(), dev), Bt = Tensor::zeros(B.shape(), B.dtype(), dev);
  Tensor loss = Tensor::zeros(Shape{}, A.dtype(), dev);
  Tensor vcsc = pat.csc_values(vals);
  const size_t wb = kernels::lowrank_step_workspace_bytes(A.dim(1));
  Tensor work = Tensor::zeros(Shape{int64_t(wb / 4 + 1)}, DType::i32, dev);
  lowrank_step(pat, vals, vcsc, A, B, At, Bt, K, alpha, lr_in, lr_out, loss, work, steps);
  StepOut o;
  o.A = A.to_double();
  o.B = B.to_double();
  o.loss = loss.to_double();
  for (Tensor& k : K) o.K.push_back(k.to_double());
  return o;
}

void compare(const StepOut& a, const StepOut& b, double tol, const std::string& what) {
  CHECK_MESSAGE(rel_err(a.loss, b.loss) <= tol, fmt::format("{}: loss {:.3g}", what, rel_err(a.loss, b.loss)));
  CHECK_MESSAGE(rel_err(a.A, b.A) <= tol, fmt::format("{}: A {:.3g}", what, rel_err(a.A, b.A)));
  CHECK_MESSAGE(rel_err(a.B, b.B) <= tol, fmt::format("{}: B {:.3g}", what, rel_err(a.B, b.B)));
  for (size_t l = 0; l < a.K.size(); ++l)
    CHECK_MESSAGE(rel_err(a.K[l], b.K[l]) <= tol, fmt::format("{}: K{} {:.3g}", what, l + 1, rel_err(a.K[l], b.K[l])));
}

}  // namespace

TEST_CASE("sparse pattern: CSR/CSC from unordered pairs, and bad input") {
  SparsePattern p = random_pattern(9, 6, 0.3, 5, Device::cpu);
  auto rp = p.row_ptr.to_int(), ci = p.col_idx.to_int(), cp = p.col_ptr.to_int(), cr = p.csc_row.to_int(),
       perm = p.csc_to_csr.to_int(), ri = p.row_idx.to_int();
  REQUIRE(rp.back() == p.nnz);
  for (int64_t i = 0; i < p.rows; ++i)
    for (int32_t e = rp[size_t(i)]; e < rp[size_t(i) + 1]; ++e) {
      CHECK(ri[size_t(e)] == i);
      if (e > rp[size_t(i)]) CHECK(ci[size_t(e)] > ci[size_t(e) - 1]);
    }
  for (int64_t j = 0; j < p.cols; ++j)
    for (int32_t k = cp[size_t(j)]; k < cp[size_t(j) + 1]; ++k) {
      CHECK(ci[size_t(perm[size_t(k)])] == j);
      CHECK(ri[size_t(perm[size_t(k)])] == cr[size_t(k)]);
      if (k > cp[size_t(j)]) CHECK(cr[size_t(k)] > cr[size_t(k) - 1]);
    }
  CHECK_THROWS_WITH_AS(SparsePattern::from_pairs(3, 3, {0, 1, 0}, {2, 2, 2}, Device::cpu, "mask"),
                       "mask: entry (0, 2) appears more than once", std::invalid_argument);
  CHECK_THROWS_WITH_AS(SparsePattern::from_pairs(3, 3, {0, 3}, {1, 1}, Device::cpu, "mask"),
                       "mask: entry 1 at (3, 1) is outside the 3 x 3 matrix", std::invalid_argument);
  CHECK_THROWS_AS(SparsePattern::from_pairs(3, 3, {0}, {1, 1}, Device::cpu), std::invalid_argument);
}

TEST_CASE("sparse ops: finite-difference gradient checks in f64 on the CPU") {
  SparsePattern p = random_pattern(7, 5, 0.35, 11, Device::cpu);
  grad_check("sampled_dot", {randn({7, 3}, 1), randn({5, 3}, 2)},
             [&](auto& x) { return weighted_sum(ops::sampled_dot(x[0], x[1], p), 3); });
  grad_check("at_pattern", {randn({7, 5}, 20)}, [&](auto& x) { return weighted_sum(ops::at_pattern(x[0], p), 21); });
  grad_check("spmm", {randn({p.nnz}, 4), randn({5, 4}, 5)},
             [&](auto& x) { return weighted_sum(ops::spmm(p, x[0], x[1]), 6); });
  grad_check("spmm transposed", {randn({p.nnz}, 7), randn({7, 2}, 8)},
             [&](auto& x) { return weighted_sum(ops::spmm(p, x[0], x[1], true), 9); });
  grad_check("sq_error", {randn({4, 6}, 10), randn({4, 6}, 11)},
             [&](auto& x) { return ops::sq_error(x[0], x[1], 0.37); });
  Tensor mask = Tensor::uniform(Shape{4, 6}, 12, 0.0, 1.0, DType::f64);
  grad_check("sq_error masked", {randn({4, 6}, 13), randn({4, 6}, 14)},
             [&](auto& x) { return ops::sq_error(x[0], x[1], 1.7, mask); });
  // The completion chain the tape path trains: ½α Σ_Ω (A K3 K2 K1 Bᵀ − M)².
  Tensor m = randn({p.nnz}, 15);
  grad_check("compressed completion loss", {randn({7, 4}, 16), randn({4, 4}, 17), randn({4, 4}, 18), randn({5, 4}, 19)},
             [&](auto& x) {
               Tensor P = ops::matmul(x[0], ops::matmul(x[2], x[1]));
               return ops::sq_error(ops::sampled_dot(P, x[3], p), m, 0.5);
             });
}

TEST_CASE("sparse ops: forward values against dense references (CPU)") {
  SparsePattern p = random_pattern(6, 8, 0.4, 21, Device::cpu);
  Tensor P = randn({6, 3}, 22), Q = randn({8, 3}, 23), v = randn({p.nnz}, 24), X = randn({8, 2}, 25);
  auto y = ops::sampled_dot(P, Q, p).to_double();
  auto pd = P.to_double(), qd = Q.to_double(), vd = v.to_double(), xd = X.to_double();
  auto rp = p.row_ptr.to_int(), ci = p.col_idx.to_int();
  std::vector<double> sx(6 * 2, 0.0), ref(size_t(p.nnz));
  for (int i = 0; i < 6; ++i)
    for (int32_t e = rp[size_t(i)]; e < rp[size_t(i) + 1]; ++e) {
      const int j = ci[size_t(e)];
      for (int c = 0; c < 3; ++c) ref[size_t(e)] += pd[size_t(i * 3 + c)] * qd[size_t(j * 3 + c)];
      for (int c = 0; c < 2; ++c) sx[size_t(i * 2 + c)] += vd[size_t(e)] * xd[size_t(j * 2 + c)];
    }
  CHECK(rel_err(y, ref) <= 1e-15);
  CHECK(rel_err(ops::spmm(p, v, X).to_double(), sx) <= 1e-15);
  // Unobserved-entry sum: the dense difference, masked.
  Tensor X1 = randn({6, 3}, 26), Y1 = randn({8, 3}, 27), X2 = randn({6, 2}, 28), Y2 = randn({8, 2}, 29);
  Tensor out = Tensor::zeros(Shape{}, DType::f64);
  kernels::cpu::lowrank_unobserved_sq_sum(DType::f64, p.row_ptr.data_as<int32_t>(), p.col_idx.data_as<int32_t>(), 6, 8,
                                          X1.data(), Y1.data(), 3, X2.data(), Y2.data(), 2, out.data(), nullptr);
  Tensor D = ops::add(ops::matmul(X1, Y1, false, true), ops::scale(ops::matmul(X2, Y2, false, true), -1.0));
  std::vector<double> dd = D.to_double();
  double s = 0;
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 8; ++j) {
      bool obs = false;
      for (int32_t e = rp[size_t(i)]; e < rp[size_t(i) + 1]; ++e) obs |= ci[size_t(e)] == j;
      if (!obs) s += dd[size_t(i * 8 + j)] * dd[size_t(i * 8 + j)];
    }
  CHECK(std::abs(out.item() - s) <= 1e-13 * s);
}

TEST_CASE("fused compressed step equals the op-by-op tape step (CPU, f64 and f32)") {
  for (int64_t L : {2, 3, 5}) {
    for (int64_t k : {2, 6, 10}) {
      CAPTURE(L);
      CAPTURE(k);
      SparsePattern p = random_pattern(37, 29, 0.25, uint64_t(100 + L * 7 + k), Device::cpu);
      Tensor vals = randn({p.nnz}, 31), A = randn({37, k}, 32, Device::cpu, DType::f64, 0.3),
             B = randn({29, k}, 33, Device::cpu, DType::f64, 0.3);
      std::vector<Tensor> K;
      for (int64_t l = 0; l < L; ++l)
        K.push_back(ops::add(Tensor::from_vector(std::vector<double>(size_t(k * k), 0.0), Shape{k, k}, DType::f64),
                             randn({k, k}, uint64_t(40 + l), Device::cpu, DType::f64, 0.4)));
      const double alpha = 1.0 / (37.0 * 29.0), lr_in = 3.0, lr_out = 0.7;
      StepOut ref = tape_step(p, vals, A, B, K, alpha, lr_in, lr_out);
      compare(fused_step(p, vals, A, B, K, alpha, lr_in, lr_out), ref, 1e-12, "f64 fused vs tape");
      std::vector<Tensor> K32;
      for (Tensor& t : K) K32.push_back(t.to(DType::f32));
      compare(fused_step(p, vals.to(DType::f32), A.to(DType::f32), B.to(DType::f32), K32, alpha, lr_in, lr_out), ref,
              1e-5, "f32 fused vs f64 tape");
      // Several iterations in one call (odd and even counts: the iterate ends in A, B either way).
      for (int steps : {2, 3}) {
        CAPTURE(steps);
        compare(fused_step(p, vals, A, B, K, alpha, lr_in, lr_out, steps),
                tape_step(p, vals, A, B, K, alpha, lr_in, lr_out, steps), 1e-11, "f64 fused vs tape, several steps");
      }
    }
  }
  {  // bad arguments: clear messages
    SparsePattern p = random_pattern(7, 5, 0.5, 3, Device::cpu);
    Tensor v = randn({p.nnz}, 4), A = randn({7, 2}, 5), B = randn({5, 2}, 6);
    Tensor loss = Tensor::zeros(Shape{}, DType::f64), work = Tensor::zeros(Shape{4096}, DType::i32);
    std::vector<Tensor> K{randn({2, 2}, 7)};
    CHECK_THROWS_WITH_AS(lowrank_step(p, v, v, A, B, A, B, K, 1, 1, 1, loss, work), "lowrank_step: A_tmp and B_tmp must not alias A or B",
                         std::invalid_argument);
    CHECK_THROWS_AS(lowrank_step(p, v, v, A, B, randn({7, 3}, 8), randn({5, 2}, 9), K, 1, 1, 1, loss, work),
                    std::invalid_argument);
    CHECK_THROWS_AS(lowrank_step(p, v, v, A, B, randn({7, 2}, 8), randn({5, 2}, 9), K, 1, 1, 1, loss, work, -1),
                    std::invalid_argument);
  }
  CHECK_FALSE(kernels::lowrank_step_supported(DType::f64, 33, 3));
  CHECK_FALSE(kernels::lowrank_step_supported(DType::f64, 32, 16));
  CHECK(kernels::lowrank_step_supported(DType::f64, 10, 3));
}

TEST_CASE("sgd_step: p -= lr·grad, gradient zeroed in place, clear errors") {
  Tensor a = randn({5}, 50), b = randn({2, 3}, 51);
  a.set_requires_grad(true).set_name("a");
  b.set_requires_grad(true).set_name("b");
  backward(ops::add(ops::sum(ops::mul(a, a)), ops::sum(b)));
  auto a0 = a.to_double(), ga = a.grad().to_double();
  void* gptr = a.grad().data();
  sgd_step({a, b}, {0.1, 2.0});
  auto a1 = a.to_double();
  for (size_t i = 0; i < a0.size(); ++i) CHECK(a1[i] == doctest::Approx(a0[i] - 0.1 * ga[i]));
  CHECK(a.grad().data() == gptr);
  for (double g : a.grad().to_double()) CHECK(g == 0.0);
  Tensor c = randn({3}, 52).set_name("c");
  CHECK_THROWS_WITH_AS(sgd_step({c}, {1.0}), "sgd_step: c f64 [3] cpu has no gradient (did backward reach it?)",
                       std::invalid_argument);
  CHECK_THROWS_AS(sgd_step({a}, {1.0, 2.0}), std::invalid_argument);
}

TEST_CASE("StepGraph: on the CPU it calls the step every time") {
  int n = 0;
  StepGraph g([&] { ++n; }, Device::cpu);
  for (int i = 0; i < 5; ++i) g.run();
  CHECK(n == 5);
  CHECK_FALSE(g.captured());
  CHECK_FALSE(StepGraph::capturing());
  CHECK_NOTHROW(check_not_capturing("test"));
  CHECK_THROWS_AS(StepGraph(std::function<void()>(), Device::cpu), std::invalid_argument);
}

TEST_CASE("sparse ops and the fused step: CPU vs CUDA (f64, f32)") {
  if (!cuda_available()) {
    MESSAGE("skipped the CPU-vs-CUDA sparse-op checks: " << cuda_unavailable_reason());
    return;
  }
  for (DType dt : {DType::f64, DType::f32}) {
    CAPTURE(dtype_name(dt));
    const double tol = dt == DType::f64 ? 1e-12 : 5e-5;  // f32: up to 7 fused iterations amplify rounding
    std::vector<std::vector<double>> res[2];
    for (Device dev : {Device::cpu, Device::cuda}) {
      // A fused run's results, in a fixed order; L random inner factors n x n.
      auto keep = [&](const StepOut& s) {
        auto& r = res[int(dev)];
        r.push_back(s.A);
        r.push_back(s.B);
        r.push_back(s.loss);
        for (auto& kl : s.K) r.push_back(kl);
      };
      auto inner = [&](int L, int64_t n, uint64_t seed, double scale) {
        std::vector<Tensor> K;
        for (int l = 0; l < L; ++l) K.push_back(randn({n, n}, seed + uint64_t(l), dev, dt, scale));
        return K;
      };
      SparsePattern p = random_pattern(300, 170, 0.05, 61, dev);
      Tensor P = randn({300, 10}, 62, dev, dt), Q = randn({170, 10}, 63, dev, dt), v = randn({p.nnz}, 64, dev, dt);
      P.set_requires_grad(true);
      Q.set_requires_grad(true);
      v.set_requires_grad(true);
      Tensor y = ops::sampled_dot(P, Q, p);
      Tensor z = ops::spmm(p, v, Q);
      Tensor zt = ops::spmm(p, v, P, true);
      Tensor D = randn({300, 170}, 67, dev, dt);
      D.set_requires_grad(true);
      Tensor l = ops::add(ops::add(ops::sq_error(y, ops::scale(v, 0.5), 0.01), weighted_sum(z, 65)), weighted_sum(zt, 66));
      l = ops::add(l, ops::sq_error(ops::at_pattern(D, p), y, 0.3));
      res[int(dev)].push_back(y.to_double());
      res[int(dev)].push_back(z.to_double());
      res[int(dev)].push_back(zt.to_double());
      res[int(dev)].push_back(l.to_double());
      backward(l);
      res[int(dev)].push_back(P.grad().to_double());
      res[int(dev)].push_back(Q.grad().to_double());
      res[int(dev)].push_back(v.grad().to_double());
      res[int(dev)].push_back(D.grad().to_double());
      Tensor out = Tensor::zeros(Shape{}, DType::f64, dev);
      DEEPLORA_DISPATCH(dev, lowrank_unobserved_sq_sum, dt, p.row_ptr.data_as<int32_t>(), p.col_idx.data_as<int32_t>(),
                        300, 170, P.data(), Q.data(), 10, P.data(), Q.data(), 4, out.data(), stream_for(dev));
      res[int(dev)].push_back(out.to_double());
      for (int64_t k : {6, 10}) {  // 6 runs the k <= 8 instantiation with predicated lanes
        std::vector<Tensor> K = inner(3, k, 70, 0.4);
        Tensor Ak = randn({300, k}, 74, dev, dt, 0.5), Bk = randn({170, k}, 75, dev, dt, 0.5);
        for (int steps : {1, 4, 7}) {  // the grid barrier between iterations, and the final copy of odd counts
          // Step sizes at which 7 iterations descend (at lr_inner = 2 the k = 10 case diverges).
          StepOut s = fused_step(p, v.detach(), Ak, Bk, K, 1e-3, 0.5, 0.125, steps);
          CHECK(std::isfinite(s.loss[0]));
          keep(s);
        }
      }
      // Depths 1, 2 and 4 (the prefix/suffix chains and the two-level K update at other lengths).
      for (int L : {1, 2, 4})
        keep(fused_step(p, v.detach(), randn({300, 6}, 94, dev, dt, 0.5), randn({170, 6}, 95, dev, dt, 0.5),
                        inner(L, 6, 90, 0.5), 1e-3, 0.5, 0.125, 3));
      // Many rows per warp with the factor staged in shared memory (the entries are not kept there).
      SparsePattern tall = random_pattern(2600, 40, 0.1, 96, dev);
      keep(fused_step(tall, randn({tall.nnz}, 100, dev, dt), randn({2600, 2}, 101, dev, dt, 0.5),
                      randn({40, 2}, 102, dev, dt, 0.5), inner(3, 2, 97, 0.7), 1e-4, 1.0, 0.5, 4));
      // A large pattern: several rows per warp (grid-strided), many row blocks' partials.
      SparsePattern big = random_pattern(9000, 700, 0.01, 77, dev);
      keep(fused_step(big, randn({big.nnz}, 79, dev, dt), randn({9000, 4}, 80, dev, dt, 0.5),
                      randn({700, 4}, 81, dev, dt, 0.5), inner(2, 4, 78, 0.6), 1e-4, 2.0, 0.5, 3));
    }
    for (size_t i = 0; i < res[0].size(); ++i) {
      const double e = rel_err(res[1][i], res[0][i]);
      CHECK_MESSAGE(e <= tol, fmt::format("{} result {}: relative error {:.3g}", dtype_name(dt), i, e));
    }
  }
}

TEST_CASE("StepGraph on CUDA: replays equal eager steps; a host sync inside the capture is a clear error") {
  if (!cuda_available()) {
    MESSAGE("skipped the CUDA-graph capture checks: " << cuda_unavailable_reason());
    return;
  }
  SparsePattern p = random_pattern(64, 48, 0.2, 81, Device::cuda);
  Tensor v = randn({p.nnz}, 82, Device::cuda);
  auto make = [&] {
    std::vector<Tensor> t{randn({64, 6}, 83, Device::cuda, DType::f64, 0.5), randn({48, 6}, 84, Device::cuda, DType::f64, 0.5)};
    for (Tensor& x : t) x.set_requires_grad(true);
    return t;
  };
  auto step = [&](std::vector<Tensor>& t) {
    backward(ops::sq_error(ops::sampled_dot(t[0], t[1], p), v, 0.1));
    sgd_step(t, {0.5, 0.5});
  };
  std::vector<Tensor> eager = make(), graphed = make();
  StepGraph g([&] { step(graphed); }, Device::cuda, StepGraph::Options{true, 1, "test step"});
  for (int i = 0; i < 6; ++i) {
    step(eager);
    g.run();
  }
  CHECK(g.captured());
  CHECK(g.replays() == 5);
  CHECK(rel_err(graphed[0].to_double(), eager[0].to_double()) == 0.0);
  CHECK(rel_err(graphed[1].to_double(), eager[1].to_double()) == 0.0);
  {  // The graph's pool: what other code allocates between replays (an eval) is reused, not held, and
     // the graph's own blocks are never handed out while it lives.
    auto& alloc = cuda_ctx().allocator;
    auto eval_like = [&] {
      Tensor a = randn({1 << 18}, 90, Device::cuda, DType::f32), b = ops::scale(a, 2.0);
      return ops::sum(b).item();
    };
    (void)eval_like();
    const size_t before = alloc.stats().n_device_allocs;
    for (int i = 0; i < 5; ++i) {
      (void)eval_like();
      g.run();
      step(eager);
    }
    CHECK(alloc.stats().n_device_allocs == before);  // the eval's blocks came back from the cache each time
    CHECK(rel_err(graphed[0].to_double(), eager[0].to_double()) == 0.0);  // and never overwrote the graph's
  }
  {  // The fused steps (a cooperative launch) captured: replays equal eager launches bit for bit.
    struct State {
      Tensor A, B, At, Bt, loss, work;
      std::vector<Tensor> K;
    };
    Tensor vcsc = p.csc_values(v);
    auto make_state = [&] {
      State st{randn({64, 6}, 85, Device::cuda, DType::f64, 0.5), randn({48, 6}, 86, Device::cuda, DType::f64, 0.5),
               Tensor::zeros(Shape{64, 6}, DType::f64, Device::cuda), Tensor::zeros(Shape{48, 6}, DType::f64, Device::cuda),
               Tensor::zeros(Shape{}, DType::f64, Device::cuda),
               Tensor::zeros(Shape{int64_t(kernels::lowrank_step_workspace_bytes(6) / 4)}, DType::i32, Device::cuda),
               {}};
      for (int l = 0; l < 3; ++l) st.K.push_back(randn({6, 6}, uint64_t(87 + l), Device::cuda, DType::f64, 0.4));
      return st;
    };
    State e = make_state(), c = make_state();
    auto fused = [&](State& st) {
      lowrank_step(p, v, vcsc, st.A, st.B, st.At, st.Bt, st.K, 0.1, 0.1, 0.1, st.loss, st.work, 3);  // descends
    };
    StepGraph fg([&] { fused(c); }, Device::cuda, StepGraph::Options{true, 1, "fused steps"});
    for (int i = 0; i < 4; ++i) {
      fused(e);
      fg.run();
    }
    CHECK(fg.captured());
    CHECK(fg.replays() == 3);
    CHECK(rel_err(c.A.to_double(), e.A.to_double()) == 0.0);
    CHECK(rel_err(c.B.to_double(), e.B.to_double()) == 0.0);
    CHECK(rel_err(c.K[2].to_double(), e.K[2].to_double()) == 0.0);
    CHECK(c.loss.item() == e.loss.item());
    CHECK(std::isfinite(e.loss.item()));
  }
  StepGraph bad([&] { (void)v.item(); }, Device::cuda, StepGraph::Options{true, 0, "syncing step"});
  try {
    bad.run();
    FAIL("a host sync inside the capture did not throw");
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("StepGraph 'syncing step'") != std::string::npos);
    CHECK(msg.find("synchronize") != std::string::npos);
  }
  // The stream is usable again afterwards.
  CHECK(std::isfinite(ops::sum(v).item()));
}
