// The fused decode kernels on the CPU (no GPU; their GPU tests against the CPU reference are in
// tests/gpu/): gemv_w4a16_residual and moe_decode_down_residual (the residual add + RMSNorm epilogue of
// kernel_templates/decode_fusion.cuh), gdn_decode (prologue + recurrence in one launch) with
// gemv_w4a16_gated (the out_proj GEMV with the gated RMSNorm as its input), and gdn_decode_norm
// (the gated RMSNorm by each head's last block), every instantiation the runner and the tuner use at
// the tiny fixture's and the 35B shapes, compile for sm_90a and sm_80 with no register spills and no
// stack frame (ptxas -v). Their SASS (cuobjdump from PyPI's nvidia-cuda-cuobjdump, $Q35_CUOBJDUMP, set
// by `make test`) has no local memory traffic, the programmatic-dependent-launch instructions only on
// sm_90a, an atomic ticket only in the kernels with a last-block tail, and gdn_decode's loads of what
// no predecessor writes (state, conv ring and weights, gates' parameters) before its PDL wait.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cstdio>
#include <fstream>
#include <regex>
#include <set>

#include "autotune/spaces.h"
#include "autotune/tiles_dense.h"
#include "autotune/tiles_moe.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/gpu/gdn.h"
#include "models/qwen35/gpu/moe.h"
#include "models/qwen35/kernels.h"
#include "runtime/jit/jit_engine.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/ptxas_checks.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
using q35::test::config_35b;
using q35::test::config_tiny;
using q35::test::contains;

namespace {

// The fused decode instantiations the runner uses with the heuristic default tiles (M = 1, 2, 4, 8;
// the gated-input GEMV at M = 1) and with the shipped H200 tune cache's o_proj / out_proj tiles
// (row_warps 1, k_warps 16, unroll 2; G32 at M >= 8 unroll 1), every tile of the tuner's spaces for
// gdn_decode / gdn_decode_norm and the MoE down GEMV (`required`); and the other gemv_w4a16_residual
// and gemv_w4a16_gated (M = 1) tiles of the tuner's space (`candidates`: the runner takes the plain
// GEMV's tuned tile for both).
struct DecodeSpecs {
  std::vector<KernelSpec> required, candidates;
};
DecodeSpecs fused_decode_specs() {
  DecodeSpecs out;
  auto add = [](std::vector<KernelSpec>& v, const KernelSpec& s) {
    if (std::find(v.begin(), v.end(), s) == v.end()) v.push_back(s);
  };
  const std::pair<Config, std::vector<int>> configs[] = {{config_tiny(), {0, 32, 64}}, {config_35b(), {0, 32, 128}}};
  for (const auto& [cfg, groups] : configs) {
    for (const KernelSpec& s : gpu::gdn_kernels(cfg))
      if (s.kernel == "gdn_decode" || s.kernel == "gdn_decode_norm") add(out.required, s);
    for (const GdnRecurrentTile& t : tune::gdn_recurrent_candidates(gpu::gdn_shape(cfg))) {
      add(out.required, gpu::gdn_decode_spec(cfg, t));
      add(out.required, gpu::gdn_decode_norm_spec(cfg, t));
    }
    for (int group : groups) {
      const MoeShape ms = gpu::moe_shape(cfg, group);
      add(out.required, moe_decode_down_residual_spec(ms, default_moe_down_tile(ms)));
      for (const tune::MoeDecodeConfig& c : tune::moe_decode_candidates(ms))
        add(out.required, moe_decode_down_residual_spec(ms, c.down));
      if (group == 0) continue;  // the GEMV epilogue is W4A16 only (bf16 output projections run the norm kernel)
      for (const gpu::DenseShape& d : gpu::dense_shapes(cfg)) {
        if (d.proj != gpu::DenseProj::AttnOut && d.proj != gpu::DenseProj::GdnOut) continue;
        for (int m : {1, 2, 4, 8}) {
          add(out.required, gemv_w4a16_residual_spec(d.n, d.k, group, default_w4_gemv_tile(d.n, d.k, group, m)));
          const W4GemvTile h200{m, 1, 16, group == 32 && m >= 8 ? 1 : 2};
          if (why_invalid(h200, d.n, d.k, group).empty()) add(out.required, gemv_w4a16_residual_spec(d.n, d.k, group, h200));
          for (const W4GemvTile& t : tune::w4_gemv_candidates(d.n, d.k, group, m))
            add(out.candidates, gemv_w4a16_residual_spec(d.n, d.k, group, t));
        }
        if (d.proj != gpu::DenseProj::GdnOut) continue;
        const int64_t dv = cfg.linear_value_head_dim;
        for (const KernelSpec& s : gpu::dense_kernels(cfg, {group}))
          if (s.kernel == "gemv_w4a16_gated") add(out.required, s);
        const W4GemvTile h200{1, 1, 16, 2};
        if (why_invalid_gated(h200, d.n, d.k, group, dv).empty())
          add(out.required, gemv_w4a16_gated_spec(d.n, d.k, group, h200, dv));
        for (const W4GemvTile& t : tune::w4_gemv_candidates(d.n, d.k, group, 1))
          if (why_invalid_gated(t, d.n, d.k, group, dv).empty())
            add(out.candidates, gemv_w4a16_gated_spec(d.n, d.k, group, t, dv));
      }
    }
  }
  std::erase_if(out.candidates, [&](const KernelSpec& s) {
    return std::find(out.required.begin(), out.required.end(), s) != out.required.end();
  });
  return out;
}

int registers(const CompiledKernel& k) {
  static const std::regex re(R"(Used (\d+) registers)");
  std::smatch m;
  return std::regex_search(k.log, m, re) ? std::stoi(m[1]) : -1;
}


}  // namespace

