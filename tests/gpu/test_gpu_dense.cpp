// GPU: the dense projections (gemm_bf16, gemv_bf16, gemv_w4a16, quantize / dequantize W4A16) at
// every projection shape of the tiny fixture and of the 35B config, against ref::matmul on the same
// (dequantized) weights; INT4 quantization bit-exact with q35::int4::quantize; argmax exact;
// sampling against the host sampler's support and softmax. Large outputs are checked on a sample
// of rows (first, random, last) and columns; timings at the 35B shapes are reported, not asserted.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <tuple>

#include "autotune/spaces.h"
#include "autotune/tiles_dense.h"
#include "models/qwen35/config.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/gpu/gdn.h"
#include "models/qwen35/reference_ops.h"
#include "runtime/core/int4_format.h"
#include "runtime/core/sampler.h"
#include "tests/gpu/gpu_harness.h"

using namespace q35;
using namespace q35::gpu_test;
using namespace q35::qwen35;
using namespace q35::qwen35::gpu;

using q35::test::config_35b;
using q35::test::config_tiny;

namespace {



std::vector<DenseShape> all_shapes() {
  std::vector<DenseShape> s = dense_shapes(config_tiny()), big = dense_shapes(config_35b());
  s.insert(s.end(), big.begin(), big.end());
  return s;
}

std::vector<float> download_f32_or_bf16(const Gpu& g, const DeviceBuffer& b, bool f32) {
  return f32 ? to_host<float>(g, b) : to_f32(to_host<uint16_t>(g, b));
}

void precompile(Gpu& g, const std::vector<KernelSpec>& specs) {
  g.jit.compile_all(specs, g.ctx.device().arch(), 16);
}

}  // namespace

TEST_CASE("GPU dense: quantize_w4 is bit-exact with int4::quantize; dequantize_w4 gives bf16(q * scale)") {
  auto g = open_gpu();
  struct Case {
    int64_t rows, k;
  };
  std::vector<Case> cases;
  for (const DenseShape& s : all_shapes()) cases.push_back({s.n, s.k});
  cases.push_back({16 * 128, 128});    // tiny experts gate_up [E, 2I, H] as rows = E * 2I
  cases.push_back({8 * 1024, 2048});   // 8 of the 35B experts' gate_up
  std::vector<KernelSpec> specs;
  for (const Case& c : cases)
    for (int64_t G : {32, 64, 128}) {
      QuantizePlan p = quantize_plan(c.k, G);
      specs.push_back(p.quantize_spec());
      specs.push_back(p.dequantize_spec());
    }
  precompile(*g, specs);
  for (const Case& c : cases) {
    std::vector<uint16_t> w = fast_random_bf16(size_t(c.rows * c.k), 11, 0.08f);
    // One all-zero group (scale 0 -> q 0) and one with an exact half-step (rint ties to even).
    std::fill(w.begin(), w.begin() + 128, 0);
    w[size_t(c.k)] = f32_to_bf16(7.5f), w[size_t(c.k) + 1] = f32_to_bf16(0.5f), w[size_t(c.k) + 2] = f32_to_bf16(-1.5f);
    DeviceBuffer d_w = to_device(*g, w);
    std::vector<int64_t> rows = sample_indices(c.rows, 2048, 12);
    std::vector<float> w_sub = rows_f32(w, c.k, rows);
    for (int64_t G : {32, 64, 128}) {
      CAPTURE(c.rows);
      CAPTURE(c.k);
      CAPTURE(G);
      QuantizePlan p = quantize_plan(c.k, G);
      DeviceBuffer d_q = poisoned(*g, size_t(c.rows * c.k / 8) * 4), d_s = poisoned(*g, size_t(c.rows * c.k / G) * 2),
                   d_deq = poisoned(*g, size_t(c.rows * c.k) * 2);
      launch_quantize(p, g->jit.load(p.quantize_spec(), g->ctx), g->stream, d_w.ptr(), d_q.ptr(), d_s.ptr(), c.rows);
      launch_dequantize(p, g->jit.load(p.dequantize_spec(), g->ctx), g->stream, d_q.ptr(), d_s.ptr(), d_deq.ptr(),
                        c.rows);
      std::vector<uint32_t> q = to_host<uint32_t>(*g, d_q);
      std::vector<uint16_t> s = to_host<uint16_t>(*g, d_s), deq = to_host<uint16_t>(*g, d_deq);
      int64_t wpr = c.k / 8, spr = c.k / G;
      int64_t bad_q = 0, bad_s = 0, bad_deq = 0;
      for (size_t i = 0; i < rows.size(); ++i) {
        int4::Quantized want = int4::quantize(std::span(w_sub).subspan(i * size_t(c.k), size_t(c.k)), 1, c.k, G);
        const int64_t r = rows[i];
        bad_q += !std::equal(want.qweight.begin(), want.qweight.end(), q.begin() + r * wpr);
        bad_s += !std::equal(want.scales.begin(), want.scales.end(), s.begin() + r * spr);
        std::vector<float> f = int4::dequantize(want, 1, c.k, G);
        for (int64_t j = 0; j < c.k; ++j) bad_deq += deq[size_t(r * c.k + j)] != f32_to_bf16(f[size_t(j)]);
      }
      CHECK(bad_q == 0);
      CHECK(bad_s == 0);
      CHECK(bad_deq == 0);
      CHECK(q[0] == 0x88888888u);  // the zero group: q = 0 -> u = 8 in every nibble
    }
  }
}

