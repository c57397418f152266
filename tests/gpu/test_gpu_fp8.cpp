// GPU: the FP8 (W8A16) kernels against CPU references on the same FP8 weights (runtime/core/fp8_format.h,
// blocks [1, 128]): the e4m3 conversion on all 256 codes (dequantize_fp8: NaN, subnormals, signed
// zeros; the decode GEMV's exact bf16 operands through one-hot inputs), quantize_fp8 bit-exact with
// fp8::quantize, gemv_fp8 (and its residual epilogue) at every projection shape of the tiny fixture
// and the 35B config, every tile of the tuner's space at the 35B shapes, and the prefill GEMMs
// (gemm_bf16 with FP8 weights; on sm_90a gemm_wgmma in the loop, plain, warp-specialised and
// swapped, and dequantize_fp8 + the bf16 GEMM above 1,024 rows). The upload keeps an FP8
// checkpoint's codes and scales byte for byte. The MoE kernels' FP8 tests are in test_gpu_moe.cpp,
// the model's in test_gpu_model.cpp and test_gpu_hf_quant.cpp. Timings at the 35B shapes are
// reported, not asserted.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "autotune/spaces.h"
#include "autotune/tiles_dense.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/gpu_weights.h"
#include "models/qwen35/hf_quant.h"
#include "models/qwen35/reference_ops.h"
#include "models/qwen35/weights.h"
#include "runtime/core/fp8_format.h"
#include "runtime/core/weight_format.h"
#include "runtime/io/safetensors.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/quant_checkpoint.h"

using namespace q35;
using namespace q35::gpu_test;
using namespace q35::qwen35;
using namespace q35::qwen35::gpu;

using q35::test::config_35b;
using q35::test::config_tiny;

namespace {

std::vector<DenseShape> all_shapes() {
  std::vector<DenseShape> s = dense_shapes(config_tiny()), big = dense_shapes(config_35b());
  s.insert(s.end(), big.begin(), big.end());
  return s;
}

// W [n, k] (bf16 values) in FP8 as the GPU quantizes it (fp8::quantize, bit-exact with quantize_fp8):
// codes, scales, the exact values (what the GEMVs compute with) and the bf16(fp8 * scale) values
// (what the dequantizing GEMMs compute with).
struct Fp8 {
  std::vector<uint8_t> codes;
  std::vector<float> scales, exact, rounded;
};
Fp8 to_fp8(const std::vector<uint16_t>& W, int64_t n, int64_t k) {
  std::vector<float> f(W.size());
  for (size_t i = 0; i < W.size(); ++i) f[i] = bf16_to_f32(W[i]);
  fp8::Quantized q = fp8::quantize(f, n, k, 1, fp8::kGpuBlockK);
  Fp8 out{std::move(q.codes), std::move(q.scale_inv), {}, {}};
  out.exact = fp8::dequantize(out.codes, out.scales, n, k, 1, fp8::kGpuBlockK);
  out.rounded = out.exact;
  for (float& v : out.rounded) v = round_bf16(v);
  return out;
}

// Rows `rows` of a row-major fp32 matrix [*, k].
std::vector<float> pick_rows(const std::vector<float>& m, int64_t k, const std::vector<int64_t>& rows) {
  std::vector<float> out;
  out.reserve(rows.size() * size_t(k));
  for (int64_t r : rows) out.insert(out.end(), m.begin() + r * k, m.begin() + (r + 1) * k);
  return out;
}

void precompile(Gpu& g, const std::vector<KernelSpec>& specs) { g.jit.compile_all(specs, g.ctx.device().arch(), 16); }

}  // namespace

