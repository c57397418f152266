// The tunable families (autotune/spaces.h), the tune ops of a model (models/qwen35/tune_ops.h, CPU
// side: families, signatures, spaces, kernels) and how a run picks tuned tiles
// (models/qwen35/gpu/tuned.h): tuned entry, nearest bucket, invalid entry and missing entry.
#include <doctest/doctest.h>

#include <algorithm>
#include <set>

#include "autotune/spaces.h"
#include "autotune/tuner.h"
#include "models/qwen35/gpu/tuned.h"
#include "models/qwen35/tune_ops.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
using nlohmann::json;
using q35::test::contains;

TEST_CASE("signatures name the shape and format") {
  CHECK(tune::dense_signature(9216, 2048, 128, false) == "N9216_K2048_G128_bf16");
  CHECK(tune::dense_signature(248320, 2048, 0, true) == "N248320_K2048_f32");
  const MoeShape s = gpu::moe_shape(test::config_35b(), 32);
  CHECK(tune::moe_signature(s) == "H2048_E256_K8_I512_IS512_G32");
  CHECK(tune::router_signature(s) == "H2048_E256_K8");
  CHECK(tune::attention_signature(16, 2, 256) == "HQ16_HKV2_D256");
  CHECK(tune::gdn_signature(gpu::gdn_shape(test::config_35b())) == "HK16_HV32_DK128_DV128_KC4");
  CHECK(tune::gemv_m_tile(1) == 1);
  CHECK(tune::gemv_m_tile(3) == 4);
  CHECK(tune::gemv_m_tile(16) == 16);
  CHECK(tune::gemv_m_tile(40) == 16);
}

TEST_CASE("every candidate is valid, round-trips through JSON, and the spaces are not trivial") {
  for (int group : {32, 128}) {
    for (int64_t m : {1, 3, 16}) {
      auto c = tune::w4_gemv_candidates(9216, 2048, group, m);
      CHECK(c.size() >= 8);
      for (const W4GemvTile& t : c) {
        CHECK(why_invalid(t, 9216, 2048, group).empty());
        const W4GemvTile r = tune::w4_gemv_from_json(tune::to_json(t), m);
        CHECK((r.row_warps == t.row_warps && r.k_warps == t.k_warps && r.unroll == t.unroll && r.m_tile == t.m_tile));
      }
    }
    const MoeShape s = gpu::moe_shape(test::config_35b(), group);
    CHECK(tune::moe_decode_candidates(s).size() >= 4);
    for (const auto& c : tune::moe_gemm_candidates(s, 4096)) {
      for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
        CHECK(why_invalid(c, s, g).empty());
      CHECK(c.block_m <= tune::kMoeMaxBlockM);
      const MoeGemmTile r = tune::moe_gemm_from_json(tune::to_json(c));
      CHECK((r.block_m == c.block_m && r.block_n == c.block_n && r.block_k == c.block_k && r.warps_m == c.warps_m &&
             r.warps_n == c.warps_n));
    }
    CHECK(tune::moe_gemm_candidates(s, 4096).size() >= 8);
    for (const auto& c : tune::moe_router_candidates(s, 2)) CHECK(c.m_tile <= 2);
  }
  for (const GemmTile& t : tune::gemm_candidates(12352, 2048, 4096)) CHECK(why_invalid(t, 12352, 2048).empty());
  CHECK(tune::gemm_candidates(12352, 2048, 4096).size() >= 20);
  for (const GemmTile& t : tune::gemm_candidates(12352, 2048, 24)) CHECK(t.bm == 64);  // no 128-row tiles for 24 rows
  const GdnShape g = gpu::gdn_shape(test::config_35b());
  CHECK(tune::gdn_prefill_candidates(g).size() >= 9);
  CHECK(tune::gdn_recurrent_candidates(g).size() >= 4);
  CHECK(tune::attention_prefill_candidates(16, 2, 256, kAttentionSmemLimitSm90).size() >= 3);
  CHECK(tune::attention_decode_candidates(16, 2, 256).size() >= 2);
}

