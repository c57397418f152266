// The Hopper GEMM (kernel_templates/wgmma_gemm.cuh) on the CPU, no GPU: every instantiation the
// runner and the tuner use on sm_90a compiles through NVRTC with no register spills and no stack
// frame (ptxas -v), and its SASS shows the warpgroup MMA (HGMMA; read by cuobjdump from PyPI's
// nvidia-cuda-cuobjdump, path in $Q35_CUOBJDUMP, which `make test` sets from the test venv).
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cstdio>
#include <fstream>
#include <regex>
#include <set>

#include "autotune/spaces.h"
#include "autotune/tiles_wgmma.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/gpu/moe.h"
#include "models/qwen35/kernels.h"
#include "runtime/jit/jit_engine.h"
#include "tests/ptxas_checks.h"
#include "tests/test_util.h"
#include "tests/synthetic_checkpoint.h"

using namespace q35;
using namespace q35::qwen35;
using q35::test::config_35b;
using q35::test::config_tiny;
using q35::test::contains;

namespace {

bool is_wgmma(const KernelSpec& s) { return s.family == "wgmma_gemm"; }


}  // namespace

TEST_CASE("sm_90a: the runner's kernel list uses gemm_wgmma for every prefill GEMM; sm_80 never does") {
  for (int group : {0, 32, 128}) {
    CAPTURE(group);
    const std::vector<KernelSpec> hopper = required_kernels(config_35b(), group, "sm_90a");
    const std::vector<KernelSpec> ampere = required_kernels(config_35b(), group, "sm_80");
    int wgmma = 0, moe_wgmma = 0, moe_mma_sync = 0;
    std::set<std::string> dense_groups;  // GROUP of the dense projections' GEMMs (bf16 out)
    for (const KernelSpec& s : hopper) {
      wgmma += is_wgmma(s);
      moe_mma_sync += s.kernel == "moe_gemm";
      moe_wgmma += is_wgmma(s) && q35::test::spec_arg(s, "TOPK") == "8";
      if (is_wgmma(s) && q35::test::spec_arg(s, "TOPK") == "1" && q35::test::spec_arg(s, "GATE_UP") == "false" &&
          q35::test::spec_arg(s, "OUT_F32") == "false")
        dense_groups.insert(q35::test::spec_arg(s, "GROUP"));
    }
    // W4A16: dequantized in the GEMM's loop below kWgmmaDequantFirstM rows (GROUP = g), first above (0).
    const std::set<std::string> want =
        group ? std::set<std::string>{"0", std::to_string(group)} : std::set<std::string>{"0"};
    CHECK(dense_groups == want);
    // MoE (all compiled at start): wgmma from kMoeWgmmaMinTokens tokens, mma.sync below, and the
    // swapped wgmma tiles for a few tokens per expert.
    CHECK(moe_wgmma == 8);
    CHECK(moe_mma_sync == 4);
    CHECK(wgmma >= 4 + 4);
    for (const KernelSpec& s : ampere) CHECK_FALSE(is_wgmma(s));
  }
}

TEST_CASE("gemm_wgmma: every instantiation of the runner and the tuner compiles for sm_90a without spills, "
          "with HGMMA in its SASS") {
  q35::test::TempDir cache("wgmma-jit");
  JitEngine jit(cache.path(), JitOptions{.kernel_dir = std::nullopt, .extra_options = {"--ptxas-options=-v"}});
  std::vector<KernelSpec> specs;
  std::set<std::string> seen;
  auto add = [&](const KernelSpec& s) {
    if (is_wgmma(s) && seen.insert(s.str()).second) specs.push_back(s);
  };
  for (int group : {0, 32, 128})
    for (const KernelSpec& s : required_kernels(config_35b(), group, "sm_90a")) add(s);
  for (int group : {0, 32, 64})
    for (const KernelSpec& s : required_kernels(config_tiny(), group, "sm_90a")) add(s);
  // The tuner's spaces at g128 (35B): the four MoE GEMMs and the DeltaNet in_proj (ragged N).
  // (The register-sourced tiles, gemm_wgmma_rs, have their own test: ptxas takes seconds for each.)
  const MoeShape ms = gpu::moe_shape(config_35b(), 128);
  for (const MoeGemmTile& t : tune::moe_gemm_candidates(ms, 4096, true))
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
      if (!t.rs) add(moe_gemm_spec(ms, g, t));
  for (const GemmTile& t : tune::gemm_candidates(12352, 2048, 4096, true, 128))
    add(gpu::GemmPlan{12352, 2048, t, false, 128}.spec());
  MESSAGE(specs.size() << " gemm_wgmma instantiations");
  CHECK(specs.size() >= 40);

  const std::vector<CompiledKernel> out = jit.compile_all(specs, "sm_90a", 2);
  REQUIRE(out.size() == specs.size());
  for (size_t i = 0; i < out.size(); ++i) CHECK(q35::test::spill_bytes(out[i], specs[i].str()) == 0);
  // SASS of a sample (cuobjdump is slow-ish): the runner's own kernels and a few of the space.
  for (size_t i = 0; i < out.size(); i += std::max<size_t>(1, out.size() / 12)) {
    CAPTURE(specs[i].str());
    const std::string sass = q35::test::sass_of(out[i], cache.path());
    CHECK(contains(sass, "HGMMA.64x"));
    CHECK_FALSE(contains(sass, "LDL"));  // no local-memory traffic
  }
}

