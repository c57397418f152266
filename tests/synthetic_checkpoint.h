#pragma once
// Test helper: writes tiny random Qwen3.5-MoE checkpoints in Hugging Face form (config.json +
// model.safetensors, or model.safetensors.index.json + shards) for a given small Config, in either
// expert layout and either prefix, and returns the values written so tests can compare what a
// loader reads back. Header-only; used by several test executables.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "models/qwen35/config.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/core/half.h"
#include "runtime/io/safetensors.h"

namespace q35::test {

namespace fs = std::filesystem;

// A fresh empty folder under the system temp folder, removed with its contents on destruction.
class TempDir {
 public:
  explicit TempDir(std::string_view tag) {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() / fmt::format("q35-{}-{}-{}", tag, ::getpid(), counter++);
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  fs::path operator/(std::string_view name) const { return path_ / name; }

 private:
  fs::path path_;
};

// A small self-consistent config: layers [linear, linear, linear, full], GQA 4:2, GDN 2 key /
// 4 value heads, 4 experts (top 2). Dimensions are multiples of 8 and differ from each other where
// they can, so a transposed shape does not pass by accident.
inline qwen35::Config tiny_config() {
  using qwen35::LayerType;
  qwen35::Config c;
  c.vocab_size = 80;
  c.hidden_size = 32;
  c.num_layers = 4;
  c.layer_types = {LayerType::LinearAttention, LayerType::LinearAttention, LayerType::LinearAttention,
                   LayerType::FullAttention};
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.rotary_dim = 4;  // partial_rotary_factor 0.25
  c.rope_theta = 1e7;
  c.attn_output_gate = true;
  c.linear_num_key_heads = 2;
  c.linear_num_value_heads = 4;
  c.linear_key_head_dim = 8;
  c.linear_value_head_dim = 16;
  c.linear_conv_kernel_dim = 4;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 24;
  c.shared_expert_intermediate_size = 40;
  c.rms_norm_eps = 1e-6;
  c.tie_word_embeddings = false;
  c.max_position_embeddings = 128;
  return c;
}

// config.json as transformers writes it: the LM keys under "text_config" inside the multimodal
// wrapper (text_config = true), or at the top level (text-only Qwen3_5MoeForCausalLM); rope keys
// nested in "rope_parameters" or flat.
inline nlohmann::json config_json(const qwen35::Config& c, bool text_config = true, bool nested_rope = true) {
  using nlohmann::json;
  json layer_types = json::array();
  for (qwen35::LayerType t : c.layer_types)
    layer_types.push_back(t == qwen35::LayerType::FullAttention ? "full_attention" : "linear_attention");
  const double partial = double(c.rotary_dim) / double(c.head_dim);
  json lm = {
      {"model_type", "qwen3_5_moe_text"},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"num_hidden_layers", c.num_layers},
      {"layer_types", layer_types},
      {"num_attention_heads", c.num_heads},
      {"num_key_value_heads", c.num_kv_heads},
      {"head_dim", c.head_dim},
      {"attn_output_gate", c.attn_output_gate},
      {"attention_bias", false},
      {"hidden_act", "silu"},
      {"linear_num_key_heads", c.linear_num_key_heads},
      {"linear_num_value_heads", c.linear_num_value_heads},
      {"linear_key_head_dim", c.linear_key_head_dim},
      {"linear_value_head_dim", c.linear_value_head_dim},
      {"linear_conv_kernel_dim", c.linear_conv_kernel_dim},
      {"num_experts", c.num_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"shared_expert_intermediate_size", c.shared_expert_intermediate_size},
      {"rms_norm_eps", c.rms_norm_eps},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"max_position_embeddings", c.max_position_embeddings},
      {"bos_token_id", nullptr},
      {"eos_token_id", nullptr},
  };
  if (nested_rope)
    lm["rope_parameters"] = {{"rope_type", "default"},
                             {"rope_theta", c.rope_theta},
                             {"partial_rotary_factor", partial},
                             {"mrope_section", {1, 1, 0}},
                             {"mrope_interleaved", true}};
  else {
    lm["rope_theta"] = c.rope_theta;
    lm["partial_rotary_factor"] = partial;
  }
  if (!text_config) {
    lm["architectures"] = {"Qwen3_5MoeForCausalLM"};
    return lm;
  }
  return {{"architectures", {"Qwen3_5MoeForConditionalGeneration"}},
          {"model_type", "qwen3_5_moe"},
          {"tie_word_embeddings", c.tie_word_embeddings},
          {"text_config", lm},
          {"vision_config", {{"model_type", "qwen3_5_moe_vision"}, {"depth", 1}, {"hidden_size", 16}}}};
}

inline void write_json(const fs::path& path, const nlohmann::json& j) {
  std::ofstream out(path);
  out << j.dump(2);
  if (!out) fail("cannot write {}", path.string());
}

struct SyntheticOptions {
  qwen35::ExpertLayout experts = qwen35::ExpertLayout::Fused;
  std::string prefix = "model.language_model.";  // or "model." (text-only; config.json without text_config)
  DType dtype = DType::BF16;                      // BF16 or F32
  int shards = 1;       // 1: model.safetensors; n > 1: model.safetensors.index.json + n shards
  bool extras = true;   // also write model.visual.* and mtp.* tensors, which loaders must ignore
  uint64_t seed = 1;
};