TEST_CASE("GPU dense: gemm_bf16 at every projection shape, ragged M and N, bf16 and fp32 out") {
  auto g = open_gpu();
  std::vector<std::tuple<DenseShape, int64_t, bool>> cases;  // shape, M, fp32 out
  for (const DenseShape& s : all_shapes()) {
    const bool big = s.n * s.k > (int64_t(1) << 22);
    for (int64_t M : {17, 64, 200, 4096}) {
      if (s.proj == DenseProj::LmHead && big && M > 200) continue;  // 4096 x 248320 fp32 = 4 GB
      cases.push_back({s, M, s.proj == DenseProj::LmHead});
    }
  }
  cases.push_back({DenseShape{DenseProj::AttnOut, "odd N, K % 64 != 0", 1001, 2056}, 77, false});
  std::vector<KernelSpec> specs;
  for (auto& [s, M, f32] : cases) specs.push_back(gemm_plan(s.n, s.k, M, f32).spec());
  precompile(*g, specs);

  std::map<std::pair<int64_t, int64_t>, std::vector<uint16_t>> weights;
  for (auto& [s, M, f32] : cases) {
    CAPTURE(s.name);
    CAPTURE(s.n);
    CAPTURE(s.k);
    CAPTURE(M);
    auto& W = weights[{s.n, s.k}];
    if (W.empty()) W = fast_random_bf16(size_t(s.n * s.k), 21, 0.1f);
    std::vector<uint16_t> x = fast_random_bf16(size_t(M * s.k), 22, 2.f);
    DeviceBuffer d_W = to_device(*g, W), d_x = to_device(*g, x), d_y = poisoned(*g, size_t(M * s.n) * (f32 ? 4 : 2));
    GemmPlan p = gemm_plan(s.n, s.k, M, f32);
    Function f = g->jit.load(p.spec(), g->ctx);
    prepare(p, f);
    launch(p, f, g->stream, d_x.ptr(), d_W.ptr(), d_y.ptr(), int(M));
    std::vector<float> y = download_f32_or_bf16(*g, d_y, f32);
    std::vector<int64_t> mi = sample_indices(M, 48, 23), ni = sample_indices(s.n, 4096, 24);
    const double err = check_product(rows_f32(x, s.k, mi), rows_f32(W, s.k, ni), mi, ni, s.n, s.k, y);
    CHECK(err <= 1e-2);
    // Every element written (poison is NaN): checked on the whole output.
    CHECK(std::all_of(y.begin(), y.end(), [](float v) { return std::isfinite(v); }));
    if (s.n * s.k > (int64_t(1) << 22) && M == 4096) {
      const double us = graph_us(*g, 5, [&](int) { launch(p, f, g->stream, d_x.ptr(), d_W.ptr(), d_y.ptr(), int(M)); });
      MESSAGE(fmt::format("gemm_bf16 {} [{} x {}] M={}: {:.1f} us, {:.0f} TFLOP/s (floor {:.1f} us at 700 TFLOP/s)",
                          s.name, s.n, s.k, M, us, 2.0 * M * s.n * s.k / us * 1e-6, 2.0 * M * s.n * s.k / 700e6));
      // Other tiles, for the heuristic: timing only (the default tile is the one checked above).
      for (GemmTile t : {GemmTile{128, 256, 64, 2, 4, 3}, GemmTile{128, 128, 64, 2, 4, 4}, GemmTile{256, 128, 64, 4, 2, 3}}) {
        GemmPlan alt{s.n, s.k, t, f32};
        Function fa = g->jit.load(alt.spec(), g->ctx);
        prepare(alt, fa);
        const double us_alt =
            graph_us(*g, 5, [&](int) { launch(alt, fa, g->stream, d_x.ptr(), d_W.ptr(), d_y.ptr(), int(M)); });
        MESSAGE(fmt::format("  tile {}x{}x{} warps {}x{} stages {}: {:.1f} us, {:.0f} TFLOP/s", t.bm, t.bn, t.bk,
                            t.warps_m, t.warps_n, t.stages, us_alt, 2.0 * M * s.n * s.k / us_alt * 1e-6));
      }
    }
  }
}

// W [n, k] bf16 through int4::quantize -> (qweight, scales) and the bf16 weights the kernels see:
// bf16(q * scale), as dequantize_w4 and the GEMMs' in-loop dequantization round them.
struct W4 {
  std::vector<uint32_t> qweight;
  std::vector<uint16_t> scales, dequantized;
};
W4 quantize_w4(const std::vector<uint16_t>& W, int64_t n, int64_t k, int64_t group) {
  std::vector<float> wf(W.size());
  for (size_t i = 0; i < W.size(); ++i) wf[i] = bf16_to_f32(W[i]);
  int4::Quantized q = int4::quantize(wf, n, k, group);
  std::vector<float> d = int4::dequantize(q, n, k, group);
  W4 out{std::move(q.qweight), std::move(q.scales), std::vector<uint16_t>(d.size())};
  for (size_t i = 0; i < d.size(); ++i) out.dequantized[i] = f32_to_bf16(d[i]);
  return out;
}

TEST_CASE("GPU dense (sm_90a): gemm_wgmma, bf16 and W4A16 g32 / g128 in the loop, every shape, every tile") {
  auto g = open_gpu();
  if (g->ctx.device().arch() != "sm_90a") {
    MESSAGE("skipped: gemm_wgmma runs on sm_90a only, this device is " << g->ctx.device().arch());
    return;
  }
  struct Case {
    DenseShape s;
    int64_t M;
    int group;
    std::optional<GemmTile> tile;  // none: the default
  };
  std::vector<Case> cases;
  for (const DenseShape& s : all_shapes()) {
    if (s.proj == DenseProj::LmHead) continue;  // prefill lm_head: GEMV chunks
    for (int64_t M : {17, 200, 4096})
      for (int group : {0, 128, 32}) cases.push_back({s, M, group, std::nullopt});
  }
  cases.push_back({DenseShape{DenseProj::AttnOut, "odd N, K % 64 != 0", 1000, 2056}, 77, 0, std::nullopt});
  // Every tile of the tuner's space on one shape (every branch of the template: 1 or 2 warpgroups
  // along M and N, wgmma N 32..256, 3..5 stages, ragged N = 12352).
  const DenseShape in = dense_shapes(config_35b())[2];
  REQUIRE(in.proj == DenseProj::GdnIn);
  for (int group : {0, 128})
    for (const GemmTile& t : tune::gemm_candidates(in.n, in.k, 300, true, group)) cases.push_back({in, 300, group, t});
  // The swapped warp-specialised tiles (weights x 16..64 rows) of short prompts, ragged M.
  for (int group : {0, 128})
    for (const GemmTile& t : tune::gemm_candidates(in.n, in.k, 100, true, group))
      if (t.swap) cases.push_back({in, 100, group, t});
  std::vector<KernelSpec> specs;
  auto plan_of = [](const Case& c) {
    GemmPlan p = gemm_plan(c.s.n, c.s.k, c.M, false, true, c.group);
    if (c.tile) p.tile = *c.tile;
    return p;
  };
  for (const Case& c : cases) specs.push_back(plan_of(c).spec());
  precompile(*g, specs);

  std::map<std::pair<int64_t, int64_t>, std::vector<uint16_t>> weights;
  std::map<std::tuple<int64_t, int64_t, int>, W4> quantized;
  for (const Case& c : cases) {
    const DenseShape& s = c.s;
    CAPTURE(s.name);
    CAPTURE(s.n);
    CAPTURE(s.k);
    CAPTURE(c.M);
    CAPTURE(c.group);
    const GemmPlan p = plan_of(c);
    CAPTURE(p.spec().str());
    auto& W = weights[{s.n, s.k}];
    if (W.empty()) W = fast_random_bf16(size_t(s.n * s.k), 31, 0.1f);
    const std::vector<uint16_t>* w_ref = &W;
    DeviceBuffer d_W, d_S;
    if (c.group) {
      W4& q = quantized[{s.n, s.k, c.group}];
      if (q.qweight.empty()) q = quantize_w4(W, s.n, s.k, c.group);
      d_W = to_device(*g, q.qweight), d_S = to_device(*g, q.scales), w_ref = &q.dequantized;
    } else {
      d_W = to_device(*g, W);
    }
    const std::vector<uint16_t> x = fast_random_bf16(size_t(c.M * s.k), 32, 2.f);
    DeviceBuffer d_x = to_device(*g, x), d_y = poisoned(*g, size_t(c.M * s.n) * 2);
    Function f = g->jit.load(p.spec(), g->ctx);
    prepare(p, f);
    launch(p, f, g->stream, d_x.ptr(), d_W.ptr(), d_y.ptr(), int(c.M), c.group ? d_S.ptr() : 0);
    const std::vector<float> y = download_f32_or_bf16(*g, d_y, false);
    const std::vector<int64_t> mi = sample_indices(c.M, 48, 33), ni = sample_indices(s.n, 4096, 34);
    const double err = check_product(rows_f32(x, s.k, mi), rows_f32(*w_ref, s.k, ni), mi, ni, s.n, s.k, y);
    CHECK(err <= 1e-2);
    CHECK(std::all_of(y.begin(), y.end(), [](float v) { return std::isfinite(v); }));
    if (s.n * s.k > (int64_t(1) << 22) && c.M == 4096 && !c.tile) {
      const double us = graph_us(*g, 5, [&](int) {
        launch(p, f, g->stream, d_x.ptr(), d_W.ptr(), d_y.ptr(), int(c.M), c.group ? d_S.ptr() : 0);
      });
      const double flop = 2.0 * c.M * s.n * s.k;
      MESSAGE(fmt::format("gemm_wgmma {} [{} x {}] {} M={}: {:.1f} us, {:.0f} TFLOP/s (tile {}x{} wg {}x{} stages {}); "
                          "err {:.1e}",
                          s.name, s.n, s.k, c.group ? fmt::format("W4A16 g{}", c.group) : "bf16", c.M, us,
                          flop / us * 1e-6, p.tile.bm, p.tile.bn, p.tile.warps_m, p.tile.warps_n, p.tile.stages, err));
    }
  }
}

