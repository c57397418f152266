#pragma once
// Gated DeltaNet on the GPU (spec §2.4, §2.5): the kernels of kernel_templates/gdn_*.cuh and
// gated_rmsnorm.cuh, their instantiations for a Config, and typed launches.
//
// Buffers (Hk, Hv, dk, dv = linear_num_key_heads, linear_num_value_heads, linear_key_head_dim,
// linear_value_head_dim; C = conv_dim = 2 Hk dk + Hv dv; Kc = linear_conv_kernel_dim):
//   proj     bf16 [T, row_stride]: columns [qkv (C, flat q | k | v) | z (Hv dv) | b (Hv) | a (Hv)],
//            the rows of in_proj_qkv | in_proj_z | in_proj_b | in_proj_a concatenated;
//            row_stride >= C + Hv dv + 2 Hv and a multiple of 4 (8-byte z loads).
//   weights  conv_w bf16 [C, Kc] (conv1d.weight [C, 1, Kc]); A_log, dt_bias fp32 [Hv] (converted
//            from the checkpoint's bf16); norm_w bf16 [dv] (plain weight).
//   state    per sequence and layer, zeroed at sequence start (memset), carried across calls:
//            conv: bf16 [Kc, C], a ring: slot p % Kc holds the pre-conv input of position p
//                  (gdn_conv_state_bytes: Kc * C * 2 = 64 KiB for the 35B)
//            ssm:  fp32 [Hv, dv, dk], k contiguous (gdn_ssm_state_bytes: 2 MiB for the 35B)
//   pos0     int32 [1] on the device: tokens of the sequence before this call (the position of
//            its first token), so a decode step can be captured once in a CUDA graph.
//   y        bf16 [T, Hv dv]: the gated RMSNorm output, the input of out_proj.
//
// Decode (one token of one sequence): gdn_decode writes only the recurrence output o fp32 [Hv, dv];
// the out_proj GEMV applies the gated RMSNorm to its input (gemv_w4a16_gated, W4A16 weights).
// gdn_decode_norm also writes y (each head's last block runs the norm): bf16 out_proj weights, and the
// residual-epilogue GEMV of fused_decode. The batched step's gdn_decode_batch writes y like it.
//
// Prefill runs gdn_prologue, then the chunked delta rule at every T >= 1 (its split-bf16 tensor-core
// products are as accurate as the fp32 recurrence): gdn_chunk_prepare, then by the chunk tile
//   fused + cluster (default), on an arch with clusters: gdn_chunk_fused_cluster (state, output and
//     the gated RMSNorm in one pass) -> y;
//   fused (or a cluster tile where the arch has none): gdn_chunk_fused -> ws.o, gated_rmsnorm -> y;
//   !fused: gdn_chunk_state (-> ws.h, ws.vn) -> gdn_chunk_output (the gated RMSNorm fused) -> y.
// The token-by-token recurrence (gdn_recurrent -> gated_rmsnorm) stays as the reference path
// (prefill(chunked = false)).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "autotune/tiles_gdn.h"
#include "models/qwen35/config.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"
#include "runtime/jit/kernel_spec.h"

