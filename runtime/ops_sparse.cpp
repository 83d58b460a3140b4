// Sparse patterns and the completion ops: validation, kernel dispatch, backward closures.
#include "runtime/ops_sparse.h"

#include <fmt/format.h>

#include <algorithm>
#include <limits>
#include <stdexcept>

#include "runtime/dispatch.h"
#include "kernels/sparse.h"
#include "runtime/op_checks.h"

namespace deeplora {
namespace {

#define DL_SK(dev, fn, ...) DEEPLORA_DISPATCH(dev, fn, __VA_ARGS__)

using ops::detail::wants;

void check_float(const char* op, const Tensor& t, const char* what) {
  check(t.defined(), op, fmt::format("{} is undefined", what));
  check(t.dtype() == DType::f32 || t.dtype() == DType::f64, op,
        fmt::format("{} {} must be f32 or f64", what, t.desc()));
}

void check_pattern(const char* op, const SparsePattern& pat, Device dev) {
  check(pat.defined(), op, "the sparse pattern is empty (not built)");
  check(pat.device() == dev, op,
        fmt::format("the pattern is on {} but the tensors on {}", device_name(pat.device()), device_name(dev)));
}

const int32_t* i32(const Tensor& t) { return t.data_as<int32_t>(); }

}  // namespace

// ---- SparsePattern ------------------------------------------------------------------------------

SparsePattern SparsePattern::from_pairs(int64_t rows, int64_t cols, const std::vector<int32_t>& r,
                                        const std::vector<int32_t>& c, Device dev, const std::string& what) {
  if (r.size() != c.size())
    throw std::invalid_argument(fmt::format("{}: {} row indices but {} column indices", what, r.size(), c.size()));
  if (rows < 0 || cols < 0 || rows >= std::numeric_limits<int32_t>::max() || cols >= std::numeric_limits<int32_t>::max())
    throw std::invalid_argument(fmt::format("{}: bad shape {} x {}", what, rows, cols));
  if (r.size() >= size_t(std::numeric_limits<int32_t>::max()))
    throw std::invalid_argument(fmt::format("{}: {} entries, at most 2^31 - 2 supported", what, r.size()));
  const int64_t nnz = int64_t(r.size());
  for (int64_t e = 0; e < nnz; ++e)
    if (r[size_t(e)] < 0 || r[size_t(e)] >= rows || c[size_t(e)] < 0 || c[size_t(e)] >= cols)
      throw std::invalid_argument(fmt::format("{}: entry {} at ({}, {}) is outside the {} x {} matrix", what, e,
                                              r[size_t(e)], c[size_t(e)], rows, cols));
  SparsePattern p;
  p.rows = rows;
  p.cols = cols;
  p.nnz = nnz;
  // CSR by a counting sort on rows, then columns sorted within each row.
  std::vector<int32_t> rp(static_cast<size_t>(rows) + 1, 0), ci(static_cast<size_t>(nnz)), ri(static_cast<size_t>(nnz));
  for (int32_t v : r) ++rp[size_t(v) + 1];
  for (int64_t i = 0; i < rows; ++i) rp[size_t(i) + 1] += rp[size_t(i)];
  std::vector<int32_t> fill(rp.begin(), rp.end() - 1);
  for (int64_t e = 0; e < nnz; ++e) ci[size_t(fill[size_t(r[size_t(e)])]++)] = c[size_t(e)];
  for (int64_t i = 0; i < rows; ++i) {
    std::sort(ci.begin() + rp[size_t(i)], ci.begin() + rp[size_t(i) + 1]);
    for (int32_t e = rp[size_t(i)]; e < rp[size_t(i) + 1]; ++e) {
      ri[size_t(e)] = int32_t(i);
      if (e > rp[size_t(i)] && ci[size_t(e)] == ci[size_t(e) - 1])
        throw std::invalid_argument(fmt::format("{}: entry ({}, {}) appears more than once", what, i, ci[size_t(e)]));
    }
  }
  // CSC: walking CSR in order keeps rows ascending within each column.
  std::vector<int32_t> cp(static_cast<size_t>(cols) + 1, 0), cr(static_cast<size_t>(nnz)), perm(static_cast<size_t>(nnz));
  for (int32_t v : ci) ++cp[size_t(v) + 1];
  for (int64_t j = 0; j < cols; ++j) cp[size_t(j) + 1] += cp[size_t(j)];
  std::vector<int32_t> cf(cp.begin(), cp.end() - 1);
  for (int64_t e = 0; e < nnz; ++e) {
    const int32_t k = cf[size_t(ci[size_t(e)])]++;
    cr[size_t(k)] = ri[size_t(e)];
    perm[size_t(k)] = int32_t(e);
  }
  p.row_ptr = Tensor::from_ints(rp, Shape{rows + 1}, dev);
  p.col_idx = Tensor::from_ints(ci, Shape{nnz}, dev);
  p.row_idx = Tensor::from_ints(ri, Shape{nnz}, dev);
  p.col_ptr = Tensor::from_ints(cp, Shape{cols + 1}, dev);
  p.csc_row = Tensor::from_ints(cr, Shape{nnz}, dev);
  p.csc_to_csr = Tensor::from_ints(perm, Shape{nnz}, dev);
  p.h_row_ptr = std::move(rp);
  p.h_col_idx = std::move(ci);
  return p;
}

SparsePattern SparsePattern::to(Device dev) const {
  if (!defined() || dev == device()) return *this;
  SparsePattern p = *this;
  for (Tensor* t : {&p.row_ptr, &p.col_idx, &p.row_idx, &p.col_ptr, &p.csc_row, &p.csc_to_csr}) *t = t->to(dev);
  return p;
}

std::vector<double> SparsePattern::csr_to_csc(const std::vector<double>& v) const {
  check(int64_t(v.size()) == nnz, "SparsePattern::csr_to_csc", fmt::format("{} values for {} entries", v.size(), nnz));
  std::vector<int32_t> perm = csc_to_csr.to_int();
  std::vector<double> out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = v[size_t(perm[k])];
  return out;
}

Tensor SparsePattern::csc_values(const Tensor& vals_csr) const {
  check(vals_csr.defined() && vals_csr.numel() == nnz, "SparsePattern::csc_values",
        fmt::format("{} does not hold the {} values of the pattern", vals_csr.desc(), nnz));
  return Tensor::from_vector(csr_to_csc(vals_csr.to_double()), vals_csr.shape(), vals_csr.dtype(), vals_csr.device());
}

// ---- ops ----------------------------------------------------------------------------------------

namespace ops {

Tensor sampled_dot(const Tensor& P, const Tensor& Q, const SparsePattern& pat) {
  const char* op = "sampled_dot";
  check_float(op, P, "P");
  check_float(op, Q, "Q");
  check(P.device() == Q.device() && P.dtype() == Q.dtype(), op,
        fmt::format("P {} and Q {} must share dtype and device", P.desc(), Q.desc()));
  check_pattern(op, pat, P.device());
  check(P.ndim() == 2 && Q.ndim() == 2 && P.dim(0) == pat.rows && Q.dim(0) == pat.cols && P.dim(1) == Q.dim(1), op,
        fmt::format("P {} and Q {} must be [{}, k] and [{}, k] for a {} x {} pattern", P.desc(), Q.desc(), pat.rows,
                    pat.cols, pat.rows, pat.cols));
  const Device d = P.device();
  const int64_t k = P.dim(1);
  Tensor y = Tensor::empty(Shape{pat.nnz}, P.dtype(), d);
  if (k == 0) y.fill(0.0);
  else DL_SK(d, sampled_dot, P.dtype(), i32(pat.row_idx), i32(pat.col_idx), pat.nnz, P.data(), Q.data(), k, y.data(),
             false, stream_for(d));
  if (needs_grad({&P, &Q})) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [P, Q, pat, yi, d, k] {
      Tensor gy(yi->grad);
      if (wants(P))
        DL_SK(d, spmm_acc, P.dtype(), i32(pat.row_ptr), i32(pat.col_idx), nullptr, gy.data(), pat.rows, Q.data(), k,
              grad_buffer(P).data(), 1.0, stream_for(d));
      if (wants(Q))
        DL_SK(d, spmm_acc, Q.dtype(), i32(pat.col_ptr), i32(pat.csc_row), i32(pat.csc_to_csr), gy.data(), pat.cols,
              P.data(), k, grad_buffer(Q).data(), 1.0, stream_for(d));
    });
  }
  return y;
}

