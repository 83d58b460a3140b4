// CUDA twin of kernels/llama.h's causal attention with grouped KV heads, every float dtype and head
// size (a multiple of 8 up to 128). FlashAttention-2 structure on CUDA cores: a block owns a tile of
// query rows of one head and streams K/V tiles through shared memory with an online softmax; the
// backward recomputes P from the saved lse in two deterministic passes (dQ per query tile; dK/dV per
// key tile, looping over the query heads of its KV head: no atomics). Compute is in f32 (f64 for f64)
// with the tiles converted once into shared memory; the head size is a template (32, 64, 128, with
// columns past the real hd zero-filled), so the inner products unroll.
//
// Thread layout (128 threads = 16 row groups x 8 column groups, rg = tid / 8, cg = tid % 8): a thread
// owns rows rg + 16 m (m < TM) of the resident tile, score columns cg + 8 y (y < TN) of the streamed
// tile, and output columns 4 cg + 32 x .. + 3 (x < HD / 32). With row pitch HD + 4 and score pitch
// BC + 8 (in accumulator elements) the 16-byte shared loads and the score stores are bank-conflict
// free (f32); the 8 threads of a row group are adjacent lanes, so row max/sum are 3 xor shuffles.
#include "kernels/llama.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_utils.cuh"

namespace deeplora::kernels::cuda {
namespace {

using namespace util;

constexpr int kThreads = 128;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

__device__ __forceinline__ float exp2_acc(float v) { return exp2f(v); }
__device__ __forceinline__ double exp2_acc(double v) { return exp2(v); }
__device__ __forceinline__ float log2_acc(float v) { return log2f(v); }
__device__ __forceinline__ double log2_acc(double v) { return log2(v); }

// Four consecutive accumulators in shared memory (16-byte aligned).
__device__ __forceinline__ void lds4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
}
__device__ __forceinline__ void lds4(const double* p, double (&v)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}
__device__ __forceinline__ void sts4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void sts4(double* p, double a, double b, double c, double d) {
  reinterpret_cast<double2*>(p)[0] = make_double2(a, b);
  reinterpret_cast<double2*>(p)[1] = make_double2(c, d);
}

// Tile geometry of one kernel instantiation.
template <class A, int HD, int TM, int TN> struct Geo {
  static constexpr int BR = 16 * TM;  // rows of the resident tile
  static constexpr int BC = 8 * TN;   // rows of the streamed tile (score columns)
  static constexpr int P = HD + 4;    // row pitch (elements)
  static constexpr int PP = BC + 8;   // score pitch
  static constexpr int NX = HD / 32;  // 4-column chunks per thread
  static_assert(HD % 32 == 0 && HD <= 128, "head-size bucket");
};

// Rows row0 .. row0 + ROWS of one head (src: that head's row 0; pitch in elements) into dst [ROWS][HD + 4]
// as accumulators; rows >= T and columns >= hd become 0 (so products over the HD bucket stay exact).
// vec: 8-element (16 bytes or more) global loads; needs hd % 8 == 0 and 16-byte aligned rows.
template <class T, int HD, int ROWS>
__device__ __forceinline__ void load_rows(acc_t<T>* dst, const T* src, int64_t pitch, int row0, int T_, int hd,
                                          bool vec) {
  using A = acc_t<T>;
  constexpr int P = HD + 4, CH = HD / 8;
  for (int idx = threadIdx.x; idx < ROWS * CH; idx += kThreads) {
    const int r = idx / CH, c0 = (idx % CH) * 8, row = row0 + r;
    A v[8];
    if (row < T_ && c0 < hd) {
      const T* g = src + int64_t(row) * pitch + c0;
      if (vec) {
        const Pack<T, 8> p = load_pack<8>(g);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = to_acc(p.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = to_acc(g[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = A(0);
    }
    sts4(dst + r * P + c0, v[0], v[1], v[2], v[3]);
    sts4(dst + r * P + c0 + 4, v[4], v[5], v[6], v[7]);
  }
}

// acc[m][y] = sum_d X[rg + 16 m][d] Y[cg + 8 y][d] over the HD bucket (X, Y with pitch HD + 4).
template <class A, int HD, int TM, int TN>
__device__ __forceinline__ void dot_tile(A (&acc)[TM][TN], const A* X, const A* Y, int rg, int cg) {
  constexpr int P = HD + 4;
#pragma unroll
  for (int m = 0; m < TM; ++m)
#pragma unroll
    for (int y = 0; y < TN; ++y) acc[m][y] = A(0);
#pragma unroll 4
  for (int d = 0; d < HD; d += 4) {
    A xv[TM][4], yv[TN][4];
#pragma unroll
    for (int m = 0; m < TM; ++m) lds4(X + (rg + 16 * m) * P + d, xv[m]);
#pragma unroll
    for (int y = 0; y < TN; ++y) lds4(Y + (cg + 8 * y) * P + d, yv[y]);
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
      for (int y = 0; y < TN; ++y)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][y] += xv[m][e] * yv[y][e];
  }
}

// o[m][x][e] += sum_j S[rg + 16 m][j] V[j][4 cg + 32 x + e] over the BC streamed rows (S pitch BC + 8).
template <class A, int HD, int TM, int TN>
__device__ __forceinline__ void acc_tile(A (&o)[TM][HD / 32][4], const A* S, const A* V, int rg, int cg) {
  using G = Geo<A, HD, TM, TN>;
#pragma unroll 2
  for (int j = 0; j < G::BC; j += 4) {
    A pv[TM][4];
#pragma unroll
    for (int m = 0; m < TM; ++m) lds4(S + (rg + 16 * m) * G::PP + j, pv[m]);
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
#pragma unroll
      for (int x = 0; x < G::NX; ++x) {
        A vv[4];
        lds4(V + (j + jj) * G::P + 4 * cg + 32 * x, vv);
#pragma unroll
        for (int m = 0; m < TM; ++m)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[m][x][e] += pv[m][jj] * vv[e];
      }
  }
}

// Stores (or adds) mul * acc for the thread's rows row0 + rg + 16 m (< T) and columns (< hd).
template <class T, int HD, int TM>
__device__ __forceinline__ void store_rows(T* base, int64_t pitch, int row0, int T_, int hd,
                                           const acc_t<T> (&acc)[TM][HD / 32][4], acc_t<T> mul, bool add, bool vec,
                                           int rg, int cg) {
  using A = acc_t<T>;
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const int row = row0 + rg + 16 * m;
    if (row >= T_) continue;
    T* r = base + int64_t(row) * pitch;
#pragma unroll
    for (int x = 0; x < HD / 32; ++x) {
      const int c0 = 4 * cg + 32 * x;
      if (c0 >= hd) continue;  // hd % 8 == 0: a chunk is wholly inside or outside
      if (vec) {
        Pack<T, 4> o;
        if (add) o = load_pack<4>(r + c0);
#pragma unroll
        for (int e = 0; e < 4; ++e) o.v[e] = from_acc<T>(acc[m][x][e] * mul + (add ? to_acc(o.v[e]) : A(0)));
        store_pack<4>(r + c0, o);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) r[c0 + e] = from_acc<T>(acc[m][x][e] * mul + (add ? to_acc(r[c0 + e]) : A(0)));
      }
    }
  }
}

template <class A> __device__ __forceinline__ A group_max(A v) {
  v = max(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = max(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return max(v, __shfl_xor_sync(0xffffffffu, v, 4));
}
template <class A> __device__ __forceinline__ A group_sum(A v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v + __shfl_xor_sync(0xffffffffu, v, 4);
}

struct Dims {
  int T, Hq, Hkv, hd;
  int64_t qpitch, kpitch;  // Hq * hd, Hkv * hd
};

// ---- forward -----------------------------------------------------------------------------------
// Grid (B * Hq, query tiles), the longest query tiles first (better tail balance).
template <class T, int HD, int TM, int TN>
__global__ void __launch_bounds__(kThreads) gqa_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                           const T* __restrict__ v, T* __restrict__ out,
                                                           acc_t<T>* __restrict__ lse, Dims d, acc_t<T> scale_log2,
                                                           bool vec) {
  using A = acc_t<T>;
  using G = Geo<A, HD, TM, TN>;
  extern __shared__ __align__(16) unsigned char gqa_smem[];
  A* sQ = reinterpret_cast<A*>(gqa_smem);
  A* sK = sQ + G::BR * G::P;
  A* sV = sK + G::BC * G::P;
  A* sP = sV + G::BC * G::P;

  const int bh = blockIdx.x, b = bh / d.Hq, h = bh % d.Hq, hk = h / (d.Hq / d.Hkv);
  const int q0 = (int(gridDim.y) - 1 - int(blockIdx.y)) * G::BR;
  const int rg = threadIdx.x >> 3, cg = threadIdx.x & 7;
  const T* qb = q + int64_t(b) * d.T * d.qpitch + int64_t(h) * d.hd;
  const T* kb = k + int64_t(b) * d.T * d.kpitch + int64_t(hk) * d.hd;
  const T* vb = v + int64_t(b) * d.T * d.kpitch + int64_t(hk) * d.hd;

  load_rows<T, HD, G::BR>(sQ, qb, d.qpitch, q0, d.T, d.hd, vec);
  A o[TM][G::NX][4], mrow[TM], lrow[TM];
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    mrow[m] = A(-INFINITY);
    lrow[m] = A(0);
#pragma unroll
    for (int x = 0; x < G::NX; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[m][x][e] = A(0);
  }

  const int kend = min(d.T, q0 + G::BR);  // keys past the tile's last row are masked for all its rows
  for (int j0 = 0; j0 < kend; j0 += G::BC) {
    load_rows<T, HD, G::BC>(sK, kb, d.kpitch, j0, d.T, d.hd, vec);
    load_rows<T, HD, G::BC>(sV, vb, d.kpitch, j0, d.T, d.hd, vec);
    __syncthreads();
    A s[TM][TN];
    dot_tile<A, HD, TM, TN>(s, sQ, sK, rg, cg);
#pragma unroll
    for (int m = 0; m < TM; ++m) {
      const int row = q0 + rg + 16 * m;
      A mx = A(-INFINITY);
#pragma unroll
      for (int y = 0; y < TN; ++y) {
        const int col = j0 + cg + 8 * y;
        const A val = col <= row ? s[m][y] * scale_log2 : A(-INFINITY);
        s[m][y] = val;
        mx = max(mx, val);
      }
      mx = group_max(mx);
      const A mnew = max(mrow[m], mx);
      const A mref = mnew == A(-INFINITY) ? A(0) : mnew;  // a row with nothing visible yet stays all zero
      const A alpha = exp2_acc(mrow[m] - mref);
      A sum = A(0);
#pragma unroll
      for (int y = 0; y < TN; ++y) {
        const A p = exp2_acc(s[m][y] - mref);
        s[m][y] = p;
        sum += p;
      }
      lrow[m] = lrow[m] * alpha + sum;  // per-thread partial; the row group is summed at the end
      mrow[m] = mnew;
#pragma unroll
      for (int x = 0; x < G::NX; ++x)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[m][x][e] *= alpha;
#pragma unroll
      for (int y = 0; y < TN; ++y) sP[(rg + 16 * m) * G::PP + cg + 8 * y] = s[m][y];
    }
    __syncthreads();
    acc_tile<A, HD, TM, TN>(o, sP, sV, rg, cg);
    __syncthreads();  // sK, sV, sP are refilled next iteration
  }

  A inv[TM];
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const A l = group_sum(lrow[m]);
    inv[m] = l > A(0) ? A(1) / l : A(0);
    const int row = q0 + rg + 16 * m;
    if (cg == 0 && row < d.T) lse[int64_t(bh) * d.T + row] = (mrow[m] + log2_acc(l)) * A(kLn2);
  }
  T* ob = out + int64_t(b) * d.T * d.qpitch + int64_t(h) * d.hd;
  A scaled[TM][G::NX][4];
#pragma unroll
  for (int m = 0; m < TM; ++m)
#pragma unroll
    for (int x = 0; x < G::NX; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e) scaled[m][x][e] = o[m][x][e] * inv[m];
  store_rows<T, HD, TM>(ob, d.qpitch, q0, d.T, d.hd, scaled, A(1), false, vec, rg, cg);
}

// ---- backward ----------------------------------------------------------------------------------
// D[(b Hq + h) T + t] = out[b, t, h] . dout[b, t, h]: a warp per (b, t, h).
template <class T>
__global__ void __launch_bounds__(256) gqa_rowdot_kernel(const T* __restrict__ out, const T* __restrict__ dout,
                                                         acc_t<T>* __restrict__ D, int64_t B, Dims d) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t rows = B * d.T * d.Hq, nw = int64_t(gridDim.x) * 8;
  for (int64_t w = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5); w < rows; w += nw) {
    const int64_t h = w % d.Hq, bt = w / d.Hq, t = bt % d.T, b = bt / d.T;
    const T* o = out + bt * d.qpitch + h * d.hd;
    const T* g = dout + bt * d.qpitch + h * d.hd;
    A acc = A(0);
    for (int c = lane; c < d.hd; c += 32) acc += to_acc(o[c]) * to_acc(g[c]);
    acc = warp_sum(acc);
    if (lane == 0) D[(b * d.Hq + h) * d.T + t] = acc;
  }
}