TEST_CASE("malformed configs are named") {
  CHECK(tune::why_malformed(tune::kGemm, json{{"bm", 64}}).find("missing field \"bn\"") != std::string::npos);
  CHECK(tune::why_malformed(tune::kGemvW4, json{{"row_warps", "1"}, {"k_warps", 1}, {"unroll", 1}})
            .find("\"row_warps\" is not an integer") != std::string::npos);
  CHECK(tune::why_malformed("nope", json::object()).find("unknown family") != std::string::npos);
  CHECK(tune::why_malformed(tune::kAttentionDecode, json{{"warps", 4}}).empty());
  CHECK(tune::why_malformed(tune::kMoeDecode, json::array()).find("not a JSON object") != std::string::npos);
}

TEST_CASE("tune ops of the 35B: one per family and shape, each default among valid configs") {
  const Config cfg = test::config_35b();
  for (int group : {0, 32, 128}) {
    const auto ops = tune_ops(cfg, group, "sm_90a", nullptr);
    std::set<std::string> keys, families;
    for (const auto& op : ops) {
      CHECK(keys.insert(op->family() + "/" + op->signature()).second);
      families.insert(op->family());
      for (int64_t m : default_tune_buckets()) {
        if (!op->serves(m)) continue;
        const json def = op->default_config(m);
        CHECK(tune::why_malformed(op->family(), def).empty());
        CHECK(!op->kernels(def, m).empty());
        for (const json& c : op->candidates(m)) CHECK(!op->kernels(c, m).empty());  // spec() validates the tile
      }
    }
    CHECK(families.count(group ? tune::kGemvW4 : tune::kGemvBf16) == 1);
    for (const char* f : {tune::kGemm, tune::kMoeRouter, tune::kMoeDecode, tune::kMoeGemm, tune::kMoePath, tune::kAttentionPrefill,
                          tune::kAttentionDecode, tune::kGdnPrefill, tune::kGdnRecurrent})
      CHECK(families.count(f) == 1);
    // q|k|v, o_proj = out_proj (same shape), in_proj, lm_head GEMVs; 3 GEMMs; 4 MoE; 2 attention; 2 GDN.
    // W4A16 on sm_90a: each GEMM twice (dequantized in the loop below kWgmmaDequantFirstM, first above).
    CHECK(ops.size() == (group ? 18u : 15u));
  }
}

TEST_CASE("a run uses the tuned tile of the nearest bucket, else the default, with one notice") {
  const Config cfg = test::config_35b();
  TuneFile f(TuneIdentity{"GPU X", "sm_90", "13.0", "q35jit test"});
  const std::string qkv = tune::dense_signature(9216, 2048, 128, false);
  f.set(tune::kGemvW4, qkv, 1, TuneEntry{json{{"row_warps", 2}, {"k_warps", 8}, {"unroll", 1}}, 4.0, 5.0});
  f.set(tune::kGemvW4, qkv, 8, TuneEntry{json{{"row_warps", 1}, {"k_warps", 2}, {"unroll", 2}}, 6.0, 7.0});
  // An entry invalid for the shape (k_warps beyond K's 16 tiles): the default, with a notice.
  const std::string in = tune::dense_signature(12352, 2048, 128, false);
  f.set(tune::kGemvW4, in, 1, TuneEntry{json{{"row_warps", 1}, {"k_warps", 32}, {"unroll", 1}}, 4.0, 5.0});
  f.set(tune::kGemm, tune::dense_signature(12352, 2048, 0, false), 4096,
        TuneEntry{json{{"bm", 128}, {"bn", 256}, {"bk", 32}, {"warps_m", 2}, {"warps_n", 4}, {"stages", 3}}, 1, 2});
  auto table = std::make_shared<const TuneTable>(std::vector<TuneTable::Layer>{{"test.json", f}});
  std::vector<std::string> notices;
  gpu::TunedTiles tt(cfg, 128, "sm_80", table, [&](const std::string& s) { notices.push_back(s); });

  W4GemvTile t = tt.w4_gemv(9216, 2048, false, 1);
  CHECK((t.row_warps == 2 && t.k_warps == 8 && t.unroll == 1 && t.m_tile == 1));
  t = tt.w4_gemv(9216, 2048, false, 4);  // |4 - 1| = 3 < |4 - 8| = 4: bucket 1's config, m_tile for 4
  CHECK((t.k_warps == 8 && t.m_tile == 4));
  t = tt.w4_gemv(9216, 2048, false, 6);  // |6 - 8| = 2 < |6 - 1| = 5: bucket 8
  CHECK((t.k_warps == 2 && t.m_tile == 8));
  CHECK(notices.empty());

  const W4GemvTile def = default_w4_gemv_tile(12352, 2048, 128, 1);
  t = tt.w4_gemv(12352, 2048, false, 1);
  CHECK((t.k_warps == def.k_warps && t.row_warps == def.row_warps && t.unroll == def.unroll));
  REQUIRE(notices.size() == 1);
  CHECK(contains(notices[0], "test.json"));
  CHECK(contains(notices[0], "not usable"));
  tt.w4_gemv(12352, 2048, false, 1);
  CHECK(notices.size() == 1);  // once per entry

  const GemmTile g = tt.gemm(12352, 2048, false, 3000);
  CHECK((g.bm == 128 && g.bn == 256 && g.stages == 3));

  // Missing (family, signature): the default and one notice saying how to tune, once.
  const AttentionPrefillTile ap = tt.attention_prefill(512);
  const AttentionPrefillTile dp = default_attention_prefill_tile(16, 2, 256, kAttentionSmemLimitSm80);
  CHECK((ap.warps == dp.warps && ap.block_n == dp.block_n));
  REQUIRE(notices.size() == 2);
  CHECK(contains(notices[1], "q35jit tune"));
  tt.gdn(4096);
  tt.moe(1);
  CHECK(notices.size() == 2);

  // No table: defaults, silently.
  std::vector<std::string> none;
  gpu::TunedTiles plain(cfg, 128, "sm_80", nullptr, [&](const std::string& s) { none.push_back(s); });
  t = plain.w4_gemv(9216, 2048, false, 1);
  CHECK(t.k_warps == default_w4_gemv_tile(9216, 2048, 128, 1).k_warps);
  CHECK(none.empty());
}

