#pragma once
// The Qwen3.5 MoE forward pass on the GPU: the JIT kernels of every family chained per layer
// (one screen per layer in gpu_model.cpp), the per-sequence state, and decode as one captured
// CUDA graph replayed per token (input token, position and sampler step live on the device).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "models/qwen35/config.h"
#include "models/qwen35/gpu_weights.h"
#include "runtime/core/sampler.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"
#include "autotune/tune_cache.h"

namespace q35 {
class Checkpoint;
}

namespace q35::qwen35 {
namespace gpu {
struct MoeKernels;
struct MoeScratch;
class GdnKernels;
}  // namespace gpu

struct GpuModelOptions {
  WeightFormat format = WeightFormat::W4A16;
  int group = 128;                 // W4A16 group size
  bool prequantized = false;       // the checkpoint was written by `q35jit quantize`
  int64_t max_context = 32768;     // KV cache rows; error when exceeded
  int64_t max_chunk = 2048;        // prefill tokens per forward chunk (longer prompts run in chunks)
  bool chunked_gdn = true;         // chunked delta rule for prefill (else token-by-token recurrence)
  // Decode calls (T <= 8): residual add + RMSNorm folded into the output projection and MoE down
  // kernels by a last-block ticket (else the rmsnorm kernel between sub-layers). Off by default: on
  // the H200 (35B synthetic, W4A16 g128, ctx 128) the fused step ran 1.854 ms against 1.705 for the
  // plain one (2026-12-03, docs/perf-log.md); the last block's norm is a serial tail per sub-layer.
  bool fused_decode = false;
  bool pdl = true;  // programmatic dependent launch of the decode kernels (sm_90)
  int compile_threads = 0;         // 0: hardware threads
  // Tuned tile configs (`q35jit tune`); null or empty: the heuristic defaults everywhere. A kernel
  // with no tuned entry takes its default, and the first such miss is one notice through `log`.
  std::shared_ptr<const TuneTable> tuning;
  // One-line notices (load time, quantization error with verbose).
  std::function<void(const std::string&)> log;
  bool verbose = false;
};

class GpuModel {
 public:
  // Loads (validates, uploads, quantizes) the checkpoint and compiles every kernel.
  GpuModel(const Driver& driver, const Context& ctx, JitEngine& jit, const Config& config, const Checkpoint& ckpt,
           const GpuModelOptions& options);
  // Random weights of the config's shapes, generated on the GPU (benchmarks without a checkpoint).
  GpuModel(const Driver& driver, const Context& ctx, JitEngine& jit, const Config& config,
           const GpuModelOptions& options, uint64_t seed);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  const Config& config() const { return config_; }
  int64_t position() const { return pos_; }
  int64_t max_context() const { return options_.max_context; }
  size_t weight_bytes() const { return weights_.bytes(); }
  size_t state_bytes() const;

  // Clears the sequence (KV caches, DeltaNet states, position).
  void reset();
  // Feeds `tokens` at the current position. Returns fp32 logits [T, vocab] for every position
  // (all_logits) or [vocab] for the last one. Error on context overflow or a bad id.
  std::vector<float> forward(std::span<const int32_t> tokens, bool all_logits);
  // Feeds `tokens` and samples the next id on the GPU (prefill of a prompt).
  int32_t prefill(std::span<const int32_t> tokens, const SamplingParams& sampling);
  // Feeds one token and samples the next on the GPU: a captured CUDA graph, replayed.
  int32_t decode(int32_t token, const SamplingParams& sampling);
  // `steps` decode steps fed by `token`, each next input taken from the previous step's sample on
  // the device (graph replays back to back, no host round trip between them); returns the last
  // sampled id. decode(token) == decode_steps(token, 1).
  int32_t decode_steps(int32_t token, int64_t steps, const SamplingParams& sampling);

  const Stream& stream() const { return stream_; }
  // The nodes of the captured decode step (kernels = kernel launches per decoded token); empty
  // before the first decode() / decode_steps() of the model.
  std::optional<GraphNodeCounts> decode_graph_nodes() const;

  // Host copies of the sequence state (a server's prefix cache). The DeltaNet conv and recurrent
  // states of every layer (two parts per layer, empty for attention layers):
  std::vector<std::vector<std::byte>> save_recurrent_state() const;
  // K and V cache rows [0, rows) of every layer (two parts per layer, empty for DeltaNet layers):
  std::vector<std::vector<std::byte>> save_kv_rows(int64_t rows) const;
  // Sets the sequence to `pos` tokens from such copies (`kv` holds at least `pos` rows). Error when
  // a part does not match the model's buffers.
  void restore_state(const std::vector<std::vector<std::byte>>& recurrent,
                     const std::vector<std::vector<std::byte>>& kv, int64_t pos);

 private:
  struct Impl;
  void init(const GpuModelOptions& options);
  UploadOptions upload_options();
  void run_layers(int T, bool decode);
  void lm_head(int T);
  void sample(const SamplingParams& sampling);
  void check_fits(size_t T) const;
  // y [M, N] = x [M, K] . W^T with the plan of (W's shape and format, M), resolved on first use.
  // pdl: programmatic dependent launch (GEMV only; the caller checks the predecessor is a kernel).
  void dense(const GpuMatrix& W, CUdeviceptr x, CUdeviceptr y, int M, bool out_f32 = false, bool pdl = false);
  // A sub-layer's output projection with the residual epilogue (W4A16, M <= 16): residual +=
  // bf16(x . W^T), normed = RMSNorm(residual) with norm_w (kernel_templates/decode_fusion.cuh).
  void dense_residual(const GpuMatrix& W, CUdeviceptr x, int M, CUdeviceptr norm_w, bool pdl);
  // The MoE / GDN kernels of the tiles for T tokens (loaded on first use) and the MoE scratch.
  const gpu::MoeKernels& moe_kernels(int T, const gpu::MoeScratch** scratch);
  const gpu::GdnKernels& gdn_kernels(int T);

  const Driver& driver_;
  const Context& ctx_;
  JitEngine& jit_;
  Config config_;
  GpuModelOptions options_;
  Stream stream_;
  GpuWeights weights_;
  std::unique_ptr<Impl> impl_;
  int64_t pos_ = 0;
};

}  // namespace q35::qwen35
