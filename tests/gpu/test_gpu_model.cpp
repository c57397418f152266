// GPU: the whole forward pass (models/qwen35/gpu_model) on the tiny fixture against the
// transformers goldens, decode through the captured CUDA graph, W4A16 on the fly and from a
// quantized checkpoint, FP8 against the CPU reference on the same FP8 weights.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "models/qwen35/cpu_model.h"
#include "models/qwen35/gpu_model.h"
#include "models/qwen35/weights.h"
#include "models/qwen35/quantized.h"
#include "runtime/io/json_file.h"
#include "runtime/io/safetensors.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/synthetic_checkpoint.h"

using namespace q35;
using namespace q35::gpu_test;
using namespace q35::qwen35;
namespace fs = std::filesystem;

namespace {

// Found at run time (tests/test_util.h), so the packed binary runs from any folder.
fs::path model_dir() { return q35::test::fixtures_dir() / "tiny-qwen35moe"; }
fs::path goldens_dir() { return q35::test::fixtures_dir() / "goldens/tiny-qwen35moe"; }

struct Goldens {
  std::vector<int32_t> prompt, greedy;
  std::vector<float> prompt_logits;  // [T, vocab]
  std::vector<float> greedy_logits;  // [32, vocab]: row i chose greedy[i]
};

Goldens load_goldens() {
  SafetensorsFile f(goldens_dir().string() + ".safetensors");
  auto ints = [&](const char* name) {
    const TensorInfo* t = f.find(name);
    REQUIRE(t);
    auto b = f.data(*t);
    const auto* p = reinterpret_cast<const int32_t*>(b.data());
    return std::vector<int32_t>(p, p + b.size() / 4);
  };
  Goldens g{ints("prompt_ids"), ints("greedy_ids"), {}, {}};
  const TensorInfo* l = f.find("prompt_logits");
  g.prompt_logits = q35::to_f32({l, f.data(*l), &f});
  const TensorInfo* gl = f.find("greedy_logits");
  REQUIRE(gl);
  g.greedy_logits = q35::to_f32({gl, f.data(*gl), &f});
  return g;
}

// ||got - want|| / ||want|| over all values (the relative error the issue defines for bf16).
double rel_fro(const std::vector<float>& got, const std::vector<float>& want) { return rel_l2(got, want); }


std::vector<int32_t> greedy_ids(GpuModel& model, const std::vector<int32_t>& prompt, size_t n) {
  const SamplingParams greedy;
  model.reset();
  std::vector<int32_t> out{model.prefill(prompt, greedy)};
  while (out.size() < n) out.push_back(model.decode(out.back(), greedy));
  return out;
}

GpuModelOptions options(WeightFormat f, int group) {
  GpuModelOptions o;
  o.format = f;
  o.group = group;
  o.max_context = 256;
  o.max_chunk = 64;  // the 99-token prompt runs as two chunks
  return o;
}

}  // namespace

TEST_CASE("GPU model, tiny fixture, bf16: transformers logits and the same 32 greedy tokens") {
  auto g = open_gpu();
  const Config c = Config::from_file(model_dir() / "config.json");
  Checkpoint ckpt(model_dir());
  const Goldens gold = load_goldens();
  for (bool chunked : {true, false}) {
    CAPTURE(chunked);
    GpuModelOptions o = options(WeightFormat::BF16, 0);
    o.chunked_gdn = chunked;
    GpuModel model(g->driver, g->ctx, g->jit, c, ckpt, o);
    std::vector<float> logits = model.forward(gold.prompt, true);
    const double rel = rel_fro(logits, gold.prompt_logits);
    MESSAGE("bf16, chunked GDN " << chunked << ", " << gold.prompt.size() << " positions: ||dlogits||/||logits|| = "
                                 << rel << ", max|dlogit|/max|logit| = " << max_rel(logits, gold.prompt_logits));
    CHECK(rel <= 2e-2);
    CHECK(model.position() == int64_t(gold.prompt.size()));
    // Greedy through prefill + the captured decode graph: the transformers ids.
    CHECK(greedy_ids(model, gold.prompt, gold.greedy.size()) == gold.greedy);
    // The same steps chained on the device (each input the previous sample, no host round trip).
    model.reset();
    const SamplingParams greedy;
    const int32_t first = model.prefill(gold.prompt, greedy);
    CHECK(first == gold.greedy[0]);
    const int64_t n = int64_t(gold.greedy.size()) - 1;
    CHECK(model.decode_steps(first, n, greedy) == gold.greedy.back());
    CHECK(model.position() == int64_t(gold.prompt.size()) + n);
    // Prefill then one token at a time: the logits transformers computed with its cache for the
    // same greedy tokens (greedy_logits row i chose greedy_ids[i]; feeding greedy_ids[i] gives row i+1).
    model.reset();
    model.forward(gold.prompt, false);
    std::vector<float> steps, want;
    const size_t V = size_t(c.vocab_size);
    for (size_t i = 0; i + 1 < gold.greedy.size(); ++i) {
      std::vector<float> row = model.forward(std::span<const int32_t>(&gold.greedy[i], 1), false);
      steps.insert(steps.end(), row.begin(), row.end());
      want.insert(want.end(), gold.greedy_logits.begin() + (i + 1) * V, gold.greedy_logits.begin() + (i + 2) * V);
    }
    MESSAGE("bf16 decode steps, chunked GDN " << chunked << ": ||dlogits||/||logits|| = " << rel_fro(steps, want));
    CHECK(rel_fro(steps, want) <= 2e-2);
  }
}

