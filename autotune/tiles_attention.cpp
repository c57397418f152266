#include "autotune/tiles_attention.h"

#include <fmt/format.h>

#include <algorithm>

#include "runtime/core/error.h"

namespace q35 {

namespace {

constexpr int64_t kStaticSmemLimit = 48 * 1024;  // bytes of static shared memory per block

// Shape rules shared by every attention kernel.
std::string why_bad_heads(int64_t hq, int64_t hkv) {
  if (hq <= 0 || hkv <= 0 || hq % hkv != 0)
    return fmt::format("{} query heads are not a positive multiple of {} kv heads", hq, hkv);
  return {};
}

std::string heads_args(int64_t hq, int64_t hkv, int64_t d) {
  return fmt::format("[HQ = {}, HKV = {}, D = {}]", hq, hkv, d);
}

}  // namespace

std::string why_invalid(const QkNormRopeTile& tile, int64_t hq, int64_t hkv, int64_t d, int64_t rotary) {
  if (std::string why = why_bad_heads(hq, hkv); !why.empty()) return why;
  if (d <= 0 || d % 8 != 0 || d > 256) return fmt::format("head_dim = {} is not a multiple of 8 in [8, 256] (one warp per head)", d);
  if (rotary < 0 || rotary % 16 != 0 || rotary > d)
    return fmt::format("rotary_dim = {} is not a multiple of 16 in [0, head_dim = {}]", rotary, d);
  if (tile.warps < 1 || tile.warps > 32) return fmt::format("warps = {} is not in [1, 32]", tile.warps);
  return {};
}

int64_t AttentionPrefillTile::smem_bytes(int64_t d) const {
  if (wgmma) return 1024 + 2 * d * (block_m() + 2 * int64_t(stages) * block_n) + 8 * (1 + 4 * int64_t(stages));
  return 2 * d * (block_m() + 4 * int64_t(block_n));
}

namespace {

// attention_prefill_wgmma's rules (its static_asserts, registers, shared memory).
std::string why_invalid_wgmma(const AttentionPrefillTile& tile, int64_t d, int64_t smem_limit) {
  if (d != 64 && d != 128 && d != 256)
    return fmt::format("wgmma: head_dim = {} is not 64, 128 or 256 (rows split over the 128 producer threads)", d);
  if (tile.warps != 8) return fmt::format("wgmma: warps = {} is not 8 (two consumer warpgroups of 64 rows)", tile.warps);
  if (tile.block_n < 16 || tile.block_n > 128 || tile.block_n % 16 != 0)
    return fmt::format("wgmma: block_n = {} is not a multiple of 16 in [16, 128] (the P V k-steps)", tile.block_n);
  if (tile.stages < 2 || tile.stages > 4) return fmt::format("wgmma: stages = {} is not in [2, 4]", tile.stages);
  // A consumer thread holds O (d / 2 fp32), S (block_n / 2 fp32) and P (block_n / 4 bf16 pairs) at
  // once (the P V wgmma runs under the next tile's softmax) within its 240 registers.
  if (d / 2 + 3 * tile.block_n / 4 > 192)
    return fmt::format("wgmma: {} registers per thread for O, S and P (head_dim / 2 + 3 block_n / 4) exceeds 192",
                       d / 2 + 3 * tile.block_n / 4);
  if (tile.smem_bytes(d) > smem_limit)
    return fmt::format("{} B of shared memory exceeds {} B", tile.smem_bytes(d), smem_limit);
  return {};
}

}  // namespace

std::string why_invalid(const AttentionPrefillTile& tile, int64_t hq, int64_t hkv, int64_t d, int64_t smem_limit) {
  if (std::string why = why_bad_heads(hq, hkv); !why.empty()) return why;
  if (tile.wgmma) return why_invalid_wgmma(tile, d, smem_limit);
  if (d <= 0 || d % 64 != 0 || d > 256)
    return fmt::format("head_dim = {} is not a multiple of 64 in [64, 256] (swizzled 128-byte groups, "
                       "D/2 accumulator registers per thread)", d);
  if (tile.warps < 1 || tile.warps > 8) return fmt::format("warps = {} is not in [1, 8]", tile.warps);
  if (tile.block_n != 16 && tile.block_n != 32 && tile.block_n != 64)
    return fmt::format("block_n = {} is not 16, 32 or 64", tile.block_n);
  // S accumulators (block_n / 2) next to the O accumulators (d / 2) per thread.
  if (d / 2 + tile.block_n / 2 > 160)
    return fmt::format("{} accumulator registers per thread (head_dim / 2 + block_n / 2) exceeds 160",
                       d / 2 + tile.block_n / 2);
  if (tile.smem_bytes(d) > smem_limit)
    return fmt::format("{} B of shared memory exceeds {} B", tile.smem_bytes(d), smem_limit);
  return {};
}

std::string why_invalid(const AttentionDecodeTile& tile, int64_t hq, int64_t hkv, int64_t d) {
  if (std::string why = why_bad_heads(hq, hkv); !why.empty()) return why;
  if (hq / hkv > AttentionDecodeTile::kRows && (hq / hkv) % AttentionDecodeTile::kRows != 0)
    return fmt::format("{} query heads per kv head: more than {} (rows of one decode MMA) and not a multiple of it",
                       hq / hkv, AttentionDecodeTile::kRows);
  if (d <= 0 || d % 64 != 0 || d > 256)
    return fmt::format("head_dim = {} is not a multiple of 64 in [64, 256] (registers)", d);
  if (tile.warps < 1 || tile.warps > 16) return fmt::format("warps = {} is not in [1, 16]", tile.warps);
  if (tile.smem_bytes(d) > kStaticSmemLimit)
    return fmt::format("{} B of shared memory exceeds {} B", tile.smem_bytes(d), kStaticSmemLimit);
  return {};
}

QkNormRopeTile default_qk_norm_rope_tile(int64_t hq, int64_t hkv, int64_t d, int64_t rotary) {
  // One warp per head when they fit in a block (q, k and v heads), else 32 warps looping.
  QkNormRopeTile tile{int(std::clamp<int64_t>(hq + 2 * hkv, 1, 32))};
  if (std::string why = why_invalid(tile, hq, hkv, d, rotary); !why.empty())
    fail("qk_norm_rope {}: unsupported shape: {}", heads_args(hq, hkv, d), why);
  return tile;
}

AttentionPrefillTile default_attention_prefill_wgmma_tile(int64_t hq, int64_t hkv, int64_t d) {
  for (int block_n : {80, 64, 48, 32, 16}) {
    const AttentionPrefillTile tile{8, block_n, true, 2, true};
    if (why_invalid(tile, hq, hkv, d, kAttentionSmemLimitSm90).empty()) return tile;
  }
  fail("attention_prefill_wgmma {}: unsupported shape: {}", heads_args(hq, hkv, d),
       why_invalid(AttentionPrefillTile{8, 16, true, 2, true}, hq, hkv, d, kAttentionSmemLimitSm90));
}

AttentionPrefillTile default_attention_prefill_tile(int64_t hq, int64_t hkv, int64_t d, int64_t smem_limit,
                                                    bool hopper) {
  if (hopper && kAttentionPrefillWgmmaDefault) return default_attention_prefill_wgmma_tile(hq, hkv, d);
  // 128 query rows (8 warps) share each K/V tile. 64 keys per tile measured fastest on the H100
  // (T = 4096: 235 TFLOP/s vs 207 with 32 keys) but needs 192 KiB at head_dim 256; 32 keys fit
  // sm_80's shared memory.
  for (AttentionPrefillTile tile : {AttentionPrefillTile{8, 64}, AttentionPrefillTile{8, 32}, AttentionPrefillTile{4, 32},
                                    AttentionPrefillTile{4, 16}})
    if (why_invalid(tile, hq, hkv, d, smem_limit).empty()) return tile;
  fail("attention_prefill {}: unsupported shape: {}", heads_args(hq, hkv, d),
       why_invalid(AttentionPrefillTile{4, 16}, hq, hkv, d, smem_limit));
}

int64_t attention_decode_qgroups(int64_t hq, int64_t hkv) {
  const int64_t group = hkv > 0 ? hq / hkv : 0;
  return group > AttentionDecodeTile::kRows ? group / AttentionDecodeTile::kRows : 1;
}

AttentionDecodeTile default_attention_decode_tile(int64_t hq, int64_t hkv, int64_t d) {
  AttentionDecodeTile tile{4};
  if (std::string why = why_invalid(tile, hq, hkv, d); !why.empty())
    fail("attention_decode {}: unsupported shape: {}", heads_args(hq, hkv, d), why);
  return tile;
}

namespace {

std::vector<std::pair<std::string, std::string>> head_params(int64_t hq, int64_t hkv, int64_t d) {
  return {{"HQ", std::to_string(hq)}, {"HKV", std::to_string(hkv)}, {"D", std::to_string(d)}};
}

}  // namespace

KernelSpec qk_norm_rope_spec(int64_t hq, int64_t hkv, int64_t d, int64_t rotary, const QkNormRopeTile& tile) {
  if (std::string why = why_invalid(tile, hq, hkv, d, rotary); !why.empty())
    fail("qk_norm_rope {}: invalid tile: {}", heads_args(hq, hkv, d), why);
  auto args = head_params(hq, hkv, d);
  args.emplace_back("ROTARY", std::to_string(rotary));
  args.emplace_back("WARPS", std::to_string(tile.warps));
  return {"attention", "qk_norm_rope", std::move(args)};
}

KernelSpec attention_prefill_spec(int64_t hq, int64_t hkv, int64_t d, const AttentionPrefillTile& tile) {
  // The spec is arch-neutral: the sm_90 limit here; launch checks the device's own.
  if (std::string why = why_invalid(tile, hq, hkv, d, kAttentionSmemLimitSm90); !why.empty())
    fail("attention_prefill {}: invalid tile: {}", heads_args(hq, hkv, d), why);
  auto args = head_params(hq, hkv, d);
  args.emplace_back("BLOCK_N", std::to_string(tile.block_n));
  if (tile.wgmma) {
    args.emplace_back("STAGES", std::to_string(tile.stages));
    args.emplace_back("PINGPONG", tile.pingpong ? "true" : "false");
    return {"attention_wgmma", "attention_prefill_wgmma", std::move(args)};
  }
  args.emplace_back("WARPS", std::to_string(tile.warps));
  return {"attention", "attention_prefill", std::move(args)};
}

KernelSpec attention_decode_spec(int64_t hq, int64_t hkv, int64_t d, const AttentionDecodeTile& tile) {
  if (std::string why = why_invalid(tile, hq, hkv, d); !why.empty())
    fail("attention_decode {}: invalid tile: {}", heads_args(hq, hkv, d), why);
  auto args = head_params(hq, hkv, d);
  args.emplace_back("WARPS", std::to_string(tile.warps));
  return {"attention", "attention_decode", std::move(args)};
}

KernelSpec attention_decode_merge_spec(int64_t hq, int64_t hkv, int64_t d, const AttentionDecodeTile& tile) {
  if (std::string why = why_invalid(tile, hq, hkv, d); !why.empty())
    fail("attention_decode_merge {}: invalid tile: {}", heads_args(hq, hkv, d), why);
  auto args = head_params(hq, hkv, d);
  args.emplace_back("WARPS", std::to_string(tile.warps));
  return {"attention", "attention_decode_merge", std::move(args)};
}

}  // namespace q35
