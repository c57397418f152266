// q35jit bench: prefill and decode speed on the GPU, for a checkpoint or a synthetic model of
// published shapes with random weights, beside the bandwidth floor of a decode step.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "models/qwen35/gpu_model.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/cuda/driver.h"
#include "runtime/io/safetensors.h"
#include "runtime/jit/jit_engine.h"

namespace q35::cli {

namespace {

const std::vector<FlagSpec> kBenchFlags = {
    {"model", "DIR", "checkpoint folder"},
    {"synthetic", "NAME", "random weights of a published model's shapes instead: 35b-a3b"},
    {"quant", "bf16|w4a16", "weight format (default w4a16)"},
    {"group-size", "G", "W4A16 group size (default 128, or the largest dividing every K)"},
    {"prefill", "LIST", "prompt lengths to time, comma-separated (default 512,4096)"},
    {"decode-context", "N", "context before the timed decode steps (default 128)"},
    {"decode-steps", "N", "decode steps timed (default 64)"},
    {"repeats", "N", "prefill repeats, median reported (default 3)"},
    {"json", "FILE", "also write the figures as JSON"},
};

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    char* end = nullptr;
    long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end || v < 1) fail("q35jit bench: --prefill expects positive integers, got '{}'", item);
    out.push_back(v);
  }
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  Args args("bench", kBenchFlags, argc, argv, 2);
  if (args.help()) {
    std::printf("usage: q35jit bench (--model DIR | --synthetic 35b-a3b) [flags]\n\n%s", args.usage().c_str());
    return 0;
  }
  if (args.has("model") == args.has("synthetic")) fail("q35jit bench: give --model DIR or --synthetic NAME");
  const std::vector<int64_t> lengths = parse_list(args.get("prefill").value_or("512,4096"));
  const int64_t ctx_len = args.get_int("decode-context", 128, 1, 1 << 20);
  const int64_t steps = args.get_int("decode-steps", 64, 1, 1 << 20);
  const int repeats = int(args.get_int("repeats", 3, 1, 1000));

  std::optional<ModelInfo> info;
  qwen35::Config config;
  if (auto dir = args.get("model")) {
    info = load_model_info(*dir);
    config = info->config;
  } else {
    config = qwen35::Config::preset(*args.get("synthetic"));
  }
  const WeightChoice w = weight_choice(args, config, info ? info->dir : std::filesystem::path());
  qwen35::GpuModelOptions o;
  o.format = w.format;
  o.group = w.group;
  o.prequantized = w.prequantized;
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  o.max_context = std::max(longest, ctx_len + steps);
  o.max_chunk = std::min<int64_t>(longest, 4096);
  o.log = [](const std::string& line) { std::fprintf(stderr, "[q35jit] %s\n", line.c_str()); };

  Driver driver;
  Context ctx(driver, 0);
  auto [free0, total] = ctx.mem_info();
  JitEngine jit(default_cache_dir());
  auto t_load = std::chrono::steady_clock::now();
  std::unique_ptr<qwen35::GpuModel> model;
  if (info) {
    Checkpoint ckpt(info->dir);
    model = std::make_unique<qwen35::GpuModel>(driver, ctx, jit, config, ckpt, o);
  } else {
    model = std::make_unique<qwen35::GpuModel>(driver, ctx, jit, config, o, 1234);
  }
  const double load_ms = ms_since(t_load);
  auto [free1, total1] = ctx.mem_info();

  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(std::min<int64_t>(config.vocab_size, 200000) - 1));
  auto random_tokens = [&](int64_t n) {
    std::vector<int32_t> v(static_cast<size_t>(n));
    for (auto& t : v) t = tok(rng);
    return v;
  };

  nlohmann::json j;
  j["device"] = ctx.device().name;
  j["model"] = info ? info->dir.string() : *args.get("synthetic");
  j["weights"] = o.format == qwen35::WeightFormat::BF16 ? "bf16" : fmt::format("w4a16 g{}", o.group);
  j["load_ms"] = load_ms;
  j["weight_bytes"] = model->weight_bytes();
  j["gpu_memory_used_bytes"] = free0 - free1;
  std::printf("%s, %s, %s: weights %.2f GB, GPU memory used %.2f GB, load %.0f ms\n", ctx.device().name.c_str(),
              j["model"].get<std::string>().c_str(), j["weights"].get<std::string>().c_str(),
              model->weight_bytes() / 1e9, (free0 - free1) / 1e9, load_ms);

  const SamplingParams greedy;  // temperature 0: argmax on the GPU
  for (int64_t L : lengths) {
    std::vector<int32_t> prompt = random_tokens(L);
    std::vector<double> ms;
    for (int r = 0; r <= repeats; ++r) {  // the first run warms up
      model->reset();
      auto t0 = std::chrono::steady_clock::now();
      model->prefill(prompt, greedy);
      if (r > 0) ms.push_back(ms_since(t0));
    }
    const double m = median(ms);
    j["prefill"][std::to_string(L)] = {{"ms", m}, {"tok_s", L * 1000.0 / m}};
    std::printf("prefill %6lld tokens: %8.2f ms  %9.0f tok/s (time to first token)\n", (long long)L, m, L * 1000.0 / m);
  }

  model->reset();
  int32_t next = model->prefill(random_tokens(ctx_len), greedy);
  std::vector<double> step_ms;
  for (int64_t i = 0; i < steps + 2; ++i) {  // two warm-up steps (eager + capture)
    auto t0 = std::chrono::steady_clock::now();
    next = model->decode(next, greedy);
    if (i >= 2) step_ms.push_back(ms_since(t0));
  }
  const double dm = median(step_ms);
  j["decode"] = {{"context", ctx_len}, {"ms_per_token", dm}, {"tok_s", 1000.0 / dm}};
  std::printf("decode at context %lld: %.3f ms/token  %.1f tok/s (CUDA graph, greedy on the GPU, median of %lld)\n",
              (long long)ctx_len, dm, 1000.0 / dm, (long long)steps);
  if (auto path = args.get("json")) std::ofstream(*path) << j.dump(2) << "\n";
  return 0;
}

}  // namespace q35::cli
