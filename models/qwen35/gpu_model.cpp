// The Qwen3.5 MoE forward pass on the GPU. Each layer, T tokens (spec §2.2):
//   normed = RMSNorm_in(residual += delta)            rmsnorm (fused residual add)
//   mixer:  full attention  qkv = normed·Wqkv; qk_norm_rope (+ KV cache write); attention; o_proj
//           Gated DeltaNet  proj = normed·Win; conv + gates + delta rule + gated norm; out_proj
//   normed = RMSNorm_post(residual += mixer out)
//   delta  = MoE(normed)                              router, experts, shared expert
// then the final norm, lm_head (last row) and sampling on the GPU. A decode step (T = 1) is
// captured once as a CUDA graph: its input token, position and sampler step live on the device.
#include "models/qwen35/gpu_model.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <thread>

#include "autotune/tile_config.h"
#include "autotune/tiles_wgmma.h"
#include "models/qwen35/batch.h"
#include "models/qwen35/gpu/attention.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/gpu/gdn.h"
#include "models/qwen35/gpu/moe.h"
#include "models/qwen35/gpu/sampling.h"
#include "models/qwen35/gpu/tuned.h"
#include "models/qwen35/kernels.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"
#include "runtime/io/safetensors.h"
#include "runtime/jit/kernel_set.h"

namespace q35::qwen35 {

namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

KernelSpec step_spec() { return {"step", "step_advance", {}}; }
KernelSpec step_batch_spec() { return {"step", "step_advance_batch", {}}; }
KernelSpec fill_normal_spec() { return {"fill", "fill_normal_bf16", {}}; }
KernelSpec fill_uniform_spec() { return {"fill", "fill_uniform_f32", {}}; }

// The kernels' weight-format code (runtime/core/weight_format.h) of the options.
int group_of(const GpuModelOptions& o) {
  return o.format == WeightFormat::W4A16 ? o.group : o.format == WeightFormat::FP8 ? kFp8Group : 0;
}

}  // namespace

// Everything the forward pass needs besides the weights: kernels, per-sequence state, scratch.
struct GpuModel::Impl {
  Impl(JitEngine& jit, const Context& ctx, const Config& c)
      : kernels(jit, ctx),
        attn(c.num_layers_of(LayerType::FullAttention)
                 ? gpu::attention_plan(c, smem_limit_for(ctx.device().arch()), arch_has_wgmma(ctx.device().arch()))
                 : gpu::AttentionPlan{}),
        sample(gpu::sample_plan(c.vocab_size)), topk(gpu::topk_sample_plan(c.vocab_size)),
        batch_sample(gpu::batch_sample_plan(c.vocab_size)) {}

  KernelSet kernels;
  gpu::AttentionPlan attn;
  gpu::SamplePlan sample;
  gpu::TopkSamplePlan topk;
  gpu::BatchSamplePlan batch_sample;
  std::unique_ptr<gpu::TunedTiles> tuned;  // the tile of every kernel per call size
  // Kernels per set of tiles (the tuned tiles may differ between call sizes), loaded on first use:
  // always eagerly (a decode step runs once before it is captured).
  struct MoeVariant {
    std::unique_ptr<gpu::MoeKernels> kernels;
    gpu::MoeScratch scratch;
  };
  std::map<std::string, MoeVariant> moe_variants;
  std::map<std::string, std::unique_ptr<gpu::GdnKernels>> gdn_variants;
  MoeShape moe_shape;
  // What a call of T tokens runs (tiles resolved, kernels loaded), built on the first call of that
  // T so later calls do no lookups: the layers' MoE / DeltaNet kernels and the attention plan.
  struct Step {
    const gpu::MoeKernels* moe = nullptr;
    const gpu::MoeScratch* moe_scratch = nullptr;
    // The MoE path of a call of T tokens: the grouped kernels for every decode step (T <=
    // kDecodeStepMaxRows) and for prompt chunks up to the tuned crossover, else the grouped GEMMs.
    gpu::MoePath moe_path = gpu::MoePath::Prefill;
    const gpu::GdnKernels* gdn = nullptr;
    gpu::AttentionPlan attn;
    int attn_splits = 0;
  };
  std::map<int, Step> steps;
  // A dense projection's plan and loaded kernel per (format, group, N, K, fp32 out, M, form, decode).
  // The GEMV's input and output forms: plain x -> y, the residual epilogue (dense_residual), the
  // gated-norm input (dense_gated).
  enum class DenseForm { Plain, Residual, GatedInput };
  struct DensePlan {
    gpu::GemvBf16Plan bf16;  // GEMV rows (M <= 16, or a decode step), bf16 weights
    gpu::W4GemvPlan w4;      // GEMV rows, W4A16 / FP8 weights
    gpu::GemmPlan gemm;      // otherwise
    bool gemv = true;
    const Function* f = nullptr;
  };
  // (format, group, N, K, fp32 out, M, form, decode step)
  std::map<std::tuple<WeightFormat, int, int64_t, int64_t, bool, int, DenseForm, bool>, DensePlan> dense_plans;

  // Per slot: one K and V cache per full-attention layer, conv + fp32 state per DeltaNet layer;
  // each layer's buffer holds max_batch equal parts, slot s at s * the part's bytes. The layers of one
  // kind are one allocation ([layer of the kind][max_batch][part]), so one slot's parts of every layer
  // are rows at a constant pitch: a saved state's copy is one 2D copy per kind.
  struct StateView {  // a layer's buffer inside its kind's allocation
    CUdeviceptr p = 0;
    size_t n = 0;
    CUdeviceptr ptr() const { return p; }
    size_t size() const { return n; }
  };
  DeviceBuffer k_all, v_all, conv_all, ssm_all;
  std::vector<StateView> k_cache, v_cache;  // bf16 [max_batch, max_context, Hkv, D] (indexed by layer)
  std::vector<StateView> conv_state, ssm_state;
  size_t kv_slot = 0, conv_slot = 0, ssm_slot = 0;  // bytes of one slot's part
  size_t full_layers = 0, linear_layers = 0;
  std::vector<std::optional<SamplingParams>> rng_params;  // per slot: what its rng was seeded for

  // Scratch for chunks of up to max_chunk tokens.
  DeviceBuffer tokens;      // int32 [max_chunk]
  DeviceBuffer pos;         // int32 [max_batch]   per slot: tokens it holds (its next position)
  DeviceBuffer next_id;     // int32 [1]
  DeviceBuffer rng;         // u64 [max_batch, 2]  per slot: sampler {seed, step}
  // The batched step's rows (B <= max_batch): slot per row (-1: padding), sampled ids, parameters.
  DeviceBuffer batch_slots;   // int32 [max_batch]
  DeviceBuffer batch_next;    // int32 [max_batch]
  DeviceBuffer batch_params;  // temperature fp32 [max_batch] | top_k int32 [max_batch] | top_p fp32 [max_batch]
  DeviceBuffer batch_topk_ws; // batch_sample.workspace_bytes(max_batch)
  DeviceBuffer argmax_ws;   // argmax workspace (zeroed once)
  DeviceBuffer topk_ws;     // top-k sampling candidates
  DeviceBuffer residual;    // fp32 [max_chunk, H]   the residual stream, kept in fp32
  DeviceBuffer normed;      // bf16 [max_chunk, H]
  DeviceBuffer delta;       // bf16 [max_chunk, H]   sub-layer output, added by the next norm
  DeviceBuffer proj;        // bf16 [max_chunk, max(qkv_row, gdn_cols)]
  DeviceBuffer q;           // bf16 [max_chunk, Hq, D]
  DeviceBuffer mix;         // bf16 [max_chunk, max(Hq*D, Hv*dv)]  attention / DeltaNet output
  DeviceBuffer gdn_ws;      // gdn_workspace_bytes(max_chunk)
  DeviceBuffer gdn_o;       // fp32 [max_batch, Hv, dv] (decode)
  DeviceBuffer attn_scratch;
  DeviceBuffer moe_ws;      // moe_workspace_bytes(max_chunk) for the largest tuned block_m, zeroed once
  DeviceBuffer dequant;     // bf16 [max N*K] W4A16 weights dequantized for prefill GEMMs
  DeviceBuffer logits;      // fp32 [max(16, max_batch), vocab]
  // int32 tickets of the fused decode kernels, zeroed once (every launch leaves its own zero):
  // [0] the residual epilogues (one launch at a time uses it), [1, 1 + max_batch * Hv) gdn_decode_norm's
  // and gdn_decode_batch's per (row, head).
  DeviceBuffer tickets;

