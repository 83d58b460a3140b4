// CUDA kernels of kernels/sparse.h. Row/column ownership instead of atomics: a sparse-dense product
// gives each output element (spmm_acc) or row (lowrank_step) one owner that walks its entries in a
// fixed order; reductions go through per-block partials summed in block order (two launches, or
// every block of a cooperative launch after a grid barrier).
#include <cooperative_groups.h>
#include <cuda/ptx>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/sparse.h"
#include "kernels/cuda_check.h"
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

// Σ_t x[t] · y[t · stride] over t < KK (x, y in shared memory; entries past k are zero), two accumulators.
template <class T, int KK> __device__ __forceinline__ T dot_strided(const T* x, const T* y, int stride) {
  T s0 = T(0), s1 = T(0);
#pragma unroll
  for (int t = 0; t < KK; t += 2) {
    s0 += x[t] * y[t * stride];
    if (t + 1 < KK) s1 += x[t + 1] * y[(t + 1) * stride];
  }
  return s0 + s1;
}

// o / k and o % k for o < 1024, k <= 32, by a multiply: floor(o · ceil(2^20 / k) / 2^20) is exact there.
struct DivK {
  uint32_t k, m;
  __device__ explicit DivK(int k_) : k(uint32_t(k_)), m((uint32_t(1) << 20) / uint32_t(k_) + 1) {}
  __device__ __forceinline__ void split(int o, int& i, int& j) const {
    i = int((uint32_t(o) * m) >> 20);
    j = o - i * int(k);
  }
};

// The k x k inner matrices live in shared memory as KK x KK (row stride KK), zero past k: their products
// keep the zeros, and the unrolled products below need no bounds (all loads independent).
// Entry (i, j) of op(A) · op(B); two accumulators (even and odd t) halve the dependent chain.
template <class T, int KK, bool TA, bool TB> __device__ __forceinline__ T mm_entry(const T* A, const T* B, int i, int j) {
  T s0 = T(0), s1 = T(0);
#pragma unroll
  for (int t = 0; t < KK; ++t) {
    const T v = (TA ? A[t * KK + i] : A[i * KK + t]) * (TB ? B[j * KK + t] : B[t * KK + j]);
    if (t % 2 == 0) s0 += v;
    else s1 += v;
  }
  return s0 + s1;
}

// Splits a flat index w < n·kk into (l, o): l = w / kk, o = w % kk (l is small: a few subtractions).
__device__ __forceinline__ void split_level(int w, int kk, int& l, int& o) {
  l = 0;
  o = w;
  while (o >= kk) {
    o -= kk;
    ++l;
  }
}

// From the K_l (0-based K_0 .. K_{L-1}): prefixes Pre_l = K_{l-1}⋯K_0 (Pre_0 = I is set once and never
// written; Pre_L is Kp) and suffixes S_l = K_{L-1}⋯K_{l+1} (S_{L-1} = I, set once). Both chains grow
// one factor per level, side by side: max(1, L - 1) block barriers.
template <class T, int KK>
__device__ void lowrank_chains(const T* sK, T* sPre, T* sSuf, T* sKp, int k, int L, DivK dk) {
  constexpr int M2 = KK * KK;
  const int kk = k * k;
  auto pre = [&](int l) { return l == L ? sKp : sPre + l * M2; };
  for (int w = threadIdx.x; w < 4 * kk; w += kLrThreads) {
    int part, o, i, j;
    split_level(w, kk, part, o);
    dk.split(o, i, j);
    const int x = i * KK + j;
    if (part == 0) pre(1)[x] = sK[x];
    else if (part == 1 && L >= 2) pre(2)[x] = mm_entry<T, KK, false, false>(sK + M2, sK, i, j);
    else if (part == 2 && L >= 2) sSuf[(L - 2) * M2 + x] = sK[(L - 1) * M2 + x];
    else if (part == 3 && L >= 3)
      sSuf[(L - 3) * M2 + x] = mm_entry<T, KK, false, false>(sK + (L - 1) * M2, sK + (L - 2) * M2, i, j);
  }
  __syncthreads();
  for (int m = 2; m + 1 <= L || L - 2 - m >= 0; ++m) {
    for (int w = threadIdx.x; w < 2 * kk; w += kLrThreads) {
      int part, o, i, j;
      split_level(w, kk, part, o);
      dk.split(o, i, j);
      const int x = i * KK + j;
      if (part == 0 && m + 1 <= L) pre(m + 1)[x] = mm_entry<T, KK, false, false>(sK + m * M2, sPre + m * M2, i, j);
      else if (part == 1 && L - 2 - m >= 0)
        sSuf[(L - 2 - m) * M2 + x] = mm_entry<T, KK, false, false>(sSuf + (L - 1 - m) * M2, sK + (L - 1 - m) * M2, i, j);
    }
    __syncthreads();
  }
}