TEST_CASE("gemm_wgmma refuses what its template cannot run, naming the reason") {
  WgmmaGemm g;
  g.n = 1024, g.k = 2048, g.group = 128, g.gate_up = true, g.routed = true, g.topk = 8;
  CHECK(why_invalid(g).empty());
  WgmmaGemm bad = g;
  bad.k = 2056;  // W4A16 needs whole 64-k steps
  CHECK(contains(why_invalid(bad), "multiple of 64"));
  bad = g, bad.bn = 96;
  CHECK(contains(why_invalid(bad), "wgmma N"));
  bad = g, bad.n = 1004;
  CHECK(contains(why_invalid(bad), "multiple of 8"));
  bad = g, bad.bm = 64;
  CHECK(contains(why_invalid(bad), "64 * wgm"));
  bad = g, bad.out_f32 = true;
  CHECK(contains(why_invalid(bad), "bf16 output"));
  bad = g, bad.bn = 256, bad.stages = 8;
  CHECK(contains(why_invalid(bad), "shared memory"));
  CHECK(contains(test::error_of([&] { wgmma_gemm_spec(bad); }), "gemm_wgmma [N = 1024, K = 2048, W4A16 g128]"));
  // Warp-specialised and swapped (weights x 8..64 rows) forms.
  bad = g, bad.ws = true, bad.wgm = 2, bad.wgn = 2, bad.bm = 128, bad.bn = 128;
  CHECK(contains(why_invalid(bad), "at most 2 consumer"));
  WgmmaGemm sw = g;
  sw.ws = sw.swap = true, sw.wgm = 1, sw.wgn = 2, sw.bm = 16, sw.bn = 128, sw.stages = 8;
  CHECK(why_invalid(sw).empty());
  CHECK(wgmma_ws_bf16_tiles(8) == 2);  // deep rings keep two bf16 B tiles
  CHECK(wgmma_smem_bytes(sw) == 1024 + 8 * (16 * 128 + 128 * 32) + 2 * 128 * 128 + 8 * 16);
  bad = sw, bad.ws = false;
  CHECK(contains(why_invalid(bad), "warp-specialised only"));
  bad = sw, bad.bm = 24;
  CHECK(contains(why_invalid(bad), "8, 16, 32 or 64"));
  bad = sw, bad.bn = 256;
  CHECK(contains(why_invalid(bad), "64 x wgn"));
  sw.ksub = 4, sw.stages = 4;
  CHECK(why_invalid(sw).empty());
  CHECK(wgmma_smem_bytes(sw) == 1024 + 4 * 4 * (16 * 128 + 128 * 32) + 4 * 128 * 128 + 4 * 16);
  bad = sw, bad.stages = 10;  // 10 stages of 4 steps: too much shared memory
  CHECK(contains(why_invalid(bad), "shared memory"));
  bad = sw, bad.ksub = 3;
  CHECK(contains(why_invalid(bad), "1, 2 or 4"));
  bad = sw, bad.k = 2048 + 128;
  CHECK(contains(why_invalid(bad), "64 x ksub"));
  bad = g, bad.ksub = 2;
  CHECK(contains(why_invalid(bad), "swapped form's"));
  // Persistent (one block per SM over the tiles): warp-specialised, not swapped, W4A16 only.
  WgmmaGemm ps = g;
  ps.ws = ps.persist = true, ps.bn = 256, ps.stages = 6;
  CHECK(why_invalid(ps).empty());
  CHECK(wgmma_smem_bytes(ps) == 1024 + 6 * (128 * 128 + 256 * 32) + 2 * 256 * 128 + 6 * 16);
  CHECK(wgmma_gemm_spec(ps).args.back() == std::pair<std::string, std::string>{"PERSIST", "true"});
  bad = ps, bad.group = 0;
  CHECK(contains(why_invalid(bad), "persistent"));
  bad = ps, bad.ws = false;
  CHECK(contains(why_invalid(bad), "persistent"));
  bad = sw, bad.persist = true;
  CHECK(contains(why_invalid(bad), "persistent"));
  bad = ps, bad.stages = 7;  // 7 x 24 KiB of ring + 2 bf16 tiles of 32 KiB
  CHECK(contains(why_invalid(bad), "shared memory"));
  // W4A16 on wgmma: in the loop below kWgmmaDequantFirstM rows and only for whole 64-k steps.
  CHECK(qwen35::gpu::wgmma_gemm_group(32, 100, 2048) == 32);
  CHECK(qwen35::gpu::wgmma_gemm_group(32, 100, 2080) == 0);
  CHECK(qwen35::gpu::wgmma_gemm_group(128, qwen35::gpu::kWgmmaDequantFirstM, 2048) == 0);
  CHECK(arch_has_wgmma("sm_90a"));
  CHECK_FALSE(arch_has_wgmma("sm_90"));
  CHECK_FALSE(arch_has_wgmma("sm_80"));
  CHECK_FALSE(arch_has_wgmma("sm_100a"));
}

