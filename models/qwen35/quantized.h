#pragma once
// Quantized checkpoints written by `q35jit quantize` and loaded directly by `run`/`eval`:
// the Hugging Face folder layout with one model.safetensors in which every projection weight W
// (the tensors is_quantized_weight() names) is replaced by
//   <name>.qweight  U32  [.., N, K / 8]     (runtime/core/int4_format.h)
//   <name>.scales   BF16 [.., N, K / G]      (F16 for GPTQ experts, whose fp16 scales are kept exactly)
// and every other tensor the model uses is copied as it was; config.json gets
//   "q35jit_quantization": {"format": "w4a16", "version": 1, "group_size": G}.
// Quantization is row-wise, so quantizing the checkpoint's tensors one by one equals quantizing the
// fused GPU matrices they are concatenated into.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include "models/qwen35/config.h"

namespace q35 {
class Checkpoint;
}

namespace q35::qwen35 {

constexpr int kQuantFormatVersion = 1;

struct QuantNote {
  std::string format;  // "w4a16"
  int version = 0;
  int group_size = 0;
};

// The "q35jit_quantization" entry of a config.json, if any. A note of another format or version is
// an Error naming the file and saying how to fix it.
std::optional<QuantNote> read_quant_note(const std::filesystem::path& config_json);

// The checkpoint tensors stored as W4A16: every *_proj weight (attention, DeltaNet, experts, shared
// expert) and lm_head. Norms, conv, router, gates and embeddings stay as they are.
bool is_quantized_weight(const std::string& name);

// The largest of 128 / 64 / 32 that divides K of every quantized weight of this config.
int default_group_size(const Config& config);
// Error naming the first weight whose K the group size does not divide.
void check_group_size(const Config& config, int group);
// Error naming the first quantized weight whose K is not a multiple of 64 (the FP8 kernels' K step,
// `--quant fp8`).
void check_fp8_shapes(const Config& config);

// Checks a quantized checkpoint: every expected tensor present, quantized ones as .qweight/.scales
// of the right dtypes and shapes for `group`.
void validate_quantized_checkpoint(const Config& config, const Checkpoint& ckpt, int group);

struct QuantizeReport {
  int64_t tensors = 0;  // tensors written
  uint64_t bytes_in = 0, bytes_out = 0;
  std::map<std::string, double> rel_error;  // per weight kind: relative Frobenius error
};

// Writes the quantized checkpoint of `src` into `dst` (created; must not hold a model.safetensors).
// `src` may be bf16 / fp16 / fp32, FP8 or GPTQ-Int4 (models/qwen35/hf_quant.h): FP8 weights are
// dequantized exactly, rounded to bf16 and quantized like bf16 ones (as the GPU does on load); GPTQ weights keep their codes and fp16 scales
// (exact; `group` must be their group size); other dequantized tensors are written as fp32.
// CPU, on `threads` threads; bit-exact with the GPU quantizer. `progress(done, total)` per tensor.
QuantizeReport quantize_checkpoint(const std::filesystem::path& src, const std::filesystem::path& dst, int group,
                                   int threads, const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace q35::qwen35
