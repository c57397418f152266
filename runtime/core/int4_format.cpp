#include "runtime/core/int4_format.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/error.h"
#include "runtime/core/half.h"

namespace q35::int4 {

namespace {
void check_shape(size_t size, int64_t N, int64_t K, int64_t group) {
  if (group <= 0 || group % 8 != 0) fail("int4: group size {} is not a positive multiple of 8", group);
  if (N <= 0 || K <= 0 || K % group != 0) fail("int4: K = {} is not a positive multiple of the group size {}", K, group);
  if (size != size_t(N * K)) fail("int4: weight has {} values, expected N * K = {} * {}", size, N, K);
}
}  // namespace

Quantized quantize(std::span<const float> w, int64_t N, int64_t K, int64_t group) {
  check_shape(w.size(), N, K, group);
  Quantized out;
  out.qweight.assign(size_t(N * K / 8), 0u);
  out.scales.resize(size_t(N * K / group));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < K / group; ++g) {
      const float* src = w.data() + n * K + g * group;
      float amax = 0.f;
      for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(src[i]));
      const uint16_t sb = f32_to_bf16(amax / 7.5f);
      out.scales[size_t(n * (K / group) + g)] = sb;
      const float scale = bf16_to_f32(sb);
      for (int64_t i = 0; i < group; ++i) {
        const int64_t k = g * group + i;
        const int q = scale == 0.f ? 0 : int(std::clamp(std::nearbyint(src[i] / scale), -8.f, 7.f));
        uint32_t& word = out.qweight[size_t(n * (K / 8) + k / 8)];
        word |= uint32_t(q + 8) << (4 * nibble_slot(int(k % 8)));
      }
    }
  }
  return out;
}

std::vector<float> dequantize(const Quantized& q, int64_t N, int64_t K, int64_t group) {
  std::vector<float> scales(q.scales.size());
  for (size_t i = 0; i < scales.size(); ++i) scales[i] = bf16_to_f32(q.scales[i]);
  return dequantize(q.qweight, scales, N, K, group);
}

std::vector<float> dequantize(std::span<const uint32_t> qweight, std::span<const float> scales, int64_t N, int64_t K,
                              int64_t group) {
  check_shape(size_t(N * K), N, K, group);
  if (qweight.size() != size_t(N * K / 8) || scales.size() != size_t(N * K / group))
    fail("int4: packed sizes ({} words, {} scales) do not match N = {}, K = {}, G = {}", qweight.size(),
         scales.size(), N, K, group);
  std::vector<float> w(size_t(N * K));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t word = qweight[size_t(n * (K / 8) + k / 8)];
      const int u = int((word >> (4 * nibble_slot(int(k % 8)))) & 0xf);
      w[size_t(n * K + k)] = float(u - 8) * scales[size_t(n * (K / group) + k / group)];
    }
  return w;
}

}  // namespace q35::int4
