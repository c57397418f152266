// The fp32 CPU forward pass: against the transformers goldens of the committed tiny fixture, and
// its own consistency (prefill vs decode, chunked vs recurrent GDN, errors) on a synthetic model.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "models/qwen35/config.h"
#include "models/qwen35/cpu_model.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/core/sampler.h"
#include "runtime/io/safetensors.h"

using namespace q35::qwen35;
namespace fs = std::filesystem;

namespace {

// max |a - b| / max |b| over the first n values (b the expected)
double rel_err(std::span<const float> a, std::span<const float> b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(double(a[i]) - double(b[i])));
    den = std::max(den, std::abs(double(b[i])));
  }
  return num / den;
}

int32_t argmax(std::span<const float> row) {
  return int32_t(std::max_element(row.begin(), row.end()) - row.begin());
}

// ---- a synthetic model: every shape differs, two layers of each mixer kind ----

Config synthetic_config() {
  Config c;
  c.vocab_size = 50;
  c.hidden_size = 32;
  c.num_layers = 4;
  c.layer_types = {LayerType::LinearAttention, LayerType::FullAttention, LayerType::LinearAttention,
                   LayerType::FullAttention};
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.rotary_dim = 4;
  c.rope_theta = 10000.0;
  c.linear_num_key_heads = 2;
  c.linear_num_value_heads = 4;
  c.linear_key_head_dim = 8;
  c.linear_value_head_dim = 12;
  c.linear_conv_kernel_dim = 4;
  c.num_experts = 8;
  c.num_experts_per_tok = 3;
  c.moe_intermediate_size = 12;
  c.shared_expert_intermediate_size = 20;
  c.max_position_embeddings = 4096;
  return c;
}

struct Rng {
  std::mt19937 gen{1234};
  // A tensor of uniform values in [center - spread, center + spread].
  HostTensor tensor(std::vector<int64_t> shape, float spread, float center = 0.0f) {
    HostTensor t{shape, {}};
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::uniform_real_distribution<float> dist(center - spread, center + spread);
    t.data.resize(n);
    for (float& x : t.data) x = dist(gen);
    return t;
  }
  // A [out, in] matrix whose products have O(1) entries for O(1) inputs.
  HostTensor linear(int64_t out, int64_t in) { return tensor({out, in}, std::sqrt(3.0f / float(in))); }
};

HostWeights synthetic_weights(const Config& c) {
  Rng r;
  int64_t H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size, Is = c.shared_expert_intermediate_size;
  HostWeights w;
  w.embed_tokens = r.tensor({c.vocab_size, H}, 1.5f);
  w.final_norm = r.tensor({H}, 0.2f);
  w.lm_head = r.linear(c.vocab_size, H);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    LayerWeights l;
    l.type = c.layer_types[i];
    l.input_layernorm = r.tensor({H}, 0.2f);
    l.post_attention_layernorm = r.tensor({H}, 0.2f);
    if (l.type == LayerType::FullAttention) {
      l.attn.q_proj = r.linear(c.q_proj_rows(), H);
      l.attn.k_proj = r.linear(c.kv_dim(), H);
      l.attn.v_proj = r.linear(c.kv_dim(), H);
      l.attn.o_proj = r.linear(H, c.attn_out_dim());
      l.attn.q_norm = r.tensor({c.head_dim}, 0.2f);
      l.attn.k_norm = r.tensor({c.head_dim}, 0.2f);
    } else {
      int64_t Hv = c.linear_num_value_heads;
      l.linear.in_proj_qkv = r.linear(c.linear_conv_dim(), H);
      l.linear.in_proj_z = r.linear(c.linear_value_dim(), H);
      l.linear.in_proj_b = r.linear(Hv, H);
      l.linear.in_proj_a = r.linear(Hv, H);
      l.linear.conv1d = r.tensor({c.linear_conv_dim(), 1, c.linear_conv_kernel_dim}, 0.8f);
      l.linear.dt_bias = r.tensor({Hv}, 0.5f, 1.0f);
      l.linear.A_log = r.tensor({Hv}, 1.0f, 0.0f);
      l.linear.norm = r.tensor({c.linear_value_head_dim}, 0.2f, 1.0f);
      l.linear.out_proj = r.linear(H, c.linear_value_dim());
    }
    l.moe.router = r.tensor({E, H}, 0.6f);
    l.moe.experts_gate_up = r.tensor({E, 2 * I, H}, std::sqrt(3.0f / float(H)));
    l.moe.experts_down = r.tensor({E, H, I}, std::sqrt(3.0f / float(I)));
    l.moe.shared_gate = r.linear(Is, H);
    l.moe.shared_up = r.linear(Is, H);
    l.moe.shared_down = r.linear(H, Is);
    l.moe.shared_expert_gate = r.linear(1, H);
    w.layers.push_back(std::move(l));
  }
  return w;
}

