#include "models/qwen35/gpu/sampling.h"

#include <algorithm>
#include <string>

#include "autotune/tiles_dense.h"
#include "runtime/core/error.h"

namespace q35::qwen35::gpu {

TopkSamplePlan topk_sample_plan(int64_t vocab) {
  if (vocab < 1) fail("topk_sample: vocab {} is not positive", vocab);
  TopkSamplePlan p;
  p.vocab = vocab;
  // About 4k logits per slice (16 KiB of shared memory), at most 64 slices (the final block holds
  // 64 x 64 candidates in 32 KiB).
  p.blocks = int(std::clamp<int64_t>((vocab + 4095) / 4096, 1, 64));
  return p;
}

KernelSpec TopkSamplePlan::partial_spec() const {
  return {"topk_sample", "topk_partial",
          {{"VOCAB", std::to_string(vocab)}, {"BLOCKS", std::to_string(blocks)}, {"K_MAX", std::to_string(kTopkMax)},
           {"THREADS", std::to_string(threads)}}};
}

KernelSpec TopkSamplePlan::final_spec() const {
  return {"topk_sample", "topk_final",
          {{"BLOCKS", std::to_string(blocks)}, {"K_MAX", std::to_string(kTopkMax)}, {"THREADS", std::to_string(threads)}}};
}

bool topk_sample_serves(const SamplingParams& p) { return p.temperature > 0.f && p.top_k > 1 && p.top_k <= kTopkMax; }

void launch_topk_sample(const TopkSamplePlan& plan, const Function& partial, const Function& final_,
                        const Stream& stream, CUdeviceptr logits, CUdeviceptr out_id, CUdeviceptr rng,
                        CUdeviceptr workspace, const SamplingParams& params) {
  if (!topk_sample_serves(params))
    fail("topk_sample: needs temperature > 0 and 1 < top_k <= {}, got temperature {} top_k {}", kTopkMax,
         params.temperature, params.top_k);
  if (!(params.top_p > 0.f && params.top_p <= 1.f)) fail("topk_sample: top_p must be in (0, 1], got {}", params.top_p);
  const CUdeviceptr cand_v = workspace, cand_i = workspace + size_t(plan.blocks) * kTopkMax * 4;
  const int k = params.top_k;
  partial.launch({{unsigned(plan.blocks)}, {unsigned(plan.threads)}}, stream, logits, cand_v, cand_i, k);
  const float t = params.temperature, p = params.top_p;
  final_.launch({{1}, {unsigned(plan.threads)}}, stream, cand_v, cand_i, out_id, rng, t, k, p);
}

namespace {
KernelSpec batch_form(KernelSpec s) {
  s.kernel += "_batch";
  return s;
}
}  // namespace

KernelSpec TopkSamplePlan::partial_batch_spec() const { return batch_form(partial_spec()); }
KernelSpec TopkSamplePlan::final_batch_spec() const { return batch_form(final_spec()); }

BatchSamplePlan batch_sample_plan(int64_t vocab) {
  BatchSamplePlan p;
  p.topk = topk_sample_plan(vocab);
  p.threads = default_sample_tile(vocab).threads;  // sample_f32's block: the same partition, the same draws
  return p;
}

KernelSpec BatchSamplePlan::sample_spec() const {
  return {"sample", "sample_batch_f32",
          {{"V", std::to_string(topk.vocab)}, {"THREADS", std::to_string(threads)}, {"K_MAX", std::to_string(kTopkMax)}}};
}

void check_sampling(const SamplingParams& p) {
  if (!(p.temperature >= 0.f)) fail("sampling: temperature must be >= 0, got {}", p.temperature);
  if (p.top_k < 0) fail("sampling: top_k must be >= 0, got {}", p.top_k);
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) fail("sampling: top_p must be in (0, 1], got {}", p.top_p);
}

void launch_sample_batch(const BatchSamplePlan& plan, const Function& topk_partial, const Function& topk_final,
                         const Function& sample, const Stream& stream, CUdeviceptr logits, CUdeviceptr out_id,
                         CUdeviceptr rng, CUdeviceptr slots, const BatchSampleParams& params, CUdeviceptr workspace,
                         int B) {
  if (B < 1 || B > 65535) fail("sample_batch: B = {} rows is not in [1, 65535]", B);
  const CUdeviceptr cand_v = workspace, cand_i = workspace + size_t(B) * size_t(plan.topk.blocks) * kTopkMax * 4;
  topk_partial.launch({{unsigned(plan.topk.blocks), unsigned(B)}, {unsigned(plan.topk.threads)}}, stream, logits, cand_v,
                      cand_i, slots, params.temperature, params.top_k);
  topk_final.launch({{unsigned(B)}, {unsigned(plan.topk.threads)}}, stream, cand_v, cand_i, out_id, rng, slots,
                    params.temperature, params.top_k, params.top_p);
  sample.launch({{unsigned(B)}, {unsigned(plan.threads)}}, stream, logits, out_id, rng, slots, params.temperature,
                params.top_k, params.top_p);
}

}  // namespace q35::qwen35::gpu
