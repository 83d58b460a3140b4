// Deep matrix completion (../shared/DEEP_LORA.md, last section): a rank-r d x d target, a set of
// observed entries, and two L-layer deep factorizations trained on them by plain gradient descent:
//   original    W = W_L ⋯ W_1, W_l ∈ R^{d×d}, W_l(0) = ε·O_l (random orthogonal);
//   compressed  W = A·K_L ⋯ K_1·Bᵀ, A, B ∈ R^{d×2r}, K_l = ε·I_{2r}, from the SVD of ∂f/∂W at t = 0.
// Loss f = ½·(1/d²)·Σ_{Ω} (W − M)²; recovery error = ½·mean over the unobserved entries of (W − M)².
// Also the tool's configuration, validation and training loop (tools/deep_mc.cpp is a thin main).
#pragma once
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/device.h"
#include "runtime/lowrank_dense.h"
#include "runtime/ops_sparse.h"
#include "runtime/tensor.h"

namespace deeplora::deep_mc {

enum class Method { original, compressed, both };
// The compressed step: automatic (the cost model below picks fused or dense), the sampled persistent
// kernel (fused), the dense-GEMM step (runtime/lowrank_dense.h), or op by op through the tape. The
// original model runs its fused step for every choice but tape.
enum class Impl { automatic, fused, dense, tape };
enum class InitMode { automatic, exact, implicit };

struct Config {
  int64_t d = 1000, r = 5;
  double p = 0.2;
  int64_t obs_per_row = 0;  // > 0: every row observes exactly this many columns (then p = obs_per_row / d)
  int64_t L = 3;
  double eps = 1e-3, lr = 5e3, gamma = 0.01;
  // --lr auto: η = 5e3·(d/1000)^{4/3}·(0.2/p), the authors' step at d = 1000, p = 0.2 carried to other
  // sizes at the same curvature η·p·σ(M)^{4/3}/d² (σ(M) ≈ 2·sqrt(d) for the generated target).
  bool lr_auto = false;
  int64_t iters = 20000;
  double tol = 0.0;  // stop once the recovery error is <= tol (checked at log points); 0: run all iterations
  uint64_t seed = 0;
  Method method = Method::both;
  DType dtype = DType::f64;
  std::string device = "auto";  // cpu | cuda | auto
  bool graph = true;
  int64_t log_every = 1000;
  std::string csv;     // trajectory CSV (method, iter, train_loss, recovery, elapsed_s)
  std::string target;  // target file (format: see load_target); empty: generated from the seed
  std::string save_target;  // write the target used to this file
  Impl impl = Impl::automatic;
  int64_t block_rows = 0;  // dense step: rows of the residual formed at once (0: automatic, ~16 MiB)
  InitMode init = InitMode::automatic;  // automatic: exact for d <= 4096, implicit above
  int64_t eval_sample = -1;  // recovery error: -1 automatic (exact for d <= 20000, else 10^6 samples), 0 exact, N samples
  int64_t svd_iters = 8;     // power iterations of the randomized sparse SVD (implicit init)
  bool quiet = false;
};

// Flags (see usage()); "--name value" or "--name=value". Throws std::invalid_argument naming the flag.
Config parse_args(const std::vector<std::string>& args);
// Checks every field (r < d/2, 0 < p <= 1, L >= 2, positive finite ε and η, ...); throws
// std::invalid_argument with a one-line message naming the flag. Called by parse_args and run.
void validate(const Config& c);
std::string usage();
Device resolve_device(const std::string& name);  // "auto": cuda when available
double auto_lr(int64_t d, double p);

// A training run whose loss stopped being finite.
struct Diverged : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- the target -----------------------------------------------------------------------------------

// M = U·Vᵀ (d x d, rank `rank`) and the observed set Ω, with M's values at Ω in both orders.
struct Target {
  int64_t d = 0, rank = 0;
  Tensor U, V;          // [d, rank], the run's dtype and device
  SparsePattern omega;  // on the device
  Tensor m_csr, m_csc;  // [nnz]
  std::string source;
  double p() const { return double(omega.nnz) / (double(d) * double(d)); }
};

// Generator (documented so that runs can be reproduced elsewhere):
//   U = sqrt(s)·Q(Tensor::randn({d, r}, seed_of(seed, 1), f64)), V likewise with seed_of(seed, 2),
//     Q(·) = linalg::orthonormalize (thin QR, diag(R) >= 0), s = 2·sqrt(d): M = U Vᵀ has r equal
//     singular values 2·sqrt(d), like the peer's top-r part of a d x d Gaussian (whose top singular
//     values all sit near the edge 2·sqrt(d)), so the authors' step size η = 5e3 applies unchanged
//     at d = 1000 and the r components are learned together.
//   Ω: row i draws from its own stream s_i = rng::bits(seed_of(seed, 3), i): Bernoulli(p) per entry
//     by geometric gaps (gap = floor(ln u / ln(1 − p)), u = rng::u01_open(s_i, c), c = 0, 1, ...), or
//     with obs_per_row > 0 exactly that many distinct columns (Floyd's sampling, u = rng::u01(s_i, c)).
//   seed_of(seed, k) = rng::bits(seed, k): splitmix64 output k of the user seed.
Target make_target(int64_t d, int64_t r, double p, int64_t obs_per_row, uint64_t seed, DType dt, Device dev);

// Text format, one record per line, '#' comments and blank lines ignored:
//   deep_mc_target 1
//   d <d>
//   rank <k>
//   U                      followed by d lines of k numbers
//   V                      followed by d lines of k numbers
//   observed <n>           followed by n lines "i j" (0-based, distinct)
// M = U Vᵀ. Throws std::invalid_argument naming the file and line on any error.
Target load_target(const std::string& path, DType dt, Device dev);
void save_target(const Target& t, const std::string& path);

uint64_t seed_of(uint64_t seed, uint64_t k);

// ---- the cost model of the compressed step ---------------------------------------------------------

// Estimated microseconds per iteration of the compressed step on the H200 (f64; f32 scaled), from the
// measured grid in NOTES.md ("Deep MC at every shape"): the sampled kernel costs per observed entry
// and width, the dense step per d² entry and width plus its launches. `fused_ok`: the fused kernel
// supports (dtype, k, L) (kernels::lowrank_step_supported).
struct StepCost {
  double fused_us = 0, dense_us = 0;
  bool fused_ok = false, dense_ok = false;
  Impl pick = Impl::tape;  // the cheaper supported one (tape when neither is)
};
StepCost step_cost(Device dev, DType dt, int64_t d, int64_t nnz, int64_t k, int64_t r, int64_t L, int64_t block_rows);
const char* impl_name(Impl i);

// ---- the models ------------------------------------------------------------------------------------

struct Metrics {
  double train_loss = 0.0, recovery = 0.0;
  bool recovery_estimated = false;  // on a fixed random sample of unobserved entries
};

class Model {
 public:
  virtual ~Model() = default;
  virtual std::string name() const = 0;
  // One gradient-descent iteration; no host sync, same allocations every call: capturable.
  virtual void step() = 0;
  // The unit a graph captures: block_steps() iterations.
  virtual int block_steps() const { return 1; }
  virtual void step_block() { step(); }
  // Train loss and recovery error of the current iterate into device scalars (capturable), and
  // their host read-out (synchronizes).
  virtual void evaluate_async() = 0;
  virtual Metrics read_metrics() const = 0;
  Metrics evaluate() {
    evaluate_async();
    return read_metrics();
  }
  virtual Tensor dense_W() const = 0;  // the d x d product (tests, small d)
  virtual int64_t n_params() const = 0;
  virtual std::string describe() const { return name(); }
};

// Fused step (every Impl but tape, which runs forward, tape backward and sgd_step): with
// prefixes P_l = W_l⋯W_1 and H_L = G = ∂f/∂W (nonzero only at Ω, written there in place),
// H_{l-1} = W_lᵀH_l, every update is one GEMM with the old weight as addend and the next iterate as
// output, W'_l = W_l − η·H_l·P_{l-1}ᵀ (W'_1 = W_1 − η·W_2ᵀH_2): no gradient buffers, no zero fills,
// no separate update pass. The updates W'_L..W'_2 run on a side stream beside the H chain (each
// waits for its H_l), so two products share the GPU where one alone leaves SMs idle.
class Original : public Model {
 public:
  Original(const Target& t, const Config& c, Device dev);
  ~Original() override;
  std::string name() const override { return "original"; }
  void step() override;
  // Fused: two iterations, W -> W' -> W (the ping-pong pair a graph captures).
  int block_steps() const override { return fused_ ? 2 : 1; }
  void step_block() override;
  void evaluate_async() override;
  Metrics read_metrics() const override;
  Tensor dense_W() const override;
  int64_t n_params() const override;
  std::string describe() const override;