Tensor at_pattern(const Tensor& X, const SparsePattern& pat) {
  const char* op = "at_pattern";
  check_float(op, X, "X");
  check_pattern(op, pat, X.device());
  check(X.ndim() == 2 && X.dim(0) == pat.rows && X.dim(1) == pat.cols, op,
        fmt::format("X {} must be [{}, {}] like the pattern", X.desc(), pat.rows, pat.cols));
  const Device d = X.device();
  Tensor y = Tensor::empty(Shape{pat.nnz}, X.dtype(), d);
  DL_SK(d, gather_pattern, X.dtype(), i32(pat.row_idx), i32(pat.col_idx), pat.nnz, X.data(), pat.cols, y.data(),
        stream_for(d));
  if (needs_grad({&X})) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [X, pat, yi, d] {
      DL_SK(d, scatter_pattern_acc, X.dtype(), i32(pat.row_idx), i32(pat.col_idx), pat.nnz, Tensor(yi->grad).data(),
            pat.cols, grad_buffer(X).data(), stream_for(d));
    });
  }
  return y;
}

Tensor spmm(const SparsePattern& pat, const Tensor& vals, const Tensor& X, bool transpose) {
  const char* op = "spmm";
  check_float(op, vals, "vals");
  check_float(op, X, "X");
  check(vals.device() == X.device() && vals.dtype() == X.dtype(), op,
        fmt::format("vals {} and X {} must share dtype and device", vals.desc(), X.desc()));
  check_pattern(op, pat, X.device());
  check(vals.numel() == pat.nnz, op, fmt::format("vals {} must hold the pattern's {} entries", vals.desc(), pat.nnz));
  const int64_t in_rows = transpose ? pat.rows : pat.cols, out_rows = transpose ? pat.cols : pat.rows;
  check(X.ndim() == 2 && X.dim(0) == in_rows, op,
        fmt::format("X {} must be [{}, k] for {}a {} x {} pattern", X.desc(), in_rows, transpose ? "the transpose of " : "",
                    pat.rows, pat.cols));
  const Device d = X.device();
  const int64_t k = X.dim(1);
  Tensor y = Tensor::zeros(Shape{out_rows, k}, X.dtype(), d);
  if (!transpose)
    DL_SK(d, spmm_acc, X.dtype(), i32(pat.row_ptr), i32(pat.col_idx), nullptr, vals.data(), out_rows, X.data(), k,
          y.data(), 1.0, stream_for(d));
  else
    DL_SK(d, spmm_acc, X.dtype(), i32(pat.col_ptr), i32(pat.csc_row), i32(pat.csc_to_csr), vals.data(), out_rows,
          X.data(), k, y.data(), 1.0, stream_for(d));
  if (needs_grad({&vals, &X})) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [pat, vals, X, yi, d, k, transpose] {
      Tensor gy(yi->grad);
      if (wants(vals) && k > 0) {
        // Y = S X: dS_e = dY[i_e]·X[j_e];  Y = Sᵀ X: dS_e = X[i_e]·dY[j_e].
        const void* P = transpose ? X.data() : gy.data();
        const void* Q = transpose ? gy.data() : X.data();
        DL_SK(d, sampled_dot, vals.dtype(), i32(pat.row_idx), i32(pat.col_idx), pat.nnz, P, Q, k,
              grad_buffer(vals).data(), true, stream_for(d));
      }
      if (wants(X)) {
        if (!transpose)
          DL_SK(d, spmm_acc, X.dtype(), i32(pat.col_ptr), i32(pat.csc_row), i32(pat.csc_to_csr), vals.data(), pat.cols,
                gy.data(), k, grad_buffer(X).data(), 1.0, stream_for(d));
        else
          DL_SK(d, spmm_acc, X.dtype(), i32(pat.row_ptr), i32(pat.col_idx), nullptr, vals.data(), pat.rows, gy.data(),
                k, grad_buffer(X).data(), 1.0, stream_for(d));
      }
    });
  }
  return y;
}