// The weights of a dense shape as the GEMV under test reads them: G = 0 none (bf16, d_W itself), else
// d_W quantized to W4A16 group G on the GPU; w_ref the reference rows w_sub (rows of W, `rows` of them)
// as the kernel sees them (bf16, or quantized and dequantized on the CPU).
struct QuantizedCopy {
  DeviceBuffer qweight, scales;
  std::vector<float> w_ref;
};
QuantizedCopy quantized_copy(Gpu& g, const DenseShape& s, const DeviceBuffer& d_W, const std::vector<float>& w_sub,
                             int64_t rows, int64_t G) {
  QuantizedCopy q;
  q.w_ref = w_sub;
  if (G == 0) return q;
  QuantizePlan qp = quantize_plan(s.k, G);
  q.qweight = DeviceBuffer(g.driver, size_t(s.n * s.k / 8) * 4);
  q.scales = DeviceBuffer(g.driver, size_t(s.n * s.k / G) * 2);
  launch_quantize(qp, g.jit.load(qp.quantize_spec(), g.ctx), g.stream, d_W.ptr(), q.qweight.ptr(), q.scales.ptr(), s.n);
  q.w_ref = int4::dequantize(int4::quantize(w_sub, rows, s.k, G), rows, s.k, G);
  return q;
}

TEST_CASE("GPU dense: decode GEMVs (bf16, W4A16 G32/64/128) at every projection shape, M = 1, 2, 5, 16") {
  auto g = open_gpu();
  const std::vector<DenseShape> shapes = all_shapes();
  std::vector<KernelSpec> specs;
  for (const DenseShape& s : shapes) {
    const bool logits = s.proj == DenseProj::LmHead;
    for (int M : {1, 2, 5, 16}) {
      specs.push_back(gemv_bf16_plan(s.n, s.k, M, logits).spec());
      for (int64_t G : {32, 64, 128}) specs.push_back(w4_gemv_plan(s.n, s.k, G, M, logits).spec());
    }
    for (int64_t G : {32, 64, 128}) specs.push_back(quantize_plan(s.k, G).quantize_spec());
  }
  precompile(*g, specs);

  for (const DenseShape& s : shapes) {
    CAPTURE(s.name);
    CAPTURE(s.n);
    CAPTURE(s.k);
    const bool logits = s.proj == DenseProj::LmHead, big = s.n * s.k > (int64_t(1) << 22);
    std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 31, 0.1f);
    DeviceBuffer d_W = to_device(*g, W);
    std::vector<int64_t> ni = sample_indices(s.n, 4096, 32);
    const std::vector<float> w_sub = rows_f32(W, s.k, ni);
    // Copies of the weights cycled through in the timing graphs so the reads come from HBM.
    const int copies = big ? int(std::clamp<int64_t>(int64_t(200e6) / (s.n * s.k), 1, 8)) : 1;

    for (int64_t G : {0, 32, 64, 128}) {
      CAPTURE(G);
      const QuantizedCopy q = quantized_copy(*g, s, d_W, w_sub, int64_t(ni.size()), G);
      const DeviceBuffer &d_q = q.qweight, &d_s = q.scales;
      const std::vector<float>& w_ref = q.w_ref;
      for (int M : {1, 2, 5, 16}) {
        CAPTURE(M);
        std::vector<uint16_t> x = fast_random_bf16(size_t(M) * s.k, 33 + M, 2.f);
        DeviceBuffer d_x = to_device(*g, x), d_y = poisoned(*g, size_t(M * s.n) * (logits ? 4 : 2));
        std::function<void(CUdeviceptr, CUdeviceptr, CUdeviceptr)> run;  // (W or qweight, scales, W offset)
        double bytes = 0;
        if (G == 0) {
          GemvBf16Plan p = gemv_bf16_plan(s.n, s.k, M, logits);
          Function f = g->jit.load(p.spec(), g->ctx);
          run = [=, &g, &d_x, &d_y](CUdeviceptr w, CUdeviceptr, CUdeviceptr) { launch(p, f, g->stream, w, d_x.ptr(), d_y.ptr(), M); };
          bytes = double(s.n * s.k) * 2;
        } else {
          W4GemvPlan p = w4_gemv_plan(s.n, s.k, G, M, logits);
          Function f = g->jit.load(p.spec(), g->ctx);
          run = [=, &g, &d_x, &d_y](CUdeviceptr q, CUdeviceptr sc, CUdeviceptr) {
            launch(p, f, g->stream, q, sc, d_x.ptr(), d_y.ptr(), M);
          };
          bytes = double(s.n * s.k) / 2 + double(s.n * s.k / G) * 2;
        }
        run(G == 0 ? d_W.ptr() : d_q.ptr(), d_s.ptr(), 0);
        std::vector<float> y = download_f32_or_bf16(*g, d_y, logits);
        std::vector<int64_t> mi(static_cast<size_t>(M));
        std::iota(mi.begin(), mi.end(), 0);
        const double err = check_product(rows_f32(x, s.k, mi), w_ref, mi, ni, s.n, s.k, y);
        CHECK(err <= 1e-2);
        CHECK(std::all_of(y.begin(), y.end(), [](float v) { return std::isfinite(v); }));

        if (big && M == 1) {
          // Cold-read timing: `copies` weight copies (>= 200 MB together where they fit) in turn.
          std::vector<DeviceBuffer> wc, sc;
          for (int c = 1; c < copies; ++c) {
            wc.emplace_back(g->driver, G == 0 ? d_W.size() : d_q.size());
            wc.back().copy_from(G == 0 ? d_W : d_q, wc.back().size(), g->stream);
            if (G > 0) {
              sc.emplace_back(g->driver, d_s.size());
              sc.back().copy_from(d_s, d_s.size(), g->stream);
            }
          }
          const double us = graph_us(*g, 4 * copies, [&](int i) {
            const int c = i % copies;
            const CUdeviceptr w = c == 0 ? (G == 0 ? d_W.ptr() : d_q.ptr()) : wc[size_t(c - 1)].ptr();
            run(w, G == 0 ? 0 : (c == 0 ? d_s.ptr() : sc[size_t(c - 1)].ptr()), 0);
          });
          MESSAGE(fmt::format("{} {} [{} x {}] M=1: {:.2f} us, {:.2f} MB -> {:.0f} GB/s (floor {:.2f} us at 3.0 TB/s)",
                              G == 0 ? "gemv_bf16" : fmt::format("gemv_w4a16 G{}", G), s.name, s.n, s.k, us,
                              bytes * 1e-6, bytes / us * 1e-3, bytes / 3.0e6));
        }
      }
    }
  }
}

