#include "models/qwen35/gpu/attention.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "runtime/core/error.h"

namespace q35::qwen35::gpu {

KernelSpec AttentionPlan::qk_norm_rope_spec() const { return q35::qk_norm_rope_spec(hq, hkv, d, rotary, rope); }
KernelSpec AttentionPlan::prefill_spec() const { return q35::attention_prefill_spec(hq, hkv, d, prefill); }
KernelSpec AttentionPlan::decode_spec() const { return q35::attention_decode_spec(hq, hkv, d, decode); }
KernelSpec AttentionPlan::decode_merge_spec() const { return q35::attention_decode_merge_spec(hq, hkv, d, decode); }

namespace {
KernelSpec batch_form(KernelSpec s) {
  s.kernel += "_batch";
  return s;
}
}  // namespace

KernelSpec AttentionPlan::qk_norm_rope_batch_spec() const { return batch_form(qk_norm_rope_spec()); }
KernelSpec AttentionPlan::decode_batch_spec() const { return batch_form(decode_spec()); }
KernelSpec AttentionPlan::decode_merge_batch_spec() const { return batch_form(decode_merge_spec()); }

AttentionPlan attention_plan(const Config& cfg, int64_t smem_limit, bool hopper) {
  if (!cfg.attn_output_gate)
    fail("gated attention: config.json attn_output_gate = false is not supported (the kernels fuse the output gate)");
  AttentionPlan p;
  p.hq = cfg.num_heads;
  p.hkv = cfg.num_kv_heads;
  p.d = cfg.head_dim;
  p.rotary = cfg.rotary_dim;
  p.theta = float(cfg.rope_theta);
  p.eps = float(cfg.rms_norm_eps);
  p.scale = 1.0f / std::sqrt(float(cfg.head_dim));
  p.rope = default_qk_norm_rope_tile(p.hq, p.hkv, p.d, p.rotary);
  p.prefill = default_attention_prefill_tile(p.hq, p.hkv, p.d, smem_limit, hopper);
  p.decode = default_attention_decode_tile(p.hq, p.hkv, p.d);
  return p;
}

std::vector<KernelSpec> attention_kernels(const Config& cfg, int64_t smem_limit, bool hopper) {
  if (std::find(cfg.layer_types.begin(), cfg.layer_types.end(), LayerType::FullAttention) == cfg.layer_types.end())
    return {};
  const AttentionPlan p = attention_plan(cfg, smem_limit, hopper);
  return {p.qk_norm_rope_spec(), p.prefill_spec(), p.decode_spec(), p.decode_merge_spec()};
}

std::vector<KernelSpec> attention_batch_kernels(const Config& cfg, int64_t smem_limit) {
  if (std::find(cfg.layer_types.begin(), cfg.layer_types.end(), LayerType::FullAttention) == cfg.layer_types.end())
    return {};
  const AttentionPlan p = attention_plan(cfg, smem_limit);
  return {p.qk_norm_rope_batch_spec(), p.decode_batch_spec(), p.decode_merge_batch_spec()};
}

int attention_decode_splits(const AttentionPlan& plan, int64_t max_context, int sm_count) {
  if (max_context < 1) fail("attention_decode: max_context = {} is not positive", max_context);
  if (sm_count < 1) fail("attention_decode: sm_count = {} is not positive", sm_count);
  const int64_t blocks = plan.hkv * plan.decode_qgroups();  // per split
  const int64_t by_sms = (2 * int64_t(sm_count) + blocks - 1) / blocks;
  const int64_t by_cache = (max_context + 16 * plan.decode.warps - 1) / (16 * plan.decode.warps);
  return int(std::clamp<int64_t>(std::min(by_sms, by_cache), 1, 65535));
}

size_t attention_decode_scratch_bytes(const AttentionPlan& plan, int splits) {
  return size_t(plan.hkv * plan.decode_qgroups()) * size_t(splits) * AttentionDecodeTile::kRows * size_t(plan.d + 2) *
         sizeof(float);
}

void launch_qk_norm_rope(const AttentionPlan& plan, const Function& f, const Stream& stream, CUdeviceptr qkv,
                         CUdeviceptr q_norm_w, CUdeviceptr k_norm_w, CUdeviceptr q, CUdeviceptr k_cache,
                         CUdeviceptr v_cache, CUdeviceptr pos0, int T, int max_context, bool pdl) {
  if (T < 1) fail("qk_norm_rope: T = {} tokens is not positive", T);
  f.launch({{unsigned(T)}, {unsigned(plan.rope.threads())}, 0, pdl}, stream, qkv, q_norm_w, k_norm_w, q, k_cache,
           v_cache, pos0, max_context, plan.theta, plan.eps);
}

void launch_attention_prefill(const AttentionPlan& plan, const Function& f, const Stream& stream, CUdeviceptr q,
                              CUdeviceptr k_cache, CUdeviceptr v_cache, CUdeviceptr qkv, CUdeviceptr out,
                              CUdeviceptr pos0, int T, bool pdl) {
  if (T < 1) fail("attention_prefill: T = {} tokens is not positive", T);
  const int smem = int(plan.prefill.smem_bytes(plan.d));
  f.set_max_dynamic_smem(smem);
  const unsigned m_tiles = unsigned((T + plan.prefill.block_m() - 1) / plan.prefill.block_m());
  f.launch({{unsigned(plan.hq), m_tiles}, {unsigned(plan.prefill.threads())}, unsigned(smem), pdl}, stream, q, k_cache,
           v_cache, qkv, out, pos0, T, plan.scale);
}

void launch_attention_decode(const AttentionPlan& plan, const Function& decode, const Function& merge,
                             const Stream& stream, CUdeviceptr q, CUdeviceptr k_cache, CUdeviceptr v_cache,
                             CUdeviceptr qkv, CUdeviceptr out, CUdeviceptr scratch, int splits, CUdeviceptr pos0,
                             int T, bool pdl) {
  if (T < 1 || T > plan.max_decode_tokens())
    fail("attention_decode: T = {} tokens is not in [1, {}] ({} q heads per kv head, {} rows per MMA)", T,
         plan.max_decode_tokens(), plan.hq / plan.hkv, AttentionDecodeTile::kRows);
  if (splits < 1 || splits > 65535) fail("attention_decode: splits = {} is not in [1, 65535]", splits);
  const CUdeviceptr part_o = scratch;
  const int64_t blocks = plan.hkv * plan.decode_qgroups();  // per split
  const CUdeviceptr part_ml =
      scratch + size_t(blocks) * size_t(splits) * AttentionDecodeTile::kRows * size_t(plan.d) * sizeof(float);
  decode.launch({{unsigned(blocks), unsigned(splits)}, {unsigned(plan.decode.threads())}, 0, pdl}, stream, q, k_cache,
                v_cache, part_o, part_ml, pos0, T, plan.scale);
  merge.launch({{unsigned(T * plan.hq), unsigned(plan.d / 64)}, {256}, 0, pdl}, stream, part_o, part_ml, qkv, out, pos0, T, splits,
               plan.scale);
}

size_t attention_decode_batch_scratch_bytes(const AttentionPlan& plan, int B, int splits) {
  return size_t(B) * attention_decode_scratch_bytes(plan, splits);
}

void launch_qk_norm_rope_batch(const AttentionPlan& plan, const Function& f, const Stream& stream, CUdeviceptr qkv,
                               CUdeviceptr q_norm_w, CUdeviceptr k_norm_w, CUdeviceptr q, CUdeviceptr k_cache,
                               CUdeviceptr v_cache, const AttentionBatch& batch, int B, bool pdl) {
  if (B < 1) fail("qk_norm_rope_batch: B = {} sequences is not positive", B);
  if (batch.max_context < 1) fail("qk_norm_rope_batch: max_context = {} is not positive", batch.max_context);
  const long long slot_stride = (long long)batch.max_context * plan.hkv * plan.d;
  f.launch({{unsigned(B)}, {unsigned(plan.rope.threads())}, 0, pdl}, stream, qkv, q_norm_w, k_norm_w, q, k_cache,
           v_cache, batch.slots, batch.pos, slot_stride, batch.max_context, plan.theta, plan.eps);
}

void launch_attention_decode_batch(const AttentionPlan& plan, const Function& decode, const Function& merge,
                                   const Stream& stream, CUdeviceptr q, CUdeviceptr k_cache, CUdeviceptr v_cache,
                                   CUdeviceptr qkv, CUdeviceptr out, CUdeviceptr scratch, int splits,
                                   const AttentionBatch& batch, int B, bool pdl) {
  if (B < 1 || B > 65535) fail("attention_decode_batch: B = {} sequences is not in [1, 65535]", B);
  if (splits < 1 || splits > 65535) fail("attention_decode_batch: splits = {} is not in [1, 65535]", splits);
  if (plan.max_decode_tokens() < 1)
    fail("attention_decode_batch: {} q heads per kv head do not fit one decode block", plan.hq / plan.hkv);
  const int64_t blocks = plan.hkv * plan.decode_qgroups();  // per split and sequence
  const CUdeviceptr part_o = scratch;
  const CUdeviceptr part_ml =
      scratch + size_t(B) * size_t(blocks) * size_t(splits) * AttentionDecodeTile::kRows * size_t(plan.d) * sizeof(float);
  const long long slot_stride = (long long)batch.max_context * plan.hkv * plan.d;
  decode.launch({{unsigned(blocks), unsigned(splits), unsigned(B)}, {unsigned(plan.decode.threads())}, 0, pdl}, stream,
                q, k_cache, v_cache, part_o, part_ml, batch.slots, batch.pos, slot_stride, plan.scale);
  merge.launch({{unsigned(B * plan.hq), unsigned(plan.d / 64)}, {256}, 0, pdl}, stream, part_o, part_ml, qkv, out,
               batch.slots, batch.pos, splits, plan.scale);
}

}  // namespace q35::qwen35::gpu