// K'_l = K_l − lr · gK_l with gK_l = S_lᵀ · gKp · Pre_lᵀ (all from the old K_l), into sKn. gKp is in
// sM + (L-1)·KK². Level 1: K'_0 = K_0 − lr·S_0ᵀ gKp, K'_{L-1} = K_{L-1} − lr·gKp Pre_{L-1}ᵀ and
// M_l = S_lᵀ gKp for the others; level 2: K'_l = K_l − lr·M_l Pre_lᵀ. Two block barriers (one for L <= 2).
template <class T, int KK>
__device__ void lowrank_update_K(const T* sK, T* sKn, const T* sPre, const T* sSuf, T* sM, T lr, int k, int L,
                                 DivK dk) {
  constexpr int M2 = KK * KK;
  const int kk = k * k;
  const T* gkp = sM + (L - 1) * M2;
  for (int w = threadIdx.x; w < L * kk; w += kLrThreads) {
    int l, o, i, j;
    split_level(w, kk, l, o);
    dk.split(o, i, j);
    const int x = l * M2 + i * KK + j;
    if (l == L - 1 && L >= 2) sKn[x] = sK[x] - lr * mm_entry<T, KK, false, true>(gkp, sPre + l * M2, i, j);
    else if (l == 0) sKn[x] = sK[x] - lr * mm_entry<T, KK, true, false>(sSuf, gkp, i, j);
    else sM[x] = mm_entry<T, KK, true, false>(sSuf + l * M2, gkp, i, j);
  }
  __syncthreads();
  if (L < 3) return;
  for (int w = threadIdx.x; w < (L - 2) * kk; w += kLrThreads) {
    int l, o, i, j;
    split_level(w, kk, l, o);
    ++l;
    dk.split(o, i, j);
    const int x = l * M2 + i * KK + j;
    sKn[x] = sK[x] - lr * mm_entry<T, KK, false, true>(sM + l * M2, sPre + l * M2, i, j);
  }
  __syncthreads();
}

