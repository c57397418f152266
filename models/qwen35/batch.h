#pragma once
// Host-side rules of the GPU runner's sequence slots and batched decode step (no GPU needed, so the
// CPU tests check them):
//   slots    GpuModel holds max_batch sequence slots, fixed at construction. Slot s has its own K/V
//            rows of every full-attention layer (max_context rows each), DeltaNet conv ring and
//            fp32 recurrent state per DeltaNet layer, position and sampler rng. Each per-layer state
//            is one buffer of max_batch equal parts (slot s at s * part bytes), so the batched
//            kernels index it by slot. slot_state_bytes() is one slot; the model's state is
//            max_batch times that (models/qwen35/memory.h adds it to the memory need).
//   buckets  the batched step is captured as one CUDA graph per bucket: 1, 2, 4, ... (powers of
//            two below max_batch) and max_batch itself. A step of n sequences replays the smallest
//            bucket >= n; the rows past n are padding (slot index -1: they read token 0, write no
//            state, sample nothing), so a graph does not depend on which slots are active (the
//            slot of each row is an int32 array the kernels read). A step runs at most kMaxStepRows
//            rows (the decode kernels' limit): more sequences run as consecutive steps of at most
//            that many rows, and since every row's arithmetic is the same in any step of 1..64 rows,
//            the split changes no result.
#include <cstdint>
#include <utility>
#include <vector>

#include "models/qwen35/config.h"

namespace q35::qwen35 {

// serve --max-batch's upper bound, and the GPU runner's.
constexpr int kMaxBatch = 1024;
// The most rows one batched step (one graph replay) runs: the decode kernels' limit
// (autotune/tiles_dense.h kDecodeStepMaxRows; gpu_model.cpp checks they agree).
constexpr int kMaxStepRows = 64;

// One slot's device state: K and V rows (bf16, max_context rows per full-attention layer), DeltaNet
// conv ring (bf16 [Kc, conv_dim]) and fp32 recurrent state [Hv, dv, dk] per DeltaNet layer.
int64_t slot_state_bytes(const Config& config, int64_t max_context);

// The graph buckets for max_batch slots, ascending: powers of two below min(max_batch, kMaxStepRows),
// then that bound. Error naming --max-batch outside [1, kMaxBatch].
std::vector<int> decode_buckets(int max_batch);
// The bucket a step of n rows replays: the smallest >= n. Error when n is not in [1, max_batch], or
// above kMaxStepRows (the caller splits larger batches: step_groups).
int decode_bucket(int n, int max_batch);
// How a batch of n sequences splits into steps: consecutive groups of at most kMaxStepRows rows, as
// {first, count} pairs. Error when n is not in [1, max_batch].
std::vector<std::pair<int, int>> step_groups(int n, int max_batch);

}  // namespace q35::qwen35
