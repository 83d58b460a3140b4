// CUDA kernels of kernels/sparse.h. Row/column ownership instead of atomics: a sparse-dense product
// gives each output element (spmm_acc) or row (lowrank_step) one owner that walks its entries in
// pattern order; reductions go through per-block partials summed in block order (two launches, or
// every block of a cooperative launch after a grid barrier).
#include <cooperative_groups.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels/sparse.h"
#include "runtime/cuda_check.h"
#include "runtime/device.h"

namespace deeplora::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

[[noreturn]] void bad_dtype(const char* fn, DType dt) {
  throw std::invalid_argument(std::string("kernels::cuda::") + fn + ": dtype " + dtype_name(dt) +
                              " is not supported (f32 or f64)");
}

template <class F> void dispatch(DType dt, const char* fn, F&& f) {
  if (dt == DType::f64) f(double{});
  else if (dt == DType::f32) f(float{});
  else bad_dtype(fn, dt);
}

unsigned blocks_for(int64_t n, int64_t per_block, int64_t cap) {
  int64_t b = (n + per_block - 1) / per_block;
  return unsigned(std::max<int64_t>(1, std::min(b, cap)));
}

// Scratch from the context's caching allocator; stream-ordered, so freeing after the launch is safe.
class Scratch {
 public:
  explicit Scratch(size_t bytes) : p_(cuda_ctx().allocator.allocate(std::max<size_t>(bytes, 16))) {}
  ~Scratch() { cuda_ctx().allocator.deallocate(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class U> U* as() const { return static_cast<U*>(p_); }

 private:
  void* p_;
};

template <class A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Fixed-order block sum (blockDim.x == kThreads); the result is valid in thread 0.
template <class A> __device__ A block_sum(A v, A* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  A s = A(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) s += sh[w];
  return s;
}

// ---- sampled product, sparse-dense product, squared error, SGD ----------------------------------

template <class T>
__global__ void sampled_dot_kernel(const int32_t* __restrict__ row, const int32_t* __restrict__ col, int64_t nnz,
                                   const T* __restrict__ P, const T* __restrict__ Q, int64_t k, T* __restrict__ out,
                                   bool accumulate) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < nnz; e += int64_t(gridDim.x) * blockDim.x) {
    const T* a = P + int64_t(row[e]) * k;
    const T* b = Q + int64_t(col[e]) * k;
    T s = T(0);
    for (int64_t c = 0; c < k; ++c) s += a[c] * b[c];
    out[e] = accumulate ? out[e] + s : s;
  }
}

template <class T>
__global__ void gather_kernel(const int32_t* __restrict__ row, const int32_t* __restrict__ col, int64_t nnz,
                              const T* __restrict__ X, int64_t ld, T* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < nnz; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = X[int64_t(row[e]) * ld + col[e]];
}

template <class T>
__global__ void residual_kernel(const int32_t* __restrict__ row, const int32_t* __restrict__ col, int64_t nnz,
                                const T* __restrict__ X, const T* __restrict__ vals, T alpha, int64_t ld,
                                T* __restrict__ Y) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < nnz; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t at = int64_t(row[e]) * ld + col[e];
    Y[at] = alpha * (X[at] - vals[e]);
  }
}

template <class T>
__global__ void scatter_kernel(const int32_t* __restrict__ row, const int32_t* __restrict__ col, int64_t nnz,
                               const T* __restrict__ vals, int64_t ld, T* __restrict__ Y) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < nnz; e += int64_t(gridDim.x) * blockDim.x)
    Y[int64_t(row[e]) * ld + col[e]] += vals[e];
}

// One thread per output element (i, c); its entries in order.
template <class T>
__global__ void spmm_kernel(const int32_t* __restrict__ ptr, const int32_t* __restrict__ idx,
                            const int32_t* __restrict__ perm, const T* __restrict__ vals, int64_t n_out,
                            const T* __restrict__ X, int64_t k, T* __restrict__ Y, T alpha) {
  const int64_t total = n_out * k;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t / k, c = t - i * k;
    T s = T(0);
    const int32_t e1 = ptr[i + 1];
    for (int32_t e = ptr[i]; e < e1; ++e) s += vals[perm ? perm[e] : e] * X[int64_t(idx[e]) * k + c];
    Y[t] += alpha * s;
  }
}

