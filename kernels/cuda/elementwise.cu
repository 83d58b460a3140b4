// CUDA twins of kernels/elementwise.h: vectorised elementwise maps, casts, counter-RNG fills and the
// deterministic reductions (sum, colsum_acc: fixed-order block partials, then a pass over them).
#include "kernels/elementwise.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <type_traits>

#include "kernels/cuda/cuda_utils.cuh"
#include "kernels/rng.h"

namespace deeplora::kernels::cuda {
namespace {

using namespace util;

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------------
// Elementwise maps. An op reads up to two inputs (a, b) and optionally the old y, and returns the
// new y in the accumulator type; init() runs once per thread (acc_broadcast loads g there).

template <class T> struct OpBase {
  __device__ void init() {}
};

template <class T> struct AddOp : OpBase<T> {
  static constexpr bool reads_a = true, reads_b = true, reads_y = false;
  __device__ acc_t<T> operator()(acc_t<T> a, acc_t<T> b, acc_t<T>) const { return a + b; }
};
template <class T> struct AccOp : OpBase<T> {
  static constexpr bool reads_a = true, reads_b = false, reads_y = true;
  acc_t<T> alpha;
  __device__ acc_t<T> operator()(acc_t<T> x, acc_t<T>, acc_t<T> y) const { return y + alpha * x; }
};
template <class T> struct MulOp : OpBase<T> {
  static constexpr bool reads_a = true, reads_b = true, reads_y = false;
  __device__ acc_t<T> operator()(acc_t<T> a, acc_t<T> b, acc_t<T>) const { return a * b; }
};
template <class T> struct MulAccOp : OpBase<T> {
  static constexpr bool reads_a = true, reads_b = true, reads_y = true;
  __device__ acc_t<T> operator()(acc_t<T> a, acc_t<T> b, acc_t<T> y) const { return y + a * b; }
};
template <class T> struct ScaleOp : OpBase<T> {
  static constexpr bool reads_a = true, reads_b = false, reads_y = false;
  acc_t<T> alpha;
  __device__ acc_t<T> operator()(acc_t<T> x, acc_t<T>, acc_t<T>) const { return alpha * x; }
};
template <class T> struct AccBroadcastOp : OpBase<T> {
  static constexpr bool reads_a = false, reads_b = false, reads_y = true;
  const T* g;
  acc_t<T> alpha;
  acc_t<T> v;
  __device__ void init() { v = alpha * to_acc(g[0]); }
  __device__ acc_t<T> operator()(acc_t<T>, acc_t<T>, acc_t<T> y) const { return y + v; }
};

constexpr double kSqrt2OverPi = 0.79788456080286535587989211986876;
constexpr double kGeluC = 0.044715;

__device__ __forceinline__ float tanh_acc(float u) { return tanhf(u); }
__device__ __forceinline__ double tanh_acc(double u) { return tanh(u); }

template <class T> struct GeluFwdOp : OpBase<T> {
  static constexpr bool reads_a = true, reads_b = false, reads_y = false;
  __device__ acc_t<T> operator()(acc_t<T> x, acc_t<T>, acc_t<T>) const {
    using A = acc_t<T>;
    const A u = A(kSqrt2OverPi) * (x + A(kGeluC) * x * x * x);
    return A(0.5) * x * (A(1) + tanh_acc(u));
  }
};
// dx (+)= gelu'(x) dy: Acc adds into dx, else writes it (dx is not read).
template <class T, bool Acc> struct GeluBwdOp : OpBase<T> {
  static constexpr bool reads_a = true, reads_b = true, reads_y = Acc;
  __device__ acc_t<T> operator()(acc_t<T> x, acc_t<T> dy, acc_t<T> dx) const {
    using A = acc_t<T>;
    const A x2 = x * x;
    const A th = tanh_acc(A(kSqrt2OverPi) * (x + A(kGeluC) * x2 * x));
    const A d = A(0.5) * (A(1) + th) +
                A(0.5) * x * (A(1) - th * th) * A(kSqrt2OverPi) * (A(1) + A(3 * kGeluC) * x2);
    return Acc ? dx + d * dy : d * dy;
  }
};

// y[i] = op(a[i], b[i], y[i]) over [0, n): N elements per access on the vector path, then the
// n % N tail one element per thread. No __restrict__: in-place calls (a == y) are allowed.
template <class T, int N, class Op>
__global__ void __launch_bounds__(kThreads) map_kernel(Op op, const T* a, const T* b, T* y, int64_t n) {
  using A = acc_t<T>;
  Op o = op;
  o.init();
  const int64_t nvec = n / N;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = tid; v < nvec; v += stride) {
    Pack<T, N> pa, pb, py;
    if constexpr (Op::reads_a) pa = load_pack<N>(a + v * N);
    if constexpr (Op::reads_b) pb = load_pack<N>(b + v * N);
    if constexpr (Op::reads_y) py = load_pack<N>(y + v * N);
    Pack<T, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      A av = A(0), bv = A(0), yv = A(0);
      if constexpr (Op::reads_a) av = to_acc(pa.v[j]);
      if constexpr (Op::reads_b) bv = to_acc(pb.v[j]);
      if constexpr (Op::reads_y) yv = to_acc(py.v[j]);
      out.v[j] = from_acc<T>(o(av, bv, yv));
    }
    store_pack<N>(y + v * N, out);
  }
  const int64_t i = nvec * N + tid;
  if (i < n) {
    A av = A(0), bv = A(0), yv = A(0);
    if constexpr (Op::reads_a) av = to_acc(a[i]);
    if constexpr (Op::reads_b) bv = to_acc(b[i]);
    if constexpr (Op::reads_y) yv = to_acc(y[i]);
    y[i] = from_acc<T>(o(av, bv, yv));
  }
}

