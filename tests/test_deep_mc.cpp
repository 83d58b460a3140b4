// Deep matrix completion (models/deep_mc.h), on the CPU at d = 60, r = 3, p = 0.3, L = 3, ε = 1e-3:
// both methods recover the target, the compressed dynamics match the original's as the theory says,
// γ = 0 stalls, the implicit (large-d) initialization is consistent, and the tool rejects bad input.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include "models/deep_mc.h"
#include "runtime/device.h"
#include "runtime/graph.h"
#include "runtime/ops.h"

using namespace deeplora;
using namespace deeplora::deep_mc;

namespace {

// The CI setting. η = 150 on the mean-normalized loss (the largest round value that is stable here:
// the top curvature L·σ_max(M)^{4/3}·p·η/d² ≈ 1.5 < 2); the escape from ε³-small W takes ~5000
// iterations, then both methods converge linearly (recovery ≤ 1e-10 by ~7000 (original) and
// ~8500 (compressed) iterations).
Config small_config() {
  Config c;
  c.d = 60;
  c.r = 3;
  c.p = 0.3;
  c.L = 3;
  c.eps = 1e-3;
  c.lr = 150;
  c.gamma = 0.01;
  c.seed = 0;
  c.device = "cpu";
  c.quiet = true;
  return c;
}

Target small_target(const Config& c) { return make_target(c.d, c.r, c.p, c.obs_per_row, c.seed, c.dtype, Device::cpu); }

double fro(const std::vector<double>& a) {
  double s = 0;
  for (double v : a) s += v * v;
  return std::sqrt(s);
}
double fro_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(s);
}

// Trains until the recovery error is <= tol (checked every 100 iterations) or max_iters.
std::pair<int64_t, Metrics> train_to(Model& m, double tol, int64_t max_iters) {
  Metrics met = m.evaluate();
  int64_t it = 0;
  while (it < max_iters && met.recovery > tol) {
    for (int i = 0; i < 100; ++i) m.step();
    it += 100;
    met = m.evaluate();
    REQUIRE(std::isfinite(met.train_loss));
  }
  return {it, met};
}

// ‖XᵀX − I‖_F for a [d, k] tensor, and ‖(I − XXᵀ)Y‖_F / ‖Y‖_F.
double orth_err(const Tensor& X) {
  Tensor G = ops::matmul(X, X, true, false);
  std::vector<double> g = G.to_double();
  const int64_t k = X.dim(1);
  for (int64_t i = 0; i < k; ++i) g[size_t(i * k + i)] -= 1.0;
  return fro(g);
}
double outside_span(const Tensor& X, const Tensor& Y) {
  Tensor P = ops::matmul(X, ops::matmul(X, Y, true, false));
  return fro_diff(Y.to_double(), P.to_double()) / fro(Y.to_double());
}

}  // namespace

TEST_CASE("deep_mc: both methods recover the target (d=60, r=3, p=0.3, L=3, lr=150); gamma=0 stalls") {
  Config c = small_config();
  Target t = small_target(c);
  Original o(t, c, Device::cpu);
  Compressed m(t, c, Device::cpu);
  CHECK(m.used_exact_init);
  auto [it_o, met_o] = train_to(o, 1e-10, 12000);
  auto [it_c, met_c] = train_to(m, 1e-10, 12000);
  MESSAGE(fmt::format("original: recovery {:.3g} after {} iterations; compressed: {:.3g} after {}", met_o.recovery,
                      it_o, met_c.recovery, it_c));
  CHECK(met_o.recovery <= 1e-10);
  CHECK(met_c.recovery <= 1e-10);
  CHECK(met_o.train_loss <= 1e-10);
  CHECK(met_c.train_loss <= 1e-10);
  // The paper's observation: with the outer factors frozen (γ = 0) the 2r-dim subspaces found at
  // t = 0 cannot hold M, and the error stalls.
  Config c0 = c;
  c0.gamma = 0.0;
  Compressed frozen(t, c0, Device::cpu);
  for (int i = 0; i < 12000; ++i) frozen.step();
  Metrics met0 = frozen.evaluate();
  MESSAGE(fmt::format("gamma = 0: recovery {:.3g} after 12000 iterations", met0.recovery));
  CHECK(met0.recovery > 1e-6);
}

