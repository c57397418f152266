#pragma once
// The weight format of the GPU kernels as one int, as the tile rules, kernel lists, tune-cache
// signatures and memory estimates take it (named `group` there, after W4A16's group size):
//   0             bf16
//   32, 64, 128   W4A16 with that group size along K (runtime/core/int4_format.h)
//   kFp8Group     FP8 e4m3 with fp32 scales per (row, 128-k block) (runtime/core/fp8_format.h)
// The kernels take the same code as their template parameter GROUP (kernel_templates/weights.cuh).
#include <string>

namespace q35 {

constexpr int kFp8Group = -1;

// "bf16", "w4a16 g128", "fp8".
inline std::string weight_format_name(int group) {
  if (group == 0) return "bf16";
  if (group == kFp8Group) return "fp8";
  return "w4a16 g" + std::to_string(group);
}

}  // namespace q35
