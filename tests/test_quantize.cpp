// Quantized checkpoints (models/qwen35/quantized.h) on the tiny fixture.
#include <doctest/doctest.h>

#include <fstream>

#include "models/qwen35/quantized.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/core/int4_format.h"
#include "runtime/io/json_file.h"
#include "runtime/io/safetensors.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
namespace fs = std::filesystem;

using q35::test::error_of;

namespace {
const fs::path kModel = fs::path(Q35_SOURCE_DIR) / "tests/fixtures/tiny-qwen35moe";

}  // namespace

TEST_CASE("which tensors are quantized") {
  CHECK(is_quantized_weight("model.language_model.layers.3.self_attn.q_proj.weight"));
  CHECK(is_quantized_weight("model.language_model.layers.0.linear_attn.in_proj_b.weight"));
  CHECK(is_quantized_weight("model.language_model.layers.0.mlp.experts.gate_up_proj"));
  CHECK(is_quantized_weight("model.layers.0.mlp.experts.7.down_proj.weight"));
  CHECK(is_quantized_weight("model.layers.0.mlp.shared_expert.up_proj.weight"));
  CHECK(is_quantized_weight("lm_head.weight"));
  CHECK_FALSE(is_quantized_weight("model.layers.0.mlp.gate.weight"));
  CHECK_FALSE(is_quantized_weight("model.layers.0.mlp.shared_expert_gate.weight"));
  CHECK_FALSE(is_quantized_weight("model.layers.0.linear_attn.conv1d.weight"));
  CHECK_FALSE(is_quantized_weight("model.layers.3.self_attn.q_norm.weight"));
  CHECK_FALSE(is_quantized_weight("model.embed_tokens.weight"));
}

TEST_CASE("group sizes: the fixture's expert down_proj has K = 64") {
  const Config c = Config::from_file(kModel / "config.json");
  CHECK(default_group_size(c) == 64);
  CHECK_NOTHROW(check_group_size(c, 32));
  CHECK(error_of([&] { check_group_size(c, 128); }) ==
        "--group-size 128 does not divide K = 64 of experts.down_proj: use a group size that divides it");
  CHECK(error_of([&] { check_group_size(c, 48); }).find("must be 32, 64 or 128") != std::string::npos);
}

TEST_CASE("quantize the fixture: packed tensors equal the CPU quantizer, note in config, validation") {
  const Config c = Config::from_file(kModel / "config.json");
  test::TempDir out("quantize");
  const fs::path dst = out.path() / "q";
  QuantizeReport r = quantize_checkpoint(kModel, dst, 32, 2);
  CHECK(r.bytes_out < r.bytes_in / 2);
  REQUIRE(r.rel_error.count("experts.gate_up_proj"));
  for (const auto& [kind, e] : r.rel_error) {
    CAPTURE(kind);
    CHECK(e > 0.0);
    CHECK(e < 0.15);  // 4-bit symmetric: ~0.1 for Gaussian weights
  }
  auto note = read_quant_note(dst / "config.json");
  REQUIRE(note);
  CHECK(note->group_size == 32);
  CHECK(fs::exists(dst / "tokenizer.json"));
  CHECK(fs::exists(dst / "generation_config.json"));
  CHECK(Config::from_file(dst / "config.json").hidden_size == c.hidden_size);

  Checkpoint q(dst), orig(kModel);
  CHECK_NOTHROW(validate_quantized_checkpoint(c, q, 32));
  CHECK(error_of([&] { validate_quantized_checkpoint(c, q, 64); }).find(".scales: expected") != std::string::npos);
  CHECK_FALSE(q.has("model.visual.blocks.0.attn.qkv.weight"));

  const std::string name = "model.language_model.layers.3.self_attn.q_proj.weight";
  TensorRef w = orig.get(name);
  std::vector<float> f = to_f32(w);
  int4::Quantized want = int4::quantize(f, w.info->shape[0], w.info->shape[1], 32);
  TensorRef qw = q.get(name + ".qweight"), qs = q.get(name + ".scales");
  REQUIRE(qw.bytes.size() == want.qweight.size() * 4);
  CHECK(std::memcmp(qw.bytes.data(), want.qweight.data(), qw.bytes.size()) == 0);
  CHECK(std::memcmp(qs.bytes.data(), want.scales.data(), qs.bytes.size()) == 0);
  // Tensors that are not quantized are copied byte for byte.
  const std::string norm = "model.language_model.layers.0.input_layernorm.weight";
  TensorRef a = orig.get(norm), b = q.get(norm);
  CHECK(std::equal(a.bytes.begin(), a.bytes.end(), b.bytes.begin(), b.bytes.end()));

  // Quantizing a quantized checkpoint, or into a folder that has one, is refused.
  CHECK(error_of([&] { quantize_checkpoint(dst, out.path() / "qq", 32, 1); }).find("already quantized") !=
        std::string::npos);
  CHECK(error_of([&] { quantize_checkpoint(kModel, dst, 32, 1); }).find("already holds") != std::string::npos);
}

TEST_CASE("a note of another version or format is rejected with the fix") {
  test::TempDir d("quant-note");
  nlohmann::json cfg = read_json_file(kModel / "config.json");
  cfg["q35jit_quantization"] = {{"format", "w4a16"}, {"version", 2}, {"group_size", 32}};
  std::ofstream(d.path() / "config.json") << cfg.dump();
  CHECK(error_of([&] { read_quant_note(d.path() / "config.json"); }).find("quantize the original checkpoint again") !=
        std::string::npos);
  cfg["q35jit_quantization"] = {{"format", "gptq"}, {"version", 1}, {"group_size", 32}};
  std::ofstream(d.path() / "config.json") << cfg.dump();
  CHECK(error_of([&] { read_quant_note(d.path() / "config.json"); }).find("quantized as gptq") != std::string::npos);
  CHECK_FALSE(read_quant_note(kModel / "config.json"));
}