template <class T>
__global__ void sq_error_partial_kernel(const T* __restrict__ x, const T* __restrict__ t, const T* __restrict__ w,
                                        int64_t n, T* __restrict__ partial) {
  __shared__ T sh[kWarps];
  T s = T(0);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const T r = x[i] - t[i];
    s += (w ? w[i] : T(1)) * r * r;
  }
  s = block_sum(s, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <class T, class O>
__global__ void final_sum_kernel(const T* __restrict__ partial, int n, double scale, O* __restrict__ out) {
  __shared__ T sh[kWarps];
  T s = T(0);
  for (int i = threadIdx.x; i < n; i += kThreads) s += partial[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) out[0] = O(double(s) * scale);
}

template <class T>
__global__ void sq_error_bwd_kernel(const T* __restrict__ x, const T* __restrict__ t, const T* __restrict__ w,
                                    int64_t n, T alpha, const T* __restrict__ g, T* __restrict__ gx,
                                    T* __restrict__ gt) {
  const T s = alpha * g[0];
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const T d = s * (w ? w[i] : T(1)) * (x[i] - t[i]);
    if (gx) gx[i] += d;
    if (gt) gt[i] -= d;
  }
}

struct SgdArgs {
  SgdItem items[kSgdMaxItems];
};

template <class T> __global__ void sgd_kernel(const SgdArgs args, bool zero_grad) {
  const SgdItem it = args.items[blockIdx.y];
  T* p = static_cast<T*>(it.p);
  T* g = static_cast<T*>(it.g);
  const T lr = T(it.lr);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < it.n; i += int64_t(gridDim.x) * kThreads) {
    p[i] -= lr * g[i];
    if (zero_grad) g[i] = T(0);
  }
}

// ---- the fused compressed steps (a persistent cooperative kernel) ------------------------------------

constexpr int kLrThreads = kLowrankThreads;
constexpr int kLrWarps = kLrThreads / 32;

template <class T> struct Vec2;
template <> struct Vec2<double> { using type = double2; };
template <> struct Vec2<float> { using type = float2; };

// v[0..k) = src[0..k), zeros past k. Plain loads (not the read-only path): A and B are rewritten by
// other blocks between the iterations of one launch, and the grid barrier orders those writes.
// src may be global or shared memory.
template <class T, int KK> __device__ __forceinline__ void load_row(const T* src, int k, T (&v)[KK]) {
  if constexpr (KK % 2 == 0) {
    if (k == KK) {  // rows of an even width are 2-element aligned (buffers are 256-byte aligned)
      using V = typename Vec2<T>::type;
      const V* s = reinterpret_cast<const V*>(src);
#pragma unroll
      for (int u = 0; u < KK / 2; ++u) {
        const V x = s[u];
        v[2 * u] = x.x;
        v[2 * u + 1] = x.y;
      }
      return;
    }
  }
#pragma unroll
  for (int t = 0; t < KK; ++t) v[t] = t < k ? src[t] : T(0);
}

// Two accumulators (even and odd c): half the dependent chain of multiply-adds.
template <class T, int KK> __device__ __forceinline__ T dot(const T (&x)[KK], const T (&y)[KK]) {
  T s0 = T(0), s1 = T(0);
#pragma unroll
  for (int c = 0; c < KK; c += 2) {
    s0 += x[c] * y[c];
    if (c + 1 < KK) s1 += x[c + 1] * y[c + 1];
  }
  return s0 + s1;
}

// Entry (i, j) of op(A) · op(B) for k x k row-major matrices in shared memory (k <= KK, unrolled).
// Two accumulators (even and odd t) halve the dependent chain of multiply-adds.
template <class T, int KK, bool TA, bool TB>
__device__ __forceinline__ T mm_entry(const T* A, const T* B, int k, int i, int j) {
  T s0 = T(0), s1 = T(0);
#pragma unroll
  for (int t = 0; t < KK; ++t)
    if (t < k) {
      const T v = (TA ? A[t * k + i] : A[i * k + t]) * (TB ? B[j * k + t] : B[t * k + j]);
      if (t % 2 == 0) s0 += v;
      else s1 += v;
    }
  return s0 + s1;
}

// Pre_0 = I (set once, never written), Pre_l = K_{l-1} Pre_{l-1}, Kp = K_{L-1} Pre_{L-1} (0-based
// K_0 .. K_{L-1}). Pre_1 = K_0 is a copy, so Pre_2 = K_1 K_0 joins it: max(1, L - 1) block barriers.
template <class T, int KK> __device__ void lowrank_prefixes(const T* sK, T* sPre, T* sKp, int k, int L) {
  const int kk = k * k;
  auto dst = [&](int l) { return l == L ? sKp : sPre + l * kk; };
  for (int o = threadIdx.x; o < kk; o += kLrThreads) {
    dst(1)[o] = sK[o];
    if (L >= 2) dst(2)[o] = mm_entry<T, KK, false, false>(sK + kk, sK, k, o / k, o % k);
  }
  __syncthreads();
  for (int l = 3; l <= L; ++l) {
    for (int o = threadIdx.x; o < kk; o += kLrThreads)
      dst(l)[o] = mm_entry<T, KK, false, false>(sK + (l - 1) * kk, sPre + (l - 1) * kk, k, o / k, o % k);
    __syncthreads();
  }
}

