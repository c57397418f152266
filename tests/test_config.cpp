// config.json and generation_config.json parsing and consistency checks.
#include <doctest/doctest.h>

#include "models/qwen35/config.h"
#include "runtime/core/error.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
using q35::test::TempDir;
using q35::test::config_json;
using q35::test::write_json;
using nlohmann::json;
namespace fs = std::filesystem;

using q35::test::contains;
using q35::test::error_of;

namespace {

void check_equal(const Config& a, const Config& b) {
  CHECK(a.vocab_size == b.vocab_size);
  CHECK(a.hidden_size == b.hidden_size);
  CHECK(a.num_layers == b.num_layers);
  CHECK(a.layer_types == b.layer_types);
  CHECK(a.num_heads == b.num_heads);
  CHECK(a.num_kv_heads == b.num_kv_heads);
  CHECK(a.head_dim == b.head_dim);
  CHECK(a.rotary_dim == b.rotary_dim);
  CHECK(a.rope_theta == b.rope_theta);
  CHECK(a.attn_output_gate == b.attn_output_gate);
  CHECK(a.linear_num_key_heads == b.linear_num_key_heads);
  CHECK(a.linear_num_value_heads == b.linear_num_value_heads);
  CHECK(a.linear_key_head_dim == b.linear_key_head_dim);
  CHECK(a.linear_value_head_dim == b.linear_value_head_dim);
  CHECK(a.linear_conv_kernel_dim == b.linear_conv_kernel_dim);
  CHECK(a.num_experts == b.num_experts);
  CHECK(a.num_experts_per_tok == b.num_experts_per_tok);
  CHECK(a.moe_intermediate_size == b.moe_intermediate_size);
  CHECK(a.shared_expert_intermediate_size == b.shared_expert_intermediate_size);
  CHECK(a.rms_norm_eps == b.rms_norm_eps);
  CHECK(a.tie_word_embeddings == b.tie_word_embeddings);
  CHECK(a.max_position_embeddings == b.max_position_embeddings);
}

// The Qwen3.5-35B-A3B config.json as shipped (spec §1): multimodal wrapper, rope nested with
// partial_rotary_factor repeated flat, explicit layer_types, mtp keys the runtime ignores.
json real_35b_config() {
  json layer_types = json::array();
  for (int i = 0; i < 40; ++i) layer_types.push_back((i + 1) % 4 == 0 ? "full_attention" : "linear_attention");
  return {
      {"architectures", {"Qwen3_5MoeForConditionalGeneration"}},
      {"model_type", "qwen3_5_moe"},
      {"image_token_id", 248056},
      {"tie_word_embeddings", false},
      {"text_config",
       {{"model_type", "qwen3_5_moe_text"},
        {"vocab_size", 248320},
        {"hidden_size", 2048},
        {"num_hidden_layers", 40},
        {"layer_types", layer_types},
        {"full_attention_interval", 4},
        {"num_attention_heads", 16},
        {"num_key_value_heads", 2},
        {"head_dim", 256},
        {"attn_output_gate", true},
        {"attention_bias", false},
        {"partial_rotary_factor", 0.25},
        {"rope_parameters",
         {{"rope_type", "default"},
          {"rope_theta", 10000000},
          {"partial_rotary_factor", 0.25},
          {"mrope_section", {11, 11, 10}},
          {"mrope_interleaved", true}}},
        {"linear_num_key_heads", 16},
        {"linear_num_value_heads", 32},
        {"linear_key_head_dim", 128},
        {"linear_value_head_dim", 128},
        {"linear_conv_kernel_dim", 4},
        {"num_experts", 256},
        {"num_experts_per_tok", 8},
        {"moe_intermediate_size", 512},
        {"shared_expert_intermediate_size", 512},
        {"mlp_only_layers", json::array()},
        {"rms_norm_eps", 1e-6},
        {"hidden_act", "silu"},
        {"max_position_embeddings", 262144},
        {"mtp_num_hidden_layers", 1},
        {"mamba_ssm_dtype", "float32"},
        {"bos_token_id", 248044},
        {"eos_token_id", 248044}}},
      {"vision_config", {{"depth", 27}, {"hidden_size", 1152}}}};
}

}  // namespace

