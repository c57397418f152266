#pragma once
// Host side of the sparse MoE + shared expert (spec §2.6; kernels in kernel_templates/moe.cuh and
// moe_gemm.cuh). Input x = the post-attention-normalised hidden state, output
//   out [T, H] bf16 = sum_s w[t,s] * expert_{ids[t,s]}(x_t) + sigmoid(x_t . w_sg) * shared(x_t)
// which the runner adds to the residual in the next fused add + RMSNorm.
//
// Two paths, chosen by T (moe_forward's Auto, or the caller: autotune/tiles_moe.h moe_grouped_for):
//   decode  (the expert-grouped path, T <= kMoeGroupedMaxTokens and what down's shared memory holds on
//           the device; every decode step, prompt chunks up to the tuned crossover):
//           router (+ the expert-grouped plan) -> decode_gate_up
//           -> decode_down, each touched expert's weights read once for all its tokens      3 launches
//           (from tiles.stream.min_tokens tokens the streaming form of gate_up and down, same sums:
//           4 launches)
//           (moe_forward_decode: decode_down adds into the residual stream and writes the next
//           RMSNorm, kernel_templates/decode_fusion.cuh)
//   prefill (larger T): router GEMM (logits on tensor cores) -> router top-k -> align
//                       -> gemm routed gate_up -> gemm shared gate_up -> gemm routed down
//                       -> gemm shared down -> combine                                     8 launches
// Every launch reads T from its argument and sizes come from fixed per-plan maxima, so a decode step
// can be captured in a CUDA graph. The router and the decode GEMVs are launched with programmatic
// dependent launch (they wait for their predecessor in the kernel before reading its output).
//
// Weight format: `group` = 0 for bf16 weights, the W4A16 group (32, 64, 128) or kFp8Group (FP8,
// runtime/core/weight_format.h) of the expert and shared-expert weights (router and
// shared_expert_gate stay bf16).
#include <cstdint>
#include <vector>

#include "autotune/tiles_dense.h"
#include "autotune/tiles_moe.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/config.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"
#include "runtime/jit/kernel_spec.h"

