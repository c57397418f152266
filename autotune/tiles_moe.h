#pragma once
// Tile configurations of the MoE kernels (kernel_templates/moe.cuh, moe_gemm.cuh): validity rules,
// heuristic defaults and the KernelSpecs. Shapes come as a MoeShape (sizes of one MoE layer and the
// weight format), so nothing here knows the model.
#include <cstdint>
#include <optional>
#include <string>

#include "autotune/tiles_dense.h"
#include "runtime/jit/kernel_spec.h"

namespace q35 {

struct MoeShape {
  int64_t hidden = 0;        // H
  int64_t experts = 0;       // E
  int64_t top_k = 0;         // k
  int64_t inter = 0;         // I, routed expert intermediate size
  int64_t shared_inter = 0;  // Is, shared expert intermediate size
  int group = 0;             // weight format of the experts and the shared expert (runtime/core/weight_format.h):
                             // 0 = bf16, 32 / 64 / 128 = W4A16 group, kFp8Group = FP8
};

// moe_router<H, E, TOPK, M_TILE, ROWS, WARPS>; grid (ceil((E / rows_per_warp + 1) / warps), ceil(T / m_tile)).
struct MoeRouterTile {
  int m_tile = 1;         // tokens per block (1..16)
  int rows_per_warp = 2;  // router rows per warp
  int warps = 4;
  int threads() const { return 32 * warps; }
  unsigned blocks_x(int64_t experts) const { return unsigned((experts / rows_per_warp + 1 + warps - 1) / warps); }
};

// moe_decode_gate_up<GROUP, H, I, IS, E, TOPK, KSPLIT>; grid (max(I, Is) / kMoeGateUpRows, 1 + min(E, T*k)):
// a block's 8 h values of one touched expert are one 16-row mma tile (8 gate | 8 up rows) times the
// expert's tokens; its `ksplit` warps split H. The split is part of each token's arithmetic: a decode
// step uses one tile for every T (TunedTiles::moe), so a token's result does not depend on T.
struct MoeGemvTile {
  int ksplit = 4;
  int threads() const { return 32 * ksplit; }
};
constexpr int kMoeGateUpRows = 8;  // h values per gate_up block
// The most K values one warp of the decode GEMVs takes (its 16 rows' weights held in registers: 8
// INT4, 16 FP8 or 32 bf16 16-byte vectors per lane); more spill. Quantized parts also start on a scale
// group (a multiple or a divisor of the W4A16 group or of FP8's 128-k block: the tile rules check it).
constexpr int64_t kMoeDecodeMaxKPart = 512;
// FP8 moe_decode_down: at most 256 K values per warp (35B, I = 512: ksplit 1 spills 2.5 KB on sm_90a
// in blocks of (k + 1) * 32 threads; ksplit 2 does not).
constexpr int64_t kMoeDecodeFp8MaxDownPart = 256;

// moe_decode_down<GROUP, H, I, IS, E, TOPK, KSPLIT>; grid (H / kMoeDownRows). A block's 16 output rows
// are one mma tile for every token; (k + 1) * ksplit warps: k + 1 groups taking the touched experts in
// turn, one warp per part of I (ksplit > 1: one named barrier per group, so k + 1 <= 15).
struct MoeDownTile {
  int ksplit = 2;
  int warps(int64_t top_k) const { return int(top_k + 1) * ksplit; }
  int threads(int64_t top_k) const { return 32 * warps(top_k); }
};
constexpr int kMoeDownRows = 16;  // output rows per down block

// The grouped path's streaming form: moe_stream_gate_up<GROUP, H, I, IS, E, TOPK, KSPLIT, WARPS> and
// moe_stream_down<..., KSPLIT, WARPS> (+ moe_stream_combine<H, TOPK, THREADS>) compute the sums of
// moe_decode_gate_up / moe_decode_down with the same ksplit bit for bit, one warp per 16-row tile
// with the next tile's weights in flight, persistent warps filling every SM once. The runner streams
// calls of at least min_tokens tokens (0: never); a token's result is the same either way.
// H200, 35B W4A16 g128, whole MoE call (router + gate_up + down) per layer, decode kernels -> streaming
// form with 4 warps: T = 16 100 -> 110 us, 37 164 -> 164, 64 204 -> 198, 128 310 -> 253, 200 397 ->
// 331, 256 439 -> 395 (gate_up 8 warps per SM at 232 registers: DRAM 40%, L2 57% at T = 128). In the
// model the gain is about half (prefill 128 16.6 -> 15.1 ms with the router's tuned tile) and 64-row
// decode steps got slower (16.0 -> 16.4 ms): the streaming form from 96 tokens.
struct MoeStreamTile {
  int warps = 4;            // per block
  int64_t min_tokens = 96;  // from this many tokens of a call (0: never)
  int threads() const { return 32 * warps; }
  bool serves(int64_t tokens) const { return min_tokens > 0 && tokens >= min_tokens; }
};
constexpr int kMoeStreamCombineThreads = 256;

// moe_gemm<GROUP, N, K, TOPK, GATE_UP, ROUTED, BM, BN, BK, WM, WN>; grid (N / block_n, row blocks).
// wgmma (sm_90a only): gemm_wgmma of kernel_templates/wgmma_gemm.cuh instead (autotune/tiles_wgmma.h):
// warps_m x warps_n are warpgroups (block_m = 64 * warps_m), block_k = 64, `stages` deep, dynamic
// shared memory smem_bytes(group).
struct MoeGemmTile {
  int block_m = 64, block_n = 128, block_k = 32;
  int warps_m = 2, warps_n = 2;
  int stages = 2;       // mma.sync: always 2 (static shared memory); wgmma: 3..8
  bool wgmma = false;
  bool ws = false;      // wgmma, warp-specialised: + a producer warpgroup (gathers A, dequantizes B)
  bool swap = false;    // ws: weights x tokens, block_m = 8..64 tokens, block_n = 64 * warps_n weight rows
  int ksub = 1;         // swap: 64-k steps per pipeline stage
  bool persist = false; // ws, W4A16: about one block per SM looping over the tiles (WgmmaGemm::persist)
  bool rs = false;      // swap, W4A16: the weights as wgmma's register operand (WgmmaGemm::rs); block_m is
                        // the most tokens of an expert per tile (8 .. 256), each tile computes its own
                        // rows rounded up to 8, 16 or a multiple of 32
  int threads() const { return 32 * warps_m * warps_n * (wgmma ? 4 : 1) + (ws ? 128 : 0); }
  int smem_bytes(int group) const;  // wgmma: dynamic; else static, 2 stages of padded rows
};

// The four GEMMs of the prefill path.
enum class MoeGemm { RoutedGateUp, RoutedDown, SharedGateUp, SharedDown };
const char* name(MoeGemm g);

// sm_90a: prefill calls of at least this many tokens default to the wgmma grouped GEMM (H200, W4A16
// g128: T = 4096 1.48 ms per layer against 1.70 for mma.sync); shorter ones to the mma.sync one,
// whose small row blocks pad the few tokens per expert less. The tuner measures both kinds.
constexpr int64_t kMoeWgmmaMinTokens = 1024;
// The expert-grouped ("decode") path: router (+ the per-expert plan), gate_up and down GEMVs that read
// each touched expert once for all its tokens. It takes 1..kMoeGroupedMaxTokens tokens, every T with
// the M = 1 tiles (gpu/tuned.cpp), so a token's result does not depend on the call's other tokens:
// every decode step (<= kDecodeStepMaxRows rows, tiles_dense.h) runs it, and a prompt chunk of T
// tokens runs it when moe_grouped_for(T) says so, else the grouped-GEMM ("prefill") path.
// down's shared memory grows with T (moe_down_smem_bytes): where the device's opt-in limit holds
// fewer tokens, the bound is lower (moe_grouped_max_tokens).
constexpr int64_t kMoeGroupedMaxTokens = 256;
// Default crossover for prompt chunks (when the tune cache has no moe_path entry at T's bucket):
// grouped up to this many tokens, the GEMM path above. H200, 35B W4A16 g128, per layer: grouped 95 us
// at T = 16, 198 us at T = 64 (224 experts, 1.84 TB/s); GEMM path ~350 us at T = 128 (mma.sync
// moe_gemm 226 + 97 us + router, align, combine, shared expert). `q35jit tune` measures both paths at
// the buckets between kDecodeStepMaxRows and kMoeGroupedMaxTokens (96, 128, 256) and records the
// faster (family moe_path).
constexpr int64_t kMoeGroupedDefaultMaxTokens = 128;
// Shared memory the grouped kernels' static arrays may take beside their dynamic shared memory
// (moe_decode_down_residual's last-block reduction: 80 bytes; sm_90 builds also report the 1 KiB
// each block reserves for the system: 1,104 bytes in all).
constexpr int64_t kMoeGroupedStaticSmemReserve = 2048;
// Dynamic shared memory of moe_decode_gate_up for T tokens: each warp's sums [ksplit][T][16] fp32 (the
// shared expert's block takes every token). (Taking an expert's tokens in chunks of 64 would hold it
// at 16 KiB, but costs the kernel 127 registers instead of 80 on sm_90a: not done.)
int64_t moe_gate_up_smem_bytes(const MoeGemvTile& tile, int64_t tokens);
// Dynamic shared memory of moe_decode_down for T tokens: the per-(token, slot) sums [T][k + 1][16] and
// the groups' parts [k + 1][ksplit][8][16], fp32 (kernel_templates/moe.cuh moe_down_smem_bytes).
int64_t moe_down_smem_bytes(const MoeShape& s, const MoeDownTile& tile, int64_t tokens);
// Shared memory one block may opt in to on `arch` (NVRTC target "sm_90a", "sm_86", ...): sm_80 / 87
// 163 KiB, sm_86 / 89 / 120 99 KiB, sm_90 / 100 227 KiB; other targets 99 KiB (the smallest).
int64_t smem_optin_bytes(const std::string& arch);
// The most tokens the grouped path takes with these tiles when a block may use `smem_limit` bytes of
// shared memory: min(kMoeGroupedMaxTokens, the largest T whose gate_up and down shared memory, plus
// kMoeGroupedStaticSmemReserve, fit). 0 when not even one token fits.
int64_t moe_grouped_max_tokens(const MoeShape& s, const MoeGemvTile& gate_up, const MoeDownTile& down,
                               int64_t smem_limit);
// Whether a call of T tokens takes the grouped path: always for T <= kDecodeStepMaxRows (decode steps:
// a batched row = the row alone), never above grouped_max (what fits, moe_grouped_max_tokens), and in
// between as `tuned` says (the tune cache's moe_path entry at T's bucket; none: T <=
// kMoeGroupedDefaultMaxTokens).
bool moe_grouped_for(int64_t T, int64_t grouped_max, std::optional<bool> tuned = std::nullopt);
// Router tiles: m_tile 1 for T = 1, 8 up to kMoeRouterSmallTokens, 16 above.
constexpr int64_t kMoeRouterSmallTokens = 8;
constexpr int kMoeAlignThreads = 1024;
constexpr int kMoeCombineThreads = 256;
// moe_router_topk<H, E, TOPK, WARPS> (prefill: after the router GEMM): one warp per token.
constexpr int kMoeRouterTopkWarps = 8;

// Empty when valid, else why not.
std::string why_invalid(const MoeShape& s);  // sizes and format, independent of tiles
std::string why_invalid(const MoeRouterTile& tile, const MoeShape& s);
std::string why_invalid_gate_up(const MoeGemvTile& tile, const MoeShape& s);
std::string why_invalid(const MoeDownTile& tile, const MoeShape& s);
std::string why_invalid(const MoeStreamTile& tile);
std::string why_invalid(const MoeGemmTile& tile, const MoeShape& s, MoeGemm gemm);

// Heuristic defaults (valid for the shape; Error naming the reason if the shape is unsupported).
// tokens: T of the call (the router's m_tile follows it: 1 for T = 1, 8 up to kMoeRouterSmallTokens, 16 above).
MoeRouterTile default_moe_router_tile(const MoeShape& s, int64_t tokens);
MoeGemvTile default_moe_gate_up_tile(const MoeShape& s);
MoeDownTile default_moe_down_tile(const MoeShape& s);
// hopper: an sm_90a target (arch_has_wgmma): from kMoeWgmmaMinTokens tokens of the call the wgmma
// kernel's tile, below them an mma.sync one, each chosen by `tokens` among the tiles measured best
// there. Other GPUs: the mma.sync tile, whatever `tokens`.
MoeGemmTile default_moe_gemm_tile(const MoeShape& s, bool hopper = false, int64_t tokens = kMoeWgmmaMinTokens);

// GEMM sizes: weight rows N and reduction K.
int64_t moe_gemm_n(const MoeShape& s, MoeGemm gemm);
int64_t moe_gemm_k(const MoeShape& s, MoeGemm gemm);

KernelSpec moe_router_spec(const MoeShape& s, const MoeRouterTile& tile);
KernelSpec moe_decode_gate_up_spec(const MoeShape& s, const MoeGemvTile& tile);
KernelSpec moe_decode_down_spec(const MoeShape& s, const MoeDownTile& tile);
// moe_decode_down with the decode residual add + RMSNorm epilogue (kernel_templates/decode_fusion.cuh).
KernelSpec moe_decode_down_residual_spec(const MoeShape& s, const MoeDownTile& tile);
// The streaming form with the decode GEMVs' splits (gate_up.ksplit, down.ksplit).
KernelSpec moe_stream_gate_up_spec(const MoeShape& s, const MoeGemvTile& gate_up, const MoeStreamTile& tile);
KernelSpec moe_stream_down_spec(const MoeShape& s, const MoeDownTile& down, const MoeStreamTile& tile);
KernelSpec moe_stream_combine_spec(const MoeShape& s);
KernelSpec moe_align_spec(const MoeShape& s, const MoeGemmTile& tile);
KernelSpec moe_gemm_spec(const MoeShape& s, MoeGemm gemm, const MoeGemmTile& tile);
KernelSpec moe_combine_spec(const MoeShape& s);
KernelSpec moe_router_topk_spec(const MoeShape& s);

}  // namespace q35