// A lane's two entries e and e + 32 of a row (column) of the pattern: their indices and targets.
// Missing entries read index 0 and target 0 (their residual is then forced to 0 by the caller).
template <class T> struct PairFetch {
  int32_t e, i0, i1;
  T y0, y1;
  bool has0, has1;
  __device__ __forceinline__ PairFetch(const int32_t* __restrict__ idx, const T* __restrict__ vals, int32_t e_,
                                       int32_t e1) : e(e_) {
    load(idx, vals, e1);
  }
  __device__ __forceinline__ void load(const int32_t* __restrict__ idx, const T* __restrict__ vals, int32_t e1) {
    has0 = e < e1;
    has1 = e + 32 < e1;
    i0 = has0 ? idx[e] : 0;
    i1 = has1 ? idx[e + 32] : 0;
    y0 = has0 ? vals[e] : T(0);
    y1 = has1 ? vals[e + 32] : T(0);
  }
  __device__ __forceinline__ void advance(const int32_t* __restrict__ idx, const T* __restrict__ vals, int32_t e1) {
    e += 64;
    load(idx, vals, e1);
  }
};

// Starts copying n elements of src (global, written by other blocks before the last grid barrier)
// into shared dst with cp.async (L2 only, no registers held); lowrank_stage_wait() completes it.
template <class T> __device__ __forceinline__ void lowrank_stage_start(T* dst, const T* src, int64_t n) {
  const int64_t bytes = n * int64_t(sizeof(T));
  const int64_t n16 = bytes / 16;
  for (int64_t x = threadIdx.x; x < n16; x += kLrThreads)
    __pipeline_memcpy_async(reinterpret_cast<char*>(dst) + 16 * x, reinterpret_cast<const char*>(src) + 16 * x, 16);
  __pipeline_commit();
  for (int64_t x = n16 * 16 / int64_t(sizeof(T)) + threadIdx.x; x < n; x += kLrThreads) dst[x] = __ldcg(src + x);
}
__device__ __forceinline__ void lowrank_stage_wait() {
  __pipeline_wait_prior(0);
  __syncthreads();
}

