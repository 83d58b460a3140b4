// CUDA twins of kernels/llama.h, all but attention (kernels/cuda/attention_gqa.cu): layout copies,
// RMSNorm, RoPE, SwiGLU. Bandwidth-bound: 16-byte accesses where sizes and pointers allow, scalar
// otherwise; reductions in a fixed order (no floating-point atomics).
#include "kernels/llama.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_utils.cuh"

namespace deeplora::kernels::cuda {
namespace {

using namespace util;

constexpr int kThreads = 256;
constexpr int kRowWarps = 8;  // warps per block of the warp-per-row kernels

__device__ __forceinline__ int lane() { return int(threadIdx.x & 31); }

// old + v in the accumulator type (i32: as integers).
template <class T> __device__ __forceinline__ T add_elem(T old, T v) {
  if constexpr (std::is_same_v<T, int32_t>) return old + v;
  else return from_acc<T>(to_acc(old) + to_acc(v));
}

template <class T> __device__ __forceinline__ T zero_elem() {
  if constexpr (std::is_same_v<T, int32_t>) return 0;
  else return from_acc<T>(acc_t<T>(0));
}
__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

template <class F> void dispatch_any(DType dt, const char* fn, F&& f) {
  if (dt == DType::i32) f(int32_t{});
  else dispatch_float(dt, fn, f);
}

// ---- transpose -------------------------------------------------------------------------------
// 32 x 32 tiles through shared memory (padded row: column reads hit distinct banks); a grid-stride
// loop over (batch, tile row, tile column) so no grid dimension limits the shape.
template <class T, bool Acc>
__global__ void __launch_bounds__(256) transpose_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t batch,
                                                        int64_t R, int64_t C) {
  __shared__ T tile[32][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // 32 x 8
  const int64_t tr = (R + 31) / 32, tc = (C + 31) / 32, per_b = tr * tc, total = batch * per_b;
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const int64_t b = t / per_b, rem = t % per_b;
    const int64_t r0 = (rem / tc) * 32, c0 = (rem % tc) * 32;
    const T* xb = x + b * R * C;
    T* yb = y + b * R * C;
#pragma unroll
    for (int k = 0; k < 32; k += 8) {
      const int64_t r = r0 + ty + k, c = c0 + tx;
      if (r < R && c < C) tile[ty + k][tx] = xb[r * C + c];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 32; k += 8) {
      const int64_t c = c0 + ty + k, r = r0 + tx;  // y row c, column r
      if (c < C && r < R) {
        const T v = tile[tx][ty + k];
        T* o = yb + c * R + r;
        if constexpr (Acc) *o = add_elem(*o, v);
        else *o = v;
      }
    }
    __syncthreads();
  }
}

// ---- column-block copy -----------------------------------------------------------------------
// One thread per pack of N elements; I is the index type (32-bit when the whole copy fits).
template <class T, int N, bool Acc, bool Zero, class I>
__global__ void __launch_bounds__(kThreads) copy_cols_kernel(const T* __restrict__ src, I src_ld, T* __restrict__ dst,
                                                             I dst_ld, I rows, I ppr) {
  const I total = rows * ppr;
  for (I i = I(blockIdx.x) * kThreads + threadIdx.x; i < total; i += I(gridDim.x) * kThreads) {
    const I r = i / ppr, c = (i % ppr) * N;
    T* o = dst + r * dst_ld + c;
    Pack<T, N> v;
    if constexpr (Zero) {
#pragma unroll
      for (int e = 0; e < N; ++e) v.v[e] = zero_elem<T>();
    } else {
      v = load_pack<N>(src + r * src_ld + c);
      if constexpr (Acc) {
        const Pack<T, N> old = load_pack<N>(o);
#pragma unroll
        for (int e = 0; e < N; ++e) v.v[e] = add_elem(old.v[e], v.v[e]);
      }
    }
    store_pack<N>(o, v);
  }
}

template <class T, int N, bool Acc, bool Zero>
void copy_cols_launch(const T* src, int64_t sld, T* dst, int64_t dld, int64_t rows, int64_t cols, cudaStream_t s) {
  const int64_t ppr = cols / N, total = rows * ppr;
  const int64_t span = std::max<int64_t>(rows * std::max(sld, dld), total);
  const unsigned grid = grid_for(total, kThreads);
  if (span < (int64_t(1) << 31))
    copy_cols_kernel<T, N, Acc, Zero, uint32_t><<<grid, kThreads, 0, s>>>(src, uint32_t(sld), dst, uint32_t(dld),
                                                                          uint32_t(rows), uint32_t(ppr));
  else
    copy_cols_kernel<T, N, Acc, Zero, int64_t><<<grid, kThreads, 0, s>>>(src, sld, dst, dld, rows, ppr);
  CUDA_CHECK_LAUNCH();
}

// ---- RMSNorm ---------------------------------------------------------------------------------
// A warp per row, N elements per access (N = 16 bytes when C and the pointers allow, else 1). The
// row is read twice (the second read hits L1/L2): holding rows of any C in registers is not worth it
// for a bandwidth-bound pass.
template <class T, int N>
__global__ void __launch_bounds__(kThreads) rms_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                           T* __restrict__ y, acc_t<T>* __restrict__ rstd, int64_t rows,
                                                           int64_t C, acc_t<T> eps) {
  using A = acc_t<T>;
  const int64_t packs = C / N, nwarps = int64_t(gridDim.x) * kRowWarps;
  for (int64_t row = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); row < rows; row += nwarps) {
    const T* xr = x + row * C;
    A ss = A(0);
    for (int64_t p = lane(); p < packs; p += 32) {
      const Pack<T, N> v = load_pack<N>(xr + p * N);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const A a = to_acc(v.v[e]);
        ss += a * a;
      }
    }
    const A rs = A(1) / sqrt_acc(warp_sum(ss) / A(C) + eps);
    T* yr = y + row * C;
    for (int64_t p = lane(); p < packs; p += 32) {
      const Pack<T, N> v = load_pack<N>(xr + p * N);
      Pack<T, N> wv;
      if (w) wv = load_pack<N>(w + p * N);
      Pack<T, N> o;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const A n = to_acc(from_acc<T>(to_acc(v.v[e]) * rs));  // rounded to T before the weight, as HF
        o.v[e] = from_acc<T>(w ? to_acc(wv.v[e]) * n : n);
      }
      store_pack<N>(yr + p * N, o);
    }
    if (lane() == 0 && rstd) rstd[row] = rs;
  }
}

