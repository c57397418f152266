// The FP8 (W8A16) kernels on the CPU (no GPU; their GPU tests against the CPU reference are in
// tests/gpu/test_gpu_fp8.cpp): every FP8 instantiation the runner uses at the tiny fixture's and
// the 35B-A3B shapes (the decode GEMVs with and without the residual epilogue, the mma.sync and
// wgmma prefill GEMMs, the MoE decode GEMVs and grouped GEMMs, the quantizer and dequantizer)
// compile through NVRTC for sm_90a and sm_80 (wgmma: sm_90a) with no register spills and no stack
// frame (ptxas -v); so do the FP8 tiles of the tuner's spaces (the GEMVs and MoE decode GEMVs all of
// them, the GEMMs every other one), except a few that ptxas keeps to fewer registers than they need
// (reported, at most 64 bytes each); the SASS of the GEMV shows the per-arch conversion (F2FP from
// e4m3 on sm_90a, none on sm_80). The FP8 tile rules, defaults, signatures and kernel lists.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <set>

#include "autotune/spaces.h"
#include "autotune/tiles_dense.h"
#include "autotune/tiles_moe.h"
#include "autotune/tiles_wgmma.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/gpu/attention.h"
#include "models/qwen35/gpu/moe.h"
#include "models/qwen35/gpu/tuned.h"
#include "models/qwen35/kernels.h"
#include "models/qwen35/quantized.h"
#include "runtime/core/weight_format.h"
#include "runtime/jit/jit_engine.h"
#include "tests/ptxas_checks.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
using q35::test::config_35b;
using q35::test::config_tiny;
using q35::test::contains;
using q35::test::error_of;
using q35::test::spec_arg;

namespace {

// An instantiation that reads FP8 weights.
bool is_fp8(const KernelSpec& s) {
  return s.family == "gemv_fp8" || s.family == "quantize_fp8" || spec_arg(s, "GROUP") == std::to_string(kFp8Group);
}

void add(std::vector<KernelSpec>& specs, const KernelSpec& s) {
  if (std::find(specs.begin(), specs.end(), s) == specs.end()) specs.push_back(s);
}

// The runner's FP8 kernels for `arch` (both configs, the heuristic default tiles).
std::vector<KernelSpec> required_fp8_specs(const std::string& arch) {
  std::vector<KernelSpec> specs;
  for (const Config& cfg : {config_tiny(), config_35b()})
    for (const KernelSpec& s : required_kernels(cfg, kFp8Group, arch))
      if (is_fp8(s)) add(specs, s);
  return specs;
}

// The FP8 tiles of the tuner's spaces at the 35B shapes: every gemv_fp8 candidate of the decode
// projections at M = 1 and 16, every MoE decode candidate, and every other candidate of the prefill
// GEMMs and grouped GEMMs.
std::vector<KernelSpec> candidate_fp8_specs(const std::string& arch) {
  std::vector<KernelSpec> specs;
  const bool wgmma = arch_has_wgmma(arch);
  const Config big = config_35b();
  for (const gpu::DenseShape& d : gpu::dense_shapes(big)) {
    const bool f32 = d.proj == gpu::DenseProj::LmHead;
    for (int64_t m : {1, 16})
      for (const W4GemvTile& t : tune::w4_gemv_candidates(d.n, d.k, kFp8Group, m)) add(specs, gemv_fp8_spec(d.n, d.k, t, f32));
    if (f32) continue;
    const std::vector<GemmTile> tiles = tune::gemm_candidates(d.n, d.k, 4096, wgmma, kFp8Group);
    for (size_t i = 0; i < tiles.size(); i += 2) add(specs, gpu::GemmPlan{d.n, d.k, tiles[i], false, kFp8Group}.spec());
  }
  const MoeShape ms = gpu::moe_shape(big, kFp8Group);
  for (const tune::MoeDecodeConfig& c : tune::moe_decode_candidates(ms)) {
    add(specs, moe_decode_gate_up_spec(ms, c.gate_up));
    add(specs, moe_decode_down_spec(ms, c.down));
    add(specs, moe_decode_down_residual_spec(ms, c.down));
  }
  const std::vector<MoeGemmTile> moe = tune::moe_gemm_candidates(ms, 4096, wgmma);
  for (size_t i = 0; i < moe.size(); i += 3)
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
      add(specs, moe_gemm_spec(ms, g, moe[i]));
  return specs;
}

}  // namespace

