// Checkpoint folders (single file or index + shards), the Qwen3.5 weight map, validation of a
// checkpoint against its config, and loading into host fp32, on synthetic checkpoints written by
// tests/synthetic_checkpoint.h and on the transformers-made fixture tests/fixtures/tiny-qwen35moe.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "models/qwen35/config.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/io/json_file.h"
#include "runtime/io/safetensors.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
using q35::test::SyntheticOptions;
using q35::test::TempDir;
using q35::test::tiny_config;
using q35::test::write_synthetic_checkpoint;
namespace fs = std::filesystem;

using q35::test::contains;
using q35::test::error_of;

namespace {

const char* kShard1 = "model-00001-of-00003.safetensors";
const char* kShard2 = "model-00002-of-00003.safetensors";
const char* kIndex = "model.safetensors.index.json";

void check_tensor(const HostTensor& got, const HostTensor& want) {
  CHECK(got.shape == want.shape);
  REQUIRE(got.data.size() == want.data.size());
  CHECK(std::memcmp(got.data.data(), want.data.data(), got.data.size() * sizeof(float)) == 0);
}

}  // namespace

TEST_CASE("expected_tensors names and shapes for the tiny config") {
  const Config c = tiny_config();
  std::vector<TensorSpec> specs =
      expected_tensors(c, CheckpointLayout{"model.language_model.", ExpertLayout::Fused});
  // Per layer: 2 norms + 5 MoE (router, 2 fused experts, shared gate/up/down, shared gate) + mixer
  // (9 GDN or 6 attention); plus embed, final norm, lm_head: 3*(2+9+7) + (2+6+7) + 3 = 72
  // (the same formula gives spec §3's 693 for the 35B model).
  CHECK(specs.size() == 72);
  std::map<std::string, std::vector<int64_t>> shape;
  for (const TensorSpec& s : specs) shape[s.name] = s.shape;
  CHECK(shape.size() == specs.size());
  using V = std::vector<int64_t>;
  const std::string L0 = "model.language_model.layers.0.", L3 = "model.language_model.layers.3.";
  CHECK(shape.at("model.language_model.embed_tokens.weight") == V{80, 32});
  CHECK(shape.at("model.language_model.norm.weight") == V{32});
  CHECK(shape.at("lm_head.weight") == V{80, 32});
  CHECK(shape.at(L0 + "linear_attn.in_proj_qkv.weight") == V{2 * 2 * 8 + 4 * 16, 32});
  CHECK(shape.at(L0 + "linear_attn.in_proj_z.weight") == V{64, 32});
  CHECK(shape.at(L0 + "linear_attn.in_proj_b.weight") == V{4, 32});
  CHECK(shape.at(L0 + "linear_attn.conv1d.weight") == V{64 + 32, 1, 4});
  CHECK(shape.at(L0 + "linear_attn.A_log") == V{4});
  CHECK(shape.at(L0 + "linear_attn.dt_bias") == V{4});
  CHECK(shape.at(L0 + "linear_attn.norm.weight") == V{16});
  CHECK(shape.at(L0 + "linear_attn.out_proj.weight") == V{32, 64});
  CHECK(shape.at(L3 + "self_attn.q_proj.weight") == V{4 * 16 * 2, 32});
  CHECK(shape.at(L3 + "self_attn.k_proj.weight") == V{2 * 16, 32});
  CHECK(shape.at(L3 + "self_attn.o_proj.weight") == V{32, 64});
  CHECK(shape.at(L3 + "self_attn.q_norm.weight") == V{16});
  CHECK(shape.at(L3 + "mlp.gate.weight") == V{4, 32});
  CHECK(shape.at(L3 + "mlp.experts.gate_up_proj") == V{4, 48, 32});
  CHECK(shape.at(L3 + "mlp.experts.down_proj") == V{4, 32, 24});
  CHECK(shape.at(L3 + "mlp.shared_expert.gate_proj.weight") == V{40, 32});
  CHECK(shape.at(L3 + "mlp.shared_expert.down_proj.weight") == V{32, 40});
  CHECK(shape.at(L3 + "mlp.shared_expert_gate.weight") == V{1, 32});
  CHECK(shape.count(L0 + "self_attn.q_proj.weight") == 0);
  CHECK(shape.count(L3 + "linear_attn.A_log") == 0);

  Config tied = c;
  tied.tie_word_embeddings = true;
  specs = expected_tensors(tied, CheckpointLayout{"model.", ExpertLayout::PerExpert});
  shape.clear();
  for (const TensorSpec& s : specs) shape[s.name] = s.shape;
  CHECK(specs.size() == 72 - 1 - 4 * 2 + 4 * 4 * 3);
  CHECK(shape.count("lm_head.weight") == 0);
  CHECK(shape.at("model.embed_tokens.weight") == V{80, 32});
  CHECK(shape.at("model.layers.2.mlp.experts.3.gate_proj.weight") == V{24, 32});
  CHECK(shape.at("model.layers.2.mlp.experts.3.up_proj.weight") == V{24, 32});
  CHECK(shape.at("model.layers.2.mlp.experts.3.down_proj.weight") == V{32, 24});
  CHECK(shape.count("model.layers.2.mlp.experts.gate_up_proj") == 0);
}

