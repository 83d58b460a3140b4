// CUDA twins of kernels/attention_cache.h: cache writes (16-byte packs), decode attention over the
// cache (flash-decoding: position splits with an online softmax, then an ordered combine), row argmax.
// Nothing here reads start on the host or synchronizes, so a decode step can be captured in a graph.
#include "kernels/attention_cache.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_utils.cuh"

namespace deeplora::kernels::cuda {
namespace {

using namespace util;

// (No fmt in .cu files: nvcc rejects its compile-time format checks.)
[[noreturn]] void fail(const char* fn, const std::string& why) {
  throw std::invalid_argument(std::string("kernels::cuda::") + fn + ": " + why);
}
std::string str(int64_t v) { return std::to_string(v); }

void check_shape(const char* fn, int64_t B, int64_t Tn, int64_t C, int64_t H, int64_t Tmax) {
  if (B < 0 || Tn < 0 || Tmax < 0 || C <= 0 || H <= 0 || C % H != 0)
    fail(fn, "need B, Tn, Tmax >= 0 and C > 0 divisible by H > 0 (got B=" + str(B) + " Tn=" + str(Tn) + " C=" + str(C) +
                 " H=" + str(H) + " Tmax=" + str(Tmax) + ")");
}

// ---- cache write ------------------------------------------------------------------------------
// One pack of N elements per work item; N divides hd, so a pack never straddles two heads.
template <class T, int N>
__global__ void cache_write_kernel(const T* __restrict__ qkv, T* __restrict__ kc, T* __restrict__ vc,
                                   const int32_t* __restrict__ start, int64_t B, int64_t Tn, int64_t C, int64_t H,
                                   int64_t Tmax) {
  const int64_t hd = C / H, per_row = 2 * C / N, total = B * Tn * per_row;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bt = i / per_row, e = (i % per_row) * N;  // e in [0, 2C): k then v
    const int64_t b = bt / Tn, p = int64_t(start[b]) + bt % Tn;
    if (p < 0 || p >= Tmax) continue;
    const int64_t c = e % C, h = c / hd;
    T* dst = (e < C ? kc : vc) + ((b * H + h) * Tmax + p) * hd + c % hd;
    store_pack<N>(dst, load_pack<N>(qkv + bt * 3 * C + C + e));
  }
}

template <class T>
void cache_write(const T* qkv, T* kc, T* vc, const int32_t* start, int64_t B, int64_t Tn, int64_t C, int64_t H,
                 int64_t Tmax, cudaStream_t s) {
  constexpr int V = kVec<T>;
  constexpr int kThreads = 256;
  const bool vec = (C / H) % V == 0 && aligned16(qkv) && aligned16(kc) && aligned16(vc);
  const int64_t items = B * Tn * 2 * C / (vec ? V : 1);
  if (vec) cache_write_kernel<T, V><<<grid_for(items, kThreads), kThreads, 0, s>>>(qkv, kc, vc, start, B, Tn, C, H, Tmax);
  else cache_write_kernel<T, 1><<<grid_for(items, kThreads), kThreads, 0, s>>>(qkv, kc, vc, start, B, Tn, C, H, Tmax);
  CUDA_CHECK_LAUNCH();
}

// ---- decode attention -------------------------------------------------------------------------
// Grid (n_split * n_qt, H, B): a block owns one (b, h), a tile of QT queries and one split of `chunk`
// cache positions. G lanes hold one position's row (NC 16-byte packs each), so a warp covers 32/G
// consecutive rows per copy. K/V reach shared memory through a per-thread cp.async pipeline of
// kStages stages: each thread reads back only what it copied itself, so the loop has no barriers and
// the bytes in flight cost no registers; small stages keep many warps resident (decode is bound by
// bytes in flight and by the dependent chain of each warp, not by arithmetic). The first stages go
// out before start has arrived. Each lane group keeps an online softmax (m, l, acc) per query;
// groups, then warps, are merged at the end. With one split the block writes out, otherwise
// unnormalized partials go to scratch and decode_combine (launched as a programmatic dependent, so
// its launch overlaps this kernel) merges the splits in order: deterministic. Blocks past the row's
// last position only let their speculative copies land and exit: the grid depends on Tmax only,
// never on start.
// 6 stages of 64 B per thread (128 B for f64 rows of > 128): 5 in flight, 48 KB per block, four
// blocks per SM. Measured on an H200 (B=16, 1024 positions, bf16): 3 stages 1.86 TB/s, 6 2.14,
// 8 2.06; an L2 bulk prefetch ahead of the pipeline was slower (1.73).
constexpr int kDecWarps = 4, kDecThreads = 32 * kDecWarps, kMaxHd = 256, kStages = 6;

template <int NC> constexpr int rows_per_stage() { return NC == 1 ? 2 : 1; }  // U
template <class T, int NC, int QT> constexpr int decode_smem() {
  const int pipe = kStages * 2 * rows_per_stage<NC>() * NC * 16 * kDecThreads;
  const int merge = (kDecWarps * QT * kMaxHd + 2 * kDecWarps * QT) * int(sizeof(acc_t<T>));
  return pipe > merge ? pipe : merge;
}

struct DecodeArgs {
  const void* qkv;
  const void* kc;
  const void* vc;
  const int32_t* start;
  void* out;
  void* part_o;   // [B, H, Tn, n_split, hd] in acc type; null with one split
  void* part_ml;  // [B, H, Tn, n_split, 2] (max, sum)
  int64_t B, Tn, C, H, Tmax, hd;
  int64_t chunk;
  int n_split, G;
  double scale;  // of the scores, in the exponent's base (log2 units for f32 math)
};

// Softmax exponent: base 2 for f32 (scores are pre-scaled by log2 e), e for f64.
__device__ __forceinline__ float ex(float x) { return exp2f(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
// exp(m - M) for a partial state, 0 for an empty one (m = -inf).
template <class A> __device__ __forceinline__ A rescale(A m, A M) { return m == A(-INFINITY) ? A(0) : ex(m - M); }

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {  // 0 bytes: zero fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(uint32_t(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <class T, int NC, int QT>
__global__ void __launch_bounds__(kDecThreads) decode_kernel(DecodeArgs a) {
  using A = acc_t<T>;
  constexpr int VEC = kVec<T>, E = NC * VEC, U = rows_per_stage<NC>(), NP = U * NC;  // NP packs per tensor
  // Pipeline slots [kStages][2 NP][kDecThreads] of 16 B (consecutive threads on consecutive words: no
  // bank conflicts); reused by the warp merge after the loop.
  extern __shared__ int4 smem[];
  asm volatile("griddepcontrol.launch_dependents;");  // decode_combine may launch (it waits for us)

  const int split = int(blockIdx.x) % a.n_split, t0 = int(blockIdx.x) / a.n_split * QT;
  const int64_t h = blockIdx.y, b = blockIdx.z, Tn = a.Tn, Tmax = a.Tmax;
  const int hd = int(a.hd), tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int G = a.G, P = 32 / G, grp = lane / G, r = lane % G, nchunk = hd / VEC;
  const int64_t lo = int64_t(split) * a.chunk;
  const int n_max = int(min(a.chunk, Tmax - lo));  // rows of this split, all inside the cache
  const T* kh = static_cast<const T*>(a.kc) + ((b * a.H + h) * Tmax + lo) * hd;
  const T* vh = static_cast<const T*>(a.vc) + ((b * a.H + h) * Tmax + lo) * hd;
  const int step = kDecWarps * P, iter = step * U, row0 = warp * P + grp;
  // Stage `it`: rows it*iter + u*step + row0; rows >= n_rows and idle lanes' packs are zero-filled.
  auto issue = [&](int it, int n_rows) {
    if (it * iter < n_rows) {
      int4* slot = smem + (it % kStages) * 2 * NP * kDecThreads + tid;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = it * iter + u * step + row0;
#pragma unroll
        for (int n = 0; n < NC; ++n) {
          const int c = r + G * n;
          const bool ok = j < n_rows && c < nchunk;
          const int off = ok ? j * hd + c * VEC : 0;
          cp_async16(slot + (u * NC + n) * kDecThreads, kh + off, ok ? 16 : 0);
          cp_async16(slot + (NP + u * NC + n) * kDecThreads, vh + off, ok ? 16 : 0);
        }
      }
    }
    cp_async_commit();  // empty groups too: the wait count below stays uniform
  };
  // Before start is known: rows past the row's length are read but masked below, whatever they hold.
#pragma unroll
  for (int it = 0; it < kStages - 1; ++it) issue(it, n_max);

  const int64_t s0 = a.start[b];
  A q[QT][E];  // pre-scaled queries; those past Tn are zeros
#pragma unroll
  for (int qi = 0; qi < QT; ++qi) {
    const int64_t t = t0 + qi;
    const T* qp = static_cast<const T*>(a.qkv) + (b * Tn + min(t, Tn - 1)) * 3 * a.C + h * hd;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = r + G * n;
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        q[qi][n * VEC + v] = (t < Tn && c < nchunk) ? A(to_acc(qp[c * VEC + v])) * A(a.scale) : A(0);
    }
  }
  const int64_t nq = min(int64_t(QT), Tn - t0);
  const int64_t last = min(s0 + t0 + nq - 1, Tmax - 1);  // the furthest position this tile reads
  if (lo > last) {  // whole block: the combine never reads this split for these queries
    cp_async_wait<0>();
    return;
  }
  const int n_pos = int(min(int64_t(n_max), last + 1 - lo));
  int lim[QT];  // the last row (relative to lo) each query sees; -1: none
#pragma unroll
  for (int qi = 0; qi < QT; ++qi) lim[qi] = t0 + qi < Tn ? min(int(min(s0 + t0 + qi, Tmax - 1) - lo), n_pos - 1) : -1;

  A m[QT], l[QT], acc[QT][E];
#pragma unroll
  for (int qi = 0; qi < QT; ++qi) {
    m[qi] = A(-INFINITY);
    l[qi] = A(0);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[qi][e] = A(0);
  }
  const int n_it = (n_pos + iter - 1) / iter;
  for (int it = 0; it < n_it; ++it) {
    issue(it + kStages - 1, n_pos);
    cp_async_wait<kStages - 1>();
    const int4* slot = smem + (it % kStages) * 2 * NP * kDecThreads + tid;
    A s[QT][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = it * iter + u * step + row0;
      Pack<T, VEC> kp[NC];
#pragma unroll
      for (int n = 0; n < NC; ++n) kp[n] = *reinterpret_cast<const Pack<T, VEC>*>(slot + (u * NC + n) * kDecThreads);
#pragma unroll
      for (int qi = 0; qi < QT; ++qi) {
        A d = A(0);
#pragma unroll
        for (int n = 0; n < NC; ++n)
#pragma unroll
          for (int v = 0; v < VEC; ++v) d += q[qi][n * VEC + v] * A(to_acc(kp[n].v[v]));
        for (int o = G >> 1; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[qi][u] = j <= lim[qi] ? d : A(-INFINITY);
      }
    }
#pragma unroll
    for (int qi = 0; qi < QT; ++qi) {
      A mx = m[qi];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = max(mx, s[qi][u]);
      if (mx > m[qi]) {  // rescale only when the max grows (rare after the first rows)
        const A corr = rescale(m[qi], mx);
        l[qi] *= corr;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[qi][e] *= corr;
        m[qi] = mx;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      Pack<T, VEC> vp[NC];
#pragma unroll
      for (int n = 0; n < NC; ++n) vp[n] = *reinterpret_cast<const Pack<T, VEC>*>(slot + (NP + u * NC + n) * kDecThreads);
#pragma unroll
      for (int qi = 0; qi < QT; ++qi)
        if (s[qi][u] != A(-INFINITY)) {  // masked rows may hold anything (NaN): skip, don't multiply by 0
          const A pe = ex(s[qi][u] - m[qi]);
          l[qi] += pe;
#pragma unroll
          for (int n = 0; n < NC; ++n)
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[qi][n * VEC + v] += pe * A(to_acc(vp[n].v[v]));
        }
    }
  }
  cp_async_wait<0>();  // the speculative stages may still be landing, and the merge reuses the slots
  __syncthreads();

  // Merge the lane groups of the warp (lanes r, r+G, ... hold the same dims).
  for (int o = G; o < 32; o <<= 1)
#pragma unroll
    for (int qi = 0; qi < QT; ++qi) {
      const A mo = __shfl_xor_sync(0xffffffffu, m[qi], o), lo_ = __shfl_xor_sync(0xffffffffu, l[qi], o);
      const A mn = max(m[qi], mo), ca = rescale(m[qi], mn), cb = rescale(mo, mn);
      l[qi] = l[qi] * ca + lo_ * cb;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[qi][e] = acc[qi][e] * ca + __shfl_xor_sync(0xffffffffu, acc[qi][e], o) * cb;
      m[qi] = mn;
    }
  A* sh_acc = reinterpret_cast<A*>(smem);  // [kDecWarps][QT][hd]
  A* sh_m = sh_acc + kDecWarps * QT * hd;  // [kDecWarps][QT]
  A* sh_l = sh_m + kDecWarps * QT;
  if (grp == 0) {
#pragma unroll
    for (int qi = 0; qi < QT; ++qi) {
      if (r == 0) sh_m[warp * QT + qi] = m[qi], sh_l[warp * QT + qi] = l[qi];
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int c = r + G * n;
        if (c < nchunk)
#pragma unroll
          for (int v = 0; v < VEC; ++v) sh_acc[(warp * QT + qi) * hd + c * VEC + v] = acc[qi][n * VEC + v];
      }
    }
  }
  __syncthreads();

  // Merge the warps, in order; one thread per (query, dim).
  for (int i = tid; i < int(nq) * hd; i += kDecThreads) {
    const int qi = i / hd, d = i % hd;
    const int64_t t = t0 + qi;
    A M = A(-INFINITY);
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) M = max(M, sh_m[w * QT + qi]);
    A L = A(0), O = A(0);
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) {
      const A c = rescale(sh_m[w * QT + qi], M);
      L += sh_l[w * QT + qi] * c;
      O += sh_acc[(w * QT + qi) * hd + d] * c;
    }
    if (!a.part_o) {
      static_cast<T*>(a.out)[(b * Tn + t) * a.C + h * hd + d] = from_acc<T>(L > A(0) ? O / L : A(0));
    } else {
      const int64_t row = ((b * a.H + h) * Tn + t) * a.n_split + split;
      static_cast<A*>(a.part_o)[row * hd + d] = O;
      if (d == 0) static_cast<A*>(a.part_ml)[2 * row] = M, static_cast<A*>(a.part_ml)[2 * row + 1] = L;
    }
  }
}

// A warp per (b, t, h): merge the splits that hold positions <= p (exactly the ones that ran for it).
template <class T>
__global__ void decode_combine(DecodeArgs a) {
  using A = acc_t<T>;
  const int lane = int(threadIdx.x & 31);
  const int64_t rows = a.B * a.Tn * a.H, hd = a.hd;
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t h = wid % a.H, bt = wid / a.H, t = bt % a.Tn, b = bt / a.Tn;
  const int64_t lim = wid < rows ? min(int64_t(a.start[b]) + t, a.Tmax - 1) : -1;  // start: not ours to wait for
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the partials of decode_kernel are complete
  if (wid >= rows) return;
  const int n = lim < 0 ? 0 : int(lim / a.chunk) + 1;
  const int64_t row0 = ((b * a.H + h) * a.Tn + t) * a.n_split;
  const A* ml = static_cast<const A*>(a.part_ml) + 2 * row0;
  const A* po = static_cast<const A*>(a.part_o) + row0 * hd;
  A M = A(-INFINITY);
  for (int sp = lane; sp < n; sp += 32) M = max(M, ml[2 * sp]);
  M = warp_max(M);
  A L = A(0);
  for (int sp = lane; sp < n; sp += 32) L += ml[2 * sp + 1] * rescale(ml[2 * sp], M);
  L = warp_sum(L);
  for (int64_t d = lane; d < hd; d += 32) {
    A O = A(0);
    for (int sp = 0; sp < n; ++sp) O += po[sp * hd + d] * rescale(ml[2 * sp], M);
    static_cast<T*>(a.out)[bt * a.C + h * hd + d] = from_acc<T>(L > A(0) ? O / L : A(0));
  }
}

// Lets an instantiation use more than 48 KB of shared memory (f64 rows of > 128); set once.
template <class T, int NC, int QT> void decode_prepare() {
  static const bool done = [] {
    CUDA_CHECK(cudaFuncSetAttribute(decode_kernel<T, NC, QT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    decode_smem<T, NC, QT>()));
    return true;
  }();
  (void)done;
}

template <class T, int NC, int QT>
void decode_launch(DecodeArgs a, cudaStream_t s) {
  const int64_t n_qt = (a.Tn + QT - 1) / QT, pairs = a.B * a.H * n_qt;
  // Splits: about one block per SM in all. One resident block streams fast enough to keep its SM's
  // share of the bandwidth, and every split costs the combine (H200, 1024 positions, bf16: at B=16
  // one split beat two, 20.0 vs 23.5 us); small batches need splits to reach every SM (B=1: 16 us
  // unsplit, 11-12 us with 6 to 16 splits).
  const int64_t stage = int64_t(kDecWarps) * (32 / a.G) * rows_per_stage<NC>();
  const int64_t sms = std::max(cuda_ctx().sm_count, 1);
  const int64_t max_split = std::max<int64_t>(1, (a.Tmax + stage - 1) / stage);
  int64_t n_split = std::clamp<int64_t>((sms + pairs / 2) / pairs, 1, max_split);
  a.chunk = (a.Tmax + n_split - 1) / n_split;
  a.chunk = (a.chunk + stage - 1) / stage * stage;
  n_split = (a.Tmax + a.chunk - 1) / a.chunk;
  a.n_split = int(n_split);
  if (n_qt * n_split > INT_MAX || a.H > 65535 || a.B > 65535) fail("attention_cache_fwd", "grid too large");
  decode_prepare<T, NC, QT>();
  Scratch part(n_split > 1 ? size_t(a.B * a.H * a.Tn * n_split) * size_t(a.hd + 2) * sizeof(acc_t<T>) : 0);
  a.part_o = n_split > 1 ? part.as<void>() : nullptr;
  a.part_ml = n_split > 1 ? static_cast<void*>(part.as<acc_t<T>>() + a.B * a.H * a.Tn * n_split * a.hd) : nullptr;
  decode_kernel<T, NC, QT><<<dim3(unsigned(n_qt * n_split), unsigned(a.H), unsigned(a.B)), kDecThreads,
                             decode_smem<T, NC, QT>(), s>>>(a);
  CUDA_CHECK_LAUNCH();
  if (n_split > 1) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(grid_for(a.B * a.Tn * a.H * 32, 256, INT_MAX));
    cfg.blockDim = dim3(256);
    cfg.stream = s;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode_combine<T>, a));
  }
}

