#include "autotune/tiles_gdn.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>

#include "runtime/core/error.h"

namespace q35 {

namespace {

// Opt-in dynamic shared memory per block on sm_80 (A100); sm_90 allows 227 KiB. Staying under the
// smaller limit keeps one cubin per tile valid on both.
constexpr int kSmemLimit = 163 * 1024;
constexpr int kSmemLimitSm90 = 227 * 1024;  // the cluster form of gdn_chunk_fused runs on sm_90+ only
constexpr int kChunk = 64;  // q35k::kGdnChunk

bool is_warp_count(int warps) { return warps >= 1 && warps <= 32; }

}  // namespace

std::string why_unsupported(const GdnShape& s) {
  if (s.hk <= 0 || s.hv <= 0 || s.hv % s.hk != 0)
    return fmt::format("value heads {} are not a positive multiple of key heads {}", s.hv, s.hk);
  if (s.dk <= 0 || s.dk % 128 != 0) return fmt::format("key head dim {} is not a multiple of 128", s.dk);
  if (s.dv <= 0 || s.dv % 128 != 0) return fmt::format("value head dim {} is not a multiple of 128", s.dv);
  if (s.kc < 2 || s.kc > 8) return fmt::format("conv kernel size {} is not in [2, 8]", s.kc);
  return {};
}

std::string why_invalid(const GdnPrologueTile& tile, const GdnShape& s) {
  if (std::string why = why_unsupported(s); !why.empty()) return why;
  if (!is_warp_count(tile.warps)) return fmt::format("warps = {} is not in [1, 32]", tile.warps);
  if (s.dk != 128 && s.dk != 256) return fmt::format("key head dim {} is not 128 or 256 (lanes of a head)", s.dk);
  if (tile.tokens < s.kc - 1 || tile.tokens > 32)
    return fmt::format("tokens = {} is not in [kc - 1 = {}, 32] (the first block must hold every ring reader; "
                       "a thread keeps tokens + kc - 1 inputs in registers)",
                       tile.tokens, s.kc - 1);
  return {};
}

std::string why_invalid(const GdnRecurrentTile& tile, const GdnShape& s) {
  if (std::string why = why_unsupported(s); !why.empty()) return why;
  if (!is_warp_count(tile.warps)) return fmt::format("warps = {} is not in [1, 32]", tile.warps);
  if (tile.rows <= 0 || tile.rows % tile.warps != 0)
    return fmt::format("rows = {} is not a positive multiple of warps = {}", tile.rows, tile.warps);
  if (s.dv % tile.rows != 0) return fmt::format("rows = {} does not divide dv = {}", tile.rows, s.dv);
  // gdn_decode splits the 2 dk q / k channels of a key head over the block's warps, whole lanes.
  if ((2 * s.dk) % (32 * tile.warps) != 0)
    return fmt::format("warps = {} does not divide 2 dk / 32 = {} (gdn_decode's q / k conv is split over the warps)",
                       tile.warps, 2 * s.dk / 32);
  // A lane keeps rows / warps state rows of dk / 32 fp32 values.
  const int64_t per_lane = tile.rows / tile.warps * s.dk / 32;
  if (per_lane > 64) return fmt::format("{} state values per lane exceeds 64 (registers)", per_lane);
  return {};
}

std::string why_invalid(const GdnChunkTile& tile, const GdnShape& s) {
  if (std::string why = why_unsupported(s); !why.empty()) return why;
  if (tile.vs != 16 && tile.vs != 32)
    return fmt::format("vs = {} is not 16 or 32 (the double-buffered inputs and the state copy of gdn_chunk_state / "
                       "gdn_chunk_fused fit sm_80's shared memory up to 32 columns)",
                       tile.vs);
  if (s.dv % tile.vs != 0) return fmt::format("vs = {} does not divide dv = {}", tile.vs, s.dv);
  if (const int prep = gdn_chunk_prepare_smem_bytes(s); prep > kSmemLimit)
    return fmt::format("gdn_chunk_prepare needs {} B of shared memory, more than {} B", prep, kSmemLimit);
  if (!tile.fused) {
    if (tile.cluster) return "cluster = true needs fused = true (the cluster form is gdn_chunk_fused's)";
    if (const int smem = gdn_chunk_state_smem_bytes(s, tile); smem > kSmemLimit)
      return fmt::format("gdn_chunk_state needs {} B of shared memory, more than {} B", smem, kSmemLimit);
    if (const int out = gdn_chunk_output_smem_bytes(s); out > kSmemLimit)
      return fmt::format("gdn_chunk_output needs {} B of shared memory, more than {} B", out, kSmemLimit);
    return {};
  }
  // The portable form must fit every arch: a cluster tile runs it where the arch has no clusters.
  if (const int smem = gdn_chunk_fused_smem_bytes(s, tile, false); smem > kSmemLimit)
    return fmt::format("gdn_chunk_fused needs {} B of shared memory, more than {} B", smem, kSmemLimit);
  if (tile.cluster) {
    if (s.dv / tile.vs > 8)
      return fmt::format("dv / vs = {} CTAs per cluster exceeds the portable cluster size 8", s.dv / tile.vs);
    if (const int smem = gdn_chunk_fused_smem_bytes(s, tile, true); smem > kSmemLimitSm90)
      return fmt::format("gdn_chunk_fused_cluster needs {} B of shared memory, more than {} B", smem, kSmemLimitSm90);
  }
  return {};
}

std::string why_invalid(const GatedRmsnormTile& tile, const GdnShape& s) {
  if (std::string why = why_unsupported(s); !why.empty()) return why;
  if (!is_warp_count(tile.heads) || s.hv % tile.heads != 0)
    return fmt::format("heads = {} is not in [1, 32] or does not divide hv = {}", tile.heads, s.hv);
  return {};
}

GdnPrologueTile default_gdn_prologue_tile(const GdnShape& s) {
  GdnPrologueTile tile{16, 4};
  if (std::string why = why_invalid(tile, s); !why.empty()) fail("gdn_prologue: unsupported shape: {}", why);
  return tile;
}

GdnRecurrentTile default_gdn_recurrent_tile(const GdnShape& s) {
  // 16 rows in 4 warps: hv x dv / 16 CTAs (256 for 32 heads of 128), 4 rows of dk per warp.
  GdnRecurrentTile tile{16, 4};
  if (std::string why = why_invalid(tile, s); !why.empty()) fail("gdn_recurrent: unsupported shape: {}", why);
  return tile;
}

GdnChunkTile default_gdn_chunk_tile(const GdnShape& s) {
  // 32 columns per CTA when that still gives >= 64 CTAs (128 for 32 heads of 128, one wave on 132
  // SMs), else 16. The unfused state / output pair: on the H200 at the 35B shapes, T = 4096, it ran
  // 411 us against 365 + ~40 (gated_rmsnorm) for the portable fused pass and 861 us for the cluster
  // form (2026-12-03, docs/perf-log.md); the tuner may pick a fused form where it wins.
  GdnChunkTile tile{s.hv * s.dv / 32 >= 64 ? 32 : 16, false, false};
  if (std::string why = why_invalid(tile, s); !why.empty()) fail("gdn_chunk_state: unsupported shape: {}", why);
  return tile;
}

GatedRmsnormTile default_gated_rmsnorm_tile(const GdnShape& s) {
  GatedRmsnormTile tile{s.hv % 4 == 0 ? 4 : 1};
  if (std::string why = why_invalid(tile, s); !why.empty()) fail("gated_rmsnorm: unsupported shape: {}", why);
  return tile;
}

int gdn_chunk_prepare_smem_bytes(const GdnShape& s) {
  // fp32: A and (I + A)^-1 [64, 68], the solve's block sums [3, 16, 17], gam, beta, exp(gam) [64];
  // bf16: k [64, dk + 8], v [64, dv + 8], the four split left factors [4, 64, 72].
  return int((2 * kChunk * (kChunk + 4) + 3 * 16 * 17 + 3 * kChunk) * 4 +
             (kChunk * (s.dk + 8) + kChunk * (s.dv + 8) + 4 * kChunk * (kChunk + 8)) * 2);
}

int gdn_chunk_state_smem_bytes(const GdnShape& s, const GdnChunkTile& tile) {
  // Two stages of {W hi, lo and k bf16 [3, 64, dk + 8], U fp32 [64, vs + 4], gam [64]}; S hi, lo bf16
  // [2, dk, vs + 8]; dcy Vn hi, lo bf16 [2, 64, vs + 8].
  const int64_t stage = 3 * kChunk * (s.dk + 8) * 2 + kChunk * (tile.vs + 4) * 4 + kChunk * 4;
  return int(2 * stage + 2 * s.dk * (tile.vs + 8) * 2 + 2 * kChunk * (tile.vs + 8) * 2);
}

int gdn_chunk_output_smem_bytes(const GdnShape& s) {
  // fp32 gam [64], row sums [2, 64]; bf16 q, k [64, dk + 8], QK hi, lo [2, 64, 72], S_n hi, lo
  // [2, dk, dv + 8], Vn hi, lo [2, 64, dv + 8].
  return int(3 * kChunk * 4 + (2 * kChunk * (s.dk + 8) + 2 * kChunk * (kChunk + 8) + 2 * s.dk * (s.dv + 8) +
                               2 * kChunk * (s.dv + 8)) * 2);
}

int gdn_chunk_fused_smem_bytes(const GdnShape& s, const GdnChunkTile& tile, bool cluster) {
  // Two stages of {k bf16 [64, dk + 8], U fp32 [64, vs + 4], gam [64]}; one (portable) or two
  // (cluster) stages of {W hi, lo and q bf16 [3, 64, dk + 8]}; S hi, lo bf16 [2, dk, vs + 8]; Vn and
  // dcy Vn hi, lo bf16 [2, 64, vs + 8] each; QK hi, lo bf16 [2, 64, 72]; cluster: the row partial
  // sums fp32 [2, 2 dv / vs, 64].
  const int64_t ks = s.dk + 8, ss = tile.vs + 8;
  const int64_t kug = kChunk * ks * 2 + kChunk * (tile.vs + 4) * 4 + kChunk * 4, wq = 3 * kChunk * ks * 2;
  int64_t bytes = 2 * kug + (cluster ? 2 : 1) * wq + 2 * s.dk * ss * 2 + 2 * (2 * kChunk * ss * 2) +
                  2 * kChunk * (kChunk + 8) * 2;
  if (cluster) bytes += 2 * 2 * (s.dv / tile.vs) * kChunk * 4;
  return int(bytes);
}

bool gdn_arch_has_cluster(const std::string& arch) {
  if (arch.rfind("sm_", 0) != 0) return false;
  return std::atoi(arch.c_str() + 3) >= 90;
}

}  // namespace q35
