// The MoE kernels on the CPU (no GPU): every spec of moe_kernels() compiles to CUBIN for sm_80 and
// sm_90a at the tiny fixture's shapes and the 35B shapes, bf16 and W4A16, the decode path's tiles
// without spills; tile validity rules and defaults; the scratch layout.
#include <doctest/doctest.h>

#include <fmt/format.h>

#include <regex>
#include <set>

#include "autotune/spaces.h"
#include "autotune/tiles_moe.h"
#include "models/qwen35/config.h"
#include "models/qwen35/gpu/moe.h"
#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"
#include "runtime/jit/jit_engine.h"
#include "tests/ptxas_checks.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
using namespace q35::qwen35::gpu;

using q35::test::config_35b;
using q35::test::config_tiny;
using q35::test::contains;
using q35::test::error_of;

namespace {

}  // namespace

TEST_CASE("moe_shape reads the MoE sizes of the config") {
  const MoeShape tiny = moe_shape(config_tiny(), 32);
  CHECK(tiny.hidden == 128);
  CHECK(tiny.experts == 16);
  CHECK(tiny.top_k == 4);
  CHECK(tiny.inter == 64);
  CHECK(tiny.shared_inter == 128);
  CHECK(tiny.group == 32);
  // I = 64 cannot be split into groups of 128.
  CHECK(contains(error_of([] { moe_shape(config_tiny(), 128); }), "I = 64 is not a multiple of the group 128"));
  CHECK(contains(error_of([] { moe_shape(config_35b(), 48); }), "weight group 48"));
}

TEST_CASE("moe tile validity rules and defaults") {
  const MoeShape big{2048, 256, 8, 512, 512, 128}, tiny{128, 16, 4, 64, 128, 0};
  // Router
  CHECK(why_invalid(MoeRouterTile{16, 2, 4}, big).empty());
  CHECK(contains(why_invalid(MoeRouterTile{17, 2, 4}, big), "m_tile = 17"));
  CHECK(contains(why_invalid(MoeRouterTile{1, 3, 4}, big), "E = 256 is not a multiple of rows_per_warp = 3"));
  CHECK(contains(why_invalid(MoeRouterTile{16, 8, 4}, big), "accumulators"));
  CHECK(default_moe_router_tile(big, 1).m_tile == 1);
  CHECK(default_moe_router_tile(big, 5).m_tile == 8);
  CHECK(default_moe_router_tile(big, 4096).m_tile == 16);
  // Router grid: 128 warps of 2 rows + one warp for the shared gate = 129 warps -> 33 blocks of 4.
  CHECK(MoeRouterTile{1, 2, 4}.blocks_x(256) == 33);
  // T = 1: one row per warp, 2 warps per block -> 257 warps in 129 blocks.
  CHECK((default_moe_router_tile(big, 1).rows_per_warp == 1 && default_moe_router_tile(big, 1).warps == 2));
  CHECK(default_moe_router_tile(big, 1).blocks_x(256) == 129);
  // Decode GEMVs (16-row mma tiles): gate_up splits H over ksplit warps, down I over ksplit per expert.
  CHECK(why_invalid_gate_up(MoeGemvTile{4}, big).empty());
  CHECK(contains(why_invalid_gate_up(MoeGemvTile{3}, big), "H = 2048 is not a multiple of 32 * ksplit = 96"));
  CHECK(why_invalid(MoeDownTile{2}, big).empty());
  CHECK(contains(why_invalid(MoeDownTile{4}, big), "(k + 1) * ksplit = 36 warps"));
  CHECK(contains(why_invalid(MoeDownTile{3}, tiny), "I = 64 and Is = 128 must be multiples of 32 * ksplit = 96"));
  CHECK(contains(why_invalid(MoeDownTile{1}, MoeShape{8, 16, 4, 64, 128, 0}), "H = 8 is not a multiple of 16"));
  CHECK(why_invalid(default_moe_down_tile(tiny), tiny).empty());
  CHECK(default_moe_down_tile(big).ksplit == 2);
  CHECK(default_moe_down_tile(big).threads(big.top_k) == 18 * 32);  // 2 warps per routed expert + the shared one
  CHECK(default_moe_gate_up_tile(big).ksplit == 4);
  CHECK(default_moe_gate_up_tile(tiny).ksplit == 4);  // H = 128: 4 parts of 32
  // down's expert groups each sum their K parts behind a named barrier: at most 15 groups (k <= 14).
  CHECK(contains(why_invalid(MoeDownTile{2}, MoeShape{2048, 256, 15, 512, 512, 128}), "k + 1 = 16 groups exceed 15"));
  CHECK(why_invalid(MoeDownTile{1}, MoeShape{2048, 256, 15, 512, 512, 128}).empty());
  // The decode path serves every batched decode step (64 rows); the router's tiles keep their sizes.
  CHECK(kMoeDecodeMaxTokens == 64);
  CHECK(default_moe_router_tile(big, 8).m_tile == 8);
  CHECK(default_moe_router_tile(big, 9).m_tile == 16);
  // Rows of 24 bf16 values are 3 vectors: neither a divisor nor a multiple of 32 lanes.
  CHECK(contains(why_invalid(MoeShape{128, 16, 4, 24, 128, 0}), "I = 24 is 3 vectors of 8 values"));
  CHECK(contains(why_invalid(MoeShape{128, 16, 20, 64, 128, 0}), "k = 20"));
  // GEMM
  CHECK(why_invalid(MoeGemmTile{}, big, MoeGemm::RoutedGateUp).empty());
  CHECK(contains(why_invalid(MoeGemmTile{64, 128, 16, 2, 2}, big, MoeGemm::RoutedDown), "block_k = 16 is not a positive multiple of 32"));
  CHECK(why_invalid(MoeGemmTile{64, 128, 16, 2, 2}, MoeShape{2048, 256, 8, 512, 512, 0}, MoeGemm::RoutedDown).empty());
  CHECK(contains(why_invalid(MoeGemmTile{64, 256, 32, 2, 2}, tiny, MoeGemm::RoutedGateUp), "N = 128 is not a multiple of block_n = 256"));
  CHECK(contains(why_invalid(MoeGemmTile{48, 128, 32, 2, 2}, big, MoeGemm::RoutedGateUp), "warp tiles"));
  CHECK(contains(why_invalid(MoeGemmTile{128, 256, 32, 2, 2}, big, MoeGemm::RoutedDown), "accumulators"));
  CHECK(contains(why_invalid(MoeGemmTile{128, 256, 64, 4, 4}, big, MoeGemm::RoutedDown), "shared memory"));
  for (const MoeShape& s : {big, tiny})
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
      CHECK(why_invalid(default_moe_gemm_tile(s), s, g).empty());
  CHECK(moe_gemm_n(tiny, MoeGemm::SharedGateUp) == 256);
  CHECK(moe_gemm_k(tiny, MoeGemm::SharedDown) == 128);
  CHECK(contains(error_of([&] { moe_gemm_spec(big, MoeGemm::RoutedDown, MoeGemmTile{64, 128, 16, 2, 2}); }),
                 "moe_gemm [H = 2048, E = 256, k = 8, I = 512, Is = 512, W4A16 g128]: block_k = 16"));
}