// Writes config.json and the weights the config implies into `dir` (created if needed). Returns
// every language-model tensor by checkpoint name with the exact fp32 values stored (bf16-rounded
// when dtype is BF16). Matrices are uniform in +-1/sqrt(fan_in); zero-centred norms are small
// offsets; the GDN gated-norm weight is near 1.
inline std::map<std::string, qwen35::HostTensor> write_synthetic_checkpoint(const fs::path& dir,
                                                                           const qwen35::Config& c,
                                                                           const SyntheticOptions& o = {}) {
  if (o.dtype != DType::BF16 && o.dtype != DType::F32)
    fail("write_synthetic_checkpoint: dtype {} not supported (BF16 or F32)", dtype_name(o.dtype));
  fs::create_directories(dir);
  write_json(dir / "config.json", config_json(c, o.prefix == "model.language_model."));

  std::mt19937_64 rng(o.seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::map<std::string, qwen35::HostTensor> values;
  auto make = [&](const std::string& name, const std::vector<int64_t>& shape) -> qwen35::HostTensor& {
    qwen35::HostTensor t{shape, {}};
    const bool norm = shape.size() == 1;
    const float scale = norm ? 0.1f : 1.0f / std::sqrt(float(shape.back()));
    const float offset = name.ends_with("linear_attn.norm.weight") ? 1.0f : 0.0f;
    t.data.resize(size_t(t.numel()));
    for (float& v : t.data) {
      v = offset + scale * uni(rng);
      if (o.dtype == DType::BF16) v = round_bf16(v);
    }
    return values[name] = std::move(t);
  };

  qwen35::CheckpointLayout layout{o.prefix, o.experts};
  std::vector<std::string> names;  // write order
  for (const qwen35::TensorSpec& s : qwen35::expected_tensors(c, layout)) {
    make(s.name, s.shape);
    names.push_back(s.name);
  }

  // Storage for the encoded bytes; the extras are not returned.
  std::map<std::string, qwen35::HostTensor> extras;
  if (o.extras) {
    extras["model.visual.blocks.0.attn.qkv.weight"] = {{48, 16}, std::vector<float>(48 * 16, 0.5f)};
    extras["mtp.fc.weight"] = {{c.hidden_size, 2 * c.hidden_size},
                               std::vector<float>(size_t(2 * c.hidden_size * c.hidden_size), -0.25f)};
    extras["mtp.layers.0.mlp.experts.7.down_proj.weight"] = {{4, 2}, std::vector<float>(8, 1.0f)};
  }
  std::map<std::string, std::vector<uint8_t>> bytes;
  auto encode = [&](const std::string& name, const qwen35::HostTensor& t) {
    std::vector<uint8_t>& b = bytes[name];
    if (o.dtype == DType::F32) {
      b.resize(t.data.size() * 4);
      std::memcpy(b.data(), t.data.data(), b.size());
    } else {
      b.resize(t.data.size() * 2);
      for (size_t i = 0; i < t.data.size(); ++i) {
        uint16_t h = f32_to_bf16(t.data[i]);
        std::memcpy(b.data() + 2 * i, &h, 2);
      }
    }
  };
  for (const auto& [name, t] : values) encode(name, t);
  for (const auto& [name, t] : extras) {
    encode(name, t);
    names.push_back(name);
  }
  auto shape_of = [&](const std::string& name) {
    auto it = values.find(name);
    return it != values.end() ? it->second.shape : extras.at(name).shape;
  };

  // Contiguous runs of tensors per shard, in write order.
  const size_t n = size_t(std::max(o.shards, 1));
  std::vector<std::vector<TensorToWrite>> shard(n);
  for (size_t i = 0; i < names.size(); ++i)
    shard[i * n / names.size()].push_back({names[i], o.dtype, shape_of(names[i]), bytes.at(names[i])});
  if (n == 1) {
    write_safetensors(dir / "model.safetensors", shard[0], {{"format", "pt"}});
    return values;
  }
  nlohmann::json weight_map = nlohmann::json::object();
  uint64_t total = 0;
  for (size_t s = 0; s < n; ++s) {
    const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, n);
    write_safetensors(dir / file, shard[s], {{"format", "pt"}});
    for (const TensorToWrite& t : shard[s]) {
      weight_map[t.name] = file;
      total += t.bytes.size();
    }
  }
  write_json(dir / "model.safetensors.index.json",
             {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});
  return values;
}

// Writes a safetensors file whose header text is given verbatim (for malformed-header tests).
// `header_len` overrides the length field (default: the header's real length).
inline void write_raw_safetensors(const fs::path& path, const std::string& header, std::span<const uint8_t> data,
                                  std::optional<uint64_t> header_len = std::nullopt) {
  const uint64_t len = header_len.value_or(header.size());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  for (int i = 0; i < 8; ++i) out.put(char(uint8_t(len >> (8 * i))));
  out.write(header.data(), std::streamsize(header.size()));
  out.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size()));
  if (!out) fail("cannot write {}", path.string());
}

// Rewrites a safetensors file through `edit`, which may add, drop or change entries (name, dtype,
// shape, bytes). The original is read through a map that stays valid while the new file replaces it.
template <typename Edit>
void rewrite_safetensors(const fs::path& path, Edit edit) {
  SafetensorsFile f(path);
  std::vector<TensorToWrite> tensors;
  for (const TensorInfo& t : f.tensors()) tensors.push_back({t.name, t.dtype, t.shape, f.data(t)});
  edit(tensors);
  write_safetensors(path, tensors, f.metadata());
}

}  // namespace q35::test
