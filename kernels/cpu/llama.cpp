// CPU reference twins of kernels/llama.h: plain loops, every reduction in double, each output
// rounded once into its dtype (plus the roundings HF itself makes, where the header says so).
#include "kernels/llama.h"
#include "kernels/cpu/cpu_common.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace deeplora::kernels::cpu {
namespace {

// Where a store adds to what the output holds.
template <class E> void put(E* p, double v, bool accumulate) { *p = st<E>(accumulate ? ld(*p) + v : v); }

void check_gqa(const char* op, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd) {
  if (B < 0 || T < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0 || hd <= 0 || hd % 8 != 0 || hd > 128)
    throw std::invalid_argument(fmt::format(
        "kernels::cpu::{}: need Hq a positive multiple of Hkv and hd a multiple of 8 in [8, 128] (got B={} T={} "
        "Hq={} Hkv={} hd={})",
        op, B, T, Hq, Hkv, hd));
}

}  // namespace

void transpose_last2(DType dt, const void* x, void* y, int64_t batch, int64_t R, int64_t C, bool accumulate,
                     cudaStream_t) {
  any_dispatch(dt, "transpose_last2", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const E* px = static_cast<const E*>(x);
    E* py = static_cast<E*>(y);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const E v = px[(b * R + r) * C + c];
          E* o = py + (b * C + c) * R + r;
          if constexpr (std::is_same_v<E, int32_t>) *o = accumulate ? *o + v : v;
          else put(o, ld(v), accumulate);
        }
  });
}

void copy_cols(DType dt, const void* src, int64_t src_ld, void* dst, int64_t dst_ld, int64_t rows, int64_t cols,
               bool accumulate, cudaStream_t) {
  if (!src && accumulate) throw std::invalid_argument("kernels::cpu::copy_cols: a null source cannot accumulate");
  any_dispatch(dt, "copy_cols", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const E* ps = static_cast<const E*>(src);
    E* pd = static_cast<E*>(dst);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        E* o = pd + r * dst_ld + c;
        if (!ps) {
          *o = st<E>(0.0);
          continue;
        }
        const E v = ps[r * src_ld + c];
        if constexpr (std::is_same_v<E, int32_t>) *o = accumulate ? *o + v : v;
        else put(o, ld(v), accumulate);
      }
  });
}

void rmsnorm_fwd(DType dt, const void* x, const void* w, void* y, void* rstd, int64_t rows, int64_t C, double eps,
                 cudaStream_t) {
  float_dispatch(dt, "rmsnorm_fwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const E* px = static_cast<const E*>(x);
    const E* pw = static_cast<const E*>(w);
    E* py = static_cast<E*>(y);
    for (int64_t r = 0; r < rows; ++r) {
      const E* xr = px + r * C;
      double ss = 0.0;
      for (int64_t c = 0; c < C; ++c) ss += ld(xr[c]) * ld(xr[c]);
      const double rs = 1.0 / std::sqrt(ss / double(C) + eps);
      for (int64_t c = 0; c < C; ++c) {
        const double n = ld(st<E>(ld(xr[c]) * rs));  // HF: hidden_states.to(input_dtype) before * weight
        py[r * C + c] = st<E>(pw ? ld(pw[c]) * n : n);
      }
      if (rstd) static_cast<S*>(rstd)[r] = S(rs);
    }
  });
}

// n = x rstd, g = dy w:  dx = rstd (g - n mean_c(g n));  dw += sum_r dy dt(n).
void rmsnorm_bwd(DType dt, const void* x, const void* w, const void* rstd, const void* dy, void* dx, void* dw,
                 int64_t rows, int64_t C, bool dx_accumulate, cudaStream_t) {
  float_dispatch(dt, "rmsnorm_bwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const E* px = static_cast<const E*>(x);
    const E* pw = static_cast<const E*>(w);
    const S* prs = static_cast<const S*>(rstd);
    const E* pdy = static_cast<const E*>(dy);
    E* pdx = static_cast<E*>(dx);
    std::vector<double> dw_acc(dw ? size_t(C) : 0, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const double rs = prs[r];
      const E* xr = px + r * C;
      const E* dyr = pdy + r * C;
      double gn = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const double n = ld(xr[c]) * rs, d = ld(dyr[c]);
        gn += d * (pw ? ld(pw[c]) : 1.0) * n;
        if (dw) dw_acc[c] += d * ld(st<E>(n));
      }
      gn /= double(C);
      if (pdx)
        for (int64_t c = 0; c < C; ++c) {
          const double n = ld(xr[c]) * rs, g = ld(dyr[c]) * (pw ? ld(pw[c]) : 1.0);
          put(pdx + r * C + c, rs * (g - n * gn), dx_accumulate);
        }
    }
    if (dw) {
      E* pdw = static_cast<E*>(dw);
      for (int64_t c = 0; c < C; ++c) pdw[c] = st<E>(ld(pdw[c]) + dw_acc[c]);
    }
  });
}

