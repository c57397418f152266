#include "models/qwen35/memory.h"

#include <fmt/format.h>

#include <algorithm>

#include "models/qwen35/batch.h"
#include "models/qwen35/floors.h"
#include "runtime/core/error.h"

namespace q35::qwen35 {

MemoryNeed gpu_memory_need(const Config& c, int group, int64_t max_context, int64_t max_chunk,
                           bool quantize_on_load, int max_batch) {
  if (max_context <= 0 || max_chunk <= 0)
    fail("gpu_memory_need: max_context {} and max_chunk {} must be positive", max_context, max_chunk);
  if (max_batch < 1 || max_batch > kMaxBatch) fail("--max-batch {} is not in [1, {}]", max_batch, kMaxBatch);
  const ModelWork work(c, group);
  MemoryNeed m;
  m.weights = work.model_weight_bytes();
  if (group != 0 && quantize_on_load) {
    const int64_t H = c.hidden_size;
    m.staging = 2 * std::max({c.vocab_size * H, c.num_experts * 2 * c.moe_intermediate_size * H,
                              (c.linear_conv_dim() + c.linear_value_dim()) * H, c.q_proj_rows() * H});
  }
  m.max_batch = max_batch;
  m.state = int64_t(max_batch) * slot_state_bytes(c, max_context);
  const int64_t T = std::min(max_chunk, max_context), H = c.hidden_size;
  const int64_t proj_cols = std::max(c.q_proj_rows() + 2 * c.kv_dim(),
                                     c.linear_conv_dim() + c.linear_value_dim() + 2 * c.linear_num_value_heads);
  const int64_t mix_cols = std::max(c.attn_out_dim(), c.linear_value_dim());
  const int64_t per_token = H * 4 + 2 * H * 2 + proj_cols * 2 + c.attn_out_dim() * 2 + mix_cols * 2 +
                            c.num_experts * 4 +  // router logits
                            c.num_experts_per_tok * (H * 2 + 3 * c.moe_intermediate_size * 2 + H * 4) +
                            3 * c.shared_expert_intermediate_size * 2;
  m.scratch = T * per_token + c.vocab_size * 4 * 2;  // + fp32 logits of the last row and sampling workspace
  if (max_batch > 1) {
    // fp32 logits rows past the 16 every model has, top-k candidates (64 slices x 64 x 8 bytes per
    // row), attention partials: 8 rows x (D + 2) fp32 per (kv head block, split, sequence), each
    // sequence with the single-sequence split count (~2 CTAs per SM over its kv head blocks, so at
    // most 2 x kSmBound + its kv head blocks; kSmBound bounds the SMs of the GPUs q35jit runs on).
    constexpr int64_t kSmBound = 160;
    const int64_t rows = std::min(max_batch, kMaxStepRows);  // a step's rows (larger batches: several steps)
    const int64_t kv_blocks =
        std::max<int64_t>(1, c.num_kv_heads * std::max<int64_t>(1, c.num_heads / std::max<int64_t>(1, c.num_kv_heads) / 8));
    const int64_t blocks = rows * (2 * kSmBound + kv_blocks);
    m.batch = std::max<int64_t>(0, rows - 16) * c.vocab_size * 4 + rows * 64 * 64 * 8 + blocks * 8 * (c.head_dim + 2) * 4;
  }
  m.reserve = int64_t(512) << 20;
  return m;
}

void check_fits(const MemoryNeed& need, size_t free_bytes, size_t total_bytes, const std::string& device,
                const std::string& what) {
  if (need.total() <= int64_t(free_bytes)) return;
  const double GB = 1e9;
  fail("{} needs {:.1f} GB of GPU memory ({:.1f} GB of weights, {:.1f} GB of cache and scratch), but {} has "
       "{:.1f} GB free of {:.1f} GB: it does not fit on one GPU (use a smaller model, a shorter --max-context, {}or "
       "a larger GPU)",
       what, double(need.total()) / GB, double(need.weights) / GB,
       double(need.total() - need.weights) / GB, device, double(free_bytes) / GB, double(total_bytes) / GB,
       need.max_batch > 1 ? fmt::format("fewer --max-batch slots ({} slots of --max-context tokens hold {:.1f} GB), ",
                                        need.max_batch, double(need.state) / GB)
                          : std::string());
}

}  // namespace q35::qwen35