TEST_CASE("FP8 tile rules, defaults and signatures") {
  // Dense GEMM: the mma.sync kernel reads FP8 (its ring holds the codes, plus two bf16 B tiles).
  const GemmTile prefill = default_gemm_tile(12352, 2048, 4096);
  CHECK(why_invalid(prefill, 12352, 2048, kFp8Group).empty());
  CHECK(prefill.smem_bytes(kFp8Group) == 4 * (128 * 32 * 2 + 128 * 32) + 2 * 128 * 32 * 2);
  CHECK(contains(why_invalid(prefill, 12352, 2056, kFp8Group), "multiple of 16"));
  CHECK(contains(why_invalid(prefill, 12352, 2048, 128), "need a wgmma tile"));
  CHECK(spec_arg(gpu::GemmPlan{12352, 2048, prefill, false, kFp8Group}.spec(), "GROUP") == "-1");
  CHECK(spec_arg(gpu::gemm_plan(12352, 2048, 4096, false, false, 128).spec(), "GROUP") == "0");  // W4A16: dequantized first
  CHECK(gpu::gemm_plan(12352, 2048, 4096, false, false, kFp8Group).group == kFp8Group);
  CHECK(gpu::wgmma_gemm_group(kFp8Group, 512, 2048) == kFp8Group);  // wgmma: in the loop below 1024 rows,
  CHECK(gpu::wgmma_gemm_group(kFp8Group, 4096, 2048) == 0);         // dequantized first above
  CHECK(gpu::mma_gemm_group(kFp8Group) == kFp8Group);
  CHECK(gpu::mma_gemm_group(128) == 0);
  // GEMV: one scale per 128-k tile, so 16 tokens are 2 mma column tiles; K a multiple of 64.
  CHECK(why_invalid(W4GemvTile{16, 1, 4, 4}, 2048, 2048, kFp8Group).empty());
  CHECK(contains(why_invalid(W4GemvTile{16, 1, 4, 8}, 2048, 2048, kFp8Group), "column tiles = 8 * 2"));
  CHECK(contains(why_invalid(W4GemvTile{}, 2048, 2080, kFp8Group), "multiple of 64"));
  for (int m : {1, 2, 5, 16})
    for (auto [n, k] : {std::pair<int64_t, int64_t>{2048, 4096}, {12352, 2048}, {248320, 2048}, {128, 512}, {1544, 128}}) {
      const W4GemvTile t = default_w4_gemv_tile(n, k, kFp8Group, m);
      CHECK(why_invalid(t, n, k, kFp8Group).empty());
      CHECK(gemv_fp8_spec(n, k, t).kernel == "gemv_fp8");
    }
  CHECK(gpu::W4GemvPlan{2048, 4096, kFp8Group, default_w4_gemv_tile(2048, 4096, kFp8Group, 1), false, true}.spec().kernel ==
        "gemv_fp8_residual");
  CHECK(contains(error_of([] { gemv_w4a16_spec(2048, 2048, kFp8Group, W4GemvTile{}); }), "gemv_fp8"));
  // Quantizer: one warp per (row, 128-k block); dequantizer: a thread per 16 codes.
  CHECK(quantize_fp8_spec(2048, QuantizeTile{}).instantiation() == "quantize_fp8<2048, 8>");
  CHECK(gpu::quantize_plan(2048, kFp8Group).quantize_spec().kernel == "quantize_fp8");
  CHECK(gpu::quantize_plan(2048, kFp8Group).dequantize_spec().instantiation() == "dequantize_fp8<2048, 256>");
  CHECK(contains(why_invalid(QuantizeTile{}, 40, kFp8Group), "multiple of 16"));
  // wgmma: the raw ring holds 64 bytes per row and 64-k step; no persistent FP8 tile (its producer
  // spills); K a multiple of 64.
  WgmmaGemm w;
  w.group = kFp8Group, w.n = 1024, w.k = 2048, w.gate_up = w.routed = true, w.topk = 8;
  CHECK(why_invalid(w).empty());
  CHECK(wgmma_smem_bytes(w) == 1024 + 4 * (128 * 128 + 128 * 64) + 3 * 128 * 128);
  WgmmaGemm bad = w;
  bad.k = 2080;
  CHECK(contains(why_invalid(bad), "FP8: K = 2080"));
  bad = w, bad.ws = bad.persist = true, bad.bn = 256;
  CHECK(contains(why_invalid(bad), "persistent"));
  CHECK(contains(error_of([&] { wgmma_gemm_spec(bad); }), "gemm_wgmma [N = 1024, K = 2048, FP8]"));
  // No register-sourced (rs) form: gemm_wgmma_rs dequantizes INT4 nibbles in registers, so an FP8
  // matrix there would be read as INT4. The same tile at W4A16 g128 is valid.
  WgmmaGemm rs = w;
  rs.ws = rs.swap = rs.rs = true, rs.wgm = 1, rs.wgn = 2, rs.bm = 128, rs.bn = 128, rs.stages = 4;
  CHECK(contains(why_invalid(rs), "register-sourced weights (rs) are W4A16 only, not fp8"));
  rs.group = 128;
  CHECK(why_invalid(rs).empty());
  // MoE: FP8 experts; the grouped GEMMs' mma.sync B vectors hold 16 codes; from 3072 tokens on
  // sm_90a the warp-specialised tile (not the persistent one of W4A16).
  const MoeShape ms = gpu::moe_shape(config_35b(), kFp8Group);
  CHECK(why_invalid(ms).empty());
  // The expert-grouped decode GEMVs (WarpRows16): the W4A16 defaults; a warp's part of K starts on a
  // 128-k scale block (a multiple or a divisor of 128), at most kMoeDecodeMaxKPart values.
  CHECK(default_moe_gate_up_tile(ms).ksplit == 4);
  CHECK(default_moe_down_tile(ms).ksplit == 2);
  CHECK(contains(why_invalid_gate_up(MoeGemvTile{2}, ms), "H / ksplit = 1024 exceeds 512"));
  const MoeShape wide{3072, 16, 1, 3072, 3072, kFp8Group};
  CHECK(why_invalid(wide).empty());
  CHECK(contains(why_invalid_gate_up(MoeGemvTile{16}, wide),
                 "FP8: H / ksplit = 192 is neither a multiple nor a divisor of the 128-k scale block"));
  CHECK(why_invalid_gate_up(MoeGemvTile{8}, wide).empty());  // 384 = 3 blocks
  CHECK(contains(why_invalid(MoeDownTile{16}, wide), "FP8: I / ksplit = 192 is neither"));
  CHECK(contains(why_invalid(MoeDownTile{8}, wide), "FP8: max(I, Is) / ksplit = 384 exceeds 256"));
  CHECK(contains(why_invalid(MoeDownTile{1}, ms), "FP8: max(I, Is) / ksplit = 512 exceeds 256"));
  CHECK(why_invalid(MoeDownTile{1}, gpu::moe_shape(config_35b(), 128)).empty());  // W4A16: 512
  CHECK(why_invalid_gate_up(default_moe_gate_up_tile(wide), wide).empty());
  for (const Config& cfg : {config_tiny(), config_35b()}) {
    const MoeShape m = gpu::moe_shape(cfg, kFp8Group);
    CHECK(why_invalid_gate_up(default_moe_gate_up_tile(m), m).empty());
    CHECK(why_invalid(default_moe_down_tile(m), m).empty());
  }
  // Decode-step GEMVs: the M = 1 tile's K split at every T, 4 tokens per block (one mma column tile).
  for (auto [n, k] : {std::pair<int64_t, int64_t>{2048, 4096}, {12352, 2048}, {248320, 2048}, {128, 512}, {1544, 128}}) {
    const W4GemvTile one = default_w4_gemv_tile(n, k, kFp8Group, 1);
    for (int T : {1, 2, 9, 64}) {
      const W4GemvTile t = gpu::w4_decode_tile(one, kFp8Group, T);
      CHECK(t.m_tile == (T == 1 ? 1 : 4));
      CHECK((t.k_warps == one.k_warps && t.row_warps == one.row_warps && t.unroll == one.unroll));
      CHECK(why_invalid(t, n, k, kFp8Group).empty());
    }
  }
  CHECK(contains(error_of([] { gpu::w4_decode_tile(W4GemvTile{}, kFp8Group, 65); }), "gemv_fp8: a decode step of 65 rows"));
  CHECK(contains(why_invalid(MoeShape{2048, 256, 8, 544, 512, kFp8Group}), "FP8: I = 544 is not a multiple of 64"));
  CHECK(why_invalid(MoeGemmTile{64, 128, 16, 2, 2}, ms, MoeGemm::RoutedDown).empty());
  const MoeGemmTile big = default_moe_gemm_tile(ms, true, 4096);
  CHECK((big.wgmma && big.ws && !big.persist && big.block_n == 256));
  CHECK(default_moe_gemm_tile(gpu::moe_shape(config_35b(), 128), true, 4096).persist);
  // The tuner's space has register-sourced tiles at W4A16 only (a tune-cache entry with "rs" at an
  // FP8 signature is refused by the same rule, TunedTiles::moe).
  int rs_fp8 = 0, rs_w4 = 0;
  for (const MoeGemmTile& t : tune::moe_gemm_candidates(ms, 4096, true)) rs_fp8 += t.rs;
  for (const MoeGemmTile& t : tune::moe_gemm_candidates(gpu::moe_shape(config_35b(), 128), 4096, true)) rs_w4 += t.rs;
  CHECK(rs_fp8 == 0);
  CHECK(rs_w4 > 0);
  CHECK(contains(why_invalid(MoeGemmTile{128, 128, 64, 1, 2, 4, true, true, true, 1, false, true}, ms, MoeGemm::RoutedGateUp),
                 "W4A16 only, not fp8"));
  CHECK(contains(error_of([&] { moe_gemm_spec(ms, MoeGemm::RoutedDown, MoeGemmTile{64, 128, 24, 2, 2}); }),
                 "H = 2048, E = 256, k = 8, I = 512, Is = 512, FP8]"));
  // The tune cache keys name the format.
  CHECK(tune::dense_signature(9216, 2048, kFp8Group, false) == "N9216_K2048_FP8_bf16");
  CHECK(tune::moe_signature(ms) == "H2048_E256_K8_I512_IS512_FP8");
  CHECK(tune::families()[1] == tune::kGemvFp8);
  CHECK(tune::why_malformed(tune::kGemvFp8, nlohmann::json{{"row_warps", 1}, {"k_warps", 4}, {"unroll", 2}}).empty());
  CHECK(weight_format_name(kFp8Group) == "fp8");
  CHECK(weight_format_name(64) == "w4a16 g64");
}

