#include "models/qwen35/gpu/moe.h"

#include <algorithm>

#include "models/qwen35/gpu/dense.h"

#include "runtime/core/error.h"

namespace q35::qwen35::gpu {

namespace {

constexpr size_t kAlign = 256;  // bytes; every scratch buffer starts 256-byte aligned

unsigned ceil_div(int64_t a, int64_t b) { return unsigned((a + b - 1) / b); }

void check_tokens(const char* what, const MoeScratch& sc, int64_t T) {
  if (T < 1 || T > sc.max_tokens)
    fail("{}: T = {} tokens is outside [1, {}] (the MoE workspace's max_tokens)", what, T, sc.max_tokens);
}

// The grouped kernels' scratch (plan, h) holds kMoeGroupedMaxTokens tokens; their shared memory is
// opted in for MoeKernels::grouped_max_tokens (moe_forward checks that bound).
void check_grouped(const char* what, int64_t T) {
  if (T > kMoeGroupedMaxTokens) fail("{}: T = {} exceeds the grouped path's {} tokens", what, T, kMoeGroupedMaxTokens);
}

// The grouped path on this device: T within what its shared memory holds.
void check_grouped(const MoeKernels& k, int64_t T) {
  if (T > k.grouped_max_tokens)
    fail("moe: the grouped path takes at most {} tokens on this device (T = {}: moe_decode_down needs {} bytes of "
         "shared memory per block, moe_decode_gate_up {}; the limit is {}, kMoeGroupedMaxTokens {}); use the "
         "prefill path",
         k.grouped_max_tokens, T, moe_down_smem_bytes(k.shape, k.tiles.down, T),
         moe_gate_up_smem_bytes(k.tiles.gate_up, T), k.smem_optin, kMoeGroupedMaxTokens);
}

// Offsets of the scratch buffers from the workspace start; the last entry is the total size.
struct Layout {
  size_t logits, counters, plan_ticket, ids, weights, shared_gate, plan, sums, h, hs, y, ys, sorted_ids, block_expert, num_blocks,
      total;
};

Layout layout(const MoeShape& s, const MoeTiles& tiles, int64_t max_tokens) {
  if (max_tokens < 1) fail("moe workspace: max_tokens = {} must be positive", max_tokens);
  const int64_t T = max_tokens, k = s.top_k, blocks = moe_max_blocks(s, tiles.gemm.block_m, T);
  const int64_t T_decode = std::min(T, kMoeGroupedMaxTokens);
  const int64_t h_decode = T_decode * (k * s.inter + s.shared_inter);
  const int64_t h_prefill = blocks * tiles.gemm.block_m * s.inter;
  Layout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t off = at;
    at += (bytes + kAlign - 1) / kAlign * kAlign;
    return off;
  };
  l.logits = take(size_t(T * (s.experts + 1)) * 4);
  l.counters = take(size_t(T) * 4);
  l.plan_ticket = take(4);
  l.ids = take(size_t(T * k) * 4);
  l.weights = take(size_t(T * k) * 4);
  l.shared_gate = take(size_t(T) * 4);
  l.plan = take(size_t(moe_plan_ints(s, T_decode)) * 4);
  l.sums = take(size_t(T_decode * (k + 1) * s.hidden) * 4);
  l.h = take(size_t(std::max(h_decode, h_prefill)) * 2);
  l.hs = take(size_t(T * s.shared_inter) * 2);
  l.y = take(size_t(T * k * s.hidden) * 2);
  l.ys = take(size_t(T * s.hidden) * 2);
  l.sorted_ids = take(size_t(blocks * tiles.gemm.block_m) * 4);
  l.block_expert = take(size_t(blocks) * 4);
  l.num_blocks = take(4);
  l.total = at;
  return l;
}

}  // namespace

MoeShape moe_shape(const Config& cfg, int group) {
  MoeShape s{cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
             cfg.shared_expert_intermediate_size, group};
  if (std::string why = why_invalid(s); !why.empty()) fail("moe: unsupported config.json MoE sizes: {}", why);
  return s;
}

MoeTiles MoeTiles::defaults(const MoeShape& s, bool hopper, int64_t tokens) {
  return {default_moe_router_tile(s, 1),
          default_moe_router_tile(s, kMoeRouterSmallTokens),
          default_moe_router_tile(s, kMoeRouterSmallTokens + 1),
          default_moe_gate_up_tile(s),
          default_moe_down_tile(s),
          MoeStreamTile{},
          default_moe_gemm_tile(s, hopper, tokens),
          default_gemm_tile(s.experts, s.hidden, 4096, hopper && s.experts % 8 == 0)};
}

