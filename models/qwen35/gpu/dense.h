#pragma once
// Host side of the dense-projection kernels: y[M, N] = x[M, K] . W[N, K]^T for the model's
// projections (bf16, W4A16 or FP8 weights; `group` as in runtime/core/weight_format.h), INT4 and FP8
// quantization on the GPU, and the lm_head's token selection (argmax, sampling).
//
// A *plan* is one kernel instantiation plus its launch geometry: plan.spec() is what the JIT
// compiles, launch(plan, function, stream, buffers...) runs it. Buffers are device pointers
// (CUdeviceptr), row-major, 16-byte aligned; shapes at every launch function.
//
// Decode (M = 1..16 tokens): gemv_bf16 (bf16 weights), gemv_w4a16 (W4A16) or gemv_fp8 (FP8).
// Prefill (large M): gemm_bf16; W4A16 weights are first dequantized into a reused bf16 scratch
// [N, K] (dequantize_w4), then the same gemm_bf16 runs (kernels.md §4); FP8 weights are dequantized
// inside gemm_bf16's main loop (GROUP kFp8Group). On sm_90a: gemm_wgmma (warpgroup MMA), W4A16 and
// FP8 weights dequantized inside its main loop below kWgmmaDequantFirstM rows, first (dequantize_w4,
// dequantize_fp8) above.
// lm_head: gemv with fp32 logits [vocab] for the last position, then argmax (greedy) or sample;
// eval: gemm_bf16 with fp32 output for every position.
#include <cuda.h>

#include <cstdint>
#include <string>
#include <vector>

#include "autotune/tile_config.h"
#include "autotune/tiles_dense.h"
#include "models/qwen35/config.h"
#include "runtime/core/sampler.h"
#include "runtime/core/weight_format.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/kernel_spec.h"