TEST_CASE("the 35B config: derived sizes and layer pattern") {
  TempDir dir("cfg-35b");
  write_json(dir / "config.json", real_35b_config());
  Config c = Config::from_file(dir / "config.json");
  CHECK(c.vocab_size == 248320);
  CHECK(c.hidden_size == 2048);
  CHECK(c.num_layers == 40);
  CHECK(c.head_dim == 256);
  CHECK(c.rotary_dim == 64);
  CHECK(c.rope_theta == 1e7);
  CHECK(c.num_layers_of(LayerType::FullAttention) == 10);
  CHECK(c.num_layers_of(LayerType::LinearAttention) == 30);
  CHECK(c.layer_types[3] == LayerType::FullAttention);
  CHECK(c.layer_types[39] == LayerType::FullAttention);
  CHECK(c.layer_types[4] == LayerType::LinearAttention);
  CHECK(c.q_proj_rows() == 8192);
  CHECK(c.kv_dim() == 512);
  CHECK(c.attn_out_dim() == 4096);
  CHECK(c.linear_key_dim() == 2048);
  CHECK(c.linear_value_dim() == 4096);
  CHECK(c.linear_conv_dim() == 8192);
  CHECK(c.num_experts == 256);
  CHECK(c.num_experts_per_tok == 8);
  CHECK(c.max_position_embeddings == 262144);
  CHECK(c.tie_word_embeddings == false);
}

TEST_CASE("config_json round trip: wrapped or text-only, rope nested or flat") {
  const Config want = test::tiny_config();
  for (bool wrapped : {true, false})
    for (bool nested : {true, false}) {
      CAPTURE(wrapped);
      CAPTURE(nested);
      TempDir dir("cfg-rt");
      write_json(dir / "config.json", config_json(want, wrapped, nested));
      check_equal(Config::from_file(dir / "config.json"), want);
    }
}

TEST_CASE("layer types derived from full_attention_interval; attn_output_gate defaults to true") {
  TempDir dir("cfg-interval");
  json j = config_json(test::tiny_config(), true);
  j["text_config"].erase("layer_types");
  j["text_config"].erase("attn_output_gate");
  j["text_config"]["num_hidden_layers"] = 7;
  j["text_config"]["full_attention_interval"] = 3;
  write_json(dir / "config.json", j);
  Config c = Config::from_file(dir / "config.json");
  using enum LayerType;
  CHECK(c.layer_types ==
        std::vector<LayerType>{LinearAttention, LinearAttention, FullAttention, LinearAttention, LinearAttention,
                               FullAttention, LinearAttention});
  CHECK(c.attn_output_gate == true);
  CHECK(c.q_proj_rows() == 4 * 16 * 2);

  j["text_config"]["attn_output_gate"] = false;
  write_json(dir / "config.json", j);
  c = Config::from_file(dir / "config.json");
  CHECK(c.attn_output_gate == false);
  CHECK(c.q_proj_rows() == 4 * 16);
}

TEST_CASE("rope keys: nested wins when equal to flat; missing partial factor defaults to 0.25") {
  TempDir dir("cfg-rope");
  json j = config_json(test::tiny_config(), true, true);
  j["text_config"]["rope_parameters"].erase("partial_rotary_factor");
  j["text_config"]["rope_parameters"]["rope_theta"] = 5e6;
  write_json(dir / "config.json", j);
  Config c = Config::from_file(dir / "config.json");
  CHECK(c.rotary_dim == 4);  // 16 * 0.25
  CHECK(c.rope_theta == 5e6);

  j["text_config"]["partial_rotary_factor"] = 0.5;
  write_json(dir / "config.json", j);
  CHECK(Config::from_file(dir / "config.json").rotary_dim == 8);
}

TEST_CASE("tie_word_embeddings: the top level of a multimodal config decides") {
  TempDir dir("cfg-tie");
  json j = config_json(test::tiny_config(), true);
  j["tie_word_embeddings"] = true;
  j["text_config"]["tie_word_embeddings"] = false;
  write_json(dir / "config.json", j);
  CHECK(Config::from_file(dir / "config.json").tie_word_embeddings == true);
  j.erase("tie_word_embeddings");
  j["text_config"]["tie_word_embeddings"] = true;
  write_json(dir / "config.json", j);
  CHECK(Config::from_file(dir / "config.json").tie_word_embeddings == true);
}

