// CUDA kernels of kernels/optim.h: the fused AdamW step (a block per chunk of the table, 16-byte
// loads of grad, master, m, v, the bf16 working copy written in the same pass) and a deterministic
// two-pass sum of squares for the gradient norm.
#include <cuda_bf16.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_utils.cuh"
#include "kernels/optim.h"

namespace deeplora::kernels::cuda {
namespace {

using util::bf16_t;
constexpr int kThreads = 256;

template <class S, class P> __device__ __forceinline__ S to_state(P v) { return S(v); }
template <> __device__ __forceinline__ float to_state<float, bf16_t>(bf16_t v) { return __bfloat162float(v); }
template <class P, class S> __device__ __forceinline__ P from_state(S v) { return P(v); }
template <> __device__ __forceinline__ bf16_t from_state<bf16_t, float>(float v) { return __float2bfloat16_rn(v); }

// P: param (grad, working copy) type, S: state (master, m, v) type. Each block walks whole chunks;
// a chunk's pointers share one alignment test, so the vector path is uniform within the block.
template <class P, class S>
__device__ __forceinline__ void adamw_body(const AdamWChunk* __restrict__ chunks, int64_t n_chunks, const AdamWStep& st) {
  constexpr int N = util::kVec<S>;  // 4 floats or 2 doubles per 16-byte access
  constexpr bool kWork = !std::is_same_v<P, S>;
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const AdamWChunk ch = chunks[c];
    const auto k = detail::adamw_scalars<S>(st, ch.lr_scale, ch.weight_decay);
    const P* __restrict__ g = static_cast<const P*>(ch.grad);
    S* __restrict__ p = static_cast<S*>(ch.master);
    S* __restrict__ m = static_cast<S*>(ch.m);
    S* __restrict__ v = static_cast<S*>(ch.v);
    P* __restrict__ w = static_cast<P*>(ch.work);
    const uintptr_t mis = (reinterpret_cast<uintptr_t>(g) | reinterpret_cast<uintptr_t>(w)) % (N * sizeof(P)) |
                          (reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(m) |
                           reinterpret_cast<uintptr_t>(v)) % 16;
    const int64_t nv = mis == 0 ? ch.n / N : 0;
    for (int64_t i = threadIdx.x; i < nv; i += kThreads) {
      const auto gv = util::load_pack<N>(g + i * N);
      auto pv = util::load_pack<N>(p + i * N);
      auto mv = util::load_pack<N>(m + i * N);
      auto vv = util::load_pack<N>(v + i * N);
      util::Pack<P, N> wv;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        detail::adamw_update<S>(to_state<S>(gv.v[j]), pv.v[j], mv.v[j], vv.v[j], k);
        if constexpr (kWork) wv.v[j] = from_state<P>(pv.v[j]);
      }
      util::store_pack<N>(p + i * N, pv);
      util::store_pack<N>(m + i * N, mv);
      util::store_pack<N>(v + i * N, vv);
      if constexpr (kWork) util::store_pack<N>(w + i * N, wv);
    }
    for (int64_t i = nv * N + threadIdx.x; i < ch.n; i += kThreads) {
      S pi = p[i], mi = m[i], vi = v[i];
      detail::adamw_update<S>(to_state<S>(g[i]), pi, mi, vi, k);
      p[i] = pi;
      m[i] = mi;
      v[i] = vi;
      if constexpr (kWork) w[i] = from_state<P>(pi);
    }
  }
}

template <class P, class S>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const AdamWChunk* __restrict__ chunks, int64_t n_chunks,
                                                         AdamWStep st) {
  adamw_body<P, S>(chunks, n_chunks, st);
}

// The captured form: the step's scalars come from device memory (adamw_clip wrote the clip and skip).
template <class P, class S>
__global__ void __launch_bounds__(kThreads) adamw_dev_kernel(const AdamWChunk* __restrict__ chunks, int64_t n_chunks,
                                                             double beta1, double beta2, double eps,
                                                             const AdamWStepDev* __restrict__ dst) {
  if (dst->skip) return;
  const AdamWStep st = detail::step_from_dev(*dst, beta1, beta2, eps);
  adamw_body<P, S>(chunks, n_chunks, st);
}

__global__ void adamw_clip_kernel(NormSources src, AdamWStepDev* st) { detail::clip_from_sums(src, *st); }

template <class P, class S> void launch_adamw(const AdamWChunk* chunks, int64_t n_chunks, const AdamWStep& st,
                                              cudaStream_t s) {
  if (n_chunks <= 0) return;
  const unsigned grid = unsigned(std::min<int64_t>(n_chunks, int64_t(1) << 20));
  adamw_kernel<P, S><<<grid, kThreads, 0, s>>>(chunks, n_chunks, st);
  CUDA_CHECK_LAUNCH();
}

