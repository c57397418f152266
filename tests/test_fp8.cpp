// The FP8 weight format on the CPU (no GPU): the device conversions of kernel_templates/fp8.cuh,
// compiled here for the host (its portable path, the one sm_80 runs; the sm_89+ cvt path runs in the
// GPU tests) and checked on all 256 codes against the host's reference; the device quantizer's
// rounding against the host's (round to nearest, ties to even, saturation, NaN, signed zeros); the
// quantizer round trip (bf16 -> fp8 -> fp32 within e4m3's precision, block scales = amax / 448); the
// GPU layout's per-row scales from a checkpoint's 128x128 blocks.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "runtime/core/fp8_format.h"
#include "runtime/core/half.h"
#include "tests/test_util.h"

// Host stand-ins of what fp8.cuh takes from common.cuh and CUDA (it includes nothing itself).
namespace q35k {
typedef unsigned int u32;
struct uint4 {
  u32 x, y, z, w;
};
inline uint4 make_uint4(u32 x, u32 y, u32 z, u32 w) { return {x, y, z, w}; }
inline float __uint_as_float(u32 u) { return std::bit_cast<float>(u); }
inline u32 __float_as_uint(float f) { return std::bit_cast<u32>(f); }
inline u32 f32x2_to_bf16x2(float lo, float hi) { return q35::f32_to_bf16(lo) | (u32(q35::f32_to_bf16(hi)) << 16); }
}  // namespace q35k
#define __device__
#define __forceinline__ inline
#include "kernel_templates/fp8.cuh"
#undef __device__
#undef __forceinline__

using namespace q35;
using q35::test::contains;
using q35::test::error_of;

namespace {

uint32_t bits(float f) { return std::bit_cast<uint32_t>(f); }

// The device conversion of one code (in every byte position of the word).
float device_f32(uint8_t code, int position) {
  float f[4];
  q35k::e4m3x4_to_f32(uint32_t(code) << (8 * position) | (0x38u << (8 * ((position + 1) % 4))), f);
  return f[position];
}

}  // namespace

TEST_CASE("fp8.cuh: e4m3 -> fp32 and -> bf16 exact for all 256 codes (NaN, subnormals, signed zeros)") {
  int nan = 0, subnormal = 0;
  for (int c = 0; c < 256; ++c) {
    CAPTURE(c);
    const float want = fp8_e4m3_to_f32(uint8_t(c));
    for (int position = 0; position < 4; ++position) {
      const float got = device_f32(uint8_t(c), position);
      if (std::isnan(want)) {
        CHECK(std::isnan(got));
      } else {
        CHECK(bits(got) == bits(want));  // also the sign of zero
      }
    }
    nan += std::isnan(want);
    subnormal += (c & 0x78) == 0 && (c & 7) != 0;
    // bf16 pairs: (b0, b1), (b2, b3), each the exact value.
    const uint32_t word = uint32_t(c) | uint32_t(c ^ 0x80) << 8 | uint32_t((c + 1) & 0xff) << 16 | uint32_t(c) << 24;
    uint32_t p[2];
    q35k::e4m3x4_to_bf16x2(word, p);
    const uint8_t codes[4] = {uint8_t(c), uint8_t(c ^ 0x80), uint8_t((c + 1) & 0xff), uint8_t(c)};
    for (int i = 0; i < 4; ++i) {
      const uint16_t h = uint16_t(p[i / 2] >> (16 * (i % 2)));
      const float v = fp8_e4m3_to_f32(codes[i]);
      if (std::isnan(v))
        CHECK(std::isnan(bf16_to_f32(h)));
      else
        CHECK(h == f32_to_bf16(v));
    }
  }
  CHECK(nan == 2);         // 0x7f, 0xff
  CHECK(subnormal == 14);  // 0x01..0x07 and 0x81..0x87
  CHECK(device_f32(0x01, 0) == std::ldexp(1.f, -9));
  CHECK(device_f32(0x7e, 2) == 448.f);
  CHECK(std::signbit(device_f32(0x80, 3)));
  CHECK(device_f32(0x80, 3) == 0.f);
}

TEST_CASE("fp8.cuh: e4m3x16_dequant = bf16(fp8 * scale), rounded once") {
  std::mt19937 rng(7);
  for (float scale : {1.f, 0.0123f, 3.3e-5f, 1234.5f}) {
    for (int rep = 0; rep < 64; ++rep) {
      uint8_t codes[16];
      for (auto& c : codes) {
        c = uint8_t(rng());
        if ((c & 0x7f) == 0x7f) c ^= 1;  // no NaN
      }
      q35k::uint4 q;
      std::memcpy(&q, codes, 16);
      q35k::uint4 out[2];
      q35k::e4m3x16_dequant(q, scale, out);
      uint16_t got[16];
      std::memcpy(got, out, 32);
      for (int i = 0; i < 16; ++i) CHECK(got[i] == f32_to_bf16(fp8_e4m3_to_f32(codes[i]) * scale));
    }
  }
}