// The decode step's GEMVs (GpuModel::dense with decode rows): W4A16 with w4_decode_tile (the M = 1
// tile's K split at every T, M_TILE tokens in one mma column tile), bf16 with the tile of min(T, 16)
// rows. Every projection shape, T = 1, 3, 8, 9, 16, 37, 64 against the CPU reference; and every row
// of T = 16 and 64 bit-identical to that row computed alone (T = 1), which is what makes a batched
// decode step give each sequence the logits it gets alone.
TEST_CASE("GPU dense: decode-step GEMVs at every projection shape, T up to 64; rows of T = 16 / 64 == each row alone") {
  auto g = open_gpu();
  for (const DenseShape& s : all_shapes()) {
    CAPTURE(s.name);
    CAPTURE(s.n);
    CAPTURE(s.k);
    const bool logits = s.proj == DenseProj::LmHead;
    const size_t out_bytes = logits ? 4 : 2;
    const std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 41, 0.1f);
    DeviceBuffer d_W = to_device(*g, W);
    const std::vector<int64_t> ni = sample_indices(s.n, 2048, 42);
    const std::vector<float> w_sub = rows_f32(W, s.k, ni);
    const std::vector<uint16_t> x = fast_random_bf16(size_t(64 * s.k), 43, 2.f);
    DeviceBuffer d_x = to_device(*g, x);
    for (int64_t G : {0, 32, 64, 128}) {
      CAPTURE(G);
      const QuantizedCopy q = quantized_copy(*g, s, d_W, w_sub, int64_t(ni.size()), G);
      const DeviceBuffer &d_q = q.qweight, &d_s = q.scales;
      const std::vector<float>& w_ref = q.w_ref;
      // y [T, N] of the first T rows of x, as the runner's decode step computes it.
      auto run = [&](int T, CUdeviceptr xp, const DeviceBuffer& y) {
        if (G == 0) {
          const GemvBf16Plan p = gemv_bf16_plan(s.n, s.k, std::min(T, 16), logits);
          launch(p, g->jit.load(p.spec(), g->ctx), g->stream, d_W.ptr(), xp, y.ptr(), T);
        } else {
          W4GemvPlan p = w4_gemv_plan(s.n, s.k, G, 1, logits);
          p.tile = w4_decode_tile(p.tile, G, T);
          launch(p, g->jit.load(p.spec(), g->ctx), g->stream, d_q.ptr(), d_s.ptr(), xp, y.ptr(), T);
        }
      };
      for (int T : {1, 3, 8, 9, 16, 37, 64}) {
        CAPTURE(T);
        DeviceBuffer d_y = poisoned(*g, size_t(T * s.n) * out_bytes);
        run(T, d_x.ptr(), d_y);
        const std::vector<float> y = download_f32_or_bf16(*g, d_y, logits);
        std::vector<int64_t> mi(static_cast<size_t>(T));
        std::iota(mi.begin(), mi.end(), 0);
        CHECK(check_product(rows_f32(x, s.k, mi), w_ref, mi, ni, s.n, s.k, y) <= 1e-2);
        if (T != 16 && T != 64) continue;
        CHECK(rows_unlike_alone(*g, to_host<uint8_t>(*g, d_y), size_t(s.n) * out_bytes, int(T), [&](int r, DeviceBuffer& one) {
                run(1, d_x.ptr() + size_t(r) * size_t(s.k) * 2, one);
              }) == 0);
      }
    }
  }
}

