#pragma once
// W4A16 GEMV for few tokens (decode): y[t, n] = sum_g s[n, g] * sum_{k in g} q[n, k] * x[t, k].
//   qweight u32 [N, K / 8] and scales bf16 [N, K / G] in the runtime/core/int4_format.h layout,
//   x [T, K] bf16, y [T, N] bf16 (or fp32 logits if OUT_F32). K % 32 == 0, G in {32, 64, 128}.
// Work split: a lane handles 32 consecutive k ("chunk": one 16-byte load of 4 words per row,
// always inside one group since G >= 32) for ROWS rows and M_TILE tokens. A warp owns ROWS rows;
// the K_WARPS warps of a row set stride over the chunks of K (split-K inside the block, reduced in
// shared memory in a fixed order), ROW_WARPS row sets sit side by side.
// Dequant: a nibble u = q + 8 is OR-ed into the mantissa of 128.0f (0x43000000 | u << 16 = 128 + u,
// one shift + one lop3 per value), so a chunk's partial sum is P = sum (128 + u) x and
// sum q x = P - 136 * sum x. The group scale multiplies each chunk's exact-order fp32 partial once.
// Weights are streamed (ld.global.nc.L1::no_allocate), activations take the normal cached path.
// Grid: (ceil(N / (ROWS * ROW_WARPS)), ceil(T / M_TILE)), block 32 * ROW_WARPS * K_WARPS.
#include "common.cuh"

template <int N, int K, int G, int M_TILE, int ROWS, int ROW_WARPS, int K_WARPS, bool OUT_F32>
__global__ void __launch_bounds__(ROW_WARPS * K_WARPS * 32)
gemv_w4a16(const q35k::u32* __restrict__ qweight,  // [N, K / 8]
           const q35k::bf16* __restrict__ scales,  // [N, K / G]
           const q35k::bf16* __restrict__ x,       // [T, K]
           void* __restrict__ y,                   // [T, N] bf16, or fp32 if OUT_F32
           int T) {
  using namespace q35k;
  static_assert(G == 32 || G == 64 || G == 128, "gemv_w4a16: group size must be 32, 64 or 128");
  static_assert(K % G == 0, "gemv_w4a16: K must be a multiple of the group size");
  static_assert(M_TILE >= 1 && ROWS >= 1 && M_TILE * ROWS <= 32,
                "gemv_w4a16: M_TILE * ROWS accumulators per lane must be in [1, 32]");
  constexpr int CHUNKS = K / 32;  // 32-k chunks per row
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row_warp = warp / K_WARPS, k_warp = warp % K_WARPS;
  const int n0 = (blockIdx.x * ROW_WARPS + row_warp) * ROWS;
  const int t0 = blockIdx.y * M_TILE;

  // Rows / tokens past the end are clamped for loading (no branch in the loop) and not stored.
  const u32* w_row[ROWS];
  const bf16* s_row[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int n = min(n0 + r, N - 1);
    w_row[r] = qweight + size_t(n) * (K / 8);
    s_row[r] = scales + size_t(n) * (K / G);
  }
  const bf16* x_row[M_TILE];
#pragma unroll
  for (int m = 0; m < M_TILE; ++m) x_row[m] = x + size_t(min(t0 + m, T - 1)) * K;

  float acc[M_TILE][ROWS] = {};
#pragma unroll 2
  for (int c = k_warp * 32 + lane; c < CHUNKS; c += 32 * K_WARPS) {
    uint4 wv[ROWS];
    float s[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      wv[r] = ld_stream_16(w_row[r] + c * 4);
      s[r] = bf16_to_f32(s_row[r][c * 32 / G]);
    }
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) {
      float part[ROWS] = {}, sx = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // word i: k = 32c + 8i .. 32c + 8i + 7
        float xf[8];
        unpack8(ld_global_16(x_row[m] + c * 32 + i * 8), xf);
#pragma unroll
        for (int j = 0; j < 8; ++j) sx += xf[j];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const u32 w = i == 0 ? wv[r].x : i == 1 ? wv[r].y : i == 2 ? wv[r].z : wv[r].w;
#pragma unroll
          for (int p = 0; p < 4; ++p) {  // nibbles r = 2p (slot p) and r = 2p + 1 (slot p + 4)
            const float lo = __uint_as_float(((w << (16 - 4 * p)) & 0x000f0000u) | 0x43000000u);
            const float hi = __uint_as_float(((w >> (4 * p)) & 0x000f0000u) | 0x43000000u);
            part[r] += lo * xf[2 * p] + hi * xf[2 * p + 1];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[m][r] += s[r] * (part[r] - 136.f * sx);
    }
  }

#pragma unroll
  for (int m = 0; m < M_TILE; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[m][r] = warp_sum(acc[m][r]);

  if constexpr (K_WARPS > 1) {
    __shared__ float partial[ROW_WARPS][K_WARPS][M_TILE * ROWS];
    if (lane == 0)
#pragma unroll
      for (int m = 0; m < M_TILE; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) partial[row_warp][k_warp][m * ROWS + r] = acc[m][r];
    __syncthreads();
    if (k_warp != 0) return;
#pragma unroll
    for (int m = 0; m < M_TILE; ++m)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float v = 0.f;
#pragma unroll
        for (int kw = 0; kw < K_WARPS; ++kw) v += partial[row_warp][kw][m * ROWS + r];
        acc[m][r] = v;
      }
  }

  if (n0 >= N) return;
#pragma unroll
  for (int m = 0; m < M_TILE; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      // Spread the stores over the lanes.
      if (lane == (m * ROWS + r) % 32 && t0 + m < T && n0 + r < N) {
        const size_t at = size_t(t0 + m) * N + n0 + r;
        if constexpr (OUT_F32)
          static_cast<float*>(y)[at] = acc[m][r];
        else
          static_cast<bf16*>(y)[at] = f32_to_bf16(acc[m][r]);
      }
}