TEST_CASE("deep_mc: the compressed dynamics are the original's restricted to the 2r subspaces") {
  // Theory (exact with full observation, γ = 0): W_orig(t)·B·Bᵀ = W_comp(t) for every t, since the
  // original's factors move only inside the subspaces the compressed model keeps, and the rest of
  // W_orig is ε^L·O·(I − BBᵀ) times a scalar.
  Config c = small_config();
  c.p = 1.0;
  c.gamma = 0.0;
  c.seed = 3;
  Target t = small_target(c);
  Original o(t, c, Device::cpu);
  Compressed m(t, c, Device::cpu);
  double worst = 0;
  for (int it = 1; it <= 50; ++it) {
    o.step();
    m.step();
    if (it <= 5 || it % 10 == 0) {
      std::vector<double> wc = m.dense_W().to_double();
      std::vector<double> wp = ops::matmul(ops::matmul(o.dense_W(), m.B), m.B, false, true).to_double();
      worst = std::max(worst, fro_diff(wp, wc) / fro(wc));
    }
  }
  MESSAGE(fmt::format("p = 1, gamma = 0: max over the first 50 iterations of |W_o B Bᵀ - W_c| / |W_c| = {:.3g}", worst));
  CHECK(worst <= 1e-8);

  // Masked (p = 0.3, γ = 0.01): the gradient at t = 0, G = Ω∘(ε^L·O − M)/d², is not low-rank, so
  // the identity holds to first order only up to the part of G outside the subspaces:
  //   W_o(t)·BBᵀ − W_c(t) = −t·L·η·ε^{2L−2}·(I − AAᵀ)·G·BBᵀ + O(t²η²ε^{3L−4}‖G‖², γηε^{2L}),
  // so the relative difference grows linearly from ~1.5e-4 per iteration here; check the prediction.
  Config cm = small_config();
  Target tm = small_target(cm);
  Original om(tm, cm, Device::cpu);
  Compressed mm(tm, cm, Device::cpu);
  Tensor O = orthogonal_init(cm.d, 1, cm.seed, DType::f64, Device::cpu);
  for (int64_t l = 2; l <= cm.L; ++l) O = ops::matmul(orthogonal_init(cm.d, l, cm.seed, DType::f64, Device::cpu), O);
  std::vector<double> mask(size_t(cm.d * cm.d), 0.0);
  for (int64_t i = 0; i < cm.d; ++i)
    for (int32_t e = tm.omega.h_row_ptr[size_t(i)]; e < tm.omega.h_row_ptr[size_t(i) + 1]; ++e)
      mask[size_t(i * cm.d + tm.omega.h_col_idx[size_t(e)])] = 1.0;
  const double alpha = 1.0 / double(cm.d * cm.d), epsL = std::pow(cm.eps, double(cm.L));
  Tensor G = ops::scale(ops::mul(ops::add(ops::scale(O, epsL), ops::scale(ops::matmul(tm.U, tm.V, false, true), -1.0)),
                                 Tensor::from_vector(mask, Shape{cm.d, cm.d}, DType::f64)),
                        alpha);
  Tensor A0 = mm.A.clone(), B0 = mm.B.clone();
  Tensor GP = ops::matmul(ops::matmul(G, B0), B0, false, true);
  Tensor outside = ops::add(GP, ops::scale(ops::matmul(A0, ops::matmul(A0, GP, true, false)), -1.0));
  const double first_order = double(cm.L) * cm.lr * std::pow(cm.eps, 2.0 * double(cm.L) - 2.0) * fro(outside.to_double());
  for (int it = 1; it <= 3; ++it) {
    om.step();
    mm.step();
    std::vector<double> wc = mm.dense_W().to_double();
    std::vector<double> wp = ops::matmul(ops::matmul(om.dense_W(), mm.B), mm.B, false, true).to_double();
    const double measured = fro_diff(wp, wc) / fro(wc), predicted = it * first_order / fro(wc);
    MESSAGE(fmt::format("p = 0.3, iteration {}: |W_o B Bᵀ - W_c| / |W_c| = {:.4g}, first-order theory {:.4g}", it,
                        measured, predicted));
    CHECK(measured == doctest::Approx(predicted).epsilon(0.02));
  }
}

