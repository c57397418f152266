// GPU: gated full attention (spec §2.3) against the CPU reference (ref::qk_norm_rope,
// ref::attention with the output gate), at the tiny fixture's shapes (2 q heads, 1 kv head) and the
// 35B-A3B shapes (16 q heads, 2 kv heads), head_dim 256, rotary 64:
//   qk_norm_rope -> q and the K/V cache rows; prefill from pos0 = 0 and a second chunk after it;
//   decode (split-K + merge) at several context lengths; a captured decode step replayed at two
//   positions. References run on the same bf16 values the kernels read (the GPU's q and cache).
// The Hopper prefill kernel (attention_prefill_wgmma, sm_90a GPUs only) against the CPU reference
// (every row up to T = 128, sampled rows beyond) and against the mma.sync kernel (every row), at the
// tiny, 35B and 122B shapes, T = 1 .. 4096 from position 0 and continuing after cached rows.
// Timing at the 35B shapes (not asserted): prefill T = 4096 (mma.sync tiles, and on sm_90a the
// wgmma tiles of the tuner's space) against 700 TFLOP/s, decode at 4K and 16K context against the
// KV bytes at 3.0 TB/s.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "autotune/spaces.h"
#include "models/qwen35/config.h"
#include "models/qwen35/gpu/attention.h"
#include "models/qwen35/reference_ops.h"
#include "tests/gpu/gpu_harness.h"

using namespace q35;
using namespace q35::gpu_test;
using qwen35::gpu::AttentionPlan;

using q35::test::config_35b;
using q35::test::config_tiny;

namespace {

constexpr uint16_t kPoison = 0xffff;  // bf16 NaN

// The loaded kernels of one plan and the per-layer buffers, with host mirrors of the caches.
struct Attn {
  Gpu& g;
  AttentionPlan p;
  int max_context;
  Function rope, prefill, decode, merge;
  std::vector<uint16_t> q_norm_w, k_norm_w;  // [D]
  DeviceBuffer d_q_norm_w, d_k_norm_w, d_k_cache, d_v_cache, d_pos0;

  Attn(Gpu& gpu, const qwen35::Config& cfg, int max_ctx, uint32_t salt)
      : g(gpu),
        p(qwen35::gpu::attention_plan(cfg, kAttentionSmemLimitSm90)),
        max_context(max_ctx),
        rope(g.jit.load(p.qk_norm_rope_spec(), g.ctx)),
        prefill(g.jit.load(p.prefill_spec(), g.ctx)),
        decode(g.jit.load(p.decode_spec(), g.ctx)),
        merge(g.jit.load(p.decode_merge_spec(), g.ctx)),
        q_norm_w(random_bf16(p.d, salt + 1, 0.3f)),
        k_norm_w(random_bf16(p.d, salt + 2, 0.3f)),
        d_q_norm_w(to_device(g, q_norm_w)),
        d_k_norm_w(to_device(g, k_norm_w)),
        d_k_cache(poisoned(g, cache_elems() * 2)),
        d_v_cache(poisoned(g, cache_elems() * 2)),
        d_pos0(g.driver, 4) {}