// gemv_w4a16_residual (the decode residual epilogue, kernel_templates/decode_fusion.cuh): the output
// projections of the tiny fixture and the 35B shapes, W4A16 G32/64/128, M = 1, 2, 5, 8. The fp32
// residual stream must come out bit-exact as residual0 + bf16(y) with y from the plain gemv_w4a16
// (same tile, same summation order), and normed as the CPU reference RMSNorm of that stream (zero-
// centred weights); the product itself against ref::matmul on the dequantized weights. Launched
// twice in a row: the ticket re-arms (the second result is the same) and the graph form with PDL
// gives the same result.
TEST_CASE("GPU dense: gemv_w4a16_residual (residual add + RMSNorm epilogue) at the output projections, tiny and 35B") {
  auto g = open_gpu();
  const float eps = 1e-6f;
  std::vector<DenseShape> shapes;
  for (const DenseShape& s : all_shapes())
    if (s.proj == DenseProj::AttnOut || s.proj == DenseProj::GdnOut) shapes.push_back(s);
  REQUIRE(shapes.size() == 4);
  std::vector<KernelSpec> specs;
  for (const DenseShape& s : shapes)
    for (int M : {1, 2, 5, 8})
      for (int64_t G : {32, 64, 128}) {
        W4GemvPlan p = w4_gemv_plan(s.n, s.k, G, M);
        specs.push_back(p.spec());
        p.residual = true;
        specs.push_back(p.spec());
      }
  precompile(*g, specs);
  DeviceBuffer counter(g->driver, 4);
  counter.fill_bytes(0, g->stream);
  for (const DenseShape& s : shapes) {
    CAPTURE(s.name);
    CAPTURE(s.n);
    CAPTURE(s.k);
    const std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 41, 0.1f);
    DeviceBuffer d_W = to_device(*g, W);
    const std::vector<uint16_t> norm_w = random_bf16(size_t(s.n), 42, 0.5f);
    std::vector<float> nw = to_f32(norm_w);
    DeviceBuffer d_nw = to_device(*g, norm_w);
    std::vector<int64_t> all_rows(static_cast<size_t>(s.n));
    std::iota(all_rows.begin(), all_rows.end(), 0);
    const std::vector<float> w_f32 = rows_f32(W, s.k, all_rows);
    for (int64_t G : {32, 64, 128}) {
      CAPTURE(G);
      QuantizePlan qp = quantize_plan(s.k, G);
      DeviceBuffer d_q(g->driver, size_t(s.n * s.k / 8) * 4), d_s(g->driver, size_t(s.n * s.k / G) * 2);
      launch_quantize(qp, g->jit.load(qp.quantize_spec(), g->ctx), g->stream, d_W.ptr(), d_q.ptr(), d_s.ptr(), s.n);
      const std::vector<float> w_ref = int4::dequantize(int4::quantize(w_f32, s.n, s.k, G), s.n, s.k, G);
      for (int M : {1, 2, 5, 8}) {
        CAPTURE(M);
        const std::vector<uint16_t> x = fast_random_bf16(size_t(M) * s.k, 43 + M, 2.f);
        const std::vector<float> res0 = random_f32(size_t(M * s.n), 44 + M, 3.f);
        DeviceBuffer d_x = to_device(*g, x), d_y = poisoned(*g, size_t(M * s.n) * 2);
        const W4GemvPlan plain = w4_gemv_plan(s.n, s.k, G, M);
        W4GemvPlan fused = plain;
        fused.residual = true;
        const Function f_plain = g->jit.load(plain.spec(), g->ctx), f_fused = g->jit.load(fused.spec(), g->ctx);
        launch(plain, f_plain, g->stream, d_q.ptr(), d_s.ptr(), d_x.ptr(), d_y.ptr(), M);
        const std::vector<float> y = to_f32(to_host<uint16_t>(*g, d_y));
        std::vector<int64_t> mi(static_cast<size_t>(M));
        std::iota(mi.begin(), mi.end(), 0);
        CHECK(check_product(rows_f32(x, s.k, mi), w_ref, mi, all_rows, s.n, s.k, y) <= 1e-2);
        // The CPU reference of the epilogue: residual0 + y (fp32), then the zero-centred RMSNorm.
        std::vector<float> want_res(res0.size()), want_normed(res0.size());
        for (size_t i = 0; i < res0.size(); ++i) want_res[i] = res0[i] + y[i];
        ref::rmsnorm(want_res, nw, want_normed, M, s.n, eps);

        std::vector<std::vector<float>> runs;  // normed of each run, for the determinism check
        for (int run = 0; run < 3; ++run) {  // twice eagerly, once as a graph with PDL
          CAPTURE(run);
          DeviceBuffer d_res = to_device(*g, res0), d_normed = poisoned(*g, size_t(M * s.n) * 2);
          const ResidualNorm r{d_res.ptr(), d_nw.ptr(), d_normed.ptr(), counter.ptr(), eps};
          if (run < 2) {
            launch(fused, f_fused, g->stream, d_q.ptr(), d_s.ptr(), d_x.ptr(), r, M);
          } else {
            Graph graph = Graph::capture(g->driver, g->stream, [&] {
              launch(plain, f_plain, g->stream, d_q.ptr(), d_s.ptr(), d_x.ptr(), d_y.ptr(), M);
              launch(fused, f_fused, g->stream, d_q.ptr(), d_s.ptr(), d_x.ptr(), r, M, true);
            });
            graph.instantiate().launch(g->stream);
          }
          const std::vector<float> got_res = to_host<float>(*g, d_res);
          CHECK(std::memcmp(got_res.data(), want_res.data(), got_res.size() * 4) == 0);
          runs.push_back(to_f32(to_host<uint16_t>(*g, d_normed)));
          CHECK(rel_l2(runs.back(), want_normed) <= 2e-3);
          CHECK(to_host<int32_t>(*g, counter)[0] == 0);  // re-armed
        }
        CHECK(runs[0] == runs[1]);
        CHECK(runs[0] == runs[2]);
      }
    }
  }
}

// gemv_w4a16_gated (the single-sequence decode step's DeltaNet out_proj, the gated RMSNorm of the
// recurrence output o as its input, computed per block): the out_proj shapes of the tiny fixture and
// the 35B (value heads of 128), W4A16 G32/64/128, T = 1 and 3 (one token per block), with the default
// tile, the shipped H200 one (k_warps 16) and tiles that deal several heads to one warp (k_warps 1 / 2,
// up to 16 heads a warp at the 35B) or spread them over row warps. Against the CPU reference of its
// input (gated_norm_input, then ref::matmul on the dequantized weights), and bit for bit against the
// two launches it replaces: the gated_rmsnorm kernel's y (the same per-head code), then gemv_w4a16
// with the same tile; again as a graph with the gated GEMV launched with PDL after gated_rmsnorm.
TEST_CASE("GPU dense: gemv_w4a16_gated == gated_rmsnorm + gemv_w4a16 bit for bit, and the CPU reference, tiny and 35B") {
  auto g = open_gpu();
  const float eps = 1e-6f;
  for (const Config& cfg : {config_tiny(), config_35b()}) {
    const int64_t hv = cfg.linear_num_value_heads, dv = cfg.linear_value_head_dim;
    const auto shapes = dense_shapes(cfg);
    const DenseShape s =
        *std::find_if(shapes.begin(), shapes.end(), [](const DenseShape& d) { return d.proj == DenseProj::GdnOut; });
    CAPTURE(s.n);
    CAPTURE(s.k);
    REQUIRE(s.k == hv * dv);
    const int64_t z_stride = s.k + 36;  // z inside wider rows, as in the projection (a multiple of 4)
    const GatedRmsnormTile nt = default_gated_rmsnorm_tile(gpu::gdn_shape(cfg));
    const Function norm = g->jit.load(gpu::gated_rmsnorm_spec(cfg, nt), g->ctx);
    const std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 51, 0.1f);
    DeviceBuffer d_W = to_device(*g, W);
    std::vector<int64_t> all_rows(static_cast<size_t>(s.n));
    std::iota(all_rows.begin(), all_rows.end(), 0);
    const std::vector<float> w_f32 = rows_f32(W, s.k, all_rows);
    std::vector<uint16_t> norm_w = to_bf16(random_f32(size_t(dv), 52, 0.2f));
    for (auto& w : norm_w) w = f32_to_bf16(1.f + bf16_to_f32(w));
    DeviceBuffer d_nw = to_device(*g, norm_w);
    for (int64_t G : {32, 64, 128}) {
      CAPTURE(G);
      const QuantizedCopy q = quantized_copy(*g, s, d_W, w_f32, s.n, G);
      std::vector<W4GemvTile> tiles = {default_w4_gemv_tile(s.n, s.k, G, 1)};
      for (const W4GemvTile& t :
           {W4GemvTile{1, 1, 16, 2}, W4GemvTile{1, 1, 1, 2}, W4GemvTile{1, 2, 2, 1}, W4GemvTile{1, 4, 2, 2}})
        if (why_invalid_gated(t, s.n, s.k, G, dv).empty()) tiles.push_back(t);
      for (const W4GemvTile& tile : tiles) {
        CAPTURE(tile.row_warps);
        CAPTURE(tile.k_warps);
        CAPTURE(tile.unroll);
        const W4GemvPlan plain{s.n, s.k, G, tile};
        W4GemvPlan gated = plain;
        gated.gated_dv = dv;
        const Function f_plain = g->jit.load(plain.spec(), g->ctx), f_gated = g->jit.load(gated.spec(), g->ctx);
        for (int T : {1, 3}) {
          CAPTURE(T);
          // Heads of different scales (the norm is per head), z over silu's useful range.
          std::vector<float> o = random_f32(size_t(T * s.k), 53 + T, 1.f);
          for (size_t i = 0; i < o.size(); ++i) o[i] *= 0.05f + float((i / size_t(dv)) % 7);
          const std::vector<uint16_t> z = random_bf16(size_t(T * z_stride), 54 + T, 2.f);
          DeviceBuffer d_o = to_device(*g, o), d_z = to_device(*g, z);
          DeviceBuffer d_x = poisoned(*g, size_t(T * s.k) * 2), d_y = poisoned(*g, size_t(T * s.n) * 2),
                       d_yg = poisoned(*g, size_t(T * s.n) * 2);
          auto launch_norm = [&] {
            norm.launch({{unsigned(T), unsigned(hv / nt.heads)}, {unsigned(32 * nt.heads)}}, g->stream, d_o.ptr(),
                        d_z.ptr(), int(z_stride), d_nw.ptr(), d_x.ptr(), eps);
          };
          const GatedNormInput in{d_o.ptr(), d_z.ptr(), d_nw.ptr(), int(z_stride), eps};
          launch_norm();
          launch(plain, f_plain, g->stream, q.qweight.ptr(), q.scales.ptr(), d_x.ptr(), d_y.ptr(), T);
          launch(gated, f_gated, g->stream, q.qweight.ptr(), q.scales.ptr(), in, d_yg.ptr(), T);
          const std::vector<uint16_t> y = to_host<uint16_t>(*g, d_y), yg = to_host<uint16_t>(*g, d_yg);
          CHECK(std::memcmp(y.data(), yg.data(), y.size() * 2) == 0);
          // The input against its CPU reference: the same bf16 values but for a rounding flipped by
          // expf / the order of the head's sum (one unit in the last place at most).
          const std::vector<float> x_ref = gated_norm_input(o, z, z_stride, norm_w, T, hv, dv, eps);
          const std::vector<uint16_t> x = to_host<uint16_t>(*g, d_x);
          int far = 0, flipped = 0;
          for (size_t i = 0; i < x.size(); ++i) {
            far += !within_one_ulp(x[i], f32_to_bf16(x_ref[i]));
            flipped += x[i] != f32_to_bf16(x_ref[i]);
          }
          CHECK(far == 0);
          CHECK(flipped * 100 <= int(x.size()));
          std::vector<int64_t> mi(static_cast<size_t>(T));
          std::iota(mi.begin(), mi.end(), 0);
          CHECK(check_product(x_ref, q.w_ref, mi, all_rows, s.n, s.k, to_f32(yg)) <= 1e-2);
          // The decode step's form: a graph, the gated GEMV launched with PDL behind its predecessor.
          DeviceBuffer d_yp = poisoned(*g, size_t(T * s.n) * 2);
          Graph graph = Graph::capture(g->driver, g->stream, [&] {
            launch_norm();
            launch(gated, f_gated, g->stream, q.qweight.ptr(), q.scales.ptr(), in, d_yp.ptr(), T, true);
          });
          graph.instantiate().launch(g->stream);
          CHECK(to_host<uint16_t>(*g, d_yp) == yg);
        }
      }
    }
  }
}

