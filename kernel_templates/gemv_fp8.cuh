#pragma once
// FP8 GEMV for few tokens (decode), W8A16: y[t, n] = sum_b s[n, b] * sum_{k in block b} fp8(c[n, k]) * x[t, k]
//   codes uint8 e4m3 [N, K] and scales fp32 [N, ceil(K / 128)] (runtime/core/fp8_format.h), x [T, K]
//   bf16, y [T, N] bf16 (or fp32 logits if OUT_F32). K % 64 == 0.
// The W4A16 GEMV's body (gemv_w4a16.cuh, weight format G = kFp8): per 128-k tile a lane loads 32
// codes (two 16-byte vectors) of each of its two rows, turns them into exact bf16 mma operands
// (fp8.cuh: cvt e4m3x2 -> f16x2 on sm_89+, a bit-placement path below) and scales each 128-k block's
// fp32 sum once. gemv_fp8_residual: with the decode residual add + RMSNorm epilogue (decode_fusion.cuh).
// Grid: (ceil(N / (16 * ROW_WARPS)), ceil(T / M_TILE)), block 32 * ROW_WARPS * K_WARPS.
#include "gemv_w4a16.cuh"

template <int N, int K, int M_TILE, int ROW_WARPS, int K_WARPS, int UNROLL, bool OUT_F32>
__global__ void __launch_bounds__(ROW_WARPS * K_WARPS * 32)
gemv_fp8(const unsigned char* __restrict__ codes,  // [N, K]
         const float* __restrict__ scales,         // [N, ceil(K / 128)]
         const q35k::bf16* __restrict__ x,         // [T, K]
         void* __restrict__ y,                     // [T, N] bf16, or fp32 if OUT_F32
         int T) {
  const q35k::GemvInputRows<K> in{x};
  q35k::gemv_quant_block<N, K, q35k::kFp8, M_TILE, ROW_WARPS, K_WARPS, UNROLL>(
      codes, scales, in, T, [&](int t, int n, float v) { q35k::gemv_store<N, OUT_F32>(y, t, n, v); });
}

// residual fp32 [T, N] += bf16(y), then the last block writes normed [T, N] bf16 = RMSNorm(residual)
// with norm_w [N] bf16; counter int32 [1], zero between launches.
template <int N, int K, int M_TILE, int ROW_WARPS, int K_WARPS, int UNROLL>
__global__ void __launch_bounds__(ROW_WARPS * K_WARPS * 32)
gemv_fp8_residual(const unsigned char* __restrict__ codes, const float* __restrict__ scales,
                  const q35k::bf16* __restrict__ x, float* residual, const q35k::bf16* __restrict__ norm_w,
                  q35k::bf16* __restrict__ normed, int* counter, float eps, int T) {
  const q35k::GemvInputRows<K> in{x};
  q35k::gemv_quant_block<N, K, q35k::kFp8, M_TILE, ROW_WARPS, K_WARPS, UNROLL>(
      codes, scales, in, T, [&](int t, int n, float v) { q35k::residual_add_bf16(residual, size_t(t) * N + n, v); });
  q35k::residual_rmsnorm_last_block<N, ROW_WARPS * K_WARPS * 32>(residual, norm_w, normed, counter, eps, T);
}