TEST_CASE("GPU fp8: dequantize_fp8 is exact on all 256 codes (NaN, subnormals, signed zeros) and gives "
          "bf16(fp8 * scale); quantize_fp8 is bit-exact with fp8::quantize") {
  auto g = open_gpu();
  // Every code in every row (permuted), two 128-k blocks per row, scales 1 (the bare conversion) and others.
  const int64_t K = 256, rows = 4;
  std::vector<uint8_t> codes(size_t(rows * K));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < K; ++i) codes[size_t(r * K + i)] = uint8_t(i ^ (r * 0x35));
  const std::vector<float> scales = {1.f, 1.f, 0.0123f, 3.3e-5f, 417.5f, 1.f, 7.25e-3f, 0.5f};
  const QuantizePlan p = quantize_plan(K, kFp8Group);
  DeviceBuffer d_codes = to_device(*g, codes), d_scales = to_device(*g, scales), d_w = poisoned(*g, size_t(rows * K) * 2);
  launch_dequantize(p, g->jit.load(p.dequantize_spec(), g->ctx), g->stream, d_codes.ptr(), d_scales.ptr(), d_w.ptr(),
                    rows);
  const std::vector<uint16_t> w = to_host<uint16_t>(*g, d_w);
  int nan = 0, bad = 0, negative_zero = 0;
  for (int64_t i = 0; i < rows * K; ++i) {
    const float want = fp8_e4m3_to_f32(codes[size_t(i)]) * scales[size_t(i / 128)];
    if (std::isnan(want)) {
      nan += std::isnan(bf16_to_f32(w[size_t(i)]));
      continue;
    }
    bad += w[size_t(i)] != f32_to_bf16(want);
    negative_zero += w[size_t(i)] == 0x8000;
  }
  CHECK(bad == 0);
  CHECK(nan == 2 * rows);
  CHECK(negative_zero == rows);  // 0x80 with a positive scale: -0

  std::vector<KernelSpec> specs;
  std::vector<std::pair<int64_t, int64_t>> shapes;  // rows, K
  for (const DenseShape& s : all_shapes()) shapes.push_back({s.n, s.k});
  shapes.push_back({16 * 128, 64});  // the tiny experts' down: K = 64 < 128
  for (auto [n, k] : shapes) specs.push_back(quantize_plan(k, kFp8Group).quantize_spec());
  precompile(*g, specs);
  for (auto [n, k] : shapes) {
    CAPTURE(n);
    CAPTURE(k);
    std::vector<uint16_t> W = fast_random_bf16(size_t(n * k), 51, 0.08f);
    std::fill(W.begin(), W.begin() + std::min<int64_t>(k, 128), 0);  // an all-zero block: scale 1, codes 0
    W[size_t(k)] = f32_to_bf16(-3.5f);                                // an outlier: its block's -448
    const Fp8 want = to_fp8(W, n, k);
    const QuantizePlan q = quantize_plan(k, kFp8Group);
    DeviceBuffer d_W = to_device(*g, W), d_c = poisoned(*g, size_t(n * k)), d_s = poisoned(*g, want.scales.size() * 4);
    launch_quantize(q, g->jit.load(q.quantize_spec(), g->ctx), g->stream, d_W.ptr(), d_c.ptr(), d_s.ptr(), n);
    CHECK(to_host<uint8_t>(*g, d_c) == want.codes);
    const std::vector<float> got_s = to_host<float>(*g, d_s);
    CHECK(std::memcmp(got_s.data(), want.scales.data(), got_s.size() * 4) == 0);
  }
}

