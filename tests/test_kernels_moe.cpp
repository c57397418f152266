// The MoE kernels on the CPU (no GPU): every spec of moe_kernels() compiles to CUBIN for sm_80 and
// sm_90a at the tiny fixture's shapes and the 35B shapes, bf16 and W4A16, the decode path's tiles
// without spills; tile validity rules and defaults; the scratch layout.
#include <doctest/doctest.h>

#include <fmt/format.h>

#include <barrier>
#include <bit>
#include <random>
#include <regex>
#include <set>
#include <thread>

#include "autotune/spaces.h"
#include "autotune/tiles_moe.h"
#include "models/qwen35/config.h"
#include "models/qwen35/gpu/moe.h"
#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"
#include "runtime/jit/jit_engine.h"
#include "tests/moe_plan_ref.h"
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

// ---- kernel_templates/moe_plan.cuh compiled for the host, run on an emulated warp ----
// 32 threads in lockstep at every warp intrinsic: each lane posts its value, a barrier, each lane reads
// what it needs, a barrier (so the slots can be reused by the next intrinsic).
namespace hostwarp {
struct Warp {
  std::barrier<> bar{32};
  int value[32] = {};
};
Warp* warp = nullptr;
thread_local int lane = 0;
}  // namespace hostwarp

[[maybe_unused]] static unsigned __match_any_sync(unsigned, int v) {
  hostwarp::warp->value[hostwarp::lane] = v;
  hostwarp::warp->bar.arrive_and_wait();
  unsigned m = 0;
  for (int j = 0; j < 32; ++j) m |= unsigned(hostwarp::warp->value[j] == v) << j;
  hostwarp::warp->bar.arrive_and_wait();
  return m;
}
[[maybe_unused]] static unsigned __ballot_sync(unsigned, bool p) {
  hostwarp::warp->value[hostwarp::lane] = p;
  hostwarp::warp->bar.arrive_and_wait();
  unsigned m = 0;
  for (int j = 0; j < 32; ++j) m |= unsigned(hostwarp::warp->value[j] != 0) << j;
  hostwarp::warp->bar.arrive_and_wait();
  return m;
}
[[maybe_unused]] static int __shfl_sync(unsigned, int v, int src) {
  hostwarp::warp->value[hostwarp::lane] = v;
  hostwarp::warp->bar.arrive_and_wait();
  const int r = hostwarp::warp->value[src % 32];
  hostwarp::warp->bar.arrive_and_wait();
  return r;
}
[[maybe_unused]] static int __popc(unsigned v) { return std::popcount(v); }
#define __device__
#define __forceinline__ inline
#include "kernel_templates/moe_plan.cuh"
#undef __device__
#undef __forceinline__

