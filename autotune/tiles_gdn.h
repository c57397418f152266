#pragma once
// Tile configurations of the Gated DeltaNet kernels (kernel_templates/gdn_*.cuh, gated_rmsnorm.cuh),
// their validity rules and heuristic defaults. The shapes come from GdnShape (config.json's
// linear_* keys); nothing assumes the 35B numbers.
#include <cstdint>
#include <string>

namespace q35 {

struct GdnShape {
  int64_t hk = 0, hv = 0;  // key heads, value heads
  int64_t dk = 0, dv = 0;  // key / value head dims
  int64_t kc = 0;          // conv kernel size
  int64_t conv_dim() const { return 2 * hk * dk + hv * dv; }
};

// gdn_prologue<..., TOKENS, WARPS>: grid (ceil(conv_dim / 8 / (32 warps)) + 1, ceil(T / tokens)),
// block 32 * warps; a thread owns 8 channels of `tokens` tokens (their inputs in registers).
struct GdnPrologueTile {
  int tokens = 16;
  int warps = 4;
};
// gdn_recurrent / gdn_decode<..., ROWS, WARPS>: grid (hv, dv / rows), block 32 * warps; a warp
// keeps rows / warps state rows of dk fp32 in registers.
struct GdnRecurrentTile {
  int rows = 16;
  int warps = 4;
};
// The chunked delta rule after gdn_chunk_prepare (grid chunks x hv, block 256, no tile of its own):
// fused (default): gdn_chunk_fused<..., VS> / gdn_chunk_fused_cluster<..., VS>, grid (hv, dv / vs),
//   block 256: a CTA owns vs value columns of a head's state for the whole sequence and writes the
//   output of its columns per chunk (h and vn never written). cluster: the gated RMSNorm inside, the
//   dv / vs CTAs of a head a thread-block cluster exchanging row sums of squares through distributed
//   shared memory (sm_90+; 227 KiB of shared memory); without (or on an arch without clusters, see
//   gdn_arch_has_cluster): the portable form writes O fp32 and gated_rmsnorm follows (163 KiB).
// !fused: gdn_chunk_state<..., VS> (grid (hv, dv / vs), writes h and vn) then gdn_chunk_output
//   (grid chunks x hv, the gated RMSNorm fused).
// vs = 16 or 32 (64 needs more shared memory than the forms allow).
struct GdnChunkTile {
  int vs = 32;
  bool fused = true;
  bool cluster = true;  // fused only
};
// gated_rmsnorm<HV, DV, HEADS>: grid (T, hv / heads), block 32 * heads.
struct GatedRmsnormTile {
  int heads = 4;
};

// Empty when the shape is supported by every GDN kernel, else why not.
std::string why_unsupported(const GdnShape& s);
// Empty when valid, else why not ("rows = 12 is not a multiple of warps = 8").
std::string why_invalid(const GdnPrologueTile& tile, const GdnShape& s);
std::string why_invalid(const GdnRecurrentTile& tile, const GdnShape& s);
std::string why_invalid(const GdnChunkTile& tile, const GdnShape& s);
std::string why_invalid(const GatedRmsnormTile& tile, const GdnShape& s);

// Heuristic defaults (valid for the shape; Error naming the shape if it is unsupported).
GdnPrologueTile default_gdn_prologue_tile(const GdnShape& s);
GdnRecurrentTile default_gdn_recurrent_tile(const GdnShape& s);
GdnChunkTile default_gdn_chunk_tile(const GdnShape& s);
GatedRmsnormTile default_gated_rmsnorm_tile(const GdnShape& s);

// Dynamic shared memory of the chunked kernels, bytes.
int gdn_chunk_prepare_smem_bytes(const GdnShape& s);
int gdn_chunk_state_smem_bytes(const GdnShape& s, const GdnChunkTile& tile);
int gdn_chunk_output_smem_bytes(const GdnShape& s);
// gdn_chunk_fused (cluster = false: W, q single-buffered) or gdn_chunk_fused_cluster (cluster = true:
// W, q double-buffered, + the row-sum exchange buffers).
int gdn_chunk_fused_smem_bytes(const GdnShape& s, const GdnChunkTile& tile, bool cluster);
// Whether `arch` ("sm_90a", "sm_80", ...) runs the cluster form of gdn_chunk_fused (sm_90 and later).
bool gdn_arch_has_cluster(const std::string& arch);

}  // namespace q35
