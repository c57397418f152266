#pragma once
// The FP8 weight format of the official FP8 checkpoints (quant_method "fp8", e4m3, block-wise
// scales), shared by the checkpoint reader (models/qwen35/hf_quant.h), W8A16 kernels and this CPU
// reference. A logical weight W [N, K] (row-major; experts add a leading [E]) with blocks
// [bn, bk] (weight_block_size, 128 x 128 in the Qwen releases) is stored as:
//   codes      uint8 e4m3fn [N, K]                        runtime/core/half.h fp8_e4m3_to_f32
//   scale_inv  fp32 [ceil(N / bn), ceil(K / bk)]          the dequantization multiplier
//   w[n, k] = fp8(codes[n, k]) * scale_inv[n / bn, k / bk]   (one fp32 product: exact to fp32 rounding)
// Quantization (the reference for requantizing bf16 weights into this format), in fp32:
//   scale_inv = amax(|block|) / 448 (1 for an all-zero block); code = e4m3(w / scale_inv), rounded
//   to the nearest e4m3 value (ties to the even code), saturating at 448.
//
// On the GPU (`--quant fp8`, models/qwen35/gpu_weights.h; kernel_templates/fp8.cuh) a weight W [N, K]
// is kept in this layout with blocks [1, 128] (kGpuBlockK): a scale per output row and 128-k block,
//   codes   uint8 e4m3fn [N, K]
//   scales  fp32 [N, ceil(K / 128)]     w[n, k] = fp8(codes[n, k]) * scales[n, k / 128]
// so that projections concatenated along N (q|k|v, the DeltaNet in_proj with its 32-row b and a)
// need no common block grid, and every 16-byte run of codes has one scale. A checkpoint's [bn, bk]
// blocks map onto it exactly when every 128-k block lies in one of its blocks (bk a multiple of 128,
// or K <= bk): its scales repeat over their rows (row_scales), the codes are kept byte for byte.
// bf16 weights are quantized with bn = 1, bk = 128 (quantize), on the GPU by
// kernel_templates/quantize_fp8.cuh, bit-exact.
#include <cstdint>
#include <span>
#include <vector>

namespace q35::fp8 {

constexpr float kMax = 448.f;  // the largest finite e4m3fn value
constexpr int64_t kGpuBlockK = 128;  // k values per scale on the GPU (blocks [1, 128])

// The e4m3fn code nearest to `x` (ties to the even code), saturating at +-448; NaN -> 0x7f, -0 -> 0x00.
uint8_t e4m3_from_f32(float x);

struct Quantized {
  std::vector<uint8_t> codes;     // [N, K]
  std::vector<float> scale_inv;   // [ceil(N / bn), ceil(K / bk)]
};

// w: [N, K] fp32. Throws Error on bad sizes.
Quantized quantize(std::span<const float> w, int64_t N, int64_t K, int64_t bn, int64_t bk);
// Back to fp32 [N, K].
std::vector<float> dequantize(std::span<const uint8_t> codes, std::span<const float> scale_inv, int64_t N, int64_t K,
                              int64_t bn, int64_t bk);

// The GPU's scales [N, ceil(K / 128)] of block scales scale_inv [ceil(N / bn), ceil(K / bk)]: each
// row's 128-k blocks take the scale of the block they lie in (exact). Error naming the block sizes
// when a 128-k block would straddle two blocks (bk not a multiple of 128 and K > bk).
std::vector<float> row_scales(std::span<const float> scale_inv, int64_t N, int64_t K, int64_t bn, int64_t bk);

}  // namespace q35::fp8
