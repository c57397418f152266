// Work per token and floors (models/qwen35/floors): the 35B-A3B figures of shared/perf.md, the
// tiny fixture's figures worked out by hand, the stored weight bytes against the tensor list of
// models/qwen35/weights, and the device-probe kernels compiled for sm_80 and sm_90a (no GPU).
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <string_view>

#include "autotune/device_probe.h"
#include "models/qwen35/floors.h"
#include "models/qwen35/memory.h"
#include "models/qwen35/quantized.h"
#include "models/qwen35/weights.h"
#include "runtime/core/weight_format.h"
#include "runtime/jit/jit_engine.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using qwen35::ModelWork;
using q35::test::config_35b;
using q35::test::config_tiny;
using q35::test::error_of;
using q35::test::contains;
using qwen35::check_fits;
using qwen35::Config;
using qwen35::gpu_memory_need;
using qwen35::MemoryNeed;

namespace {

int64_t params_of(const ModelWork& w, const std::string& name) {
  for (const qwen35::WeightPart& p : w.decode_parts())
    if (p.name == name) return p.params;
  FAIL("no part " << name);
  return 0;
}

int64_t bytes_of(const ModelWork& w, const std::string& name) {
  for (const qwen35::WeightPart& p : w.decode_parts())
    if (p.name == name) return p.bytes;
  FAIL("no part " << name);
  return 0;
}

// Stored bytes of every tensor the config implies (weights.h), in the runtime's format: tensors
// is_quantized_weight() names as int4 + bf16 scales per group, A_log and dt_bias fp32, the rest bf16.
int64_t bytes_from_tensor_list(const qwen35::Config& c, int group) {
  int64_t total = 0;
  for (const qwen35::TensorSpec& t : qwen35::expected_tensors(c, qwen35::CheckpointLayout{"model.", qwen35::ExpertLayout::Fused})) {
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    const int64_t K = t.shape.back(), rows = numel / K;
    if (group > 0 && qwen35::is_quantized_weight(t.name))
      total += rows * (K / 8 * 4 + K / group * 2);
    else if (t.name.ends_with("A_log") || t.name.ends_with("dt_bias"))
      total += numel * 4;
    else
      total += numel * 2;
  }
  return total;
}

}  // namespace