template <class T, class Op>
void launch_map(const Op& op, const void* a, const void* b, void* y, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  const T* pa = static_cast<const T*>(a);
  const T* pb = static_cast<const T*>(b);
  T* py = static_cast<T*>(y);
  constexpr int N = kVec<T>;
  const bool vec = aligned16(py) && (!Op::reads_a || aligned16(pa)) && (!Op::reads_b || aligned16(pb));
  if (vec) {
    map_kernel<T, N, Op><<<grid_for(n / N > 0 ? n / N : 1, kThreads), kThreads, 0, s>>>(op, pa, pb, py, n);
  } else {
    map_kernel<T, 1, Op><<<grid_for(n, kThreads), kThreads, 0, s>>>(op, pa, pb, py, n);
  }
  CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Fill, cast, RNG.

template <class T, int N>
__global__ void __launch_bounds__(kThreads) fill_kernel(T* y, int64_t n, double v) {
  const T tv = from_double<T>(v);
  Pack<T, N> p;
#pragma unroll
  for (int j = 0; j < N; ++j) p.v[j] = tv;
  const int64_t nvec = n / N;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = tid; i < nvec; i += stride) store_pack<N>(y + i * N, p);
  const int64_t i = nvec * N + tid;
  if (i < n) y[i] = tv;
}

// Between f32 and bf16 the float path rounds once, as the double path would; every other pair goes
// through double, which holds every source value exactly.
template <class D, class S> __device__ __forceinline__ D convert(S v) {
  constexpr bool narrow_float = (std::is_same_v<S, float> || std::is_same_v<S, bf16_t>) &&
                                (std::is_same_v<D, float> || std::is_same_v<D, bf16_t>);
  if constexpr (std::is_same_v<S, D>) {
    return v;
  } else if constexpr (narrow_float) {
    return from_acc<D>(to_acc(v));
  } else {
    return from_double<D>(to_double(v));
  }
}

// y += D(x), added in D's accumulator type (one rounding, as cast then acc).
template <class S, class D>
__global__ void __launch_bounds__(kThreads) cast_acc_kernel(const S* __restrict__ x, D* __restrict__ y, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = from_acc<D>(to_acc(y[i]) + to_acc(convert<D>(x[i])));
}

// Every entry of a CastGroup: block b works on chunk b - start[i] of entry i (start: a prefix sum of
// the entries' chunk counts, at most kCastGroupMax + 1 values searched linearly).
constexpr int64_t kCastChunk = 4096;
struct CastGroupLaunch {
  CastGroup g;
  int64_t start[kCastGroupMax + 1];
};
template <class S, class D>
__global__ void __launch_bounds__(kThreads) cast_group_kernel(const CastGroupLaunch L, bool accumulate) {
  int i = 0;
  while (i + 1 < L.g.count && int64_t(blockIdx.x) >= L.start[i + 1]) ++i;
  const int64_t base = (int64_t(blockIdx.x) - L.start[i]) * kCastChunk, n = L.g.n[i];
  const S* x = static_cast<const S*>(L.g.src[i]);
  D* y = static_cast<D*>(L.g.dst[i]);
  const int64_t end = base + kCastChunk < n ? base + kCastChunk : n;
  for (int64_t j = base + threadIdx.x; j < end; j += blockDim.x)
    y[j] = accumulate ? from_acc<D>(to_acc(y[j]) + to_acc(convert<D>(x[j]))) : convert<D>(x[j]);
}

