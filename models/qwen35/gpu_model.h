#pragma once
// The Qwen3.5 MoE forward pass on the GPU: the JIT kernels of every family chained per layer
// (one screen per layer in gpu_model.cpp), max_batch sequence slots (each its own K/V rows,
// DeltaNet state, position and sampler rng; models/qwen35/batch.h), and decode as captured CUDA
// graphs replayed per token (input token, position and sampler step live on the device): one per
// slot for a single sequence, one per bucket of batch sizes for the batched step.
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
struct GatedNormInput;
}  // namespace gpu

struct GpuModelOptions {
  WeightFormat format = WeightFormat::W4A16;
  int group = 128;                 // W4A16 group size (unused for bf16 and FP8)
  bool prequantized = false;       // the checkpoint was written by `q35jit quantize`
  int64_t max_context = 32768;     // KV cache rows per slot; error when exceeded
  int max_batch = 1;               // sequence slots (models/qwen35/batch.h), 1..kMaxBatch
  int64_t max_chunk = 2048;        // prefill tokens per forward chunk (longer prompts run in chunks)
  bool chunked_gdn = true;         // chunked delta rule for prefill (else token-by-token recurrence)
  // Decode calls (T <= 8): residual add + RMSNorm folded into the output projection and MoE down
  // kernels by a last-block ticket (else the rmsnorm kernel between sub-layers). Off by default: on
  // the H200 (35B synthetic, W4A16 g128, ctx 128) the fused step ran 1.854 ms against 1.705 for the
  // plain one (2026-12-03, docs/perf-log.md); the last block's norm is a serial tail per sub-layer.
  bool fused_decode = false;
  bool pdl = true;  // programmatic dependent launch of the decode kernels (sm_90)
  // With pdl: the single-sequence step's DeltaNet out_proj (gemv_w4a16_gated) launched with PDL, its
  // blocks prefetching their weights into L2 while gdn_decode runs (an A/B switch: c900076's PDL on
  // every out_proj slowed the gdn_decode of the time, which then had a last-block tail).
  bool gdn_out_pdl = true;
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
  int max_batch() const { return options_.max_batch; }
  int64_t position(int slot = 0) const;
  int64_t max_context() const { return options_.max_context; }
  int64_t max_chunk() const { return options_.max_chunk; }  // tokens per forward chunk
  size_t weight_bytes() const { return weights_.bytes(); }
  size_t state_bytes() const;  // every slot's

  // Single-sequence calls on one slot (0 where a command runs one sequence).
  // Clears the slot (DeltaNet states, position; K/V rows past the position are never read).
  void reset(int slot = 0);
  // Feeds `tokens` at the slot's position. Returns fp32 logits [T, vocab] for every position
  // (all_logits) or [vocab] for the last one. Error on context overflow or a bad id.
  std::vector<float> forward(std::span<const int32_t> tokens, bool all_logits, int slot = 0);
  // Feeds `tokens` and samples the next id on the GPU (prefill of a prompt).
  int32_t prefill(std::span<const int32_t> tokens, const SamplingParams& sampling, int slot = 0);
  // Feeds one token and samples the next on the GPU: a captured CUDA graph (one per slot), replayed.
  int32_t decode(int32_t token, const SamplingParams& sampling, int slot = 0);
  // `steps` decode steps fed by `token`, each next input taken from the previous step's sample on
  // the device (graph replays back to back, no host round trip between them); returns the last
  // sampled id. decode(token) == decode_steps(token, 1).
  // step_ms (optional): the GPU time of each replayed step (CUDA events between the replays).
  int32_t decode_steps(int32_t token, int64_t steps, const SamplingParams& sampling, int slot = 0,
                       std::vector<double>* step_ms = nullptr);

  // The batched decode step: one token of each of B sequences (distinct slots) in one forward,
  // each row sampled on the device with its own parameters and its slot's rng. B = 1 runs the
  // single-sequence graph of that slot; more replay the graph of decode_bucket(B) (captured on its
  // first use). Rows with want_logits return their fp32 logits [vocab] and id -1 (with B = 1 the
  // graph draws an id, which is discarded).
  struct BatchEntry {
    int slot = 0;
    int32_t token = 0;
    SamplingParams sampling;
    bool want_logits = false;
  };
  struct BatchResult {
    std::vector<int32_t> ids;                 // [B], -1 for want_logits rows
    std::vector<std::vector<float>> logits;   // [B]: [vocab] for want_logits rows, else empty
  };
  BatchResult decode_batch(std::span<const BatchEntry> batch);
  // `steps` batched steps, each row's next input its previous sample (graph replays back to back);
  // returns the last step's ids. Every row samples (want_logits is ignored); one row runs
  // decode_steps (the single-sequence graph). For benchmarks.
  // step_ms (optional): the GPU time of each replayed step after the first (CUDA events between the
  // graph launches; the first call of a bucket runs its first step eagerly and does not time it).
  std::vector<int32_t> decode_batch_steps(std::span<const BatchEntry> batch, int64_t steps,
                                          std::vector<double>* step_ms = nullptr);

  const Stream& stream() const { return stream_; }
  // The nodes of the captured decode step of one sequence (kernels = kernel launches per decoded
  // token); empty before the first decode() / decode_steps() of the model.
  std::optional<GraphNodeCounts> decode_graph_nodes() const;
  // The nodes of the batched step's graph of `bucket` rows; empty before it was captured.
  std::optional<GraphNodeCounts> batch_graph_nodes(int bucket) const;

