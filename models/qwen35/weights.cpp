#include "models/qwen35/weights.h"

#include <algorithm>
#include <map>
#include <charconv>
#include <optional>
#include <cstring>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "models/qwen35/hf_quant.h"
#include "models/qwen35/quantized.h"
#include "runtime/core/fp8_format.h"
#include "runtime/core/half.h"
#include "runtime/core/error.h"
#include "runtime/io/safetensors.h"

namespace q35::qwen35 {

namespace {

constexpr const char* kPrefixes[] = {"model.language_model.", "model."};

std::string layer_prefix(const CheckpointLayout& layout, int64_t i) {
  return fmt::format("{}layers.{}.", layout.prefix, i);
}

std::string per_expert(const std::string& L, int64_t e, const char* proj) {
  return fmt::format("{}mlp.experts.{}.{}.weight", L, e, proj);
}


// Reads a leading decimal index from `s` ("12.mlp..." -> 12, rest "mlp..."); nullopt if none.
std::optional<int64_t> leading_index(std::string_view s, std::string_view* rest) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p == s.data() || p == s.data() + s.size() || *p != '.') return std::nullopt;
  *rest = s.substr(size_t(p - s.data()) + 1);
  return v;
}

// Tensors the config contradicts: a layer index >= num_layers, an expert index >= num_experts,
// or attention weights of the type the config does not give that layer.
void check_no_contradiction(const Config& c, const CheckpointLayout& layout, const Checkpoint& ckpt) {
  const std::string layers = layout.prefix + "layers.";
  for (const std::string& name : ckpt.names()) {
    if (name.rfind(layers, 0) != 0) continue;
    std::string_view rest;
    std::optional<int64_t> i = leading_index(std::string_view(name).substr(layers.size()), &rest);
    if (!i) continue;
    const std::string file = ckpt.get(name).file->path().string();
    if (*i >= c.num_layers)
      fail("tensor \"{}\" in {}: layer {} is present, but the config has num_hidden_layers = {}", name, file,
           *i, c.num_layers);
    const LayerType t = c.layer_types[size_t(*i)];
    const bool attn = rest.rfind("self_attn.", 0) == 0, linear = rest.rfind("linear_attn.", 0) == 0;
    if ((attn && t != LayerType::FullAttention) || (linear && t != LayerType::LinearAttention))
      fail("tensor \"{}\" in {}: the config says layer {} is {}, but this is a {} weight", name, file, *i,
           t == LayerType::FullAttention ? "full_attention" : "linear_attention",
           attn ? "full_attention" : "linear_attention");
    if (rest.rfind("mlp.experts.", 0) == 0) {
      std::string_view expert_rest;
      std::optional<int64_t> e = leading_index(rest.substr(12), &expert_rest);
      if (e && *e >= c.num_experts)
        fail("tensor \"{}\" in {}: expert {} is present, but the config has num_experts = {}", name, file, *e,
             c.num_experts);
    }
  }
}

// A logical weight as fp32 (float, FP8, GPTQ or q35jit INT4 on disk: models/qwen35/hf_quant.h).
HostTensor load(const Checkpoint& ckpt, const HfQuant& quant, const std::string& name,
                const std::vector<int64_t>& shape) {
  HostTensor out{shape, read_weight_f32(ckpt, quant, name, shape)};
  release_weight(ckpt, name);
  return out;
}

}  // namespace

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

CheckpointLayout detect_layout(const Checkpoint& ckpt) {
  CheckpointLayout layout;
  for (const char* p : kPrefixes)
    if (ckpt.has(std::string(p) + "embed_tokens.weight")) {
      layout.prefix = p;
      break;
    }
  if (layout.prefix.empty())
    fail("tensor \"{}embed_tokens.weight\" (or \"{}embed_tokens.weight\" for a text-only checkpoint) not found "
         "in {}",
         kPrefixes[0], kPrefixes[1], ckpt.source().string());
  const std::string L = layer_prefix(layout, 0);
  // A quantized checkpoint (models/qwen35/quantized.h) stores the same names + ".qweight".
  // GPTQ stores <module>.qweight for <module>.weight (models/qwen35/hf_quant.h).
  auto has = [&](const std::string& name) {
    return ckpt.has(name) || ckpt.has(name + ".qweight") ||
           (name.ends_with(".weight") && ckpt.has(name.substr(0, name.size() - 7) + ".qweight"));
  };
  if (has(L + "mlp.experts.gate_up_proj")) layout.experts = ExpertLayout::Fused;
  else if (has(per_expert(L, 0, "gate_proj"))) layout.experts = ExpertLayout::PerExpert;
  else
    fail("tensor \"{}mlp.experts.gate_up_proj\" (or per-expert \"{}\") not found in {}", L,
         per_expert(L, 0, "gate_proj"), ckpt.source().string());
  return layout;
}