TEST_CASE("GPU dense: W4A16 decode GEMV tiles at the 35B shapes (G128, M = 1): each correct, default deterministic") {
  auto g = open_gpu();
  const int64_t G = 128;
  for (const DenseShape& s : dense_shapes(config_35b())) {
    CAPTURE(s.name);
    const bool logits = s.proj == DenseProj::LmHead;
    const int64_t tiles = s.k / 128;
    // The default, then k_warps 2..32 (whole runs of tiles) x unroll 1 / 2 / 4 x row_warps 1 / 2.
    std::vector<W4GemvTile> variants{default_w4_gemv_tile(s.n, s.k, G, 1)};
    for (int kw = 2; kw <= 32 && kw <= tiles; kw *= 2)
      for (int u : {1, 2, 4})
        for (int rw : {1, 2}) {
          const W4GemvTile t{1, rw, kw, u};
          if (tiles % (int64_t(kw) * u) == 0 && why_invalid(t, s.n, s.k, G).empty() &&
              std::find_if(variants.begin(), variants.end(), [&](const W4GemvTile& v) {
                return v.row_warps == rw && v.k_warps == kw && v.unroll == u;
              }) == variants.end())
            variants.push_back(t);
        }
    std::vector<KernelSpec> specs;
    for (const W4GemvTile& t : variants) specs.push_back(gemv_w4a16_spec(s.n, s.k, G, t, logits));
    precompile(*g, specs);

    std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 51, 0.1f), x = fast_random_bf16(size_t(s.k), 52, 2.f);
    QuantizePlan qp = quantize_plan(s.k, G);
    DeviceBuffer d_W = to_device(*g, W), d_x = to_device(*g, x), d_q(g->driver, size_t(s.n * s.k / 2)),
                 d_s(g->driver, size_t(s.n * s.k / G) * 2);
    launch_quantize(qp, g->jit.load(qp.quantize_spec(), g->ctx), g->stream, d_W.ptr(), d_q.ptr(), d_s.ptr(), s.n);
    g->stream.synchronize();
    d_W = DeviceBuffer();
    const std::vector<int64_t> ni = sample_indices(s.n, 2048, 53);
    int4::Quantized sub = int4::quantize(rows_f32(W, s.k, ni), int64_t(ni.size()), s.k, G);
    const std::vector<float> w_ref = int4::dequantize(sub, int64_t(ni.size()), s.k, G), x_f = to_f32(x);
    // Weight copies cycled through so the reads come from HBM (>= 60 MB together: L2 is 50 MB).
    const int copies = int(std::clamp<int64_t>(int64_t(400e6) / (s.n * s.k), 1, 16));
    std::vector<DeviceBuffer> qc, sc;
    for (int c = 1; c < copies; ++c) {
      qc.emplace_back(g->driver, d_q.size());
      qc.back().copy_from(d_q, d_q.size(), g->stream);
      sc.emplace_back(g->driver, d_s.size());
      sc.back().copy_from(d_s, d_s.size(), g->stream);
    }
    const double bytes = double(s.n * s.k) / 2 + double(s.n * s.k / G) * 2;
    for (size_t v = 0; v < variants.size(); ++v) {
      const W4GemvPlan p{s.n, s.k, G, variants[v], logits};
      CAPTURE(p.spec().str());
      Function f = g->jit.load(p.spec(), g->ctx);
      DeviceBuffer d_y = poisoned(*g, size_t(s.n) * (logits ? 4 : 2));
      launch(p, f, g->stream, d_q.ptr(), d_s.ptr(), d_x.ptr(), d_y.ptr(), 1);
      const std::vector<float> y = download_f32_or_bf16(*g, d_y, logits);
      CHECK(check_product(x_f, w_ref, {0}, ni, s.n, s.k, y) <= 1e-2);
      if (v == 0) {  // run to run: bit-identical
        const std::vector<uint8_t> first = to_host<uint8_t>(*g, d_y);
        launch(p, f, g->stream, d_q.ptr(), d_s.ptr(), d_x.ptr(), d_y.ptr(), 1);
        CHECK(to_host<uint8_t>(*g, d_y) == first);
      }
      const double us = graph_us(*g, 4 * copies, [&](int i) {
        const int c = i % copies;
        launch(p, f, g->stream, c == 0 ? d_q.ptr() : qc[size_t(c - 1)].ptr(), c == 0 ? d_s.ptr() : sc[size_t(c - 1)].ptr(),
               d_x.ptr(), d_y.ptr(), 1);
      });
      MESSAGE(fmt::format("gemv_w4a16 G128 {} [{} x {}] {} row_warps {} k_warps {} unroll {}: {:.2f} us, {:.0f} GB/s "
                          "(floor {:.2f} us at 3.0 TB/s)",
                          s.name, s.n, s.k, v == 0 ? "DEFAULT" : "tile", p.tile.row_warps, p.tile.k_warps,
                          p.tile.unroll, us, bytes / us * 1e-3, bytes / 3.0e6));
    }
  }
}

