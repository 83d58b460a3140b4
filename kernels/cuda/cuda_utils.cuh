// Device helpers shared by the CUDA kernel families: element <-> accumulator conversion (bf16 via
// __nv_bfloat16, accumulate in f32, f64 for f64), 16-byte packs, deterministic warp/block reductions,
// dtype dispatch and scratch memory from the context's caching allocator.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda_check.h"
#include "runtime/device.h"
#include "kernels/dtype.h"

namespace deeplora::kernels::cuda::util {

using bf16_t = __nv_bfloat16;
static_assert(sizeof(bf16_t) == sizeof(::deeplora::bf16), "host bf16 must be bit-compatible with __nv_bfloat16");

// Accumulator (and statistics) type: f64 for f64 tensors, f32 otherwise (kernels::stat_dtype).
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

template <class T> __device__ __forceinline__ acc_t<T> to_acc(T v) { return acc_t<T>(v); }
template <> __device__ __forceinline__ float to_acc<bf16_t>(bf16_t v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_acc(acc_t<T> v) { return T(v); }
template <> __device__ __forceinline__ bf16_t from_acc<bf16_t>(float v) { return __float2bfloat16_rn(v); }

// Elements per 16-byte access.
template <class T> constexpr int kVec = int(16 / sizeof(T));

template <class T, int N> struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

// Whole-pack copies in the widest aligned words (p aligned to min(16, sizeof(Pack))).
template <class W, class P, class T> __device__ __forceinline__ void copy_words(P& dst, const T* p) {
  constexpr int n = int(sizeof(P) / sizeof(W));
#pragma unroll
  for (int k = 0; k < n; ++k) reinterpret_cast<W*>(&dst)[k] = reinterpret_cast<const W*>(p)[k];
}
template <int N, class T> __device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  Pack<T, N> r;
  if constexpr (sizeof(r) % 16 == 0) copy_words<int4>(r, p);
  else if constexpr (sizeof(r) == 8) copy_words<int2>(r, p);
  else if constexpr (sizeof(r) == 4) copy_words<int>(r, p);
  else {
#pragma unroll
    for (int j = 0; j < N; ++j) r.v[j] = p[j];
  }
  return r;
}
// Streaming (evict-first) load for data read once and far bigger than L2 (logits).
template <int N, class T> __device__ __forceinline__ Pack<T, N> load_pack_cs(const T* p) {
  Pack<T, N> r;
  if constexpr (sizeof(r) == 16) {
    *reinterpret_cast<int4*>(&r) = __ldcs(reinterpret_cast<const int4*>(p));
  } else {
    r = load_pack<N>(p);
  }
  return r;
}
template <int N, class T> __device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  if constexpr (sizeof(v) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < int(sizeof(v) / 16); ++k) reinterpret_cast<int4*>(p)[k] = reinterpret_cast<const int4*>(&v)[k];
  } else if constexpr (sizeof(v) == 8) {
    *reinterpret_cast<int2*>(p) = *reinterpret_cast<const int2*>(&v);
  } else if constexpr (sizeof(v) == 4) {
    *reinterpret_cast<int*>(p) = *reinterpret_cast<const int*>(&v);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = v.v[j];
  }
}
template <int N, class T> __device__ __forceinline__ void store_pack_cs(T* p, const Pack<T, N>& v) {
  if constexpr (sizeof(v) == 16) {
    __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(&v));
  } else {
    store_pack<N>(p, v);
  }
}

// Exact widening to double and correctly rounded narrowing from double (float -> int truncates
// toward zero, saturating, NaN -> 0: what cvt.rzi does), the CPU twins' conversion rules.
template <class T> __device__ __forceinline__ double to_double(T v) { return double(v); }
template <> __device__ __forceinline__ double to_double<bf16_t>(bf16_t v) { return double(__bfloat162float(v)); }
template <class T> __device__ __forceinline__ T from_double(double v);
template <> __device__ __forceinline__ float from_double<float>(double v) { return __double2float_rn(v); }
template <> __device__ __forceinline__ double from_double<double>(double v) { return v; }
template <> __device__ __forceinline__ bf16_t from_double<bf16_t>(double v) { return __double2bfloat16(v); }
template <> __device__ __forceinline__ int32_t from_double<int32_t>(double v) { return __double2int_rz(v); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline bool aligned_to(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

// Xor-butterfly reductions: a fixed combination order, so results are bitwise reproducible.
template <class A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `sh` holds >= 32 elements; callable repeatedly (it synchronises before reusing sh).
template <class A> __device__ __forceinline__ A block_sum(A v, A* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < nwarps ? sh[lane] : A(0);
  return warp_sum(v);
}

template <class T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::f32; };
template <> struct DTypeOf<bf16_t> { static constexpr DType value = DType::bf16; };
template <> struct DTypeOf<double> { static constexpr DType value = DType::f64; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::i32; };

inline const char* dt_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
  }
  return "?";
}

[[noreturn]] inline void bad_dtype(const char* fn, DType t) {
  throw std::invalid_argument(std::string("kernels::cuda::") + fn + ": dtype " + dt_name(t) +
                              " is not supported (use f32, bf16 or f64)");
}