// dQ pass. Grid (B * Hq, query tiles). Per key tile: S = Q K^T, dP = dO V^T (registers),
// dS = P (dP - D) to shared memory, dQ += dS K.
template <class T, int HD, int TM, int TN>
__global__ void __launch_bounds__(kThreads) gqa_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                              const T* __restrict__ v, const T* __restrict__ dout,
                                                              const acc_t<T>* __restrict__ lse,
                                                              const acc_t<T>* __restrict__ D, T* dq, Dims d,
                                                              acc_t<T> scale_log2, acc_t<T> scale, bool add, bool vec) {
  using A = acc_t<T>;
  using G = Geo<A, HD, TM, TN>;
  extern __shared__ __align__(16) unsigned char gqa_smem[];
  A* sQ = reinterpret_cast<A*>(gqa_smem);
  A* sdO = sQ + G::BR * G::P;
  A* sK = sdO + G::BR * G::P;
  A* sV = sK + G::BC * G::P;
  A* sS = sV + G::BC * G::P;

  const int bh = blockIdx.x, b = bh / d.Hq, h = bh % d.Hq, hk = h / (d.Hq / d.Hkv);
  const int q0 = (int(gridDim.y) - 1 - int(blockIdx.y)) * G::BR;
  const int rg = threadIdx.x >> 3, cg = threadIdx.x & 7;
  const int64_t qoff = int64_t(b) * d.T * d.qpitch + int64_t(h) * d.hd;
  const T* kb = k + int64_t(b) * d.T * d.kpitch + int64_t(hk) * d.hd;
  const T* vb = v + int64_t(b) * d.T * d.kpitch + int64_t(hk) * d.hd;

  load_rows<T, HD, G::BR>(sQ, q + qoff, d.qpitch, q0, d.T, d.hd, vec);
  load_rows<T, HD, G::BR>(sdO, dout + qoff, d.qpitch, q0, d.T, d.hd, vec);
  A l2[TM], Dm[TM], g[TM][G::NX][4];
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const int row = q0 + rg + 16 * m;
    l2[m] = row < d.T ? lse[int64_t(bh) * d.T + row] * A(kLog2e) : A(0);
    Dm[m] = row < d.T ? D[int64_t(bh) * d.T + row] : A(0);
#pragma unroll
    for (int x = 0; x < G::NX; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e) g[m][x][e] = A(0);
  }

  const int kend = min(d.T, q0 + G::BR);
  for (int j0 = 0; j0 < kend; j0 += G::BC) {
    load_rows<T, HD, G::BC>(sK, kb, d.kpitch, j0, d.T, d.hd, vec);
    load_rows<T, HD, G::BC>(sV, vb, d.kpitch, j0, d.T, d.hd, vec);
    __syncthreads();
    A s[TM][TN], dp[TM][TN];
    dot_tile<A, HD, TM, TN>(s, sQ, sK, rg, cg);
    dot_tile<A, HD, TM, TN>(dp, sdO, sV, rg, cg);
#pragma unroll
    for (int m = 0; m < TM; ++m) {
      const int row = q0 + rg + 16 * m;
#pragma unroll
      for (int y = 0; y < TN; ++y) {
        const int col = j0 + cg + 8 * y;
        const A p = (col <= row && row < d.T) ? exp2_acc(s[m][y] * scale_log2 - l2[m]) : A(0);
        sS[(rg + 16 * m) * G::PP + cg + 8 * y] = p * (dp[m][y] - Dm[m]);
      }
    }
    __syncthreads();
    acc_tile<A, HD, TM, TN>(g, sS, sK, rg, cg);
    __syncthreads();
  }
  store_rows<T, HD, TM>(dq + qoff, d.qpitch, q0, d.T, d.hd, g, scale, add, vec, rg, cg);
}