TEST_CASE("GPU dense: W4A16 at large M = dequantize_w4 into a bf16 scratch + gemm_bf16") {
  auto g = open_gpu();
  for (const DenseShape& s : all_shapes()) {
    if (s.proj == DenseProj::LmHead) continue;
    const int64_t G = 128, M = s.n * s.k > (int64_t(1) << 22) ? 4096 : 200;
    CAPTURE(s.name);
    CAPTURE(s.n);
    QuantizePlan qp = quantize_plan(s.k, G);
    GemmPlan gp = gemm_plan(s.n, s.k, M);
    precompile(*g, {qp.quantize_spec(), qp.dequantize_spec(), gp.spec()});
    std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 41, 0.1f), x = fast_random_bf16(size_t(M * s.k), 42, 2.f);
    DeviceBuffer d_W = to_device(*g, W), d_x = to_device(*g, x), d_q(g->driver, size_t(s.n * s.k / 2)),
                 d_s(g->driver, size_t(s.n * s.k / G) * 2), d_scratch = poisoned(*g, size_t(s.n * s.k) * 2),
                 d_y = poisoned(*g, size_t(M * s.n) * 2);
    launch_quantize(qp, g->jit.load(qp.quantize_spec(), g->ctx), g->stream, d_W.ptr(), d_q.ptr(), d_s.ptr(), s.n);
    Function deq = g->jit.load(qp.dequantize_spec(), g->ctx), gemm = g->jit.load(gp.spec(), g->ctx);
    prepare(gp, gemm);
    auto run = [&] {
      launch_dequantize(qp, deq, g->stream, d_q.ptr(), d_s.ptr(), d_scratch.ptr(), s.n);
      launch(gp, gemm, g->stream, d_x.ptr(), d_scratch.ptr(), d_y.ptr(), int(M));
    };
    run();
    std::vector<float> y = to_f32(to_host<uint16_t>(*g, d_y));
    std::vector<int64_t> mi = sample_indices(M, 48, 43), ni = sample_indices(s.n, 4096, 44);
    int4::Quantized sub = int4::quantize(rows_f32(W, s.k, ni), int64_t(ni.size()), s.k, G);
    const double err = check_product(rows_f32(x, s.k, mi), int4::dequantize(sub, int64_t(ni.size()), s.k, G), mi, ni,
                                     s.n, s.k, y);
    CHECK(err <= 1e-2);
    CHECK(std::all_of(y.begin(), y.end(), [](float v) { return std::isfinite(v); }));
    if (M == 4096) {
      const double us_deq = graph_us(*g, 5, [&](int) {
        launch_dequantize(qp, deq, g->stream, d_q.ptr(), d_s.ptr(), d_scratch.ptr(), s.n);
      });
      const double us = graph_us(*g, 5, [&](int) { run(); });
      MESSAGE(fmt::format("W4A16 G128 {} [{} x {}] M=4096: dequant {:.1f} us + gemm = {:.1f} us, {:.0f} TFLOP/s", s.name,
                          s.n, s.k, us_deq, us, 2.0 * M * s.n * s.k / us * 1e-6));
    }
  }
}

TEST_CASE("GPU dense: argmax_f32 is exact (lowest id on ties) and re-arms its ticket") {
  auto g = open_gpu();
  for (int64_t V : {int64_t(1536), int64_t(248320)}) {
    CAPTURE(V);
    SamplePlan p = sample_plan(V);
    Function f = g->jit.load(p.argmax_spec(), g->ctx);
    DeviceBuffer ws(g->driver, p.argmax_workspace_bytes()), d_id = poisoned(*g, 4);
    ws.fill_bytes(0, g->stream);
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<float> logits = random_f32(size_t(V), 51 + rep, 3.f);
      if (rep == 1) {  // a tie at the maximum across two argmax blocks: the lower id wins
        logits[size_t(V - 3)] = 100.f, logits[size_t(V / 3)] = 100.f;
      }
      if (rep == 2) std::fill(logits.begin(), logits.end(), -1.f);  // all equal: id 0
      DeviceBuffer d_l = to_device(*g, logits);
      launch_argmax(p, f, g->stream, d_l.ptr(), d_id.ptr(), ws.ptr());
      CHECK(to_host<int32_t>(*g, d_id)[0] == q35::argmax(logits));
    }
    if (V == 248320) {
      std::vector<float> logits = random_f32(size_t(V), 59, 3.f);
      DeviceBuffer d_l = to_device(*g, logits);
      const double us = graph_us(*g, 10, [&](int) { launch_argmax(p, f, g->stream, d_l.ptr(), d_id.ptr(), ws.ptr()); });
      CHECK(to_host<int32_t>(*g, d_id)[0] == q35::argmax(logits));
      MESSAGE(fmt::format("argmax_f32 V={}: {:.2f} us", V, us));
    }
  }
}

namespace {

// The host sampler's final candidate set and probabilities (runtime/core/sampler.cpp's rules).
std::map<int32_t, double> host_distribution(const std::vector<float>& logits, const SamplingParams& sp) {
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = ids.size();
  if (sp.top_k > 0) keep = std::min<size_t>(keep, size_t(sp.top_k));
  std::vector<double> p(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i)
    total += p[i] = std::exp((double(logits[ids[i]]) - logits[ids[0]]) / double(sp.temperature));
  for (double& v : p) v /= total;
  size_t n = keep;
  if (sp.top_p < 1.f) {
    double mass = 0;
    n = 0;
    while (n < keep) {
      mass += p[n++];
      if (mass >= double(sp.top_p)) break;
    }
  }
  std::map<int32_t, double> out;
  double kept = 0;
  for (size_t i = 0; i < n; ++i) kept += p[i];
  for (size_t i = 0; i < n; ++i) out[ids[i]] = p[i] / kept;
  return out;
}

}  // namespace