// dx (+)= rs (g - n mean(g n)), n = x rs, g = dy w. x, dy not __restrict__: dx may be written where
// nothing else reads, but keep the loads plain and in order.
template <class T, int N>
__global__ void __launch_bounds__(kThreads) rms_bwd_dx_kernel(const T* x, const T* __restrict__ w,
                                                              const acc_t<T>* __restrict__ rstd, const T* dy, T* dx,
                                                              int64_t rows, int64_t C, bool acc) {
  using A = acc_t<T>;
  const int64_t packs = C / N, nwarps = int64_t(gridDim.x) * kRowWarps;
  for (int64_t row = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); row < rows; row += nwarps) {
    const T* xr = x + row * C;
    const T* dyr = dy + row * C;
    const A rs = rstd[row];
    A gn = A(0);
    for (int64_t p = lane(); p < packs; p += 32) {
      const Pack<T, N> xv = load_pack<N>(xr + p * N), dv = load_pack<N>(dyr + p * N);
      Pack<T, N> wv;
      if (w) wv = load_pack<N>(w + p * N);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const A g = w ? to_acc(dv.v[e]) * to_acc(wv.v[e]) : to_acc(dv.v[e]);
        gn += g * to_acc(xv.v[e]) * rs;
      }
    }
    gn = warp_sum(gn) / A(C);
    T* dxr = dx + row * C;
    for (int64_t p = lane(); p < packs; p += 32) {
      const Pack<T, N> xv = load_pack<N>(xr + p * N), dv = load_pack<N>(dyr + p * N);
      Pack<T, N> wv, ov;
      if (w) wv = load_pack<N>(w + p * N);
      if (acc) ov = load_pack<N>(dxr + p * N);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const A g = w ? to_acc(dv.v[e]) * to_acc(wv.v[e]) : to_acc(dv.v[e]);
        const A val = rs * (g - to_acc(xv.v[e]) * rs * gn);
        ov.v[e] = from_acc<T>(acc ? to_acc(ov.v[e]) + val : val);
      }
      store_pack<N>(dxr + p * N, ov);
    }
  }
}

