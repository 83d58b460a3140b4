// CUDA twins of kernels/nn.h, layernorm part: one warp per row with the row in registers where it
// fits; dw/db through fixed-order block partials. No floating-point atomics.
#include "kernels/nn.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_utils.cuh"
#include "kernels/cuda/nn_common.cuh"

namespace deeplora::kernels::cuda {
namespace {

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
                  const T* dy, T* dx, acc_t<T>* __restrict__ partial, int64_t rows, int C, bool dx_acc) {
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
      if (dx_acc) {
        ov[k] = load_pack<N>(dxr + jc * N);
      } else {
#pragma unroll
        for (int e = 0; e < N; ++e) ov[k].v[e] = from_acc<T>(A(0));
      }
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
                                                                        int64_t rows, int64_t C, bool dx_acc) {
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
    dxr[c] = from_acc<T>((dx_acc ? to_acc(dxr[c]) : A(0)) + rs * (g - s1 - xh * s2));
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
                   T* db, int64_t rows, int64_t C, bool dx_acc, cudaStream_t s) {
  using A = acc_t<T>;
  if (!dw && !db) {
    const unsigned grid = unsigned(std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, INT32_MAX));
    ln_bwd_kernel<T, N, NV, false><<<grid, kRowThreads, 0, s>>>(x, w, mean, rstd, dy, dx, nullptr, rows, int(C), dx_acc);
    CUDA_CHECK_LAUNCH();
    return;
  }
  // A grid that depends on rows alone (so the dw/db order is fixed), ~16 rows per warp at GPT-2
  // sizes and at most 256 partial rows to reduce.
  const unsigned grid = unsigned(std::clamp<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, 256));
  const size_t smem = 2 * size_t(C) * sizeof(A);
  Scratch part(size_t(grid) * smem);
  ln_bwd_kernel<T, N, NV, true><<<grid, kRowThreads, smem, s>>>(x, w, mean, rstd, dy, dx, part.as<A>(), rows, int(C),
                                                                dx_acc);
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


}  // namespace

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
                   void* dx, void* dw, void* db, int64_t rows, int64_t C, bool dx_accumulate, cudaStream_t s) {
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
      ln_bwd_launch<E, N, decltype(nv)::value>(px, pw, pm, pr, pdy, pdx, pdw, pdb, rows, C, dx_accumulate, s);
    });
    if (done) return;
    if (pdx) {
      const unsigned grid = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
      ln_bwd_dx_generic_kernel<E><<<grid, kRowThreads, 0, s>>>(px, pw, pm, pr, pdy, pdx, rows, C, dx_accumulate);
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

}  // namespace deeplora::kernels::cuda