Tensor sq_error(const Tensor& x, const Tensor& target, double alpha, const Tensor& mask) {
  const char* op = "sq_error";
  check_float(op, x, "x");
  check_float(op, target, "target");
  check(x.device() == target.device() && x.dtype() == target.dtype() && x.shape() == target.shape(), op,
        fmt::format("x {} and target {} must share shape, dtype and device", x.desc(), target.desc()));
  if (mask.defined())
    check(mask.device() == x.device() && mask.dtype() == x.dtype() && mask.shape() == x.shape(), op,
          fmt::format("mask {} must match x {}", mask.desc(), x.desc()));
  const Device d = x.device();
  Tensor y = Tensor::empty(Shape{}, x.dtype(), d);
  DL_SK(d, sq_error_fwd, x.dtype(), x.data(), target.data(), mask.defined() ? mask.data() : nullptr, x.numel(), alpha,
        y.data(), stream_for(d));
  if (needs_grad({&x, &target})) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [x, target, mask, yi, d, alpha] {
      void* gx = wants(x) ? grad_buffer(x).data() : nullptr;
      void* gt = wants(target) ? grad_buffer(target).data() : nullptr;
      DL_SK(d, sq_error_bwd, x.dtype(), x.data(), target.data(), mask.defined() ? mask.data() : nullptr, x.numel(),
            alpha, Tensor(yi->grad).data(), gx, gt, stream_for(d));
    });
  }
  return y;
}

}  // namespace ops

