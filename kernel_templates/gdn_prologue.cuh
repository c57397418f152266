#pragma once
// Gated DeltaNet prologue for T tokens (spec §2.4 steps 3-6): causal depthwise conv1d + SiLU over
// the qkv columns of the fused projection, continuing from the ring conv state (gdn_common.cuh),
// then per head: q, k L2-normalised in fp32 (x * rsqrt(sum x^2 + 1e-6)), q scaled by DK^-0.5;
// v passes; gates g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b).
//   proj  [T, row_stride] bf16, columns [qkv (C = 2*HK*DK + HV*DV, flat q | k | v) | z (HV*DV) | b (HV) | a (HV)]
//         (row_stride a multiple of 4: rows are read as 8-byte pieces)
//   conv_w [C, KC] bf16; A_log, dt_bias [HV] fp32; ring [KC, C] bf16 (in/out); pos0 [1] int32 (device)
//   qkv_out [T, C] bf16 (q | k | v as in proj, after conv/activation/normalisation)
//   g, beta [T, HV] fp32
// Grid: (ceil(C / 8 / (32 WARPS)) + 1, ceil(T / TOKENS)), block WARPS warps. A thread owns 8
// adjacent channels and TOKENS consecutive tokens: their inputs are loaded up front (all in
// flight at once), the conv slides a KC-token window in registers, and a head's DK / 8 lanes
// reduce the L2 norm by shuffles. The last x block computes the gates of its tokens.
// Threads of the first token tile are the only ring readers (TOKENS >= KC - 1); each then writes
// the ring slots of its own 8 channels, after its own reads, so no other thread touches them.
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
  constexpr int C = 2 * HK * DK + HV * DV, G = C / 8;  // groups of 8 channels
  static_assert((DK == 128 || DK == 256) && DV % 128 == 0, "gdn_prologue: DK must be 128 or 256, DV a multiple of 128");
  static_assert(TOKENS >= KC - 1, "gdn_prologue: TOKENS must cover the KC-1 tokens that read the ring");
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int t0 = blockIdx.y * TOKENS, n = min(TOKENS, T - t0);
  const int pos0 = *pos0_ptr;

  if (blockIdx.x == gridDim.x - 1) {  // gates
    for (int idx = threadIdx.x; idx < n * HV; idx += WARPS * 32) {
      const int t = t0 + idx / HV, h = idx % HV;
      const q35k::bf16* row = proj + size_t(t) * row_stride + C + HV * DV;  // b [HV] | a [HV]
      g_out[size_t(t) * HV + h] = q35k::gdn_log_decay(q35k::bf16_to_f32(row[HV + h]), A_log[h], dt_bias[h]);
      beta_out[size_t(t) * HV + h] = q35k::gdn_sigmoid(q35k::bf16_to_f32(row[h]));
    }
    return;
  }

  // Threads past the last group compute on group G - 1 (the shuffles need every lane) and store nothing.
  const int grp = blockIdx.x * WARPS * 32 + threadIdx.x;
  const bool valid = grp < G;
  const int c = (valid ? grp : G - 1) * 8;  // first channel
  const bool is_qk = c < 2 * HK * DK;
  const float scale = c < HK * DK ? rsqrtf(float(DK)) : 1.f;

  // 16-byte loads where every proj row is 16-byte aligned (the model's and the tests' strides), else
  // two 8-byte loads (row_stride a multiple of 4). The ring rows (C a multiple of 8) always are.
  const bool vec16 = row_stride % 8 == 0 && reinterpret_cast<size_t>(proj) % 16 == 0;
  auto load8 = [](const q35k::bf16* p, q35k::u32 (&r)[4], bool v16) {
    if (v16) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
    } else {
      const uint2 lo = *reinterpret_cast<const uint2*>(p), hi = *reinterpret_cast<const uint2*>(p + 4);
      r[0] = lo.x; r[1] = lo.y; r[2] = hi.x; r[3] = hi.y;
    }
  };
  auto unpack = [](const q35k::u32 (&r)[4], int e) { return e % 2 ? q35k::bf16x2_hi(r[e / 2]) : q35k::bf16x2_lo(r[e / 2]); };

  // Inputs (bf16 pairs): x[s] is token t0 - (KC - 1) + s, s < KC - 1 from the ring when before this call.
  q35k::u32 x[TOKENS + KC - 1][4];
#pragma unroll
  for (int s = 0; s < TOKENS + KC - 1; ++s) {
    const int t = t0 - (KC - 1) + s;
    if (t >= 0 && t < t0 + n) load8(proj + size_t(t) * row_stride + c, x[s], vec16);
    else if (t < 0) load8(ring + size_t(q35k::gdn_ring_slot<KC>(pos0 + t)) * C + c, x[s], true);
    else x[s][0] = x[s][1] = x[s][2] = x[s][3] = 0u;
  }
  float w[8][KC];  // conv_w rows c .. c + 7: 8 KC contiguous bf16, 16-byte aligned (c a multiple of 8)
#pragma unroll
  for (int v = 0; v < KC; ++v) {
    const uint4 p = *reinterpret_cast<const uint4*>(conv_w + size_t(c) * KC + 8 * v);
    const q35k::u32 pw[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int h = 0; h < 8; ++h) {
      const int f = 8 * v + h;  // flat index e KC + d
      w[f / KC][f % KC] = h % 2 ? q35k::bf16x2_hi(pw[h / 2]) : q35k::bf16x2_lo(pw[h / 2]);
    }
  }

#pragma unroll
  for (int i = 0; i < TOKENS; ++i) {
    if (i >= n) break;  // uniform across the block
    float y[8];
    float sum_sq = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float acc = 0.f;
#pragma unroll
      for (int d = 0; d < KC; ++d) acc += w[e][d] * unpack(x[i + d], e);
      y[e] = __fdividef(acc, 1.f + __expf(-acc));  // silu; fast forms (rel. error ~1e-6 << bf16's 4e-3)
      sum_sq += y[e] * y[e];
    }
#pragma unroll
    for (int off = DK / 16; off >= 1; off /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, off);
    const float inv = is_qk ? 1.f / sqrtf(sum_sq + 1e-6f) * scale : 1.f;
    if (valid)
      *reinterpret_cast<uint4*>(qkv_out + size_t(t0 + i) * C + c) =
          make_uint4(q35k::f32x2_to_bf16x2(y[0] * inv, y[1] * inv), q35k::f32x2_to_bf16x2(y[2] * inv, y[3] * inv),
                     q35k::f32x2_to_bf16x2(y[4] * inv, y[5] * inv), q35k::f32x2_to_bf16x2(y[6] * inv, y[7] * inv));
  }

  if (blockIdx.y == 0 && valid)  // this thread's ring reads are done: store the inputs the next call needs
    for (int t = max(0, T - (KC - 1)); t < T; ++t) {
      const q35k::bf16* src = proj + size_t(t) * row_stride + c;
      q35k::bf16* dst = ring + size_t(q35k::gdn_ring_slot<KC>(pos0 + t)) * C + c;
      *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
      *reinterpret_cast<uint2*>(dst + 4) = *reinterpret_cast<const uint2*>(src + 4);
    }
}
