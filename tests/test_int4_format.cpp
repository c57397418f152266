#include <doctest/doctest.h>

#include <cmath>
#include <random>

#include "runtime/core/error.h"
#include "runtime/core/half.h"
#include "runtime/core/int4_format.h"

using namespace q35;

TEST_CASE("int4: nibble slots hold offsets 0,2,4,6,1,3,5,7") {
  CHECK(int4::nibble_slot(0) == 0);
  CHECK(int4::nibble_slot(2) == 1);
  CHECK(int4::nibble_slot(6) == 3);
  CHECK(int4::nibble_slot(1) == 4);
  CHECK(int4::nibble_slot(7) == 7);
}

TEST_CASE("int4: a hand-made group packs to the expected word and scale") {
  // One row, K = G = 8: amax = 7.5 -> scale 1.0 exactly; q = rint(w) clamped to [-8, 7].
  std::vector<float> w = {7.5f, -7.5f, 0.5f, 1.5f, -0.49f, 2.f, 3.f, -7.f};
  int4::Quantized q = int4::quantize(w, 1, 8, 8);
  REQUIRE(q.scales.size() == 1);
  CHECK(bf16_to_f32(q.scales[0]) == 1.0f);
  // q = {7 (rint 8, clamped), -8 (rint -7.5 to even), 0 (half to even), 2, 0, 2, 3, -7}; u = q + 8.
  const int u[8] = {15, 0, 8, 10, 8, 10, 11, 1};
  uint32_t want = 0;
  for (int r = 0; r < 8; ++r) want |= uint32_t(u[r]) << (4 * int4::nibble_slot(r));
  CHECK(q.qweight[0] == want);
  std::vector<float> back = int4::dequantize(q, 1, 8, 8);
  CHECK(back == std::vector<float>{7.f, -8.f, 0.f, 2.f, 0.f, 2.f, 3.f, -7.f});
}

TEST_CASE("int4: round-trip error is within half a step per group") {
  const int64_t N = 6, K = 256;
  for (int64_t G : {32, 64, 128}) {
    std::mt19937 rng{unsigned(G)};
    std::normal_distribution<float> d(0.f, 0.02f);
    std::vector<float> w(size_t(N * K));
    for (auto& x : w) x = round_bf16(d(rng));
    int4::Quantized q = int4::quantize(w, N, K, G);
    std::vector<float> back = int4::dequantize(q, N, K, G);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const float s = bf16_to_f32(q.scales[size_t(n * (K / G) + k / G)]);
        const float e = std::fabs(back[size_t(n * K + k)] - w[size_t(n * K + k)]);
        // Half a step, plus 7.5 steps times the bf16 rounding of the scale (clamped extremes).
        CHECK(e <= 0.5f * s + 7.5f * s / 256.f);
      }
  }
}

TEST_CASE("int4: bad shapes are errors") {
  std::vector<float> w(64);
  CHECK_THROWS_AS(int4::quantize(w, 1, 64, 48), Error);
  CHECK_THROWS_AS(int4::quantize(w, 2, 64, 32), Error);
}
