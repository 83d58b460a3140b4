// CUDA kernels of kernels/sparse.h. Row/column ownership instead of atomics: a sparse-dense product
// gives each output element (spmm_acc) or row (lowrank_step) one owner that walks its entries in
// pattern order; reductions go through per-block partials summed in block order (two launches, or
// the last block of the same launch, picked by an integer ticket).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/sparse.h"
#include "runtime/cuda_check.h"
#include "runtime/device.h"

namespace deeplora::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

[[noreturn]] void bad_dtype(const char* fn, DType dt) {
  throw std::invalid_argument(std::string("kernels::cuda::") + fn + ": dtype " + dtype_name(dt) +
                              " is not supported (f32 or f64)");
}

template <class F> void dispatch(DType dt, const char* fn, F&& f) {
  if (dt == DType::f64) f(double{});
  else if (dt == DType::f32) f(float{});
  else bad_dtype(fn, dt);
}

unsigned blocks_for(int64_t n, int64_t per_block, int64_t cap) {
  int64_t b = (n + per_block - 1) / per_block;
  return unsigned(std::max<int64_t>(1, std::min(b, cap)));
}

// Scratch from the context's caching allocator; stream-ordered, so freeing after the launch is safe.
class Scratch {
 public:
  explicit Scratch(size_t bytes) : p_(cuda_ctx().allocator.allocate(std::max<size_t>(bytes, 16))) {}
  ~Scratch() { cuda_ctx().allocator.deallocate(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class U> U* as() const { return static_cast<U*>(p_); }

 private:
  void* p_;
};

template <class A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Fixed-order block sum (blockDim.x == kThreads); the result is valid in thread 0.
template <class A> __device__ A block_sum(A v, A* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  A s = A(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) s += sh[w];
  return s;
}

// ---- sampled product, sparse-dense product, squared error, SGD ----------------------------------

template <class T>
__global__ void sampled_dot_kernel(const int32_t* __restrict__ row, const int32_t* __restrict__ col, int64_t nnz,
                                   const T* __restrict__ P, const T* __restrict__ Q, int64_t k, T* __restrict__ out,
                                   bool accumulate) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < nnz; e += int64_t(gridDim.x) * blockDim.x) {
    const T* a = P + int64_t(row[e]) * k;
    const T* b = Q + int64_t(col[e]) * k;
    T s = T(0);
    for (int64_t c = 0; c < k; ++c) s += a[c] * b[c];
    out[e] = accumulate ? out[e] + s : s;
  }
}

template <class T>
__global__ void gather_kernel(const int32_t* __restrict__ row, const int32_t* __restrict__ col, int64_t nnz,
                              const T* __restrict__ X, int64_t ld, T* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < nnz; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = X[int64_t(row[e]) * ld + col[e]];
}

template <class T>
__global__ void scatter_kernel(const int32_t* __restrict__ row, const int32_t* __restrict__ col, int64_t nnz,
                               const T* __restrict__ vals, int64_t ld, T* __restrict__ Y) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < nnz; e += int64_t(gridDim.x) * blockDim.x)
    Y[int64_t(row[e]) * ld + col[e]] += vals[e];
}

// One thread per output element (i, c); its entries in order.
template <class T>
__global__ void spmm_kernel(const int32_t* __restrict__ ptr, const int32_t* __restrict__ idx,
                            const int32_t* __restrict__ perm, const T* __restrict__ vals, int64_t n_out,
                            const T* __restrict__ X, int64_t k, T* __restrict__ Y, T alpha) {
  const int64_t total = n_out * k;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t / k, c = t - i * k;
    T s = T(0);
    const int32_t e1 = ptr[i + 1];
    for (int32_t e = ptr[i]; e < e1; ++e) s += vals[perm ? perm[e] : e] * X[int64_t(idx[e]) * k + c];
    Y[t] += alpha * s;
  }
}