namespace q35::qwen35::gpu {

GdnShape gdn_shape(const Config& cfg);
int64_t gdn_proj_columns(const Config& cfg);  // C + Hv dv + 2 Hv, the minimal row_stride
size_t gdn_conv_state_bytes(const Config& cfg);
size_t gdn_ssm_state_bytes(const Config& cfg);

struct GdnTiles {
  GdnPrologueTile prologue;
  GdnRecurrentTile recurrent;
  GdnChunkTile chunk;
  GatedRmsnormTile norm;
  static GdnTiles defaults(const GdnShape& s);
  std::string key() const;  // distinct per set of tiles ("16/4/16/4/32fc/4")
};

KernelSpec gdn_prologue_spec(const Config& cfg, const GdnPrologueTile& tile);
KernelSpec gdn_recurrent_spec(const Config& cfg, const GdnRecurrentTile& tile);
KernelSpec gdn_decode_spec(const Config& cfg, const GdnRecurrentTile& tile);
// gdn_decode with the gated RMSNorm by each head's last block (-> y).
KernelSpec gdn_decode_norm_spec(const Config& cfg, const GdnRecurrentTile& tile);
// gdn_decode_norm's batched form (one token of each of B sequences, each with its slot's state).
KernelSpec gdn_decode_batch_spec(const Config& cfg, const GdnRecurrentTile& tile);
KernelSpec gdn_chunk_prepare_spec(const Config& cfg);
KernelSpec gdn_chunk_state_spec(const Config& cfg, const GdnChunkTile& tile);
KernelSpec gdn_chunk_output_spec(const Config& cfg);
// gdn_chunk_fused_cluster (cluster) or gdn_chunk_fused; the tile must be fused.
KernelSpec gdn_chunk_fused_spec(const Config& cfg, const GdnChunkTile& tile, bool cluster);
KernelSpec gated_rmsnorm_spec(const Config& cfg, const GatedRmsnormTile& tile);
// Every GDN instantiation the model needs on `arch` (default tiles): the fused chunk kernel in its
// cluster form where gdn_arch_has_cluster(arch), else (and for an empty arch) the portable form;
// empty without linear-attention layers.
std::vector<KernelSpec> gdn_kernels(const Config& cfg, const std::string& arch = "");
// The batched decode step's (gdn_decode_batch, default tile); empty without linear-attention layers.
std::vector<KernelSpec> gdn_batch_kernels(const Config& cfg);

struct GdnLayerWeights {
  CUdeviceptr conv_w = 0;   // bf16 [C, Kc]
  CUdeviceptr A_log = 0;    // fp32 [Hv]
  CUdeviceptr dt_bias = 0;  // fp32 [Hv]
  CUdeviceptr norm_w = 0;   // bf16 [dv]
};
struct GdnLayerState {
  CUdeviceptr conv = 0;  // bf16 [Kc, C] ring
  CUdeviceptr ssm = 0;   // fp32 [Hv, dv, dk]
};

// Scratch of a multi-token call, carved from one buffer of gdn_workspace_bytes(cfg, T) bytes
// (256-byte aligned pieces; chunks = ceil(T / 64), the chunked pieces padded to whole chunks).
struct GdnWorkspace {
  CUdeviceptr qkv = 0;   // bf16 [T, C]: q (normalised, scaled) | k (normalised) | v after the conv
  CUdeviceptr g = 0;     // fp32 [T, Hv] log decay
  CUdeviceptr beta = 0;  // fp32 [T, Hv]
  CUdeviceptr gam = 0;   // fp32 [chunks, Hv, 64] cumsum of g within each chunk
  CUdeviceptr u = 0;     // fp32 [chunks, Hv, 64, dv]
  CUdeviceptr w = 0;     // bf16 [chunks, Hv, 2, 64, dk]: hi, lo planes
  CUdeviceptr vn = 0;    // bf16 [chunks, Hv, 2, 64, dv]: hi, lo planes of U - W S (gdn_chunk_state)
  CUdeviceptr h = 0;     // bf16 [chunks, Hv, 2, dk, dv]: hi, lo planes of the state entering each chunk
                         // (gdn_chunk_state)
  CUdeviceptr o = 0;     // fp32 [T, Hv, dv]: the output before the norm of the recurrence and of the
                         // portable gdn_chunk_fused (the same bytes as h)
};
size_t gdn_workspace_bytes(const Config& cfg, int64_t T);
GdnWorkspace gdn_workspace(const Config& cfg, int64_t T, CUdeviceptr base);

// The GDN kernels of one Config, loaded, with the tiles they were compiled for.
class GdnKernels {
 public:
  GdnKernels(JitEngine& jit, const Context& ctx, const Config& cfg, const GdnTiles& tiles);
  GdnKernels(JitEngine& jit, const Context& ctx, const Config& cfg)
      : GdnKernels(jit, ctx, cfg, GdnTiles::defaults(gdn_shape(cfg))) {}