namespace q35::qwen35::gpu {

MoeShape moe_shape(const Config& cfg, int group);

// The tiles of every MoE kernel of one shape.
struct MoeTiles {
  MoeRouterTile router_one, router_decode, router_prefill;  // m_tile 1 (T = 1), 8 (T <= 8), 16
  MoeGemvTile gate_up;                                      // decode GEMVs
  MoeDownTile down;
  MoeStreamTile stream;                                     // the grouped path's streaming form
  MoeGemmTile gemm;                                         // prefill GEMMs (and align's BLOCK_M)
  GemmTile router_gemm;                                     // prefill router logits [T, E] = x . w_router^T
  // hopper: an sm_90a target (arch_has_wgmma): the prefill router's logits GEMM on wgmma, and the
  // grouped GEMMs as default_moe_gemm_tile picks them for a call of `tokens` tokens.
  static MoeTiles defaults(const MoeShape& s, bool hopper = false, int64_t tokens = kMoeWgmmaMinTokens);
  const MoeRouterTile& router(int64_t tokens) const;
};

// Every instantiation the MoE layers of `cfg` need with the default tiles, for weight format `group`.
std::vector<KernelSpec> moe_kernels(const Config& cfg, int group, bool hopper = false,
                                    int64_t tokens = kMoeWgmmaMinTokens);
// The instantiations of one set of tiles.
std::vector<KernelSpec> moe_kernels(const MoeShape& s, const MoeTiles& tiles);

// One layer's weights (device pointers). "W" = bf16 [..., N, K], or for W4A16 qweight uint32
// [..., N, K/8] with `*_scales` bf16 [..., N, K/group], or for FP8 codes uint8 [..., N, K] with
// `*_scales` fp32 [..., N, ceil(K/128)] (the *_scales pointers are ignored for bf16).
struct MoeWeights {
  CUdeviceptr router = 0;       // bf16 [E, H]                    mlp.gate.weight
  CUdeviceptr shared_gate = 0;  // bf16 [1, H]                    mlp.shared_expert_gate.weight
  CUdeviceptr gate_up = 0, gate_up_scales = 0;                // W [E, 2I, H]  rows gate (I) | up (I)
  CUdeviceptr down = 0, down_scales = 0;                      // W [E, H, I]
  CUdeviceptr shared_gate_up = 0, shared_gate_up_scales = 0;  // W [2Is, H]    gate_proj rows, then up_proj rows
  CUdeviceptr shared_down = 0, shared_down_scales = 0;        // W [H, Is]
};

// Scratch buffers, carved from one workspace of moe_workspace_bytes(). The workspace must be zeroed
// once after allocation (the router's counters; every launch leaves them zero again).
struct MoeScratch {
  int64_t max_tokens = 0;
  int64_t max_blocks = 0;     // routed GEMM row blocks for max_tokens
  CUdeviceptr logits = 0;       // fp32 [max_T, E+1]   router logits, column E = shared gate logit
  CUdeviceptr counters = 0;     // int32 [max_T]       router tickets, zero between launches
  CUdeviceptr plan_ticket = 0;  // int32 [1]           the router's plan ticket, zero between launches
  CUdeviceptr ids = 0;          // int32 [max_T, k]    selected experts, by decreasing probability
  CUdeviceptr weights = 0;      // fp32 [max_T, k]     renormalised routing weights
  CUdeviceptr shared_gate = 0;  // fp32 [max_T]        sigmoid(x . w_sg)
  CUdeviceptr plan = 0;         // int32 [moe_plan_ints(min(max_T, kMoeGroupedMaxTokens))] grouped work by expert
  CUdeviceptr sums = 0;         // fp32 [min(max_T, kMoeGroupedMaxTokens), k + 1, H]  moe_stream_down's sums
  CUdeviceptr h = 0;            // bf16 grouped [min(max_T, kMoeGroupedMaxTokens), k*I + Is] / prefill [max_blocks * BM, I]
  CUdeviceptr hs = 0;           // bf16 [max_T, Is]     prefill shared expert activations
  CUdeviceptr y = 0;            // bf16 [max_T * k, H]  prefill routed down outputs per (token, slot)
  CUdeviceptr ys = 0;           // bf16 [max_T, H]      prefill shared expert output before its gate
  CUdeviceptr sorted_ids = 0;   // int32 [max_blocks * BM]
  CUdeviceptr block_expert = 0; // int32 [max_blocks]
  CUdeviceptr num_blocks = 0;   // int32 [1]
};
int64_t moe_max_blocks(const MoeShape& s, int block_m, int64_t tokens);  // routed GEMM row blocks for T tokens
// int32 entries of the decode plan for T tokens (kernel_templates/moe.cuh moe_build_plan): 2 + 2E + T*k.
int64_t moe_plan_ints(const MoeShape& s, int64_t tokens);
// Dynamic shared memory of the grouped kernels for T tokens: autotune/tiles_moe.h
// moe_gate_up_smem_bytes, moe_down_smem_bytes.
size_t moe_workspace_bytes(const MoeShape& s, const MoeTiles& tiles, int64_t max_tokens);
MoeScratch moe_scratch(const MoeShape& s, const MoeTiles& tiles, int64_t max_tokens, CUdeviceptr workspace);

// The loaded kernels of one shape with one set of tiles (default: the heuristic ones).
struct MoeKernels {
  MoeKernels(JitEngine& jit, const Context& ctx, const MoeShape& s) : MoeKernels(jit, ctx, s, MoeTiles::defaults(s)) {}
  MoeKernels(JitEngine& jit, const Context& ctx, const MoeShape& s, const MoeTiles& tiles);
  MoeShape shape;
  MoeTiles tiles;
  int sm_count = 0;  // the device's SMs: the grid of persistent GEMM tiles
  int64_t smem_optin = 0;  // shared memory a block may opt in to on this device (smem_optin_bytes)
  // The most tokens the grouped path takes on this device with these tiles (moe_grouped_max_tokens
  // at the device's shared memory opt-in limit; gate_up and down are opted in for that many).
  int64_t grouped_max_tokens = 0;
  Function router_one, router_decode, router_prefill;
  Function decode_gate_up, decode_down, decode_down_residual;
  Function stream_gate_up, stream_down, stream_combine;
  unsigned stream_gate_up_blocks = 0, stream_down_blocks = 0;  // the streaming kernels' grids: every SM filled once
  Function align;
  Function gemm_routed_gate_up, gemm_routed_down, gemm_shared_gate_up, gemm_shared_down;
  Function combine;
  Function router_gemm, router_topk;  // prefill router
  const Function& router(int64_t tokens) const;
  const Function& gemm(MoeGemm g) const;
};

// ---- launches (T = tokens of this call, 1 <= T <= scratch.max_tokens) ----

// x [T, H] bf16 -> scratch.ids, weights, shared_gate, plan (uses logits, counters, plan_ticket).
// f = moe_router with `tile`.
void launch_moe_router(const Function& f, const MoeRouterTile& tile, const Stream& stream, const MoeShape& s,
                       CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T);
// Prefill router: x [T, H] bf16 -> scratch.logits as [T, E] fp32 (router GEMM), then scratch.ids,
// weights, shared_gate (top-k, one warp per token).
// gemm = gemm_bf16_spec(E, H, router_gemm tile, fp32 out) (dynamic smem opted in), topk = moe_router_topk.
void launch_moe_router_prefill(const Function& gemm, const GemmTile& tile, const Function& topk, const Stream& stream,
                               const MoeShape& s, CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T);
// Decode. x [T, H] bf16, scratch.plan -> scratch.h [T, k*I + Is] bf16.
void launch_moe_decode_gate_up(const Function& f, const MoeGemvTile& tile, const Stream& stream, const MoeShape& s,
                               CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T);
// The grouped path's streaming form (T >= 1, T <= kMoeGroupedMaxTokens): the same h / out as the two
// launches above (bit for bit), gate_up in one launch, down in two (sums, then combine). blocks: the
// grid (MoeKernels::stream_*_blocks).
// The streaming kernel f's grid: as many blocks as the device's sm_count SMs hold at once (its warps are
// persistent). Error when not one block fits.
unsigned moe_stream_blocks(const Function& f, const MoeStreamTile& tile, int sm_count);
void launch_moe_stream_gate_up(const Function& f, const MoeStreamTile& tile, unsigned blocks, const Stream& stream,
                               const MoeShape& s, CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T);
void launch_moe_stream_down(const Function& down, const Function& combine, const MoeStreamTile& tile, unsigned blocks,
                            const Stream& stream, const MoeShape& s, const MoeWeights& w, const MoeScratch& sc,
                            CUdeviceptr out, int64_t T);
// Decode. scratch.h, plan, weights, shared_gate -> out [T, H] bf16.
void launch_moe_decode_down(const Function& f, const MoeDownTile& tile, const Stream& stream, const MoeShape& s,
                            const MoeWeights& w, const MoeScratch& sc, CUdeviceptr out, int64_t T);
// Decode with the residual epilogue: residual += bf16(out); r.normed = RMSNorm(residual) (dense.h).
void launch_moe_decode_down(const Function& f, const MoeDownTile& tile, const Stream& stream, const MoeShape& s,
                            const MoeWeights& w, const MoeScratch& sc, const ResidualNorm& r, int64_t T);
// Prefill. scratch.ids -> scratch.sorted_ids, block_expert, num_blocks.
void launch_moe_align(const Function& f, const Stream& stream, const MoeScratch& sc, int64_t T);
// Prefill GEMM `g`: RoutedGateUp x -> h, SharedGateUp x -> hs, RoutedDown h -> y, SharedDown hs -> ys.
// sm_count: the device's SMs (a persistent tile runs min(tiles, sm_count) blocks).
void launch_moe_gemm(const Function& f, const MoeGemmTile& tile, const Stream& stream, const MoeShape& s, MoeGemm g,
                     CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T, int sm_count);
// Prefill. scratch.y, ys, weights, shared_gate -> out [T, H] bf16.
void launch_moe_combine(const Function& f, const Stream& stream, const MoeScratch& sc, CUdeviceptr out, int64_t T);

// The whole MoE block: x [T, H] bf16 -> out [T, H] bf16 (out must not alias x). Auto takes the decode
// (grouped) path when moe_grouped_for(T, k.grouped_max_tokens) (no tuned entry: T <=
// kMoeGroupedDefaultMaxTokens), else prefill; the runner passes the tuned choice (TunedTiles::
// moe_grouped). Prefill works for any T, decode up to k.grouped_max_tokens (else Error).
enum class MoePath { Auto, Decode, Prefill };
void moe_forward(const MoeKernels& k, const Stream& stream, const MoeWeights& w, const MoeScratch& sc, CUdeviceptr x,
                 CUdeviceptr out, int64_t T, MoePath path = MoePath::Auto);
// The decode path (T <= k.grouped_max_tokens) with the residual epilogue: residual += bf16(MoE(x)),
// r.normed = RMSNorm(residual) (the next norm), in 3 launches: router, gate_up, down.
void moe_forward_decode(const MoeKernels& k, const Stream& stream, const MoeWeights& w, const MoeScratch& sc,
                        CUdeviceptr x, const ResidualNorm& r, int64_t T);

}  // namespace q35::qwen35::gpu