TEST_CASE("gdn: tuned prefill configs serve every M; an obsolete chunk tile falls back with a notice") {
  const Config cfg = test::config_35b();
  const std::string sig = tune::gdn_signature(gpu::gdn_shape(cfg));
  TuneFile f(TuneIdentity{"GPU X", "sm_90", "13.0", "q35jit test"});
  // Valid at M = 16 (as shipped); vs = 64 (valid for the old gdn_chunk_state) at M = 4096.
  f.set(tune::kGdnPrefill, sig, 16, TuneEntry{json{{"vs", 16}, {"prologue_tokens", 8}, {"prologue_warps", 2}}, 1, 2});
  f.set(tune::kGdnPrefill, sig, 4096, TuneEntry{json{{"vs", 64}, {"prologue_tokens", 16}, {"prologue_warps", 8}}, 1, 2});
  f.set(tune::kGdnRecurrent, sig, 1, TuneEntry{json{{"rows", 8}, {"warps", 2}}, 1, 2});
  auto table = std::make_shared<const TuneTable>(std::vector<TuneTable::Layer>{{"old.json", f}});
  std::vector<std::string> notices;
  gpu::TunedTiles tt(cfg, 128, "sm_90a", table, [&](const std::string& s) { notices.push_back(s); });
  const gpu::GdnTiles one = tt.gdn(1);  // a 1-token prefill takes the chunked kernels: bucket 16's config
  CHECK((one.chunk.vs == 16 && one.prologue.tokens == 8 && one.prologue.warps == 2));
  CHECK((one.recurrent.rows == 8 && one.recurrent.warps == 2));  // decode
  CHECK(notices.empty());
  const gpu::GdnTiles big = tt.gdn(4096);
  const gpu::GdnTiles def = gpu::GdnTiles::defaults(gpu::gdn_shape(cfg));
  CHECK((big.chunk.vs == def.chunk.vs && big.prologue.tokens == def.prologue.tokens));
  REQUIRE(notices.size() == 1);
  CHECK(contains(notices[0], "old.json"));
  CHECK(contains(notices[0], "vs = 64 is not 16 or 32"));
}

