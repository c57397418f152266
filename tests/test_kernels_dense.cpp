// The dense-projection kernels on the CPU (no GPU): every spec of dense_kernels() compiles to CUBIN
// for sm_80 and sm_90a at the tiny fixture's shapes and the 35B shapes, bf16 and W4A16; tile
// validity rules and defaults; the projection shapes derived from the config.
#include <doctest/doctest.h>

#include <cmath>
#include <set>

#include "autotune/tiles_dense.h"
#include "models/qwen35/config.h"
#include "models/qwen35/gpu/dense.h"
#include "runtime/core/error.h"
#include "runtime/core/half.h"
#include "runtime/jit/jit_engine.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
using namespace q35::qwen35::gpu;

using q35::test::config_35b;
using q35::test::config_tiny;
using q35::test::error_of;

namespace {



}  // namespace

TEST_CASE("dense_shapes lists the fused projections of the config") {
  std::vector<DenseShape> big = dense_shapes(config_35b());
  REQUIRE(big.size() == 5);
  CHECK(big[0].n == 16 * 512 + 2 * 2 * 256);  // q|gate (16 x 512) + k + v (2 x 256 each)
  CHECK(big[0].k == 2048);
  CHECK((big[1].n == 2048 && big[1].k == 4096));
  CHECK(big[2].n == 12352);  // conv_dim 8192 + z 4096 + b 32 + a 32
  CHECK((big[3].n == 2048 && big[3].k == 4096));
  CHECK((big[4].n == 248320 && big[4].k == 2048));

  std::vector<DenseShape> tiny = dense_shapes(config_tiny());
  REQUIRE(tiny.size() == 5);
  CHECK((tiny[0].n == 2 * 512 + 2 * 256 && tiny[0].k == 128));
  CHECK((tiny[1].n == 128 && tiny[1].k == 512));
  CHECK(tiny[2].n == 2 * 256 + 512 + 512 + 8);  // conv (q 2x128, k 2x128, v 4x128) + z + b + a
  CHECK((tiny[4].n == 1536 && tiny[4].k == 128));
}

