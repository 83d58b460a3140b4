// Causal multi-head self-attention on the GPU. Simple path for every dtype and head size: q, k, v are
// permuted to [B*H, T, hd], scores and probabilities are materialized for a chunk of heads at a time
// through cuBLASLt, a warp per query row does the softmax; backward recomputes P from the saved
// log-sum-exp. bf16 keeps scores and gradients in f32 and feeds the products P and dS in bf16.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda/attention_flash.cuh"
#include "kernels/cuda/matmul_lt.cuh"
#include "kernels/cuda_check.h"
#include "runtime/device.h"

namespace deeplora::kernels::cuda {
namespace {

using bf16_t = __nv_bfloat16;

template <class T> struct Traits;
template <> struct Traits<float> { using Acc = float; static constexpr DType dt = DType::f32; };
template <> struct Traits<bf16_t> { using Acc = float; static constexpr DType dt = DType::bf16; };
template <> struct Traits<double> { using Acc = double; static constexpr DType dt = DType::f64; };

__device__ __forceinline__ float load(const bf16_t* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ void store(bf16_t* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

template <class A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kThreads = 256;
unsigned blocks_for(int64_t n) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20)));
}

// src [B, T, S*C] -> dst [S][B*H][T][hd]: each head's rows contiguous, for strided-batch GEMMs.
template <class T>
__global__ void permute_heads(const T* src, T* dst, int64_t B, int64_t T_, int64_t S, int64_t C, int64_t H) {
  const int64_t hd = C / H, SC = S * C, total = B * T_ * SC;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c3 = i % SC, bt = i / SC, t = bt % T_, b = bt / T_;
    const int64_t s = c3 / C, c = c3 % C, h = c / hd, d = c % hd;
    dst[((s * B * H + b * H + h) * T_ + t) * hd + d] = src[i];
  }
}

// dst [B, T, S*C] = (or +=) src [S][B*H][T][hd], converting.
template <class Ts, class Td, bool kAccumulate>
__global__ void unpermute_heads(const Ts* src, Td* dst, int64_t B, int64_t T_, int64_t S, int64_t C, int64_t H) {
  const int64_t hd = C / H, SC = S * C, total = B * T_ * SC;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c3 = i % SC, bt = i / SC, t = bt % T_, b = bt / T_;
    const int64_t s = c3 / C, c = c3 % C, h = c / hd, d = c % hd;
    auto v = load(src + ((s * B * H + b * H + h) * T_ + t) * hd + d);
    if constexpr (kAccumulate) v += load(dst + i);
    store(dst + i, v);
  }
}

// A warp per query row r (t = r % T): lse = logsumexp(scale * s[0..t]); p[j] = exp(scale*s[j] - lse)
// for j <= t, 0 after. p may alias s (same type): each lane reads its j before writing it.
template <class A, class P>
__global__ void causal_softmax_fwd(const A* S, P* Pm, A* lse, int64_t rows, int64_t T_, A scale) {
  const int lane = threadIdx.x % 32;
  const int64_t n_warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows; r += n_warps) {
    const int64_t t = r % T_;
    const A* s = S + r * T_;
    A m = A(-INFINITY);
    for (int64_t j = lane; j <= t; j += 32) m = max(m, s[j] * scale);
    m = warp_max(m);
    A sum = 0;
    for (int64_t j = lane; j <= t; j += 32) sum += exp_(s[j] * scale - m);
    sum = warp_sum(sum);
    const A l = m + log_(sum);
    if (lane == 0) lse[r] = l;
    P* p = Pm + r * T_;
    for (int64_t j = lane; j < T_; j += 32) store(p + j, j <= t ? exp_(s[j] * scale - l) : A(0));
  }
}

// P = exp(scale*S - lse) (causal), dS = P * (dP - D) per element. P and dS may alias S and dP.
template <class A, class P>
__global__ void causal_softmax_bwd(const A* S, const A* dP, const A* lse, const A* D, P* Pm, P* dS, int64_t rows,
                                   int64_t T_, A scale) {
  const int64_t total = rows * T_;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / T_, j = i % T_, t = r % T_;
    A p = 0, ds = 0;
    if (j <= t) {
      p = exp_(S[i] * scale - lse[r]);
      ds = p * (dP[i] - D[r]);
    }
    store(Pm + i, p);
    store(dS + i, ds);
  }
}

