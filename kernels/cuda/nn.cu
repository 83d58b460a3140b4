// CUDA twins of kernels/nn.h: embedding (deterministic sorted-segment dwte), layernorm (one warp
// per row, dw/db through fixed-order block partials), fused softmax cross-entropy (one pass over the
// logits forward, one read + one read-modify-write backward). No floating-point atomics.
#include "kernels/nn.h"

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_utils.cuh"

namespace deeplora::kernels::cuda {
namespace {

using namespace util;

constexpr int kWarpsPerBlock = 8;
constexpr int kRowThreads = 32 * kWarpsPerBlock;

__device__ __forceinline__ int lane_id() { return int(threadIdx.x & 31); }
__device__ __forceinline__ int warp_id() { return int(threadIdx.x >> 5); }

// Accurate enough for softmax (2 ulp near 0, where the dominant terms are) and cheap enough to keep
// cross-entropy memory-bound; f64 uses the full-precision exp.
__device__ __forceinline__ float fast_exp(float v) { return __expf(v); }
__device__ __forceinline__ double fast_exp(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

// =============================================================================================
// Embedding.

// One warp per (b, t) row.
template <class T, int N>
__global__ void __launch_bounds__(kRowThreads) embedding_fwd_kernel(const int32_t* __restrict__ tok, const T* __restrict__ wte,
                                                                    const T* __restrict__ wpe, T* __restrict__ y,
                                                                    int64_t rows, int64_t Tn, int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp_id();
  if (row >= rows) return;
  const int64_t t = row % Tn;
  const T* a = wte + int64_t(tok[row]) * C;
  const T* p = wpe ? wpe + t * C : nullptr;
  T* o = y + row * C;
  const int64_t packs = C / N;
  for (int64_t j = lane_id(); j < packs; j += 32) {
    Pack<T, N> va = load_pack<N>(a + j * N);
    if (p) {
      const Pack<T, N> vp = load_pack<N>(p + j * N);
#pragma unroll
      for (int e = 0; e < N; ++e) va.v[e] = from_acc<T>(to_acc(va.v[e]) + to_acc(vp.v[e]));
    }
    store_pack<N>(o + j * N, va);
  }
}

// dwpe[t, c] += sum_b dy[b, t, c], b in order: one thread per (t, pack of columns).
template <class T, int N>
__global__ void __launch_bounds__(256) embedding_dwpe_kernel(const T* __restrict__ dy, T* __restrict__ dwpe,
                                                             int64_t B, int64_t Tn, int64_t C) {
  using A = acc_t<T>;
  const int64_t packs = C / N;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= Tn * packs) return;
  const int64_t t = idx / packs, c = (idx % packs) * N;
  A acc[N];
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = A(0);
#pragma unroll 4
  for (int64_t b = 0; b < B; ++b) {
    const Pack<T, N> v = load_pack<N>(dy + (b * Tn + t) * C + c);
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] += to_acc(v.v[e]);
  }
  Pack<T, N> o = load_pack<N>(dwpe + t * C + c);
#pragma unroll
  for (int e = 0; e < N; ++e) o.v[e] = from_acc<T>(to_acc(o.v[e]) + acc[e]);
  store_pack<N>(dwpe + t * C + c, o);
}

// dwte without atomics. Positions are sorted by token (stable radix sort: equal tokens keep their
// position order), the sorted list is cut into chunks of kChunk entries and each chunk sums its runs
// of equal tokens in order:
//  - a run that starts and ends inside the chunk belongs to a token no other chunk sees: it is added
//    straight into dwte;
//  - a run that continues from the previous chunk leaves its sum in P[chunk];
//  - a run that starts here and continues into the next chunk leaves its sum in Q[chunk].
// A second kernel lets each chunk holding a Q add Q + P[next chunks...] (in order) into dwte. Every
// dwte row is written by exactly one thread per column, and the summation order is fixed.
constexpr int kChunk = 32;
constexpr uint32_t kNoToken = 0xffffffffu;

__global__ void iota_kernel(int32_t* v, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) v[i] = int32_t(i);
}

template <class T, int N>
__global__ void __launch_bounds__(256) dwte_chunk_kernel(const uint32_t* __restrict__ stok, const int32_t* __restrict__ spos,
                                                         const T* __restrict__ dy, T* __restrict__ dwte,
                                                         acc_t<T>* __restrict__ P, acc_t<T>* __restrict__ Q,
                                                         int64_t n, int64_t C) {
  using A = acc_t<T>;
  __shared__ uint32_t s_tok[kChunk];
  __shared__ int32_t s_pos[kChunk];
  const int64_t k = blockIdx.x, start = k * kChunk;
  const int len = int(min(int64_t(kChunk), n - start));
  if (threadIdx.x < len) {
    s_tok[threadIdx.x] = stok[start + threadIdx.x];
    s_pos[threadIdx.x] = spos[start + threadIdx.x];
  }
  const uint32_t prev = start > 0 ? stok[start - 1] : kNoToken;
  const uint32_t next = start + len < n ? stok[start + len] : kNoToken;
  __syncthreads();
  const int64_t packs = C / N;
  for (int64_t cv = threadIdx.x; cv < packs; cv += blockDim.x) {
    const int64_t c = cv * N;
    A acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = A(0);
    int run_start = 0;
    for (int i0 = 0; i0 < len; i0 += 4) {
      Pack<T, N> v[4];  // entries past len re-load the last row (in bounds) and are not used
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = load_pack<N>(dy + int64_t(s_pos[min(i0 + u, len - 1)]) * C + c);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u;
        if (i >= len) break;
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] += to_acc(v[u].v[e]);
        const uint32_t tk = s_tok[i];
        if (i + 1 < len && s_tok[i + 1] == tk) continue;  // the run goes on
        const bool starts_here = !(run_start == 0 && prev == tk);
        const bool ends_here = !(i == len - 1 && next == tk);
        if (starts_here && ends_here) {
          T* row = dwte + int64_t(tk) * C + c;
          Pack<T, N> o = load_pack<N>(row);
#pragma unroll
          for (int e = 0; e < N; ++e) o.v[e] = from_acc<T>(to_acc(o.v[e]) + acc[e]);
          store_pack<N>(row, o);
        } else {
          A* dst = (starts_here ? Q : P) + k * C + c;
#pragma unroll
          for (int e = 0; e < N; ++e) dst[e] = acc[e];
        }
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] = A(0);
        run_start = i + 1;
      }
    }
  }
}

