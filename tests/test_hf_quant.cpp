// Official quantized checkpoints (models/qwen35/hf_quant.h): FP8 e4m3 with 128x128-style block
// scales and GPTQ-Int4, read exactly by the CPU reference, GPTQ mapped onto our INT4 layout
// bit-exactly, `q35jit quantize` from both, and one clear error per kind of damaged metadata.
// The checkpoints are built here from the formats' definitions (independent of the loader): random
// codes and scales, packed as GPTQ / FP8 store them, with the values they mean computed directly.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <fstream>
#include <random>

#include "models/qwen35/cpu_model.h"
#include "models/qwen35/hf_quant.h"
#include "models/qwen35/quantized.h"
#include "models/qwen35/weights.h"
#include "runtime/core/fp8_format.h"
#include "runtime/core/half.h"
#include "runtime/core/int4_format.h"
#include "runtime/io/json_file.h"
#include "runtime/io/safetensors.h"
#include "tests/quant_checkpoint.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
namespace fs = std::filesystem;
using q35::test::contains;
using q35::test::error_of;
using q35::test::Fp8Weight;
using q35::test::GptqWeight;
using q35::test::make_gptq;
using q35::test::write_f32_twin;
using q35::test::write_quantized;

namespace {

// A config whose every projection K is a multiple of 64 (so `q35jit quantize --group-size 32 / 64` apply).
Config config64() {
  Config c = test::tiny_config();
  c.hidden_size = 64;
  c.moe_intermediate_size = 64;
  c.shared_expert_intermediate_size = 64;
  return c;
}

void check_host_weights_equal(const HostWeights& w, const Config& c, const std::map<std::string, HostTensor>& values) {
  const std::string P = "model.language_model.";
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const MoeWeights& m = w.layers[size_t(i)].moe;
    const int64_t I = c.moe_intermediate_size, H = c.hidden_size;
    for (int64_t e = 0; e < c.num_experts; ++e) {
      const std::string X = fmt::format("{}layers.{}.mlp.experts.{}.", P, i, e);
      const std::vector<float>& gate = values.at(X + "gate_proj.weight").data;
      const std::vector<float>& down = values.at(X + "down_proj.weight").data;
      CHECK(std::equal(gate.begin(), gate.end(), m.experts_gate_up.data.begin() + e * 2 * I * H));
      CHECK(std::equal(down.begin(), down.end(), m.experts_down.data.begin() + e * H * I));
    }
    if (w.layers[size_t(i)].type == LayerType::LinearAttention) {
      const std::string A = fmt::format("{}layers.{}.linear_attn.", P, i);
      CHECK(w.layers[size_t(i)].linear.in_proj_qkv.data == values.at(A + "in_proj_qkv.weight").data);
      CHECK(w.layers[size_t(i)].linear.in_proj_a.data == values.at(A + "in_proj_a.weight").data);
    } else {
      CHECK(w.layers[size_t(i)].attn.o_proj.data ==
            values.at(fmt::format("{}layers.{}.self_attn.o_proj.weight", P, i)).data);
    }
  }
  CHECK(w.lm_head.data == values.at("lm_head.weight").data);
}

}  // namespace

TEST_CASE("fp8 e4m3fn decoding: every code against the definition") {
  for (int b = 0; b < 256; ++b) {
    CAPTURE(b);
    const float v = fp8_e4m3_to_f32(uint8_t(b));
    if ((b & 0x7f) == 0x7f) {
      CHECK(std::isnan(v));
      continue;
    }
    const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    const double want = (e == 0 ? m / 8.0 * std::pow(2.0, -6) : (1 + m / 8.0) * std::pow(2.0, e - 7)) * (s ? -1 : 1);
    CHECK(double(v) == want);
  }
  CHECK(fp8_e4m3_to_f32(0x7e) == 448.f);
  CHECK(fp8_e4m3_to_f32(0x38) == 1.f);
  CHECK(fp8_e4m3_to_f32(0x01) == std::ldexp(1.f, -9));
  CHECK(fp8_e4m3_to_f32(0xc0) == -2.f);
}