TEST_CASE("GPU fp8: gemv_fp8 turns every finite code into its exact bf16 operand (one-hot inputs)") {
  auto g = open_gpu();
  // 254 finite codes over 2 rows of K = 128 (a few repeated), each row its own scale; x = one-hot rows
  // e_k (16 tokens per launch), so y[t, n] = bf16(0 + fp8(code[n, k_t]) * scale[n]): one product, rounded
  // once, in a sum that starts at +0.
  const int64_t N = 16, K = 128;
  std::vector<uint8_t> codes(size_t(N * K));
  for (int64_t i = 0; i < N * K; ++i) {
    uint8_t c = uint8_t((i * 7) % 256);
    if ((c & 0x7f) == 0x7f) c ^= 1;
    codes[size_t(i)] = c;
  }
  std::vector<float> scales(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) scales[size_t(n)] = n == 0 ? 1.f : std::ldexp(1.f + 0.07f * float(n), -int(n % 9));
  DeviceBuffer d_c = to_device(*g, codes), d_s = to_device(*g, scales);
  const W4GemvPlan p = w4_gemv_plan(N, K, kFp8Group, 16);
  const Function f = g->jit.load(p.spec(), g->ctx);
  int bad = 0;
  std::string first;  // the first mismatches, for the report
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    std::vector<uint16_t> x(size_t(16 * K), 0);
    for (int64_t t = 0; t < 16; ++t) x[size_t(t * K + k0 + t)] = f32_to_bf16(1.f);
    DeviceBuffer d_x = to_device(*g, x), d_y = poisoned(*g, size_t(16 * N) * 2);
    launch(p, f, g->stream, d_c.ptr(), d_s.ptr(), d_x.ptr(), d_y.ptr(), 16);
    const std::vector<uint16_t> y = to_host<uint16_t>(*g, d_y);
    for (int64_t t = 0; t < 16; ++t)
      for (int64_t n = 0; n < N; ++n) {
        const uint8_t code = codes[size_t(n * K + k0 + t)];
        // The GEMV's fp32 sum starts at +0, and -0 + 0 = +0: code 0x80 (-0) comes out as +0, as any dot
        // product's would (the sign of zero itself: dequantize_fp8's test above).
        const uint16_t want = f32_to_bf16(0.f + fp8_e4m3_to_f32(code) * scales[size_t(n)]), got = y[size_t(t * N + n)];
        if (got == want) continue;
        if (++bad <= 8)
          first += fmt::format("\n  k {} n {} code 0x{:02x}: got 0x{:04x} ({}), want 0x{:04x} ({})", k0 + t, n, code, got,
                               bf16_to_f32(got), want, bf16_to_f32(want));
      }
  }
  CHECK_MESSAGE(bad == 0, fmt::format("{} of {} outputs differ (tile m {} rows {} k {} unroll {}):{}", bad, N * K,
                                      p.tile.m_tile, p.tile.row_warps, p.tile.k_warps, p.tile.unroll, first));
}

