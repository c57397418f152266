// The dense-projection kernels on the CPU (no GPU): every spec of dense_kernels() compiles to CUBIN
// for sm_80 and sm_90a at the tiny fixture's shapes and the 35B shapes, bf16 and W4A16; tile
// validity rules and defaults; the projection shapes derived from the config.
#include <doctest/doctest.h>

#include <set>

#include "autotune/tiles_dense.h"
#include "models/qwen35/config.h"
#include "models/qwen35/gpu/dense.h"
#include "runtime/core/error.h"
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
  CHECK(names == std::set<std::string>{"gemv_bf16", "gemv_bf16_f32", "gemv_w4a16", "gemv_w4a16_residual", "gemm_bf16",
                                       "quantize_w4", "dequantize_w4", "argmax_f32", "sample_f32"});
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
