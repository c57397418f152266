#pragma once
// The whole Qwen3.5-MoE forward pass on the CPU in fp32, built from reference_ops.h.
// It is the oracle for the GPU forward and serves `--device cpu` for small models.
// One forward call runs a batch of sequences: each brings its own state and a run of consecutive
// tokens (a prompt chunk, or one token of a decode step). Row-wise work (norms, projections, the
// MoE over every token of the batch together, lm_head) runs over all rows at once; what belongs to
// a sequence (RoPE at its positions, attention over its own K/V rows, its conv and DeltaNet state)
// runs per sequence. Each row's numbers do not depend on the other rows of the batch.
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

  // One decode step of B sequences: tokens[b] is fed to *states[b] at its position, which advances
  // by one. Returns logits [B, vocab]; row b equals what forward(*states[b], {tokens[b]}) gives.
  // Throws Error (every state unchanged) when B == 0, the sizes differ, a state appears twice, a
  // sequence is full or an id is outside [0, vocab).
  std::vector<float> forward_batch(std::span<CpuState* const> states, std::span<const int32_t> tokens) const;

 private:
  // A sequence's part of a forward call: rows [row0, row0 + T) of the call's tokens, fed at
  // state->pos .. state->pos + T - 1.
  struct Seq {
    CpuState* state;
    int64_t row0, T;
  };
  // Runs `tokens` (every sequence's rows) through all layers, advances each state, and returns the
  // final residual stream x [rows, H].
  std::vector<float> run_layers(std::span<const Seq> seqs, std::span<const int32_t> tokens, GdnMode gdn_mode) const;
  // Each returns the mixer / MoE output delta [rows, H] for normalised input h [rows, H]; `layer`
  // picks the layer's part of each sequence's state.
  std::vector<float> full_attention(const FullAttentionWeights& w, int64_t layer, std::span<const Seq> seqs,
                                    std::span<const float> h, int64_t rows) const;
  std::vector<float> linear_attention(const LinearAttentionWeights& w, int64_t layer, std::span<const Seq> seqs,
                                      std::span<const float> h, int64_t rows, GdnMode gdn_mode) const;
  std::vector<float> moe(const MoeWeights& w, std::span<const float> h, int64_t T) const;

  Config config_;
  HostWeights weights_;
};

}  // namespace q35::qwen35
