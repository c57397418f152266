#pragma once
// Device side of the FP8 weight format on the GPU (runtime/core/fp8_format.h): e4m3fn codes, one
// byte per weight, and fp32 scales per (output row, 128-k block):
//   w[n, k] = fp8(codes[n, k]) * scales[n, k / 128]
// Every e4m3 value is exact in bf16 (4 significant bits, exponents 2^-9 .. 2^8), so the kernels turn
// codes into exact bf16 mma operands and apply the scales to fp32 partial sums (GEMVs), or dequantize
// to bf16(fp8 * scale), rounded once, into shared memory (GEMMs).
//
// This header includes nothing: it uses u32, uint4 and f32x2_to_bf16x2 of common.cuh (every
// includer includes common.cuh first) and __uint_as_float / __float_as_uint, so tests/test_fp8.cpp
// compiles its portable path on the host, with host stand-ins of those, and checks all 256 codes.
namespace q35k {

// The weight-format code of FP8 weights: the template parameter GROUP of the kernels that read
// weights is 0 for bf16, 32 / 64 / 128 for W4A16 with that group, kFp8 for FP8 (weights.cuh).
constexpr int kFp8 = -1;
constexpr int kFp8BlockK = 128;  // k values per fp32 scale

// The exact fp32 values of the four e4m3 codes of x (byte i -> f[i]): NaN for 0x7f / 0xff, signed
// zeros and subnormals kept.
//   sm_89+: cvt e4m3x2 -> f16x2 (exact; the low byte goes to the low half), then f16 -> f32. The asm
//     is volatile so the conversions stay where the source has them, between the (volatile) mmas that
//     use them: otherwise the compiler schedules every conversion of a WarpRows16 column tile before
//     its first mma, all operands live at once (35B moe_decode_gate_up ksplit 4 on sm_90a: 245 registers, 2
//     blocks of 128 threads per SM; volatile: 125, 4 blocks). No other FP8 kernel changes its
//     registers (gemv_fp8: the same loop, a few address instructions reordered).
//   below (sm_80, sm_86, and the host test): the code's bits placed into an fp32, sign at bit 31,
//     exponent and mantissa at bits 20..26, read as 2^-120 times the value (an fp32 subnormal when
//     the e4m3 exponent is 0, as e4m3's subnormals), times 2^120 (an exact fp32 multiply: no flush to
//     zero); the NaN codes would read 480 and are set explicitly.
__device__ __forceinline__ void e4m3x4_to_f32(u32 x, float (&f)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  u32 h01, h23;
  asm volatile("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %2;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n cvt.rn.f16x2.e4m3x2 %1, hi;\n}"
      : "=r"(h01), "=r"(h23) : "r"(x));
  asm volatile("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %2;\n cvt.f32.f16 %0, lo;\n cvt.f32.f16 %1, hi;\n}"
      : "=f"(f[0]), "=f"(f[1]) : "r"(h01));
  asm volatile("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %2;\n cvt.f32.f16 %0, lo;\n cvt.f32.f16 %1, hi;\n}"
      : "=f"(f[2]), "=f"(f[3]) : "r"(h23));
#else
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 b = (x >> (8 * i)) & 0xffu, sign = (b & 0x80u) << 24;
    const float v = __uint_as_float(sign | ((b & 0x7fu) << 20)) * 0x1p120f;
    f[i] = (b & 0x7fu) == 0x7fu ? __uint_as_float(sign | 0x7fc00000u) : v;
  }
#endif
}

// The four codes of x as exact bf16x2 pairs (b0, b1), (b2, b3): the fp32 values have at most 4
// significant bits, so their high halves are the bf16 values.
__device__ __forceinline__ void e4m3x4_to_bf16x2(u32 x, u32 (&p)[2]) {
  float f[4];
  e4m3x4_to_f32(x, f);
  p[0] = (__float_as_uint(f[1]) & 0xffff0000u) | (__float_as_uint(f[0]) >> 16);
  p[1] = (__float_as_uint(f[3]) & 0xffff0000u) | (__float_as_uint(f[2]) >> 16);
}

// 16 codes (16 bytes, k order) times their block's scale -> 16 bf16 in k order (two 16-byte
// vectors): bf16(fp8 * scale), one fp32 product rounded to nearest even once.
__device__ __forceinline__ void e4m3x16_dequant(const uint4& q, float scale, uint4 (&out)[2]) {
  const u32 words[4] = {q.x, q.y, q.z, q.w};
  u32 p[8];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    float f[4];
    e4m3x4_to_f32(words[w], f);
    p[2 * w] = f32x2_to_bf16x2(f[0] * scale, f[1] * scale);
    p[2 * w + 1] = f32x2_to_bf16x2(f[2] * scale, f[3] * scale);
  }
  out[0] = make_uint4(p[0], p[1], p[2], p[3]);
  out[1] = make_uint4(p[4], p[5], p[6], p[7]);
}

// The e4m3fn code nearest to x, bit-exact with the host's q35::fp8::e4m3_from_f32: |x| saturated at
// 448, rounded to the nearest value (ties to the even code, as rintf), NaN -> 0x7f, the sign of a
// negative x kept (also when it rounds to zero), -0 -> 0x00. With e = the exponent of |x|, at least
// -6 (e4m3's subnormals share the quantum 2^-9 of exponent -6), |x| * 2^(3 - e) is exact and in
// [0, 16]; its rounding q gives the code (e + 6) * 8 + q (q = 16 carries into the next exponent,
// q = 8 at e = -6 is the smallest normal: the codes are contiguous).
__device__ __forceinline__ u32 e4m3_from_f32(float x) {
  if (x != x) return 0x7fu;
  const u32 sign = x < 0.f ? 0x80u : 0u;
  const float a = fminf(fabsf(x), 448.f);
  int e = int((__float_as_uint(a) >> 23) & 0xffu) - 127;
  e = e < -6 ? -6 : e;
  const float q = rintf(a * __uint_as_float(u32(127 + 3 - e) << 23));
  return sign | u32((e + 6) * 8 + int(q));
}

}  // namespace q35k