  std::vector<Tensor> W;  // W_1 .. W_L

 private:
  Tensor product() const;
  void fused_step(const std::vector<Tensor>& from, const std::vector<Tensor>& to);
  Device dev_;
  Tensor M_, unmask_;  // dense d x d for the recovery error (the original model is d x d anyway)
  SparsePattern omega_;
  Tensor m_csr_;
  double alpha_ = 0, lr_ = 0, n_unobs_ = 0;
  Tensor train_out_, rec_out_;
  bool fused_ = false;
  std::vector<Tensor> Wn_, P_, H_;  // fused: next iterate, prefixes P_2..P_L, H_{L-1}..H_2 (H_L = G_)
  Tensor G_, ws_;                   // fused: ∂f/∂W (zero off Ω), the side stream's GEMM workspace
  std::unique_ptr<SideStream> side_;
};

class Compressed : public Model {
 public:
  Compressed(const Target& t, const Config& c, Device dev);
  std::string name() const override { return "compressed"; }
  void step() override;
  // Fused: one launch runs block_steps() iterations (a divisor of the log interval, at most 250);
  // dense: block_steps() iterations per call (a divisor of the log interval, at most 50).
  int block_steps() const override { return fused_ || dense_ ? block_ : 1; }
  void step_block() override;
  void evaluate_async() override;
  Metrics read_metrics() const override;
  Tensor dense_W() const override;
  int64_t n_params() const override;
  std::string describe() const override;