TEST_CASE("dense tile validity rules and defaults") {
  // GEMM
  CHECK(why_invalid(GemmTile{}, 12352, 2048).empty());
  CHECK(why_invalid(GemmTile{}, 2048, 12).find("multiple of 8") != std::string::npos);
  CHECK(why_invalid(GemmTile{128, 128, 48, 2, 4, 4}, 2048, 2048).find("bk = 48") != std::string::npos);
  CHECK(why_invalid(GemmTile{96, 128, 64, 4, 4, 4}, 2048, 2048).find("bm = 96") != std::string::npos);
  CHECK(why_invalid(GemmTile{256, 256, 64, 2, 2, 3}, 2048, 2048).find("accumulators") != std::string::npos);
  CHECK(why_invalid(GemmTile{128, 256, 64, 2, 4, 4}, 2048, 2048).find("shared memory") != std::string::npos);
  CHECK(why_invalid(GemmTile{128, 128, 64, 2, 4, 1}, 2048, 2048).find("stages") != std::string::npos);
  for (int64_t m : {1, 17, 64, 200, 4096})
    for (auto [n, k] : {std::pair<int64_t, int64_t>{12352, 2048}, {2048, 4096}, {1088, 128}, {8, 32}, {248320, 2048}})
      CHECK(why_invalid(default_gemm_tile(n, k, m), n, k).empty());
  const GemmTile prefill = default_gemm_tile(12352, 2048, 4096);
  CHECK((prefill.bm == 128 && prefill.bn == 128 && prefill.bk == 32 && prefill.stages == 4));
  CHECK(prefill.smem_bytes() == 4 * 256 * 32 * 2);
  CHECK(default_gemm_tile(12352, 2048, 17).bm == 64);
  CHECK(default_gemm_tile(8, 2048, 4096).bn == 64);

  // W4A16 GEMV
  CHECK(why_invalid(W4GemvTile{}, 2048, 2048, 128).empty());
  CHECK(why_invalid(W4GemvTile{}, 2048, 2048, 16).find("group size 16") != std::string::npos);
  CHECK(why_invalid(W4GemvTile{}, 2048, 2080, 64).find("multiple of the group size") != std::string::npos);
  CHECK(why_invalid(W4GemvTile{17, 1, 4, 4}, 2048, 2048, 32).find("m_tile = 17") != std::string::npos);
  CHECK(why_invalid(W4GemvTile{1, 4, 16, 1}, 2048, 2048, 32).find("warps") != std::string::npos);
  CHECK(why_invalid(W4GemvTile{1, 1, 32, 1}, 2048, 2048, 128).find("exceeds the 16 128-k tiles") != std::string::npos);
  CHECK(why_invalid(W4GemvTile{1, 1, 4, 9}, 2048, 2048, 128).find("unroll = 9") != std::string::npos);
  // M = 16 at G32: 64 columns (token x group) = 8 column tiles of the mma leave room for unroll 1 only.
  CHECK(why_invalid(W4GemvTile{16, 1, 4, 1}, 2048, 2048, 32).empty());
  CHECK(why_invalid(W4GemvTile{16, 1, 4, 2}, 2048, 2048, 32).find("column tiles = 2 * 8") != std::string::npos);
  for (int m : {1, 2, 5, 16})
    for (int64_t g : {32, 64, 128})
      for (auto [n, k] : {std::pair<int64_t, int64_t>{2048, 4096}, {9216, 2048}, {248320, 2048}, {1544, 128}, {128, 512}}) {
        W4GemvTile t = default_w4_gemv_tile(n, k, g, m);
        CHECK(why_invalid(t, n, k, g).empty());
        CHECK(t.m_tile >= m);
        // Every warp gets whole runs of `unroll` tiles.
        CHECK(((k + 127) / 128) % (int64_t(t.k_warps) * t.unroll) == 0);
      }
  // K = 2048 (16 tiles of 128) splits into 4 runs of 4 tiles; the 128 row sets of o_proj are too few
  // warps for 4 runs of K = 4096, so it takes 16 runs of 2 tiles.
  CHECK(default_w4_gemv_tile(12352, 2048, 128, 1).k_warps == 4);
  CHECK(default_w4_gemv_tile(12352, 2048, 128, 1).unroll == 2);
  CHECK(default_w4_gemv_tile(248320, 2048, 128, 1).unroll == 4);  // many waves: 4 tiles at once
  const W4GemvTile o = default_w4_gemv_tile(2048, 4096, 128, 1);
  CHECK((o.k_warps == 16 && o.unroll == 2 && o.rows_per_block() == 16));
  CHECK(default_w4_gemv_tile(248320, 2048, 32, 1).threads() == 128);
  CHECK(error_of([] { default_w4_gemv_tile(2048, 2048, 32, 17); }).find("m = 17") != std::string::npos);

  // W4A16 GEMV with the gated-norm input (the DeltaNet out_proj of a decode step).
  CHECK(why_invalid_gated(o, 2048, 4096, 128, 128).empty());
  CHECK(why_invalid_gated(W4GemvTile{1, 1, 2, 2}, 128, 512, 64, 128).empty());  // the tiny fixture's shape
  CHECK(why_invalid_gated(W4GemvTile{8, 1, 16, 2}, 2048, 4096, 128, 128).find("m_tile = 8 is not 1") != std::string::npos);
  CHECK(why_invalid_gated(o, 2048, 4096, 128, 96).find("value head dim 96") != std::string::npos);
  CHECK(why_invalid_gated(o, 2048, 4224, 128, 256).find("K = 4224 is not a whole number of value heads of 256") !=
        std::string::npos);
  // The x row lives in static shared memory: K = 24576 (48 KiB of bf16) leaves no room for the reduction.
  CHECK(why_invalid_gated(W4GemvTile{1, 1, 16, 2}, 2048, 24576, 128, 128).find("shared memory") != std::string::npos);
  CHECK(why_invalid_gated(W4GemvTile{1, 1, 16, 2}, 2048, 16384, 128, 128).empty());
  CHECK(why_invalid_gated(W4GemvTile{1, 1, 4, 9}, 2048, 4096, 128, 128).find("unroll = 9") != std::string::npos);
  const KernelSpec gated = gemv_w4a16_gated_spec(2048, 4096, 128, o, 128);
  CHECK(gated.kernel == "gemv_w4a16_gated");
  CHECK(gated.instantiation() == "gemv_w4a16_gated<2048, 4096, 128, 1, 1, 16, 2, 128>");
  CHECK(error_of([] { gemv_w4a16_gated_spec(2048, 4096, 128, W4GemvTile{2, 1, 16, 2}, 128); })
            .find("gemv_w4a16_gated [N = 2048, K = 4096, G = 128, dv = 128]: invalid tile: m_tile = 2") != std::string::npos);
  const W4GemvPlan gated_plan{2048, 4096, 128, o, false, false, 128};
  CHECK(gated_plan.spec() == gated);

  // quantize / sample
  CHECK(why_invalid(QuantizeTile{}, 2048, 128).empty());
  CHECK(why_invalid(QuantizeTile{}, 2048, 24).find("group size 24") != std::string::npos);
  CHECK(why_invalid(QuantizeTile{100}, 2048, 32).find("threads = 100") != std::string::npos);
  CHECK(why_invalid(default_sample_tile(248320), 248320).empty());
  CHECK(why_invalid(SampleTile{}, int64_t(1) << 24).find("vocab") != std::string::npos);
  CHECK(error_of([] { gemm_bf16_spec(2048, 2048, GemmTile{128, 128, 64, 2, 4, 1}); }).find("gemm_bf16 [N = 2048")
        != std::string::npos);
}