TEST_CASE("GPU fp8: gemv_fp8 at every projection shape, M = 1, 2, 5, 16, and its residual epilogue") {
  auto g = open_gpu();
  const float eps = 1e-6f;
  std::vector<KernelSpec> specs;
  for (const DenseShape& s : all_shapes()) {
    const bool logits = s.proj == DenseProj::LmHead;
    for (int M : {1, 2, 5, 8, 16}) {
      W4GemvPlan p = w4_gemv_plan(s.n, s.k, kFp8Group, M, logits);
      specs.push_back(p.spec());
      if (!logits && M <= 8) p.residual = true, specs.push_back(p.spec());
    }
  }
  precompile(*g, specs);
  DeviceBuffer counter(g->driver, 4);
  counter.fill_bytes(0, g->stream);
  for (const DenseShape& s : all_shapes()) {
    CAPTURE(s.name);
    CAPTURE(s.n);
    CAPTURE(s.k);
    const bool logits = s.proj == DenseProj::LmHead, big = s.n * s.k > (int64_t(1) << 22);
    const bool out_proj = s.proj == DenseProj::AttnOut || s.proj == DenseProj::GdnOut;
    const std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 61, 0.1f);
    const Fp8 q = to_fp8(W, s.n, s.k);
    DeviceBuffer d_c = to_device(*g, q.codes), d_s = to_device(*g, q.scales);
    const std::vector<int64_t> ni = sample_indices(s.n, 4096, 62);
    const std::vector<float> w_ref = pick_rows(q.exact, s.k, ni);
    for (int M : {1, 2, 5, 16}) {
      CAPTURE(M);
      const std::vector<uint16_t> x = fast_random_bf16(size_t(M) * s.k, 63 + M, 2.f);
      DeviceBuffer d_x = to_device(*g, x), d_y = poisoned(*g, size_t(M * s.n) * (logits ? 4 : 2));
      const W4GemvPlan p = w4_gemv_plan(s.n, s.k, kFp8Group, M, logits);
      const Function f = g->jit.load(p.spec(), g->ctx);
      launch(p, f, g->stream, d_c.ptr(), d_s.ptr(), d_x.ptr(), d_y.ptr(), M);
      const std::vector<float> y = logits ? to_host<float>(*g, d_y) : to_f32(to_host<uint16_t>(*g, d_y));
      std::vector<int64_t> mi(static_cast<size_t>(M));
      std::iota(mi.begin(), mi.end(), 0);
      CHECK(check_product(rows_f32(x, s.k, mi), w_ref, mi, ni, s.n, s.k, y) <= 1e-2);
      CHECK(std::all_of(y.begin(), y.end(), [](float v) { return std::isfinite(v); }));
      if (big && M == 1) {
        const double us = graph_us(*g, 8, [&](int) { launch(p, f, g->stream, d_c.ptr(), d_s.ptr(), d_x.ptr(), d_y.ptr(), M); });
        const double bytes = double(s.n * s.k) + double(q.scales.size()) * 4;
        MESSAGE(fmt::format("gemv_fp8 {} [{} x {}] M=1: {:.2f} us, {:.2f} MB -> {:.0f} GB/s (warm: the same weights "
                            "each launch)",
                            s.name, s.n, s.k, us, bytes * 1e-6, bytes / us * 1e-3));
      }
      if (!out_proj || M > 8) continue;
      // The residual epilogue: residual0 + bf16(y) exactly (same tile, same sums), then the RMSNorm.
      const std::vector<uint16_t> norm_w = random_bf16(size_t(s.n), 64, 0.5f);
      const std::vector<float> res0 = random_f32(size_t(M * s.n), 65 + M, 3.f);
      std::vector<float> want_res(res0.size()), want_normed(res0.size());
      for (size_t i = 0; i < res0.size(); ++i) want_res[i] = res0[i] + y[i];
      ref::rmsnorm(want_res, to_f32(norm_w), want_normed, M, s.n, eps);
      W4GemvPlan fused = p;
      fused.residual = true;
      DeviceBuffer d_nw = to_device(*g, norm_w), d_res = to_device(*g, res0), d_normed = poisoned(*g, size_t(M * s.n) * 2);
      launch(fused, g->jit.load(fused.spec(), g->ctx), g->stream, d_c.ptr(), d_s.ptr(), d_x.ptr(),
             ResidualNorm{d_res.ptr(), d_nw.ptr(), d_normed.ptr(), counter.ptr(), eps}, M);
      const std::vector<float> got_res = to_host<float>(*g, d_res);
      CHECK(std::memcmp(got_res.data(), want_res.data(), got_res.size() * 4) == 0);
      CHECK(rel_l2(to_f32(to_host<uint16_t>(*g, d_normed)), want_normed) <= 2e-3);
      CHECK(to_host<int32_t>(*g, counter)[0] == 0);
    }
  }
}