// Sums v[0..N) over the 32 lanes of a warp by recursive halving: at xor distance M a lane keeps one half
// of its values and sends the other (N → ceil(N/2)), so a warp exchanges about N + 4 values, not 5·N.
// Afterwards the lane holds the full sums of elements off, off + 1, …, the first `real` of them real
// (the rest are padding: the upper half of an odd count is one short).
template <class T, int NA, int N, int M> struct HalvingSum {
  static __device__ __forceinline__ void run(T (&v)[NA], int lane, int& off, int& real) {
    constexpr int lo = (N + 1) / 2;
    const bool up = lane & M;
#pragma unroll
    for (int u = 0; u < lo; ++u) {
      const T a = v[u];
      const T b = u + lo < N ? v[u + lo < NA ? u + lo : 0] : T(0);
      v[u] = (up ? b : a) + __shfl_xor_sync(0xffffffffu, up ? a : b, M);
    }
    if (up) {
      off += lo;
      real = max(0, real - lo);
    } else {
      real = min(real, lo);
    }
    HalvingSum<T, NA, lo, M / 2>::run(v, lane, off, real);
  }
};
template <class T, int NA, int N> struct HalvingSum<T, NA, N, 0> {
  static __device__ __forceinline__ void run(T (&)[NA], int, int&, int&) {}
};
// How many values a lane holds at the end.
template <int N, int M> struct HalvingLeft {
  static constexpr int value = HalvingLeft<(N + 1) / 2, M / 2>::value;
};
template <int N> struct HalvingLeft<N, 0> {
  static constexpr int value = N;
};
// dst[e] = scale_e · Σ_lanes v[e] for e < N (scale for e < n_scaled, 1 past it). dst in shared memory.
template <class T, int N>
__device__ __forceinline__ void warp_reduce_to(T (&v)[N], int n_scaled, T scale, T* dst, int lane) {
  int off = 0, real = N;
  HalvingSum<T, N, N, 16>::run(v, lane, off, real);
#pragma unroll
  for (int u = 0; u < HalvingLeft<N, 16>::value; ++u)
    if (u < real) dst[off + u] = off + u < n_scaled ? scale * v[u] : v[u];
}

// A lane's two entries e and e + 32 of a row (column) of the pattern: their indices and targets.
// Missing entries read index 0 and target 0 (their residual is then forced to 0 by the caller).
// idx and vals are shared or global memory.
template <class T> struct PairFetch {
  int32_t e, i0, i1;
  T y0, y1;
  bool has0, has1;
  __device__ __forceinline__ PairFetch(const int32_t* idx, const T* vals, int32_t e_, int32_t e1) : e(e_) {
    load(idx, vals, e1);
  }
  __device__ __forceinline__ void load(const int32_t* idx, const T* vals, int32_t e1) {
    has0 = e < e1;
    has1 = e + 32 < e1;
    i0 = has0 ? idx[e] : 0;
    i1 = has1 ? idx[e + 32] : 0;
    y0 = has0 ? vals[e] : T(0);
    y1 = has1 ? vals[e + 32] : T(0);
  }
  __device__ __forceinline__ void advance(const int32_t* idx, const T* vals, int32_t e1) {
    e += 64;
    load(idx, vals, e1);
  }
};

// One row's (column's) entries [e, e1) for a warp, lane-strided, two per lane per pass (the next pass's
// indices and targets load during this one): r = v · F_idx − y, g += r · F_idx, and (kLoss) ls += r².
// The row side (v = P_i, F = B) and the column side (v = Q_j, F = A) are this same loop. fac is the
// staged factor in shared memory or the global one; after inlining its loads stay LDS for the former.
template <class T, int KK, bool kLoss>
__device__ __forceinline__ void lowrank_entries(const T (&v)[KK], T (&g)[KK], T& ls, const int32_t* idx, const T* vals,
                                                int32_t e, int32_t e1, const T* fac, int k) {
  PairFetch<T> f(idx, vals, e, e1);
  while (f.has0) {
    const PairFetch<T> cur = f;
    f.advance(idx, vals, e1);
    T b0[KK], b1[KK];
    load_row(fac + int64_t(cur.i0) * k, k, b0);
    load_row(fac + int64_t(cur.i1) * k, k, b1);
    const T r0 = dot(v, b0) - cur.y0;
    const T r1 = cur.has1 ? dot(v, b1) - cur.y1 : T(0);
    if (kLoss) ls += r0 * r0 + r1 * r1;
#pragma unroll
    for (int c = 0; c < KK; ++c) g[c] += r0 * b0[c] + r1 * b1[c];
  }
}