void sgd_step(const std::vector<Tensor>& params, const std::vector<double>& lrs) {
  check(params.size() == lrs.size(), "sgd_step", fmt::format("{} tensors but {} learning rates", params.size(), lrs.size()));
  if (params.empty()) return;
  const Device d = params[0].device();
  const DType dt = params[0].dtype();
  std::vector<kernels::SgdItem> items;
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    check(p.defined() && p.device() == d && p.dtype() == dt, "sgd_step",
          fmt::format("tensor {} ({}) must be defined and share dtype and device with {}", i, p.desc(), params[0].desc()));
    check(p.grad().defined(), "sgd_step", fmt::format("{} has no gradient (did backward reach it?)", p.desc()));
    items.push_back({p.data(), p.grad().data(), p.numel(), lrs[i]});
  }
  DL_SK(d, sgd_multi, dt, items.data(), int(items.size()), true, stream_for(d));
}

void pattern_residual_into(const SparsePattern& pat, const Tensor& X, const Tensor& vals, double alpha,
                           const Tensor& Y, cudaStream_t s) {
  const char* op = "pattern_residual_into";
  check_float(op, X, "X");
  const Device dev = X.device();
  check_pattern(op, pat, dev);
  check(X.ndim() == 2 && X.dim(0) == pat.rows && X.dim(1) == pat.cols, op,
        fmt::format("X {} must be [{}, {}]", X.desc(), pat.rows, pat.cols));
  check(Y.defined() && Y.shape() == X.shape() && Y.dtype() == X.dtype() && Y.device() == dev, op,
        fmt::format("Y must be laid out like X {}", X.desc()));
  check(vals.defined() && vals.numel() == pat.nnz && vals.dtype() == X.dtype() && vals.device() == dev, op,
        fmt::format("vals must be {} [{}] on {}", dtype_name(X.dtype()), pat.nnz, device_name(dev)));
  DL_SK(dev, pattern_residual, X.dtype(), i32(pat.row_idx), i32(pat.col_idx), pat.nnz, X.data(), vals.data(), alpha,
        pat.cols, Y.data(), s ? s : stream_for(dev));
}

void lowrank_unobserved_sq_sum(const SparsePattern& pat, const Tensor& X1, const Tensor& Y1, const Tensor& X2,
                               const Tensor& Y2, const Tensor& out) {
  const char* op = "lowrank_unobserved_sq_sum";
  check_float(op, X1, "X1");
  const Device dev = X1.device();
  const DType dt = X1.dtype();
  check_pattern(op, pat, dev);
  auto same = [&](const Tensor& t, const char* what, int64_t rows) {
    check(t.defined() && t.ndim() == 2 && t.dim(0) == rows && t.dtype() == dt && t.device() == dev, op,
          fmt::format("{} must be {} [{}, k] on {} (got {})", what, dtype_name(dt), rows, device_name(dev),
                      t.defined() ? t.desc() : std::string("undefined")));
  };
  same(X1, "X1", pat.rows);
  same(Y1, "Y1", pat.cols);
  check(Y1.dim(1) == X1.dim(1), op, "X1 and Y1 must have the same width");
  same(X2, "X2", pat.rows);
  same(Y2, "Y2", pat.cols);
  check(Y2.dim(1) == X2.dim(1), op, "X2 and Y2 must have the same width");
  check(out.defined() && out.numel() == 1 && out.dtype() == DType::f64 && out.device() == dev, op,
        "out must be one f64 element on the tensors' device");
  DL_SK(dev, lowrank_unobserved_sq_sum, dt, i32(pat.row_ptr), i32(pat.col_idx), pat.rows, pat.cols, X1.data(),
        Y1.data(), X1.dim(1), X2.data(), Y2.data(), X2.dim(1), out.data(), stream_for(dev));
}

