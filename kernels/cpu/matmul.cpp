// CPU reference twins of kernels/matmul.h: blocked GEMM with double accumulation, and causal
// multi-head attention computed naively per (batch, head, query) in double.
#include "kernels/matmul.h"
#include "kernels/cpu/cpu_common.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <thread>
#include <vector>

#ifdef DEEPLORA_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace deeplora::kernels::cpu {
namespace {


void check_gemm(const Gemm& g) {
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument(fmt::format(
        "kernels::cpu::gemm (M={} N={} K={} ta={} tb={} lda={} ldb={} ldc={}): {}", g.M, g.N, g.K,
        g.ta, g.tb, g.lda, g.ldb, g.ldc, what));
  };
  if (g.M < 0 || g.N < 0 || g.K < 0 || g.batch < 0) fail("negative size");
  if (g.M == 0 || g.N == 0 || g.batch == 0) return;
  if (g.K > 0 && g.lda < (g.ta ? g.M : g.K)) fail("lda is smaller than the row length of A");
  if (g.K > 0 && g.ldb < (g.tb ? g.K : g.N)) fail("ldb is smaller than the row length of B");
  if (g.ldc < g.N) fail("ldc is smaller than N");
  if (!g.C) fail("C is null");
}

// Per batch entry and per tile of NB columns: acc[M][nb] in double over K in chunks of KB, with
// the B chunk packed (transposed if tb) into a contiguous double tile so the inner loop is a
// unit-stride axpy. Cin (C when null) is read only when beta != 0, so it may hold garbage (NaN)
// for beta == 0; each element of Cin is read before the same element of C is written, so Cin may
// be C.
template <class T> void gemm_typed(const Gemm& g) {
  constexpr int64_t NB = 256, KB = 128;
  const int64_t M = g.M, N = g.N, K = g.K;
  std::vector<double> acc, bt(size_t(KB * NB), 0.0);
  const T* bias = static_cast<const T*>(g.bias);
  for (int64_t bi = 0; bi < g.batch; ++bi) {
    const T* A = static_cast<const T*>(g.A) + bi * g.strideA;
    const T* B = static_cast<const T*>(g.B) + bi * g.strideB;
    T* C = static_cast<T*>(g.C) + bi * g.strideC;
    const T* Cin = static_cast<const T*>(g.Cin ? g.Cin : g.C) + bi * g.strideC;
    for (int64_t n0 = 0; n0 < N; n0 += NB) {
      const int64_t nb = std::min(NB, N - n0);
      acc.assign(size_t(M * nb), 0.0);
      for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const int64_t kb = std::min(KB, K - k0);
        for (int64_t kk = 0; kk < kb; ++kk)
          for (int64_t j = 0; j < nb; ++j)
            bt[kk * nb + j] = ld(g.tb ? B[(n0 + j) * g.ldb + (k0 + kk)]
                                      : B[(k0 + kk) * g.ldb + (n0 + j)]);
        for (int64_t i = 0; i < M; ++i) {
          double* ar = acc.data() + i * nb;
          for (int64_t kk = 0; kk < kb; ++kk) {
            const double a = ld(g.ta ? A[(k0 + kk) * g.lda + i] : A[i * g.lda + (k0 + kk)]);
            const double* br = bt.data() + kk * nb;
            for (int64_t j = 0; j < nb; ++j) ar[j] += a * br[j];
          }
        }
      }
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t at = i * g.ldc + n0 + j;
          double v = g.alpha * acc[i * nb + j];
          if (g.beta != 0.0) v += g.beta * ld(Cin[at]);
          if (bias) v += ld(bias[n0 + j]);
          C[at] = st<T>(v);
        }
    }
  }
}

