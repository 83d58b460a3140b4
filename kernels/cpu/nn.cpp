// CPU reference twins of kernels/nn.h (embedding, layernorm, softmax cross-entropy): plain loops,
// statistics and every reduction in double, each output rounded once into its dtype.
#include "kernels/nn.h"
#include "kernels/cpu/cpu_common.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace deeplora::kernels::cpu {

void embedding_fwd(DType dt, const int32_t* tok, const void* wte, const void* wpe, void* y,
                   int64_t B, int64_t T, int64_t C, cudaStream_t) {
  float_dispatch(dt, "embedding_fwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const E* pwte = static_cast<const E*>(wte);
    const E* pwpe = static_cast<const E*>(wpe);
    E* py = static_cast<E*>(y);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int32_t id = tok[b * T + t];
        if (id < 0)  // V is not passed here; callers check the upper bound with count_out_of_range
          throw std::invalid_argument(fmt::format(
              "kernels::cpu::embedding_fwd: token id {} at [{}, {}] is negative", id, b, t));
        const E* row = pwte + int64_t(id) * C;
        E* out = py + (b * T + t) * C;
        for (int64_t c = 0; c < C; ++c)
          out[c] = st<E>(ld(row[c]) + (pwpe ? ld(pwpe[t * C + c]) : 0.0));
      }
  });
}

void embedding_bwd(DType dt, const int32_t* tok, const void* dy, void* dwte, void* dwpe, int64_t B,
                   int64_t T, int64_t C, int64_t V, cudaStream_t) {
  float_dispatch(dt, "embedding_bwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const E* pdy = static_cast<const E*>(dy);
    const int64_t n = B * T;
    std::vector<double> s(size_t(C), 0.0);
    if (dwte) {
      E* pw = static_cast<E*>(dwte);
      for (int64_t i = 0; i < n; ++i)
        if (tok[i] < 0 || tok[i] >= V)
          throw std::invalid_argument(fmt::format(
              "kernels::cpu::embedding_bwd: token id {} at flat position {} is outside [0, {})",
              tok[i], i, V));
      // Group positions by token (stable, so the summation order is fixed) and sum each group in
      // double before touching dwte once: repeated tokens must not round at every step in bf16.
      std::vector<int64_t> order(size_t(n), 0);
      std::iota(order.begin(), order.end(), int64_t(0));
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return tok[a] < tok[b]; });
      for (int64_t i = 0; i < n;) {
        const int32_t id = tok[order[i]];
        std::fill(s.begin(), s.end(), 0.0);
        for (; i < n && tok[order[i]] == id; ++i)
          for (int64_t c = 0; c < C; ++c) s[c] += ld(pdy[order[i] * C + c]);
        E* row = pw + int64_t(id) * C;
        for (int64_t c = 0; c < C; ++c) row[c] = st<E>(ld(row[c]) + s[c]);
      }
    }
    if (dwpe) {
      E* pp = static_cast<E*>(dwpe);
      for (int64_t t = 0; t < T; ++t) {
        std::fill(s.begin(), s.end(), 0.0);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = 0; c < C; ++c) s[c] += ld(pdy[(b * T + t) * C + c]);
        for (int64_t c = 0; c < C; ++c) pp[t * C + c] = st<E>(ld(pp[t * C + c]) + s[c]);
      }
    }
  });
}

int64_t count_out_of_range(const int32_t* tok, int64_t n, int64_t V, int64_t ignore, cudaStream_t) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = tok[i];
    if ((id < 0 || id >= V) && id != ignore) ++bad;
  }
  return bad;
}

// Biased variance (two-pass, in double); w null means 1, b null means 0; mean/rstd may be null.
void layernorm_fwd(DType dt, const void* x, const void* w, const void* b, void* y, void* mean,
                   void* rstd, int64_t rows, int64_t C, double eps, cudaStream_t) {
  float_dispatch(dt, "layernorm_fwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const E* px = static_cast<const E*>(x);
    const E* pw = static_cast<const E*>(w);
    const E* pb = static_cast<const E*>(b);
    E* py = static_cast<E*>(y);
    for (int64_t r = 0; r < rows; ++r) {
      const E* xr = px + r * C;
      double m = 0.0;
      for (int64_t c = 0; c < C; ++c) m += ld(xr[c]);
      m /= double(C);
      double var = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const double d = ld(xr[c]) - m;
        var += d * d;
      }
      var /= double(C);
      const double rs = 1.0 / std::sqrt(var + eps);
      for (int64_t c = 0; c < C; ++c) {
        const double v = (ld(xr[c]) - m) * rs * (pw ? ld(pw[c]) : 1.0) + (pb ? ld(pb[c]) : 0.0);
        py[r * C + c] = st<E>(v);
      }
      if (mean) static_cast<S*>(mean)[r] = S(m);
      if (rstd) static_cast<S*>(rstd)[r] = S(rs);
    }
  });
}

