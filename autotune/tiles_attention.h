#pragma once
// Tile configurations of the gated full-attention kernels (kernel_templates/attention.cuh): the
// template parameters beyond the shapes, their validity rules, heuristic defaults and the
// KernelSpecs. Shapes: hq / hkv query / kv heads, d = head_dim, rotary = rotary_dim.
#include <cstdint>
#include <string>

#include "runtime/jit/kernel_spec.h"

namespace q35 {

// qk_norm_rope<HQ, HKV, D, ROTARY, WARPS>; grid (T), block 32 * warps (one warp per head, looping).
struct QkNormRopeTile {
  int warps = 8;
  int threads() const { return 32 * warps; }
};

// attention_prefill<HQ, HKV, D, BLOCK_N, WARPS>; grid (hq, ceil(T / block_m)), block 32 * warps,
// dynamic shared memory smem_bytes(d) (Q tile + two stages of K and V tiles, bf16).
// wgmma: the Hopper form attention_prefill_wgmma<HQ, HKV, D, BLOCK_N, STAGES, PINGPONG>
// (kernel_templates/attention_wgmma.cuh, sm_90a only): 8 consumer warps (two warpgroups of 64 query
// rows, block_m 128) + a producer warpgroup, block 384; a ring of `stages` K and V tiles of block_n
// keys; dynamic shared memory 1 KiB alignment + Q [128, d] + stages x (K, V) [block_n, d] bf16 +
// (1 + 4 stages) mbarriers.
struct AttentionPrefillTile {
  int warps = 8;          // each warp owns 16 query rows
  int block_n = 32;       // keys per tile
  bool wgmma = false;     // attention_prefill_wgmma (warps = 8)
  int stages = 2;         // wgmma: depth of the K / V ring
  bool pingpong = false;  // wgmma: the two consumer warpgroups take turns issuing their wgmma
  int block_m() const { return 16 * warps; }
  int threads() const { return 32 * warps + (wgmma ? 128 : 0); }
  int64_t smem_bytes(int64_t d) const;
};

// attention_decode<HQ, HKV, D, WARPS>; grid (hkv, splits), block 32 * warps, static shared memory
// smem_bytes(d); attention_decode_merge<HQ, HKV, D, WARPS> (same warps); grid (T * hq, d / 64),
// block 256.
struct AttentionDecodeTile {
  int warps = 4;  // each warp takes blocks of 16 keys of its split
  int threads() const { return 32 * warps; }
  int64_t smem_bytes(int64_t d) const { return int64_t(warps) * kRows * (d + 2) * 4; }
  static constexpr int kRows = 8;  // query rows per block: (q heads per block) * T <= 8
};
// Blocks per kv head of attention_decode: 1 for up to kRows q heads per kv head, else
// (hq / hkv) / kRows (then hq / hkv must be a multiple of kRows), each with kRows q heads.
int64_t attention_decode_qgroups(int64_t hq, int64_t hkv);

// Shared memory a block may use on every supported GPU (sm_80: 163 KiB opt-in; sm_90: 227 KiB).
constexpr int64_t kAttentionSmemLimitSm80 = 163 * 1024;
constexpr int64_t kAttentionSmemLimitSm90 = 227 * 1024;

// Empty when valid, else why not.
std::string why_invalid(const QkNormRopeTile& tile, int64_t hq, int64_t hkv, int64_t d, int64_t rotary);
std::string why_invalid(const AttentionPrefillTile& tile, int64_t hq, int64_t hkv, int64_t d,
                        int64_t smem_limit = kAttentionSmemLimitSm80);
std::string why_invalid(const AttentionDecodeTile& tile, int64_t hq, int64_t hkv, int64_t d);

// Whether an sm_90a target's default prefill tile is the Hopper one (default_attention_prefill_
// wgmma_tile). Off until attention_prefill_wgmma has been measured on the GPU (docs/perf-log.md,
// "branch fa3"); meanwhile a tuned entry or a tile with "wgmma": true selects it.
inline constexpr bool kAttentionPrefillWgmmaDefault = false;

// Heuristic defaults (valid for the shape; Error naming the shape if the shape is unsupported).
// hopper: the target runs wgmma (arch_has_wgmma); its default is the Hopper tile when
// kAttentionPrefillWgmmaDefault is set.
QkNormRopeTile default_qk_norm_rope_tile(int64_t hq, int64_t hkv, int64_t d, int64_t rotary);
AttentionPrefillTile default_attention_prefill_tile(int64_t hq, int64_t hkv, int64_t d,
                                                    int64_t smem_limit = kAttentionSmemLimitSm80, bool hopper = false);
// The Hopper tile for the shape: 80 keys per tile in 2 stages (FlashAttention-3's tile at head_dim
// 256: the largest whose ring fits in shared memory and whose O, S and P fit in registers), ping-pong;
// Error naming the shape when no wgmma tile is valid.
AttentionPrefillTile default_attention_prefill_wgmma_tile(int64_t hq, int64_t hkv, int64_t d);
AttentionDecodeTile default_attention_decode_tile(int64_t hq, int64_t hkv, int64_t d);

// The instantiations; Error naming the kernel, shape and reason if the tile is invalid.
KernelSpec qk_norm_rope_spec(int64_t hq, int64_t hkv, int64_t d, int64_t rotary, const QkNormRopeTile& tile);
KernelSpec attention_prefill_spec(int64_t hq, int64_t hkv, int64_t d, const AttentionPrefillTile& tile);
KernelSpec attention_decode_spec(int64_t hq, int64_t hkv, int64_t d, const AttentionDecodeTile& tile);
KernelSpec attention_decode_merge_spec(int64_t hq, int64_t hkv, int64_t d, const AttentionDecodeTile& tile);

}  // namespace q35
