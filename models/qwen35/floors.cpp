#include "models/qwen35/floors.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"

namespace q35::qwen35 {

ModelWork::ModelWork(const Config& config, int group) : config_(config), group_(group) {
  if (group < 0 && group != kFp8Group)
    fail("weight group size must be 0 (bf16), positive (W4A16) or kFp8Group (FP8), got {}", group);
  const Config& c = config_;
  const int64_t H = c.hidden_size;
  const int64_t n_full = c.num_layers_of(LayerType::FullAttention);
  const int64_t n_gdn = c.num_layers_of(LayerType::LinearAttention);
  const int64_t Is = c.shared_expert_intermediate_size;
  const int64_t gdn_in_rows = c.linear_conv_dim() + c.linear_value_dim() + 2 * c.linear_num_value_heads;

  auto add = [&](std::string name, int64_t params, int64_t bytes) {
    parts_.push_back({std::move(name), params, bytes});
  };
  add("routed experts", c.num_layers * c.num_experts_per_tok * 3 * c.moe_intermediate_size * H,
      c.num_layers * c.num_experts_per_tok * expert_bytes());
  add("shared expert", c.num_layers * (3 * Is * H + (Is > 0 ? H : 0)),
      c.num_layers * (matrix_bytes(2 * Is, H, true) + matrix_bytes(H, Is, true) + (Is > 0 ? matrix_bytes(1, H, false) : 0)));
  add("router", c.num_layers * c.num_experts * H, matrix_bytes(c.num_experts, H, false, c.num_layers));
  add("GDN projections", n_gdn * (gdn_in_rows * H + H * c.linear_value_dim()),
      n_gdn * (matrix_bytes(gdn_in_rows, H, true) + matrix_bytes(H, c.linear_value_dim(), true)));
  const int64_t attn_in_rows = c.q_proj_rows() + 2 * c.kv_dim();
  add("attention projections", n_full * (attn_in_rows * H + H * c.attn_out_dim()),
      n_full * (matrix_bytes(attn_in_rows, H, true) + matrix_bytes(H, c.attn_out_dim(), true)));
  add("lm_head", c.vocab_size * H, matrix_bytes(c.vocab_size, H, true));
}

int64_t ModelWork::matrix_bytes(int64_t N, int64_t K, bool quantized, int64_t count) const {
  if (!quantized || group_ == 0) return count * N * K * 2;
  if (group_ == kFp8Group) return count * N * (K + (K + 127) / 128 * 4);  // a byte per weight, fp32 per 128-k block
  const int64_t packed = (K + 7) / 8 * 4;             // u32 per 8 weights
  const int64_t scales = (K + group_ - 1) / group_ * 2;  // bf16 per group
  return count * N * (packed + scales);
}

int64_t ModelWork::expert_bytes() const {
  const int64_t H = config_.hidden_size, I = config_.moe_intermediate_size;
  return matrix_bytes(2 * I, H, true) + matrix_bytes(H, I, true);
}

const WeightPart& ModelWork::part(const std::string& name) const {
  for (const WeightPart& p : parts_)
    if (p.name == name) return p;
  fail("ModelWork: no part '{}'", name);
}

int64_t ModelWork::active_params() const {
  int64_t n = 0;
  for (const WeightPart& p : parts_) n += p.params;
  return n;
}

int64_t ModelWork::vector_bytes() const {
  const Config& c = config_;
  const int64_t H = c.hidden_size;
  const int64_t n_full = c.num_layers_of(LayerType::FullAttention);
  const int64_t n_gdn = c.num_layers_of(LayerType::LinearAttention);
  const int64_t per_layer = 2 * H * 2;                      // input and post-attention norms
  const int64_t per_full = 2 * c.head_dim * 2;              // q_norm, k_norm
  const int64_t per_gdn = c.linear_conv_dim() * c.linear_conv_kernel_dim * 2  // conv1d
                          + 2 * c.linear_num_value_heads * 4                  // A_log, dt_bias (fp32)
                          + c.linear_value_head_dim * 2;                      // gated norm
  return c.num_layers * per_layer + n_full * per_full + n_gdn * per_gdn + H * 2 /* final norm */ +
         H * 2 /* embedding row */;
}

int64_t ModelWork::weight_bytes_per_token() const {
  int64_t n = vector_bytes();
  for (const WeightPart& p : parts_) n += p.bytes;
  return n;
}

int64_t ModelWork::gdn_state_bytes() const {
  const Config& c = config_;
  return c.num_layers_of(LayerType::LinearAttention) * c.linear_num_value_heads * c.linear_key_head_dim *
         c.linear_value_head_dim * 4;
}

int64_t ModelWork::conv_state_bytes() const {
  const Config& c = config_;
  return c.num_layers_of(LayerType::LinearAttention) * (c.linear_conv_kernel_dim - 1) * c.linear_conv_dim() * 2;
}

int64_t ModelWork::kv_bytes_per_token() const {
  return config_.num_layers_of(LayerType::FullAttention) * 2 * config_.kv_dim() * 2;
}

int64_t ModelWork::decode_bytes(int64_t context) const {
  return weight_bytes_per_token() + 2 * (gdn_state_bytes() + conv_state_bytes()) +
         kv_bytes_per_token() * (context + 1) + kv_bytes_per_token();
}

int64_t ModelWork::model_weight_bytes() const {
  const Config& c = config_;
  const int64_t H = c.hidden_size;
  return weight_bytes_per_token() - H * 2 + c.vocab_size * H * 2 +
         c.num_layers * (c.num_experts - c.num_experts_per_tok) * expert_bytes();
}

double ModelWork::expected_experts(int64_t L) const {
  const double E = double(config_.num_experts), k = double(config_.num_experts_per_tok);
  if (E <= 0) return 0;
  return E * (1.0 - std::pow(1.0 - k / E, double(std::max<int64_t>(L, 0))));
}

double ModelWork::decode_batch_bytes(int64_t B, int64_t context) const {
  if (B < 1) fail("decode batch floor: B = {} sequences must be positive", B);
  if (context < 0) fail("decode batch floor: context {} must not be negative", context);
  const Config& c = config_;
  const double weights = double(weight_bytes_per_token() - part("routed experts").bytes) +
                         double(c.num_layers) * expected_experts(B) * double(expert_bytes()) +
                         double(B - 1) * double(c.hidden_size * 2);  // the other rows' embeddings
  const double per_sequence =
      double(2 * (gdn_state_bytes() + conv_state_bytes()) + kv_bytes_per_token() * (context + 1) + kv_bytes_per_token());
  return weights + double(B) * per_sequence;
}

double ModelWork::decode_batch_floor_ms(int64_t B, int64_t context, double bandwidth) const {
  if (bandwidth <= 0) fail("decode batch floor: bandwidth must be positive, got {}", bandwidth);
  return decode_batch_bytes(B, context) / bandwidth * 1e3;
}

double ModelWork::prefill_weight_bytes(int64_t L) const {
  const Config& c = config_;
  const int64_t H = c.hidden_size;
  return double(weight_bytes_per_token() - H * 2) + double(std::min(L, c.vocab_size) * H * 2) +
         double(c.num_layers) * (expected_experts(L) - double(c.num_experts_per_tok)) * double(expert_bytes());
}

double ModelWork::projection_flops_per_token() const {
  return 2.0 * double(active_params() - part("lm_head").params);
}

double ModelWork::lm_head_flops() const { return 2.0 * double(part("lm_head").params); }

double ModelWork::attention_flops(int64_t L) const {
  const Config& c = config_;
  const double pairs = double(L) * double(L + 1) / 2;  // (query, key) pairs, causal
  return double(c.num_layers_of(LayerType::FullAttention)) * 4.0 * double(c.num_heads * c.head_dim) * pairs;
}

double ModelWork::gdn_chunk_flops_per_token() const {
  const Config& c = config_;
  const double C = double(kGdnChunkTokens), dk = double(c.linear_key_head_dim), dv = double(c.linear_value_head_dim);
  const double per_key_head = 4 * C * dk;
  const double per_value_head = 2 * C * dk + 4 * C * dv + 6 * dk * dv + C * C / 3;
  return double(c.num_layers_of(LayerType::LinearAttention)) *
         (double(c.linear_num_key_heads) * per_key_head + double(c.linear_num_value_heads) * per_value_head);
}

double ModelWork::prefill_flops(int64_t L) const {
  if (L <= 0) return 0;
  return double(L) * (projection_flops_per_token() + gdn_chunk_flops_per_token()) + lm_head_flops() +
         attention_flops(L);
}

double ModelWork::decode_floor_ms(int64_t context, double bandwidth) const {
  if (bandwidth <= 0) fail("decode floor: bandwidth must be positive, got {}", bandwidth);
  return double(decode_bytes(context)) / bandwidth * 1e3;
}

double ModelWork::prefill_compute_ms(int64_t L, double flops_per_s) const {
  if (flops_per_s <= 0) fail("prefill floor: FLOP rate must be positive, got {}", flops_per_s);
  return prefill_flops(L) / flops_per_s * 1e3;
}

double ModelWork::prefill_memory_ms(int64_t L, double bandwidth) const {
  if (bandwidth <= 0) fail("prefill floor: bandwidth must be positive, got {}", bandwidth);
  return prefill_weight_bytes(L) / bandwidth * 1e3;
}

double ModelWork::prefill_floor_ms(int64_t L, double flops_per_s, double bandwidth) const {
  const double compute = prefill_compute_ms(L, flops_per_s);
  return bandwidth > 0 ? std::max(compute, prefill_memory_ms(L, bandwidth)) : compute;
}

}  // namespace q35::qwen35
