#pragma once
// Every JIT kernel instantiation a Qwen3.5 checkpoint needs, derived from config.json alone, with
// the default tile configs (autotune/). Compiled in parallel at start-up and by `q35jit compile`.
#include <cstdint>
#include <string>
#include <vector>

#include "models/qwen35/config.h"
#include "runtime/jit/kernel_spec.h"

namespace q35::qwen35 {

// `group` = 0 for bf16 weights, the W4A16 group size or kFp8Group (runtime/core/weight_format.h); `arch` = the target ("sm_90a", "sm_80":
// tiles that depend on shared memory follow it); `prefill_tokens` = the M the prefill GEMM tiles
// are chosen for. Deduplicated, in first-use order.
std::vector<q35::KernelSpec> required_kernels(const Config& cfg, int group, const std::string& arch = "sm_90a",
                                              int64_t prefill_tokens = 2048);

// Shared memory per block a kernel may use on `arch` (227 KiB on sm_90 / sm_100, else 163 KiB).
int64_t smem_limit_for(const std::string& arch);

}  // namespace q35::qwen35
