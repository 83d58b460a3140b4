// CUDA twins of kernels/nn.h, softmax cross-entropy part: one pass over the logits forward (online
// max/sum), one read + one read-modify-write backward, an ordered reduction of the row losses.
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

// dlogits[r, :] += dloss / count * (softmax - onehot); with !acc it is written instead (ignored rows
// and padding columns as zeros), so the buffer needs no zero fill first. Both rows share their
// misalignment (checked by the launcher) so one head/body/tail split serves both.
template <class T, int N>
__global__ void __launch_bounds__(kCeThreads) ce_bwd_kernel(const T* __restrict__ logits, const int32_t* __restrict__ tgt,
                                                            const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ dloss,
                                                            const acc_t<T>* __restrict__ count, T* __restrict__ dlogits,
                                                            int64_t V, int64_t row_stride, int32_t ignore, bool acc) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int32_t t = tgt[row];
  const A cnt = count[0];
  T* dr = dlogits + row * row_stride;
  if (t == ignore || cnt == A(0)) {
    if (!acc)
      for (int64_t i = threadIdx.x; i < row_stride; i += blockDim.x) dr[i] = from_acc<T>(A(0));
    return;
  }
  if (!acc)
    for (int64_t i = V + threadIdx.x; i < row_stride; i += blockDim.x) dr[i] = from_acc<T>(A(0));
  const A k = dloss[0] / cnt;
  const A l = lse[row];
  const T* xr = logits + row * row_stride;
  auto grad = [&](A x, A d, int64_t i) { return d + k * (fast_exp(x - l) - (i == t ? A(1) : A(0))); };
  auto old = [&](int64_t i) { return acc ? to_acc(dr[i]) : A(0); };
  const int head = row_head<T, N>(xr, V);
  const int64_t body = (V - head) / N;
  const int64_t tail = head + body * N;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) dr[i] = from_acc<T>(grad(to_acc(xr[i]), old(i), i));
  constexpr int U = 2;
  for (int64_t p0 = threadIdx.x; p0 < body; p0 += int64_t(U) * blockDim.x) {
    Pack<T, N> xp[U], dp[U];  // clamped like ce_fwd_kernel; only packs < body are stored
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = min(p0 + int64_t(u) * blockDim.x, body - 1);
      xp[u] = load_pack_cs<N>(xr + head + p * N);
      if (acc) {
        dp[u] = load_pack_cs<N>(dr + head + p * N);
      } else {
#pragma unroll
        for (int e = 0; e < N; ++e) dp[u].v[e] = from_acc<T>(A(0));
      }
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
  for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x) dr[i] = from_acc<T>(grad(to_acc(xr[i]), old(i), i));
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
                       bool accumulate, cudaStream_t s) {
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
                                                               static_cast<const A*>(count), pd, V, row_stride, ignore,
                                                               accumulate);
    else
      ce_bwd_kernel<E, 1><<<unsigned(rows), kCeThreads, 0, s>>>(pl, tgt, static_cast<const A*>(lse), static_cast<const A*>(dloss),
                                                               static_cast<const A*>(count), pd, V, row_stride, ignore,
                                                               accumulate);
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