TEST_CASE("sm_90a: the prefill GEMMs take the wgmma kernel; wgmma tiles are refused elsewhere") {
  const Config cfg = test::config_35b();
  TuneFile f(TuneIdentity{"GPU X", "sm_90", "13.0", "q35jit test"});
  // wgmma: the dense GEMM's signature carries the W4A16 group (dequantized inside the GEMM).
  f.set(tune::kGemm, tune::dense_signature(12352, 2048, 128, false), 512,
        TuneEntry{json{{"bm", 128}, {"bn", 64}, {"bk", 64}, {"warps_m", 2}, {"warps_n", 1}, {"stages", 5},
                       {"wgmma", true}},
                  1, 2});
  // From kWgmmaDequantFirstM rows the weights are dequantized first: the bf16 GEMM's signature.
  f.set(tune::kGemm, tune::dense_signature(12352, 2048, 0, false), 4096,
        TuneEntry{json{{"bm", 64}, {"bn", 256}, {"bk", 64}, {"warps_m", 1}, {"warps_n", 2}, {"stages", 3},
                       {"wgmma", true}},
                  1, 2});
  const MoeShape ms = gpu::moe_shape(cfg, 128);
  f.set(tune::kMoeGemm, tune::moe_signature(ms), 4096,
        TuneEntry{json{{"block_m", 128}, {"block_n", 128}, {"block_k", 64}, {"warps_m", 2}, {"warps_n", 1},
                       {"stages", 3}, {"wgmma", true}},
                  1, 2});
  auto table = std::make_shared<const TuneTable>(std::vector<TuneTable::Layer>{{"test.json", f}});
  std::vector<std::string> notices;
  auto log = [&](const std::string& s) { notices.push_back(s); };
  gpu::TunedTiles hopper(cfg, 128, "sm_90a", table, log);
  CHECK(hopper.wgmma());
  const GemmTile g = hopper.gemm(12352, 2048, false, 512);
  CHECK((g.wgmma && g.bn == 64 && g.stages == 5));
  const GemmTile g4k = hopper.gemm(12352, 2048, false, 4096);
  CHECK((g4k.wgmma && g4k.bn == 256 && g4k.stages == 3));
  const GemmTile def = hopper.gemm(2048, 4096, false, 4096);  // no entry: the wgmma default
  CHECK((def.wgmma && def.bk == 64 && def.bm == 64 * def.warps_m));
  const gpu::MoeTiles mt = hopper.moe(4096);
  CHECK((mt.gemm.wgmma && mt.gemm.block_m == 128 && mt.gemm.stages == 3));
  CHECK(hopper.moe(512).gemm.wgmma);  // nearest bucket
  // Without entries: wgmma from kMoeWgmmaMinTokens tokens, mma.sync's small row blocks below.
  gpu::TunedTiles plain(cfg, 128, "sm_90a", nullptr, log);
  CHECK(plain.moe(kMoeWgmmaMinTokens).gemm.wgmma);
  CHECK_FALSE(plain.moe(kMoeWgmmaMinTokens - 1).gemm.wgmma);
  // The H200 tuner's choices as defaults: 32-row mma.sync blocks for short prompts, two 64 x 256
  // warpgroups along M from 3072 tokens.
  const MoeGemmTile small = plain.moe(512).gemm, big = plain.moe(4096).gemm;
  CHECK((small.block_m == 32 && small.block_n == 128 && small.block_k == 64 && small.warps_n == 4));
  CHECK((big.wgmma && big.block_m == 128 && big.block_n == 256 && big.warps_m == 2));
  CHECK(plain.moe(2048).gemm.block_m == 64);
  // W4A16 from 3072 tokens: the warp-specialised form; up to 8 tokens per expert (128 tokens: 4):
  // the swapped form (weights x 8 tokens).
  CHECK((big.ws && !big.swap));
  const MoeGemmTile tiny_t = plain.moe(128).gemm;
  CHECK((tiny_t.swap && tiny_t.ws && tiny_t.block_m == 8 && tiny_t.block_n == 64));
  // Elsewhere (sm_80) the defaults do not depend on the call size.
  gpu::TunedTiles a100(cfg, 128, "sm_80", nullptr, log);
  CHECK(a100.moe(512).gemm.block_m == a100.moe(4096).gemm.block_m);

  // sm_80 has no wgmma: the entries are refused with a notice, the mma.sync defaults run.
  notices.clear();
  gpu::TunedTiles ampere(cfg, 128, "sm_80", table, log);
  CHECK_FALSE(ampere.wgmma());
  CHECK_FALSE(ampere.moe(4096).gemm.wgmma);
  // (one notice for the router's missing entry, one for the refused GEMM tile)
  CHECK(std::count_if(notices.begin(), notices.end(), [](const std::string& n) { return contains(n, "sm_90a"); }) == 1);
  CHECK_FALSE(ampere.gemm(12352, 2048, false, 4096).wgmma);
}

