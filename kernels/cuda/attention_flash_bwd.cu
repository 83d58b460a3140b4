// Fused causal attention backward for bf16, head size 64 (FlashAttention-2 algorithm), deterministic:
// no atomics, every gradient element is summed by one thread in a fixed order. Two passes, each a
// recompute of the scores from the saved lse:
//   dQ pass:    a block owns 64 query rows of one head (16 per warp) and streams 64-key tiles of K and V
//               (cp.async, double-buffered): P = exp(S - lse), dP = dO V^T, dS = P (dP - D), dQ += dS K.
//               It also computes D = rowsum(dO o O) for its rows and saves it for the second pass.
//   dK/dV pass: a block owns 16 * kKVWarps keys of one head (16 per warp, K and V held as mma A fragments)
//               and streams 64-query tiles of Q, dO, lse and D: it computes the transposed products
//               S^T = K Q^T, dP^T = V dO^T, so P^T and dS^T come out as accumulator fragments that feed
//               dV += P^T dO and dK += dS^T Q directly (no shared-memory exchange between warps).
// Products are mma.sync m16n8k16 (bf16 in, f32 accumulate); P and dS enter them in bf16, as in the
// simple path. Gradients are added (+=) into dqkv in bf16.
#include <cuda_bf16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "kernels/cuda/attention_flash.cuh"
#include "kernels/cuda/flash_ptx.cuh"
#include "kernels/cuda/cuda_utils.cuh"
#include "kernels/cuda_check.h"

namespace deeplora::kernels::cuda::detail {
namespace {
using namespace ptx;

using bf16_t = __nv_bfloat16;

constexpr int kHd = detail::kFlashHd;  // head size
constexpr int kTile = 64;          // rows of a streamed tile: keys (dQ pass) or queries (dK/dV pass)
constexpr int kStride = kHd + 8;   // smem row pitch in elements: 144 B, so ldmatrix rows hit distinct banks
constexpr int kQWarps = 4;         // dQ pass: 16 query rows per warp; kQWarps * 16 == kTile (diagonal logic)
constexpr int kQRows = kQWarps * 16;
constexpr int kKVWarps = 4;        // dK/dV pass: 16 keys per warp (4 or 8; 16 * kKVWarps a multiple of kTile)
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kQRows == kTile, "the dQ pass assumes query blocks and key tiles of the same size");
static_assert((16 * kKVWarps) % kTile == 0, "key blocks must start on a query-tile boundary");


// 2^x in one MUFU op (flushes results below 2^-126 to 0; P never needs those).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}


// Copies a 64 x 64 tile (rows row0.. of one head's section) into smem; rows >= rows_valid become 0.
// src is the tile's first row, which is always < T (a valid address).
template <int kThreads>
__device__ __forceinline__ void load_tile(bf16_t* dst, const bf16_t* src, int64_t row_pitch, int rows_valid) {
  for (int c = threadIdx.x; c < kTile * (kHd / 8); c += kThreads) {
    const int r = c >> 3, ch = c & 7;
    const bool ok = r < rows_valid;
    cp_async16(dst + r * kStride + ch * 8, ok ? src + r * row_pitch + ch * 8 : src, ok ? 16 : 0);
  }
}

// mma A fragments of a 16 x 64 bf16 block read straight from global memory (once per block): f[kk] covers
// columns kk*16 .. kk*16+15. p points at the block's first row; rows >= rows_valid read as 0 and are not
// dereferenced. Fragment layout (m16n8k16): a0 = (row g, cols 2tg..), a1 = (g+8, 2tg..), a2 = (g, 8+2tg..),
// a3 = (g+8, 8+2tg..).
__device__ __forceinline__ void load_afrag_global(uint32_t (&f)[4][4], const bf16_t* p, int64_t pitch, int rows_valid,
                                                  int g, int tg) {
  const bool ok0 = g < rows_valid, ok1 = g + 8 < rows_valid;
  const uint32_t* r0 = ok0 ? reinterpret_cast<const uint32_t*>(p + int64_t(g) * pitch + tg * 2) : nullptr;
  const uint32_t* r1 = ok1 ? reinterpret_cast<const uint32_t*>(p + int64_t(g + 8) * pitch + tg * 2) : nullptr;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {  // a u32 step is 2 elements: column kk*16 is word kk*8
    f[kk][0] = ok0 ? __ldg(r0 + kk * 8) : 0u;
    f[kk][1] = ok1 ? __ldg(r1 + kk * 8) : 0u;
    f[kk][2] = ok0 ? __ldg(r0 + kk * 8 + 4) : 0u;
    f[kk][3] = ok1 ? __ldg(r1 + kk * 8 + 4) : 0u;
  }
}

// Per-lane ldmatrix offsets (elements) inside a [64 x kStride] smem tile.
// B fragments where the mma N dimension runs along the tile's rows (non-transposed): for k-step kk and row
// pair np, registers (0,1) feed n-block 2np (rows np*16 + 0..7) and (2,3) n-block 2np+1 (rows +8..15).
__device__ __forceinline__ int boff_n(int lane) {
  return ((lane & 7) + ((lane >> 4) << 3)) * kStride + ((lane >> 3) & 1) * 8;
}
// B fragments where the mma K dimension runs along the tile's rows (transposed load): for k-step kk (rows
// kk*16..) and column pair dp, registers (0,1) feed n-block 2dp (cols dp*16 + 0..7), (2,3) n-block 2dp+1.
__device__ __forceinline__ int boff_t(int lane) {
  return ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
}

// Adds 16 x 64 f32 accumulators (times mul) into bf16 rows row0 + g, row0 + g + 8 of a [T, pitch] matrix.
__device__ __forceinline__ void add_rows_bf16(bf16_t* dst, int64_t pitch, int row0, int T, const float (&acc)[8][4],
                                              float mul, int g, int tg, bool add) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (row >= T) continue;
    bf16_t* drow = dst + int64_t(row) * pitch + tg * 2;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
      uint32_t* p = reinterpret_cast<uint32_t*>(drow + nb * 8);
      uint32_t old_bits = add ? *p : 0u;  // bf16 zero bits: a first write ignores what dst held
      const float2 old = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&old_bits));
      *p = pack_bf16(acc[nb][2 * r] * mul + old.x, acc[nb][2 * r + 1] * mul + old.y);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Pass 1: D and dQ. Grid (B*H, query blocks), longest rows first.