TEST_CASE("GPTQ -> our INT4 layout: codes bit-exact, scales transposed, zeros checked") {
  std::mt19937_64 rng(11);
  const int64_t N = 40, K = 256, G = 128;  // N not a multiple of 8: the last qzeros word is partial
  for (int offset : {1, 0}) {
    CAPTURE(offset);
    const GptqWeight g = make_gptq(N, K, G, offset, rng);
    const GptqInt4 m = gptq_repack(g.qweight, g.qzeros, g.scales, N, K, G, offset, "w");
    REQUIRE(m.qweight.size() == size_t(N * K / 8));
    int mismatches = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t word = m.qweight[size_t(n * (K / 8) + k / 8)];
        const int u = int((word >> (4 * int4::nibble_slot(int(k % 8)))) & 0xf);
        mismatches += u != g.codes[size_t(n * K + k)];
      }
    CHECK(mismatches == 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t gi = 0; gi < K / G; ++gi) CHECK(m.scales_f16[size_t(n * (K / G) + gi)] == g.scales[size_t(gi * N + n)]);
    // Dequantized through our INT4 reference with the fp16 scales: exactly the GPTQ values.
    CHECK(int4::dequantize(m.qweight, m.scales_f32(), N, K, G) == g.values);
  }
  // v1 stores zero - 1 = 7; a stored 8 read as v1 is zero 9, which a symmetric weight cannot have.
  const GptqWeight v2 = make_gptq(8, 16, 8, 0, rng);
  CHECK(error_of([&] { gptq_repack(v2.qweight, v2.qzeros, v2.scales, 8, 16, 8, 1, "layers.0.mlp.experts.3.up_proj"); }) ==
        "layers.0.mlp.experts.3.up_proj.qzeros: zero point 9 (stored 8) at group 0, column 0: a symmetric 4-bit GPTQ "
        "weight has zero point 8 (stored 7 with checkpoint_format \"gptq\", 8 with \"gptq_v2\")");
}

TEST_CASE("GPTQ fp16 scales -> bf16 for the GPU kernels: at most 2^-8 relative, exact when representable") {
  // Every finite positive fp16 value: bf16 rounding changes w = q * s by at most 2^-8 |w|.
  double worst = 0;
  int exact = 0, total = 0;
  for (uint32_t h = 1; h < 0x7c00; ++h) {
    GptqInt4 g{1, 8, 8, {0}, {uint16_t(h)}};
    const float s = f16_to_f32(uint16_t(h)), b = bf16_to_f32(g.scales_bf16()[0]);
    const double rel = std::fabs(double(b) - double(s)) / double(s);
    worst = std::max(worst, rel);
    ++total;
    exact += b == s;
    // Representable in bf16 (the low 16 bits of its fp32 pattern zero) <=> rounding leaves it unchanged.
    CHECK((b == s) == ((std::bit_cast<uint32_t>(s) & 0xffffu) == 0));
  }
  CHECK(worst <= std::ldexp(1.0, -8));
  CHECK(worst > std::ldexp(1.0, -9));  // the bound is attained up to a factor < 2
  CHECK(exact > 0);
  CHECK(exact < total);
}

