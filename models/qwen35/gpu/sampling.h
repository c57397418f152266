#pragma once
// Host side of kernel_templates/topk_sample.cuh: top-k sampling in two launches for
// 1 < top_k <= kTopkMax (the generation_config default of Qwen is top_k 20). Greedy goes through
// argmax and other settings through sample_f32 (models/qwen35/gpu/dense.h).
#include <cuda.h>

#include <cstdint>

#include "runtime/core/sampler.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/kernel_spec.h"

namespace q35::qwen35::gpu {

constexpr int kTopkMax = 64;

struct TopkSamplePlan {
  int64_t vocab = 0;
  int blocks = 0;    // slices of the vocabulary in the first launch
  int threads = 256;
  KernelSpec partial_spec() const;
  KernelSpec final_spec() const;
  size_t workspace_bytes() const { return size_t(blocks) * kTopkMax * 8; }  // cand_v fp32 | cand_i int32
  // Batched forms (kernel_templates/topk_sample.cuh *_batch): workspace_bytes() per row.
  KernelSpec partial_batch_spec() const;
  KernelSpec final_batch_spec() const;
};
TopkSamplePlan topk_sample_plan(int64_t vocab);

// True when `p` is a sampled (temperature > 0) top-k setting this path serves.
bool topk_sample_serves(const SamplingParams& p);

// logits fp32 [vocab] -> out_id int32 [1]; rng u64 [2] = {seed, step} (step advances);
// workspace: plan.workspace_bytes().
void launch_topk_sample(const TopkSamplePlan& plan, const Function& partial, const Function& final_,
                        const Stream& stream, CUdeviceptr logits, CUdeviceptr out_id, CUdeviceptr rng,
                        CUdeviceptr workspace, const SamplingParams& params);

// Sampling of a batched decode step: one row of logits per sequence, each with its own parameters
// and its slot's rng, in three launches that each take the rows of one kind (the choice
// topk_sample_serves makes for one sequence, made per row on the device): topk_partial_batch +
// topk_final_batch for the top-k rows, sample_batch_f32 for the greedy rows (argmax; the rng is not
// advanced, as argmax_f32) and the rest (radix selection). Each row draws what the single-sequence
// kernels draw for its logits, parameters and rng.
struct BatchSamplePlan {
  TopkSamplePlan topk;
  int threads = 1024;  // sample_batch_f32 block
  KernelSpec sample_spec() const;  // sample_batch_f32
  size_t workspace_bytes(int B) const { return size_t(B) * topk.workspace_bytes(); }
};
BatchSamplePlan batch_sample_plan(int64_t vocab);

// Per-row parameters on the device: temperature fp32 [B], top_k int32 [B], top_p fp32 [B].
struct BatchSampleParams {
  CUdeviceptr temperature = 0, top_k = 0, top_p = 0;
};
// logits fp32 [B, vocab] -> out_id int32 [B]; rng u64 [slots, 2] ({seed, step} per slot, a drawn
// row's step advances); slots int32 [B] (< 0: padding, skipped); workspace: plan.workspace_bytes(B).
void launch_sample_batch(const BatchSamplePlan& plan, const Function& topk_partial, const Function& topk_final,
                         const Function& sample, const Stream& stream, CUdeviceptr logits, CUdeviceptr out_id,
                         CUdeviceptr rng, CUdeviceptr slots, const BatchSampleParams& params, CUdeviceptr workspace,
                         int B);
// The host-side check of one row's parameters (the kernels take any row as given): error naming
// the field when temperature < 0, top_k < 0 or top_p outside (0, 1].
void check_sampling(const SamplingParams& p);

}  // namespace q35::qwen35::gpu