TEST_CASE("wgmma tiles: validity, JSON round trip, candidates") {
  const Config cfg = test::config_35b();
  for (int group : {0, 32, 128}) {
    const MoeShape ms = gpu::moe_shape(cfg, group);
    const MoeGemmTile d = default_moe_gemm_tile(ms, true);
    CHECK(d.wgmma);
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
      CHECK(why_invalid(d, ms, g).empty());
    const std::vector<MoeGemmTile> cands = tune::moe_gemm_candidates(ms, 4096, true);
    // Both kinds on sm_90a (the tuner picks per bucket), only mma.sync elsewhere.
    CHECK(std::count_if(cands.begin(), cands.end(), [](const MoeGemmTile& t) { return t.wgmma; }) >= 10);
    CHECK(std::count_if(cands.begin(), cands.end(), [](const MoeGemmTile& t) { return !t.wgmma; }) >= 8);
    for (const MoeGemmTile& t : tune::moe_gemm_candidates(ms, 4096, false)) CHECK_FALSE(t.wgmma);
    for (const MoeGemmTile& t : cands) {
      const MoeGemmTile back = tune::moe_gemm_from_json(tune::to_json(t));
      CHECK((back.wgmma == t.wgmma && back.stages == t.stages && back.block_n == t.block_n &&
             back.warps_n == t.warps_n && back.block_m == t.block_m && back.ws == t.ws && back.swap == t.swap &&
             back.ksub == t.ksub));
    }
  }
  // The template's rules: bm = 64 * warpgroups, bn / wgn a wgmma N, N % bn for MoE, shared memory.
  const MoeShape ms = gpu::moe_shape(cfg, 128);
  CHECK_FALSE(why_invalid(MoeGemmTile{128, 128, 64, 1, 1, 4, true}, ms, MoeGemm::RoutedDown).empty());
  CHECK_FALSE(why_invalid(MoeGemmTile{64, 96, 64, 1, 1, 4, true}, ms, MoeGemm::RoutedDown).empty());
  CHECK_FALSE(why_invalid(MoeGemmTile{64, 128, 32, 1, 1, 4, true}, ms, MoeGemm::RoutedDown).empty());
  CHECK_FALSE(why_invalid(MoeGemmTile{128, 256, 64, 2, 1, 8, true}, ms, MoeGemm::RoutedDown).empty());  // smem
  CHECK(contains(why_invalid(MoeGemmTile{64, 128, 64, 1, 1, 2, true}, ms, MoeGemm::RoutedDown), "stages"));
  // Dense: ragged N runs (guarded); K must be a multiple of 8; old JSON without the key is mma.sync.
  CHECK(why_invalid(GemmTile{128, 128, 64, 2, 1, 4, true}, 12352, 2048).empty());
  CHECK_FALSE(why_invalid(GemmTile{128, 128, 64, 2, 1, 4, true}, 12352, 2044).empty());
  // W4A16 in the loop: whole 64-k steps, its own shared memory, never the mma.sync GEMM.
  CHECK(why_invalid(GemmTile{128, 128, 64, 2, 1, 4, true}, 12352, 2048, 128).empty());
  CHECK(contains(why_invalid(GemmTile{128, 128, 64, 2, 1, 4, true}, 12352, 2080, 32), "multiple of 64"));
  CHECK(contains(why_invalid(GemmTile{}, 12352, 2048, 128), "need a wgmma tile"));
  CHECK(why_invalid(GemmTile{128, 256, 64, 2, 1, 5, true}, 12352, 2048, 128).empty());       // 222 KiB
  CHECK_FALSE(why_invalid(GemmTile{128, 256, 64, 2, 1, 5, true}, 12352, 2048, 0).empty());   // 241 KiB
  for (const GemmTile& t : tune::gemm_candidates(12352, 2048, 512, true, 128))
    CHECK(why_invalid(t, 12352, 2048, 128).empty());
  const GemmTile old = tune::gemm_from_json(json{{"bm", 128}, {"bn", 128}, {"bk", 32}, {"warps_m", 2}, {"warps_n", 4},
                                                 {"stages", 4}});
  CHECK_FALSE(old.wgmma);
  CHECK(contains(tune::why_malformed(tune::kGemm, json{{"bm", 128}, {"bn", 128}, {"bk", 32}, {"warps_m", 2},
                                                        {"warps_n", 4}, {"stages", 4}, {"wgmma", 1}}),
                 "wgmma"));
  for (const GemmTile& t : tune::gemm_candidates(12352, 2048, 4096, true)) CHECK(t.wgmma);
  CHECK(default_gemm_tile(12352, 2048, 4096, true).wgmma);
  // Short prompts: the swapped warp-specialised tile (weights x rows), rows rounded up to 16..64.
  const GemmTile s32 = default_gemm_tile(12352, 2048, 32, true), s100 = default_gemm_tile(2048, 4096, 100, true);
  CHECK((s32.swap && s32.ws && s32.bm == 32 && s32.bn == 64));
  CHECK((s100.swap && s100.bm == 64));
  CHECK_FALSE(default_gemm_tile(12352, 2048, kGemmSwapMaxM + 1, true).swap);
  for (const GemmTile& t : tune::gemm_candidates(12352, 2048, 100, true, 128)) {
    const GemmTile back = tune::gemm_from_json(tune::to_json(t));
    CHECK((back.swap == t.swap && back.ws == t.ws && back.ksub == t.ksub && back.bm == t.bm && back.stages == t.stages));
  }
  const std::vector<GemmTile> c100 = tune::gemm_candidates(12352, 2048, 100, true, 128),
                              c4k = tune::gemm_candidates(12352, 2048, 4096, true, 128);
  CHECK(std::count_if(c100.begin(), c100.end(), [](const GemmTile& t) { return t.swap; }) >= 10);
  CHECK(std::count_if(c4k.begin(), c4k.end(), [](const GemmTile& t) { return t.swap; }) == 0);
  CHECK(contains(why_invalid(GemmTile{16, 64, 64, 1, 1, 4, true, false, true}, 2048, 4096, 128), "warp-specialised"));
  CHECK(contains(why_invalid(GemmTile{16, 64, 64, 1, 1, 4, false, true, true}, 2048, 4096, 128), "wgmma tile"));
}

