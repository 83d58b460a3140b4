// CPU reference twins of kernels/lowrank_dense.h, in the order the CUDA kernels compute: every k x k
// product sums its inner index in ascending order in the element type.
#include "kernels/lowrank_dense.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/cpu/cpu_common.h"

namespace deeplora::kernels::cpu {
namespace {

template <class F> void f32_f64(DType dt, const char* fn, F&& f) {
  if (dt == DType::f64) f(Tag<double>{});
  else if (dt == DType::f32) f(Tag<float>{});
  else bad_dtype(fn, dt, "f32 or f64");
}

// C = op(A)·op(B), k x k row-major; A or B null stands for the identity.
template <class T> void mm(const T* A, bool ta, const T* B, bool tb, T* C, int64_t k) {
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      T s = 0;
      for (int64_t c = 0; c < k; ++c) {
        const T a = A ? (ta ? A[c * k + i] : A[i * k + c]) : T(i == c);
        const T b = B ? (tb ? B[j * k + c] : B[c * k + j]) : T(c == j);
        s += a * b;
      }
      C[i * k + j] = s;
    }
}

}  // namespace

void mask_scale_rows(DType dt, const uint32_t* bits, int64_t row0, int64_t rows, int64_t cols, double alpha, void* R,
                     int64_t ldr, cudaStream_t) {
  f32_f64(dt, "mask_scale_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t words = mask_words(cols);
    const T a = T(alpha);
    for (int64_t i = 0; i < rows; ++i) {
      const uint32_t* b = bits + (row0 + i) * words;
      T* r = static_cast<T*>(R) + i * ldr;
      for (int64_t j = 0; j < cols; ++j) r[j] = ((b[j >> 5] >> (j & 31)) & 1u) ? a * r[j] : T(0);
    }
  });
}

void lowrank_gram_partials(DType dt, const void* X, const void* Y, int64_t rows, int64_t k, int64_t nparts, void* out,
                           cudaStream_t) {
  if (nparts < 1) throw std::invalid_argument("kernels::cpu::lowrank_gram_partials: nparts must be >= 1");
  f32_f64(dt, "lowrank_gram_partials", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(X);
    const T* y = static_cast<const T*>(Y);
    const int64_t chunk = (rows + nparts - 1) / nparts;
    for (int64_t b = 0; b < nparts; ++b) {
      T* o = static_cast<T*>(out) + b * k * k;
      const int64_t r0 = std::min(rows, b * chunk), r1 = std::min(rows, r0 + chunk);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) {
          T s = 0;
          for (int64_t r = r0; r < r1; ++r) s += x[r * k + i] * y[r * k + j];
          o[i * k + j] = s;
        }
    }
  });
}

void axpy_copy_cols(DType dt, void* p, const void* g, double lr, int64_t rows, int64_t k, void* dst, int64_t dst_ld,
                    cudaStream_t) {
  f32_f64(dt, "axpy_copy_cols", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* pp = static_cast<T*>(p);
    const T* gg = static_cast<const T*>(g);
    T* d = static_cast<T*>(dst);
    const T a = T(lr);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < k; ++c) {
        const T v = pp[i * k + c] - a * gg[i * k + c];
        pp[i * k + c] = v;
        d[i * dst_ld + c] = v;
      }
  });
}

void lowrank_k_update(DType dt, const KChain& ks, const void* gKp_parts, int64_t nparts, double lr, void* Kp,
                      void* work, cudaStream_t) {
  const int64_t L = ks.L, k = ks.k, kk = k * k;
  if (L < 1 || L > kKChainMaxL || k < 1)
    throw std::invalid_argument("kernels::cpu::lowrank_k_update: L must be in [1, 16] and k >= 1");
  if (lr != 0.0 && nparts < 1) throw std::invalid_argument("kernels::cpu::lowrank_k_update: nparts must be >= 1");
  f32_f64(dt, "lowrank_k_update", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* w = static_cast<T*>(work);
    auto K = [&](int64_t l) { return static_cast<T*>(ks.K[l - 1]); };  // 1-based
    T* pre = w;                 // pre[l - 1] = K_l⋯K_1, l = 1..L-1
    T* suf = w + L * kk;        // suf[l - 1] = K_L⋯K_l, l = 2..L
    T* tmp = w + 2 * L * kk;    // tmp[l - 1] = suf(l+1)ᵀ·gKp
    T* g = w + 3 * L * kk;      // g[l - 1] = ∂f/∂K_l
    T* chain = w + 4 * L * kk;  // two buffers for the new product
    T* gk = w + (4 * L + 2) * kk;
    auto P = [&](int64_t l) -> const T* { return l == 0 ? nullptr : l == 1 ? K(1) : pre + (l - 1) * kk; };
    auto S = [&](int64_t l) -> const T* { return l == L + 1 ? nullptr : l == L ? K(L) : suf + (l - 1) * kk; };
    if (lr != 0.0) {
      const T* parts = static_cast<const T*>(gKp_parts);
      for (int64_t e = 0; e < kk; ++e) {
        T v = 0;
        for (int64_t b = 0; b < nparts; ++b) v += parts[b * kk + e];
        gk[e] = v;
      }
      for (int64_t s = 1; s + 1 <= L - 1; ++s) mm(K(s + 1), false, P(s), false, pre + s * kk, k);
      for (int64_t l = L - 1; l >= 2; --l) mm(S(l + 1), false, K(l), false, suf + (l - 1) * kk, k);
      for (int64_t l = 1; l <= L; ++l) mm(S(l + 1), true, gk, false, tmp + (l - 1) * kk, k);
      for (int64_t l = 1; l <= L; ++l) mm(tmp + (l - 1) * kk, false, P(l - 1), true, g + (l - 1) * kk, k);
      const T lrt = T(lr);
      for (int64_t l = 1; l <= L; ++l)
        for (int64_t e = 0; e < kk; ++e) K(l)[e] -= lrt * g[(l - 1) * kk + e];
    }
    T* out = static_cast<T*>(Kp);
    if (L == 1) {
      for (int64_t e = 0; e < kk; ++e) out[e] = K(1)[e];
      return;
    }
    const T* cur = K(1);
    for (int64_t l = 2; l <= L; ++l) {
      T* dst = l == L ? out : chain + (l % 2) * kk;
      mm(K(l), false, cur, false, dst, k);
      cur = dst;
    }
  });
}

}  // namespace deeplora::kernels::cpu
