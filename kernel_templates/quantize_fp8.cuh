#pragma once
// The FP8 format on the GPU (runtime/core/fp8_format.h): bf16 weights quantized to e4m3 codes with
// an fp32 scale per (row, 128-k block), bit-exact with q35::fp8::quantize(w, rows, K, 1, 128), and
// dequantized back to a bf16 scratch for the large-M wgmma GEMM (dequantize_fp8, below):
//   w       bf16  [rows, K]       (experts: [E, N, K] is rows = E * N)
//   codes   uint8 [rows, K]       e4m3fn
//   scales  fp32  [rows, ceil(K / 128)]
//   scale = amax(|block|) / 448 (1 for an all-zero block); code = e4m3(w / scale) (fp8.cuh)
// One warp per (row, block): lane l takes values 4l .. 4l + 3 of the block (8 bytes in, one 4-byte
// word of codes out), the block's amax by warp shuffles. The arithmetic is the host's: fp32 |w|
// maximum (exact), IEEE fp32 divisions (NVRTC's default), round to nearest even.
// Grid: ceil(rows * ceil(K / 128) / WARPS), block 32 * WARPS.
#include "common.cuh"
#include "fp8.cuh"

template <int K, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
quantize_fp8(const q35k::bf16* __restrict__ w,  // [rows, K]
             unsigned char* __restrict__ codes,  // [rows, K]
             float* __restrict__ scales,         // [rows, ceil(K / 128)]
             int rows) {
  using namespace q35k;
  static_assert(K % 4 == 0, "quantize_fp8: K must be a multiple of 4 (4 codes per lane)");
  constexpr int BLOCKS = (K + kFp8BlockK - 1) / kFp8BlockK;
  const size_t block = size_t(blockIdx.x) * WARPS + threadIdx.x / 32;  // (row, k block)
  if (block >= size_t(rows) * BLOCKS) return;  // a whole warp
  const int lane = threadIdx.x % 32;
  const size_t row = block / BLOCKS;
  const int k = int(block % BLOCKS) * kFp8BlockK + 4 * lane;
  const bool valid = k < K;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (valid) {
    const uint2 raw = *reinterpret_cast<const uint2*>(w + row * K + k);
    v[0] = bf16x2_lo(raw.x), v[1] = bf16x2_hi(raw.x), v[2] = bf16x2_lo(raw.y), v[3] = bf16x2_hi(raw.y);
  }
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = amax > 0.f ? amax / 448.f : 1.f;
  if (lane == 0) scales[block] = scale;
  if (!valid) return;
  u32 packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) packed |= e4m3_from_f32(v[i] / scale) << (8 * i);
  *reinterpret_cast<u32*>(codes + row * K + k) = packed;
}

// w[r, k] = bf16(fp8(codes[r, k]) * scales[r, k / 128]) (fp8.cuh e4m3x16_dequant, rounded once): the
// bf16 scratch the large-M wgmma GEMMs read (models/qwen35/gpu/dense.h). One thread per 16 codes.
// Grid: ceil(rows * K / 16 / THREADS), block THREADS.
template <int K, int THREADS>
__global__ void __launch_bounds__(THREADS)
dequantize_fp8(const unsigned char* __restrict__ codes,  // [rows, K]
               const float* __restrict__ scales,         // [rows, ceil(K / 128)]
               q35k::bf16* __restrict__ w,               // [rows, K]
               int rows) {
  using namespace q35k;
  static_assert(K % 16 == 0, "dequantize_fp8: K must be a multiple of 16 (16-byte runs of codes)");
  constexpr int SPR = (K + kFp8BlockK - 1) / kFp8BlockK;
  const size_t chunk = size_t(blockIdx.x) * THREADS + threadIdx.x;  // 16 codes
  if (chunk >= size_t(rows) * (K / 16)) return;
  const size_t row = chunk / (K / 16);
  const int k = int(chunk % (K / 16)) * 16;
  uint4 v[2];
  e4m3x16_dequant(ld_stream_16(codes + chunk * 16), scales[row * SPR + k / kFp8BlockK], v);
  st_global_16(w + chunk * 16, v[0]);
  st_global_16(w + chunk * 16 + 8, v[1]);
}
