#pragma once
// Qwen3.5 MoE hyper-parameters, read from a Hugging Face config.json (LM keys at the top level
// or under "text_config") and generation_config.json. Nothing here assumes the 35B numbers.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace q35::qwen35 {

enum class LayerType : uint8_t { LinearAttention, FullAttention };

struct Config {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  std::vector<LayerType> layer_types;  // [num_layers]

  // Gated full attention
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t rotary_dim = 0;  // head_dim * partial_rotary_factor, even
  double rope_theta = 0;
  bool attn_output_gate = true;

  // Gated DeltaNet
  int64_t linear_num_key_heads = 0;
  int64_t linear_num_value_heads = 0;
  int64_t linear_key_head_dim = 0;
  int64_t linear_value_head_dim = 0;
  int64_t linear_conv_kernel_dim = 0;

  // MoE
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t shared_expert_intermediate_size = 0;

  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  int64_t max_position_embeddings = 0;

  // Derived sizes
  int64_t q_proj_rows() const { return num_heads * head_dim * (attn_output_gate ? 2 : 1); }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  int64_t attn_out_dim() const { return num_heads * head_dim; }
  int64_t linear_key_dim() const { return linear_num_key_heads * linear_key_head_dim; }
  int64_t linear_value_dim() const { return linear_num_value_heads * linear_value_head_dim; }
  int64_t linear_conv_dim() const { return 2 * linear_key_dim() + linear_value_dim(); }
  int num_layers_of(LayerType t) const;

  // Parses `path` (a config.json). Throws Error naming the file and the key on a missing or
  // ill-typed key or an inconsistent value. Rope keys may be flat or in rope_parameters (both
  // present must agree; rope_type "default" or "mrope"). Defaults as in transformers:
  // partial_rotary_factor 0.25, attn_output_gate true, rms_norm_eps 1e-6,
  // max_position_embeddings 32768. layer_types, or full_attention_interval, is required.
  // Keys that change the math must hold the value this runtime implements (attention_bias false,
  // hidden_act silu, mlp_only_layers [], output_gate_type swish, mamba_ssm_dtype float32,
  // norm_topk_prob true, ...); a key of the LM config that is neither read, known to be inert
  // (bookkeeping, training, MTP, generation defaults) nor checked is refused as unknown.
  static Config from_file(const std::filesystem::path& path);
  // The shapes of a published model, for synthetic (random-weight) benchmarks and tuning without
  // the checkpoint: "35b-a3b", "122b-a10b", "397b-a17b" (Qwen3.5-*, also Qwen3.6-35B-A3B). Error
  // listing the known names.
  static Config preset(const std::string& name);
};

struct GenerationConfig {
  std::vector<int32_t> eos_token_ids;
  std::optional<int32_t> bos_token_id;
  std::optional<int32_t> pad_token_id;
  bool do_sample = false;
  float temperature = 1.0f;
  int top_k = 0;      // 0 = off
  float top_p = 1.0f; // 1 = off

  // Missing file -> defaults (no stop ids); malformed file -> Error naming it.
  static GenerationConfig from_file(const std::filesystem::path& path);
};

}  // namespace q35::qwen35