// KK: compile-time bound on k (register arrays), runtime k <= KK. Blocks [0, nb_row) own rows, the
// rest own columns; a warp owns a row (column) at a time, grid-strided. stage_elems > 0: the factor a block
// gathers from (B for row owners, A for column owners) is copied into shared memory once per
// iteration (small d), so the per-entry gathers read shared memory instead of L2.
template <class T, int KK>
__global__ void __launch_bounds__(kLrThreads, 1)
    lowrank_steps_kernel(const LowrankStep a, int nb_row, int nb_col, int64_t stage_elems, int skip) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int k = int(a.k), L = int(a.L), kk = k * k, kk1 = kk + 1;
  T* sFac = reinterpret_cast<T*>(smem_raw);     // staged factor (when stage), first: 16-byte aligned
  const bool stage = stage_elems > 0;
  T* sK = sFac + stage_elems;                    // L kk
  T* sKn = sK + L * kk;                          // L kk: the updated K_l (swapped with sK)
  T* sPre = sKn + L * kk;                        // L kk
  T* sX = sPre + L * kk;                         // L kk; X_{L-1} = gKp
  T* sKp = sX + L * kk;                          // kk
  T* sLoss = sKp + kk;                           // 1 (+ pad)
  T* sRow = sLoss + 2;                           // kLrWarps x 64: a row of A and its gP
  T* sComb = sRow + kLrWarps * 64;               // kLrWarps x (kk + 1): the warps' gKp shares and losses
  T* sTmp = sComb + kLrWarps * kk1;              // max(kk + 1, kLrThreads): split sums of the partials
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T alpha = T(a.alpha), lr_outer = T(a.lr_outer), lr_inner = T(a.lr_inner);
  constexpr int NQ = (KK * KK + 31) / 32;
  const bool row_block = int(blockIdx.x) < nb_row;

  for (int o = tid; o < L * kk; o += kLrThreads) sK[o] = static_cast<const T*>(a.K[o / kk])[o % kk];
  for (int o = tid; o < kk; o += kLrThreads) sPre[o] = (o / k == o % k) ? T(1) : T(0);
  if (stage) {
    if (row_block) lowrank_stage_start(sFac, static_cast<const T*>(a.B), a.cols * k);
    else lowrank_stage_start(sFac, static_cast<const T*>(a.A), a.rows * k);
  }
  __syncthreads();
  lowrank_prefixes<T, KK>(sK, sPre, sKp, k, L);
  if (stage) lowrank_stage_wait();

  T* partials = static_cast<T*>(a.work);  // [2][nb_row][kk + 1]
  for (int64_t step = 0; step < a.steps; ++step) {
    const bool odd = step & 1;
    const T* Ain = static_cast<const T*>(odd ? a.A_tmp : a.A);
    const T* Bin = static_cast<const T*>(odd ? a.B_tmp : a.B);
    T* part = partials + (odd ? int64_t(nb_row) * kk1 : 0);

    if (skip & 1) {
      // timing diagnostic: no phase
    } else if (row_block) {
      // ---- row owners
      T* Ao = static_cast<T*>(odd ? a.A : a.A_tmp);
      const T* __restrict__ vals = static_cast<const T*>(a.vals_csr);
      T gk[NQ];
#pragma unroll
      for (int q = 0; q < NQ; ++q) gk[q] = T(0);
      T lsum = T(0);
      T* myrow = sRow + warp * 64;
      for (int64_t i = int64_t(blockIdx.x) * kLrWarps + warp; i < a.rows; i += int64_t(nb_row) * kLrWarps) {
        T p[KK], g[KK];
        {
          T av[KK];
          load_row(Ain + i * k, k, av);
#pragma unroll
          for (int c = 0; c < KK; ++c) {
            T s = T(0);
#pragma unroll
            for (int t = 0; t < KK; ++t)
              if (t < k && c < k) s += av[t] * sKp[t * k + c];
            p[c] = s;
            g[c] = T(0);
          }
        }
        T ls = T(0);
        // Two entries per lane per pass, and the next pass's indices and targets loaded during this
        // one: each pass waits for one round of row loads only.
        const int32_t e1 = a.row_ptr[i + 1];
        PairFetch<T> f(a.col_idx, vals, a.row_ptr[i] + lane, (skip & 128) ? 0 : e1);
        while (f.has0) {
          PairFetch<T> cur = f;
          if (skip & 64) cur.i0 = cur.i1 = 0;
          f.advance(a.col_idx, vals, e1);
          T b0[KK], b1[KK];
          if (stage) {  // two spelled-out paths: shared-memory loads stay LDS (not generic loads)
            load_row(sFac + int64_t(cur.i0) * k, k, b0);
            load_row(sFac + int64_t(cur.i1) * k, k, b1);
          } else {
            load_row(Bin + int64_t(cur.i0) * k, k, b0);
            load_row(Bin + int64_t(cur.i1) * k, k, b1);
          }
          const T r0 = dot(p, b0) - cur.y0;
          const T r1 = cur.has1 ? dot(p, b1) - cur.y1 : T(0);
          ls += r0 * r0 + r1 * r1;
#pragma unroll
          for (int c = 0; c < KK; ++c) g[c] += r0 * b0[c] + r1 * b1[c];
        }
#pragma unroll
        for (int c = 0; c < KK; ++c) g[c] = alpha * warp_sum(g[c]);
        lsum += warp_sum(ls);
        // A'[i, t] = A[i, t] − lr_outer · (gP_i · Kpᵀ)_t: lane t computes and writes column t, all
        // lanes at once (selects, not a branch per t, which would run the lanes one after another).
        T gl = T(0);
#pragma unroll
        for (int c = 0; c < KK; ++c)
          if (c == lane) gl = g[c];
        if (lane < k) {
          const T al = Ain[i * k + lane];
          T s0 = T(0), s1 = T(0);
#pragma unroll
          for (int c = 0; c < KK; c += 2) {
            if (c < k) s0 += g[c] * sKp[lane * k + c];
            if (c + 1 < KK && c + 1 < k) s1 += g[c + 1] * sKp[lane * k + c + 1];
          }
          Ao[i * k + lane] = al - lr_outer * (s0 + s1);
          myrow[lane] = al;
          myrow[32 + lane] = gl;
        }
        __syncwarp();
#pragma unroll
        for (int q = 0; q < NQ; ++q) {
          const int o = lane + 32 * q;
          if (o < kk) gk[q] += myrow[o / k] * myrow[32 + o % k];
        }
        __syncwarp();
      }
      // The block's partial: its warps' shares summed in warp order.
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        const int o = lane + 32 * q;
        if (o < kk) sComb[warp * kk1 + o] = gk[q];
      }
      if (lane == 0) sComb[warp * kk1 + kk] = lsum;
      __syncthreads();
      for (int o = tid; o < kk1; o += kLrThreads) {
        T s = T(0);
        for (int w = 0; w < kLrWarps; ++w) s += sComb[w * kk1 + o];
        part[int64_t(blockIdx.x) * kk1 + o] = s;
      }
    } else {
      // ---- column owners: B'_j = B_j − lr_outer · alpha · (Σ_e r_e A_{i_e}) · Kp, r_e = A_{i_e} · Q_j − y_e.
      T* Bo = static_cast<T*>(odd ? a.B : a.B_tmp);
      const T* __restrict__ vals = static_cast<const T*>(a.vals_csc);
      const int cb = int(blockIdx.x) - nb_row;
      for (int64_t j = int64_t(cb) * kLrWarps + warp; j < a.cols; j += int64_t(nb_col) * kLrWarps) {
        T q[KK], g[KK];
        {
          T bv[KK];
          load_row(Bin + j * k, k, bv);
#pragma unroll
          for (int t = 0; t < KK; ++t) {
            T s = T(0);
#pragma unroll
            for (int c = 0; c < KK; ++c)
              if (t < k && c < k) s += sKp[t * k + c] * bv[c];
            q[t] = s;
            g[t] = T(0);
          }
        }
        const int32_t e1 = a.col_ptr[j + 1];
        PairFetch<T> f(a.csc_row, vals, a.col_ptr[j] + lane, (skip & 128) ? 0 : e1);
        while (f.has0) {
          PairFetch<T> cur = f;
          if (skip & 64) cur.i0 = cur.i1 = 0;
          f.advance(a.csc_row, vals, e1);
          T a0[KK], a1[KK];
          if (stage) {
            load_row(sFac + int64_t(cur.i0) * k, k, a0);
            load_row(sFac + int64_t(cur.i1) * k, k, a1);
          } else {
            load_row(Ain + int64_t(cur.i0) * k, k, a0);
            load_row(Ain + int64_t(cur.i1) * k, k, a1);
          }
          const T r0 = dot(a0, q) - cur.y0;
          const T r1 = cur.has1 ? dot(a1, q) - cur.y1 : T(0);
#pragma unroll
          for (int t = 0; t < KK; ++t) g[t] += r0 * a0[t] + r1 * a1[t];
        }
#pragma unroll
        for (int t = 0; t < KK; ++t) g[t] = warp_sum(g[t]);
        // B'[j, c]: lane c computes and writes column c, all lanes at once.
        if (lane < k) {
          T s0 = T(0), s1 = T(0);
#pragma unroll
          for (int t = 0; t < KK; t += 2) {
            if (t < k) s0 += g[t] * sKp[t * k + lane];
            if (t + 1 < KK && t + 1 < k) s1 += g[t + 1] * sKp[(t + 1) * k + lane];
          }
          Bo[j * k + lane] = Bin[j * k + lane] - lr_outer * alpha * (s0 + s1);
        }
      }
    }

    if (!(skip & 4)) grid.sync();

    // The next iteration's factor starts streaming into shared memory during the K update.
    const bool stage_next = stage && step + 1 < a.steps && !(skip & 8);
    if (stage_next) {
      if (row_block) lowrank_stage_start(sFac, static_cast<const T*>(odd ? a.B : a.B_tmp), a.cols * k);
      else lowrank_stage_start(sFac, static_cast<const T*>(odd ? a.A : a.A_tmp), a.rows * k);
    }

    // ---- every block: gKp and the loss from the partials, in block order. Entry o's blocks are split
    // into `split` contiguous ranges summed by different threads (loads issued 16 at a time, added in
    // order); the range sums are then added in range order.
    if (!(skip & 2)) {
      const int split = max(1, min(kLrThreads / kk1, nb_row));
      const int per = (nb_row + split - 1) / split;
      for (int w = tid; w < kk1 * split; w += kLrThreads) {
        const int r = w / kk1, o = w - r * kk1;
        const int b1 = min(nb_row, r * per + per);
        const T* src = part + o;
        T s = T(0);
        for (int b = r * per; b < b1; b += 16) {
          T v[16];
#pragma unroll
          for (int u = 0; u < 16; ++u) v[u] = b + u < b1 ? __ldcg(src + int64_t(b + u) * kk1) : T(0);
#pragma unroll
          for (int u = 0; u < 16; ++u) s += v[u];
        }
        sTmp[w] = s;
      }
      __syncthreads();
      for (int o = tid; o < kk1; o += kLrThreads) {
        T s = T(0);
        for (int r = 0; r < split; ++r) s += sTmp[r * kk1 + o];
        if (o < kk) sX[(L - 1) * kk + o] = s;
        else sLoss[0] = s;
      }
      __syncthreads();
    }
    // gK_l = X_l · Pre_lᵀ with X_{L-1} = gKp, X_{l-1} = K_lᵀ X_l (old K); K'_l = K_l − lr_inner · gK_l
    // into sKn. Level by level from the top: X_{l-1} and K'_l need only X_l, so they share a barrier.
    for (int l = (skip & 16) ? -1 : L - 1; l >= 0; --l) {
      for (int w = tid; w < 2 * kk; w += kLrThreads) {
        const int o = w < kk ? w : w - kk, i = o / k, j = o - i * k;
        if (w < kk)
          sKn[l * kk + o] = sK[l * kk + o] - lr_inner * mm_entry<T, KK, false, true>(sX + l * kk, sPre + l * kk, k, i, j);
        else if (l >= 1)
          sX[(l - 1) * kk + o] = mm_entry<T, KK, true, false>(sK + l * kk, sX + l * kk, k, i, j);
      }
      __syncthreads();
    }
    {
      T* t = sK;
      sK = sKn;
      sKn = t;
    }
    if (!(skip & 32)) lowrank_prefixes<T, KK>(sK, sPre, sKp, k, L);
    if (step == a.steps - 1 && blockIdx.x == 0) {
      for (int o = tid; o < L * kk; o += kLrThreads) static_cast<T*>(a.K[o / kk])[o % kk] = sK[o];
      if (tid == 0) *static_cast<T*>(a.loss) = T(0.5) * alpha * sLoss[0];
    }
    if (stage_next) lowrank_stage_wait();
  }
  if (a.steps & 1) {  // the last iterate is in A_tmp, B_tmp
    grid.sync();
    const int64_t stride = int64_t(gridDim.x) * kLrThreads;
    for (int64_t x = int64_t(blockIdx.x) * kLrThreads + tid; x < a.rows * k; x += stride)
      static_cast<T*>(a.A)[x] = __ldcg(static_cast<const T*>(a.A_tmp) + x);
    for (int64_t x = int64_t(blockIdx.x) * kLrThreads + tid; x < a.cols * k; x += stride)
      static_cast<T*>(a.B)[x] = __ldcg(static_cast<const T*>(a.B_tmp) + x);
  }
}