TEST_CASE("gemm_wgmma_rs (weights as wgmma's register operand): the MoE GEMMs compile for sm_90a without spills, "
          "with HGMMA in the SASS, and the tuner's space holds its tiles") {
  q35::test::TempDir cache("wgmma-rs-jit");
  JitEngine jit(cache.path(), JitOptions{.kernel_dir = std::nullopt, .extra_options = {"--ptxas-options=-v"}});
  std::vector<KernelSpec> specs;
  // The 35B's four GEMMs at g128 with two consumer warpgroups and 128 tokens (every tile variant
  // 8 .. 128), and the routed gate|up at g32, persistent, with 256 tokens (variants up to 256).
  const MoeShape ms = gpu::moe_shape(config_35b(), 128);
  const MoeGemmTile two{128, 128, 64, 1, 2, 4, true, true, true, 1, false, true};
  for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown}) {
    REQUIRE(why_invalid(two, ms, g).empty());
    specs.push_back(moe_gemm_spec(ms, g, two));
  }
  const MoeShape ms32 = gpu::moe_shape(config_35b(), 32);
  const MoeGemmTile one{256, 128, 64, 1, 2, 4, true, true, true, 1, true, true};
  REQUIRE(why_invalid(one, ms32, MoeGemm::RoutedGateUp).empty());
  specs.push_back(moe_gemm_spec(ms32, MoeGemm::RoutedGateUp, one));
  for (const KernelSpec& s : specs) CHECK(s.family == "wgmma_rs");
  const std::vector<CompiledKernel> out = jit.compile_all(specs, "sm_90a", 2);
  REQUIRE(out.size() == specs.size());
  for (size_t i = 0; i < out.size(); ++i) {
    CAPTURE(specs[i].str());
    CHECK(q35::test::spill_bytes(out[i], specs[i].str()) == 0);
    const std::string sass = q35::test::sass_of(out[i], cache.path());
    CHECK(contains(sass, "HGMMA.64x128x16.F32.BF16"));  // the 128-token variant, A from registers
    CHECK(contains(sass, "HGMMA.64x8x16.F32.BF16"));
    CHECK_FALSE(contains(sass, "LDL"));
  }
  int rs = 0;
  for (const MoeGemmTile& t : tune::moe_gemm_candidates(ms, 4096, true)) rs += t.rs;
  CHECK(rs >= 8);
  for (const MoeGemmTile& t : tune::moe_gemm_candidates(gpu::moe_shape(config_35b(), 0), 4096, true))
    CHECK_FALSE(t.rs);  // bf16 weights: no register-sourced tiles
}

TEST_CASE("gemm_wgmma_rs refuses what its template cannot run, naming the reason") {
  WgmmaGemm g;
  g.n = 1024, g.k = 2048, g.group = 128, g.gate_up = true, g.routed = true, g.topk = 8;
  g.ws = g.swap = g.rs = true, g.wgm = 1, g.wgn = 2, g.bm = 128, g.bn = 128, g.stages = 4;
  CHECK(why_invalid(g).empty());
  CHECK(wgmma_smem_bytes(g) == 1024 + 4 * (128 * 128 + 128 * 32) + 4 * 128 * 4 + 4 * 16 + 128 * 4);
  CHECK(wgmma_gemm_spec(g).family == "wgmma_rs");
  WgmmaGemm bad = g;
  bad.group = 0;
  CHECK(contains(why_invalid(bad), "W4A16 only"));
  bad = g, bad.bm = 256, bad.persist = true;  // 256 token rows, persistent
  CHECK(why_invalid(bad).empty());
  CHECK(wgmma_gemm_spec(bad).args.back() == std::pair<std::string, std::string>{"PERSIST", "true"});
  bad = g, bad.bm = 48;
  CHECK(contains(why_invalid(bad), "multiple of 32"));
  bad = g, bad.k = 2048 + 64, bad.group = 64;  // two 64-k steps per loop
  CHECK(contains(why_invalid(bad), "multiple of 128"));
  bad = g, bad.k = 2048 + 128;  // 17 groups of 128: the 4-byte scale pairs need an even count
  CHECK(contains(why_invalid(bad), "two groups"));
  bad = g, bad.bn = 64;
  CHECK(contains(why_invalid(bad), "64 x wgn"));
  bad = g, bad.ksub = 2;
  CHECK(contains(why_invalid(bad), "ksub 1"));
  bad = g, bad.stages = 12;
  CHECK(contains(why_invalid(bad), "stages"));
  bad = g, bad.wgn = 1, bad.bn = 64, bad.bm = 256, bad.stages = 7;
  CHECK(contains(why_invalid(bad), "shared memory"));
  CHECK(contains(test::error_of([&] { wgmma_gemm_spec(bad); }), "gemm_wgmma [N = 1024, K = 2048, W4A16 g128]"));
}
