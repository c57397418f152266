// Gated full-attention kernels on the CPU (no GPU needed): every instantiation of
// attention_kernels(cfg) for the tiny fixture and the 35B-A3B config compiles for sm_80 and sm_90a;
// tile validity rules, defaults, decode splits and scratch sizes. The Hopper prefill kernel
// (attention_prefill_wgmma): every tile the runner and the tuner use on sm_90a compiles without
// spills, with HGMMA (V read MN-major) in its SASS and the softmax scheduled under the P V wgmma.
#include <doctest/doctest.h>

#include <fmt/format.h>

#include <algorithm>
#include <random>
#include <regex>
#include <set>
#include <thread>

#include "autotune/spaces.h"
#include "autotune/tiles_attention.h"
#include "models/qwen35/gpu/attention.h"
#include "models/qwen35/kernels.h"
#include "runtime/core/error.h"
#include "runtime/jit/jit_engine.h"
#include "tests/ptxas_checks.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using q35::test::TempDir;

using q35::test::config_35b;
using q35::test::config_tiny;
using q35::test::contains;
using q35::test::error_of;

namespace {

// In the SASS of attention_prefill_wgmma: for every wait on the S wgmma with P V still in flight
// (WARPGROUP.DEPBAR.LE gsb0, 0x1), the exponentials (MUFU.EX2) issued before the wait on P V
// (DEPBAR.LE gsb0, 0x0); the smallest count over the loops (-1: no such wait).
int exps_under_pv(const std::string& sass) {
  int least = -1;
  size_t at = 0;
  while ((at = sass.find("WARPGROUP.DEPBAR.LE gsb0, 0x1", at)) != std::string::npos) {
    const size_t end = sass.find("WARPGROUP.DEPBAR.LE gsb0, 0x0", at);
    int n = 0;
    for (size_t e = sass.find("MUFU.EX2", at); e < end; e = sass.find("MUFU.EX2", e + 1)) ++n;
    least = least < 0 ? n : std::min(least, n);
    at = end;
  }
  return least;
}

// A host model of attention_prefill_wgmma's synchronisation (kernel_templates/attention_wgmma.cuh),
// one block: the producer warpgroup and the two consumer warpgroups as programs of the kernel's
// barrier operations in its order, mbarriers with their init counts and phase parities (a wait
// passes when the phase of its parity has completed, as mbarrier.try_wait.parity does, and must then
// be the phase it means), the ping-pong named barriers (bar.sync / bar.arrive, 256 threads), and
// setmaxnreg against the block's register pool (launch registers x 384). Runs the three programs
// under random interleavings until all end; "" or what deadlocked / went wrong.
struct ProtocolModel {
  int T, pos0, block_n, stages;
  bool pingpong;
  int producer_regs, consumer_regs, launch_regs;
};

std::string simulate_block(const ProtocolModel& m, int m0, unsigned seed) {
  enum Kind { Arrive, Wait, BarSync, BarArrive, RegsDec, RegsInc };
  struct Op {
    Kind kind;
    int bar;    // mbarrier index or named barrier id; registers for Regs*
    int phase;  // Wait: the phase index meant
    std::string what;
  };
  // mbarriers: 0 q_full, then per stage k_full, k_empty, v_full, v_empty (the kernel's layout).
  const int S = m.stages;
  auto k_full = [&](int s) { return 1 + 4 * s; };
  auto k_empty = [&](int s) { return 2 + 4 * s; };
  auto v_full = [&](int s) { return 3 + 4 * s; };
  auto v_empty = [&](int s) { return 4 + 4 * s; };
  std::vector<int> init(1 + 4 * S);
  init[0] = 128;
  for (int s = 0; s < S; ++s) init[k_full(s)] = 128, init[k_empty(s)] = 256, init[v_full(s)] = 128, init[v_empty(s)] = 256;
  const int n_tiles = (m.pos0 + std::min(m0 + 128, m.T) + m.block_n - 1) / m.block_n;
  std::vector<std::vector<Op>> prog(3);
  auto tag = [](const char* n, int j) { return std::string(n) + "(" + std::to_string(j) + ")"; };
  // Producer (warpgroup 2).
  std::vector<Op>& P = prog[2];
  P.push_back({RegsDec, m.producer_regs, 0, "setmaxnreg.dec"});
  P.push_back({Arrive, 0, 0, "q_full"});
  for (int j = 0; j < n_tiles; ++j) {
    const int s = j % S;
    if (j >= S) P.push_back({Wait, k_empty(s), j / S - 1, tag("k_empty", j)});
    P.push_back({Arrive, k_full(s), 0, tag("k_full", j)});
    if (j >= S) P.push_back({Wait, v_empty(s), j / S - 1, tag("v_empty", j)});
    P.push_back({Arrive, v_full(s), 0, tag("v_full", j)});
  }
  // Consumers: warpgroup wg, 128 threads each.
  for (int wg = 0; wg < 2; ++wg) {
    std::vector<Op>& C = prog[wg];
    int turn = 0;
    auto begin = [&] {
      if (m.pingpong && (wg == 1 || turn > 0)) C.push_back({BarSync, 1 + wg, 0, "bar.sync " + std::to_string(1 + wg)});
    };
    auto end = [&] {
      if (m.pingpong && (wg == 0 || turn < n_tiles)) C.push_back({BarArrive, 2 - wg, 0, "bar.arrive " + std::to_string(2 - wg)});
      ++turn;
    };
    C.push_back({RegsInc, m.consumer_regs, 0, "setmaxnreg.inc"});
    C.push_back({Wait, 0, 0, "q_full"});
    begin();
    C.push_back({Wait, k_full(0), 0, tag("k_full", 0)});
    end();
    C.push_back({Arrive, k_empty(0), 0, tag("k_empty", 0)});
    for (int j = 1; j < n_tiles; ++j) {
      begin();
      C.push_back({Wait, k_full(j % S), j / S, tag("k_full", j)});
      C.push_back({Wait, v_full((j - 1) % S), (j - 1) / S, tag("v_full", j - 1)});
      end();
      C.push_back({Arrive, k_empty(j % S), 0, tag("k_empty", j)});
      C.push_back({Arrive, v_empty((j - 1) % S), 0, tag("v_empty", j - 1)});
    }
    begin();
    C.push_back({Wait, v_full((n_tiles - 1) % S), (n_tiles - 1) / S, tag("v_full", n_tiles - 1)});
    end();
    C.push_back({Arrive, v_empty((n_tiles - 1) % S), 0, tag("v_empty", n_tiles - 1)});
  }
  std::vector<int> pending(init.size(), 0), phases(init.size(), 0);
  int named[16] = {}, named_gen[16] = {};
  std::vector<size_t> pc(3, 0);
  std::vector<int> sync_gen(3, -1);  // BarSync: the generation it waits to complete
  long pool = 0;
  const char* const who[3] = {"consumer warpgroup 0", "consumer warpgroup 1", "producer"};
  std::mt19937 rng(seed);
  for (;;) {
    std::vector<int> ready;
    for (int g = 0; g < 3; ++g) {
      if (pc[g] == prog[g].size()) continue;
      const Op& op = prog[g][pc[g]];
      bool ok = true;
      if (sync_gen[g] >= 0) ok = named_gen[op.bar] > sync_gen[g];
      else if (op.kind == Wait) ok = (phases[op.bar] & 1) != (op.phase & 1);
      else if (op.kind == RegsInc) ok = pool >= long(op.bar - m.launch_regs) * 128;
      if (ok) ready.push_back(g);
    }
    if (ready.empty()) break;
    const int g = ready[rng() % ready.size()];
    const Op& op = prog[g][pc[g]];
    switch (op.kind) {
      case Arrive:
        if ((pending[op.bar] += 128) == init[op.bar]) pending[op.bar] = 0, ++phases[op.bar];
        if (pending[op.bar] > init[op.bar]) return std::string(who[g]) + ": over-arrival on " + op.what;
        break;
      case Wait:
        if (phases[op.bar] != op.phase + 1)
          return fmt::format("{}: {} passed with {} phases complete, meant phase {}", who[g], op.what, phases[op.bar], op.phase);
        break;
      case BarSync:
        if (sync_gen[g] >= 0) {  // released
          sync_gen[g] = -1;
          break;
        }
        sync_gen[g] = named_gen[op.bar];
        [[fallthrough]];
      case BarArrive:
        if ((named[op.bar] += 128) == 256) named[op.bar] = 0, ++named_gen[op.bar];
        if (op.kind == BarSync) continue;  // stays at this op until its generation completes
        break;
      case RegsDec: pool += long(m.launch_regs - op.bar) * 128; break;
      case RegsInc: pool -= long(op.bar - m.launch_regs) * 128; break;
    }
    ++pc[g];
  }
  std::string stuck;
  for (int g = 0; g < 3; ++g)
    if (pc[g] < prog[g].size()) stuck += fmt::format("{} blocked at {}; ", who[g], prog[g][pc[g]].what);
  for (int id : {1, 2})
    if (named[id] != 0) stuck += fmt::format("named barrier {} left with {} threads arrived; ", id, named[id]);
  for (size_t b = 0; b < pending.size(); ++b)
    if (pending[b] != 0) stuck += fmt::format("mbarrier {} left with {} arrivals; ", b, pending[b]);
  return stuck;
}

// Every row block of a call of T tokens at pos0, a few interleavings each.
std::string simulate_call(ProtocolModel m) {
  const int blocks = (m.T + 127) / 128;
  for (int y = 0; y < blocks; ++y)
    for (unsigned seed = 0; seed < 4; ++seed)
      if (std::string why = simulate_block(m, y * 128, seed); !why.empty())
        return fmt::format("T = {}, pos0 = {}, row block {}: {}", m.T, m.pos0, y, why);
  return {};
}

// The setmaxnreg budgets in the SASS fit the block's register pool (ptxas's launch registers x 384
// threads), and the barrier protocol runs to its end with them (T = 1, 37, 4096): the first H200 run
// hung in setmaxnreg.inc with a producer of 32 and consumers of 240 registers (65,536 > 168 x 384).
void check_register_pool(const std::string& log, const std::string& sass, const AttentionPrefillTile& t) {
  std::smatch m;
  REQUIRE(std::regex_search(log, m, std::regex(R"(Used (\d+) registers)")));
  const int launch = std::stoi(m[1]);
  static const std::regex dec(R"(USETMAXREG\.DEALLOC\.CTAPOOL 0x([0-9a-f]+))");
  static const std::regex inc(R"(USETMAXREG\.TRY_ALLOC\.CTAPOOL UP\d, 0x([0-9a-f]+))");
  std::smatch md, mi;
  REQUIRE(std::regex_search(sass, md, dec));
  REQUIRE(std::regex_search(sass, mi, inc));
  const int producer = std::stoi(md[1], nullptr, 16), consumer = std::stoi(mi[1], nullptr, 16);
  CAPTURE(launch);
  CAPTURE(producer);
  CAPTURE(consumer);
  CHECK(128 * producer + 256 * consumer <= launch * 384);
  for (int T : {1, 37, 4096})
    CHECK(simulate_call({T, 0, t.block_n, t.stages, t.pingpong, producer, consumer, launch}) == "");
}

}  // namespace

