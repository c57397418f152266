#pragma once
// The tunable kernel instances of a Qwen3.5 checkpoint (autotune/tuner.h TuneOps), from config.json
// alone: every dense projection (GEMV for M <= 16, GEMM above), the lm_head, the MoE router, decode
// and prefill paths, full attention prefill and decode, and the Gated DeltaNet chunked prefill and
// recurrence. Each runs on deterministic random inputs of the real shapes:
//   - weights rotate over copies (about 256 MB in all) so each timed run streams them from DRAM;
//   - MoE inputs rotate too, so every run routes to other experts;
//   - attention decode attends over a context of kAttentionDecodeContext tokens;
//   - DeltaNet states start from zero at the checked run and evolve over the timed ones.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "autotune/tuner.h"
#include "models/qwen35/config.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"
#include "runtime/jit/kernel_set.h"

namespace q35::qwen35 {

constexpr int64_t kAttentionDecodeContext = 4096;

// What the ops run on (not needed to list ops, their spaces and defaults: `tune --show`).
struct TuneDevice {
  const Driver& driver;
  const Context& ctx;
  JitEngine& jit;
  KernelSet& kernels;
};

// `group`: 0 for bf16 weights, the W4A16 group size, or kFp8Group (runtime/core/weight_format.h). `device` may be null when only the
// families, signatures, candidates and defaults are wanted (setup() then fails).
std::vector<std::unique_ptr<TuneOp>> tune_ops(const Config& cfg, int group, const std::string& arch,
                                              const TuneDevice* device);

}  // namespace q35::qwen35
