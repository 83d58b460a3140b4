// Dense linear algebra for the compressed Deep LoRA initialization and compressed deep matrix
// completion: top-k SVD, QR-based orthonormalization, random orthonormal matrices. cuSOLVER on the
// GPU (linalg_cuda.cpp), a float64 reference on the CPU (linalg.cpp).
//
// All matrices are 2-D row-major Tensors of f32 or f64; results come back on the input's device and
// in its dtype. The CPU path always computes in f64 (one-sided Jacobi SVD after a Householder QR,
// Householder QR), whatever the input dtype.
#pragma once
#include <cstdint>
#include <vector>

#include "runtime/tensor.h"

namespace deeplora::linalg {

// A = U diag(S) Vᵀ restricted to the top k singular triplets.
// U [m, k], S [k] (descending, >= 0), V [n, k]; U and V have orthonormal columns.
// Sign convention (same on CPU and GPU): the entry of largest magnitude in each column of U is
// positive; the matching column of V is flipped with it. Columns whose singular value is zero to
// working precision are completed to an orthonormal set (random directions, fixed seed), so U and V
// stay orthonormal for rank-deficient A. GPU accuracy: top singular values and vectors to ~1e-13
// (f64) / ~1e-7 (f32) relative to S[0]; singular values that should be zero come out at up to
// ~sqrt(eps) * S[0], since the GPU solver works on AᵀA.
struct Svd {
  Tensor U, S, V;
};

// Top-k singular triplets of A [m, n], 1 <= k <= min(m, n). Throws std::invalid_argument on bad
// shapes, dtypes or non-finite entries; std::runtime_error if the solver fails.
Svd svd_topk(const Tensor& A, int64_t k);

// svd_topk for each matrix (all on one device; shapes and dtypes may differ). On the GPU, matrices
// of the same shape and dtype go through one gesvdaStridedBatched call (see linalg_cuda.cpp for
// why); on the CPU they are solved one by one.
std::vector<Svd> svd_topk_batched(const std::vector<Tensor>& As, int64_t k);

// Q [m, k] of the thin QR of A [m, k] (m >= k), signs fixed so that diag(R) >= 0 (Q is then unique
// for full-rank A). Rank deficiency: a column whose R_jj is negligible, |R_jj| <= tol * max_i |R_ii|,
// is left out of the factorization (the QR is redone without it, so span(A) stays inside span(Q))
// and its place in Q gets a random unit direction orthogonal to all other columns (fixed seed).
// The number of such columns goes to *n_completed when given. tol < 0 picks 1000 * (machine
// epsilon of A's dtype).
Tensor orthonormalize(const Tensor& A, int64_t* n_completed = nullptr, double tol = -1.0);

// m x n with orthonormal rows (m <= n) or orthonormal columns (m > n): the Q factor of the QR of the
// Gaussian Tensor::randn({m, n}, seed, dt, dev) (of its transpose when m <= n), signs fixed by
// diag(R) >= 0. Since randn gives the same numbers on every device, CPU and GPU agree to rounding.
Tensor random_orthonormal(int64_t m, int64_t n, uint64_t seed, DType dt, Device dev = Device::cpu);

// Internal: shared by the CPU and CUDA paths. Not part of the public API.
namespace detail {
// Checks that A is a defined 2-D f32/f64 tensor with finite entries (finiteness on CPU tensors only;
// the CUDA path checks on the device). Throws std::invalid_argument naming `op` and A's shape.
void check_matrix(const Tensor& A, const char* op);
// Host f64 column-major buffers U (m x k), V (n x k), S (k, descending): re-orthogonalize and, if
// needed, complete the columns whose singular value is negligible (<= rel_tol * S[0]), then apply
// the sign convention above.
void finish_svd(std::vector<double>& U, std::vector<double>& S, std::vector<double>& V, int64_t m,
                int64_t n, int64_t k, double rel_tol);
// Host f64 column-major Q (m x k) with orthonormal columns except those flagged in bad[]: replace
// each flagged column by a seeded random unit vector orthogonal to every other column.
void complete_columns(std::vector<double>& Q, int64_t m, int64_t k, const std::vector<bool>& bad,
                      uint64_t seed);
// orthonormalize's rank test on diag(R): index of the first |d_j| <= tol * max|d|, d.size() when
// all of d is zero, -1 when none.
int64_t first_negligible(const std::vector<double>& d, double tol);
// Host f64 column-major m x k: the thin Q of the kept columns (m x good.size()) placed at the
// positions `good`, the other columns completed (complete_columns).
std::vector<double> place_columns(const std::vector<double>& Qg, const std::vector<int64_t>& good, int64_t m, int64_t k);
double dtype_eps(DType dt);
// Column-major host f64 m x n -> row-major Tensor [m, n] of dt on dev.
Tensor colmajor_to_tensor(const std::vector<double>& x, int64_t m, int64_t n, DType dt, Device dev);

#ifdef DEEPLORA_HAVE_CUDA
Svd svd_topk_cuda(const Tensor& A, int64_t k);
std::vector<Svd> svd_topk_batched_cuda(const std::vector<Tensor>& As, int64_t k);
Tensor orthonormalize_cuda(const Tensor& A, int64_t* n_completed, double tol);
Tensor random_orthonormal_cuda(int64_t m, int64_t n, uint64_t seed, DType dt);
#endif
}  // namespace detail

}  // namespace deeplora::linalg
