// Gated DeltaNet kernels on the CPU (no GPU needed): every instantiation of gdn_kernels(cfg) for
// the tiny fixture and the 35B-A3B config compiles for sm_80 and sm_90a (the chunked kernels with
// no spills, NVRTC times reported); tile validity rules, defaults, state and workspace sizes.
// The kernels' math has its CPU references in models/qwen35/reference_ops (gdn_chunk_prepare,
// gdn_chunk_state, gdn_chunk_output, tested in test_reference_ops.cpp).
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <thread>

#include "autotune/tiles_gdn.h"
#include "models/qwen35/gpu/gdn.h"
#include "runtime/core/error.h"
#include "runtime/jit/jit_engine.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/ptxas_checks.h"
#include "tests/test_util.h"

using namespace q35;
using q35::test::TempDir;

using q35::test::config_35b;
using q35::test::config_tiny;
using q35::test::error_of;
inline std::string arg(const q35::KernelSpec& s, const std::string& n) { return q35::test::spec_arg(s, n); }

namespace {




}  // namespace

TEST_CASE("gdn_kernels lists the GDN instantiations of the default tiles, with the config's shapes") {
  const qwen35::Config big = config_35b();
  for (const char* arch : {"", "sm_80", "sm_90a"}) {
    CAPTURE(std::string(arch));
    const std::vector<KernelSpec> specs = qwen35::gpu::gdn_kernels(big, arch);
    std::vector<std::string> names;
    for (const KernelSpec& s : specs) names.push_back(s.instantiation());
    CHECK(names == std::vector<std::string>{"gdn_decode<16, 32, 128, 128, 4, 16, 4>",
                                            "gdn_decode_norm<16, 32, 128, 128, 4, 16, 4>", "gated_rmsnorm<32, 128, 4>",
                                            "gdn_prologue<16, 32, 128, 128, 4, 16, 4>",
                                            "gdn_chunk_prepare<16, 32, 128, 128>", "gdn_chunk_state<16, 32, 128, 128, 32>",
                                            "gdn_chunk_output<16, 32, 128, 128>",
                                            "gdn_recurrent<16, 32, 128, 128, 16, 4>"});
  }
  // The unfused pair, when asked for.
  CHECK(qwen35::gpu::gdn_chunk_state_spec(big, GdnChunkTile{32, false, false}).instantiation() ==
        "gdn_chunk_state<16, 32, 128, 128, 32>");
  CHECK(qwen35::gpu::gdn_chunk_output_spec(big).instantiation() == "gdn_chunk_output<16, 32, 128, 128>");
  CHECK(error_of([&] { qwen35::gpu::gdn_chunk_fused_spec(big, GdnChunkTile{32, false, false}, false); })
            .find("is not fused") != std::string::npos);
  // The tiny fixture: 2 key / 4 value heads of 128; 4 x 128 / 32 = 16 CTAs -> 16-column chunk tile.
  const std::vector<KernelSpec> tiny = qwen35::gpu::gdn_kernels(config_tiny(), "sm_90a");
  REQUIRE(tiny.size() == 8);
  CHECK(arg(tiny[0], "HK") == "2");
  CHECK(arg(tiny[0], "HV") == "4");
  CHECK(tiny[1].kernel == "gdn_decode_norm");
  CHECK(tiny[1].args == tiny[0].args);
  CHECK(tiny[5].kernel == "gdn_chunk_state");
  CHECK(arg(tiny[5], "VS") == "16");
  // The fused forms, by arch (the tuner's other choices).
  CHECK(qwen35::gpu::gdn_chunk_fused_spec(big, GdnChunkTile{32, true, true}, true).instantiation() ==
        "gdn_chunk_fused_cluster<16, 32, 128, 128, 32>");
  CHECK(qwen35::gpu::gdn_chunk_fused_spec(big, GdnChunkTile{32, true, true}, false).instantiation() ==
        "gdn_chunk_fused<16, 32, 128, 128, 32>");
  // No linear-attention layer, no GDN kernel.
  qwen35::Config full_only = big;
  full_only.layer_types.assign(4, qwen35::LayerType::FullAttention);
  CHECK(qwen35::gpu::gdn_kernels(full_only).empty());

  CHECK(qwen35::gpu::gdn_conv_state_bytes(big) == 4 * 8192 * 2);
  CHECK(qwen35::gpu::gdn_ssm_state_bytes(big) == 32 * 128 * 128 * 4);
  CHECK(qwen35::gpu::gdn_proj_columns(big) == 8192 + 4096 + 64);
  // T = 100: 2 chunks (128 padded rows); pieces in order, 256-byte aligned; h and o share bytes.
  const qwen35::gpu::GdnWorkspace ws = qwen35::gpu::gdn_workspace(big, 100, 0);
  CHECK(ws.g == 100 * 8192 * 2);
  CHECK(ws.u - ws.gam == 128 * 32 * 4);
  CHECK(ws.w - ws.u == 128 * 32 * 128 * 4);
  CHECK(ws.vn - ws.w == 128 * 32 * 2 * 128 * 2);
  CHECK(ws.h - ws.vn == 128 * 32 * 2 * 128 * 2);
  CHECK(ws.o == ws.h);
  CHECK(qwen35::gpu::gdn_workspace_bytes(big, 100) == ws.h + 2 * 32 * 2 * 128 * 128 * 2);  // h > o (100 x 4096 x 4)
  CHECK(qwen35::gpu::gdn_workspace_bytes(big, 1) == qwen35::gpu::gdn_workspace(big, 1, 0).h + 32 * 2 * 128 * 128 * 2);
}

