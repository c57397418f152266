#pragma once
// Every JIT kernel instantiation a Qwen3.5 checkpoint needs, derived from config.json alone, with
// the default tile configs (autotune/tile_config.h). Compiled in parallel at start-up. Grows as
// kernel families are added.
#include <vector>

#include "models/qwen35/config.h"
#include "runtime/jit/kernel_spec.h"

namespace q35::qwen35 {

// Deduplicated, in first-use order. `tokens_per_call` = M of the decode GEMVs (1 for batch-1 decode).
std::vector<q35::KernelSpec> required_kernels(const Config& cfg, int tokens_per_call = 1);

}  // namespace q35::qwen35