// D[(b*H + h)*T + t] = sum_d out[b,t,h*hd+d] * dout[b,t,h*hd+d]; a warp per (b, t, h).
template <class T, class A>
__global__ void rowdot_heads(const T* out, const T* dout, A* D, int64_t B, int64_t T_, int64_t C, int64_t H) {
  const int lane = threadIdx.x % 32;
  const int64_t hd = C / H, rows = B * T_ * H, n_warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; w < rows; w += n_warps) {
    const int64_t h = w % H, bt = w / H, t = bt % T_, b = bt / T_;
    const T* o = out + bt * C + h * hd;
    const T* g = dout + bt * C + h * hd;
    A acc = 0;
    for (int64_t d = lane; d < hd; d += 32) acc += A(load(o + d)) * A(load(g + d));
    acc = warp_sum(acc);
    if (lane == 0) D[(b * H + h) * T_ + t] = acc;
  }
}

// Scratch from the caching allocator; freeing right after the last launch is safe (single stream).
struct Scratch {
  void* p = nullptr;
  explicit Scratch(size_t bytes) : p(bytes ? cuda_ctx().allocator.allocate(bytes) : nullptr) {}
  ~Scratch() {
    if (p) cuda_ctx().allocator.deallocate(p);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class X> X* as() const { return static_cast<X*>(p); }
};

// Heads per chunk so the T x T buffers stay near 1 GiB.
int64_t chunk_heads(int64_t BH, int64_t T, size_t bytes_per_score) {
  const size_t budget = size_t(1) << 30;
  const size_t per_head = size_t(T) * size_t(T) * bytes_per_score;
  return std::clamp<int64_t>(int64_t(budget / per_head), 1, BH);
}

// Strided-batch product over n heads: C[i] = alpha op(A[i]) op(B[i]) (+ beta C[i]).
void head_gemm(DType dt, DType c_dt, bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const void* A,
               int64_t lda, int64_t sA, const void* B, int64_t ldb, int64_t sB, void* C, int64_t ldc, int64_t sC,
               int64_t n, cudaStream_t s) {
  Gemm g;
  g.dt = dt, g.ta = ta, g.tb = tb, g.M = M, g.N = N, g.K = K, g.alpha = alpha, g.beta = 0.0;
  g.A = A, g.lda = lda, g.strideA = sA, g.B = B, g.ldb = ldb, g.strideB = sB, g.C = C, g.ldc = ldc, g.strideC = sC;
  g.batch = n;
  detail::gemm_mixed(g, c_dt, s);
}

template <class T>
void fwd_simple(const T* qkv, T* out, typename Traits<T>::Acc* lse, int64_t B, int64_t T_, int64_t C, int64_t H,
                cudaStream_t s) {
  using A = typename Traits<T>::Acc;
  constexpr DType dt = Traits<T>::dt, adt = Traits<A>::dt;
  constexpr bool separate_p = !std::is_same_v<T, A>;  // bf16: P (bf16) cannot live in S (f32)
  const int64_t hd = C / H, BH = B * H, n_hd = BH * T_ * hd, TT = T_ * T_;
  const A scale = A(1) / std::sqrt(A(hd));

  Scratch qkvp(3 * n_hd * sizeof(T)), ob(n_hd * sizeof(T));
  permute_heads<<<blocks_for(3 * n_hd), kThreads, 0, s>>>(qkv, qkvp.as<T>(), B, T_, 3, C, H);
  CUDA_CHECK_LAUNCH();
  const T* q = qkvp.as<T>();
  const T* k = q + n_hd;
  const T* v = k + n_hd;

  const int64_t nc = chunk_heads(BH, T_, sizeof(A) + (separate_p ? sizeof(T) : 0));
  Scratch sbuf(nc * TT * sizeof(A)), pbuf(separate_p ? nc * TT * sizeof(T) : 0);
  T* P = separate_p ? pbuf.as<T>() : sbuf.as<T>();
  for (int64_t c0 = 0; c0 < BH; c0 += nc) {
    const int64_t n = std::min(nc, BH - c0), off = c0 * T_ * hd;
    head_gemm(dt, adt, false, true, T_, T_, hd, 1.0, q + off, hd, T_ * hd, k + off, hd, T_ * hd, sbuf.p, T_, TT, n, s);
    causal_softmax_fwd<A, T><<<blocks_for(n * T_ * 32), kThreads, 0, s>>>(sbuf.as<A>(), P, lse + c0 * T_, n * T_, T_,
                                                                          scale);
    CUDA_CHECK_LAUNCH();
    head_gemm(dt, dt, false, false, T_, hd, T_, 1.0, P, T_, TT, v + off, hd, T_ * hd, ob.as<T>() + off, hd, T_ * hd, n,
              s);
  }
  unpermute_heads<T, T, false><<<blocks_for(B * T_ * C), kThreads, 0, s>>>(ob.as<T>(), out, B, T_, 1, C, H);
  CUDA_CHECK_LAUNCH();
}

template <class T>
void bwd_simple(const T* qkv, const T* out, const typename Traits<T>::Acc* lse, const T* dout, T* dqkv, int64_t B,
                int64_t T_, int64_t C, int64_t H, bool accumulate, cudaStream_t s) {
  using A = typename Traits<T>::Acc;
  constexpr DType dt = Traits<T>::dt, adt = Traits<A>::dt;
  constexpr bool separate_p = !std::is_same_v<T, A>;
  const int64_t hd = C / H, BH = B * H, n_hd = BH * T_ * hd, TT = T_ * T_;
  const A scale = A(1) / std::sqrt(A(hd));

  Scratch qkvp(3 * n_hd * sizeof(T)), dop(n_hd * sizeof(T)), Dbuf(BH * T_ * sizeof(A)), grads(3 * n_hd * sizeof(A));
  permute_heads<<<blocks_for(3 * n_hd), kThreads, 0, s>>>(qkv, qkvp.as<T>(), B, T_, 3, C, H);
  CUDA_CHECK_LAUNCH();
  permute_heads<<<blocks_for(n_hd), kThreads, 0, s>>>(dout, dop.as<T>(), B, T_, 1, C, H);
  CUDA_CHECK_LAUNCH();
  rowdot_heads<<<blocks_for(BH * T_ * 32), kThreads, 0, s>>>(out, dout, Dbuf.as<A>(), B, T_, C, H);
  CUDA_CHECK_LAUNCH();
  const T* q = qkvp.as<T>();
  const T* k = q + n_hd;
  const T* v = k + n_hd;
  const T* dO = dop.as<T>();
  A* dq = grads.as<A>();
  A* dk = dq + n_hd;
  A* dv = dk + n_hd;

  const int64_t nc = chunk_heads(BH, T_, 2 * sizeof(A) + (separate_p ? 2 * sizeof(T) : 0));
  Scratch sbuf(nc * TT * sizeof(A)), dpbuf(nc * TT * sizeof(A));
  Scratch pbuf(separate_p ? nc * TT * sizeof(T) : 0), dsbuf(separate_p ? nc * TT * sizeof(T) : 0);
  T* P = separate_p ? pbuf.as<T>() : sbuf.as<T>();
  T* dS = separate_p ? dsbuf.as<T>() : dpbuf.as<T>();
  for (int64_t c0 = 0; c0 < BH; c0 += nc) {
    const int64_t n = std::min(nc, BH - c0), off = c0 * T_ * hd;
    // S = Q K^T and dP = dO V^T, both [T, T] per head in the accumulation type.
    head_gemm(dt, adt, false, true, T_, T_, hd, 1.0, q + off, hd, T_ * hd, k + off, hd, T_ * hd, sbuf.p, T_, TT, n, s);
    head_gemm(dt, adt, false, true, T_, T_, hd, 1.0, dO + off, hd, T_ * hd, v + off, hd, T_ * hd, dpbuf.p, T_, TT, n,
              s);
    causal_softmax_bwd<A, T><<<blocks_for(n * TT), kThreads, 0, s>>>(sbuf.as<A>(), dpbuf.as<A>(), lse + c0 * T_,
                                                                     Dbuf.as<A>() + c0 * T_, P, dS, n * T_, T_, scale);
    CUDA_CHECK_LAUNCH();
    // dV = P^T dO, dK = scale dS^T Q, dQ = scale dS K.
    head_gemm(dt, adt, true, false, T_, hd, T_, 1.0, P, T_, TT, dO + off, hd, T_ * hd, dv + off, hd, T_ * hd, n, s);
    head_gemm(dt, adt, true, false, T_, hd, T_, double(scale), dS, T_, TT, q + off, hd, T_ * hd, dk + off, hd, T_ * hd,
              n, s);
    head_gemm(dt, adt, false, false, T_, hd, T_, double(scale), dS, T_, TT, k + off, hd, T_ * hd, dq + off, hd,
              T_ * hd, n, s);
  }
  if (accumulate)
    unpermute_heads<A, T, true><<<blocks_for(B * T_ * 3 * C), kThreads, 0, s>>>(grads.as<A>(), dqkv, B, T_, 3, C, H);
  else
    unpermute_heads<A, T, false><<<blocks_for(B * T_ * 3 * C), kThreads, 0, s>>>(grads.as<A>(), dqkv, B, T_, 3, C, H);
  CUDA_CHECK_LAUNCH();
}

void check_args(const char* fn, DType dt, int64_t B, int64_t T, int64_t C, int64_t H) {
  auto str = [](int64_t v) { return std::to_string(v); };
  const std::string shape = " (B=" + str(B) + " T=" + str(T) + " C=" + str(C) + " H=" + str(H) + ")";
  if (dt != DType::f32 && dt != DType::bf16 && dt != DType::f64)
    throw std::invalid_argument(std::string(fn) + ": unsupported dtype " + dtype_name(dt));
  if (B < 0 || T < 0 || C <= 0 || H <= 0 || C % H != 0)
    throw std::invalid_argument(std::string(fn) + ": need B, T >= 0 and C a positive multiple of H" + shape);
}

}  // namespace

