#pragma once
// The Hopper GEMM of kernel_templates/wgmma_gemm.cuh (gemm_wgmma, sm_90a only): one instantiation's
// parameters, its validity rule (the template's static_asserts, plus shared memory and registers),
// its dynamic shared memory and its KernelSpec. Used by the dense GEMM (GemmTile with wgmma) and
// the MoE grouped GEMMs (MoeGemmTile with wgmma).
#include <cstdint>
#include <string>

#include "runtime/jit/kernel_spec.h"

namespace q35 {

// gemm_wgmma<GROUP, N, K, TOPK, GATE_UP, ROUTED, OUT_F32, BM, BN, STAGES, WGM, WGN, WS, SWAP, KSUB, PERSIST>;
// grid (ceil(N / bn), row blocks), block threads(), dynamic smem wgmma_smem_bytes().
// ws: warp-specialised (one more warpgroup loads and dequantizes; the others only issue wgmma).
// swap (ws only, for few rows, e.g. the MoE's tokens per expert): the weights are wgmma's M side,
// 64 rows per consumer warpgroup (bn = 64 * wgn, wgm = 1), the bm = 8..64 rows of A its N side.
struct WgmmaGemm {
  int group = 0;             // 0: bf16 weights, W4A16 group 32 / 64 / 128, or kFp8Group (FP8)
  int64_t n = 0, k = 0;      // W [n, k] (per expert)
  int64_t topk = 1;          // routed gate|up: A row = sorted pair / topk
  bool gate_up = false, routed = false, out_f32 = false;
  int bm = 128, bn = 128, stages = 4;
  int wgm = 2, wgn = 1;      // warpgroups along M (bm = 64 * wgm) and N
  bool ws = false;           // warp-specialised: + a producer warpgroup
  bool swap = false;         // weights x rows (see above)
  int ksub = 1;              // swap: 64-k steps per pipeline stage (1, 2, 4): longer runs of each weight row
  bool persist = false;      // ws, not swapped, W4A16: a grid of about one block per SM loops over the tiles
                             // (grid (blocks, 1)); the producer fills the next tile's stages during the
                             // consumers' last steps and epilogue
  bool rs = false;           // W4A16, swapped and warp-specialised with the weights as wgmma's register
                             // operand: gemm_wgmma_rs of kernel_templates/wgmma_rs.cuh (the consumers
                             // dequantize into registers; no bf16 weight tile). bm: the most token rows
                             // of a tile (8, 16, 32 .. 256; a tile computes its real rows rounded up to
                             // 8, 16 or a multiple of 32), bn = 64 * wgn weight rows, ksub 1; may be
                             // persistent
  int threads() const { return 128 * (wgm * wgn + (ws ? 1 : 0)); }
};

constexpr int kWgmmaBlockK = 64;              // K step: one 128-byte swizzled row of bf16
constexpr int kWgmmaMaxSmem = 227 * 1024;     // dynamic shared memory a block may opt into on sm_90
// Bytes of dynamic shared memory: 1 KiB alignment slack, then
//   plain: `stages` x (A tile + B tile, or the raw INT4 / FP8 B tile), and for INT4 / FP8 three bf16
//          B tiles;
//   ws:    `stages` x ksub x (A tile + bf16 B tile, or the raw INT4 / FP8 B tile), for INT4 / FP8
//          wgmma_ws_bf16_tiles(stages) bf16 B tiles, and 2 mbarriers per stage.
// A raw B tile is bn x 32 bytes per 64-k step for INT4, bn x 64 for FP8.
// The bf16 B tiles of the warp-specialised W4A16 / FP8 form: `stages` up to 4, then 3 (5 stages), 2 (more).
int wgmma_ws_bf16_tiles(int stages);
int wgmma_smem_bytes(int group, int bm, int bn, int stages, bool ws = false, int ksub = 1);
// gemm_wgmma_rs: 1 KiB alignment slack, `stages` x (bm token rows x 128 B + bn raw rows x 32 B + bn
// scale pairs x 4 B), 2 mbarriers per stage, bm ints (the producer's table of token rows).
int wgmma_rs_smem_bytes(int bm, int bn, int stages);
inline int wgmma_smem_bytes(const WgmmaGemm& g) {
  return g.rs ? wgmma_rs_smem_bytes(g.bm, g.bn, g.stages) : wgmma_smem_bytes(g.group, g.bm, g.bn, g.stages, g.ws, g.ksub);
}
std::string why_invalid(const WgmmaGemm& g);
KernelSpec wgmma_gemm_spec(const WgmmaGemm& g);  // Error naming the shape and reason when invalid

// Whether `arch` ("sm_90a", "sm_80", ...) runs gemm_wgmma (wgmma needs the sm_90a target).
bool arch_has_wgmma(const std::string& arch);

}  // namespace q35