// Copies one row's (column's) entries [ge0, ge1) into shared memory (sidx, svals), reordered so that
// each aligned group of 8 positions gathers factor rows that start in different 16-byte bank groups of
// shared memory (the lanes of a quarter-warp then load without bank conflicts): round t takes the t-th
// entry of every bank class that still has one. One warp, once per launch.
template <class T>
__device__ void stage_entries_banked(const int32_t* __restrict__ gidx, const T* __restrict__ gvals, int32_t ge0,
                                     int32_t ge1, int32_t* sidx, T* svals, uint32_t row_bytes, int lane) {
  const int n = ge1 - ge0;
  auto cls = [&](int32_t ix) { return int(((uint32_t(ix) * row_bytes) >> 4) & 7u); };
  int cnt[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int base = 0; base < n; base += 32) {
    const int c = base + lane < n ? cls(gidx[ge0 + base + lane]) : 8;
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) cnt[cc] += __popc(__ballot_sync(0xffffffffu, c == cc));
  }
  int seen[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const uint32_t below = (1u << lane) - 1u;
  for (int base = 0; base < n; base += 32) {
    const bool ok = base + lane < n;
    const int32_t ix = ok ? gidx[ge0 + base + lane] : 0;
    const int c = ok ? cls(ix) : 8;
    int rank = 0;
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) {
      const uint32_t b = __ballot_sync(0xffffffffu, c == cc);
      if (c == cc) rank = seen[cc] + __popc(b & below);
      seen[cc] += __popc(b);
    }
    if (ok) {
      int pos = 0;
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) pos += min(cnt[cc], rank) + (cc < c && cnt[cc] > rank ? 1 : 0);
      sidx[pos] = ix;
      svals[pos] = gvals[ge0 + base + lane];
    }
  }
}

// Staging the factor a block gathers from (written by other blocks before the last grid barrier) into
// shared memory: one bulk copy by the tensor memory accelerator (thread 0 issues it; an mbarrier in
// shared memory counts its bytes), plus plain loads for a tail that is not a multiple of 16 bytes.
// One warp's row i (row owners: X = A, F = B) or column j (column owners: X = B, F = A) of an iteration:
// its own row X_i into wX (zero past k), V = X_i·Kp (P_i) or Kp·X_jᵀ (Q_j) into wV, the residuals
// r_e = V·F_e − y_e over its entries, wG = alpha·Σ_e r_e·F_e (and wG[KK] = Σ_e r_e² for rows), and the
// update X'_i = X_i − lr_outer·wG·Kpᵀ (rows) or X_j − lr_outer·wG·Kp (columns). Row i of Kp is
// sKp + i·KK (stride 1), column i is sKp + i (stride KK). The caller bars the warp before wX, wV, wG
// are written again.
template <class T, int KK, bool kRow>
__device__ __forceinline__ void lowrank_own(const T* Xin, T* Xout, int64_t i, int k, const T* sKp, T* wX, T* wV,
                                            T* wG, const int32_t* idx, const T* vals, int32_t e0, int32_t e1,
                                            bool stage, const T* sFac, const T* Fglob, T alpha, T lr_outer,
                                            int lane) {
  const T* kp_row = sKp + lane * KK;
  const T* kp_col = sKp + lane;
  const T x = lane < k ? Xin[i * k + lane] : T(0);
  if (lane < KK) wX[lane] = x;
  __syncwarp();
  if (lane < KK) wV[lane] = kRow ? dot_strided<T, KK>(wX, kp_col, KK) : dot_strided<T, KK>(wX, kp_row, 1);
  __syncwarp();
  T v[KK], g[KK];
  load_row(wV, KK, v);
#pragma unroll
  for (int c = 0; c < KK; ++c) g[c] = T(0);
  T ls = T(0);
  if (stage) lowrank_entries<T, KK, kRow>(v, g, ls, idx, vals, e0 + lane, e1, sFac, k);
  else lowrank_entries<T, KK, kRow>(v, g, ls, idx, vals, e0 + lane, e1, Fglob, k);
  if constexpr (kRow) {
    T gl[KK + 1];
#pragma unroll
    for (int c = 0; c < KK; ++c) gl[c] = g[c];
    gl[KK] = ls;
    warp_reduce_to<T, KK + 1>(gl, KK, alpha, wG, lane);  // wG[0..KK) = gP_i, wG[KK] = Σ r²
  } else {
    warp_reduce_to<T, KK>(g, KK, alpha, wG, lane);  // wG = alpha·Σ_e r_e·A_i
  }
  __syncwarp();
  if (lane < k)  // lane t of the row (c of the column)
    Xout[i * k + lane] = x - lr_outer * (kRow ? dot_strided<T, KK>(wG, kp_row, 1) : dot_strided<T, KK>(wG, kp_col, KK));
}

