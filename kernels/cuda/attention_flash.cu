// Fused causal attention forward for bf16, head size 64 (FlashAttention-2 style): a block owns 64 query
// rows of one head, streams 64-key tiles of K and V through shared memory (cp.async, double-buffered),
// keeps the softmax online in registers and multiplies with mma.sync m16n8k16 (bf16 in, f32 accumulate).
// Scores never reach global memory; lse is written for the (materializing) backward.
#include <cuda_bf16.h>

#include <climits>
#include <cstdint>
#include <stdexcept>

#include "kernels/cuda/attention_flash.cuh"
#include "kernels/cuda/flash_ptx.cuh"
#include "kernels/cuda_check.h"

namespace deeplora::kernels::cuda::detail {
namespace {
using namespace ptx;

using bf16_t = __nv_bfloat16;

constexpr int kHd = detail::kFlashHd;  // head size
constexpr int kBr = 64;        // query rows per block (16 per warp)
constexpr int kBc = 64;        // keys per tile
constexpr int kWarps = 4;
constexpr int kStride = kHd + 8;  // smem row pitch in elements: 144 B, so ldmatrix rows hit distinct banks


// Copies a 64 x 64 tile (rows row0.. of one head's q, k or v section) into smem; rows >= T become 0.
__device__ __forceinline__ void load_tile(bf16_t* dst, const bf16_t* src, int64_t row_pitch, int rows_valid) {
  for (int c = threadIdx.x; c < kBr * (kHd / 8); c += kWarps * 32) {
    const int r = c >> 3, ch = c & 7;
    const bool ok = r < rows_valid;
    cp_async16(dst + r * kStride + ch * 8, ok ? src + r * row_pitch + ch * 8 : src, ok ? 16 : 0);
  }
}

__global__ void __launch_bounds__(kWarps * 32)
    flash_fwd_kernel(const bf16_t* __restrict__ qkv, bf16_t* __restrict__ out, float* __restrict__ lse, int T, int C,
                     int H, float scale_log2) {
  __shared__ alignas(16) bf16_t sQ[kBr * kStride];
  __shared__ alignas(16) bf16_t sK[2][kBc * kStride];
  __shared__ alignas(16) bf16_t sV[2][kBc * kStride];

  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int qt = int(gridDim.y) - 1 - int(blockIdx.y);  // longest rows first: better tail balance
  const int q0 = qt * kBr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, tg = lane & 3;  // mma fragment row group and thread-in-group
  const int64_t pitch = 3 * int64_t(C);
  const bf16_t* base = qkv + int64_t(b) * T * pitch + h * kHd;  // q of row 0; k at +C, v at +2C

  load_tile(sQ, base + int64_t(q0) * pitch, pitch, T - q0);
  load_tile(sK[0], base + C, pitch, T);
  load_tile(sV[0], base + 2 * C, pitch, T);
  cp_async_commit();

  uint32_t qf[4][4];  // this warp's 16 query rows as A fragments, for the 4 k-steps of hd
  float o[8][4];      // 16 x 64 output accumulator: 8 blocks of 8 columns
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8
#pragma unroll
  for (int nb = 0; nb < 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nb][e] = 0.f;

  const int n_tiles = qt + 1;
  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {
      const int k0 = (j + 1) * kBc;
      load_tile(sK[buf ^ 1], base + C + int64_t(k0) * pitch, pitch, T - k0);
      load_tile(sV[buf ^ 1], base + 2 * C + int64_t(k0) * pitch, pitch, T - k0);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        ldmatrix_x4(qf[kk], sQ + (warp * 16 + (lane & 15)) * kStride + kk * 16 + (lane >> 4) * 8);
    }

    // S = Q K^T for 16 rows x 64 keys.
    float sc[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nb][e] = 0.f;
#pragma unroll
    for (int np = 0; np < 4; ++np) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sK[buf] + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * kStride + kk * 16 +
                            ((lane >> 3) & 1) * 8);
        mma_bf16(sc[2 * np], qf[kk], kb[0], kb[1]);
        mma_bf16(sc[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // Scale into the log2 domain, mask the diagonal tile, update the running max and sums.
    const bool diag = j == qt;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = q0 + warp * 16 + g + 8 * r;
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = j * kBc + nb * 8 + tg * 2 + e;
          float v = sc[nb][2 * r + e] * scale_log2;
          if (diag && col > row) v = -INFINITY;
          sc[nb][2 * r + e] = v;
          mx = fmaxf(mx, v);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);  // finite: key 0 is in every row's first tile
      const float alpha = exp2f(m[r] - m_new);
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2f(sc[nb][2 * r + e] - m_new);
          sc[nb][2 * r + e] = p;
          sum += p;
        }
      l[r] = l[r] * alpha + sum;  // per-thread partial; the 4 threads of a row are summed at the end
      m[r] = m_new;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        o[nb][2 * r] *= alpha;
        o[nb][2 * r + 1] *= alpha;
      }
    }

    // O += P V: P's accumulator fragments are already A fragments once packed to bf16.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                              pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < 4; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV[buf] + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + dp * 16 +
                                  (lane >> 4) * 8);
        mma_bf16(o[2 * dp], pa, vb[0], vb[1]);
        mma_bf16(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }

  constexpr float kLn2 = 0.693147180559945309f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float lt = l[r];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    const int row = q0 + warp * 16 + g + 8 * r;
    if (row >= T) continue;
    const float inv = 1.f / lt;
    bf16_t* orow = out + (int64_t(b) * T + row) * C + h * kHd;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
      *reinterpret_cast<uint32_t*>(orow + nb * 8 + tg * 2) = pack_bf16(o[nb][2 * r] * inv, o[nb][2 * r + 1] * inv);
    if (tg == 0) lse[int64_t(bh) * T + row] = m[r] * kLn2 + logf(lt);
  }
}

}  // namespace

bool flash_fwd_supported(const void* qkv, const void* out, int64_t C, int64_t H) {
  return H > 0 && C == H * kHd && reinterpret_cast<uintptr_t>(qkv) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 4 == 0;
}

void flash_fwd_bf16(const void* qkv, void* out, float* lse, int64_t B, int64_t T, int64_t C, int64_t H,
                    cudaStream_t s) {
  const int64_t q_tiles = (T + kBr - 1) / kBr;
  if (q_tiles > 65535 || B * H > INT32_MAX || T > INT32_MAX || 3 * C > INT32_MAX)
    throw std::invalid_argument("attention_fwd (flash): shape too large for the grid");
  const float scale_log2 = detail::flash_scale_log2();
  dim3 grid(unsigned(B * H), unsigned(q_tiles));
  flash_fwd_kernel<<<grid, kWarps * 32, 0, s>>>(static_cast<const bf16_t*>(qkv), static_cast<bf16_t*>(out), lse,
                                                int(T), int(C), int(H), scale_log2);
  CUDA_CHECK_LAUNCH();
}

}  // namespace deeplora::kernels::cuda::detail
