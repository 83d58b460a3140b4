// CPU reference twins of kernels/sparse.h: plain loops in the order the CUDA kernels sum (per owner,
// entries in pattern order), accumulating in the element type (f32 or f64).
#include "kernels/sparse.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace deeplora::kernels::cpu {
namespace {

[[noreturn]] void bad_dtype(const char* fn, DType dt) {
  throw std::invalid_argument(std::string("kernels::cpu::") + fn + ": dtype " + dtype_name(dt) +
                              " is not supported (f32 or f64)");
}

template <class F> void dispatch(DType dt, const char* fn, F&& f) {
  if (dt == DType::f64) f(double{});
  else if (dt == DType::f32) f(float{});
  else bad_dtype(fn, dt);
}

// Row-major small matrices: C = A·B (k x k).
template <class T> void mm(const T* A, const T* B, T* C, int64_t k, bool ta = false, bool tb = false) {
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      T s = 0;
      for (int64_t t = 0; t < k; ++t) s += (ta ? A[t * k + i] : A[i * k + t]) * (tb ? B[j * k + t] : B[t * k + j]);
      C[i * k + j] = s;
    }
}

}  // namespace

void sampled_dot(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* P, const void* Q,
                 int64_t k, void* out, bool accumulate, cudaStream_t) {
  dispatch(dt, "sampled_dot", [&](auto z) {
    using T = decltype(z);
    const T* p = static_cast<const T*>(P);
    const T* q = static_cast<const T*>(Q);
    T* o = static_cast<T*>(out);
    for (int64_t e = 0; e < nnz; ++e) {
      const T* a = p + int64_t(row[e]) * k;
      const T* b = q + int64_t(col[e]) * k;
      T s = 0;
      for (int64_t c = 0; c < k; ++c) s += a[c] * b[c];
      o[e] = accumulate ? o[e] + s : s;
    }
  });
}

void gather_pattern(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* X, int64_t ld,
                    void* out, cudaStream_t) {
  dispatch(dt, "gather_pattern", [&](auto z) {
    using T = decltype(z);
    const T* x = static_cast<const T*>(X);
    T* o = static_cast<T*>(out);
    for (int64_t e = 0; e < nnz; ++e) o[e] = x[int64_t(row[e]) * ld + col[e]];
  });
}

void pattern_residual(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* X, const void* vals,
                      double alpha, int64_t ld, void* Y, cudaStream_t) {
  dispatch(dt, "pattern_residual", [&](auto z) {
    using T = decltype(z);
    const T* x = static_cast<const T*>(X);
    const T* v = static_cast<const T*>(vals);
    T* y = static_cast<T*>(Y);
    for (int64_t e = 0; e < nnz; ++e) {
      const int64_t at = int64_t(row[e]) * ld + col[e];
      y[at] = T(alpha) * (x[at] - v[e]);
    }
  });
}

void scatter_pattern_acc(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* vals, int64_t ld,
                         void* Y, cudaStream_t) {
  dispatch(dt, "scatter_pattern_acc", [&](auto z) {
    using T = decltype(z);
    const T* v = static_cast<const T*>(vals);
    T* y = static_cast<T*>(Y);
    for (int64_t e = 0; e < nnz; ++e) y[int64_t(row[e]) * ld + col[e]] += v[e];
  });
}

void spmm_acc(DType dt, const int32_t* ptr, const int32_t* idx, const int32_t* perm, const void* vals, int64_t n_out,
              const void* X, int64_t k, void* Y, double alpha, cudaStream_t) {
  dispatch(dt, "spmm_acc", [&](auto z) {
    using T = decltype(z);
    const T* v = static_cast<const T*>(vals);
    const T* x = static_cast<const T*>(X);
    T* y = static_cast<T*>(Y);
    std::vector<T> acc(static_cast<size_t>(size_t(k)));
    for (int64_t i = 0; i < n_out; ++i) {
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t e = ptr[i]; e < ptr[i + 1]; ++e) {
        const T w = v[perm ? perm[e] : e];
        const T* xr = x + int64_t(idx[e]) * k;
        for (int64_t c = 0; c < k; ++c) acc[size_t(c)] += w * xr[c];
      }
      for (int64_t c = 0; c < k; ++c) y[i * k + c] += T(alpha) * acc[size_t(c)];
    }
  });
}

void sq_error_fwd(DType dt, const void* x, const void* t, const void* w, int64_t n, double alpha, void* out,
                  cudaStream_t) {
  dispatch(dt, "sq_error_fwd", [&](auto z) {
    using T = decltype(z);
    const T* px = static_cast<const T*>(x);
    const T* pt = static_cast<const T*>(t);
    const T* pw = static_cast<const T*>(w);
    T s = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T r = px[i] - pt[i];
      s += (pw ? pw[i] : T(1)) * r * r;
    }
    *static_cast<T*>(out) = T(0.5 * alpha) * s;
  });
}