std::vector<TensorSpec> expected_tensors(const Config& c, const CheckpointLayout& layout) {
  const int64_t H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size;
  const int64_t Is = c.shared_expert_intermediate_size, Hv = c.linear_num_value_heads;
  const std::string& P = layout.prefix;
  if (int64_t(c.layer_types.size()) != c.num_layers)
    fail("config: layer_types has {} entries, expected num_layers = {}", c.layer_types.size(), c.num_layers);
  std::vector<TensorSpec> out;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    out.push_back({std::move(name), std::move(shape)});
  };

  add(P + "embed_tokens.weight", {c.vocab_size, H});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string L = layer_prefix(layout, i);
    add(L + "input_layernorm.weight", {H});
    add(L + "post_attention_layernorm.weight", {H});
    if (c.layer_types[size_t(i)] == LayerType::FullAttention) {
      add(L + "self_attn.q_proj.weight", {c.q_proj_rows(), H});
      add(L + "self_attn.k_proj.weight", {c.kv_dim(), H});
      add(L + "self_attn.v_proj.weight", {c.kv_dim(), H});
      add(L + "self_attn.o_proj.weight", {H, c.attn_out_dim()});
      add(L + "self_attn.q_norm.weight", {c.head_dim});
      add(L + "self_attn.k_norm.weight", {c.head_dim});
    } else {
      add(L + "linear_attn.in_proj_qkv.weight", {c.linear_conv_dim(), H});
      add(L + "linear_attn.in_proj_z.weight", {c.linear_value_dim(), H});
      add(L + "linear_attn.in_proj_b.weight", {Hv, H});
      add(L + "linear_attn.in_proj_a.weight", {Hv, H});
      add(L + "linear_attn.conv1d.weight", {c.linear_conv_dim(), 1, c.linear_conv_kernel_dim});
      add(L + "linear_attn.dt_bias", {Hv});
      add(L + "linear_attn.A_log", {Hv});
      add(L + "linear_attn.norm.weight", {c.linear_value_head_dim});
      add(L + "linear_attn.out_proj.weight", {H, c.linear_value_dim()});
    }
    add(L + "mlp.gate.weight", {E, H});
    if (layout.experts == ExpertLayout::Fused) {
      add(L + "mlp.experts.gate_up_proj", {E, 2 * I, H});
      add(L + "mlp.experts.down_proj", {E, H, I});
    } else {
      for (int64_t e = 0; e < E; ++e) {
        add(per_expert(L, e, "gate_proj"), {I, H});
        add(per_expert(L, e, "up_proj"), {I, H});
        add(per_expert(L, e, "down_proj"), {H, I});
      }
    }
    add(L + "mlp.shared_expert.gate_proj.weight", {Is, H});
    add(L + "mlp.shared_expert.up_proj.weight", {Is, H});
    add(L + "mlp.shared_expert.down_proj.weight", {H, Is});
    add(L + "mlp.shared_expert_gate.weight", {1, H});
  }
  add(P + "norm.weight", {H});
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, H});
  return out;
}

std::vector<TensorSpec> expected_tensors(const Config& config, const Checkpoint& ckpt) {
  return expected_tensors(config, detect_layout(ckpt));
}

void validate_checkpoint(const Config& config, const Checkpoint& ckpt) {
  const CheckpointLayout layout = detect_layout(ckpt);
  check_no_contradiction(config, layout, ckpt);
  const HfQuant quant = HfQuant::of(ckpt);
  for (const TensorSpec& spec : expected_tensors(config, layout)) check_weight(ckpt, quant, spec.name, spec.shape);
}