TEST_CASE("moe scratch layout: sizes, alignment, no overlap") {
  const MoeShape s = moe_shape(config_35b(), 0);
  const MoeTiles t = MoeTiles::defaults(s);
  // T = 4096: 32768 pairs, at most 256 experts each padded by up to 63 rows.
  CHECK(moe_max_blocks(s, 64, 4096) == (32768 + 63 * 256) / 64);
  CHECK(moe_max_blocks(s, 64, 1) == (8 + 63 * 8) / 64);  // 8 pairs: at most 8 blocks
  const int64_t T = 4096;
  const size_t bytes = moe_workspace_bytes(s, t, T);
  const MoeScratch sc = moe_scratch(s, t, T, 1 << 20);
  struct Buf {
    CUdeviceptr at;
    size_t size;
  };
  const int64_t blocks = moe_max_blocks(s, t.gemm.block_m, T);
  std::vector<Buf> bufs = {{sc.logits, size_t(T * 257 * 4)},
                           {sc.counters, size_t(T * 4)},
                           {sc.plan_ticket, 4},
                           {sc.plan, size_t((2 + 2 * 256 + 64 * 8) * 4)},  // the decode path's T <= 64
                           {sc.ids, size_t(T * 8 * 4)},
                           {sc.weights, size_t(T * 8 * 4)},
                           {sc.shared_gate, size_t(T * 4)},
                           {sc.h, size_t(blocks * 64 * 512 * 2)},
                           {sc.hs, size_t(T * 512 * 2)},
                           {sc.y, size_t(T * 8 * 2048 * 2)},
                           {sc.ys, size_t(T * 2048 * 2)},
                           {sc.sorted_ids, size_t(blocks * 64 * 4)},
                           {sc.block_expert, size_t(blocks * 4)},
                           {sc.num_blocks, 4}};
  std::sort(bufs.begin(), bufs.end(), [](const Buf& a, const Buf& b) { return a.at < b.at; });
  for (size_t i = 0; i < bufs.size(); ++i) {
    CHECK(bufs[i].at % 256 == 0);
    if (i + 1 < bufs.size()) CHECK(bufs[i].at + bufs[i].size <= bufs[i + 1].at);
  }
  CHECK(bufs.back().at + bufs.back().size <= (1 << 20) + bytes);
  CHECK(sc.max_tokens == T);
  CHECK(moe_plan_ints(s, 64) == 2 + 2 * 256 + 64 * 8);
  // down's dynamic shared memory: per-(token, slot) sums [T][k + 1][16] + the groups' parts [k + 1][ksplit][8][16].
  CHECK(moe_down_smem_bytes(s, MoeDownTile{2}, 64) == (64 * 9 * 16 + 9 * 2 * 8 * 16) * 4);
  CHECK(moe_down_smem_bytes(s, MoeDownTile{2}, 64) <= 48 * 1024);
  CHECK(contains(error_of([&] { moe_workspace_bytes(s, t, 0); }), "max_tokens = 0"));
}