TEST_CASE("attention_prefill_wgmma's barrier protocol (host model): no deadlock, every wait sees its own phase") {
  for (int T : {1, 37, 128, 129, 4096})
    for (int pos0 : {0, 5, 1000})
      for (int block_n : {16, 48, 80})
        for (int stages : {2, 3, 4})
          for (bool pp : {false, true}) {
            CAPTURE(T);
            CAPTURE(pos0);
            CAPTURE(block_n);
            CAPTURE(stages);
            CAPTURE(pp);
            CHECK(simulate_call({T, pos0, block_n, stages, pp, 24, 240, 168}) == "");
          }
  // The budgets of the first H200 run (producer 32, consumers 240: 65,536 > 168 x 384) never leave
  // setmaxnreg.inc.
  CHECK(contains(simulate_call({1, 0, 80, 2, true, 32, 240, 168}), "blocked at setmaxnreg.inc"));
}

TEST_CASE("attention_kernels lists the four attention instantiations with the config's shapes") {
  std::vector<std::string> names;
  for (const KernelSpec& s : qwen35::gpu::attention_kernels(config_35b())) names.push_back(s.instantiation());
  CHECK(names == std::vector<std::string>{"qk_norm_rope<16, 2, 256, 64, 20>", "attention_prefill<16, 2, 256, 32, 8>",
                                          "attention_decode<16, 2, 256, 4>", "attention_decode_merge<16, 2, 256, 4>"});
  // Tiny fixture: 2 q heads, 1 kv head, head_dim 256, rotary 64: 4 heads -> 4 warps.
  names.clear();
  for (const KernelSpec& s : qwen35::gpu::attention_kernels(config_tiny())) names.push_back(s.instantiation());
  CHECK(names == std::vector<std::string>{"qk_norm_rope<2, 1, 256, 64, 4>", "attention_prefill<2, 1, 256, 32, 8>",
                                          "attention_decode<2, 1, 256, 4>", "attention_decode_merge<2, 1, 256, 4>"});
  // sm_90's shared memory takes 64-key prefill tiles.
  CHECK(qwen35::gpu::attention_kernels(config_35b(), kAttentionSmemLimitSm90)[1].instantiation() ==
        "attention_prefill<16, 2, 256, 64, 8>");
  // No full-attention layer, no attention kernel; no output gate is rejected by name.
  qwen35::Config linear_only = config_35b();
  linear_only.layer_types.assign(4, qwen35::LayerType::LinearAttention);
  CHECK(qwen35::gpu::attention_kernels(linear_only).empty());
  qwen35::Config no_gate = config_35b();
  no_gate.attn_output_gate = false;
  CHECK(error_of([&] { qwen35::gpu::attention_kernels(no_gate); }).find("attn_output_gate") != std::string::npos);

  const qwen35::gpu::AttentionPlan p = qwen35::gpu::attention_plan(config_35b());
  CHECK(p.qkv_row() == 16 * 512 + 2 * 2 * 256);
  CHECK(p.scale == doctest::Approx(1.0 / 16));
  CHECK(p.theta == doctest::Approx(1e7));
  CHECK(p.max_decode_tokens() == 1);                                                 // 8 q heads per kv head
  CHECK(qwen35::gpu::attention_plan(config_tiny()).max_decode_tokens() == 4);       // 2 q heads per kv head
}