TEST_CASE("quantization_config parsing: supported forms and one clear error per unsupported option") {
  test::TempDir dir("hfq-config");
  auto parse = [&](nlohmann::json qc) {
    test::write_json(dir / "config.json", {{"text_config", {{"quantization_config", nullptr}}}, {"quantization_config", qc}});
    return HfQuant::from_config(dir / "config.json");
  };
  const std::string file = (dir / "config.json").string();
  HfQuant fp8 = parse({{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"}, {"weight_block_size", {128, 128}},
                       {"modules_to_not_convert", {"lm_head"}}});
  CHECK(fp8.method == QuantMethod::FP8);
  CHECK(fp8.fp8_block_n == 128);
  CHECK(fp8.describe() == "fp8 e4m3, blocks 128x128");
  HfQuant gptq = parse({{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}, {"sym", true}, {"desc_act", false},
                        {"dynamic", {{"-:.*attn.*", nlohmann::json::object()}}}});
  CHECK(gptq.method == QuantMethod::GPTQ);
  CHECK(gptq.gptq_zero_offset == 1);
  CHECK(parse({{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}, {"checkpoint_format", "gptq_v2"}}).gptq_zero_offset == 0);
  CHECK(error_of([&] { parse({{"quant_method", "awq"}}); }) ==
        file + ": quantization_config.quant_method \"awq\" is not supported (supported: fp8, gptq)");
  CHECK(error_of([&] { parse({{"quant_method", "gptq"}, {"bits", 8}, {"group_size", 128}}); }) ==
        file + ": quantization_config.bits: expected 4 (GPTQ-Int4), found 8");
  CHECK(contains(error_of([&] { parse({{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}, {"sym", false}}); }),
                 "quantization_config.sym: asymmetric GPTQ is not supported"));
  CHECK(contains(error_of([&] { parse({{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}, {"desc_act", true}}); }),
                 "quantization_config.desc_act"));
  CHECK(contains(error_of([&] {
                   parse({{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}, {"dynamic", {{"+:.*down.*", {{"bits", 8}}}}}});
                 }),
                 "quantization_config.dynamic[\"+:.*down.*\"]: per-module overrides are not supported"));
  CHECK(contains(error_of([&] { parse({{"quant_method", "fp8"}, {"fmt", "e5m2"}, {"weight_block_size", {128, 128}}}); }),
                 "quantization_config.fmt: expected \"e4m3\", found \"e5m2\""));
  CHECK(contains(error_of([&] { parse({{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}, {"activation_scheme", "static"}}); }),
                 "quantization_config.activation_scheme: \"static\" is not supported"));
  CHECK(contains(error_of([&] { parse({{"quant_method", "fp8"}}); }), "quantization_config.weight_block_size: expected"));
  CHECK(contains(error_of([&] {
                   parse({{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}, {"weight_per_tensor", true}});
                 }),
                 "quantization_config.weight_per_tensor: per-tensor FP8 scales are not supported"));
  CHECK(parse({{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}, {"weight_per_tensor", false},
               {"act_per_tensor", false}})
            .method == QuantMethod::FP8);
}

TEST_CASE("GPTQ checkpoint: the CPU reference reads the experts exactly and the logits equal an fp32 twin") {
  const Config c = test::tiny_config();
  for (int offset : {1, 0}) {
    CAPTURE(offset);
    test::TempDir dir("hfq-gptq"), twin("hfq-gptq-twin");
    const auto values = write_quantized(dir.path(), c, QuantMethod::GPTQ, 8, offset);
    Checkpoint ckpt(dir.path());
    CHECK(detect_layout(ckpt).experts == ExpertLayout::PerExpert);
    validate_checkpoint(c, ckpt);
    const HostWeights w = load_host_weights(c, ckpt);
    check_host_weights_equal(w, c, values);

    write_f32_twin(twin.path(), c, values);
    Checkpoint twin_ckpt(twin.path());
    CpuModel a(c, load_host_weights(c, ckpt)), b(c, load_host_weights(c, twin_ckpt));
    CpuState sa = a.new_state(32), sb = b.new_state(32);
    const std::vector<int32_t> tokens = {3, 17, 42, 5, 77, 8, 1, 64};
    CHECK(a.forward(sa, tokens, true) == b.forward(sb, tokens, true));
  }
}

TEST_CASE("FP8 checkpoint: block-scaled weights dequantized exactly; bf16 modules as they are") {
  const Config c = test::tiny_config();
  test::TempDir dir("hfq-fp8"), twin("hfq-fp8-twin");
  const auto values = write_quantized(dir.path(), c, QuantMethod::FP8);
  Checkpoint ckpt(dir.path());
  CHECK(ckpt.get("model.language_model.layers.0.linear_attn.in_proj_qkv.weight").info->dtype == DType::F8_E4M3);
  CHECK(ckpt.get("model.language_model.layers.0.linear_attn.in_proj_a.weight").info->dtype == DType::BF16);
  const HostWeights w = load_host_weights(c, ckpt);
  check_host_weights_equal(w, c, values);
  write_f32_twin(twin.path(), c, values);
  Checkpoint twin_ckpt(twin.path());
  CpuModel a(c, load_host_weights(c, ckpt)), b(c, load_host_weights(c, twin_ckpt));
  CpuState sa = a.new_state(32), sb = b.new_state(32);
  const std::vector<int32_t> tokens = {9, 2, 33, 71, 4};
  CHECK(a.forward(sa, tokens, true) == b.forward(sb, tokens, true));
}

// The CPU reference of --quant fp8 (load_host_weights_fp8): what the GPU holds in FP8, blocks [1, 128].
TEST_CASE("load_host_weights_fp8: FP8 tensors exact, the other projections and lm_head rounded through FP8, the rest as stored") {
  const Config c = test::tiny_config();
  test::TempDir dir("hfq-fp8-host");
  const auto values = write_quantized(dir.path(), c, QuantMethod::FP8, 8, 1, 5, 128);
  Checkpoint ckpt(dir.path());
  const HostWeights plain = load_host_weights(c, ckpt), fp8w = load_host_weights_fp8(c, ckpt);
  const std::string P = "model.language_model.layers.0.linear_attn.";
  // in_proj_qkv is FP8 in the checkpoint: its exact values.
  REQUIRE(ckpt.get(P + "in_proj_qkv.weight").info->dtype == DType::F8_E4M3);
  CHECK(fp8w.layers[0].linear.in_proj_qkv.data == values.at(P + "in_proj_qkv.weight").data);
  // in_proj_a and lm_head are bf16 there: quantized with blocks [1, 128] as the GPU does, dequantized.
  auto round_trip = [](const HostTensor& t) {
    const int64_t K = t.shape.back(), rows = t.numel() / K;
    const fp8::Quantized q = fp8::quantize(t.data, rows, K, 1, 128);
    return fp8::dequantize(q.codes, q.scale_inv, rows, K, 1, 128);
  };
  CHECK(fp8w.layers[0].linear.in_proj_a.data == round_trip(plain.layers[0].linear.in_proj_a));
  CHECK(fp8w.lm_head.data == round_trip(plain.lm_head));
  CHECK(fp8w.lm_head.data != plain.lm_head.data);
  // Router, norms, conv, embeddings: as stored.
  CHECK(fp8w.layers[1].moe.router.data == plain.layers[1].moe.router.data);
  CHECK(fp8w.layers[0].linear.conv1d.data == plain.layers[0].linear.conv1d.data);
  CHECK(fp8w.embed_tokens.data == plain.embed_tokens.data);
  CHECK(fp8w.final_norm.data == plain.final_norm.data);
  // The reference runs them: logits near those of the stored weights, not equal.
  CpuModel a(c, HostWeights(plain)), b(c, HostWeights(fp8w));
  CpuState sa = a.new_state(32), sb = b.new_state(32);
  const std::vector<int32_t> tokens = {9, 2, 33, 71, 4};
  const std::vector<float> la = a.forward(sa, tokens, true), lb = b.forward(sb, tokens, true);
  double d = 0, n = 0;
  for (size_t i = 0; i < la.size(); ++i) d += double(la[i] - lb[i]) * (la[i] - lb[i]), n += double(la[i]) * la[i];
  CHECK(std::sqrt(d / n) > 1e-5);
  CHECK(std::sqrt(d / n) < 0.1);
}

TEST_CASE("damaged quantization metadata: one error naming the tensor") {
  const Config c = test::tiny_config();
  const std::string X = "model.language_model.layers.1.mlp.experts.2.down_proj";
  const std::string Q = "model.language_model.layers.0.linear_attn.out_proj";
  auto damaged = [&](QuantMethod method, auto edit) {
    test::TempDir dir("hfq-bad");
    write_quantized(dir.path(), c, method);
    test::rewrite_safetensors(dir / "model.safetensors", edit);
    return error_of([&] {
      Checkpoint ckpt(dir.path());
      load_host_weights(c, ckpt);
    });
  };
  auto drop = [](const std::string& name) {
    return [name](std::vector<TensorToWrite>& t) {
      std::erase_if(t, [&](const TensorToWrite& x) { return x.name == name; });
    };
  };
  auto reshape = [](const std::string& name, std::vector<int64_t> shape) {
    return [name, shape](std::vector<TensorToWrite>& t) {
      for (TensorToWrite& x : t)
        if (x.name == name) {
          x.shape = shape;
          x.bytes = x.bytes.subspan(0, size_t(shape[0] * shape[1]) * dtype_size(x.dtype));
        }
    };
  };
  std::string e = damaged(QuantMethod::GPTQ, drop(X + ".scales"));
  CHECK(contains(e, "tensor \"" + X + ".scales\" (GPTQ scales, group 8) [3, 32] not found"));
  e = damaged(QuantMethod::GPTQ, reshape(X + ".qzeros", {1, 4}));
  CHECK(contains(e, "tensor \"" + X + ".qzeros\" (GPTQ zeros, group 8): expected [3, 4] I32, found [1, 4] I32"));
  const std::vector<int32_t> g_idx(24, 0);  // act-order-like: every k in group 0
  e = damaged(QuantMethod::GPTQ, [&](std::vector<TensorToWrite>& t) {
    for (TensorToWrite& x : t)
      if (x.name == X + ".g_idx") x.bytes = {reinterpret_cast<const uint8_t*>(g_idx.data()), 24 * 4};
  });
  CHECK(contains(e, "tensor \"" + X + ".g_idx\""));
  CHECK(contains(e, "g_idx[8] = 0, expected 1 (act-order / desc_act GPTQ is not supported)"));
  e = damaged(QuantMethod::FP8, drop(Q + ".weight_scale_inv"));
  CHECK(contains(e, "tensor \"" + Q + ".weight_scale_inv\" (the fp32 block scales of " + Q +
                        ".weight, blocks 16x16) [2, 4] not found"));
  e = damaged(QuantMethod::FP8, reshape(Q + ".weight_scale_inv", {1, 4}));
  CHECK(contains(e, Q + ".weight_scale_inv"));
  CHECK(contains(e, "expected [2, 4] F32/F16/BF16, found [1, 4] F32"));

  // Quantized tensors without a quantization_config in config.json.
  test::TempDir dir("hfq-noconfig");
  write_quantized(dir.path(), c, QuantMethod::FP8);
  nlohmann::json cfg = read_json_file(dir / "config.json");
  cfg.erase("quantization_config");
  test::write_json(dir / "config.json", cfg);
  Checkpoint ckpt(dir.path());
  CHECK(contains(error_of([&] { validate_checkpoint(c, ckpt); }),
                 "is F8_E4M3, but " + (dir / "config.json").string() + " declares no fp8 quantization_config"));
  // An unknown quant_method.
  cfg["quantization_config"] = {{"quant_method", "bitsandbytes"}};
  test::write_json(dir / "config.json", cfg);
  CHECK(contains(error_of([&] { validate_checkpoint(c, ckpt); }),
                 "quantization_config.quant_method \"bitsandbytes\" is not supported"));
}

TEST_CASE("q35jit quantize from GPTQ keeps the experts exactly; from FP8 quantizes the dequantized weights") {
  const Config c = config64();
  test::TempDir dir("hfq-qgptq"), fp8("hfq-qfp8");
  const auto values = write_quantized(dir.path(), c, QuantMethod::GPTQ, 32);
  const fs::path out = dir.path() / "w4a16";
  CHECK(contains(error_of([&] { quantize_checkpoint(dir.path(), out, 64, 1); }),
                 "GPTQ group size 32 differs from --group-size 64"));
  const QuantizeReport r = quantize_checkpoint(dir.path(), out, 32, 2);
  CHECK(r.rel_error.at("experts.gate_proj (gptq, exact)") == 0.0);
  Checkpoint q(out);
  validate_quantized_checkpoint(c, q, 32);
  const std::string X = "model.language_model.layers.2.mlp.experts.1.up_proj.weight";
  CHECK(q.get(X + ".scales").info->dtype == DType::F16);
  CHECK_FALSE(read_json_file(out / "config.json").contains("quantization_config"));
  // The CPU reference reads the written file: the experts are the GPTQ values, bit for bit.
  const HostWeights w = load_host_weights(c, q);
  for (int64_t e = 0; e < c.num_experts; ++e) {
    const std::vector<float>& down = values.at(fmt::format("model.language_model.layers.3.mlp.experts.{}.down_proj.weight", e)).data;
    CHECK(std::equal(down.begin(), down.end(),
                     w.layers[3].moe.experts_down.data.begin() + e * c.hidden_size * c.moe_intermediate_size));
  }

  // FP8 -> W4A16: every projection equals our quantizer applied to the exact FP8 values rounded to
  // bf16 (what the GPU quantizes when it loads the FP8 checkpoint itself).
  const auto fvalues = write_quantized(fp8.path(), c, QuantMethod::FP8);
  quantize_checkpoint(fp8.path(), fp8.path() / "w4a16", 32, 1);
  Checkpoint f(fp8.path() / "w4a16");
  const std::string P = "model.language_model.layers.3.self_attn.q_proj.weight";
  const HostTensor& src = fvalues.at(P);
  std::vector<float> rounded = src.data;
  int changed = 0;
  for (float& v : rounded) {
    const float r = round_bf16(v);
    changed += r != v;
    v = r;
  }
  CHECK(changed > 0);  // fp8 x fp32 scale is not bf16 in general: the rounding matters
  const int4::Quantized want = int4::quantize(rounded, src.shape[0], src.shape[1], 32);
  const TensorRef qw = f.get(P + ".qweight");
  CHECK(std::memcmp(qw.bytes.data(), want.qweight.data(), qw.bytes.size()) == 0);
  CHECK(qw.bytes.size() == want.qweight.size() * 4);
}

TEST_CASE("q35jit eval --device cpu on FP8 and GPTQ checkpoints equals the reference model of their exact values") {
  const Config c = test::tiny_config();
  for (QuantMethod method : {QuantMethod::GPTQ, QuantMethod::FP8}) {
    CAPTURE(int(method));
    test::TempDir dir("hfq-eval"), twin("hfq-eval-twin");
    const auto values = write_quantized(dir.path(), c, method);
    write_f32_twin(twin.path(), c, values);
    const std::vector<int32_t> tokens = {5, 60, 7, 7, 21, 3, 44, 79, 0, 12};
    std::ofstream(dir / "tokens.txt") << "5 60 7 7 21\n3 44 79 0 12\n";
    Checkpoint twin_ckpt(twin.path());
    CpuModel ref(c, load_host_weights(c, twin_ckpt));
    CpuState state = ref.new_state(32);
    const std::vector<float> want = ref.forward(state, tokens, true);
    for (const char* mode : {"prefill", "decode"}) {
      CAPTURE(mode);
      const fs::path out = dir / (std::string(mode) + ".safetensors");
      const std::string cmd = std::string(Q35_BINARY_DIR) + "/q35jit eval --device cpu --model " + dir.path().string() +
                              " --tokens " + (dir / "tokens.txt").string() + " --out " + out.string() + " --mode " +
                              mode + " 2>" + (dir / "err.txt").string();
      REQUIRE(std::system(cmd.c_str()) == 0);
      SafetensorsFile f(out);
      const TensorInfo* info = f.find("logits");
      REQUIRE(info);
      CHECK(info->shape == std::vector<int64_t>{10, c.vocab_size});
      const std::vector<float> got = to_f32({info, f.data(*info), &f});
      double max_diff = 0, max_abs = 0;
      for (size_t i = 0; i < want.size(); ++i) {
        max_diff = std::max(max_diff, double(std::fabs(got[i] - want[i])));
        max_abs = std::max(max_abs, double(std::fabs(want[i])));
      }
      CHECK(max_diff / max_abs <= 1e-5);  // same fp32 weights; decode takes the recurrent path
    }
  }
}

namespace {

// Every tensor of a HostWeights, in a fixed order, with a name for messages.
std::vector<std::pair<std::string, const HostTensor*>> all_tensors(const HostWeights& w) {
  std::vector<std::pair<std::string, const HostTensor*>> out = {
      {"embed_tokens", &w.embed_tokens}, {"norm", &w.final_norm}, {"lm_head", &w.lm_head}};
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const LayerWeights& l = w.layers[i];
    auto add = [&](const char* what, const HostTensor& t) { out.push_back({fmt::format("layer {} {}", i, what), &t}); };
    add("input_layernorm", l.input_layernorm);
    add("post_attention_layernorm", l.post_attention_layernorm);
    for (const HostTensor* t : {&l.attn.q_proj, &l.attn.k_proj, &l.attn.v_proj, &l.attn.o_proj, &l.attn.q_norm,
                                &l.attn.k_norm, &l.linear.in_proj_qkv, &l.linear.in_proj_z, &l.linear.in_proj_b,
                                &l.linear.in_proj_a, &l.linear.conv1d, &l.linear.dt_bias, &l.linear.A_log,
                                &l.linear.norm, &l.linear.out_proj})
      add("mixer", *t);
    add("router", l.moe.router);
    add("experts.gate_up", l.moe.experts_gate_up);
    add("experts.down", l.moe.experts_down);
    add("shared.gate", l.moe.shared_gate);
    add("shared.up", l.moe.shared_up);
    add("shared.down", l.moe.shared_down);
    add("shared_expert_gate", l.moe.shared_expert_gate);
  }
  return out;
}

fs::path quant_fixtures() {
  const char* env = std::getenv("Q35_GOLDENS_DIR");
  return (env && *env ? fs::path(env) : fs::path(Q35_BINARY_DIR) / "goldens") / "quant";
}

}  // namespace