TEST_CASE("synthetic checkpoints in every layout validate and load the values written") {
  const Config c = tiny_config();
  struct Case {
    ExpertLayout experts;
    const char* prefix;
    int shards;
    DType dtype;
  };
  for (Case k : {Case{ExpertLayout::Fused, "model.language_model.", 1, DType::BF16},
                 Case{ExpertLayout::PerExpert, "model.language_model.", 3, DType::BF16},
                 Case{ExpertLayout::Fused, "model.", 3, DType::F32},
                 Case{ExpertLayout::PerExpert, "model.", 1, DType::F32}}) {
    CAPTURE(k.prefix);
    CAPTURE(k.shards);
    CAPTURE(int(k.experts));
    TempDir dir("ckpt-ok");
    SyntheticOptions o;
    o.experts = k.experts;
    o.prefix = k.prefix;
    o.shards = k.shards;
    o.dtype = k.dtype;
    const auto written = write_synthetic_checkpoint(dir.path(), c, o);

    const Config read = Config::from_file(dir / "config.json");
    CHECK(read.layer_types == c.layer_types);
    Checkpoint ckpt(dir.path());
    CHECK(ckpt.files().size() == size_t(k.shards));
    CHECK(ckpt.source().filename() == (k.shards > 1 ? kIndex : "model.safetensors"));
    const std::vector<std::string> names = ckpt.names();
    CHECK(std::is_sorted(names.begin(), names.end()));
    CHECK(names.size() == written.size() + 3);  // + the visual and mtp extras
    CHECK(ckpt.has("mtp.fc.weight"));

    const CheckpointLayout layout = detect_layout(ckpt);
    CHECK(layout.prefix == k.prefix);
    CHECK(layout.experts == k.experts);
    validate_checkpoint(read, ckpt);

    const HostWeights w = load_host_weights(read, ckpt);
    const std::string P = k.prefix;
    check_tensor(w.embed_tokens, written.at(P + "embed_tokens.weight"));
    check_tensor(w.final_norm, written.at(P + "norm.weight"));
    check_tensor(w.lm_head, written.at("lm_head.weight"));
    REQUIRE(w.layers.size() == 4);
    const std::string L0 = P + "layers.0.", L3 = P + "layers.3.";
    CHECK(w.layers[0].type == LayerType::LinearAttention);
    CHECK(w.layers[3].type == LayerType::FullAttention);
    check_tensor(w.layers[0].linear.in_proj_qkv, written.at(L0 + "linear_attn.in_proj_qkv.weight"));
    check_tensor(w.layers[0].linear.conv1d, written.at(L0 + "linear_attn.conv1d.weight"));
    check_tensor(w.layers[0].linear.A_log, written.at(L0 + "linear_attn.A_log"));
    check_tensor(w.layers[0].linear.norm, written.at(L0 + "linear_attn.norm.weight"));
    check_tensor(w.layers[0].linear.out_proj, written.at(L0 + "linear_attn.out_proj.weight"));
    check_tensor(w.layers[3].attn.q_proj, written.at(L3 + "self_attn.q_proj.weight"));
    check_tensor(w.layers[3].attn.k_norm, written.at(L3 + "self_attn.k_norm.weight"));
    check_tensor(w.layers[3].input_layernorm, written.at(L3 + "input_layernorm.weight"));
    check_tensor(w.layers[2].moe.router, written.at(P + "layers.2.mlp.gate.weight"));
    check_tensor(w.layers[2].moe.shared_down, written.at(P + "layers.2.mlp.shared_expert.down_proj.weight"));
    check_tensor(w.layers[2].moe.shared_expert_gate, written.at(P + "layers.2.mlp.shared_expert_gate.weight"));

    // Experts always come out fused: gate_up[e] = [gate rows (I) | up rows (I)], each [I, H].
    const int64_t E = 4, I = 24, H = 32;
    for (int layer : {1, 3}) {
      const MoeWeights& m = w.layers[size_t(layer)].moe;
      const std::string L = fmt::format("{}layers.{}.", P, layer);
      CHECK(m.experts_gate_up.shape == std::vector<int64_t>{E, 2 * I, H});
      CHECK(m.experts_down.shape == std::vector<int64_t>{E, H, I});
      if (k.experts == ExpertLayout::Fused) {
        check_tensor(m.experts_gate_up, written.at(L + "mlp.experts.gate_up_proj"));
        check_tensor(m.experts_down, written.at(L + "mlp.experts.down_proj"));
        continue;
      }
      for (int64_t e = 0; e < E; ++e) {
        const auto& gate = written.at(fmt::format("{}mlp.experts.{}.gate_proj.weight", L, e)).data;
        const auto& up = written.at(fmt::format("{}mlp.experts.{}.up_proj.weight", L, e)).data;
        const auto& down = written.at(fmt::format("{}mlp.experts.{}.down_proj.weight", L, e)).data;
        const float* gu = m.experts_gate_up.data.data() + e * 2 * I * H;
        CHECK(std::memcmp(gu, gate.data(), size_t(I * H) * 4) == 0);
        CHECK(std::memcmp(gu + I * H, up.data(), size_t(I * H) * 4) == 0);
        CHECK(std::memcmp(m.experts_down.data.data() + e * H * I, down.data(), size_t(H * I) * 4) == 0);
        // One element by index arithmetic: gate_up[e, I + r, col] = up_e[r, col].
        const int64_t r = 5, col = 7;
        CHECK(m.experts_gate_up.data[size_t((e * 2 * I + I + r) * H + col)] == up[size_t(r * H + col)]);
      }
    }
  }
}