TEST_CASE("every dense kernel compiles for sm_80 and sm_90a at the fixture and 35B shapes") {
  q35::test::TempDir tmp("dense-jit");
  JitOptions opts;
  opts.kernel_dir = std::filesystem::path(Q35_SOURCE_DIR) / "kernel_templates";
  JitEngine jit(tmp.path(), opts);
  std::vector<KernelSpec> specs;
  std::set<std::string> names;
  for (const Config& cfg : {config_tiny(), config_35b()})
    for (int group : {0, 32, 64, 128})
      for (int m : {1, 16}) {
        for (KernelSpec& s : dense_kernels(cfg, DenseOptions{group, m, m == 1 ? 4096 : 17}))
          if (std::find(specs.begin(), specs.end(), s) == specs.end()) specs.push_back(std::move(s));
      }
  for (const KernelSpec& s : specs) names.insert(s.kernel);
  CHECK(names == std::set<std::string>{"gemv_bf16", "gemv_bf16_f32", "gemv_w4a16", "gemv_w4a16_residual",
                                       "gemv_w4a16_gated", "gemm_bf16", "quantize_w4", "dequantize_w4", "argmax_f32",
                                       "sample_f32"});
  MESSAGE(specs.size() << " dense kernel instantiations");
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    std::vector<CompiledKernel> out = jit.compile_all(specs, arch, 2);
    REQUIRE(out.size() == specs.size());
    for (const CompiledKernel& k : out) {
      CHECK(k.cubin.size() > 64);
      CHECK(!k.lowered_name.empty());
    }
  }
}

// The CPU reference of gemv_w4a16_gated's input: per value head, bf16(o * rsqrt(mean(o^2) + eps) *
// w * silu(z)), z read from rows of z_stride elements. A head of equal values c has mean(o^2) = c^2,
// so x = c / sqrt(c^2 + eps) * w * silu(z) in closed form.
TEST_CASE("gated_norm_input: the gated RMSNorm per value head, z from strided rows, rounded to bf16") {
  const int64_t T = 2, hv = 3, dv = 4, z_stride = hv * dv + 5;
  const float eps = 1e-6f;
  std::vector<float> o(size_t(T * hv * dv));
  std::vector<uint16_t> z(size_t(T * z_stride), f32_to_bf16(1000.f));  // the 5 columns past a row's z: never read
  const std::vector<uint16_t> w = {f32_to_bf16(1.f), f32_to_bf16(0.5f), f32_to_bf16(-2.f), f32_to_bf16(1.25f)};
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < hv; ++h)
      for (int64_t i = 0; i < dv; ++i) {
        o[size_t((t * hv + h) * dv + i)] = float(1 + t + 2 * h);  // each head constant
        z[size_t(t * z_stride + h * dv + i)] = f32_to_bf16(0.25f * float(i + h) - float(t));
      }
  const std::vector<float> x = gated_norm_input(o, z, z_stride, w, T, hv, dv, eps);
  REQUIRE(x.size() == o.size());
  int wrong = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < hv; ++h)
      for (int64_t i = 0; i < dv; ++i) {
        const double c = 1 + t + 2 * h, zz = 0.25 * double(i + h) - double(t), wi = bf16_to_f32(w[size_t(i)]);
        const double want = c / std::sqrt(c * c + eps) * wi * (zz / (1 + std::exp(-zz)));
        const float got = x[size_t((t * hv + h) * dv + i)];
        wrong += got != round_bf16(got) || std::fabs(got - want) > 4e-3 * std::fabs(want);
      }
  CHECK(wrong == 0);
  // One value of head 1 of token 0 doubled: that head's dv outputs change (its mean square), no other.
  std::vector<float> o2 = o;
  o2[size_t(dv)] *= 2.f;
  const std::vector<float> x2 = gated_norm_input(o2, z, z_stride, w, T, hv, dv, eps);
  int changed_outside = 0, changed_inside = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const bool inside = i >= size_t(dv) && i < size_t(2 * dv);
    (inside ? changed_inside : changed_outside) += x2[i] != x[i];
  }
  CHECK(changed_outside == 0);
  CHECK(changed_inside == dv);
  CHECK(error_of([&] { gated_norm_input(o, z, hv * dv - 1, w, T, hv, dv, eps); }).find("z_stride") != std::string::npos);
  CHECK(error_of([&] { gated_norm_input(o, z, z_stride, w, T + 1, hv, dv, eps); }).find("o has 24 values (expected 36)") !=
        std::string::npos);
}
