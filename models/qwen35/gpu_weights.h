#pragma once
// Qwen3.5 weights on the GPU, in the layouts the kernels read:
//   - projections that share an input are concatenated along N at load time:
//       full attention  qkv     = q_proj | k_proj | v_proj            [Hq*2D + 2*Hkv*D, H]
//       Gated DeltaNet  in_proj = in_proj_qkv | in_proj_z | in_proj_b | in_proj_a  [conv_dim + Hv*dv + 2*Hv, H]
//       shared expert   gate_up = gate_proj | up_proj                 [2*Is, H]
//   - bf16 as in the checkpoint, W4A16 (runtime/core/int4_format.h) or FP8 (runtime/core/fp8_format.h:
//     e4m3 codes with an fp32 scale per row and 128-k block) for every projection, the experts and
//     lm_head; norms, conv, router, embeddings and the GDN gate vectors stay bf16/fp32.
// Quantization runs on the GPU tensor by tensor while loading (a bf16 staging buffer as large as
// the largest tensor), so peak GPU memory is the model plus one tensor, and host memory holds at
// most one tensor (bf16 data is copied straight from the mmap'ed shard). FP8: the FP8 tensors of an
// FP8 checkpoint keep their codes byte for byte and their block scales (repeated over the rows of
// their blocks, fp8::row_scales: exact); its other tensors, and every tensor of a bf16 / GPTQ
// checkpoint, are quantized like bf16 weights (blocks [1, 128], kernel_templates/quantize_fp8.cuh).
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "models/qwen35/config.h"
#include "runtime/cuda/driver.h"

namespace q35 {
class Checkpoint;
}

namespace q35::qwen35 {

enum class WeightFormat : uint8_t { BF16, W4A16, FP8 };

// A weight matrix [N, K], or a stack of `experts` of them [E, N, K].
struct GpuMatrix {
  WeightFormat format = WeightFormat::BF16;
  int64_t experts = 0;  // 0: a single matrix
  int64_t N = 0, K = 0;
  int group = 0;         // the kernels' weight-format code (runtime/core/weight_format.h): 0 bf16,
                         // the W4A16 group size along K, kFp8Group
  DeviceBuffer w;        // BF16:  bf16 [E?, N, K]
  DeviceBuffer qweight;  // W4A16: u32  [E?, N, K / 8]
  DeviceBuffer codes;    // FP8:   uint8 e4m3 [E?, N, K]
  DeviceBuffer scales;   // W4A16: bf16 [E?, N, K / group]; FP8: fp32 [E?, N, ceil(K / 128)]
  size_t bytes() const { return w.size() + qweight.size() + codes.size() + scales.size(); }
  CUdeviceptr data() const { return format == WeightFormat::BF16 ? w.ptr() : format == WeightFormat::W4A16 ? qweight.ptr() : codes.ptr(); }
  CUdeviceptr scale_data() const { return format == WeightFormat::BF16 ? CUdeviceptr(0) : scales.ptr(); }
};

struct GpuLayer {
  LayerType type = LayerType::LinearAttention;
  DeviceBuffer input_norm;  // bf16 [H] zero-centred offsets
  DeviceBuffer post_norm;   // bf16 [H]
  // full attention
  GpuMatrix qkv;           // [Hq*2D + 2*Hkv*D, H]  rows: q|gate per head, then k, then v
  GpuMatrix o_proj;        // [H, Hq*D]
  DeviceBuffer q_norm;     // bf16 [D]
  DeviceBuffer k_norm;     // bf16 [D]
  // Gated DeltaNet
  GpuMatrix in_proj;       // [conv_dim + Hv*dv + 2*Hv, H]  rows: q|k|v (conv), z, b, a
  DeviceBuffer conv1d;     // bf16 [conv_dim, Kc]
  DeviceBuffer A_log;      // fp32 [Hv]
  DeviceBuffer dt_bias;    // fp32 [Hv]
  DeviceBuffer gdn_norm;   // bf16 [dv] plain weight
  GpuMatrix out_proj;      // [H, Hv*dv]
  // MoE
  DeviceBuffer router;     // bf16 [E, H]
  GpuMatrix experts_gate_up;  // [E, 2I, H]  rows: gate, up
  GpuMatrix experts_down;     // [E, H, I]
  GpuMatrix shared_gate_up;   // [2Is, H]    rows: gate, up
  GpuMatrix shared_down;      // [H, Is]
  DeviceBuffer shared_expert_gate;  // bf16 [H]
};

struct GpuWeights {
  DeviceBuffer embed;       // bf16 [vocab, H]
  DeviceBuffer final_norm;  // bf16 [H]
  GpuMatrix lm_head;        // [vocab, H]
  std::vector<GpuLayer> layers;
  size_t bytes() const;
};

// Quantizes `rows` bf16 rows of length K at `src` into the W4A16 layout (group > 0) at `qweight` /
// `scales`, or the FP8 one (group kFp8Group: codes at `qweight`) (row offsets already applied by the
// caller). Provided by the runner (a JIT kernel).
using QuantizeFn = std::function<void(CUdeviceptr src, int64_t rows, int64_t K, int group, CUdeviceptr qweight,
                                      CUdeviceptr scales)>;

struct UploadOptions {
  WeightFormat format = WeightFormat::W4A16;
  int group = 128;            // W4A16 group size
  QuantizeFn quantize;        // required for W4A16 and FP8 from a bf16 checkpoint
  bool prequantized = false;  // the checkpoint holds <name>.qweight / .scales (models/qwen35/quantized.h)
  // Per tensor type: relative Frobenius error of the quantization (W4A16, FP8, when set).
  std::function<void(const std::string& kind, double rel_error)> report_error;
};

// Validates nothing itself (call validate_checkpoint first); reads every tensor once.
GpuWeights upload_weights(const Driver& driver, const Stream& stream, const Config& config, const Checkpoint& ckpt,
                          const UploadOptions& options);

// Fills `count` values at `dst` on the GPU: bf16 N(mean, scale^2), or fp32 U(lo, hi).
struct RandomFill {
  std::function<void(CUdeviceptr dst, size_t count, uint64_t seed, float mean, float scale)> normal_bf16;
  std::function<void(CUdeviceptr dst, size_t count, uint64_t seed, float lo, float hi)> uniform_f32;
};

// Random weights of the config's shapes (synthetic models): projections N(0, 0.02^2) (W4A16, FP8:
// quantized on the GPU like a checkpoint), norm offsets N(0, 0.05^2), the DeltaNet norm around 1,
// A_log in [0, 2.7], dt_bias in [-1, 1], embeddings N(0, 1).
GpuWeights random_weights(const Driver& driver, const Stream& stream, const Config& config,
                          const UploadOptions& options, const RandomFill& fill, uint64_t seed);

}  // namespace q35::qwen35