TEST_CASE("Python-made FP8 / GPTQ versions of the tiny fixture: exact weights, eval equals the fp32 reference") {
  for (const char* kind : {"tiny-fp8", "tiny-gptq"}) {
    CAPTURE(kind);
    const fs::path dir = quant_fixtures() / kind, ref = quant_fixtures() / (std::string(kind) + "-ref");
    REQUIRE_MESSAGE(fs::exists(dir / "model.safetensors"),
                    fmt::format("{} is missing: generate it with `make goldens`, or\n  python3 {}/tests/python/"
                                "make_quant_fixtures.py --out {}",
                                dir.string(), Q35_SOURCE_DIR, quant_fixtures().string()));
    const Config c = Config::from_file(dir / "config.json");
    Checkpoint q(dir), r(ref);
    CHECK(HfQuant::of(q).method == (std::string(kind) == "tiny-fp8" ? QuantMethod::FP8 : QuantMethod::GPTQ));
    const HostWeights wq = load_host_weights(c, q), wr = load_host_weights(c, r);
    const auto tq = all_tensors(wq), tr = all_tensors(wr);
    REQUIRE(tq.size() == tr.size());
    for (size_t i = 0; i < tq.size(); ++i) {
      CAPTURE(tq[i].first);
      CHECK(tq[i].second->data == tr[i].second->data);  // bit-exact: dequantized per the format's definition
    }
    // The command line on both: the same logits (the same fp32 weights through the same forward).
    test::TempDir tmp("hfq-py");
    std::ofstream(tmp / "tokens.txt") << "1480 100 200 300 400 500 600 700 800 900 1000 1100 1200 33 44 55\n";
    std::vector<std::vector<float>> logits;
    for (const fs::path& model : {dir, ref}) {
      const fs::path out = tmp / "logits.safetensors";
      const std::string cmd = std::string(Q35_BINARY_DIR) + "/q35jit eval --device cpu --model " + model.string() +
                              " --tokens " + (tmp / "tokens.txt").string() + " --out " + out.string();
      REQUIRE(std::system(cmd.c_str()) == 0);
      SafetensorsFile f(out);
      const TensorInfo* info = f.find("logits");
      REQUIRE(info);
      logits.push_back(to_f32({info, f.data(*info), &f}));
    }
    CHECK(logits[0] == logits[1]);
  }
}

