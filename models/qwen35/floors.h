#pragma once
// Work per token of a Qwen3.5 MoE model, from its Config and weight format alone, and the floors
// it implies on a device of measured bandwidth and FLOP rate (shared/perf.md derives the 35B-A3B
// figures by hand; this recomputes them for any config.json).
//
// Decode (batch 1) is bound by bytes: every weight matrix a token multiplies (k of E routed
// experts, shared expert, router, the mixers' projections, lm_head), the small vectors (norms,
// conv1d, gates), the DeltaNet state read and written once, and the KV cache rows attended.
// Prefill is bound by FLOPs (2 per multiply-add) or, for short prompts, by reading every weight
// the prompt touches once (with L tokens nearly every expert is hit).
//
// Storage as in the runtime (models/qwen35/gpu_weights.h): `group` = 0 keeps every weight bf16;
// > 0 is W4A16, where the projections, experts and lm_head take 4 bits per weight plus one bf16
// scale per `group` weights along K (0.5 + 2 / group bytes per parameter); kFp8Group is FP8, one
// byte per weight plus an fp32 scale per 128 along K (1 + 4 / 128); the router, the shared-expert
// gate vector, norms, conv1d and embeddings stay bf16 (A_log, dt_bias fp32).
#include <cstdint>
#include <string>
#include <vector>

#include "models/qwen35/config.h"

namespace q35::qwen35 {

// Tokens per chunk of the chunked delta rule (spec §2.5).
constexpr int64_t kGdnChunkTokens = 64;

// Matrices of one kind a decoded token multiplies, summed over the layers.
struct WeightPart {
  std::string name;    // "routed experts", "shared expert", "router", "GDN projections", ...
  int64_t params = 0;  // multiply-adds per token
  int64_t bytes = 0;   // in the storage format
};

class ModelWork {
 public:
  // `group` = 0: bf16 weights; > 0 the W4A16 group size (K need not be a multiple); kFp8Group: FP8.
  ModelWork(const Config& config, int group);

  const Config& config() const { return config_; }
  int group() const { return group_; }

  // Per decoded token, in this order: routed experts (k of E, every layer), shared expert (gate|up,
  // down, sigmoid gate vector), router, GDN projections (in_proj qkv|z|b|a, out_proj), full
  // attention projections (q|gate, k, v, o), lm_head.
  const std::vector<WeightPart>& decode_parts() const { return parts_; }
  int64_t active_params() const;  // sum over decode_parts()
  // Vectors read per decoded token: norms, q/k norms, conv1d weights, A_log, dt_bias, the gated
  // norm weight, one embedding row.
  int64_t vector_bytes() const;
  int64_t weight_bytes_per_token() const;  // decode_parts() bytes + vector_bytes()

  // Per-sequence state, all layers. The fp32 recurrent state and the last Kc-1 pre-conv inputs
  // (bf16) of every DeltaNet layer are each read once and written once per decoded token.
  int64_t gdn_state_bytes() const;   // fp32 [Hv, dk, dv] per DeltaNet layer
  int64_t conv_state_bytes() const;  // bf16 [Kc - 1, conv_dim] per DeltaNet layer
  int64_t kv_bytes_per_token() const;  // K and V rows of one token, every full-attention layer, bf16
  // Bytes one decode step moves at `context` tokens already in the cache: weights, state read +
  // written, the KV rows attended (context + the new one) read, the new row written.
  int64_t decode_bytes(int64_t context) const;

  // Every weight as stored (all experts, embedding table): what the model occupies on the GPU.
  int64_t model_weight_bytes() const;
  // Expected number of distinct experts per layer that L tokens route to (top-k of E, uniform
  // routing): E (1 - (1 - k/E)^L).
  double expected_experts(int64_t L) const;
  // Bytes one batched decode step of B sequences moves, each at `context` tokens already in its
  // cache: the weights once (the routed experts: the union the B tokens route to, expected_experts(B)
  // per layer under uniform routing, instead of k), B embedding rows, and per sequence its DeltaNet
  // state read + written and its KV rows read (context + 1) and written (1). B = 1: decode_bytes.
  double decode_batch_bytes(int64_t B, int64_t context) const;
  double decode_batch_floor_ms(int64_t B, int64_t context, double bandwidth) const;
  // Weights a prompt of L tokens must read at least once: everything but the experts the
  // prompt does not route to and the embedding rows it does not look up.
  double prefill_weight_bytes(int64_t L) const;

  // FLOPs of a prompt of L tokens (from an empty state): 2 x (active params - lm_head) per token,
  // lm_head once (the last token), causal attention 4 Hq D L(L+1)/2 per full-attention layer,
  // and the chunked delta rule (gdn_chunk_flops_per_token() per token).
  double projection_flops_per_token() const;  // 2 x (active params - lm_head)
  double lm_head_flops() const;               // 2 x lm_head params
  double attention_flops(int64_t L) const;    // QK^T and PV, causal, every full-attention layer
  // Chunked delta rule per token, every DeltaNet layer, at chunk C (dense C x C products):
  // per key head K K^T and Q K^T (4 C dk); per value head W = T (K exp g) (2 C dk), U = T V and
  // the intra-chunk output (4 C dv), W S, Q S and the state update (6 dk dv), the triangular
  // solve (C^2 / 3).
  double gdn_chunk_flops_per_token() const;
  double prefill_flops(int64_t L) const;

  // Floors in milliseconds. `bandwidth` = bytes read + written per second (a device copy),
  // `flops_per_s` = the tensor-core rate. A prefill floor with bandwidth > 0 is the larger of the
  // compute time and the time to read prefill_weight_bytes(L).
  double decode_floor_ms(int64_t context, double bandwidth) const;
  double prefill_compute_ms(int64_t L, double flops_per_s) const;
  double prefill_memory_ms(int64_t L, double bandwidth) const;
  double prefill_floor_ms(int64_t L, double flops_per_s, double bandwidth = 0) const;

 private:
  // Bytes of an [N, K] weight (times `count`) in the storage format; `quantized` false: bf16.
  int64_t matrix_bytes(int64_t N, int64_t K, bool quantized, int64_t count = 1) const;
  int64_t expert_bytes() const;  // one expert of one layer: gate|up [2I, H] and down [H, I]
  const WeightPart& part(const std::string& name) const;

  Config config_;
  int group_;
  std::vector<WeightPart> parts_;
};

}  // namespace q35::qwen35