// Blocks of the cooperative grid: rows and columns split the device's co-resident blocks, at most
// one warp per row (column) and at most kLowrankMaxRowBlocks row blocks. The gathered factor is
// staged in shared memory when it fits in kLowrankStageBytes.
template <class T, int KK> void launch_lowrank(const LowrankStep& a, cudaStream_t s) {
  auto kernel = lowrank_steps_kernel<T, KK>;
  const int64_t stage_elems = lowrank_stage_elems(a.rows, a.cols, a.k, sizeof(T));
  // DEEPLORA_LOWRANK_STAGE=0 turns the staging off (a diagnostic knob, for timing it).
  static const bool stage_allowed = [] {
    const char* e = std::getenv("DEEPLORA_LOWRANK_STAGE");
    return !(e && std::string(e) == "0");
  }();
  const bool stage = stage_allowed && stage_elems * int64_t(sizeof(T)) <= kLowrankStageBytes;
  // DEEPLORA_LOWRANK_SKIP=<mask>: a timing diagnostic that leaves stages out (results are wrong):
  // 1 the row/column phase, 2 the partial sums, 4 the grid barrier, 8 the staging, 16 the K update,
  // 32 the prefixes, 64 gathers of one fixed row instead of the entries' rows, 128 no entries.
  static const int skip = [] {
    const char* e = std::getenv("DEEPLORA_LOWRANK_SKIP");
    return e ? std::atoi(e) : 0;
  }();
  const size_t smem = size_t(lowrank_step_smem_elems(a.k, a.L) + (stage ? stage_elems : 0)) * sizeof(T);
  int dev = 0, sms = 0, per_sm = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (smem > 48 * 1024) CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kLrThreads, smem));
  const int64_t capacity = int64_t(per_sm) * sms;
  if (capacity < 2)
    throw std::runtime_error("kernels::cuda::lowrank_step: the device holds " + std::to_string(capacity) +
                             " co-resident blocks of the fused kernel (needs 2); use the op-by-op step");
  const int64_t need_r = std::max<int64_t>(1, (a.rows + kLrWarps - 1) / kLrWarps);
  const int64_t need_c = std::max<int64_t>(1, (a.cols + kLrWarps - 1) / kLrWarps);
  const int nb_row = int(std::min({need_r, int64_t(kLowrankMaxRowBlocks), std::max<int64_t>(1, capacity / 2)}));
  const int nb_col = int(std::min(need_c, capacity - nb_row));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(nb_row + nb_col));
  cfg.blockDim = dim3(kLrThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a, nb_row, nb_col, stage ? stage_elems : int64_t(0), skip));
}