// The decode step's FP8 GEMVs (GpuModel::dense with decode rows): gemv_fp8 with w4_decode_tile (the
// M = 1 tile's K split at every T, 4 tokens per block in one mma column tile: one scale block per 128-k tile),
// plain and with the residual epilogue, at every projection shape, T = 1, 3, 8, 9, 16, 37, 64 against
// the CPU reference; every row of T = 16 and 64 bit-identical to that row alone (T = 1), which is what
// makes a batched FP8 decode step give each sequence the logits it gets alone.
TEST_CASE("GPU fp8: decode-step gemv_fp8 at every projection shape, T up to 64; rows of T = 16 / 64 == each row "
          "alone") {
  auto g = open_gpu();
  std::vector<KernelSpec> specs;
  for (const DenseShape& s : all_shapes())
    for (int T : {1, 2}) {
      W4GemvPlan p = w4_gemv_plan(s.n, s.k, kFp8Group, 1, s.proj == DenseProj::LmHead);
      p.tile = w4_decode_tile(p.tile, kFp8Group, T);
      specs.push_back(p.spec());
      p.residual = true;
      if (s.proj == DenseProj::AttnOut || s.proj == DenseProj::GdnOut) specs.push_back(p.spec());
    }
  precompile(*g, specs);
  CHECK(w4_decode_tile(W4GemvTile{}, kFp8Group, 64).m_tile == 4);
  DeviceBuffer counter(g->driver, 4);
  counter.fill_bytes(0, g->stream);
  const float eps = 1e-6f;
  for (const DenseShape& s : all_shapes()) {
    CAPTURE(s.name);
    CAPTURE(s.n);
    CAPTURE(s.k);
    const bool logits = s.proj == DenseProj::LmHead;
    const bool out_proj = s.proj == DenseProj::AttnOut || s.proj == DenseProj::GdnOut;
    const size_t out_bytes = logits ? 4 : 2;
    const std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 81, 0.1f);
    const Fp8 q = to_fp8(W, s.n, s.k);
    DeviceBuffer d_c = to_device(*g, q.codes), d_s = to_device(*g, q.scales);
    const std::vector<int64_t> ni = sample_indices(s.n, 2048, 82);
    const std::vector<float> w_ref = pick_rows(q.exact, s.k, ni);
    const std::vector<uint16_t> x = fast_random_bf16(size_t(64 * s.k), 83, 2.f);
    DeviceBuffer d_x = to_device(*g, x);
    auto plan = [&](int T) {
      W4GemvPlan p = w4_gemv_plan(s.n, s.k, kFp8Group, 1, logits);
      p.tile = w4_decode_tile(p.tile, kFp8Group, T);
      return p;
    };
    auto run = [&](int T, CUdeviceptr xp, const DeviceBuffer& y) {
      const W4GemvPlan p = plan(T);
      launch(p, g->jit.load(p.spec(), g->ctx), g->stream, d_c.ptr(), d_s.ptr(), xp, y.ptr(), T);
    };
    for (int T : {1, 3, 8, 9, 16, 37, 64}) {
      CAPTURE(T);
      DeviceBuffer d_y = poisoned(*g, size_t(T * s.n) * out_bytes);
      run(T, d_x.ptr(), d_y);
      const std::vector<float> y = logits ? to_host<float>(*g, d_y) : to_f32(to_host<uint16_t>(*g, d_y));
      std::vector<int64_t> mi(static_cast<size_t>(T));
      std::iota(mi.begin(), mi.end(), 0);
      CHECK(check_product(rows_f32(x, s.k, mi), w_ref, mi, ni, s.n, s.k, y) <= 1e-2);
      if (out_proj) {  // the residual epilogue: residual0 + bf16(y) exactly, then the RMSNorm
        const std::vector<uint16_t> norm_w = random_bf16(size_t(s.n), 84, 0.5f);
        const std::vector<float> res0 = random_f32(size_t(T * s.n), 85 + T, 3.f);
        std::vector<float> want_res(res0.size()), want_normed(res0.size());
        for (size_t i = 0; i < res0.size(); ++i) want_res[i] = res0[i] + y[i];
        ref::rmsnorm(want_res, to_f32(norm_w), want_normed, T, s.n, eps);
        W4GemvPlan fused = plan(T);
        fused.residual = true;
        DeviceBuffer d_nw = to_device(*g, norm_w), d_res = to_device(*g, res0),
                     d_normed = poisoned(*g, size_t(T * s.n) * 2);
        launch(fused, g->jit.load(fused.spec(), g->ctx), g->stream, d_c.ptr(), d_s.ptr(), d_x.ptr(),
               ResidualNorm{d_res.ptr(), d_nw.ptr(), d_normed.ptr(), counter.ptr(), eps}, T);
        const std::vector<float> got_res = to_host<float>(*g, d_res);
        CHECK(std::memcmp(got_res.data(), want_res.data(), got_res.size() * 4) == 0);
        CHECK(rel_l2(to_f32(to_host<uint16_t>(*g, d_normed)), want_normed) <= 2e-3);
        CHECK(to_host<int32_t>(*g, counter)[0] == 0);
      }
      if (T != 16 && T != 64) continue;
      CHECK(rows_unlike_alone(*g, to_host<uint8_t>(*g, d_y), size_t(s.n) * out_bytes, int(T), [&](int r, DeviceBuffer& one) {
              run(1, d_x.ptr() + size_t(r) * size_t(s.k) * 2, one);
            }) == 0);
    }
  }
}

