#pragma once
// The Qwen3.5 MoE weight map: which tensors a config implies (names, shapes), validation of a
// checkpoint against it, and loading into host fp32 for the CPU reference.
//
// Checkpoint names (P = "model.language_model." or "model." for text-only checkpoints,
// L = P + "layers.{i}."), see shared/spec §3. Experts come fused
// (L+"mlp.experts.gate_up_proj" [E, 2I, H], L+"mlp.experts.down_proj" [E, H, I]) or per expert
// (L+"mlp.experts.{e}.{gate,up,down}_proj.weight"); both load into the fused form below.
#include <cstdint>
#include <string>
#include <vector>

#include "models/qwen35/config.h"

namespace q35 {
class Checkpoint;
}

namespace q35::qwen35 {

// A dense fp32 host tensor, row-major.
struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
  int64_t numel() const;
};

struct FullAttentionWeights {
  HostTensor q_proj;  // [num_heads * head_dim * 2, H]  per head: rows [q (head_dim) | gate (head_dim)]
  HostTensor k_proj;  // [num_kv_heads * head_dim, H]
  HostTensor v_proj;  // [num_kv_heads * head_dim, H]
  HostTensor o_proj;  // [H, num_heads * head_dim]
  HostTensor q_norm;  // [head_dim]   zero-centred: scale is (1 + w)
  HostTensor k_norm;  // [head_dim]   zero-centred
};

struct LinearAttentionWeights {
  HostTensor in_proj_qkv;  // [2 * Hk * dk + Hv * dv, H]  rows [q | k | v], flat
  HostTensor in_proj_z;    // [Hv * dv, H]
  HostTensor in_proj_b;    // [Hv, H]
  HostTensor in_proj_a;    // [Hv, H]
  HostTensor conv1d;       // [conv_dim, 1, conv_kernel]
  HostTensor dt_bias;      // [Hv]
  HostTensor A_log;        // [Hv]
  HostTensor norm;         // [dv]  plain scale (not 1 + w), shared by all heads
  HostTensor out_proj;     // [H, Hv * dv]
};

struct MoeWeights {
  HostTensor router;              // [E, H]            mlp.gate.weight
  HostTensor experts_gate_up;     // [E, 2I, H]        rows [gate (I) | up (I)]
  HostTensor experts_down;        // [E, H, I]
  HostTensor shared_gate;         // [Is, H]
  HostTensor shared_up;           // [Is, H]
  HostTensor shared_down;         // [H, Is]
  HostTensor shared_expert_gate;  // [1, H]
};

struct LayerWeights {
  LayerType type = LayerType::LinearAttention;
  HostTensor input_layernorm;           // [H] zero-centred
  HostTensor post_attention_layernorm;  // [H] zero-centred
  FullAttentionWeights attn;            // filled iff type == FullAttention
  LinearAttentionWeights linear;        // filled iff type == LinearAttention
  MoeWeights moe;
};

struct HostWeights {
  HostTensor embed_tokens;  // [vocab, H]
  HostTensor final_norm;    // [H] zero-centred
  HostTensor lm_head;       // [vocab, H] (a copy of embed_tokens when tied)
  std::vector<LayerWeights> layers;
};

enum class ExpertLayout : uint8_t { Fused, PerExpert };

struct TensorSpec {
  std::string name;             // full checkpoint name
  std::vector<int64_t> shape;   // expected shape
};

// How a checkpoint names the language model: prefix "model.language_model." (multimodal
// Qwen3_5MoeForConditionalGeneration) or "model." (text-only Qwen3_5MoeForCausalLM), and the expert layout.
struct CheckpointLayout {
  std::string prefix;
  ExpertLayout experts = ExpertLayout::Fused;
};

// Finds the prefix (from embed_tokens) and the expert layout (from layer 0). Throws Error naming
// the tensor looked for when neither form is present.
CheckpointLayout detect_layout(const Checkpoint& ckpt);

// Every tensor the config implies, with its expected shape, under a given layout.
std::vector<TensorSpec> expected_tensors(const Config& config, const CheckpointLayout& layout);

// Every tensor the config implies, with its expected shape, for the layout and prefix found in
// `ckpt`. Throws Error naming the missing tensor when the layout or prefix cannot be determined.
std::vector<TensorSpec> expected_tensors(const Config& config, const Checkpoint& ckpt);

// Checks every expected tensor exists with the expected shape, as a float tensor or in a quantized
// form that models/qwen35/hf_quant.h reads (FP8, GPTQ, a `q35jit quantize` checkpoint), with its
// scales / zeros (error names tensor, expected and found shape/dtype, and the shard file), and that the
// checkpoint holds nothing the config contradicts (layers beyond num_layers, experts beyond
// num_experts, attention weights of the other layer type). Reads headers only, no tensor data.
void validate_checkpoint(const Config& config, const Checkpoint& ckpt);

// Loads everything as fp32 (bf16/f16/f32 on disk, or dequantized exactly from FP8 / GPTQ / q35jit
// INT4: models/qwen35/hf_quant.h). For small models and the CPU reference.
HostWeights load_host_weights(const Config& config, const Checkpoint& ckpt);

// The values the GPU holds with `--quant fp8` (models/qwen35/gpu_weights.h), as fp32: every
// projection, expert and lm_head (the tensors quantized.h is_quantized_weight names; a tied lm_head
// too) in FP8 with blocks [1, 128] (runtime/core/fp8_format.h): an FP8 checkpoint's FP8 tensors
// exactly, the others rounded to bf16 (the GPU's staging), quantized (fp8::quantize, bit-exact with
// the GPU's quantize_fp8) and dequantized; the rest as load_host_weights. The CPU reference of the
// FP8 GPU model (CpuModel runs them as any fp32 weights).
HostWeights load_host_weights_fp8(const Config& config, const Checkpoint& ckpt);

}  // namespace q35::qwen35
