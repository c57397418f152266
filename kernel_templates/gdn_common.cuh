#pragma once
// Gated DeltaNet device helpers shared by gdn_prologue.cuh and gdn_recurrent.cuh (spec §2.4):
// the causal depthwise conv over a ring-buffered conv state, the gates, PDL.
//
// Conv state of one sequence and layer: bf16 [KC, conv_dim], a ring indexed by position: slot
// p % KC holds the pre-conv input of position p. A call that starts at position pos0 reads the
// slots of positions pos0-KC+1 .. pos0-1 and writes those of its last KC-1 positions. A zeroed
// state is the sequence start: slots of positions < 0 are never written, so they read as 0.
// (With KC slots a single-token call reads KC-1 slots and writes the KC-th, so any CTA may read
// while another writes; a multi-token call reads and writes within the same block, with a
// barrier between.)
#include "common.cuh"

namespace q35k {

__device__ __forceinline__ float gdn_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float gdn_silu(float x) { return x / (1.f + expf(-x)); }

// g = -exp(A_log) * softplus(a + dt_bias), softplus(x) = x above 20 (torch); beta = sigmoid(b).
__device__ __forceinline__ float gdn_log_decay(float a, float A_log, float dt_bias) {
  const float s = a + dt_bias;
  return -expf(A_log) * (s > 20.f ? s : log1pf(expf(s)));
}

// Ring slot of position p (p may be negative: those slots read as zero at sequence start).
template <int KC>
__device__ __forceinline__ int gdn_ring_slot(int p) {
  return ((p % KC) + KC) % KC;
}

// Pre-conv input of channel c at token s of this call (s < 0: from the ring at position pos0+s).
// x [T, row_stride] bf16 (the qkv columns first), ring [KC, C] bf16.
template <int C, int KC>
__device__ __forceinline__ float gdn_conv_input(const bf16* __restrict__ x, int row_stride,
                                                const bf16* ring, int pos0, int s, int c) {
  return s >= 0 ? bf16_to_f32(x[size_t(s) * row_stride + c])
                : bf16_to_f32(ring[size_t(gdn_ring_slot<KC>(pos0 + s)) * C + c]);
}

// silu(sum_d w[c, d] * input(t - KC + 1 + d)) for channel c at token t; w [C, KC] bf16.
template <int C, int KC>
__device__ __forceinline__ float gdn_conv_silu(const bf16* __restrict__ x, int row_stride, const bf16* ring,
                                               const bf16* __restrict__ w, int pos0, int t, int c) {
  float acc = 0.f;
#pragma unroll
  for (int d = 0; d < KC; ++d)
    acc += bf16_to_f32(w[c * KC + d]) * gdn_conv_input<C, KC>(x, row_stride, ring, pos0, t - KC + 1 + d, c);
  return gdn_silu(acc);
}

// Programmatic dependent launch: let the next kernel start its prologue, and wait for the
// previous kernel's results (both no-ops when launched without PDL).
__device__ __forceinline__ void gdn_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void gdn_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace q35k
