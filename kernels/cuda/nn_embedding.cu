// CUDA twins of kernels/nn.h, embedding part: forward (one warp per row), deterministic backward
// (dwpe by ordered column sums; dwte by a sorted-segment reduction, no atomics), id range check.
#include "kernels/nn.h"

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_utils.cuh"
#include "kernels/cuda/nn_common.cuh"

namespace deeplora::kernels::cuda {
namespace {

// =============================================================================================
// Embedding.

// One warp per (b, t) row.
template <class T, int N>
__global__ void __launch_bounds__(kRowThreads) embedding_fwd_kernel(const int32_t* __restrict__ tok, const T* __restrict__ wte,
                                                                    const T* __restrict__ wpe, T* __restrict__ y,
                                                                    int64_t rows, int64_t Tn, int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp_id();
  if (row >= rows) return;
  const int64_t t = row % Tn;
  const T* a = wte + int64_t(tok[row]) * C;
  const T* p = wpe ? wpe + t * C : nullptr;
  T* o = y + row * C;
  const int64_t packs = C / N;
  for (int64_t j = lane_id(); j < packs; j += 32) {
    Pack<T, N> va = load_pack<N>(a + j * N);
    if (p) {
      const Pack<T, N> vp = load_pack<N>(p + j * N);
#pragma unroll
      for (int e = 0; e < N; ++e) va.v[e] = from_acc<T>(to_acc(va.v[e]) + to_acc(vp.v[e]));
    }
    store_pack<N>(o + j * N, va);
  }
}

// dwpe[t, c] += sum_b dy[b, t, c], b in order: one thread per (t, pack of columns).
template <class T, int N>
__global__ void __launch_bounds__(256) embedding_dwpe_kernel(const T* __restrict__ dy, T* __restrict__ dwpe,
                                                             int64_t B, int64_t Tn, int64_t C) {
  using A = acc_t<T>;
  const int64_t packs = C / N;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= Tn * packs) return;
  const int64_t t = idx / packs, c = (idx % packs) * N;
  A acc[N];
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = A(0);
#pragma unroll 4
  for (int64_t b = 0; b < B; ++b) {
    const Pack<T, N> v = load_pack<N>(dy + (b * Tn + t) * C + c);
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] += to_acc(v.v[e]);
  }
  Pack<T, N> o = load_pack<N>(dwpe + t * C + c);
#pragma unroll
  for (int e = 0; e < N; ++e) o.v[e] = from_acc<T>(to_acc(o.v[e]) + acc[e]);
  store_pack<N>(dwpe + t * C + c, o);
}

// dwte without atomics. Positions are sorted by token (stable radix sort: equal tokens keep their
// position order), the sorted list is cut into chunks of kChunk entries and each chunk sums its runs
// of equal tokens in order:
//  - a run that starts and ends inside the chunk belongs to a token no other chunk sees: it is added
//    straight into dwte;
//  - a run that continues from the previous chunk leaves its sum in P[chunk];
//  - a run that starts here and continues into the next chunk leaves its sum in Q[chunk].
// A second kernel lets each chunk holding a Q add Q + P[next chunks...] (in order) into dwte. Every
// dwte row is written by exactly one thread per column, and the summation order is fixed.
constexpr int kChunk = 32;
constexpr uint32_t kNoToken = 0xffffffffu;

__global__ void iota_kernel(int32_t* v, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) v[i] = int32_t(i);
}