__global__ void __launch_bounds__(kQWarps * 32)
    flash_bwd_dq_kernel(const bf16_t* __restrict__ qkv, const bf16_t* __restrict__ out,
                        const bf16_t* __restrict__ dout, const float* __restrict__ lse, float* __restrict__ Dg,
                        bf16_t* __restrict__ dqkv, int T, int C, int H, float scale_log2, float scale, bool add) {
  constexpr int kThreads = kQWarps * 32;
  __shared__ alignas(16) bf16_t sK[2][kTile * kStride];
  __shared__ alignas(16) bf16_t sV[2][kTile * kStride];
  __shared__ float sD[kQRows];

  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int qt = int(gridDim.y) - 1 - int(blockIdx.y);
  const int q0 = qt * kQRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, tg = lane & 3;
  const int64_t pitch = 3 * int64_t(C);
  const bf16_t* base = qkv + int64_t(b) * T * pitch + h * kHd;        // q of row 0; k at +C, v at +2C
  const int64_t obase = int64_t(b) * T * C + h * kHd;                 // out / dout of row 0
  const int64_t lbase = int64_t(bh) * T;                              // lse / D of row 0

  load_tile<kThreads>(sK[0], base + C, pitch, T);
  load_tile<kThreads>(sV[0], base + 2 * C, pitch, T);
  cp_async_commit();

  // D = rowsum(dO o O) for the block's rows: two threads per row, 32 columns each (16-byte loads).
  {
    const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
    float d = 0.f;
    if (q0 + r < T) {
      const int64_t off = obase + int64_t(q0 + r) * C + half * 32;
      const uint4* po = reinterpret_cast<const uint4*>(out + off);
      const uint4* pd = reinterpret_cast<const uint4*>(dout + off);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint4 a = __ldg(po + k), bb = __ldg(pd + k);
        const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
        const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&bb);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 fa = __bfloat1622float2(a2[e]), fb = __bfloat1622float2(b2[e]);
          d = fmaf(fa.x, fb.x, d);
          d = fmaf(fa.y, fb.y, d);
        }
      }
    }
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    if (half == 0) {
      sD[r] = d;
      if (q0 + r < T) Dg[lbase + q0 + r] = d;
    }
  }

  // This warp's 16 query rows: Q and dO as A fragments, lse (log2 domain) and D per row g, g + 8.
  const int wq0 = q0 + warp * 16;
  uint32_t qf[4][4], dof[4][4];
  load_afrag_global(qf, base + int64_t(wq0) * pitch, pitch, T - wq0, g, tg);
  load_afrag_global(dof, dout + obase + int64_t(wq0) * C, C, T - wq0, g, tg);
  float lse2[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wq0 + g + 8 * r;
    lse2[r] = row < T ? lse[lbase + row] * kLog2e : INFINITY;  // rows past T: P = 0 (never stored anyway)
  }
  __syncthreads();  // sD
  const float Dr[2] = {sD[warp * 16 + g], sD[warp * 16 + g + 8]};

  float dq[8][4];
