// CPU reference of the Deep LoRA product kernels (kernels/adapter.h): plain loops accumulating in
// double, each output rounded once.
#include "kernels/adapter.h"

#include <vector>

#include "kernels/cpu/cpu_common.h"

namespace deeplora::kernels::cpu {
namespace {

using Mat = std::vector<double>;  // k x k, row-major

template <class T> Mat load(const void* p, int64_t n) {
  Mat m(static_cast<size_t>(n));
  const T* t = static_cast<const T*>(p);
  for (int64_t i = 0; i < n; ++i) m[size_t(i)] = ld(t[i]);
  return m;
}

// C = op(A) op(B), k x k; op transposes when the flag is set.
Mat mm(const Mat& A, bool ta, const Mat& B, bool tb, int64_t k) {
  Mat C(size_t(k * k), 0.0);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      double s = 0;
      for (int64_t l = 0; l < k; ++l) s += (ta ? A[size_t(l * k + i)] : A[size_t(i * k + l)]) * (tb ? B[size_t(j * k + l)] : B[size_t(l * k + j)]);
      C[size_t(i * k + j)] = s;
    }
  return C;
}

void check_chain(const char* op, const DeepLoraChain& c) {
  if (c.k <= 0 || c.n <= 0 || c.depth < 1 || c.depth > kDeepLoraMaxDepth)
    throw std::invalid_argument(fmt::format("kernels::cpu::{}: k {}, n {}, depth {} (1..{})", op, c.k, c.n, c.depth,
                                            kDeepLoraMaxDepth));
}

}  // namespace

void deeplora_chain_fwd(DType master, DType compute, const DeepLoraChain& c, cudaStream_t) {
  check_chain("deeplora_chain_fwd", c);
  const int64_t k = c.k, n = c.n;
  float_dispatch(master, "deeplora_chain_fwd", [&](auto mt) {
    using T = typename decltype(mt)::type;
    Mat P = load<T>(c.K[0], k * k);
    for (int i = 1; i < c.depth; ++i) P = mm(load<T>(c.K[i], k * k), false, P, false, k);
    for (int64_t i = 0; i < k * k; ++i) static_cast<T*>(c.P)[i] = st<T>(P[size_t(i)]);
    const T* Bt = static_cast<const T*>(c.Bt);
    float_dispatch(compute, "deeplora_chain_fwd", [&](auto ct) {
      using C = typename decltype(ct)::type;
      C* W = static_cast<C*>(c.W);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double s = 0;
          for (int64_t l = 0; l < k; ++l) s += P[size_t(i * k + l)] * ld(Bt[l * n + j]);
          W[i * n + j] = st<C>(s);
        }
    });
  });
}

void deeplora_chain_bwd(DType master, DType compute, const DeepLoraChain& c, void*, cudaStream_t) {
  check_chain("deeplora_chain_bwd", c);
  const int64_t k = c.k, n = c.n;
  float_dispatch(master, "deeplora_chain_bwd", [&](auto mt) {
    using T = typename decltype(mt)::type;
    const Mat P = load<T>(c.P, k * k), Bt = load<T>(c.Bt, k * n);
    Mat gW;
    float_dispatch(compute, "deeplora_chain_bwd", [&](auto ct) { gW = load<typename decltype(ct)::type>(c.gW, k * n); });
    if (c.gBt) {  // gBt += Pᵀ gW
      T* g = static_cast<T*>(c.gBt);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double s = 0;
          for (int64_t l = 0; l < k; ++l) s += P[size_t(l * k + i)] * gW[size_t(l * n + j)];
          g[i * n + j] = st<T>(ld(g[i * n + j]) + s);
        }
    }
    // G = gW Btᵀ (the gradient of P), then down the chain: gK_i = G_i P_{i-1}ᵀ, G_{i-1} = K_iᵀ G_i.
    Mat G(size_t(k * k), 0.0);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        double s = 0;
        for (int64_t l = 0; l < n; ++l) s += gW[size_t(i * n + l)] * Bt[size_t(j * n + l)];
        G[size_t(i * k + j)] = s;
      }
    std::vector<Mat> prefix(size_t(c.depth));  // prefix[i] = K_i...K_1 (prefix[0] unused: I)
    for (int i = 1; i < c.depth; ++i) {
      const Mat Ki = load<T>(c.K[i - 1], k * k);
      prefix[size_t(i)] = i == 1 ? Ki : mm(Ki, false, prefix[size_t(i - 1)], false, k);
    }
    for (int i = c.depth; i >= 1; --i) {
      if (c.gK[i - 1]) {
        const Mat g = i == 1 ? G : mm(G, false, prefix[size_t(i - 1)], true, k);
        T* out = static_cast<T*>(c.gK[i - 1]);
        for (int64_t e = 0; e < k * k; ++e) out[e] = st<T>(ld(out[e]) + g[size_t(e)]);
      }
      if (i > 1) G = mm(load<T>(c.K[i - 1], k * k), true, G, false, k);
    }
  });
}

}  // namespace deeplora::kernels::cpu
