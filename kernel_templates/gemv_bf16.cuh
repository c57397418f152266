#pragma once
// bf16 GEMV for few tokens: y[t, n] = bf16( sum_k x[t, k] * W[n, k] ), fp32 accumulation.
//   W [N, K] bf16 (a torch Linear weight, row-major), x [T, K] bf16, y [T, N] bf16 (gemv_bf16_f32: fp32,
//   the lm_head's logits); K % 8 == 0, W and x 16-byte aligned.
// Tiling: a block has WARPS warps; each warp owns ROWS_PER_WARP consecutive rows of W and computes
// them for M_TILE tokens at once, so every weight byte is read once per M_TILE tokens. A lane reads
// 16-byte vectors (8 values) at k = lane*8 + 256*i, weights with the streaming load (read once,
// kept out of L1) and activations with the normal load (re-read by every block, served by L1/L2).
// Partial sums are reduced across the warp with shuffles at the end.
// Grid: (ceil(N / (WARPS * ROWS_PER_WARP)), ceil(T / M_TILE)), block: WARPS * 32.
#include "common.cuh"

namespace q35k {

template <int N, int K, int M_TILE, int ROWS_PER_WARP, int WARPS, bool OUT_F32>
__device__ __forceinline__ void gemv_bf16_body(const bf16* __restrict__ W, const bf16* __restrict__ x,
                                               void* __restrict__ y, int T) {
  static_assert(K % 8 == 0, "gemv_bf16: K must be a multiple of 8 (16-byte rows)");
  static_assert(M_TILE >= 1 && ROWS_PER_WARP >= 1 && M_TILE * ROWS_PER_WARP <= 64,
                "gemv_bf16: M_TILE * ROWS_PER_WARP accumulators per lane must be in [1, 64]");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n0 = (blockIdx.x * WARPS + warp) * ROWS_PER_WARP;
  const int t0 = blockIdx.y * M_TILE;
  if (n0 >= N) return;  // whole warp past the last row (N not a multiple of the block's rows)

  // Rows / tokens past the end are clamped for loading (no branch in the loop) and not stored.
  const q35k::bf16* w_row[ROWS_PER_WARP];
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) w_row[r] = W + size_t(min(n0 + r, N - 1)) * K;
  const q35k::bf16* x_row[M_TILE];
#pragma unroll
  for (int m = 0; m < M_TILE; ++m) x_row[m] = x + size_t(min(t0 + m, T - 1)) * K;

  float acc[M_TILE][ROWS_PER_WARP] = {};
#pragma unroll 4
  for (int k = lane * 8; k < K; k += 32 * 8) {
    float wf[ROWS_PER_WARP][8];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) q35k::unpack8(q35k::ld_stream_16(w_row[r] + k), wf[r]);
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) {
      float xf[8];
      q35k::unpack8(q35k::ld_global_16(x_row[m] + k), xf);
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m][r] += xf[i] * wf[r][i];
    }
  }

#pragma unroll
  for (int m = 0; m < M_TILE; ++m)
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      const float sum = q35k::warp_sum(acc[m][r]);
      // Spread the stores over the lanes.
      if (lane == (m * ROWS_PER_WARP + r) % 32 && t0 + m < T && n0 + r < N) {
        const size_t at = size_t(t0 + m) * N + n0 + r;
        if constexpr (OUT_F32)
          static_cast<float*>(y)[at] = sum;
        else
          static_cast<q35k::bf16*>(y)[at] = q35k::f32_to_bf16(sum);
      }
    }
}

}  // namespace q35k

template <int N, int K, int M_TILE, int ROWS_PER_WARP, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
gemv_bf16(const q35k::bf16* __restrict__ W,  // [N, K]
          const q35k::bf16* __restrict__ x,  // [T, K]
          q35k::bf16* __restrict__ y,        // [T, N]
          int T) {
  q35k::gemv_bf16_body<N, K, M_TILE, ROWS_PER_WARP, WARPS, false>(W, x, y, T);
}

// The same with fp32 output (the lm_head's logits).
template <int N, int K, int M_TILE, int ROWS_PER_WARP, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
gemv_bf16_f32(const q35k::bf16* __restrict__ W,  // [N, K]
              const q35k::bf16* __restrict__ x,  // [T, K]
              float* __restrict__ y,             // [T, N]
              int T) {
  q35k::gemv_bf16_body<N, K, M_TILE, ROWS_PER_WARP, WARPS, true>(W, x, y, T);
}
