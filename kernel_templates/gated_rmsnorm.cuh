#pragma once
// GDN output norm (Qwen3_5MoeRMSNormGated, spec §2.4 step 9), per value head over DV:
//   y = bf16( o * (1 / sqrt(mean(o^2) + eps)) * w * silu(z) )     fp32 math
//   o [T, HV, DV] fp32 (gdn_decode / gdn_recurrent / gdn_chunk_state output)
//   z [T, z_stride] bf16, head h at columns [h DV, (h+1) DV) (the z columns of the fused projection)
//   w [DV] bf16 (plain weight), y [T, HV*DV] bf16 (feeds out_proj).
// Grid: (T, HV / HEADS), block: HEADS warps, a warp per head (gated_rmsnorm_head). The same
// per-head code (GatedRmsnormHead) runs in the last block of a head of gdn_decode_norm and
// gdn_decode_batch, and in every block of gemv_w4a16_gated for its input; a lane holds float4
// groups at 128 m + 4 lane.
#include "common.cuh"

namespace q35k {

// The lane's norm weights w [DV] bf16 (at 128 m + 4 lane ..), loadable ahead of the head's data.
template <int DV>
struct GatedRmsnormWeights {
  static_assert(DV % 128 == 0, "gated_rmsnorm: DV must be a multiple of 128");
  uint2 w[DV / 128];
  __device__ __forceinline__ void load(const bf16* __restrict__ wp) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int m = 0; m < DV / 128; ++m) w[m] = *reinterpret_cast<const uint2*>(wp + 128 * m + 4 * lane);
  }
};

// One value head, by one warp, in two steps so that a caller can issue the loads of several heads
// before the math of the first (gemv_w4a16_gated): load() takes the lane's o (float4 groups at
// 128 m + 4 lane, read through L2: gdn_decode_norm's last block of a head reads what the head's other
// blocks wrote) and z; store() writes yh [DV] = bf16(oh * inv_rms(oh) * w * silu(zh)) through any
// pointer (global, or shared memory in gemv_w4a16_gated). Every path to y runs this arithmetic.
template <int DV>
struct GatedRmsnormHead {
  static constexpr int M = DV / 128;
  float x[M][4];
  uint2 z[M];

  __device__ __forceinline__ void load(const float* oh, const bf16* __restrict__ zh) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float4 f = __ldcg(reinterpret_cast<const float4*>(oh + 128 * m + 4 * lane));
      x[m][0] = f.x; x[m][1] = f.y; x[m][2] = f.z; x[m][3] = f.w;
      z[m] = *reinterpret_cast<const uint2*>(zh + 128 * m + 4 * lane);
    }
  }

  __device__ __forceinline__ void store(const GatedRmsnormWeights<DV>& w, bf16* yh, float eps) const {
    const int lane = threadIdx.x % 32;
    float ss = 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) ss += x[m][e] * x[m][e];
    const float inv = 1.f / sqrtf(warp_sum(ss) / float(DV) + eps);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int c = 128 * m + 4 * lane;
      const float zf[4] = {bf16x2_lo(z[m].x), bf16x2_hi(z[m].x), bf16x2_lo(z[m].y), bf16x2_hi(z[m].y)};
      const float wf[4] = {bf16x2_lo(w.w[m].x), bf16x2_hi(w.w[m].x), bf16x2_lo(w.w[m].y), bf16x2_hi(w.w[m].y)};
      float r[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) r[e] = x[m][e] * inv * wf[e] * (zf[e] / (1.f + expf(-zf[e])));
      *reinterpret_cast<uint2*>(yh + c) = make_uint2(f32x2_to_bf16x2(r[0], r[1]), f32x2_to_bf16x2(r[2], r[3]));
    }
  }
};

// One value head, by one warp: yh [DV] = bf16(oh * inv_rms(oh) * w * silu(zh)).
template <int DV>
__device__ __forceinline__ void gated_rmsnorm_head(const float* oh, const bf16* __restrict__ zh,
                                                   const bf16* __restrict__ w, bf16* __restrict__ yh, float eps) {
  GatedRmsnormWeights<DV> wl;
  wl.load(w);
  GatedRmsnormHead<DV> head;
  head.load(oh, zh);
  head.store(wl, yh, eps);
}

}  // namespace q35k

template <int HV, int DV, int HEADS>
__global__ void __launch_bounds__(HEADS * 32)
gated_rmsnorm(const float* __restrict__ o, const q35k::bf16* __restrict__ z, int z_stride,
              const q35k::bf16* __restrict__ w, q35k::bf16* __restrict__ y, float eps) {
  static_assert(DV % 128 == 0 && HV % HEADS == 0, "gated_rmsnorm: DV must be a multiple of 128, HV of HEADS");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  const size_t t = blockIdx.x;
  const int h = blockIdx.y * HEADS + threadIdx.x / 32;
  q35k::gated_rmsnorm_head<DV>(o + (t * HV + h) * DV, z + t * z_stride + h * DV, w, y + t * (HV * DV) + h * DV, eps);
}