TEST_CASE("the runner's kernel list holds the fused decode kernels") {
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    CAPTURE(arch);
    std::set<std::string> kernels;
    for (const KernelSpec& s : required_kernels(config_35b(), 128, arch)) kernels.insert(s.kernel);
    CHECK(kernels.count("gemv_w4a16_residual") == 1);
    CHECK(kernels.count("gemv_w4a16_gated") == 1);
    CHECK(kernels.count("moe_decode_down_residual") == 1);
    CHECK(kernels.count("gdn_decode") == 1);
    CHECK(kernels.count("gdn_decode_norm") == 1);
  }
  // A bf16 model: the MoE epilogue, no INT4 GEMV.
  std::set<std::string> bf16;
  for (const KernelSpec& s : required_kernels(config_35b(), 0, "sm_90a")) bf16.insert(s.kernel);
  CHECK(bf16.count("moe_decode_down_residual") == 1);
  CHECK(bf16.count("gemv_w4a16_residual") == 0);
  CHECK(bf16.count("gemv_w4a16_gated") == 0);
  CHECK(bf16.count("gdn_decode_norm") == 1);
  // The epilogue's spec names its own kernel, without the fp32-output switch of the plain GEMV.
  const KernelSpec r = gemv_w4a16_residual_spec(2048, 4096, 128, default_w4_gemv_tile(2048, 4096, 128, 1));
  CHECK(r.kernel == "gemv_w4a16_residual");
  CHECK(r.instantiation().find("true") == std::string::npos);
  CHECK(r.instantiation().find("false") == std::string::npos);
}

TEST_CASE("the fused decode kernels compile for sm_90a and sm_80 without spills; PDL only in the sm_90a SASS") {
  q35::test::TempDir cache("decode-jit");
  JitEngine jit(cache.path(), JitOptions{.kernel_dir = std::nullopt, .extra_options = {"--ptxas-options=-v"}});
  const DecodeSpecs specs = fused_decode_specs();
  MESSAGE(specs.required.size() << " fused decode instantiations the runner uses, " << specs.candidates.size()
                                << " more GEMV tiles of the tuner's space");
  CHECK(specs.required.size() >= 30);
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    CAPTURE(arch);
    const std::vector<CompiledKernel> out = jit.compile_all(specs.required, arch, 2);
    REQUIRE(out.size() == specs.required.size());
    std::string regs;
    for (size_t i = 0; i < out.size(); ++i) {
      CHECK_MESSAGE(q35::test::spill_bytes(out[i], specs.required[i].str()) == 0, specs.required[i].str());
      regs += fmt::format("\n  {}: {} registers", specs.required[i].instantiation(), registers(out[i]));
    }
    MESSAGE(arch << ":" << regs);
    // The tuner's other tiles: reported (a candidate that spills only times slower; the tuner keeps
    // the default unless a candidate is faster and gives the same output).
    const std::vector<CompiledKernel> cand = jit.compile_all(specs.candidates, arch, 2);
    REQUIRE(cand.size() == specs.candidates.size());
    std::string spilling;
    for (size_t i = 0; i < cand.size(); ++i)
      if (const int bytes = q35::test::spill_bytes(cand[i], specs.candidates[i].str()); bytes > 0)
        spilling += fmt::format("\n  {}: {} bytes", specs.candidates[i].instantiation(), bytes);
    MESSAGE(arch << ", tuner GEMV tiles with spills (stack + stores + loads):" << (spilling.empty() ? " none" : spilling));
    // SASS of one instantiation per kernel: no local memory; griddepcontrol (ACQBULK / wait, PREEXIT /
    // launch_dependents) only where the hardware has it; the last-block ticket (ATOMG) only in the
    // kernels with a tail (gdn_decode and the gated-input GEMV have none); the gated-input GEMV reads
    // its x from shared memory.
    std::set<std::string> seen;
    for (size_t i = 0; i < out.size(); ++i) {
      const std::string& kernel = specs.required[i].kernel;
      if (!seen.insert(kernel).second) continue;
      CAPTURE(specs.required[i].str());
      const std::string sass = q35::test::sass_of(out[i], cache.path());
      CHECK_FALSE(contains(sass, "LDL"));
      CHECK_FALSE(contains(sass, "STL"));
      CHECK(contains(sass, "ATOMG") == (kernel != "gdn_decode" && kernel != "gemv_w4a16_gated"));
      CHECK(contains(sass, "ACQBULK") == (arch == "sm_90a"));
      CHECK(contains(sass, "PREEXIT") == (arch == "sm_90a"));
      if (kernel == "gemv_w4a16_gated") CHECK(contains(sass, "LDS.128"));
      if (kernel == "gdn_decode" && arch == "sm_90a") {
        // Global loads before / after griddepcontrol.wait (default tile: 4 warps of 4 rows): before, the
        // 4 state float4s, the lane's 2 q | k channels' conv weights (16 B) and ring slots (4 x 4 B), its
        // v channel's weights (8 B) and ring slots (4 x 2 B), A_log and dt_bias; after, only the
        // position, the q | k and v inputs and the two gates (the kernel before this branch: 4 before,
        // ~90 scalar loads after).
        const size_t wait = sass.find("ACQBULK");
        REQUIRE(wait != std::string::npos);
        auto loads = [&](size_t from, size_t to) {
          int n = 0;
          for (size_t at = sass.find("LDG", from); at < to; at = sass.find("LDG", at + 3)) ++n;
          return n;
        };
        const int before = loads(0, wait), after = loads(wait, sass.size());
        MESSAGE("gdn_decode SASS: " << before << " global loads before the PDL wait, " << after << " after");
        CHECK(before >= 16);
        CHECK(after <= 5);
      }
    }
    CHECK(seen.size() == 5);
  }
}