TEST_CASE("attention decode splits and scratch sizes") {
  const qwen35::gpu::AttentionPlan p = qwen35::gpu::attention_plan(config_35b());
  // 132 SMs, 2 kv heads: 132 splits (two CTAs per SM); a short cache has fewer 64-key blocks.
  CHECK(qwen35::gpu::attention_decode_splits(p, 262144, 132) == 132);
  CHECK(qwen35::gpu::attention_decode_splits(p, 1000, 132) == 16);
  CHECK(qwen35::gpu::attention_decode_splits(p, 1, 132) == 1);
  CHECK(error_of([&] { qwen35::gpu::attention_decode_splits(p, 0, 132); }).find("max_context = 0") != std::string::npos);
  // part_o [2, 132, 8, 256] + part_ml [2, 132, 8, 2], fp32.
  CHECK(qwen35::gpu::attention_decode_scratch_bytes(p, 132) == size_t(2) * 132 * 8 * (256 + 2) * 4);
  // 122B: 32 q heads over 2 kv heads = 4 decode blocks per split (8 q heads each), one token per call.
  const qwen35::gpu::AttentionPlan big = qwen35::gpu::attention_plan(qwen35::Config::preset("122b-a10b"));
  CHECK(big.decode_qgroups() == 2);
  CHECK(big.max_decode_tokens() == 1);
  CHECK(qwen35::gpu::attention_decode_splits(big, 262144, 132) == 66);
  CHECK(qwen35::gpu::attention_decode_scratch_bytes(big, 66) == size_t(4) * 66 * 8 * (256 + 2) * 4);
}