// dw partials: blocks of 32 columns x 8 row lanes over a fixed row range (a split);
// partial[split, c] = sum over the range of dy * T(x rs), the row lanes combined in order.
template <class T>
__global__ void __launch_bounds__(256) rms_dw_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ rstd,
                                                     const T* __restrict__ dy, acc_t<T>* __restrict__ partial,
                                                     int64_t rows, int64_t C, int64_t rows_per_split) {
  using A = acc_t<T>;
  constexpr int BY = 8;
  __shared__ A sh[BY][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * 32 + tx;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split, r1 = min(rows, r0 + rows_per_split);
  A sw = A(0);
  if (c < C)
    for (int64_t r = r0 + ty; r < r1; r += BY) sw += to_acc(dy[r * C + c]) * to_acc(from_acc<T>(to_acc(x[r * C + c]) * rstd[r]));
  sh[ty][tx] = sw;
  __syncthreads();
  if (ty == 0 && c < C) {
    A t = A(0);
#pragma unroll
    for (int k = 0; k < BY; ++k) t += sh[k][tx];
    partial[int64_t(blockIdx.y) * C + c] = t;
  }
}

unsigned row_grid(int64_t rows) {
  return unsigned(std::clamp<int64_t>((rows + kRowWarps - 1) / kRowWarps, 1, int64_t(1) << 20));
}

// ---- RoPE ------------------------------------------------------------------------------------
// A thread per (row, pack of N pair indices): the angles are computed once and applied to every head.
template <class T, int N, bool Acc>
__global__ void __launch_bounds__(kThreads) rope_kernel(const T* x, const int32_t* __restrict__ pos,
                                                        const float* __restrict__ inv_freq, T* y, int64_t rows,
                                                        int H, int hd, float sign) {
  using A = acc_t<T>;
  const int half = hd / 2, ppr = half / N;
  const int64_t total = rows * ppr;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t r = idx / ppr;
    const int i0 = int(idx % ppr) * N;
    const float p = float(pos[r]);
    A cs[N], sn[N];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      float s, c;
      sincosf(__fmul_rn(p, inv_freq[i0 + e]), &s, &c);  // accurate sincosf (no fast math), one f32 product
      cs[e] = A(c);
      sn[e] = A(sign * s);
    }
    for (int h = 0; h < H; ++h) {
      const int64_t off = (r * H + h) * hd + i0;
      const Pack<T, N> a = load_pack<N>(x + off), b = load_pack<N>(x + off + half);
      Pack<T, N> o1, o2;
      if constexpr (Acc) {
        o1 = load_pack<N>(y + off);
        o2 = load_pack<N>(y + off + half);
      }
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const A av = to_acc(a.v[e]), bv = to_acc(b.v[e]);
        A v1 = av * cs[e] - bv * sn[e], v2 = bv * cs[e] + av * sn[e];
        if constexpr (Acc) {
          v1 += to_acc(o1.v[e]);
          v2 += to_acc(o2.v[e]);
        }
        o1.v[e] = from_acc<T>(v1);
        o2.v[e] = from_acc<T>(v2);
      }
      store_pack<N>(y + off, o1);
      store_pack<N>(y + off + half, o2);
    }
  }
}