TEST_CASE("GPU model, tiny fixture, bf16: error per depth against the fp32 CPU reference (diagnostic)") {
  auto g = open_gpu();
  const Config full = Config::from_file(model_dir() / "config.json");
  Checkpoint ckpt(model_dir());
  const Goldens gold = load_goldens();
  std::string report;
  const HostWeights all = load_host_weights(full, ckpt);
  for (int64_t L = 1; L <= full.num_layers; ++L) {
    Config c = full;  // the first L layers, then the final norm and lm_head
    c.num_layers = L;
    c.layer_types.resize(size_t(L));
    HostWeights w = all;
    w.layers.resize(size_t(L));
    CpuModel cpu(c, std::move(w));
    CpuState st = cpu.new_state(256);
    std::vector<float> want = cpu.forward(st, gold.prompt, true);
    GpuModel gpu(g->driver, g->ctx, g->jit, c, ckpt, options(WeightFormat::BF16, 0));
    std::vector<float> got = gpu.forward(gold.prompt, true);
    report += fmt::format("  layers 0..{} ({}): rel_l2 {:.4f}, max rel {:.4f}\n", L - 1,
                          c.layer_types.back() == LayerType::FullAttention ? "full" : "linear", rel_fro(got, want),
                          max_rel(got, want));
    CHECK(rel_fro(got, want) <= 2e-2);
  }
  MESSAGE("bf16 GPU vs fp32 CPU by depth:\n" << report);
}

TEST_CASE("GPU model, tiny fixture, W4A16: deltas reported; a quantized checkpoint loads to the same logits") {
  auto g = open_gpu();
  const Config c = Config::from_file(model_dir() / "config.json");
  Checkpoint ckpt(model_dir());
  const Goldens gold = load_goldens();
  for (int group : {32, 64}) {
    CAPTURE(group);
    GpuModel model(g->driver, g->ctx, g->jit, c, ckpt, options(WeightFormat::W4A16, group));
    std::vector<float> logits = model.forward(gold.prompt, true);
    std::vector<int32_t> ids = greedy_ids(model, gold.prompt, gold.greedy.size());
    size_t same = 0;
    while (same < ids.size() && ids[same] == gold.greedy[same]) ++same;
    MESSAGE("w4a16 g" << group << ": max|dlogit|/max|logit| = " << max_rel(logits, gold.prompt_logits)
                      << ", greedy tokens equal to transformers fp32 before the first difference: " << same << "/32");
    for (float x : logits) REQUIRE(std::isfinite(x));

    // The same weights from a `q35jit quantize` checkpoint: bit-identical logits.
    test::TempDir tmp("gpu-quantized");
    quantize_checkpoint(model_dir(), tmp.path() / "q", group, 4);
    Checkpoint qckpt(tmp.path() / "q");
    validate_quantized_checkpoint(c, qckpt, group);
    GpuModelOptions o = options(WeightFormat::W4A16, group);
    o.prequantized = true;
    GpuModel qmodel(g->driver, g->ctx, g->jit, c, qckpt, o);
    CHECK(qmodel.forward(gold.prompt, true) == logits);
  }
}