TEST_CASE("GPU fp8: gemv_fp8 tiles of the tuner's space at the 35B shapes (M = 1, 16): each correct") {
  auto g = open_gpu();
  for (const DenseShape& s : dense_shapes(config_35b())) {
    if (s.proj == DenseProj::LmHead) continue;  // its space is the same rule over more rows
    CAPTURE(s.name);
    const std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 71, 0.1f);
    const Fp8 q = to_fp8(W, s.n, s.k);
    DeviceBuffer d_c = to_device(*g, q.codes), d_s = to_device(*g, q.scales);
    const std::vector<int64_t> ni = sample_indices(s.n, 1024, 72);
    const std::vector<float> w_ref = pick_rows(q.exact, s.k, ni);
    for (int M : {1, 16}) {
      const std::vector<W4GemvTile> tiles = tune::w4_gemv_candidates(s.n, s.k, kFp8Group, M);
      std::vector<KernelSpec> specs;
      for (const W4GemvTile& t : tiles) specs.push_back(gemv_fp8_spec(s.n, s.k, t));
      precompile(*g, specs);
      const std::vector<uint16_t> x = fast_random_bf16(size_t(M) * s.k, 73 + M, 2.f);
      std::vector<int64_t> mi(static_cast<size_t>(M));
      std::iota(mi.begin(), mi.end(), 0);
      for (const W4GemvTile& t : tiles) {
        CAPTURE(M);
        CAPTURE(t.row_warps);
        CAPTURE(t.k_warps);
        CAPTURE(t.unroll);
        DeviceBuffer d_x = to_device(*g, x), d_y = poisoned(*g, size_t(M * s.n) * 2);
        const W4GemvPlan p{s.n, s.k, kFp8Group, t};
        launch(p, g->jit.load(p.spec(), g->ctx), g->stream, d_c.ptr(), d_s.ptr(), d_x.ptr(), d_y.ptr(), M);
        CHECK(check_product(rows_f32(x, s.k, mi), w_ref, mi, ni, s.n, s.k, to_f32(to_host<uint16_t>(*g, d_y))) <= 1e-2);
      }
    }
  }
}

