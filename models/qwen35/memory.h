#pragma once
// GPU memory a model needs, from its Config and weight format alone, so that run / eval / bench /
// tune can stop BEFORE loading when the GPU is too small (one line saying what is needed and what
// the GPU has) instead of failing with an out-of-memory error half-way through the upload.
//
// weights  every weight as stored (floors.h ModelWork::model_weight_bytes: W4A16 = 4 bits + one
//          bf16 scale per group, FP8 = 8 bits + one fp32 scale per 128, for every projection,
//          expert and lm_head; bf16 for the rest)
// staging  the bf16 staging buffer of on-load quantization: the largest tensor (0 when the
//          checkpoint is already in the runtime's format, or for bf16 weights)
// state    per sequence slot (models/qwen35/batch.h slot_state_bytes): K/V cache rows of every
//          full-attention layer for max_context tokens, the DeltaNet fp32 recurrent and bf16 conv
//          states; times max_batch slots
// batch    the batched decode step's own buffers for max_batch rows: fp32 logits [max_batch, vocab],
//          the top-k sampling candidates, the attention partials (bounded by the widest bucket)
// scratch  activations of one prefill chunk (max_chunk tokens): residual, norms, projections,
//          attention / DeltaNet outputs, the MoE's gathered rows and intermediates, fp32 logits
// reserve  a fixed 512 MiB for kernel modules, CUDA graphs and allocator slack
// The estimate counts one GPU holding the whole model (no tensor or expert parallelism).
#include <cstdint>
#include <string>

#include "models/qwen35/config.h"

namespace q35::qwen35 {

struct MemoryNeed {
  int64_t weights = 0, staging = 0, state = 0, scratch = 0, batch = 0, reserve = 0;
  int max_batch = 1;  // the slots `state` counts
  int64_t total() const { return weights + staging + state + scratch + batch + reserve; }
};

// `group` = 0: bf16 weights; > 0 the W4A16 group size; kFp8Group FP8 (runtime/core/weight_format.h).
// `quantize_on_load`: a bf16 staging buffer.
// max_batch: sequence slots (each max_context tokens).
MemoryNeed gpu_memory_need(const Config& config, int group, int64_t max_context, int64_t max_chunk,
                           bool quantize_on_load, int max_batch = 1);

// Error (one line) when `need` does not fit in `free_bytes`: what the model needs (with the weight
// part) and what the GPU has free of its total. `what` names the model ("Qwen3.5 at W4A16 g128").
void check_fits(const MemoryNeed& need, size_t free_bytes, size_t total_bytes, const std::string& device,
                const std::string& what);

}  // namespace q35::qwen35