  // The single-sequence decode step of each slot, captured for a sampling setting.
  struct SlotGraph {
    GraphExec exec;
    SamplingParams sampling;
  };
  std::map<int, SlotGraph> decode_graphs;
  std::optional<GraphNodeCounts> decode_nodes;  // of the last captured single-sequence step
  // The batched step per bucket (rows), captured on its first use.
  std::map<int, GraphExec> batch_graphs;
  std::map<int, GraphNodeCounts> batch_nodes;
};

GpuModel::GpuModel(const Driver& driver, const Context& ctx, JitEngine& jit, const Config& config, const Checkpoint& ckpt,
                   const GpuModelOptions& options)
    : driver_(driver), ctx_(ctx), jit_(jit), config_(config), options_(options), stream_(driver) {
  init(options);
  auto t0 = std::chrono::steady_clock::now();
  UploadOptions up = upload_options();
  if (options.verbose && options.log)
    up.report_error = [&](const std::string& kind, double e) {
      options.log(fmt::format("{} {:<18} relative error {:.4f} (first 64 rows of each tensor)",
                              weight_format_name(group_of(options)), kind, e));
    };
  weights_ = upload_weights(driver_, stream_, config_, ckpt, up);
  stream_.synchronize();
  if (options.log)
    options.log(fmt::format("weights on the GPU: {:.1f} MB ({}) in {:.0f} ms", weights_.bytes() / 1e6,
                            weight_format_name(group_of(options)), ms_since(t0)));
  for (int s = 0; s < options.max_batch; ++s) reset(s);
}

GpuModel::GpuModel(const Driver& driver, const Context& ctx, JitEngine& jit, const Config& config,
                   const GpuModelOptions& options, uint64_t seed)
    : driver_(driver), ctx_(ctx), jit_(jit), config_(config), options_(options), stream_(driver) {
  init(options);
  UploadOptions up = upload_options();
  const Function& normal = impl_->kernels.get(fill_normal_spec());
  const Function& uniform = impl_->kernels.get(fill_uniform_spec());
  const unsigned blocks = unsigned(ctx.device().sm_count * 8);
  RandomFill fill{
      [&](CUdeviceptr dst, size_t n, uint64_t s, float mean, float scale) {
        normal.launch({{blocks}, {256}}, stream_, dst, (unsigned long long)n, (unsigned long long)s, mean, scale);
      },
      [&](CUdeviceptr dst, size_t n, uint64_t s, float lo, float hi) {
        uniform.launch({{blocks}, {256}}, stream_, dst, (unsigned long long)n, (unsigned long long)s, lo, hi);
      }};
  weights_ = random_weights(driver_, stream_, config_, up, fill, seed);
  for (int s = 0; s < options.max_batch; ++s) reset(s);
}

GpuModel::~GpuModel() = default;

// Weight format of the options; W4A16 and FP8 quantize on the GPU with the quantize_w4 / quantize_fp8
// kernels.
UploadOptions GpuModel::upload_options() {
  UploadOptions up;
  up.format = options_.format;
  up.group = options_.group;
  up.prequantized = options_.prequantized;
  up.quantize = [this](CUdeviceptr src, int64_t rows, int64_t K, int group, CUdeviceptr qw, CUdeviceptr sc) {
    gpu::QuantizePlan p = gpu::quantize_plan(K, group);
    gpu::launch_quantize(p, impl_->kernels.get(p.quantize_spec()), stream_, src, qw, sc, rows);
  };
  return up;
}

void GpuModel::init(const GpuModelOptions& o) {
  const Config& c = config_;
  const DeviceInfo& dev = ctx_.device();
  if (dev.cc_major < 8)
    fail("unsupported GPU: {} is sm_{}{}; q35jit needs sm_80 or newer (bf16 tensor cores)", dev.name, dev.cc_major,
         dev.cc_minor);
  if (o.max_context < 1) fail("--max-context must be at least 1");
  if (o.max_batch < 1 || o.max_batch > kMaxBatch) fail("--max-batch {} is not in [1, {}]", o.max_batch, kMaxBatch);
  if (o.max_batch > o.max_chunk)
    fail("--max-batch {} exceeds the prefill chunk of {} rows the batched step's activations use", o.max_batch,
         o.max_chunk);
  if (o.max_context > c.max_position_embeddings && c.max_position_embeddings > 0)
    fail("--max-context {} exceeds the model's max_position_embeddings {}", o.max_context, c.max_position_embeddings);
  impl_ = std::make_unique<Impl>(jit_, ctx_, c);
  pos_.assign(size_t(o.max_batch), 0);
  Impl& m = *impl_;
  const int group = group_of(o);

  // Every kernel of the model, compiled in parallel (or served by the JIT caches), then loaded.
  auto t0 = std::chrono::steady_clock::now();
  const int threads = o.compile_threads > 0 ? o.compile_threads : int(std::max(1u, std::thread::hardware_concurrency()));
  const bool has_full = c.num_layers_of(LayerType::FullAttention) > 0;
  const bool has_linear = c.num_layers_of(LayerType::LinearAttention) > 0;
  m.tuned = std::make_unique<gpu::TunedTiles>(c, group, ctx_.device().arch(), o.tuning, o.log);
  m.moe_shape = m.tuned->moe_shape();
  if (o.log && o.tuning) {
    std::string origins;
    for (const TuneTable::Layer& l : o.tuning->layers()) origins += (origins.empty() ? "" : ", ") + l.origin;
    o.log(origins.empty() ? fmt::format("tune cache: none for {}: heuristic default tiles", ctx_.device().name)
                          : fmt::format("tune cache: {}", origins));
  }
  std::vector<KernelSpec> specs = required_kernels(c, group, ctx_.device().arch(), o.max_chunk);
  specs.push_back(step_spec());
  specs.push_back(step_batch_spec());
  // The decode step's tuned kernels; those of other call sizes load on first use (from the JIT
  // caches: loading all of them here cost 2 s on the H100).
  if (m.tuned->tuned())
    for (KernelSpec& s : gpu::tuned_kernels(c, *m.tuned, m.attn, group, 1)) specs.push_back(std::move(s));
  m.kernels.preload(specs, threads);
  if (o.log) {
    JitStats s = jit_.stats();
    o.log(fmt::format("kernels: {} for {} in {:.0f} ms ({} compiled, {} from the cache)", m.kernels.size(),
                      ctx_.device().arch(), ms_since(t0), s.compiled, s.cache_hits()));
  }

  const int64_t H = c.hidden_size, T = o.max_chunk;
  auto alloc = [&](size_t bytes) { return DeviceBuffer(driver_, std::max<size_t>(bytes, 16)); };
  const size_t slots = size_t(o.max_batch);
  m.kv_slot = size_t(o.max_context * c.num_kv_heads * c.head_dim) * 2;
  m.conv_slot = has_linear ? gpu::gdn_conv_state_bytes(c) : 0;
  m.ssm_slot = has_linear ? gpu::gdn_ssm_state_bytes(c) : 0;
  m.full_layers = size_t(c.num_layers_of(LayerType::FullAttention));
  m.linear_layers = size_t(c.num_layers_of(LayerType::LinearAttention));
  m.k_all = alloc(m.full_layers * slots * m.kv_slot);
  m.v_all = alloc(m.full_layers * slots * m.kv_slot);
  m.conv_all = alloc(m.linear_layers * slots * m.conv_slot);
  m.ssm_all = alloc(m.linear_layers * slots * m.ssm_slot);
  size_t jf = 0, jl = 0;  // the layer's index among its kind
  for (LayerType t : c.layer_types) {
    if (t == LayerType::FullAttention) {
      m.k_cache.push_back({m.k_all.ptr() + jf * slots * m.kv_slot, slots * m.kv_slot});
      m.v_cache.push_back({m.v_all.ptr() + jf * slots * m.kv_slot, slots * m.kv_slot});
      m.conv_state.push_back({});
      m.ssm_state.push_back({});
      ++jf;
    } else {
      m.k_cache.push_back({});
      m.v_cache.push_back({});
      m.conv_state.push_back({m.conv_all.ptr() + jl * slots * m.conv_slot, slots * m.conv_slot});
      m.ssm_state.push_back({m.ssm_all.ptr() + jl * slots * m.ssm_slot, slots * m.ssm_slot});
      ++jl;
    }
  }
  m.rng_params.assign(slots, std::nullopt);
  const int64_t proj_cols = std::max(has_full ? m.attn.qkv_row() : 0, has_linear ? gpu::gdn_proj_columns(c) : 0);
  const int64_t mix_cols = std::max(has_full ? c.attn_out_dim() : 0, has_linear ? c.linear_value_dim() : 0);
  m.tokens = alloc(size_t(T) * 4);
  m.pos = alloc(slots * 4);
  m.pos.fill_bytes(0, stream_);
  m.next_id = alloc(4);
  m.rng = alloc(slots * 16);
  // The batched step's per-row buffers: a step runs at most kMaxStepRows rows (larger batches run as
  // consecutive steps), whatever the slot count.
  const size_t step_rows = size_t(std::min(o.max_batch, kMaxStepRows));
  m.batch_slots = alloc(step_rows * 4);
  m.batch_next = alloc(step_rows * 4);
  m.batch_params = alloc(step_rows * 12);
  m.batch_topk_ws = alloc(m.batch_sample.workspace_bytes(int(step_rows)));
  m.argmax_ws = alloc(m.sample.argmax_workspace_bytes());
  m.argmax_ws.fill_bytes(0, stream_);
  m.topk_ws = alloc(m.topk.workspace_bytes());
  m.residual = alloc(size_t(T * H) * 4);
  m.normed = alloc(size_t(T * H) * 2);
  m.delta = alloc(size_t(T * H) * 2);
  m.proj = alloc(size_t(T * proj_cols) * 2);
  m.q = alloc(has_full ? size_t(T * c.num_heads * c.head_dim) * 2 : 0);
  m.mix = alloc(size_t(T * mix_cols) * 2);
  if (has_linear) {
    m.gdn_ws = alloc(gpu::gdn_workspace_bytes(c, T));
    m.gdn_o = alloc(step_rows * size_t(c.linear_value_dim()) * 4);
  }
  if (has_full) {  // scratch for the most splits any decode tile takes (one warp per split)
    gpu::AttentionPlan widest = m.attn;
    widest.decode.warps = 1;
    size_t bytes = gpu::attention_decode_scratch_bytes(
        widest, gpu::attention_decode_splits(widest, o.max_context, ctx_.device().sm_count));
    // The batched step: step_rows sequences with the single-sequence split count.
    bytes = std::max(bytes, gpu::attention_decode_batch_scratch_bytes(
                                widest, int(step_rows),
                                gpu::attention_decode_splits(widest, o.max_context, ctx_.device().sm_count)));
    m.attn_scratch = alloc(bytes);
  }
  // Any tuned block_m fits: the largest pads the most rows, the smallest has the most blocks.
  gpu::MoeTiles largest = gpu::MoeTiles::defaults(m.moe_shape), smallest = largest;
  largest.gemm.block_m = std::max(largest.gemm.block_m, tune::kMoeMaxBlockM);
  smallest.gemm.block_m = tune::kMoeMinBlockM;
  m.moe_ws = alloc(std::max(gpu::moe_workspace_bytes(m.moe_shape, largest, T),
                            gpu::moe_workspace_bytes(m.moe_shape, smallest, T)));
  m.moe_ws.fill_bytes(0, stream_);
  if (o.format == WeightFormat::W4A16 || (o.format == WeightFormat::FP8 && arch_has_wgmma(ctx_.device().arch()))) {
    int64_t largest = 0;  // every dense matrix except lm_head (computed by GEMV chunks)
    if (has_full) largest = std::max({largest, (m.attn.qkv_row()) * H, H * c.attn_out_dim()});
    if (has_linear) largest = std::max({largest, gpu::gdn_proj_columns(c) * H, H * c.linear_value_dim()});
    m.dequant = alloc(size_t(largest) * 2);
  }
  m.logits = alloc(std::max<size_t>(16, step_rows) * size_t(c.vocab_size) * 4);
  m.tickets = alloc((1 + step_rows * size_t(has_linear ? c.linear_num_value_heads : 0)) * 4);
  m.tickets.fill_bytes(0, stream_);
  stream_.synchronize();
}

