// CUDA kernels of kernels/lowrank_dense.h. The mask pass is memory bound (one read and one write of
// each residual, 1/64 of that for the bits); the K update is one block running the same passes as the
// CPU twin, each k x k element of a product owned by one thread that sums in ascending order.
#include <cuda_runtime.h>

#include <stdexcept>

#include "kernels/cuda/cuda_utils.cuh"
#include "kernels/lowrank_dense.h"

namespace deeplora::kernels::cuda {
namespace {

using namespace util;

template <class F> void f32_f64(DType dt, const char* fn, F&& f) {
  if (dt == DType::f64) f(double{});
  else if (dt == DType::f32) f(float{});
  else bad_dtype(fn, dt);
}

template <class T>
__global__ void mask_scale_kernel(const uint32_t* __restrict__ bits, int64_t words, int64_t row0, int64_t rows,
                                  int64_t cols, T alpha, T* __restrict__ R, int64_t ldr) {
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const uint32_t* b = bits + (row0 + i) * words;
    T* r = R + i * ldr;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += int64_t(gridDim.x) * blockDim.x)
      r[j] = ((__ldg(b + (j >> 5)) >> (j & 31)) & 1u) ? alpha * r[j] : T(0);
  }
}

// C = op(A)·op(B) for `count` independent k x k products at once (A, B null: the identity).
template <class T> struct MM {
  const T* A;
  bool ta;
  const T* B;
  bool tb;
  T* C;
};
template <class T> __device__ void mm_pass(const MM<T>* items, int count, int64_t k) {
  const int64_t kk = k * k;
  for (int64_t e = threadIdx.x; e < count * kk; e += blockDim.x) {
    const MM<T>& m = items[e / kk];
    const int64_t i = (e % kk) / k, j = e % k;
    T s = 0;
    for (int64_t c = 0; c < k; ++c) {
      const T a = m.A ? (m.ta ? m.A[c * k + i] : m.A[i * k + c]) : T(i == c);
      const T b = m.B ? (m.tb ? m.B[j * k + c] : m.B[c * k + j]) : T(c == j);
      s = fma(a, b, s);
    }
    m.C[e % kk] = s;
  }
  __syncthreads();
}

template <class T> __global__ void k_update_kernel(KChain ks, const T* __restrict__ gKp, T lr, T* Kp, T* w) {
  __shared__ MM<T> items[kKChainMaxL];
  const int64_t L = ks.L, k = ks.k, kk = k * k;
  auto K = [&](int64_t l) { return static_cast<T*>(ks.K[l - 1]); };
  T* pre = w;
  T* suf = w + L * kk;
  T* tmp = w + 2 * L * kk;
  T* g = w + 3 * L * kk;
  T* chain = w + 4 * L * kk;
  auto P = [&](int64_t l) -> const T* { return l == 0 ? nullptr : l == 1 ? K(1) : pre + (l - 1) * kk; };
  auto S = [&](int64_t l) -> const T* { return l == L + 1 ? nullptr : l == L ? K(L) : suf + (l - 1) * kk; };
  auto run = [&](int count) {
    __syncthreads();
    mm_pass(items, count, k);
  };
  if (lr != T(0)) {
    // Prefix and suffix chains side by side: step s forms K_{s+1}⋯K_1 and K_L⋯K_{L-s}.
    for (int64_t s = 1; s <= L - 2; ++s) {
      if (threadIdx.x == 0) {
        items[0] = MM<T>{K(s + 1), false, P(s), false, pre + s * kk};
        items[1] = MM<T>{S(L - s + 1), false, K(L - s), false, suf + (L - s - 1) * kk};
      }
      run(2);
    }
    if (threadIdx.x < L) {
      const int64_t l = threadIdx.x + 1;
      items[l - 1] = MM<T>{S(l + 1), true, gKp, false, tmp + (l - 1) * kk};
    }
    run(int(L));
    if (threadIdx.x < L) {
      const int64_t l = threadIdx.x + 1;
      items[l - 1] = MM<T>{tmp + (l - 1) * kk, false, P(l - 1), true, g + (l - 1) * kk};
    }
    run(int(L));
    for (int64_t e = threadIdx.x; e < L * kk; e += blockDim.x) K(e / kk + 1)[e % kk] -= lr * g[e];
    __syncthreads();
  }
  if (L == 1) {
    for (int64_t e = threadIdx.x; e < kk; e += blockDim.x) Kp[e] = K(1)[e];
    return;
  }
  const T* cur = K(1);
  for (int64_t l = 2; l <= L; ++l) {
    T* dst = l == L ? Kp : chain + (l % 2) * kk;
    if (threadIdx.x == 0) items[0] = MM<T>{K(l), false, cur, false, dst};
    run(1);
    cur = dst;
  }
}

}  // namespace

void mask_scale_rows(DType dt, const uint32_t* bits, int64_t row0, int64_t rows, int64_t cols, double alpha, void* R,
                     int64_t ldr, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return;
  f32_f64(dt, "mask_scale_rows", [&](auto z) {
    using T = decltype(z);
    constexpr int threads = 256;
    const unsigned gx = grid_for(cols, threads, 16);
    const unsigned gy = unsigned(std::min<int64_t>(rows, std::max<int64_t>(1, 8192 / gx)));
    mask_scale_kernel<T><<<dim3(gx, gy), threads, 0, s>>>(bits, mask_words(cols), row0, rows, cols, T(alpha),
                                                          static_cast<T*>(R), ldr);
    CUDA_CHECK_LAUNCH();
  });
}

void lowrank_k_update(DType dt, const KChain& ks, const void* gKp, double lr, void* Kp, void* work, cudaStream_t s) {
  if (ks.L < 1 || ks.L > kKChainMaxL || ks.k < 1)
    throw std::invalid_argument("kernels::cuda::lowrank_k_update: L must be in [1, 16] and k >= 1");
  f32_f64(dt, "lowrank_k_update", [&](auto z) {
    using T = decltype(z);
    const int threads = int(std::min<int64_t>(1024, std::max<int64_t>(32, (ks.k * ks.k * ks.L + 31) / 32 * 32)));
    k_update_kernel<T><<<1, threads, 0, s>>>(ks, static_cast<const T*>(gKp), T(lr), static_cast<T*>(Kp),
                                              static_cast<T*>(work));
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace deeplora::kernels::cuda