TEST_CASE("attention tile validity rules and defaults") {
  CHECK(why_invalid(QkNormRopeTile{20}, 16, 2, 256, 64).empty());
  CHECK(why_invalid(QkNormRopeTile{8}, 16, 2, 512, 64).find("head_dim = 512") != std::string::npos);
  CHECK(why_invalid(QkNormRopeTile{8}, 16, 2, 256, 40).find("rotary_dim = 40") != std::string::npos);
  CHECK(why_invalid(QkNormRopeTile{8}, 16, 3, 256, 64).find("16 query heads") != std::string::npos);
  CHECK(why_invalid(QkNormRopeTile{33}, 16, 2, 256, 64).find("warps = 33") != std::string::npos);

  // Q 128 x 256 + 2 x (K, V) 32 x 256, bf16 = 128 KiB.
  CHECK(AttentionPrefillTile{8, 32}.smem_bytes(256) == 131072);
  CHECK(why_invalid(AttentionPrefillTile{8, 32}, 16, 2, 256).empty());
  // 192 KiB: fits sm_90 only.
  CHECK(why_invalid(AttentionPrefillTile{8, 64}, 16, 2, 256).find("196608 B of shared memory") != std::string::npos);
  CHECK(why_invalid(AttentionPrefillTile{8, 64}, 16, 2, 256, kAttentionSmemLimitSm90).empty());
  CHECK(why_invalid(AttentionPrefillTile{8, 48}, 16, 2, 256).find("block_n = 48") != std::string::npos);
  CHECK(why_invalid(AttentionPrefillTile{8, 32}, 16, 2, 96).find("head_dim = 96") != std::string::npos);
  CHECK(why_invalid(AttentionPrefillTile{16, 32}, 16, 2, 256).find("warps = 16") != std::string::npos);
  CHECK(default_attention_prefill_tile(16, 2, 128).block_m() == 128);
  // A 100 KiB limit forces the 4-warp tile.
  CHECK(default_attention_prefill_tile(16, 2, 256, 100 * 1024).warps == 4);

  CHECK(why_invalid(AttentionDecodeTile{4}, 16, 2, 256).empty());
  // More than 8 q heads per kv head (122B, 397B: 16): blocks of 8 heads, so multiples of 8 only.
  CHECK(why_invalid(AttentionDecodeTile{4}, 32, 2, 256).empty());
  CHECK(attention_decode_qgroups(32, 2) == 2);
  CHECK(attention_decode_qgroups(16, 2) == 1);
  CHECK(attention_decode_qgroups(4, 2) == 1);
  CHECK(why_invalid(AttentionDecodeTile{4}, 24, 2, 256).find("12 query heads per kv head") != std::string::npos);
  CHECK(why_invalid(AttentionDecodeTile{8}, 16, 2, 256).find("of shared memory exceeds") != std::string::npos);
  CHECK(why_invalid(AttentionDecodeTile{4}, 16, 2, 192).find("head_dim = 192") == std::string::npos);  // 3 x 64 is fine
  CHECK(why_invalid(AttentionDecodeTile{4}, 16, 2, 160).find("head_dim = 160") != std::string::npos);

  CHECK(error_of([] { attention_prefill_spec(16, 2, 256, AttentionPrefillTile{8, 48}); }).find("attention_prefill [HQ = 16") !=
        std::string::npos);
  CHECK(error_of([] { default_attention_decode_tile(40, 2, 256); }).find("attention_decode [HQ = 40, HKV = 2, D = 256]") !=
        std::string::npos);
}