const MoeRouterTile& MoeTiles::router(int64_t tokens) const {
  return tokens <= 1 ? router_one : tokens <= kMoeRouterSmallTokens ? router_decode : router_prefill;
}

std::vector<KernelSpec> moe_kernels(const Config& cfg, int group, bool hopper, int64_t tokens) {
  const MoeShape s = moe_shape(cfg, group);
  return moe_kernels(s, MoeTiles::defaults(s, hopper, tokens));
}

std::vector<KernelSpec> moe_kernels(const MoeShape& s, const MoeTiles& t) {
  return {moe_router_spec(s, t.router_one),
          moe_router_spec(s, t.router_decode),
          moe_router_spec(s, t.router_prefill),
          moe_decode_gate_up_spec(s, t.gate_up),
          moe_decode_down_spec(s, t.down),
          moe_decode_down_residual_spec(s, t.down),
          moe_stream_gate_up_spec(s, t.gate_up, t.stream),
          moe_stream_down_spec(s, t.down, t.stream),
          moe_stream_combine_spec(s),
          moe_align_spec(s, t.gemm),
          moe_gemm_spec(s, MoeGemm::RoutedGateUp, t.gemm),
          moe_gemm_spec(s, MoeGemm::RoutedDown, t.gemm),
          moe_gemm_spec(s, MoeGemm::SharedGateUp, t.gemm),
          moe_gemm_spec(s, MoeGemm::SharedDown, t.gemm),
          moe_combine_spec(s),
          gemm_bf16_spec(s.experts, s.hidden, t.router_gemm, true),
          moe_router_topk_spec(s)};
}

int64_t moe_plan_ints(const MoeShape& s, int64_t tokens) { return 2 + 2 * s.experts + tokens * s.top_k; }

int64_t moe_max_blocks(const MoeShape& s, int block_m, int64_t tokens) {
  // sum_e ceil(c_e / BM) <= (T*k + (BM - 1) * experts hit) / BM, at most min(E, T*k) experts hit.
  const int64_t pairs = tokens * s.top_k, bm = block_m;
  return (pairs + (bm - 1) * std::min(s.experts, pairs)) / bm;
}

size_t moe_workspace_bytes(const MoeShape& s, const MoeTiles& tiles, int64_t max_tokens) {
  return layout(s, tiles, max_tokens).total;
}

MoeScratch moe_scratch(const MoeShape& s, const MoeTiles& tiles, int64_t max_tokens, CUdeviceptr ws) {
  const Layout l = layout(s, tiles, max_tokens);
  MoeScratch sc;
  sc.max_tokens = max_tokens;
  sc.max_blocks = moe_max_blocks(s, tiles.gemm.block_m, max_tokens);
  sc.logits = ws + l.logits;
  sc.counters = ws + l.counters;
  sc.plan_ticket = ws + l.plan_ticket;
  sc.plan = ws + l.plan;
  sc.ids = ws + l.ids;
  sc.weights = ws + l.weights;
  sc.shared_gate = ws + l.shared_gate;
  sc.sums = ws + l.sums;
  sc.h = ws + l.h;
  sc.hs = ws + l.hs;
  sc.y = ws + l.y;
  sc.ys = ws + l.ys;
  sc.sorted_ids = ws + l.sorted_ids;
  sc.block_expert = ws + l.block_expert;
  sc.num_blocks = ws + l.num_blocks;
  return sc;
}