TEST_CASE("GDN tile validity rules and defaults") {
  const GdnShape s{16, 32, 128, 128, 4};
  CHECK(why_unsupported(s).empty());
  CHECK(why_unsupported(GdnShape{16, 24, 128, 128, 4}).find("not a positive multiple of key heads 16") != std::string::npos);
  CHECK(why_unsupported(GdnShape{16, 32, 96, 128, 4}).find("key head dim 96") != std::string::npos);
  CHECK(why_invalid(GdnRecurrentTile{12, 8}, s).find("rows = 12 is not a positive multiple of warps = 8") != std::string::npos);
  CHECK(why_invalid(GdnRecurrentTile{48, 4}, s).find("does not divide dv = 128") != std::string::npos);
  CHECK(why_invalid(GdnRecurrentTile{128, 4}, s).find("128 state values per lane") != std::string::npos);
  CHECK(why_invalid(GdnRecurrentTile{64, 4}, s).empty());
  // gdn_decode's q / k conv: the 2 x 128 channels over the warps, whole lanes (8 warps at most).
  CHECK(why_invalid(GdnRecurrentTile{16, 8}, s).empty());
  CHECK(why_invalid(GdnRecurrentTile{16, 16}, s).find("warps = 16 does not divide 2 dk / 32 = 8") != std::string::npos);
  CHECK(why_invalid(GdnPrologueTile{2, 4}, s).find("tokens = 2") != std::string::npos);
  CHECK(why_invalid(GdnChunkTile{24}, s).find("vs = 24") != std::string::npos);
  CHECK(why_invalid(GdnChunkTile{64}, s).find("vs = 64 is not 16 or 32") != std::string::npos);  // old tune entries
  CHECK(why_invalid(GdnChunkTile{16}, s).empty());
  CHECK(why_invalid(GdnChunkTile{16, false, false}, s).empty());
  CHECK(why_invalid(GdnChunkTile{32, true, false}, s).empty());
  CHECK(why_invalid(GdnChunkTile{32, false, true}, s).find("cluster = true needs fused = true") != std::string::npos);
  const GdnShape wide{16, 32, 256, 128, 4};
  CHECK(why_invalid(GdnChunkTile{32, false, false}, wide)
            .find(fmt::format("gdn_chunk_state needs {} B",
                              gdn_chunk_state_smem_bytes(wide, GdnChunkTile{32, false, false}))) != std::string::npos);
  CHECK(why_invalid(GdnChunkTile{32}, wide)
            .find(fmt::format("gdn_chunk_fused needs {} B", gdn_chunk_fused_smem_bytes(wide, GdnChunkTile{32}, false))) !=
        std::string::npos);
  // dv 256 in 16-column slices: 16 CTAs per head, more than a portable cluster.
  CHECK(why_invalid(GdnChunkTile{16}, GdnShape{16, 32, 128, 256, 4}).find("16 CTAs per cluster") != std::string::npos);
  CHECK(why_invalid(GdnChunkTile{16, true, false}, GdnShape{16, 32, 128, 256, 4}).empty());
  // The fused pass: two stages of k bf16 [64, 136], U fp32 [64, vs + 4], gam; W hi, lo and q bf16
  // [3, 64, 136] once (portable) or twice (cluster); S hi, lo [2, 128, vs + 8]; Vn, dcy Vn hi, lo
  // [2, 64, vs + 8] each; QK hi, lo [2, 64, 72]; cluster: row sums [2, 2 dv / vs, 64] fp32.
  CHECK(gdn_chunk_fused_smem_bytes(s, GdnChunkTile{32}, false) ==
        2 * (64 * 136 * 2 + 64 * 36 * 4 + 64 * 4) + 3 * 64 * 136 * 2 + 2 * 128 * 40 * 2 + 2 * 2 * 64 * 40 * 2 +
            2 * 64 * 72 * 2);
  CHECK(gdn_chunk_fused_smem_bytes(s, GdnChunkTile{32}, false) == 165376);  // <= 163 KiB (sm_80)
  CHECK(gdn_chunk_fused_smem_bytes(s, GdnChunkTile{32}, true) == 165376 + 3 * 64 * 136 * 2 + 2 * 2 * 4 * 64 * 4);
  CHECK(gdn_chunk_fused_smem_bytes(s, GdnChunkTile{16}, true) ==
        2 * (64 * 136 * 2 + 64 * 20 * 4 + 64 * 4) + 2 * 3 * 64 * 136 * 2 + 2 * 128 * 24 * 2 + 2 * 2 * 64 * 24 * 2 +
            2 * 64 * 72 * 2 + 2 * 2 * 8 * 64 * 4);
  CHECK(gdn_arch_has_cluster("sm_90a"));
  CHECK(gdn_arch_has_cluster("sm_90"));
  CHECK(gdn_arch_has_cluster("sm_100a"));
  CHECK_FALSE(gdn_arch_has_cluster("sm_80"));
  CHECK_FALSE(gdn_arch_has_cluster("sm_89"));
  CHECK_FALSE(gdn_arch_has_cluster(""));
  CHECK(why_invalid(GatedRmsnormTile{3}, s).find("heads = 3") != std::string::npos);
  // Two stages of W hi, lo, k (bf16 [3, 64, 136]), U (fp32 [64, 36]), gam; S and dcy Vn hi, lo.
  CHECK(gdn_chunk_state_smem_bytes(s, GdnChunkTile{32}) ==
        2 * (3 * 64 * 136 * 2 + 64 * 36 * 4 + 64 * 4) + 2 * 128 * 40 * 2 + 2 * 64 * 40 * 2);
  CHECK(gdn_chunk_state_smem_bytes(s, GdnChunkTile{32}) == 154112);
  CHECK(gdn_chunk_prepare_smem_bytes(s) == (2 * 64 * 68 + 3 * 16 * 17 + 3 * 64) * 4 + (2 * 64 * 136 + 4 * 64 * 72) * 2);
  CHECK(gdn_chunk_output_smem_bytes(s) == 3 * 64 * 4 + (2 * 64 * 136 + 2 * 64 * 72 + 2 * 128 * 136 + 2 * 64 * 136) * 2);
  CHECK(default_gdn_chunk_tile(s).vs == 32);
  CHECK_FALSE(default_gdn_chunk_tile(s).fused);  // the state / output pair (measured faster on the H200)
  CHECK_FALSE(default_gdn_chunk_tile(s).cluster);
  CHECK(default_gdn_recurrent_tile(s).rows == 16);
  CHECK(error_of([] { default_gdn_recurrent_tile(GdnShape{2, 4, 64, 128, 4}); }).find("key head dim 64") != std::string::npos);
  qwen35::Config bad = config_35b();
  bad.linear_key_head_dim = 96;
  CHECK(error_of([&] { qwen35::gpu::gdn_kernels(bad); }).find("config.json: Gated DeltaNet shape not supported") !=
        std::string::npos);
}