TEST_CASE("deep_mc: the implicit initialization (large-d path) agrees with the exact one") {
  Config c = small_config();
  Target t = small_target(c);
  Config ce = c, ci = c;
  ce.init = InitMode::exact;
  ci.init = InitMode::implicit;
  Compressed exact(t, ce, Device::cpu), implicit(t, ci, Device::cpu);
  CHECK(exact.used_exact_init);
  CHECK_FALSE(implicit.used_exact_init);
  for (Compressed* m : {&exact, &implicit}) {
    CHECK(orth_err(m->A) <= 1e-12);
    CHECK(orth_err(m->B) <= 1e-12);
    CHECK(outside_span(m->A, m->Ur) <= 1e-12);
    CHECK(outside_span(m->B, m->Vr) <= 1e-12);
  }
  // Same top-r singular subspaces of the gradient (randomized sparse solver vs dense SVD).
  const double eu = outside_span(implicit.Ur, exact.Ur), ev = outside_span(implicit.Vr, exact.Vr);
  MESSAGE(fmt::format("implicit vs exact singular subspaces: {:.3g} (left), {:.3g} (right)", eu, ev));
  CHECK(eu <= 1e-4);  // 8 power iterations (default --svd-iters) on this spectrum: ~1e-5
  CHECK(ev <= 1e-4);
  auto [it, met] = train_to(implicit, 1e-10, 12000);
  MESSAGE(fmt::format("implicit init: recovery {:.3g} after {} iterations", met.recovery, it));
  CHECK(met.recovery <= 1e-10);
  // Recovery estimated on a sample of unobserved entries tracks the exact value.
  Config cs = c;
  cs.eval_sample = 2000;
  Compressed sampled(t, cs, Device::cpu);
  Metrics a = sampled.evaluate(), b = exact.evaluate();
  CHECK(a.recovery_estimated);
  CHECK(a.recovery == doctest::Approx(b.recovery).epsilon(0.15));
}

TEST_CASE("deep_mc: fused and op-by-op compressed steps give the same trajectory") {
  Config c = small_config();
  c.log_every = 12;  // a launch runs the largest divisor of the log interval up to 250: 12
  Target t = small_target(c);
  Config ct = c;
  ct.impl = Impl::tape;
  Compressed f(t, c, Device::cpu), g(t, ct, Device::cpu);
  REQUIRE(f.block_steps() == 12);
  for (int i = 0; i < 2; ++i) f.step_block();  // 24 iterations in two calls
  f.step();                                     // and a single one
  for (int i = 0; i < 25; ++i) g.step();
  std::vector<double> wf = f.dense_W().to_double(), wg = g.dense_W().to_double();
  CHECK(fro_diff(wf, wg) / fro(wg) <= 1e-12);
  CHECK(g.block_steps() == 1);
}

