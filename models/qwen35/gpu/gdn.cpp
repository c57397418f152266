#include "models/qwen35/gpu/gdn.h"

#include <fmt/format.h>

#include <algorithm>

#include "runtime/core/error.h"

namespace q35::qwen35::gpu {

namespace {

constexpr int64_t kChunk = 64;  // q35k::kGdnChunk

std::string str(int64_t v) { return std::to_string(v); }

// The shape arguments every GDN kernel template starts with.
std::vector<std::pair<std::string, std::string>> head_args(const GdnShape& s) {
  return {{"HK", str(s.hk)}, {"HV", str(s.hv)}, {"DK", str(s.dk)}, {"DV", str(s.dv)}};
}

template <typename Tile>
void check_tile(const char* kernel, const Tile& tile, const GdnShape& s) {
  if (std::string why = why_invalid(tile, s); !why.empty())
    fail("{} [Hk = {}, Hv = {}, dk = {}, dv = {}]: invalid tile: {}", kernel, s.hk, s.hv, s.dk, s.dv, why);
}

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

Function load(JitEngine& jit, const Context& ctx, const KernelSpec& spec) { return jit.load(spec, ctx); }

}  // namespace

GdnShape gdn_shape(const Config& cfg) {
  GdnShape s{cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
             cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim};
  if (std::string why = why_unsupported(s); !why.empty()) fail("config.json: Gated DeltaNet shape not supported: {}", why);
  return s;
}

int64_t gdn_proj_columns(const Config& cfg) {
  return cfg.linear_conv_dim() + cfg.linear_value_dim() + 2 * cfg.linear_num_value_heads;
}

size_t gdn_conv_state_bytes(const Config& cfg) { return size_t(cfg.linear_conv_kernel_dim * cfg.linear_conv_dim()) * 2; }

size_t gdn_ssm_state_bytes(const Config& cfg) {
  return size_t(cfg.linear_num_value_heads * cfg.linear_value_head_dim * cfg.linear_key_head_dim) * 4;
}

GdnTiles GdnTiles::defaults(const GdnShape& s) {
  return {default_gdn_prologue_tile(s), default_gdn_recurrent_tile(s), default_gdn_chunk_tile(s),
          default_gated_rmsnorm_tile(s)};
}

std::string GdnTiles::key() const {
  return fmt::format("{}/{}/{}/{}/{}{}{}/{}", prologue.tokens, prologue.warps, recurrent.rows, recurrent.warps, chunk.vs,
                     chunk.fused ? "f" : "", chunk.cluster ? "c" : "", norm.heads);
}

KernelSpec gdn_prologue_spec(const Config& cfg, const GdnPrologueTile& tile) {
  const GdnShape s = gdn_shape(cfg);
  check_tile("gdn_prologue", tile, s);
  auto args = head_args(s);
  args.insert(args.end(), {{"KC", str(s.kc)}, {"TOKENS", str(tile.tokens)}, {"WARPS", str(tile.warps)}});
  return {"gdn_prologue", "gdn_prologue", args};
}

KernelSpec gdn_recurrent_spec(const Config& cfg, const GdnRecurrentTile& tile) {
  const GdnShape s = gdn_shape(cfg);
  check_tile("gdn_recurrent", tile, s);
  auto args = head_args(s);
  args.insert(args.end(), {{"ROWS", str(tile.rows)}, {"WARPS", str(tile.warps)}});
  return {"gdn_recurrent", "gdn_recurrent", args};
}

KernelSpec gdn_decode_spec(const Config& cfg, const GdnRecurrentTile& tile) {
  const GdnShape s = gdn_shape(cfg);
  check_tile("gdn_decode", tile, s);
  auto args = head_args(s);
  args.insert(args.end(), {{"KC", str(s.kc)}, {"ROWS", str(tile.rows)}, {"WARPS", str(tile.warps)}});
  return {"gdn_recurrent", "gdn_decode", args};
}

KernelSpec gdn_decode_norm_spec(const Config& cfg, const GdnRecurrentTile& tile) {
  KernelSpec s = gdn_decode_spec(cfg, tile);
  s.kernel = "gdn_decode_norm";
  return s;
}

KernelSpec gdn_decode_batch_spec(const Config& cfg, const GdnRecurrentTile& tile) {
  KernelSpec s = gdn_decode_spec(cfg, tile);
  s.kernel = "gdn_decode_batch";
  return s;
}

KernelSpec gdn_chunk_prepare_spec(const Config& cfg) {
  const GdnShape s = gdn_shape(cfg);
  check_tile("gdn_chunk_prepare", default_gdn_chunk_tile(s), s);
  return {"gdn_chunked", "gdn_chunk_prepare", head_args(s)};
}

KernelSpec gdn_chunk_state_spec(const Config& cfg, const GdnChunkTile& tile) {
  const GdnShape s = gdn_shape(cfg);
  check_tile("gdn_chunk_state", tile, s);
  auto args = head_args(s);
  args.emplace_back("VS", str(tile.vs));
  return {"gdn_chunked", "gdn_chunk_state", args};
}

KernelSpec gdn_chunk_output_spec(const Config& cfg) {
  const GdnShape s = gdn_shape(cfg);
  check_tile("gdn_chunk_output", default_gdn_chunk_tile(s), s);
  return {"gdn_chunked", "gdn_chunk_output", head_args(s)};
}

KernelSpec gdn_chunk_fused_spec(const Config& cfg, const GdnChunkTile& tile, bool cluster) {
  const GdnShape s = gdn_shape(cfg);
  check_tile("gdn_chunk_fused", tile, s);
  if (!tile.fused) fail("gdn_chunk_fused: the chunk tile (vs = {}) is not fused", tile.vs);
  auto args = head_args(s);
  args.emplace_back("VS", str(tile.vs));
  return {"gdn_chunked", cluster ? "gdn_chunk_fused_cluster" : "gdn_chunk_fused", args};
}

KernelSpec gated_rmsnorm_spec(const Config& cfg, const GatedRmsnormTile& tile) {
  const GdnShape s = gdn_shape(cfg);
  check_tile("gated_rmsnorm", tile, s);
  return {"gated_rmsnorm", "gated_rmsnorm", {{"HV", str(s.hv)}, {"DV", str(s.dv)}, {"HEADS", str(tile.heads)}}};
}

std::vector<KernelSpec> gdn_kernels(const Config& cfg, const std::string& arch) {
  if (std::find(cfg.layer_types.begin(), cfg.layer_types.end(), LayerType::LinearAttention) == cfg.layer_types.end())
    return {};
  const GdnTiles t = GdnTiles::defaults(gdn_shape(cfg));
  std::vector<KernelSpec> out = {gdn_decode_spec(cfg, t.recurrent), gdn_decode_norm_spec(cfg, t.recurrent),
                                 gated_rmsnorm_spec(cfg, t.norm),
                                 gdn_prologue_spec(cfg, t.prologue), gdn_chunk_prepare_spec(cfg)};
  if (t.chunk.fused) {
    out.push_back(gdn_chunk_fused_spec(cfg, t.chunk, t.chunk.cluster && gdn_arch_has_cluster(arch)));
  } else {
    out.push_back(gdn_chunk_state_spec(cfg, t.chunk));
    out.push_back(gdn_chunk_output_spec(cfg));
  }
  out.push_back(gdn_recurrent_spec(cfg, t.recurrent));
  return out;
}

std::vector<KernelSpec> gdn_batch_kernels(const Config& cfg) {
  if (std::find(cfg.layer_types.begin(), cfg.layer_types.end(), LayerType::LinearAttention) == cfg.layer_types.end())
    return {};
  return {gdn_decode_batch_spec(cfg, GdnTiles::defaults(gdn_shape(cfg)).recurrent)};
}

size_t gdn_workspace_bytes(const Config& cfg, int64_t T) {
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  const size_t h = size_t(chunks * cfg.linear_value_dim() * cfg.linear_key_head_dim) * 4;
  const size_t o = size_t(T * cfg.linear_value_dim()) * 4;
  return size_t(gdn_workspace(cfg, T, 0).h) + align256(std::max(h, o));
}

GdnWorkspace gdn_workspace(const Config& cfg, int64_t T, CUdeviceptr base) {
  if (T < 1) fail("gdn_workspace: T = {} tokens, expected >= 1", T);
  const int64_t hv = cfg.linear_num_value_heads, chunks = (T + kChunk - 1) / kChunk, rows = chunks * kChunk;
  const int64_t dk = cfg.linear_key_head_dim, dv = cfg.linear_value_head_dim;
  GdnWorkspace ws;
  CUdeviceptr p = base;
  auto take = [&](CUdeviceptr& field, size_t bytes) {
    field = p;
    p += align256(bytes);
  };
  take(ws.qkv, size_t(T * cfg.linear_conv_dim()) * 2);
  take(ws.g, size_t(T * hv) * 4);
  take(ws.beta, size_t(T * hv) * 4);
  take(ws.gam, size_t(rows * hv) * 4);
  take(ws.u, size_t(rows * hv * dv) * 4);
  take(ws.w, size_t(rows * hv * dk) * 2 * 2);
  take(ws.vn, size_t(rows * hv * dv) * 2 * 2);
  ws.h = ws.o = p;  // the chunked path's h or the recurrence's o
  return ws;
}

GdnKernels::GdnKernels(JitEngine& jit, const Context& ctx, const Config& cfg, const GdnTiles& tiles)
    : shape_(gdn_shape(cfg)),
      tiles_(tiles),
      eps_(float(cfg.rms_norm_eps)),
      cluster_(tiles.chunk.fused && tiles.chunk.cluster && gdn_arch_has_cluster(ctx.device().arch())),
      prologue_(load(jit, ctx, gdn_prologue_spec(cfg, tiles.prologue))),
      recurrent_(load(jit, ctx, gdn_recurrent_spec(cfg, tiles.recurrent))),
      decode_(load(jit, ctx, gdn_decode_spec(cfg, tiles.recurrent))),
      decode_norm_(load(jit, ctx, gdn_decode_norm_spec(cfg, tiles.recurrent))),
      decode_batch_(load(jit, ctx, gdn_decode_batch_spec(cfg, tiles.recurrent))),
      chunk_prepare_(load(jit, ctx, gdn_chunk_prepare_spec(cfg))),
      norm_(load(jit, ctx, gated_rmsnorm_spec(cfg, tiles.norm))) {
  chunk_prepare_.set_max_dynamic_smem(gdn_chunk_prepare_smem_bytes(shape_));
  if (tiles_.chunk.fused) {
    chunk_fused_.emplace(load(jit, ctx, gdn_chunk_fused_spec(cfg, tiles_.chunk, cluster_)));
    chunk_fused_->set_max_dynamic_smem(gdn_chunk_fused_smem_bytes(shape_, tiles_.chunk, cluster_));
  } else {
    chunk_state_.emplace(load(jit, ctx, gdn_chunk_state_spec(cfg, tiles_.chunk)));
    chunk_state_->set_max_dynamic_smem(gdn_chunk_state_smem_bytes(shape_, tiles_.chunk));
    chunk_output_.emplace(load(jit, ctx, gdn_chunk_output_spec(cfg)));
    chunk_output_->set_max_dynamic_smem(gdn_chunk_output_smem_bytes(shape_));
  }
}

void GdnKernels::check_proj(int row_stride, int T) const {
  const int64_t cols = shape_.conv_dim() + shape_.hv * shape_.dv + 2 * shape_.hv;
  if (row_stride < cols || row_stride % 4 != 0)
    fail("gdn: projection row stride {} must be >= {} (qkv | z | b | a) and a multiple of 4", row_stride, cols);
  if (T < 1) fail("gdn: T = {} tokens, expected >= 1", T);
}

void GdnKernels::decode(const Stream& stream, CUdeviceptr proj, int row_stride, CUdeviceptr pos0,
                        const GdnLayerWeights& w, const GdnLayerState& st, CUdeviceptr o, bool pdl) const {
  check_proj(row_stride, 1);
  const GdnRecurrentTile& t = tiles_.recurrent;
  decode_.launch({{unsigned(shape_.hv), unsigned(shape_.dv / t.rows)}, {unsigned(32 * t.warps)}, 0, pdl}, stream, proj,
                 w.conv_w, w.A_log, w.dt_bias, st.conv, pos0, st.ssm, o);
}

void GdnKernels::decode_norm(const Stream& stream, CUdeviceptr proj, int row_stride, CUdeviceptr pos0,
                             const GdnLayerWeights& w, const GdnLayerState& st, CUdeviceptr o, CUdeviceptr y,
                             CUdeviceptr counters, bool pdl) const {
  check_proj(row_stride, 1);
  if (!counters) fail("gdn_decode_norm: the per-head counters (int32 [{}], zeroed once) are not set", shape_.hv);
  const GdnRecurrentTile& t = tiles_.recurrent;
  decode_norm_.launch({{unsigned(shape_.hv), unsigned(shape_.dv / t.rows)}, {unsigned(32 * t.warps)}, 0, pdl}, stream,
                      proj, w.conv_w, w.A_log, w.dt_bias, st.conv, pos0, st.ssm, o, w.norm_w, y, counters, eps_);
}

void GdnKernels::decode_batch(const Stream& stream, CUdeviceptr proj, int row_stride, int B, CUdeviceptr slots,
                              CUdeviceptr pos, const GdnLayerWeights& w, const GdnLayerState& st, CUdeviceptr o,
                              CUdeviceptr y, CUdeviceptr counters, bool pdl) const {
  check_proj(row_stride, B);
  if (B > 65535) fail("gdn_decode_batch: B = {} sequences, at most 65535", B);
  if (!counters) fail("gdn_decode_batch: the per-head counters (int32 [{}, {}], zeroed once) are not set", B, shape_.hv);
  const GdnRecurrentTile& t = tiles_.recurrent;
  decode_batch_.launch({{unsigned(shape_.hv), unsigned(shape_.dv / t.rows), unsigned(B)}, {unsigned(32 * t.warps)}, 0,
                        pdl},
                       stream, proj, row_stride, w.conv_w, w.A_log, w.dt_bias, st.conv, slots, pos, st.ssm, o, w.norm_w,
                       y, counters, eps_);
}

void GdnKernels::prefill(const Stream& stream, CUdeviceptr proj, int row_stride, int T, CUdeviceptr pos0,
                         const GdnLayerWeights& w, const GdnLayerState& st, const GdnWorkspace& ws, CUdeviceptr y,
                         bool chunked_path, bool pdl) const {
  prologue(stream, proj, row_stride, T, pos0, w, st, ws, pdl);
  if (chunked_path) {
    chunked(stream, proj, row_stride, T, w, st, ws, y, pdl);
  } else {
    recurrent(stream, T, st, ws, pdl);
    gated_rmsnorm(stream, T, ws.o, proj, row_stride, w.norm_w, y, pdl);
  }
}

void GdnKernels::prologue(const Stream& stream, CUdeviceptr proj, int row_stride, int T, CUdeviceptr pos0,
                          const GdnLayerWeights& w, const GdnLayerState& st, const GdnWorkspace& ws, bool pdl) const {
  check_proj(row_stride, T);
  const GdnPrologueTile& t = tiles_.prologue;
  const int64_t threads = 32 * t.warps, groups = shape_.conv_dim() / 8;  // a thread per 8 channels (+ a gates block)
  prologue_.launch({{unsigned((groups + threads - 1) / threads + 1), unsigned((T + t.tokens - 1) / t.tokens)},
                    {unsigned(threads)}, 0, pdl}, stream, proj,
                   row_stride, T, w.conv_w, w.A_log, w.dt_bias, st.conv, pos0, ws.qkv, ws.g, ws.beta);
}

void GdnKernels::recurrent(const Stream& stream, int T, const GdnLayerState& st, const GdnWorkspace& ws,
                           bool pdl) const {
  const GdnRecurrentTile& t = tiles_.recurrent;
  recurrent_.launch({{unsigned(shape_.hv), unsigned(shape_.dv / t.rows)}, {unsigned(32 * t.warps)}, 0, pdl}, stream,
                    ws.qkv, ws.g, ws.beta, st.ssm, ws.o, T);
}

void GdnKernels::chunked(const Stream& stream, CUdeviceptr proj, int row_stride, int T, const GdnLayerWeights& w,
                         const GdnLayerState& st, const GdnWorkspace& ws, CUdeviceptr y, bool pdl) const {
  chunk_prepare(stream, T, ws, pdl);
  if (tiles_.chunk.fused) {
    chunk_fused(stream, proj, row_stride, T, w.norm_w, st, ws, y, pdl);
    if (!cluster_) gated_rmsnorm(stream, T, ws.o, proj, row_stride, w.norm_w, y, pdl);
  } else {
    chunk_state(stream, T, st, ws, pdl);
    chunk_output(stream, proj, row_stride, T, w.norm_w, ws, y, pdl);
  }
}

void GdnKernels::chunk_fused(const Stream& stream, CUdeviceptr proj, int row_stride, int T, CUdeviceptr norm_w,
                             const GdnLayerState& st, const GdnWorkspace& ws, CUdeviceptr y, bool pdl) const {
  if (!chunk_fused_) fail("gdn chunk_fused: the chunk tile (vs = {}) is not fused", tiles_.chunk.vs);
  check_proj(row_stride, T);
  const LaunchConfig lc{{unsigned(shape_.hv), unsigned(shape_.dv / tiles_.chunk.vs)}, {256},
                        unsigned(gdn_chunk_fused_smem_bytes(shape_, tiles_.chunk, cluster_)), pdl};
  if (cluster_) {
    const CUdeviceptr z = proj + CUdeviceptr(shape_.conv_dim() * 2);
    chunk_fused_->launch(lc, stream, ws.qkv, ws.gam, ws.u, ws.w, st.ssm, z, row_stride, norm_w, y, eps_, T);
  } else {
    chunk_fused_->launch(lc, stream, ws.qkv, ws.gam, ws.u, ws.w, st.ssm, ws.o, T);
  }
}

void GdnKernels::chunk_prepare(const Stream& stream, int T, const GdnWorkspace& ws, bool pdl) const {
  if (T < 1) fail("gdn chunk_prepare: T = {} tokens, expected >= 1", T);
  const unsigned chunks = unsigned((T + kChunk - 1) / kChunk);
  chunk_prepare_.launch({{chunks, unsigned(shape_.hv)}, {256}, unsigned(gdn_chunk_prepare_smem_bytes(shape_)), pdl},
                        stream, ws.qkv, ws.g, ws.beta, ws.gam, ws.u, ws.w, T);
}

void GdnKernels::chunk_state(const Stream& stream, int T, const GdnLayerState& st, const GdnWorkspace& ws,
                             bool pdl) const {
  if (T < 1) fail("gdn chunk_state: T = {} tokens, expected >= 1", T);
  if (!chunk_state_) fail("gdn chunk_state: the chunk tile (vs = {}) is fused", tiles_.chunk.vs);
  chunk_state_->launch({{unsigned(shape_.hv), unsigned(shape_.dv / tiles_.chunk.vs)}, {256},
                       unsigned(gdn_chunk_state_smem_bytes(shape_, tiles_.chunk)), pdl},
                      stream, ws.qkv, ws.gam, ws.u, ws.w, st.ssm, ws.h, ws.vn, T);
}

void GdnKernels::chunk_output(const Stream& stream, CUdeviceptr proj, int row_stride, int T, CUdeviceptr norm_w,
                              const GdnWorkspace& ws, CUdeviceptr y, bool pdl) const {
  check_proj(row_stride, T);
  if (!chunk_output_) fail("gdn chunk_output: the chunk tile (vs = {}) is fused", tiles_.chunk.vs);
  const unsigned chunks = unsigned((T + kChunk - 1) / kChunk);
  const CUdeviceptr z = proj + CUdeviceptr(shape_.conv_dim() * 2);
  chunk_output_->launch({{chunks, unsigned(shape_.hv)}, {256}, unsigned(gdn_chunk_output_smem_bytes(shape_)), pdl},
                       stream, ws.qkv, ws.gam, ws.h, ws.vn, z, row_stride, norm_w, y, eps_, T);
}

void GdnKernels::gated_rmsnorm(const Stream& stream, int T, CUdeviceptr o, CUdeviceptr proj, int row_stride,
                               CUdeviceptr norm_w, CUdeviceptr y, bool pdl) const {
  check_proj(row_stride, T);
  const CUdeviceptr z = proj + CUdeviceptr(shape_.conv_dim() * 2);
  norm_.launch({{unsigned(T), unsigned(shape_.hv / tiles_.norm.heads)}, {unsigned(32 * tiles_.norm.heads)}, 0, pdl},
               stream, o, z, row_stride, norm_w, y, eps_);
}

}  // namespace q35::qwen35::gpu