template <class S, class D, int N>
__global__ void __launch_bounds__(kThreads) cast_kernel(const S* __restrict__ x, D* __restrict__ y, int64_t n) {
  const int64_t nvec = n / N;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = tid; i < nvec; i += stride) {
    const Pack<S, N> p = load_pack<N>(x + i * N);
    Pack<D, N> q;
#pragma unroll
    for (int j = 0; j < N; ++j) q.v[j] = convert<D>(p.v[j]);
    store_pack<N>(y + i * N, q);
  }
  const int64_t i = nvec * N + tid;
  if (i < n) y[i] = convert<D>(x[i]);
}

// Element i depends on (seed, i) alone (kernels/rng.h), so any launch shape gives the CPU's numbers.
template <class T, bool kNormal>
__global__ void __launch_bounds__(kThreads) rand_kernel(T* y, int64_t n, uint64_t seed, double p0, double p1) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double v = kNormal ? rng::normal(seed, uint64_t(i), p0) : rng::uniform(seed, uint64_t(i), p0, p1);
    y[i] = from_double<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// sum: a fixed grid (a function of n alone) of grid-stride block sums, then one block over the
// partials: the same order on every run.

template <class Tin, class Tout, int N>
__global__ void __launch_bounds__(kThreads) sum_kernel(const Tin* __restrict__ x, int64_t n,
                                                       acc_t<Tout>* partial, Tout* out) {
  using A = acc_t<Tout>;
  __shared__ A sh[32];
  A acc = A(0);
  const int64_t nvec = n / N;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
#pragma unroll 4
  for (int64_t i = tid; i < nvec; i += stride) {
    const Pack<Tin, N> p = load_pack<N>(x + i * N);
#pragma unroll
    for (int j = 0; j < N; ++j) acc += A(to_acc(p.v[j]));
  }
  const int64_t i = nvec * N + tid;
  if (i < n) acc += A(to_acc(x[i]));
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) {
    if (partial) partial[blockIdx.x] = acc;
    else out[0] = from_acc<Tout>(acc);
  }
}

template <class T> void sum_impl(const T* x, int64_t n, T* out, cudaStream_t s) {
  using A = acc_t<T>;
  constexpr int N = kVec<T>;
  const bool vec = aligned16(x);
  const int64_t work = vec ? n / N : n;
  // ~8 accesses per thread before the grid is capped: enough blocks to fill the GPU, few partials.
  const unsigned g = grid_for(work, kThreads * 8, 1024);
  Scratch part(g > 1 ? g * sizeof(A) : 0);
  A* pp = g > 1 ? part.as<A>() : nullptr;
  if (vec) sum_kernel<T, T, N><<<g, kThreads, 0, s>>>(x, n, pp, out);
  else sum_kernel<T, T, 1><<<g, kThreads, 0, s>>>(x, n, pp, out);
  CUDA_CHECK_LAUNCH();
  if (g > 1) {
    sum_kernel<A, T, 1><<<1, kThreads, 0, s>>>(pp, int64_t(g), nullptr, out);
    CUDA_CHECK_LAUNCH();
  }
}

// ---------------------------------------------------------------------------------------------
// add_rowvec: each thread owns one pack of columns, loads b once and walks rows.

template <class T, int N>
__global__ void add_rowvec_kernel(const T* __restrict__ b, T* __restrict__ y, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv * N >= cols) return;
  const Pack<T, N> pb = load_pack<N>(b + cv * N);
  A bv[N];
#pragma unroll
  for (int j = 0; j < N; ++j) bv[j] = to_acc(pb.v[j]);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    T* yr = y + r * cols + cv * N;
    Pack<T, N> p = load_pack<N>(yr);
#pragma unroll
    for (int j = 0; j < N; ++j) p.v[j] = from_acc<T>(to_acc(p.v[j]) + bv[j]);
    store_pack<N>(yr, p);
  }
}