// Calls f(T{}) for the floating types.
template <class F> void dispatch_float(DType t, const char* fn, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::bf16: f(bf16_t{}); return;
    case DType::f64: f(double{}); return;
    default: bad_dtype(fn, t);
  }
}
// Calls f(T{}) for every dtype, i32 included.
template <class F> void dispatch_all(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::bf16: f(bf16_t{}); return;
    case DType::f64: f(double{}); return;
    case DType::i32: f(int32_t{}); return;
  }
}

inline unsigned grid_for(int64_t work_items, int threads, int64_t cap = int64_t(1) << 20) {
  int64_t g = (work_items + threads - 1) / threads;
  if (g < 1) g = 1;
  if (g > cap) g = cap;
  return unsigned(g);
}

// Scratch memory from the context's stream-ordered caching allocator: freeing right after the
// launches that use it is safe because every kernel runs on the context's single stream.
class Scratch {
 public:
  explicit Scratch(size_t bytes) : p_(bytes ? cuda_ctx().allocator.allocate(bytes) : nullptr) {}
  ~Scratch() {
    if (p_) cuda_ctx().allocator.deallocate(p_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class U> U* as(size_t byte_offset = 0) const {
    return reinterpret_cast<U*>(static_cast<char*>(p_) + byte_offset);
  }

 private:
  void* p_;
};

inline size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }


// ---------------------------------------------------------------------------------------------
// Deterministic column sums: y[c] += sum_r x[r * ld + c]. Blocks of 32 x BY threads own a tile of
// 32 * N columns and a fixed range of rows (a "split"); each thread sums rows ty, ty + BY, ... in
// order, the BY row lanes are then combined in order through shared memory. With several splits
// the per-split sums go to a scratch [splits, cols] buffer reduced the same way; the split count
// depends on the shape alone, so the summation order is the same on every run.

template <class Tin, class Tout, int N, int BY>
__global__ void __launch_bounds__(32 * BY) colsum_kernel(const Tin* __restrict__ x, int64_t rows, int64_t cols,
                                                         int64_t ld, int64_t rows_per_split,
                                                         acc_t<Tout>* __restrict__ partial, Tout* __restrict__ y) {
  using A = acc_t<Tout>;
  __shared__ A sh[BY][32 * N];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (int64_t(blockIdx.x) * 32 + tx) * N;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r1 = min(rows, r0 + rows_per_split);
  A acc[N];
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j] = A(0);
  if (c0 < cols) {
#pragma unroll 4
    for (int64_t r = r0 + ty; r < r1; r += BY) {
      const Pack<Tin, N> p = load_pack<N>(x + r * ld + c0);
#pragma unroll
      for (int j = 0; j < N; ++j) acc[j] += A(to_acc(p.v[j]));
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) sh[ty][tx * N + j] = acc[j];
  __syncthreads();
  for (int t = ty * 32 + tx; t < 32 * N; t += 32 * BY) {
    A sum = A(0);
#pragma unroll
    for (int k = 0; k < BY; ++k) sum += sh[k][t];
    const int64_t c = int64_t(blockIdx.x) * 32 * N + t;
    if (c < cols) {
      if (partial) partial[int64_t(blockIdx.y) * cols + c] = sum;
      else y[c] = from_acc<Tout>(to_acc(y[c]) + sum);
    }
  }
}

template <class Tin, class Tout, int N, int BY>
void colsum_launch(const Tin* x, int64_t rows, int64_t cols, int64_t ld, Tout* y, cudaStream_t s) {
  using A = acc_t<Tout>;
  constexpr int64_t kTargetBlocks = 512, kMinRowsPerThread = 8;
  const int64_t tiles = (cols + 32 * N - 1) / (32 * N);
  const int64_t max_splits = std::max<int64_t>(1, rows / (BY * kMinRowsPerThread));
  int64_t splits = std::min<int64_t>(max_splits, std::max<int64_t>(1, kTargetBlocks / tiles));
  splits = std::min<int64_t>(splits, 65535);
  const int64_t rps = (rows + splits - 1) / splits;
  splits = (rows + rps - 1) / rps;
  const dim3 block(32, BY);
  const dim3 grid{unsigned(tiles), unsigned(splits)};
  if (splits == 1) {
    colsum_kernel<Tin, Tout, N, BY><<<grid, block, 0, s>>>(x, rows, cols, ld, rps, nullptr, y);
    CUDA_CHECK_LAUNCH();
    return;
  }
  Scratch part(size_t(splits) * size_t(cols) * sizeof(A));
  colsum_kernel<Tin, Tout, N, BY><<<grid, block, 0, s>>>(x, rows, cols, ld, rps, part.as<A>(), y);
  CUDA_CHECK_LAUNCH();
  colsum_launch<A, Tout, 1, 32>(part.as<A>(), splits, cols, cols, y, s);
}

// y[c] (Tout) += sum over rows of x[r * ld + c] (Tin), deterministic; 16-byte accesses when the
// layout allows.
template <class Tin, class Tout>
void colsum_acc_impl(const Tin* x, int64_t rows, int64_t cols, int64_t ld, Tout* y, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return;
  constexpr int N = kVec<Tin>;
  if (cols % N == 0 && ld % N == 0 && aligned16(x)) colsum_launch<Tin, Tout, N, 8>(x, rows, cols, ld, y, s);
  else colsum_launch<Tin, Tout, 1, 32>(x, rows, cols, ld, y, s);
}

}  // namespace deeplora::kernels::cuda::util
