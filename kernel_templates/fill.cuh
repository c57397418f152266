#pragma once
// Random weights generated on the GPU (synthetic models for benchmarks: never time on zeros).
// A counter-based hash (splitmix64) of (seed, index), so any grid gives the same values.
#include "common.cuh"

namespace q35k {
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// Uniform in (0, 1].
__device__ __forceinline__ float unit_uniform(unsigned long long bits) {
  return (float((bits >> 40) & 0xffffffull) + 1.f) * (1.f / 16777216.f);
}
}  // namespace q35k

// out[i] = bf16(mean + scale * z_i), z_i ~ N(0, 1) (Box-Muller), i < n. Grid-stride.
__global__ void fill_normal_bf16(q35k::bf16* __restrict__ out, unsigned long long n, unsigned long long seed,
                                 float mean, float scale) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    const unsigned long long h = q35k::splitmix64(seed ^ (i * 0x632be59bd9b4e019ull));
    const float u1 = q35k::unit_uniform(h), u2 = q35k::unit_uniform(h << 24);
    const float z = sqrtf(-2.f * logf(u1)) * cosf(6.2831853f * u2);
    out[i] = q35k::f32_to_bf16(mean + scale * z);
  }
}

// out[i] = lo + (hi - lo) * u_i, u_i ~ U(0, 1], i < n. Grid-stride.
__global__ void fill_uniform_f32(float* __restrict__ out, unsigned long long n, unsigned long long seed, float lo,
                                 float hi) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    out[i] = lo + (hi - lo) * q35k::unit_uniform(q35k::splitmix64(seed ^ (i * 0x632be59bd9b4e019ull)));
}
