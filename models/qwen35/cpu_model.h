#pragma once
// The whole Qwen3.5-MoE forward pass on the CPU in fp32, built from reference_ops.h.
// It is the oracle for the GPU forward and serves `--device cpu` for small models.
//
//   x = embed(tokens)                                        [T, H]
//   per layer:  x += Mixer(rmsnorm_in(x))                    GatedDeltaNet or gated attention
//               x += MoE(rmsnorm_post(x)) + shared expert
//   logits = lm_head(rmsnorm_final(x))                       [T or 1, vocab]
#include <cstdint>
#include <span>
#include <vector>

#include "models/qwen35/config.h"
#include "models/qwen35/weights.h"

namespace q35::qwen35 {

// How linear-attention layers run a prompt of T > 1 tokens: chunks of 64 (as HF prefill) or
// token by token. T == 1 always runs the recurrence. Both give the same numbers up to rounding.
enum class GdnMode { Recurrent, Chunked };

// The state of one sequence. Vectors are indexed by layer; a layer's entries of the other
// mixer kind are empty.
struct CpuState {
  int64_t pos = 0;          // tokens consumed so far
  int64_t max_context = 0;  // K/V cache rows
  std::vector<std::vector<float>> k_cache;     // full attention: [max_context, kv_heads, head_dim] (after norm + RoPE)
  std::vector<std::vector<float>> v_cache;     // full attention: [max_context, kv_heads, head_dim]
  std::vector<std::vector<float>> conv_state;  // linear: [conv_dim, conv_kernel - 1] last pre-conv inputs, oldest first
  std::vector<std::vector<float>> gdn_state;   // linear: [Hv, dk, dv] fp32 recurrent state
};

class CpuModel {
 public:
  CpuModel(Config config, HostWeights weights);  // throws Error on a weight of the wrong size
  const Config& config() const { return config_; }
  CpuState new_state(int64_t max_context) const;

  // Feeds `tokens` at positions state.pos .. and advances state.pos.
  // Returns logits [T, vocab] (all_logits) or [1, vocab] for the last token.
  // Throws Error when state.pos + T > max_context ("context overflow: ..."), when a token id is
  // outside [0, vocab) or when tokens is empty; the state is unchanged then.
  std::vector<float> forward(CpuState& state, std::span<const int32_t> tokens, bool all_logits,
                             GdnMode gdn_mode = GdnMode::Chunked) const;

 private:
  // Each returns the mixer / MoE output delta [T, H] for normalised input h [T, H].
  std::vector<float> full_attention(const FullAttentionWeights& w, std::vector<float>& k_cache,
                                    std::vector<float>& v_cache, std::span<const float> h,
                                    int64_t pos0, int64_t T) const;
  std::vector<float> linear_attention(const LinearAttentionWeights& w, std::vector<float>& conv_state,
                                      std::vector<float>& gdn_state, std::span<const float> h,
                                      int64_t T, GdnMode gdn_mode) const;
  std::vector<float> moe(const MoeWeights& w, std::span<const float> h, int64_t T) const;

  Config config_;
  HostWeights weights_;
};

}  // namespace q35::qwen35