template <class T>
void decode(DecodeArgs a, cudaStream_t s) {
  // Two packs per lane where registers allow (fewer lanes per row: fewer shuffles and exps per row);
  // one for tiles of 4 queries in bf16 (4 x 16 query + accumulator floats would not fit).
  const int nchunk = int(a.hd / kVec<T>);
  const bool tile = a.Tn > 1 && !std::is_same_v<T, double>;  // f64 keeps one query per block
  const int nc = nchunk > 64 ? 4 : (tile && nchunk <= 32) ? 1 : 2;
  int G = 1;
  while (G < 32 && G * nc < nchunk) G *= 2;
  a.G = G;
  if constexpr (std::is_same_v<T, double>) a.scale = 1.0 / std::sqrt(double(a.hd));
  else a.scale = 1.4426950408889634 / std::sqrt(double(a.hd));  // log2(e) / sqrt(hd)
  if constexpr (std::is_same_v<T, double>) {
    if (nc == 4) return decode_launch<T, 4, 1>(a, s);
    return decode_launch<T, 2, 1>(a, s);
  } else {
    if (!tile) return decode_launch<T, 2, 1>(a, s);
    if (nc == 1) return decode_launch<T, 1, 4>(a, s);
    if constexpr (std::is_same_v<T, float>) return decode_launch<T, 2, 4>(a, s);  // f32 rows of > 128
  }
}

