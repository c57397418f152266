#pragma once
// bf16 / fp16 <-> fp32 on the host, bit-exact with CUDA's __float2bfloat16 (round to nearest even).
#include <bit>
#include <cmath>
#include <cstdint>

namespace q35 {

inline float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Round an fp32 value through bf16 (what a bf16 activation tensor stores).
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  if (exp == 0) {
    float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
}

// fp8 e4m3fn (OCP): value = (-1)^s 2^(e-7) (1 + m/8), subnormals (e = 0) 2^-6 m/8, 0x7f/0xff NaN.
// Every value is exact in fp32.
inline float fp8_e4m3_to_f32(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80u) << 24, exp = (b >> 3) & 0xfu, man = b & 0x7u;
  if (exp == 0xf && man == 0x7) return std::bit_cast<float>(sign | 0x7fc00000u);
  if (exp == 0) {
    const float v = std::ldexp(float(man), -9);
    return sign ? -v : v;
  }
  return std::bit_cast<float>(sign | ((exp + 120) << 23) | (man << 20));
}

}  // namespace q35