template <class T, int N>
__global__ void __launch_bounds__(256) dwte_fixup_kernel(const uint32_t* __restrict__ stok, const acc_t<T>* __restrict__ P,
                                                         const acc_t<T>* __restrict__ Q, T* __restrict__ dwte,
                                                         int64_t n, int64_t C) {
  using A = acc_t<T>;
  const int64_t k = blockIdx.x, start = k * kChunk, end = min(start + int64_t(kChunk), n);
  const uint32_t tk = stok[end - 1];
  if (end >= n || stok[end] != tk) return;                              // last run ends here
  if (start > 0 && stok[start] == tk && stok[start - 1] == tk) return;  // ... or started earlier
  // Last sorted index holding tk: upper bound in [end, n).
  int64_t lo = end, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (stok[mid] <= tk) lo = mid + 1;
    else hi = mid;
  }
  const int64_t last_chunk = (lo - 1) / kChunk;
  const int64_t packs = C / N;
  for (int64_t cv = threadIdx.x; cv < packs; cv += blockDim.x) {
    const int64_t c = cv * N;
    A acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = Q[k * C + c + e];
#pragma unroll 4
    for (int64_t j = k + 1; j <= last_chunk; ++j) {
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] += P[j * C + c + e];
    }
    T* row = dwte + int64_t(tk) * C + c;
    Pack<T, N> o = load_pack<N>(row);
#pragma unroll
    for (int e = 0; e < N; ++e) o.v[e] = from_acc<T>(to_acc(o.v[e]) + acc[e]);
    store_pack<N>(row, o);
  }
}

template <class T, int N>
void embedding_dwte(const int32_t* tok, const T* dy, T* dwte, int64_t n, int64_t C, int64_t V, cudaStream_t s) {
  using A = acc_t<T>;
  if (n > int64_t(INT32_MAX)) throw std::invalid_argument("kernels::cuda::embedding_bwd: B*T over 2^31-1 tokens");
  int end_bit = 1;
  while (end_bit < 32 && (uint64_t(1) << end_bit) < uint64_t(V)) ++end_bit;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  size_t sort_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr),
                                             static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), int(n), 0, end_bit, s));
  const size_t idx_bytes = round_up(size_t(n) * 4, 256);
  const size_t pq_bytes = round_up(size_t(nchunks) * size_t(C) * sizeof(A), 256);
  Scratch scratch(3 * idx_bytes + 2 * pq_bytes + round_up(sort_bytes, 256));
  uint32_t* keys_out = scratch.as<uint32_t>(0);
  int32_t* pos_in = scratch.as<int32_t>(idx_bytes);
  int32_t* pos_out = scratch.as<int32_t>(2 * idx_bytes);
  A* P = scratch.as<A>(3 * idx_bytes);
  A* Q = scratch.as<A>(3 * idx_bytes + pq_bytes);
  void* sort_tmp = scratch.as<void>(3 * idx_bytes + 2 * pq_bytes);

  iota_kernel<<<grid_for(n, 256, INT32_MAX), 256, 0, s>>>(pos_in, n);
  CUDA_CHECK_LAUNCH();
  // Tokens are in [0, V), so their bits as unsigned sort like the ints and only end_bit bits matter.
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, reinterpret_cast<const uint32_t*>(tok), keys_out,
                                             pos_in, pos_out, int(n), 0, end_bit, s));
  const int64_t packs = C / N;
  const int threads = int(std::min<int64_t>(256, (packs + 31) / 32 * 32));
  dwte_chunk_kernel<T, N><<<unsigned(nchunks), threads, 0, s>>>(keys_out, pos_out, dy, dwte, P, Q, n, C);
  CUDA_CHECK_LAUNCH();
  dwte_fixup_kernel<T, N><<<unsigned(nchunks), threads, 0, s>>>(keys_out, P, Q, dwte, n, C);
  CUDA_CHECK_LAUNCH();
}

// Integer atomics only (exact, order-independent).
__global__ void count_oor_kernel(const int32_t* __restrict__ tok, int64_t n, int64_t V, int64_t ignore,
                                 unsigned long long* out) {
  __shared__ unsigned long long sh[32];
  unsigned long long cnt = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t id = tok[i];
    cnt += ((id < 0 || id >= V) && id != ignore) ? 1ull : 0ull;
  }
  cnt = block_sum(cnt, sh);
  if (threadIdx.x == 0 && cnt) atomicAdd(out, cnt);
}