// ---- recovery error over the unobserved entries --------------------------------------------------

// One block per row (grid-strided): the row's observed columns as a bitmap in shared memory, then
// every unobserved column's squared difference, summed per row in a fixed order.
template <class T>
__global__ void unobserved_rows_kernel(const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ col_idx,
                                       int64_t rows, int64_t cols, const T* __restrict__ X1,
                                       const T* __restrict__ Y1, int64_t k1, const T* __restrict__ X2,
                                       const T* __restrict__ Y2, int64_t k2, double* __restrict__ row_sums) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double sh[kWarps];
  const int64_t words = (cols + 31) / 32;
  unsigned* bits = reinterpret_cast<unsigned*>(smem_raw);
  double* x = reinterpret_cast<double*>(smem_raw + ((words * 4 + 15) / 16) * 16);  // k1 + k2
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    for (int64_t w = threadIdx.x; w < words; w += kThreads) bits[w] = 0u;
    for (int64_t c = threadIdx.x; c < k1; c += kThreads) x[c] = double(X1[i * k1 + c]);
    for (int64_t c = threadIdx.x; c < k2; c += kThreads) x[k1 + c] = double(X2[i * k2 + c]);
    __syncthreads();
    for (int32_t e = row_ptr[i] + threadIdx.x; e < row_ptr[i + 1]; e += kThreads) {
      const int32_t j = col_idx[e];
      atomicOr(&bits[j >> 5], 1u << (j & 31));  // integer OR: order-independent
    }
    __syncthreads();
    double s = 0;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      if (bits[j >> 5] & (1u << (j & 31))) continue;
      double v = 0;
      for (int64_t c = 0; c < k1; ++c) v += x[c] * double(Y1[j * k1 + c]);
      for (int64_t c = 0; c < k2; ++c) v -= x[k1 + c] * double(Y2[j * k2 + c]);
      s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) row_sums[i] = s;
    __syncthreads();
  }
}

}  // namespace