#ifdef DEEPLORA_HAVE_OPENBLAS
// f32 through cblas_sgemm (f32 accumulation, blocked and threaded by OpenBLAS): C = alpha op(A)
// op(B) + beta Cin (+ bias). An addend apart from C is copied into C first; beta = 0 never reads C.
void gemm_blas_f32(const Gemm& g) {
  const float* bias = static_cast<const float*>(g.bias);
  for (int64_t bi = 0; bi < g.batch; ++bi) {
    const float* A = static_cast<const float*>(g.A) + bi * g.strideA;
    const float* B = static_cast<const float*>(g.B) + bi * g.strideB;
    float* C = static_cast<float*>(g.C) + bi * g.strideC;
    if (g.beta != 0.0 && g.Cin && g.Cin != g.C) {
      const float* Cin = static_cast<const float*>(g.Cin) + bi * g.strideC;
      for (int64_t i = 0; i < g.M; ++i) std::memmove(C + i * g.ldc, Cin + i * g.ldc, size_t(g.N) * sizeof(float));
    }
    cblas_sgemm(CblasRowMajor, g.ta ? CblasTrans : CblasNoTrans, g.tb ? CblasTrans : CblasNoTrans, int(g.M), int(g.N),
                int(g.K), float(g.alpha), A, int(g.lda), B, int(g.ldb), float(g.beta), C, int(g.ldc));
    if (bias)
      for (int64_t i = 0; i < g.M; ++i)
        for (int64_t j = 0; j < g.N; ++j) C[i * g.ldc + j] += bias[j];
  }
}
#endif

void check_attention(const char* op, int64_t B, int64_t T, int64_t C, int64_t H) {
  if (B < 0 || T < 0 || C <= 0 || H <= 0 || C % H != 0)
    throw std::invalid_argument(fmt::format(
        "kernels::cpu::{}: need C > 0 divisible by H > 0 (got B={} T={} C={} H={})", op, B, T, C,
        H));
}

}  // namespace

void gemm(const Gemm& g, cudaStream_t) {
  check_gemm(g);
  if (g.M == 0 || g.N == 0 || g.batch == 0) return;
#ifdef DEEPLORA_HAVE_OPENBLAS
  if (g.dt == DType::f32 && g.K > 0 && g.M * g.N * g.K >= 4096 && std::max({g.M, g.N, g.K, g.lda, g.ldb, g.ldc}) < (int64_t(1) << 31))
    return gemm_blas_f32(g);
#endif
  // Rows of C are independent: large products are split into row ranges, one thread each. Every
  // element is still summed by one thread in the same order, so results do not depend on threads.
  const int64_t work = g.batch * g.M * g.N * std::max<int64_t>(g.K, 1);
  const int64_t nt = std::min<int64_t>({int64_t(std::max(1u, std::thread::hardware_concurrency())), g.M,
                                        work >= (int64_t(1) << 22) ? 64 : 1});
  float_dispatch(g.dt, "gemm", [&](auto tag) {
    using E = typename decltype(tag)::type;
    if (nt <= 1) return gemm_typed<E>(g);
    std::vector<std::thread> pool;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t i0 = g.M * t / nt, i1 = g.M * (t + 1) / nt;
      Gemm part = g;
      part.M = i1 - i0;
      part.A = static_cast<const E*>(g.A) + (g.ta ? i0 : i0 * g.lda);  // op(A) rows i0..: columns of A when ta
      part.C = static_cast<E*>(g.C) + i0 * g.ldc;
      if (g.Cin) part.Cin = static_cast<const E*>(g.Cin) + i0 * g.ldc;
      pool.emplace_back([part] { gemm_typed<E>(part); });
    }
    for (auto& th : pool) th.join();
  });
}

size_t gemm_workspace_bytes() { return 0; }