TEST_CASE("every GDN kernel compiles for sm_80 and sm_90a, tiny fixture and 35B") {
  TempDir tmp("gdn-jit");
  JitOptions options;
  options.kernel_dir = std::filesystem::path(Q35_SOURCE_DIR) / "kernel_templates";
  JitEngine jit(tmp / "cache", options);
  const int threads = int(std::max(1u, std::thread::hardware_concurrency()));
  for (const char* arch : {"sm_80", "sm_90a"}) {
    CAPTURE(arch);
    std::vector<KernelSpec> specs = qwen35::gpu::gdn_kernels(config_35b(), arch);
    for (KernelSpec& s : qwen35::gpu::gdn_kernels(config_tiny(), arch)) specs.push_back(std::move(s));
    std::vector<CompiledKernel> out = jit.compile_all(specs, arch, threads);
    REQUIRE(out.size() == specs.size());
    for (const CompiledKernel& k : out) {
      CHECK(k.cubin.size() > 64);
      CHECK(!k.lowered_name.empty());
    }
  }
}

TEST_CASE("the chunked kernels compile without spills; NVRTC time of each (35B and tiny, sm_90a and sm_80)") {
  TempDir tmp("gdn-ptxas");
  JitOptions options;
  options.kernel_dir = std::filesystem::path(Q35_SOURCE_DIR) / "kernel_templates";
  options.extra_options = {"--ptxas-options=-v"};
  JitEngine jit(tmp / "cache", options);
  for (const char* arch : {"sm_90a", "sm_80"}) {
    const bool cluster = gdn_arch_has_cluster(arch);
    std::vector<KernelSpec> specs;
    for (const qwen35::Config& cfg : {config_35b(), config_tiny()}) {
      if (cfg.linear_num_value_heads == 32)  // the unfused kernels at the 35B shapes
        for (const KernelSpec& s : {qwen35::gpu::gdn_chunk_prepare_spec(cfg),
                                    qwen35::gpu::gdn_chunk_state_spec(cfg, GdnChunkTile{32, false, false}),
                                    qwen35::gpu::gdn_chunk_state_spec(cfg, GdnChunkTile{16, false, false}),
                                    qwen35::gpu::gdn_chunk_output_spec(cfg)})
          specs.push_back(s);
      for (int vs : {16, 32}) {  // the fused pass: the portable form everywhere, the cluster form on sm_90a
        specs.push_back(qwen35::gpu::gdn_chunk_fused_spec(cfg, GdnChunkTile{vs}, false));
        if (cluster) specs.push_back(qwen35::gpu::gdn_chunk_fused_spec(cfg, GdnChunkTile{vs}, true));
      }
    }
    for (const KernelSpec& spec : specs) {  // one at a time: each time is that kernel's own
      CAPTURE(std::string(arch));
      CAPTURE(spec.instantiation());
      std::vector<CompiledKernel> out = jit.compile_all({spec}, arch, 1);
      REQUIRE(out.size() == 1);
      const std::string& log = out[0].log;
      CHECK(log.find("Used ") != std::string::npos);
      CHECK(q35::test::spill_bytes(out[0], spec.instantiation()) == 0);
      const size_t used = log.find("Used ");
      MESSAGE(fmt::format("{} {}: NVRTC {:.0f} ms, {}", arch, spec.instantiation(), out[0].compile_ms,
                          used == std::string::npos ? std::string("?") : log.substr(used, log.find(',', used) - used)));
    }
  }
}