TEST_CASE("the runner's FP8 kernel lists: GEMVs, in-loop GEMMs (wgmma on sm_90a), the quantizer; the dequantizer "
          "for the large-M wgmma GEMMs") {
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    CAPTURE(arch);
    std::set<std::string> kernels;
    int fp8_gemms = 0;
    for (const KernelSpec& s : required_kernels(config_35b(), kFp8Group, arch)) {
      kernels.insert(s.kernel);
      fp8_gemms += (s.kernel == "gemm_wgmma" || s.kernel == "gemm_bf16" || s.kernel == "moe_gemm") &&
                   spec_arg(s, "GROUP") == "-1";
      CHECK(s.kernel != "gemv_w4a16");
      CHECK(s.kernel != "dequantize_w4");
    }
    CHECK(kernels.count("dequantize_fp8") == (arch == "sm_90a" ? 1u : 0u));
    for (const char* k : {"gemv_fp8", "gemv_fp8_residual", "quantize_fp8", "moe_decode_gate_up", "moe_decode_down"})
      CHECK(kernels.count(k) == 1);
    CHECK(kernels.count("gemm_wgmma") == (arch == "sm_90a" ? 1u : 0u));
    CHECK(fp8_gemms >= 4 + 4);  // the four dense projections and the four MoE GEMMs
  }
}