// With xhat = (x - mean) rstd and g = dy * w:
//   dx += rstd (g - mean_c(g) - xhat mean_c(g xhat)),  dw += sum_r dy xhat,  db += sum_r dy.
void layernorm_bwd(DType dt, const void* x, const void* w, const void* mean, const void* rstd,
                   const void* dy, void* dx, void* dw, void* db, int64_t rows, int64_t C,
                   bool dx_accumulate, cudaStream_t) {
  float_dispatch(dt, "layernorm_bwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const E* px = static_cast<const E*>(x);
    const E* pw = static_cast<const E*>(w);
    const S* pm = static_cast<const S*>(mean);
    const S* prs = static_cast<const S*>(rstd);
    const E* pdy = static_cast<const E*>(dy);
    E* pdx = static_cast<E*>(dx);
    std::vector<double> dw_acc(dw ? size_t(C) : 0, 0.0), db_acc(db ? size_t(C) : 0, 0.0);
    std::vector<double> xhat(size_t(C), 0.0), g(size_t(C), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const double m = pm[r], rs = prs[r];
      double g_mean = 0.0, gx_mean = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const double d = ld(pdy[r * C + c]);
        xhat[c] = (ld(px[r * C + c]) - m) * rs;
        g[c] = d * (pw ? ld(pw[c]) : 1.0);
        g_mean += g[c];
        gx_mean += g[c] * xhat[c];
        if (dw) dw_acc[c] += d * xhat[c];
        if (db) db_acc[c] += d;
      }
      g_mean /= double(C);
      gx_mean /= double(C);
      if (pdx)
        for (int64_t c = 0; c < C; ++c)
          pdx[r * C + c] = st<E>((dx_accumulate ? ld(pdx[r * C + c]) : 0.0) + rs * (g[c] - g_mean - xhat[c] * gx_mean));
    }
    E* pdw = static_cast<E*>(dw);
    E* pdb = static_cast<E*>(db);
    if (pdw)
      for (int64_t c = 0; c < C; ++c) pdw[c] = st<E>(ld(pdw[c]) + dw_acc[c]);
    if (pdb)
      for (int64_t c = 0; c < C; ++c) pdb[c] = st<E>(ld(pdb[c]) + db_acc[c]);
  });
}

// lse and loss may be null. lse is computed for ignored rows too.
void cross_entropy_fwd(DType dt, const void* logits, const int32_t* tgt, void* lse, void* loss,
                       int64_t rows, int64_t V, int64_t row_stride, int32_t ignore, cudaStream_t) {
  float_dispatch(dt, "cross_entropy_fwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const E* pl = static_cast<const E*>(logits);
    for (int64_t r = 0; r < rows; ++r) {
      const E* lr = pl + r * row_stride;
      double mx = -INFINITY;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, ld(lr[v]));
      double se = 0.0;
      for (int64_t v = 0; v < V; ++v) se += std::exp(ld(lr[v]) - mx);
      const double l = mx + std::log(se);
      if (lse) static_cast<S*>(lse)[r] = S(l);
      if (loss) {
        double li = 0.0;
        if (tgt[r] != ignore) {
          if (tgt[r] < 0 || tgt[r] >= V)
            throw std::invalid_argument(fmt::format(
                "kernels::cpu::cross_entropy_fwd: target {} at row {} is outside [0, {})", tgt[r],
                r, V));
          li = l - ld(lr[tgt[r]]);
        }
        static_cast<S*>(loss)[r] = S(li);
      }
    }
  });
}

// Probabilities are recomputed from the saved lse. count == 0 means every row is ignored: no-op.
void cross_entropy_bwd(DType dt, const void* logits, const int32_t* tgt, const void* lse,
                       const void* dloss, const void* count, void* dlogits, int64_t rows, int64_t V,
                       int64_t row_stride, int32_t ignore, bool accumulate, cudaStream_t) {
  float_dispatch(dt, "cross_entropy_bwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const E* pl = static_cast<const E*>(logits);
    const S* plse = static_cast<const S*>(lse);
    E* pd = static_cast<E*>(dlogits);
    if (!accumulate) std::fill(pd, pd + rows * row_stride, st<E>(0.0));
    const double cnt = *static_cast<const S*>(count);
    if (cnt == 0.0) return;
    const double k = double(*static_cast<const S*>(dloss)) / cnt;
    for (int64_t r = 0; r < rows; ++r) {
      if (tgt[r] == ignore) continue;
      if (tgt[r] < 0 || tgt[r] >= V)
        throw std::invalid_argument(fmt::format(
            "kernels::cpu::cross_entropy_bwd: target {} at row {} is outside [0, {})", tgt[r], r,
            V));
      const double l = plse[r];
      for (int64_t v = 0; v < V; ++v) {
        const double p = std::exp(ld(pl[r * row_stride + v]) - l) - (v == tgt[r] ? 1.0 : 0.0);
        pd[r * row_stride + v] = st<E>(ld(pd[r * row_stride + v]) + k * p);
      }
    }
  });
}

void cross_entropy_reduce(DType dt, const void* loss, const int32_t* tgt, int64_t rows,
                          int32_t ignore, void* out, void* count_out, cudaStream_t) {
  float_dispatch(dt, "cross_entropy_reduce", [&](auto tag) {
    using S = Stat<typename decltype(tag)::type>;
    const S* pl = static_cast<const S*>(loss);
    double s = 0.0;
    int64_t n = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (tgt[r] == ignore) continue;
      s += pl[r];
      ++n;
    }
    static_cast<S*>(out)[0] = S(n > 0 ? s / double(n) : 0.0);
    if (count_out) static_cast<S*>(count_out)[0] = S(n);
  });
}

}  // namespace deeplora::kernels::cpu
