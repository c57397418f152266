#include "models/qwen35/kernels.h"

#include <algorithm>
#include <cstdlib>

#include "autotune/tile_config.h"
#include "autotune/tiles_wgmma.h"
#include "models/qwen35/gpu/attention.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/gpu/gdn.h"
#include "models/qwen35/gpu/moe.h"
#include "models/qwen35/gpu/sampling.h"

namespace q35::qwen35 {

int64_t smem_limit_for(const std::string& arch) {
  const int sm = arch.rfind("sm_", 0) == 0 ? std::atoi(arch.c_str() + 3) : 0;
  return sm == 90 || sm == 100 ? q35::kAttentionSmemLimitSm90 : q35::kAttentionSmemLimitSm80;
}

std::vector<q35::KernelSpec> required_kernels(const Config& cfg, int group, const std::string& arch,
                                              int64_t prefill_tokens) {
  std::vector<q35::KernelSpec> specs;
  auto add = [&](const std::vector<q35::KernelSpec>& more) {
    for (const q35::KernelSpec& s : more)
      if (std::find(specs.begin(), specs.end(), s) == specs.end()) specs.push_back(s);
  };
  const int64_t H = cfg.hidden_size;
  // The embedding gather; every norm adds the previous sub-layer's output (the embeddings for the
  // first) into the fp32 residual stream first.
  add({embedding_spec(H, default_embedding_tile(H)), rmsnorm_spec(H, true, default_rmsnorm_tile(H), true)});
  const bool wgmma = arch_has_wgmma(arch);
  add(gpu::dense_kernels(cfg, {group, 1, prefill_tokens, wgmma}));
  add(gpu::attention_kernels(cfg, smem_limit_for(arch), wgmma));
  add(gpu::gdn_kernels(cfg, arch));
  add(gpu::moe_kernels(cfg, group, wgmma, prefill_tokens));
  if (wgmma && prefill_tokens >= kMoeWgmmaMinTokens) {
    // Shorter prompts' defaults too: the swapped wgmma tiles (a few tokens per expert) and the
    // mma.sync grouped GEMMs (up to kMoeWgmmaMinTokens), and the swapped dense GEMMs (<= 128 rows).
    add(gpu::moe_kernels(cfg, group, true, kDecodeStepMaxRows + 1));
    add(gpu::moe_kernels(cfg, group, true, kMoeWgmmaMinTokens - 1));
    add(gpu::dense_kernels(cfg, {group, 1, kGemmSwapMaxM, wgmma}));
  }
  const gpu::TopkSamplePlan topk = gpu::topk_sample_plan(cfg.vocab_size);
  add({topk.partial_spec(), topk.final_spec()});
  // The batched decode step's: attention, DeltaNet, sampling and bookkeeping.
  add(gpu::attention_batch_kernels(cfg, smem_limit_for(arch)));
  add(gpu::gdn_batch_kernels(cfg));
  const gpu::BatchSamplePlan batch = gpu::batch_sample_plan(cfg.vocab_size);
  add({batch.topk.partial_batch_spec(), batch.topk.final_batch_spec(), batch.sample_spec(),
       q35::KernelSpec{"step", "step_advance_batch", {}}});
  return specs;
}

}  // namespace q35::qwen35