// =============================================================================================
// LayerNorm. Fast path: one warp per row with the row held in registers (NV packs of N elements
// per lane, C = up to 32 * N * NV); otherwise a scalar warp-per-row path that re-reads the row.

template <class T, int N, int NV>
__global__ void __launch_bounds__(kRowThreads) ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                             const T* __restrict__ b, T* __restrict__ y,
                                                             acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ rstd,
                                                             int64_t rows, int C, acc_t<T> eps) {
  using A = acc_t<T>;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp_id();
  if (row >= rows) return;
  const int lane = lane_id(), packs = C / N;
  const T* xr = x + row * C;
  // Lanes past the row end load the last pack (in bounds) and ignore it: every load can be issued
  // up front and the register array stays fully defined.
  Pack<T, N> xv[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) xv[k] = load_pack<N>(xr + min(lane + 32 * k, packs - 1) * N);
  A s = A(0);
#pragma unroll
  for (int k = 0; k < NV; ++k)
    if (lane + 32 * k < packs)
#pragma unroll
      for (int e = 0; e < N; ++e) s += to_acc(xv[k].v[e]);
  const A m = warp_sum(s) / A(C);
  A v = A(0);
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    if (lane + 32 * k < packs) {
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const A d = to_acc(xv[k].v[e]) - m;
        v += d * d;
      }
    }
  }
  const A rs = A(1) / sqrt_acc(warp_sum(v) / A(C) + eps);
  T* yr = y + row * C;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = lane + 32 * k;
    if (j < packs) {
      const Pack<T, N> wv = load_pack<N>(w ? w + j * N : xr + j * N);
      const Pack<T, N> bv = load_pack<N>(b ? b + j * N : xr + j * N);
      Pack<T, N> o;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        A val = (to_acc(xv[k].v[e]) - m) * rs;
        if (w) val *= to_acc(wv.v[e]);
        if (b) val += to_acc(bv.v[e]);
        o.v[e] = from_acc<T>(val);
      }
      store_pack<N>(yr + j * N, o);
    }
  }
  if (lane == 0) {
    if (mean) mean[row] = m;
    if (rstd) rstd[row] = rs;
  }
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) ln_fwd_generic_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                     const T* __restrict__ b, T* __restrict__ y,
                                                                     acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ rstd,
                                                                     int64_t rows, int64_t C, acc_t<T> eps) {
  using A = acc_t<T>;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp_id();
  if (row >= rows) return;
  const int lane = lane_id();
  const T* xr = x + row * C;
  A s = A(0);
  for (int64_t c = lane; c < C; c += 32) s += to_acc(xr[c]);
  const A m = warp_sum(s) / A(C);
  A v = A(0);
  for (int64_t c = lane; c < C; c += 32) {
    const A d = to_acc(xr[c]) - m;
    v += d * d;
  }
  const A rs = A(1) / sqrt_acc(warp_sum(v) / A(C) + eps);
  T* yr = y + row * C;
  for (int64_t c = lane; c < C; c += 32) {
    A val = (to_acc(xr[c]) - m) * rs;
    if (w) val *= to_acc(w[c]);
    if (b) val += to_acc(b[c]);
    yr[c] = from_acc<T>(val);
  }
  if (lane == 0) {
    if (mean) mean[row] = m;
    if (rstd) rstd[row] = rs;
  }
}

// Backward, fast path. With xhat = (x - mean) rstd and g = dy w:
//   dx += rstd (g - mean_c(g) - xhat mean_c(g xhat)).
// Pass 1 reads x, dy for the two row sums; pass 2 reads them again (L1 hits: the warp just touched
// its row) to write dx. Holding the row in registers across the warp reduction instead roughly
// doubles the register count (every converted float stays live) and halves occupancy; the compiler
// barrier between the passes makes it re-load. x, dy and w are deliberately not __restrict__ so
// those loads are not merged across the barrier. Lanes past the row end load the last pack
// (always in bounds, so every load can be issued up front) and discard it.
// kWB: each lane also sums dy xhat and dy over its rows for its own columns (registers); the warps
// of a block then combine in warp order through shared memory and the block writes
// partial[block] = [dw | db] (2C values), reduced afterwards over blocks in order (colsum).
template <class T, int N, int NV, bool kWB> struct LnBwdOccupancy {
  // Two blocks of 8 warps per SM cap registers at 128/thread. Rough live-register estimate: the
  // three 16-byte pack arrays of pass 2 plus the dw/db accumulators; above ~90 the cap spills
  // (checked with ptxas -v), so those variants take one block per SM instead.
  static constexpr int kRegs = NV * 12 + (kWB ? 2 * NV * N * int(sizeof(acc_t<T>)) / 4 : 0);
  static constexpr int value = kRegs <= 90 ? 2 : 1;
};