TEST_CASE("every attention kernel of the fixture, the 35B and the 122B config compiles for sm_80 and sm_90a") {
  TempDir tmp("attn-jit");
  JitOptions opts;
  opts.kernel_dir = std::nullopt;  // the embedded templates, as the binary ships them
  JitEngine jit(tmp / "cache", opts);
  std::vector<KernelSpec> specs = qwen35::gpu::attention_kernels(config_35b());
  for (const KernelSpec& s : qwen35::gpu::attention_kernels(config_tiny())) specs.push_back(s);
  // 122B / 397B heads: 16 q heads per kv head.
  for (const KernelSpec& s : qwen35::gpu::attention_kernels(qwen35::Config::preset("122b-a10b"))) specs.push_back(s);
  // The sm_90-only prefill tile compiles too.
  specs.push_back(attention_prefill_spec(16, 2, 256, AttentionPrefillTile{8, 64}));
  const int threads = int(std::max(2u, std::thread::hardware_concurrency()));
  for (const std::string arch : {"sm_80", "sm_90a"}) {
    CAPTURE(arch);
    std::vector<CompiledKernel> done = jit.compile_all(specs, arch, threads);
    REQUIRE(done.size() == specs.size());
    for (size_t i = 0; i < done.size(); ++i) {
      CAPTURE(specs[i].str());
      CHECK(done[i].cubin.size() > 1000);
      CHECK(!done[i].lowered_name.empty());
    }
  }
}

