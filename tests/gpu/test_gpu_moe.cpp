// GPU: the sparse MoE + shared expert (spec §2.6; kernel_templates/moe.cuh, moe_gemm.cuh) against the
// fp32 CPU reference (ref::moe_router, ref::moe_experts, ref::shared_expert) on the same bf16 /
// dequantized W4A16 / FP8 weights, at the tiny fixture's shapes and the 35B shapes, through the decode
// path (T = 1, 3, 8, 9, 16, 37, 64: the router's expert-grouped plan, gate_up and down reading each
// touched expert once; also with the residual add + RMSNorm epilogue of moe_forward_decode; every
// token of T = 16 and 64 bit-identical to that token alone) and the prefill path (T = 1, 37, 512,
// 2048). Timing at the 35B shapes. The router's plan: the one-warp builder of its fast path (T * k <= 32)
// and moe_build_plan against the host model (tests/moe_plan_ref.h).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <tuple>

#include "autotune/spaces.h"
#include "models/qwen35/config.h"
#include "models/qwen35/gpu/moe.h"
#include "models/qwen35/reference_ops.h"
#include "runtime/core/fp8_format.h"
#include "runtime/core/int4_format.h"
#include "runtime/core/weight_format.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/moe_plan_ref.h"

using namespace q35;
using namespace q35::gpu_test;
using namespace q35::qwen35;
using namespace q35::qwen35::gpu;

namespace {

// f(begin, end) over [0, n) split across the cores (the 35B experts hold 805M weights).
template <typename F>
void parallel_for(size_t n, F f) {
  const size_t threads = std::max(1u, std::thread::hardware_concurrency());
  const size_t per = (n + threads - 1) / threads;
  std::vector<std::jthread> pool;
  for (size_t i0 = 0; i0 < n; i0 += per) pool.emplace_back(f, i0, std::min(n, i0 + per));
}

// Uniform bf16 values with standard deviation `scale`, from a counter-based hash of (run seed, salt, i).
std::vector<uint16_t> random_bf16_fast(size_t n, uint32_t salt, float scale) {
  std::vector<uint16_t> v(n);
  const uint64_t seed = (uint64_t(run_seed()) << 32 | salt) * 0x9E3779B97F4A7C15ull;
  parallel_for(n, [&](size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; ++i) {
      uint64_t z = seed + i * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      const float u = float(z >> 40) * 0x1p-24f;  // [0, 1)
      v[i] = f32_to_bf16((2.f * u - 1.f) * 1.7320508f * scale);
    }
  });
  return v;
}

std::vector<float> widen(const std::vector<uint16_t>& b) {
  std::vector<float> f(b.size());
  parallel_for(b.size(), [&](size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; ++i) f[i] = bf16_to_f32(b[i]);
  });
  return f;
}

// Bytes per weight of format `group` on the device, scales included (the timings' bandwidth figures).
double weight_bytes(int group) { return group == 0 ? 2.0 : group == kFp8Group ? 1.0 + 4.0 / 128 : 0.5 + 2.0 / group; }

// Uploads W [rows, K] (bf16 values) in format `group` into (dw, ds) and returns the fp32 weights the
// kernels compute with: the bf16 values, or the dequantized INT4 / FP8 values (FP8: blocks [1, 128],
// fp8::quantize as the GPU quantizes).
std::vector<float> upload_weight(const Gpu& g, const std::vector<uint16_t>& w, int64_t rows, int64_t K, int group,
                                 DeviceBuffer& dw, DeviceBuffer& ds) {
  std::vector<float> f = widen(w);
  if (group == 0) {
    dw = to_device(g, w);
    return f;
  }
  if (group == kFp8Group) {
    const int64_t spr = (K + 127) / 128;
    std::vector<uint8_t> codes(size_t(rows * K));
    std::vector<float> sc(size_t(rows * spr));
    parallel_for(size_t(rows), [&](size_t r0, size_t r1) {
      const int64_t n = int64_t(r1 - r0);
      const fp8::Quantized q = fp8::quantize(std::span<const float>(f.data() + r0 * K, size_t(n * K)), n, K, 1, 128);
      const std::vector<float> deq = fp8::dequantize(q.codes, q.scale_inv, n, K, 1, 128);
      std::copy(q.codes.begin(), q.codes.end(), codes.begin() + r0 * K);
      std::copy(q.scale_inv.begin(), q.scale_inv.end(), sc.begin() + r0 * spr);
      std::copy(deq.begin(), deq.end(), f.begin() + r0 * K);
    });
    dw = to_device(g, codes);
    ds = to_device(g, sc);
    return f;
  }
  std::vector<uint32_t> qw(size_t(rows * K / 8));
  std::vector<uint16_t> sc(size_t(rows * K / group));
  parallel_for(size_t(rows), [&](size_t r0, size_t r1) {
    const int64_t n = int64_t(r1 - r0);
    int4::Quantized q = int4::quantize(std::span<const float>(f.data() + r0 * K, size_t(n * K)), n, K, group);
    std::vector<float> deq = int4::dequantize(q, n, K, group);
    std::copy(q.qweight.begin(), q.qweight.end(), qw.begin() + r0 * K / 8);
    std::copy(q.scales.begin(), q.scales.end(), sc.begin() + r0 * K / group);
    std::copy(deq.begin(), deq.end(), f.begin() + r0 * K);
  });
  dw = to_device(g, qw);
  ds = to_device(g, sc);
  return f;
}

// The bf16 master weights of one MoE layer (the formats are derived from them).
struct MasterWeights {
  std::vector<uint16_t> router, sg, gate_up, down, sh_gate_up, sh_down;
  explicit MasterWeights(const MoeShape& s)
      : router(random_bf16_fast(size_t(s.experts * s.hidden), 11, 0.02f)),
        sg(random_bf16_fast(size_t(s.hidden), 12, 0.02f)),
        gate_up(random_bf16_fast(size_t(s.experts * 2 * s.inter * s.hidden), 13, 0.02f)),
        down(random_bf16_fast(size_t(s.experts * s.hidden * s.inter), 14, 0.02f)),
        sh_gate_up(random_bf16_fast(size_t(2 * s.shared_inter * s.hidden), 15, 0.02f)),
        sh_down(random_bf16_fast(size_t(s.hidden * s.shared_inter), 16, 0.02f)) {}
};

// One layer on the device in one format, with the fp32 weights of the reference.
struct Layer {
  MoeShape s;
  std::vector<float> router, sg, gate_up, down, sh_gate, sh_up, sh_down;  // reference, fp32
  DeviceBuffer d_router, d_sg, d_gate_up, d_gate_up_s, d_down, d_down_s, d_sh_gate_up, d_sh_gate_up_s, d_sh_down,
      d_sh_down_s;