template <class T>
__global__ void sq_error_partial_kernel(const T* __restrict__ x, const T* __restrict__ t, const T* __restrict__ w,
                                        int64_t n, T* __restrict__ partial) {
  __shared__ T sh[kWarps];
  T s = T(0);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const T r = x[i] - t[i];
    s += (w ? w[i] : T(1)) * r * r;
  }
  s = block_sum(s, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <class T, class O>
__global__ void final_sum_kernel(const T* __restrict__ partial, int n, double scale, O* __restrict__ out) {
  __shared__ T sh[kWarps];
  T s = T(0);
  for (int i = threadIdx.x; i < n; i += kThreads) s += partial[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) out[0] = O(double(s) * scale);
}

template <class T>
__global__ void sq_error_bwd_kernel(const T* __restrict__ x, const T* __restrict__ t, const T* __restrict__ w,
                                    int64_t n, T alpha, const T* __restrict__ g, T* __restrict__ gx,
                                    T* __restrict__ gt) {
  const T s = alpha * g[0];
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const T d = s * (w ? w[i] : T(1)) * (x[i] - t[i]);
    if (gx) gx[i] += d;
    if (gt) gt[i] -= d;
  }
}

struct SgdArgs {
  SgdItem items[kSgdMaxItems];
};

template <class T> __global__ void sgd_kernel(const SgdArgs args, bool zero_grad) {
  const SgdItem it = args.items[blockIdx.y];
  T* p = static_cast<T*>(it.p);
  T* g = static_cast<T*>(it.g);
  const T lr = T(it.lr);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < it.n; i += int64_t(gridDim.x) * kThreads) {
    p[i] -= lr * g[i];
    if (zero_grad) g[i] = T(0);
  }
}

// ---- the fused compressed step ------------------------------------------------------------------

// C = op(A) · op(B) for k x k row-major matrices in shared memory, by the whole block.
template <class T>
__device__ void block_mm(const T* A, const T* B, T* C, int k, bool ta, bool tb) {
  for (int o = threadIdx.x; o < k * k; o += kThreads) {
    const int i = o / k, j = o - i * k;
    T s = T(0);
    for (int t = 0; t < k; ++t) s += (ta ? A[t * k + i] : A[i * k + t]) * (tb ? B[j * k + t] : B[t * k + j]);
    C[o] = s;
  }
}