void sq_error_bwd(DType dt, const void* x, const void* t, const void* w, int64_t n, double alpha, const void* g,
                  void* gx, void* gt, cudaStream_t) {
  dispatch(dt, "sq_error_bwd", [&](auto z) {
    using T = decltype(z);
    const T* px = static_cast<const T*>(x);
    const T* pt = static_cast<const T*>(t);
    const T* pw = static_cast<const T*>(w);
    const T s = T(alpha) * *static_cast<const T*>(g);
    T* gxp = static_cast<T*>(gx);
    T* gtp = static_cast<T*>(gt);
    for (int64_t i = 0; i < n; ++i) {
      const T d = s * (pw ? pw[i] : T(1)) * (px[i] - pt[i]);
      if (gxp) gxp[i] += d;
      if (gtp) gtp[i] -= d;
    }
  });
}

void sgd_multi(DType dt, const SgdItem* items, int n_items, bool zero_grad, cudaStream_t) {
  dispatch(dt, "sgd_multi", [&](auto z) {
    using T = decltype(z);
    for (int it = 0; it < n_items; ++it) {
      T* p = static_cast<T*>(items[it].p);
      T* g = static_cast<T*>(items[it].g);
      const T lr = T(items[it].lr);
      for (int64_t i = 0; i < items[it].n; ++i) {
        p[i] -= lr * g[i];
        if (zero_grad) g[i] = T(0);
      }
    }
  });
}