void lowrank_step(const SparsePattern& pat, const Tensor& vals_csr, const Tensor& vals_csc, const Tensor& A,
                  const Tensor& B, const Tensor& A_tmp, const Tensor& B_tmp, const std::vector<Tensor>& K,
                  double alpha, double lr_inner, double lr_outer, const Tensor& loss, const Tensor& work,
                  int64_t steps) {
  const char* op = "lowrank_step";
  check(!K.empty() && int64_t(K.size()) <= kernels::kLowrankMaxL, op,
        fmt::format("{} inner factors (1 to {})", K.size(), kernels::kLowrankMaxL));
  check(steps >= 0, op, fmt::format("negative step count {}", steps));
  check_float(op, A, "A");
  const Device dev = A.device();
  const DType dt = A.dtype();
  check_pattern(op, pat, dev);
  const int64_t k = A.dim(1);
  auto same = [&](const Tensor& t, const char* what, Shape shape) {
    check(t.defined() && t.device() == dev && t.dtype() == dt && t.shape() == shape, op,
          fmt::format("{} must be {} {} on {} (got {})", what, dtype_name(dt), shape.str(), device_name(dev),
                      t.defined() ? t.desc() : std::string("undefined")));
  };
  check(A.ndim() == 2 && A.dim(0) == pat.rows, op, fmt::format("A {} must be [{}, k]", A.desc(), pat.rows));
  same(B, "B", Shape{pat.cols, k});
  same(A_tmp, "A_tmp", A.shape());
  same(B_tmp, "B_tmp", B.shape());
  same(vals_csr, "vals_csr", Shape{pat.nnz});
  same(vals_csc, "vals_csc", Shape{pat.nnz});
  same(loss, "loss", Shape{});
  for (const Tensor& kl : K) same(kl, "each K_l", Shape{k, k});
  check(work.defined() && work.device() == dev && work.nbytes() >= kernels::lowrank_step_workspace_bytes(k), op,
        fmt::format("work must hold {} bytes on {}", kernels::lowrank_step_workspace_bytes(k), device_name(dev)));
  check(A_tmp.data() != A.data() && A_tmp.data() != B.data() && B_tmp.data() != A.data() && B_tmp.data() != B.data(),
        op, "A_tmp and B_tmp must not alias A or B");
  kernels::LowrankStep s;
  s.dt = dt;
  s.rows = pat.rows;
  s.cols = pat.cols;
  s.k = k;
  s.L = int64_t(K.size());
  s.steps = steps;
  s.nnz = pat.nnz;
  s.row_ptr = pat.row_ptr.data_as<int32_t>();
  s.col_idx = pat.col_idx.data_as<int32_t>();
  s.col_ptr = pat.col_ptr.data_as<int32_t>();
  s.csc_row = pat.csc_row.data_as<int32_t>();
  s.vals_csr = vals_csr.data();
  s.vals_csc = vals_csc.data();
  s.A = A.data();
  s.B = B.data();
  s.A_tmp = A_tmp.data();
  s.B_tmp = B_tmp.data();
  for (size_t l = 0; l < K.size(); ++l) s.K[l] = K[l].data();
  s.alpha = alpha;
  s.lr_inner = lr_inner;
  s.lr_outer = lr_outer;
  s.loss = loss.data();
  s.work = work.data();
  DEEPLORA_DISPATCH(dev, lowrank_step, s, stream_for(dev));
}

}  // namespace deeplora