// KK: compile-time bound on k (register arrays), runtime k <= KK.
template <class T, int KK>
__global__ void __launch_bounds__(kThreads) lowrank_step_kernel(const LowrankStep a, int nb_row, int nb_col) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sm = reinterpret_cast<T*>(smem_raw);
  const int k = int(a.k), L = int(a.L), kk = k * k;
  T* sKp = sm;              // kk
  T* sAcc = sKp + kk;       // kk
  T* sRow = sAcc + kk;      // kWarps x 64: a row of A and its gP (row side)
  T* sRed = sRow + kWarps * 64;  // 16
  T* sLast = sRed + 16;     // last block: K (L kk), Pre (L kk), X (L kk), G (kk)
  __shared__ int s_is_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T alpha = T(a.alpha), lr_outer = T(a.lr_outer);

  // Kp = K_L ⋯ K_1, ping-ponging between sAcc and sKp so that it ends in sKp.
  {
    T* cur = ((L - 1) % 2 == 0) ? sKp : sAcc;
    T* nxt = cur == sKp ? sAcc : sKp;
    const T* K1 = static_cast<const T*>(a.K[0]);
    for (int o = tid; o < kk; o += kThreads) cur[o] = K1[o];
    __syncthreads();
    for (int l = 1; l < L; ++l) {
      const T* Kl = static_cast<const T*>(a.K[l]);
      for (int o = tid; o < kk; o += kThreads) {
        const int i = o / k, j = o - i * k;
        T s = T(0);
        for (int t = 0; t < k; ++t) s += Kl[i * k + t] * cur[t * k + j];
        nxt[o] = s;
      }
      __syncthreads();
      T* sw = cur; cur = nxt; nxt = sw;
    }
  }

  const T* __restrict__ A = static_cast<const T*>(a.A);
  const T* __restrict__ B = static_cast<const T*>(a.B);
  unsigned* counter = static_cast<unsigned*>(a.work);
  T* partL = reinterpret_cast<T*>(static_cast<char*>(a.work) + 256);  // [nb_row]
  T* partK = partL + nb_row;                                            // [kk][nb_row]

  if (int(blockIdx.x) < nb_row) {
    // ---- row owners: residuals, gP_i, A_out, the block's share of gKp = Σ_i A_iᵀ gP_i, the loss.
    constexpr int NQ = (KK * KK + 31) / 32;
    T gk[NQ];
#pragma unroll
    for (int q = 0; q < NQ; ++q) gk[q] = T(0);
    T lsum = T(0);
    const T* __restrict__ vals = static_cast<const T*>(a.vals_csr);
    T* Ao = static_cast<T*>(a.A_out);
    T* myrow = sRow + warp * 64;
    for (int64_t i = int64_t(blockIdx.x) * kWarps + warp; i < a.rows; i += int64_t(nb_row) * kWarps) {
      T av[KK], p[KK], g[KK];
#pragma unroll
      for (int t = 0; t < KK; ++t) av[t] = t < k ? A[i * k + t] : T(0);
#pragma unroll
      for (int c = 0; c < KK; ++c) {
        T s = T(0);
#pragma unroll
        for (int t = 0; t < KK; ++t)
          if (t < k && c < k) s += av[t] * sKp[t * k + c];
        p[c] = s;
        g[c] = T(0);
      }
      T ls = T(0);
      const int32_t e1 = a.row_ptr[i + 1];
      for (int32_t e = a.row_ptr[i] + lane; e < e1; e += 32) {
        const T* bj = B + int64_t(a.col_idx[e]) * k;
        T b[KK];
#pragma unroll
        for (int c = 0; c < KK; ++c) b[c] = c < k ? bj[c] : T(0);
        T r = -vals[e];
#pragma unroll
        for (int c = 0; c < KK; ++c) r += p[c] * b[c];
        ls += r * r;
#pragma unroll
        for (int c = 0; c < KK; ++c) g[c] += r * b[c];
      }
#pragma unroll
      for (int c = 0; c < KK; ++c) g[c] = alpha * warp_sum(g[c]);
      lsum += warp_sum(ls);
      // A_out[i, t] = A[i, t] - lr_outer · (gP_i · Kpᵀ)_t, lane t writes column t.
#pragma unroll
      for (int t = 0; t < KK; ++t) {
        if (t < k && lane == t) {
          T s = T(0);
#pragma unroll
          for (int c = 0; c < KK; ++c)
            if (c < k) s += g[c] * sKp[t * k + c];
          Ao[i * k + t] = av[t] - lr_outer * s;
          myrow[t] = av[t];
          myrow[32 + t] = g[t];
        }
      }
      __syncwarp();
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        const int o = lane + 32 * q;
        if (o < kk) gk[q] += myrow[o / k] * myrow[32 + o % k];
      }
      __syncwarp();
    }
    // Combine the warps' gKp shares in warp order, then the block writes its partials.
    for (int w = 0; w < kWarps; ++w) {
      if (warp == w) {
#pragma unroll
        for (int q = 0; q < NQ; ++q) {
          const int o = lane + 32 * q;
          if (o < kk) sAcc[o] = (w == 0 ? T(0) : sAcc[o]) + gk[q];
        }
      }
      __syncthreads();
    }
    if (lane == 0) sRed[warp] = lsum;
    __syncthreads();
    for (int o = tid; o < kk; o += kThreads) partK[int64_t(o) * nb_row + blockIdx.x] = sAcc[o];
    if (tid == 0) {
      T s = T(0);
      for (int w = 0; w < kWarps; ++w) s += sRed[w];
      partL[blockIdx.x] = s;
    }
  } else {
    // ---- column owners: B_out[j] = B[j] - lr_outer · alpha · Σ_e r_e · P[i_e], P[i] = A[i]·Kp.
    const T* __restrict__ vals = static_cast<const T*>(a.vals_csc);
    T* Bo = static_cast<T*>(a.B_out);
    const int cb = int(blockIdx.x) - nb_row;
    for (int64_t j = int64_t(cb) * kWarps + warp; j < a.cols; j += int64_t(nb_col) * kWarps) {
      T b[KK], g[KK];
#pragma unroll
      for (int c = 0; c < KK; ++c) {
        b[c] = c < k ? B[j * k + c] : T(0);
        g[c] = T(0);
      }
      const int32_t e1 = a.col_ptr[j + 1];
      for (int32_t e = a.col_ptr[j] + lane; e < e1; e += 32) {
        const T* ai = A + int64_t(a.csc_row[e]) * k;
        T av[KK], p[KK];
#pragma unroll
        for (int t = 0; t < KK; ++t) av[t] = t < k ? ai[t] : T(0);
        T r = -vals[e];
#pragma unroll
        for (int c = 0; c < KK; ++c) {
          T s = T(0);
#pragma unroll
          for (int t = 0; t < KK; ++t)
            if (t < k && c < k) s += av[t] * sKp[t * k + c];
          p[c] = s;
          r += s * b[c];
        }
#pragma unroll
        for (int c = 0; c < KK; ++c) g[c] += r * p[c];
      }
#pragma unroll
      for (int c = 0; c < KK; ++c) g[c] = warp_sum(g[c]);
#pragma unroll
      for (int t = 0; t < KK; ++t)
        if (t < k && lane == t) Bo[j * k + t] = b[t] - lr_outer * alpha * g[t];
    }
  }

  // ---- the last block to finish reduces the partials and updates K_1..K_L.
  __threadfence();
  __syncthreads();
  if (tid == 0) s_is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();
  T* sK = sLast;
  T* sPre = sK + L * kk;
  T* sX = sPre + L * kk;
  T* sG = sX + L * kk;
  // gKp[o] = Σ_b partK[o][b] in block order. Each entry's blocks are split into `split` contiguous
  // ranges summed by different threads (loads issued 16 at a time, added in order), and the range
  // sums are added in range order: a fixed order, whatever the timing.
  {
    const int split = max(1, min(8, kThreads / kk));
    const int per = (nb_row + split - 1) / split;
    T* sTmp = split > 1 ? sRow : sG;  // sRow is free now and holds kk * split <= kThreads elements
    for (int w = tid; w < kk * split; w += kThreads) {
      const int o = w / split, part = w - o * split;
      const T* src = partK + int64_t(o) * nb_row;
      const int b0 = part * per, b1 = min(nb_row, b0 + per);
      T s = T(0);
      int b = b0;
      for (; b + 16 <= b1; b += 16) {
        T v[16];
#pragma unroll
        for (int u = 0; u < 16; ++u) v[u] = __ldcg(src + b + u);
#pragma unroll
        for (int u = 0; u < 16; ++u) s += v[u];
      }
      for (; b < b1; ++b) s += __ldcg(src + b);
      sTmp[w] = s;
    }
    __syncthreads();
    if (split > 1)
      for (int o = tid; o < kk; o += kThreads) {
        T s = T(0);
        for (int part = 0; part < split; ++part) s += sTmp[o * split + part];
        sG[o] = s;
      }
  }
  {
    T s = T(0);
    for (int b = tid; b < nb_row; b += kThreads) s += __ldcg(partL + b);
    s = block_sum(s, sRed);
    if (tid == 0) {
      *static_cast<T*>(a.loss) = T(0.5) * alpha * s;
      *counter = 0u;  // ready for the next launch
    }
  }
  for (int l = 0; l < L; ++l) {
    const T* Kl = static_cast<const T*>(a.K[l]);
    for (int o = tid; o < kk; o += kThreads) sK[l * kk + o] = Kl[o];
  }
  for (int o = tid; o < kk; o += kThreads) sPre[o] = (o / k == o % k) ? T(1) : T(0);
  __syncthreads();
  for (int o = tid; o < kk; o += kThreads) sX[(L - 1) * kk + o] = sG[o];
  __syncthreads();
  for (int l = 1; l < L; ++l) {  // Pre_l = K_{l-1} Pre_{l-1}
    block_mm(sK + (l - 1) * kk, sPre + (l - 1) * kk, sPre + l * kk, k, false, false);
    __syncthreads();
  }
  for (int l = L - 2; l >= 0; --l) {  // X_l = K_{l+1}ᵀ X_{l+1}
    block_mm(sK + (l + 1) * kk, sX + (l + 1) * kk, sX + l * kk, k, true, false);
    __syncthreads();
  }
  const T lr_inner = T(a.lr_inner);
  for (int o = tid; o < L * kk; o += kThreads) {  // K_l -= lr · X_l Pre_lᵀ
    const int l = o / kk, e = o - l * kk, i = e / k, j = e - i * k;
    const T* X = sX + l * kk;
    const T* P = sPre + l * kk;
    T s = T(0);
    for (int t = 0; t < k; ++t) s += X[i * k + t] * P[j * k + t];
    static_cast<T*>(a.K[l])[e] = sK[o] - lr_inner * s;
  }
}