TEST_CASE("35B-A3B work per token matches shared/perf.md") {
  const ModelWork g32(config_35b(), 32), g128(config_35b(), 128), bf16(config_35b(), 0);
  // Active parameters per decoded token, by part (perf.md, millions).
  CHECK(params_of(g32, "routed experts") == 40LL * 8 * 3 * 512 * 2048);  // 1,006.6 M
  CHECK(params_of(g32, "routed experts") / 1e6 == doctest::Approx(1006.6).epsilon(0.001));
  CHECK(params_of(g32, "shared expert") / 1e6 == doctest::Approx(125.8).epsilon(0.002));  // + the gate vector
  CHECK(params_of(g32, "router") / 1e6 == doctest::Approx(21.0).epsilon(0.002));
  CHECK(params_of(g32, "GDN projections") / 1e6 == doctest::Approx(1010.2).epsilon(0.001));
  CHECK(params_of(g32, "attention projections") == 10LL * (9216 * 2048 + 2048 * 4096));  // 272.6 M
  CHECK(params_of(g32, "lm_head") == 248320LL * 2048);                                   // 508.6 M
  CHECK(g32.active_params() / 1e6 == doctest::Approx(2945).epsilon(0.001));
  CHECK(bf16.active_params() == g32.active_params());

  // Weight bytes: perf.md prices every active parameter at 0.5625 (g32) / 0.515625 (g128) B.
  CHECK(g32.active_params() * 0.5625 / 1e9 == doctest::Approx(1.66).epsilon(0.01));
  CHECK(g128.active_params() * 0.515625 / 1e9 == doctest::Approx(1.52).epsilon(0.01));
  // As stored here: the quantized parts at exactly that price; the router stays bf16.
  CHECK(bytes_of(g32, "routed experts") * 16 == params_of(g32, "routed experts") * 9);
  CHECK(bytes_of(g128, "lm_head") * 64 == params_of(g128, "lm_head") * 33);
  CHECK(bytes_of(g32, "router") == 2 * params_of(g32, "router"));
  CHECK(bytes_of(bf16, "GDN projections") == 2 * params_of(bf16, "GDN projections"));
  // Hence a little above perf.md: + router at bf16 (30 MB at g32) + norms / conv1d (2.3 MB).
  CHECK(g32.vector_bytes() == 2327552);
  CHECK(g32.weight_bytes_per_token() / 1e9 == doctest::Approx(1.6893).epsilon(0.001));
  CHECK(g128.weight_bytes_per_token() / 1e9 == doctest::Approx(1.5522).epsilon(0.001));
  CHECK(g32.weight_bytes_per_token() / 1.66e9 == doctest::Approx(1.0).epsilon(0.02));

  // State and cache: 2 x 62.9 MB fp32 DeltaNet state, 20 KiB of KV per token of context.
  CHECK(g32.gdn_state_bytes() == 30LL * 32 * 128 * 128 * 4);
  CHECK(g32.gdn_state_bytes() / 1e6 == doctest::Approx(62.9).epsilon(0.001));
  CHECK(g32.conv_state_bytes() == 30LL * 3 * 8192 * 2);
  CHECK(g32.kv_bytes_per_token() == 20 * 1024);
  CHECK(g32.decode_bytes(4096) - g32.decode_bytes(128) == (4096 - 128) * 20 * 1024);

  // Prefill: ~4.9 GFLOP per prompt token of projections and experts, 0.16 MFLOP x context of
  // attention, ~21 TFLOP for 4096 tokens (+0.65 TFLOP of chunked delta rule perf.md leaves out).
  CHECK(g32.projection_flops_per_token() / 1e9 == doctest::Approx(4.87).epsilon(0.002));
  CHECK(g32.attention_flops(4096) / (4096.0 * 4097 / 2) == doctest::Approx(163840));
  CHECK(g32.gdn_chunk_flops_per_token() / 1e6 == doctest::Approx(158.6).epsilon(0.001));
  const double no_gdn = g32.prefill_flops(4096) - 4096 * g32.gdn_chunk_flops_per_token();
  CHECK(no_gdn / 1e12 == doctest::Approx(21.34).epsilon(0.002));
  CHECK(g32.prefill_flops(4096) / 1e12 == doctest::Approx(21.99).epsilon(0.002));

  // Floors on the H100 figures of perf.md (3.0 TB/s copy, 776 TFLOP/s).
  CHECK(g128.decode_floor_ms(128, 3.0e12) == doctest::Approx(0.561).epsilon(0.002));
  CHECK(g32.decode_floor_ms(128, 3.0e12) == doctest::Approx(0.607).epsilon(0.002));
  CHECK(g32.prefill_floor_ms(4096, 776e12) == doctest::Approx(28.3).epsilon(0.003));
  // A 128-token prompt reads nearly every expert: bound by bytes, not FLOPs.
  CHECK(g32.expected_experts(128) == doctest::Approx(256 * (1 - std::pow(1 - 8.0 / 256, 128))));
  CHECK(g32.prefill_memory_ms(128, 3.0e12) > 5 * g32.prefill_compute_ms(128, 776e12));
  CHECK(g32.prefill_floor_ms(128, 776e12, 3.0e12) == g32.prefill_memory_ms(128, 3.0e12));
  CHECK(g32.prefill_floor_ms(4096, 776e12, 3.0e12) == g32.prefill_compute_ms(4096, 776e12));
}

