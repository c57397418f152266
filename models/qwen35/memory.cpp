#include "models/qwen35/memory.h"

#include <algorithm>

#include "models/qwen35/floors.h"
#include "runtime/core/error.h"

namespace q35::qwen35 {

MemoryNeed gpu_memory_need(const Config& c, int group, int64_t max_context, int64_t max_chunk,
                           bool quantize_on_load) {
  if (max_context <= 0 || max_chunk <= 0)
    fail("gpu_memory_need: max_context {} and max_chunk {} must be positive", max_context, max_chunk);
  const ModelWork work(c, group);
  MemoryNeed m;
  m.weights = work.model_weight_bytes();
  if (group > 0 && quantize_on_load) {
    const int64_t H = c.hidden_size;
    m.staging = 2 * std::max({c.vocab_size * H, c.num_experts * 2 * c.moe_intermediate_size * H,
                              (c.linear_conv_dim() + c.linear_value_dim()) * H, c.q_proj_rows() * H});
  }
  m.state = work.kv_bytes_per_token() * max_context + work.gdn_state_bytes() + work.conv_state_bytes();
  const int64_t T = std::min(max_chunk, max_context), H = c.hidden_size;
  const int64_t proj_cols = std::max(c.q_proj_rows() + 2 * c.kv_dim(),
                                     c.linear_conv_dim() + c.linear_value_dim() + 2 * c.linear_num_value_heads);
  const int64_t mix_cols = std::max(c.attn_out_dim(), c.linear_value_dim());
  const int64_t per_token = H * 4 + 2 * H * 2 + proj_cols * 2 + c.attn_out_dim() * 2 + mix_cols * 2 +
                            c.num_experts * 4 +  // router logits
                            c.num_experts_per_tok * (H * 2 + 3 * c.moe_intermediate_size * 2 + H * 4) +
                            3 * c.shared_expert_intermediate_size * 2;
  m.scratch = T * per_token + c.vocab_size * 4 * 2;  // + fp32 logits of the last row and sampling workspace
  m.reserve = int64_t(512) << 20;
  return m;
}

void check_fits(const MemoryNeed& need, size_t free_bytes, size_t total_bytes, const std::string& device,
                const std::string& what) {
  if (need.total() <= int64_t(free_bytes)) return;
  const double GB = 1e9;
  fail("{} needs {:.1f} GB of GPU memory ({:.1f} GB of weights, {:.1f} GB of cache and scratch), but {} has "
       "{:.1f} GB free of {:.1f} GB: it does not fit on one GPU (use a smaller model, a shorter --max-context, or "
       "a larger GPU)",
       what, double(need.total()) / GB, double(need.weights) / GB,
       double(need.total() - need.weights) / GB, device, double(free_bytes) / GB, double(total_bytes) / GB);
}

}  // namespace q35::qwen35