// dK/dV pass. Grid (B * Hkv, key tiles). The block keeps its keys' K and V and streams query tiles of
// every query head of its KV head: S^T = K Q^T, dP^T = V dO^T, P^T and dS^T to shared memory, then
// dV += P^T dO, dK += dS^T Q. dK is stored before dV (they may be one buffer).
template <class T, int HD, int TM, int TN>
__global__ void __launch_bounds__(kThreads) gqa_bwd_dkv_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                               const T* __restrict__ v, const T* __restrict__ dout,
                                                               const acc_t<T>* __restrict__ lse,
                                                               const acc_t<T>* __restrict__ D, T* dk, T* dv, Dims d,
                                                               acc_t<T> scale_log2, acc_t<T> scale, bool dk_add,
                                                               bool dv_add, bool vec) {
  using A = acc_t<T>;
  using G = Geo<A, HD, TM, TN>;
  extern __shared__ __align__(16) unsigned char gqa_smem[];
  A* sK = reinterpret_cast<A*>(gqa_smem);
  A* sV = sK + G::BR * G::P;
  A* sQ = sV + G::BR * G::P;
  A* sdO = sQ + G::BC * G::P;
  A* sP = sdO + G::BC * G::P;
  A* sdS = sP + G::BR * G::PP;
  A* sL = sdS + G::BR * G::PP;
  A* sD = sL + G::BC;

  const int bk = blockIdx.x, b = bk / d.Hkv, hk = bk % d.Hkv, n_group = d.Hq / d.Hkv;
  const int k0 = int(blockIdx.y) * G::BR;  // the longest (earliest) key tiles first
  const int rg = threadIdx.x >> 3, cg = threadIdx.x & 7;
  const int64_t koff = int64_t(b) * d.T * d.kpitch + int64_t(hk) * d.hd;
  load_rows<T, HD, G::BR>(sK, k + koff, d.kpitch, k0, d.T, d.hd, vec);
  load_rows<T, HD, G::BR>(sV, v + koff, d.kpitch, k0, d.T, d.hd, vec);

  A gk[TM][G::NX][4], gv[TM][G::NX][4];
#pragma unroll
  for (int m = 0; m < TM; ++m)
#pragma unroll
    for (int x = 0; x < G::NX; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e) gk[m][x][e] = gv[m][x][e] = A(0);

  for (int hi = 0; hi < n_group; ++hi) {
    const int h = hk * n_group + hi;
    const int64_t qoff = int64_t(b) * d.T * d.qpitch + int64_t(h) * d.hd;
    const int64_t srow = (int64_t(b) * d.Hq + h) * d.T;
    for (int i0 = (k0 / G::BC) * G::BC; i0 < d.T; i0 += G::BC) {
      load_rows<T, HD, G::BC>(sQ, q + qoff, d.qpitch, i0, d.T, d.hd, vec);
      load_rows<T, HD, G::BC>(sdO, dout + qoff, d.qpitch, i0, d.T, d.hd, vec);
      for (int t = threadIdx.x; t < G::BC; t += kThreads) {
        const int row = i0 + t;
        sL[t] = row < d.T ? lse[srow + row] * A(kLog2e) : A(0);
        sD[t] = row < d.T ? D[srow + row] : A(0);
      }
      __syncthreads();
      A s[TM][TN], dp[TM][TN];
      dot_tile<A, HD, TM, TN>(s, sK, sQ, rg, cg);
      dot_tile<A, HD, TM, TN>(dp, sV, sdO, rg, cg);
#pragma unroll
      for (int m = 0; m < TM; ++m) {
        const int key = k0 + rg + 16 * m;
#pragma unroll
        for (int y = 0; y < TN; ++y) {
          const int qi = i0 + cg + 8 * y;
          const A p = (qi >= key && qi < d.T && key < d.T) ? exp2_acc(s[m][y] * scale_log2 - sL[cg + 8 * y]) : A(0);
          sP[(rg + 16 * m) * G::PP + cg + 8 * y] = p;
          sdS[(rg + 16 * m) * G::PP + cg + 8 * y] = p * (dp[m][y] - sD[cg + 8 * y]);
        }
      }
      __syncthreads();
      acc_tile<A, HD, TM, TN>(gv, sP, sdO, rg, cg);
      acc_tile<A, HD, TM, TN>(gk, sdS, sQ, rg, cg);
      __syncthreads();
    }
  }
  store_rows<T, HD, TM>(dk + koff, d.kpitch, k0, d.T, d.hd, gk, scale, dk_add, vec, rg, cg);
  store_rows<T, HD, TM>(dv + koff, d.kpitch, k0, d.T, d.hd, gv, A(1), dv_add, vec, rg, cg);
}

