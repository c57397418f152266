#pragma once
// Host side of the gated full-attention kernels (kernel_templates/attention.cuh, spec §2.3).
//
// Per full-attention layer, after the fused projection qkv = x . [q_proj | k_proj | v_proj]^T:
//   prefill (T tokens at positions pos0 .. pos0+T-1, any pos0 so a later turn continues):
//     launch_qk_norm_rope  -> q [T, Hq, D], K/V cache rows pos0 .. pos0+T-1
//     launch_attention_prefill -> out [T, Hq*D]
//   decode (T = 1; up to 8 / (Hq/Hkv) tokens):
//     launch_qk_norm_rope, then launch_attention_decode (split kernel + merge kernel)
// then o_proj reads out. pos0 lives in device memory (int32), so a decode step captured in a CUDA
// graph replays at any position; T and the decode split count are fixed per launch.
//
// Buffers (device pointers, row-major, 16-byte aligned):
//   qkv      bf16 [T, qkv_row], qkv_row = Hq*2D + 2*Hkv*D; row = [per q head h: q (D) | gate (D)]
//            then k [Hkv, D] then v [Hkv, D] (q_proj | k_proj | v_proj rows in checkpoint order)
//   q_norm_w, k_norm_w  bf16 [D] (zero-centred offsets, applied as 1 + w)
//   q        bf16 [T, Hq, D]   (normed + roped queries; written by qk_norm_rope)
//   k_cache, v_cache  bf16 [max_context, Hkv, D] each, one pair per full-attention layer; row p is
//            position p, k stored after norm + RoPE
//   out      bf16 [T, Hq*D]    (head-major, gate applied: feeds o_proj)
//   pos0     int32 [1]
//   scratch  attention_decode_scratch_bytes(plan, splits) bytes (decode partials, fp32)
#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "autotune/tiles_attention.h"
#include "models/qwen35/config.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/kernel_spec.h"

namespace q35::qwen35::gpu {

// The attention shapes of a config with one tile per kernel.
struct AttentionPlan {
  int64_t hq = 0, hkv = 0, d = 0, rotary = 0;
  float theta = 0, eps = 0, scale = 0;  // rope_theta, rms_norm_eps, head_dim^-0.5
  QkNormRopeTile rope;
  AttentionPrefillTile prefill;
  AttentionDecodeTile decode;

