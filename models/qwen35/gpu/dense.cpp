#include "models/qwen35/gpu/dense.h"

#include <algorithm>

#include "autotune/tiles_moe.h"
#include "models/qwen35/reference_ops.h"
#include "runtime/core/half.h"
#include "runtime/core/error.h"

namespace q35::qwen35::gpu {

namespace {

unsigned blocks_for(int64_t count, int64_t per_block) { return unsigned((count + per_block - 1) / per_block); }

}  // namespace

std::vector<DenseShape> dense_shapes(const Config& cfg) {
  const int64_t H = cfg.hidden_size;
  const bool has_full = cfg.num_layers_of(LayerType::FullAttention) > 0;
  const bool has_linear = cfg.num_layers_of(LayerType::LinearAttention) > 0;
  std::vector<DenseShape> shapes;
  if (has_full) {
    shapes.push_back({DenseProj::AttnQkv, "attn q|k|v", cfg.q_proj_rows() + 2 * cfg.kv_dim(), H});
    shapes.push_back({DenseProj::AttnOut, "attn o_proj", H, cfg.attn_out_dim()});
  }
  if (has_linear) {
    shapes.push_back({DenseProj::GdnIn, "gdn in_proj qkv|z|b|a",
                      cfg.linear_conv_dim() + cfg.linear_value_dim() + 2 * cfg.linear_num_value_heads, H});
    shapes.push_back({DenseProj::GdnOut, "gdn out_proj", H, cfg.linear_value_dim()});
  }
  shapes.push_back({DenseProj::LmHead, "lm_head", cfg.vocab_size, H});
  return shapes;
}

GemmPlan gemm_plan(int64_t n, int64_t k, int64_t m, bool out_f32, bool wgmma, int group) {
  return {n, k, default_gemm_tile(n, k, m, wgmma), out_f32, wgmma ? group : mma_gemm_group(group)};
}

KernelSpec GemvBf16Plan::spec() const {
  return out_f32 ? gemv_bf16_f32_spec(n, k, tile.m_tile, tile.rows_per_warp, tile.warps) : gemv_bf16_spec(n, k, tile);
}

GemvBf16Plan gemv_bf16_plan(int64_t n, int64_t k, int m, bool out_f32) {
  return {n, k, default_gemv_tile(n, k, m), out_f32};
}

W4GemvTile w4_decode_tile(const W4GemvTile& one, int64_t group, int M) {
  if (M < 1 || M > kDecodeStepMaxRows)
    fail("{}: a decode step of {} rows is outside [1, {}]", group == kFp8Group ? "gemv_fp8" : "gemv_w4a16", M,
         kDecodeStepMaxRows);
  if (group != kFp8Group && group != 32 && group != 64 && group != 128)
    fail("gemv decode tile: weight group {} is not W4A16 (32, 64, 128) or FP8", group);
  W4GemvTile t = one;
  // One mma column tile of 8 columns: a column per (token, scale group of a 128-k tile). FP8 has one
  // scale block per tile, so any M_TILE <= 8 keeps the M = 1 tile's single column tile and accumulator
  // chains; it takes 4: at 8, ptxas spills 8 bytes of gemv_fp8 at the 35B qkv / in_proj default tiles
  // (72 registers, sm_90a; 4 compiles clean).
  t.m_tile = M == 1 ? 1 : group == kFp8Group ? 4 : int(8 * group / 128);
  return t;
}

W4GemvPlan w4_gemv_plan(int64_t n, int64_t k, int64_t group, int m, bool out_f32) {
  return {n, k, group, default_w4_gemv_tile(n, k, group, m), out_f32};
}

QuantizePlan quantize_plan(int64_t k, int64_t group) { return {k, group, default_quantize_tile(k, group)}; }

SamplePlan sample_plan(int64_t vocab) { return {vocab, default_sample_tile(vocab)}; }

void prepare(const GemmPlan& p, const Function& f) { f.set_max_dynamic_smem(p.tile.smem_bytes(p.group)); }

void launch(const GemmPlan& p, const Function& f, const Stream& stream, CUdeviceptr x, CUdeviceptr W, CUdeviceptr y,
            int M, CUdeviceptr scales) {
  if (M < 1) fail("gemm_bf16 [N = {}, K = {}]: M = {} rows is not positive", p.n, p.k, M);
  if (p.group != 0 && !scales)
    fail("{} [N = {}, K = {}]: {} weights without scales", p.tile.wgmma ? "gemm_wgmma" : "gemm_bf16", p.n, p.k,
         weight_format_name(p.group));
  if (p.tile.wgmma) {
    const CUdeviceptr none = 0;  // sorted_ids, block_expert, num_blocks: MoE only
    f.launch({{blocks_for(p.n, p.tile.bn), blocks_for(M, p.tile.bm)}, {unsigned(p.tile.threads())},
              unsigned(p.tile.smem_bytes(p.group))},
             stream, x, W, scales, y, none, none, none, M);
    return;
  }
  f.launch({{blocks_for(M, p.tile.bm), blocks_for(p.n, p.tile.bn)}, {unsigned(p.tile.threads())},
            unsigned(p.tile.smem_bytes(p.group))},
           stream, x, W, scales, y, M);
}

void launch(const GemvBf16Plan& p, const Function& f, const Stream& stream, CUdeviceptr W, CUdeviceptr x,
            CUdeviceptr y, int T) {
  if (T < 1) fail("gemv_bf16 [N = {}, K = {}]: T = {} tokens is not positive", p.n, p.k, T);
  f.launch({{blocks_for(p.n, p.tile.rows_per_block()), blocks_for(T, p.tile.m_tile)}, {unsigned(p.tile.threads())}},
           stream, W, x, y, T);
}

void launch(const W4GemvPlan& p, const Function& f, const Stream& stream, CUdeviceptr qweight, CUdeviceptr scales,
            CUdeviceptr x, CUdeviceptr y, int T, bool pdl) {
  if (T < 1) fail("{} [N = {}, K = {}]: T = {} tokens is not positive", p.spec().kernel, p.n, p.k, T);
  if (p.residual) fail("{} [N = {}, K = {}]: launched without its residual buffers", p.spec().kernel, p.n, p.k);
  if (p.gated_dv) fail("{} [N = {}, K = {}]: launched with a bf16 x instead of its gated-norm input", p.spec().kernel, p.n, p.k);
  f.launch({{blocks_for(p.n, p.tile.rows_per_block()), blocks_for(T, p.tile.m_tile)}, {unsigned(p.tile.threads())}, 0, pdl},
           stream, qweight, scales, x, y, T);
}

void launch(const W4GemvPlan& p, const Function& f, const Stream& stream, CUdeviceptr qweight, CUdeviceptr scales,
            CUdeviceptr x, const ResidualNorm& r, int T, bool pdl) {
  if (T < 1) fail("{} [N = {}, K = {}]: T = {} tokens is not positive", p.spec().kernel, p.n, p.k, T);
  if (!p.residual || p.gated_dv) fail("{} [N = {}, K = {}]: a plan without the residual epilogue", p.spec().kernel, p.n, p.k);
  if (!r.residual || !r.norm_w || !r.normed || !r.counter)
    fail("{} [N = {}, K = {}]: residual, norm_w, normed and counter must all be set", p.spec().kernel, p.n, p.k);
  f.launch({{blocks_for(p.n, p.tile.rows_per_block()), blocks_for(T, p.tile.m_tile)}, {unsigned(p.tile.threads())}, 0, pdl},
           stream, qweight, scales, x, r.residual, r.norm_w, r.normed, r.counter, r.eps, T);
}

void launch(const W4GemvPlan& p, const Function& f, const Stream& stream, CUdeviceptr qweight, CUdeviceptr scales,
            const GatedNormInput& x, CUdeviceptr y, int T, bool pdl) {
  if (T < 1) fail("gemv_w4a16_gated [N = {}, K = {}]: T = {} tokens is not positive", p.n, p.k, T);
  if (!p.gated_dv) fail("gemv_w4a16 [N = {}, K = {}]: a plan without the gated-norm input", p.n, p.k);
  if (!x.o || !x.z || !x.norm_w) fail("gemv_w4a16_gated [N = {}, K = {}]: o, z and norm_w must all be set", p.n, p.k);
  // o is read as float4, z and norm_w as 8-byte groups of 4.
  if (x.o % 16 != 0 || x.z % 8 != 0 || x.norm_w % 8 != 0 || x.z_stride < p.k || x.z_stride % 4 != 0)
    fail("gemv_w4a16_gated [N = {}, K = {}]: o must be 16-byte aligned, z and norm_w 8-byte aligned, and the z row "
         "stride ({}) a multiple of 4 of at least K",
         p.n, p.k, x.z_stride);
  f.launch({{blocks_for(p.n, p.tile.rows_per_block()), blocks_for(T, p.tile.m_tile)}, {unsigned(p.tile.threads())}, 0, pdl},
           stream, qweight, scales, x.o, x.z, x.z_stride, x.norm_w, x.eps, y, T);
}

std::vector<float> gated_norm_input(const std::vector<float>& o, const std::vector<uint16_t>& z, int64_t z_stride,
                                    const std::vector<uint16_t>& norm_w, int64_t T, int64_t hv, int64_t dv, float eps) {
  const int64_t k = hv * dv;
  if (T < 1 || hv < 1 || dv < 1 || z_stride < k)
    fail("gated_norm_input: T = {}, hv = {}, dv = {}, z_stride = {} (expected positive sizes and z_stride >= hv dv)", T,
         hv, dv, z_stride);
  if (int64_t(o.size()) != T * k || int64_t(z.size()) < (T - 1) * z_stride + k || int64_t(norm_w.size()) != dv)
    fail("gated_norm_input: o has {} values (expected {}), z {} (at least {}), norm_w {} (expected {})", o.size(), T * k,
         z.size(), (T - 1) * z_stride + k, norm_w.size(), dv);
  std::vector<float> zf(static_cast<size_t>(T * k)), w(static_cast<size_t>(dv)), y(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < k; ++c) zf[size_t(t * k + c)] = bf16_to_f32(z[size_t(t * z_stride + c)]);
  for (int64_t i = 0; i < dv; ++i) w[size_t(i)] = bf16_to_f32(norm_w[size_t(i)]);
  ref::gated_rmsnorm(o, zf, w, y, T * hv, dv, eps);
  for (float& v : y) v = bf16_to_f32(f32_to_bf16(v));
  return y;
}

void launch_quantize(const QuantizePlan& p, const Function& f, const Stream& stream, CUdeviceptr w,
                     CUdeviceptr qweight, CUdeviceptr scales, int64_t rows) {
  if (rows < 1 || rows > INT32_MAX) fail("{} [K = {}]: rows = {} is not in [1, 2^31)", p.quantize_spec().kernel, p.k, rows);
  const int r = int(rows);
  if (p.group == kFp8Group) {  // one warp per (row, 128-k block)
    const int64_t blocks = rows * ((p.k + 127) / 128);
    f.launch({{blocks_for(blocks, p.tile.threads / 32)}, {unsigned(p.tile.threads)}}, stream, w, qweight, scales, r);
    return;
  }
  f.launch({{blocks_for(rows * p.k / 8, p.tile.threads)}, {unsigned(p.tile.threads)}}, stream, w, qweight, scales, r);
}

void launch_dequantize(const QuantizePlan& p, const Function& f, const Stream& stream, CUdeviceptr qweight,
                       CUdeviceptr scales, CUdeviceptr w, int64_t rows) {
  if (rows < 1 || rows > INT32_MAX) fail("{} [K = {}]: rows = {} is not in [1, 2^31)", p.dequantize_spec().kernel, p.k, rows);
  const int r = int(rows);
  if (p.group == kFp8Group) {  // one thread per 16 codes
    f.launch({{blocks_for(rows * p.k / 16, p.tile.threads)}, {unsigned(p.tile.threads)}}, stream, qweight, scales, w, r);
    return;
  }
  f.launch({{blocks_for(rows * p.k / 8, p.tile.threads)}, {unsigned(p.tile.threads)}}, stream, qweight, scales, w, r);
}

void launch_argmax(const SamplePlan& p, const Function& f, const Stream& stream, CUdeviceptr logits,
                   CUdeviceptr out_id, CUdeviceptr workspace) {
  const CUdeviceptr partial_v = workspace, partial_i = workspace + size_t(p.tile.blocks) * 4,
                    ticket = workspace + size_t(p.tile.blocks) * 8;
  f.launch({{unsigned(p.tile.blocks)}, {unsigned(p.tile.threads)}}, stream, logits, out_id, partial_v, partial_i,
           ticket);
}

void launch_sample(const SamplePlan& p, const Function& f, const Stream& stream, CUdeviceptr logits,
                   CUdeviceptr out_id, CUdeviceptr rng, const SamplingParams& params) {
  if (params.top_k < 0) fail("sample: top_k must be >= 0, got {}", params.top_k);
  if (!(params.top_p > 0.f && params.top_p <= 1.f)) fail("sample: top_p must be in (0, 1], got {}", params.top_p);
  const float temperature = params.temperature;
  const int top_k = params.top_k;
  const float top_p = params.top_p;
  f.launch({{1}, {unsigned(p.tile.threads)}}, stream, logits, out_id, rng, temperature, top_k, top_p);
}

std::vector<KernelSpec> dense_kernels(const Config& cfg, const DenseOptions& opt) {
  std::vector<KernelSpec> specs;
  auto add = [&](KernelSpec s) {
    if (std::find(specs.begin(), specs.end(), s) == specs.end()) specs.push_back(std::move(s));
  };
  for (const DenseShape& s : dense_shapes(cfg)) {
    const bool logits = s.proj == DenseProj::LmHead;  // fp32 out
    if (opt.group == 0) {
      add(gemv_bf16_plan(s.n, s.k, opt.decode_tokens, logits).spec());
      add(gemv_bf16_plan(s.n, s.k, 16, logits).spec());  // batched decode steps of 16+ rows
    } else {
      // The decode step's GEMV (M = 1) and the batched step's (more rows, the same K split).
      for (int m : {1, 2}) {
        W4GemvPlan p = w4_gemv_plan(s.n, s.k, opt.group, 1, logits);
        p.tile = w4_decode_tile(p.tile, opt.group, m);
        add(p.spec());
        if (s.proj == DenseProj::GdnOut && m == 1 && opt.group != kFp8Group) {  // the single-sequence step's,
                                                                                 // with the gated-norm input (W4A16)
          W4GemvPlan gated = p;
          gated.gated_dv = cfg.linear_value_head_dim;
          add(gated.spec());
        }
        if (s.proj == DenseProj::AttnOut || s.proj == DenseProj::GdnOut) {  // with the decode residual epilogue
          p.residual = true;
          add(p.spec());
        }
      }
      const QuantizePlan q = quantize_plan(s.k, opt.group);
      add(q.quantize_spec());
      if (opt.group != kFp8Group || opt.wgmma) add(q.dequantize_spec());  // FP8: the large-M wgmma GEMMs
    }
    // prefill (lm_head: eval logits); wgmma W4A16 / FP8: dequantized first at large M, in the loop
    // below that; mma.sync FP8: in the loop
    const int group = opt.wgmma ? wgmma_gemm_group(opt.group, opt.prefill_tokens, s.k) : mma_gemm_group(opt.group);
    add(gemm_plan(s.n, s.k, opt.prefill_tokens, logits, opt.wgmma, group).spec());
    if (opt.wgmma && opt.group != 0 && !logits && opt.prefill_tokens >= kWgmmaDequantFirstM && s.k % 64 == 0)
      add(gemm_plan(s.n, s.k, 512, false, true, opt.group).spec());
  }
  const SamplePlan sp = sample_plan(cfg.vocab_size);
  add(sp.argmax_spec());
  add(sp.sample_spec());
  return specs;
}

}  // namespace q35::qwen35::gpu