TEST_CASE("fp8.cuh: the device quantizer's rounding equals the host's fp8::e4m3_from_f32") {
  std::vector<float> xs = {0.f, -0.f, 1.f, -1.f, 448.f, -448.f, 449.f, 464.f, 480.f, 1e9f, -1e9f, INFINITY, -INFINITY,
                           NAN, -NAN, 1e-30f, -1e-30f, std::ldexp(1.f, -9), std::ldexp(1.f, -10), std::ldexp(3.f, -11),
                           std::ldexp(1.f, -6), 1e-45f, -1e-45f};
  // Every finite value, the midpoints between neighbours (ties), and just beside them.
  for (int c = 0; c < 0x7e; ++c) {
    const float a = fp8_e4m3_to_f32(uint8_t(c)), b = fp8_e4m3_to_f32(uint8_t(c + 1)), mid = (a + b) / 2;
    for (float v : {a, mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e9f)}) {
      xs.push_back(v);
      xs.push_back(-v);
    }
  }
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> expo(-14.f, 10.f);
  for (int i = 0; i < 100000; ++i) xs.push_back(std::exp2(expo(rng)) * (rng() % 2 ? 1.f : -1.f));
  int wrong = 0;
  for (float x : xs) {
    const uint8_t want = fp8::e4m3_from_f32(x), got = uint8_t(q35k::e4m3_from_f32(x));
    if (want != got && ++wrong <= 5) FAIL_CHECK("x = " << x << ": host 0x" << std::hex << int(want) << ", device 0x" << int(got));
  }
  CHECK(wrong == 0);
  CHECK(q35k::e4m3_from_f32(NAN) == 0x7f);
  CHECK(q35k::e4m3_from_f32(-0.f) == 0x00);
  CHECK(q35k::e4m3_from_f32(-1e-30f) == 0x80);
  CHECK(q35k::e4m3_from_f32(1e9f) == 0x7e);
  CHECK(q35k::e4m3_from_f32(std::ldexp(1.5f, -9)) == 0x02);  // a tie between codes 1 and 2: the even one
  CHECK(q35k::e4m3_from_f32(17.f) == 0x58);                  // 16 and 18 tie at 17: 16 (mantissa 0)
}

TEST_CASE("fp8 quantizer round trip: bf16 -> e4m3 with [1, 128] blocks -> fp32 within e4m3's precision") {
  const int64_t N = 24, K = 320;  // K: two whole 128-k blocks and a partial one of 64
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.f, 0.02f);
  std::vector<float> w(size_t(N * K));
  for (auto& v : w) v = round_bf16(dist(rng));
  for (int64_t k = 0; k < K; ++k) w[size_t(5 * K + k)] = 0.f;  // an all-zero row: scale 1, codes 0
  w[size_t(7 * K + 3)] = round_bf16(-3.5f);                      // an outlier in block (7, 0)
  const fp8::Quantized q = fp8::quantize(w, N, K, 1, fp8::kGpuBlockK);
  REQUIRE(q.scale_inv.size() == size_t(N * 3));
  const std::vector<float> back = fp8::dequantize(q.codes, q.scale_inv, N, K, 1, fp8::kGpuBlockK);
  double max_rel = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < 3; ++j) {
      float amax = 0;
      for (int64_t k = j * 128; k < std::min<int64_t>(K, (j + 1) * 128); ++k) amax = std::max(amax, std::fabs(w[size_t(n * K + k)]));
      const float s = q.scale_inv[size_t(n * 3 + j)];
      CHECK(s == (amax > 0 ? amax / 448.f : 1.f));
      for (int64_t k = j * 128; k < std::min<int64_t>(K, (j + 1) * 128); ++k) {
        const float a = w[size_t(n * K + k)], b = back[size_t(n * K + k)];
        // Half a step of e4m3: 2^-4 of the value in the normal range, 2^-10 of the scale below it.
        CHECK(std::fabs(a - b) <= std::max(std::fabs(a) * 0.0625f, s * std::ldexp(1.f, -10)) * 1.0001f);
        if (std::fabs(a) == amax && amax > 0) CHECK(std::fabs(b) == doctest::Approx(amax).epsilon(1e-6));
        if (std::fabs(a) > s) max_rel = std::max(max_rel, double(std::fabs(a - b) / std::fabs(a)));
      }
    }
  CHECK(max_rel <= 0.0625);
  CHECK(max_rel > 0.01);  // it does round
  for (int64_t k = 0; k < K; ++k) CHECK(q.codes[size_t(5 * K + k)] == 0);
  CHECK(q.scale_inv[5 * 3] == 1.f);
  CHECK(q.codes[size_t(7 * K + 3)] == 0xfe);  // -448 x scale = the outlier
}

TEST_CASE("fp8 GPU layout: a checkpoint's 128x128 block scales repeat over their rows, exactly") {
  const int64_t N = 300, K = 384, bn = 128, bk = 128;
  std::vector<float> s(3 * 3);
  for (size_t i = 0; i < s.size(); ++i) s[i] = 0.001f * float(i + 1);
  const std::vector<float> r = fp8::row_scales(s, N, K, bn, bk);
  REQUIRE(r.size() == size_t(N * 3));
  CHECK(r[0] == s[0]);
  CHECK(r[size_t(127 * 3 + 2)] == s[2]);
  CHECK(r[size_t(128 * 3 + 1)] == s[4]);
  CHECK(r[size_t(299 * 3 + 2)] == s[8]);
  // 256-k blocks: each covers two of the GPU's 128-k blocks.
  const std::vector<float> wide = fp8::row_scales(std::vector<float>{2.f, 3.f}, 2, 512, 2, 256);
  CHECK(wide == std::vector<float>{2.f, 2.f, 3.f, 3.f, 2.f, 2.f, 3.f, 3.f});
  // The codes times the per-row scales are the checkpoint's values.
  std::vector<uint8_t> codes(size_t(N * K));
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = uint8_t((i * 37) % 0x7e);
  CHECK(fp8::dequantize(codes, r, N, K, 1, 128) == fp8::dequantize(codes, s, N, K, bn, bk));
  // 64-k blocks straddle the GPU's 128-k ones.
  CHECK(contains(error_of([] { fp8::row_scales(std::vector<float>(2 * 4), 2, 256, 1, 64); }),
                 "weight_block_size[1] a multiple of 128"));
  CHECK(fp8::row_scales(std::vector<float>{5.f}, 1, 64, 1, 64) == std::vector<float>{5.f});  // K <= bk: one block
}