template <class T, int N> void add_rowvec_launch(const T* b, T* y, int64_t rows, int64_t cols, cudaStream_t s) {
  const int64_t packs = cols / N;
  const int threads = int(std::min<int64_t>(kThreads, (packs + 31) / 32 * 32));
  const int64_t gx = (packs + threads - 1) / threads;
  const int64_t gy = std::min<int64_t>(rows, 65535);
  add_rowvec_kernel<T, N><<<dim3(unsigned(gx), unsigned(gy)), threads, 0, s>>>(b, y, rows, cols);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers.

void fill(DType dt, void* y, int64_t n, double v, cudaStream_t s) {
  if (n <= 0) return;
  dispatch_all(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec<T>;
    T* py = static_cast<T*>(y);
    if (aligned16(py)) fill_kernel<T, N><<<grid_for(n / N > 0 ? n / N : 1, kThreads), kThreads, 0, s>>>(py, n, v);
    else fill_kernel<T, 1><<<grid_for(n, kThreads), kThreads, 0, s>>>(py, n, v);
    CUDA_CHECK_LAUNCH();
  });
}

void rand_normal(DType dt, void* y, int64_t n, uint64_t seed, double stddev, cudaStream_t s) {
  if (n <= 0) return;
  dispatch_float(dt, "rand_normal", [&](auto tag) {
    using T = decltype(tag);
    rand_kernel<T, true><<<grid_for(n, kThreads, 8192), kThreads, 0, s>>>(static_cast<T*>(y), n, seed, stddev, 0.0);
    CUDA_CHECK_LAUNCH();
  });
}

void rand_uniform(DType dt, void* y, int64_t n, uint64_t seed, double lo, double hi, cudaStream_t s) {
  if (n <= 0) return;
  dispatch_float(dt, "rand_uniform", [&](auto tag) {
    using T = decltype(tag);
    rand_kernel<T, false><<<grid_for(n, kThreads, 8192), kThreads, 0, s>>>(static_cast<T*>(y), n, seed, lo, hi);
    CUDA_CHECK_LAUNCH();
  });
}

void cast(DType src, const void* x, DType dst, void* y, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  if (src == dst) {
    if (x != y) CUDA_CHECK(cudaMemcpyAsync(y, x, size_t(n) * dtype_size(src), cudaMemcpyDeviceToDevice, s));
    return;
  }
  dispatch_all(src, [&](auto stag) {
    using S = decltype(stag);
    dispatch_all(dst, [&](auto dtag) {
      using D = decltype(dtag);
      if constexpr (!std::is_same_v<S, D>) {
        // 4 elements per access: 8..32-byte packs on each side.
        constexpr int N = 4;
        const S* px = static_cast<const S*>(x);
        D* py = static_cast<D*>(y);
        if (aligned_to(px, std::min<size_t>(16, N * sizeof(S))) && aligned_to(py, std::min<size_t>(16, N * sizeof(D))))
          cast_kernel<S, D, N><<<grid_for(n / N > 0 ? n / N : 1, kThreads), kThreads, 0, s>>>(px, py, n);
        else
          cast_kernel<S, D, 1><<<grid_for(n, kThreads), kThreads, 0, s>>>(px, py, n);
        CUDA_CHECK_LAUNCH();
      }
    });
  });
}

