// CUDA twins of kernels/adapter.h: the compressed Deep LoRA product in three small launches. Each
// block works on one tile of kDeepLoraTile columns of Bt; the k x k chain is recomputed per block
// (L-1 products of k^3, tiny next to the tile's k^2 x 32) so that no block waits for another. The
// backward's k x k gradient is summed over tiles in a fixed order by one block.
#include "kernels/adapter.h"

#include <stdexcept>
#include <string>
#include <utility>

#include "kernels/cuda/cuda_utils.cuh"

namespace deeplora::kernels::cuda {
namespace {

using namespace util;

constexpr int kThreads = 256;
constexpr int kTile = int(kDeepLoraTile);

// C = A B (k x k, row-major), every thread of the block; the caller syncs before reading C.
__device__ void block_mm(const float* A, const float* B, float* C, int k) {
  for (int e = int(threadIdx.x); e < k * k; e += blockDim.x) {
    const int r = e / k, c = e % k;
    float s = 0.f;
    for (int l = 0; l < k; ++l) s += A[r * k + l] * B[l * k + c];
    C[e] = s;
  }
}

// P = K_L ... K_1 into smem (P, Q: k x k each); returns where the product is.
__device__ float* chain_product(const DeepLoraChain& c, float* P, float* Q) {
  const int k = int(c.k);
  const float* K1 = static_cast<const float*>(c.K[0]);
  for (int e = int(threadIdx.x); e < k * k; e += blockDim.x) P[e] = K1[e];
  __syncthreads();
  for (int i = 1; i < c.depth; ++i) {
    block_mm(static_cast<const float*>(c.K[i]), P, Q, k);
    __syncthreads();
    float* t = P;
    P = Q;
    Q = t;
  }
  return P;
}

template <class C> __global__ void chain_fwd_kernel(DeepLoraChain c) {
  extern __shared__ float sm[];
  const int k = int(c.k);
  const int64_t n = c.n, j0 = int64_t(blockIdx.x) * kTile;
  float* P = chain_product(c, sm, sm + k * k);
  float* Bs = sm + 2 * k * k;
  if (blockIdx.x == 0)
    for (int e = int(threadIdx.x); e < k * k; e += blockDim.x) static_cast<float*>(c.P)[e] = P[e];
  const int w = int(n - j0 < kTile ? n - j0 : kTile);
  const float* Bt = static_cast<const float*>(c.Bt);
  for (int e = int(threadIdx.x); e < k * kTile; e += blockDim.x) {
    const int r = e / kTile, cc = e % kTile;
    Bs[e] = cc < w ? Bt[r * n + j0 + cc] : 0.f;
  }
  __syncthreads();
  C* W = static_cast<C*>(c.W);
  for (int e = int(threadIdx.x); e < k * w; e += blockDim.x) {
    const int r = e / w, cc = e % w;
    float s = 0.f;
    for (int l = 0; l < k; ++l) s += P[r * k + l] * Bs[l * kTile + cc];
    W[r * n + j0 + cc] = from_acc<C>(s);
  }
}

// Per tile: gBt[:, tile] += Pᵀ gW[:, tile]; partial[tile] = gW[:, tile] Bt[:, tile]ᵀ.
template <class C> __global__ void chain_bwd_tiles_kernel(DeepLoraChain c, float* partial) {
  extern __shared__ float sm[];
  const int k = int(c.k);
  const int64_t n = c.n, j0 = int64_t(blockIdx.x) * kTile;
  float *P = sm, *G = sm + k * k, *Bs = G + k * kTile;
  const int w = int(n - j0 < kTile ? n - j0 : kTile);
  const float* Pg = static_cast<const float*>(c.P);
  const float* Bt = static_cast<const float*>(c.Bt);
  const C* gW = static_cast<const C*>(c.gW);
  for (int e = int(threadIdx.x); e < k * k; e += blockDim.x) P[e] = Pg[e];
  for (int e = int(threadIdx.x); e < k * kTile; e += blockDim.x) {
    const int r = e / kTile, cc = e % kTile;
    G[e] = cc < w ? to_acc(gW[r * n + j0 + cc]) : 0.f;
    Bs[e] = cc < w ? Bt[r * n + j0 + cc] : 0.f;
  }
  __syncthreads();
  if (c.gBt) {
    float* gBt = static_cast<float*>(c.gBt);
    for (int e = int(threadIdx.x); e < k * w; e += blockDim.x) {
      const int i = e / w, cc = e % w;
      float s = 0.f;
      for (int l = 0; l < k; ++l) s += P[l * k + i] * G[l * kTile + cc];
      gBt[i * n + j0 + cc] += s;
    }
  }
  float* out = partial + int64_t(blockIdx.x) * k * k;
  for (int e = int(threadIdx.x); e < k * k; e += blockDim.x) {
    const int i = e / k, j = e % k;
    float s = 0.f;
    for (int cc = 0; cc < kTile; ++cc) s += G[i * kTile + cc] * Bs[j * kTile + cc];
    out[e] = s;
  }
}

// One block: G = sum of the tiles' partials (in tile order), then down the chain:
// gK_i += G_i P_{i-1}ᵀ, G_{i-1} = K_iᵀ G_i, with the prefix products P_i = K_i...K_1 in scratch.
__global__ void chain_bwd_chain_kernel(DeepLoraChain c, const float* partial, int tiles, float* prefix) {
  extern __shared__ float sm[];
  const int k = int(c.k), kk = k * k;
  float *G = sm, *T = sm + kk;
  for (int e = int(threadIdx.x); e < kk; e += blockDim.x) {
    float s = 0.f;
    for (int t = 0; t < tiles; ++t) s += partial[int64_t(t) * kk + e];
    G[e] = s;
  }
  // prefix + (i - 1) * kk holds P_i for i = 1 .. L-1.
  for (int i = 1; i < c.depth; ++i) {
    const float* Ki = static_cast<const float*>(c.K[i - 1]);
    float* Pi = prefix + int64_t(i - 1) * kk;
    if (i == 1) {
      for (int e = int(threadIdx.x); e < kk; e += blockDim.x) Pi[e] = Ki[e];
    } else {
      block_mm(Ki, prefix + int64_t(i - 2) * kk, Pi, k);
    }
    __syncthreads();
  }
  __syncthreads();
  for (int i = c.depth; i >= 1; --i) {
    if (float* gK = static_cast<float*>(c.gK[i - 1])) {
      const float* Pm = i > 1 ? prefix + int64_t(i - 2) * kk : nullptr;  // P_{i-1}
      for (int e = int(threadIdx.x); e < kk; e += blockDim.x) {
        const int r = e / k, cc = e % k;
        float s;
        if (!Pm) {
          s = G[e];
        } else {
          s = 0.f;
          for (int l = 0; l < k; ++l) s += G[r * k + l] * Pm[cc * k + l];
        }
        gK[e] += s;
      }
    }
    if (i > 1) {
      const float* Ki = static_cast<const float*>(c.K[i - 1]);
      for (int e = int(threadIdx.x); e < kk; e += blockDim.x) {
        const int r = e / k, cc = e % k;
        float s = 0.f;
        for (int l = 0; l < k; ++l) s += Ki[l * k + r] * G[l * k + cc];
        T[e] = s;
      }
      __syncthreads();
      float* t = G;
      G = T;
      T = t;
    }
  }
}

void check_chain(const char* fn, DType master, DType compute, const DeepLoraChain& c) {
  if (master != DType::f32)
    throw std::invalid_argument(std::string("kernels::cuda::") + fn + ": the master dtype must be f32, got " +
                                dt_name(master));
  if (compute != DType::f32 && compute != DType::bf16)
    throw std::invalid_argument(std::string("kernels::cuda::") + fn + ": the compute dtype must be f32 or bf16, got " +
                                dt_name(compute));
  if (c.k <= 0 || c.k > kDeepLoraMaxK || c.n <= 0 || c.depth < 1 || c.depth > kDeepLoraMaxDepth)
    throw std::invalid_argument(std::string("kernels::cuda::") + fn + ": k " + std::to_string(c.k) + " (1.." +
                                std::to_string(kDeepLoraMaxK) + "), n " + std::to_string(c.n) + ", depth " +
                                std::to_string(c.depth) + " (1.." + std::to_string(kDeepLoraMaxDepth) + ")");
}

unsigned tiles_of(const DeepLoraChain& c) { return unsigned((c.n + kTile - 1) / kTile); }

}  // namespace

void deeplora_chain_fwd(DType master, DType compute, const DeepLoraChain& c, cudaStream_t s) {
  check_chain("deeplora_chain_fwd", master, compute, c);
  const size_t smem = size_t(2 * c.k * c.k + c.k * kTile) * sizeof(float);
  dispatch_float(compute, "deeplora_chain_fwd", [&](auto tag) {
    using C = decltype(tag);
    if constexpr (!std::is_same_v<C, double>) chain_fwd_kernel<C><<<tiles_of(c), kThreads, smem, s>>>(c);
  });
  CUDA_CHECK_LAUNCH();
}

void deeplora_chain_bwd(DType master, DType compute, const DeepLoraChain& c, void* scratch, cudaStream_t s) {
  check_chain("deeplora_chain_bwd", master, compute, c);
  const unsigned tiles = tiles_of(c);
  float* partial = static_cast<float*>(scratch);
  float* prefix = partial + int64_t(tiles) * c.k * c.k;
  const size_t smem1 = size_t(c.k * c.k + 2 * c.k * kTile) * sizeof(float);
  dispatch_float(compute, "deeplora_chain_bwd", [&](auto tag) {
    using C = decltype(tag);
    if constexpr (!std::is_same_v<C, double>) chain_bwd_tiles_kernel<C><<<tiles, kThreads, smem1, s>>>(c, partial);
  });
  CUDA_CHECK_LAUNCH();
  bool any_k = false;
  for (int i = 0; i < c.depth; ++i) any_k |= c.gK[i] != nullptr;
  if (!any_k) return;
  const size_t smem2 = size_t(2 * c.k * c.k) * sizeof(float);
  chain_bwd_chain_kernel<<<1, kThreads, smem2, s>>>(c, partial, int(tiles), prefix);
  CUDA_CHECK_LAUNCH();
}

}  // namespace deeplora::kernels::cuda