template <class T, int N, int NV, bool kWB>
__global__ void __launch_bounds__(kRowThreads, (LnBwdOccupancy<T, N, NV, kWB>::value))
    ln_bwd_kernel(const T* x, const T* w, const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                  const T* dy, T* dx, acc_t<T>* __restrict__ partial, int64_t rows, int C) {
  using A = acc_t<T>;
  extern __shared__ unsigned char ln_smem[];
  const int lane = lane_id(), warp = warp_id(), packs = C / N;
  A dwa[kWB ? NV : 1][N], dba[kWB ? NV : 1][N];
  if constexpr (kWB) {
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int e = 0; e < N; ++e) dwa[k][e] = dba[k][e] = A(0);
  }
  const int64_t wstride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp; row < rows; row += wstride) {
    const T* xr = x + row * C;
    const T* dyr = dy + row * C;
    const A m = mean[row], rs = rstd[row];
    A s1 = A(0), s2 = A(0);
    {
      Pack<T, N> xv[NV], dv[NV];
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int jc = min(lane + 32 * k, packs - 1);
        xv[k] = load_pack<N>(xr + jc * N);
        dv[k] = load_pack<N>(dyr + jc * N);
      }
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int j = lane + 32 * k, jc = min(j, packs - 1);
        const Pack<T, N> wv = load_pack<N>(w ? w + jc * N : xr);
        if (j < packs) {
#pragma unroll
          for (int e = 0; e < N; ++e) {
            const A xh = (to_acc(xv[k].v[e]) - m) * rs;
            const A d = to_acc(dv[k].v[e]);
            const A g = w ? d * to_acc(wv.v[e]) : d;
            s1 += g;
            s2 += g * xh;
            if constexpr (kWB) {
              dwa[k][e] += d * xh;
              dba[k][e] += d;
            }
          }
        }
      }
    }
    if (!dx) continue;
    s1 = warp_sum(s1) / A(C);
    s2 = warp_sum(s2) / A(C);
    asm volatile("" ::: "memory");
    T* dxr = dx + row * C;
    Pack<T, N> xv[NV], dv[NV], ov[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int jc = min(lane + 32 * k, packs - 1);
      xv[k] = load_pack<N>(xr + jc * N);
      dv[k] = load_pack<N>(dyr + jc * N);
      ov[k] = load_pack<N>(dxr + jc * N);
    }
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int j = lane + 32 * k, jc = min(j, packs - 1);
      const Pack<T, N> wv = load_pack<N>(w ? w + jc * N : xr);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const A xh = (to_acc(xv[k].v[e]) - m) * rs;
        const A d = to_acc(dv[k].v[e]);
        const A g = w ? d * to_acc(wv.v[e]) : d;
        ov[k].v[e] = from_acc<T>(to_acc(ov[k].v[e]) + rs * (g - s1 - xh * s2));
      }
      if (j < packs) store_pack<N>(dxr + j * N, ov[k]);
    }
  }
  if constexpr (kWB) {
    A* sh = reinterpret_cast<A*>(ln_smem);  // [2C]: dw then db
    for (int wi = 0; wi < kWarpsPerBlock; ++wi) {
      if (warp == wi) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          const int j = lane + 32 * k;
          if (j < packs) {
#pragma unroll
            for (int e = 0; e < N; ++e) {
              const int c = j * N + e;
              sh[c] = wi == 0 ? dwa[k][e] : sh[c] + dwa[k][e];
              sh[C + c] = wi == 0 ? dba[k][e] : sh[C + c] + dba[k][e];
            }
          }
        }
      }
      __syncthreads();
    }
    A* out = partial + int64_t(blockIdx.x) * 2 * C;
    for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) out[i] = sh[i];
  }
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) ln_bwd_dx_generic_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                        const acc_t<T>* __restrict__ mean,
                                                                        const acc_t<T>* __restrict__ rstd,
                                                                        const T* __restrict__ dy, T* __restrict__ dx,
                                                                        int64_t rows, int64_t C) {
  using A = acc_t<T>;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp_id();
  if (row >= rows) return;
  const int lane = lane_id();
  const T* xr = x + row * C;
  const T* dyr = dy + row * C;
  const A m = mean[row], rs = rstd[row];
  A s1 = A(0), s2 = A(0);
  for (int64_t c = lane; c < C; c += 32) {
    const A xh = (to_acc(xr[c]) - m) * rs;
    const A g = w ? to_acc(dyr[c]) * to_acc(w[c]) : to_acc(dyr[c]);
    s1 += g;
    s2 += g * xh;
  }
  s1 = warp_sum(s1) / A(C);
  s2 = warp_sum(s2) / A(C);
  T* dxr = dx + row * C;
  for (int64_t c = lane; c < C; c += 32) {
    const A xh = (to_acc(xr[c]) - m) * rs;
    const A g = w ? to_acc(dyr[c]) * to_acc(w[c]) : to_acc(dyr[c]);
    dxr[c] = from_acc<T>(to_acc(dxr[c]) + rs * (g - s1 - xh * s2));
  }
}

