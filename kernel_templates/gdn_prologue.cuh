#pragma once
// Gated DeltaNet prologue for T tokens (spec §2.4 steps 3-6): causal depthwise conv1d + SiLU over
// the qkv columns of the fused projection, continuing from the ring conv state (gdn_common.cuh),
// then per head: q, k L2-normalised in fp32 (x * rsqrt(sum x^2 + 1e-6)), q scaled by DK^-0.5;
// v passes; gates g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b).
//   proj  [T, row_stride] bf16, columns [qkv (C = 2*HK*DK + HV*DV, flat q | k | v) | z (HV*DV) | b (HV) | a (HV)]
//   conv_w [C, KC] bf16; A_log, dt_bias [HV] fp32; ring [KC, C] bf16 (in/out); pos0 [1] int32 (device)
//   qkv_out [T, C] bf16 (q | k | v as in proj, after conv/activation/normalisation)
//   g, beta [T, HV] fp32
// Grid: (ceil(T / TOKENS), 2*HK + HV + 1): y picks one q head, k head or v head (its DK or DV
// channels), the last y computes the gates. Block: WARPS warps; a warp owns a token, its lanes the
// head's channels (lane + 32 i: coalesced), so the L2 norm is a warp reduction.
// Blocks with x == 0 hold the first KC-1 tokens, the only ones that read the ring; they also write
// its new slots after a barrier, so no other block ever touches the ring.
#include "gdn_common.cuh"

template <int HK, int HV, int DK, int DV, int KC, int TOKENS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
gdn_prologue(const q35k::bf16* __restrict__ proj, int row_stride, int T,
             const q35k::bf16* __restrict__ conv_w,  // [C, KC]
             const float* __restrict__ A_log,        // [HV]
             const float* __restrict__ dt_bias,      // [HV]
             q35k::bf16* ring,                       // [KC, C]
             const int* __restrict__ pos0_ptr,       // [1]
             q35k::bf16* __restrict__ qkv_out,       // [T, C]
             float* __restrict__ g_out,              // [T, HV]
             float* __restrict__ beta_out) {         // [T, HV]
  constexpr int C = 2 * HK * DK + HV * DV;
  static_assert(DK % 32 == 0 && DV % 32 == 0, "gdn_prologue: head dims must be multiples of 32");
  static_assert(TOKENS >= KC - 1, "gdn_prologue: TOKENS must cover the KC-1 tokens that read the ring");
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int t0 = blockIdx.x * TOKENS, t1 = min(T, t0 + TOKENS);
  const int group = blockIdx.y;
  const int pos0 = *pos0_ptr;

  if (group == 2 * HK + HV) {  // gates
    for (int t = t0 + warp; t < t1; t += WARPS)
      for (int h = lane; h < HV; h += 32) {
        const q35k::bf16* row = proj + size_t(t) * row_stride + C + HV * DV;  // b [HV] | a [HV]
        g_out[size_t(t) * HV + h] = q35k::gdn_log_decay(q35k::bf16_to_f32(row[HV + h]), A_log[h], dt_bias[h]);
        beta_out[size_t(t) * HV + h] = q35k::gdn_sigmoid(q35k::bf16_to_f32(row[h]));
      }
    return;
  }

  const bool is_q = group < HK, is_qk = group < 2 * HK;
  const int c0 = is_qk ? group * DK : 2 * HK * DK + (group - 2 * HK) * DV;  // first channel of the head
  constexpr int PER_MAX = (DK > DV ? DK : DV) / 32;
  const int per = (is_qk ? DK : DV) / 32;  // channels per lane
  const float scale = is_q ? rsqrtf(float(DK)) : 1.f;

  for (int t = t0 + warp; t < t1; t += WARPS) {
    float y[PER_MAX];
    float sum_sq = 0.f;
#pragma unroll
    for (int i = 0; i < PER_MAX; ++i) {
      if (i >= per) break;
      y[i] = q35k::gdn_conv_silu<C, KC>(proj, row_stride, ring, conv_w, pos0, t, c0 + lane + 32 * i);
      sum_sq += y[i] * y[i];
    }
    const float inv = is_qk ? 1.f / sqrtf(q35k::warp_sum(sum_sq) + 1e-6f) * scale : 1.f;
#pragma unroll
    for (int i = 0; i < PER_MAX; ++i) {
      if (i >= per) break;
      qkv_out[size_t(t) * C + c0 + lane + 32 * i] = q35k::f32_to_bf16(y[i] * inv);
    }
  }

  if (blockIdx.x == 0) {
    __syncthreads();  // every ring read of this block is done
    const int first = max(0, T - (KC - 1));  // tokens whose inputs the next call needs
    const int channels = is_qk ? DK : DV;
    for (int i = threadIdx.x; i < (T - first) * channels; i += WARPS * 32) {
      const int t = first + i / channels, c = c0 + i % channels;
      ring[size_t(q35k::gdn_ring_slot<KC>(pos0 + t)) * C + c] = proj[size_t(t) * row_stride + c];
    }
  }
}