template <class T, int KK> void launch_lowrank(const LowrankStep& a, cudaStream_t s) {
  const int nb_row = int(lowrank_row_blocks(a.rows));
  const int nb_col = int(std::max<int64_t>(1, std::min<int64_t>((a.cols + kWarps - 1) / kWarps, 1024)));
  const size_t smem = size_t(lowrank_step_smem_elems(a.k, a.L)) * sizeof(T);
  lowrank_step_kernel<T, KK><<<nb_row + nb_col, kThreads, smem, s>>>(a, nb_row, nb_col);
  CUDA_CHECK_LAUNCH();
}

// ---- recovery error over the unobserved entries --------------------------------------------------

// One block per row (grid-strided): the row's observed columns as a bitmap in shared memory, then
// every unobserved column's squared difference, summed per row in a fixed order.
template <class T>
__global__ void unobserved_rows_kernel(const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ col_idx,
                                       int64_t rows, int64_t cols, const T* __restrict__ X1,
                                       const T* __restrict__ Y1, int64_t k1, const T* __restrict__ X2,
                                       const T* __restrict__ Y2, int64_t k2, double* __restrict__ row_sums) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double sh[kWarps];
  const int64_t words = (cols + 31) / 32;
  unsigned* bits = reinterpret_cast<unsigned*>(smem_raw);
  double* x = reinterpret_cast<double*>(smem_raw + ((words * 4 + 15) / 16) * 16);  // k1 + k2
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    for (int64_t w = threadIdx.x; w < words; w += kThreads) bits[w] = 0u;
    for (int64_t c = threadIdx.x; c < k1; c += kThreads) x[c] = double(X1[i * k1 + c]);
    for (int64_t c = threadIdx.x; c < k2; c += kThreads) x[k1 + c] = double(X2[i * k2 + c]);
    __syncthreads();
    for (int32_t e = row_ptr[i] + threadIdx.x; e < row_ptr[i + 1]; e += kThreads) {
      const int32_t j = col_idx[e];
      atomicOr(&bits[j >> 5], 1u << (j & 31));  // integer OR: order-independent
    }
    __syncthreads();
    double s = 0;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      if (bits[j >> 5] & (1u << (j & 31))) continue;
      double v = 0;
      for (int64_t c = 0; c < k1; ++c) v += x[c] * double(Y1[j * k1 + c]);
      for (int64_t c = 0; c < k2; ++c) v -= x[k1 + c] * double(Y2[j * k2 + c]);
      s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) row_sums[i] = s;
    __syncthreads();
  }
}

}  // namespace