namespace {

// moe_build_plan_warp<E> on the host: lane l < T*k holds ids[l], as moe_router's fast path passes them.
template <int E>
std::vector<int32_t> warp_plan_on_host(const std::vector<int32_t>& ids, int T, int k) {
  std::vector<int32_t> plan(size_t(2 + 2 * E + T * k), -7);
  hostwarp::Warp w;
  hostwarp::warp = &w;
  const int P = T * k;
  {
    std::vector<std::jthread> lanes;
    for (int l = 0; l < 32; ++l)
      lanes.emplace_back([&, l] {
        hostwarp::lane = l;
        q35k::moe_build_plan_warp<E>(l < P ? ids[size_t(l)] : 0, P, l, plan.data());
      });
  }
  hostwarp::warp = nullptr;
  return plan;
}

// ids [T, k]: each token's k distinct experts in [0, E), drawn from `pool` experts (small pools: many
// tokens share experts), in a random order.
std::vector<int32_t> random_ids(std::mt19937& rng, int T, int k, int E, int pool) {
  std::vector<int> experts(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) experts[size_t(e)] = e;
  std::shuffle(experts.begin(), experts.end(), rng);
  experts.resize(size_t(std::max(pool, k)));
  std::vector<int32_t> ids;
  for (int t = 0; t < T; ++t) {
    std::shuffle(experts.begin(), experts.end(), rng);
    ids.insert(ids.end(), experts.begin(), experts.begin() + k);
  }
  return ids;
}

template <int E>
void check_warp_plans(std::mt19937& rng) {
  for (int k : {1, 2, 3, 4, 8})
    for (int T = 1; T * k <= 32; ++T)
      for (int pool : {k, k + 1, 2 * k, E})
        for (int rep = 0; rep < 1; ++rep) {
          if (pool > E) continue;
          CAPTURE(E);
          CAPTURE(k);
          CAPTURE(T);
          CAPTURE(pool);
          const std::vector<int32_t> ids = random_ids(rng, T, k, E, pool);
          const std::vector<int32_t> want = q35::test::moe_plan_ref(ids, T, k, E);
          CHECK(warp_plan_on_host<E>(ids, T, k) == want);
        }
  // The extremes: experts 0 and E - 1; one token; every token the same experts in another order.
  std::vector<int32_t> ids = {E - 1, 0, E / 2, 1};
  CHECK(warp_plan_on_host<E>(ids, 1, 4) == q35::test::moe_plan_ref(ids, 1, 4, E));
  ids = {E - 1, 0, 3, 1, 0, E - 1, 1, 3, 1, 3, E - 1, 0, 3, 1, 0, E - 1};
  CHECK(warp_plan_on_host<E>(ids, 4, 4) == q35::test::moe_plan_ref(ids, 4, 4, E));
}

}  // namespace