// Generic dw/db partials: blocks of 32 columns x 8 row lanes over a fixed row range (split);
// partial[split] = [sum dy xhat | sum dy] over that range, combined in row-lane order.
template <class T>
__global__ void __launch_bounds__(256) ln_dwdb_generic_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ mean,
                                                              const acc_t<T>* __restrict__ rstd, const T* __restrict__ dy,
                                                              acc_t<T>* __restrict__ partial, int64_t rows, int64_t C,
                                                              int64_t rows_per_split) {
  using A = acc_t<T>;
  constexpr int BY = 8;
  __shared__ A sh[2][BY][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * 32 + tx;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split, r1 = min(rows, r0 + rows_per_split);
  A sw = A(0), sb = A(0);
  if (c < C) {
    for (int64_t r = r0 + ty; r < r1; r += BY) {
      const A d = to_acc(dy[r * C + c]);
      sw += d * (to_acc(x[r * C + c]) - mean[r]) * rstd[r];
      sb += d;
    }
  }
  sh[0][ty][tx] = sw;
  sh[1][ty][tx] = sb;
  __syncthreads();
  if (ty < 2 && c < C) {
    A t = A(0);
#pragma unroll
    for (int k = 0; k < BY; ++k) t += sh[ty][k][tx];
    partial[int64_t(blockIdx.y) * 2 * C + ty * C + c] = t;
  }
}

template <class T, int N, int NV>
void ln_fwd_launch(const T* x, const T* w, const T* b, T* y, acc_t<T>* mean, acc_t<T>* rstd, int64_t rows, int64_t C,
                   double eps, cudaStream_t s) {
  const unsigned grid = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  ln_fwd_kernel<T, N, NV><<<grid, kRowThreads, 0, s>>>(x, w, b, y, mean, rstd, rows, int(C), acc_t<T>(eps));
  CUDA_CHECK_LAUNCH();
}

template <class T, int N, int NV>
void ln_bwd_launch(const T* x, const T* w, const acc_t<T>* mean, const acc_t<T>* rstd, const T* dy, T* dx, T* dw,
                   T* db, int64_t rows, int64_t C, cudaStream_t s) {
  using A = acc_t<T>;
  if (!dw && !db) {
    const unsigned grid = unsigned(std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, INT32_MAX));
    ln_bwd_kernel<T, N, NV, false><<<grid, kRowThreads, 0, s>>>(x, w, mean, rstd, dy, dx, nullptr, rows, int(C));
    CUDA_CHECK_LAUNCH();
    return;
  }
  // A grid that depends on rows alone (so the dw/db order is fixed), ~16 rows per warp at GPT-2
  // sizes and at most 256 partial rows to reduce.
  const unsigned grid = unsigned(std::clamp<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, 256));
  const size_t smem = 2 * size_t(C) * sizeof(A);
  Scratch part(size_t(grid) * smem);
  ln_bwd_kernel<T, N, NV, true><<<grid, kRowThreads, smem, s>>>(x, w, mean, rstd, dy, dx, part.as<A>(), rows, int(C));
  CUDA_CHECK_LAUNCH();
  if (dw) colsum_acc_impl<A, T>(part.as<A>(), int64_t(grid), C, 2 * C, dw, s);
  if (db) colsum_acc_impl<A, T>(part.as<A>() + C, int64_t(grid), C, 2 * C, db, s);
}

// Largest row (in packs per lane) the register path handles; NV is rounded up to one of these.
template <class F> bool with_nv(int64_t need, F&& f) {
  if (need <= 1) f(std::integral_constant<int, 1>{});
  else if (need <= 2) f(std::integral_constant<int, 2>{});
  else if (need <= 3) f(std::integral_constant<int, 3>{});
  else if (need <= 4) f(std::integral_constant<int, 4>{});
  else if (need <= 6) f(std::integral_constant<int, 6>{});
  else if (need <= 8) f(std::integral_constant<int, 8>{});
  else return false;
  return true;
}

// =============================================================================================
// Cross-entropy. One block per row. Rows of odd length are not 16-byte aligned, so each row is split
// into a scalar head up to the first aligned element, 16-byte packs, and a scalar tail.

constexpr int kCeThreads = 256;
constexpr int kCeUnroll = 4;

template <class T, int N> __device__ __forceinline__ int row_head(const T* p, int64_t V) {
  if constexpr (N == 1) {
    return 0;
  } else {
    const int mis = int(reinterpret_cast<uintptr_t>(p) & 15u);
    return int(min(V, int64_t(((16 - mis) & 15) / int(sizeof(T)))));
  }
}

// Running (max, sum of exp(x - max)); -inf max means "nothing seen" (sum 0).
template <class A> struct MaxSum {
  A m, s;
};
template <class A> __device__ __forceinline__ MaxSum<A> ms_combine(MaxSum<A> a, MaxSum<A> b) {
  const A m = max(a.m, b.m);
  if (m == -INFINITY) return {m, A(0)};
  const A sa = a.m == -INFINITY ? A(0) : a.s * fast_exp(a.m - m);
  const A sb = b.m == -INFINITY ? A(0) : b.s * fast_exp(b.m - m);
  return {m, sa + sb};
}
template <class A, int N> __device__ __forceinline__ void ms_add(MaxSum<A>& st, const A (&v)[N]) {
  A mv = v[0];
#pragma unroll
  for (int e = 1; e < N; ++e) mv = max(mv, v[e]);
  if (mv > st.m) {
    st.s *= fast_exp(st.m - mv);
    st.m = mv;
  }
  if (st.m != -INFINITY) {
#pragma unroll
    for (int e = 0; e < N; ++e) st.s += fast_exp(v[e] - st.m);
  }
}