#pragma unroll
  for (int nb = 0; nb < 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nb][e] = 0.f;

  const int on = boff_n(lane), ot = boff_t(lane);
  const int n_tiles = qt + 1;  // key tiles 0 .. qt (kTile == kQRows)
  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {
      const int k0 = (j + 1) * kTile;
      load_tile<kThreads>(sK[buf ^ 1], base + C + int64_t(k0) * pitch, pitch, T - k0);
      load_tile<kThreads>(sV[buf ^ 1], base + 2 * C + int64_t(k0) * pitch, pitch, T - k0);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // S = Q K^T and dP = dO V^T, 16 rows x 64 keys each.
    float sc[8][4], dp[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nb][e] = dp[nb][e] = 0.f;
#pragma unroll
    for (int np = 0; np < 4; ++np) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t kb[4], vb[4];
        ldmatrix_x4(kb, sK[buf] + np * 16 * kStride + kk * 16 + on);
        mma_bf16(sc[2 * np], qf[kk], kb[0], kb[1]);
        mma_bf16(sc[2 * np + 1], qf[kk], kb[2], kb[3]);
        ldmatrix_x4(vb, sV[buf] + np * 16 * kStride + kk * 16 + on);
        mma_bf16(dp[2 * np], dof[kk], vb[0], vb[1]);
        mma_bf16(dp[2 * np + 1], dof[kk], vb[2], vb[3]);
      }
    }

    // dS = P o (dP - D), P = exp2(S * scale * log2 e - lse * log2 e), masked (key > query) on the diagonal.
    const bool diag = j == qt;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = wq0 + g + 8 * r;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = j * kTile + nb * 8 + tg * 2 + e;
          float p = exp2_approx(fmaf(sc[nb][2 * r + e], scale_log2, -lse2[r]));
          if (diag && col > row) p = 0.f;
          sc[nb][2 * r + e] = p * (dp[nb][2 * r + e] - Dr[r]);
        }
    }

    // dQ += dS K: dS's accumulator fragments are A fragments once packed; K^T tiles via transposed loads.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t da[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                              pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < 4; ++dd) {
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, sK[buf] + kk * 16 * kStride + dd * 16 + ot);
        mma_bf16(dq[2 * dd], da, kb[0], kb[1]);
        mma_bf16(dq[2 * dd + 1], da, kb[2], kb[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }

  add_rows_bf16(dqkv + int64_t(b) * T * pitch + h * kHd, pitch, wq0, T, dq, scale, g, tg, add);
}