// ---- SwiGLU ----------------------------------------------------------------------------------
__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <class T, int N>
__global__ void __launch_bounds__(kThreads) swiglu_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                              T* __restrict__ y, int64_t packs) {
  using A = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < packs; i += int64_t(gridDim.x) * kThreads) {
    const Pack<T, N> av = load_pack<N>(a + i * N), bv = load_pack<N>(b + i * N);
    Pack<T, N> o;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const A g = to_acc(av.v[e]);
      const A act = to_acc(from_acc<T>(g / (A(1) + exp_acc(-g))));  // rounded to T first, as HF
      o.v[e] = from_acc<T>(act * to_acc(bv.v[e]));
    }
    store_pack<N>(y + i * N, o);
  }
}

// da is stored before db is loaded (no __restrict__ on them): they may be one buffer.
template <class T, int N>
__global__ void __launch_bounds__(kThreads) swiglu_bwd_kernel(const T* a, const T* b, const T* dy, T* da, T* db,
                                                              int64_t packs, bool da_acc, bool db_acc) {
  using A = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < packs; i += int64_t(gridDim.x) * kThreads) {
    const Pack<T, N> av = load_pack<N>(a + i * N), bv = load_pack<N>(b + i * N), dv = load_pack<N>(dy + i * N);
    A ga[N], gb[N];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const A g = to_acc(av.v[e]), u = to_acc(bv.v[e]), d = to_acc(dv.v[e]);
      const A sg = A(1) / (A(1) + exp_acc(-g));
      ga[e] = d * u * sg * (A(1) + g * (A(1) - sg));
      gb[e] = d * to_acc(from_acc<T>(g * sg));
    }
    if (da) {
      Pack<T, N> o;
      if (da_acc) o = load_pack<N>(da + i * N);
#pragma unroll
      for (int e = 0; e < N; ++e) o.v[e] = from_acc<T>(da_acc ? to_acc(o.v[e]) + ga[e] : ga[e]);
      store_pack<N>(da + i * N, o);
    }
    if (db) {
      Pack<T, N> o;
      if (db_acc) o = load_pack<N>(db + i * N);
#pragma unroll
      for (int e = 0; e < N; ++e) o.v[e] = from_acc<T>(db_acc ? to_acc(o.v[e]) + gb[e] : gb[e]);
      store_pack<N>(db + i * N, o);
    }
  }
}

bool all_aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (p && !aligned16(p)) return false;
  return true;
}

}  // namespace

void transpose_last2(DType dt, const void* x, void* y, int64_t batch, int64_t R, int64_t C, bool accumulate,
                     cudaStream_t s) {
  if (batch <= 0 || R <= 0 || C <= 0) return;
  if (accumulate && dt == DType::i32)
    throw std::invalid_argument("kernels::cuda::transpose_last2: i32 cannot accumulate");
  dispatch_any(dt, "transpose_last2", [&](auto tag) {
    using T = decltype(tag);
    const T* px = static_cast<const T*>(x);
    T* py = static_cast<T*>(y);
    const unsigned grid = unsigned(std::min<int64_t>(batch * ((R + 31) / 32) * ((C + 31) / 32), int64_t(1) << 20));
    if constexpr (std::is_same_v<T, int32_t>) {
      transpose_kernel<T, false><<<grid, 256, 0, s>>>(px, py, batch, R, C);
    } else {
      if (accumulate) transpose_kernel<T, true><<<grid, 256, 0, s>>>(px, py, batch, R, C);
      else transpose_kernel<T, false><<<grid, 256, 0, s>>>(px, py, batch, R, C);
    }
    CUDA_CHECK_LAUNCH();
  });
}