TEST_CASE("attention_prefill_wgmma tiles: validity rules, shared memory, spec and defaults") {
  const AttentionPrefillTile fa3{8, 80, true, 2, true};
  // 1 KiB alignment + Q 128 x 256 + 2 stages x (K, V) 80 x 256, bf16, + 9 mbarriers.
  CHECK(fa3.smem_bytes(256) == 1024 + 2 * 256 * (128 + 2 * 2 * 80) + 8 * 9);
  CHECK(fa3.block_m() == 128);
  CHECK(fa3.threads() == 384);
  CHECK(why_invalid(fa3, 16, 2, 256, kAttentionSmemLimitSm90).empty());
  CHECK(why_invalid(fa3, 32, 2, 256, kAttentionSmemLimitSm90).empty());
  CHECK(why_invalid(fa3, 2, 1, 256, kAttentionSmemLimitSm90).empty());
  CHECK(contains(why_invalid(fa3, 16, 2, 256), "of shared memory exceeds"));  // sm_80's limit
  AttentionPrefillTile bad = fa3;
  bad.stages = 3;  // 3 x 80 KiB of K / V
  CHECK(contains(why_invalid(bad, 16, 2, 256, kAttentionSmemLimitSm90), "of shared memory exceeds"));
  bad = fa3, bad.block_n = 96;  // O 128 + S 48 + P 24 registers
  CHECK(contains(why_invalid(bad, 16, 2, 256, kAttentionSmemLimitSm90), "200 registers"));
  CHECK(why_invalid(bad, 16, 2, 128, kAttentionSmemLimitSm90).empty());  // head_dim 128: 64 + 72
  bad = fa3, bad.block_n = 40;
  CHECK(contains(why_invalid(bad, 16, 2, 256, kAttentionSmemLimitSm90), "block_n = 40"));
  bad = fa3, bad.warps = 4;
  CHECK(contains(why_invalid(bad, 16, 2, 256, kAttentionSmemLimitSm90), "warps = 4"));
  bad = fa3, bad.stages = 5;
  CHECK(contains(why_invalid(bad, 16, 2, 256, kAttentionSmemLimitSm90), "stages = 5"));
  CHECK(contains(why_invalid(fa3, 16, 2, 192, kAttentionSmemLimitSm90), "head_dim = 192"));

  const KernelSpec spec = attention_prefill_spec(16, 2, 256, fa3);
  CHECK(spec.family == "attention_wgmma");
  CHECK(spec.instantiation() == "attention_prefill_wgmma<16, 2, 256, 80, 2, true>");
  bad = fa3, bad.block_n = 40;
  CHECK(contains(error_of([&] { attention_prefill_spec(16, 2, 256, bad); }), "attention_prefill [HQ = 16"));

  const AttentionPrefillTile def = default_attention_prefill_wgmma_tile(16, 2, 256);
  CHECK((def.wgmma && def.block_n == 80 && def.stages == 2 && def.pingpong));
  CHECK(default_attention_prefill_wgmma_tile(16, 2, 128).block_n == 80);
  // The runner's default on sm_90a follows kAttentionPrefillWgmmaDefault; never on other targets.
  CHECK(default_attention_prefill_tile(16, 2, 256, kAttentionSmemLimitSm90, true).wgmma == kAttentionPrefillWgmmaDefault);
  CHECK_FALSE(default_attention_prefill_tile(16, 2, 256, kAttentionSmemLimitSm90, false).wgmma);
  bool hopper_lists_wgmma = false;
  for (const KernelSpec& s : qwen35::required_kernels(config_35b(), 128, "sm_90a"))
    hopper_lists_wgmma |= s.family == "attention_wgmma";
  CHECK(hopper_lists_wgmma == kAttentionPrefillWgmmaDefault);
  for (const KernelSpec& s : qwen35::required_kernels(config_35b(), 128, "sm_80")) CHECK(s.family != "attention_wgmma");
}