  Layer(const Gpu& g, const MasterWeights& m, const MoeShape& shape) : s(shape) {
    router = widen(m.router);
    sg = widen(m.sg);
    d_router = to_device(g, m.router);
    d_sg = to_device(g, m.sg);
    gate_up = upload_weight(g, m.gate_up, s.experts * 2 * s.inter, s.hidden, s.group, d_gate_up, d_gate_up_s);
    down = upload_weight(g, m.down, s.experts * s.hidden, s.inter, s.group, d_down, d_down_s);
    std::vector<float> gu = upload_weight(g, m.sh_gate_up, 2 * s.shared_inter, s.hidden, s.group, d_sh_gate_up, d_sh_gate_up_s);
    sh_gate.assign(gu.begin(), gu.begin() + s.shared_inter * s.hidden);
    sh_up.assign(gu.begin() + s.shared_inter * s.hidden, gu.end());
    sh_down = upload_weight(g, m.sh_down, s.hidden, s.shared_inter, s.group, d_sh_down, d_sh_down_s);
  }
  MoeWeights weights() const {
    return {d_router.ptr(),     d_sg.ptr(),           d_gate_up.ptr(),   d_gate_up_s.ptr(),
            d_down.ptr(),       d_down_s.ptr(),       d_sh_gate_up.ptr(), d_sh_gate_up_s.ptr(),
            d_sh_down.ptr(),    d_sh_down_s.ptr()};
  }
};

template <typename T>
std::vector<T> download(const Gpu& g, CUdeviceptr p, size_t count) {
  std::vector<T> host(count);
  g.driver.check(g.driver.api().memcpy_dtoh_async(host.data(), p, count * sizeof(T), g.stream.handle()), "cuMemcpyDtoHAsync");
  g.stream.synchronize();
  return host;
}

// One call of the MoE block at T tokens through `path`, checked against the CPU reference.
void check_moe(const Gpu& g, const Layer& L, const MoeKernels& k, const MoeScratch& sc, int64_t T, MoePath path,
               uint32_t salt) {
  const MoeShape& s = L.s;
  const int64_t H = s.hidden, E = s.experts, K = s.top_k;
  CAPTURE(T);
  const std::string path_name = path == MoePath::Decode ? "decode" : "prefill";
  CAPTURE(path_name);
  const std::vector<uint16_t> x = random_bf16(size_t(T * H), salt, 1.f);
  const std::vector<float> xf = to_f32(x);
  DeviceBuffer d_x = to_device(g, x), d_out = poisoned(g, size_t(T * H) * 2), d_out2 = poisoned(g, size_t(T * H) * 2);
  moe_forward(k, g.stream, L.weights(), sc, d_x.ptr(), d_out.ptr(), T, path);
  const std::vector<uint16_t> out = to_host<uint16_t>(g, d_out);
  const std::vector<int32_t> ids = download<int32_t>(g, sc.ids, size_t(T * K));
  const std::vector<float> w = download<float>(g, sc.weights, size_t(T * K));
  const std::vector<float> sgate = download<float>(g, sc.shared_gate, size_t(T));

  // Router: same experts in the same order and the same weights, except where probabilities tie
  // within 1e-4 of their value (fp32 sums of the 2048-long logits in another order move a
  // probability by ~1e-6 of itself; an absolute 1e-5 skipped 2 of 8 entries of a token at p ~ 0.004).
  std::vector<float> logits(size_t(T * E)), w_ref(size_t(T * K)), sg_logit(static_cast<size_t>(T));
  std::vector<int32_t> ids_ref(size_t(T * K));
  ref::matmul(xf, L.router, logits, T, E, H);
  ref::matmul(xf, L.sg, sg_logit, T, 1, H);
  ref::moe_router(logits, w_ref, ids_ref, T, E, K);
  int checked = 0, id_bad = 0, w_bad = 0, sg_bad = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> p(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    const float mx = *std::max_element(p.begin(), p.end());
    float sum = 0.f;
    for (float& v : p) sum += v = std::exp(v - mx);
    for (float& v : p) v /= sum;
    std::sort(p.begin(), p.end(), std::greater<float>());
    for (int64_t i = 0; i < K; ++i) {
      const float tie = 1e-4f * p[i];
      const bool clear = (i == 0 || p[i - 1] - p[i] > tie) && (i + 1 >= E || p[i] - p[i + 1] > tie);
      if (!clear) continue;
      ++checked;
      id_bad += ids[t * K + i] != ids_ref[t * K + i];
      w_bad += std::abs(w[t * K + i] - w_ref[t * K + i]) > 1e-5f;
    }
    sg_bad += std::abs(sgate[t] - 1.f / (1.f + std::exp(-sg_logit[t]))) > 1e-5f;
  }
  CHECK(checked >= T * K * 9 / 10);
  CHECK(id_bad == 0);
  CHECK(w_bad == 0);
  CHECK(sg_bad == 0);

  // Experts: the reference with the kernel's routing (checked above).
  std::vector<float> routed(size_t(T * H)), shared(size_t(T * H)), want(size_t(T * H));
  ref::moe_experts(xf, ids, w, L.gate_up, L.down, routed, T, H, E, s.inter, K);
  ref::shared_expert(xf, L.sh_gate, L.sh_up, L.sh_down, L.sg, shared, T, H, s.shared_inter);
  for (size_t i = 0; i < want.size(); ++i) want[i] = routed[i] + shared[i];
  const double err = rel_l2(to_f32(out), want);
  MESSAGE(fmt::format("moe H={} E={} I={} Is={} {} T={} {}: rel_l2 {:.2e}", H, E, s.inter, s.shared_inter,
                      weight_format_name(s.group), T,
                      path_name, err));
  CHECK(err <= 1e-2);

  // A second call (router counters reset, no state kept) writes the same bits.
  moe_forward(k, g.stream, L.weights(), sc, d_x.ptr(), d_out2.ptr(), T, path);
  CHECK(to_host<uint16_t>(g, d_out2) == out);

  if (path != MoePath::Decode) return;
  // The plan: the distinct experts in increasing order, each with its (token, slot) pairs in token
  // order, every pair once.
  {
    const std::vector<int32_t> plan = download<int32_t>(g, sc.plan, size_t(moe_plan_ints(s, T)));
    const int U = plan[0];
    std::vector<int32_t> distinct(ids.begin(), ids.end());
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    REQUIRE(U == int(distinct.size()));
    CHECK(plan[size_t(1 + E)] == 0);
    CHECK(plan[size_t(1 + E + U)] == T * K);
    int bad = 0;
    std::vector<int> seen(size_t(T * K), 0);
    for (int u = 0; u < U; ++u) {
      bad += plan[size_t(1 + u)] != distinct[size_t(u)];
      for (int i = plan[size_t(1 + E + u)]; i < plan[size_t(2 + E + u)]; ++i) {
        const int pair = plan[size_t(2 + 2 * E + i)];
        bad += pair < 0 || pair >= T * K || ids[size_t(pair)] != distinct[size_t(u)];
        if (pair >= 0 && pair < T * K) ++seen[size_t(pair)];
        if (i > plan[size_t(1 + E + u)]) bad += plan[size_t(1 + 2 * E + i)] / K >= pair / K;  // increasing tokens
      }
    }
    CHECK(bad == 0);
    CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
    CHECK(download<int32_t>(g, sc.plan_ticket, 1)[0] == 0);
  }
  // The decode path with the residual epilogue (moe_decode_down_residual, decode_fusion.cuh): the
  // fp32 residual stream gets exactly + bf16(out) of the plain path (same sums), and the last block
  // writes its zero-centred RMSNorm as the CPU reference computes it. Twice: the ticket re-arms.
  const float eps = 1e-6f;
  const std::vector<float> res0 = random_f32(size_t(T * H), salt + 1, 3.f);
  const std::vector<uint16_t> norm_w = random_bf16(size_t(H), salt + 2, 0.5f);
  std::vector<float> want_res(res0.size()), want_normed(res0.size());
  for (size_t i = 0; i < res0.size(); ++i) want_res[i] = res0[i] + bf16_to_f32(out[i]);
  ref::rmsnorm(want_res, to_f32(norm_w), want_normed, T, H, eps);
  DeviceBuffer d_nw = to_device(g, norm_w), counter(g.driver, 4);
  counter.fill_bytes(0, g.stream);
  std::vector<uint16_t> first;
  for (int run = 0; run < 2; ++run) {
    CAPTURE(run);
    DeviceBuffer d_res = to_device(g, res0), d_normed = poisoned(g, size_t(T * H) * 2);
    moe_forward_decode(k, g.stream, L.weights(), sc, d_x.ptr(),
                       ResidualNorm{d_res.ptr(), d_nw.ptr(), d_normed.ptr(), counter.ptr(), eps}, T);
    const std::vector<float> got_res = to_host<float>(g, d_res);
    CHECK(std::memcmp(got_res.data(), want_res.data(), got_res.size() * 4) == 0);
    const std::vector<uint16_t> normed = to_host<uint16_t>(g, d_normed);
    CHECK(rel_l2(to_f32(normed), want_normed) <= 2e-3);
    CHECK(to_host<int32_t>(g, counter)[0] == 0);
    if (run == 0) first = normed;
    else CHECK(normed == first);
  }
}

