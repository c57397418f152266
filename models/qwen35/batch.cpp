#include "models/qwen35/batch.h"

#include <algorithm>

#include "runtime/core/error.h"

namespace q35::qwen35 {

int64_t slot_state_bytes(const Config& c, int64_t max_context) {
  if (max_context < 1) fail("--max-context {} must be at least 1", max_context);
  const int64_t full = c.num_layers_of(LayerType::FullAttention), linear = c.num_layers_of(LayerType::LinearAttention);
  const int64_t kv = 2 * max_context * c.num_kv_heads * c.head_dim * 2;
  const int64_t conv = c.linear_conv_kernel_dim * c.linear_conv_dim() * 2;
  const int64_t ssm = c.linear_num_value_heads * c.linear_value_head_dim * c.linear_key_head_dim * 4;
  return full * kv + linear * (conv + ssm);
}

std::vector<int> decode_buckets(int max_batch) {
  if (max_batch < 1 || max_batch > kMaxBatch) fail("--max-batch {} is not in [1, {}]", max_batch, kMaxBatch);
  const int top = std::min(max_batch, kMaxStepRows);
  std::vector<int> b;
  for (int n = 1; n < top; n *= 2) b.push_back(n);
  b.push_back(top);
  return b;
}

int decode_bucket(int n, int max_batch) {
  if (n < 1 || n > max_batch)
    fail("decode_batch: {} sequences for {} slots (--max-batch {})", n, max_batch, max_batch);
  if (n > kMaxStepRows) fail("decode_batch: a step of {} rows is more than the {} one step runs", n, kMaxStepRows);
  for (int b : decode_buckets(max_batch))
    if (b >= n) return b;
  return max_batch;  // not reached
}

std::vector<std::pair<int, int>> step_groups(int n, int max_batch) {
  if (n < 1 || n > max_batch)
    fail("decode_batch: {} sequences for {} slots (--max-batch {})", n, max_batch, max_batch);
  std::vector<std::pair<int, int>> g;
  for (int first = 0; first < n; first += kMaxStepRows) g.emplace_back(first, std::min(kMaxStepRows, n - first));
  return g;
}

}  // namespace q35::qwen35
