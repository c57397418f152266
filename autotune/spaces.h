#pragma once
// The tunable kernel families: their names and shape signatures in tune-cache files, their config
// spaces (the candidates `q35jit tune` times for a bucket of M tokens, each valid by the family's
// why_invalid rule before anything is compiled), and their configs as JSON.
//
// family              kernel(s)                              tuned fields              used for M
// gemv_w4a16          gemv_w4a16 (projections, lm_head)      row_warps k_warps unroll  1..16
// gemv_fp8            gemv_fp8 (FP8 projections, lm_head)    row_warps k_warps unroll  1..16
// gemv_bf16           gemv_bf16[_f32] (bf16 weights)         rows_per_warp warps       1..16
// gemm_bf16           gemm_bf16 / gemm_wgmma (prefill)       bm bn bk warps stages     > 16
// moe_router          moe_router                             m_tile rows warps         all
// moe_decode          moe_decode_gate_up + moe_decode_down   gate_up_ksplit down_ksplit <= 8
// moe_gemm            moe_align + the four moe_gemm          block_m/n/k warps         > 8
// moe_path            grouped path or GEMM path per call     grouped (1 / 0)           65..256
// attention_prefill   attention_prefill[_wgmma]              warps block_n (wgmma      prefill
//                                                            stages pingpong)
// attention_decode    attention_decode (+ merge)             warps                     decode
// gdn_prefill         gdn_prologue + gdn_chunk_*             vs prologue tokens/warps  prefill (>= 1)
// gdn_recurrent       gdn_decode (gdn_recurrent)             rows warps                decode (1)
//
// Signatures name the weight format where it changes the kernel: "_G128" (W4A16 g128), "_FP8" (FP8:
// "FP8" in the MoE signatures), nothing (dense bf16; "bf16" in the MoE ones).
// The GEMV families take m_tile from M at run time (the smallest power of two >= M, at most 16),
// so one tuned entry serves every M of its bucket; only the other fields are tuned.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/tile_config.h"
#include "autotune/tiles_attention.h"
#include "autotune/tiles_dense.h"
#include "autotune/tiles_gdn.h"
#include "autotune/tiles_moe.h"