MoeKernels::MoeKernels(JitEngine& jit, const Context& ctx, const MoeShape& s, const MoeTiles& t)
    : shape(s),
      tiles(t),
      sm_count(ctx.device().sm_count),
      smem_optin(smem_optin_bytes(ctx.device().arch())),
      grouped_max_tokens(moe_grouped_max_tokens(s, t.gate_up, t.down, smem_optin)),
      router_one(jit.load(moe_router_spec(s, tiles.router_one), ctx)),
      router_decode(jit.load(moe_router_spec(s, tiles.router_decode), ctx)),
      router_prefill(jit.load(moe_router_spec(s, tiles.router_prefill), ctx)),
      decode_gate_up(jit.load(moe_decode_gate_up_spec(s, tiles.gate_up), ctx)),
      decode_down(jit.load(moe_decode_down_spec(s, tiles.down), ctx)),
      decode_down_residual(jit.load(moe_decode_down_residual_spec(s, tiles.down), ctx)),
      stream_gate_up(jit.load(moe_stream_gate_up_spec(s, tiles.gate_up, tiles.stream), ctx)),
      stream_down(jit.load(moe_stream_down_spec(s, tiles.down, tiles.stream), ctx)),
      stream_combine(jit.load(moe_stream_combine_spec(s), ctx)),
      align(jit.load(moe_align_spec(s, tiles.gemm), ctx)),
      gemm_routed_gate_up(jit.load(moe_gemm_spec(s, MoeGemm::RoutedGateUp, tiles.gemm), ctx)),
      gemm_routed_down(jit.load(moe_gemm_spec(s, MoeGemm::RoutedDown, tiles.gemm), ctx)),
      gemm_shared_gate_up(jit.load(moe_gemm_spec(s, MoeGemm::SharedGateUp, tiles.gemm), ctx)),
      gemm_shared_down(jit.load(moe_gemm_spec(s, MoeGemm::SharedDown, tiles.gemm), ctx)),
      combine(jit.load(moe_combine_spec(s), ctx)),
      router_gemm(jit.load(gemm_bf16_spec(s.experts, s.hidden, tiles.router_gemm, true), ctx)),
      router_topk(jit.load(moe_router_topk_spec(s), ctx)) {
  router_gemm.set_max_dynamic_smem(tiles.router_gemm.smem_bytes());
  // The grouped kernels' shared memory grows with T: opted in for the most this device takes.
  if (grouped_max_tokens < 1)
    fail("moe: the grouped kernels' shared memory for one token ({} + {} bytes) exceeds this device's {} per block",
         moe_gate_up_smem_bytes(tiles.gate_up, 1), moe_down_smem_bytes(s, tiles.down, 1),
         smem_optin);
  decode_gate_up.set_max_dynamic_smem(int(moe_gate_up_smem_bytes(tiles.gate_up, grouped_max_tokens)));
  for (const Function* f : {&decode_down, &decode_down_residual})
    f->set_max_dynamic_smem(int(moe_down_smem_bytes(s, tiles.down, grouped_max_tokens)));
  stream_gate_up_blocks = moe_stream_blocks(stream_gate_up, tiles.stream, sm_count);
  stream_down_blocks = moe_stream_blocks(stream_down, tiles.stream, sm_count);
  if (tiles.gemm.wgmma)
    for (const Function* f : {&gemm_routed_gate_up, &gemm_routed_down, &gemm_shared_gate_up, &gemm_shared_down})
      f->set_max_dynamic_smem(tiles.gemm.smem_bytes(s.group));
}

const Function& MoeKernels::router(int64_t tokens) const {
  return tokens <= 1 ? router_one : tokens <= kMoeRouterSmallTokens ? router_decode : router_prefill;
}

const Function& MoeKernels::gemm(MoeGemm g) const {
  switch (g) {
    case MoeGemm::RoutedGateUp: return gemm_routed_gate_up;
    case MoeGemm::RoutedDown: return gemm_routed_down;
    case MoeGemm::SharedGateUp: return gemm_shared_gate_up;
    case MoeGemm::SharedDown: return gemm_shared_down;
  }
  fail("moe: unknown GEMM {}", int(g));
}

void launch_moe_router(const Function& f, const MoeRouterTile& tile, const Stream& stream, const MoeShape& s,
                       CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T) {
  check_tokens("moe_router", sc, T);
  f.launch({{tile.blocks_x(s.experts), ceil_div(T, tile.m_tile)}, {unsigned(tile.threads())}, 0, true}, stream, x, w.router,
           w.shared_gate, sc.logits, sc.counters, sc.ids, sc.weights, sc.shared_gate, sc.plan, sc.plan_ticket, int(T));
}

void launch_moe_router_prefill(const Function& gemm, const GemmTile& tile, const Function& topk, const Stream& stream,
                               const MoeShape& s, CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T) {
  check_tokens("moe_router (prefill)", sc, T);
  launch(GemmPlan{s.experts, s.hidden, tile, true}, gemm, stream, x, w.router, sc.logits, int(T));
  topk.launch({{ceil_div(T, kMoeRouterTopkWarps)}, {unsigned(32 * kMoeRouterTopkWarps)}}, stream, x,
                       w.shared_gate, sc.logits, sc.ids, sc.weights, sc.shared_gate, int(T));
}

void launch_moe_decode_gate_up(const Function& f, const MoeGemvTile& tile, const Stream& stream, const MoeShape& s,
                               CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T) {
  check_tokens("moe_decode_gate_up", sc, T);
  check_grouped("moe_decode_gate_up", T);
  const unsigned blocks_x = unsigned(std::max(s.inter, s.shared_inter) / kMoeGateUpRows);
  const unsigned experts = unsigned(1 + std::min(s.experts, T * s.top_k));  // the shared one + at most T*k routed
  const unsigned smem = unsigned(moe_gate_up_smem_bytes(tile, T));
  f.launch({{blocks_x, experts}, {unsigned(tile.threads())}, smem, true}, stream, x, sc.plan, w.gate_up,
           w.gate_up_scales, w.shared_gate_up, w.shared_gate_up_scales, sc.h, int(T));
}