namespace {

// A weight [.., K] as the GPU's FP8 load makes it from bf16: rounded to bf16, quantized with blocks
// [1, 128], dequantized.
void round_through_fp8(HostTensor& t) {
  const int64_t K = t.shape.back(), rows = t.numel() / K;
  for (float& v : t.data) v = round_bf16(v);
  const fp8::Quantized q = fp8::quantize(t.data, rows, K, 1, fp8::kGpuBlockK);
  t.data = fp8::dequantize(q.codes, q.scale_inv, rows, K, 1, fp8::kGpuBlockK);
}

HostWeights load_weights(const Config& c, const Checkpoint& ckpt, bool fp8) {
  validate_checkpoint(c, ckpt);
  const CheckpointLayout layout = detect_layout(ckpt);
  const HfQuant quant = HfQuant::of(ckpt);
  const int64_t E = c.num_experts, I = c.moe_intermediate_size;
  std::map<std::string, std::vector<int64_t>> shapes;
  for (TensorSpec& t : expected_tensors(c, layout)) shapes[t.name] = std::move(t.shape);
  auto get = [&](const std::string& name) {
    const std::vector<int64_t>& shape = shapes.at(name);
    const bool round = fp8 && is_quantized_weight(name) && check_weight(ckpt, quant, name, shape) != Storage::FP8;
    HostTensor t = load(ckpt, quant, name, shape);
    if (round) round_through_fp8(t);
    return t;
  };
  const std::string& P = layout.prefix;

  HostWeights w;
  w.embed_tokens = get(P + "embed_tokens.weight");
  w.final_norm = get(P + "norm.weight");
  w.lm_head = c.tie_word_embeddings ? w.embed_tokens : get("lm_head.weight");
  if (c.tie_word_embeddings && fp8) round_through_fp8(w.lm_head);  // the GPU quantizes its lm_head copy
  w.layers.resize(size_t(c.num_layers));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string L = layer_prefix(layout, i);
    LayerWeights& lw = w.layers[size_t(i)];
    lw.type = c.layer_types[size_t(i)];
    lw.input_layernorm = get(L + "input_layernorm.weight");
    lw.post_attention_layernorm = get(L + "post_attention_layernorm.weight");
    if (lw.type == LayerType::FullAttention) {
      const std::string A = L + "self_attn.";
      lw.attn = {get(A + "q_proj.weight"), get(A + "k_proj.weight"), get(A + "v_proj.weight"),
                 get(A + "o_proj.weight"), get(A + "q_norm.weight"), get(A + "k_norm.weight")};
    } else {
      const std::string A = L + "linear_attn.";
      lw.linear = {get(A + "in_proj_qkv.weight"), get(A + "in_proj_z.weight"), get(A + "in_proj_b.weight"),
                   get(A + "in_proj_a.weight"),   get(A + "conv1d.weight"),    get(A + "dt_bias"),
                   get(A + "A_log"),              get(A + "norm.weight"),      get(A + "out_proj.weight")};
    }
    MoeWeights& m = lw.moe;
    m.router = get(L + "mlp.gate.weight");
    if (layout.experts == ExpertLayout::Fused) {
      m.experts_gate_up = get(L + "mlp.experts.gate_up_proj");
      m.experts_down = get(L + "mlp.experts.down_proj");
    } else {
      // Stack per-expert weights: gate_up[e] = [gate (I rows) | up (I rows)], down[e] = down.
      const int64_t H = c.hidden_size;
      m.experts_gate_up = {{E, 2 * I, H}, std::vector<float>(size_t(E * 2 * I * H))};  // [E, 2I, H]
      m.experts_down = {{E, H, I}, std::vector<float>(size_t(E * H * I))};              // [E, H, I]
      auto into = [&](const std::string& name, float* dst) {
        const HostTensor t = get(name);
        std::copy(t.data.begin(), t.data.end(), dst);
      };
      for (int64_t e = 0; e < E; ++e) {
        float* gu = m.experts_gate_up.data.data() + e * 2 * I * H;
        into(per_expert(L, e, "gate_proj"), gu);
        into(per_expert(L, e, "up_proj"), gu + I * H);
        into(per_expert(L, e, "down_proj"), m.experts_down.data.data() + e * H * I);
      }
    }
    m.shared_gate = get(L + "mlp.shared_expert.gate_proj.weight");
    m.shared_up = get(L + "mlp.shared_expert.up_proj.weight");
    m.shared_down = get(L + "mlp.shared_expert.down_proj.weight");
    m.shared_expert_gate = get(L + "mlp.shared_expert_gate.weight");
  }
  return w;
}

}  // namespace

HostWeights load_host_weights(const Config& config, const Checkpoint& ckpt) { return load_weights(config, ckpt, false); }

HostWeights load_host_weights_fp8(const Config& config, const Checkpoint& ckpt) {
  return load_weights(config, ckpt, true);
}

}  // namespace q35::qwen35