template <class T, int N>
__global__ void __launch_bounds__(kCeThreads) ce_fwd_kernel(const T* __restrict__ logits, const int32_t* __restrict__ tgt,
                                                            acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ loss,
                                                            int64_t V, int64_t row_stride, int32_t ignore) {
  using A = acc_t<T>;
  __shared__ A sh_m[32], sh_s[32];
  const int64_t row = blockIdx.x;
  const T* xr = logits + row * row_stride;
  const int head = row_head<T, N>(xr, V);
  const int64_t body = (V - head) / N;
  const int64_t tail = head + body * N;
  MaxSum<A> st{-INFINITY, A(0)};
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    const A v[1] = {to_acc(xr[i])};
    ms_add<A, 1>(st, v);
  }
  const T* xb = xr + head;
  for (int64_t p0 = threadIdx.x; p0 < body; p0 += int64_t(kCeUnroll) * blockDim.x) {
    // Packs past the body re-load the last one (in bounds; body >= 1 here) and are not used, so
    // all kCeUnroll loads are issued together.
    Pack<T, N> pk[kCeUnroll];
#pragma unroll
    for (int u = 0; u < kCeUnroll; ++u) pk[u] = load_pack_cs<N>(xb + min(p0 + int64_t(u) * blockDim.x, body - 1) * N);
#pragma unroll
    for (int u = 0; u < kCeUnroll; ++u) {
      const int64_t p = p0 + int64_t(u) * blockDim.x;
      if (p < body) {
        A v[N];
#pragma unroll
        for (int e = 0; e < N; ++e) v[e] = to_acc(pk[u].v[e]);
        ms_add<A, N>(st, v);
      }
    }
  }
  for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x) {
    const A v[1] = {to_acc(xr[i])};
    ms_add<A, 1>(st, v);
  }
  // Fixed butterfly within warps, then warp 0 over the warps' results: deterministic.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum<A> other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
    st = ms_combine(st, other);
  }
  const int lane = lane_id(), warp = warp_id(), nwarps = blockDim.x >> 5;
  if (lane == 0) {
    sh_m[warp] = st.m;
    sh_s[warp] = st.s;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < nwarps ? MaxSum<A>{sh_m[lane], sh_s[lane]} : MaxSum<A>{A(-INFINITY), A(0)};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      MaxSum<A> other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
      st = ms_combine(st, other);
    }
    if (lane == 0) {
      const A l = st.m + log_acc(st.s);
      if (lse) lse[row] = l;
      if (loss) {
        const int32_t t = tgt[row];
        // The caller rejects targets outside [0, V); NaN (not an out-of-bounds read) if one slips by.
        loss[row] = t == ignore ? A(0) : (t < 0 || t >= V) ? A(NAN) : l - to_acc(xr[t]);
      }
    }
  }
}

// dlogits[r, :] += dloss / count * (softmax - onehot). Both rows share their misalignment (checked
// by the launcher) so one head/body/tail split serves both.
template <class T, int N>
__global__ void __launch_bounds__(kCeThreads) ce_bwd_kernel(const T* __restrict__ logits, const int32_t* __restrict__ tgt,
                                                            const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ dloss,
                                                            const acc_t<T>* __restrict__ count, T* __restrict__ dlogits,
                                                            int64_t V, int64_t row_stride, int32_t ignore) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int32_t t = tgt[row];
  if (t == ignore) return;
  const A cnt = count[0];
  if (cnt == A(0)) return;
  const A k = dloss[0] / cnt;
  const A l = lse[row];
  const T* xr = logits + row * row_stride;
  T* dr = dlogits + row * row_stride;
  auto grad = [&](A x, A d, int64_t i) { return d + k * (fast_exp(x - l) - (i == t ? A(1) : A(0))); };
  const int head = row_head<T, N>(xr, V);
  const int64_t body = (V - head) / N;
  const int64_t tail = head + body * N;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) dr[i] = from_acc<T>(grad(to_acc(xr[i]), to_acc(dr[i]), i));
  constexpr int U = 2;
  for (int64_t p0 = threadIdx.x; p0 < body; p0 += int64_t(U) * blockDim.x) {
    Pack<T, N> xp[U], dp[U];  // clamped like ce_fwd_kernel; only packs < body are stored
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = min(p0 + int64_t(u) * blockDim.x, body - 1);
      xp[u] = load_pack_cs<N>(xr + head + p * N);
      dp[u] = load_pack_cs<N>(dr + head + p * N);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = p0 + int64_t(u) * blockDim.x;
      if (p < body) {
        const int64_t i0 = head + p * N;
#pragma unroll
        for (int e = 0; e < N; ++e) dp[u].v[e] = from_acc<T>(grad(to_acc(xp[u].v[e]), to_acc(dp[u].v[e]), i0 + e));
        store_pack_cs<N>(dr + i0, dp[u]);
      }
    }
  }
  for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x) dr[i] = from_acc<T>(grad(to_acc(xr[i]), to_acc(dr[i]), i));
}

template <class A>
__global__ void __launch_bounds__(1024) ce_reduce_kernel(const A* __restrict__ loss, const int32_t* __restrict__ tgt,
                                                         int64_t rows, int32_t ignore, A* __restrict__ out,
                                                         A* __restrict__ count_out) {
  __shared__ A sh[32];
  __shared__ long long shn[32];
  A s = A(0);
  long long n = 0;
#pragma unroll 4
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    if (tgt[r] != ignore) {
      s += loss[r];
      ++n;
    }
  }
  s = block_sum(s, sh);
  n = block_sum(n, shn);
  if (threadIdx.x == 0) {
    out[0] = n > 0 ? s / A(n) : A(0);
    if (count_out) count_out[0] = A(n);
  }
}

}  // namespace