// Every token of one decode call of T tokens gets the bits it gets alone (T = 1): a token's arithmetic
// does not depend on the other tokens that share its experts, or on T.
void check_decode_alone(const Gpu& g, const Layer& L, const MoeKernels& k, const MoeScratch& sc, int64_t T, uint32_t salt) {
  const int64_t H = L.s.hidden;
  CAPTURE(T);
  const std::vector<uint16_t> x = random_bf16(size_t(T * H), salt, 1.f);
  DeviceBuffer d_x = to_device(g, x), d_out = poisoned(g, size_t(T * H) * 2), d_one = poisoned(g, size_t(H) * 2);
  moe_forward(k, g.stream, L.weights(), sc, d_x.ptr(), d_out.ptr(), T, MoePath::Decode);
  const std::vector<uint16_t> out = to_host<uint16_t>(g, d_out);
  int differ = 0;
  for (int64_t t = 0; t < T; ++t) {
    moe_forward(k, g.stream, L.weights(), sc, d_x.ptr() + size_t(t * H) * 2, d_one.ptr(), 1, MoePath::Decode);
    const std::vector<uint16_t> one = to_host<uint16_t>(g, d_one);
    differ += std::memcmp(one.data(), out.data() + t * H, size_t(H) * 2) != 0;
  }
  CHECK(differ == 0);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Microseconds per call: `calls` calls of record(c) captured in one graph, median of 25 replays.
template <typename F>
double time_graph(const Gpu& g, int calls, F record) {
  Graph graph = Graph::capture(g.driver, g.stream, [&] {
    for (int c = 0; c < calls; ++c) record(c);
  });
  GraphExec exec = graph.instantiate();
  for (int i = 0; i < 3; ++i) exec.launch(g.stream);
  Event start(g.driver), stop(g.driver);
  std::vector<double> us;
  for (int i = 0; i < 25; ++i) {
    start.record(g.stream);
    exec.launch(g.stream);
    stop.record(g.stream);
    stop.synchronize();
    us.push_back(stop.elapsed_ms_since(start) * 1e3 / calls);
  }
  return median(us);
}

// The workspace of one plan, zeroed (the router's counters start at zero).
struct Workspace {
  DeviceBuffer buf;
  MoeScratch sc;
  Workspace(const Gpu& g, const MoeKernels& k, int64_t max_tokens)
      : buf(g.driver, moe_workspace_bytes(k.shape, k.tiles, max_tokens)) {
    buf.fill_bytes(0, g.stream);
    sc = moe_scratch(k.shape, k.tiles, max_tokens, buf.ptr());
  }
};

// sm_90a runs each case twice: the portable mma.sync GEMMs, then gemm_wgmma (the runner's choice there).
void run_shapes(const MoeShape& base, std::initializer_list<int> groups, bool timing) {
  auto g = open_gpu();
  const MasterWeights master(base);
  const bool hopper = g->ctx.device().arch() == "sm_90a";
  for (int group : groups)
  for (bool wgmma : {false, true}) {
    if (wgmma && !hopper) continue;
    MoeShape s = base;
    s.group = group;
    CAPTURE(group);
    CAPTURE(wgmma);
    const Layer L(*g, master, s);
    const MoeKernels k(g->jit, g->ctx, s, MoeTiles::defaults(s, wgmma));
    Workspace ws(*g, k, 2048);
    uint32_t salt = 100;
    if (!wgmma) {
      for (int64_t T : {1, 3, 8, 9, 16, 37, 64}) check_moe(*g, L, k, ws.sc, T, MoePath::Decode, salt++);
      for (int64_t T : {16, 64}) check_decode_alone(*g, L, k, ws.sc, T, salt++);
      if (!timing) {  // the tiny shapes: the grouped path past a decode step too (the 35B: its own case)
        for (int64_t T : {96, 128, 200, 256}) check_moe(*g, L, k, ws.sc, T, MoePath::Decode, salt++);
        check_decode_alone(*g, L, k, ws.sc, 128, salt++);
      }
    }
    for (int64_t T : {1, 37, 512, 2048}) check_moe(*g, L, k, ws.sc, T, MoePath::Prefill, salt++);
    if (wgmma) {  // other tiles of the tuner's space (block_m 128, stages 3 and 8, one warpgroup along N)
      // and the warp-specialised form (a producer warpgroup; 1 or 2 consumer warpgroups along M or N)
      for (const MoeGemmTile& t : {MoeGemmTile{128, 128, 64, 2, 1, 3, true}, MoeGemmTile{64, 256, 64, 1, 2, 8, true},
                                   MoeGemmTile{64, 64, 64, 1, 1, 4, true}, MoeGemmTile{128, 256, 64, 2, 1, 4, true, true},
                                   MoeGemmTile{64, 128, 64, 1, 1, 3, true, true}, MoeGemmTile{64, 256, 64, 1, 2, 6, true, true},
                                   // persistent (W4A16 only: a grid of one block per SM over the tiles)
                                   MoeGemmTile{128, 256, 64, 2, 1, 4, true, true, false, 1, true},
                                   MoeGemmTile{128, 256, 64, 2, 1, 6, true, true, false, 1, true},
                                   MoeGemmTile{64, 128, 64, 1, 2, 3, true, true, false, 1, true},
                                   // swapped (weights x 8..64 tokens)
                                   MoeGemmTile{8, 64, 64, 1, 1, 8, true, true, true}, MoeGemmTile{16, 128, 64, 1, 2, 6, true, true, true},
                                   MoeGemmTile{64, 64, 64, 1, 1, 4, true, true, true},
                                   // and stages of 2 or 4 64-k steps
                                   MoeGemmTile{8, 64, 64, 1, 1, 4, true, true, true, 4},
                                   MoeGemmTile{32, 128, 64, 1, 2, 6, true, true, true, 2},
                                   // the weights as wgmma's register operand (W4A16 only): up to bm tokens
                                   // of an expert per tile, each tile its own wgmma N
                                   MoeGemmTile{128, 128, 64, 1, 2, 4, true, true, true, 1, false, true},
                                   MoeGemmTile{16, 128, 64, 1, 2, 6, true, true, true, 1, false, true},
                                   MoeGemmTile{32, 64, 64, 1, 1, 4, true, true, true, 1, false, true},
                                   // and persistent (one block per SM over the tiles)
                                   MoeGemmTile{256, 128, 64, 1, 2, 4, true, true, true, 1, true, true},
                                   MoeGemmTile{32, 128, 64, 1, 2, 6, true, true, true, 1, true, true}}) {
        MoeTiles tiles = MoeTiles::defaults(s, true);
        tiles.gemm = t;
        bool ok = true;
        for (MoeGemm gm : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
          ok = ok && why_invalid(t, s, gm).empty();
        if (!ok) continue;
        CAPTURE(t.block_m);
        CAPTURE(t.block_n);
        CAPTURE(t.stages);
        CAPTURE(t.ws);
        CAPTURE(t.ksub);
        CAPTURE(t.persist);
        CAPTURE(t.rs);
        const MoeKernels kt(g->jit, g->ctx, s, tiles);
        Workspace wt(*g, kt, 2048);
        for (int64_t T : {37, 2048}) check_moe(*g, L, kt, wt.sc, T, MoePath::Prefill, salt++);
      }
    }
    if (!timing || group == 32) continue;

    // Short prompts (sm_90a, W4A16 g128): a few tokens per expert, so the grouped GEMMs stream the
    // weights of nearly every expert; the mma.sync tile against the swapped warp-specialised wgmma.
    if (wgmma && group == 128)
      for (int64_t T : {128, 512}) {
        std::vector<std::pair<std::string, MoeTiles>> sets;
        MoeTiles mma = k.tiles;
        mma.gemm = MoeGemmTile{32, 128, 64, 1, 4};
        sets.emplace_back("mma.sync 32x128", mma);
        for (auto [bt, wn] : {std::pair{8, 1}, {16, 1}, {16, 2}, {32, 2}})
          for (auto [stages, ksub] : {std::pair{4, 1}, {4, 2}, {4, 4}, {8, 2}}) {
            MoeTiles t = k.tiles;
            t.gemm = MoeGemmTile{bt, 64 * wn, 64, 1, wn, stages, true, true, true, ksub};
            sets.emplace_back(fmt::format("swap {}x{} st{} k{}", bt, 64 * wn, stages, 64 * ksub), t);
          }
        for (auto [bt, wn, stages, persist] : {std::tuple{16, 2, 4, true}, {32, 2, 4, true}, {64, 2, 4, true},
                                               {32, 1, 6, false}, {32, 2, 4, false}, {128, 2, 4, true}}) {
          MoeTiles t = k.tiles;
          t.gemm = MoeGemmTile{bt, 64 * wn, 64, 1, wn, stages, true, true, true, 1, persist, true};
          sets.emplace_back(fmt::format("rs {}x{} st{}{}", bt, 64 * wn, stages, persist ? " persistent" : ""), t);
        }
        const std::vector<uint16_t> x = random_bf16(size_t(T * s.hidden), 9, 1.f);
        DeviceBuffer d_x = to_device(*g, x), d_out(g->driver, size_t(T * s.hidden) * 2);
        const MoeWeights w = L.weights();
        const double wb = 0.5 + 2.0 / group;  // (W4A16 g128 only)
        const double gu_bytes = double(s.experts) * 2 * s.inter * s.hidden * wb, dn_bytes = gu_bytes / 2;
        std::string lines;
        for (const auto& [label, tiles] : sets) {
          bool ok = true;
          for (MoeGemm gm : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
            ok = ok && why_invalid(tiles.gemm, s, gm).empty();
          if (!ok) continue;
          const MoeKernels kk(g->jit, g->ctx, s, tiles);
          Workspace wk(*g, kk, T);
          const double us = time_graph(*g, 1, [&](int) { moe_forward(kk, g->stream, w, wk.sc, d_x.ptr(), d_out.ptr(), T); });
          const double gu = time_graph(*g, 1, [&](int) {
            launch_moe_gemm(kk.gemm(MoeGemm::RoutedGateUp), kk.tiles.gemm, g->stream, s, MoeGemm::RoutedGateUp, d_x.ptr(),
                            w, wk.sc, T, kk.sm_count);
          });
          const double dn = time_graph(*g, 1, [&](int) {
            launch_moe_gemm(kk.gemm(MoeGemm::RoutedDown), kk.tiles.gemm, g->stream, s, MoeGemm::RoutedDown, d_x.ptr(), w,
                            wk.sc, T, kk.sm_count);
          });
          lines += fmt::format("\n  {:<22} layer {:7.1f} us; routed gate_up {:6.1f} us ({:4.2f} TB/s), down {:6.1f} us "
                               "({:4.2f} TB/s)",
                               label, us, gu, gu_bytes / gu * 1e-6, dn, dn_bytes / dn * 1e-6);
        }
        MESSAGE(fmt::format("moe prefill T={} W4A16 g128 (all {} experts' weights: gate_up {:.0f} MB, down {:.0f} MB):{}",
                            T, s.experts, gu_bytes / 1e6, dn_bytes / 1e6, lines));
      }

    const std::string fmt_name = fmt::format("{} {}", weight_format_name(group), wgmma ? "wgmma" : "mma.sync");
    const double wbytes = weight_bytes(group);
    // Decode T = 1: 20 different tokens per graph, so most experts come from HBM (the router and
    // shared expert stay in L2 across calls).
    if (!wgmma) {
      const int calls = 20;
      const std::vector<uint16_t> x = random_bf16(size_t(calls * s.hidden), 7, 1.f);
      DeviceBuffer d_x = to_device(*g, x), d_out(g->driver, size_t(calls * s.hidden) * 2);
      const MoeWeights w = L.weights();
      const double us = time_graph(*g, calls, [&](int c) {
        moe_forward(k, g->stream, w, ws.sc, d_x.ptr() + size_t(c) * s.hidden * 2, d_out.ptr() + size_t(c) * s.hidden * 2, 1);
      });
      const double us_router = time_graph(*g, calls, [&](int c) {
        launch_moe_router(k.router_one, k.tiles.router_one, g->stream, s, d_x.ptr() + size_t(c) * s.hidden * 2, w, ws.sc, 1);
      });
      // Router + gate_up (fresh experts per call); down = the whole layer minus this.
      const double us_router_gate_up = time_graph(*g, calls, [&](int c) {
        const CUdeviceptr xc = d_x.ptr() + size_t(c) * s.hidden * 2;
        launch_moe_router(k.router_one, k.tiles.router_one, g->stream, s, xc, w, ws.sc, 1);
        launch_moe_decode_gate_up(k.decode_gate_up, k.tiles.gate_up, g->stream, s, xc, w, ws.sc, 1);
      });
      const double router_bytes = double(s.experts + 1) * s.hidden * 2;
      const double gate_up_bytes = double(s.top_k + 1) * 2 * s.inter * s.hidden * wbytes;
      const double down_bytes = double(s.top_k + 1) * s.inter * s.hidden * wbytes;
      const double bytes = router_bytes + gate_up_bytes + down_bytes;
      MESSAGE(fmt::format("moe decode T=1 {}: {:.2f} us per layer; floor {:.2f} us ({:.1f} MB / 3.0 TB/s)\n"
                          "  router alone {:.2f} us (floor {:.2f}), + gate_up {:.2f} us (floor {:.2f}), "
                          "+ down {:.2f} us (floor {:.2f})",
                          fmt_name, us, bytes / 3e6, bytes / 1e6, us_router, router_bytes / 3e6,
                          us_router_gate_up - us_router, gate_up_bytes / 3e6, us - us_router_gate_up, down_bytes / 3e6));
      // Batched decode (T = 16, 64 tokens in one call): each touched expert read once.
      for (int64_t T : {16, 64}) {
        const std::vector<uint16_t> xb = random_bf16(size_t(T * s.hidden), 17, 1.f);
        DeviceBuffer d_xb = to_device(*g, xb), d_ob(g->driver, size_t(T * s.hidden) * 2);
        const double us_b = time_graph(*g, 1, [&](int) {
          moe_forward(k, g->stream, w, ws.sc, d_xb.ptr(), d_ob.ptr(), T, MoePath::Decode);
        });
        const std::vector<int32_t> ids = download<int32_t>(*g, ws.sc.ids, size_t(T * s.top_k));
        std::vector<int32_t> distinct(ids.begin(), ids.end());
        std::sort(distinct.begin(), distinct.end());
        const double touched = double(std::unique(distinct.begin(), distinct.end()) - distinct.begin()) + 1;
        const double b = router_bytes + touched * 3 * s.inter * s.hidden * wbytes;
        MESSAGE(fmt::format("moe decode T={} {}: {:.2f} us per layer, {:.0f} experts touched, {:.1f} MB -> {:.2f} TB/s",
                            T, fmt_name, us_b, touched, b / 1e6, b / us_b * 1e-6));
      }
    }
    // Prefill T = 4096: each launch timed with events, median of 20 runs; the default tiles, and on
    // sm_90a the warp-specialised tiles beside them.
    std::vector<std::pair<std::string, MoeTiles>> timed = {{"default", k.tiles}};
    if (wgmma)
      for (const MoeGemmTile& t : {MoeGemmTile{128, 256, 64, 2, 1, 4, true, true}, MoeGemmTile{64, 256, 64, 1, 2, 4, true, true},
                                   MoeGemmTile{64, 128, 64, 1, 1, 6, true, true},
                                   // persistent (the default from 3,072 tokens is the st4 one; H200 2026-12-03:
                                   // st3 1296 us, st5 1093, 128x128 st8 1291, 64x256 st4 1342 per layer)
                                   MoeGemmTile{128, 256, 64, 2, 1, 4, true, true, false, 1, true},
                                   MoeGemmTile{128, 256, 64, 2, 1, 6, true, true, false, 1, true},
                                   MoeGemmTile{128, 128, 64, 2, 1, 4, true, true, false, 1, true},
                                   // the weights as wgmma's register operand
                                   // (H200 2026-12-03, 3cb84e4, not persistent: 128x128 st4 1027 us, st6 1019;
                                   // 256x64 with one consumer warpgroup 1544, 64x128 1219)
                                   MoeGemmTile{128, 128, 64, 1, 2, 6, true, true, true, 1, false, true},
                                   MoeGemmTile{256, 128, 64, 1, 2, 4, true, true, true, 1, false, true},
                                   MoeGemmTile{256, 128, 64, 1, 2, 4, true, true, true, 1, true, true},
                                   MoeGemmTile{256, 128, 64, 1, 2, 6, true, true, true, 1, true, true},
                                   MoeGemmTile{128, 128, 64, 1, 2, 4, true, true, true, 1, true, true},
                                   MoeGemmTile{128, 128, 64, 1, 2, 6, true, true, true, 1, true, true}}) {
        bool ok = true;
        for (MoeGemm gm : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
          ok = ok && why_invalid(t, s, gm).empty();
        if (!ok) continue;  // persistent: W4A16 only; FP8's 4-stage 128 x 256 warp-specialised tile: too large
        MoeTiles tiles = k.tiles;
        tiles.gemm = t;
        timed.emplace_back(fmt::format("{} {}x{} wg {}x{} stages {}{}", t.rs ? "rs" : "ws", t.block_m, t.block_n,
                                       t.warps_m, t.warps_n, t.stages, t.persist ? " persistent" : ""),
                           tiles);
      }
    for (const auto& [label, tiles] : timed) {
      const MoeKernels kk(g->jit, g->ctx, s, tiles);
      const MoeKernels& k = kk;
      const int64_t T = 4096;
      Workspace big(*g, k, T);
      const std::vector<uint16_t> x = random_bf16(size_t(T * s.hidden), 8, 1.f);
      DeviceBuffer d_x = to_device(*g, x), d_out(g->driver, size_t(T * s.hidden) * 2);
      const MoeWeights w = L.weights();
      std::vector<Event> ev;
      for (int i = 0; i < 8; ++i) ev.emplace_back(g->driver);
      std::vector<std::vector<double>> us(7);
      for (int rep = 0; rep < 23; ++rep) {
        int e = 0;
        ev[e++].record(g->stream);
        launch_moe_router_prefill(k.router_gemm, k.tiles.router_gemm, k.router_topk, g->stream, s, d_x.ptr(), w, big.sc,
                                  T);
        ev[e++].record(g->stream);
        launch_moe_align(k.align, g->stream, big.sc, T);
        ev[e++].record(g->stream);
        for (MoeGemm gm : {MoeGemm::RoutedGateUp, MoeGemm::SharedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedDown}) {
          launch_moe_gemm(k.gemm(gm), k.tiles.gemm, g->stream, s, gm, d_x.ptr(), w, big.sc, T, k.sm_count);
          ev[e++].record(g->stream);
        }
        launch_moe_combine(k.combine, g->stream, big.sc, d_out.ptr(), T);
        ev[e++].record(g->stream);
        ev[7].synchronize();
        if (rep < 3) continue;  // warm-up
        for (int i = 0; i < 7; ++i) us[i].push_back(ev[i + 1].elapsed_ms_since(ev[i]) * 1e3);
      }
      const char* names[7] = {"router", "align", "gemm routed gate_up", "gemm shared gate_up", "gemm routed down",
                              "gemm shared down", "combine"};
      const double pair_flops = 2.0 * 3 * s.inter * s.hidden, shared_flops = 2.0 * 3 * s.shared_inter * s.hidden;
      const double flops_gemm[7] = {2.0 * T * (s.experts + 1) * s.hidden, 0, T * s.top_k * pair_flops * 2 / 3,
                                    T * shared_flops * 2 / 3, T * s.top_k * pair_flops / 3, T * shared_flops / 3, 0};
      double total = 0, flops = 0;
      std::string parts;
      for (int i = 0; i < 7; ++i) {
        const double m = median(us[i]);
        total += m;
        flops += flops_gemm[i];
        parts += fmt::format("\n  {:<20} {:8.1f} us", names[i], m);
        if (flops_gemm[i] > 0) parts += fmt::format("  {:6.1f} TFLOP/s", flops_gemm[i] / m * 1e-6);
      }
      MESSAGE(fmt::format("moe prefill T=4096 {} ({}): {:.1f} us, {:.1f} TFLOP/s; floor {:.1f} us ({:.1f} GFLOP / 700 "
                          "TFLOP/s){}",
                          fmt_name, label, total, flops / total * 1e-6, flops / 700e6, flops * 1e-9, parts));
    }
  }
}

// The entries of a plan that moe_build_plan writes (count, experts, starts, pairs) equal the host model's.
int plan_mismatches(const std::vector<int32_t>& got, const std::vector<int32_t>& want, int E, int P) {
  const int U = want[0];
  if (got[0] != U) return 1;
  int bad = 0;
  for (int u = 0; u < U; ++u) bad += got[size_t(1 + u)] != want[size_t(1 + u)];
  for (int u = 0; u <= U; ++u) bad += got[size_t(1 + E + u)] != want[size_t(1 + E + u)];
  for (int i = 0; i < P; ++i) bad += got[size_t(2 + 2 * E + i)] != want[size_t(2 + 2 * E + i)];
  return bad;
}

// moe_router's plan at T = 1 .. 32 / k + 1 with the runner's tiles (the one-warp fast path while
// T * k <= 32: T <= 4 at the 35B shapes, 8 at the tiny ones; moe_build_plan past it) and with the
// one-token tile (m_tile 1: T token tiles, the second ticket, moe_build_plan), against the host model
// of the router's ids; the same routing through both tiles gives the same plan. Then moe_plan_check
// (both device builders on the same ids) on the router's ids and on made-up ids: experts 0 and E - 1,
// every token the same experts, few distinct experts.
void check_router_plans(Gpu& g, const MoeShape& s) {
  const int E = int(s.experts), K = int(s.top_k), H = int(s.hidden);
  CAPTURE(E);
  const MoeTiles tiles = MoeTiles::defaults(s);
  const int64_t max_t = 32 / K + 1;
  DeviceBuffer ws(g.driver, moe_workspace_bytes(s, tiles, max_t));
  ws.fill_bytes(0, g.stream);
  const MoeScratch sc = moe_scratch(s, tiles, max_t, ws.ptr());
  MoeWeights w;
  DeviceBuffer d_router = to_device(g, random_bf16(size_t(E) * size_t(H), 41, 0.02f));
  DeviceBuffer d_sg = to_device(g, random_bf16(size_t(H), 42, 0.02f));
  w.router = d_router.ptr();
  w.shared_gate = d_sg.ptr();
  const Function one = g.jit.load(moe_router_spec(s, tiles.router_one), g.ctx);
  const Function small = g.jit.load(moe_router_spec(s, tiles.router_decode), g.ctx);
  const Function large = g.jit.load(moe_router_spec(s, tiles.router_prefill), g.ctx);
  const Function check = g.jit.load(KernelSpec{"moe", "moe_plan_check", {{"E", std::to_string(E)}, {"TOPK", std::to_string(K)}}}, g.ctx);
  const size_t plan_ints = size_t(moe_plan_ints(s, max_t));
  DeviceBuffer d_block = poisoned(g, plan_ints * 4), d_warp = poisoned(g, plan_ints * 4);
  // Both builders on ids [T, K] (T * K <= 32): each against the host model.
  auto both = [&](const std::vector<int32_t>& ids, int T) {
    DeviceBuffer d_ids = to_device(g, ids);
    check.launch({{1}, {64}}, g.stream, d_ids.ptr(), T, d_block.ptr(), d_warp.ptr());
    const std::vector<int32_t> want = q35::test::moe_plan_ref(ids, T, K, E);
    CHECK(plan_mismatches(download<int32_t>(g, d_block.ptr(), plan_ints), want, E, T * K) == 0);
    CHECK(plan_mismatches(download<int32_t>(g, d_warp.ptr(), plan_ints), want, E, T * K) == 0);
  };
  for (int T = 1; T <= max_t; ++T) {
    CAPTURE(T);
    DeviceBuffer d_x = to_device(g, random_bf16(size_t(T) * size_t(H), uint32_t(300 + T), 1.f));
    const bool fast = T * K <= 32;
    launch_moe_router(T == 1 ? one : T <= kMoeRouterSmallTokens ? small : large, tiles.router(T), g.stream, s, d_x.ptr(), w, sc, T);
    const std::vector<int32_t> ids = download<int32_t>(g, sc.ids, size_t(T * K));
    const std::vector<int32_t> plan = download<int32_t>(g, sc.plan, plan_ints);
    const std::vector<int32_t> want = q35::test::moe_plan_ref(ids, T, K, E);
    MESSAGE(fmt::format("router plan E={} k={} T={} ({}): {} experts", E, K, T, fast ? "one warp" : "moe_build_plan", want[0]));
    CHECK(plan_mismatches(plan, want, E, T * K) == 0);
    CHECK(download<int32_t>(g, sc.counters, size_t(T))[0] == 0);
    if (T > 1) {  // T token tiles of one token: moe_build_plan after the second ticket
      launch_moe_router(one, tiles.router_one, g.stream, s, d_x.ptr(), w, sc, T);
      CHECK(download<int32_t>(g, sc.ids, size_t(T * K)) == ids);
      CHECK(plan_mismatches(download<int32_t>(g, sc.plan, plan_ints), want, E, T * K) == 0);
      CHECK(download<int32_t>(g, sc.plan_ticket, 1)[0] == 0);
    }
    if (fast) both(ids, T);
  }
  // Made-up routings.
  std::vector<int32_t> ids;
  for (int i = 0; i < K; ++i) ids.push_back(i % 2 ? i / 2 : E - 1 - i / 2);  // 0, 1, .. and E - 1, E - 2, ..
  both(ids, 1);
  for (int T = 2; T * K <= 32; ++T) {
    std::vector<int32_t> same;
    for (int t = 0; t < T; ++t)  // every token the same experts, rotated
      for (int i = 0; i < K; ++i) same.push_back(ids[size_t((i + t) % K)]);
    both(same, T);
    std::vector<int32_t> few;  // K + 1 distinct experts over all tokens
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < K; ++i) few.push_back((3 * ((i + t) % (K + 1)) + 5) % E);
    both(few, T);
  }
}

// The grouped path for prompt chunks of 65..256 tokens (issue 8): accuracy against the CPU reference
// (the decode cases' tolerance), a token's row at T = 128 bit-identical to the token alone, and the
// per-layer time of the grouped path against the GEMM path (the tiles the runner defaults to at T)
// at T = 64, 96, 128, 256: each a graph of one MoE call, median of 25 CUDA-event timed replays.
void run_grouped(const MoeShape& s) {
  auto g = open_gpu();
  const MasterWeights master(s);
  const Layer L(*g, master, s);
  const bool hopper = g->ctx.device().arch() == "sm_90a";
  const MoeKernels k(g->jit, g->ctx, s, MoeTiles::defaults(s, hopper));
  MESSAGE(fmt::format("grouped path on {}: at most {} tokens (shared memory opt-in {} B; down {} B, gate_up {} B at "
                      "that T)",
                      g->ctx.device().arch(), k.grouped_max_tokens, k.smem_optin,
                      moe_down_smem_bytes(s, k.tiles.down, k.grouped_max_tokens),
                      moe_gate_up_smem_bytes(k.tiles.gate_up, k.grouped_max_tokens)));
  Workspace ws(*g, k, kMoeGroupedMaxTokens);
  uint32_t salt = 300;
  for (int64_t T : {96, 128, 200, 256}) {
    if (T > k.grouped_max_tokens) {
      MESSAGE("T = " << T << " skipped: past this device's grouped bound");
      continue;
    }
    check_moe(*g, L, k, ws.sc, T, MoePath::Decode, salt++);
  }
  check_decode_alone(*g, L, k, ws.sc, 128, salt++);
  // Past the bound: a clear error, not a launch failure.
  CHECK(q35::test::contains(q35::test::error_of([&] {
          DeviceBuffer x(g->driver, size_t(300 * s.hidden) * 2), out(g->driver, size_t(300 * s.hidden) * 2);
          Workspace big(*g, k, 300);
          moe_forward(k, g->stream, L.weights(), big.sc, x.ptr(), out.ptr(), 300, MoePath::Decode);
        }),
        "grouped path takes at most"));

  const double wbytes = weight_bytes(s.group);
  const double router_bytes = double(s.experts + 1) * s.hidden * 2;
  const MoeWeights w = L.weights();
  std::string lines;
  for (int64_t T : {64, 96, 128, 256}) {
    if (T > k.grouped_max_tokens) continue;
    const std::vector<uint16_t> x = random_bf16(size_t(T * s.hidden), 23, 1.f);
    DeviceBuffer d_x = to_device(*g, x), d_out(g->driver, size_t(T * s.hidden) * 2);
    const MoeRouterTile& rt = k.tiles.router(T);
    const double router = time_graph(*g, 1, [&](int) { launch_moe_router(k.router(T), rt, g->stream, s, d_x.ptr(), w, ws.sc, T); });
    const double router_gate_up = time_graph(*g, 1, [&](int) {
      launch_moe_router(k.router(T), rt, g->stream, s, d_x.ptr(), w, ws.sc, T);
      launch_moe_decode_gate_up(k.decode_gate_up, k.tiles.gate_up, g->stream, s, d_x.ptr(), w, ws.sc, T);
    });
    const double grouped = time_graph(*g, 1, [&](int) {
      moe_forward(k, g->stream, w, ws.sc, d_x.ptr(), d_out.ptr(), T, MoePath::Decode);
    });
    const std::vector<int32_t> ids = download<int32_t>(*g, ws.sc.ids, size_t(T * s.top_k));
    std::vector<int32_t> distinct(ids.begin(), ids.end());
    std::sort(distinct.begin(), distinct.end());
    const double touched = double(std::unique(distinct.begin(), distinct.end()) - distinct.begin());
    const double bytes = router_bytes + (touched + 1) * 3 * s.inter * s.hidden * wbytes;
    // The GEMM path with the tiles the runner defaults to at T.
    const MoeKernels kg(g->jit, g->ctx, s, MoeTiles::defaults(s, hopper, T));
    Workspace wg(*g, kg, T);
    const double gemm = time_graph(*g, 1, [&](int) {
      moe_forward(kg, g->stream, w, wg.sc, d_x.ptr(), d_out.ptr(), T, MoePath::Prefill);
    });
    lines += fmt::format("\n  moe T={}: grouped {:.1f} us per layer (router {:.1f}, gate_up {:.1f}, down {:.1f}; {:.0f} "
                         "experts, {:.1f} MB -> {:.2f} TB/s), GEMM path {:.1f} us ({}{}x{}) -> {} {:.2f}x",
                         T, grouped, router, router_gate_up - router, grouped - router_gate_up, touched, bytes / 1e6,
                         bytes / grouped * 1e-6, gemm, kg.tiles.gemm.wgmma ? "wgmma " : "mma.sync ",
                         kg.tiles.gemm.block_m, kg.tiles.gemm.block_n, grouped <= gemm ? "grouped" : "GEMM",
                         std::max(grouped, gemm) / std::min(grouped, gemm));
  }
  MESSAGE(fmt::format("moe grouped vs GEMM path, H={} E={} k={} I={} {}:{}", s.hidden, s.experts, s.top_k, s.inter,
                      weight_format_name(s.group), lines));
}

// The grouped path's streaming form (moe_stream_gate_up / moe_stream_down + moe_stream_combine, every
// tile of the tuner's space) against the decode kernels (moe_decode_gate_up / moe_decode_down): h and
// out bit-identical at T = 1 .. 256, also when every token routes to the same experts (T identical
// rows: each expert's tokens in T / TOKENS column tiles). timing: per-layer time of both forms (whole
// MoE call: router, gate_up, down) at T = 1 .. 256, each a graph of one call, median of 25 replays.
void run_stream(const MoeShape& s, bool timing) {
  auto g = open_gpu();
  const MasterWeights master(s);
  const Layer L(*g, master, s);
  const bool hopper = g->ctx.device().arch() == "sm_90a";
  MoeTiles plain_tiles = MoeTiles::defaults(s, hopper);
  plain_tiles.stream.min_tokens = 0;  // never: the decode kernels
  const MoeKernels plain(g->jit, g->ctx, s, plain_tiles);
  Workspace wp(*g, plain, kMoeGroupedMaxTokens);
  const int64_t HW = s.top_k * s.inter + s.shared_inter;
  const std::string fmt_name = weight_format_name(s.group);
  const MoeWeights w = L.weights();
  std::vector<int64_t> Ts;
  for (int64_t T : {1, 3, 16, 37, 64, 128, 200, 256})
    if (T <= plain.grouped_max_tokens) Ts.push_back(T);
  std::string lines;
  std::vector<double> plain_us;
  if (timing)
    for (int64_t T : Ts) {
      const std::vector<uint16_t> x = random_bf16(size_t(T * s.hidden), 23, 1.f);
      DeviceBuffer d_x = to_device(*g, x), d_out(g->driver, size_t(T * s.hidden) * 2);
      plain_us.push_back(time_graph(*g, 1, [&](int) {
        moe_forward(plain, g->stream, w, wp.sc, d_x.ptr(), d_out.ptr(), T, MoePath::Decode);
      }));
    }
  for (const MoeStreamTile& st : tune::moe_stream_candidates()) {
    CAPTURE(st.warps);
    MoeTiles t = plain_tiles;
    t.stream = st;
    t.stream.min_tokens = 1;  // always
    const MoeKernels k(g->jit, g->ctx, s, t);
    Workspace ws(*g, k, kMoeGroupedMaxTokens);
    uint32_t salt = 700;
    for (int64_t T : Ts)
      for (bool same : {false, true}) {
        CAPTURE(T);
        CAPTURE(same);
        std::vector<uint16_t> x = random_bf16(size_t(T * s.hidden), salt++, 1.f);
        if (same)  // every token the first one: the same experts, T tokens each
          for (int64_t r = 1; r < T; ++r) std::copy_n(x.begin(), s.hidden, x.begin() + r * s.hidden);
        DeviceBuffer d_x = to_device(*g, x), d_a = poisoned(*g, size_t(T * s.hidden) * 2),
                     d_b = poisoned(*g, size_t(T * s.hidden) * 2);
        moe_forward(plain, g->stream, w, wp.sc, d_x.ptr(), d_a.ptr(), T, MoePath::Decode);
        moe_forward(k, g->stream, w, ws.sc, d_x.ptr(), d_b.ptr(), T, MoePath::Decode);
        CHECK(download<uint16_t>(*g, ws.sc.h, size_t(T * HW)) == download<uint16_t>(*g, wp.sc.h, size_t(T * HW)));
        CHECK(to_host<uint16_t>(*g, d_b) == to_host<uint16_t>(*g, d_a));
      }
    if (!timing) continue;
    lines += fmt::format("\n  stream {} warps ({} + {} blocks):", st.warps, k.stream_gate_up_blocks, k.stream_down_blocks);
    for (size_t i = 0; i < Ts.size(); ++i) {
      const int64_t T = Ts[i];
      const std::vector<uint16_t> x = random_bf16(size_t(T * s.hidden), 23, 1.f);
      DeviceBuffer d_x = to_device(*g, x), d_out(g->driver, size_t(T * s.hidden) * 2);
      const double us = time_graph(*g, 1, [&](int) {
        moe_forward(k, g->stream, w, ws.sc, d_x.ptr(), d_out.ptr(), T, MoePath::Decode);
      });
      lines += fmt::format(" T={} {:.1f} us ({:.2f}x)", T, us, plain_us[i] / us);
    }
  }
  if (timing) {
    std::string base;
    for (size_t i = 0; i < Ts.size(); ++i) base += fmt::format(" T={} {:.1f} us", Ts[i], plain_us[i]);
    MESSAGE(fmt::format("moe grouped path per layer, H={} E={} k={} I={} {}: decode kernels{}{}", s.hidden, s.experts,
                        s.top_k, s.inter, fmt_name, base, lines));
  }
}

}  // namespace

TEST_CASE("GPU: moe at the tiny fixture's and the 35B shapes: the router's plan, one warp (T * k <= 32) and moe_build_plan") {
  auto g = open_gpu();
  check_router_plans(*g, moe_shape(q35::test::config_tiny(), 0));
  check_router_plans(*g, MoeShape{2048, 256, 8, 512, 512, 128});
}

TEST_CASE("GPU: moe grouped path up to 256 tokens, 35B W4A16 g128: accuracy, batched == alone, vs the GEMM path") {
  run_grouped(MoeShape{2048, 256, 8, 512, 512, 128});
}

TEST_CASE("GPU: moe streaming form == decode kernels, tiny (bf16, g32, g64) and 35B (g128 timed, bf16, g32, FP8)") {
  const MoeShape tiny = moe_shape(q35::test::config_tiny(), 0);
  for (int group : {0, 32, 64}) {
    MoeShape s = tiny;
    s.group = group;
    run_stream(s, false);
  }
  run_stream(MoeShape{2048, 256, 8, 512, 512, 128}, true);
  run_stream(MoeShape{2048, 256, 8, 512, 512, 0}, false);
  run_stream(MoeShape{2048, 256, 8, 512, 512, 32}, false);
  run_stream(MoeShape{2048, 256, 8, 512, 512, kFp8Group}, false);
}

TEST_CASE("GPU: moe grouped path up to 256 tokens, 35B FP8: accuracy, batched == alone, vs the GEMM path") {
  run_grouped(MoeShape{2048, 256, 8, 512, 512, kFp8Group});
}

TEST_CASE("GPU: moe at the tiny fixture's shapes, bf16 and W4A16 g32 / g64, decode and prefill paths") {
  const Config cfg = q35::test::config_tiny();
  // I = 64 admits groups up to 64.
  run_shapes(moe_shape(cfg, 0), {0, 32, 64}, false);
}

TEST_CASE("GPU: moe at the 35B shapes, bf16, decode and prefill paths, timing") {
  run_shapes(MoeShape{2048, 256, 8, 512, 512, 0}, {0}, true);
}

TEST_CASE("GPU: moe at the 35B shapes, W4A16 g128, decode and prefill paths, timing (short prompts too)") {
  run_shapes(MoeShape{2048, 256, 8, 512, 512, 0}, {128}, true);
}

TEST_CASE("GPU: moe at the 35B shapes, W4A16 g32, decode and prefill paths") {
  run_shapes(MoeShape{2048, 256, 8, 512, 512, 0}, {32}, true);
}

TEST_CASE("GPU: moe FP8 at the tiny fixture's shapes (K = 64 < 128: one partial scale block), decode and prefill") {
  run_shapes(moe_shape(q35::test::config_tiny(), 0), {kFp8Group}, false);
}

TEST_CASE("GPU: moe FP8 at the 35B shapes, decode and prefill paths, timing") {
  run_shapes(MoeShape{2048, 256, 8, 512, 512, 0}, {kFp8Group}, true);
}