  // Saved states in one contiguous block each (a server's prefix cache, cli/engine.h); a block saved
  // from any slot restores into any slot. Layouts (every layer's part 256-byte aligned): K rows
  // [0, rows) of every full-attention layer, then their V rows; the conv rings of every DeltaNet
  // layer, then their fp32 states. A save or restore is one 2D copy per kind (K, V, conv, state:
  // the slot's parts of all layers of a kind are rows at one pitch in the model's buffers), or one
  // copy per layer where that pitch passes the device's 2D-copy limit. Blocks live in device memory or host memory (both addressed
  // as unified addresses: a CUdeviceptr or a host pointer); the copies are issued on stream() and the
  // calls return without synchronising (pinned host memory: asynchronous; pageable: the copy is done
  // when the call returns). Everything later on the stream sees them, nothing waits for them.
  size_t kv_block_bytes(int64_t rows) const;
  size_t recurrent_block_bytes() const;
  void save_kv_block(int slot, int64_t rows, uint64_t dst) const;
  void save_recurrent_block(int slot, uint64_t dst) const;
  // Sets the slot to `pos` tokens: K/V rows [0, pos) from the block at `kv` (saved with kv_rows >=
  // pos rows), the recurrent state from the block at `recurrent`. Error on a bad pos / kv_rows.
  void restore_blocks(int slot, int64_t pos, uint64_t kv, int64_t kv_rows, uint64_t recurrent);
  // `bytes` from one block to another (device <-> device, device <-> host), on stream().
  void copy_block(uint64_t dst, uint64_t src, size_t bytes) const;
  // The copies a save or restore of one slot issues (2 each with 2D copies).
  size_t kv_block_copies() const;
  size_t recurrent_block_copies() const;

  // Host copies of a slot's state (the tests); a copy of any slot restores into any slot. The
  // DeltaNet conv and recurrent states of every layer (two parts per layer, empty for attention
  // layers):
  std::vector<std::vector<std::byte>> save_recurrent_state(int slot = 0) const;
  // K and V cache rows [0, rows) of every layer (two parts per layer, empty for DeltaNet layers):
  std::vector<std::vector<std::byte>> save_kv_rows(int64_t rows, int slot = 0) const;
  // Sets the slot to `pos` tokens from such copies (`kv` holds at least `pos` rows). Error when
  // a part does not match the model's buffers.
  void restore_state(const std::vector<std::vector<std::byte>>& recurrent,
                     const std::vector<std::vector<std::byte>>& kv, int64_t pos, int slot = 0);

 private:
  struct Impl;
  // Where the T tokens of a forward come from and go to: one slot (single), or one token of each
  // of T sequences whose slots the device array batch_slots holds (batch; T = a graph bucket).
  struct Rows {
    int slot = 0;
    bool batch = false;
  };
  void init(const GpuModelOptions& options);
  UploadOptions upload_options();
  void run_layers(int T, bool decode, Rows rows);
  void lm_head(int T);
  // Whether calls of `rows` tokens launch their decode kernels with programmatic dependent launch
  // (options_.pdl, sm_90, decode-sized calls).
  bool pdl_for(int64_t rows) const;
  void sample(const SamplingParams& sampling, int slot);
  void seed(int slot, const SamplingParams& sampling);  // (re)seeds the slot's device rng on a new seed
  size_t checked(int slot) const;
  void check_fits(size_t T, int slot) const;
  void check_batch(std::span<const BatchEntry> batch) const;
  // A piece of a block's layout: `rows` rows (one per layer of a kind) of `width` bytes, `pitch`
  // apart in the slot buffers from `at`, `block_pitch` apart in the block from `offset`.
  struct StateSegment {
    CUdeviceptr at = 0;
    size_t pitch = 0, offset = 0, block_pitch = 0, width = 0, rows = 0;
  };
  // K/V rows [0, rows) of slot s in a block laid out for block_rows rows; the recurrent state of s.
  std::vector<StateSegment> kv_segments(size_t s, int64_t rows, int64_t block_rows) const;
  std::vector<StateSegment> recurrent_segments(size_t s) const;
  size_t segment_copies(const StateSegment& g) const;  // 1 (a 2D copy) or one per row
  void copy_segment(const StateSegment& g, uint64_t block, bool to_block) const;
  // Uploads the rows (slots, tokens, sampling parameters; padding to `bucket`), then replays the
  // bucket's graph `steps` times (the first use runs one step eagerly, then captures).
  void run_batch(std::span<const BatchEntry> batch, int bucket, int64_t steps, std::vector<double>* step_ms);
  // y [M, N] = x [M, K] . W^T with the plan of (W's shape and format, M), resolved on first use.
  // pdl: programmatic dependent launch (GEMV only; the caller checks the predecessor is a kernel).
  // decode: a decode step of M <= kDecodeStepMaxRows rows (GEMV with decode_w4_tile: each row's
  // result is the one it gets alone).
  void dense(const GpuMatrix& W, CUdeviceptr x, CUdeviceptr y, int M, bool out_f32 = false, bool pdl = false,
             bool decode = false);
  // A sub-layer's output projection with the residual epilogue (W4A16 / FP8, M <= 16, decode steps up
  // to kDecodeStepMaxRows): residual += bf16(x . W^T), normed = RMSNorm(residual) with norm_w
  // (kernel_templates/decode_fusion.cuh).
  void dense_residual(const GpuMatrix& W, CUdeviceptr x, int M, CUdeviceptr norm_w, bool pdl, bool decode);
  // The DeltaNet out_proj of a single-sequence decode step (W4A16, one token) with the gated RMSNorm
  // as its input (gemv_w4a16_gated): y [1, N] = bf16(gated_norm(x) . W^T).
  void dense_gated(const GpuMatrix& W, const gpu::GatedNormInput& x, CUdeviceptr y, bool pdl);
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
  std::vector<int64_t> pos_;  // per slot, mirrors the device positions
};

}  // namespace q35::qwen35