template <class T, int N>
__global__ void __launch_bounds__(256) dwte_chunk_kernel(const uint32_t* __restrict__ stok, const int32_t* __restrict__ spos,
                                                         const T* __restrict__ dy, T* __restrict__ dwte,
                                                         acc_t<T>* __restrict__ P, acc_t<T>* __restrict__ Q,
                                                         int64_t n, int64_t C) {
  using A = acc_t<T>;
  __shared__ uint32_t s_tok[kChunk];
  __shared__ int32_t s_pos[kChunk];
  const int64_t k = blockIdx.x, start = k * kChunk;
  const int len = int(min(int64_t(kChunk), n - start));
  if (threadIdx.x < len) {
    s_tok[threadIdx.x] = stok[start + threadIdx.x];
    s_pos[threadIdx.x] = spos[start + threadIdx.x];
  }
  const uint32_t prev = start > 0 ? stok[start - 1] : kNoToken;
  const uint32_t next = start + len < n ? stok[start + len] : kNoToken;
  __syncthreads();
  const int64_t packs = C / N;
  for (int64_t cv = threadIdx.x; cv < packs; cv += blockDim.x) {
    const int64_t c = cv * N;
    A acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = A(0);
    int run_start = 0;
    for (int i0 = 0; i0 < len; i0 += 4) {
      Pack<T, N> v[4];  // entries past len re-load the last row (in bounds) and are not used
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = load_pack<N>(dy + int64_t(s_pos[min(i0 + u, len - 1)]) * C + c);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u;
        if (i >= len) break;
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] += to_acc(v[u].v[e]);
        const uint32_t tk = s_tok[i];
        if (i + 1 < len && s_tok[i + 1] == tk) continue;  // the run goes on
        const bool starts_here = !(run_start == 0 && prev == tk);
        const bool ends_here = !(i == len - 1 && next == tk);
        if (starts_here && ends_here) {
          T* row = dwte + int64_t(tk) * C + c;
          Pack<T, N> o = load_pack<N>(row);
#pragma unroll
          for (int e = 0; e < N; ++e) o.v[e] = from_acc<T>(to_acc(o.v[e]) + acc[e]);
          store_pack<N>(row, o);
        } else {
          A* dst = (starts_here ? Q : P) + k * C + c;
#pragma unroll
          for (int e = 0; e < N; ++e) dst[e] = acc[e];
        }
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] = A(0);
        run_start = i + 1;
      }
    }
  }
}

template <class T, int N>
__global__ void __launch_bounds__(256) dwte_fixup_kernel(const uint32_t* __restrict__ stok, const acc_t<T>* __restrict__ P,
                                                         const acc_t<T>* __restrict__ Q, T* __restrict__ dwte,
                                                         int64_t n, int64_t C) {
  using A = acc_t<T>;
  const int64_t k = blockIdx.x, start = k * kChunk, end = min(start + int64_t(kChunk), n);
  const uint32_t tk = stok[end - 1];
  if (end >= n || stok[end] != tk) return;                              // last run ends here
  if (start > 0 && stok[start] == tk && stok[start - 1] == tk) return;  // ... or started earlier
  // Last sorted index holding tk: upper bound in [end, n).
  int64_t lo = end, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (stok[mid] <= tk) lo = mid + 1;
    else hi = mid;
  }
  const int64_t last_chunk = (lo - 1) / kChunk;
  const int64_t packs = C / N;
  for (int64_t cv = threadIdx.x; cv < packs; cv += blockDim.x) {
    const int64_t c = cv * N;
    A acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = Q[k * C + c + e];
#pragma unroll 4
    for (int64_t j = k + 1; j <= last_chunk; ++j) {
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] += P[j * C + c + e];
    }
    T* row = dwte + int64_t(tk) * C + c;
    Pack<T, N> o = load_pack<N>(row);
#pragma unroll
    for (int e = 0; e < N; ++e) o.v[e] = from_acc<T>(to_acc(o.v[e]) + acc[e]);
    store_pack<N>(row, o);
  }
}

template <class T, int N>
void embedding_dwte(const int32_t* tok, const T* dy, T* dwte, int64_t n, int64_t C, int64_t V, cudaStream_t s) {
  using A = acc_t<T>;
  if (n > int64_t(INT32_MAX)) throw std::invalid_argument("kernels::cuda::embedding_bwd: B*T over 2^31-1 tokens");
  int end_bit = 1;
  while (end_bit < 32 && (uint64_t(1) << end_bit) < uint64_t(V)) ++end_bit;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  size_t sort_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr),
                                             static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), int(n), 0, end_bit, s));
  const size_t idx_bytes = round_up(size_t(n) * 4, 256);
  const size_t pq_bytes = round_up(size_t(nchunks) * size_t(C) * sizeof(A), 256);
  Scratch scratch(3 * idx_bytes + 2 * pq_bytes + round_up(sort_bytes, 256));
  uint32_t* keys_out = scratch.as<uint32_t>(0);
  int32_t* pos_in = scratch.as<int32_t>(idx_bytes);
  int32_t* pos_out = scratch.as<int32_t>(2 * idx_bytes);
  A* P = scratch.as<A>(3 * idx_bytes);
  A* Q = scratch.as<A>(3 * idx_bytes + pq_bytes);
  void* sort_tmp = scratch.as<void>(3 * idx_bytes + 2 * pq_bytes);

  iota_kernel<<<grid_for(n, 256, INT32_MAX), 256, 0, s>>>(pos_in, n);
  CUDA_CHECK_LAUNCH();
  // Tokens are in [0, V), so their bits as unsigned sort like the ints and only end_bit bits matter.
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, reinterpret_cast<const uint32_t*>(tok), keys_out,
                                             pos_in, pos_out, int(n), 0, end_bit, s));
  const int64_t packs = C / N;
  const int threads = int(std::min<int64_t>(256, (packs + 31) / 32 * 32));
  dwte_chunk_kernel<T, N><<<unsigned(nchunks), threads, 0, s>>>(keys_out, pos_out, dy, dwte, P, Q, n, C);
  CUDA_CHECK_LAUNCH();
  dwte_fixup_kernel<T, N><<<unsigned(nchunks), threads, 0, s>>>(keys_out, P, Q, dwte, n, C);
  CUDA_CHECK_LAUNCH();
}

