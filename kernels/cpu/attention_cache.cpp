// CPU reference twins of kernels/attention_cache.h: cache writes, cached causal attention computed in
// double exactly as cpu::attention_fwd does (same order, so f64 results match it bit for bit), and
// the row argmax.
#include "kernels/attention_cache.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/cpu_common.h"

namespace deeplora::kernels::cpu {
namespace {

void check_shape(const char* op, int64_t B, int64_t Tn, int64_t C, int64_t H, int64_t Tmax) {
  if (B < 0 || Tn < 0 || Tmax < 0 || C <= 0 || H <= 0 || C % H != 0)
    throw std::invalid_argument(fmt::format(
        "kernels::cpu::{}: need B, Tn, Tmax >= 0 and C > 0 divisible by H > 0 (got B={} Tn={} C={} H={} Tmax={})",
        op, B, Tn, C, H, Tmax));
}

}  // namespace

void attention_cache_write(DType dt, const void* qkv, void* kcache, void* vcache, const int32_t* start, int64_t B,
                           int64_t Tn, int64_t C, int64_t H, int64_t Tmax, cudaStream_t) {
  check_shape("attention_cache_write", B, Tn, C, H, Tmax);
  float_dispatch(dt, "attention_cache_write", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const int64_t hd = C / H;
    const E* x = static_cast<const E*>(qkv);
    E* kc = static_cast<E*>(kcache);
    E* vc = static_cast<E*>(vcache);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t p = int64_t(start[b]) + t;
        if (p < 0 || p >= Tmax) continue;
        const E* row = x + (b * Tn + t) * 3 * C;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t at = ((b * H + h) * Tmax + p) * hd;
          std::copy(row + C + h * hd, row + C + (h + 1) * hd, kc + at);
          std::copy(row + 2 * C + h * hd, row + 2 * C + (h + 1) * hd, vc + at);
        }
      }
  });
}

// Per (b, h, t): s_j = scale q.k_j for j <= min(p, Tmax-1); out = sum_j exp(s_j - lse) v_j.
void attention_cache_fwd(DType dt, const void* qkv, const void* kcache, const void* vcache, const int32_t* start,
                         void* out, int64_t B, int64_t Tn, int64_t C, int64_t H, int64_t Tmax, cudaStream_t) {
  check_shape("attention_cache_fwd", B, Tn, C, H, Tmax);
  float_dispatch(dt, "attention_cache_fwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const int64_t hd = C / H;
    const double scale = 1.0 / std::sqrt(double(hd));
    const E* kc = static_cast<const E*>(kcache);
    const E* vc = static_cast<const E*>(vcache);
    std::vector<double> q(size_t(hd), 0.0), o(size_t(hd), 0.0), sc(size_t(std::max<int64_t>(Tmax, 1)), 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < Tn; ++t) {
          const int64_t p = int64_t(start[b]) + t, last = std::min(p, Tmax - 1);
          const E* qr = static_cast<const E*>(qkv) + (b * Tn + t) * 3 * C + h * hd;
          for (int64_t c = 0; c < hd; ++c) q[c] = ld(qr[c]);
          const E* kh = kc + (b * H + h) * Tmax * hd;
          const E* vh = vc + (b * H + h) * Tmax * hd;
          double mx = -INFINITY;
          for (int64_t j = 0; j <= last; ++j) {
            double d = 0.0;
            for (int64_t c = 0; c < hd; ++c) d += q[c] * ld(kh[j * hd + c]);
            sc[j] = scale * d;
            mx = std::max(mx, sc[j]);
          }
          std::fill(o.begin(), o.end(), 0.0);
          if (last >= 0) {
            double se = 0.0;
            for (int64_t j = 0; j <= last; ++j) se += std::exp(sc[j] - mx);
            const double l = mx + std::log(se);
            for (int64_t j = 0; j <= last; ++j) {
              const double pj = std::exp(sc[j] - l);
              for (int64_t c = 0; c < hd; ++c) o[c] += pj * ld(vh[j * hd + c]);
            }
          }
          E* po = static_cast<E*>(out) + (b * Tn + t) * C + h * hd;
          for (int64_t c = 0; c < hd; ++c) po[c] = st<E>(o[c]);
        }
  });
}

void argmax_rows(DType dt, const void* x, int64_t rows, int64_t n_valid, int64_t row_stride, int32_t* out,
                 cudaStream_t) {
  if (rows < 0 || n_valid < 1 || row_stride < n_valid || n_valid > int64_t(INT32_MAX))
    throw std::invalid_argument(fmt::format(
        "kernels::cpu::argmax_rows: need rows >= 0 and 1 <= n_valid <= row_stride (got rows={} n_valid={} "
        "row_stride={})",
        rows, n_valid, row_stride));
  float_dispatch(dt, "argmax_rows", [&](auto tag) {
    using E = typename decltype(tag)::type;
    for (int64_t r = 0; r < rows; ++r) {
      const E* xr = static_cast<const E*>(x) + r * row_stride;
      int64_t best = -1;
      double bv = 0.0;
      for (int64_t i = 0; i < n_valid; ++i) {
        const double v = ld(xr[i]);
        if (!std::isnan(v) && (best < 0 || v > bv)) best = i, bv = v;
      }
      out[r] = int32_t(std::max<int64_t>(best, 0));
    }
  });
}

}  // namespace deeplora::kernels::cpu