// moe_router's fast path (T * k <= 32, one routing block) builds the plan in one warp's registers
// (moe_plan.cuh); the decode GEMVs must see exactly what moe_build_plan writes (the host model
// q35::test::moe_plan_ref: its counts, scan and token-order scatter). The GPU test compares the two
// device builders and the router's plan at T = 1..4 (tests/gpu/test_gpu_moe.cpp).
TEST_CASE("moe_build_plan_warp (host-emulated warp) writes the plan of moe_build_plan") {
  std::mt19937 rng(1234);
  check_warp_plans<16>(rng);
  check_warp_plans<256>(rng);
  // The host model on a hand-made case: experts 2 (pairs 1, 4), 5 (pairs 0, 3), 7 (pairs 2, 5).
  const std::vector<int32_t> plan = q35::test::moe_plan_ref({5, 2, 7, 5, 2, 7}, 2, 3, 8);
  const std::vector<int32_t> want = {3, 2, 5, 7, -7, -7, -7, -7, -7, 0, 2, 4, 6, -7, -7, -7, -7, -7, 1, 4, 0, 3, 2, 5};
  CHECK(plan == want);
}

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
  // A warp's part of K starts on a scale group (WarpRows16 scales each mma column by one group's
  // scale): a multiple or a divisor of the W4A16 group. H = 3072 in 16 parts of 192 straddles g128
  // groups (the warp of k 192..383 crosses k = 256); g64 divides 192; g32 takes any part.
  const MoeShape h3072{3072, 64, 8, 512, 512, 128};
  CHECK(why_invalid(h3072).empty());
  CHECK(why_invalid_gate_up(MoeGemvTile{8}, h3072).empty());  // 384 = 3 groups
  CHECK(why_invalid_gate_up(MoeGemvTile{24}, h3072).empty());  // 128
  CHECK(why_invalid_gate_up(MoeGemvTile{16}, h3072) ==
        "W4A16 g128: H / ksplit = 192 is neither a multiple nor a divisor of the scale group of 128 k (ksplit = 16: "
        "a warp's part of K must start on a scale group)");
  CHECK(contains(error_of([&] { moe_decode_gate_up_spec(h3072, MoeGemvTile{16}); }),
                 "moe_decode_gate_up [H = 3072, E = 64, k = 8, I = 512, Is = 512, W4A16 g128]: W4A16 g128: H / ksplit "
                 "= 192 is neither"));
  CHECK(why_invalid_gate_up(MoeGemvTile{16}, MoeShape{3072, 64, 8, 512, 512, 64}).empty());
  CHECK(contains(why_invalid_gate_up(MoeGemvTile{32}, MoeShape{3072, 64, 8, 512, 512, 64}),
                 "W4A16 g64: H / ksplit = 96 is neither a multiple nor a divisor of the scale group of 64 k (ksplit = 32"));
  CHECK(why_invalid_gate_up(MoeGemvTile{32}, MoeShape{3072, 64, 8, 512, 512, 32}).empty());
  CHECK(why_invalid_gate_up(MoeGemvTile{32}, MoeShape{3072, 64, 8, 512, 512, 0}).empty());
  // down, one routed expert per token (so 16 parts fit in 32 warps): I or Is = 3072 in parts of 192.
  const MoeShape i3072{2048, 16, 1, 3072, 3072, 128};
  CHECK(why_invalid(i3072).empty());
  CHECK(why_invalid(MoeDownTile{16}, i3072) ==
        "W4A16 g128: I / ksplit = 192 is neither a multiple nor a divisor of the scale group of 128 k (ksplit = 16: a "
        "warp's part of K must start on a scale group)");
  CHECK(contains(error_of([&] { moe_decode_down_spec(i3072, MoeDownTile{16}); }),
                 "moe_decode_down [H = 2048, E = 16, k = 1, I = 3072, Is = 3072, W4A16 g128]: W4A16 g128: I / ksplit"));
  CHECK(contains(error_of([&] { moe_decode_down_residual_spec(i3072, MoeDownTile{16}); }),
                 "moe_decode_down_residual [H = 2048"));
  CHECK(contains(why_invalid(MoeDownTile{16}, MoeShape{2048, 16, 1, 1024, 3072, 128}), "Is / ksplit = 192 is neither"));
  CHECK(why_invalid(MoeDownTile{8}, i3072).empty());   // 384 = 3 groups
  CHECK(why_invalid(MoeDownTile{12}, i3072).empty());  // 256
  CHECK(why_invalid(MoeDownTile{16}, MoeShape{2048, 16, 1, 3072, 3072, 64}).empty());  // 192 = 3 groups of 64
  // down's expert groups each sum their K parts behind a named barrier: at most 15 groups (k <= 14).
  CHECK(contains(why_invalid(MoeDownTile{2}, MoeShape{2048, 256, 15, 512, 512, 128}), "k + 1 = 16 groups exceed 15"));
  CHECK(why_invalid(MoeDownTile{1}, MoeShape{2048, 256, 15, 512, 512, 128}).empty());
  // The grouped path serves every batched decode step (64 rows) and prompt chunks up to 256 tokens;
  // the router's tiles keep their sizes.
  CHECK(kDecodeStepMaxRows == 64);
  CHECK(kMoeGroupedMaxTokens == 256);
  CHECK(kMoeGroupedDefaultMaxTokens == 128);
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
                           {sc.plan, size_t((2 + 2 * 256 + 256 * 8) * 4)},  // the grouped path's T <= 256
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
  // The grouped path's h [T, k*I + Is] for T <= 256 fits beside the prefill's: a workspace of 256
  // tokens holds it (the prefill GEMM's h is smaller there).
  {
    const int64_t T256 = 256;
    const MoeScratch s256 = moe_scratch(s, t, T256, 0);
    CHECK(int64_t(s256.hs - s256.h) >= T256 * (8 * 512 + 512) * 2);
    CHECK(int64_t(s256.h - s256.plan) >= moe_plan_ints(s, T256) * 4);  // plan, then h
    const MoeScratch s100 = moe_scratch(s, t, 100, 0);  // max_tokens 100: h for 100 tokens
    CHECK(int64_t(s100.hs - s100.h) >= 100 * (8 * 512 + 512) * 2);
  }
  CHECK(contains(error_of([&] { moe_workspace_bytes(s, t, 0); }), "max_tokens = 0"));
}