namespace ptx = ::cuda::ptx;

struct StageBarrier {
  uint64_t* bar;
  uint32_t phase = 0;
  __device__ void init() const {
    if (threadIdx.x == 0) {
      ptx::mbarrier_init(bar, 1);
      ptx::fence_proxy_async(ptx::space_shared);  // the barrier, seen by the copy engine
    }
    __syncthreads();
  }
  // Every thread calls it (the caller has barred the block: no thread still reads dst). The block's
  // last thread issues the copy: its fence waits for the thread's memory operations, and the small
  // products that follow leave the last warps idle.
  template <class T> __device__ void start(T* dst, const T* src, int64_t n) const {
    const uint32_t bulk = uint32_t(n * int64_t(sizeof(T)) / 16 * 16);
    if (threadIdx.x == kLrThreads - 1) {
      // Order this block's generic-proxy view (the other blocks' writes of src, acquired at the grid
      // barrier, and this block's reads of dst) before the async-proxy copy.
      ptx::fence_proxy_async();
      ptx::mbarrier_arrive_expect_tx(ptx::sem_release, ptx::scope_cta, ptx::space_shared, bar,
                                           bulk);
      if (bulk > 0) ptx::cp_async_bulk(ptx::space_cluster, ptx::space_global, dst, src, bulk, bar);
    }
    for (int64_t x = bulk / sizeof(T) + threadIdx.x; x < n; x += kLrThreads) dst[x] = __ldcg(src + x);
  }
  // Every thread waits for the copy, then the block bars (the tail's plain stores).
  __device__ void wait() {
    while (!ptx::mbarrier_try_wait_parity(bar, phase)) {
    }
    phase ^= 1u;
    __syncthreads();
  }
};