// ---- launchers -----------------------------------------------------------------------------------

// Tile shapes per (accumulator, head-size bucket): f32 keeps 64-row tiles except where the 128-wide
// accumulators would cost occupancy; f64 uses 32 x 32 tiles (twice the bytes per element).
template <class A, int HD> struct Cfg {
  static constexpr bool f64 = sizeof(A) == 8;
  static constexpr int fwd_tm = f64 ? 2 : 4, fwd_tn = f64 ? 4 : (HD == 128 ? 4 : 8);
  static constexpr int bwd_tm = f64 ? 2 : (HD == 128 ? 2 : 4), bwd_tn = f64 ? 4 : (HD == 128 ? 4 : 8);
};

template <class K> void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

void check_args(const char* fn, DType dt, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd) {
  const std::string shape = " (B=" + std::to_string(B) + " T=" + std::to_string(T) + " Hq=" + std::to_string(Hq) +
                            " Hkv=" + std::to_string(Hkv) + " hd=" + std::to_string(hd) + ")";
  if (dt != DType::f32 && dt != DType::bf16 && dt != DType::f64)
    throw std::invalid_argument(std::string("kernels::cuda::") + fn + ": unsupported dtype " + dtype_name(dt));
  if (B < 0 || T < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0 || hd <= 0 || hd % 8 != 0 || hd > 128)
    throw std::invalid_argument(std::string("kernels::cuda::") + fn +
                                ": need Hq a positive multiple of Hkv and hd a multiple of 8 in [8, 128]" + shape);
  if (T > INT32_MAX / 2 || B * Hq > INT32_MAX || (T + 31) / 32 > 65535)
    throw std::invalid_argument(std::string("kernels::cuda::") + fn + ": shape too large for the grid" + shape);
}