void sampled_dot(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* P, const void* Q,
                 int64_t k, void* out, bool accumulate, cudaStream_t s) {
  if (nnz == 0) return;
  dispatch(dt, "sampled_dot", [&](auto z) {
    using T = decltype(z);
    sampled_dot_kernel<T><<<blocks_for(nnz, kThreads, 65535), kThreads, 0, s>>>(
        row, col, nnz, static_cast<const T*>(P), static_cast<const T*>(Q), k, static_cast<T*>(out), accumulate);
    CUDA_CHECK_LAUNCH();
  });
}

void gather_pattern(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* X, int64_t ld,
                    void* out, cudaStream_t s) {
  if (nnz == 0) return;
  dispatch(dt, "gather_pattern", [&](auto z) {
    using T = decltype(z);
    gather_kernel<T><<<blocks_for(nnz, kThreads, 65535), kThreads, 0, s>>>(row, col, nnz, static_cast<const T*>(X), ld,
                                                                           static_cast<T*>(out));
    CUDA_CHECK_LAUNCH();
  });
}

void scatter_pattern_acc(DType dt, const int32_t* row, const int32_t* col, int64_t nnz, const void* vals, int64_t ld,
                         void* Y, cudaStream_t s) {
  if (nnz == 0) return;
  dispatch(dt, "scatter_pattern_acc", [&](auto z) {
    using T = decltype(z);
    scatter_kernel<T><<<blocks_for(nnz, kThreads, 65535), kThreads, 0, s>>>(row, col, nnz, static_cast<const T*>(vals),
                                                                            ld, static_cast<T*>(Y));
    CUDA_CHECK_LAUNCH();
  });
}