void rope(DType dt, const void* x, const int32_t* pos, const float* inv_freq, void* y, int64_t rows, int64_t H,
          int64_t hd, bool inverse, bool accumulate, cudaStream_t) {
  if (hd <= 0 || hd % 2 != 0)
    throw std::invalid_argument(fmt::format("kernels::cpu::rope: head size {} must be even and positive", hd));
  if (x == y && accumulate) throw std::invalid_argument("kernels::cpu::rope: in place cannot accumulate");
  float_dispatch(dt, "rope", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const E* px = static_cast<const E*>(x);
    E* py = static_cast<E*>(y);
    const int64_t half = hd / 2;
    std::vector<double> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t r = 0; r < rows; ++r) {
      const float p = float(pos[r]);
      for (int64_t i = 0; i < half; ++i) {
        const float ang = p * inv_freq[i];  // one f32 rounding, as HF's f32 product of position and frequency
        cs[i] = std::cos(double(ang));
        sn[i] = inverse ? -std::sin(double(ang)) : std::sin(double(ang));
      }
      for (int64_t h = 0; h < H; ++h) {
        const E* xh = px + (r * H + h) * hd;
        E* yh = py + (r * H + h) * hd;
        for (int64_t i = 0; i < half; ++i) {
          const double a = ld(xh[i]), b = ld(xh[i + half]);
          put(yh + i, a * cs[i] - b * sn[i], accumulate);
          put(yh + i + half, b * cs[i] + a * sn[i], accumulate);
        }
      }
    }
  });
}

namespace {
double sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }
}  // namespace

void swiglu_fwd(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t) {
  float_dispatch(dt, "swiglu_fwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const E* pa = static_cast<const E*>(a);
    const E* pb = static_cast<const E*>(b);
    E* py = static_cast<E*>(y);
    for (int64_t i = 0; i < n; ++i) {
      const double g = ld(pa[i]);
      py[i] = st<E>(ld(st<E>(g * sigmoid(g))) * ld(pb[i]));
    }
  });
}

void swiglu_bwd(DType dt, const void* a, const void* b, const void* dy, void* da, void* db, int64_t n,
                bool da_accumulate, bool db_accumulate, cudaStream_t) {
  float_dispatch(dt, "swiglu_bwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const E* pa = static_cast<const E*>(a);
    const E* pb = static_cast<const E*>(b);
    const E* pdy = static_cast<const E*>(dy);
    E* pda = static_cast<E*>(da);
    E* pdb = static_cast<E*>(db);
    for (int64_t i = 0; i < n; ++i) {
      const double g = ld(pa[i]), u = ld(pb[i]), d = ld(pdy[i]), sg = sigmoid(g);
      const double ga = d * u * sg * (1.0 + g * (1.0 - sg)), gb = d * ld(st<E>(g * sg));
      if (pda) put(pda + i, ga, da_accumulate);  // before db is read: they may be one buffer
      if (pdb) put(pdb + i, gb, db_accumulate);
    }
  });
}

// Per (b, h, t): s_j = scale q_t.k_j (j <= t, k of KV head h / G); lse = logsumexp(s); o = sum_j p_j v_j.
void gqa_attention_fwd(DType dt, const void* q, const void* k, const void* v, void* out, void* lse, int64_t B,
                       int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, cudaStream_t) {
  check_gqa("gqa_attention_fwd", B, T, Hq, Hkv, hd);
  float_dispatch(dt, "gqa_attention_fwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const int64_t Cq = Hq * hd, Ck = Hkv * hd, G = Hq / Hkv;
    const double scale = 1.0 / std::sqrt(double(hd));
    const size_t nq = size_t(T * Cq), nk = size_t(T * Ck);
    std::vector<double> xq(nq), xk(nk), xv(nk), sc(static_cast<size_t>(T)), o(static_cast<size_t>(hd));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < T * Cq; ++i) xq[i] = ld(static_cast<const E*>(q)[b * T * Cq + i]);
      for (int64_t i = 0; i < T * Ck; ++i) xk[i] = ld(static_cast<const E*>(k)[b * T * Ck + i]);
      for (int64_t i = 0; i < T * Ck; ++i) xv[i] = ld(static_cast<const E*>(v)[b * T * Ck + i]);
      E* po = static_cast<E*>(out) + b * T * Cq;
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t hk = h / G;
        for (int64_t t = 0; t < T; ++t) {
          const double* qt = xq.data() + t * Cq + h * hd;
          double mx = -INFINITY;
          for (int64_t j = 0; j <= t; ++j) {
            const double* kj = xk.data() + j * Ck + hk * hd;
            double d = 0.0;
            for (int64_t c = 0; c < hd; ++c) d += qt[c] * kj[c];
            sc[j] = scale * d;
            mx = std::max(mx, sc[j]);
          }
          double se = 0.0;
          for (int64_t j = 0; j <= t; ++j) se += std::exp(sc[j] - mx);
          const double l = mx + std::log(se);
          std::fill(o.begin(), o.end(), 0.0);
          for (int64_t j = 0; j <= t; ++j) {
            const double p = std::exp(sc[j] - l);
            const double* vj = xv.data() + j * Ck + hk * hd;
            for (int64_t c = 0; c < hd; ++c) o[c] += p * vj[c];
          }
          for (int64_t c = 0; c < hd; ++c) po[t * Cq + h * hd + c] = st<E>(o[c]);
          if (lse) static_cast<S*>(lse)[(b * Hq + h) * T + t] = S(l);
        }
      }
    }
  });
}