// KK: compile-time bound on k (register arrays), runtime k <= KK. Blocks [0, nb_row) own rows, the
// rest own columns; a warp owns a row (column) at a time, grid-strided. stage_elems > 0: the factor a
// block gathers from (B for row owners, A for column owners) is copied into shared memory once per
// iteration (small d), so the per-entry gathers read shared memory instead of L2. ent_cap > 0: a block
// whose warps own one row (column) each and whose entries fit in ent_cap keeps them in shared memory
// for the whole launch, in bank-conflict-free order.
template <class T, int KK>
__global__ void __launch_bounds__(kLrThreads, 1)
    lowrank_steps_kernel(const LowrankStep a, int nb_row, int nb_col, int64_t stage_elems, int64_t ent_cap) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint64_t s_bar;
  constexpr int M2 = KK * KK;                      // a padded inner matrix
  constexpr int WS = 3 * KK + 2;                   // per-warp scratch: own row, its Kp product, reduced sums
  const int k = int(a.k), L = int(a.L), kk = k * k, kk1 = kk + 1;
  T* sFac = reinterpret_cast<T*>(smem_raw);        // staged factor (when stage), first: 16-byte aligned
  const bool stage = stage_elems > 0;
  T* sWarp = sFac + stage_elems;                   // kLrWarps x WS
  T* sK = sWarp + kLrWarps * WS;                   // L M2
  T* sKn = sK + L * M2;                            // L M2: the updated K_l (swapped with sK)
  T* sPre = sKn + L * M2;                          // L M2: Pre_0 = I .. Pre_{L-1}
  T* sSuf = sPre + L * M2;                         // L M2: S_0 .. S_{L-1} = I
  T* sM = sSuf + L * M2;                           // L M2: M_l = S_lᵀ gKp; gKp at L-1
  T* sKp = sM + L * M2;                            // M2
  T* sLoss = sKp + M2;                             // 1 (+ pad)
  T* sComb = sLoss + 2;                            // kLrWarps x (kk + 1): the warps' gKp shares and losses
  T* sTmp = sComb + kLrWarps * kk1;                // max(kk + 1, kLrThreads): split sums of the partials
  T* sVals = sTmp + max(kk1, kLrThreads);          // ent_cap: the block's targets (when its entries are kept)
  int32_t* sIdx = reinterpret_cast<int32_t*>(sVals + ent_cap);  // ent_cap: their indices
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T alpha = T(a.alpha), lr_outer = T(a.lr_outer), lr_inner = T(a.lr_inner);
  constexpr int NQ = (KK * KK + 31) / 32;
  const bool row_block = int(blockIdx.x) < nb_row;
  const DivK dk(k);
  T* wA = sWarp + warp * WS;  // the warp's own row of A (B), zero past k
  T* wP = wA + KK;            // P_i = A_i·Kp (Q_j = Kp·B_j)
  T* wG = wP + KK;            // reduced gradient (KK) and loss (1)
  StageBarrier sb{&s_bar};
  if (stage) sb.init();

  // The warp's first row (column) and its entry range; the block's entries in shared memory or not.
  const int64_t n_own = row_block ? a.rows : a.cols;
  const int nb_own = row_block ? nb_row : nb_col;
  const int64_t first = int64_t(row_block ? blockIdx.x : int(blockIdx.x) - nb_row) * kLrWarps + warp;
  const int64_t stride_own = int64_t(nb_own) * kLrWarps;
  const int32_t* g_ptr = row_block ? a.row_ptr : a.col_ptr;
  const int32_t* g_idx = row_block ? a.col_idx : a.csc_row;
  const T* g_vals = static_cast<const T*>(row_block ? a.vals_csr : a.vals_csc);
  const int64_t blk0 = first - warp, blk1 = min(n_own, blk0 + kLrWarps);
  const int32_t blk_e0 = blk0 < n_own ? g_ptr[blk0] : 0, blk_e1 = blk0 < n_own ? g_ptr[blk1] : 0;
  const bool keep_entries = stage && ent_cap > 0 && n_own <= stride_own && blk_e1 - blk_e0 <= ent_cap;
  int32_t my_e0 = 0, my_e1 = 0;
  if (first < n_own) {
    my_e0 = g_ptr[first];
    my_e1 = g_ptr[first + 1];
    if (keep_entries) {
      stage_entries_banked(g_idx, g_vals, my_e0, my_e1, sIdx + (my_e0 - blk_e0), sVals + (my_e0 - blk_e0),
                           uint32_t(k * sizeof(T)), lane);
      my_e0 -= blk_e0;
      my_e1 -= blk_e0;
    }
  }
  const int32_t* my_idx = keep_entries ? sIdx : g_idx;
  const T* my_vals = keep_entries ? sVals : g_vals;

  if (stage) sb.start(sFac, static_cast<const T*>(row_block ? a.B : a.A), (row_block ? a.cols : a.rows) * k);
  for (int o = tid; o < kLrWarps * WS + (5 * L + 1) * M2; o += kLrThreads) sWarp[o] = T(0);
  __syncthreads();
  for (int o = tid; o < L * kk; o += kLrThreads) {
    int l, x, i, j;
    split_level(o, kk, l, x);
    dk.split(x, i, j);
    sK[l * M2 + i * KK + j] = static_cast<const T*>(a.K[l])[x];
  }
  for (int i = tid; i < k; i += kLrThreads) {
    sPre[i * KK + i] = T(1);                 // Pre_0
    sSuf[(L - 1) * M2 + i * KK + i] = T(1);  // S_{L-1}
  }
  __syncthreads();
  lowrank_chains<T, KK>(sK, sPre, sSuf, sKp, k, L, dk);
  if (stage) sb.wait();

  T* partials = static_cast<T*>(a.work);  // [2][kLowrankMaxRowBlocks][kk + 1]
  for (int64_t step = 0; step < a.steps; ++step) {
    const bool odd = step & 1;
    const T* Ain = static_cast<const T*>(odd ? a.A_tmp : a.A);
    const T* Bin = static_cast<const T*>(odd ? a.B_tmp : a.B);
    T* part = partials + (odd ? int64_t(kLowrankMaxRowBlocks) * kk1 : 0);

    if (row_block) {
      // ---- row owners: P_i = A_i·Kp, r_e = P_i·B_j − y_e, gP_i = alpha·Σ_e r_e·B_j, A'_i = A_i − lr_outer·gP_i·Kpᵀ.
      T* Ao = static_cast<T*>(odd ? a.A : a.A_tmp);
      T gk[NQ];
#pragma unroll
      for (int q = 0; q < NQ; ++q) gk[q] = T(0);
      T lsum = T(0);
      for (int64_t i = first; i < a.rows; i += stride_own) {
        const bool mine = i == first;
        lowrank_own<T, KK, true>(Ain, Ao, i, k, sKp, wA, wP, wG, mine ? my_idx : g_idx, mine ? my_vals : g_vals,
                                 mine ? my_e0 : g_ptr[i], mine ? my_e1 : g_ptr[i + 1], stage, sFac, Bin, alpha,
                                 lr_outer, lane);
        lsum += wG[KK];
#pragma unroll
        for (int q = 0; q < NQ; ++q)
          if (lane + 32 * q < kk) {  // gKp[t, c] += A_i[t]·gP_i[c]
            int t, c;
            dk.split(lane + 32 * q, t, c);
            gk[q] += wA[t] * wG[c];
          }
        __syncwarp();
      }
      // The block's partial: its warps' shares summed in warp order.
#pragma unroll
      for (int q = 0; q < NQ; ++q)
        if (lane + 32 * q < kk) sComb[warp * kk1 + lane + 32 * q] = gk[q];
      if (lane == 0) sComb[warp * kk1 + kk] = lsum;
      __syncthreads();
      for (int o = tid; o < kk1; o += kLrThreads) {
        T s = T(0);
        for (int w = 0; w < kLrWarps; ++w) s += sComb[w * kk1 + o];
        part[int64_t(blockIdx.x) * kk1 + o] = s;
      }
    } else {
      // ---- column owners: Q_j = Kp·B_jᵀ, r_e = A_i·Q_j − y_e, B'_j = B_j − lr_outer·alpha·(Σ_e r_e·A_i)·Kp.
      T* Bo = static_cast<T*>(odd ? a.B : a.B_tmp);
      for (int64_t j = first; j < a.cols; j += stride_own) {
        const bool mine = j == first;
        lowrank_own<T, KK, false>(Bin, Bo, j, k, sKp, wA, wP, wG, mine ? my_idx : g_idx, mine ? my_vals : g_vals,
                                  mine ? my_e0 : g_ptr[j], mine ? my_e1 : g_ptr[j + 1], stage, sFac, Ain, alpha,
                                  lr_outer, lane);
        __syncwarp();
      }
    }

    grid.sync();

    // ---- every block: gKp and the loss from the partials, in block order (the same in every block, so
    // all blocks hold bit-identical K_l). Entry o's blocks are split into `split` contiguous ranges
    // summed by different threads (loads issued 16 at a time, added in order); the range sums are then
    // added in range order. Read before the factor's copy starts, which would queue ahead of it.
    {
      const int split = max(1, min(kLrThreads / kk1, nb_row));
      const int per = (nb_row + split - 1) / split;
      for (int w = tid; w < kk1 * split; w += kLrThreads) {
        const int r = w / kk1, o = w - r * kk1;
        const int b1 = min(nb_row, r * per + per);
        const T* src = part + o;
        T s = T(0);
        for (int b = r * per; b < b1; b += 16) {
          T x[16];
#pragma unroll
          for (int u = 0; u < 16; ++u) x[u] = b + u < b1 ? __ldcg(src + int64_t(b + u) * kk1) : T(0);
#pragma unroll
          for (int u = 0; u < 16; ++u) s += x[u];
        }
        sTmp[w] = s;
      }
      __syncthreads();
      for (int o = tid; o < kk1; o += kLrThreads) {
        T s = T(0);
        for (int r = 0; r < split; ++r) s += sTmp[r * kk1 + o];
        if (o < kk) {
          int i, j;
          dk.split(o, i, j);
          sM[(L - 1) * M2 + i * KK + j] = s;
        } else {
          sLoss[0] = s;
        }
      }
    }
    // The next iteration's factor streams into shared memory during the K update.
    const bool stage_next = stage && step + 1 < a.steps;
    if (stage_next)
      sb.start(sFac, static_cast<const T*>(row_block ? (odd ? a.B : a.B_tmp) : (odd ? a.A : a.A_tmp)),
               (row_block ? a.cols : a.rows) * k);
    __syncthreads();
    lowrank_update_K<T, KK>(sK, sKn, sPre, sSuf, sM, lr_inner, k, L, dk);
    {
      T* t = sK;
      sK = sKn;
      sKn = t;
    }
    lowrank_chains<T, KK>(sK, sPre, sSuf, sKp, k, L, dk);
    if (step == a.steps - 1 && blockIdx.x == 0) {
      for (int o = tid; o < L * kk; o += kLrThreads) {
        int l, x, i, j;
        split_level(o, kk, l, x);
        dk.split(x, i, j);
        static_cast<T*>(a.K[l])[x] = sK[l * M2 + i * KK + j];
      }
      if (tid == 0) *static_cast<T*>(a.loss) = T(0.5) * alpha * sLoss[0];
    }
    if (stage_next) sb.wait();
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
// staged in shared memory when it fits in kLowrankStageBytes; then each block's entries are kept in
// shared memory too when they fit in what is left (room for 1.5x the mean entries of a block).
template <class T, int KK> void launch_lowrank(const LowrankStep& a, cudaStream_t s) {
  auto kernel = lowrank_steps_kernel<T, KK>;
  const int64_t stage_elems = lowrank_stage_elems(a.rows, a.cols, a.k, sizeof(T));
  const bool stage = stage_elems * int64_t(sizeof(T)) <= kLowrankStageBytes;
  int dev = 0, sms = 0, optin = 0, per_sm = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const size_t base = size_t(lowrank_step_smem_elems(a.k, a.L) + (stage ? stage_elems : 0)) * sizeof(T);
  int64_t ent_cap = 0;
  if (stage && a.nnz > 0 && a.rows > 0 && a.cols > 0) {
    const int64_t mean = (a.nnz * kLrWarps + std::min(a.rows, a.cols) - 1) / std::min(a.rows, a.cols);
    const int64_t room = (int64_t(optin) - int64_t(base) - 1024) / int64_t(sizeof(T) + sizeof(int32_t));
    ent_cap = std::max<int64_t>(0, std::min(mean + mean / 2 + 64, room));
  }
  const size_t smem = base + size_t(ent_cap) * (sizeof(T) + sizeof(int32_t));
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
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a, nb_row, nb_col, stage ? stage_elems : int64_t(0), ent_cap));
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
    // Register-array bounds (lowrank_kk): few instantiations keep nvcc fast.
    switch (lowrank_kk(k)) {
      case 2: launch_lowrank<T, 2>(a, s); break;
      case 4: launch_lowrank<T, 4>(a, s); break;
      case 8: launch_lowrank<T, 8>(a, s); break;
      case 10: launch_lowrank<T, 10>(a, s); break;
      case 16: launch_lowrank<T, 16>(a, s); break;
      default: launch_lowrank<T, 32>(a, s); break;
    }
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