// Per (b, h, t): scores s_j = scale q_t.k_j for j <= t; lse = logsumexp(s);
// out_t = sum_j exp(s_j - lse) v_j.
void attention_fwd(DType dt, const void* qkv, void* out, void* lse, int64_t B, int64_t T, int64_t C,
                   int64_t H, cudaStream_t) {
  check_attention("attention_fwd", B, T, C, H);
  float_dispatch(dt, "attention_fwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const int64_t hd = C / H, C3 = 3 * C;
    const double scale = 1.0 / std::sqrt(double(hd));
    std::vector<double> x(size_t(T * C3), 0.0), sc(size_t(T), 0.0), o(size_t(hd), 0.0);
    for (int64_t b = 0; b < B; ++b) {
      const E* src = static_cast<const E*>(qkv) + b * T * C3;
      for (int64_t i = 0; i < T * C3; ++i) x[i] = ld(src[i]);
      E* pout = static_cast<E*>(out) + b * T * C;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const double* q = x.data() + t * C3 + h * hd;
          double mx = -INFINITY;
          for (int64_t j = 0; j <= t; ++j) {
            const double* k = x.data() + j * C3 + C + h * hd;
            double d = 0.0;
            for (int64_t c = 0; c < hd; ++c) d += q[c] * k[c];
            sc[j] = scale * d;
            mx = std::max(mx, sc[j]);
          }
          double se = 0.0;
          for (int64_t j = 0; j <= t; ++j) se += std::exp(sc[j] - mx);
          const double l = mx + std::log(se);
          std::fill(o.begin(), o.end(), 0.0);
          for (int64_t j = 0; j <= t; ++j) {
            const double p = std::exp(sc[j] - l);
            const double* v = x.data() + j * C3 + 2 * C + h * hd;
            for (int64_t c = 0; c < hd; ++c) o[c] += p * v[c];
          }
          for (int64_t c = 0; c < hd; ++c) pout[t * C + h * hd + c] = st<E>(o[c]);
          if (lse) static_cast<S*>(lse)[(b * H + h) * T + t] = S(l);
        }
    }
  });
}

// P from the saved lse; D_t = dout_t.out_t; dS_tj = P_tj (dout_t.v_j - D_t);
// dq_t += scale sum_j dS_tj k_j; dk_j += scale dS_tj q_t; dv_j += P_tj dout_t.
// Gradients are summed in double per batch entry and added to (or written into) dqkv once.
void attention_bwd(DType dt, const void* qkv, const void* out, const void* lse, const void* dout,
                   void* dqkv, int64_t B, int64_t T, int64_t C, int64_t H, bool accumulate, cudaStream_t) {
  check_attention("attention_bwd", B, T, C, H);
  float_dispatch(dt, "attention_bwd", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using S = Stat<E>;
    const int64_t hd = C / H, C3 = 3 * C;
    const double scale = 1.0 / std::sqrt(double(hd));
    const S* plse = static_cast<const S*>(lse);
    std::vector<double> x(size_t(T * C3), 0.0), g(size_t(T * C3), 0.0);
    std::vector<double> p(size_t(T), 0.0), ds(size_t(T), 0.0);
    for (int64_t b = 0; b < B; ++b) {
      const E* src = static_cast<const E*>(qkv) + b * T * C3;
      const E* po = static_cast<const E*>(out) + b * T * C;
      const E* pdo = static_cast<const E*>(dout) + b * T * C;
      for (int64_t i = 0; i < T * C3; ++i) x[i] = ld(src[i]);
      std::fill(g.begin(), g.end(), 0.0);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const double* q = x.data() + t * C3 + h * hd;
          const E* dot = pdo + t * C + h * hd;
          const E* ot = po + t * C + h * hd;
          const double l = plse[(b * H + h) * T + t];
          double D = 0.0;
          for (int64_t c = 0; c < hd; ++c) D += ld(dot[c]) * ld(ot[c]);
          for (int64_t j = 0; j <= t; ++j) {
            const double* k = x.data() + j * C3 + C + h * hd;
            const double* v = x.data() + j * C3 + 2 * C + h * hd;
            double s = 0.0, dp = 0.0;
            for (int64_t c = 0; c < hd; ++c) {
              s += q[c] * k[c];
              dp += ld(dot[c]) * v[c];
            }
            p[j] = std::exp(scale * s - l);
            ds[j] = p[j] * (dp - D);
          }
          double* dq = g.data() + t * C3 + h * hd;
          for (int64_t j = 0; j <= t; ++j) {
            const double* k = x.data() + j * C3 + C + h * hd;
            double* dk = g.data() + j * C3 + C + h * hd;
            double* dv = g.data() + j * C3 + 2 * C + h * hd;
            for (int64_t c = 0; c < hd; ++c) {
              dq[c] += scale * ds[j] * k[c];
              dk[c] += scale * ds[j] * q[c];
              dv[c] += p[j] * ld(dot[c]);
            }
          }
        }
      E* pd = static_cast<E*>(dqkv) + b * T * C3;
      for (int64_t i = 0; i < T * C3; ++i) pd[i] = st<E>((accumulate ? ld(pd[i]) : 0.0) + g[i]);
    }
  });
}

}  // namespace deeplora::kernels::cpu
