#pragma once
// Device side of the W4A16 format (runtime/core/int4_format.h): one uint32 word holds 8 INT4
// values u = q + 8 with natural offsets r = 0,2,4,6,1,3,5,7 in nibble slots 0..7.
#include "common.cuh"

namespace q35k {

// The 8 values of `word` as bf16x2 pairs (r0,r1), (r2,r3), (r4,r5), (r6,r7), exact q in [-8, 7]:
// (word >> 4p) & 0x000f000f | 0x43004300 is the bf16 pair (128 + u_lo, 128 + u_hi) (one lop3),
// then one fma.rn.bf16x2 subtracts 136 (sm_80+).
__device__ __forceinline__ void int4x8_to_bf16x2(u32 word, u32 out[4]) {
  const u32 one = 0x3f803f80u, minus136 = 0xc308c308u;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const u32 t = ((word >> (4 * p)) & 0x000f000fu) | 0x43004300u;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out[p]) : "r"(t), "r"(one), "r"(minus136));
  }
}

// The 8 values of `word` as fp32 q in natural order r = 0..7: 2^23 + u is exact in fp32's
// mantissa, so subtracting 2^23 + 8 gives q exactly.
__device__ __forceinline__ void int4x8_to_f32(u32 word, float out[8]) {
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const u32 t = (word >> (4 * p)) & 0x000f000fu;
    out[2 * p] = __uint_as_float(0x4b000000u | (t & 0xffffu)) - 8388616.f;
    out[2 * p + 1] = __uint_as_float(0x4b000000u | (t >> 16)) - 8388616.f;
  }
}

}  // namespace q35k
