#include "models/qwen35/gpu/tuned.h"

#include <fmt/format.h>

#include "autotune/tiles_wgmma.h"
#include "models/qwen35/gpu/attention.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/kernels.h"
#include "runtime/core/error.h"

namespace q35::qwen35::gpu {

TunedTiles::TunedTiles(const Config& cfg, int group, const std::string& arch, std::shared_ptr<const TuneTable> table,
                       std::function<void(const std::string&)> log)
    : cfg_(cfg),
      group_(group),
      smem_limit_(smem_limit_for(arch)),
      smem_optin_(smem_optin_bytes(arch)),
      wgmma_(arch_has_wgmma(arch)),
      moe_(gpu::moe_shape(cfg, group)),
      table_(std::move(table)),
      log_(std::move(log)) {}

template <typename T, typename Parse, typename Invalid>
T TunedTiles::pick(const char* family, const std::string& signature, int64_t m, const T& fallback, Parse parse,
                   Invalid why_invalid) const {
  if (!table_) return fallback;
  std::optional<TuneTable::Hit> hit = table_->lookup_hit(family, signature, m);
  if (!hit) {
    if (!miss_noticed_ && log_)
      log_(fmt::format("no tuned config for {} {} on this GPU: heuristic defaults are used where the tune cache has "
                       "no entry (run `q35jit tune --model DIR` or `--synthetic NAME` to measure them)",
                       family, signature));
    miss_noticed_ = true;
    return fallback;
  }
  std::string why;
  T tile = fallback;
  try {
    tile = parse(hit->entry->config);
    why = why_invalid(tile);
  } catch (const Error& e) {
    why = e.what();
  }
  if (why.empty()) return tile;
  const std::string key = fmt::format("{}/{}/{}", family, signature, hit->bucket);
  if (bad_noticed_.insert(key).second && log_)
    log_(fmt::format("{}: tuned config of {} {} at M = {} is not usable ({}); using the default", *hit->origin, family,
                     signature, hit->bucket, why));
  return fallback;
}

W4GemvTile TunedTiles::w4_gemv(int64_t n, int64_t k, bool out_f32, int64_t m) const {
  const W4GemvTile def = default_w4_gemv_tile(n, k, group_, int(m));
  return pick(
      group_ == kFp8Group ? tune::kGemvFp8 : tune::kGemvW4, tune::dense_signature(n, k, group_, out_f32), m, def,
      [&](const nlohmann::json& j) {
        // The tuned unroll may exceed what the register budget allows at this m_tile: lower it.
        W4GemvTile t = tune::w4_gemv_from_json(j, m);
        while (t.unroll > 1 && !why_invalid(t, n, k, group_).empty()) t.unroll /= 2;
        return t;
      },
      [&](const W4GemvTile& t) { return why_invalid(t, n, k, group_); });
}

GemvTile TunedTiles::gemv_bf16(int64_t n, int64_t k, bool out_f32, int64_t m) const {
  return pick(
      tune::kGemvBf16, tune::dense_signature(n, k, 0, out_f32), m, default_gemv_tile(n, k, int(m)),
      [&](const nlohmann::json& j) { return tune::gemv_bf16_from_json(j, m); },
      [&](const GemvTile& t) { return why_invalid(t, n, k); });
}

GemmTile TunedTiles::gemm(int64_t n, int64_t k, bool out_f32, int64_t m) const {
  return pick(
      tune::kGemm, tune::dense_signature(n, k, wgmma_ ? wgmma_gemm_group(group_, m, k) : mma_gemm_group(group_), out_f32),
      m, default_gemm_tile(n, k, m, wgmma_),
      [](const nlohmann::json& j) { return tune::gemm_from_json(j); },
      [&](const GemmTile& t) {
        if (t.wgmma && !wgmma_) return std::string("a wgmma tile needs an sm_90a device");
        return why_invalid(t, n, k, t.wgmma ? wgmma_gemm_group(group_, m, k) : mma_gemm_group(group_));
      });
}

MoeTiles TunedTiles::moe(int64_t m) const {
  MoeTiles t = MoeTiles::defaults(moe_, wgmma_, m);
  const MoeRouterTile router = pick(
      tune::kMoeRouter, tune::router_signature(moe_), m, t.router(m),
      [](const nlohmann::json& j) { return tune::moe_router_from_json(j); },
      [&](const MoeRouterTile& r) { return why_invalid(r, moe_); });
  t.router_one = t.router_decode = t.router_prefill = router;
  const std::string sig = tune::moe_signature(moe_);
  {
    // The grouped GEMVs' K splits are part of each token's arithmetic: the M = 1 tiles serve every T
    // (a decode step's or a prompt chunk's), so a token's result does not depend on how many tokens
    // share the call (batched == alone).
    const tune::MoeDecodeConfig c = pick(
        tune::kMoeDecode, sig, 1, tune::MoeDecodeConfig{t.gate_up, t.down},
        [](const nlohmann::json& j) { return tune::moe_decode_from_json(j); },
        [&](const tune::MoeDecodeConfig& d) {
          std::string why = why_invalid_gate_up(d.gate_up, moe_);
          return why.empty() ? why_invalid(d.down, moe_) : why;
        });
    t.gate_up = c.gate_up, t.down = c.down;
  }
  if (m > kDecodeStepMaxRows) {
    t.gemm = pick(
        tune::kMoeGemm, sig, m, t.gemm, [](const nlohmann::json& j) { return tune::moe_gemm_from_json(j); },
        [&](const MoeGemmTile& g) {
          if (g.wgmma && !wgmma_) return std::string("a wgmma tile needs an sm_90a device");
          if (g.block_m > tune::kMoeMaxBlockM) return fmt::format("block_m {} > {}", g.block_m, tune::kMoeMaxBlockM);
          for (MoeGemm which : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
            if (std::string why = why_invalid(g, moe_, which); !why.empty()) return why;
          return std::string();
        });
  }
  return t;
}

int64_t TunedTiles::moe_grouped_max() const {
  const MoeTiles one = moe(1);
  return moe_grouped_max_tokens(moe_, one.gate_up, one.down, smem_optin_);
}

bool TunedTiles::moe_grouped(int64_t m) const {
  const int64_t most = moe_grouped_max();
  if (m <= kDecodeStepMaxRows || m > most) return moe_grouped_for(m, most);
  const tune::MoePathConfig def{moe_grouped_for(m, most)};
  const tune::MoePathConfig c = pick(
      tune::kMoePath, tune::moe_signature(moe_), m, def, [](const nlohmann::json& j) { return tune::moe_path_from_json(j); },
      [](const tune::MoePathConfig&) { return std::string(); });
  return moe_grouped_for(m, most, c.grouped);
}

AttentionPrefillTile TunedTiles::attention_prefill(int64_t m) const {
  const int64_t hq = cfg_.num_heads, hkv = cfg_.num_kv_heads, d = cfg_.head_dim;
  return pick(
      tune::kAttentionPrefill, tune::attention_signature(hq, hkv, d), m,
      default_attention_prefill_tile(hq, hkv, d, smem_limit_, wgmma_),
      [](const nlohmann::json& j) { return tune::attention_prefill_from_json(j); },
      [&](const AttentionPrefillTile& t) {
        if (t.wgmma && !wgmma_) return std::string("a wgmma tile needs an sm_90a device");
        return why_invalid(t, hq, hkv, d, smem_limit_);
      });
}

AttentionDecodeTile TunedTiles::attention_decode(int64_t m) const {
  const int64_t hq = cfg_.num_heads, hkv = cfg_.num_kv_heads, d = cfg_.head_dim;
  return pick(
      tune::kAttentionDecode, tune::attention_signature(hq, hkv, d), m, default_attention_decode_tile(hq, hkv, d),
      [](const nlohmann::json& j) { return tune::attention_decode_from_json(j); },
      [&](const AttentionDecodeTile& t) { return why_invalid(t, hq, hkv, d); });
}

GdnTiles TunedTiles::gdn(int64_t m) const {
  const GdnShape s = gdn_shape(cfg_);
  GdnTiles t = GdnTiles::defaults(s);
  const std::string sig = tune::gdn_signature(s);
  // Prefill of any length runs the chunked kernels (gdn_prefill); the recurrent tile serves decode
  // (M = 1) and the token-by-token reference path.
  const tune::GdnPrefillConfig c = pick(
      tune::kGdnPrefill, sig, m, tune::GdnPrefillConfig{t.chunk, t.prologue},
      [](const nlohmann::json& j) { return tune::gdn_prefill_from_json(j); },
      [&](const tune::GdnPrefillConfig& p) {
        std::string why = why_invalid(p.chunk, s);
        return why.empty() ? why_invalid(p.prologue, s) : why;
      });
  t.chunk = c.chunk, t.prologue = c.prologue;
  t.recurrent = pick(
      tune::kGdnRecurrent, sig, m, t.recurrent, [](const nlohmann::json& j) { return tune::gdn_recurrent_from_json(j); },
      [&](const GdnRecurrentTile& r) { return why_invalid(r, s); });
  return t;
}

std::vector<KernelSpec> tuned_kernels(const Config& c, const TunedTiles& tt, const AttentionPlan& attn, int group,
                                      int64_t m) {
  std::vector<KernelSpec> specs;
  for (const DenseShape& d : dense_shapes(c)) {
    const bool f32 = d.proj == DenseProj::LmHead;
    if (m <= 16) {
      specs.push_back(group ? W4GemvPlan{d.n, d.k, group, tt.w4_gemv(d.n, d.k, f32, m), f32}.spec()
                            : GemvBf16Plan{d.n, d.k, tt.gemv_bf16(d.n, d.k, f32, m), f32}.spec());
      if (group && (d.proj == DenseProj::AttnOut || d.proj == DenseProj::GdnOut))
        specs.push_back(W4GemvPlan{d.n, d.k, group, tt.w4_gemv(d.n, d.k, false, m), false, true}.spec());
      if (group > 0 && d.proj == DenseProj::GdnOut && m == 1)  // W4A16 only (gpu_model run_layers: gated_out)
        specs.push_back(
            W4GemvPlan{d.n, d.k, group, tt.w4_gemv(d.n, d.k, false, 1), false, false, c.linear_value_head_dim}.spec());
    } else if (!f32)
      specs.push_back(GemmPlan{d.n, d.k, tt.gemm(d.n, d.k, false, m), false,
                                    tt.wgmma() ? wgmma_gemm_group(group, m, d.k) : mma_gemm_group(group)}
                          .spec());
  }
  for (KernelSpec& s : moe_kernels(tt.moe_shape(), tt.moe(m))) specs.push_back(std::move(s));
  if (c.num_layers_of(LayerType::FullAttention) > 0) {
    AttentionPlan p = attn;
    p.prefill = tt.attention_prefill(m);
    p.decode = tt.attention_decode(m);
    specs.push_back(p.prefill_spec());
    specs.push_back(p.decode_spec());
    specs.push_back(p.decode_merge_spec());
    AttentionPlan one = attn;  // the batched step runs each sequence's token with the M = 1 tile
    one.decode = tt.attention_decode(1);
    specs.push_back(one.qk_norm_rope_batch_spec());
    specs.push_back(one.decode_batch_spec());
    specs.push_back(one.decode_merge_batch_spec());
  }
  if (c.num_layers_of(LayerType::LinearAttention) > 0) {
    const GdnTiles t = tt.gdn(m);
    specs.push_back(gdn_prologue_spec(c, t.prologue));
    specs.push_back(gdn_recurrent_spec(c, t.recurrent));
    specs.push_back(gdn_decode_spec(c, t.recurrent));
    specs.push_back(gdn_decode_norm_spec(c, t.recurrent));
    specs.push_back(gdn_decode_batch_spec(c, t.recurrent));
    specs.push_back(gdn_chunk_state_spec(c, t.chunk));
    specs.push_back(gdn_chunk_output_spec(c));
  }
  return specs;
}

}  // namespace q35::qwen35::gpu