void spmm_acc(DType dt, const int32_t* ptr, const int32_t* idx, const int32_t* perm, const void* vals, int64_t n_out,
              const void* X, int64_t k, void* Y, double alpha, cudaStream_t s) {
  if (n_out == 0 || k == 0) return;
  dispatch(dt, "spmm_acc", [&](auto z) {
    using T = decltype(z);
    spmm_kernel<T><<<blocks_for(n_out * k, kThreads, 65535), kThreads, 0, s>>>(
        ptr, idx, perm, static_cast<const T*>(vals), n_out, static_cast<const T*>(X), k, static_cast<T*>(Y), T(alpha));
    CUDA_CHECK_LAUNCH();
  });
}

void sq_error_fwd(DType dt, const void* x, const void* t, const void* w, int64_t n, double alpha, void* out,
                  cudaStream_t s) {
  dispatch(dt, "sq_error_fwd", [&](auto z) {
    using T = decltype(z);
    const unsigned nb = blocks_for(n, int64_t(kThreads) * 8, 1024);  // depends on n only: fixed sum order
    Scratch part(nb * sizeof(T));
    sq_error_partial_kernel<T><<<nb, kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(t),
                                                       static_cast<const T*>(w), n, part.as<T>());
    CUDA_CHECK_LAUNCH();
    final_sum_kernel<T, T><<<1, kThreads, 0, s>>>(part.as<T>(), int(nb), 0.5 * alpha, static_cast<T*>(out));
    CUDA_CHECK_LAUNCH();
  });
}