TEST_CASE("config errors name the file and the key") {
  TempDir dir("cfg-bad");
  const fs::path path = dir / "config.json";
  json j = config_json(test::tiny_config(), true);
  json& t = j["text_config"];
  auto expect = [&](std::initializer_list<std::string> parts) {
    write_json(path, j);
    std::string e = error_of([&] { Config::from_file(path); });
    INFO(e);
    CHECK(contains(e, path.string()));
    CHECK(!contains(e, "\n"));
    for (const std::string& p : parts) CHECK(contains(e, p));
  };

  SUBCASE("missing file") {
    std::string e = error_of([&] { Config::from_file(dir / "nope.json"); });
    CHECK(contains(e, "nope.json"));
    CHECK(contains(e, "cannot open"));
  }
  SUBCASE("malformed JSON") {
    std::ofstream(path) << "{\"text_config\": {\"hidden_size\": 32,}";
    std::string e = error_of([&] { Config::from_file(path); });
    CHECK(contains(e, path.string()));
    CHECK(contains(e, "malformed JSON"));
    CHECK(contains(e, "line 1"));
  }
  SUBCASE("missing key in text_config") {
    t.erase("hidden_size");
    expect({"missing key \"hidden_size\" in text_config"});
  }
  SUBCASE("missing key at the top level of a text-only config") {
    j = config_json(test::tiny_config(), false);
    j.erase("num_experts");
    expect({"missing key \"num_experts\" in the top level"});
  }
  SUBCASE("ill-typed key") {
    t["num_attention_heads"] = "four";
    expect({"\"num_attention_heads\"", "expected an integer", "string"});
  }
  SUBCASE("non-positive size") {
    t["moe_intermediate_size"] = 0;
    expect({"\"moe_intermediate_size\"", "positive"});
  }
  SUBCASE("text_config not an object") {
    j["text_config"] = 3;
    expect({"\"text_config\"", "expected an object"});
  }
  SUBCASE("missing rope_theta") {
    t["rope_parameters"].erase("rope_theta");
    expect({"missing key \"rope_theta\""});
  }
  SUBCASE("flat and nested rope keys disagree") {
    t["rope_theta"] = 1e6;
    expect({"\"rope_theta\"", "rope_parameters"});
  }
  SUBCASE("unsupported rope_type") {
    t["rope_parameters"]["rope_type"] = "yarn";
    expect({"\"rope_type\"", "\"yarn\""});
  }
  SUBCASE("odd rotary dim") {
    t["rope_parameters"]["partial_rotary_factor"] = 0.3125;  // 16 * 0.3125 = 5
    expect({"partial_rotary_factor", "even"});
  }
  SUBCASE("heads not a multiple of kv heads") {
    t["num_key_value_heads"] = 3;
    expect({"num_attention_heads 4", "num_key_value_heads 3"});
  }
  SUBCASE("linear value heads not a multiple of key heads") {
    t["linear_num_value_heads"] = 5;
    expect({"linear_num_value_heads 5", "linear_num_key_heads 2"});
  }
  SUBCASE("top-k above expert count") {
    t["num_experts_per_tok"] = 5;
    expect({"num_experts_per_tok 5", "num_experts 4"});
  }
  SUBCASE("layer_types length differs from num_hidden_layers") {
    t["num_hidden_layers"] = 5;
    expect({"layer_types has 4 entries", "num_hidden_layers = 5"});
  }
  SUBCASE("unknown layer type") {
    t["layer_types"][2] = "sliding_attention";
    expect({"layer_types[2]", "sliding_attention"});
  }
  SUBCASE("neither layer_types nor full_attention_interval") {
    t.erase("layer_types");
    expect({"missing key \"layer_types\"", "full_attention_interval"});
  }
  SUBCASE("attention bias") {
    t["attention_bias"] = true;
    expect({"\"attention_bias\""});
  }
  SUBCASE("dense layers") {
    t["mlp_only_layers"] = {1};
    expect({"\"mlp_only_layers\"", "[1]"});
  }
}

TEST_CASE("generation_config.json: missing file gives defaults; int or list eos; errors name the file") {
  TempDir dir("gen");
  const fs::path path = dir / "generation_config.json";

  GenerationConfig g = GenerationConfig::from_file(path);
  CHECK(g.eos_token_ids.empty());
  CHECK(!g.bos_token_id);
  CHECK(g.do_sample == false);
  CHECK(g.top_k == 0);
  CHECK(g.top_p == 1.0f);

  write_json(path, {{"bos_token_id", 248044},
                    {"eos_token_id", {248046, 248044}},
                    {"pad_token_id", 248044},
                    {"do_sample", true},
                    {"temperature", 0.6},
                    {"top_k", 20},
                    {"top_p", 0.95},
                    {"transformers_version", "4.57.0"}});
  g = GenerationConfig::from_file(path);
  CHECK(g.eos_token_ids == std::vector<int32_t>{248046, 248044});
  CHECK(g.bos_token_id == 248044);
  CHECK(g.pad_token_id == 248044);
  CHECK(g.do_sample == true);
  CHECK(g.temperature == 0.6f);
  CHECK(g.top_k == 20);
  CHECK(g.top_p == 0.95f);

  write_json(path, {{"eos_token_id", 7}, {"bos_token_id", nullptr}});
  g = GenerationConfig::from_file(path);
  CHECK(g.eos_token_ids == std::vector<int32_t>{7});
  CHECK(!g.bos_token_id);

  std::ofstream(path) << "{\"eos_token_id\": [1, 2";
  std::string e = error_of([&] { GenerationConfig::from_file(path); });
  CHECK(contains(e, path.string()));
  CHECK(contains(e, "malformed JSON"));

  write_json(path, {{"eos_token_id", "</s>"}});
  e = error_of([&] { GenerationConfig::from_file(path); });
  CHECK(contains(e, path.string()));
  CHECK(contains(e, "\"eos_token_id\""));

  write_json(path, {{"top_p", 0}});
  e = error_of([&] { GenerationConfig::from_file(path); });
  CHECK(contains(e, "top_p"));
}