// --quant fp8 from the bf16 fixture: the GPU quantizes every projection, expert and lm_head to FP8
// (blocks [1, 128]); the CPU reference runs the same FP8 values (load_host_weights_fp8: the host
// quantizer is bit-exact with the GPU's). Prefill logits, one-token decode steps (the plain step and
// the residual epilogues), the captured decode graph's greedy ids, and the distance to transformers
// fp32 (reported).
TEST_CASE("GPU model, tiny fixture, FP8: logits of the CPU reference on the same FP8 weights, prefill and decode") {
  auto g = open_gpu();
  const Config c = Config::from_file(model_dir() / "config.json");
  Checkpoint ckpt(model_dir());
  const Goldens gold = load_goldens();
  CpuModel cpu(c, load_host_weights_fp8(c, ckpt));
  CpuState st = cpu.new_state(256);
  const std::vector<float> want = cpu.forward(st, gold.prompt, true);
  // Greedy ids and the logits of each decode step, from the CPU reference.
  std::vector<int32_t> cpu_ids;
  std::vector<float> cpu_steps;
  {
    CpuState s2 = cpu.new_state(256);
    std::vector<float> last = cpu.forward(s2, gold.prompt, false);
    for (int i = 0; i < 12; ++i) {
      cpu_ids.push_back(argmax(last));
      last = cpu.forward(s2, std::span<const int32_t>(&cpu_ids.back(), 1), false);
      cpu_steps.insert(cpu_steps.end(), last.begin(), last.end());
    }
  }
  for (bool fused_decode : {false, true}) {
    CAPTURE(fused_decode);
    GpuModelOptions o = options(WeightFormat::FP8, 0);
    o.fused_decode = fused_decode;
    GpuModel model(g->driver, g->ctx, g->jit, c, ckpt, o);
    const std::vector<float> logits = model.forward(gold.prompt, true);
    const double rel = rel_fro(logits, want);
    MESSAGE("fp8 GPU vs fp8 CPU reference, " << gold.prompt.size() << " positions: ||dlogits||/||logits|| = " << rel
                                             << "; vs transformers fp32 (bf16 weights): "
                                             << rel_fro(logits, gold.prompt_logits));
    CHECK(rel <= 2e-2);
    // One token at a time after the prompt (decode-sized calls: GEMVs, MoE decode path).
    model.reset();
    model.forward(gold.prompt, false);
    std::vector<float> steps;
    for (int32_t id : cpu_ids) {
      const std::vector<float> row = model.forward(std::span<const int32_t>(&id, 1), false);
      steps.insert(steps.end(), row.begin(), row.end());
    }
    MESSAGE("fp8 decode steps (fused_decode " << fused_decode << "): ||dlogits||/||logits|| = " << rel_fro(steps, cpu_steps));
    CHECK(rel_fro(steps, cpu_steps) <= 2e-2);
    // The captured decode graph: the reference's greedy ids, up to near-ties.
    const std::vector<int32_t> ids = greedy_ids(model, gold.prompt, cpu_ids.size());
    size_t same = 0;
    while (same < ids.size() && ids[same] == cpu_ids[same]) ++same;
    MESSAGE("fp8 greedy ids equal to the CPU reference's before the first difference: " << same << "/" << ids.size());
    CHECK(same >= 4);
  }
  // The whole 99-token prompt as one chunk: past a decode step's 64 rows, so its MoE takes the
  // expert-grouped kernels of prompt chunks (the default crossover, 128 tokens; no FP8 tune entries).
  REQUIRE((gold.prompt.size() > 64 && gold.prompt.size() <= 128));
  GpuModelOptions o = options(WeightFormat::FP8, 0);
  o.max_chunk = 128;
  GpuModel model(g->driver, g->ctx, g->jit, c, ckpt, o);
  const std::vector<float> logits = model.forward(gold.prompt, true);
  MESSAGE("fp8 one 99-token chunk (grouped MoE): ||dlogits||/||logits|| = " << rel_fro(logits, want));
  CHECK(rel_fro(logits, want) <= 2e-2);
}

TEST_CASE("GPU model: context overflow and bad ids are errors, and the model stays usable") {
  auto g = open_gpu();
  const Config c = Config::from_file(model_dir() / "config.json");
  Checkpoint ckpt(model_dir());
  GpuModelOptions o = options(WeightFormat::BF16, 0);
  o.max_context = 16;
  GpuModel model(g->driver, g->ctx, g->jit, c, ckpt, o);
  std::vector<int32_t> long_prompt(17, 5);
  CHECK(error_of([&] { model.forward(long_prompt, false); }).find("context overflow") != std::string::npos);
  std::vector<int32_t> bad = {1, 2, int32_t(c.vocab_size)};
  CHECK(error_of([&] { model.forward(bad, false); }).find("outside the vocabulary") != std::string::npos);
  CHECK(model.position() == 0);
  std::vector<int32_t> ok(16, 7);
  CHECK(model.forward(ok, false).size() == size_t(c.vocab_size));
  CHECK(error_of([&] { model.decode(3, SamplingParams{}); }).find("context overflow") != std::string::npos);
}

