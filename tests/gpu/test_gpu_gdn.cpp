// GPU: Gated DeltaNet (spec §2.4, §2.5) against the CPU reference chain (ref::conv1d_causal,
// l2norm, gdn_gates, gdn_recurrent, gated_rmsnorm) on the same bf16 inputs, at the tiny fixture's
// shapes and the 35B shapes: prefill (chunked and token-by-token) from a zero state at every length
// 1..17 and beyond, decode steps continuing it, prefill call after call; outputs, the fp32 state and
// the conv ring compared after every call. Each prefill is also checked against the fp32 recurrence
// (ref::gdn_recurrent) run on the GPU's own prologue outputs (bf16 q, k, v; g, beta) from the GPU's
// state before the call: that isolates the delta rule's error, which the chunked kernels' split-bf16
// products keep at the fp32 level. Every chunked case runs each form of the chunked delta rule
// (chunk_variants): the fused pass with its cluster gated RMSNorm (the default on sm_90), the same
// at the other slice width, the portable fused pass (O fp32 + gated_rmsnorm) and the unfused
// gdn_chunk_state -> gdn_chunk_output pair. A decode step is gdn_decode's o through gated_rmsnorm;
// the decode step's mixer as the runner chains it (gdn_decode + the out_proj GEMV with the gated
// norm as its input) is compared bit for bit with the two-kernel path (gdn_decode_norm + GEMV). Then
// per-kernel timings at the 35B shapes, the fused pass beside the unfused pair.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/gpu/gdn.h"
#include "models/qwen35/reference_ops.h"
#include "runtime/core/int4_format.h"
#include "tests/gpu/gpu_harness.h"

using namespace q35;
using namespace q35::gpu_test;
namespace gpu = q35::qwen35::gpu;
namespace ref = q35::qwen35::ref;

namespace {

// The forms of the chunked delta rule every chunked case runs (see gdn.h).
struct ChunkVariant {
  const char* name;
  GdnChunkTile tile;
};
std::vector<ChunkVariant> chunk_variants(const qwen35::Config& cfg) {
  const GdnChunkTile d = default_gdn_chunk_tile(gpu::gdn_shape(cfg));
  const int other = d.vs == 32 ? 16 : 32;
  return {{"gdn_chunk_state -> gdn_chunk_output (default)", d},
          {"fused + cluster norm", {d.vs, true, true}},
          {"fused + cluster norm, other vs", {other, true, true}},
          {"fused, portable (O fp32 + gated_rmsnorm)", {d.vs, true, false}}};
}

gpu::GdnTiles tiles_with(const qwen35::Config& cfg, const GdnChunkTile& chunk) {
  gpu::GdnTiles t = gpu::GdnTiles::defaults(gpu::gdn_shape(cfg));
  t.chunk = chunk;
  return t;
}

// One GDN layer: random bf16 weights, a projection of `total` tokens, the GPU state and the CPU
// reference state, advanced call by call.
struct Layer {
  const qwen35::Config cfg;
  const GdnShape s = gpu::gdn_shape(cfg);
  const int64_t C = s.conv_dim(), K = s.kc, stride = gpu::gdn_proj_columns(cfg);
  const int64_t total;
  std::vector<uint16_t> proj, conv_w, norm_w;  // [total, stride], [C, K], [dv]
  std::vector<float> A_log, dt_bias;           // [hv] (bf16-rounded, as in the checkpoint)
  // CPU reference state: conv [C, K-1] oldest first, ssm [hv, dk, dv].
  std::vector<float> ref_conv, ref_ssm;
  int64_t pos = 0;
  Gpu& g;
  DeviceBuffer d_proj, d_conv_w, d_norm_w, d_A_log, d_dt_bias, d_conv, d_ssm, d_pos;
  gpu::GdnKernels kernels;

