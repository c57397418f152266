#pragma once
// Tile configurations of the dense-projection kernels (bf16 / FP8 GEMM, W4A16 and FP8 GEMV, INT4
// and FP8 quantize / dequantize, argmax and sampling over the logits): the template parameters
// beyond the shapes, the rule that says whether a config is valid for a shape, a heuristic default
// per (shape, M), and the KernelSpec naming the instantiation. Shapes: y[M, N] = x[M, K] . W[N, K]^T.
// Weight formats are named by `group` (runtime/core/weight_format.h: 0 bf16, 32 / 64 / 128 W4A16,
// kFp8Group FP8).
#include <cstdint>
#include <string>

#include "runtime/jit/kernel_spec.h"

namespace q35 {

// kernel_templates/gemm_bf16.cuh: gemm_bf16<GROUP, N, K, BM, BN, BK, WARPS_M, WARPS_N, STAGES, OUT_F32>
// (GROUP: bf16 or FP8 weights, the latter dequantized in its main loop); grid (ceil(M / bm),
// ceil(N / bn)), block 32 * warps_m * warps_n, dynamic smem smem_bytes(group).
// wgmma (sm_90a only): kernel_templates/wgmma_gemm.cuh gemm_wgmma instead (autotune/tiles_wgmma.h):
// warps_m x warps_n are then warpgroups of 4 warps (bm = 64 * warps_m), bk = 64, grid
// (ceil(N / bn), ceil(M / bm)); W4A16 and FP8 weights are dequantized inside its main loop.
struct GemmTile {
  int bm = 128, bn = 128, bk = 32;  // block tile (rows of x, rows of W, K step)
  int warps_m = 2, warps_n = 4;     // warp grid; a warp owns (bm / warps_m) x (bn / warps_n)
  int stages = 4;                   // cp.async pipeline depth
  bool wgmma = false;               // Hopper warpgroup-MMA kernel (see above)
  bool ws = false;                  // wgmma, warp-specialised: + a producer warpgroup (loads, dequant)
  bool swap = false;                // ws: weights x rows, bm = 8..64 rows, bn = 64 * warps_n weight rows
  int ksub = 1;                     // swap: 64-k steps per pipeline stage
  int threads() const { return 32 * warps_m * warps_n * (wgmma ? 4 : 1) + (ws ? 128 : 0); }
  // Dynamic shared memory with weights of `group` (0 = bf16, kFp8Group; W4A16 only with wgmma).
  int smem_bytes(int group = 0) const;
};

// kernel_templates/gemv_w4a16.cuh: gemv_w4a16<N, K, G, M_TILE, ROW_WARPS, K_WARPS, UNROLL, OUT_F32>;
// the FP8 GEMV (gemv_fp8.cuh: gemv_fp8<N, K, M_TILE, ...>, the same body) takes the same tile.
// grid (ceil(N / rows_per_block), ceil(T / m_tile)), block 32 * row_warps * k_warps.
// A warp owns 16 rows of W (one mma.m16n8k16 A tile); the k_warps warps of a row set split K's
// 128-k tiles into contiguous runs (reduced in shared memory); `unroll` tiles are loaded at once
// (2 x 16 B per lane each for W4A16, 2 x 32 B for FP8).
struct W4GemvTile {
  int m_tile = 1;     // tokens per block (1..16)
  int row_warps = 1;  // warps side by side over rows, 16 rows each
  int k_warps = 4;    // warps splitting K
  int unroll = 4;     // 128-k tiles of weights in flight per warp (2 x 16 B per lane each)
  int rows_per_block() const { return 16 * row_warps; }
  int threads() const { return 32 * row_warps * k_warps; }
};
// kernel_templates/quantize_w4.cuh: quantize_w4<K, G, THREADS> and dequantize_w4<K, G, THREADS>;
// one thread per 8 values (one qweight word); grid ceil(rows * K / 8 / threads).
// kernel_templates/quantize_fp8.cuh (group kFp8Group): quantize_fp8<K, WARPS = threads / 32>, one warp
// per (row, 128-k block), grid ceil(rows * ceil(K / 128) / (threads / 32)); dequantize_fp8<K, THREADS>,
// one thread per 16 codes, grid ceil(rows * K / 16 / threads).
struct QuantizeTile {
  int threads = 256;
};

// kernel_templates/sample.cuh: argmax_f32<V, THREADS, BLOCKS> (grid BLOCKS, the last block to finish
// reduces) and sample_f32<V, THREADS> (one block).
struct SampleTile {
  int threads = 1024;  // per block
  int blocks = 128;    // argmax only
};

// Empty when valid, else why not.
// group: the weights' format (0 = bf16, W4A16 group, kFp8Group); W4A16 weights need a wgmma tile.
std::string why_invalid(const GemmTile& tile, int64_t n, int64_t k, int group = 0);
std::string why_invalid(const W4GemvTile& tile, int64_t n, int64_t k, int64_t group);
// gemv_w4a16_gated (its x the gated RMSNorm over value heads of dv, built per block in shared memory):
// the gemv_w4a16 rule, plus one token per block (m_tile 1), k a whole number of heads of dv (a
// multiple of 128), and the x row (k bf16) with the reduction buffer within 48 KiB of static shared memory.
std::string why_invalid_gated(const W4GemvTile& tile, int64_t n, int64_t k, int64_t group, int64_t dv);
std::string why_invalid(const QuantizeTile& tile, int64_t k, int64_t group);
std::string why_invalid(const SampleTile& tile, int64_t vocab);

// Heuristic defaults (valid for the shape; Error if the shape itself is unsupported).
// m = rows of x per call (the GEMM is specialised for N, K only; m picks the tile).
// wgmma: the Hopper kernel's tile (for sm_90a targets, see arch_has_wgmma).
GemmTile default_gemm_tile(int64_t n, int64_t k, int64_t m, bool wgmma = false);
// wgmma defaults take the swapped warp-specialised tile up to this many rows.
constexpr int64_t kGemmSwapMaxM = 128;
// The most rows of one decode step: the decode GEMVs (w4_decode_tile: every row gets the M = 1
// tile's arithmetic) and the batched step (models/qwen35/batch.h kMaxStepRows) run 1..this many
// rows. The MoE's expert-grouped path takes more (autotune/tiles_moe.h kMoeGroupedMaxTokens).
constexpr int64_t kDecodeStepMaxRows = 64;
// m = tokens per call (1..16).
W4GemvTile default_w4_gemv_tile(int64_t n, int64_t k, int64_t group, int m);
QuantizeTile default_quantize_tile(int64_t k, int64_t group);
SampleTile default_sample_tile(int64_t vocab);

// The instantiations; Error naming the family, shape and reason when the tile is invalid.
// out_f32: fp32 output (logits) instead of bf16.
// A wgmma tile names gemm_wgmma with weights of `group` (0 = bf16); an mma.sync tile needs group 0
// or kFp8Group.
KernelSpec gemm_bf16_spec(int64_t n, int64_t k, const GemmTile& tile, bool out_f32 = false, int group = 0);
KernelSpec gemv_w4a16_spec(int64_t n, int64_t k, int64_t group, const W4GemvTile& tile, bool out_f32 = false);
// gemv_w4a16_residual: the same GEMV with the decode residual add + RMSNorm epilogue (n = hidden size,
// a multiple of 4).
KernelSpec gemv_w4a16_residual_spec(int64_t n, int64_t k, int64_t group, const W4GemvTile& tile);
// kernel_templates/gemv_fp8.cuh: gemv_fp8 and gemv_fp8_residual (validity: why_invalid with kFp8Group).
KernelSpec gemv_fp8_spec(int64_t n, int64_t k, const W4GemvTile& tile, bool out_f32 = false);
KernelSpec gemv_fp8_residual_spec(int64_t n, int64_t k, const W4GemvTile& tile);
// gemv_w4a16_gated: the GEMV with the gated-RMSNorm input (value heads of dv), bf16 output.
KernelSpec gemv_w4a16_gated_spec(int64_t n, int64_t k, int64_t group, const W4GemvTile& tile, int64_t dv);
// kernel_templates/gemv_bf16.cuh: gemv_bf16_f32 (fp32 output: the bf16 lm_head); tile as in tile_config.h.
KernelSpec gemv_bf16_f32_spec(int64_t n, int64_t k, int m_tile, int rows_per_warp, int warps);
KernelSpec quantize_w4_spec(int64_t k, int64_t group, const QuantizeTile& tile);
KernelSpec quantize_fp8_spec(int64_t k, const QuantizeTile& tile);
KernelSpec dequantize_fp8_spec(int64_t k, const QuantizeTile& tile);
KernelSpec dequantize_w4_spec(int64_t k, int64_t group, const QuantizeTile& tile);
KernelSpec argmax_spec(int64_t vocab, const SampleTile& tile);
KernelSpec sample_spec(int64_t vocab, const SampleTile& tile);

}  // namespace q35