std::vector<int32_t> synthetic_tokens(int64_t n, int64_t vocab) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = int32_t((i * 37 + 11) % vocab);
  return t;
}

// ---- the transformers goldens ----

struct Goldens {
  std::vector<int32_t> prompt_ids, greedy_ids;
  std::vector<float> prompt_logits, greedy_logits;  // [T, V], [32, V]
};

std::vector<int32_t> read_i32(const q35::SafetensorsFile& f, const std::string& name) {
  const q35::TensorInfo* info = f.find(name);
  REQUIRE_MESSAGE(info, "golden tensor ", name, " missing in ", f.path().string());
  REQUIRE(info->dtype == q35::DType::I32);
  std::span<const uint8_t> bytes = f.data(*info);
  std::vector<int32_t> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

std::vector<float> read_f32(const q35::SafetensorsFile& f, const std::string& name) {
  const q35::TensorInfo* info = f.find(name);
  REQUIRE_MESSAGE(info, "golden tensor ", name, " missing in ", f.path().string());
  return q35::to_f32(q35::TensorRef{info, f.data(*info), &f});
}

const fs::path kFixture = fs::path(Q35_SOURCE_DIR) / "tests/fixtures/tiny-qwen35moe";
const fs::path kGoldens = fs::path(Q35_SOURCE_DIR) / "tests/fixtures/goldens/tiny-qwen35moe.safetensors";

}  // namespace

TEST_CASE("CpuModel matches the transformers fp32 goldens of the tiny fixture") {
  REQUIRE_MESSAGE(fs::exists(kFixture / "config.json"), "missing fixture ", kFixture.string());
  REQUIRE_MESSAGE(fs::exists(kGoldens), "missing goldens ", kGoldens.string());
  Config config = Config::from_file(kFixture / "config.json");
  q35::Checkpoint ckpt(kFixture);
  CpuModel model(config, load_host_weights(config, ckpt));
  q35::SafetensorsFile gf(kGoldens);
  Goldens g{read_i32(gf, "prompt_ids"), read_i32(gf, "greedy_ids"), read_f32(gf, "prompt_logits"),
            read_f32(gf, "greedy_logits")};
  const int64_t T = int64_t(g.prompt_ids.size()), V = config.vocab_size, N = int64_t(g.greedy_ids.size());
  REQUIRE(int64_t(g.prompt_logits.size()) == T * V);
  REQUIRE(int64_t(g.greedy_logits.size()) == N * V);

  for (GdnMode mode : {GdnMode::Chunked, GdnMode::Recurrent}) {
    std::string mode_name = mode == GdnMode::Chunked ? "chunked" : "recurrent";
    CAPTURE(mode_name);
    CpuState state = model.new_state(T + N);
    auto t0 = std::chrono::steady_clock::now();
    std::vector<float> prompt_logits = model.forward(state, g.prompt_ids, true, mode);  // [T, V]
    auto t1 = std::chrono::steady_clock::now();
    double prompt_err = rel_err(prompt_logits, g.prompt_logits);
    CHECK(prompt_err <= 1e-4);

    // Greedy decode, one token per forward; row i of greedy_logits chose greedy_ids[i].
    std::vector<int32_t> ids;
    std::vector<float> logits(prompt_logits.end() - V, prompt_logits.end()), all_decode;
    for (int64_t i = 0; i < N; ++i) {
      all_decode.insert(all_decode.end(), logits.begin(), logits.end());
      ids.push_back(argmax(logits));
      if (i + 1 < N) logits = model.forward(state, std::span<const int32_t>(&ids.back(), 1), false, mode);
    }
    auto t2 = std::chrono::steady_clock::now();
    CHECK(ids == g.greedy_ids);
    double decode_err = rel_err(all_decode, g.greedy_logits);
    CHECK(decode_err <= 1e-4);
    double prompt_s = std::chrono::duration<double>(t1 - t0).count();
    double decode_s = std::chrono::duration<double>(t2 - t1).count();
    // One prefill over the prompt and the generated tokens gives the same logits as the cached
    // decode steps.
    std::vector<int32_t> all_ids = g.prompt_ids;
    all_ids.insert(all_ids.end(), ids.begin(), ids.end() - 1);
    CpuState one = model.new_state(T + N);
    std::vector<float> one_pass = model.forward(one, all_ids, true, mode);  // [T+N-1, V]
    CHECK(rel_err(std::span<const float>(one_pass).subspan((T - 1) * V), all_decode) <= 1e-5);
    MESSAGE(fmt::format("{}: prompt {} tokens max rel err {:.2e} ({:.0f} tok/s); decode {} tokens max rel err "
                        "{:.2e} ({:.0f} tok/s)",
                        mode_name, T, prompt_err, T / prompt_s, N - 1,
                        decode_err, (N - 1) / decode_s));
  }
}