TEST_CASE("relative_l2 and durations") {
  CHECK(relative_l2({1, 2, 3}, {1, 2, 3}) == 0);
  CHECK(relative_l2({1, 2}, {1, 2, 3}) == INFINITY);
  CHECK(relative_l2({NAN, 2}, {1, 2}) == INFINITY);
  CHECK(relative_l2({1.1f, 2}, {1, 2}) == doctest::Approx(0.1 / std::sqrt(5.0)).epsilon(1e-3));
  CHECK(format_duration(3.25) == "3.2 s");
  CHECK(format_duration(125) == "2m05s");
  CHECK(format_duration(7300) == "2h01m");
}

TEST_CASE("attention_prefill wgmma tiles: candidates on sm_90a only, JSON round trip, the tuned pick per arch") {
  const std::vector<AttentionPrefillTile> hopper = tune::attention_prefill_candidates(16, 2, 256, kAttentionSmemLimitSm90, true);
  // head_dim 256: 32 keys x 2..4 stages, 48 x 2..3, 64 x 2, 80 x 2 (96 keys: O, S and P exceed the
  // registers), each with and without ping-pong; and the mma.sync tiles.
  CHECK(std::count_if(hopper.begin(), hopper.end(), [](const AttentionPrefillTile& t) { return t.wgmma; }) == 14);
  CHECK(std::count_if(hopper.begin(), hopper.end(), [](const AttentionPrefillTile& t) { return !t.wgmma; }) >= 3);
  for (const AttentionPrefillTile& t : tune::attention_prefill_candidates(16, 2, 256, kAttentionSmemLimitSm90))
    CHECK_FALSE(t.wgmma);
  for (const AttentionPrefillTile& t : hopper) {
    CHECK(why_invalid(t, 16, 2, 256, kAttentionSmemLimitSm90).empty());
    CHECK(t.block_n <= 80);
    const AttentionPrefillTile back = tune::attention_prefill_from_json(tune::to_json(t));
    CHECK((back.warps == t.warps && back.block_n == t.block_n && back.wgmma == t.wgmma &&
           back.stages == t.stages && back.pingpong == t.pingpong));
  }
  CHECK(tune::to_json(AttentionPrefillTile{8, 80, true, 2, true}) ==
        json({{"warps", 8}, {"block_n", 80}, {"wgmma", true}, {"stages", 2}, {"pingpong", true}}));
  CHECK(tune::to_json(AttentionPrefillTile{8, 64}) == json({{"warps", 8}, {"block_n", 64}}));  // as before
  const AttentionPrefillTile old = tune::attention_prefill_from_json(json{{"warps", 8}, {"block_n", 64}});
  CHECK((!old.wgmma && !old.pingpong && old.stages == 2));
  CHECK(contains(tune::why_malformed(tune::kAttentionPrefill, json{{"warps", 8}, {"block_n", 80}, {"wgmma", 1}}), "wgmma"));

  // A tuned wgmma entry runs on sm_90a; an sm_80 run falls back to the default with a notice.
  const Config cfg = test::config_35b();
  TuneFile f(TuneIdentity{"GPU X", "sm_90a", "13.0", "q35jit test"});
  f.set(tune::kAttentionPrefill, tune::attention_signature(16, 2, 256), 4096,
        TuneEntry{tune::to_json(AttentionPrefillTile{8, 64, true, 2, false}), 1, 2});
  auto table = std::make_shared<const TuneTable>(std::vector<TuneTable::Layer>{{"test.json", f}});
  std::vector<std::string> notices;
  const gpu::TunedTiles h100(cfg, 128, "sm_90a", table, [&](const std::string& s) { notices.push_back(s); });
  const AttentionPrefillTile picked = h100.attention_prefill(4096);
  CHECK((picked.wgmma && picked.block_n == 64 && !picked.pingpong));
  CHECK(notices.empty());
  const gpu::TunedTiles a100(cfg, 128, "sm_80", table, [&](const std::string& s) { notices.push_back(s); });
  CHECK_FALSE(a100.attention_prefill(4096).wgmma);
  REQUIRE(notices.size() == 1);
  CHECK(contains(notices[0], "sm_90a"));
  // The sm_90a ops of the tuner hold the Hopper tiles; sm_80's do not.
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    int wgmma = 0;
    for (const auto& op : tune_ops(cfg, 128, arch, nullptr))
      if (op->family() == tune::kAttentionPrefill)
        for (const json& c : op->candidates(4096)) wgmma += tune::attention_prefill_from_json(c).wgmma;
    CHECK(wgmma == (arch == "sm_90a" ? 14 : 0));
  }
}