void sampled_dot(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* P, const void* Q,
                 int64_t k, void* out, bool accumulate, cudaStream_t s) {
  if (nnz == 0) return;
  dispatch(dt, "sampled_dot", [&](auto z) {
    using T = decltype(z);
    sampled_dot_kernel<T><<<blocks_for(nnz, kThreads, 65535), kThreads, 0, s>>>(
        row, col, nnz, static_cast<const T*>(P), static_cast<const T*>(Q), k, static_cast<T*>(out), accumulate);
    CUDA_CHECK_LAUNCH();
  });
}

void gather_pattern(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* X, int64_t ld,
                    void* out, cudaStream_t s) {
  if (nnz == 0) return;
  dispatch(dt, "gather_pattern", [&](auto z) {
    using T = decltype(z);
    gather_kernel<T><<<blocks_for(nnz, kThreads, 65535), kThreads, 0, s>>>(row, col, nnz, static_cast<const T*>(X), ld,
                                                                           static_cast<T*>(out));
    CUDA_CHECK_LAUNCH();
  });
}

void pattern_residual(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* X, const void* vals,
                      double alpha, int64_t ld, void* Y, cudaStream_t s) {
  if (nnz == 0) return;
  dispatch(dt, "pattern_residual", [&](auto z) {
    using T = decltype(z);
    residual_kernel<T><<<blocks_for(nnz, kThreads, 65535), kThreads, 0, s>>>(
        row, col, nnz, static_cast<const T*>(X), static_cast<const T*>(vals), T(alpha), ld, static_cast<T*>(Y));
    CUDA_CHECK_LAUNCH();
  });
}

void scatter_pattern_acc(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* vals, int64_t ld,
                         void* Y, cudaStream_t s) {
  if (nnz == 0) return;
  dispatch(dt, "scatter_pattern_acc", [&](auto z) {
    using T = decltype(z);
    scatter_kernel<T><<<blocks_for(nnz, kThreads, 65535), kThreads, 0, s>>>(row, col, nnz, static_cast<const T*>(vals),
                                                                            ld, static_cast<T*>(Y));
    CUDA_CHECK_LAUNCH();
  });
}

void spmm_acc(DType dt, const int32_t* ptr, const int32_t* idx, const int32_t* perm, const void* vals, int64_t n_out,
              const void* X, int64_t k, void* Y, double alpha, cudaStream_t s) {
  if (n_out == 0 || k == 0) return;
  dispatch(dt, "spmm_acc", [&](auto z) {
    using T = decltype(z);
    spmm_kernel<T><<<blocks_for(n_out * k, kThreads, 65535), kThreads, 0, s>>>(
        ptr, idx, perm, static_cast<const T*>(vals), n_out, static_cast<const T*>(X), k, static_cast<T*>(Y), T(alpha));
    CUDA_CHECK_LAUNCH();
  });
}