TEST_CASE("tiny fixture: every figure worked out by hand") {
  // H 128, vocab 1536, layers L L L F, Hq 2 / Hkv 1 x D 256 (gated), GDN Hk 2 / Hv 4 x 128, conv 4,
  // 16 experts top-4 of I 64, shared expert 128.
  const ModelWork g64(config_tiny(), 64), bf16(config_tiny(), 0);
  CHECK(params_of(g64, "routed experts") == 4 * 4 * 3 * 64 * 128);
  CHECK(params_of(g64, "shared expert") == 4 * (3 * 128 * 128 + 128));
  CHECK(params_of(g64, "router") == 4 * 16 * 128);
  CHECK(params_of(g64, "GDN projections") == 3 * ((1024 + 512 + 8) * 128 + 128 * 512));
  CHECK(params_of(g64, "attention projections") == (1024 + 512) * 128 + 128 * 512);
  CHECK(params_of(g64, "lm_head") == 1536 * 128);
  CHECK(g64.active_params() == 1846784);
  int64_t sum = 0;
  for (const qwen35::WeightPart& p : g64.decode_parts()) sum += p.params;
  CHECK(sum == g64.active_params());

  // Norms 4 x 2 x 128, q/k norms 2 x 256, GDN conv 1024 x 4 + A_log, dt_bias (fp32) + norm 128,
  // final norm and one embedding row.
  CHECK(g64.vector_bytes() == 4 * 512 + 1024 + 3 * (8192 + 32 + 256) + 256 + 256);
  CHECK(bf16.weight_bytes_per_token() == 2 * 1846784 + 29024);
  // g64: 0.53125 B per quantized parameter; the router and the shared-expert gate vectors bf16.
  CHECK(g64.weight_bytes_per_token() == (1846784 - 8192 - 512) * 17 / 32 + 2 * (8192 + 512) + 29024);
  CHECK(g64.gdn_state_bytes() == 3 * 4 * 128 * 128 * 4);
  CHECK(g64.conv_state_bytes() == 3 * 3 * 1024 * 2);
  CHECK(g64.kv_bytes_per_token() == 2 * 256 * 2);
  CHECK(g64.decode_bytes(0) == g64.weight_bytes_per_token() + 2 * (786432 + 18432) + 2 * 1024);
  CHECK(g64.decode_bytes(100) - g64.decode_bytes(99) == 1024);
  CHECK(g64.decode_floor_ms(10, 1e12) == doctest::Approx(g64.decode_bytes(10) / 1e9));

  // FLOPs: 2 x (active - lm_head) per token, lm_head once, 4 x 2 x 256 x L(L+1)/2 attention,
  // chunked delta rule 3 x (2 x 4 C dk + 4 x (2 C dk + 4 C dv + 6 dk dv + C^2 / 3)).
  CHECK(g64.projection_flops_per_token() == 2.0 * (1846784 - 196608));
  CHECK(g64.gdn_chunk_flops_per_token() == doctest::Approx(1982464));
  for (int64_t L : {1, 64, 1000}) {
    CAPTURE(L);
    const double want = double(L) * (3300352 + 1982464) + 2.0 * 196608 + 1024.0 * double(L) * double(L + 1);
    CHECK(g64.prefill_flops(L) == doctest::Approx(want));
    CHECK(g64.prefill_floor_ms(L, 1e12) == doctest::Approx(want / 1e9));
  }
  CHECK(g64.prefill_flops(0) == 0);

  // Experts touched by a prompt: k for one token, all E for a long one.
  CHECK(g64.expected_experts(1) == doctest::Approx(4));
  CHECK(g64.expected_experts(1000) == doctest::Approx(16));
  CHECK(g64.prefill_weight_bytes(1) == doctest::Approx(double(g64.weight_bytes_per_token())));
  CHECK(g64.prefill_weight_bytes(1000) ==
        doctest::Approx(double(g64.model_weight_bytes() - 1536 * 128 * 2 + 1000 * 128 * 2)));

  // FP8: a byte per quantized weight and an fp32 scale per row and 128-k block (K = 64 and 128: one
  // block, K = 512: four): routed experts 4 x 4 x (128 x 132 + 128 x 68), shared expert 4 x (256 x 132
  // + 128 x 132 + 256), router 4 x 16 x 128 x 2, GDN 3 x (1544 x 132 + 128 x 528), attention
  // 1536 x 132 + 128 x 528, lm_head 1536 x 132.
  const ModelWork fp8(config_tiny(), kFp8Group);
  CHECK(fp8.weight_bytes_per_token() == 409600 + 203776 + 16384 + 814176 + 270336 + 202752 + 29024);

  CHECK(error_of([] { ModelWork(config_tiny(), -2); }).find("group size") != std::string::npos);
  CHECK(error_of([&] { g64.decode_floor_ms(1, 0); }).find("bandwidth") != std::string::npos);
}