void copy_cols(DType dt, const void* src, int64_t src_ld, void* dst, int64_t dst_ld, int64_t rows, int64_t cols,
               bool accumulate, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return;
  if (!src && accumulate) throw std::invalid_argument("kernels::cuda::copy_cols: a null source cannot accumulate");
  if (accumulate && dt == DType::i32) throw std::invalid_argument("kernels::cuda::copy_cols: i32 cannot accumulate");
  dispatch_any(dt, "copy_cols", [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec<T>;
    const T* ps = static_cast<const T*>(src);
    T* pd = static_cast<T*>(dst);
    const bool vec = cols % N == 0 && dst_ld % N == 0 && (!ps || src_ld % N == 0) && all_aligned16({ps, pd});
    auto go = [&](auto n) {
      constexpr int V = decltype(n)::value;
      if (!ps) copy_cols_launch<T, V, false, true>(ps, src_ld, pd, dst_ld, rows, cols, s);
      else if constexpr (std::is_same_v<T, int32_t>) copy_cols_launch<T, V, false, false>(ps, src_ld, pd, dst_ld, rows, cols, s);
      else if (accumulate) copy_cols_launch<T, V, true, false>(ps, src_ld, pd, dst_ld, rows, cols, s);
      else copy_cols_launch<T, V, false, false>(ps, src_ld, pd, dst_ld, rows, cols, s);
    };
    if (vec) go(std::integral_constant<int, N>{});
    else go(std::integral_constant<int, 1>{});
  });
}

void rmsnorm_fwd(DType dt, const void* x, const void* w, void* y, void* rstd, int64_t rows, int64_t C, double eps,
                 cudaStream_t s) {
  if (rows <= 0 || C <= 0) return;
  dispatch_float(dt, "rmsnorm_fwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    constexpr int N = kVec<T>;
    const T* px = static_cast<const T*>(x);
    const T* pw = static_cast<const T*>(w);
    T* py = static_cast<T*>(y);
    A* pr = static_cast<A*>(rstd);
    if (C % N == 0 && all_aligned16({px, pw, py}))
      rms_fwd_kernel<T, N><<<row_grid(rows), kThreads, 0, s>>>(px, pw, py, pr, rows, C, A(eps));
    else
      rms_fwd_kernel<T, 1><<<row_grid(rows), kThreads, 0, s>>>(px, pw, py, pr, rows, C, A(eps));
    CUDA_CHECK_LAUNCH();
  });
}

void rmsnorm_bwd(DType dt, const void* x, const void* w, const void* rstd, const void* dy, void* dx, void* dw,
                 int64_t rows, int64_t C, bool dx_accumulate, cudaStream_t s) {
  if (rows <= 0 || C <= 0 || (!dx && !dw)) return;
  dispatch_float(dt, "rmsnorm_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    constexpr int N = kVec<T>;
    const T* px = static_cast<const T*>(x);
    const T* pw = static_cast<const T*>(w);
    const A* pr = static_cast<const A*>(rstd);
    const T* pdy = static_cast<const T*>(dy);
    T* pdx = static_cast<T*>(dx);
    if (pdx) {
      if (C % N == 0 && all_aligned16({px, pw, pdy, pdx}))
        rms_bwd_dx_kernel<T, N><<<row_grid(rows), kThreads, 0, s>>>(px, pw, pr, pdy, pdx, rows, C, dx_accumulate);
      else
        rms_bwd_dx_kernel<T, 1><<<row_grid(rows), kThreads, 0, s>>>(px, pw, pr, pdy, pdx, rows, C, dx_accumulate);
      CUDA_CHECK_LAUNCH();
    }
    if (dw) {
      // The split count depends on the shape alone: the same summation order on every run.
      const int64_t tiles = (C + 31) / 32;
      int64_t splits = std::clamp<int64_t>(std::min<int64_t>(rows / 64, 512 / tiles), 1, 65535);
      const int64_t rps = (rows + splits - 1) / splits;
      splits = (rows + rps - 1) / rps;
      Scratch part(size_t(splits) * size_t(C) * sizeof(A));
      rms_dw_kernel<T><<<dim3(unsigned(tiles), unsigned(splits)), dim3(32, 8), 0, s>>>(px, pr, pdy, part.as<A>(), rows,
                                                                                      C, rps);
      CUDA_CHECK_LAUNCH();
      colsum_acc_impl<A, T>(part.as<A>(), splits, C, C, static_cast<T*>(dw), s);
    }
  });
}