unsigned moe_stream_blocks(const Function& f, const MoeStreamTile& tile, int sm_count) {
  const int per_sm = f.max_active_blocks(tile.threads(), 0);
  if (per_sm < 1) fail("moe: {} fits no block of {} threads on an SM", f.name(), tile.threads());
  return unsigned(per_sm * sm_count);
}

void launch_moe_stream_gate_up(const Function& f, const MoeStreamTile& tile, unsigned blocks, const Stream& stream,
                               const MoeShape& s, CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T) {
  check_tokens("moe_stream_gate_up", sc, T);
  check_grouped("moe_stream_gate_up", T);
  if (blocks < 1) fail("moe_stream_gate_up: no blocks");
  f.launch({{blocks}, {unsigned(tile.threads())}, 0, true}, stream, x, sc.plan, w.gate_up, w.gate_up_scales,
           w.shared_gate_up, w.shared_gate_up_scales, sc.h, int(T));
}

void launch_moe_stream_down(const Function& down, const Function& combine, const MoeStreamTile& tile, unsigned blocks,
                            const Stream& stream, const MoeShape& s, const MoeWeights& w, const MoeScratch& sc,
                            CUdeviceptr out, int64_t T) {
  check_tokens("moe_stream_down", sc, T);
  check_grouped("moe_stream_down", T);
  if (blocks < 1) fail("moe_stream_down: no blocks");
  down.launch({{blocks}, {unsigned(tile.threads())}, 0, true}, stream, sc.h, sc.plan, w.down, w.down_scales,
              w.shared_down, w.shared_down_scales, sc.sums, int(T));
  combine.launch({{unsigned(T), ceil_div(s.hidden, kMoeStreamCombineThreads)}, {unsigned(kMoeStreamCombineThreads)}, 0, true},
                 stream, sc.sums, sc.weights, sc.shared_gate, out);
}

void launch_moe_decode_down(const Function& f, const MoeDownTile& tile, const Stream& stream, const MoeShape& s,
                            const MoeWeights& w, const MoeScratch& sc, CUdeviceptr out, int64_t T) {
  check_tokens("moe_decode_down", sc, T);
  check_grouped("moe_decode_down", T);
  f.launch({{unsigned(s.hidden / kMoeDownRows)}, {unsigned(tile.threads(s.top_k))}, unsigned(moe_down_smem_bytes(s, tile, T)), true},
           stream, sc.h, sc.plan, sc.weights, sc.shared_gate, w.down, w.down_scales, w.shared_down, w.shared_down_scales, out, int(T));
}

void launch_moe_decode_down(const Function& f, const MoeDownTile& tile, const Stream& stream, const MoeShape& s,
                            const MoeWeights& w, const MoeScratch& sc, const ResidualNorm& r, int64_t T) {
  check_tokens("moe_decode_down_residual", sc, T);
  check_grouped("moe_decode_down_residual", T);
  if (!r.residual || !r.norm_w || !r.normed || !r.counter)
    fail("moe_decode_down_residual: residual, norm_w, normed and counter must all be set");
  f.launch({{unsigned(s.hidden / kMoeDownRows)}, {unsigned(tile.threads(s.top_k))}, unsigned(moe_down_smem_bytes(s, tile, T)), true},
           stream, sc.h, sc.plan, sc.weights, sc.shared_gate, w.down, w.down_scales, w.shared_down, w.shared_down_scales, r.residual,
           r.norm_w, r.normed, r.counter, r.eps, int(T));
}

void launch_moe_align(const Function& f, const Stream& stream, const MoeScratch& sc, int64_t T) {
  check_tokens("moe_align", sc, T);
  f.launch({{1}, {unsigned(kMoeAlignThreads)}}, stream, sc.ids, sc.sorted_ids, sc.block_expert, sc.num_blocks, int(T));
}