namespace q35::tune {

inline constexpr const char* kGemvW4 = "gemv_w4a16";
inline constexpr const char* kGemvFp8 = "gemv_fp8";
inline constexpr const char* kGemvBf16 = "gemv_bf16";
inline constexpr const char* kGemm = "gemm_bf16";
inline constexpr const char* kMoeRouter = "moe_router";
inline constexpr const char* kMoeDecode = "moe_decode";
inline constexpr const char* kMoeGemm = "moe_gemm";
// Which MoE path a prompt chunk of M tokens takes, kDecodeStepMaxRows < M <= kMoeGroupedMaxTokens
// (autotune/tiles_moe.h moe_grouped_for): {"grouped": 1} the expert-grouped kernels (M = 1 tiles),
// {"grouped": 0} the grouped-GEMM path. The tuner times both whole paths and keeps the faster.
inline constexpr const char* kMoePath = "moe_path";
inline constexpr const char* kAttentionPrefill = "attention_prefill";
inline constexpr const char* kAttentionDecode = "attention_decode";
inline constexpr const char* kGdnPrefill = "gdn_prefill";
inline constexpr const char* kGdnRecurrent = "gdn_recurrent";
// Every family above, in that order.
const std::vector<std::string>& families();

// Shape signatures (keys of a family's map in the tune file).
std::string dense_signature(int64_t n, int64_t k, int64_t group, bool out_f32);  // "N9216_K2048_G128_bf16", "N9216_K2048_FP8_bf16"
std::string moe_signature(const MoeShape& s);                                    // "H2048_E256_K8_I512_IS512_G128" / "..._FP8"
std::string router_signature(const MoeShape& s);                                 // "H2048_E256_K8"
std::string attention_signature(int64_t hq, int64_t hkv, int64_t d);             // "HQ16_HKV2_D256"
std::string gdn_signature(const GdnShape& s);                                    // "HK16_HV32_DK128_DV128_KC4"

// The GEMV m_tile for M tokens: the smallest power of two >= M, at most 16.
int gemv_m_tile(int64_t m);

// Config of the decode MoE path.
struct MoeDecodeConfig {
  MoeGemvTile gate_up;
  MoeDownTile down;
};
// Config of the MoE path choice (moe_path).
struct MoePathConfig {
  bool grouped = true;
};
// Config of the GDN chunked prefill.
struct GdnPrefillConfig {
  GdnChunkTile chunk;
  GdnPrologueTile prologue;
};

// ---- candidates (valid for the shape; the default is not necessarily among them) ----
// group: a W4A16 group or kFp8Group (gemv_fp8 takes the same tiles).
std::vector<W4GemvTile> w4_gemv_candidates(int64_t n, int64_t k, int64_t group, int64_t m);
std::vector<GemvTile> gemv_bf16_candidates(int64_t n, int64_t k, int64_t m);
// wgmma: the Hopper kernel's tiles (sm_90a) instead of the mma.sync ones.
// group: W4A16 weights dequantized inside the wgmma GEMM (wgmma only), or FP8 weights (both kinds);
// shared memory differs.
std::vector<GemmTile> gemm_candidates(int64_t n, int64_t k, int64_t m, bool wgmma = false, int group = 0);
std::vector<MoeRouterTile> moe_router_candidates(const MoeShape& s, int64_t m);
std::vector<MoeDecodeConfig> moe_decode_candidates(const MoeShape& s);
// The grouped path's streaming form: warps per block (min_tokens as the default's: the tiles change the
// speed, not the sums). Not a tune family yet: the CPU tests compile these and `GPU: moe streaming
// form*` times them against the decode kernels.
std::vector<MoeStreamTile> moe_stream_candidates();
// Valid for all four GEMMs (one tile serves them: the align kernel's BLOCK_M is the routed GEMMs');
// the same space at every m (block_m up to kMoeMaxBlockM).
std::vector<MoeGemmTile> moe_gemm_candidates(const MoeShape& s, int64_t m, bool wgmma = false);
// wgmma: also the Hopper tiles (attention_prefill_wgmma, sm_90a).
std::vector<AttentionPrefillTile> attention_prefill_candidates(int64_t hq, int64_t hkv, int64_t d, int64_t smem_limit,
                                                               bool wgmma = false);
std::vector<AttentionDecodeTile> attention_decode_candidates(int64_t hq, int64_t hkv, int64_t d);
std::vector<GdnPrefillConfig> gdn_prefill_candidates(const GdnShape& s);
std::vector<GdnRecurrentTile> gdn_recurrent_candidates(const GdnShape& s);
// Largest block_m among moe_gemm_candidates (sizes the MoE workspace for any tuned tile).
constexpr int kMoeMaxBlockM = 256;  // the register-sourced wgmma tiles (up to 256 tokens of an expert)
constexpr int kMoeMinBlockM = 8;  // the swapped wgmma tiles (weights x 8..64 tokens)

// ---- JSON (objects of the fields named in the table above) ----
// from_json: Error naming the family and the missing or mistyped field. It does not check validity
// against a shape: callers do (why_invalid), and fall back to the default when it fails.
nlohmann::json to_json(const W4GemvTile& t);  // m_tile is not written
nlohmann::json to_json(const GemvTile& t);    // m_tile is not written
nlohmann::json to_json(const GemmTile& t);
nlohmann::json to_json(const MoeRouterTile& t);
nlohmann::json to_json(const MoeDecodeConfig& c);
nlohmann::json to_json(const MoeGemmTile& t);
nlohmann::json to_json(const MoePathConfig& c);
nlohmann::json to_json(const AttentionPrefillTile& t);
nlohmann::json to_json(const AttentionDecodeTile& t);
nlohmann::json to_json(const GdnPrefillConfig& c);
nlohmann::json to_json(const GdnRecurrentTile& t);

W4GemvTile w4_gemv_from_json(const nlohmann::json& j, int64_t m);  // m_tile = gemv_m_tile(m); also gemv_fp8's
GemvTile gemv_bf16_from_json(const nlohmann::json& j, int64_t m);
GemmTile gemm_from_json(const nlohmann::json& j);
MoeRouterTile moe_router_from_json(const nlohmann::json& j);
MoeDecodeConfig moe_decode_from_json(const nlohmann::json& j);
MoeGemmTile moe_gemm_from_json(const nlohmann::json& j);
MoePathConfig moe_path_from_json(const nlohmann::json& j);  // "grouped" must be 0 or 1
AttentionPrefillTile attention_prefill_from_json(const nlohmann::json& j);
AttentionDecodeTile attention_decode_from_json(const nlohmann::json& j);
GdnPrefillConfig gdn_prefill_from_json(const nlohmann::json& j);
GdnRecurrentTile gdn_recurrent_from_json(const nlohmann::json& j);

// Checks a config object of `family` has the family's fields as integers (`tune --check`); empty
// when it does, else why not. Unknown family: "unknown family".
std::string why_malformed(const std::string& family, const nlohmann::json& config);

}  // namespace q35::tune