void attention_fwd(DType dt, const void* qkv, void* out, void* lse, int64_t B, int64_t T, int64_t C, int64_t H,
                   cudaStream_t s) {
  check_args("attention_fwd", dt, B, T, C, H);
  if (B == 0 || T == 0) return;
  switch (dt) {
    case DType::f32:
      fwd_simple(static_cast<const float*>(qkv), static_cast<float*>(out), static_cast<float*>(lse), B, T, C, H, s);
      return;
    case DType::bf16:
      if (detail::flash_fwd_supported(qkv, out, C, H)) {
        detail::flash_fwd_bf16(qkv, out, static_cast<float*>(lse), B, T, C, H, s);
        return;
      }
      fwd_simple(static_cast<const bf16_t*>(qkv), static_cast<bf16_t*>(out), static_cast<float*>(lse), B, T, C, H, s);
      return;
    case DType::f64:
      fwd_simple(static_cast<const double*>(qkv), static_cast<double*>(out), static_cast<double*>(lse), B, T, C, H, s);
      return;
    default: return;
  }
}

void attention_bwd(DType dt, const void* qkv, const void* out, const void* lse, const void* dout, void* dqkv,
                   int64_t B, int64_t T, int64_t C, int64_t H, bool accumulate, cudaStream_t s) {
  check_args("attention_bwd", dt, B, T, C, H);
  if (B == 0 || T == 0) return;
  switch (dt) {
    case DType::f32:
      bwd_simple(static_cast<const float*>(qkv), static_cast<const float*>(out), static_cast<const float*>(lse),
                 static_cast<const float*>(dout), static_cast<float*>(dqkv), B, T, C, H, accumulate, s);
      return;
    case DType::bf16:
      if (detail::flash_bwd_supported(qkv, out, dout, dqkv, C, H)) {
        detail::flash_bwd_bf16(qkv, out, static_cast<const float*>(lse), dout, dqkv, B, T, C, H, accumulate, s);
        return;
      }
      bwd_simple(static_cast<const bf16_t*>(qkv), static_cast<const bf16_t*>(out), static_cast<const float*>(lse),
                 static_cast<const bf16_t*>(dout), static_cast<bf16_t*>(dqkv), B, T, C, H, accumulate, s);
      return;
    case DType::f64:
      bwd_simple(static_cast<const double*>(qkv), static_cast<const double*>(out), static_cast<const double*>(lse),
                 static_cast<const double*>(dout), static_cast<double*>(dqkv), B, T, C, H, accumulate, s);
      return;
    default: return;
  }
}

}  // namespace deeplora::kernels::cuda
