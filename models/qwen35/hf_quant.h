#pragma once
// Official quantized Hugging Face checkpoints, read directly: FP8 (Qwen3.5-*-FP8, Qwen3.6-*-FP8) and
// GPTQ-Int4 (Qwen3.5-*-GPTQ-Int4). Each logical weight of the model (a name from expected_tensors)
// is stored in one of these forms, found per tensor from the checkpoint (modules the
// quantization config excludes stay bf16):
//
//   Float   W                          F32 / F16 / BF16 [.., N, K]
//   FP8     W                          F8_E4M3 [.., N, K]
//           <module>.weight_scale_inv  F32 [.., ceil(N / bn), ceil(K / bk)]   (weight_block_size [bn, bk])
//           w[n, k] = fp8(W[n, k]) * scale_inv[n / bn, k / bk]                (runtime/core/fp8_format.h)
//   GPTQ    <module>.qweight  I32 [K / 8, N]    nibble j (bits 4j..4j+3) of row i holds k = 8i + j
//           <module>.qzeros   I32 [K / G, ceil(N / 8)]   nibble j of column c holds n = 8c + j
//           <module>.scales   F16 [K / G, N]
//           <module>.g_idx    I32 [K] (optional; must be k / G: desc_act false)
//           w[n, k] = (q[k, n] - z[k / G, n]) * scales[k / G, n]   with z = stored zero + 1 for
//           checkpoint_format "gptq" (AutoGPTQ v1, the default) and z = stored for "gptq_v2";
//           a symmetric 4-bit checkpoint must have z = 8 everywhere.
//   Q35Int4 W + ".qweight" / ".scales"   a checkpoint written by `q35jit quantize` (quantized.h)
//
// <module> is the weight's name without ".weight". The fp32 values read here are exact: fp8 and
// (q - z) have at most 4 significant bits, fp16 / bf16 scales at most 11, so every product fits fp32.
//
// GPTQ codes map onto our INT4 layout (runtime/core/int4_format.h) without requantizing: the stored
// nibble u = q_gptq is our u = q + 8 (both mean w = (u - 8) * scale), only the packing order and the
// transposition change. The scales are fp16; our GPU kernels read bf16 scales, and fp16 -> bf16
// (round to nearest even) is not exact in general: it changes each dequantized weight by at most
// 2^-8 of its magnitude (bf16 keeps 8 significant bits), and not at all when the fp16 scale's low
// 3 mantissa bits are zero. Files written by `q35jit quantize` keep GPTQ scales as F16 (exact).
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace q35 {
class Checkpoint;
}

namespace q35::qwen35 {

enum class QuantMethod : uint8_t { None, FP8, GPTQ };

// The quantization_config of a config.json (top level, or under text_config).
struct HfQuant {
  QuantMethod method = QuantMethod::None;
  int64_t fp8_block_n = 0, fp8_block_k = 0;  // FP8 weight_block_size
  int gptq_bits = 0;                         // GPTQ: 4
  int64_t gptq_group = 0;                    // GPTQ group_size (-1 in the file: K, per tensor)
  int gptq_zero_offset = 0;                  // 1 for checkpoint_format "gptq" (v1), 0 for "gptq_v2"
  std::string file;                          // config.json, for messages

  std::string describe() const;  // "fp8 e4m3, blocks 128x128", "gptq int4 g128 (v1 zeros)", "none"

  // Parses quantization_config. Absent: method None. Error naming the file and key for an unknown
  // quant_method, or any option that changes the math this runtime does not implement (fp8 fmt
  // other than e4m3, static activation scales, per-tensor weight scales, GPTQ bits != 4,
  // asymmetric, desc_act, Marlin packing, pack_dtype other than int32, per-module "dynamic"
  // overrides other than "-:" exclusions).
  static HfQuant from_config(const std::filesystem::path& config_json);
  // That of ckpt.dir() / "config.json" (None when the folder has no config.json).
  static HfQuant of(const Checkpoint& ckpt);
};

enum class Storage : uint8_t { Float, FP8, GPTQ, Q35Int4 };

// How `name` (a logical weight of expected shape `shape`) is stored in `ckpt`, after checking every
// tensor of that form against the shape and dtypes above (headers only). Error naming the tensor,
// what was expected and what was found, and the file, for a missing tensor, a wrong shape or dtype,
// missing or mis-shaped scales / zeros / g_idx, or a quantized tensor the config does not declare.
Storage check_weight(const Checkpoint& ckpt, const HfQuant& quant, const std::string& name,
                     const std::vector<int64_t>& shape);

// The logical weight as fp32 (dequantized exactly as above). `shape` as for check_weight; the data
// of zeros and g_idx is checked here (error naming the tensor, group and column).
std::vector<float> read_weight_f32(const Checkpoint& ckpt, const HfQuant& quant, const std::string& name,
                                   const std::vector<int64_t>& shape);
// Drops the mmap'ed pages of every tensor that stores `name` (after reading it).
void release_weight(const Checkpoint& ckpt, const std::string& name);

// A GPTQ weight in our INT4 layout: qweight u32 [N, K / 8] (int4_format.h), scales fp16 [N, K / G].
struct GptqInt4 {
  int64_t N = 0, K = 0, group = 0;
  std::vector<uint32_t> qweight;
  std::vector<uint16_t> scales_f16;
  std::vector<float> scales_f32() const;   // exact
  std::vector<uint16_t> scales_bf16() const;  // round to nearest even (the bound above)
};

// Repacks GPTQ arrays (as stored, row-major) into GptqInt4. Every zero must be 8 after adding
// `zero_offset`; `what` names the tensor in errors.
GptqInt4 gptq_repack(std::span<const int32_t> qweight, std::span<const int32_t> qzeros,
                     std::span<const uint16_t> scales, int64_t N, int64_t K, int64_t group, int zero_offset,
                     const std::string& what);
// The GPTQ weight `name` (Storage::GPTQ) of `ckpt` in our layout.
GptqInt4 read_gptq_int4(const Checkpoint& ckpt, const HfQuant& quant, const std::string& name,
                        const std::vector<int64_t>& shape);
// The group size of the GPTQ weight `name` (group_size, or K when it is -1).
int64_t gptq_group_of(const HfQuant& quant, const std::vector<int64_t>& shape);

}  // namespace q35::qwen35