size_t GpuModel::state_bytes() const {
  size_t n = 0;
  for (size_t i = 0; i < impl_->k_cache.size(); ++i)
    n += impl_->k_cache[i].size() + impl_->v_cache[i].size() + impl_->conv_state[i].size() + impl_->ssm_state[i].size();
  return n;
}

size_t GpuModel::checked(int slot) const {
  if (slot < 0 || slot >= options_.max_batch)
    fail("slot {} outside the model's {} sequence slots (--max-batch)", slot, options_.max_batch);
  return size_t(slot);
}

int64_t GpuModel::position(int slot) const { return pos_[checked(slot)]; }

// Asynchronous on the stream (memsets): the slot's next call runs after them.
void GpuModel::reset(int slot) {
  Impl& m = *impl_;
  const size_t s = checked(slot);
  for (size_t i = 0; i < m.conv_state.size(); ++i) {
    if (m.conv_state[i].size()) fill_async(driver_, m.conv_state[i].ptr() + s * m.conv_slot, 0, m.conv_slot, stream_);
    if (m.ssm_state[i].size()) fill_async(driver_, m.ssm_state[i].ptr() + s * m.ssm_slot, 0, m.ssm_slot, stream_);
  }
  pos_[s] = 0;
  m.rng_params[s].reset();  // the next sample reseeds: a sequence's draws depend only on its seed
  m.pos.fill_u32(0, stream_, s * 4, 1);
}