template <class F> void with_bucket(int64_t hd, F&& f) {
  if (hd <= 32) f(std::integral_constant<int, 32>{});
  else if (hd <= 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

bool all_aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (p && !aligned16(p)) return false;
  return true;
}

Dims dims_of(int64_t T, int64_t Hq, int64_t Hkv, int64_t hd) {
  return Dims{int(T), int(Hq), int(Hkv), int(hd), Hq * hd, Hkv * hd};
}

}  // namespace

void gqa_attention_fwd(DType dt, const void* q, const void* k, const void* v, void* out, void* lse, int64_t B,
                       int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, cudaStream_t s) {
  check_args("gqa_attention_fwd", dt, B, T, Hq, Hkv, hd);
  if (B == 0 || T == 0) return;
  dispatch_float(dt, "gqa_attention_fwd", [&](auto tag) {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    const bool vec = all_aligned16({q, k, v, out});
    const Dims d = dims_of(T, Hq, Hkv, hd);
    const A scale_log2 = A(kLog2e / std::sqrt(double(hd)));
    with_bucket(hd, [&](auto bucket) {
      constexpr int HD = decltype(bucket)::value;
      constexpr int TM = Cfg<A, HD>::fwd_tm, TN = Cfg<A, HD>::fwd_tn;
      using G = Geo<A, HD, TM, TN>;
      const size_t smem = sizeof(A) * size_t(G::BR * G::P + 2 * G::BC * G::P + G::BR * G::PP);
      auto kernel = gqa_fwd_kernel<T_, HD, TM, TN>;
      allow_smem(kernel, smem);
      const dim3 grid(unsigned(B * Hq), unsigned((T + G::BR - 1) / G::BR));
      kernel<<<grid, kThreads, smem, s>>>(static_cast<const T_*>(q), static_cast<const T_*>(k),
                                          static_cast<const T_*>(v), static_cast<T_*>(out), static_cast<A*>(lse), d,
                                          scale_log2, vec);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void gqa_attention_bwd(DType dt, const void* q, const void* k, const void* v, const void* out, const void* lse,
                       const void* dout, void* dq, void* dk, void* dv, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
                       int64_t hd, bool dq_accumulate, bool dk_accumulate, bool dv_accumulate, cudaStream_t s) {
  check_args("gqa_attention_bwd", dt, B, T, Hq, Hkv, hd);
  if (B == 0 || T == 0 || (!dq && !dk && !dv)) return;
  dispatch_float(dt, "gqa_attention_bwd", [&](auto tag) {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    const bool vec = all_aligned16({q, k, v, out, dout, dq, dk, dv});
    const Dims d = dims_of(T, Hq, Hkv, hd);
    const A scale = A(1.0 / std::sqrt(double(hd))), scale_log2 = A(kLog2e / std::sqrt(double(hd)));
    const T_* pq = static_cast<const T_*>(q);
    const T_* pk = static_cast<const T_*>(k);
    const T_* pv = static_cast<const T_*>(v);
    const T_* pdo = static_cast<const T_*>(dout);
    const A* pl = static_cast<const A*>(lse);
    Scratch Dbuf(size_t(B * Hq * T) * sizeof(A));
    gqa_rowdot_kernel<T_><<<unsigned(std::clamp<int64_t>((B * T * Hq + 7) / 8, 1, int64_t(1) << 20)), 256, 0, s>>>(
        static_cast<const T_*>(out), pdo, Dbuf.as<A>(), B, d);
    CUDA_CHECK_LAUNCH();
    with_bucket(hd, [&](auto bucket) {
      constexpr int HD = decltype(bucket)::value;
      constexpr int TM = Cfg<A, HD>::bwd_tm, TN = Cfg<A, HD>::bwd_tn;
      using G = Geo<A, HD, TM, TN>;
      if (dq) {  // before dK/dV: q may share its gradient buffer with k or v
        const size_t smem = sizeof(A) * size_t(2 * G::BR * G::P + 2 * G::BC * G::P + G::BR * G::PP);
        auto kernel = gqa_bwd_dq_kernel<T_, HD, TM, TN>;
        allow_smem(kernel, smem);
        const dim3 grid(unsigned(B * Hq), unsigned((T + G::BR - 1) / G::BR));
        kernel<<<grid, kThreads, smem, s>>>(pq, pk, pv, pdo, pl, Dbuf.as<A>(), static_cast<T_*>(dq), d, scale_log2,
                                            scale, dq_accumulate, vec);
        CUDA_CHECK_LAUNCH();
      }
      if (dk || dv) {
        // A missing dK or dV goes to scratch: one kernel computes both.
        Scratch spare((dk && dv) ? 0 : size_t(B * T * Hkv * hd) * sizeof(T_));
        T_* pdk = dk ? static_cast<T_*>(dk) : spare.as<T_>();
        T_* pdv = dv ? static_cast<T_*>(dv) : spare.as<T_>();
        const bool vec2 = vec && all_aligned16({pdk, pdv});
        const size_t smem =
            sizeof(A) * size_t(2 * G::BR * G::P + 2 * G::BC * G::P + 2 * G::BR * G::PP + 2 * G::BC);
        auto kernel = gqa_bwd_dkv_kernel<T_, HD, TM, TN>;
        allow_smem(kernel, smem);
        const dim3 grid(unsigned(B * Hkv), unsigned((T + G::BR - 1) / G::BR));
        kernel<<<grid, kThreads, smem, s>>>(pq, pk, pv, pdo, pl, Dbuf.as<A>(), pdk, pdv, d, scale_log2, scale,
                                            dk ? dk_accumulate : false, dv ? dv_accumulate : false, vec2);
        CUDA_CHECK_LAUNCH();
      }
    });
  });
}

}  // namespace deeplora::kernels::cuda
