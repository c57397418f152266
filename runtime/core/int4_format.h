#pragma once
// The W4A16 weight format (symmetric INT4, bf16 scales per group along K), shared by the GPU
// quantize kernel (kernel_templates/quantize_w4.cuh), every INT4 kernel, the quantized checkpoint
// files and this CPU reference.
//
// A logical weight W [N, K] (row-major, K contiguous; experts add a leading [E]) with group size G
// (K % G == 0, G % 8 == 0) becomes:
//   qweight uint32 [N, K / 8]   word j of row n holds k = 8j .. 8j+7 as 4-bit values u = q + 8
//                               (q in [-8, 7]); natural offset r = k % 8 sits in nibble slot
//                               s = r / 2 + 4 * (r % 2), i.e. slots hold r = 0,2,4,6,1,3,5,7. Then
//                               (word >> 4p) & 0x000f000f puts r = 2p in the low half-word and
//                               r = 2p + 1 in the high one: one lop3 makes a bf16x2 pair (128 + u).
//   scales  bf16   [N, K / G]   dequantized w = q * scale
// Quantization (torchao choose_qparams_affine SYMMETRIC, qmin -8, qmax 7), all in fp32:
//   amax = max |w| over the group; scale = bf16(amax / 7.5); q = clamp(rint(w / scale), -8, 7)
//   (q = 0 when scale == 0). rint rounds half to even, as the GPU's rintf does.
#include <cstdint>
#include <span>
#include <vector>

namespace q35::int4 {

constexpr int nibble_slot(int r) { return r / 2 + 4 * (r % 2); }

struct Quantized {
  std::vector<uint32_t> qweight;  // [N, K / 8]
  std::vector<uint16_t> scales;   // [N, K / G] bf16
};

// w: [N, K] fp32 (values as stored, e.g. bf16 widened). Throws Error on a bad K / G.
Quantized quantize(std::span<const float> w, int64_t N, int64_t K, int64_t group);
// Back to fp32 [N, K]: q * scale.
std::vector<float> dequantize(const Quantized& q, int64_t N, int64_t K, int64_t group);
// The same with the scales [N, K / G] given as fp32 (e.g. fp16 scales of a GPTQ checkpoint, widened
// exactly): q * scale in fp32, exact whenever the scale has at most 20 significant bits.
std::vector<float> dequantize(std::span<const uint32_t> qweight, std::span<const float> scales, int64_t N, int64_t K,
                              int64_t group);

}  // namespace q35::int4
