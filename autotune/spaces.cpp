#include "autotune/spaces.h"

#include <fmt/format.h>

#include <algorithm>
#include <utility>

#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"

namespace q35::tune {

namespace {

using nlohmann::json;

int64_t pow2_at_least(int64_t m) {
  int64_t p = 1;
  while (p < m) p *= 2;
  return p;
}

// The integer field `key` of a config object; Error naming the family and field otherwise.
int field(const json& j, const char* family, const char* key) {
  if (!j.is_object()) fail("tune config of {}: not a JSON object", family);
  auto it = j.find(key);
  if (it == j.end()) fail("tune config of {}: missing field \"{}\"", family, key);
  if (!it->is_number_integer()) fail("tune config of {}: field \"{}\" is not an integer", family, key);
  const int64_t v = it->get<int64_t>();
  if (v < 0 || v > 1 << 20) fail("tune config of {}: field \"{}\" = {} is out of range", family, key, v);
  return int(v);
}

// The optional integer field `key` (absent: `fallback`).
int field_or(const json& j, const char* family, const char* key, int fallback) {
  return j.is_object() && j.contains(key) ? field(j, family, key) : fallback;
}

// The optional boolean field `key` (absent: false).
bool flag(const json& j, const char* family, const char* key) {
  if (!j.is_object()) fail("tune config of {}: not a JSON object", family);
  auto it = j.find(key);
  if (it == j.end()) return false;
  if (!it->is_boolean()) fail("tune config of {}: field \"{}\" is not true or false", family, key);
  return it->get<bool>();
}

}  // namespace

const std::vector<std::string>& families() {
  static const std::vector<std::string> f = {kGemvW4,    kGemvFp8,   kGemvBf16, kGemm,
                                             kMoeRouter, kMoeDecode, kMoeGemm,  kMoePath,
                                             kAttentionPrefill, kAttentionDecode, kGdnPrefill, kGdnRecurrent};
  return f;
}

std::string dense_signature(int64_t n, int64_t k, int64_t group, bool out_f32) {
  const std::string format = group == kFp8Group ? "_FP8" : group ? fmt::format("_G{}", group) : std::string();
  return fmt::format("N{}_K{}{}_{}", n, k, format, out_f32 ? "f32" : "bf16");
}

std::string moe_signature(const MoeShape& s) {
  return fmt::format("H{}_E{}_K{}_I{}_IS{}_{}", s.hidden, s.experts, s.top_k, s.inter, s.shared_inter,
                     s.group == kFp8Group ? std::string("FP8") : s.group ? fmt::format("G{}", s.group) : std::string("bf16"));
}

std::string router_signature(const MoeShape& s) { return fmt::format("H{}_E{}_K{}", s.hidden, s.experts, s.top_k); }

std::string attention_signature(int64_t hq, int64_t hkv, int64_t d) { return fmt::format("HQ{}_HKV{}_D{}", hq, hkv, d); }

std::string gdn_signature(const GdnShape& s) {
  return fmt::format("HK{}_HV{}_DK{}_DV{}_KC{}", s.hk, s.hv, s.dk, s.dv, s.kc);
}

int gemv_m_tile(int64_t m) { return int(std::clamp<int64_t>(pow2_at_least(std::max<int64_t>(m, 1)), 1, 16)); }

// ---- candidates ----

std::vector<W4GemvTile> w4_gemv_candidates(int64_t n, int64_t k, int64_t group, int64_t m) {
  std::vector<W4GemvTile> out;
  for (int rw : {1, 2})
    for (int kw : {1, 2, 4, 8, 16})
      for (int un : {1, 2, 4}) {
        W4GemvTile t{gemv_m_tile(m), rw, kw, un};
        if (why_invalid(t, n, k, group).empty()) out.push_back(t);
      }
  return out;
}

std::vector<GemvTile> gemv_bf16_candidates(int64_t n, int64_t k, int64_t m) {
  std::vector<GemvTile> out;
  for (int rows : {1, 2, 4, 8})
    for (int warps : {2, 4, 8}) {
      GemvTile t{gemv_m_tile(m), rows, warps};
      if (why_invalid(t, n, k).empty()) out.push_back(t);
    }
  return out;
}

// (stages, 64-k steps per stage) of the swapped warp-specialised tiles.
constexpr std::pair<int, int> kSwapStages[] = {{4, 1}, {8, 1}, {4, 2}, {6, 2}, {4, 4}};

std::vector<GemmTile> gemm_candidates(int64_t n, int64_t k, int64_t m, bool wgmma, int group) {
  std::vector<GemmTile> out;
  const int64_t max_bm = std::max<int64_t>(64, pow2_at_least(m));
  if (wgmma) {
    for (int wm : {1, 2})
      for (int bn : {64, 128, 256})
        for (int wn : {1, 2})
          for (int stages : {3, 4, 6})
            for (bool ws : {false, true}) {
              GemmTile t{64 * wm, bn, 64, wm, wn, stages, true, ws};
              if (t.bm <= max_bm && why_invalid(t, n, k, group).empty()) out.push_back(t);
            }
    if (m <= 256)  // swapped (weights x rows): few rows stream the weights in 64-row panels
      for (int bt : {16, 32, 64})
        for (int wn : {1, 2})
          for (auto [stages, ksub] : kSwapStages) {
            GemmTile t{bt, 64 * wn, 64, 1, wn, stages, true, true, true, ksub};
            if (bt <= max_bm && why_invalid(t, n, k, group).empty()) out.push_back(t);
          }
    return out;
  }
  for (int bm : {64, 128, 256})
    for (int bn : {64, 128, 256})
      for (int bk : {32, 64})
        for (auto [wm, wn] : {std::pair{2, 2}, {2, 4}, {4, 2}})
          for (int stages : {3, 4}) {
            if (bm > max_bm) continue;
            GemmTile t{bm, bn, bk, wm, wn, stages};
            if (why_invalid(t, n, k, group).empty()) out.push_back(t);
          }
  return out;
}

std::vector<MoeRouterTile> moe_router_candidates(const MoeShape& s, int64_t m) {
  std::vector<MoeRouterTile> out;
  for (int mt : {1, 2, 4, 8, 16})
    for (int rows : {1, 2, 4})
      for (int warps : {2, 4, 8}) {
        if (mt > pow2_at_least(m)) continue;
        MoeRouterTile t{mt, rows, warps};
        if (why_invalid(t, s).empty()) out.push_back(t);
      }
  return out;
}

std::vector<MoeDecodeConfig> moe_decode_candidates(const MoeShape& s) {
  std::vector<MoeDecodeConfig> out;
  for (int gu : {1, 2, 4, 8})
    for (int dn : {1, 2, 3, 4}) {
      MoeDecodeConfig c{MoeGemvTile{gu}, MoeDownTile{dn}};
      if (why_invalid_gate_up(c.gate_up, s).empty() && why_invalid(c.down, s).empty()) out.push_back(c);
    }
  return out;
}

std::vector<MoeStreamTile> moe_stream_candidates() {
  std::vector<MoeStreamTile> out;
  for (int warps : {2, 4, 8}) {
    MoeStreamTile t;
    t.warps = warps;
    if (why_invalid(t).empty()) out.push_back(t);
  }
  return out;
}

std::vector<MoeGemmTile> moe_gemm_candidates(const MoeShape& s, int64_t, bool wgmma) {
  std::vector<MoeGemmTile> out;
  auto add = [&](const MoeGemmTile& t) {
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
      if (!why_invalid(t, s, g).empty()) return;
    out.push_back(t);
  };
  if (wgmma)  // and the mma.sync tiles below: small prompts may prefer their small row blocks
    for (int wm : {1, 2})
      for (int bn : {64, 128, 256})
        for (int wn : {1, 2})
          for (int stages : {3, 4, 6, 8})
            for (bool ws : {false, true}) add(MoeGemmTile{64 * wm, bn, 64, wm, wn, stages, true, ws});
  if (wgmma)  // persistent warp-specialised (W4A16): deeper rings, the bf16 tiles shrink past 4 stages
    for (int wm : {1, 2})
      for (int bn : {128, 256})
        for (int wn : {1, 2})
          for (int stages : {4, 5, 6, 8}) add(MoeGemmTile{64 * wm, bn, 64, wm, wn, stages, true, true, false, 1, true});
  if (wgmma)  // swapped (weights x tokens): few tokens per expert
    for (int bt : {8, 16, 32, 64})
      for (int wn : {1, 2})
        for (auto [stages, ksub] : kSwapStages) add(MoeGemmTile{bt, 64 * wn, 64, 1, wn, stages, true, true, true, ksub});
  if (wgmma) {  // swapped with the weights in registers (W4A16): up to bm tokens of an expert per tile;
               // two consumer warpgroups (one: short prompts only), persistent or not
    for (int bt : {16, 32, 64, 128, 256})
      for (int stages : {4, 6})
        for (bool persist : {false, true})
          add(MoeGemmTile{bt, 128, 64, 1, 2, stages, true, true, true, 1, persist, true});
    for (int bt : {16, 32})
      for (int stages : {4, 6}) add(MoeGemmTile{bt, 64, 64, 1, 1, stages, true, true, true, 1, false, true});
  }
  for (int bm : {16, 32, 64, 128})
    for (int bn : {64, 128})
      for (int bk : {32, 64})
        for (auto [wm, wn] : {std::pair{1, 2}, {1, 4}, {2, 2}, {2, 4}, {4, 2}}) {
          add(MoeGemmTile{bm, bn, bk, wm, wn});
        }
  return out;
}

std::vector<AttentionPrefillTile> attention_prefill_candidates(int64_t hq, int64_t hkv, int64_t d, int64_t smem_limit,
                                                               bool wgmma) {
  std::vector<AttentionPrefillTile> out;
  auto add = [&](const AttentionPrefillTile& t) {
    if (why_invalid(t, hq, hkv, d, smem_limit).empty()) out.push_back(t);
  };
  if (wgmma)
    for (int bn : {32, 48, 64, 80, 96, 112, 128})
      for (int stages : {2, 3, 4})
        for (bool pingpong : {false, true}) add(AttentionPrefillTile{8, bn, true, stages, pingpong});
  for (int warps : {2, 4, 8})
    for (int bn : {16, 32, 64}) add(AttentionPrefillTile{warps, bn});
  return out;
}

std::vector<AttentionDecodeTile> attention_decode_candidates(int64_t hq, int64_t hkv, int64_t d) {
  std::vector<AttentionDecodeTile> out;
  for (int warps : {1, 2, 4, 8, 16}) {
    AttentionDecodeTile t{warps};
    if (why_invalid(t, hq, hkv, d).empty()) out.push_back(t);
  }
  return out;
}

std::vector<GdnPrefillConfig> gdn_prefill_candidates(const GdnShape& s) {
  std::vector<GdnPrefillConfig> out;
  // The chunk pass: fused state + output (the cluster form where the device has clusters, else the
  // portable one), the portable fused form on every device, or the unfused state / output pair.
  for (int vs : {16, 32})
    for (auto [fused, cluster] : {std::pair{true, true}, {true, false}, {false, false}})
      for (int tokens : {8, 16, 32})
        for (int warps : {2, 4, 8}) {
          GdnPrefillConfig c{GdnChunkTile{vs, fused, cluster}, GdnPrologueTile{tokens, warps}};
          if (why_invalid(c.chunk, s).empty() && why_invalid(c.prologue, s).empty()) out.push_back(c);
        }
  return out;
}

std::vector<GdnRecurrentTile> gdn_recurrent_candidates(const GdnShape& s) {
  std::vector<GdnRecurrentTile> out;
  for (int rows : {4, 8, 16, 32})
    for (int warps : {1, 2, 4, 8}) {
      GdnRecurrentTile t{rows, warps};
      if (why_invalid(t, s).empty()) out.push_back(t);
    }
  return out;
}

// ---- JSON ----

json to_json(const W4GemvTile& t) { return {{"row_warps", t.row_warps}, {"k_warps", t.k_warps}, {"unroll", t.unroll}}; }
json to_json(const GemvTile& t) { return {{"rows_per_warp", t.rows_per_warp}, {"warps", t.warps}}; }
json to_json(const GemmTile& t) {
  json j = {{"bm", t.bm}, {"bn", t.bn}, {"bk", t.bk}, {"warps_m", t.warps_m}, {"warps_n", t.warps_n}, {"stages", t.stages}};
  if (t.wgmma) j["wgmma"] = true;
  if (t.ws) j["ws"] = true;
  if (t.swap) j["swap"] = true;
  if (t.ksub != 1) j["ksub"] = t.ksub;
  return j;
}
json to_json(const MoeRouterTile& t) { return {{"m_tile", t.m_tile}, {"rows_per_warp", t.rows_per_warp}, {"warps", t.warps}}; }
json to_json(const MoePathConfig& c) { return {{"grouped", c.grouped ? 1 : 0}}; }
json to_json(const MoeDecodeConfig& c) { return {{"gate_up_ksplit", c.gate_up.ksplit}, {"down_ksplit", c.down.ksplit}}; }
json to_json(const MoeGemmTile& t) {
  json j = {{"block_m", t.block_m}, {"block_n", t.block_n}, {"block_k", t.block_k}, {"warps_m", t.warps_m},
            {"warps_n", t.warps_n}};
  if (t.wgmma) j["wgmma"] = true, j["stages"] = t.stages;
  if (t.ws) j["ws"] = true;
  if (t.swap) j["swap"] = true;
  if (t.ksub != 1) j["ksub"] = t.ksub;
  if (t.persist) j["persist"] = true;
  if (t.rs) j["rs"] = true;
  return j;
}
json to_json(const AttentionPrefillTile& t) {
  json j = {{"warps", t.warps}, {"block_n", t.block_n}};
  if (t.wgmma) j["wgmma"] = true, j["stages"] = t.stages;
  if (t.pingpong) j["pingpong"] = true;
  return j;
}
json to_json(const AttentionDecodeTile& t) { return {{"warps", t.warps}}; }
json to_json(const GdnPrefillConfig& c) {
  json j = {{"vs", c.chunk.vs}, {"prologue_tokens", c.prologue.tokens}, {"prologue_warps", c.prologue.warps}};
  if (c.chunk.fused) j["fused"] = true;  // absent: the state / output pair (entries tuned before the fused pass)
  if (c.chunk.cluster) j["cluster"] = true;
  return j;
}
json to_json(const GdnRecurrentTile& t) { return {{"rows", t.rows}, {"warps", t.warps}}; }

W4GemvTile w4_gemv_from_json(const json& j, int64_t m) {
  return {gemv_m_tile(m), field(j, kGemvW4, "row_warps"), field(j, kGemvW4, "k_warps"), field(j, kGemvW4, "unroll")};
}
GemvTile gemv_bf16_from_json(const json& j, int64_t m) {
  return {gemv_m_tile(m), field(j, kGemvBf16, "rows_per_warp"), field(j, kGemvBf16, "warps")};
}
GemmTile gemm_from_json(const json& j) {
  return {field(j, kGemm, "bm"),      field(j, kGemm, "bn"),      field(j, kGemm, "bk"),
          field(j, kGemm, "warps_m"), field(j, kGemm, "warps_n"), field(j, kGemm, "stages"),
          flag(j, kGemm, "wgmma"),    flag(j, kGemm, "ws"),       flag(j, kGemm, "swap"),
          field_or(j, kGemm, "ksub", 1)};
}
MoeRouterTile moe_router_from_json(const json& j) {
  return {field(j, kMoeRouter, "m_tile"), field(j, kMoeRouter, "rows_per_warp"), field(j, kMoeRouter, "warps")};
}
MoeDecodeConfig moe_decode_from_json(const json& j) {
  return {MoeGemvTile{field(j, kMoeDecode, "gate_up_ksplit")}, MoeDownTile{field(j, kMoeDecode, "down_ksplit")}};
}
MoeGemmTile moe_gemm_from_json(const json& j) {
  return {field(j, kMoeGemm, "block_m"), field(j, kMoeGemm, "block_n"), field(j, kMoeGemm, "block_k"),
          field(j, kMoeGemm, "warps_m"), field(j, kMoeGemm, "warps_n"), field_or(j, kMoeGemm, "stages", 2),
          flag(j, kMoeGemm, "wgmma"), flag(j, kMoeGemm, "ws"), flag(j, kMoeGemm, "swap"),
          field_or(j, kMoeGemm, "ksub", 1), flag(j, kMoeGemm, "persist"), flag(j, kMoeGemm, "rs")};
}
MoePathConfig moe_path_from_json(const json& j) {
  const int g = field(j, kMoePath, "grouped");
  if (g != 0 && g != 1) fail("tune config of {}: field \"grouped\" is {}, not 0 or 1", kMoePath, g);
  if (j.contains("gemm")) {  // the GEMM arm's tile as measured (the runner takes moe_gemm's entry)
    if (g == 1) fail("tune config of {}: the grouped path has no \"gemm\" tile", kMoePath);
    moe_gemm_from_json(j["gemm"]);
  }
  return {g == 1};
}
AttentionPrefillTile attention_prefill_from_json(const json& j) {
  return {field(j, kAttentionPrefill, "warps"), field(j, kAttentionPrefill, "block_n"),
          flag(j, kAttentionPrefill, "wgmma"), field_or(j, kAttentionPrefill, "stages", 2),
          flag(j, kAttentionPrefill, "pingpong")};
}
AttentionDecodeTile attention_decode_from_json(const json& j) { return {field(j, kAttentionDecode, "warps")}; }
GdnPrefillConfig gdn_prefill_from_json(const json& j) {
  return {GdnChunkTile{field(j, kGdnPrefill, "vs"), flag(j, kGdnPrefill, "fused"), flag(j, kGdnPrefill, "cluster")},
          GdnPrologueTile{field(j, kGdnPrefill, "prologue_tokens"), field(j, kGdnPrefill, "prologue_warps")}};
}
GdnRecurrentTile gdn_recurrent_from_json(const json& j) {
  return {field(j, kGdnRecurrent, "rows"), field(j, kGdnRecurrent, "warps")};
}

std::string why_malformed(const std::string& family, const json& config) {
  try {
    if (family == kGemvW4 || family == kGemvFp8) w4_gemv_from_json(config, 1);
    else if (family == kGemvBf16) gemv_bf16_from_json(config, 1);
    else if (family == kGemm) gemm_from_json(config);
    else if (family == kMoeRouter) moe_router_from_json(config);
    else if (family == kMoeDecode) moe_decode_from_json(config);
    else if (family == kMoeGemm) moe_gemm_from_json(config);
    else if (family == kMoePath) moe_path_from_json(config);
    else if (family == kAttentionPrefill) attention_prefill_from_json(config);
    else if (family == kAttentionDecode) attention_decode_from_json(config);
    else if (family == kGdnPrefill) gdn_prefill_from_json(config);
    else if (family == kGdnRecurrent) gdn_recurrent_from_json(config);
    else return fmt::format("unknown family \"{}\"", family);
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

}  // namespace q35::tune
