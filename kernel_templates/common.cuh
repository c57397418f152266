#pragma once
// Device helpers shared by every kernel family. Compiled by NVRTC with no include path, so this
// uses no toolkit header: bf16 is handled as raw 16-bit patterns with bit operations and PTX.
//
// Conventions for kernels: tensors are row-major; bf16 tensors are passed as `const bf16*`
// (raw bits), fp32 math inside, round-to-nearest-even on store (bit-exact with the host's
// q35::f32_to_bf16 and PyTorch's .to(bfloat16)).

namespace q35k {

typedef unsigned short bf16;  // raw bfloat16 bits
typedef unsigned int u32;

// ---- bf16 <-> fp32 ----

__device__ __forceinline__ float bf16_to_f32(bf16 h) { return __uint_as_float(u32(h) << 16); }

// Two bf16 packed in a u32 (element 0 in the low half, as in memory).
__device__ __forceinline__ float bf16x2_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16x2_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
  bf16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// Packs (lo, hi) -> u32 with lo in the low half, both rounded to nearest even.
__device__ __forceinline__ u32 f32x2_to_bf16x2(float lo, float hi) {
  u32 w;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
}

// 8 bf16 (one 16-byte vector) <-> 8 fp32.
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  f[0] = bf16x2_lo(v.x); f[1] = bf16x2_hi(v.x);
  f[2] = bf16x2_lo(v.y); f[3] = bf16x2_hi(v.y);
  f[4] = bf16x2_lo(v.z); f[5] = bf16x2_hi(v.z);
  f[6] = bf16x2_lo(v.w); f[7] = bf16x2_hi(v.w);
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 v;
  v.x = f32x2_to_bf16x2(f[0], f[1]);
  v.y = f32x2_to_bf16x2(f[2], f[3]);
  v.z = f32x2_to_bf16x2(f[4], f[5]);
  v.w = f32x2_to_bf16x2(f[6], f[7]);
  return v;
}

// ---- 16-byte global memory access (the address must be 16-byte aligned) ----

__device__ __forceinline__ uint4 ld_global_16(const void* p) { return *static_cast<const uint4*>(p); }

// Data that is read-only for the whole kernel and touched once (weights): non-coherent path,
// not kept in L1.
__device__ __forceinline__ uint4 ld_stream_16(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void st_global_16(void* p, const uint4& v) { *static_cast<uint4*>(p) = v; }

// 16 bytes of shared memory at a shared-space address (cvta.to.shared / __cvta_generic_to_shared).
__device__ __forceinline__ uint4 lds_16(u32 addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts_16(u32 addr, const uint4& v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

// ---- reductions ----

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds THREADS / 32 floats of shared
// memory; the function synchronizes, so it may be called repeatedly with the same scratch.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "THREADS must be a multiple of 32, at most 1024");
  constexpr int WARPS = THREADS / 32;
  v = warp_sum(v);
  if constexpr (WARPS == 1) return v;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += scratch[w];  // same order in every thread
  return total;
}

}  // namespace q35k