void sq_error_bwd(DType dt, const void* x, const void* t, const void* w, int64_t n, double alpha, const void* g,
                  void* gx, void* gt, cudaStream_t s) {
  if (n == 0) return;
  dispatch(dt, "sq_error_bwd", [&](auto z) {
    using T = decltype(z);
    sq_error_bwd_kernel<T><<<blocks_for(n, kThreads * 4, 8192), kThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(t), static_cast<const T*>(w), n, T(alpha),
        static_cast<const T*>(g), static_cast<T*>(gx), static_cast<T*>(gt));
    CUDA_CHECK_LAUNCH();
  });
}

void sgd_multi(DType dt, const SgdItem* items, int n_items, bool zero_grad, cudaStream_t s) {
  dispatch(dt, "sgd_multi", [&](auto z) {
    using T = decltype(z);
    for (int i0 = 0; i0 < n_items; i0 += kSgdMaxItems) {
      SgdArgs args;
      const int m = std::min(kSgdMaxItems, n_items - i0);
      int64_t nmax = 1;
      for (int i = 0; i < m; ++i) {
        args.items[i] = items[i0 + i];
        nmax = std::max(nmax, items[i0 + i].n);
      }
      dim3 grid(blocks_for(nmax, kThreads * 4, 4096), unsigned(m));
      sgd_kernel<T><<<grid, kThreads, 0, s>>>(args, zero_grad);
      CUDA_CHECK_LAUNCH();
    }
  });
}

void lowrank_step(const LowrankStep& a, cudaStream_t s) {
  if (!lowrank_step_supported(a.dt, a.k, a.L))
    throw std::invalid_argument("kernels::cuda::lowrank_step: unsupported dtype/k/L (see lowrank_step_supported)");
  dispatch(a.dt, "lowrank_step", [&](auto z) {
    using T = decltype(z);
    const int64_t k = a.k;
    // Register-array bounds: exact for the common widths (k = 2r = 10 is the paper's), the next
    // bound up otherwise (entries past k are predicated off). Few instantiations keep nvcc fast.
    if (k <= 2) launch_lowrank<T, 2>(a, s);
    else if (k <= 4) launch_lowrank<T, 4>(a, s);
    else if (k <= 8) launch_lowrank<T, 8>(a, s);
    else if (k <= 10) launch_lowrank<T, 10>(a, s);
    else if (k <= 16) launch_lowrank<T, 16>(a, s);
    else launch_lowrank<T, 32>(a, s);
  });
}

void lowrank_unobserved_sq_sum(DType dt, const int32_t* row_ptr, const int32_t* col_idx, int64_t rows, int64_t cols,
                               const void* X1, const void* Y1, int64_t k1, const void* X2, const void* Y2, int64_t k2,
                               void* out, cudaStream_t s) {
  const size_t smem = ((size_t(cols + 31) / 32 * 4 + 15) / 16) * 16 + size_t(k1 + k2) * sizeof(double);
  if (smem > 48 * 1024)
    throw std::invalid_argument("kernels::cuda::lowrank_unobserved_sq_sum: " + std::to_string(cols) + " columns and " +
                                std::to_string(k1 + k2) + " factor columns need more than 48 KiB of shared memory "
                                "(estimate the error on a sample of entries instead)");
  if (rows == 0) {
    CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), s));
    return;
  }
  dispatch(dt, "lowrank_unobserved_sq_sum", [&](auto z) {
    using T = decltype(z);
    Scratch row_sums(size_t(rows) * sizeof(double));
    const unsigned nb = unsigned(std::min<int64_t>(rows, 4096));
    unobserved_rows_kernel<T><<<nb, kThreads, smem, s>>>(row_ptr, col_idx, rows, cols, static_cast<const T*>(X1),
                                                         static_cast<const T*>(Y1), k1, static_cast<const T*>(X2),
                                                         static_cast<const T*>(Y2), k2, row_sums.as<double>());
    CUDA_CHECK_LAUNCH();
    final_sum_kernel<double, double><<<1, kThreads, 0, s>>>(row_sums.as<double>(), int(rows), 1.0,
                                                            static_cast<double*>(out));
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace deeplora::kernels::cuda
