#pragma once
// Pieces the fused decode kernels share (kernels.md §7): programmatic dependent launch, L2
// prefetch of weights before the wait, and the "residual add + RMSNorm by the last block" epilogue
// that folds the runner's add + RMSNorm launch into the kernel producing a sub-layer's output.
//
// Residual epilogue (gemv_w4a16_residual, moe_decode_down_residual): every output element is owned
// by one thread, which adds its bf16-rounded value to the fp32 residual stream in place
//   residual[t, n] += float(bf16(v))                     (what rmsnorm with F32_RESIDUAL does with x)
// then the last block of the grid to finish (atomic ticket, as moe_router) normalises every row:
//   normed[t] = bf16( residual[t] * (1 / sqrt(mean(residual[t]^2) + eps)) * (1 + w) )
// and re-arms the ticket (zero before the first launch, zero after every launch: graph-safe).
#include "common.cuh"

namespace q35k {

// Programmatic dependent launch (sm_90; no-ops below, or when launched without PDL): let the next
// kernel of the stream start its prologue / wait until the previous kernel finished and its writes
// are visible. Everything before decode_pdl_wait() may only read what no predecessor writes.
__device__ __forceinline__ void decode_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void decode_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Pulls into L2 the `bytes` bytes from `offset` of 16 rows (row_lo .. row_lo + 7, row_hi .. row_hi + 7,
// each clamped to row_max) of a matrix with `stride` bytes per row, one 128-byte line per lane and step.
__device__ __forceinline__ void decode_prefetch_rows16(const void* p, size_t stride, int row_lo, int row_hi,
                                                       int row_max, int offset, int bytes) {
  const int lines = (bytes + 127) / 128;
  for (int i = threadIdx.x % 32; i < 16 * lines; i += 32) {
    const int r = i / lines, row = min(r < 8 ? row_lo + r : row_hi + r - 8, row_max);
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const unsigned char*>(p) + size_t(row) * stride +
                                                   offset + (i % lines) * 128));
  }
}

// The residual epilogue's second half (see the top comment), called by every thread of every block
// after its residual adds. residual fp32 [T, H] (read through L2: other blocks wrote it), w [H] bf16
// (the norm's stored offset), normed [T, H] bf16, counter int32 [1]. THREADS = the block size.
template <int H, int THREADS>
__device__ __forceinline__ void residual_rmsnorm_last_block(const float* residual, const bf16* __restrict__ w,
                                                            bf16* __restrict__ normed, int* counter, float eps,
                                                            int T) {
  static_assert(H % 4 == 0, "residual_rmsnorm_last_block: H must be a multiple of 4");
  constexpr int V = (H / 4 + THREADS - 1) / THREADS;  // float4 per thread and row
  __shared__ int is_last;
  __shared__ float scratch[THREADS / 32];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1) == int(gridDim.x * gridDim.y * gridDim.z) - 1;
  __syncthreads();
  if (!is_last) return;
  if (threadIdx.x == 0) *counter = 0;
  __threadfence();
  for (int t = 0; t < T; ++t) {
    const float4* row = reinterpret_cast<const float4*>(residual + size_t(t) * H);
    float4 h[V];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = i * THREADS + threadIdx.x;
      h[i] = c < H / 4 ? __ldcg(row + c) : make_float4(0.f, 0.f, 0.f, 0.f);
      ss += h[i].x * h[i].x + h[i].y * h[i].y + h[i].z * h[i].z + h[i].w * h[i].w;
    }
    const float inv_rms = 1.f / sqrtf(block_sum<THREADS>(ss, scratch) / float(H) + eps);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = i * THREADS + threadIdx.x;
      if (c >= H / 4) continue;
      const uint2 ww = *reinterpret_cast<const uint2*>(w + 4 * c);
      const float y0 = (h[i].x * inv_rms) * (1.f + bf16x2_lo(ww.x)), y1 = (h[i].y * inv_rms) * (1.f + bf16x2_hi(ww.x));
      const float y2 = (h[i].z * inv_rms) * (1.f + bf16x2_lo(ww.y)), y3 = (h[i].w * inv_rms) * (1.f + bf16x2_hi(ww.y));
      *reinterpret_cast<uint2*>(normed + size_t(t) * H + 4 * c) = make_uint2(f32x2_to_bf16x2(y0, y1), f32x2_to_bf16x2(y2, y3));
    }
  }
}

// residual[at] += float(bf16(v)): the sub-layer output rounded as the unfused path stores it.
__device__ __forceinline__ void residual_add_bf16(float* residual, size_t at, float v) {
  residual[at] += bf16_to_f32(f32_to_bf16(v));
}

}  // namespace q35k