  int64_t qkv_row() const { return hq * 2 * d + 2 * hkv * d; }
  // q heads per attention_decode block (kRows at most) and blocks per kv head
  int64_t decode_qgroups() const { return attention_decode_qgroups(hq, hkv); }
  int max_decode_tokens() const { return int(AttentionDecodeTile::kRows / (hq / hkv / decode_qgroups())); }
  KernelSpec qk_norm_rope_spec() const;
  KernelSpec prefill_spec() const;
  KernelSpec decode_spec() const;
  KernelSpec decode_merge_spec() const;
  // The batched decode step's forms (one token of each of B sequences, each in its own slot):
  KernelSpec qk_norm_rope_batch_spec() const;
  KernelSpec decode_batch_spec() const;
  KernelSpec decode_merge_batch_spec() const;
};

// Default tiles for the config; smem_limit = the shared memory a block may use on the target
// (kAttentionSmemLimitSm90 on sm_90 picks a larger prefill tile); hopper = the target runs wgmma
// (arch_has_wgmma: the Hopper prefill tile where kAttentionPrefillWgmmaDefault). Error naming the
// config key when the shape is unsupported (attn_output_gate = false, head_dim not a multiple of 64, ...).
AttentionPlan attention_plan(const Config& cfg, int64_t smem_limit = kAttentionSmemLimitSm80, bool hopper = false);

// Every attention kernel the model needs (empty without full-attention layers).
std::vector<KernelSpec> attention_kernels(const Config& cfg, int64_t smem_limit = kAttentionSmemLimitSm80,
                                          bool hopper = false);
// The batched decode step's attention kernels (default tiles; empty without full-attention layers).
std::vector<KernelSpec> attention_batch_kernels(const Config& cfg, int64_t smem_limit = kAttentionSmemLimitSm80);

// Decode split count for a KV cache of max_context rows on a GPU with sm_count SMs: about two CTAs
// per SM over the kv heads, no more than the cache has blocks of 16 keys per warp. The batched step
// runs every sequence with this count too: the splits cut a sequence's keys into the partials the
// merge sums, so the same count gives a row the arithmetic of the sequence decoded alone.
int attention_decode_splits(const AttentionPlan& plan, int64_t max_context, int sm_count);
// Scratch of one decode launch: part_o fp32 [Hkv, splits, 8, D] then part_ml fp32 [Hkv, splits, 8, 2].
size_t attention_decode_scratch_bytes(const AttentionPlan& plan, int splits);

// q heads and k heads: zero-centred RMSNorm over D, NeoX RoPE on the first rotary dims at
// position pos0 + t; v copied. Writes q [T, Hq, D] and cache rows pos0 .. pos0+T-1 (rows at or past
// max_context are skipped: keep pos0 + T <= max_context). Grid (T).
void launch_qk_norm_rope(const AttentionPlan& plan, const Function& f, const Stream& stream, CUdeviceptr qkv,
                         CUdeviceptr q_norm_w, CUdeviceptr k_norm_w, CUdeviceptr q, CUdeviceptr k_cache,
                         CUdeviceptr v_cache, CUdeviceptr pos0, int T, int max_context, bool pdl = false);

// Causal attention of q [T, Hq, D] over cache rows 0 .. pos0+T-1, out [T, Hq*D] = o * sigmoid(gate),
// gate from qkv: attention_prefill, or attention_prefill_wgmma for a wgmma tile (sm_90a; `f` is the
// function of plan.prefill_spec()). Grid (Hq, ceil(T / block_m)); sets the function's dynamic shared
// memory (plan.prefill.smem_bytes(D)).
void launch_attention_prefill(const AttentionPlan& plan, const Function& f, const Stream& stream, CUdeviceptr q,
                              CUdeviceptr k_cache, CUdeviceptr v_cache, CUdeviceptr qkv, CUdeviceptr out,
                              CUdeviceptr pos0, int T, bool pdl = false);

// Split-K decode for T <= plan.max_decode_tokens() tokens: `decode` (grid (Hkv, splits)) writes
// partials into scratch, `merge` (grid (T*Hq, D/64)) combines them into out [T, Hq*D] with the gate.
void launch_attention_decode(const AttentionPlan& plan, const Function& decode, const Function& merge,
                             const Stream& stream, CUdeviceptr q, CUdeviceptr k_cache, CUdeviceptr v_cache,
                             CUdeviceptr qkv, CUdeviceptr out, CUdeviceptr scratch, int splits, CUdeviceptr pos0,
                             int T, bool pdl = false);

// The batched decode step (one token of each of B sequences; kernel_templates/attention.cuh
// *_batch): row b belongs to sequence slot slots[b] (int32 [B] on the device, < 0: a padding row
// that writes nothing), at position pos[slot] (int32 [slots]); the slots' caches are one buffer
// each, slot s at k_cache + s * max_context * Hkv * D elements.
struct AttentionBatch {
  CUdeviceptr slots = 0;  // int32 [B]
  CUdeviceptr pos = 0;    // int32 [slots]
  int max_context = 0;    // rows per slot
};
// Scratch of one batched decode launch of B sequences.
size_t attention_decode_batch_scratch_bytes(const AttentionPlan& plan, int B, int splits);
// q [B, Hq, D], the k / v rows of each sequence at its position in its slot. Grid (B).
void launch_qk_norm_rope_batch(const AttentionPlan& plan, const Function& f, const Stream& stream, CUdeviceptr qkv,
                               CUdeviceptr q_norm_w, CUdeviceptr k_norm_w, CUdeviceptr q, CUdeviceptr k_cache,
                               CUdeviceptr v_cache, const AttentionBatch& batch, int B, bool pdl = false);
// Each sequence's query over its own rows 0 .. pos[slot]: decode grid (Hkv * QG, splits, B), merge
// grid (B * Hq, D / 64) -> out [B, Hq*D] with the gate of qkv row b (zeros for padding rows).
void launch_attention_decode_batch(const AttentionPlan& plan, const Function& decode, const Function& merge,
                                   const Stream& stream, CUdeviceptr q, CUdeviceptr k_cache, CUdeviceptr v_cache,
                                   CUdeviceptr qkv, CUdeviceptr out, CUdeviceptr scratch, int splits,
                                   const AttentionBatch& batch, int B, bool pdl = false);

}  // namespace q35::qwen35::gpu
