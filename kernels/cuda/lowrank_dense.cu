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

// C = op(A)·op(B) for `count` independent k x k products at once; every matrix has leading dimension
// ld = k + 1 (odd for even k, so transposed reads spread over the banks). Each thread owns a 4 x 4
// tile of one product (rows and columns past k are clamped on load and not stored) and sums over the
// inner index in ascending order: 8 shared loads per 16 multiply-adds.
template <class T> struct MM {
  const T* A;
  bool ta;
  const T* B;
  bool tb;
  T* C;
};
template <class T> __device__ void mm_pass(const MM<T>* items, int count, int k) {
  const int ld = k + 1, tpr = (k + 3) / 4, nt = tpr * tpr;
  for (int t = threadIdx.x; t < count * nt; t += blockDim.x) {
    const MM<T> m = items[t / nt];
    const int tile = t % nt, i0 = (tile / tpr) * 4, j0 = (tile % tpr) * 4;
    const int ai = m.ta ? 1 : ld, ac = m.ta ? ld : 1, bc = m.tb ? 1 : ld, bj = m.tb ? ld : 1;
    const T* pa[4];
    const T* pb[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      pa[u] = m.A + min(i0 + u, k - 1) * ai;
      pb[u] = m.B + min(j0 + u, k - 1) * bj;
    }
    T acc[4][4] = {};
    for (int c = 0; c < k; ++c) {
      T a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = pa[u][c * ac];
        b[u] = pb[u][c * bc];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = fma(a[u], b[v], acc[u][v]);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v)
        if (i0 + u < k && j0 + v < k) m.C[(i0 + u) * ld + j0 + v] = acc[u][v];
  }
  __syncthreads();
}

// Matrices of the update, each k x (k + 1): the current K_l (L), gKp (1), the identity (1), prefixes
// K_l⋯K_1 for l = 2..L-1 and suffixes K_L⋯K_l for l = 2..L-1 (L - 2 each), T_l = suffix_{l+1}ᵀ·gKp
// (L), the new K_l (L). In shared memory when they fit, else in the caller's work buffer.
__host__ __device__ inline int k_update_mats(int L) { return L >= 2 ? 5 * L - 2 : 5; }

template <class T>
__global__ void __launch_bounds__(512) k_update_kernel(KChain ks, const T* __restrict__ parts, int nparts, T lr, T* __restrict__ Kp, T* gwork,
                                bool in_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ MM<T> items[kKChainMaxL];
  const int L = int(ks.L), k = int(ks.k), kk = k * k, ld = k + 1, M = k * ld;
  T* w = in_smem ? reinterpret_cast<T*>(smem_raw) : gwork;
  T* sK = w;                                   // L
  T* sG = sK + L * M;                          // 1
  T* sI = sG + M;                              // 1
  T* pre = sI + M;                             // L - 2: pre[l - 2] = K_l⋯K_1, l = 2..L-1
  T* suf = pre + (L >= 2 ? (L - 2) : 0) * M;   // L - 2: suf[l - 2] = K_L⋯K_l, l = 2..L-1
  T* tmp = suf + (L >= 2 ? (L - 2) : 0) * M;   // L (at least 1)
  T* nK = tmp + L * M;                         // L
  for (int e = threadIdx.x; e < L * kk; e += blockDim.x) {
    const int l = e / kk, x = e % kk;
    sK[l * M + (x / k) * ld + x % k] = static_cast<const T*>(ks.K[l])[x];
  }
  for (int x = threadIdx.x; x < kk; x += blockDim.x) {
    const int i = x / k, j = x % k;
    sI[i * ld + j] = T(i == j);
    if (lr != T(0)) {
      T v = 0;
      for (int b = 0; b < nparts; ++b) v += parts[b * kk + x];
      sG[i * ld + j] = v;
    }
  }
  __syncthreads();
  auto Kl = [&](int l) -> const T* { return sK + (l - 1) * M; };  // 1-based
  auto P = [&](int l) -> const T* { return l == 0 ? sI : l == 1 ? Kl(1) : pre + (l - 2) * M; };
  auto S = [&](int l) -> const T* { return l == L + 1 ? sI : l == L ? Kl(L) : suf + (l - 2) * M; };
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
    T* dst = l % 2 ? sG : tmp;  // sG and tmp are free by now
    if (threadIdx.x == 0) items[0] = MM<T>{C(l), false, cur, false, dst};
    __syncthreads();
    mm_pass(items, 1, k);
    cur = dst;
  }
  for (int x = threadIdx.x; x < kk; x += blockDim.x) Kp[x] = cur[(x / k) * ld + x % k];
}

