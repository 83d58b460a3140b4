// Sparse patterns (CSR + CSC of the same nonzero positions) and the differentiable ops of matrix
// completion built on them: sampled dense-dense products, sparse-dense products, (masked) squared
// errors; plus the plain SGD step the deep matrix-completion experiments train with.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/common.h"
#include "runtime/tape.h"
#include "runtime/tensor.h"

namespace deeplora {

// The positions of the nonzeros of a rows x cols sparse matrix, in two orders. Values that live on a
// pattern are stored in CSR order (entries sorted by (row, col)); csc_to_csr maps the k-th entry of
// the CSC order (sorted by (col, row)) to its CSR position. Indices are i32 (nnz < 2^31). All index
// tensors live on one device; the host copies (h_*) are kept for validation and tests.
struct SparsePattern {
  int64_t rows = 0, cols = 0, nnz = 0;
  Tensor row_ptr;     // i32 [rows + 1]
  Tensor col_idx;     // i32 [nnz], CSR order
  Tensor row_idx;     // i32 [nnz], CSR order: the row of each entry (entry-parallel kernels)
  Tensor col_ptr;     // i32 [cols + 1]
  Tensor csc_row;     // i32 [nnz], CSC order: the row of each entry
  Tensor csc_to_csr;  // i32 [nnz]
  std::vector<int32_t> h_row_ptr, h_col_idx;  // host CSR

  bool defined() const { return row_ptr.defined(); }
  Device device() const { return row_ptr.device(); }
  // From (row, col) pairs in any order. Throws std::invalid_argument naming `what` on an index out
  // of range, a duplicate pair, mismatched lengths, or nnz >= 2^31.
  static SparsePattern from_pairs(int64_t rows, int64_t cols, const std::vector<int32_t>& r,
                                  const std::vector<int32_t>& c, Device dev, const std::string& what = "pattern");
  SparsePattern to(Device dev) const;
  // CSR-ordered host values -> CSC order, and the device tensor of it.
  std::vector<double> csr_to_csc(const std::vector<double>& v) const;
  Tensor csc_values(const Tensor& vals_csr) const;
};

namespace ops {

// out[e] = Σ_c P[i_e, c]·Q[j_e, c]: the entries of P·Qᵀ at the pattern, in CSR order.
// P [rows, k], Q [cols, k] -> [nnz]. Backward: dP += S·Q (one owner per row, CSR), dQ += Sᵀ·P (one
// owner per column, CSC), S the sparse matrix carrying d(out) on the pattern.
Tensor sampled_dot(const Tensor& P, const Tensor& Q, const SparsePattern& pat);

// out[e] = X[i_e, j_e]: the entries of a dense X [rows, cols] at the pattern, in CSR order.
// Backward scatters d(out) back to those positions (each has one owner: no atomics).
Tensor at_pattern(const Tensor& X, const SparsePattern& pat);

// Y = S·X (or Sᵀ·X when transpose), S = the pattern carrying vals [nnz] (CSR order), X [cols, k]
// (or [rows, k]). Backward: dvals += sampled products of dY and X, dX += Sᵀ·dY (or S·dY).
Tensor spmm(const SparsePattern& pat, const Tensor& vals, const Tensor& X, bool transpose = false);

// ½·alpha·Σ_i w_i·(x_i − t_i)² over all elements (w = mask, optional, same shape) -> one element of
// x's dtype. Gradients flow to x and t (mask gets none).
Tensor sq_error(const Tensor& x, const Tensor& target, double alpha, const Tensor& mask = Tensor());

}  // namespace ops

// Plain gradient descent: p -= lr_i·grad(p_i), then the gradient is zeroed in place (its buffer is
// kept, so a captured step keeps its addresses). One launch per group of 8 tensors. Throws naming
// the tensor if one has no gradient or the lists differ in length.
void sgd_step(const std::vector<Tensor>& params, const std::vector<double>& lrs);

// Not on the tape, for hand-fused steps: Y[i_e, j_e] = alpha·(X[i_e, j_e] − vals[e]) at the pattern's
// entries, X and Y dense [rows, cols] (Y's other entries untouched: the gradient of ½·alpha·Σ (X − vals)²
// when Y is zero off the pattern), on stream s (nullptr: the device's). Throws naming the tensor.
void pattern_residual_into(const SparsePattern& pat, const Tensor& X, const Tensor& vals, double alpha,
                           const Tensor& Y, cudaStream_t s = nullptr);
// out (one f64 element) = Σ over the entries NOT in the pattern of (X1_i·Y1_j − X2_i·Y2_j)², exact
// (O(rows·cols·(k1 + k2))): the recovery error's sum for W = X1·Y1ᵀ against M = X2·Y2ᵀ.
void lowrank_unobserved_sq_sum(const SparsePattern& pat, const Tensor& X1, const Tensor& Y1, const Tensor& X2,
                               const Tensor& Y2, const Tensor& out);

// `steps` fused compressed-factorization GD iterations (kernels::lowrank_step, not on the tape) over
// `pat`: updates A [rows, k], B [cols, k] and every K_l [k, k] in place and writes the loss of the
// last iteration's input iterate (one element). A_tmp, B_tmp: scratch of A's and B's shapes;
// vals_csr / vals_csc: the targets at the pattern in CSR / CSC order; work: at least
// kernels::lowrank_step_workspace_bytes(k) bytes of device memory. Throws std::invalid_argument
// naming the tensor on mismatched shapes, dtypes or devices.
void lowrank_step(const SparsePattern& pat, const Tensor& vals_csr, const Tensor& vals_csc, const Tensor& A,
                  const Tensor& B, const Tensor& A_tmp, const Tensor& B_tmp, const std::vector<Tensor>& K,
                  double alpha, double lr_inner, double lr_outer, const Tensor& loss, const Tensor& work,
                  int64_t steps = 1);

}  // namespace deeplora
