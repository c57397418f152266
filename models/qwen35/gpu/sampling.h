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
};
TopkSamplePlan topk_sample_plan(int64_t vocab);

// True when `p` is a sampled (temperature > 0) top-k setting this path serves.
bool topk_sample_serves(const SamplingParams& p);

// logits fp32 [vocab] -> out_id int32 [1]; rng u64 [2] = {seed, step} (step advances);
// workspace: plan.workspace_bytes().
void launch_topk_sample(const TopkSamplePlan& plan, const Function& partial, const Function& final_,
                        const Stream& stream, CUdeviceptr logits, CUdeviceptr out_id, CUdeviceptr rng,
                        CUdeviceptr workspace, const SamplingParams& params);

}  // namespace q35::qwen35::gpu