void sq_error_fwd(DType dt, const void* x, const void* t, const void* w, int64_t n, double alpha, void* out,
                  cudaStream_t s) {
  dispatch(dt, "sq_error_fwd", [&](auto z) {
    using T = decltype(z);
    const unsigned nb = blocks_for(n, int64_t(kThreads) * 8, 1024);  // depends on n only: fixed sum order
    Scratch part(nb * sizeof(T));
    sq_error_partial_kernel<T><<<nb, kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(t),
                                                       static_cast<const T*>(w), n, part.as<T>());
    CUDA_CHECK_LAUNCH();
    final_sum_kernel<T, T><<<1, kThreads, 0, s>>>(part.as<T>(), int(nb), 0.5 * alpha, static_cast<T*>(out));
    CUDA_CHECK_LAUNCH();
  });
}

void sq_error_bwd(DType dt, const void* x, const void* t, const void* w, int64_t n, double alpha, const void* g,
                  void* gx, void* gt, cudaStream_t s) {
  if (n == 0) return;
  dispatch(dt, "sq_error_bwd", [&](auto z) {
    using T = decltype(z);
    sq_error_bwd_kernel<T><<<blocks_for(n, kThreads * 4, 8192), kThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(t), static_cast<const T*>(w), n, T(alpha),
        static_cast<const T*>(g), static_cast<T*>(gx), static_cast<T*>(gt));
    CUDA_CHECK_LAUNCH();
  });
}

void sgd_multi(DType dt, const SgdItem* items, int n_items, bool zero_grad, cudaStream_t s) {
  dispatch(dt, "sgd_multi", [&](auto z) {
    using T = decltype(z);
    for (int i0 = 0; i0 < n_items; i0 += kSgdMaxItems) {
      SgdArgs args;
      const int m = std::min(kSgdMaxItems, n_items - i0);
      int64_t nmax = 1;
      for (int i = 0; i < m; ++i) {
        args.items[i] = items[i0 + i];
        nmax = std::max(nmax, items[i0 + i].n);
      }
      dim3 grid(blocks_for(nmax, kThreads * 4, 4096), unsigned(m));
      sgd_kernel<T><<<grid, kThreads, 0, s>>>(args, zero_grad);
      CUDA_CHECK_LAUNCH();
    }
  });
}

void lowrank_step(const LowrankStep& a, cudaStream_t s) {
  if (!lowrank_step_supported(a.dt, a.k, a.L))
    throw std::invalid_argument("kernels::cuda::lowrank_step: unsupported dtype/k/L (see lowrank_step_supported)");
  if (a.steps < 0) throw std::invalid_argument("kernels::cuda::lowrank_step: negative step count");
  if (a.steps == 0) return;
  dispatch(a.dt, "lowrank_step", [&](auto z) {
    using T = decltype(z);
    const int64_t k = a.k;
    // Register-array bounds: exact for the common widths (k = 2r = 10 is the paper's), the next
    // bound up otherwise (entries past k are predicated off). Few instantiations keep nvcc fast.
    if (k <= 2) launch_lowrank<T, 2>(a, s);
    else if (k <= 4) launch_lowrank<T, 4>(a, s);
    else if (k <= 8) launch_lowrank<T, 8>(a, s);
    else if (k <= 10) launch_lowrank<T, 10>(a, s);
    else if (k <= 16) launch_lowrank<T, 16>(a, s);
    else launch_lowrank<T, 32>(a, s);
  });
}

void lowrank_unobserved_sq_sum(DType dt, const int32_t* row_ptr, const int32_t* col_idx, int64_t rows, int64_t cols,
                               const void* X1, const void* Y1, int64_t k1, const void* X2, const void* Y2, int64_t k2,
                               void* out, cudaStream_t s) {
  const size_t smem = ((size_t(cols + 31) / 32 * 4 + 15) / 16) * 16 + size_t(k1 + k2) * sizeof(double);
  if (smem > 48 * 1024)
    throw std::invalid_argument("kernels::cuda::lowrank_unobserved_sq_sum: " + std::to_string(cols) + " columns and " +
                                std::to_string(k1 + k2) + " factor columns need more than 48 KiB of shared memory "
                                "(estimate the error on a sample of entries instead)");
  if (rows == 0) {
    CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), s));
    return;
  }
  dispatch(dt, "lowrank_unobserved_sq_sum", [&](auto z) {
    using T = decltype(z);
    Scratch row_sums(size_t(rows) * sizeof(double));
    const unsigned nb = unsigned(std::min<int64_t>(rows, 4096));
    unobserved_rows_kernel<T><<<nb, kThreads, smem, s>>>(row_ptr, col_idx, rows, cols, static_cast<const T*>(X1),
                                                         static_cast<const T*>(Y1), k1, static_cast<const T*>(X2),
                                                         static_cast<const T*>(Y2), k2, row_sums.as<double>());
    CUDA_CHECK_LAUNCH();
    final_sum_kernel<double, double><<<1, kThreads, 0, s>>>(row_sums.as<double>(), int(rows), 1.0,
                                                            static_cast<double*>(out));
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace deeplora::kernels::cuda