TEST_CASE("presets: the three published sizes, read as their config.json would give them") {
  const Config a = Config::preset("122b-a10b"), b = Config::preset("397b-a17b");
  CHECK(a.hidden_size == 3072);
  CHECK(a.num_layers_of(LayerType::LinearAttention) == 36);
  CHECK(a.num_layers_of(LayerType::FullAttention) == 12);
  CHECK(a.num_heads == 32);
  CHECK(a.linear_num_value_heads / a.linear_num_key_heads == 4);
  CHECK(a.num_experts == 256);
  CHECK(a.num_experts_per_tok == 8);
  CHECK(a.moe_intermediate_size == 1024);
  CHECK(b.hidden_size == 4096);
  CHECK(b.num_layers_of(LayerType::LinearAttention) == 45);
  CHECK(b.num_layers_of(LayerType::FullAttention) == 15);
  CHECK(b.num_experts == 512);
  CHECK(b.num_experts_per_tok == 10);
  CHECK(b.shared_expert_intermediate_size == 1024);
  // Each preset equals its config.json parsed (the same keys a published checkpoint carries).
  for (const char* name : {"35b-a3b", "122b-a10b", "397b-a17b"}) {
    CAPTURE(name);
    TempDir dir("cfg-preset");
    const Config p = Config::preset(name);
    write_json(dir / "config.json", config_json(p, true));
    check_equal(Config::from_file(dir / "config.json"), p);
  }
  CHECK(error_of([] { Config::preset("1t"); }) == "unknown synthetic model '1t': known: 35b-a3b, 122b-a10b, 397b-a17b");
}

TEST_CASE("keys that change the math: the implemented value loads, any other is refused, unknown keys too") {
  TempDir dir("cfg-math");
  const fs::path path = dir / "config.json";
  auto load_with = [&](const std::string& key, const json& value) {
    json j = config_json(test::tiny_config(), true);
    j["text_config"][key] = value;
    write_json(path, j);
    return error_of([&] { Config::from_file(path); });
  };
  // Qwen3.5 / 3.6 checkpoints carry these with the values this runtime implements.
  CHECK(load_with("output_gate_type", "swish") == "");
  CHECK(load_with("mamba_ssm_dtype", "float32") == "");
  CHECK(load_with("mtp_num_hidden_layers", 1) == "");
  CHECK(load_with("norm_topk_prob", true) == "");
  CHECK(load_with("rope_scaling", nullptr) == "");
  std::string e = load_with("output_gate_type", "sigmoid");
  CHECK(e == path.string() + ": key \"output_gate_type\" in text_config: \"sigmoid\" is not implemented (supported: "
                             "[\"swish\",\"silu\"]; the DeltaNet output gate is silu(z) and the attention output gate "
                             "sigmoid)");
  CHECK(contains(load_with("mamba_ssm_dtype", "bfloat16"), "\"mamba_ssm_dtype\" in text_config: \"bfloat16\" is not implemented"));
  CHECK(contains(load_with("norm_topk_prob", false), "\"norm_topk_prob\""));
  CHECK(contains(load_with("use_sliding_window", true), "\"use_sliding_window\""));
  CHECK(contains(load_with("rope_scaling", json{{"rope_type", "yarn"}, {"factor", 4}}), "\"rope_scaling\""));
  CHECK(load_with("rope_scaling", json{{"type", "mrope"}, {"mrope_section", {1, 1, 0}}}) == "");
  CHECK(load_with("moe_router_temperature", 0.5) ==
        path.string() + ": key \"moe_router_temperature\" in text_config (= 0.5) is unknown to q35jit: it may change the "
                        "model's math, so it is refused rather than ignored");
}

TEST_CASE("a Qwen3.6-35B-A3B config.json (same architecture, its extra keys) loads as the 3.5 one does") {
  TempDir dir("cfg-36");
  json j = real_35b_config();
  json& t = j["text_config"];
  t["output_gate_type"] = "swish";
  t["mamba_ssm_dtype"] = "float32";
  t["mtp_num_hidden_layers"] = 1;
  t["mtp_use_dedicated_embeddings"] = false;
  t["attn_output_gate"] = true;
  j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {128, 128}}};
  write_json(dir / "config.json", j);
  write_json(dir / "c35.json", real_35b_config());
  check_equal(Config::from_file(dir / "config.json"), Config::from_file(dir / "c35.json"));
}