void lowrank_step(const LowrankStep& a, cudaStream_t) {
  if (!lowrank_step_supported(a.dt, a.k, a.L))
    throw std::invalid_argument("kernels::cpu::lowrank_step: unsupported dtype/k/L (see lowrank_step_supported)");
  if (a.steps < 0) throw std::invalid_argument("kernels::cpu::lowrank_step: negative step count");
  dispatch(a.dt, "lowrank_step", [&](auto z) {
    using T = decltype(z);
    const int64_t k = a.k, L = a.L, kk = k * k;
    T* A = static_cast<T*>(a.A);
    T* B = static_cast<T*>(a.B);
    const T* vr = static_cast<const T*>(a.vals_csr);
    const T* vc = static_cast<const T*>(a.vals_csc);
    T* Ao = static_cast<T*>(a.A_tmp);
    T* Bo = static_cast<T*>(a.B_tmp);
    std::vector<T*> K(static_cast<size_t>(L));
    for (int64_t l = 0; l < L; ++l) K[size_t(l)] = static_cast<T*>(a.K[l]);
    const T alpha = T(a.alpha);
    std::vector<T> pre(static_cast<size_t>(size_t(L * kk))), kp(static_cast<size_t>(size_t(kk)));
    std::vector<T> p(static_cast<size_t>(size_t(k))), g(static_cast<size_t>(size_t(k))), q(static_cast<size_t>(size_t(k)));
    std::vector<T> X(static_cast<size_t>(size_t(L * kk))), gk(static_cast<size_t>(size_t(L * kk))),
        gkp(static_cast<size_t>(size_t(kk)));
    for (int64_t step = 0; step < a.steps; ++step) {
      // Prefix products Pre_l = K_{l-1}⋯K_1 (Pre_1 = I); Kp = K_L·Pre_L.
      for (int64_t i = 0; i < kk; ++i) pre[size_t(i)] = (i / k == i % k) ? T(1) : T(0);
      for (int64_t l = 1; l < L; ++l) mm<T>(K[size_t(l - 1)], &pre[size_t((l - 1) * kk)], &pre[size_t(l * kk)], k);
      mm<T>(K[size_t(L - 1)], &pre[size_t((L - 1) * kk)], kp.data(), k);
      std::fill(gkp.begin(), gkp.end(), T(0));
      T loss = 0;
      // Row owners: P_i = A_i Kp, gP_i = alpha Σ_e r_e B_j, A'_i = A_i − lr_outer gP_i Kpᵀ, gKp += A_iᵀ gP_i.
      for (int64_t i = 0; i < a.rows; ++i) {
        const T* ai = A + i * k;
        for (int64_t c = 0; c < k; ++c) {
          T s = 0;
          for (int64_t t = 0; t < k; ++t) s += ai[t] * kp[size_t(t * k + c)];
          p[size_t(c)] = s;
        }
        std::fill(g.begin(), g.end(), T(0));
        for (int64_t e = a.row_ptr[i]; e < a.row_ptr[i + 1]; ++e) {
          const T* bj = B + int64_t(a.col_idx[e]) * k;
          T r = 0;
          for (int64_t c = 0; c < k; ++c) r += p[size_t(c)] * bj[c];
          r -= vr[e];
          loss += r * r;
          for (int64_t c = 0; c < k; ++c) g[size_t(c)] += r * bj[c];
        }
        for (int64_t c = 0; c < k; ++c) g[size_t(c)] *= alpha;
        for (int64_t t = 0; t < k; ++t) {
          T s = 0;
          for (int64_t c = 0; c < k; ++c) s += g[size_t(c)] * kp[size_t(t * k + c)];
          Ao[i * k + t] = ai[t] - T(a.lr_outer) * s;
        }
        for (int64_t t = 0; t < k; ++t)
          for (int64_t c = 0; c < k; ++c) gkp[size_t(t * k + c)] += ai[t] * g[size_t(c)];
      }
      // Column owners: Q_j = Kp B_jᵀ, B'_j = B_j − lr_outer alpha (Σ_e r_e A_i) Kp.
      for (int64_t j = 0; j < a.cols; ++j) {
        const T* bj = B + j * k;
        for (int64_t t = 0; t < k; ++t) {
          T s = 0;
          for (int64_t c = 0; c < k; ++c) s += kp[size_t(t * k + c)] * bj[c];
          q[size_t(t)] = s;
        }
        std::fill(g.begin(), g.end(), T(0));
        for (int64_t e = a.col_ptr[j]; e < a.col_ptr[j + 1]; ++e) {
          const T* ai = A + int64_t(a.csc_row[e]) * k;
          T r = 0;
          for (int64_t t = 0; t < k; ++t) r += ai[t] * q[size_t(t)];
          r -= vc[e];
          for (int64_t t = 0; t < k; ++t) g[size_t(t)] += r * ai[t];
        }
        for (int64_t c = 0; c < k; ++c) {
          T s = 0;
          for (int64_t t = 0; t < k; ++t) s += g[size_t(t)] * kp[size_t(t * k + c)];
          Bo[j * k + c] = bj[c] - T(a.lr_outer) * alpha * s;
        }
      }
      // gK_l = X_l · Pre_lᵀ with X_L = gKp, X_l = K_{l+1}ᵀ X_{l+1}; all from the old K, then update.
      std::copy(gkp.begin(), gkp.end(), X.begin() + (L - 1) * kk);
      for (int64_t l = L - 2; l >= 0; --l) mm<T>(K[size_t(l + 1)], &X[size_t((l + 1) * kk)], &X[size_t(l * kk)], k, true);
      for (int64_t l = 0; l < L; ++l) mm<T>(&X[size_t(l * kk)], &pre[size_t(l * kk)], &gk[size_t(l * kk)], k, false, true);
      for (int64_t l = 0; l < L; ++l)
        for (int64_t i = 0; i < kk; ++i) K[size_t(l)][i] -= T(a.lr_inner) * gk[size_t(l * kk + i)];
      std::copy(Ao, Ao + a.rows * k, A);
      std::copy(Bo, Bo + a.cols * k, B);
      *static_cast<T*>(a.loss) = T(0.5) * alpha * loss;
    }
  });
}

void lowrank_unobserved_sq_sum(DType dt, const int32_t* row_ptr, const int32_t* col_idx, int64_t rows, int64_t cols,
                               const void* X1, const void* Y1, int64_t k1, const void* X2, const void* Y2, int64_t k2,
                               void* out, cudaStream_t) {
  dispatch(dt, "lowrank_unobserved_sq_sum", [&](auto z) {
    using T = decltype(z);
    const T* x1 = static_cast<const T*>(X1);
    const T* y1 = static_cast<const T*>(Y1);
    const T* x2 = static_cast<const T*>(X2);
    const T* y2 = static_cast<const T*>(Y2);
    double total = 0;
    for (int64_t i = 0; i < rows; ++i) {
      int64_t e = row_ptr[i];
      const int64_t e1 = row_ptr[i + 1];
      double row_sum = 0;
      for (int64_t j = 0; j < cols; ++j) {
        while (e < e1 && col_idx[e] < j) ++e;
        if (e < e1 && col_idx[e] == j) continue;
        double v = 0;
        for (int64_t c = 0; c < k1; ++c) v += double(x1[i * k1 + c]) * double(y1[j * k1 + c]);
        for (int64_t c = 0; c < k2; ++c) v -= double(x2[i * k2 + c]) * double(y2[j * k2 + c]);
        row_sum += v * v;
      }
      total += row_sum;
    }
    *static_cast<double*>(out) = total;
  });
}

}  // namespace deeplora::kernels::cpu