// ------------------------------------------------------------------------------------------------
// Pass 2: dK and dV. Grid (B*H, key blocks of 16 * kWarps), longest (earliest keys) first.
template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    flash_bwd_dkdv_kernel(const bf16_t* __restrict__ qkv, const bf16_t* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ Dg, bf16_t* __restrict__ dqkv,
                          int T, int C, int H, float scale_log2, float scale, bool add) {
  constexpr int kThreads = kWarps * 32, kKeys = kWarps * 16;
  __shared__ alignas(16) bf16_t sQ[2][kTile * kStride];
  __shared__ alignas(16) bf16_t sO[2][kTile * kStride];  // dO tiles
  __shared__ alignas(16) float sL[2][kTile];             // lse of the tile's queries (0 past T)
  __shared__ alignas(16) float sD[2][kTile];             // D of the tile's queries (0 past T)

  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int k0 = int(blockIdx.y) * kKeys;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, tg = lane & 3;
  const int64_t pitch = 3 * int64_t(C);
  const bf16_t* base = qkv + int64_t(b) * T * pitch + h * kHd;  // q of row 0; k at +C, v at +2C
  const bf16_t* dobase = dout + int64_t(b) * T * C + h * kHd;
  const float* lse_h = lse + int64_t(bh) * T;
  const float* D_h = Dg + int64_t(bh) * T;

  auto prefetch = [&](int i, int buf) {  // query tile i: rows i*kTile .. (first row < T)
    const int qs = i * kTile;
    load_tile<kThreads>(sQ[buf], base + int64_t(qs) * pitch, pitch, T - qs);
    load_tile<kThreads>(sO[buf], dobase + int64_t(qs) * C, C, T - qs);
    for (int c = threadIdx.x; c < 2 * kTile; c += kThreads) {
      const int cc = c % kTile;
      const bool ok = qs + cc < T;
      const float* src = (c < kTile ? lse_h : D_h) + qs + (ok ? cc : 0);
      cp_async4(c < kTile ? &sL[buf][cc] : &sD[buf][cc], src, ok ? 4 : 0);
    }
  };

  const int i0 = k0 / kTile;                     // first query tile that sees a key of this block
  const int n_q_tiles = (T + kTile - 1) / kTile;
  const int n = n_q_tiles - i0;                  // >= 1: k0 < T
  prefetch(i0, 0);
  cp_async_commit();

  // This warp's 16 keys as A fragments of K and V.
  const int wk0 = k0 + warp * 16;
  uint32_t kf[4][4], vf[4][4];
  load_afrag_global(kf, base + C + int64_t(wk0) * pitch, pitch, T - wk0, g, tg);
  load_afrag_global(vf, base + 2 * C + int64_t(wk0) * pitch, pitch, T - wk0, g, tg);

  float dk[8][4], dv[8][4];
#pragma unroll
  for (int nb = 0; nb < 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nb][e] = dv[nb][e] = 0.f;

  const int on = boff_n(lane), ot = boff_t(lane);
  for (int it = 0; it < n; ++it) {
    const int buf = it & 1, qs = (i0 + it) * kTile;
    if (it + 1 < n) {
      prefetch(i0 + it + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // Skip (warp-uniform) when every key of this warp is after every query of the tile (only kWarps > 4).
    if (wk0 <= qs + kTile - 1) {
      // S^T = K Q^T and dP^T = V dO^T: 16 keys x 64 queries each.
      float st[8][4], dpt[8][4];
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nb][e] = dpt[nb][e] = 0.f;
#pragma unroll
      for (int np = 0; np < 4; ++np) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t qb[4], ob[4];
          ldmatrix_x4(qb, sQ[buf] + np * 16 * kStride + kk * 16 + on);
          mma_bf16(st[2 * np], kf[kk], qb[0], qb[1]);
          mma_bf16(st[2 * np + 1], kf[kk], qb[2], qb[3]);
          ldmatrix_x4(ob, sO[buf] + np * 16 * kStride + kk * 16 + on);
          mma_bf16(dpt[2 * np], vf[kk], ob[0], ob[1]);
          mma_bf16(dpt[2 * np + 1], vf[kk], ob[2], ob[3]);
        }
      }

      // P^T = exp2(S^T * scale * log2 e - lse[q] * log2 e); dS^T = P^T o (dP^T - D[q]). Masked where
      // key > query (tiles overlapping the block's keys) or query >= T (the last tile).
      const bool need_mask = qs < k0 + kKeys || qs + kTile > T;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        const int c = nb * 8 + tg * 2;  // tile column of element e = 0
        const float2 L = *reinterpret_cast<const float2*>(&sL[buf][c]);
        const float2 Dq = *reinterpret_cast<const float2*>(&sD[buf][c]);
        const float l2[2] = {L.x * kLog2e, L.y * kLog2e}, dq_[2] = {Dq.x, Dq.y};
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int key = wk0 + g + 8 * r;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int q = qs + c + e;
            float p = exp2_approx(fmaf(st[nb][2 * r + e], scale_log2, -l2[e]));
            if (need_mask && (key > q || q >= T)) p = 0.f;
            st[nb][2 * r + e] = p;
            dpt[nb][2 * r + e] = p * (dpt[nb][2 * r + e] - dq_[e]);
          }
        }
      }

      // dV += P^T dO and dK += dS^T Q: the k-dimension is the tile's queries (its rows), so dO and Q
      // come in as transposed B fragments.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t pa[4] = {pack_bf16(st[2 * kk][0], st[2 * kk][1]), pack_bf16(st[2 * kk][2], st[2 * kk][3]),
                                pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3])};
        const uint32_t da[4] = {pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]),
                                pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]),
                                pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
        for (int dd = 0; dd < 4; ++dd) {
          uint32_t ob[4], qb[4];
          ldmatrix_x4_trans(ob, sO[buf] + kk * 16 * kStride + dd * 16 + ot);
          mma_bf16(dv[2 * dd], pa, ob[0], ob[1]);
          mma_bf16(dv[2 * dd + 1], pa, ob[2], ob[3]);
          ldmatrix_x4_trans(qb, sQ[buf] + kk * 16 * kStride + dd * 16 + ot);
          mma_bf16(dk[2 * dd], da, qb[0], qb[1]);
          mma_bf16(dk[2 * dd + 1], da, qb[2], qb[3]);
        }
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }

  bf16_t* dbase = dqkv + int64_t(b) * T * pitch + h * kHd;
  add_rows_bf16(dbase + C, pitch, wk0, T, dk, scale, g, tg, add);
  add_rows_bf16(dbase + 2 * C, pitch, wk0, T, dv, 1.f, g, tg, add);
}

}  // namespace