  Tensor A, B;            // [d, 2r]
  std::vector<Tensor> K;  // K_1 .. K_L, [2r, 2r]
  // From the initialization: the top-r singular vectors of the gradient at t = 0.
  Tensor Ur, Vr;
  Impl impl() const { return impl_; }
  const StepCost& cost() const { return cost_; }
  bool used_exact_init = false;
  int64_t n_completed = 0;  // basis columns completed at random (rank-deficient [V_r, OᵀU_r])

 private:
  void init_exact(const Target& t, const Config& c);
  void init_implicit(const Target& t, const Config& c);
  void fused_steps(int64_t n);
  void dense_steps(int64_t n);
  Tensor kprod() const;  // K_L ⋯ K_1

  Device dev_;
  DType dt_;
  int64_t d_ = 0, k_ = 0;
  double alpha_ = 0, lr_ = 0, gamma_ = 0;
  bool fused_ = false;
  Impl impl_ = Impl::tape;  // what runs: fused, dense or tape
  StepCost cost_;
  int block_ = 1;
  std::unique_ptr<LowrankDenseStep> dense_;
  SparsePattern omega_;
  Tensor m_csr_, m_csc_, U_, V_;
  Tensor A2_, B2_, work_, loss_out_;  // fused: scratch of A and B, workspace, loss of the last step
  double n_unobs_ = 0;
  bool eval_sampled_ = false;
  SparsePattern sample_;
  Tensor m_sample_;
  Tensor train_out_, rec_out_;
};

// The original's factor inits O_l = linalg::random_orthonormal(d, d, seed_of(seed, 100 + l)).
Tensor orthogonal_init(int64_t d, int64_t l, uint64_t seed, DType dt, Device dev);

// ---- the tool ----------------------------------------------------------------------------------------

struct RunResult {
  std::string method, impl;
  int64_t iters = 0;
  double train_loss = 0, recovery = 0, seconds = 0, init_seconds = 0;
  bool recovery_estimated = false, reached_tol = false;
  int64_t n_params = 0;
};

// The whole tool: builds or loads the target, trains the selected method(s), logs every log_every
// iterations to `out` (and the CSV), and ends with one JSON summary line. Throws
// std::invalid_argument on bad input, Diverged when a loss stops being finite.
std::vector<RunResult> run(const Config& c, std::FILE* out);

}  // namespace deeplora::deep_mc
