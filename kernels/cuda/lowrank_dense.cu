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

// C = op(A)·op(B) for `count` independent k x k products at once (A, B null: the identity); every
// matrix has leading dimension ld = k + 1 (odd for even k: the transposed reads hit distinct banks).
template <class T> struct MM {
  const T* A;
  bool ta;
  const T* B;
  bool tb;
  T* C;
};
template <class T> __device__ void mm_pass(const MM<T>* items, int count, int k) {
  const int kk = k * k, ld = k + 1;
  for (int e = threadIdx.x; e < count * kk; e += blockDim.x) {
    const MM<T>& m = items[e / kk];
    const int i = (e % kk) / k, j = e % k;
    T s = 0;
    for (int c = 0; c < k; ++c) {
      const T a = m.A ? (m.ta ? m.A[c * ld + i] : m.A[i * ld + c]) : T(i == c);
      const T b = m.B ? (m.tb ? m.B[j * ld + c] : m.B[c * ld + j]) : T(c == j);
      s = fma(a, b, s);
    }
    m.C[i * ld + j] = s;
  }
  __syncthreads();
}

// Matrices of the update, each k x (k + 1): the current K_l (L), gKp (1), prefixes K_l⋯K_1 for
// l = 2..L-1 and suffixes K_L⋯K_l for l = 2..L-1 (L - 2 each), T_l = suffix_{l+1}ᵀ·gKp (L), the new
// K_l (L). In shared memory when they fit, else in the caller's work buffer.
__host__ __device__ inline int k_update_mats(int L) { return L >= 2 ? 5 * L - 3 : 4; }

template <class T>
__global__ void k_update_kernel(KChain ks, const T* __restrict__ gKp, T lr, T* __restrict__ Kp, T* gwork, bool in_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ MM<T> items[kKChainMaxL];
  const int L = int(ks.L), k = int(ks.k), kk = k * k, ld = k + 1, M = k * ld;
  T* w = in_smem ? reinterpret_cast<T*>(smem_raw) : gwork;
  T* sK = w;                      // L
  T* sG = sK + L * M;             // 1
  T* pre = sG + M;                // L - 2: pre[l - 2] = K_l⋯K_1, l = 2..L-1
  T* suf = pre + (L >= 2 ? (L - 2) : 0) * M;  // L - 2: suf[l - 2] = K_L⋯K_l, l = 2..L-1
  T* tmp = suf + (L >= 2 ? (L - 2) : 0) * M;  // L
  T* nK = tmp + L * M;            // L
  for (int e = threadIdx.x; e < L * kk; e += blockDim.x) {
    const int l = e / kk, x = e % kk;
    sK[l * M + (x / k) * ld + x % k] = static_cast<const T*>(ks.K[l])[x];
  }
  if (lr != T(0))
    for (int x = threadIdx.x; x < kk; x += blockDim.x) sG[(x / k) * ld + x % k] = gKp[x];
  __syncthreads();
  auto Kl = [&](int l) -> const T* { return sK + (l - 1) * M; };  // 1-based
  auto P = [&](int l) -> const T* { return l == 0 ? nullptr : l == 1 ? Kl(1) : pre + (l - 2) * M; };
  auto S = [&](int l) -> const T* { return l == L + 1 ? nullptr : l == L ? Kl(L) : suf + (l - 2) * M; };
  const T* cur_K = sK;  // the factors the product is formed from
  if (lr != T(0)) {
    // Prefix and suffix chains side by side: step s forms K_{s+1}⋯K_1 and K_L⋯K_{L-s}.
    for (int s = 1; s <= L - 2; ++s) {
      if (threadIdx.x == 0) {
        items[0] = MM<T>{Kl(s + 1), false, P(s), false, pre + (s - 1) * M};
        items[1] = MM<T>{S(L - s + 1), false, Kl(L - s), false, suf + (L - s - 2) * M};
      }
      __syncthreads();
      mm_pass(items, 2, k);
    }
    if (threadIdx.x < L) items[threadIdx.x] = MM<T>{S(threadIdx.x + 2), true, sG, false, tmp + threadIdx.x * M};
    __syncthreads();
    mm_pass(items, L, k);
    if (threadIdx.x < L) items[threadIdx.x] = MM<T>{tmp + threadIdx.x * M, false, P(threadIdx.x), true, nK + threadIdx.x * M};
    __syncthreads();
    mm_pass(items, L, k);  // nK_l = ∂f/∂K_l
    for (int e = threadIdx.x; e < L * kk; e += blockDim.x) {
      const int l = e / kk, x = e % kk, o = l * M + (x / k) * ld + x % k;
      const T v = sK[o] - lr * nK[o];
      nK[o] = v;
      static_cast<T*>(ks.K[l])[x] = v;
    }
    __syncthreads();
    cur_K = nK;
  }
  auto C = [&](int l) -> const T* { return cur_K + (l - 1) * M; };
  const T* cur = C(1);
  for (int l = 2; l <= L; ++l) {
    T* dst = tmp + (l % 2) * M;
    if (threadIdx.x == 0) items[0] = MM<T>{C(l), false, cur, false, dst};
    __syncthreads();
    mm_pass(items, 1, k);
    cur = dst;
  }
  for (int x = threadIdx.x; x < kk; x += blockDim.x) Kp[x] = cur[(x / k) * ld + x % k];
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
  if (ks.L < 1 || ks.L > kKChainMaxL || ks.k < 1 || ks.k > 1024)
    throw std::invalid_argument("kernels::cuda::lowrank_k_update: L must be in [1, 16] and k in [1, 1024]");
  f32_f64(dt, "lowrank_k_update", [&](auto z) {
    using T = decltype(z);
    constexpr size_t kMaxSmem = 220 * 1024;  // within the 227 KiB a block may opt into on sm_90
    static const bool opted = [] {
      CUDA_CHECK(cudaFuncSetAttribute(k_update_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kMaxSmem)));
      return true;
    }();
    (void)opted;
    const size_t bytes = size_t(k_update_mats(int(ks.L))) * size_t(ks.k) * size_t(ks.k + 1) * sizeof(T);
    const bool in_smem = bytes <= kMaxSmem;
    const int threads = int(std::min<int64_t>(1024, std::max<int64_t>(64, (ks.k * ks.k * ks.L + 31) / 32 * 32)));
    k_update_kernel<T><<<1, threads, in_smem ? bytes : 0, s>>>(ks, static_cast<const T*>(gKp), T(lr),
                                                              static_cast<T*>(Kp), static_cast<T*>(work), in_smem);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace deeplora::kernels::cuda