  Layer(Gpu& gpu_, const qwen35::Config& c, int64_t total_tokens, uint32_t salt, const GdnChunkTile& chunk)
      : cfg(c), total(total_tokens), g(gpu_), kernels(gpu_.jit, gpu_.ctx, c, tiles_with(c, chunk)) {
    proj = random_bf16(size_t(total * stride), salt + 1, 1.f);
    conv_w = random_bf16(size_t(C * K), salt + 2, 0.5f);
    norm_w = to_bf16(random_f32(size_t(s.dv), salt + 3, 0.2f));
    for (auto& w : norm_w) w = f32_to_bf16(1.f + bf16_to_f32(w));
    // A_log in about [-3, 1] and dt_bias ~ 0.5: decays from ~0.99 to ~0.01 per token across heads.
    A_log = random_f32(size_t(s.hv), salt + 4, 1.f);
    dt_bias = random_f32(size_t(s.hv), salt + 5, 0.5f);
    for (auto& a : A_log) a = round_bf16(a - 1.f);
    for (auto& d : dt_bias) d = round_bf16(d);
    ref_conv.assign(size_t(C * (K - 1)), 0.f);
    ref_ssm.assign(size_t(s.hv * s.dk * s.dv), 0.f);
    d_proj = to_device(g, proj);
    d_conv_w = to_device(g, conv_w);
    d_norm_w = to_device(g, norm_w);
    d_A_log = to_device(g, A_log);
    d_dt_bias = to_device(g, dt_bias);
    d_conv = DeviceBuffer(g.driver, gpu::gdn_conv_state_bytes(cfg));
    d_ssm = DeviceBuffer(g.driver, gpu::gdn_ssm_state_bytes(cfg));
    d_conv.fill_bytes(0, g.stream);
    d_ssm.fill_bytes(0, g.stream);
    d_pos = DeviceBuffer(g.driver, 4);
  }

  gpu::GdnLayerWeights weights() const { return {d_conv_w.ptr(), d_A_log.ptr(), d_dt_bias.ptr(), d_norm_w.ptr()}; }
  gpu::GdnLayerState state() const { return {d_conv.ptr(), d_ssm.ptr()}; }

  // The reference chain over tokens [pos, pos + T): y [T, hv dv].
  std::vector<float> reference(int64_t T) {
    const int64_t hv = s.hv, dk = s.dk, dv = s.dv, qd = s.hk * dk;
    std::vector<float> qkv(T * C), z(T * hv * dv), a(T * hv), b(T * hv);
    for (int64_t t = 0; t < T; ++t) {
      const uint16_t* row = proj.data() + (pos + t) * stride;
      for (int64_t c = 0; c < C; ++c) qkv[t * C + c] = bf16_to_f32(row[c]);
      for (int64_t c = 0; c < hv * dv; ++c) z[t * hv * dv + c] = bf16_to_f32(row[C + c]);
      for (int64_t h = 0; h < hv; ++h) {
        b[t * hv + h] = bf16_to_f32(row[C + hv * dv + h]);
        a[t * hv + h] = bf16_to_f32(row[C + hv * dv + hv + h]);
      }
    }
    std::vector<float> w(conv_w.size()), act(T * C);
    for (size_t i = 0; i < w.size(); ++i) w[i] = bf16_to_f32(conv_w[i]);
    ref::conv1d_causal(qkv, ref_conv, w, act, T, C, K);
    std::vector<float> q(T * qd), k(T * qd), v(T * hv * dv);
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(act.data() + t * C, qd, q.data() + t * qd);
      std::copy_n(act.data() + t * C + qd, qd, k.data() + t * qd);
      std::copy_n(act.data() + t * C + 2 * qd, hv * dv, v.data() + t * hv * dv);
    }
    ref::l2norm(q, T * s.hk, dk, 1e-6f, 1.f / std::sqrt(float(dk)));
    ref::l2norm(k, T * s.hk, dk, 1e-6f, 1.f);
    std::vector<float> gd(T * hv), beta(T * hv), o(T * hv * dv), y(T * hv * dv), nw(dv);
    ref::gdn_gates(a, b, A_log, dt_bias, gd, beta, T, hv);
    ref::gdn_recurrent(q, k, v, gd, beta, ref_ssm, o, T, s.hk, hv, dk, dv);
    for (int64_t i = 0; i < dv; ++i) nw[i] = bf16_to_f32(norm_w[i]);
    ref::gated_rmsnorm(o, z, nw, y, T * hv, dv, float(cfg.rms_norm_eps));
    return y;
  }

  // The GPU state [hv, dv, dk] as the reference's [hv, dk, dv].
  std::vector<float> to_ref_layout(const std::vector<float>& ssm) const {
    std::vector<float> out(ssm.size());
    for (int64_t j = 0; j < s.hv; ++j)
      for (int64_t a = 0; a < s.dk; ++a)
        for (int64_t c = 0; c < s.dv; ++c) out[(j * s.dk + a) * s.dv + c] = ssm[(j * s.dv + c) * s.dk + a];
    return out;
  }