// The MoE path choice (issue 8): the grouped kernels for every decode step and for prompt chunks up
// to the tuned crossover (default kMoeGroupedDefaultMaxTokens), the GEMM path above, never the grouped
// path past what the target's shared memory holds; the grouped path runs the M = 1 tiles at every T.
TEST_CASE("moe_path: tuned per bucket, default grouped up to 128 tokens, bounded by shared memory") {
  const Config cfg = test::config_35b();
  const MoeShape ms = gpu::moe_shape(cfg, 128);
  const std::string sig = tune::moe_signature(ms);
  // JSON
  CHECK(tune::to_json(tune::MoePathConfig{true}) == json{{"grouped", 1}});
  CHECK(tune::moe_path_from_json(json{{"grouped", 0}}).grouped == false);
  CHECK(tune::why_malformed(tune::kMoePath, json{{"grouped", 1}}).empty());
  CHECK(contains(tune::why_malformed(tune::kMoePath, json{{"grouped", 2}}), "not 0 or 1"));
  CHECK(contains(tune::why_malformed(tune::kMoePath, json::object()), "grouped"));
  CHECK(std::count(tune::families().begin(), tune::families().end(), std::string(tune::kMoePath)) == 1);

  // The op: buckets 96, 128, 256 (above a decode step, within the grouped bound), both paths.
  for (const char* arch : {"sm_90a", "sm_80", "sm_86"}) {
    CAPTURE(arch);
    const auto ops = tune_ops(cfg, 128, arch, nullptr);
    const TuneOp* path = nullptr;
    for (const auto& op : ops)
      if (op->family() == tune::kMoePath) path = op.get();
    REQUIRE(path != nullptr);
    CHECK(path->signature() == sig);
    std::vector<int64_t> served;
    for (int64_t m : default_tune_buckets())
      if (path->serves(m)) served.push_back(m);
    // sm_86: down's shared memory holds 156 tokens (99 KiB per block).
    CHECK(served == (std::string(arch) == "sm_86" ? std::vector<int64_t>{96, 128} : std::vector<int64_t>{96, 128, 256}));
    for (int64_t m : served) {
      CHECK(path->candidates(m).size() == 2);
      CHECK(path->default_config(m) == json{{"grouped", m <= kMoeGroupedDefaultMaxTokens ? 1 : 0}});
      CHECK(path->kernels(json{{"grouped", 1}}, m).size() == 3);  // router, gate_up, down
      CHECK(path->kernels(json{{"grouped", 0}}, m).size() == 8);  // router GEMM + top-k, align, combine, 4 GEMMs
    }
    for (const auto& op : ops) {  // the grouped path's router is tuned up to its bound
      if (op->family() == tune::kMoeRouter) CHECK((op->serves(256) && !op->serves(512)));
      if (op->family() == tune::kMoeGemm) CHECK((op->serves(65) && !op->serves(64)));
    }
  }

  // No table: grouped up to 128 tokens.
  gpu::TunedTiles plain(cfg, 128, "sm_90a", nullptr, nullptr);
  CHECK(plain.moe_grouped_max() == 256);
  for (int64_t m : {1, 8, 64, 65, 96, 128}) CHECK(plain.moe_grouped(m));
  for (int64_t m : {129, 200, 256, 512, 4096}) CHECK(!plain.moe_grouped(m));

  // Tuned: GEMM at 96, grouped at 256; a decode entry at M = 1 serves the grouped path at every T.
  TuneFile f(TuneIdentity{"GPU X", "sm_90", "13.0", "q35jit test"});
  f.set(tune::kMoePath, sig, 96, TuneEntry{json{{"grouped", 0}}, 1, 2});
  f.set(tune::kMoePath, sig, 256, TuneEntry{json{{"grouped", 1}}, 1, 2});
  f.set(tune::kMoeDecode, sig, 1, TuneEntry{json{{"gate_up_ksplit", 8}, {"down_ksplit", 1}}, 1, 2});
  auto table = std::make_shared<const TuneTable>(std::vector<TuneTable::Layer>{{"test.json", f}});
  std::vector<std::string> notices;
  gpu::TunedTiles tt(cfg, 128, "sm_90a", table, [&](const std::string& s) { notices.push_back(s); });
  CHECK(tt.moe_grouped(64));    // a decode step: always grouped
  CHECK(!tt.moe_grouped(96));
  CHECK(!tt.moe_grouped(150));  // nearest bucket 96
  CHECK(tt.moe_grouped(200));   // nearest bucket 256
  CHECK(tt.moe_grouped(256));
  CHECK(!tt.moe_grouped(300));  // past kMoeGroupedMaxTokens
  for (int64_t m : {1, 64, 128, 256, 4096}) {
    CAPTURE(m);
    const gpu::MoeTiles t = tt.moe(m);
    CHECK((t.gate_up.ksplit == 8 && t.down.ksplit == 1));
  }
  CHECK(tt.moe_grouped_max() == 256);  // down_ksplit 1: (227 KiB - 2 KiB - 9 * 1 * 512) / 576 > 256
  // sm_86 (99 KiB per block): the tuned "grouped" at 256 does not fit, so 200 takes the GEMM path.
  gpu::TunedTiles ada(cfg, 128, "sm_86", table, nullptr);
  CHECK(ada.moe_grouped_max() == (99 * 1024 - 2048 - 9 * 1 * 8 * 16 * 4) / (9 * 16 * 4));
  CHECK(ada.moe_grouped(128) == false);  // nearest bucket 96: GEMM
  CHECK(!ada.moe_grouped(200));
  for (const std::string& n : notices) CHECK(!contains(n, "not usable"));  // the router's miss notice only
}
