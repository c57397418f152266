#pragma once
// Gated DeltaNet device helpers shared by gdn_prologue.cuh, gdn_recurrent.cuh and gdn_chunked.cuh
// (spec §2.4): the causal depthwise conv over a ring-buffered conv state, the gates, PDL, and the
// mma.sync / cp.async wrappers of the chunked kernels.
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

// n contiguous bf16 at p into pairs w[(n + 1) / 2] (element 2i in the low half), in the widest
// loads the alignment allows: p must be a multiple of min(16, the largest power of two dividing 2n)
// bytes (a group of n values at a multiple of n, as the conv weights and ring channels below are).
template <int n>
__device__ __forceinline__ void gdn_load_bf16s(const bf16* p, u32 (&w)[(n + 1) / 2]) {
  if constexpr (n % 8 == 0) {
#pragma unroll
    for (int i = 0; i < n / 8; ++i) {
      const uint4 v = *reinterpret_cast<const uint4*>(p + 8 * i);
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  } else if constexpr (n % 4 == 0) {
#pragma unroll
    for (int i = 0; i < n / 4; ++i) {
      const uint2 v = *reinterpret_cast<const uint2*>(p + 4 * i);
      w[2 * i] = v.x; w[2 * i + 1] = v.y;
    }
  } else if constexpr (n % 2 == 0) {
#pragma unroll
    for (int i = 0; i < n / 2; ++i) w[i] = *reinterpret_cast<const u32*>(p + 2 * i);
  } else {
#pragma unroll
    for (int i = 0; i < (n + 1) / 2; ++i) w[i] = 0u;
#pragma unroll
    for (int i = 0; i < n; ++i) w[i / 2] |= u32(p[i]) << (16 * (i % 2));
  }
}

// The inverse of gdn_load_bf16s: pairs w into n contiguous bf16 at p (the same alignment).
template <int n>
__device__ __forceinline__ void gdn_store_bf16s(bf16* p, const u32 (&w)[(n + 1) / 2]) {
  if constexpr (n % 8 == 0) {
#pragma unroll
    for (int i = 0; i < n / 8; ++i)
      *reinterpret_cast<uint4*>(p + 8 * i) = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
  } else if constexpr (n % 4 == 0) {
#pragma unroll
    for (int i = 0; i < n / 4; ++i) *reinterpret_cast<uint2*>(p + 4 * i) = make_uint2(w[2 * i], w[2 * i + 1]);
  } else if constexpr (n % 2 == 0) {
#pragma unroll
    for (int i = 0; i < n / 2; ++i) *reinterpret_cast<u32*>(p + 2 * i) = w[i];
  } else {
#pragma unroll
    for (int i = 0; i < n; ++i) p[i] = bf16(w[i / 2] >> (16 * (i % 2)));
  }
}

// Element i of bf16 pairs as fp32.
template <int n>
__device__ __forceinline__ float gdn_bf16_at(const u32 (&w)[n], int i) {
  return i % 2 ? bf16x2_hi(w[i / 2]) : bf16x2_lo(w[i / 2]);
}

// The causal conv + SiLU of one decode token over N adjacent channels c0 .. c0 + N - 1 (c0 a
// multiple of N), in three steps so that what no predecessor kernel writes is read before the PDL
// wait and the position is needed only for the math:
//   load_weights_ring: the channels' conv weights (conv_w [C, KC]: N KC contiguous bf16) and their
//     values in all KC ring slots (ring [KC, C]; the slot of this token's own position is read too
//     and not used, which is what lets these loads go before the position is known);
//   load_input: this token's pre-conv inputs (the projection row, the predecessor's output);
//   silu(e, p): silu(sum_d w[c0 + e, d] x_d) for channel c0 + e, x_0 .. x_{KC-2} the ring taps of
//     positions pos - KC + 1 .. pos - 1 (slot (p + 1 + d) % KC, p = the slot of pos), x_{KC-1} the
//     input; fp32 sums in that order (gdn_prologue's order too).
template <int C, int KC, int N>
struct GdnConv {
  static constexpr int P = (N + 1) / 2;  // bf16 pairs of N channels
  u32 w[(N * KC + 1) / 2];               // flat e KC + d
  u32 ring[KC][P];
  u32 x[P];

  __device__ __forceinline__ void load_weights_ring(const bf16* __restrict__ conv_w, const bf16* ring_p, int c0) {
    gdn_load_bf16s<N * KC>(conv_w + size_t(c0) * KC, w);
#pragma unroll
    for (int s = 0; s < KC; ++s) gdn_load_bf16s<N>(ring_p + size_t(s) * C + c0, ring[s]);
  }
  __device__ __forceinline__ void load_input(const bf16* __restrict__ proj, int c0) { gdn_load_bf16s<N>(proj + c0, x); }

  __device__ __forceinline__ float silu(int e, int p) const {
    float acc = 0.f;
#pragma unroll
    for (int d = 0; d < KC - 1; ++d) {
      const int slot = p + 1 + d < KC ? p + 1 + d : p + 1 + d - KC;
      u32 tap = ring[0][e / 2];
#pragma unroll
      for (int s = 1; s < KC; ++s) tap = slot == s ? ring[s][e / 2] : tap;
      acc += gdn_bf16_at<(N * KC + 1) / 2>(w, e * KC + d) * (e % 2 ? bf16x2_hi(tap) : bf16x2_lo(tap));
    }
    acc += gdn_bf16_at<(N * KC + 1) / 2>(w, e * KC + KC - 1) * gdn_bf16_at<P>(x, e);
    return gdn_silu(acc);
  }
};

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

// Tensor-core and async-copy helpers of the chunked kernels (sm_80+ PTX).
__device__ __forceinline__ u32 gdn_smem_u32(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
// 16 bytes global -> shared; !valid zero-fills (src must still be a mapped address).
__device__ __forceinline__ void gdn_cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(gdn_smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void gdn_cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(gdn_smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void gdn_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void gdn_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

// fp32 -> tf32 (round to nearest, ties away), kept in an fp32 register.
__device__ __forceinline__ float gdn_tf32(float x) {
  u32 r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
}

// d += a b, m16n8k8, tf32 operands (fp32 registers; g = lane / 4, t = lane % 4):
//   a: (g, t) (g + 8, t) (g, t + 4) (g + 8, t + 4); b: (k = t, n = g) (t + 4, g);
//   d: (g, 2t) (g, 2t + 1) (g + 8, 2t) (g + 8, 2t + 1).
__device__ __forceinline__ void gdn_mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])), "r"(__float_as_uint(a[3])),
        "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
}

// d += a b, m16n8k16, bf16 pairs (low half = lower k):
//   a: (g, 2t..) (g + 8, 2t..) (g, 2t + 8..) (g + 8, 2t + 8..); b: (k = 2t.., n = g) (2t + 8.., g); d as tf32.
__device__ __forceinline__ void gdn_mma_bf16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace q35k