void rope(DType dt, const void* x, const int32_t* pos, const float* inv_freq, void* y, int64_t rows, int64_t H,
          int64_t hd, bool inverse, bool accumulate, cudaStream_t s) {
  if (hd <= 0 || hd % 2 != 0)
    throw std::invalid_argument("kernels::cuda::rope: head size " + std::to_string(hd) + " must be even and positive");
  if (x == y && accumulate) throw std::invalid_argument("kernels::cuda::rope: in place cannot accumulate");
  if (hd > INT32_MAX || H > INT32_MAX) throw std::invalid_argument("kernels::cuda::rope: shape too large");
  if (rows <= 0 || H <= 0) return;
  dispatch_float(dt, "rope", [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec<T>;
    const T* px = static_cast<const T*>(x);
    T* py = static_cast<T*>(y);
    const float sign = inverse ? -1.f : 1.f;
    auto go = [&](auto n) {
      constexpr int V = decltype(n)::value;
      const unsigned grid = grid_for(rows * (hd / 2 / V), kThreads);
      if (accumulate) rope_kernel<T, V, true><<<grid, kThreads, 0, s>>>(px, pos, inv_freq, py, rows, int(H), int(hd), sign);
      else rope_kernel<T, V, false><<<grid, kThreads, 0, s>>>(px, pos, inv_freq, py, rows, int(H), int(hd), sign);
      CUDA_CHECK_LAUNCH();
    };
    if ((hd / 2) % N == 0 && all_aligned16({px, py})) go(std::integral_constant<int, N>{});
    else go(std::integral_constant<int, 1>{});
  });
}

void swiglu_fwd(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  dispatch_float(dt, "swiglu_fwd", [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec<T>;
    const T* pa = static_cast<const T*>(a);
    const T* pb = static_cast<const T*>(b);
    T* py = static_cast<T*>(y);
    int64_t done = 0;
    if (all_aligned16({pa, pb, py}) && n >= N) {
      done = n / N * N;
      swiglu_fwd_kernel<T, N><<<grid_for(n / N, kThreads), kThreads, 0, s>>>(pa, pb, py, n / N);
      CUDA_CHECK_LAUNCH();
    }
    if (done < n) {  // the tail (or everything, unaligned) one element per thread
      swiglu_fwd_kernel<T, 1><<<grid_for(n - done, kThreads), kThreads, 0, s>>>(pa + done, pb + done, py + done,
                                                                                 n - done);
      CUDA_CHECK_LAUNCH();
    }
  });
}

void swiglu_bwd(DType dt, const void* a, const void* b, const void* dy, void* da, void* db, int64_t n,
                bool da_accumulate, bool db_accumulate, cudaStream_t s) {
  if (n <= 0 || (!da && !db)) return;
  dispatch_float(dt, "swiglu_bwd", [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec<T>;
    const T* pa = static_cast<const T*>(a);
    const T* pb = static_cast<const T*>(b);
    const T* pdy = static_cast<const T*>(dy);
    T* pda = static_cast<T*>(da);
    T* pdb = static_cast<T*>(db);
    int64_t done = 0;
    if (all_aligned16({pa, pb, pdy, pda, pdb}) && n >= N) {
      done = n / N * N;
      swiglu_bwd_kernel<T, N><<<grid_for(n / N, kThreads), kThreads, 0, s>>>(pa, pb, pdy, pda, pdb, n / N,
                                                                             da_accumulate, db_accumulate);
      CUDA_CHECK_LAUNCH();
    }
    if (done < n) {
      swiglu_bwd_kernel<T, 1><<<grid_for(n - done, kThreads), kThreads, 0, s>>>(
          pa + done, pb + done, pdy + done, pda ? pda + done : nullptr, pdb ? pdb + done : nullptr, n - done,
          da_accumulate, db_accumulate);
      CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace deeplora::kernels::cuda