// P from the saved lse; D_t = dout_t.out_t; dS_tj = P_tj (dout_t.v_j - D_t);
// dq_t = scale sum_j dS_tj k_j; dk_j += scale dS_tj q_t; dv_j += P_tj dout_t (over the group's query heads).
// Summed in double per batch entry, then stored once per element in the order dq, dk, dv.
void gqa_attention_bwd(DType dt, const void* q, const void* k, const void* v, const void* out, const void* lse,
                       const void* dout, void* dq, void* dk, void* dv, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
                       int64_t hd, bool dq_accumulate, bool dk_accumulate, bool dv_accumulate, cudaStream_t) {
  check_gqa("gqa_attention_bwd", B, T, Hq, Hkv, hd);
  float_dispatch(dt, "gqa_attention_bwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const int64_t Cq = Hq * hd, Ck = Hkv * hd, G = Hq / Hkv;
    const double scale = 1.0 / std::sqrt(double(hd));
    const S* plse = static_cast<const S*>(lse);
    const size_t nq = size_t(T * Cq), nk = size_t(T * Ck);
    std::vector<double> xq(nq), xk(nk), xv(nk), gq(nq), gk(nk), gv(nk);
    std::vector<double> p(static_cast<size_t>(T)), ds(static_cast<size_t>(T));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < T * Cq; ++i) xq[i] = ld(static_cast<const E*>(q)[b * T * Cq + i]);
      for (int64_t i = 0; i < T * Ck; ++i) xk[i] = ld(static_cast<const E*>(k)[b * T * Ck + i]);
      for (int64_t i = 0; i < T * Ck; ++i) xv[i] = ld(static_cast<const E*>(v)[b * T * Ck + i]);
      const E* po = static_cast<const E*>(out) + b * T * Cq;
      const E* pdo = static_cast<const E*>(dout) + b * T * Cq;
      std::fill(gq.begin(), gq.end(), 0.0);
      std::fill(gk.begin(), gk.end(), 0.0);
      std::fill(gv.begin(), gv.end(), 0.0);
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t hk = h / G;
        for (int64_t t = 0; t < T; ++t) {
          const double* qt = xq.data() + t * Cq + h * hd;
          const E* dot = pdo + t * Cq + h * hd;
          const E* ot = po + t * Cq + h * hd;
          const double l = plse[(b * Hq + h) * T + t];
          double D = 0.0;
          for (int64_t c = 0; c < hd; ++c) D += ld(dot[c]) * ld(ot[c]);
          for (int64_t j = 0; j <= t; ++j) {
            const double* kj = xk.data() + j * Ck + hk * hd;
            const double* vj = xv.data() + j * Ck + hk * hd;
            double s = 0.0, dp = 0.0;
            for (int64_t c = 0; c < hd; ++c) {
              s += qt[c] * kj[c];
              dp += ld(dot[c]) * vj[c];
            }
            p[j] = std::exp(scale * s - l);
            ds[j] = p[j] * (dp - D);
          }
          double* gqt = gq.data() + t * Cq + h * hd;
          for (int64_t j = 0; j <= t; ++j) {
            const double* kj = xk.data() + j * Ck + hk * hd;
            double* gkj = gk.data() + j * Ck + hk * hd;
            double* gvj = gv.data() + j * Ck + hk * hd;
            for (int64_t c = 0; c < hd; ++c) {
              gqt[c] += scale * ds[j] * kj[c];
              gkj[c] += scale * ds[j] * qt[c];
              gvj[c] += p[j] * ld(dot[c]);
            }
          }
        }
      }
      if (dq) {
        E* o = static_cast<E*>(dq) + b * T * Cq;
        for (int64_t i = 0; i < T * Cq; ++i) put(o + i, gq[i], dq_accumulate);
      }
      if (dk) {
        E* o = static_cast<E*>(dk) + b * T * Ck;
        for (int64_t i = 0; i < T * Ck; ++i) put(o + i, gk[i], dk_accumulate);
      }
      if (dv) {
        E* o = static_cast<E*>(dv) + b * T * Ck;
        for (int64_t i = 0; i < T * Ck; ++i) put(o + i, gv[i], dv_accumulate);
      }
    }
  });
}

}  // namespace deeplora::kernels::cpu