bool flash_bwd_supported(const void* qkv, const void* out, const void* dout, const void* dqkv, int64_t C,
                         int64_t H) {
  return H > 0 && C == H * kHd && util::aligned16(qkv) && util::aligned16(out) && util::aligned16(dout) &&
         util::aligned_to(dqkv, 4);
}

void flash_bwd_bf16(const void* qkv, const void* out, const float* lse, const void* dout, void* dqkv, int64_t B,
                    int64_t T, int64_t C, int64_t H, bool accumulate, cudaStream_t s) {
  constexpr int kKeys = 16 * kKVWarps;
  const int64_t q_blocks = (T + kQRows - 1) / kQRows, k_blocks = (T + kKeys - 1) / kKeys;
  if (q_blocks > 65535 || B * H > INT32_MAX || T > INT32_MAX / 4 || 3 * C > INT32_MAX)
    throw std::invalid_argument("attention_bwd (flash): shape too large for the grid");
  const float scale_log2 = detail::flash_scale_log2();
  const float scale = detail::flash_scale();
  const auto* q = static_cast<const bf16_t*>(qkv);
  auto* dq = static_cast<bf16_t*>(dqkv);
  util::Scratch D(size_t(B * H * T) * sizeof(float));
  flash_bwd_dq_kernel<<<dim3(unsigned(B * H), unsigned(q_blocks)), kQWarps * 32, 0, s>>>(
      q, static_cast<const bf16_t*>(out), static_cast<const bf16_t*>(dout), lse, D.as<float>(), dq, int(T), int(C),
      int(H), scale_log2, scale, accumulate);
  CUDA_CHECK_LAUNCH();
  flash_bwd_dkdv_kernel<kKVWarps><<<dim3(unsigned(B * H), unsigned(k_blocks)), kKVWarps * 32, 0, s>>>(
      q, static_cast<const bf16_t*>(dout), lse, D.as<float>(), dq, int(T), int(C), int(H), scale_log2, scale,
      accumulate);
  CUDA_CHECK_LAUNCH();
}

}  // namespace deeplora::kernels::cuda::detail