TEST_CASE("deep_mc: the dense-GEMM compressed step follows the tape (row blocks, depths, widths past the fused kernel)") {
  struct Case {
    int64_t d, r, L, block_rows;
  };
  // One block; ragged blocks (60 = 8·7 + 4); one row per block; L = 2 and 4; k = 2r = 34 > 32, where
  // the fused kernel does not exist.
  for (Case cs : {Case{60, 3, 3, 0}, Case{60, 3, 3, 7}, Case{60, 3, 2, 1}, Case{60, 3, 4, 13}, Case{80, 17, 3, 0}}) {
    CAPTURE(cs.d);
    CAPTURE(cs.r);
    CAPTURE(cs.L);
    CAPTURE(cs.block_rows);
    Config c = small_config();
    c.d = cs.d;
    c.r = cs.r;
    c.L = cs.L;
    c.block_rows = cs.block_rows;
    c.log_every = 10;
    c.impl = Impl::dense;
    Target t = small_target(c);
    Config ct = c;
    ct.impl = Impl::tape;
    Compressed f(t, c, Device::cpu), g(t, ct, Device::cpu);
    REQUIRE(f.impl() == Impl::dense);
    REQUIRE(f.block_steps() == 10);
    f.step_block();  // 10 iterations in one call
    for (int i = 0; i < 3; ++i) f.step();
    for (int i = 0; i < 13; ++i) g.step();
    std::vector<double> wf = f.dense_W().to_double(), wg = g.dense_W().to_double();
    CHECK(fro_diff(wf, wg) / fro(wg) <= 1e-12);
    for (size_t l = 0; l < f.K.size(); ++l) {
      std::vector<double> a = f.K[l].to_double(), b = g.K[l].to_double();
      CHECK(fro_diff(a, b) / fro(b) <= 1e-12);
    }
    CHECK(f.evaluate().train_loss == doctest::Approx(g.evaluate().train_loss).epsilon(1e-10));
    if (cs.r <= 16) {  // and the fused kernel agrees with both
      Config cf = c;
      cf.impl = Impl::fused;
      Compressed h(t, cf, Device::cpu);
      for (int i = 0; i < 13; ++i) h.step();
      std::vector<double> wh = h.dense_W().to_double();
      CHECK(fro_diff(wh, wg) / fro(wg) <= 1e-12);
    } else {
      Config cf = c;
      cf.impl = Impl::fused;
      CHECK_THROWS_AS(Compressed(t, cf, Device::cpu), std::invalid_argument);
      Config ca = c;
      ca.impl = Impl::automatic;
      CHECK(Compressed(t, ca, Device::cpu).impl() == Impl::dense);
    }
  }
}

TEST_CASE("deep_mc: the cost model picks the dense step for dense observation, the fused kernel for sparse") {
  // The two data points on the H200: d = 1000, r = 5, p = 0.2 (fused, 9 us) and d = 2000,
  // r = 10, p = 0.3 (330 us: k = 20 is past the fused kernel's shared memory, so that was the tape).
  StepCost a = step_cost(Device::cuda, DType::f64, 1000, 200000, 10, 5, 3, 0);
  CHECK(a.fused_ok);
  CHECK(a.pick == Impl::fused);
  StepCost b = step_cost(Device::cuda, DType::f64, 2000, 1200000, 20, 10, 3, 0);
  CHECK_FALSE(b.fused_ok);
  CHECK(b.pick == Impl::dense);
  // Dense observation at k = 10 (d = 2000, p = 0.5): measured fused 40 us, dense 101 us; the model
  // agrees within 15 %.
  StepCost b2 = step_cost(Device::cuda, DType::f64, 2000, 2000000, 10, 5, 3, 0);
  CHECK(b2.fused_ok);
  CHECK(b2.pick == Impl::fused);
  CHECK(b2.fused_us == doctest::Approx(40.1).epsilon(0.15));
  CHECK(b2.dense_us == doctest::Approx(101).epsilon(0.15));
  CHECK(step_cost(Device::cuda, DType::f64, 2000, 200000, 40, 20, 3, 0).dense_us == doctest::Approx(168).epsilon(0.15));
  CHECK_FALSE(step_cost(Device::cuda, DType::f64, 2000, 200000, 130, 65, 3, 0).dense_ok);  // k > 64
  // Sparse observation at large d: d² work loses.
  CHECK(step_cost(Device::cuda, DType::f64, 100000, 20000000, 10, 5, 3, 0).pick == Impl::fused);
  // k = 40 has no fused kernel; L = 20 has neither; the CPU takes the sampled reference when it exists.
  StepCost c = step_cost(Device::cuda, DType::f64, 1000, 200000, 40, 20, 3, 0);
  CHECK_FALSE(c.fused_ok);
  CHECK(c.pick == Impl::dense);
  CHECK(step_cost(Device::cuda, DType::f64, 1000, 200000, 10, 5, 20, 0).pick == Impl::tape);
  CHECK(step_cost(Device::cpu, DType::f64, 2000, 2000000, 10, 5, 3, 0).pick == Impl::fused);
  // More row blocks cost more launches.
  CHECK(step_cost(Device::cuda, DType::f64, 2000, 1200000, 20, 10, 3, 100).dense_us > b.dense_us);
}