  size_t cache_elems() const { return size_t(max_context) * p.hkv * p.d; }
  void set_pos0(int pos0) { d_pos0.upload(&pos0, 4, g.stream); }
};

// Checks qk_norm_rope's outputs for T tokens at pos0 given the qkv input and the cache contents
// before the launch (k_before / v_before): q and the new k rows against ref::qk_norm_rope, v rows
// copied exactly, every other cache row untouched.
void check_rope(const Attn& a, const std::vector<uint16_t>& qkv, const std::vector<uint16_t>& q_gpu,
                const std::vector<uint16_t>& k_before, const std::vector<uint16_t>& v_before,
                const std::vector<uint16_t>& k_after, const std::vector<uint16_t>& v_after, int pos0, int T) {
  const AttentionPlan& p = a.p;
  const int64_t row = p.qkv_row(), D = p.d;
  std::vector<float> q_in(size_t(T) * p.hq * D), k_in(size_t(T) * p.hkv * D);
  for (int t = 0; t < T; ++t) {
    for (int64_t h = 0; h < p.hq; ++h)
      for (int64_t d = 0; d < D; ++d) q_in[(t * p.hq + h) * D + d] = bf16_to_f32(qkv[t * row + h * 2 * D + d]);
    for (int64_t i = 0; i < p.hkv * D; ++i) k_in[t * p.hkv * D + i] = bf16_to_f32(qkv[t * row + p.hq * 2 * D + i]);
  }
  qwen35::ref::qk_norm_rope(q_in, to_f32(a.q_norm_w), T, p.hq, D, p.rotary, p.theta, pos0, p.eps);
  qwen35::ref::qk_norm_rope(k_in, to_f32(a.k_norm_w), T, p.hkv, D, p.rotary, p.theta, pos0, p.eps);
  CHECK(rel_l2(to_f32(q_gpu), q_in) <= 1e-2);
  const size_t first = size_t(pos0) * p.hkv * D, count = size_t(T) * p.hkv * D;
  std::vector<uint16_t> k_new(k_after.begin() + first, k_after.begin() + first + count);
  CHECK(rel_l2(to_f32(k_new), k_in) <= 1e-2);
  int v_wrong = 0, untouched_wrong = 0;
  for (int t = 0; t < T; ++t)
    for (int64_t i = 0; i < p.hkv * D; ++i)
      v_wrong += v_after[first + t * p.hkv * D + i] != qkv[t * row + p.hq * 2 * D + p.hkv * D + i];
  for (size_t i = 0; i < k_after.size(); ++i)
    if (i < first || i >= first + count) untouched_wrong += (k_after[i] != k_before[i]) + (v_after[i] != v_before[i]);
  CHECK(v_wrong == 0);
  CHECK(untouched_wrong == 0);
}

// ref::attention on the GPU's q and cache rows 0 .. pos0+T-1, gate from qkv.
std::vector<float> reference_attention(const AttentionPlan& p, const std::vector<uint16_t>& qkv,
                                       const std::vector<uint16_t>& q_gpu, const std::vector<uint16_t>& k_cache,
                                       const std::vector<uint16_t>& v_cache, int pos0, int T) {
  const int64_t D = p.d, row = p.qkv_row();
  const size_t rows = size_t(pos0 + T) * p.hkv * D;
  std::vector<float> gate(size_t(T) * p.hq * D), out(size_t(T) * p.hq * D);
  for (int t = 0; t < T; ++t)
    for (int64_t h = 0; h < p.hq; ++h)
      for (int64_t d = 0; d < D; ++d) gate[(t * p.hq + h) * D + d] = bf16_to_f32(qkv[t * row + h * 2 * D + D + d]);
  const std::vector<uint16_t> k(k_cache.begin(), k_cache.begin() + rows), v(v_cache.begin(), v_cache.begin() + rows);
  qwen35::ref::attention(to_f32(q_gpu), to_f32(k), to_f32(v), gate, out, T, pos0, p.hq, p.hkv, D, p.scale);
  return out;
}

// Rows `rows` of ref::attention for a call at pos0: row t attends cache rows 0 .. pos0 + t (one
// single-token reference call per row), gate from qkv. out [rows.size(), Hq*D].
std::vector<float> reference_rows(const AttentionPlan& p, const std::vector<uint16_t>& qkv,
                                  const std::vector<uint16_t>& q_gpu, const std::vector<uint16_t>& k_cache,
                                  const std::vector<uint16_t>& v_cache, int pos0, const std::vector<int>& rows) {
  const int64_t D = p.d, row = p.qkv_row(), HD = p.hq * D;
  std::vector<float> out(rows.size() * HD);
  for (size_t i = 0; i < rows.size(); ++i) {
    const int t = rows[i];
    std::vector<float> q(HD), gate(HD), o(HD);
    for (int64_t h = 0; h < p.hq; ++h)
      for (int64_t d = 0; d < D; ++d) {
        q[h * D + d] = bf16_to_f32(q_gpu[(t * p.hq + h) * D + d]);
        gate[h * D + d] = bf16_to_f32(qkv[t * row + h * 2 * D + D + d]);
      }
    const size_t keys = size_t(pos0 + t + 1) * p.hkv * D;
    const std::vector<uint16_t> k(k_cache.begin(), k_cache.begin() + keys), v(v_cache.begin(), v_cache.begin() + keys);
    qwen35::ref::attention(q, to_f32(k), to_f32(v), gate, o, 1, pos0 + t, p.hq, p.hkv, D, p.scale);
    std::copy(o.begin(), o.end(), out.begin() + i * HD);
  }
  return out;
}

// Rows i of a [T, Hq*D] output.
std::vector<float> pick_rows(const std::vector<float>& all, int64_t width, const std::vector<int>& rows) {
  std::vector<float> out;
  for (int t : rows) out.insert(out.end(), all.begin() + t * width, all.begin() + (t + 1) * width);
  return out;
}

enum class Path { Prefill, Decode };

// One call: T tokens at pos0 through qk_norm_rope and then prefill or decode; checks both steps.
// The device caches carry over between calls (a later call continues the sequence).
void run_and_check(Attn& a, Path path, int pos0, int T, uint32_t salt) {
  const AttentionPlan& p = a.p;
  CAPTURE(pos0);
  CAPTURE(T);
  const std::vector<uint16_t> qkv = random_bf16(size_t(T) * p.qkv_row(), salt, 1.f);
  DeviceBuffer d_qkv = to_device(a.g, qkv);
  DeviceBuffer d_q = poisoned(a.g, size_t(T) * p.hq * p.d * 2), d_out = poisoned(a.g, size_t(T) * p.hq * p.d * 2);
  const std::vector<uint16_t> k_before = to_host<uint16_t>(a.g, a.d_k_cache), v_before = to_host<uint16_t>(a.g, a.d_v_cache);
  a.set_pos0(pos0);
  qwen35::gpu::launch_qk_norm_rope(p, a.rope, a.g.stream, d_qkv.ptr(), a.d_q_norm_w.ptr(), a.d_k_norm_w.ptr(), d_q.ptr(),
                                   a.d_k_cache.ptr(), a.d_v_cache.ptr(), a.d_pos0.ptr(), T, a.max_context);
  const std::vector<uint16_t> q_gpu = to_host<uint16_t>(a.g, d_q), k_after = to_host<uint16_t>(a.g, a.d_k_cache),
                              v_after = to_host<uint16_t>(a.g, a.d_v_cache);
  check_rope(a, qkv, q_gpu, k_before, v_before, k_after, v_after, pos0, T);

  int splits = 0;
  if (path == Path::Prefill) {
    qwen35::gpu::launch_attention_prefill(p, a.prefill, a.g.stream, d_q.ptr(), a.d_k_cache.ptr(), a.d_v_cache.ptr(),
                                          d_qkv.ptr(), d_out.ptr(), a.d_pos0.ptr(), T);
  } else {
    splits = qwen35::gpu::attention_decode_splits(p, a.max_context, a.g.ctx.device().sm_count);
    DeviceBuffer scratch = poisoned(a.g, qwen35::gpu::attention_decode_scratch_bytes(p, splits));
    qwen35::gpu::launch_attention_decode(p, a.decode, a.merge, a.g.stream, d_q.ptr(), a.d_k_cache.ptr(),
                                         a.d_v_cache.ptr(), d_qkv.ptr(), d_out.ptr(), scratch.ptr(), splits,
                                         a.d_pos0.ptr(), T);
    a.g.stream.synchronize();
  }
  const std::vector<float> out = to_f32(to_host<uint16_t>(a.g, d_out));
  const std::vector<float> ref = reference_attention(p, qkv, q_gpu, k_after, v_after, pos0, T);
  const double err = rel_l2(out, ref);
  MESSAGE(fmt::format("{} HQ={} HKV={} pos0={} T={}{}: rel_l2 {:.2e}", path == Path::Prefill ? "prefill" : "decode",
                      p.hq, p.hkv, pos0, T,
                      splits ? fmt::format(" splits={}", splits) : fmt::format(" block_n={}", p.prefill.block_n), err));
  CHECK(err <= 1e-2);
}

// Fills cache rows [0, rows) of both caches with random values (an earlier turn's k and v).
void fill_cache(Attn& a, int rows, uint32_t salt) {
  std::vector<uint16_t> k = to_host<uint16_t>(a.g, a.d_k_cache), v = to_host<uint16_t>(a.g, a.d_v_cache);
  const size_t n = size_t(rows) * a.p.hkv * a.p.d;
  const std::vector<uint16_t> rk = random_bf16(n, salt, 1.f), rv = random_bf16(n, salt + 1, 1.f);
  std::copy(rk.begin(), rk.end(), k.begin());
  std::copy(rv.begin(), rv.end(), v.begin());
  a.d_k_cache.upload(k.data(), k.size() * 2, a.g.stream);
  a.d_v_cache.upload(v.data(), v.size() * 2, a.g.stream);
  a.g.stream.synchronize();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

TEST_CASE("GPU attention: qk_norm_rope + prefill from position 0 and a second chunk, tiny and 35B shapes") {
  auto g = open_gpu();
  MESSAGE("seed " << run_seed());
  for (const qwen35::Config& cfg : {config_tiny(), config_35b()}) {
    CAPTURE(cfg.num_heads);
    // The sm_90 default tile (64 keys) and the sm_80 one (32 keys).
    for (const int64_t smem_limit : {kAttentionSmemLimitSm90, kAttentionSmemLimitSm80}) {
      CAPTURE(smem_limit);
      for (const int T : {1, 17, 64, 200}) {
        Attn a(*g, cfg, 512, 10 + T);
        a.p.prefill = default_attention_prefill_tile(a.p.hq, a.p.hkv, a.p.d, smem_limit);
        a.prefill = g->jit.load(a.p.prefill_spec(), g->ctx);
        run_and_check(a, Path::Prefill, 0, T, 100 + T);
        if (T == 200) run_and_check(a, Path::Prefill, 200, 77, 300);  // the next turn continues the cache
        if (T == 17) run_and_check(a, Path::Prefill, 17, 150, 301);   // crosses tiles at an odd offset
      }
    }
  }
}

TEST_CASE("GPU attention: attention_prefill_wgmma (sm_90a) against the CPU reference and the mma.sync kernel, "
          "tiny, 35B and 122B shapes, T = 1 .. 4096, from position 0 and after cached rows") {
  auto g = open_gpu();
  MESSAGE("seed " << run_seed());
  const std::string arch = g->ctx.device().arch();
  REQUIRE_MESSAGE(arch == "sm_90a", "attention_prefill_wgmma runs on sm_90a GPUs only; this one is " << arch);
  struct Case {
    int pos0, T;
  };
  const std::vector<Case> cases = {{0, 1},     {0, 37},  {0, 128},   {0, 1000},   {0, 4096},
                                   {5, 1},     {200, 37}, {77, 128}, {3000, 1000}, {1000, 4096}};
  for (const qwen35::Config& cfg : {config_tiny(), config_35b(), qwen35::Config::preset("122b-a10b")}) {
    CAPTURE(cfg.num_heads);
    Attn a(*g, cfg, 5120, 50);  // a.prefill: the mma.sync kernel of the sm_90 default tile
    REQUIRE_FALSE(a.p.prefill.wgmma);
    const AttentionPlan& p = a.p;
    // The default Hopper tile and others of the tuner's space (fewer keys, deeper rings, no ping-pong).
    const std::vector<AttentionPrefillTile> tiles = {default_attention_prefill_wgmma_tile(p.hq, p.hkv, p.d),
                                                     {8, 64, true, 2, false},
                                                     {8, 48, true, 3, true},
                                                     {8, 32, true, 4, false}};
    std::vector<AttentionPlan> plans;
    std::vector<KernelSpec> specs;
    for (const AttentionPrefillTile& t : tiles) {
      plans.push_back(p);
      plans.back().prefill = t;
      specs.push_back(plans.back().prefill_spec());
    }
    g->jit.compile_all(specs, arch, int(std::max(2u, std::thread::hardware_concurrency())));
    std::vector<Function> fns;
    for (const KernelSpec& s : specs) fns.push_back(g->jit.load(s, g->ctx));
    const int64_t width = p.hq * p.d;
    for (const Case& c : cases) {
      CAPTURE(c.pos0);
      CAPTURE(c.T);
      if (c.pos0 > 0) fill_cache(a, c.pos0, 900 + c.pos0);  // an earlier turn's rows
      const std::vector<uint16_t> qkv = random_bf16(size_t(c.T) * p.qkv_row(), 950 + c.T, 1.f);
      DeviceBuffer d_qkv = to_device(*g, qkv), d_q(g->driver, size_t(c.T) * width * 2);
      a.set_pos0(c.pos0);
      qwen35::gpu::launch_qk_norm_rope(p, a.rope, g->stream, d_qkv.ptr(), a.d_q_norm_w.ptr(), a.d_k_norm_w.ptr(),
                                       d_q.ptr(), a.d_k_cache.ptr(), a.d_v_cache.ptr(), a.d_pos0.ptr(), c.T,
                                       a.max_context);
      DeviceBuffer d_mma = poisoned(*g, size_t(c.T) * width * 2);
      qwen35::gpu::launch_attention_prefill(p, a.prefill, g->stream, d_q.ptr(), a.d_k_cache.ptr(), a.d_v_cache.ptr(),
                                            d_qkv.ptr(), d_mma.ptr(), a.d_pos0.ptr(), c.T);
      const std::vector<float> mma = to_f32(to_host<uint16_t>(*g, d_mma));
      // Every row up to 128 tokens; beyond, the first and last rows of the first 128-row blocks, the
      // middle, the end and a spread of others.
      std::vector<int> rows;
      if (c.T <= 128) {
        for (int t = 0; t < c.T; ++t) rows.push_back(t);
      } else {
        for (int t : {0, 1, 63, 64, 127, 128, c.T / 2, c.T - 2, c.T - 1}) rows.push_back(t);
        for (int i = 1; i <= 8; ++i) rows.push_back(int((int64_t(i) * 7919) % c.T));
      }
      const std::vector<float> cpu = reference_rows(p, qkv, to_host<uint16_t>(*g, d_q), to_host<uint16_t>(*g, a.d_k_cache),
                                                    to_host<uint16_t>(*g, a.d_v_cache), c.pos0, rows);
      CHECK(rel_l2(pick_rows(mma, width, rows), cpu) <= 1e-2);
      for (size_t i = 0; i < tiles.size(); ++i) {
        const AttentionPrefillTile& t = tiles[i];
        CAPTURE(specs[i].str());
        // 128 rows more than T: the kernel must leave them alone.
        DeviceBuffer d_out = poisoned(*g, size_t(c.T + 128) * width * 2);
        qwen35::gpu::launch_attention_prefill(plans[i], fns[i], g->stream, d_q.ptr(), a.d_k_cache.ptr(),
                                              a.d_v_cache.ptr(), d_qkv.ptr(), d_out.ptr(), a.d_pos0.ptr(), c.T);
        const std::vector<uint16_t> raw = to_host<uint16_t>(*g, d_out);
        const std::vector<float> got = to_f32(std::vector<uint16_t>(raw.begin(), raw.begin() + size_t(c.T) * width));
        const double vs_cpu = rel_l2(pick_rows(got, width, rows), cpu), vs_mma = rel_l2(got, mma);
        MESSAGE(fmt::format("wgmma HQ={} HKV={} pos0={} T={} block_n={} stages={} pingpong={}: rel_l2 {:.2e} vs the "
                            "CPU ({} rows), {:.2e} vs mma.sync",
                            p.hq, p.hkv, c.pos0, c.T, t.block_n, t.stages, int(t.pingpong), vs_cpu, rows.size(), vs_mma));
        CHECK(vs_cpu <= 1e-2);
        CHECK(vs_mma <= 1e-2);
        CHECK(std::all_of(raw.begin() + size_t(c.T) * width, raw.end(), [](uint16_t x) { return x == kPoison; }));
      }
    }
  }
}

TEST_CASE("GPU attention: decode (split-K + merge) at several context lengths, tiny and 35B shapes") {
  auto g = open_gpu();
  MESSAGE("seed " << run_seed());
  struct Case {
    qwen35::Config cfg;
    std::vector<int> contexts;
  };
  // 122B-A10B: 16 q heads per kv head, two decode blocks of 8 per kv head.
  for (const Case& c : {Case{config_tiny(), {1, 100, 4096}}, Case{config_35b(), {1, 100, 4096, 16384}},
                        Case{qwen35::Config::preset("122b-a10b"), {1, 100, 4096}}}) {
    CAPTURE(c.cfg.num_heads);
    Attn a(*g, c.cfg, 16384, 20);
    for (const int ctx : c.contexts) {
      fill_cache(a, ctx - 1, 400 + ctx);
      run_and_check(a, Path::Decode, ctx - 1, 1, 500 + ctx);
    }
    // Several tokens per decode call where the MMA rows allow it (tiny: 2 q heads per kv head -> 4).
    if (a.p.max_decode_tokens() > 1) {
      fill_cache(a, 97, 600);
      run_and_check(a, Path::Decode, 97, a.p.max_decode_tokens(), 601);
    }
  }
}

TEST_CASE("GPU attention: a captured decode step replays at the position in device memory") {
  auto g = open_gpu();
  const qwen35::Config cfg = config_35b();
  Attn a(*g, cfg, 4096, 30);
  const AttentionPlan& p = a.p;
  fill_cache(a, 4096, 700);
  const std::vector<uint16_t> qkv = random_bf16(size_t(p.qkv_row()), 701, 1.f);
  DeviceBuffer d_qkv = to_device(*g, qkv), d_q(g->driver, size_t(p.hq) * p.d * 2), d_out(g->driver, size_t(p.hq) * p.d * 2);
  const int splits = qwen35::gpu::attention_decode_splits(p, a.max_context, g->ctx.device().sm_count);
  DeviceBuffer scratch(g->driver, qwen35::gpu::attention_decode_scratch_bytes(p, splits));
  Graph graph = Graph::capture(g->driver, g->stream, [&] {
    qwen35::gpu::launch_qk_norm_rope(p, a.rope, g->stream, d_qkv.ptr(), a.d_q_norm_w.ptr(), a.d_k_norm_w.ptr(), d_q.ptr(),
                                     a.d_k_cache.ptr(), a.d_v_cache.ptr(), a.d_pos0.ptr(), 1, a.max_context, true);
    qwen35::gpu::launch_attention_decode(p, a.decode, a.merge, g->stream, d_q.ptr(), a.d_k_cache.ptr(),
                                         a.d_v_cache.ptr(), d_qkv.ptr(), d_out.ptr(), scratch.ptr(), splits,
                                         a.d_pos0.ptr(), 1, true);
  });
  GraphExec exec = graph.instantiate();
  for (const int pos0 : {99, 4095}) {
    CAPTURE(pos0);
    d_out.fill_bytes(0xff, g->stream);
    a.set_pos0(pos0);
    exec.launch(g->stream);
    const std::vector<float> out = to_f32(to_host<uint16_t>(*g, d_out));
    const std::vector<float> ref = reference_attention(p, qkv, to_host<uint16_t>(*g, d_q), to_host<uint16_t>(*g, a.d_k_cache),
                                                       to_host<uint16_t>(*g, a.d_v_cache), pos0, 1);
    CHECK(rel_l2(out, ref) <= 1e-2);
  }
}

TEST_CASE("GPU attention: timing at the 35B shapes (prefill T = 4096, decode at 4K and 16K context)") {
  auto g = open_gpu();
  const qwen35::Config cfg = config_35b();
  const int T = 4096;
  Attn a(*g, cfg, 16384, 40);
  const AttentionPlan& p = a.p;
  DeviceBuffer d_qkv = to_device(*g, random_bf16(size_t(T) * p.qkv_row(), 801, 1.f));
  DeviceBuffer d_q(g->driver, size_t(T) * p.hq * p.d * 2), d_out(g->driver, size_t(T) * p.hq * p.d * 2);
  Event start(g->driver), stop(g->driver);
  auto time_ms = [&](auto&& body, int reps) {
    std::vector<double> ms;
    body();  // warm-up
    for (int r = 0; r < reps; ++r) {
      start.record(g->stream);
      body();
      stop.record(g->stream);
      stop.synchronize();
      ms.push_back(stop.elapsed_ms_since(start));
    }
    return median(ms);
  };

  a.set_pos0(0);
  const double rope_ms = time_ms([&] {
    qwen35::gpu::launch_qk_norm_rope(p, a.rope, g->stream, d_qkv.ptr(), a.d_q_norm_w.ptr(), a.d_k_norm_w.ptr(), d_q.ptr(),
                                     a.d_k_cache.ptr(), a.d_v_cache.ptr(), a.d_pos0.ptr(), T, a.max_context);
  }, 20);
  const double rope_bytes = double(T) * (p.qkv_row() - p.hq * p.d) * 2 * 2;  // q, k, v read and written
  MESSAGE(fmt::format("qk_norm_rope T={}: {:.1f} us; floor {:.1f} us ({:.1f} MB at 3.0 TB/s)", T, rope_ms * 1e3,
                      rope_bytes / 3.0e12 * 1e6, rope_bytes * 1e-6));

  // Causal FLOPs: QK^T and PV, 2 FLOPs per multiply-add, sum over t of (t + 1) keys.
  const double flops = 4.0 * p.hq * p.d * (double(T) * (T + 1) / 2);
  constexpr int kPrefillReps = 50;  // median of 50 launches after a warm-up, CUDA events
  double mma_default_ms = 0;
  for (const AttentionPrefillTile tile : {AttentionPrefillTile{8, 32}, AttentionPrefillTile{4, 64},
                                          AttentionPrefillTile{8, 64}, AttentionPrefillTile{4, 32}}) {
    AttentionPlan tp = p;
    tp.prefill = tile;
    Function f = g->jit.load(tp.prefill_spec(), g->ctx);
    const double ms = time_ms([&] {
      qwen35::gpu::launch_attention_prefill(tp, f, g->stream, d_q.ptr(), a.d_k_cache.ptr(), a.d_v_cache.ptr(), d_qkv.ptr(),
                                            d_out.ptr(), a.d_pos0.ptr(), T);
    }, kPrefillReps);
    const bool is_default = tile.warps == p.prefill.warps && tile.block_n == p.prefill.block_n;
    if (is_default) mma_default_ms = ms;
    MESSAGE(fmt::format("attention_prefill (mma.sync) T={} warps={} block_n={}{}: {:.1f} us per layer, {:.0f} TFLOP/s; "
                        "floor {:.3f} ms ({:.1f} GFLOP at 700 TFLOP/s)", T, tile.warps, tile.block_n,
                        is_default ? " (default)" : "", ms * 1e3, flops / ms * 1e-9, flops / 700e12 * 1e3,
                        flops * 1e-9));
  }
  // sm_90a: every Hopper tile of the tuner's space, beside the mma.sync default (target: 250 us).
  const std::string arch = g->ctx.device().arch();
  if (arch == "sm_90a") {
    std::vector<AttentionPrefillTile> tiles;
    std::vector<KernelSpec> specs;
    for (const AttentionPrefillTile& t : tune::attention_prefill_candidates(p.hq, p.hkv, p.d, kAttentionSmemLimitSm90, true))
      if (t.wgmma) {
        AttentionPlan tp = p;
        tp.prefill = t;
        tiles.push_back(t);
        specs.push_back(tp.prefill_spec());
      }
    g->jit.compile_all(specs, arch, int(std::max(2u, std::thread::hardware_concurrency())));
    const AttentionPrefillTile def = default_attention_prefill_wgmma_tile(p.hq, p.hkv, p.d);
    for (size_t i = 0; i < tiles.size(); ++i) {
      AttentionPlan tp = p;
      tp.prefill = tiles[i];
      Function f = g->jit.load(specs[i], g->ctx);
      const double ms = time_ms([&] {
        qwen35::gpu::launch_attention_prefill(tp, f, g->stream, d_q.ptr(), a.d_k_cache.ptr(), a.d_v_cache.ptr(),
                                              d_qkv.ptr(), d_out.ptr(), a.d_pos0.ptr(), T);
      }, kPrefillReps);
      const AttentionPrefillTile& t = tiles[i];
      const bool is_default = t.block_n == def.block_n && t.stages == def.stages && t.pingpong == def.pingpong;
      MESSAGE(fmt::format("attention_prefill_wgmma T={} block_n={} stages={} pingpong={}{}: {:.1f} us per layer, "
                          "{:.0f} TFLOP/s ({:.2f}x the mma.sync default)",
                          T, t.block_n, t.stages, int(t.pingpong), is_default ? " (wgmma default)" : "", ms * 1e3,
                          flops / ms * 1e-9, mma_default_ms / ms));
    }
  } else {
    MESSAGE("attention_prefill_wgmma not timed: " << arch << " is not sm_90a");
  }

  const int splits = qwen35::gpu::attention_decode_splits(p, a.max_context, g->ctx.device().sm_count);
  DeviceBuffer scratch(g->driver, qwen35::gpu::attention_decode_scratch_bytes(p, splits));
  constexpr int kSteps = 10;  // decode launches per graph
  Graph graph = Graph::capture(g->driver, g->stream, [&] {
    for (int i = 0; i < kSteps; ++i)
      qwen35::gpu::launch_attention_decode(p, a.decode, a.merge, g->stream, d_q.ptr(), a.d_k_cache.ptr(),
                                           a.d_v_cache.ptr(), d_qkv.ptr(), d_out.ptr(), scratch.ptr(), splits,
                                           a.d_pos0.ptr(), 1, true);
  });
  GraphExec exec = graph.instantiate();
  // The whole decode step of one layer: qk_norm_rope (T = 1) + decode + merge.
  Graph step_graph = Graph::capture(g->driver, g->stream, [&] {
    for (int i = 0; i < kSteps; ++i) {
      qwen35::gpu::launch_qk_norm_rope(p, a.rope, g->stream, d_qkv.ptr(), a.d_q_norm_w.ptr(), a.d_k_norm_w.ptr(),
                                       d_q.ptr(), a.d_k_cache.ptr(), a.d_v_cache.ptr(), a.d_pos0.ptr(), 1, a.max_context,
                                       true);
      qwen35::gpu::launch_attention_decode(p, a.decode, a.merge, g->stream, d_q.ptr(), a.d_k_cache.ptr(),
                                           a.d_v_cache.ptr(), d_qkv.ptr(), d_out.ptr(), scratch.ptr(), splits,
                                           a.d_pos0.ptr(), 1, true);
    }
  });
  GraphExec step_exec = step_graph.instantiate();
  fill_cache(a, 16384, 802);
  for (const int ctx : {4096, 16384}) {
    a.set_pos0(ctx - 1);
    const double ms = time_ms([&] { exec.launch(g->stream); }, 20) / kSteps;
    const double step_ms = time_ms([&] { step_exec.launch(g->stream); }, 20) / kSteps;
    const double bytes = double(ctx) * p.hkv * p.d * 2 * 2;
    MESSAGE(fmt::format("attention_decode + merge ctx={} splits={}: {:.2f} us (with qk_norm_rope: {:.2f} us); "
                        "floor {:.2f} us ({:.1f} MB of K/V at 3.0 TB/s)",
                        ctx, splits, ms * 1e3, step_ms * 1e3, bytes / 3.0e12 * 1e6, bytes * 1e-6));
  }
}