// =============================================================================================
// Launchers.

void embedding_fwd(DType dt, const int32_t* tok, const void* wte, const void* wpe, void* y, int64_t B, int64_t T,
                   int64_t C, cudaStream_t s) {
  const int64_t rows = B * T;
  if (rows <= 0 || C <= 0) return;
  dispatch_float(dt, "embedding_fwd", [&](auto tag) {
    using E = decltype(tag);
    constexpr int N = kVec<E>;
    const E* pwte = static_cast<const E*>(wte);
    const E* pwpe = static_cast<const E*>(wpe);
    E* py = static_cast<E*>(y);
    const unsigned grid = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    if (C % N == 0 && aligned16(pwte) && aligned16(py) && (!pwpe || aligned16(pwpe)))
      embedding_fwd_kernel<E, N><<<grid, kRowThreads, 0, s>>>(tok, pwte, pwpe, py, rows, T, C);
    else
      embedding_fwd_kernel<E, 1><<<grid, kRowThreads, 0, s>>>(tok, pwte, pwpe, py, rows, T, C);
    CUDA_CHECK_LAUNCH();
  });
}

void embedding_bwd(DType dt, const int32_t* tok, const void* dy, void* dwte, void* dwpe, int64_t B, int64_t T,
                   int64_t C, int64_t V, cudaStream_t s) {
  const int64_t rows = B * T;
  if (rows <= 0 || C <= 0) return;
  dispatch_float(dt, "embedding_bwd", [&](auto tag) {
    using E = decltype(tag);
    constexpr int N = kVec<E>;
    const E* pdy = static_cast<const E*>(dy);
    if (dwpe) {
      E* p = static_cast<E*>(dwpe);
      if (C % N == 0 && aligned16(pdy) && aligned16(p)) {
        embedding_dwpe_kernel<E, N><<<grid_for(T * (C / N), 256, INT32_MAX), 256, 0, s>>>(pdy, p, B, T, C);
      } else {
        embedding_dwpe_kernel<E, 1><<<grid_for(T * C, 256, INT32_MAX), 256, 0, s>>>(pdy, p, B, T, C);
      }
      CUDA_CHECK_LAUNCH();
    }
    if (dwte) {
      E* p = static_cast<E*>(dwte);
      if (C % N == 0 && aligned16(pdy) && aligned16(p)) embedding_dwte<E, N>(tok, pdy, p, rows, C, V, s);
      else embedding_dwte<E, 1>(tok, pdy, p, rows, C, V, s);
    }
  });
}