TEST_CASE("deep_mc: fused and op-by-op original steps give the same trajectory (L = 2, 3, 4)") {
  for (int64_t L : {2, 3, 4}) {
    CAPTURE(L);
    Config c = small_config();
    c.L = L;
    Target t = small_target(c);
    Config ct = c;
    ct.impl = Impl::tape;
    Original f(t, c, Device::cpu), g(t, ct, Device::cpu);
    REQUIRE(f.block_steps() == 2);
    for (int i = 0; i < 2; ++i) f.step_block();  // 4 iterations through the ping-pong pair
    f.step();                                     // and a single one
    for (int i = 0; i < 5; ++i) g.step();
    std::vector<double> wf = f.dense_W().to_double(), wg = g.dense_W().to_double();
    CHECK(fro_diff(wf, wg) / fro(wg) <= 1e-12);
    for (size_t l = 0; l < f.W.size(); ++l) {
      std::vector<double> a = f.W[l].to_double(), b = g.W[l].to_double();
      CHECK(fro_diff(a, b) / fro(b) <= 1e-12);
    }
    CHECK(f.evaluate().train_loss == doctest::Approx(g.evaluate().train_loss).epsilon(1e-10));
  }
}

TEST_CASE("deep_mc on CUDA: fused and dense steps captured in a graph follow the op-by-op tape steps") {
  if (!cuda_available()) {
    MESSAGE("skipped the CUDA deep_mc checks: " << cuda_unavailable_reason());
    return;
  }
  Config c = small_config();
  c.log_every = 4;  // the compressed launch runs 4 iterations
  c.device = "cuda";
  Target t = make_target(c.d, c.r, c.p, c.obs_per_row, c.seed, c.dtype, Device::cuda);
  Config ct = c;
  ct.impl = Impl::tape;
  Config cd = c;  // the dense step, in three ragged row blocks
  cd.impl = Impl::dense;
  cd.block_rows = 25;
  for (int m = 0; m < 3; ++m) {
    std::unique_ptr<Model> f, g;
    if (m == 0) {
      f = std::make_unique<Original>(t, c, Device::cuda);
      g = std::make_unique<Original>(t, ct, Device::cuda);
    } else {
      f = std::make_unique<Compressed>(t, m == 1 ? c : cd, Device::cuda);
      g = std::make_unique<Compressed>(t, ct, Device::cuda);
    }
    CAPTURE(f->describe());
    StepGraph graph([&] { f->step_block(); }, Device::cuda, StepGraph::Options{true, 1, "test " + f->name()});
    int64_t n = 0;
    for (int i = 0; i < 3; ++i, n += f->block_steps()) graph.run();
    f->step();
    ++n;
    for (int64_t i = 0; i < n; ++i) g->step();
    CHECK(graph.captured());
    std::vector<double> wf = f->dense_W().to_double(), wg = g->dense_W().to_double();
    CHECK(fro_diff(wf, wg) / fro(wg) <= 1e-10);
    CHECK(f->evaluate().train_loss == doctest::Approx(g->evaluate().train_loss).epsilon(1e-9));
  }
}