TEST_CASE("stored weight bytes equal the tensor list priced in the runtime's formats") {
  for (const qwen35::Config& c : {config_tiny(), config_35b()}) {
    for (int group : {0, 32, 64}) {
      CAPTURE(c.hidden_size);
      CAPTURE(group);
      CHECK(ModelWork(c, group).model_weight_bytes() == bytes_from_tensor_list(c, group));
    }
  }
  // 35B-A3B at g128: the 18.66 GB of weights the GPU runs report (docs/perf-log.md).
  CHECK(ModelWork(config_35b(), 128).model_weight_bytes() / 1e9 == doctest::Approx(18.66).epsilon(0.002));
}

TEST_CASE("device probe kernels compile for sm_80 and sm_90a") {
  q35::test::TempDir dir("floors-jit");
  JitEngine jit(dir.path());
  const std::vector<KernelSpec> specs = probe_kernels();
  REQUIRE(specs.size() == 3);
  CHECK(probe_copy_spec().instantiation() == "probe_copy<256, 4>");
  CHECK(probe_mma_spec().instantiation() == "probe_mma<128, 8>");
  for (const std::string arch : {"sm_80", "sm_90a"}) {
    CAPTURE(arch);
    for (const KernelSpec& s : specs) {
      CAPTURE(s.str());
      const CompiledKernel k = jit.compile(s, arch);
      REQUIRE(k.cubin.size() > 64);
      CHECK(std::memcmp(k.cubin.data(), "\x7f" "ELF", 4) == 0);
      std::string_view image(reinterpret_cast<const char*>(k.cubin.data()), k.cubin.size());
      CHECK(image.find(k.lowered_name) != std::string_view::npos);
    }
  }
  CHECK(jit.stats().compiled == 6);
}

TEST_CASE("GPU memory need: 122B W4A16 fits one H200, 397B does not; the refusal names both figures") {
  const Config c122 = Config::preset("122b-a10b"), c397 = Config::preset("397b-a17b");
  const MemoryNeed m122 = gpu_memory_need(c122, 128, 32768, 2048, true);
  const MemoryNeed m397 = gpu_memory_need(c397, 128, 32768, 2048, true);
  // Weights: every parameter at 4 bits + a bf16 scale per 128, embeddings and small tensors bf16.
  CHECK(m122.weights == ModelWork(c122, 128).model_weight_bytes());
  CHECK(m122.weights > int64_t(60e9));
  CHECK(m122.weights < int64_t(70e9));
  CHECK(m397.weights > int64_t(200e9));
  CHECK(m397.weights < int64_t(215e9));
  CHECK(m122.total() < int64_t(139) * (int64_t(1) << 30));
  // K/V rows: 12 full-attention layers x K and V x 2 heads x 256 x bf16 per token.
  // DeltaNet: the fp32 state and the runtime's conv ring of Kc inputs per channel (bf16), 36 layers.
  CHECK(m122.state == int64_t(32768) * 12 * 2 * 2 * 256 * 2 + ModelWork(c122, 128).gdn_state_bytes() +
                          36 * c122.linear_conv_kernel_dim * c122.linear_conv_dim() * 2);
  CHECK(gpu_memory_need(c122, 128, 32768, 2048, false).staging == 0);
  CHECK(m122.staging == 2 * c122.num_experts * 2 * c122.moe_intermediate_size * c122.hidden_size);  // fused experts
  const size_t h200_free = size_t(139) << 30, h200_total = size_t(141) << 30;
  CHECK_NOTHROW(check_fits(m122, h200_free, h200_total, "NVIDIA H200", "122b"));
  const std::string e = error_of([&] { check_fits(m397, h200_free, h200_total, "NVIDIA H200", "397b-a17b (W4A16 g128)"); });
  INFO(e);
  CHECK(e.rfind("397b-a17b (W4A16 g128) needs 2", 0) == 0);
  CHECK(contains(e, "but NVIDIA H200 has 149.3 GB free of 151.4 GB: it does not fit on one GPU"));
  CHECK(e.find('\n') == std::string::npos);
}