TEST_CASE("attention_prefill_wgmma: every tile of the runner and the tuner compiles for sm_90a without spills, "
          "with HGMMA (V MN-major) in its SASS and the softmax under the P V wgmma") {
  TempDir tmp("attn-wgmma-jit");
  JitOptions opts;
  opts.kernel_dir = std::nullopt;
  opts.extra_options = {"--ptxas-options=-v"};
  JitEngine jit(tmp / "cache", opts);
  std::vector<KernelSpec> specs;
  std::vector<AttentionPrefillTile> tiles;
  std::set<std::string> seen;
  auto add = [&](const qwen35::Config& cfg, const AttentionPrefillTile& t) {
    const KernelSpec s = attention_prefill_spec(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, t);
    if (seen.insert(s.str()).second) specs.push_back(s), tiles.push_back(t);
  };
  // The tuner's space on sm_90a for the 35B (16 / 2 heads) and the 122B (32 / 2); the default for
  // the tiny fixture (2 / 1) with and without ping-pong.
  for (const qwen35::Config& cfg : {config_35b(), qwen35::Config::preset("122b-a10b")})
    for (const AttentionPrefillTile& t :
         tune::attention_prefill_candidates(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kAttentionSmemLimitSm90, true))
      if (t.wgmma) add(cfg, t);
  const qwen35::Config tiny = config_tiny();
  AttentionPrefillTile t = default_attention_prefill_wgmma_tile(tiny.num_heads, tiny.num_kv_heads, tiny.head_dim);
  add(tiny, t);
  t.pingpong = !t.pingpong;
  add(tiny, t);
  MESSAGE(specs.size() << " attention_prefill_wgmma instantiations");
  CHECK(specs.size() == 30);

  const std::vector<CompiledKernel> out = jit.compile_all(specs, "sm_90a", int(std::max(2u, std::thread::hardware_concurrency())));
  REQUIRE(out.size() == specs.size());
  for (size_t i = 0; i < out.size(); ++i) {
    CAPTURE(specs[i].str());
    CHECK(q35::test::spill_bytes(out[i], specs[i].str()) == 0);
    CHECK_FALSE(contains(out[i].log, "serializ"));  // ptxas did not serialize the wgmma
    const std::string sass = q35::test::sass_of(out[i], tmp.path());
    CHECK(contains(sass, "HGMMA.64x" + std::to_string(tiles[i].block_n) + "x16.F32.BF16"));  // S = Q K^T
    // O += P V: P from registers, V MN-major (the descriptor's transpose bit).
    static const std::regex pv(R"(HGMMA\.64x256x16\.F32\.BF16 R\d+, R\d+, gdesc\[UR\d+\]\.tnspB)");
    CHECK(std::regex_search(sass, pv));
    CHECK_FALSE(contains(sass, "LDL"));
    CHECK_FALSE(contains(sass, "STL"));
    // Every exponential of a tile (block_n / 2 per thread) runs while P V is in flight.
    CHECK(exps_under_pv(sass) >= tiles[i].block_n / 2);
    check_register_pool(out[i].log, sass, tiles[i]);
  }
}

TEST_CASE("attention_prefill_wgmma: the spin-trap build (Q35_SPIN_TRAP) compiles for sm_90a with the same "
          "setmaxnreg budgets, under its own cache key") {
  TempDir tmp("attn-wgmma-trap");
  JitOptions opts;
  opts.kernel_dir = std::nullopt;
  opts.extra_options = {"--ptxas-options=-v"};
  opts.spin_trap = false;
  JitEngine plain(tmp / "cache", opts);
  opts.spin_trap = true;
  JitEngine trap(tmp / "cache", opts);
  const qwen35::Config tiny = config_tiny();
  const AttentionPrefillTile t = default_attention_prefill_wgmma_tile(tiny.num_heads, tiny.num_kv_heads, tiny.head_dim);
  const KernelSpec spec = attention_prefill_spec(tiny.num_heads, tiny.num_kv_heads, tiny.head_dim, t);
  CHECK(plain.cache_key(spec, "sm_90a") != trap.cache_key(spec, "sm_90a"));
  const std::vector<std::string> o = trap.compile_options("sm_90a");
  CHECK(std::find(o.begin(), o.end(), "-DQ35_SPIN_TRAP=1") != o.end());
  const CompiledKernel k = trap.compile(spec, "sm_90a");
  // ptxas keeps the setmaxnreg budgets (a function call in a warpgroup's path can make it drop them:
  // "'setmaxnreg' ignored"); the report's printf only serializes the wgmma.
  CHECK_FALSE(contains(k.log, "setmaxnreg' ignored"));
  const std::string sass = q35::test::sass_of(k, tmp.path());
  CHECK(contains(sass, "BPT.TRAP"));
  check_register_pool(k.log, sass, t);
}