namespace q35::qwen35::gpu {

// The dense projections of the model, fused where they share an input.
enum class DenseProj {
  AttnQkv,  // q (with its output gate) | k | v: [Hq*2D + 2*Hkv*D, H] (Hq*D without the gate)
  AttnOut,  // o_proj [H, Hq*D]
  GdnIn,    // in_proj qkv | z | b | a: [conv_dim + Hv*dv + 2*Hv, H]
  GdnOut,   // out_proj [H, Hv*dv]
  LmHead,   // [vocab, H]
};
struct DenseShape {
  DenseProj proj;
  std::string name;
  int64_t n = 0, k = 0;  // W [n, k]
};
// The projections the model has (attention ones only with full-attention layers, GDN ones only
// with linear-attention layers), in the order above.
std::vector<DenseShape> dense_shapes(const Config& cfg);

// ---- plans ----

// gemm_bf16 (or, with a wgmma tile on sm_90a, gemm_wgmma): x [M, k] bf16, W [n, k] bf16 -> y [M, n]
// bf16 (fp32 if out_f32). group > 0 (wgmma tiles only): W is W4A16 qweight u32 [n, k/8] with bf16
// scales [n, k/group], dequantized inside the GEMM's main loop (the mma.sync path dequantizes first).
// group kFp8Group (both kinds): W is FP8 codes uint8 [n, k] with fp32 scales [n, ceil(k/128)].
struct GemmPlan {
  int64_t n = 0, k = 0;
  GemmTile tile;
  bool out_f32 = false;
  int group = 0;
  KernelSpec spec() const { return gemm_bf16_spec(n, k, tile, out_f32, group); }
};
// W4A16 prefill GEMMs on gemm_wgmma of at least this many rows dequantize the weights first and run
// the bf16 GEMM (faster at large M, H200: in_proj at M = 4096 470 us in the loop vs ~415 us); fewer
// rows dequantize inside the GEMM's main loop (no extra pass over the weights).
constexpr int64_t kWgmmaDequantFirstM = 1024;
// The weight group a wgmma GEMM of m rows over W4A16 or FP8 weights [n, k] of `group` runs with (0:
// dequantized first, also whenever k is not a whole number of the kernel's 64-k steps).
inline int wgmma_gemm_group(int group, int64_t m, int64_t k) {
  return m < kWgmmaDequantFirstM && k % 64 == 0 ? group : 0;
}
// The weight group the prefill GEMM of weights of `group` runs with on the mma.sync kernel: FP8 is
// read in its loop, W4A16 dequantized first (0).
inline int mma_gemm_group(int group) { return group == kFp8Group ? group : 0; }

// m = the M the tile is chosen for (any M runs); wgmma: the Hopper kernel (then `group` is kept,
// else the plan is for bf16 weights, or FP8 ones).
GemmPlan gemm_plan(int64_t n, int64_t k, int64_t m, bool out_f32 = false, bool wgmma = false, int group = 0);

// gemv_bf16: W [n, k] bf16, x [T, k] bf16 -> y [T, n] bf16 (fp32 if out_f32); T <= 16 per tile row.
struct GemvBf16Plan {
  int64_t n = 0, k = 0;
  GemvTile tile;
  bool out_f32 = false;
  KernelSpec spec() const;
};
GemvBf16Plan gemv_bf16_plan(int64_t n, int64_t k, int m, bool out_f32 = false);

// gemv_w4a16: qweight u32 [n, k/8], scales bf16 [n, k/group], x [T, k] bf16 -> y [T, n] bf16 (fp32 if out_f32);
// group kFp8Group: gemv_fp8 (the same tile and body): codes uint8 [n, k], scales fp32 [n, ceil(k/128)].
// residual: gemv_w4a16_residual / gemv_fp8_residual (the output goes into the residual stream, see ResidualNorm).
// gated_dv > 0 (W4A16 only): gemv_w4a16_gated, x the gated RMSNorm over value heads of gated_dv (GatedNormInput).
struct W4GemvPlan {
  int64_t n = 0, k = 0, group = 0;
  W4GemvTile tile;
  bool out_f32 = false;
  bool residual = false;
  int64_t gated_dv = 0;
  KernelSpec spec() const {
    if (gated_dv > 0) return gemv_w4a16_gated_spec(n, k, group, tile, gated_dv);  // W4A16 only (its rule)
    if (group == kFp8Group) return residual ? gemv_fp8_residual_spec(n, k, tile) : gemv_fp8_spec(n, k, tile, out_f32);
    return residual ? gemv_w4a16_residual_spec(n, k, group, tile) : gemv_w4a16_spec(n, k, group, tile, out_f32);
  }
};
// The DeltaNet out_proj's input as gemv_w4a16_gated takes it (the gated RMSNorm, gated_rmsnorm.cuh,
// applied per block): o fp32 [T, k] the recurrence output (gdn_decode), z bf16 rows of z_stride
// elements holding the k gate values of each token (the projection's z columns: proj + conv_dim),
// norm_w bf16 [dv]. x [t, h dv + i] = bf16(o * rsqrt(mean over head h of o^2 + eps) * norm_w[i] * silu(z)).
struct GatedNormInput {
  CUdeviceptr o = 0, z = 0, norm_w = 0;
  int z_stride = 0;
  float eps = 0.f;
};
// The same x on the host (bf16 values as fp32, [T, hv dv]) from fp32 o [T, hv dv], the bf16 z of
// each token at z[t z_stride + h dv + i] and norm_w [dv]: what gemv_w4a16_gated multiplies, up to the
// rounding of expf and the order of the head's sum of squares (the CPU reference of its input).
std::vector<float> gated_norm_input(const std::vector<float>& o, const std::vector<uint16_t>& z, int64_t z_stride,
                                    const std::vector<uint16_t>& norm_w, int64_t T, int64_t hv, int64_t dv, float eps);

// The decode residual epilogue (kernel_templates/decode_fusion.cuh) of a kernel producing a
// sub-layer's output y [T, H]: residual fp32 [T, H] += bf16(y), then normed bf16 [T, H] =
// RMSNorm(residual) with norm_w bf16 [H] (the next norm's stored offset) and eps. counter: int32 [1],
// zero before the first launch (every launch leaves it zero).
struct ResidualNorm {
  CUdeviceptr residual = 0, norm_w = 0, normed = 0, counter = 0;
  float eps = 0.f;
};
W4GemvPlan w4_gemv_plan(int64_t n, int64_t k, int64_t group, int m, bool out_f32 = false);

// quantize_w4 / dequantize_w4 over rows of length k (rows chosen at launch; experts: rows = E * N);
// group kFp8Group: quantize_fp8 / dequantize_fp8.
struct QuantizePlan {
  int64_t k = 0, group = 0;
  QuantizeTile tile;
  KernelSpec quantize_spec() const { return group == kFp8Group ? quantize_fp8_spec(k, tile) : quantize_w4_spec(k, group, tile); }
  KernelSpec dequantize_spec() const {
    return group == kFp8Group ? dequantize_fp8_spec(k, tile) : dequantize_w4_spec(k, group, tile);
  }
};
QuantizePlan quantize_plan(int64_t k, int64_t group);

// argmax_f32 and sample_f32 over fp32 logits [vocab].
struct SamplePlan {
  int64_t vocab = 0;
  SampleTile tile;
  KernelSpec argmax_spec() const { return q35::argmax_spec(vocab, tile); }
  KernelSpec sample_spec() const { return q35::sample_spec(vocab, tile); }
  // argmax workspace: float [blocks] | int [blocks] | u32 ticket; zero it once after allocating.
  size_t argmax_workspace_bytes() const { return size_t(tile.blocks) * 8 + 16; }
};
SamplePlan sample_plan(int64_t vocab);

// ---- launches (asynchronous on `stream`; pdl = programmatic dependent launch allowed) ----

// Once per loaded gemm_bf16 function, before its first launch: opts into its dynamic shared memory.
void prepare(const GemmPlan& p, const Function& f);
// y [M, n] = x [M, k] . W [n, k]^T (after prepare()); scales: W4A16 and FP8 plans (group != 0) only.
void launch(const GemmPlan& p, const Function& f, const Stream& stream, CUdeviceptr x, CUdeviceptr W, CUdeviceptr y,
            int M, CUdeviceptr scales = 0);
// y [T, n] = x [T, k] . W [n, k]^T.
void launch(const GemvBf16Plan& p, const Function& f, const Stream& stream, CUdeviceptr W, CUdeviceptr x,
            CUdeviceptr y, int T);
// y [T, n] = x [T, k] . dequant(qweight, scales)^T (a plan without `residual`).
void launch(const W4GemvPlan& p, const Function& f, const Stream& stream, CUdeviceptr qweight, CUdeviceptr scales,
            CUdeviceptr x, CUdeviceptr y, int T, bool pdl = false);
// residual += bf16(x [T, k] . dequant(qweight, scales)^T); normed = RMSNorm(residual) (a `residual` plan).
void launch(const W4GemvPlan& p, const Function& f, const Stream& stream, CUdeviceptr qweight, CUdeviceptr scales,
            CUdeviceptr x, const ResidualNorm& r, int T, bool pdl = false);
// y [T, n] bf16 = gated_norm(x) [T, k] . dequant(qweight, scales)^T (a `gated_dv` plan, W4A16).
void launch(const W4GemvPlan& p, const Function& f, const Stream& stream, CUdeviceptr qweight, CUdeviceptr scales,
            const GatedNormInput& x, CUdeviceptr y, int T, bool pdl = false);
// w bf16 [rows, k] -> qweight u32 [rows, k/8], scales bf16 [rows, k/group] (bit-exact with int4::quantize),
// or for FP8 codes uint8 [rows, k], scales fp32 [rows, ceil(k/128)] (bit-exact with fp8::quantize, blocks
// [1, 128]).
void launch_quantize(const QuantizePlan& p, const Function& f, const Stream& stream, CUdeviceptr w,
                     CUdeviceptr qweight, CUdeviceptr scales, int64_t rows);
// qweight (FP8: codes), scales -> w bf16 [rows, k] = bf16(q * scale).
void launch_dequantize(const QuantizePlan& p, const Function& f, const Stream& stream, CUdeviceptr qweight,
                       CUdeviceptr scales, CUdeviceptr w, int64_t rows);
// logits fp32 [vocab] -> out_id int32 [1] (lowest id on ties); workspace: argmax_workspace_bytes(),
// zeroed once (the kernel leaves it re-armed).
void launch_argmax(const SamplePlan& p, const Function& f, const Stream& stream, CUdeviceptr logits,
                   CUdeviceptr out_id, CUdeviceptr workspace);
// logits fp32 [vocab] -> out_id int32 [1] drawn per `params` (sampler.h semantics; greedy when
// temperature <= 0 or top_k == 1); rng u64 [2] = {seed, step}, step incremented by each launch.
void launch_sample(const SamplePlan& p, const Function& f, const Stream& stream, CUdeviceptr logits,
                   CUdeviceptr out_id, CUdeviceptr rng, const SamplingParams& params);

// ---- the kernel list ----

// The W4A16 / FP8 GEMV tile of a decode step of M rows (1 <= M <= kDecodeStepMaxRows) from the M = 1
// tile `one`: its K split and unroll for every M, so each row gets the arithmetic of a sequence decoded
// alone; M_TILE = 8 / (128 / group) tokens fill one mma column tile (FP8, one scale block per 128-k
// tile: 4 tokens, half a column tile), which keeps the M = 1 tile's accumulator chains
// (gemv_w4a16.cuh). (A bf16 GEMV's sums do not depend on its tile, gemv_bf16.cuh.)
W4GemvTile w4_decode_tile(const W4GemvTile& one, int64_t group, int M);

struct DenseOptions {
  int group = 0;                  // 0: bf16 weights; 32 / 64 / 128: W4A16 with that group size; kFp8Group
  int decode_tokens = 1;          // M of the decode GEMVs
  int64_t prefill_tokens = 4096;  // M the prefill GEMM tiles are chosen for
  bool wgmma = false;             // sm_90a: prefill GEMMs on gemm_wgmma (W4A16 / FP8 dequantized in its loop)
};
// Every instantiation the dense projections, the lm_head and token selection need, deduplicated.
std::vector<KernelSpec> dense_kernels(const Config& cfg, const DenseOptions& opt = {});

}  // namespace q35::qwen35::gpu