TEST_CASE("fp8 format: nearest e4m3 code with ties to even, saturation, block quantize / dequantize") {
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7f) == 0x7f || b == 0x80) continue;  // NaN; -0 encodes as +0
    CAPTURE(b);
    CHECK(fp8::e4m3_from_f32(fp8_e4m3_to_f32(uint8_t(b))) == b);
  }
  CHECK(fp8::e4m3_from_f32(1.0625f) == 0x38);   // halfway between 1 (0x38, even) and 1.125 (0x39)
  CHECK(fp8::e4m3_from_f32(1.1875f) == 0x3a);   // halfway between 1.125 (0x39) and 1.25 (0x3a, even)
  CHECK(fp8::e4m3_from_f32(1.07f) == 0x39);
  CHECK(fp8::e4m3_from_f32(1000.f) == 0x7e);    // saturates at 448
  CHECK(fp8::e4m3_from_f32(-1000.f) == 0xfe);
  CHECK(fp8::e4m3_from_f32(std::ldexp(1.f, -11)) == 0x00);  // below half the smallest subnormal
  CHECK(fp8::e4m3_from_f32(-0.f) == 0x00);
  // A 3 x 5 weight in blocks of 2 x 2: scales amax / 448 per block; each value within half an e4m3
  // step of the original (relative 2^-4) after dequantization.
  const std::vector<float> w = {0.5f, -1.f, 2.f, 3.f, 0.f, 0.25f, 0.125f, -8.f, 1.f, 0.f, 7.f, 0.f, 0.f, 0.f, 0.f};
  const fp8::Quantized q = fp8::quantize(w, 3, 5, 2, 2);
  REQUIRE(q.scale_inv.size() == 6);
  CHECK(q.scale_inv[0] == 1.f / 448.f);
  CHECK(q.scale_inv[1] == 8.f / 448.f);
  CHECK(q.scale_inv[5] == 1.f);  // an all-zero block
  const std::vector<float> back = fp8::dequantize(q.codes, q.scale_inv, 3, 5, 2, 2);
  for (size_t i = 0; i < w.size(); ++i) CHECK(std::fabs(back[i] - w[i]) <= std::fabs(w[i]) * 0.0625f + 1e-9f);
  CHECK(back[7] == -8.f);  // the block's amax maps to 448 exactly
  CHECK(contains(error_of([&] { fp8::dequantize(q.codes, std::span(q.scale_inv).first(5), 3, 5, 2, 2); }),
                 "fp8: 5 block scales, expected [2, 3]"));
}