TEST_CASE("every MoE kernel compiles for sm_80 and sm_90a, tiny and 35B, bf16 and W4A16") {
  q35::test::TempDir cache("moe-jit");
  JitEngine jit(cache.path(), JitOptions{.kernel_dir = std::nullopt});
  std::vector<KernelSpec> specs;
  std::set<std::string> seen;
  auto add = [&](const std::vector<KernelSpec>& list) {
    for (const KernelSpec& s : list)
      if (seen.insert(s.str()).second) specs.push_back(s);
  };
  for (int group : {0, 32, 64}) add(moe_kernels(config_tiny(), group));
  for (int group : {0, 32, 128}) add(moe_kernels(config_35b(), group));
  // Router (3 tiles), align, combine, prefill router GEMM + top-k per config; gate_up, down, down
  // with the residual epilogue and 4 GEMMs per (config, format).
  CHECK(specs.size() == 2 * (7 + 3 * 7));
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    CAPTURE(arch);
    std::vector<CompiledKernel> out = jit.compile_all(specs, arch, 2);
    REQUIRE(out.size() == specs.size());
    for (const CompiledKernel& k : out) {
      CHECK(k.cubin.size() > 64);
      CHECK(!k.lowered_name.empty());
    }
  }
}

// The decode path's kernels (router with the plan, expert-grouped gate_up and down): the router's
// default tiles and every gate_up / down tile of the tuner's space, at the tiny fixture's and the 35B
// shapes, each weight format (FP8 too), compile for sm_90a with no register spills and no stack frame
// (ptxas -v; sm_80 builds of the defaults: the test above, FP8's in test_kernels_fp8.cpp).
TEST_CASE("the expert-grouped decode kernels compile without spills, tiny and 35B, bf16, W4A16 and FP8") {
  q35::test::TempDir cache("moe-decode-jit");
  JitEngine jit(cache.path(), JitOptions{.kernel_dir = std::nullopt, .extra_options = {"--ptxas-options=-v"}});
  std::vector<KernelSpec> specs;
  std::set<std::string> seen;
  auto add = [&](const KernelSpec& s) {
    if (seen.insert(s.str()).second) specs.push_back(s);
  };
  const std::pair<Config, std::vector<int>> configs[] = {{config_tiny(), {0, 32, 64, kFp8Group}},
                                                         {config_35b(), {0, 32, 128, kFp8Group}}};
  for (const auto& [cfg, groups] : configs)
    for (int group : groups) {
      const MoeShape s = moe_shape(cfg, group);
      for (int64_t m : {int64_t(1), int64_t(8), int64_t(64)}) add(moe_router_spec(s, default_moe_router_tile(s, m)));
      for (const tune::MoeDecodeConfig& c : tune::moe_decode_candidates(s)) {
        add(moe_decode_gate_up_spec(s, c.gate_up));
        add(moe_decode_down_spec(s, c.down));
        add(moe_decode_down_residual_spec(s, c.down));
      }
    }
  MESSAGE(specs.size() << " decode-path MoE instantiations");
  CHECK(specs.size() >= 40);
  for (const std::string arch : {"sm_90a"}) {
    CAPTURE(arch);
    const std::vector<CompiledKernel> out = jit.compile_all(specs, arch, 2);
    REQUIRE(out.size() == specs.size());
    std::string regs;
    for (size_t i = 0; i < out.size(); ++i) {
      CHECK_MESSAGE(q35::test::spill_bytes(out[i], specs[i].str()) == 0, specs[i].str());
      static const std::regex re(R"(Used (\d+) registers)");
      std::smatch m;
      if (specs[i].kernel != "moe_router")
        regs += fmt::format("\n  {}: {} registers", specs[i].instantiation(),
                            std::regex_search(out[i].log, m, re) ? m[1].str() : std::string("?"));
    }
    MESSAGE(arch << ":" << regs);
  }
}