namespace {

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

// Block layouts: K rows of every full-attention layer (each layer's part 256-byte aligned, laid out
// for the block's rows), then V rows; the conv rings of every DeltaNet layer, then their fp32 states.
std::vector<GpuModel::StateSegment> GpuModel::kv_segments(size_t s, int64_t rows, int64_t block_rows) const {
  const Impl& m = *impl_;
  if (!m.full_layers) return {};
  const size_t row_bytes = size_t(config_.num_kv_heads * config_.head_dim) * 2;  // bf16 [Hkv, D]
  const size_t pitch = size_t(options_.max_batch) * m.kv_slot, part = align256(row_bytes * size_t(block_rows));
  return {{m.k_all.ptr() + s * m.kv_slot, pitch, 0, part, row_bytes * size_t(rows), m.full_layers},
          {m.v_all.ptr() + s * m.kv_slot, pitch, m.full_layers * part, part, row_bytes * size_t(rows), m.full_layers}};
}

std::vector<GpuModel::StateSegment> GpuModel::recurrent_segments(size_t s) const {
  const Impl& m = *impl_;
  if (!m.linear_layers) return {};
  const size_t slots = size_t(options_.max_batch), conv = align256(m.conv_slot), ssm = align256(m.ssm_slot);
  return {{m.conv_all.ptr() + s * m.conv_slot, slots * m.conv_slot, 0, conv, m.conv_slot, m.linear_layers},
          {m.ssm_all.ptr() + s * m.ssm_slot, slots * m.ssm_slot, m.linear_layers * conv, ssm, m.ssm_slot,
           m.linear_layers}};
}

size_t GpuModel::kv_block_bytes(int64_t rows) const {
  if (rows < 0 || rows > options_.max_context) fail("kv_block_bytes: {} rows of a {}-row cache", rows, options_.max_context);
  const size_t row_bytes = size_t(config_.num_kv_heads * config_.head_dim) * 2;
  return 2 * impl_->full_layers * align256(row_bytes * size_t(rows));
}

size_t GpuModel::recurrent_block_bytes() const {
  return impl_->linear_layers * (align256(impl_->conv_slot) + align256(impl_->ssm_slot));
}

// One 2D copy per segment, or one copy per row where a pitch passes the device's limit.
size_t GpuModel::segment_copies(const StateSegment& g) const {
  const size_t limit = ctx_.device().max_pitch;
  return g.rows > 1 && (limit == 0 || std::max(g.pitch, g.block_pitch) > limit) ? g.rows : 1;
}

void GpuModel::copy_segment(const StateSegment& g, uint64_t block, bool to_block) const {
  if (g.width == 0 || g.rows == 0) return;
  const uint64_t slot_at = g.at, block_at = block + g.offset;
  if (segment_copies(g) == 1) {
    if (to_block)
      copy_2d_async(driver_, block_at, g.block_pitch, slot_at, g.pitch, g.width, g.rows, stream_);
    else
      copy_2d_async(driver_, slot_at, g.pitch, block_at, g.block_pitch, g.width, g.rows, stream_);
    return;
  }
  for (size_t r = 0; r < g.rows; ++r) {
    if (to_block)
      copy_async(driver_, block_at + r * g.block_pitch, slot_at + r * g.pitch, g.width, stream_);
    else
      copy_async(driver_, slot_at + r * g.pitch, block_at + r * g.block_pitch, g.width, stream_);
  }
}

size_t GpuModel::kv_block_copies() const {
  size_t n = 0;
  for (const StateSegment& g : kv_segments(0, 1, 1)) n += segment_copies(g);
  return n;
}

size_t GpuModel::recurrent_block_copies() const {
  size_t n = 0;
  for (const StateSegment& g : recurrent_segments(0)) n += segment_copies(g);
  return n;
}

void GpuModel::save_kv_block(int slot, int64_t rows, uint64_t dst) const {
  const size_t s = checked(slot);
  if (rows < 0 || rows > pos_[s]) fail("save_kv_block: {} rows of slot {}, which holds {}", rows, slot, pos_[s]);
  for (const StateSegment& g : kv_segments(s, rows, rows)) copy_segment(g, dst, true);
}

void GpuModel::save_recurrent_block(int slot, uint64_t dst) const {
  const size_t s = checked(slot);
  for (const StateSegment& g : recurrent_segments(s)) copy_segment(g, dst, true);
}

void GpuModel::restore_blocks(int slot, int64_t pos, uint64_t kv, int64_t kv_rows, uint64_t recurrent) {
  Impl& m = *impl_;
  const size_t s = checked(slot);
  if (pos < 0 || pos > options_.max_context || kv_rows < pos || kv_rows > options_.max_context)
    fail("restore_blocks: position {} from K/V rows of {} tokens (max context {})", pos, kv_rows, options_.max_context);
  for (const StateSegment& g : recurrent_segments(s)) copy_segment(g, recurrent, false);
  for (const StateSegment& g : kv_segments(s, pos, kv_rows)) copy_segment(g, kv, false);
  pos_[s] = pos;
  m.rng_params[s].reset();
  m.pos.fill_u32(uint32_t(pos), stream_, s * 4, 1);
}

void GpuModel::copy_block(uint64_t dst, uint64_t src, size_t bytes) const { copy_async(driver_, dst, src, bytes, stream_); }

std::vector<std::vector<std::byte>> GpuModel::save_recurrent_state(int slot) const {
  const Impl& m = *impl_;
  const size_t s = checked(slot);
  std::vector<std::vector<std::byte>> parts;
  for (size_t i = 0; i < m.conv_state.size(); ++i)
    for (const auto& [b, part] : {std::pair{&m.conv_state[i], m.conv_slot}, std::pair{&m.ssm_state[i], m.ssm_slot}}) {
      const size_t n = b->size() ? part : 0;
      parts.emplace_back(n);
      if (n) copy_async(driver_, uint64_t(reinterpret_cast<uintptr_t>(parts.back().data())), b->ptr() + s * part, n, stream_);
    }
  stream_.synchronize();
  return parts;
}

std::vector<std::vector<std::byte>> GpuModel::save_kv_rows(int64_t rows, int slot) const {
  const Impl& m = *impl_;
  const size_t s = checked(slot);
  if (rows < 0 || rows > options_.max_context) fail("save_kv_rows: {} rows of a {}-row cache", rows, options_.max_context);
  const size_t row_bytes = size_t(config_.num_kv_heads * config_.head_dim) * 2;  // bf16 [Hkv, D]
  std::vector<std::vector<std::byte>> parts;
  for (size_t i = 0; i < m.k_cache.size(); ++i)
    for (const Impl::StateView* b : {&m.k_cache[i], &m.v_cache[i]}) {
      const size_t n = b->size() ? row_bytes * size_t(rows) : 0;
      parts.emplace_back(n);
      if (n)
        copy_async(driver_, uint64_t(reinterpret_cast<uintptr_t>(parts.back().data())), b->ptr() + s * m.kv_slot, n,
                   stream_);
    }
  stream_.synchronize();
  return parts;
}

void GpuModel::restore_state(const std::vector<std::vector<std::byte>>& recurrent,
                             const std::vector<std::vector<std::byte>>& kv, int64_t pos, int slot) {
  Impl& m = *impl_;
  const size_t s = checked(slot);
  const size_t layers = m.k_cache.size();
  if (recurrent.size() != 2 * layers || kv.size() != 2 * layers)
    fail("restore_state: {} recurrent and {} K/V parts for a model of {} layers", recurrent.size(), kv.size(), layers);
  if (pos < 0 || pos > options_.max_context) fail("restore_state: position {} outside [0, {}]", pos, options_.max_context);
  const size_t row_bytes = size_t(config_.num_kv_heads * config_.head_dim) * 2;
  for (size_t i = 0; i < layers; ++i) {
    const std::pair<const Impl::StateView*, size_t> rec[2] = {{&m.conv_state[i], m.conv_slot},
                                                               {&m.ssm_state[i], m.ssm_slot}};
    const Impl::StateView* cache[2] = {&m.k_cache[i], &m.v_cache[i]};
    auto host = [](const std::vector<std::byte>& v) { return uint64_t(reinterpret_cast<uintptr_t>(v.data())); };
    for (int j = 0; j < 2; ++j) {
      const Impl::StateView& r = *rec[j].first;
      const size_t part = r.size() ? rec[j].second : 0;
      if (recurrent[2 * i + j].size() != part)
        fail("restore_state: layer {} recurrent part of {} bytes, the model's is {}", i, recurrent[2 * i + j].size(),
             part);
      if (part) copy_async(driver_, r.ptr() + s * part, host(recurrent[2 * i + j]), part, stream_);
      const Impl::StateView& c = *cache[j];
      const size_t n = c.size() ? row_bytes * size_t(pos) : 0;
      if (kv[2 * i + j].size() < n)
        fail("restore_state: layer {} K/V part of {} bytes, {} needed for {} rows", i, kv[2 * i + j].size(), n, pos);
      if (n) copy_async(driver_, c.ptr() + s * m.kv_slot, host(kv[2 * i + j]), n, stream_);
    }
  }
  pos_[s] = pos;
  m.rng_params[s].reset();
  const int32_t p = int32_t(pos);
  m.pos.upload(&p, 4, stream_, s * 4);
  stream_.synchronize();
}

void GpuModel::check_fits(size_t T, int slot) const {
  const int64_t pos = pos_[checked(slot)];
  if (pos + int64_t(T) > options_.max_context)
    fail("context overflow: {} tokens at position {} of slot {} exceed --max-context {}", T, pos, slot,
         options_.max_context);
}

namespace {

gpu::MoeWeights moe_weights(const GpuLayer& l) {
  return {l.router.ptr(),
          l.shared_expert_gate.ptr(),
          l.experts_gate_up.data(), l.experts_gate_up.scale_data(),
          l.experts_down.data(), l.experts_down.scale_data(),
          l.shared_gate_up.data(), l.shared_gate_up.scale_data(),
          l.shared_down.data(), l.shared_down.scale_data()};
}

std::string key_of(const std::vector<KernelSpec>& specs) {
  std::string key;
  for (const KernelSpec& s : specs) key += s.str() + ";";
  return key;
}

}  // namespace

// y [M, N] = x [M, K] · W^T: GEMV for M <= 16 and decode steps, else GEMM (W4A16 and FP8 dequantized
// into `dequant` first unless the GEMM dequantizes them in its loop: wgmma below kWgmmaDequantFirstM
// rows, mma.sync FP8).
void GpuModel::dense(const GpuMatrix& W, CUdeviceptr x, CUdeviceptr y, int M, bool out_f32, bool pdl, bool decode) {
  Impl& m = *impl_;
  if (decode && (M < 1 || M > kDecodeStepMaxRows))
    fail("dense [{} x {}]: a decode step of {} rows is outside [1, {}]", W.N, W.K, M, kDecodeStepMaxRows);
  const auto key = std::make_tuple(W.format, W.group, W.N, W.K, out_f32, M, Impl::DenseForm::Plain, decode);
  auto it = m.dense_plans.find(key);
  if (it == m.dense_plans.end()) {
    Impl::DensePlan p;
    const gpu::TunedTiles& tt = *m.tuned;
    p.gemv = decode || M <= 16;
    if (!p.gemv) {
      p.gemm = {W.N, W.K, tt.gemm(W.N, W.K, out_f32, M), out_f32};
      if (W.format != WeightFormat::BF16)  // wgmma: dequantized in the loop (small M) or first; mma.sync: FP8 in the loop
        p.gemm.group = p.gemm.tile.wgmma ? gpu::wgmma_gemm_group(W.group, M, W.K) : gpu::mma_gemm_group(W.group);
      p.f = &m.kernels.get(p.gemm.spec());
      gpu::prepare(p.gemm, *p.f);  // dynamic shared memory, once per loaded function (never inside a graph)
    } else if (W.format == WeightFormat::BF16) {
      p.bf16 = {W.N, W.K, tt.gemv_bf16(W.N, W.K, out_f32, std::min(M, 16)), out_f32};
      p.f = &m.kernels.get(p.bf16.spec());
    } else {
      p.w4 = {W.N, W.K, W.group, decode ? gpu::w4_decode_tile(tt.w4_gemv(W.N, W.K, out_f32, 1), W.group, M) : tt.w4_gemv(W.N, W.K, out_f32, M), out_f32};
      p.f = &m.kernels.get(p.w4.spec());
    }
    it = m.dense_plans.emplace(key, p).first;
  }
  const Impl::DensePlan& p = it->second;
  if (p.gemv) {
    if (W.format == WeightFormat::BF16)
      gpu::launch(p.bf16, *p.f, stream_, W.w.ptr(), x, y, M);
    else
      gpu::launch(p.w4, *p.f, stream_, W.data(), W.scale_data(), x, y, M, pdl);
    return;
  }
  if (p.gemm.group != 0) {
    gpu::launch(p.gemm, *p.f, stream_, x, W.data(), y, M, W.scale_data());
    return;
  }
  CUdeviceptr w = W.w.ptr();
  if (W.format != WeightFormat::BF16) {
    gpu::QuantizePlan q = gpu::quantize_plan(W.K, W.group);
    gpu::launch_dequantize(q, m.kernels.get(q.dequantize_spec()), stream_, W.data(), W.scale_data(), m.dequant.ptr(),
                           W.N);
    w = m.dequant.ptr();
  }
  gpu::launch(p.gemm, *p.f, stream_, x, w, y, M);
}

void GpuModel::dense_residual(const GpuMatrix& W, CUdeviceptr x, int M, CUdeviceptr norm_w, bool pdl, bool decode) {
  Impl& m = *impl_;
  if (W.format == WeightFormat::BF16 || M > (decode ? kDecodeStepMaxRows : 16))
    fail("dense_residual [{} x {}]: the residual epilogue needs W4A16 or FP8 weights and M <= {} (M = {})", W.N, W.K,
         decode ? kDecodeStepMaxRows : 16, M);
  const auto key = std::make_tuple(W.format, W.group, W.N, W.K, false, M, Impl::DenseForm::Residual, decode);
  auto it = m.dense_plans.find(key);
  if (it == m.dense_plans.end()) {
    Impl::DensePlan p;
    p.w4 = {W.N, W.K, W.group, decode ? gpu::w4_decode_tile(m.tuned->w4_gemv(W.N, W.K, false, 1), W.group, M) : m.tuned->w4_gemv(W.N, W.K, false, M), false, true};
    p.f = &m.kernels.get(p.w4.spec());
    it = m.dense_plans.emplace(key, p).first;
  }
  const gpu::ResidualNorm r{m.residual.ptr(), norm_w, m.normed.ptr(), m.tickets.ptr(), float(config_.rms_norm_eps)};
  gpu::launch(it->second.w4, *it->second.f, stream_, W.data(), W.scale_data(), x, r, M, pdl);
}

void GpuModel::dense_gated(const GpuMatrix& W, const gpu::GatedNormInput& x, CUdeviceptr y, bool pdl) {
  Impl& m = *impl_;
  if (W.format != WeightFormat::W4A16)
    fail("dense_gated [{} x {}]: the gated-norm input GEMV needs W4A16 weights", W.N, W.K);
  const auto key = std::make_tuple(W.format, W.group, W.N, W.K, false, 1, Impl::DenseForm::GatedInput, true);
  auto it = m.dense_plans.find(key);
  if (it == m.dense_plans.end()) {
    Impl::DensePlan p;
    p.w4 = {W.N, W.K, W.group, gpu::w4_decode_tile(m.tuned->w4_gemv(W.N, W.K, false, 1), W.group, 1)};
    p.w4.gated_dv = config_.linear_value_head_dim;
    p.f = &m.kernels.get(p.w4.spec());
    it = m.dense_plans.emplace(key, p).first;
  }
  gpu::launch(it->second.w4, *it->second.f, stream_, W.qweight.ptr(), W.scales.ptr(), x, y, 1, pdl);
}

const gpu::MoeKernels& GpuModel::moe_kernels(int T, const gpu::MoeScratch** scratch) {
  Impl& m = *impl_;
  const gpu::MoeTiles tiles = m.tuned->moe(T);
  const std::string key = key_of(gpu::moe_kernels(m.moe_shape, tiles));
  auto it = m.moe_variants.find(key);
  if (it == m.moe_variants.end()) {
    Impl::MoeVariant v;
    v.kernels = std::make_unique<gpu::MoeKernels>(jit_, ctx_, m.moe_shape, tiles);
    v.scratch = gpu::moe_scratch(m.moe_shape, tiles, options_.max_chunk, m.moe_ws.ptr());
    it = m.moe_variants.emplace(key, std::move(v)).first;
  }
  *scratch = &it->second.scratch;
  return *it->second.kernels;
}

const gpu::GdnKernels& GpuModel::gdn_kernels(int T) {
  Impl& m = *impl_;
  const gpu::GdnTiles tiles = m.tuned->gdn(T);
  const std::string key = tiles.key();
  auto it = m.gdn_variants.find(key);
  if (it == m.gdn_variants.end())
    it = m.gdn_variants.emplace(key, std::make_unique<gpu::GdnKernels>(jit_, ctx_, config_, tiles)).first;
  return *it->second;
}

// The decoder layers and the final norm over the T tokens in impl_->tokens: T tokens of one slot at
// its position (rows.batch false), or one token of each of T sequences (rows.batch: row b of slot
// batch_slots[b] at pos[that slot]; decode only). Leaves normed [T, H] = final_norm(residual).
void GpuModel::run_layers(int T, bool decode, Rows rows) {
  Impl& m = *impl_;
  const Config& c = config_;
  const int64_t H = c.hidden_size;
  const float eps = float(c.rms_norm_eps);
  KernelSet& ks = m.kernels;
  if (rows.batch && !decode) fail("run_layers: the batched rows are a decode step");
  const size_t slot = rows.batch ? 0 : checked(rows.slot);
  const CUdeviceptr pos = m.pos.ptr() + slot * 4;  // the slot's position (single rows)
  // The embeddings go to `delta`, which the first norm adds to a zeroed fp32 residual stream.
  const EmbeddingTile et = default_embedding_tile(H);
  ks.get(embedding_spec(H, et)).launch({{unsigned(T)}, {unsigned(et.threads)}}, stream_, weights_.embed.ptr(),
                                       m.tokens.ptr(), m.delta.ptr());
  m.residual.fill_bytes(0, stream_, 0, size_t(T * H) * 4);
  const RmsnormTile nt = default_rmsnorm_tile(H);
  const Function& norm_add = ks.get(rmsnorm_spec(H, true, nt, /*f32_residual=*/true));
  auto add_norm = [&](CUdeviceptr w) {  // residual += delta; normed = RMSNorm(residual)
    norm_add.launch({{unsigned(T)}, {unsigned(nt.threads)}}, stream_, m.delta.ptr(), m.residual.ptr(), w,
                    m.normed.ptr(), eps);
  };

  auto step_it = m.steps.find(T);
  if (step_it == m.steps.end()) {
    Impl::Step st;
    st.moe = &moe_kernels(T, &st.moe_scratch);
    st.moe_path = m.tuned->moe_grouped(T) && T <= st.moe->grouped_max_tokens ? gpu::MoePath::Decode : gpu::MoePath::Prefill;
    if (decode && st.moe_path != gpu::MoePath::Decode)
      fail("run_layers: a decode step of {} rows needs the MoE's grouped path (it takes {} tokens here)", T,
           st.moe->grouped_max_tokens);
    if (c.num_layers_of(LayerType::LinearAttention) > 0) st.gdn = &gdn_kernels(T);
    st.attn = m.attn;
    if (c.num_layers_of(LayerType::FullAttention) > 0) {
      st.attn.prefill = m.tuned->attention_prefill(T);
      st.attn.decode = m.tuned->attention_decode(T);
      st.attn_splits = gpu::attention_decode_splits(st.attn, options_.max_context, ctx_.device().sm_count);
    }
    step_it = m.steps.emplace(T, st).first;
  }
  const Impl::Step& st = step_it->second;
  const gpu::AttentionPlan& attn = st.attn;
  const gpu::GdnKernels* gdn = st.gdn;
  // The batched step: each row is one sequence's single token, so its attention runs the M = 1
  // decode tile with the single-sequence split count (a row's partials are those of the sequence
  // decoded alone).
  gpu::AttentionPlan batch_attn = m.attn;
  int batch_splits = 0;
  if (rows.batch && c.num_layers_of(LayerType::FullAttention) > 0) {
    batch_attn.decode = m.tuned->attention_decode(1);
    batch_splits = gpu::attention_decode_splits(batch_attn, options_.max_context, ctx_.device().sm_count);
  }
  const gpu::AttentionBatch ab{m.batch_slots.ptr(), m.pos.ptr(), int(options_.max_context)};
  // Its DeltaNet decode likewise runs the M = 1 tiles (gdn_decode_batch = gdn_decode_norm per sequence).
  const gpu::GdnKernels* gdn_one =
      rows.batch && c.num_layers_of(LayerType::LinearAttention) > 0 ? &gdn_kernels(1) : nullptr;

  // Decode steps (one sequence's token, or one token of each of T <= kDecodeStepMaxRows sequences) run
  // the same kernels with the same per-row arithmetic at every T: the dense projections as GEMVs with
  // the M = 1 tiles' K splits, the MoE's expert-grouped decode path. With fused_decode, calls of few
  // tokens (decode steps, prefill pieces of <= 8) fold each residual add + RMSNorm into the kernel that
  // produces the sub-layer's output (kernel_templates/decode_fusion.cuh): the W4A16 / FP8 output
  // projection's GEMV (post-attention norm) and the MoE down GEMV (the next layer's input norm, or the
  // final norm). Other calls, and bf16 output projections, run the rmsnorm kernel between sub-layers.
  // The decode kernels use programmatic dependent launch (sm_90): each waits (griddepcontrol.wait)
  // before reading what its predecessor wrote.
  const bool fuse = options_.fused_decode && (decode || T <= kMoeRouterSmallTokens);
  const bool fuse_out = fuse && options_.format != WeightFormat::BF16;
  // A single sequence's decode step without the residual epilogue: the DeltaNet out_proj (W4A16)
  // takes the gated RMSNorm as its input (gemv_w4a16_gated), and gdn_decode ends with the state.
  const bool gated_out = options_.format == WeightFormat::W4A16 && !fuse_out;
  const bool pdl = pdl_for(T);
  const int64_t layers = int64_t(weights_.layers.size());
  for (int64_t i = 0; i < layers; ++i) {
    const GpuLayer& l = weights_.layers[size_t(i)];
    if (i == 0 || !fuse) add_norm(l.input_norm.ptr());
    // The output projection W of the mixer, from x = its output: residual += x . W^T, normed = post_norm.
    auto out_proj = [&](const GpuMatrix& W, CUdeviceptr x) {
      if (fuse_out) {
        dense_residual(W, x, T, l.post_norm.ptr(), pdl, decode);
        return;
      }
      dense(W, x, m.delta.ptr(), T, false, false, decode);
      add_norm(l.post_norm.ptr());
    };

    if (l.type == LayerType::FullAttention) {
      dense(l.qkv, m.normed.ptr(), m.proj.ptr(), T, false, pdl, decode);
      if (rows.batch) {
        gpu::launch_qk_norm_rope_batch(batch_attn, ks.get(batch_attn.qk_norm_rope_batch_spec()), stream_, m.proj.ptr(),
                                       l.q_norm.ptr(), l.k_norm.ptr(), m.q.ptr(), m.k_cache[i].ptr(),
                                       m.v_cache[i].ptr(), ab, T, pdl);
        gpu::launch_attention_decode_batch(batch_attn, ks.get(batch_attn.decode_batch_spec()),
                                           ks.get(batch_attn.decode_merge_batch_spec()), stream_, m.q.ptr(),
                                           m.k_cache[i].ptr(), m.v_cache[i].ptr(), m.proj.ptr(), m.mix.ptr(),
                                           m.attn_scratch.ptr(), batch_splits, ab, T, pdl);
      } else {
        const CUdeviceptr kc = m.k_cache[i].ptr() + slot * m.kv_slot, vc = m.v_cache[i].ptr() + slot * m.kv_slot;
        gpu::launch_qk_norm_rope(attn, ks.get(attn.qk_norm_rope_spec()), stream_, m.proj.ptr(), l.q_norm.ptr(),
                                 l.k_norm.ptr(), m.q.ptr(), kc, vc, pos, T, int(options_.max_context), pdl);
        if (decode && T <= attn.max_decode_tokens())
          gpu::launch_attention_decode(attn, ks.get(attn.decode_spec()), ks.get(attn.decode_merge_spec()), stream_,
                                       m.q.ptr(), kc, vc, m.proj.ptr(), m.mix.ptr(), m.attn_scratch.ptr(),
                                       st.attn_splits, pos, T, pdl);
        else
          gpu::launch_attention_prefill(attn, ks.get(attn.prefill_spec()), stream_, m.q.ptr(), kc, vc, m.proj.ptr(),
                                        m.mix.ptr(), pos, T);
      }
      out_proj(l.o_proj, m.mix.ptr());
    } else {
      const int stride = int(l.in_proj.N);
      dense(l.in_proj, m.normed.ptr(), m.proj.ptr(), T, false, pdl, decode);
      const gpu::GdnLayerWeights gw{l.conv1d.ptr(), l.A_log.ptr(), l.dt_bias.ptr(), l.gdn_norm.ptr()};
      const gpu::GdnLayerState st{m.conv_state[i].ptr() + slot * m.conv_slot, m.ssm_state[i].ptr() + slot * m.ssm_slot};
      if (gated_out && !rows.batch && decode && T == 1) {
        // o fp32 only; out_proj applies the gated RMSNorm to its input (no norm tail in gdn_decode).
        gdn->decode(stream_, m.proj.ptr(), stride, pos, gw, st, m.gdn_o.ptr(), pdl);
        const CUdeviceptr z = m.proj.ptr() + CUdeviceptr(c.linear_conv_dim() * 2);
        dense_gated(l.out_proj, {m.gdn_o.ptr(), z, l.gdn_norm.ptr(), stride, eps}, m.delta.ptr(),
                    pdl && options_.gdn_out_pdl);
        add_norm(l.post_norm.ptr());
      } else {
        if (rows.batch) {
          const gpu::GdnLayerState all{m.conv_state[i].ptr(), m.ssm_state[i].ptr()};  // slot 0; the kernel offsets
          gdn_one->decode_batch(stream_, m.proj.ptr(), stride, T, m.batch_slots.ptr(), m.pos.ptr(), gw, all,
                                m.gdn_o.ptr(), m.mix.ptr(), m.tickets.ptr() + 4, pdl);
        } else if (decode && T == 1) {
          gdn->decode_norm(stream_, m.proj.ptr(), stride, pos, gw, st, m.gdn_o.ptr(), m.mix.ptr(), m.tickets.ptr() + 4,
                           pdl);
        } else {  // the chunked delta rule at every T (the recurrence when options_.chunked_gdn is off)
          gdn->prefill(stream_, m.proj.ptr(), stride, T, pos, gw, st, gpu::gdn_workspace(c, T, m.gdn_ws.ptr()),
                       m.mix.ptr(), options_.chunked_gdn);
        }
        out_proj(l.out_proj, m.mix.ptr());
      }
    }

    if (fuse) {  // residual += MoE(normed); normed = the next layer's input norm (or the final norm)
      const DeviceBuffer& next = i + 1 < layers ? weights_.layers[size_t(i + 1)].input_norm : weights_.final_norm;
      const gpu::ResidualNorm r{m.residual.ptr(), next.ptr(), m.normed.ptr(), m.tickets.ptr(), eps};
      gpu::moe_forward_decode(*st.moe, stream_, moe_weights(l), *st.moe_scratch, m.normed.ptr(), r, T);
    } else {
      gpu::moe_forward(*st.moe, stream_, moe_weights(l), *st.moe_scratch, m.normed.ptr(), m.delta.ptr(), T, st.moe_path);
    }
  }
  if (!fuse) add_norm(weights_.final_norm.ptr());
}

static_assert(kMaxStepRows == kDecodeStepMaxRows, "a batched step's rows are the decode kernels' limit");
static_assert(kDecodeStepMaxRows <= kMoeGroupedMaxTokens, "a decode step's rows must fit the MoE's grouped path");

bool GpuModel::pdl_for(int64_t rows) const {
  return rows <= kDecodeStepMaxRows && options_.pdl && ctx_.device().cc_major >= 9;
}

// fp32 logits [vocab] of the last of T rows of normed, into impl_->logits.
void GpuModel::lm_head(int T) {
  Impl& m = *impl_;
  const size_t row = size_t(T - 1) * size_t(config_.hidden_size) * 2;
  dense(weights_.lm_head, m.normed.ptr() + row, m.logits.ptr(), 1, true, pdl_for(1), /*decode=*/true);
}

std::vector<float> GpuModel::forward(std::span<const int32_t> tokens, bool all_logits, int slot) {
  if (tokens.empty()) fail("forward: no tokens");
  for (size_t t = 0; t < tokens.size(); ++t)
    if (tokens[t] < 0 || tokens[t] >= config_.vocab_size)
      fail("token {} is id {}, outside the vocabulary [0, {})", t, tokens[t], config_.vocab_size);
  check_fits(tokens.size(), slot);
  Impl& m = *impl_;
  const int64_t V = config_.vocab_size, H = config_.hidden_size;
  std::vector<float> out;
  for (size_t begin = 0; begin < tokens.size(); begin += size_t(options_.max_chunk)) {
    const int T = int(std::min<size_t>(size_t(options_.max_chunk), tokens.size() - begin));
    m.tokens.upload(tokens.data() + begin, size_t(T) * 4, stream_);
    run_layers(T, /*decode=*/false, Rows{slot, false});
    const bool last = begin + size_t(T) == tokens.size();
    if (all_logits) {
      for (int r0 = 0; r0 < T; r0 += 16) {  // lm_head in GEMV chunks of up to 16 rows
        const int rows = std::min(16, T - r0);
        dense(weights_.lm_head, m.normed.ptr() + size_t(r0 * H) * 2, m.logits.ptr(), rows, true);
        const size_t at = out.size();
        out.resize(at + size_t(rows * V));
        m.logits.download(out.data() + at, size_t(rows * V) * 4, stream_);
        stream_.synchronize();
      }
    } else if (last) {
      lm_head(T);
      out.resize(size_t(V));
      m.logits.download(out.data(), size_t(V) * 4, stream_);
    }
    m.kernels.get(step_spec()).launch({{1}, {1}}, stream_, m.pos.ptr() + size_t(slot) * 4, T, CUdeviceptr(0),
                                      CUdeviceptr(0));
    stream_.synchronize();
    pos_[size_t(slot)] += T;
  }
  return out;
}

void GpuModel::sample(const SamplingParams& sp, int slot) {
  Impl& m = *impl_;
  const CUdeviceptr rng = m.rng.ptr() + size_t(slot) * 16;
  const bool greedy = sp.temperature <= 0.f || sp.top_k == 1;
  if (greedy)
    gpu::launch_argmax(m.sample, m.kernels.get(m.sample.argmax_spec()), stream_, m.logits.ptr(), m.next_id.ptr(),
                       m.argmax_ws.ptr());
  else if (gpu::topk_sample_serves(sp))
    gpu::launch_topk_sample(m.topk, m.kernels.get(m.topk.partial_spec()), m.kernels.get(m.topk.final_spec()), stream_,
                            m.logits.ptr(), m.next_id.ptr(), rng, m.topk_ws.ptr(), sp);
  else
    gpu::launch_sample(m.sample, m.kernels.get(m.sample.sample_spec()), stream_, m.logits.ptr(), m.next_id.ptr(), rng,
                       sp);
}

void GpuModel::seed(int slot, const SamplingParams& sp) {
  Impl& m = *impl_;
  std::optional<SamplingParams>& seeded = m.rng_params[checked(slot)];
  if (seeded && seeded->seed == sp.seed) return;
  const uint64_t rng[2] = {sp.seed, 0};
  m.rng.upload(rng, 16, stream_, size_t(slot) * 16);
  seeded = sp;
}

int32_t GpuModel::prefill(std::span<const int32_t> tokens, const SamplingParams& sp, int slot) {
  Impl& m = *impl_;
  checked(slot);
  seed(slot, sp);
  forward(tokens, false, slot);  // leaves the last row's logits in impl_->logits
  sample(sp, slot);
  int32_t id = 0;
  m.next_id.download(&id, 4, stream_);
  stream_.synchronize();
  return id;
}

int32_t GpuModel::decode(int32_t token, const SamplingParams& sp, int slot) { return decode_steps(token, 1, sp, slot); }

std::optional<GraphNodeCounts> GpuModel::decode_graph_nodes() const { return impl_->decode_nodes; }

std::optional<GraphNodeCounts> GpuModel::batch_graph_nodes(int bucket) const {
  auto it = impl_->batch_nodes.find(bucket);
  return it == impl_->batch_nodes.end() ? std::nullopt : std::optional<GraphNodeCounts>(it->second);
}

int32_t GpuModel::decode_steps(int32_t token, int64_t steps, const SamplingParams& sp, int slot,
                               std::vector<double>* step_ms) {
  Impl& m = *impl_;
  checked(slot);
  if (token < 0 || token >= config_.vocab_size)
    fail("token id {} is outside the vocabulary [0, {})", token, config_.vocab_size);
  if (steps < 1) fail("decode: steps = {} must be positive", steps);
  check_fits(size_t(steps), slot);
  seed(slot, sp);
  const auto same = [](const SamplingParams& a, const SamplingParams& b) {
    return a.temperature == b.temperature && a.top_k == b.top_k && a.top_p == b.top_p;
  };
  // The step's input is next_id (the host's token now, the previous step's sample after).
  m.next_id.upload(&token, 4, stream_);
  auto step = [&] {
    m.tokens.copy_from(m.next_id, 4, stream_);
    run_layers(1, /*decode=*/true, Rows{slot, false});
    lm_head(1);
    sample(sp, slot);
    m.kernels.get(step_spec()).launch({{1}, {1}}, stream_, m.pos.ptr() + size_t(slot) * 4, 1, CUdeviceptr(0),
                                      CUdeviceptr(0));
  };
  int64_t done = 0;
  auto it = m.decode_graphs.find(slot);
  if (it == m.decode_graphs.end() || !same(it->second.sampling, sp)) {
    // The first step of a slot and sampling setting runs eagerly (it also loads every decode
    // kernel), then the step is captured; later steps replay it.
    if (it != m.decode_graphs.end()) m.decode_graphs.erase(it);
    step();
    stream_.synchronize();
    Graph g = Graph::capture(driver_, stream_, step);
    m.decode_nodes = g.node_counts();
    it = m.decode_graphs.emplace(slot, Impl::SlotGraph{g.instantiate(), sp}).first;
    done = 1;
  }
  if (step_ms) {  // an event between every two replays
    std::vector<Event> events;
    events.emplace_back(driver_).record(stream_);
    for (; done < steps; ++done) {
      it->second.exec.launch(stream_);
      events.emplace_back(driver_).record(stream_);
    }
    events.back().synchronize();
    for (size_t i = 1; i < events.size(); ++i) step_ms->push_back(double(events[i].elapsed_ms_since(events[i - 1])));
  } else {
    for (; done < steps; ++done) it->second.exec.launch(stream_);
  }
  int32_t id = 0;
  m.next_id.download(&id, 4, stream_);
  stream_.synchronize();
  pos_[size_t(slot)] += steps;
  return id;
}

void GpuModel::check_batch(std::span<const BatchEntry> batch) const {
  if (batch.empty() || int(batch.size()) > options_.max_batch)
    fail("decode_batch: {} sequences for {} slots (--max-batch {})", batch.size(), options_.max_batch,
         options_.max_batch);
  std::vector<bool> seen(size_t(options_.max_batch), false);
  for (const BatchEntry& e : batch) {
    const size_t s = checked(e.slot);
    if (seen[s]) fail("decode_batch: slot {} appears twice in one step", e.slot);
    seen[s] = true;
    if (e.token < 0 || e.token >= config_.vocab_size)
      fail("decode_batch: slot {}: token id {} is outside the vocabulary [0, {})", e.slot, e.token, config_.vocab_size);
    gpu::check_sampling(e.sampling);
  }
}

void GpuModel::run_batch(std::span<const BatchEntry> batch, int bucket, int64_t steps, std::vector<double>* step_ms) {
  Impl& m = *impl_;
  const size_t B = size_t(bucket), Bmax = size_t(std::min(options_.max_batch, kMaxStepRows));  // the buffers' rows
  if (B > Bmax) fail("run_batch: a step of {} rows exceeds the {} rows of the batch buffers", B, Bmax);
  // Rows past the batch are padding: slot -1, token 0, greedy.
  std::vector<int32_t> slots(B, -1), tokens(B, 0), params(3 * Bmax, 0);
  float* temperature = reinterpret_cast<float*>(params.data());
  int32_t* top_k = params.data() + Bmax;
  float* top_p = reinterpret_cast<float*>(params.data() + 2 * Bmax);
  for (size_t b = 0; b < B; ++b) top_p[b] = 1.f;
  for (size_t b = 0; b < batch.size(); ++b) {
    const BatchEntry& e = batch[b];
    slots[b] = e.slot;
    tokens[b] = e.token;
    temperature[b] = e.want_logits ? 0.f : e.sampling.temperature;  // a logits row: drawn greedily, not returned
    top_k[b] = e.want_logits ? 0 : e.sampling.top_k;
    top_p[b] = e.want_logits ? 1.f : e.sampling.top_p;
    if (!e.want_logits) seed(e.slot, e.sampling);
  }
  m.batch_slots.upload(slots.data(), B * 4, stream_);
  m.tokens.upload(tokens.data(), B * 4, stream_);
  m.batch_params.upload(params.data(), params.size() * 4, stream_);
  const gpu::BatchSampleParams bp{m.batch_params.ptr(), m.batch_params.ptr() + Bmax * 4,
                                  m.batch_params.ptr() + 2 * Bmax * 4};
  auto step = [&] {
    run_layers(bucket, /*decode=*/true, Rows{0, true});
    dense(weights_.lm_head, m.normed.ptr(), m.logits.ptr(), bucket, true, pdl_for(bucket), /*decode=*/true);
    gpu::launch_sample_batch(m.batch_sample, m.kernels.get(m.batch_sample.topk.partial_batch_spec()),
                             m.kernels.get(m.batch_sample.topk.final_batch_spec()),
                             m.kernels.get(m.batch_sample.sample_spec()), stream_, m.logits.ptr(), m.batch_next.ptr(),
                             m.rng.ptr(), m.batch_slots.ptr(), bp, m.batch_topk_ws.ptr(), bucket);
    m.kernels.get(step_batch_spec())
        .launch({{1}, {unsigned(std::min(bucket, 1024))}}, stream_, m.pos.ptr(), m.batch_slots.ptr(), bucket,
                m.batch_next.ptr(), m.tokens.ptr());
  };
  int64_t done = 0;
  auto it = m.batch_graphs.find(bucket);
  if (it == m.batch_graphs.end()) {
    // The first step of a bucket runs eagerly (it loads its kernels and plans), then it is captured.
    step();
    stream_.synchronize();
    Graph g = Graph::capture(driver_, stream_, step);
    m.batch_nodes[bucket] = g.node_counts();
    it = m.batch_graphs.emplace(bucket, g.instantiate()).first;
    done = 1;
  }
  if (step_ms) {  // an event between every two replays
    std::vector<Event> events;
    events.emplace_back(driver_).record(stream_);
    for (; done < steps; ++done) {
      it->second.launch(stream_);
      events.emplace_back(driver_).record(stream_);
    }
    events.back().synchronize();
    for (size_t i = 1; i < events.size(); ++i) step_ms->push_back(double(events[i].elapsed_ms_since(events[i - 1])));
  } else {
    for (; done < steps; ++done) it->second.launch(stream_);
  }
  for (const BatchEntry& e : batch) pos_[size_t(e.slot)] += steps;
}

GpuModel::BatchResult GpuModel::decode_batch(std::span<const BatchEntry> batch) {
  check_batch(batch);
  for (const BatchEntry& e : batch) check_fits(1, e.slot);
  Impl& m = *impl_;
  const int64_t V = config_.vocab_size;
  BatchResult out;
  out.ids.assign(batch.size(), -1);
  out.logits.resize(batch.size());
  if (batch.size() == 1) {  // one sequence: its slot's single-sequence graph (the fused fast path)
    const BatchEntry& e = batch[0];
    const int32_t id = decode(e.token, e.sampling, e.slot);
    if (e.want_logits) {  // the step's logits (the graph's sample of them is discarded)
      out.logits[0].resize(size_t(V));
      m.logits.download(out.logits[0].data(), size_t(V) * 4, stream_);
      stream_.synchronize();
    } else {
      out.ids[0] = id;
    }
    return out;
  }
  // A step runs at most kMaxStepRows rows: larger batches run as consecutive steps (same results).
  for (const auto& [first, count] : step_groups(int(batch.size()), options_.max_batch)) {
    const std::span<const BatchEntry> group = batch.subspan(size_t(first), size_t(count));
    run_batch(group, decode_bucket(count, options_.max_batch), 1, nullptr);
    std::vector<int32_t> ids(group.size());
    m.batch_next.download(ids.data(), ids.size() * 4, stream_);
    for (size_t b = 0; b < group.size(); ++b)
      if (group[b].want_logits) {
        out.logits[size_t(first) + b].resize(size_t(V));
        m.logits.download(out.logits[size_t(first) + b].data(), size_t(V) * 4, stream_, b * size_t(V) * 4);
      }
    stream_.synchronize();
    for (size_t b = 0; b < group.size(); ++b)
      if (!group[b].want_logits) out.ids[size_t(first) + b] = ids[b];
  }
  return out;
}

std::vector<int32_t> GpuModel::decode_batch_steps(std::span<const BatchEntry> batch, int64_t steps,
                                                  std::vector<double>* step_ms) {
  check_batch(batch);
  if (steps < 1) fail("decode_batch_steps: steps = {} must be positive", steps);
  for (const BatchEntry& e : batch) check_fits(size_t(steps), e.slot);
  if (batch.size() == 1) {
    const BatchEntry& e = batch[0];
    return {decode_steps(e.token, steps, e.sampling, e.slot, step_ms)};
  }
  std::vector<BatchEntry> rows(batch.begin(), batch.end());
  for (BatchEntry& e : rows) e.want_logits = false;
  // Groups of at most kMaxStepRows rows, each chained `steps` times (sequences are independent).
  // step_ms: with several groups, each group's steps in turn.
  std::vector<int32_t> ids(rows.size());
  for (const auto& [first, count] : step_groups(int(rows.size()), options_.max_batch)) {
    run_batch(std::span<const BatchEntry>(rows).subspan(size_t(first), size_t(count)),
              decode_bucket(count, options_.max_batch), steps, step_ms);
    impl_->batch_next.download(ids.data() + first, size_t(count) * 4, stream_);
    stream_.synchronize();
  }
  return ids;
}

}  // namespace q35::qwen35