void launch_moe_gemm(const Function& f, const MoeGemmTile& tile, const Stream& stream, const MoeShape& s, MoeGemm g,
                     CUdeviceptr x, const MoeWeights& w, const MoeScratch& sc, int64_t T, int sm_count) {
  check_tokens("moe_gemm", sc, T);
  CUdeviceptr A = 0, W = 0, S = 0, out = 0;
  switch (g) {
    case MoeGemm::RoutedGateUp:
      A = x, W = w.gate_up, S = w.gate_up_scales, out = sc.h;
      break;
    case MoeGemm::RoutedDown:
      A = sc.h, W = w.down, S = w.down_scales, out = sc.y;
      break;
    case MoeGemm::SharedGateUp:
      A = x, W = w.shared_gate_up, S = w.shared_gate_up_scales, out = sc.hs;
      break;
    case MoeGemm::SharedDown:
      A = sc.hs, W = w.shared_down, S = w.shared_down_scales, out = sc.ys;
      break;
  }
  const bool routed = g == MoeGemm::RoutedGateUp || g == MoeGemm::RoutedDown;
  // Routed: the bound for T (blocks past num_blocks[0] exit at once).
  const unsigned row_blocks = routed ? unsigned(moe_max_blocks(s, tile.block_m, T)) : ceil_div(T, tile.block_m);
  const unsigned smem = tile.wgmma ? unsigned(tile.smem_bytes(s.group)) : 0;  // static for mma.sync
  const unsigned col_blocks = unsigned(moe_gemm_n(s, g) / tile.block_n);
  if (tile.persist) {  // one block per SM (a block takes most of an SM's shared memory) over the tiles
    if (sm_count < 1) fail("moe_gemm ({}): a persistent tile needs the SM count, got {}", name(g), sm_count);
    const unsigned blocks = unsigned(std::min<int64_t>(int64_t(col_blocks) * row_blocks, sm_count));
    f.launch({{blocks}, {unsigned(tile.threads())}, smem}, stream, A, W, S, out, sc.sorted_ids, sc.block_expert,
             sc.num_blocks, int(T));
    return;
  }
  f.launch({{col_blocks, row_blocks}, {unsigned(tile.threads())}, smem}, stream, A, W, S, out, sc.sorted_ids,
           sc.block_expert, sc.num_blocks, int(T));
}

void launch_moe_combine(const Function& f, const Stream& stream, const MoeScratch& sc, CUdeviceptr out, int64_t T) {
  check_tokens("moe_combine", sc, T);
  f.launch({{unsigned(T)}, {unsigned(kMoeCombineThreads)}}, stream, sc.y, sc.weights, sc.ys, sc.shared_gate, out);
}

void moe_forward(const MoeKernels& k, const Stream& stream, const MoeWeights& w, const MoeScratch& sc, CUdeviceptr x,
                 CUdeviceptr out, int64_t T, MoePath path) {
  const MoeShape& s = k.shape;
  if (path == MoePath::Auto) path = moe_grouped_for(T, k.grouped_max_tokens) ? MoePath::Decode : MoePath::Prefill;
  if (path == MoePath::Decode) {
    check_grouped(k, T);
    launch_moe_router(k.router(T), k.tiles.router(T), stream, s, x, w, sc, T);
    if (k.tiles.stream.serves(T)) {
      launch_moe_stream_gate_up(k.stream_gate_up, k.tiles.stream, k.stream_gate_up_blocks, stream, s, x, w, sc, T);
      launch_moe_stream_down(k.stream_down, k.stream_combine, k.tiles.stream, k.stream_down_blocks, stream, s, w, sc,
                             out, T);
      return;
    }
    launch_moe_decode_gate_up(k.decode_gate_up, k.tiles.gate_up, stream, s, x, w, sc, T);
    launch_moe_decode_down(k.decode_down, k.tiles.down, stream, s, w, sc, out, T);
    return;
  }
  launch_moe_router_prefill(k.router_gemm, k.tiles.router_gemm, k.router_topk, stream, s, x, w, sc, T);
  launch_moe_align(k.align, stream, sc, T);
  for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::SharedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedDown})
    launch_moe_gemm(k.gemm(g), k.tiles.gemm, stream, s, g, x, w, sc, T, k.sm_count);
  launch_moe_combine(k.combine, stream, sc, out, T);
}

void moe_forward_decode(const MoeKernels& k, const Stream& stream, const MoeWeights& w, const MoeScratch& sc,
                        CUdeviceptr x, const ResidualNorm& r, int64_t T) {
  const MoeShape& s = k.shape;
  check_grouped(k, T);
  launch_moe_router(k.router(T), k.tiles.router(T), stream, s, x, w, sc, T);
  launch_moe_decode_gate_up(k.decode_gate_up, k.tiles.gate_up, stream, s, x, w, sc, T);
  launch_moe_decode_down(k.decode_down_residual, k.tiles.down, stream, s, w, sc, r, T);
}

}  // namespace q35::qwen35::gpu
