#pragma once
// The W4A16 format on the GPU (runtime/core/int4_format.h): quantize bf16 weights, bit-exact with
// q35::int4::quantize, and dequantize them back to a bf16 scratch for the large-M GEMM.
//   w       bf16 [rows, K]    (experts: [E, N, K] is rows = E * N)
//   qweight u32  [rows, K / 8]  word j of a row holds k = 8j .. 8j+7, u = q + 8 in nibble slot
//                               r / 2 + 4 * (r % 2) for r = k % 8
//   scales  bf16 [rows, K / G]
// One thread per word (8 values); the G / 8 threads of a group are consecutive lanes of one warp
// and combine their amax with shuffles. The arithmetic matches the host's exactly: fp32 division
// (IEEE, NVRTC's default), round-to-nearest-even to bf16, rintf (half to even), clamp to [-8, 7].
// Grid: ceil(rows * K / 8 / THREADS), block THREADS.
#include "common.cuh"

template <int K, int G, int THREADS>
__global__ void __launch_bounds__(THREADS)
quantize_w4(const q35k::bf16* __restrict__ w,  // [rows, K]
            q35k::u32* __restrict__ qweight,   // [rows, K / 8]
            q35k::bf16* __restrict__ scales,   // [rows, K / G]
            int rows) {
  using namespace q35k;
  static_assert(G % 8 == 0 && K % G == 0 && G / 8 <= 32 && (32 % (G / 8)) == 0,
                "quantize_w4: G must divide K and G / 8 must divide 32");
  static_assert(THREADS % 32 == 0, "quantize_w4: THREADS must be a multiple of 32");
  const size_t word = size_t(blockIdx.x) * THREADS + threadIdx.x;  // index into qweight
  const size_t words = size_t(rows) * (K / 8);
  // Groups never straddle a warp (G / 8 divides 32), so a whole group is in or out of range.
  const bool valid = word < words;
  float v[8];
  unpack8(valid ? ld_stream_16(w + word * 8) : make_uint4(0, 0, 0, 0), v);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int off = 1; off < G / 8; off <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (!valid) return;
  const bf16 sb = f32_to_bf16(amax / 7.5f);
  const float scale = bf16_to_f32(sb);
  u32 packed = 0;
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const int q = scale == 0.f ? 0 : int(fminf(fmaxf(rintf(v[r] / scale), -8.f), 7.f));
    packed |= u32(q + 8) << (4 * (r / 2 + 4 * (r % 2)));
  }
  qweight[word] = packed;
  if (word % (G / 8) == 0) scales[word / (G / 8)] = sb;
}

// w[r, k] = bf16(q * scale): the product of a 4-bit integer and a bf16 scale needs up to 12
// significant bits, so this rounds (relative error <= 2^-9 per weight) unlike the fp32 reference.
template <int K, int G, int THREADS>
__global__ void __launch_bounds__(THREADS)
dequantize_w4(const q35k::u32* __restrict__ qweight,  // [rows, K / 8]
              const q35k::bf16* __restrict__ scales,  // [rows, K / G]
              q35k::bf16* __restrict__ w,             // [rows, K]
              int rows) {
  using namespace q35k;
  static_assert(G % 8 == 0 && K % G == 0, "dequantize_w4: G must be a multiple of 8 dividing K");
  const size_t word = size_t(blockIdx.x) * THREADS + threadIdx.x;
  if (word >= size_t(rows) * (K / 8)) return;
  const u32 packed = qweight[word];
  const float scale = bf16_to_f32(scales[word / (G / 8)]);
  float v[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) v[r] = float(int((packed >> (4 * (r / 2 + 4 * (r % 2)))) & 0xfu) - 8) * scale;
  st_global_16(w + word * 8, pack8(v));
}