TEST_CASE("CpuModel: prefill then decode == one prefill, in both GDN modes") {
  Config c = synthetic_config();
  CpuModel model(c, synthetic_weights(c));
  const int64_t P = 70, D = 6, V = c.vocab_size;  // the prompt crosses a 64-token chunk boundary
  std::vector<int32_t> tokens = synthetic_tokens(P + D, V);

  CpuState full_state = model.new_state(P + D);
  std::vector<float> full = model.forward(full_state, tokens, true, GdnMode::Chunked);  // [P+D, V]
  CHECK(full_state.pos == P + D);

  for (GdnMode mode : {GdnMode::Chunked, GdnMode::Recurrent}) {
    std::string mode_name = mode == GdnMode::Chunked ? "chunked" : "recurrent";
    CAPTURE(mode_name);
    CpuState s = model.new_state(P + D + 3);
    std::vector<float> prompt = model.forward(s, std::span(tokens).first(P), true, mode);  // [P, V]
    CHECK(rel_err(prompt, std::span<const float>(full).first(P * V)) <= 1e-5);
    for (int64_t i = 0; i < D; ++i) {
      std::vector<float> step = model.forward(s, std::span(tokens).subspan(P + i, 1), false, mode);  // [1, V]
      CHECK(rel_err(step, std::span<const float>(full).subspan((P + i) * V, V)) <= 1e-5);
    }
    CHECK(s.pos == P + D);
    // The GDN and KV state after both paths agree too.
    for (int64_t l = 0; l < c.num_layers; ++l) {
      if (c.layer_types[l] == LayerType::LinearAttention) {
        CHECK(rel_err(s.gdn_state[l], full_state.gdn_state[l]) <= 1e-5);
        CHECK(rel_err(s.conv_state[l], full_state.conv_state[l]) <= 1e-6);
      } else {
        CHECK(rel_err(std::span<const float>(s.k_cache[l]).first((P + D) * c.kv_dim()), full_state.k_cache[l]) <= 1e-5);
      }
    }
  }

  // Two prefills of 40 + 36 tokens (the second starting mid-chunk) == one of 76; the last-token
  // logits equal the last row of all_logits.
  CpuState s2 = model.new_state(P + D);
  model.forward(s2, std::span(tokens).first(40), false);
  std::vector<float> last = model.forward(s2, std::span(tokens).subspan(40), false);  // [1, V]
  CHECK(rel_err(last, std::span<const float>(full).subspan((P + D - 1) * V, V)) <= 1e-5);
}

TEST_CASE("CpuModel: Recurrent mode == Chunked mode over a long prompt") {
  Config c = synthetic_config();
  CpuModel model(c, synthetic_weights(c));
  std::vector<int32_t> tokens = synthetic_tokens(150, c.vocab_size);
  CpuState a = model.new_state(150), b = model.new_state(150);
  std::vector<float> chunked = model.forward(a, tokens, true, GdnMode::Chunked);
  std::vector<float> recurrent = model.forward(b, tokens, true, GdnMode::Recurrent);
  CHECK(rel_err(chunked, recurrent) <= 1e-5);
  // The logits depend on the context: the same token at two positions gives different rows.
  CHECK(tokens[0] == tokens[50]);
  CHECK(rel_err(std::span<const float>(chunked).subspan(50 * c.vocab_size, c.vocab_size),
                std::span<const float>(chunked).first(c.vocab_size)) > 1e-2);
}

TEST_CASE("CpuModel: context overflow, bad token ids and bad weights are Errors") {
  Config c = synthetic_config();
  CpuModel model(c, synthetic_weights(c));
  CpuState s = model.new_state(8);
  std::vector<int32_t> five = synthetic_tokens(5, c.vocab_size);
  model.forward(s, five, false);
  CHECK_THROWS_WITH_AS(model.forward(s, five, false), doctest::Contains("context overflow"), q35::Error);
  CHECK(s.pos == 5);  // unchanged by the failed call
  std::vector<int32_t> bad = {1, int32_t(c.vocab_size)};
  CHECK_THROWS_WITH_AS(model.forward(s, bad, false), doctest::Contains("token id 50"), q35::Error);
  std::vector<int32_t> negative = {-3};
  CHECK_THROWS_AS(model.forward(s, negative, false), q35::Error);
  CHECK(s.pos == 5);
  CHECK_THROWS_AS(model.forward(s, std::span<const int32_t>(), false), q35::Error);
  // The state is still usable after the errors: 3 more tokens fit exactly.
  CHECK(model.forward(s, std::span(five).first(3), true).size() == size_t(3 * c.vocab_size));
  CHECK(s.pos == 8);

  HostWeights w = synthetic_weights(c);
  w.layers[1].attn.q_proj.shape = {c.num_heads * c.head_dim, c.hidden_size};  // no gate rows
  CHECK_THROWS_WITH_AS(CpuModel(c, std::move(w)), doctest::Contains("layers.1.self_attn.q_proj"), q35::Error);
}