// How many tokens the grouped path takes: down's sums [T][k + 1][16] fp32 grow with T, gate_up's
// [ksplit][T][16]; the per-arch opt-in limits cap T where 256 does not fit.
TEST_CASE("grouped path sizing: shared memory per arch, the token bound, the path rule") {
  const MoeShape big{2048, 256, 8, 512, 512, 128}, tiny{128, 16, 4, 64, 128, 32};
  CHECK(smem_optin_bytes("sm_90a") == 227 * 1024);
  CHECK(smem_optin_bytes("sm_80") == 163 * 1024);
  CHECK(smem_optin_bytes("sm_86") == 99 * 1024);
  CHECK(smem_optin_bytes("sm_89") == 99 * 1024);
  CHECK(smem_optin_bytes("sm_100") == 227 * 1024);
  const MoeGemvTile gu = default_moe_gate_up_tile(big);
  const MoeDownTile dn = default_moe_down_tile(big);
  REQUIRE((gu.ksplit == 4 && dn.ksplit == 2));
  // T = 256, 35B: down 153 KiB (sums 144 KiB + parts 9 KiB), gate_up 64 KiB.
  CHECK(moe_down_smem_bytes(big, dn, 256) == (256 * 9 * 16 + 9 * 2 * 8 * 16) * 4);
  CHECK(moe_down_smem_bytes(big, dn, 256) == 156672);
  CHECK(moe_gate_up_smem_bytes(gu, 256) == 4 * 256 * 16 * 4);
  CHECK(moe_gate_up_smem_bytes(gu, 37) == 4 * 37 * 16 * 4);
  CHECK(moe_grouped_max_tokens(big, gu, dn, smem_optin_bytes("sm_90a")) == 256);
  CHECK(moe_grouped_max_tokens(big, gu, dn, smem_optin_bytes("sm_80")) == 256);  // 272 fit
  CHECK(moe_grouped_max_tokens(big, gu, dn, smem_optin_bytes("sm_86")) == 156);  // (99 Ki - 2 Ki - 9 Ki) / 576
  CHECK(moe_down_smem_bytes(big, dn, 156) + kMoeGroupedStaticSmemReserve <= 99 * 1024);
  CHECK(moe_down_smem_bytes(big, dn, 157) + kMoeGroupedStaticSmemReserve > 99 * 1024);
  // gate_up bounds it when its split is wide: ksplit 16 at 48 KiB -> 46 tokens (down: 73 would fit).
  CHECK(moe_grouped_max_tokens(big, MoeGemvTile{16}, MoeDownTile{1}, 48 * 1024) == (46 * 1024) / (16 * 64));
  CHECK(moe_grouped_max_tokens(tiny, default_moe_gate_up_tile(tiny), default_moe_down_tile(tiny), 99 * 1024) == 256);
  CHECK(moe_grouped_max_tokens(big, gu, dn, 8 * 1024) == 0);  // not even the parts fit
  // The rule: decode steps always grouped; prompt chunks by the tuned entry (default <= 128), within the bound.
  for (int64_t T : {1, 2, 16, 63, 64}) {
    CHECK(moe_grouped_for(T, 256));
    CHECK(moe_grouped_for(T, 256, false));  // a decode step never takes the GEMM path
  }
  CHECK(moe_grouped_for(65, 256));
  CHECK(moe_grouped_for(128, 256));
  CHECK(!moe_grouped_for(129, 256));
  CHECK(!moe_grouped_for(256, 256));
  CHECK(moe_grouped_for(256, 256, true));
  CHECK(!moe_grouped_for(96, 256, false));
  CHECK(!moe_grouped_for(200, 158, true));  // sm_86: past what fits
  CHECK(!moe_grouped_for(257, 256, true));
  CHECK(!moe_grouped_for(128, 100));
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
  // Router (3 tiles), align, combine, the streaming combine, prefill router GEMM + top-k per config;
  // gate_up, down, down with the residual epilogue, their two streaming forms and 4 GEMMs per (config,
  // format).
  CHECK(specs.size() == 2 * (8 + 3 * 9));
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
      // The streaming forms of the default splits, every tile of the tuner's space.
      for (const MoeStreamTile& st : tune::moe_stream_candidates()) {
        add(moe_stream_gate_up_spec(s, default_moe_gate_up_tile(s), st));
        add(moe_stream_down_spec(s, default_moe_down_tile(s), st));
      }
      add(moe_stream_combine_spec(s));
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

// The grouped path's kernels as the runner loads them for the 35B (W4A16 g128, bf16 and FP8: default
// M = 1 tiles, the router's m_tile 16 tile that T > 8 takes): no spills on sm_90a and sm_80; their
// instantiations do not depend on T (T is an argument), so these are the kernels of T = 256 too,
// whose dynamic shared memory is reported beside the static.
TEST_CASE("the grouped path's kernels for T up to 256 compile without spills, sm_90a and sm_80") {
  q35::test::TempDir cache("moe-grouped-jit");
  JitEngine jit(cache.path(), JitOptions{.kernel_dir = std::nullopt, .extra_options = {"--ptxas-options=-v"}});
  std::vector<KernelSpec> specs;
  std::vector<int64_t> dyn;  // dynamic shared memory at T = 256
  for (int group : {128, 0, kFp8Group}) {
    const MoeShape s = moe_shape(config_35b(), group);
    const MoeTiles t = MoeTiles::defaults(s);
    specs.push_back(moe_router_spec(s, t.router(256)));
    dyn.push_back(0);
    specs.push_back(moe_decode_gate_up_spec(s, t.gate_up));
    dyn.push_back(moe_gate_up_smem_bytes(t.gate_up, 256));
    specs.push_back(moe_decode_down_spec(s, t.down));
    dyn.push_back(moe_down_smem_bytes(s, t.down, 256));
    specs.push_back(moe_decode_down_residual_spec(s, t.down));
    dyn.push_back(moe_down_smem_bytes(s, t.down, 256));
    for (const KernelSpec& k : {moe_stream_gate_up_spec(s, t.gate_up, t.stream), moe_stream_down_spec(s, t.down, t.stream),
                                moe_stream_combine_spec(s)}) {
      specs.push_back(k);
      dyn.push_back(0);  // the streaming form takes no shared memory at any T
    }
  }
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    CAPTURE(arch);
    const std::vector<CompiledKernel> out = jit.compile_all(specs, arch, 2);
    REQUIRE(out.size() == specs.size());
    std::string report;
    for (size_t i = 0; i < out.size(); ++i) {
      CHECK_MESSAGE(q35::test::spill_bytes(out[i], specs[i].str()) == 0, specs[i].str());
      static const std::regex regs_re(R"(Used (\d+) registers)"), smem_re(R"((\d+) bytes smem)");
      std::smatch m;
      const std::string regs = std::regex_search(out[i].log, m, regs_re) ? m[1].str() : std::string("?");
      const int64_t smem = std::regex_search(out[i].log, m, smem_re) ? std::stoll(m[1].str()) : 0;
      CHECK(smem + dyn[i] <= smem_optin_bytes(arch));
      if (specs[i].kernel != "moe_router") CHECK(smem <= kMoeGroupedStaticSmemReserve);
      report += fmt::format("\n  {}: {} registers, {} B static smem, {} B dynamic at T = 256", specs[i].instantiation(),
                            regs, smem, dyn[i]);
    }
    MESSAGE(arch << ":" << report);
  }
}