template <class P, class S>
void launch_adamw_dev(const AdamWChunk* chunks, int64_t n_chunks, double b1, double b2, double eps,
                      const AdamWStepDev* st, cudaStream_t s) {
  if (n_chunks <= 0) return;
  const unsigned grid = unsigned(std::min<int64_t>(n_chunks, int64_t(1) << 20));
  adamw_dev_kernel<P, S><<<grid, kThreads, 0, s>>>(chunks, n_chunks, b1, b2, eps, st);
  CUDA_CHECK_LAUNCH();
}

// Pass 1: each block's sum of squares of a grid-strided share, in a fixed order.
template <class T>
__global__ void __launch_bounds__(kThreads) sumsq_partial(const T* __restrict__ x, int64_t n, bool vec,
                                                          util::acc_t<T>* __restrict__ partial) {
  using A = util::acc_t<T>;
  constexpr int N = util::kVec<T>;
  __shared__ A sh[32];
  A acc = 0;
  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x, stride = int64_t(gridDim.x) * kThreads;
  const int64_t nv = vec ? n / N : 0;
  for (int64_t i = tid; i < nv; i += stride) {
    const auto xv = util::load_pack<N>(x + i * N);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const A a = util::to_acc(xv.v[j]);
      acc = fma(a, a, acc);
    }
  }
  for (int64_t i = nv * N + tid; i < n; i += stride) {
    const A a = util::to_acc(x[i]);
    acc = fma(a, a, acc);
  }
  acc = util::block_sum(acc, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Pass 2: one block adds the partials, again in a fixed order.
template <class A> __global__ void __launch_bounds__(kThreads) sum_partials(const A* __restrict__ partial, int n,
                                                                             A* __restrict__ out) {
  __shared__ A sh[32];
  A acc = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) acc += partial[i];
  acc = util::block_sum(acc, sh);
  if (threadIdx.x == 0) *out = acc;
}

}  // namespace

void adamw(DType param_dt, DType state_dt, const AdamWChunk* chunks, int64_t n_chunks, const AdamWStep& step,
           cudaStream_t s) {
  if (param_dt == DType::f32 && state_dt == DType::f32) return launch_adamw<float, float>(chunks, n_chunks, step, s);
  if (param_dt == DType::bf16 && state_dt == DType::f32) return launch_adamw<bf16_t, float>(chunks, n_chunks, step, s);
  if (param_dt == DType::f64 && state_dt == DType::f64) return launch_adamw<double, double>(chunks, n_chunks, step, s);
  throw std::invalid_argument(std::string("kernels::cuda::adamw: param dtype ") + util::dt_name(param_dt) +
                              " with state dtype " + util::dt_name(state_dt) +
                              " is not supported (f32/f32, bf16/f32, f64/f64)");
}

void adamw_dev(DType param_dt, DType state_dt, const AdamWChunk* chunks, int64_t n_chunks, double beta1,
               double beta2, double eps, const AdamWStepDev* st, cudaStream_t s) {
  if (param_dt == DType::f32 && state_dt == DType::f32)
    return launch_adamw_dev<float, float>(chunks, n_chunks, beta1, beta2, eps, st, s);
  if (param_dt == DType::bf16 && state_dt == DType::f32)
    return launch_adamw_dev<bf16_t, float>(chunks, n_chunks, beta1, beta2, eps, st, s);
  if (param_dt == DType::f64 && state_dt == DType::f64)
    return launch_adamw_dev<double, double>(chunks, n_chunks, beta1, beta2, eps, st, s);
  throw std::invalid_argument(std::string("kernels::cuda::adamw_dev: param dtype ") + util::dt_name(param_dt) +
                              " with state dtype " + util::dt_name(state_dt) + " is not supported");
}

void adamw_clip(const NormSources& src, AdamWStepDev* st, cudaStream_t s) {
  adamw_clip_kernel<<<1, 1, 0, s>>>(src, st);
  CUDA_CHECK_LAUNCH();
}

void sumsq(DType dt, const void* x, int64_t n, void* out, cudaStream_t s) {
  util::dispatch_float(dt, "sumsq", [&](auto tag) {
    using T = decltype(tag);
    using A = util::acc_t<T>;
    constexpr int N = util::kVec<T>;
    // The grid depends on n alone (not on the device), so the summation order, and the result, is
    // the same on every GPU. Each thread takes >= 4 packs before the grid grows.
    const int blocks = int(std::clamp<int64_t>((n + int64_t(kThreads) * N * 4 - 1) / (int64_t(kThreads) * N * 4), 1, 1024));
    util::Scratch partial(size_t(blocks) * sizeof(A));
    sumsq_partial<T><<<blocks, kThreads, 0, s>>>(static_cast<const T*>(x), n, util::aligned16(x), partial.as<A>());
    CUDA_CHECK_LAUNCH();
    sum_partials<A><<<1, kThreads, 0, s>>>(partial.as<A>(), blocks, static_cast<A*>(out));
    CUDA_CHECK_LAUNCH();
    // Scratch is freed stream-ordered on the context's stream; on any other stream wait first.
    if (s != cuda_ctx().stream) CUDA_CHECK(cudaStreamSynchronize(s));
  });
}

}  // namespace deeplora::kernels::cuda