TEST_CASE("the tuned kernels a run preloads exist in every format: the gated-norm out_proj GEMV for W4A16 only") {
  // A non-empty tune table makes the runner preload tuned_kernels (an FP8 run once asked it for the
  // W4A16-only gated-norm GEMV and failed at load).
  TuneFile f(TuneIdentity{"GPU X", "sm_90", "13.0", "q35jit test"});
  f.set(tune::kGemvW4, tune::dense_signature(9216, 2048, 128, false), 1,
        TuneEntry{nlohmann::json{{"row_warps", 1}, {"k_warps", 4}, {"unroll", 2}}, 4.0, 5.0});
  auto table = std::make_shared<const TuneTable>(std::vector<TuneTable::Layer>{{"test.json", f}});
  for (const Config& cfg : {config_tiny(), config_35b()})
    for (const std::string arch : {"sm_90a", "sm_80"})
      for (const int group : {0, default_group_size(cfg), kFp8Group}) {
        CAPTURE(cfg.hidden_size);
        CAPTURE(arch);
        CAPTURE(group);
        gpu::TunedTiles tt(cfg, group, arch, table, [](const std::string&) {});
        REQUIRE(tt.tuned());
        const gpu::AttentionPlan attn = gpu::attention_plan(cfg, smem_limit_for(arch), arch == "sm_90a");
        for (const int64_t m : {1, 2, 16, 64, 512}) {
          CAPTURE(m);
          std::vector<KernelSpec> specs;
          REQUIRE_NOTHROW(specs = gpu::tuned_kernels(cfg, tt, attn, group, m));
          int gated = 0;
          for (const KernelSpec& s : specs) gated += s.kernel == "gemv_w4a16_gated";
          CHECK(gated == (group > 0 && m == 1 ? 1 : 0));
        }
      }
}

