// GPU: official FP8 and GPTQ-Int4 checkpoints (models/qwen35/hf_quant.h) loaded directly. With
// --quant w4a16 the GPTQ experts are mapped onto our INT4 layout (codes exact, fp16 scales rounded
// to bf16) and FP8 weights are dequantized and quantized on load; a `q35jit quantize` checkpoint
// of the same source (GPTQ codes and fp16 scales kept, FP8 quantized on the CPU from the same bf16
// values) must give bit-identical logits. Deltas against the fp32 CPU reference of the exact values
// are reported.
#include <doctest/doctest.h>

#include <cmath>

#include "models/qwen35/cpu_model.h"
#include "models/qwen35/gpu_model.h"
#include "models/qwen35/hf_quant.h"
#include "models/qwen35/quantized.h"
#include "models/qwen35/weights.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/quant_checkpoint.h"

using namespace q35;
using namespace q35::gpu_test;
using namespace q35::qwen35;

TEST_CASE("GPU model: FP8 and GPTQ checkpoints at W4A16 equal their `q35jit quantize` checkpoints bit for bit") {
  auto g = open_gpu();
  const Config c = q35::test::config_tiny();  // GPU-sized heads; experts K = 64, so GPTQ group 32
  const std::vector<int32_t> tokens = {1480, 17, 900, 33, 512, 77, 1203, 5, 64, 300, 11, 999};
  for (QuantMethod method : {QuantMethod::GPTQ, QuantMethod::FP8}) {
    CAPTURE(int(method));
    q35::test::TempDir dir("gpu-hfq");
    const auto values = q35::test::write_quantized(dir.path(), c, method, 32, 1, 7, 128);
    Checkpoint ckpt(dir.path());
    validate_checkpoint(c, ckpt);
    GpuModelOptions o;
    o.format = WeightFormat::W4A16;
    o.group = 32;
    o.max_context = 64;
    o.max_chunk = 64;
    GpuModel model(g->driver, g->ctx, g->jit, c, ckpt, o);
    const std::vector<float> logits = model.forward(tokens, true);
    for (float x : logits) REQUIRE(std::isfinite(x));

    quantize_checkpoint(dir.path(), dir.path() / "q", 32, 4);
    Checkpoint qckpt(dir.path() / "q");
    validate_quantized_checkpoint(c, qckpt, 32);
    GpuModelOptions qo = o;
    qo.prequantized = true;
    GpuModel qmodel(g->driver, g->ctx, g->jit, c, qckpt, qo);
    CHECK(qmodel.forward(tokens, true) == logits);

    // Against the CPU reference of the exact values (reported: W4A16 of the non-GPTQ weights).
    q35::test::TempDir twin("gpu-hfq-twin");
    q35::test::write_f32_twin(twin.path(), c, values);
    Checkpoint tckpt(twin.path());
    CpuModel ref(c, load_host_weights(c, tckpt));
    CpuState st = ref.new_state(64);
    const std::vector<float> want = ref.forward(st, tokens, true);
    MESSAGE((method == QuantMethod::GPTQ ? "gptq" : "fp8")
            << " w4a16 on the GPU vs the fp32 CPU reference: ||d||/||ref|| = " << rel_l2(logits, want));

    // bf16 on the GPU: the dequantized weights rounded to bf16.
    GpuModelOptions bo = o;
    bo.format = WeightFormat::BF16;
    bo.group = 0;
    GpuModel bmodel(g->driver, g->ctx, g->jit, c, ckpt, bo);
    const std::vector<float> blogits = bmodel.forward(tokens, true);
    MESSAGE((method == QuantMethod::GPTQ ? "gptq" : "fp8")
            << " bf16 on the GPU vs the fp32 CPU reference: ||d||/||ref|| = " << rel_l2(blogits, want));
    for (float x : blogits) REQUIRE(std::isfinite(x));
  }
}

// --quant fp8 on an FP8 checkpoint (128 x 128 blocks, as the official ones): its FP8 tensors keep
// their codes and scales (test_gpu_fp8.cpp checks the bytes), the bf16 ones (lm_head, in_proj_a/b)
// are quantized on load; the CPU reference runs the same values (load_host_weights_fp8).
TEST_CASE("GPU model: an FP8 checkpoint at --quant fp8 against the CPU reference on the same FP8 weights") {
  auto g = open_gpu();
  const Config c = q35::test::config_tiny();
  const std::vector<int32_t> tokens = {1480, 17, 900, 33, 512, 77, 1203, 5, 64, 300, 11, 999};
  q35::test::TempDir dir("gpu-hfq-fp8");
  q35::test::write_quantized(dir.path(), c, QuantMethod::FP8, 32, 1, 9, 128);
  Checkpoint ckpt(dir.path());
  validate_checkpoint(c, ckpt);
  GpuModelOptions o;
  o.format = WeightFormat::FP8;
  o.max_context = 64;
  o.max_chunk = 64;
  GpuModel model(g->driver, g->ctx, g->jit, c, ckpt, o);
  const std::vector<float> logits = model.forward(tokens, true);
  CpuModel ref(c, load_host_weights_fp8(c, ckpt));
  CpuState st = ref.new_state(64);
  const std::vector<float> want = ref.forward(st, tokens, true);
  const double rel = rel_l2(logits, want);
  MESSAGE("fp8 checkpoint, --quant fp8 on the GPU vs the CPU reference: ||d||/||ref|| = " << rel);
  CHECK(rel <= 2e-2);
}