void cast_acc(DType src, const void* x, DType dst, void* y, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  dispatch_float(src, "cast_acc", [&](auto stag) {
    using S = decltype(stag);
    dispatch_float(dst, "cast_acc", [&](auto dtag) {
      using D = decltype(dtag);
      cast_acc_kernel<S, D><<<grid_for(n, kThreads), kThreads, 0, s>>>(static_cast<const S*>(x), static_cast<D*>(y), n);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void cast_group(DType src, DType dst, const CastGroup& g, bool accumulate, cudaStream_t s) {
  CastGroupLaunch L{};
  int m = 0;
  int64_t blocks = 0;
  for (int i = 0; i < g.count; ++i) {
    if (g.n[i] <= 0) continue;
    L.g.src[m] = g.src[i];
    L.g.dst[m] = g.dst[i];
    L.g.n[m] = g.n[i];
    L.start[m++] = blocks;
    blocks += (g.n[i] + kCastChunk - 1) / kCastChunk;
  }
  if (m == 0) return;
  L.g.count = m;
  L.start[m] = blocks;
  if (blocks > int64_t(1) << 31) throw std::invalid_argument("kernels::cuda::cast_group: too many elements in one group");
  dispatch_float(src, "cast_group", [&](auto stag) {
    using S = decltype(stag);
    dispatch_float(dst, "cast_group", [&](auto dtag) {
      using D = decltype(dtag);
      cast_group_kernel<S, D><<<unsigned(blocks), kThreads, 0, s>>>(L, accumulate);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void add(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t s) {
  dispatch_float(dt, "add", [&](auto tag) {
    using T = decltype(tag);
    launch_map<T>(AddOp<T>{}, a, b, y, n, s);
  });
}

void acc(DType dt, const void* x, void* y, int64_t n, double alpha, cudaStream_t s) {
  dispatch_float(dt, "acc", [&](auto tag) {
    using T = decltype(tag);
    AccOp<T> op;
    op.alpha = acc_t<T>(alpha);
    launch_map<T>(op, x, nullptr, y, n, s);
  });
}

void mul(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t s) {
  dispatch_float(dt, "mul", [&](auto tag) {
    using T = decltype(tag);
    launch_map<T>(MulOp<T>{}, a, b, y, n, s);
  });
}

void mul_acc(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t s) {
  dispatch_float(dt, "mul_acc", [&](auto tag) {
    using T = decltype(tag);
    launch_map<T>(MulAccOp<T>{}, a, b, y, n, s);
  });
}

void scale(DType dt, const void* x, void* y, int64_t n, double alpha, cudaStream_t s) {
  dispatch_float(dt, "scale", [&](auto tag) {
    using T = decltype(tag);
    ScaleOp<T> op;
    op.alpha = acc_t<T>(alpha);
    launch_map<T>(op, x, nullptr, y, n, s);
  });
}

void acc_broadcast(DType dt, const void* g, void* y, int64_t n, double alpha, cudaStream_t s) {
  dispatch_float(dt, "acc_broadcast", [&](auto tag) {
    using T = decltype(tag);
    AccBroadcastOp<T> op;
    op.g = static_cast<const T*>(g);
    op.alpha = acc_t<T>(alpha);
    op.v = acc_t<T>(0);
    launch_map<T>(op, nullptr, nullptr, y, n, s);
  });
}

void gelu_fwd(DType dt, const void* x, void* y, int64_t n, cudaStream_t s) {
  dispatch_float(dt, "gelu_fwd", [&](auto tag) {
    using T = decltype(tag);
    launch_map<T>(GeluFwdOp<T>{}, x, nullptr, y, n, s);
  });
}

void gelu_bwd(DType dt, const void* x, const void* dy, void* dx, int64_t n, bool accumulate, cudaStream_t s) {
  dispatch_float(dt, "gelu_bwd", [&](auto tag) {
    using T = decltype(tag);
    if (accumulate) launch_map<T>(GeluBwdOp<T, true>{}, x, dy, dx, n, s);
    else launch_map<T>(GeluBwdOp<T, false>{}, x, dy, dx, n, s);
  });
}

void sum(DType dt, const void* x, int64_t n, void* out, cudaStream_t s) {
  dispatch_float(dt, "sum", [&](auto tag) {
    using T = decltype(tag);
    if (n <= 0) {
      fill(dt, out, 1, 0.0, s);
      return;
    }
    sum_impl<T>(static_cast<const T*>(x), n, static_cast<T*>(out), s);
  });
}

void colsum_acc(DType dt, const void* x, int64_t rows, int64_t cols, void* y, cudaStream_t s) {
  dispatch_float(dt, "colsum_acc", [&](auto tag) {
    using T = decltype(tag);
    colsum_acc_impl<T, T>(static_cast<const T*>(x), rows, cols, cols, static_cast<T*>(y), s);
  });
}

void add_rowvec(DType dt, const void* b, void* y, int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return;
  dispatch_float(dt, "add_rowvec", [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec<T>;
    const T* pb = static_cast<const T*>(b);
    T* py = static_cast<T*>(y);
    if (cols % N == 0 && aligned16(pb) && aligned16(py)) add_rowvec_launch<T, N>(pb, py, rows, cols, s);
    else add_rowvec_launch<T, 1>(pb, py, rows, cols, s);
  });
}

}  // namespace deeplora::kernels::cuda