TEST_CASE("GPU model: synthetic 35B-A3B shapes, W4A16 g128 and FP8, run end to end") {
  auto g = open_gpu();
  const Config c = Config::preset("35b-a3b");
  for (WeightFormat format : {WeightFormat::W4A16, WeightFormat::FP8}) {
  CAPTURE(int(format));
  GpuModel model(g->driver, g->ctx, g->jit, c, synthetic_35b_options(4096, 512, 1, format), 42);
  MESSAGE("35B-A3B synthetic: weights " << model.weight_bytes() / 1e9 << " GB, state " << model.state_bytes() / 1e6 << " MB");
  std::vector<int32_t> prompt(600);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t((i * 7919) % 248000);
  std::vector<float> logits = model.forward(prompt, false);
  REQUIRE(logits.size() == size_t(c.vocab_size));
  for (float x : logits) REQUIRE(std::isfinite(x));
  const SamplingParams greedy;
  int32_t id = argmax(logits);
  for (int i = 0; i < 4; ++i) {
    id = model.decode(id, greedy);
    CHECK((id >= 0 && id < c.vocab_size));
  }
  CHECK(model.position() == 604);
  // Kernel launches per decode step (the captured graph's kernel nodes; the default, unfused step):
  // embedding; per DeltaNet layer input norm, in_proj, gdn_decode, out_proj (the gated norm as its
  // input), post norm, router, gate_up, down; per attention layer input norm, qkv, qk_norm_rope, decode,
  // merge, o_proj, post norm, router, gate_up, down; then the final norm, lm_head, argmax, step.
  const std::optional<GraphNodeCounts> nodes = model.decode_graph_nodes();
  REQUIRE(nodes.has_value());
  const int64_t linear = c.num_layers_of(LayerType::LinearAttention), full = c.num_layers_of(LayerType::FullAttention);
  MESSAGE("decode step: " << nodes->kernels << " kernels (" << double(nodes->kernels) / double(c.num_layers)
                          << " per layer), " << nodes->memcpys << " memcpy, " << nodes->memsets << " memset");
  CHECK(nodes->kernels == 1 + 8 * linear + 10 * full + 4);
  CHECK(nodes->memcpys == 1);  // the step's input token from the previous sample
  CHECK(nodes->memsets == 1);  // the residual stream
  }
}

// The fused decode path (T <= 8: residual add + RMSNorm in the output-projection GEMV and the MoE down
// epilogues, the gated norm inside gdn_decode_norm, PDL) against the unfused one (a long forward call) on
// the same W4A16 weights, and decode_steps (graph replays chained on the device) == decode one by one.
TEST_CASE("GPU model, tiny fixture, W4A16: fused decode path == unfused prefill path; decode_steps == decode") {
  auto g = open_gpu();
  const Config c = Config::from_file(model_dir() / "config.json");
  Checkpoint ckpt(model_dir());
  const Goldens gold = load_goldens();
  for (int group : {32, 64})
  for (bool fused_decode : {false, true}) {  // the default decode step, and the residual epilogues
    CAPTURE(group);
    CAPTURE(fused_decode);
    GpuModelOptions o = options(WeightFormat::W4A16, group);
    o.fused_decode = fused_decode;
    o.max_chunk = 128;      // the whole sequence in one unfused call
    o.chunked_gdn = false;  // its DeltaNet by the fp32 recurrence, as decode (not the chunked kernels)
    GpuModel model(g->driver, g->ctx, g->jit, c, ckpt, o);
    const std::vector<int32_t> ids = greedy_ids(model, gold.prompt, 12);
    model.reset();
    const SamplingParams greedy;
    const int32_t first = model.prefill(gold.prompt, greedy);
    CHECK(first == ids[0]);
    CHECK(model.decode_steps(first, int64_t(ids.size()) - 1, greedy) == ids.back());
    // One-token forward calls (the fused path, logits back) vs one call over prompt + ids (unfused).
    std::vector<int32_t> seq = gold.prompt;
    seq.insert(seq.end(), ids.begin(), ids.end() - 1);
    REQUIRE(int64_t(seq.size()) <= o.max_chunk);
    model.reset();
    const std::vector<float> all = model.forward(seq, true);
    model.reset();
    model.forward(gold.prompt, false);
    const size_t V = size_t(c.vocab_size);
    std::vector<float> fused, unfused;
    for (size_t i = 0; i + 1 < ids.size(); ++i) {
      const std::vector<float> row = model.forward(std::span<const int32_t>(&ids[i], 1), false);
      fused.insert(fused.end(), row.begin(), row.end());
      const size_t at = (gold.prompt.size() + i) * V;
      unfused.insert(unfused.end(), all.begin() + at, all.begin() + at + V);
    }
    MESSAGE("w4a16 g" << group << (fused_decode ? " fused" : " plain") << " one-token decode vs one call (unfused) logits: ||d||/||l|| = "
                      << rel_fro(fused, unfused));
    CHECK(rel_fro(fused, unfused) <= 2e-2);
  }
}
