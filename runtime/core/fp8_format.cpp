#include "runtime/core/fp8_format.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/error.h"
#include "runtime/core/half.h"

namespace q35::fp8 {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_shape(size_t values, int64_t N, int64_t K, int64_t bn, int64_t bk) {
  if (N <= 0 || K <= 0 || bn <= 0 || bk <= 0)
    fail("fp8: shape [{}, {}] and blocks [{}, {}] must be positive", N, K, bn, bk);
  if (values != size_t(N * K)) fail("fp8: weight has {} values, expected N * K = {} * {}", values, N, K);
}

}  // namespace

uint8_t e4m3_from_f32(float x) {
  if (std::isnan(x)) return 0x7f;
  const uint8_t sign = x < 0.f ? 0x80 : 0x00;  // -0 -> +0
  const float a = std::min(std::fabs(x), kMax);
  // Codes 0x00..0x7e are increasing in value: binary search for the two neighbours of a.
  int lo = 0, hi = 0x7e;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    (fp8_e4m3_to_f32(uint8_t(mid)) <= a ? lo : hi) = mid;
  }
  const float dl = a - fp8_e4m3_to_f32(uint8_t(lo)), dh = fp8_e4m3_to_f32(uint8_t(hi)) - a;
  const int code = dh < dl || (dh == dl && hi % 2 == 0) ? hi : lo;
  return uint8_t(sign | code);
}

Quantized quantize(std::span<const float> w, int64_t N, int64_t K, int64_t bn, int64_t bk) {
  check_shape(w.size(), N, K, bn, bk);
  const int64_t sn = ceil_div(N, bn), sk = ceil_div(K, bk);
  Quantized q{std::vector<uint8_t>(size_t(N * K)), std::vector<float>(size_t(sn * sk))};
  for (int64_t i = 0; i < sn; ++i)
    for (int64_t j = 0; j < sk; ++j) {
      float amax = 0.f;
      for (int64_t n = i * bn; n < std::min(N, (i + 1) * bn); ++n)
        for (int64_t k = j * bk; k < std::min(K, (j + 1) * bk); ++k) amax = std::max(amax, std::fabs(w[size_t(n * K + k)]));
      const float s = amax > 0.f ? amax / kMax : 1.f;
      q.scale_inv[size_t(i * sk + j)] = s;
      for (int64_t n = i * bn; n < std::min(N, (i + 1) * bn); ++n)
        for (int64_t k = j * bk; k < std::min(K, (j + 1) * bk); ++k)
          q.codes[size_t(n * K + k)] = e4m3_from_f32(w[size_t(n * K + k)] / s);
    }
  return q;
}

std::vector<float> dequantize(std::span<const uint8_t> codes, std::span<const float> scale_inv, int64_t N, int64_t K,
                              int64_t bn, int64_t bk) {
  check_shape(codes.size(), N, K, bn, bk);
  const int64_t sk = ceil_div(K, bk);
  if (scale_inv.size() != size_t(ceil_div(N, bn) * sk))
    fail("fp8: {} block scales, expected [{}, {}] for N = {}, K = {}, blocks {}x{}", scale_inv.size(), ceil_div(N, bn),
         sk, N, K, bn, bk);
  std::vector<float> w(size_t(N * K));
  for (int64_t n = 0; n < N; ++n) {
    const float* s = scale_inv.data() + (n / bn) * sk;
    for (int64_t k = 0; k < K; ++k) w[size_t(n * K + k)] = fp8_e4m3_to_f32(codes[size_t(n * K + k)]) * s[k / bk];
  }
  return w;
}

std::vector<float> row_scales(std::span<const float> scale_inv, int64_t N, int64_t K, int64_t bn, int64_t bk) {
  check_shape(size_t(N * K), N, K, bn, bk);
  if (bk % kGpuBlockK != 0 && K > bk)
    fail("fp8: weight blocks of {}x{} do not map onto the GPU's per-row blocks of {} k: a {}-k block would straddle "
         "two of them (--quant fp8 needs weight_block_size[1] a multiple of {}; use --quant w4a16 or bf16)",
         bn, bk, kGpuBlockK, kGpuBlockK, kGpuBlockK);
  const int64_t sk = ceil_div(K, bk), gk = ceil_div(K, kGpuBlockK);
  if (scale_inv.size() != size_t(ceil_div(N, bn) * sk))
    fail("fp8: {} block scales, expected [{}, {}] for N = {}, K = {}, blocks {}x{}", scale_inv.size(), ceil_div(N, bn),
         sk, N, K, bn, bk);
  std::vector<float> out(size_t(N * gk));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < gk; ++j) out[size_t(n * gk + j)] = scale_inv[size_t((n / bn) * sk + j * kGpuBlockK / bk)];
  return out;
}

}  // namespace q35::fp8