// ---- argmax -----------------------------------------------------------------------------------
constexpr int kArgThreads = 512;

// (v, i) beats (bv, bi): larger value, smaller index on ties; i < 0 means none (NaN is never kept).
template <class A> __device__ __forceinline__ bool beats(A v, int i, A bv, int bi) {
  return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

template <class T, int N>
__global__ void __launch_bounds__(kArgThreads) argmax_kernel(const T* __restrict__ x, int64_t n_valid,
                                                             int64_t row_stride, int32_t* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ A sh_v[32];
  __shared__ int sh_i[32];
  const T* xr = x + int64_t(blockIdx.x) * row_stride;
  A bv = A(0);
  int bi = -1;
  auto see = [&](A v, int64_t i) {
    if (!isnan(v) && beats(v, int(i), bv, bi)) bv = v, bi = int(i);
  };
  const int64_t body = n_valid / N;  // packs; each thread's indices increase, so ties keep the first
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < body; k += kArgThreads) {
    const Pack<T, N> p = load_pack_cs<N>(xr + k * N);
#pragma unroll
    for (int e = 0; e < N; ++e) see(A(to_acc(p.v[e])), k * N + e);
  }
  for (int64_t i = body * N + threadIdx.x; i < n_valid; i += kArgThreads) see(A(to_acc(xr[i])), i);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (beats(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  const int lane = int(threadIdx.x & 31), warp = int(threadIdx.x >> 5);
  if (lane == 0) sh_v[warp] = bv, sh_i[warp] = bi;
  __syncthreads();
  if (warp == 0) {
    bv = lane < kArgThreads / 32 ? sh_v[lane] : A(0);
    bi = lane < kArgThreads / 32 ? sh_i[lane] : -1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const A ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (beats(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    if (lane == 0) out[blockIdx.x] = bi < 0 ? 0 : bi;
  }
}

}  // namespace

void attention_cache_write(DType dt, const void* qkv, void* kcache, void* vcache, const int32_t* start, int64_t B,
                           int64_t Tn, int64_t C, int64_t H, int64_t Tmax, cudaStream_t s) {
  check_shape("attention_cache_write", B, Tn, C, H, Tmax);
  if (B == 0 || Tn == 0 || Tmax == 0) return;
  dispatch_float(dt, "attention_cache_write", [&](auto tag) {
    using T = decltype(tag);
    cache_write(static_cast<const T*>(qkv), static_cast<T*>(kcache), static_cast<T*>(vcache), start, B, Tn, C, H, Tmax,
                s);
  });
}

void attention_cache_fwd(DType dt, const void* qkv, const void* kcache, const void* vcache, const int32_t* start,
                         void* out, int64_t B, int64_t Tn, int64_t C, int64_t H, int64_t Tmax, cudaStream_t s) {
  check_shape("attention_cache_fwd", B, Tn, C, H, Tmax);
  const int64_t hd = C / H;
  if (hd % 8 != 0 || hd > kMaxHd)
    fail("attention_cache_fwd", "head size " + str(hd) + " (C=" + str(C) + " H=" + str(H) +
                                    ") must be a multiple of 8 and at most " + str(kMaxHd));
  if (!aligned16(kcache) || !aligned16(vcache))
    fail("attention_cache_fwd", "the K and V caches must be 16-byte aligned");
  if (B == 0 || Tn == 0) return;
  if (Tmax == 0) fail("attention_cache_fwd", "empty cache (Tmax = 0)");
  if (Tmax * hd >= (int64_t(1) << 31))
    fail("attention_cache_fwd", "Tmax * hd = " + str(Tmax * hd) + " must stay below 2^31 (per-head offsets are 32-bit)");
  DecodeArgs a{qkv, kcache, vcache, start, out, nullptr, nullptr, B, Tn, C, H, Tmax, hd, 0, 1, 1, 0.0};
  dispatch_float(dt, "attention_cache_fwd", [&](auto tag) { decode<decltype(tag)>(a, s); });
}

void argmax_rows(DType dt, const void* x, int64_t rows, int64_t n_valid, int64_t row_stride, int32_t* out,
                 cudaStream_t s) {
  if (rows < 0 || n_valid < 1 || row_stride < n_valid || n_valid > int64_t(INT32_MAX))
    fail("argmax_rows", "need rows >= 0 and 1 <= n_valid <= row_stride (got rows=" + str(rows) + " n_valid=" +
                            str(n_valid) + " row_stride=" + str(row_stride) + ")");
  if (rows == 0) return;
  if (rows > INT_MAX) fail("argmax_rows", str(rows) + " rows exceed the grid");
  dispatch_float(dt, "argmax_rows", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const T* p = static_cast<const T*>(x);
    if (aligned16(p) && row_stride % V == 0) argmax_kernel<T, V><<<unsigned(rows), kArgThreads, 0, s>>>(p, n_valid, row_stride, out);
    else argmax_kernel<T, 1><<<unsigned(rows), kArgThreads, 0, s>>>(p, n_valid, row_stride, out);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace deeplora::kernels::cuda