TEST_CASE("GPU dense: sample_f32 follows the host sampler (support exact, frequencies within 5 sigma)") {
  auto g = open_gpu();
  for (int64_t V : {int64_t(40), int64_t(1536), int64_t(248320)}) {
    CAPTURE(V);
    SamplePlan p = sample_plan(V);
    Function f = g->jit.load(p.sample_spec(), g->ctx);
    // Logits with ties placed at the top-k and top-p boundaries (quantised to steps of 0.25).
    std::vector<float> logits = random_f32(size_t(V), 61, 1.5f);
    for (float& l : logits) l = std::round(l * 4.f) / 4.f;
    DeviceBuffer d_l = to_device(*g, logits);

    // Greedy: temperature 0 and top_k 1 both give the argmax.
    for (SamplingParams sp : {SamplingParams{0.f, 0, 1.f, 1}, SamplingParams{1.f, 1, 1.f, 2}}) {
      std::vector<uint64_t> rng = {sp.seed, 0};
      DeviceBuffer d_rng = to_device(*g, rng), d_id = poisoned(*g, 4);
      launch_sample(p, f, g->stream, d_l.ptr(), d_id.ptr(), d_rng.ptr(), sp);
      CHECK(to_host<int32_t>(*g, d_id)[0] == q35::argmax(logits));
      CHECK(to_host<uint64_t>(*g, d_rng)[1] == 1);
    }

    const int draws = V > 10000 ? 2000 : 20000;
    for (SamplingParams sp : {SamplingParams{1.f, 0, 1.f, 7}, SamplingParams{0.7f, 5, 1.f, 8},
                              SamplingParams{1.3f, 0, 0.8f, 9}, SamplingParams{1.f, 8, 0.6f, 10},
                              SamplingParams{0.5f, 3, 0.3f, 11}}) {
      CAPTURE(sp.temperature);
      CAPTURE(sp.top_k);
      CAPTURE(sp.top_p);
      std::map<int32_t, double> want = host_distribution(logits, sp);
      std::vector<uint64_t> rng = {sp.seed, 0};
      DeviceBuffer d_rng = to_device(*g, rng), d_ids = poisoned(*g, size_t(draws) * 4);
      // One graph of all draws: each launch advances the step counter in device memory.
      const double us = graph_us(
          *g, draws, [&](int i) { launch_sample(p, f, g->stream, d_l.ptr(), d_ids.ptr() + size_t(i) * 4, d_rng.ptr(), sp); },
          1);
      std::vector<int32_t> ids = to_host<int32_t>(*g, d_ids);
      CHECK(to_host<uint64_t>(*g, d_rng)[1] == uint64_t(2 * draws));  // warm-up replay + 1 timed replay
      std::map<int32_t, int> count;
      int outside = 0;
      for (int32_t id : ids) {
        ++count[id];
        outside += !want.count(id);
      }
      CHECK(outside == 0);
      int off = 0;
      for (auto [id, pw] : want) {
        const double sigma = std::sqrt(draws * pw * (1 - pw)) + 1.0;
        off += std::abs(count[id] - draws * pw) > 5 * sigma;
      }
      CHECK(off == 0);
      MESSAGE(fmt::format("sample_f32 V={} T={} top_k={} top_p={}: {} candidates, {:.2f} us per draw", V,
                          sp.temperature, sp.top_k, sp.top_p, want.size(), us));
    }
  }
}

TEST_CASE("GPU dense (sm_90a): short prompts (M = 32, 128): swapped warp-specialised tiles against the plain one") {
  auto g = open_gpu();
  if (g->ctx.device().arch() != "sm_90a") {
    MESSAGE("skipped: gemm_wgmma runs on sm_90a only, this device is " << g->ctx.device().arch());
    return;
  }
  struct Shape {
    std::string name;
    int64_t n, k;
    int group;
    bool out_f32;
  };
  std::vector<Shape> shapes;
  for (const DenseShape& s : dense_shapes(config_35b()))
    if (s.proj != DenseProj::LmHead) shapes.push_back({s.name, s.n, s.k, 128, false});
  shapes.push_back({"moe router (bf16, fp32 out)", 256, 2048, 0, true});
  std::string report;
  for (const Shape& s : shapes) {
    CAPTURE(s.name);
    const std::vector<uint16_t> W = fast_random_bf16(size_t(s.n * s.k), 41, 0.1f);
    W4 q;
    if (s.group) q = quantize_w4(W, s.n, s.k, s.group);
    // Weight copies over ~256 MB, rotated, so the weights stream from DRAM as in the model.
    const size_t wbytes = s.group ? q.qweight.size() * 4 + q.scales.size() * 2 : W.size() * 2;
    const int copies = int(std::clamp<size_t>((size_t(256) << 20) / wbytes, 1, 32));
    std::vector<DeviceBuffer> dW, dS;
    for (int c = 0; c < copies; ++c) {
      dW.push_back(s.group ? to_device(*g, q.qweight) : to_device(*g, W));
      if (s.group) dS.push_back(to_device(*g, q.scales));
    }
    const std::vector<uint16_t>& w_ref = s.group ? q.dequantized : W;
    for (int64_t M : {32, 128}) {
      CAPTURE(M);
      GemmTile plain{128, s.n >= 4096 ? 256 : 128, 64, 2, 1, 4, true};
      if (M <= 64) plain.bm = 64, plain.warps_m = 1, plain.warps_n = plain.bn == 256 ? 2 : 1;
      if (s.n <= 64) plain.bn = 64, plain.warps_n = 1;
      std::vector<std::pair<std::string, GemmTile>> tiles = {{"plain", plain},
                                                             {"default", default_gemm_tile(s.n, s.k, M, true)}};
      const int bt = M <= 16 ? 16 : M <= 32 ? 32 : 64;
      for (int wn : {1, 2})
        for (auto [stages, ksub] : {std::pair{4, 1}, {4, 2}, {4, 4}, {8, 2}})
          tiles.emplace_back(fmt::format("swap {}x{} st{} k{}", bt, 64 * wn, stages, 64 * ksub),
                             GemmTile{bt, 64 * wn, 64, 1, wn, stages, true, true, true, ksub});
      const std::vector<uint16_t> x = fast_random_bf16(size_t(M * s.k), 42, 2.f);
      DeviceBuffer d_x = to_device(*g, x), d_y = poisoned(*g, size_t(M * s.n) * 4);
      std::string line = fmt::format("\n  {} [{} x {}] M={}:", s.name, s.n, s.k, M);
      for (const auto& [label, tile] : tiles) {
        CAPTURE(label);
        if (!why_invalid(tile, s.n, s.k, s.group).empty()) continue;
        GemmPlan p{s.n, s.k, tile, s.out_f32, s.group};
        Function f = g->jit.load(p.spec(), g->ctx);
        prepare(p, f);
        launch(p, f, g->stream, d_x.ptr(), dW[0].ptr(), d_y.ptr(), int(M), s.group ? dS[0].ptr() : 0);
        const std::vector<float> y = download_f32_or_bf16(*g, d_y, s.out_f32);
        const std::vector<int64_t> mi = sample_indices(M, 48, 43), ni = sample_indices(s.n, 2048, 44);
        const double err = check_product(rows_f32(x, s.k, mi), rows_f32(w_ref, s.k, ni), mi, ni, s.n, s.k, y);
        CHECK(err <= 1e-2);
        const double us = graph_us(*g, 2 * copies, [&](int i) {
          launch(p, f, g->stream, d_x.ptr(), dW[i % copies].ptr(), d_y.ptr(), int(M), s.group ? dS[i % copies].ptr() : 0);
        });
        line += fmt::format(" {} {:.1f} us ({:.2f} TB/s);", label, us, double(wbytes) / us * 1e-6);
      }
      report += line;
    }
  }
  MESSAGE("dense GEMMs at short prompts, weights streamed from DRAM:" << report);
}
