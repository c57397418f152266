#pragma once
// Every JIT kernel instantiation a Qwen3.5 checkpoint needs, derived from config.json alone, with
// the default tile configs (autotune/). Compiled in parallel at start-up and by `q35jit compile`.
#include <cstdint>
#include <vector>

#include "models/qwen35/config.h"
#include "runtime/jit/kernel_spec.h"

namespace q35::qwen35 {

// `group` = 0 for bf16 weights, else the W4A16 group size; `prefill_tokens` = the M the prefill
// GEMM tiles are chosen for. Deduplicated, in first-use order.
std::vector<q35::KernelSpec> required_kernels(const Config& cfg, int group, int64_t prefill_tokens = 2048);

}  // namespace q35::qwen35