  // One decode token of one layer in one launch: gdn_decode (prologue fused, state updated) -> o
  // [1, Hv, dv] fp32, the recurrence output before the gated RMSNorm (gemv_w4a16_gated's input).
  // proj [1, row_stride].
  void decode(const Stream& stream, CUdeviceptr proj, int row_stride, CUdeviceptr pos0, const GdnLayerWeights& w,
              const GdnLayerState& st, CUdeviceptr o, bool pdl = false) const;
  // The same, gdn_decode_norm: also the gated RMSNorm by each head's last block -> y [1, Hv dv] bf16;
  // counters int32 [Hv], zeroed once (every launch leaves them zero).
  void decode_norm(const Stream& stream, CUdeviceptr proj, int row_stride, CUdeviceptr pos0, const GdnLayerWeights& w,
                   const GdnLayerState& st, CUdeviceptr o, CUdeviceptr y, CUdeviceptr counters,
                   bool pdl = false) const;
  // One decode token of each of B sequences (a batched decode step), one launch: row b of proj
  // [B, row_stride] is sequence slot slots[b] (int32 [B], < 0: padding, its y row zeroed) at position
  // pos[slot] (int32 [slots]); its conv ring and state are slot `slot` of st (st.conv + slot *
  // gdn_conv_state_bytes, st.ssm + slot * gdn_ssm_state_bytes). o fp32 [B, Hv, dv] scratch, y [B, Hv dv];
  // counters int32 [B, Hv], zeroed once.
  void decode_batch(const Stream& stream, CUdeviceptr proj, int row_stride, int B, CUdeviceptr slots, CUdeviceptr pos,
                    const GdnLayerWeights& w, const GdnLayerState& st, CUdeviceptr o, CUdeviceptr y,
                    CUdeviceptr counters, bool pdl = false) const;
  // T >= 1 tokens of one layer: gdn_prologue, then the chunked kernels -> y (chunked = true), or the
  // token-by-token recurrence then gated_rmsnorm -> y [T, Hv dv] bf16. Both update the state.
  void prefill(const Stream& stream, CUdeviceptr proj, int row_stride, int T, CUdeviceptr pos0,
               const GdnLayerWeights& w, const GdnLayerState& st, const GdnWorkspace& ws, CUdeviceptr y,
               bool chunked = true, bool pdl = false) const;

  // The single launches (buffers as documented above and in the .cuh files).
  void prologue(const Stream& stream, CUdeviceptr proj, int row_stride, int T, CUdeviceptr pos0,
                const GdnLayerWeights& w, const GdnLayerState& st, const GdnWorkspace& ws, bool pdl = false) const;
  void recurrent(const Stream& stream, int T, const GdnLayerState& st, const GdnWorkspace& ws, bool pdl = false) const;
  // The launches of the chunked delta rule after the prologue: gdn_chunk_prepare (ws.qkv, g, beta ->
  // gam, u, w), then by the tile (see above) gdn_chunk_fused_cluster (-> state, y), gdn_chunk_fused
  // (-> state, ws.o) + gated_rmsnorm, or gdn_chunk_state (-> state, ws.h, ws.vn) + gdn_chunk_output
  // (-> y); the gated RMSNorm over z of proj and w.norm_w.
  void chunked(const Stream& stream, CUdeviceptr proj, int row_stride, int T, const GdnLayerWeights& w,
               const GdnLayerState& st, const GdnWorkspace& ws, CUdeviceptr y, bool pdl = false) const;
  void chunk_prepare(const Stream& stream, int T, const GdnWorkspace& ws, bool pdl = false) const;
  // The fused pass alone (fused tiles): the cluster form writes y, the portable form ws.o.
  void chunk_fused(const Stream& stream, CUdeviceptr proj, int row_stride, int T, CUdeviceptr norm_w,
                   const GdnLayerState& st, const GdnWorkspace& ws, CUdeviceptr y, bool pdl = false) const;
  // The unfused pair (!fused tiles).
  void chunk_state(const Stream& stream, int T, const GdnLayerState& st, const GdnWorkspace& ws, bool pdl = false) const;
  void chunk_output(const Stream& stream, CUdeviceptr proj, int row_stride, int T, CUdeviceptr norm_w,
                    const GdnWorkspace& ws, CUdeviceptr y, bool pdl = false) const;
  void gated_rmsnorm(const Stream& stream, int T, CUdeviceptr o, CUdeviceptr proj, int row_stride, CUdeviceptr norm_w,
                     CUdeviceptr y, bool pdl = false) const;

  const GdnTiles& tiles() const { return tiles_; }
  bool fused() const { return tiles_.chunk.fused; }
  bool cluster() const { return cluster_; }  // the fused pass runs its cluster form (fused tile, arch with clusters)

 private:
  void check_proj(int row_stride, int T) const;
  GdnShape shape_;
  GdnTiles tiles_;
  float eps_;
  bool cluster_;
  Function prologue_, recurrent_, decode_, decode_norm_, decode_batch_, chunk_prepare_, norm_;
  // By the chunk tile: the fused pass, or the state / output pair.
  std::optional<Function> chunk_fused_, chunk_state_, chunk_output_;
};

}  // namespace q35::qwen35::gpu