  // The delta rule alone: ref::gdn_recurrent (fp32) on the GPU prologue's outputs (ws.qkv bf16,
  // ws.g, ws.beta) from the GPU state before the call, then ref::gated_rmsnorm, against the GPU's
  // new state and y (call() has not advanced pos yet). Expected: state rel_l2 ~1e-7 (recurrence)
  // and ~5e-6 (chunked: the CPU emulation of its split-bf16 roundings, test_reference_ops,
  // measures 2e-6 .. 5.4e-6 against double at every length); y ~1.6e-3 for both, the bf16
  // rounding of y itself.
  void check_delta_rule(int64_t T, const DeviceBuffer& ws_buf, const std::vector<float>& ssm_before,
                        const std::vector<float>& y_gpu, bool chunked) {
    const int64_t hv = s.hv, dk = s.dk, dv = s.dv, qd = s.hk * dk;
    const gpu::GdnWorkspace w = gpu::gdn_workspace(cfg, T, ws_buf.ptr());
    std::vector<uint16_t> qkv16(size_t(T * C));
    std::vector<float> gd(size_t(T * hv)), beta(size_t(T * hv));
    ws_buf.download(qkv16.data(), qkv16.size() * 2, g.stream, size_t(w.qkv - ws_buf.ptr()));
    ws_buf.download(gd.data(), gd.size() * 4, g.stream, size_t(w.g - ws_buf.ptr()));
    ws_buf.download(beta.data(), beta.size() * 4, g.stream, size_t(w.beta - ws_buf.ptr()));
    g.stream.synchronize();
    std::vector<float> q(T * qd), k(T * qd), v(T * hv * dv), z(T * hv * dv), nw(dv);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t c = 0; c < qd; ++c) {
        q[t * qd + c] = bf16_to_f32(qkv16[t * C + c]);
        k[t * qd + c] = bf16_to_f32(qkv16[t * C + qd + c]);
      }
      for (int64_t c = 0; c < hv * dv; ++c) {
        v[t * hv * dv + c] = bf16_to_f32(qkv16[t * C + 2 * qd + c]);
        z[t * hv * dv + c] = bf16_to_f32(proj[(pos + t) * stride + C + c]);
      }
    }
    for (int64_t i = 0; i < dv; ++i) nw[i] = bf16_to_f32(norm_w[i]);
    std::vector<float> st = to_ref_layout(ssm_before), o(T * hv * dv), yr(T * hv * dv);
    ref::gdn_recurrent(q, k, v, gd, beta, st, o, T, s.hk, hv, dk, dv);
    ref::gated_rmsnorm(o, z, nw, yr, T * hv, dv, float(cfg.rms_norm_eps));
    const double err_s = rel_l2(to_ref_layout(to_host<float>(g, d_ssm)), st), err_y = rel_l2(y_gpu, yr);
    INFO(fmt::format("{} vs the fp32 recurrence on the same inputs: rel_l2 state {:.2e}, y {:.2e}",
                     chunked ? "chunked" : "recurrent", err_s, err_y));
    CHECK(err_s <= 3e-5);
    CHECK(err_y <= 4e-3);
    if (chunked && (T == 1 || T == 17 || T == 300))
      MESSAGE(fmt::format("chunked T = {} at pos {} (hv {}): rel_l2 state {:.2e}, y {:.2e} vs the fp32 recurrence",
                          T, pos, hv, err_s, err_y));
  }

  enum class Path { Chunked, Recurrent, Decode };

  // Runs T tokens on the GPU by `path`, then the reference; checks y, the ssm state and the ring.
  void call(int64_t T, Path path) {
    CAPTURE(T);
    CAPTURE(pos);
    CAPTURE(int(path));
    REQUIRE(pos + T <= total);
    const int p0 = int(pos);
    d_pos.upload(&p0, 4, g.stream);
    DeviceBuffer y = poisoned(g, size_t(T * s.hv * s.dv) * 2);
    const CUdeviceptr proj_at = d_proj.ptr() + CUdeviceptr(pos * stride * 2);
    if (path == Path::Decode) {  // gdn_decode's o, then the gated RMSNorm the out_proj GEMV applies
      REQUIRE(T == 1);
      DeviceBuffer o = poisoned(g, size_t(s.hv * s.dv) * 4);
      kernels.decode(g.stream, proj_at, int(stride), d_pos.ptr(), weights(), state(), o.ptr());
      kernels.gated_rmsnorm(g.stream, 1, o.ptr(), proj_at, int(stride), d_norm_w.ptr(), y.ptr());
      g.stream.synchronize();
    } else {
      const std::vector<float> ssm_before = to_host<float>(g, d_ssm);
      DeviceBuffer ws = poisoned(g, gpu::gdn_workspace_bytes(cfg, T));
      kernels.prefill(g.stream, proj_at, int(stride), int(T), d_pos.ptr(), weights(), state(),
                      gpu::gdn_workspace(cfg, T, ws.ptr()), y.ptr(), path == Path::Chunked);
      g.stream.synchronize();
      check_delta_rule(T, ws, ssm_before, to_f32(to_host<uint16_t>(g, y)), path == Path::Chunked);
    }
    const std::vector<float> got = to_f32(to_host<uint16_t>(g, y));
    const std::vector<float> want = reference(T);
    pos += T;
    const double err_y = rel_l2(got, want);
    const double err_s = rel_l2(to_ref_layout(to_host<float>(g, d_ssm)), ref_ssm);
    INFO(fmt::format("rel_l2 y {:.2e}, state {:.2e}", err_y, err_s));
    CHECK(err_y <= 1e-2);
    CHECK(err_s <= 1e-2);
    // The ring's last K-1 positions hold exactly the reference conv state (bf16 inputs).
    const std::vector<uint16_t> ring = to_host<uint16_t>(g, d_conv);
    int ring_bad = 0;
    for (int64_t d = 0; d < K - 1; ++d) {
      const int64_t p = pos - (K - 1) + d, slot = ((p % K) + K) % K;
      for (int64_t c = 0; c < C; ++c) ring_bad += bf16_to_f32(ring[slot * C + c]) != ref_conv[c * (K - 1) + d];
    }
    CHECK(ring_bad == 0);
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

TEST_CASE("GPU: gdn prefill (chunked) from zero at every length, then decode, tiny and 35B shapes") {
  auto g = open_gpu();
  for (auto [hk, hv] : {std::pair<int64_t, int64_t>{2, 4}, {16, 32}}) {
    CAPTURE(hv);
    const qwen35::Config cfg = gdn_layer_config(hk, hv);
    std::vector<int64_t> lengths;
    for (int64_t T = 1; T <= 17; ++T) lengths.push_back(T);
    for (int64_t T : {31, 63, 64, 65, 100, 128, 300}) lengths.push_back(T);
    for (const ChunkVariant& v : chunk_variants(cfg)) {
      CAPTURE(std::string(v.name));
      for (int64_t T : lengths) {
        Layer layer(*g, cfg, T + 3, uint32_t(T * 7 + hv), v.tile);
        layer.call(T, Layer::Path::Chunked);
        for (int step = 0; step < 3; ++step) layer.call(1, Layer::Path::Decode);
      }
    }
  }
}

TEST_CASE("GPU: gdn chunked prefill continuing a sequence at every length 1..17, tiny and 35B shapes") {
  auto g = open_gpu();
  for (auto [hk, hv] : {std::pair<int64_t, int64_t>{2, 4}, {16, 32}}) {
    CAPTURE(hv);
    const qwen35::Config cfg = gdn_layer_config(hk, hv);
    for (const ChunkVariant& v : chunk_variants(cfg)) {
      CAPTURE(std::string(v.name));
      // 100 tokens first (a state far from zero), then calls of 1..17 tokens, a decode step, 130 tokens.
      Layer layer(*g, cfg, 100 + 153 + 1 + 130, uint32_t(17 + hv), v.tile);
      layer.call(100, Layer::Path::Chunked);
      for (int64_t T = 1; T <= 17; ++T) layer.call(T, Layer::Path::Chunked);
      layer.call(1, Layer::Path::Decode);
      layer.call(130, Layer::Path::Chunked);
    }
  }
}

TEST_CASE("GPU: gdn token-by-token prefill, and prefill chunk after chunk, tiny and 35B shapes") {
  auto g = open_gpu();
  for (auto [hk, hv] : {std::pair<int64_t, int64_t>{2, 4}, {16, 32}}) {
    CAPTURE(hv);
    const qwen35::Config cfg = gdn_layer_config(hk, hv);
    {
      Layer layer(*g, cfg, 102, uint32_t(11 + hv), default_gdn_chunk_tile(gpu::gdn_shape(cfg)));
      layer.call(100, Layer::Path::Recurrent);
      layer.call(1, Layer::Path::Decode);
      layer.call(1, Layer::Path::Recurrent);
    }
    for (const ChunkVariant& v : chunk_variants(cfg)) {
      CAPTURE(std::string(v.name));
      // Chunks that start mid-ring (positions not multiples of 4) and short chunks after long ones.
      Layer layer(*g, cfg, 350, uint32_t(13 + hv), v.tile);
      layer.call(2, Layer::Path::Chunked);
      layer.call(1, Layer::Path::Decode);
      layer.call(100, Layer::Path::Chunked);
      layer.call(37, Layer::Path::Chunked);
      layer.call(3, Layer::Path::Recurrent);
      layer.call(64, Layer::Path::Chunked);
      layer.call(1, Layer::Path::Decode);
      layer.call(65, Layer::Path::Chunked);
      layer.call(1, Layer::Path::Decode);
      layer.call(1, Layer::Path::Chunked);
      layer.call(7, Layer::Path::Chunked);
      layer.call(16, Layer::Path::Chunked);
      layer.call(17, Layer::Path::Chunked);
    }
  }
}

// The single-sequence decode step's DeltaNet mixer as the runner chains it with W4A16 weights:
// gdn_decode -> o, then the out_proj GEMV with the gated RMSNorm as its input (gemv_w4a16_gated), in
// a graph with both launched as the decode step launches them (the GEMV with PDL), against the
// two-kernel path it replaced: gdn_decode_norm -> y (each head's last block runs the norm), then
// gemv_w4a16. Two copies of one layer (same weights, projection rows and state) after a 5-token
// prefill, 6 decode steps (positions 5..10: every ring phase), tiny fixture and 35B shapes: o, the
// state, the ring and the out_proj output bit-identical at every step; the old path's y against the
// CPU reference chain and the new path's output against ref::matmul of the reference y.
TEST_CASE("GPU: decode step mixer, gdn_decode + gemv_w4a16_gated == gdn_decode_norm + gemv_w4a16 bit for bit, tiny and 35B") {
  auto g = open_gpu();
  for (auto [hk, hv] : {std::pair<int64_t, int64_t>{2, 4}, {16, 32}}) {
    CAPTURE(hv);
    const qwen35::Config cfg = gdn_layer_config(hk, hv);
    const GdnChunkTile chunk = default_gdn_chunk_tile(gpu::gdn_shape(cfg));
    const uint32_t salt = uint32_t(29 + hv);
    Layer old_path(*g, cfg, 11, salt, chunk), new_path(*g, cfg, 11, salt, chunk);
    old_path.call(5, Layer::Path::Chunked);
    new_path.call(5, Layer::Path::Chunked);
    const GdnShape& s = old_path.s;
    const int64_t K = s.hv * s.dv, hidden = hv == 32 ? 2048 : 128, group = hv == 32 ? 128 : 64;
    const float eps = float(cfg.rms_norm_eps);
    // out_proj [hidden, K], W4A16.
    const std::vector<uint16_t> W = random_bf16(size_t(hidden * K), salt + 7, 0.05f);
    DeviceBuffer d_W = to_device(*g, W), d_q(g->driver, size_t(hidden * K / 8) * 4),
                 d_s(g->driver, size_t(hidden * K / group) * 2);
    const gpu::QuantizePlan qp = gpu::quantize_plan(K, group);
    gpu::launch_quantize(qp, g->jit.load(qp.quantize_spec(), g->ctx), g->stream, d_W.ptr(), d_q.ptr(), d_s.ptr(), hidden);
    const std::vector<float> w_ref = int4::dequantize(int4::quantize(to_f32(W), hidden, K, group), hidden, K, group);
    const gpu::W4GemvPlan plain = gpu::w4_gemv_plan(hidden, K, group, 1);
    gpu::W4GemvPlan gated = plain;
    gated.gated_dv = s.dv;
    const Function f_plain = g->jit.load(plain.spec(), g->ctx), f_gated = g->jit.load(gated.spec(), g->ctx);
    DeviceBuffer counters(g->driver, size_t(s.hv) * 4);
    counters.fill_bytes(0, g->stream);
    for (int step = 0; step < 6; ++step) {
      CAPTURE(step);
      REQUIRE(old_path.pos == new_path.pos);
      const int p0 = int(old_path.pos);
      old_path.d_pos.upload(&p0, 4, g->stream);
      new_path.d_pos.upload(&p0, 4, g->stream);
      const CUdeviceptr row = CUdeviceptr(old_path.pos * old_path.stride * 2);
      const CUdeviceptr proj_a = old_path.d_proj.ptr() + row, proj_b = new_path.d_proj.ptr() + row;
      DeviceBuffer o_a = poisoned(*g, size_t(K) * 4), y_a = poisoned(*g, size_t(K) * 2),
                   out_a = poisoned(*g, size_t(hidden) * 2);
      DeviceBuffer o_b = poisoned(*g, size_t(K) * 4), out_b = poisoned(*g, size_t(hidden) * 2);
      old_path.kernels.decode_norm(g->stream, proj_a, int(old_path.stride), old_path.d_pos.ptr(), old_path.weights(),
                                   old_path.state(), o_a.ptr(), y_a.ptr(), counters.ptr());
      gpu::launch(plain, f_plain, g->stream, d_q.ptr(), d_s.ptr(), y_a.ptr(), out_a.ptr(), 1);
      const gpu::GatedNormInput in{o_b.ptr(), proj_b + CUdeviceptr(s.conv_dim() * 2), new_path.d_norm_w.ptr(),
                                   int(new_path.stride), eps};
      Graph graph = Graph::capture(g->driver, g->stream, [&] {
        new_path.kernels.decode(g->stream, proj_b, int(new_path.stride), new_path.d_pos.ptr(), new_path.weights(),
                                new_path.state(), o_b.ptr());
        gpu::launch(gated, f_gated, g->stream, d_q.ptr(), d_s.ptr(), in, out_b.ptr(), 1, true);
      });
      graph.instantiate().launch(g->stream);
      CHECK(to_host<uint32_t>(*g, o_a) == to_host<uint32_t>(*g, o_b));
      const std::vector<uint16_t> got_a = to_host<uint16_t>(*g, out_a), got_b = to_host<uint16_t>(*g, out_b);
      CHECK(got_a == got_b);
      CHECK(to_host<uint32_t>(*g, old_path.d_ssm) == to_host<uint32_t>(*g, new_path.d_ssm));
      CHECK(to_host<uint16_t>(*g, old_path.d_conv) == to_host<uint16_t>(*g, new_path.d_conv));
      CHECK(to_host<int32_t>(*g, counters) == std::vector<int32_t>(size_t(s.hv), 0));  // re-armed
      // The CPU reference of this token (the old path's reference state advances; both positions do).
      const std::vector<float> y_ref = old_path.reference(1);
      std::vector<float> out_ref(static_cast<size_t>(hidden));
      ref::matmul(y_ref, w_ref, out_ref, 1, hidden, K);
      const double err_y = rel_l2(to_f32(to_host<uint16_t>(*g, y_a)), y_ref), err_out = rel_l2(to_f32(got_b), out_ref);
      INFO(fmt::format("rel_l2 y {:.2e}, out_proj {:.2e}", err_y, err_out));
      CHECK(err_y <= 1e-2);
      CHECK(err_out <= 1e-2);
      ++old_path.pos;
      ++new_path.pos;
    }
  }
}

TEST_CASE("GPU: gdn timings at the 35B shapes") {
  auto g = open_gpu();
  const qwen35::Config cfg = gdn_layer_config(16, 32);
  const GdnShape s = gpu::gdn_shape(cfg);
  gpu::GdnKernels k(g->jit, g->ctx, cfg);  // default tiles (the unfused state / output pair)
  const GdnChunkTile fused = default_gdn_chunk_tile(s);
  gpu::GdnKernels k_cluster(g->jit, g->ctx, cfg, tiles_with(cfg, {fused.vs, true, true}));  // cluster form on sm_90
  gpu::GdnKernels k_portable(g->jit, g->ctx, cfg, tiles_with(cfg, {fused.vs, true, false}));
  gpu::GdnKernels k_pair(g->jit, g->ctx, cfg, tiles_with(cfg, {fused.vs, false, false}));
  const int64_t stride = gpu::gdn_proj_columns(cfg), C = s.conv_dim();
  Event start(g->driver), stop(g->driver);

  {  // Decode: 30 layers (distinct states, 60 MB > L2) in one graph, 20 replays.
    constexpr int kLayers = 30;
    DeviceBuffer proj = to_device(*g, random_bf16(size_t(stride), 21, 1.f));
    DeviceBuffer conv_w = to_device(*g, random_bf16(size_t(C * s.kc), 22, 0.5f));
    DeviceBuffer norm_w = to_device(*g, random_bf16(size_t(s.dv), 23, 1.f));
    DeviceBuffer A_log = to_device(*g, random_f32(size_t(s.hv), 24, 1.f));
    DeviceBuffer dt_bias = to_device(*g, random_f32(size_t(s.hv), 25, 1.f));
    DeviceBuffer conv(g->driver, gpu::gdn_conv_state_bytes(cfg) * kLayers), ssm(g->driver, gpu::gdn_ssm_state_bytes(cfg) * kLayers);
    conv.fill_bytes(0, g->stream);
    ssm.fill_bytes(0, g->stream);
    DeviceBuffer pos(g->driver, 4), o(g->driver, size_t(s.hv * s.dv) * 4), y(g->driver, size_t(s.hv * s.dv) * 2);
    DeviceBuffer counters(g->driver, size_t(s.hv) * 4);
    pos.fill_bytes(0, g->stream);
    counters.fill_bytes(0, g->stream);
    const gpu::GdnLayerWeights w{conv_w.ptr(), A_log.ptr(), dt_bias.ptr(), norm_w.ptr()};
    auto layer_state = [&](int l) {
      return gpu::GdnLayerState{conv.ptr() + gpu::gdn_conv_state_bytes(cfg) * l, ssm.ptr() + gpu::gdn_ssm_state_bytes(cfg) * l};
    };
    const double state_mb = 2.0 * double(gpu::gdn_ssm_state_bytes(cfg)) / 1e6;
    // gdn_decode (o only: the decode step's form), gdn_decode_norm (+ the last-block gated RMSNorm),
    // gated_rmsnorm alone.
    for (int form : {0, 1, 2}) {
      Graph graph = Graph::capture(g->driver, g->stream, [&] {
        for (int l = 0; l < kLayers; ++l) {
          if (form == 0) k.decode(g->stream, proj.ptr(), int(stride), pos.ptr(), w, layer_state(l), o.ptr(), true);
          if (form == 1)
            k.decode_norm(g->stream, proj.ptr(), int(stride), pos.ptr(), w, layer_state(l), o.ptr(), y.ptr(),
                          counters.ptr(), true);
          if (form == 2) k.gated_rmsnorm(g->stream, 1, o.ptr(), proj.ptr(), int(stride), norm_w.ptr(), y.ptr(), true);
        }
      });
      GraphExec exec = graph.instantiate();
      exec.launch(g->stream);
      std::vector<double> us;
      for (int rep = 0; rep < 20; ++rep) {
        start.record(g->stream);
        exec.launch(g->stream);
        stop.record(g->stream);
        stop.synchronize();
        us.push_back(stop.elapsed_ms_since(start) * 1e3 / kLayers);
      }
      if (form == 0)
        MESSAGE(fmt::format("gdn_decode (o only, the decode step's form) per layer: {:.2f} us; floor {:.2f} us "
                            "(state {:.1f} MB read+written + conv w/ring {:.2f} MB at 3.0 TB/s); anchor ~3.7 us",
                            median(us), (state_mb + 0.15) / 3.0, state_mb, 0.15));
      else if (form == 1)
        MESSAGE(fmt::format("gdn_decode_norm (+ the gated RMSNorm by each head's last block) per layer: {:.2f} us",
                            median(us)));
      else
        MESSAGE(fmt::format("gated_rmsnorm alone (T = 1) per layer: {:.2f} us", median(us)));
    }
  }

  {  // Prefill T = 4096 from position 0.
    const int T = 4096;
    DeviceBuffer proj = to_device(*g, random_bf16(size_t(T * stride), 31, 1.f));
    DeviceBuffer conv_w = to_device(*g, random_bf16(size_t(C * s.kc), 32, 0.5f));
    DeviceBuffer norm_w = to_device(*g, random_bf16(size_t(s.dv), 33, 1.f));
    std::vector<float> a_log = random_f32(size_t(s.hv), 34, 1.f);
    for (auto& a : a_log) a -= 1.f;
    DeviceBuffer A_log = to_device(*g, a_log), dt_bias = to_device(*g, random_f32(size_t(s.hv), 35, 0.5f));
    DeviceBuffer conv(g->driver, gpu::gdn_conv_state_bytes(cfg)), ssm(g->driver, gpu::gdn_ssm_state_bytes(cfg));
    DeviceBuffer pos(g->driver, 4), ws_buf(g->driver, gpu::gdn_workspace_bytes(cfg, T)), y(g->driver, size_t(T * s.hv * s.dv) * 2);
    conv.fill_bytes(0, g->stream);
    ssm.fill_bytes(0, g->stream);
    pos.fill_bytes(0, g->stream);
    const gpu::GdnLayerWeights w{conv_w.ptr(), A_log.ptr(), dt_bias.ptr(), norm_w.ptr()};
    const gpu::GdnLayerState st{conv.ptr(), ssm.ptr()};
    const gpu::GdnWorkspace ws = gpu::gdn_workspace(cfg, T, ws_buf.ptr());
    auto time_us = [&](auto&& launch) {
      launch();
      std::vector<double> us;
      for (int rep = 0; rep < 20; ++rep) {
        start.record(g->stream);
        launch();
        stop.record(g->stream);
        stop.synchronize();
        us.push_back(stop.elapsed_ms_since(start) * 1e3);
      }
      return median(us);
    };
    const double pro = time_us([&] { k.prologue(g->stream, proj.ptr(), int(stride), T, pos.ptr(), w, st, ws); });
    const double prep = time_us([&] { k.chunk_prepare(g->stream, T, ws); });
    // The fused pass (the cluster form on sm_90), the portable fused pass + gated_rmsnorm.
    const double chk = time_us([&] { k_cluster.chunked(g->stream, proj.ptr(), int(stride), T, w, st, ws, y.ptr()); });
    const double fus =
        time_us([&] { k_cluster.chunk_fused(g->stream, proj.ptr(), int(stride), T, norm_w.ptr(), st, ws, y.ptr()); });
    const double chk_p = time_us([&] { k_portable.chunked(g->stream, proj.ptr(), int(stride), T, w, st, ws, y.ptr()); });
    const double fus_p =
        time_us([&] { k_portable.chunk_fused(g->stream, proj.ptr(), int(stride), T, norm_w.ptr(), st, ws, y.ptr()); });
    // The unfused pair.
    const double chk_3 = time_us([&] { k_pair.chunked(g->stream, proj.ptr(), int(stride), T, w, st, ws, y.ptr()); });
    const double state = time_us([&] { k_pair.chunk_state(g->stream, T, st, ws); });
    const double out = time_us([&] { k_pair.chunk_output(g->stream, proj.ptr(), int(stride), T, norm_w.ptr(), ws, y.ptr()); });
    const double rec = time_us([&] { k.recurrent(g->stream, T, st, ws); });
    const double nrm = time_us([&] { k.gated_rmsnorm(g->stream, T, ws.o, proj.ptr(), int(stride), norm_w.ptr(), y.ptr()); });
    // Floors at 3.0 TB/s and 700 TFLOP/s (bf16 mma). The prologue reads qkv + gates of proj and
    // writes qkv bf16 + g, beta. Bytes per token and value head of the chunked kernels: prepare
    // k, v bf16 in, U fp32 + W hi/lo out; state U, W, k in, Vn hi/lo out, + h hi/lo per chunk;
    // output q, k, Vn, z in, y out, + h per chunk; fused q, k, U, W, z in, y out (each once: the
    // slices of a head share W, q, k through L2). FLOPs as issued (split products counted).
    const double hvt = double(T) * s.hv, hvc = hvt / 64;
    const double bytes_prep = hvt * (s.dk * 2 + s.dv * 2 + s.dv * 4 + s.dk * 4);
    const double bytes_state = hvt * (s.dv * 4 + s.dk * 4 + s.dk * 2 + s.dv * 4) + hvc * s.dk * s.dv * 4;
    const double bytes_out = hvt * (2 * s.dk * 2 + s.dv * 4 + s.dv * 2 + s.dv * 2) + hvc * s.dk * s.dv * 4;
    const double bytes_fused = hvt * (2 * s.dk * 2 + s.dv * 4 + s.dk * 4 + s.dv * 2 + s.dv * 2);
    const double flops_prep = 2.0 * 64 * (64 * s.dk + 2 * 64 * (s.dk + s.dv));
    const double flops_chunk = flops_prep +                                                 // prepare
                               2.0 * 64 * s.dk * s.dv * (3 + 2) +                          // state
                               2.0 * 64 * (64 * s.dk + 2 * s.dk * s.dv + 3 * 64 * s.dv);  // output
    const double pro_floor = double(T) * (C * 2 * 2 + s.hv * 4 * 4) / 3.0e6;
    const double chk3_floor = std::max((bytes_prep + bytes_state + bytes_out) / 3.0e6, hvc * flops_chunk / 700e6);
    const double chk_floor = std::max((bytes_prep + bytes_fused) / 3.0e6, hvc * flops_chunk / 700e6);
    MESSAGE(fmt::format("gdn prefill T = {} per layer: prologue {:.1f} us (floor {:.1f}), gdn_chunk_prepare {:.1f} us "
                        "(bytes floor {:.1f}); then\n"
                        "  fused ({}): chunked {:.1f} us (floor {:.1f}) = prepare + {} {:.1f} us "
                        "(bytes floor {:.1f}); prologue + chunked {:.1f} us (target <= 300; FLA / FlashInfer 170-250)\n"
                        "  fused portable: chunked {:.1f} us = prepare + gdn_chunk_fused {:.1f} us + gated_rmsnorm\n"
                        "  unfused: chunked {:.1f} us (floor {:.1f}) = prepare + gdn_chunk_state {:.1f} us ({:.1f}) + "
                        "gdn_chunk_output {:.1f} us ({:.1f}, gated RMSNorm fused); prologue + chunked {:.1f} us\n"
                        "  token-by-token {:.1f} us + gated_rmsnorm {:.1f} us",
                        T, pro, pro_floor, prep, bytes_prep / 3.0e6, k.cluster() ? "cluster form" : "portable form", chk,
                        chk_floor, k.cluster() ? "gdn_chunk_fused_cluster" : "gdn_chunk_fused + gated_rmsnorm", fus,
                        bytes_fused / 3.0e6, pro + chk, chk_p, fus_p, chk_3, chk3_floor, state, bytes_state / 3.0e6, out,
                        bytes_out / 3.0e6, pro + chk_3, rec, nrm));
  }
}