TEST_CASE("CpuModel: a batched decode step == each sequence decoded alone") {
  Config c = synthetic_config();
  CpuModel model(c, synthetic_weights(c));
  const int64_t V = c.vocab_size, D = 6;
  // Five sequences at different positions (one prompt crosses a 64-token GDN chunk boundary).
  const std::vector<int64_t> prompt_lengths = {1, 5, 17, 70, 33};
  const int64_t B = int64_t(prompt_lengths.size());
  std::vector<std::vector<int32_t>> tokens;  // per sequence: prompt then D decode inputs
  std::vector<CpuState> alone, batched;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int32_t> t = synthetic_tokens(prompt_lengths[b] + D + 7 * b, V);
    tokens.push_back(std::vector<int32_t>(t.begin() + 7 * b, t.end()));
    CpuState s = model.new_state(prompt_lengths[b] + D);
    model.forward(s, std::span(tokens[b]).first(prompt_lengths[b]), false);
    alone.push_back(s);
    batched.push_back(s);
  }
  int greedy_checked = 0;
  for (int64_t step = 0; step < D; ++step) {
    // The batch changes from step to step: all five, then sequence 1 leaves, in a rotated order.
    std::vector<int64_t> members;
    for (int64_t i = 0; i < B; ++i) {
      const int64_t b = (i + step) % B;
      if (step < 3 || b != 1) members.push_back(b);
    }
    std::vector<CpuState*> states;
    std::vector<int32_t> inputs;
    for (int64_t b : members) {
      states.push_back(&batched[b]);
      inputs.push_back(tokens[b][prompt_lengths[b] + step]);
    }
    std::vector<float> got = model.forward_batch(states, inputs);  // [members, V]
    REQUIRE(int64_t(got.size()) == int64_t(members.size()) * V);
    for (size_t m = 0; m < members.size(); ++m) {
      const int64_t b = members[m];
      CAPTURE(b);
      CAPTURE(step);
      std::vector<float> want = model.forward(alone[b], std::span(tokens[b]).subspan(prompt_lengths[b] + step, 1), false);
      std::span<const float> row(got.data() + m * V, V);
      CHECK(rel_err(row, want) <= 1e-6);
      CHECK(q35::argmax(row) == q35::argmax(want));
      ++greedy_checked;
      CHECK(batched[b].pos == alone[b].pos);
    }
  }
  CHECK(greedy_checked == 5 * 3 + 4 * 3);
  // The states agree after the steps (sequence 1 stopped after 3).
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < c.num_layers; ++l) {
      if (c.layer_types[l] == LayerType::LinearAttention) {
        CHECK(rel_err(batched[b].gdn_state[l], alone[b].gdn_state[l]) <= 1e-6);
      } else {
        CHECK(rel_err(batched[b].k_cache[l], alone[b].k_cache[l]) <= 1e-6);
      }
    }
  }

  // Errors leave every state as it was: a state twice, a full sequence, sizes that differ, no batch.
  CpuState x = model.new_state(4), full = model.new_state(1);
  model.forward(full, std::vector<int32_t>{3}, false);
  std::vector<CpuState*> twice = {&x, &x}, with_full = {&x, &full}, one = {&x};
  CHECK_THROWS_WITH_AS(model.forward_batch(twice, std::vector<int32_t>{1, 2}),
                       doctest::Contains("share one state"), q35::Error);
  CHECK_THROWS_WITH_AS(model.forward_batch(with_full, std::vector<int32_t>{1, 2}),
                       doctest::Contains("context overflow"), q35::Error);
  CHECK_THROWS_WITH_AS(model.forward_batch(one, std::vector<int32_t>{1, 2}), doctest::Contains("2 tokens for 1"),
                       q35::Error);
  CHECK_THROWS_AS(model.forward_batch({}, {}), q35::Error);
  CHECK(x.pos == 0);
  CHECK(full.pos == 1);
}