// Integer atomics only (exact, order-independent).
__global__ void count_oor_kernel(const int32_t* __restrict__ tok, int64_t n, int64_t V, int64_t ignore,
                                 unsigned long long* out) {
  __shared__ unsigned long long sh[32];
  unsigned long long cnt = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t id = tok[i];
    cnt += ((id < 0 || id >= V) && id != ignore) ? 1ull : 0ull;
  }
  cnt = block_sum(cnt, sh);
  if (threadIdx.x == 0 && cnt) atomicAdd(out, cnt);
}


}  // namespace

void embedding_fwd(DType dt, const int32_t* tok, const void* wte, const void* wpe, void* y, int64_t B, int64_t T,
                   int64_t C, cudaStream_t s) {
  const int64_t rows = B * T;
  if (rows <= 0 || C <= 0) return;
  dispatch_float(dt, "embedding_fwd", [&](auto tag) {
    using E = decltype(tag);
    constexpr int N = kVec<E>;
    const E* pwte = static_cast<const E*>(wte);
    const E* pwpe = static_cast<const E*>(wpe);
    E* py = static_cast<E*>(y);
    const unsigned grid = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    if (C % N == 0 && aligned16(pwte) && aligned16(py) && (!pwpe || aligned16(pwpe)))
      embedding_fwd_kernel<E, N><<<grid, kRowThreads, 0, s>>>(tok, pwte, pwpe, py, rows, T, C);
    else
      embedding_fwd_kernel<E, 1><<<grid, kRowThreads, 0, s>>>(tok, pwte, pwpe, py, rows, T, C);
    CUDA_CHECK_LAUNCH();
  });
}

void embedding_bwd(DType dt, const int32_t* tok, const void* dy, void* dwte, void* dwpe, int64_t B, int64_t T,
                   int64_t C, int64_t V, cudaStream_t s) {
  const int64_t rows = B * T;
  if (rows <= 0 || C <= 0) return;
  dispatch_float(dt, "embedding_bwd", [&](auto tag) {
    using E = decltype(tag);
    constexpr int N = kVec<E>;
    const E* pdy = static_cast<const E*>(dy);
    if (dwpe) {
      E* p = static_cast<E*>(dwpe);
      if (C % N == 0 && aligned16(pdy) && aligned16(p)) {
        embedding_dwpe_kernel<E, N><<<grid_for(T * (C / N), 256, INT32_MAX), 256, 0, s>>>(pdy, p, B, T, C);
      } else {
        embedding_dwpe_kernel<E, 1><<<grid_for(T * C, 256, INT32_MAX), 256, 0, s>>>(pdy, p, B, T, C);
      }
      CUDA_CHECK_LAUNCH();
    }
    if (dwte) {
      E* p = static_cast<E*>(dwte);
      if (C % N == 0 && aligned16(pdy) && aligned16(p)) embedding_dwte<E, N>(tok, pdy, p, rows, C, V, s);
      else embedding_dwte<E, 1>(tok, pdy, p, rows, C, V, s);
    }
  });
}

int64_t count_out_of_range(const int32_t* tok, int64_t n, int64_t V, int64_t ignore, cudaStream_t s) {
  if (n <= 0) return 0;
  Scratch cnt(sizeof(unsigned long long));
  unsigned long long* d = cnt.as<unsigned long long>();
  CUDA_CHECK(cudaMemsetAsync(d, 0, sizeof(unsigned long long), s));
  count_oor_kernel<<<grid_for(n, 256, 1024), 256, 0, s>>>(tok, n, V, ignore, d);
  CUDA_CHECK_LAUNCH();
  unsigned long long h = 0;
  CUDA_CHECK(cudaMemcpyAsync(&h, d, sizeof(h), cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
  return int64_t(h);
}

}  // namespace deeplora::kernels::cuda
