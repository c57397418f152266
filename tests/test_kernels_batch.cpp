// The batched decode step's kernels on the CPU (no GPU; their GPU tests against the CPU reference
// are in tests/gpu/test_gpu_batch.cpp): qk_norm_rope_batch, attention_decode_batch (+ merge),
// gdn_decode_batch, the batched sampling kernels and step_advance_batch, every instantiation the
// runner uses at the tiny fixture's, the 35B and the 122B shapes (16 q heads per kv head: two decode
// blocks per kv head), and gdn_decode_batch at every tile of the tuner's gdn_recurrent space, compile
// for sm_90a and sm_80 with no register spills and no stack frame (ptxas -v); their SASS (cuobjdump,
// $Q35_CUOBJDUMP as make test sets it) has no local memory traffic, and the kernels launched with
// programmatic dependent launch wait for their predecessor on sm_90a.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <set>

#include "autotune/spaces.h"
#include "models/qwen35/gpu/attention.h"
#include "models/qwen35/gpu/gdn.h"
#include "models/qwen35/gpu/sampling.h"
#include "models/qwen35/kernels.h"
#include "runtime/jit/jit_engine.h"
#include "tests/ptxas_checks.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
using q35::test::config_35b;
using q35::test::config_tiny;

namespace {

std::vector<KernelSpec> batch_specs() {
  std::vector<KernelSpec> specs;
  auto add = [&](const KernelSpec& s) {
    if (std::find(specs.begin(), specs.end(), s) == specs.end()) specs.push_back(s);
  };
  for (const Config& cfg : {config_tiny(), config_35b(), Config::preset("122b-a10b")}) {
    for (const int64_t smem : {kAttentionSmemLimitSm80, kAttentionSmemLimitSm90}) {
      const gpu::AttentionPlan p = gpu::attention_plan(cfg, smem);
      add(p.qk_norm_rope_batch_spec());
      add(p.decode_batch_spec());
      add(p.decode_merge_batch_spec());
    }
    for (const GdnRecurrentTile& t : tune::gdn_recurrent_candidates(gpu::gdn_shape(cfg)))
      add(gpu::gdn_decode_batch_spec(cfg, t));
    add(gpu::gdn_decode_batch_spec(cfg, default_gdn_recurrent_tile(gpu::gdn_shape(cfg))));
    const gpu::BatchSamplePlan s = gpu::batch_sample_plan(cfg.vocab_size);
    add(s.sample_spec());
    add(s.topk.partial_batch_spec());
    add(s.topk.final_batch_spec());
  }
  add(KernelSpec{"step", "step_advance_batch", {}});
  return specs;
}

}  // namespace

TEST_CASE("the runner's kernel list holds the batched decode step's kernels") {
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    CAPTURE(arch);
    std::set<std::string> kernels;
    for (const KernelSpec& s : required_kernels(config_35b(), 128, arch)) kernels.insert(s.kernel);
    for (const char* k : {"qk_norm_rope_batch", "attention_decode_batch", "attention_decode_merge_batch",
                          "gdn_decode_batch", "sample_batch_f32", "topk_partial_batch", "topk_final_batch",
                          "step_advance_batch"})
      CHECK_MESSAGE(kernels.count(k) == 1, k);
  }
  // The batched forms keep the template arguments of the single-sequence kernels (the same tile).
  const gpu::AttentionPlan p = gpu::attention_plan(config_35b());
  CHECK(p.decode_batch_spec().args == p.decode_spec().args);
  CHECK(p.decode_batch_spec().kernel == "attention_decode_batch");
  const GdnRecurrentTile t = default_gdn_recurrent_tile(gpu::gdn_shape(config_35b()));
  CHECK(gpu::gdn_decode_batch_spec(config_35b(), t).args == gpu::gdn_decode_spec(config_35b(), t).args);
  // sample_batch_f32 runs sample_f32's block size, so a row draws what sample_f32 draws.
  CHECK(gpu::batch_sample_plan(config_35b().vocab_size).sample_spec().args.at(1) ==
        sample_spec(config_35b().vocab_size, default_sample_tile(config_35b().vocab_size)).args.at(1));
}

TEST_CASE("the batched decode kernels compile for sm_90a and sm_80 without spills") {
  q35::test::TempDir cache("batch-jit");
  JitEngine jit(cache.path(), JitOptions{.kernel_dir = std::nullopt, .extra_options = {"--ptxas-options=-v"}, .notice = {}});
  const std::vector<KernelSpec> specs = batch_specs();
  MESSAGE(specs.size() << " batched decode instantiations");
  CHECK(specs.size() >= 20);
  for (const std::string arch : {"sm_90a", "sm_80"}) {
    CAPTURE(arch);
    const std::vector<CompiledKernel> out = jit.compile_all(specs, arch, 2);
    REQUIRE(out.size() == specs.size());
    for (size_t i = 0; i < out.size(); ++i)
      CHECK_MESSAGE(q35::test::spill_bytes(out[i], specs[i].str()) == 0, specs[i].str() << "\n" << out[i].log);
    // SASS of one instantiation per kernel: no local memory; the kernels the runner launches with
    // programmatic dependent launch wait for their predecessor (griddepcontrol.wait = ACQBULK) on sm_90a.
    std::set<std::string> seen;
    for (size_t i = 0; i < out.size(); ++i) {
      if (!seen.insert(specs[i].kernel).second) continue;
      CAPTURE(specs[i].str());
      const std::string sass = q35::test::sass_of(out[i], cache.path());
      CHECK_FALSE(q35::test::contains(sass, "LDL"));
      CHECK_FALSE(q35::test::contains(sass, "STL"));
      const bool pdl = specs[i].kernel == "qk_norm_rope_batch" || specs[i].kernel == "attention_decode_batch" ||
                       specs[i].kernel == "attention_decode_merge_batch" || specs[i].kernel == "gdn_decode_batch";
      if (pdl) CHECK(q35::test::contains(sass, "ACQBULK") == (arch == "sm_90a"));
    }
    CHECK(seen.size() == 8);
  }
}

TEST_CASE("the batched attention decode scratch") {
  // The batched step runs every sequence with the single-sequence split count (gpu/attention.h), so
  // its scratch is B single-sequence scratches.
  const gpu::AttentionPlan p = gpu::attention_plan(config_35b());
  CHECK(gpu::attention_decode_batch_scratch_bytes(p, 8, 3) == 8 * gpu::attention_decode_scratch_bytes(p, 3));
  CHECK(gpu::attention_decode_splits(p, 32768, 132) * p.hkv * p.decode_qgroups() >= 2 * 132);
  CHECK(gpu::attention_decode_splits(p, 16, 132) == 1);  // a short cache: one split
}