TEST_CASE("GPU fp8: prefill GEMMs with FP8 weights: gemm_bf16 in the loop; sm_90a gemm_wgmma in the loop (plain, "
          "warp-specialised, swapped) and dequantize_fp8 + bf16 above 1,024 rows") {
  auto g = open_gpu();
  const bool hopper = g->ctx.device().arch() == "sm_90a";
  struct Case {
    DenseShape s;
    int64_t M;
    GemmTile tile;
    int group;  // kFp8Group: in the loop; 0: the bf16 GEMM after dequantize_fp8
  };
  std::vector<Case> cases;
  for (const DenseShape& s : all_shapes()) {
    const bool logits = s.proj == DenseProj::LmHead;
    if (logits && s.n * s.k > (int64_t(1) << 22)) continue;  // eval logits of the 35B lm_head: 4096 x 248320 fp32
    for (int64_t M : {17, 64, 200, 4096}) {
      cases.push_back({s, M, default_gemm_tile(s.n, s.k, M), kFp8Group});
      if (!hopper) continue;
      const GemmPlan w = gemm_plan(s.n, s.k, M, logits, true, kFp8Group);
      cases.push_back({s, M, w.tile, wgmma_gemm_group(kFp8Group, M, s.k)});
      if (M == 4096) cases.push_back({s, M, w.tile, kFp8Group});  // the in-loop form at large M too
    }
    if (!hopper || logits) continue;
    // Other wgmma forms at M = 200: warp-specialised 128 x 256 (3 stages: FP8's raw rows are twice
    // W4A16's) and 64 x 128, swapped 32-row panels with 2 steps per stage.
    for (const GemmTile& t : {GemmTile{128, 256, 64, 2, 1, 3, true, true}, GemmTile{64, 128, 64, 1, 1, 4, true, true},
                              GemmTile{32, 128, 64, 1, 2, 4, true, true, true, 2}})
      if (why_invalid(t, s.n, s.k, kFp8Group).empty()) cases.push_back({s, 200, t, kFp8Group});
  }
  std::vector<KernelSpec> specs;
  for (const Case& c : cases) {
    specs.push_back(GemmPlan{c.s.n, c.s.k, c.tile, c.s.proj == DenseProj::LmHead, c.group}.spec());
    if (c.group == 0) specs.push_back(quantize_plan(c.s.k, kFp8Group).dequantize_spec());
  }
  precompile(*g, specs);
  std::map<std::pair<int64_t, int64_t>, std::pair<std::vector<uint16_t>, Fp8>> weights;
  for (const Case& c : cases) {
    const DenseShape& s = c.s;
    const bool f32 = s.proj == DenseProj::LmHead;
    CAPTURE(s.name);
    CAPTURE(s.n);
    CAPTURE(s.k);
    CAPTURE(c.M);
    CAPTURE(c.tile.wgmma);
    CAPTURE(c.tile.ws);
    CAPTURE(c.tile.swap);
    CAPTURE(c.group);
    auto& [W, q] = weights[{s.n, s.k}];
    if (W.empty()) W = fast_random_bf16(size_t(s.n * s.k), 81, 0.1f), q = to_fp8(W, s.n, s.k);
    const std::vector<uint16_t> x = fast_random_bf16(size_t(c.M * s.k), 82, 2.f);
    DeviceBuffer d_c = to_device(*g, q.codes), d_s = to_device(*g, q.scales), d_x = to_device(*g, x),
                 d_y = poisoned(*g, size_t(c.M * s.n) * (f32 ? 4 : 2));
    const GemmPlan p{s.n, s.k, c.tile, f32, c.group};
    const Function f = g->jit.load(p.spec(), g->ctx);
    prepare(p, f);
    DeviceBuffer d_deq;
    // The dequantizer loaded here, not inside run(): a module load during the timed graph's stream
    // capture invalidates the capture.
    const QuantizePlan dq = quantize_plan(s.k, kFp8Group);
    const Function dqf = g->jit.load(dq.dequantize_spec(), g->ctx);
    auto run = [&] {
      if (c.group != 0) {
        launch(p, f, g->stream, d_x.ptr(), d_c.ptr(), d_y.ptr(), int(c.M), d_s.ptr());
        return;
      }
      launch_dequantize(dq, dqf, g->stream, d_c.ptr(), d_s.ptr(), d_deq.ptr(), s.n);
      launch(p, f, g->stream, d_x.ptr(), d_deq.ptr(), d_y.ptr(), int(c.M));
    };
    if (c.group == 0) d_deq = DeviceBuffer(g->driver, size_t(s.n * s.k) * 2);
    run();
    const std::vector<float> y = f32 ? to_host<float>(*g, d_y) : to_f32(to_host<uint16_t>(*g, d_y));
    const std::vector<int64_t> mi = sample_indices(c.M, 48, 83), ni = sample_indices(s.n, 4096, 84);
    // The GEMMs multiply bf16(fp8 * scale) (rounded once, as dequantize_fp8).
    CHECK(check_product(rows_f32(x, s.k, mi), pick_rows(q.rounded, s.k, ni), mi, ni, s.n, s.k, y) <= 1e-2);
    CHECK(std::all_of(y.begin(), y.end(), [](float v) { return std::isfinite(v); }));
    if (c.M == 4096 && s.n * s.k > (int64_t(1) << 22)) {
      const double us = graph_us(*g, 5, [&](int) { run(); });
      MESSAGE(fmt::format("{} FP8 {} {} [{} x {}] M=4096: {:.1f} us, {:.0f} TFLOP/s", c.tile.wgmma ? "gemm_wgmma" : "gemm_bf16",
                          c.group ? "in the loop" : "dequantized first", s.name, s.n, s.k, us,
                          2.0 * c.M * s.n * s.k / us * 1e-6));
    }
  }
}