TEST_CASE("deep_mc: target files round-trip; bad files are named in the error") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / fmt::format("deep_mc_test_{}", ::getpid());
  fs::create_directories(dir);
  Config c = small_config();
  c.d = 12;
  c.r = 2;
  Target t = small_target(c);
  const std::string path = (dir / "t.txt").string();
  save_target(t, path);
  Target u = load_target(path, DType::f64, Device::cpu);
  CHECK(u.d == 12);
  CHECK(u.rank == 2);
  CHECK(u.omega.nnz == t.omega.nnz);
  CHECK(u.m_csr.to_double() == t.m_csr.to_double());
  CHECK(u.m_csc.to_double() == t.m_csc.to_double());
  auto write = [&](const std::string& name, const std::string& body) {
    std::ofstream(dir / name) << body;
    return (dir / name).string();
  };
  auto err = [&](const std::string& p) {
    try {
      load_target(p, DType::f64, Device::cpu);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string missing = (dir / "missing.txt").string();
  CHECK(err(missing) == fmt::format("target file '{}': cannot open it for reading", missing));
  std::string p1 = write("h.txt", "deep_mc_tgt 1\n");
  CHECK(err(p1) == fmt::format("target file '{}': line 1: expected the header 'deep_mc_target 1'", p1));
  std::string p2 = write("row.txt", "deep_mc_target 1\nd 2\nrank 2\nU\n1 2\n3\n");
  CHECK(err(p2) == fmt::format("target file '{}': line 6: row 1 of U has 1 numbers, expected 2", p2));
  std::string p2b = write("eof.txt", "deep_mc_target 1\nd 2\nrank 1\nU\n1\n");
  CHECK(err(p2b) == fmt::format("target file '{}': line 6: unexpected end of file, expected row 1 of U", p2b));
  std::string p3 = write("idx.txt", "deep_mc_target 1\nd 2\nrank 1\nU\n1\n2\nV\n1\n2\nobserved 1\n0 2\n");
  CHECK(err(p3) == fmt::format("target file '{}': line 11: entry (0, 2) is outside [0, 2)", p3));
  std::string p4 = write("dup.txt", "deep_mc_target 1\nd 2\nrank 1\nU\n1\n2\nV\n1\nx\nobserved 1\n0 1\n");
  CHECK(err(p4) == fmt::format("target file '{}': line 9: 'x' is not a finite number", p4));
  std::string p5 = write("dup2.txt", "deep_mc_target 1\nd 2\nrank 1\nU\n1\n2\nV\n1\n2\nobserved 2\n0 1\n0 1\n");
  CHECK(err(p5) == fmt::format("target file '{}': entry (0, 1) appears more than once", p5));
  std::string p6 = write("trail.txt", "deep_mc_target 1\nd 2\nrank 1\nU\n1\n2\nV\n1\n2\nobserved 1\n0 1\n1 1\n");
  CHECK(err(p6) == fmt::format("target file '{}': line 12: unexpected content after the 1 observed entries", p6));
  // A tiny file claiming a huge d (or rank, or observed count) fails at its end of file without
  // first allocating d * rank numbers (a 40-byte file asked for 8 GB, or 2^62 bytes).
  std::string p7 = write("huge_d.txt", "deep_mc_target 1\nd 1073741824\nrank 536870912\nU\n1\n");
  CHECK(err(p7) == fmt::format("target file '{}': line 5: row 0 of U has 1 numbers, expected 536870912", p7));
  std::string p8 = write("huge_d1.txt", "deep_mc_target 1\nd 1000000000\nrank 1\nU\n1\n");
  CHECK(err(p8) == fmt::format("target file '{}': line 6: unexpected end of file, expected row 1 of U", p8));
  std::string p10 = write("huge_n.txt", "deep_mc_target 1\nd 2\nrank 1\nU\n1\n2\nV\n1\n2\nobserved 4\n0 1\n");
  CHECK(err(p10) == fmt::format("target file '{}': line 12: unexpected end of file, expected an observed entry 'i j'", p10));
  // The tool with a loaded target: r must still be < d/2.
  Config ct = small_config();
  ct.target = path;
  ct.r = 6;
  ct.iters = 0;
  CHECK_THROWS_WITH_AS(run(ct, nullptr),
                       fmt::format("--r 6 must be < d/2 = 6 (d = 12 from target file '{}')", path).c_str(),
                       std::invalid_argument);
  fs::remove_all(dir);
}

TEST_CASE("deep_mc: argument validation (the tool's bad-input exits)") {
  auto msg = [](std::vector<std::string> a) {
    try {
      parse_args(a);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(msg({"--d", "100", "--r", "50"}) == "--r 50 must be < d/2 = 50 (the compressed width 2r must stay below d)");
  CHECK(msg({"--d=10", "--r=5"}) == "--r 5 must be < d/2 = 5 (the compressed width 2r must stay below d)");
  CHECK(msg({"--p", "0"}) == "--p 0 must be in (0, 1] (the observed fraction)");
  CHECK(msg({"--p", "1.5"}) == "--p 1.5 must be in (0, 1] (the observed fraction)");
  CHECK(msg({"--p", "-0.1"}) == "--p -0.1 must be in (0, 1] (the observed fraction)");
  CHECK(msg({"--L", "1"}) == "--L 1 must be >= 2 (a deep factorization has at least two factors)");
  CHECK(msg({"--lr", "nan"}) == "--lr nan must be a positive finite number");
  CHECK(msg({"--eps", "0"}) == "--eps 0 must be a positive finite number");
  CHECK(msg({"--d", "ten"}) == "--d: 'ten' is not an integer");
  CHECK(msg({"--method", "wide"}) == "--method: 'wide' must be original, compressed or both");
  CHECK(msg({"--dtype", "bf16"}) == "--dtype: 'bf16' must be f64 or f32");
  CHECK(msg({"--graph", "maybe"}) == "--graph: 'maybe' must be on or off");
  CHECK(msg({"--bogus", "1"}) == "unknown flag --bogus (see --help)");
  CHECK(msg({"--iters"}) == "--iters needs a value");
  CHECK(msg({"stray"}) == "unexpected argument 'stray' (flags start with --; see --help)");
  CHECK(msg({"--log-every", "0"}) == "--log-every 0 must be >= 1");
  CHECK(msg({"--impl", "sparse"}) == "--impl: 'sparse' must be auto, fused, dense or tape");
  CHECK(msg({"--block-rows", "-1"}) == "--block-rows -1 must be >= 0 (0: automatic)");
  CHECK(parse_args({}).impl == Impl::automatic);
  CHECK(parse_args({"--impl", "dense", "--block-rows", "64"}).block_rows == 64);
  Config ok = parse_args({"--d", "60", "--r", "3", "--p=0.3", "--L", "3", "--lr", "150", "--method", "compressed",
                          "--dtype", "f32", "--device", "cpu", "--graph", "off", "--log-every", "10", "--impl", "tape"});
  CHECK(ok.d == 60);
  CHECK(ok.p == 0.3);
  CHECK(ok.method == Method::compressed);
  CHECK(ok.dtype == DType::f32);
  CHECK_FALSE(ok.graph);
  CHECK(ok.impl == Impl::tape);
  CHECK(parse_args({"--lr", "auto"}).lr_auto);
  CHECK(auto_lr(1000, 0.2) == doctest::Approx(5e3));
}

TEST_CASE("deep_mc: a diverging step size ends the run with Diverged") {
  Config c = small_config();
  c.d = 20;
  c.r = 2;
  c.lr = 1e7;
  c.iters = 400;
  c.log_every = 100;
  c.eps = 0.3;
  for (Method m : {Method::original, Method::compressed}) {
    c.method = m;
    CHECK_THROWS_AS(run(c, nullptr), Diverged);
  }
  // A sane run returns its summary (both methods, same iterations).
  Config ok = small_config();
  ok.d = 20;
  ok.r = 2;
  ok.iters = 200;
  ok.log_every = 50;
  std::vector<RunResult> res = run(ok, nullptr);
  REQUIRE(res.size() == 2);
  CHECK(res[0].method == "original");
  CHECK(res[1].method == "compressed");
  CHECK(res[0].iters == 200);
  CHECK(res[1].iters == 200);
}