TEST_CASE("every FP8 kernel compiles for sm_90a and sm_80 at the fixture and 35B shapes with no spills; the tuner's "
          "FP8 tiles too, but for a few small ones") {
  q35::test::TempDir cache("fp8-jit");
  JitEngine jit(cache.path(), JitOptions{.kernel_dir = std::nullopt, .extra_options = {"--ptxas-options=-v"}});
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    CAPTURE(arch);
    const std::vector<KernelSpec> required = required_fp8_specs(arch);
    std::vector<KernelSpec> specs = required;
    for (const KernelSpec& s : candidate_fp8_specs(arch)) add(specs, s);
    MESSAGE(arch << ": " << required.size() << " FP8 instantiations of the runner, " << specs.size() - required.size()
                 << " more of the tuner's spaces");
    CHECK(required.size() >= 20);
    const std::vector<CompiledKernel> out = jit.compile_all(specs, arch, 2);
    REQUIRE(out.size() == specs.size());
    std::string spilled;
    int spilled_count = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      const int bytes = q35::test::spill_bytes(out[i], specs[i].str());
      if (i < required.size()) {
        CAPTURE(specs[i].str());
        CHECK(bytes == 0);
        // The grouped gate_up holds a warp's weights in registers: at most 128 keep 4 blocks of 128
        // threads per SM (the 35B ksplit 4 tile took 245 on sm_90a before its conversions were
        // ordered, fp8.cuh).
        if (specs[i].kernel == "moe_decode_gate_up") CHECK(q35::test::registers(out[i]) <= 128);
      } else if (bytes != 0) {
        spilled += fmt::format("\n  {}: {} bytes", specs[i].str(), bytes);
        ++spilled_count;
        CHECK(bytes <= 64);
      }
    }
    if (!spilled.empty()) MESSAGE(arch << ", tuner tiles with spills (stack + stores + loads):" << spilled);
    CHECK(spilled_count * 50 <= int(specs.size() - required.size()));  // at most 2%
    // The e4m3 conversion per arch: sm_90a converts with F2FP (cvt e4m3x2 -> f16x2), sm_80 by bit
    // placement and an fp32 multiply (no F2FP from e4m3 exists there).
    for (size_t i = 0; i < specs.size(); ++i) {
      if (specs[i].kernel != "gemv_fp8") continue;
      const std::string sass = q35::test::sass_of(out[i], cache.path());
      CHECK(contains(sass, "HMMA"));
      CHECK_FALSE(contains(sass, "LDL"));
      CHECK(contains(sass, "F2FP.F16.E4M3") == (arch == "sm_90a"));
      break;
    }
  }
}