TEST_CASE("fp8 quantizer: the same codes and scales as the Python reference quantizer on the tiny fixture") {
  const fs::path dir = quant_fixtures() / "tiny-fp8";
  REQUIRE_MESSAGE(fs::exists(dir / "model.safetensors"), dir.string() << " is missing: run `make goldens`");
  Checkpoint py(dir), src(fs::path(Q35_SOURCE_DIR) / "tests/fixtures/tiny-qwen35moe");
  const Config c = Config::from_file(dir / "config.json");
  int compared = 0;
  for (const std::string& name : py.names()) {
    if (py.get(name).info->dtype != DType::F8_E4M3) continue;
    CAPTURE(name);
    // The bf16 source: a plain tensor, or an expert's slice of the fused tensors.
    std::vector<float> w;
    const size_t e_at = name.find(".mlp.experts.");
    if (e_at == std::string::npos) {
      w = to_f32(src.get(name));
    } else {
      const std::string L = name.substr(0, e_at) + ".mlp.experts.";
      const int64_t e = std::stoll(name.substr(L.size()));
      const int64_t H = c.hidden_size, I = c.moe_intermediate_size;
      const bool down = name.ends_with("down_proj.weight"), up = name.ends_with("up_proj.weight");
      const std::vector<float> fused = to_f32(src.get(L + (down ? "down_proj" : "gate_up_proj")));
      const size_t begin = size_t(down ? e * H * I : e * 2 * I * H + (up ? I * H : 0));
      w.assign(fused.begin() + std::ptrdiff_t(begin), fused.begin() + std::ptrdiff_t(begin + size_t(H * I)));
    }
    const std::vector<int64_t>& shape = py.get(name).info->shape;
    const fp8::Quantized q = fp8::quantize(w, shape[0], shape[1], 128, 128);
    const TensorRef codes = py.get(name);
    CHECK(std::equal(q.codes.begin(), q.codes.end(), codes.bytes.begin()));
    CHECK(q.scale_inv == to_f32(py.get(name.substr(0, name.size() - 7) + ".weight_scale_inv")));
    ++compared;
  }
  CHECK(compared > 50);
}