TEST_CASE("tied embeddings: no lm_head.weight needed, lm_head is a copy of embed_tokens") {
  TempDir dir("ckpt-tied");
  Config c = tiny_config();
  c.tie_word_embeddings = true;
  const auto written = write_synthetic_checkpoint(dir.path(), c);
  Checkpoint ckpt(dir.path());
  CHECK(!ckpt.has("lm_head.weight"));
  const Config read = Config::from_file(dir / "config.json");
  CHECK(read.tie_word_embeddings);
  const HostWeights w = load_host_weights(read, ckpt);
  check_tensor(w.lm_head, written.at("model.language_model.embed_tokens.weight"));
}

TEST_CASE("checkpoint folder errors name the folder, file and tensor") {
  TempDir dir("ckpt-bad");
  const Config c = tiny_config();
  SyntheticOptions three;
  three.shards = 3;
  auto open_error = [&] { return error_of([&] { Checkpoint ckpt(dir.path()); }); };
  auto index_json = [&] { return read_json_file(dir / kIndex); };
  const std::string embed = "model.language_model.embed_tokens.weight";

  SUBCASE("missing directory") {
    std::string e = error_of([&] { Checkpoint ckpt(dir / "absent"); });
    CHECK(contains(e, (dir / "absent").string()));
    CHECK(contains(e, "does not exist"));
  }
  SUBCASE("a file, not a directory") {
    std::ofstream(dir / "f") << "x";
    std::string e = error_of([&] { Checkpoint ckpt(dir / "f"); });
    CHECK(contains(e, "not a directory"));
  }
  SUBCASE("no weights in the directory") {
    std::string e = open_error();
    CHECK(contains(e, dir.path().string()));
    CHECK(contains(e, "model.safetensors"));
  }
  SUBCASE("malformed index JSON") {
    write_synthetic_checkpoint(dir.path(), c, three);
    std::ofstream(dir / kIndex) << "{\"weight_map\": {";
    std::string e = open_error();
    CHECK(contains(e, kIndex));
    CHECK(contains(e, "malformed JSON"));
  }
  SUBCASE("index without a weight_map") {
    write_synthetic_checkpoint(dir.path(), c, three);
    test::write_json(dir / kIndex, {{"metadata", {{"total_size", 1}}}});
    std::string e = open_error();
    CHECK(contains(e, kIndex));
    CHECK(contains(e, "weight_map"));
  }
  SUBCASE("index points at a missing shard") {
    write_synthetic_checkpoint(dir.path(), c, three);
    fs::remove(dir / kShard2);
    std::string e = open_error();
    CHECK(contains(e, kIndex));
    CHECK(contains(e, kShard2));
    CHECK(contains(e, "does not exist"));
    CHECK(contains(e, "model.language_model.layers."));  // a tensor mapped to that shard
  }
  SUBCASE("index names a tensor its shard does not hold") {
    write_synthetic_checkpoint(dir.path(), c, three);
    nlohmann::json j = index_json();
    j["weight_map"]["model.language_model.layers.9.mlp.gate.weight"] = kShard1;
    test::write_json(dir / kIndex, j);
    std::string e = open_error();
    CHECK(contains(e, kIndex));
    CHECK(contains(e, "\"model.language_model.layers.9.mlp.gate.weight\""));
    CHECK(contains(e, kShard1));
  }
  SUBCASE("index maps a tensor to the wrong shard") {
    write_synthetic_checkpoint(dir.path(), c, three);
    nlohmann::json j = index_json();
    j["weight_map"][embed] = kShard2;  // it is in shard 1
    test::write_json(dir / kIndex, j);
    std::string e = open_error();
    CHECK(contains(e, "\"" + embed + "\""));
    CHECK(contains(e, kShard2));
    CHECK(contains(e, kShard1));
  }
  SUBCASE("the same tensor in two shards") {
    write_synthetic_checkpoint(dir.path(), c, three);
    std::vector<float> dup(32, 1.0f);
    test::rewrite_safetensors(dir / kShard2, [&](std::vector<TensorToWrite>& t) {
      t.push_back({"model.language_model.norm.weight", DType::F32, {32},
                   {reinterpret_cast<const uint8_t*>(dup.data()), dup.size() * 4}});
    });
    std::string e = open_error();
    CHECK(contains(e, "\"model.language_model.norm.weight\""));
    CHECK(contains(e, "two shards"));
    CHECK(contains(e, kShard2));
  }
  SUBCASE("truncated shard") {
    write_synthetic_checkpoint(dir.path(), c, three);
    fs::resize_file(dir / kShard2, fs::file_size(dir / kShard2) - 1);
    std::string e = open_error();
    CHECK(contains(e, kShard2));
    CHECK(contains(e, "outside the data section"));
    CHECK(contains(e, "\"model.language_model.layers."));
  }
  SUBCASE("shard header lying about offsets") {
    write_synthetic_checkpoint(dir.path(), c);
    // The same data, but the header shifts one tensor by 2 bytes onto its neighbour.
    const std::string norm = "model.language_model.norm.weight";
    nlohmann::json h = nlohmann::json::object();
    std::vector<uint8_t> data;
    {
      SafetensorsFile f(dir / "model.safetensors");
      uint64_t size = 0;
      for (const TensorInfo& t : f.tensors()) {
        h[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
        size = std::max(size, t.end);
      }
      const TensorInfo& first = f.tensors()[0];
      const uint8_t* base = f.data(first).data() - first.begin;
      data.assign(base, base + size);
      const TensorInfo* t = f.find(norm);
      REQUIRE(t);
      h[norm]["data_offsets"] = {t->begin + 2, t->end + 2};
    }
    test::write_raw_safetensors(dir / "model.safetensors", h.dump(), data);
    std::string e = open_error();
    CHECK(contains(e, "model.safetensors"));
    CHECK(contains(e, "\"" + norm + "\""));
  }
}

// Validation errors. The checkpoint is written for one config and then edited (or validated
// against a config it contradicts); every message names the tensor and the file.
TEST_CASE("validate_checkpoint errors name the tensor, expected vs found, and the file") {
  TempDir dir("ckpt-validate");
  Config c = tiny_config();
  SyntheticOptions three;
  three.shards = 3;
  const std::string L1 = "model.language_model.layers.1.";
  auto validate_error = [&](const Config& config) {
    return error_of([&] {
      Checkpoint ckpt(dir.path());
      validate_checkpoint(config, ckpt);
    });
  };
  // Applies `edit` to whichever shard holds `name`; returns that shard's file name.
  auto edit_shard_of = [&](const std::string& name, auto edit) {
    std::string shard;
    {
      Checkpoint ckpt(dir.path());
      shard = ckpt.get(name).file->path().filename().string();
    }
    test::rewrite_safetensors(dir / shard, edit);
    return shard;
  };

  SUBCASE("wrong dtype") {
    write_synthetic_checkpoint(dir.path(), c, three);
    const std::string name = L1 + "linear_attn.A_log";
    const std::string shard = edit_shard_of(name, [&](std::vector<TensorToWrite>& ts) {
      for (TensorToWrite& t : ts)
        if (t.name == name) t.dtype = DType::I16;  // same byte size as BF16
    });
    std::string e = validate_error(c);
    INFO(e);
    CHECK(contains(e, "\"" + name + "\""));
    CHECK(contains(e, "expected [4] F32/F16/BF16, found [4] I16"));
    CHECK(contains(e, shard));
  }
  SUBCASE("wrong shape") {
    write_synthetic_checkpoint(dir.path(), c, three);
    const std::string name = L1 + "linear_attn.in_proj_z.weight";
    const std::string shard = edit_shard_of(name, [&](std::vector<TensorToWrite>& ts) {
      for (TensorToWrite& t : ts)
        if (t.name == name) t.shape = {32, 64};  // transposed
    });
    std::string e = validate_error(c);
    INFO(e);
    CHECK(contains(e, "\"" + name + "\""));
    CHECK(contains(e, "expected [64, 32]"));
    CHECK(contains(e, "found [32, 64] BF16"));
    CHECK(contains(e, shard));
  }
  SUBCASE("missing tensor") {
    write_synthetic_checkpoint(dir.path(), c, three);
    const std::string name = "model.language_model.layers.3.self_attn.v_proj.weight";
    const std::string shard = edit_shard_of(name, [&](std::vector<TensorToWrite>& ts) {
      std::erase_if(ts, [&](const TensorToWrite& t) { return t.name == name; });
    });
    nlohmann::json j = read_json_file(dir / kIndex);
    j["weight_map"].erase(name);
    test::write_json(dir / kIndex, j);
    std::string e = validate_error(c);
    INFO(e);
    CHECK(contains(e, "\"" + name + "\" [32, 32] not found"));
    CHECK(contains(e, kIndex));
  }
  SUBCASE("missing lm_head with untied embeddings") {
    write_synthetic_checkpoint(dir.path(), c);
    edit_shard_of("lm_head.weight", [&](std::vector<TensorToWrite>& ts) {
      std::erase_if(ts, [&](const TensorToWrite& t) { return t.name == "lm_head.weight"; });
    });
    std::string e = validate_error(c);
    CHECK(contains(e, "\"lm_head.weight\""));
    CHECK(contains(e, "model.safetensors"));
    CHECK(contains(e, "tie_word_embeddings = false"));
  }
  SUBCASE("missing per-expert tensor") {
    SyntheticOptions o;
    o.experts = ExpertLayout::PerExpert;
    write_synthetic_checkpoint(dir.path(), c, o);
    const std::string name = L1 + "mlp.experts.2.up_proj.weight";
    edit_shard_of(name, [&](std::vector<TensorToWrite>& ts) {
      std::erase_if(ts, [&](const TensorToWrite& t) { return t.name == name; });
    });
    std::string e = validate_error(c);
    CHECK(contains(e, "\"" + name + "\" [24, 32] not found"));
    CHECK(contains(e, "model.safetensors"));
  }
  SUBCASE("no embed_tokens under either prefix") {
    write_synthetic_checkpoint(dir.path(), c);
    edit_shard_of("model.language_model.embed_tokens.weight", [&](std::vector<TensorToWrite>& ts) {
      std::erase_if(ts, [&](const TensorToWrite& t) { return t.name.ends_with("embed_tokens.weight"); });
    });
    std::string e = validate_error(c);
    CHECK(contains(e, "model.language_model.embed_tokens.weight"));
    CHECK(contains(e, "model.embed_tokens.weight"));
    CHECK(contains(e, "model.safetensors"));
  }
  SUBCASE("more layers in the checkpoint than num_hidden_layers") {
    Config five = c;
    five.num_layers = 5;
    five.layer_types.push_back(LayerType::LinearAttention);
    write_synthetic_checkpoint(dir.path(), five, three);
    std::string e = validate_error(c);
    INFO(e);
    CHECK(contains(e, "\"model.language_model.layers.4."));
    CHECK(contains(e, "layer 4 is present"));
    CHECK(contains(e, "num_hidden_layers = 4"));
    CHECK(contains(e, "model-0000"));
  }
  SUBCASE("more per-expert tensors than num_experts") {
    Config six = c;
    six.num_experts = 6;
    SyntheticOptions o;
    o.experts = ExpertLayout::PerExpert;
    write_synthetic_checkpoint(dir.path(), six, o);
    std::string e = validate_error(c);
    INFO(e);
    CHECK(contains(e, "mlp.experts.4."));
    CHECK(contains(e, "expert 4 is present"));
    CHECK(contains(e, "num_experts = 4"));
    CHECK(contains(e, "model.safetensors"));
  }
  SUBCASE("fused experts with a different expert count") {
    Config six = c;
    six.num_experts = 6;
    write_synthetic_checkpoint(dir.path(), six);
    std::string e = validate_error(c);
    INFO(e);
    CHECK(contains(e, "\"model.language_model.layers.0.mlp.gate.weight\": expected [4, 32]"));
    CHECK(contains(e, "found [6, 32]"));
  }
  SUBCASE("fewer per-expert tensors than num_experts") {
    SyntheticOptions o;
    o.experts = ExpertLayout::PerExpert;
    write_synthetic_checkpoint(dir.path(), c, o);
    Config eight = c;
    eight.num_experts = 8;
    std::string e = validate_error(eight);
    CHECK(contains(e, "\"model.language_model.layers.0.mlp.gate.weight\": expected [8, 32]"));
  }
  SUBCASE("layer types contradict the tensors") {
    write_synthetic_checkpoint(dir.path(), c);
    Config swapped = c;
    swapped.layer_types = {LayerType::LinearAttention, LayerType::LinearAttention, LayerType::FullAttention,
                           LayerType::LinearAttention};
    std::string e = validate_error(swapped);
    INFO(e);
    CHECK(contains(e, "the config says layer 2 is full_attention, but this is a linear_attention weight"));
    CHECK(contains(e, "\"model.language_model.layers.2.linear_attn."));
    CHECK(contains(e, "model.safetensors"));
  }
  SUBCASE("hidden size contradicts the tensors") {
    write_synthetic_checkpoint(dir.path(), c);
    Config wide = c;
    wide.hidden_size = 48;
    std::string e = validate_error(wide);
    CHECK(contains(e, "\"model.language_model.embed_tokens.weight\": expected [80, 48]"));
    CHECK(contains(e, "found [80, 32] BF16 in"));
  }
  SUBCASE("Checkpoint::get of an absent tensor") {
    write_synthetic_checkpoint(dir.path(), c);
    std::string e = error_of([&] {
      Checkpoint ckpt(dir.path());
      ckpt.get("model.language_model.layers.0.mlp.router.weight");
    });
    CHECK(contains(e, "\"model.language_model.layers.0.mlp.router.weight\" not found"));
    CHECK(contains(e, "model.safetensors"));
  }
}

// The committed fixture written by tests/python/make_tiny_fixture.py through transformers
// (Qwen3_5MoeForConditionalGeneration.state_dict names, bf16, a tiny model.visual.* included).
TEST_CASE("the transformers-made fixture tiny-qwen35moe parses, validates and loads") {
  const fs::path dir = fs::path(Q35_SOURCE_DIR) / "tests" / "fixtures" / "tiny-qwen35moe";
  REQUIRE_MESSAGE(fs::is_directory(dir), "fixture missing: run tests/python/make_tiny_fixture.py");

  const Config c = Config::from_file(dir / "config.json");
  CHECK(c.vocab_size == 1536);
  CHECK(c.hidden_size == 128);
  CHECK(c.num_layers == 4);
  using enum LayerType;
  CHECK(c.layer_types == std::vector<LayerType>{LinearAttention, LinearAttention, LinearAttention, FullAttention});
  CHECK(c.num_heads == 2);
  CHECK(c.num_kv_heads == 1);
  CHECK(c.head_dim == 256);
  CHECK(c.rotary_dim == 64);
  CHECK(c.rope_theta == 1e7);
  CHECK(c.attn_output_gate);
  CHECK(c.linear_num_key_heads == 2);
  CHECK(c.linear_num_value_heads == 4);
  CHECK(c.linear_key_head_dim == 128);
  CHECK(c.linear_value_head_dim == 128);
  CHECK(c.linear_conv_kernel_dim == 4);
  CHECK(c.num_experts == 16);
  CHECK(c.num_experts_per_tok == 4);
  CHECK(c.moe_intermediate_size == 64);
  CHECK(c.shared_expert_intermediate_size == 128);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.max_position_embeddings == 4096);
  CHECK(!c.tie_word_embeddings);

  const GenerationConfig g = GenerationConfig::from_file(dir / "generation_config.json");
  CHECK(g.eos_token_ids == std::vector<int32_t>{1482, 1480});
  CHECK(g.bos_token_id == 1480);
  CHECK(g.pad_token_id == 1480);
  CHECK(g.do_sample);
  CHECK(g.top_k == 20);
  CHECK(g.top_p == 0.95f);

  Checkpoint ckpt(dir);
  CHECK(ckpt.files().size() == 1);
  const CheckpointLayout layout = detect_layout(ckpt);
  CHECK(layout.prefix == "model.language_model.");
  CHECK(layout.experts == ExpertLayout::Fused);
  const std::vector<std::string> names = ckpt.names();
  CHECK(std::any_of(names.begin(), names.end(), [](const std::string& n) { return n.starts_with("model.visual."); }));
  CHECK(ckpt.get("lm_head.weight").info->dtype == DType::BF16);
  validate_checkpoint(c, ckpt);

  const HostWeights w = load_host_weights(c, ckpt);
  using V = std::vector<int64_t>;
  CHECK(w.embed_tokens.shape == V{1536, 128});
  CHECK(w.lm_head.shape == V{1536, 128});
  CHECK(w.final_norm.shape == V{128});
  REQUIRE(w.layers.size() == 4);
  CHECK(w.layers[0].linear.in_proj_qkv.shape == V{2 * 2 * 128 + 4 * 128, 128});
  CHECK(w.layers[0].linear.conv1d.shape == V{1024, 1, 4});
  CHECK(w.layers[3].attn.q_proj.shape == V{2 * 256 * 2, 128});
  CHECK(w.layers[3].attn.k_proj.shape == V{256, 128});
  CHECK(w.layers[3].attn.o_proj.shape == V{128, 512});
  CHECK(w.layers[2].moe.experts_gate_up.shape == V{16, 128, 128});
  CHECK(w.layers[2].moe.experts_down.shape == V{16, 128, 64});
  CHECK(w.layers[2].moe.shared_expert_gate.shape == V{1, 128});

  // Values the fixture's init rules pin down (make_tiny_fixture.py init_tensor): a wrong decode
  // of bf16 (or reading the wrong tensor) breaks these. A_log ~ U[log 0.03, log 1.5]; the gated
  // norm weight ~ N(1, 0.2), so the mean of 128 values is 1 +- 0.02 (one sigma).
  for (int i = 0; i < 3; ++i) {
    for (float a : w.layers[size_t(i)].linear.A_log.data) {
      CHECK(a >= std::log(0.03f) - 0.02f);
      CHECK(a <= std::log(1.5f) + 0.02f);
    }
    const std::vector<float>& n = w.layers[size_t(i)].linear.norm.data;
    double mean = 0;
    for (float v : n) mean += v / double(n.size());
    CHECK(std::abs(mean - 1.0) < 0.1);
  }
}
