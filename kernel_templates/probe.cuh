#pragma once
// Device ceilings for the floors (autotune/device_probe): the copy bandwidth of global memory and
// the bf16 tensor-core rate of mma.sync, each measured with a kernel that does nothing else.
#include "common.cuh"

namespace q35k {

// splitmix64 of (seed, i): inputs that are neither zeros nor a constant.
__device__ __forceinline__ unsigned long long probe_hash(unsigned long long seed, unsigned long long i) {
  unsigned long long x = seed ^ (i * 0x632be59bd9b4e019ull);
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Two bf16 in [-1, 1) packed in a u32, from 32 random bits.
__device__ __forceinline__ u32 probe_bf16x2(unsigned long long bits) {
  const float lo = float(int(bits & 0xffffu) - 32768) * (1.f / 32768.f);
  const float hi = float(int((bits >> 16) & 0xffffu) - 32768) * (1.f / 32768.f);
  return f32x2_to_bf16x2(lo, hi);
}

}  // namespace q35k

// out[i] = 32 random bits of (seed, i), i < n. Grid-stride.
__global__ void probe_fill(q35k::u32* __restrict__ out, unsigned long long n, unsigned long long seed) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    out[i] = q35k::u32(q35k::probe_hash(seed, i));
}

// dst[i] = src[i] for n 16-byte vectors. Grid-stride; each thread keeps UNROLL independent loads in
// flight before storing them, then a plain loop takes the remainder.
template <int THREADS, int UNROLL>
__global__ void __launch_bounds__(THREADS)
probe_copy(const uint4* __restrict__ src, uint4* __restrict__ dst, unsigned long long n) {
  const unsigned long long stride = (unsigned long long)gridDim.x * THREADS;
  unsigned long long i = blockIdx.x * (unsigned long long)THREADS + threadIdx.x;
  for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = q35k::ld_global_16(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) q35k::st_global_16(dst + i + u * stride, v[u]);
  }
  for (; i < n; i += stride) q35k::st_global_16(dst + i, q35k::ld_global_16(src + i));
}

// Tensor-core rate: every warp runs `iters` rounds of ACC independent
// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 on register operands (one A fragment, ACC B
// fragments and accumulators, all from `seed`), so the pipe never waits on one result. Each thread
// writes the sum of its accumulators to out[global thread]: 2 * 16 * 8 * 16 * ACC * iters FLOPs
// per warp.
template <int THREADS, int ACC>
__global__ void __launch_bounds__(THREADS)
probe_mma(float* __restrict__ out, int iters, unsigned long long seed) {
  using namespace q35k;
  static_assert(THREADS % 32 == 0, "probe_mma: whole warps");
  static_assert(ACC >= 1 && ACC <= 32, "probe_mma: 1 to 32 accumulators");
  const unsigned long long t = blockIdx.x * (unsigned long long)THREADS + threadIdx.x;
  u32 a[4], b[ACC][2];
  float acc[ACC][4];
#pragma unroll
  for (int r = 0; r < 4; ++r) a[r] = probe_bf16x2(probe_hash(seed, t * 128 + r));
#pragma unroll
  for (int j = 0; j < ACC; ++j) {
    b[j][0] = probe_bf16x2(probe_hash(seed, t * 128 + 4 + 2 * j));
    b[j][1] = probe_bf16x2(probe_hash(seed, t * 128 + 5 + 2 * j));
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  }
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < ACC; ++j)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
          "{%8, %9}, {%0, %1, %2, %3};"
          : "+f"(acc[j][0]), "+f"(acc[j][1]), "+f"(acc[j][2]), "+f"(acc[j][3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[j][0]), "r"(b[j][1]));
  }
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < ACC; ++j) sum += (acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]);
  out[t] = sum;
}