// One block per row chunk, staged 32 rows at a time in shared memory; each thread owns a 4 x 4 tile
// of the chunk's k x k partial and sums the rows in ascending order.
constexpr int kGramRows = 32;
template <class T>
__global__ void __launch_bounds__(256) gram_partials_kernel(const T* __restrict__ X, const T* __restrict__ Y,
                                                            int64_t rows, int k, int64_t chunk, T* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw);
  T* sy = sx + kGramRows * k;
  const int64_t r0 = min(rows, int64_t(blockIdx.x) * chunk), r1 = min(rows, r0 + chunk);
  const int tpr = (k + 3) / 4, nt = tpr * tpr, t = threadIdx.x;
  const int i0 = (t / tpr) * 4, j0 = (t % tpr) * 4;
  T acc[4][4] = {};
  for (int64_t rb = r0; rb < r1; rb += kGramRows) {
    const int n = int(min(int64_t(kGramRows), r1 - rb));
    __syncthreads();
    for (int e = threadIdx.x; e < n * k; e += blockDim.x) {
      sx[e] = X[rb * k + e];
      sy[e] = Y[rb * k + e];
    }
    __syncthreads();
    if (t < nt) {
      for (int r = 0; r < n; ++r) {
        T a[4], b[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          a[u] = sx[r * k + min(i0 + u, k - 1)];
          b[u] = sy[r * k + min(j0 + u, k - 1)];
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[u][v] = fma(a[u], b[v], acc[u][v]);
      }
    }
  }
  if (t < nt) {
    T* o = out + int64_t(blockIdx.x) * k * k;
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v)
        if (i0 + u < k && j0 + v < k) o[(i0 + u) * k + j0 + v] = acc[u][v];
  }
}

template <class T>
__global__ void axpy_copy_kernel(T* __restrict__ p, const T* __restrict__ g, T lr, int64_t rows, int k, T* __restrict__ dst,
                                 int64_t ld) {
  const int64_t n = rows * k;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const T v = p[e] - lr * g[e];
    p[e] = v;
    dst[(e / k) * ld + e % k] = v;
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

void lowrank_gram_partials(DType dt, const void* X, const void* Y, int64_t rows, int64_t k, int64_t nparts, void* out,
                           cudaStream_t s) {
  if (nparts < 1 || nparts > 65535) throw std::invalid_argument("kernels::cuda::lowrank_gram_partials: nparts in [1, 65535]");
  if (k < 1 || k > 64) throw std::invalid_argument("kernels::cuda::lowrank_gram_partials: k must be in [1, 64]");
  f32_f64(dt, "lowrank_gram_partials", [&](auto z) {
    using T = decltype(z);
    const int64_t chunk = (rows + nparts - 1) / nparts;
    const size_t smem = size_t(2 * kGramRows) * size_t(k) * sizeof(T);  // 32 KiB at k = 64 in f64
    gram_partials_kernel<T><<<unsigned(nparts), 256, smem, s>>>(static_cast<const T*>(X), static_cast<const T*>(Y),
                                                                 rows, int(k), chunk, static_cast<T*>(out));
    CUDA_CHECK_LAUNCH();
  });
}

void axpy_copy_cols(DType dt, void* p, const void* g, double lr, int64_t rows, int64_t k, void* dst, int64_t dst_ld,
                    cudaStream_t s) {
  if (rows <= 0 || k <= 0) return;
  f32_f64(dt, "axpy_copy_cols", [&](auto z) {
    using T = decltype(z);
    axpy_copy_kernel<T><<<grid_for(rows * k, 256, 1024), 256, 0, s>>>(static_cast<T*>(p), static_cast<const T*>(g), T(lr),
                                                                       rows, int(k), static_cast<T*>(dst), dst_ld);
    CUDA_CHECK_LAUNCH();
  });
}

void lowrank_k_update(DType dt, const KChain& ks, const void* gKp_parts, int64_t nparts, double lr, void* Kp,
                      void* work, cudaStream_t s) {
  if (ks.L < 1 || ks.L > kKChainMaxL || ks.k < 1 || ks.k > 1024)
    throw std::invalid_argument("kernels::cuda::lowrank_k_update: L must be in [1, 16] and k in [1, 1024]");
  if (lr != 0.0 && nparts < 1) throw std::invalid_argument("kernels::cuda::lowrank_k_update: nparts must be >= 1");
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
    const int64_t tiles = (ks.k + 3) / 4 * ((ks.k + 3) / 4) * ks.L;
    const int threads = int(std::min<int64_t>(512, std::max<int64_t>(128, (tiles + 31) / 32 * 32)));
    k_update_kernel<T><<<1, threads, in_smem ? bytes : 0, s>>>(ks, static_cast<const T*>(gKp_parts), int(nparts), T(lr),
                                                              static_cast<T*>(Kp), static_cast<T*>(work), in_smem);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace deeplora::kernels::cuda
