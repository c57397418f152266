#pragma once
// Zero-centred RMSNorm fused with the residual add (spec §2.1, §2.2), one block per row:
//   ADD_RESIDUAL:  h = bf16(x + residual), written back to residual   (the new residual stream)
//   otherwise:     h = x                                              (residual unused)
//   F32_RESIDUAL (with ADD_RESIDUAL): the residual stream is fp32 [rows, H] and h = x + residual
//                  is kept in fp32 (no rounding of the stream; the model runner uses this).
//   y = bf16( h * (1 / sqrt(mean(h^2) + eps)) * (1 + w) )              fp32 math
//   x [rows, H] bf16, residual [rows, H] bf16 (in/out), w [H] bf16 (the stored offset), y [rows, H] bf16.
// h is rounded to bf16 before it is normalized, as in PyTorch where the residual stream is a bf16
// tensor. 1/sqrtf (IEEE) rather than rsqrtf (approximate) keeps the result within rounding of the
// CPU reference. Also used per head (q_norm / k_norm over head_dim): rows = tokens * heads.
// Grid: (rows), block: THREADS; each thread keeps up to CHUNKS * 8 values in registers. H need only
// be a multiple of 8: when 8 * THREADS does not divide it, the last chunk is guarded.
#include "common.cuh"

template <int H, int THREADS, bool ADD_RESIDUAL, bool F32_RESIDUAL = false>
__global__ void __launch_bounds__(THREADS)
rmsnorm(const q35k::bf16* __restrict__ x,   // [rows, H]
        void* __restrict__ residual,        // [rows, H] bf16 (or fp32) in/out; unused unless ADD_RESIDUAL
        const q35k::bf16* __restrict__ w,   // [H]
        q35k::bf16* __restrict__ y,         // [rows, H]
        float eps) {
  static_assert(H % 8 == 0, "rmsnorm: H must be a multiple of 8 (16-byte vectors)");
  static_assert(ADD_RESIDUAL || !F32_RESIDUAL, "rmsnorm: an fp32 residual stream needs ADD_RESIDUAL");
  constexpr int CHUNKS = (H + 8 * THREADS - 1) / (8 * THREADS);  // 16-byte vectors per thread
  __shared__ float scratch[THREADS / 32];
  const size_t row = blockIdx.x;

  float h[CHUNKS][8];
  float sum_sq = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * THREADS + threadIdx.x) * 8;
    if (H % (8 * THREADS) != 0 && col >= H) {
#pragma unroll
      for (int i = 0; i < 8; ++i) h[c][i] = 0.f;
      continue;
    }
    q35k::unpack8(q35k::ld_global_16(x + row * H + col), h[c]);
    if constexpr (ADD_RESIDUAL && F32_RESIDUAL) {
      float4* r = reinterpret_cast<float4*>(static_cast<float*>(residual) + row * H + col);
      const float4 r0 = r[0], r1 = r[1];
      h[c][0] += r0.x, h[c][1] += r0.y, h[c][2] += r0.z, h[c][3] += r0.w;
      h[c][4] += r1.x, h[c][5] += r1.y, h[c][6] += r1.z, h[c][7] += r1.w;
      r[0] = make_float4(h[c][0], h[c][1], h[c][2], h[c][3]);
      r[1] = make_float4(h[c][4], h[c][5], h[c][6], h[c][7]);
    } else if constexpr (ADD_RESIDUAL) {
      q35k::bf16* res = static_cast<q35k::bf16*>(residual);
      float r[8];
      q35k::unpack8(q35k::ld_global_16(res + row * H + col), r);
#pragma unroll
      for (int i = 0; i < 8; ++i) h[c][i] += r[i];
      const uint4 packed = q35k::pack8(h[c]);
      q35k::st_global_16(res + row * H + col, packed);
      q35k::unpack8(packed, h[c]);  // continue from the rounded value
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sum_sq += h[c][i] * h[c][i];
  }
  const float inv_rms = 1.f / sqrtf(q35k::block_sum<THREADS>(sum_sq, scratch) / float(H) + eps);

#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * THREADS + threadIdx.x) * 8;
    if (H % (8 * THREADS) != 0 && col >= H) continue;
    float wf[8], out[8];
    q35k::unpack8(q35k::ld_global_16(w + col), wf);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = (h[c][i] * inv_rms) * (1.f + wf[i]);
    q35k::st_global_16(y + row * H + col, q35k::pack8(out));
  }
}