TEST_CASE("GPU fp8: the upload keeps an FP8 checkpoint's codes and scales, and quantizes its bf16 tensors") {
  auto g = open_gpu();
  const Config c = config_tiny();
  q35::test::TempDir dir("gpu-fp8-upload");
  q35::test::write_quantized(dir.path(), c, QuantMethod::FP8, 32, 1, 7, 128);
  Checkpoint ckpt(dir.path());
  validate_checkpoint(c, ckpt);
  UploadOptions up;
  up.format = WeightFormat::FP8;
  up.quantize = [&](CUdeviceptr src, int64_t rows, int64_t K, int group, CUdeviceptr codes, CUdeviceptr scales) {
    const QuantizePlan p = quantize_plan(K, group);
    launch_quantize(p, g->jit.load(p.quantize_spec(), g->ctx), g->stream, src, codes, scales, rows);
  };
  const GpuWeights w = upload_weights(g->driver, g->stream, c, ckpt, up);
  g->stream.synchronize();
  const HfQuant quant = HfQuant::of(ckpt);
  const std::string L = "model.language_model.layers.0.mlp.";
  // Expert 3's up_proj (FP8 in the checkpoint): rows I .. 2I of expert 3 in the fused gate|up matrix.
  const int64_t I = c.moe_intermediate_size, H = c.hidden_size, spr = (H + 127) / 128;
  const std::string up_name = L + "experts.3.up_proj.weight";
  REQUIRE(check_weight(ckpt, quant, up_name, {I, H}) == Storage::FP8);
  const std::vector<uint8_t> codes = to_host<uint8_t>(*g, w.layers[0].experts_gate_up.codes);
  const std::vector<float> scales = to_host<float>(*g, w.layers[0].experts_gate_up.scales);
  const TensorRef t = ckpt.get(up_name);
  const size_t row0 = size_t(3 * 2 * I + I);
  CHECK(std::equal(t.bytes.begin(), t.bytes.end(), codes.begin() + row0 * H));
  const std::vector<float> rs = fp8::row_scales(to_f32(ckpt.get(L + "experts.3.up_proj.weight_scale_inv")), I, H,
                                                quant.fp8_block_n, quant.fp8_block_k);
  CHECK(std::equal(rs.begin(), rs.end(), scales.begin() + row0 * spr));
  // lm_head is bf16 in the checkpoint: quantized on the GPU, bit-exact with the host quantizer.
  const std::vector<float> lm = read_weight_f32(ckpt, quant, "lm_head.weight", {c.vocab_size, H});
  const fp8::Quantized want = fp8::quantize(lm, c.vocab_size, H, 1, fp8::kGpuBlockK);
  CHECK(to_host<uint8_t>(*g, w.lm_head.codes) == want.codes);
  CHECK(to_host<float>(*g, w.lm_head.scales) == want.scale_inv);
}