int64_t count_out_of_range(const int32_t* tok, int64_t n, int64_t V, int64_t ignore, cudaStream_t s) {
  if (n <= 0) return 0;
  Scratch cnt(sizeof(unsigned long long));
  unsigned long long* d = cnt.as<unsigned long long>();
  CUDA_CHECK(cudaMemsetAsync(d, 0, sizeof(unsigned long long), s));
  count_oor_kernel<<<grid_for(n, 256, 1024), 256, 0, s>>>(tok, n, V, ignore, d);
  CUDA_CHECK_LAUNCH();
  unsigned long long h = 0;
  CUDA_CHECK(cudaMemcpyAsync(&h, d, sizeof(h), cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
  return int64_t(h);
}

void layernorm_fwd(DType dt, const void* x, const void* w, const void* b, void* y, void* mean, void* rstd,
                   int64_t rows, int64_t C, double eps, cudaStream_t s) {
  if (rows <= 0 || C <= 0) return;
  dispatch_float(dt, "layernorm_fwd", [&](auto tag) {
    using E = decltype(tag);
    using A = acc_t<E>;
    constexpr int N = kVec<E>;
    const E* px = static_cast<const E*>(x);
    const E* pw = static_cast<const E*>(w);
    const E* pb = static_cast<const E*>(b);
    E* py = static_cast<E*>(y);
    A* pm = static_cast<A*>(mean);
    A* pr = static_cast<A*>(rstd);
    const bool vec = C % N == 0 && aligned16(px) && aligned16(py) && (!pw || aligned16(pw)) && (!pb || aligned16(pb));
    const bool done = vec && with_nv((C / N + 31) / 32, [&](auto nv) {
      ln_fwd_launch<E, N, decltype(nv)::value>(px, pw, pb, py, pm, pr, rows, C, eps, s);
    });
    if (!done) {
      const unsigned grid = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
      ln_fwd_generic_kernel<E><<<grid, kRowThreads, 0, s>>>(px, pw, pb, py, pm, pr, rows, C, A(eps));
      CUDA_CHECK_LAUNCH();
    }
  });
}

void layernorm_bwd(DType dt, const void* x, const void* w, const void* mean, const void* rstd, const void* dy,
                   void* dx, void* dw, void* db, int64_t rows, int64_t C, cudaStream_t s) {
  if (rows <= 0 || C <= 0 || (!dx && !dw && !db)) return;
  dispatch_float(dt, "layernorm_bwd", [&](auto tag) {
    using E = decltype(tag);
    using A = acc_t<E>;
    constexpr int N = kVec<E>;
    const E* px = static_cast<const E*>(x);
    const E* pw = static_cast<const E*>(w);
    const A* pm = static_cast<const A*>(mean);
    const A* pr = static_cast<const A*>(rstd);
    const E* pdy = static_cast<const E*>(dy);
    E* pdx = static_cast<E*>(dx);
    E* pdw = static_cast<E*>(dw);
    E* pdb = static_cast<E*>(db);
    const bool vec = C % N == 0 && aligned16(px) && aligned16(pdy) && (!pdx || aligned16(pdx)) &&
                     (!pw || aligned16(pw));
    const bool done = vec && with_nv((C / N + 31) / 32, [&](auto nv) {
      ln_bwd_launch<E, N, decltype(nv)::value>(px, pw, pm, pr, pdy, pdx, pdw, pdb, rows, C, s);
    });
    if (done) return;
    if (pdx) {
      const unsigned grid = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
      ln_bwd_dx_generic_kernel<E><<<grid, kRowThreads, 0, s>>>(px, pw, pm, pr, pdy, pdx, rows, C);
      CUDA_CHECK_LAUNCH();
    }
    if (pdw || pdb) {
      const int64_t tiles = (C + 31) / 32;
      int64_t splits = std::clamp<int64_t>(std::min<int64_t>(rows / 64, 512 / tiles), 1, 65535);
      const int64_t rps = (rows + splits - 1) / splits;
      splits = (rows + rps - 1) / rps;
      Scratch part(size_t(splits) * 2 * size_t(C) * sizeof(A));
      ln_dwdb_generic_kernel<E><<<dim3(unsigned(tiles), unsigned(splits)), dim3(32, 8), 0, s>>>(
          px, pm, pr, pdy, part.as<A>(), rows, C, rps);
      CUDA_CHECK_LAUNCH();
      if (pdw) colsum_acc_impl<A, E>(part.as<A>(), splits, C, 2 * C, pdw, s);
      if (pdb) colsum_acc_impl<A, E>(part.as<A>() + C, splits, C, 2 * C, pdb, s);
    }
  });
}

void cross_entropy_fwd(DType dt, const void* logits, const int32_t* tgt, void* lse, void* loss, int64_t rows,
                       int64_t V, int64_t row_stride, int32_t ignore, cudaStream_t s) {
  if (rows <= 0 || (!lse && !loss)) return;
  if (rows > int64_t(INT32_MAX)) throw std::invalid_argument("kernels::cuda::cross_entropy_fwd: rows over 2^31-1");
  dispatch_float(dt, "cross_entropy_fwd", [&](auto tag) {
    using E = decltype(tag);
    using A = acc_t<E>;
    constexpr int N = kVec<E>;
    const E* pl = static_cast<const E*>(logits);
    // Rows are split per row into head / packs / tail, which needs only element alignment.
    if (aligned_to(pl, sizeof(E)))
      ce_fwd_kernel<E, N><<<unsigned(rows), kCeThreads, 0, s>>>(pl, tgt, static_cast<A*>(lse), static_cast<A*>(loss), V, row_stride, ignore);
    else
      ce_fwd_kernel<E, 1><<<unsigned(rows), kCeThreads, 0, s>>>(pl, tgt, static_cast<A*>(lse), static_cast<A*>(loss), V, row_stride, ignore);
    CUDA_CHECK_LAUNCH();
  });
}

void cross_entropy_bwd(DType dt, const void* logits, const int32_t* tgt, const void* lse, const void* dloss,
                       const void* count, void* dlogits, int64_t rows, int64_t V, int64_t row_stride, int32_t ignore,
                       cudaStream_t s) {
  if (rows <= 0 || !dlogits) return;
  if (rows > int64_t(INT32_MAX)) throw std::invalid_argument("kernels::cuda::cross_entropy_bwd: rows over 2^31-1");
  dispatch_float(dt, "cross_entropy_bwd", [&](auto tag) {
    using E = decltype(tag);
    using A = acc_t<E>;
    constexpr int N = kVec<E>;
    const E* pl = static_cast<const E*>(logits);
    E* pd = static_cast<E*>(dlogits);
    const bool same_mis = (reinterpret_cast<uintptr_t>(pl) & 15u) == (reinterpret_cast<uintptr_t>(pd) & 15u);
    if (same_mis && aligned_to(pl, sizeof(E)))
      ce_bwd_kernel<E, N><<<unsigned(rows), kCeThreads, 0, s>>>(pl, tgt, static_cast<const A*>(lse), static_cast<const A*>(dloss),
                                                               static_cast<const A*>(count), pd, V, row_stride, ignore);
    else
      ce_bwd_kernel<E, 1><<<unsigned(rows), kCeThreads, 0, s>>>(pl, tgt, static_cast<const A*>(lse), static_cast<const A*>(dloss),
                                                               static_cast<const A*>(count), pd, V, row_stride, ignore);
    CUDA_CHECK_LAUNCH();
  });
}

void cross_entropy_reduce(DType dt, const void* loss, const int32_t* tgt, int64_t rows, int32_t ignore, void* out,
                          void* count_out, cudaStream_t s) {
  dispatch_float(dt, "cross_entropy_reduce", [&](auto tag) {
    using A = acc_t<decltype(tag)>;
    ce_reduce_kernel<A><<<1, 1024, 0, s>>>(static_cast<const A*>(loss), tgt, std::max<int64_t>(rows, 0), ignore,
                                           static_cast<A*>(out), static_cast<A*>(count_out));
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace deeplora::kernels::cuda
