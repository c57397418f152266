// q35jit bench: the speed figures of a checkpoint, or of a published model's shapes with random
// weights, on the GPU: time to first token at several prompt lengths, decode tok/s at several
// contexts (CUDA graph), batched decode throughput at several batch sizes (--batch), load time,
// JIT cold and warm start, peak GPU memory. Tuned and default
// tile configs run one after the other (never both resident) and print side by side, each figure
// beside its floor: models/qwen35/floors from the config, with the copy bandwidth and bf16 mma
// rate measured at the start of the same run (autotune/device_probe).
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "autotune/device_probe.h"
#include "autotune/tuner.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "models/qwen35/batch.h"
#include "models/qwen35/floors.h"
#include "models/qwen35/gpu_model.h"
#include "models/qwen35/kernels.h"
#include "models/qwen35/quantized.h"
#include "models/qwen35/tune_ops.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"
#include "runtime/cuda/driver.h"
#include "runtime/cuda/kernel_trace.h"
#include "runtime/io/safetensors.h"
#include "runtime/jit/jit_engine.h"
#include "runtime/jit/kernel_set.h"

namespace q35::cli {

namespace {

namespace fs = std::filesystem;
using qwen35::GpuModel;
using qwen35::GpuModelOptions;

const std::vector<FlagSpec> kBenchFlags = {
    {"model", "DIR", "checkpoint folder"},
    {"synthetic", "NAME", "random weights of a published model's shapes instead: 35b-a3b, 122b-a10b, 397b-a17b"},
    {"quant", "bf16|w4a16|fp8", "weight format (default w4a16)"},
    {"group-size", "G", "W4A16 group size (default 128, or the largest dividing every K)"},
    {"prefill", "LIST", "prompt lengths to time, comma-separated (default 128,512,1024,2048,4096)"},
    {"decode-contexts", "LIST", "contexts to time decode at, comma-separated (default 128,1024,4096,16384)"},
    {"decode-steps", "N", "decode steps timed per context and per batch size, median reported (default 64)"},
    {"batch", "LIST", "batch sizes to time the batched decode step at, comma-separated, e.g. 1,4,16,64 (default: "
                      "none); the model gets max(LIST) sequence slots"},
    {"batch-context", "N", "tokens each sequence of --batch holds before the timed steps (default 512)"},
    {"repeats", "N", "prefill repeats per length after one warm-up, median reported (default 3)"},
    {"configs", "SETS", "tile configs to time: tuned,default (side by side, the default), tuned or default"},
    {"kernels", "", "also time every tunable kernel at every M bucket: tuned config vs default (same inputs)"},
    {"json", "FILE", "also write every figure as JSON"},
    {"profile", "", "record only the timed prefills (after warm-up) in a profiler started with "
                    "`ncu --profile-from-start off` (scripts/gpu_profile.sh sums them per kernel)"},
    {"fused-decode", "", "decode steps with the residual add + RMSNorm in the output projection and MoE down "
                         "kernels (instead of the rmsnorm kernel between sub-layers)"},
    {"no-pdl", "", "decode kernels without programmatic dependent launch"},
    {"no-gdn-out-pdl", "", "the DeltaNet out_proj GEMV of a decode step without programmatic dependent launch"},
    {"profile-decode", "", "record only the first chained decode run of the first context (its "
                           "decode-steps / 3 steps) in such a profiler (scripts/gpu_profile.sh decode)"},
    {"trace", "WHAT", "kernel timeline through CUPTI (libcupti.so, or Q35JIT_CUPTI): decode (the first chained "
                      "decode run of the first context), prefill (the timed prefills of every length) or "
                      "decode,prefill; prints per kernel its launches, time, idle gaps before it and PDL overlap"},
    {"trace-json", "FILE", "with --trace: also write every traced kernel (name, start, end ns, grid) as JSON"},
};

// "128,512" -> {128, 512}; Error naming `flag` on anything but positive integers.
std::vector<int64_t> parse_list(const std::string& flag, const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end || v < 1)
      fail("q35jit bench: --{} expects positive integers separated by commas, got '{}'", flag, item);
    out.push_back(v);
  }
  if (out.empty()) fail("q35jit bench: --{} is empty", flag);
  return out;
}

// The config sets to time, tuned first: "tuned", "default", or both.
std::vector<std::string> parse_configs(const std::string& text) {
  // In the order given: the set timed first also runs first (to see order effects).
  std::vector<std::string> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    if (item != "tuned" && item != "default")
      fail("q35jit bench: --configs expects tuned, default, tuned,default or default,tuned, got '{}'", text);
    if (std::find(out.begin(), out.end(), item) == out.end()) out.push_back(item);
  }
  if (out.empty()) fail("q35jit bench: --configs expects tuned, default, tuned,default or default,tuned, got '{}'", text);
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// `n` token ids, the same for a given (n, salt) in every config set (so both route alike).
std::vector<int32_t> random_tokens(const qwen35::Config& config, int64_t n, uint32_t salt) {
  std::mt19937 rng(uint32_t(n) * 2654435761u + salt);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(std::min<int64_t>(config.vocab_size, 200000) - 1));
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& t : v) t = tok(rng);
  return v;
}

// The largest GPU memory use (total - free) seen: sample() on the calling thread, and every
// millisecond on a helper thread between begin_watch() and end_watch() (model loading frees its
// staging buffers before it returns).
class PeakMemory {
 public:
  explicit PeakMemory(const Context& ctx) : ctx_(ctx) {}
  PeakMemory(const PeakMemory&) = delete;
  PeakMemory& operator=(const PeakMemory&) = delete;

  size_t used() const {
    auto [free_bytes, total] = ctx_.mem_info();
    return total - free_bytes;
  }
  void sample() {
    const size_t v = used();
    size_t cur = peak_.load();
    while (v > cur && !peak_.compare_exchange_weak(cur, v)) {
    }
  }
  size_t peak() const { return peak_.load(); }

  void begin_watch() {
    watcher_ = std::jthread([this](std::stop_token stop) {
      try {
        ctx_.make_current();
        while (!stop.stop_requested()) {
          sample();
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
      } catch (...) {
        error_ = std::current_exception();
      }
    });
  }
  // Joins the helper thread; rethrows its error, if any.
  void end_watch() {
    if (watcher_.joinable()) {
      watcher_.request_stop();
      watcher_.join();
    }
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  const Context& ctx_;
  std::atomic<size_t> peak_{0};
  std::exception_ptr error_;
  std::jthread watcher_;  // last: joined before the members it reads are destroyed
};

// A new empty folder under the system temp dir, removed with its contents on destruction.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag)
      : path_(fs::temp_directory_path() / fmt::format("q35jit-{}-{}", tag, ::getpid())) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

struct JitFigures {
  size_t kernels = 0;
  std::string arch;
  int threads = 0;
  double cold_ms = 0, warm_ms = 0;
  int cold_compiled = 0, warm_disk_hits = 0;
};

// Every kernel the model needs, compiled by a fresh engine over an empty cache folder (cold: all
// NVRTC), then by a second fresh engine over the same folder (warm: all disk hits).
JitFigures time_jit(const std::vector<KernelSpec>& specs, const std::string& arch) {
  JitFigures f;
  f.kernels = specs.size();
  f.arch = arch;
  f.threads = int(std::max(1u, std::thread::hardware_concurrency()));
  ScratchDir dir("bench-jit");
  {
    JitEngine cold(dir.path());
    const auto t0 = std::chrono::steady_clock::now();
    cold.compile_all(specs, arch, f.threads);
    f.cold_ms = ms_since(t0);
    f.cold_compiled = cold.stats().compiled;
  }
  JitEngine warm(dir.path());
  const auto t0 = std::chrono::steady_clock::now();
  warm.compile_all(specs, arch, f.threads);
  f.warm_ms = ms_since(t0);
  f.warm_disk_hits = warm.stats().disk_hits;
  return f;
}

struct Plan {
  std::vector<int64_t> prefill;   // prompt lengths
  std::vector<int64_t> contexts;  // decode contexts
  std::vector<int64_t> batches;   // batched decode step sizes (--batch)
  int64_t batch_context = 512;    // tokens each of their sequences holds first
  int64_t steps = 64;
  int repeats = 3;
  bool profile = false;  // timed prefills between cuProfilerStart / cuProfilerStop
  bool profile_decode = false;  // the first chained decode run of the first context, likewise
  bool trace_decode = false, trace_prefill = false;  // the same regions in a CUPTI kernel trace
  KernelTrace* tracer = nullptr;
  nlohmann::json* trace_json = nullptr;  // every traced region's records (--trace-json)
};

// Prints the summary of one traced region and keeps its records for --trace-json.
void report_trace(const Plan& plan, const std::string& title, const std::vector<KernelRecord>& records, int repeats) {
  std::printf("\n%s", format_trace_summary(summarize_trace(records, repeats), title).c_str());
  if (plan.tracer->dropped())
    std::printf("(CUPTI dropped %llu records: the figures above miss them)\n",
                static_cast<unsigned long long>(plan.tracer->dropped()));
  std::fflush(stdout);
  if (!plan.trace_json) return;
  nlohmann::json region = {{"title", title}, {"repeats", repeats}, {"kernels", nlohmann::json::array()}};
  for (const KernelRecord& r : records)
    region["kernels"].push_back({{"name", r.name},
                                 {"start_ns", r.start},
                                 {"end_ns", r.end},
                                 {"stream", r.stream},
                                 {"graph_node", r.graph_node},
                                 {"grid", {r.grid[0], r.grid[1], r.grid[2]}},
                                 {"block", {r.block[0], r.block[1], r.block[2]}}});
  plan.trace_json->push_back(std::move(region));
}

// The figures of one config set.
struct SetFigures {
  std::string name;                  // "tuned" or "default"
  std::vector<std::string> tuning;   // tune-cache layers used (tuned set)
  double load_ms = 0;
  size_t weight_bytes = 0;
  size_t peak_bytes = 0;             // above the use before the model was created
  std::vector<double> prefill_ms;    // per Plan::prefill, time to first token
  std::vector<double> decode_ms;     // per Plan::contexts, per token: chained graph replays, CUDA events
  std::vector<double> decode_host_ms;  // per Plan::contexts, per token: one decode() call each (host round trip)
  GraphNodeCounts decode_nodes;        // the captured decode step's graph nodes (kernels = launches per token)
  std::vector<double> batch_ms;        // per Plan::batches: one batched step (all B tokens), median over steps
  std::vector<GraphNodeCounts> batch_nodes;  // per Plan::batches: its graph's nodes (B = 1: the single graph)
};

using BuildFn = std::function<std::unique_ptr<GpuModel>(JitEngine&, const GpuModelOptions&)>;

// Builds the model, times it, destroys it. Each set has its own JIT engine over the normal cache
// folder, so both load their kernels alike (from the disk cache, or NVRTC for entries not there).
SetFigures run_set(const std::string& name, const Context& ctx, const BuildFn& build, GpuModelOptions o,
                   const Plan& plan) {
  SetFigures f;
  f.name = name;
  if (name == "tuned") {
    o.tuning = load_tuning(ctx.device(), true, o.log);
    for (const TuneTable::Layer& l : o.tuning->layers()) f.tuning.push_back(l.origin);
    if (o.tuning->empty()) o.log("tuned: no tune cache for this GPU, every kernel takes its default tile");
  }
  PeakMemory mem(ctx);
  const size_t before = mem.used();
  mem.begin_watch();
  JitEngine jit(default_cache_dir());
  const auto t_load = std::chrono::steady_clock::now();
  std::unique_ptr<GpuModel> model = build(jit, o);
  f.load_ms = ms_since(t_load);
  mem.end_watch();
  mem.sample();
  f.weight_bytes = model->weight_bytes();
  o.log(fmt::format("{}: loaded in {:.0f} ms", name, f.load_ms));

  const SamplingParams greedy;  // temperature 0: argmax on the GPU
  for (int64_t L : plan.prefill) {
    const std::vector<int32_t> prompt = random_tokens(model->config(), L, 1);
    std::vector<double> ms;
    std::vector<KernelRecord> traced;
    for (int r = 0; r <= plan.repeats; ++r) {  // the first run warms up
      model->reset();
      const bool recorded = plan.profile && r > 0;
      const bool tracing = plan.trace_prefill && r > 0;
      if (recorded) ctx.driver().check(ctx.driver().api().profiler_start(), "cuProfilerStart");
      if (tracing) plan.tracer->start();
      const auto t0 = std::chrono::steady_clock::now();
      model->prefill(prompt, greedy);
      if (r > 0) ms.push_back(ms_since(t0));
      if (tracing) {
        std::vector<KernelRecord> got = plan.tracer->stop();
        traced.insert(traced.end(), got.begin(), got.end());
      }
      if (recorded) ctx.driver().check(ctx.driver().api().profiler_stop(), "cuProfilerStop");
    }
    if (plan.trace_prefill)
      report_trace(plan, fmt::format("{}: prefill of {} tokens, per prefill ({} traced)", name, L, plan.repeats), traced,
                   plan.repeats);
    f.prefill_ms.push_back(median(ms));
    mem.sample();
    o.log(fmt::format("{}: prefill {} tokens {:.2f} ms", name, L, f.prefill_ms.back()));
  }
  for (int64_t c : plan.contexts) {
    model->reset();
    int32_t next = model->prefill(random_tokens(model->config(), c, 2), greedy);
    std::vector<double> ms;
    for (int64_t i = 0; i < plan.steps + 2; ++i) {  // two warm-up steps: eager + capture, first replay
      const auto t0 = std::chrono::steady_clock::now();
      next = model->decode(next, greedy);
      if (i >= 2) ms.push_back(ms_since(t0));
    }
    f.decode_host_ms.push_back(median(ms));
    // The same steps chained on the device (each input is the previous sample), GPU time by events.
    std::vector<double> chained;
    for (int r = 0; r < 3; ++r) {
      const int64_t n = std::max<int64_t>(plan.steps / 3, 1);
      Event e0(ctx.driver()), e1(ctx.driver());
      const bool recorded = plan.profile_decode && r == 0 && c == plan.contexts.front();
      const bool tracing = plan.trace_decode && r == 0 && c == plan.contexts.front();
      if (recorded) ctx.driver().check(ctx.driver().api().profiler_start(), "cuProfilerStart");
      if (tracing) plan.tracer->start();
      e0.record(model->stream());
      next = model->decode_steps(next, n, greedy);
      e1.record(model->stream());
      e1.synchronize();
      if (tracing)
        report_trace(plan,
                     fmt::format("{}: decode at context {}, per step ({} chained steps traced; untraced runs below)",
                                 name, c, n),
                     plan.tracer->stop(), int(n));
      if (recorded) ctx.driver().check(ctx.driver().api().profiler_stop(), "cuProfilerStop");
      chained.push_back(double(e1.elapsed_ms_since(e0)) / double(n));
    }
    f.decode_ms.push_back(median(chained));
    if (const std::optional<GraphNodeCounts> nodes = model->decode_graph_nodes()) f.decode_nodes = *nodes;
    mem.sample();
    o.log(fmt::format("{}: decode at context {} {:.3f} ms/token (chained), {:.3f} ms (host loop)", name, c,
                      f.decode_ms.back(), f.decode_host_ms.back()));
  }
  // Batched decode: B sequences of batch_context random tokens each (slots 0 .. B-1), two warm-up
  // steps (eager + capture, first replay), then plan.steps replays timed one by one with CUDA events.
  for (int64_t B : plan.batches) {
    std::vector<GpuModel::BatchEntry> rows;
    for (int64_t b = 0; b < B; ++b) {
      model->reset(int(b));
      const int32_t first =
          model->prefill(random_tokens(model->config(), plan.batch_context, uint32_t(3 + b)), greedy, int(b));
      rows.push_back({int(b), first, greedy, false});
    }
    std::vector<int32_t> next = model->decode_batch_steps(rows, 2);
    for (size_t b = 0; b < rows.size(); ++b) rows[b].token = next[b];
    std::vector<double> ms;
    model->decode_batch_steps(rows, plan.steps + 1, &ms);
    f.batch_ms.push_back(median(ms));
    const std::optional<GraphNodeCounts> nodes =
        B == 1 ? model->decode_graph_nodes() : model->batch_graph_nodes(qwen35::decode_bucket(int(B), model->max_batch()));
    f.batch_nodes.push_back(nodes.value_or(GraphNodeCounts{}));
    mem.sample();
    o.log(fmt::format("{}: batched decode of {} sequences {:.3f} ms/step ({:.0f} tok/s)", name, B, f.batch_ms.back(),
                      double(B) * 1000.0 / f.batch_ms.back()));
  }
  f.peak_bytes = mem.peak() > before ? mem.peak() - before : 0;
  return f;
}

std::string fmt_ms(double ms) {
  if (ms < 10) return fmt::format("{:.3f} ms", ms);
  if (ms < 100) return fmt::format("{:.2f} ms", ms);
  if (ms < 1000) return fmt::format("{:.1f} ms", ms);
  return fmt::format("{:.0f} ms", ms);
}

// "31147" -> "31,147"
std::string with_commas(double v) {
  const std::string digits = fmt::format("{:.0f}", v);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

// "131.5 ms  31,147 tok/s": a time and the tokens per second it means.
std::string fmt_time_rate(double ms, double tokens) {
  return fmt::format("{}  {} tok/s", fmt_ms(ms), with_commas(tokens * 1000.0 / ms));
}

std::string fmt_gb(double bytes) { return fmt::format("{:.2f} GB", bytes / 1e9); }

std::string percent(double floor_ms, double ms) { return fmt::format("{:.0f}%", 100.0 * floor_ms / ms); }

}  // namespace

int cmd_bench(int argc, char** argv) {
  Args args("bench", kBenchFlags, argc, argv, 2);
  if (args.help()) {
    std::printf(
        "usage: q35jit bench (--model DIR | --synthetic NAME) [flags]\n\n"
        "Times prefill (time to first token), decode (CUDA graph), the batched decode step (--batch), load,\n"
        "JIT cold/warm start and peak GPU memory, for tuned and default tile configs, each beside its floor\n"
        "from the config and the GPU's measured copy bandwidth and bf16 mma rate.\n\n%s",
        args.usage().c_str());
    return 0;
  }
  Plan plan;
  plan.prefill = parse_list("prefill", args.get("prefill").value_or("128,512,1024,2048,4096"));
  plan.contexts = parse_list("decode-contexts", args.get("decode-contexts").value_or("128,1024,4096,16384"));
  plan.steps = args.get_int("decode-steps", 64, 1, 1 << 20);
  if (auto b = args.get("batch")) {
    plan.batches = parse_list("batch", *b);
    for (int64_t B : plan.batches)
      if (B > qwen35::kMaxStepRows)
        fail("q35jit bench: --batch {}: one batched step runs at most {} rows (larger batches run as consecutive "
             "steps of at most {}; time those)",
             B, qwen35::kMaxStepRows, qwen35::kMaxStepRows);
  }
  plan.batch_context = args.get_int("batch-context", 512, 1, int64_t(1) << 30);
  if (args.has("batch-context") && plan.batches.empty())
    fail("q35jit bench: --batch-context applies to --batch (give the batch sizes)");
  plan.repeats = int(args.get_int("repeats", 3, 1, 1000));
  plan.profile = args.flag("profile");
  plan.profile_decode = args.flag("profile-decode");
  std::optional<KernelTrace> tracer;
  nlohmann::json trace_json = nlohmann::json::array();
  if (auto t = args.get("trace")) {
    std::stringstream ss(*t);
    for (std::string item; std::getline(ss, item, ',');) {
      if (item == "decode")
        plan.trace_decode = true;
      else if (item == "prefill")
        plan.trace_prefill = true;
      else
        fail("q35jit bench: --trace expects decode, prefill or decode,prefill, got '{}'", *t);
    }
    tracer.emplace();  // fails here, naming the library, when CUPTI is missing
    plan.tracer = &*tracer;
    if (args.has("trace-json")) plan.trace_json = &trace_json;
  } else if (args.has("trace-json")) {
    fail("q35jit bench: --trace-json applies to --trace (say what to trace)");
  }
  const std::vector<std::string> sets = parse_configs(args.get("configs").value_or("tuned,default"));

  const ModelSource src = model_source(args);
  const std::optional<ModelInfo>& info = src.info;
  const qwen35::Config& config = src.config;
  const WeightChoice w = weight_choice(args, config, src.dir());
  const int group = w.group;  // the kernels' format code: 0 bf16, W4A16 group, kFp8Group
  const std::string weights = weight_format_name(group);
  if (info) {  // headers only: a bad checkpoint fails before any timing
    Checkpoint ckpt(info->dir);
    if (w.prequantized)
      qwen35::validate_quantized_checkpoint(config, ckpt, w.group);
    else
      qwen35::validate_checkpoint(config, ckpt);
  }

  const int64_t longest = *std::max_element(plan.prefill.begin(), plan.prefill.end());
  const int64_t deepest = *std::max_element(plan.contexts.begin(), plan.contexts.end());
  GpuModelOptions o;
  o.format = w.format;
  o.group = w.group;
  o.prequantized = w.prequantized;
  o.max_context = std::max(longest, deepest + 2 * plan.steps + 2);
  if (!plan.batches.empty()) {
    o.max_context = std::max(o.max_context, plan.batch_context + plan.steps + 4);
    o.max_batch = int(*std::max_element(plan.batches.begin(), plan.batches.end()));
    o.max_chunk = std::max<int64_t>(o.max_chunk, o.max_batch);  // the batched step's rows share the chunk scratch
  }
  o.max_chunk = std::min<int64_t>(longest, 4096);
  o.fused_decode = args.flag("fused-decode");
  o.pdl = !args.flag("no-pdl");
  o.gdn_out_pdl = !args.flag("no-gdn-out-pdl");
  o.log = [](const std::string& line) { std::fprintf(stderr, "[q35jit] %s\n", line.c_str()); };
  if (config.max_position_embeddings > 0 && o.max_context > config.max_position_embeddings)
    fail("q35jit bench: --prefill / --decode-contexts / --batch-context + --decode-steps need {} tokens of context; the "
         "model allows {}",
         o.max_context, config.max_position_embeddings);

  Driver driver;
  Context ctx(driver, 0);
  const DeviceInfo& dev = ctx.device();
  check_gpu_memory(ctx, config, o, src.name());
  DeviceRates rates;
  {
    JitEngine jit(default_cache_dir());
    Stream stream(driver);
    rates = measure_device_rates(jit, ctx, stream);
  }
  o.log(fmt::format("device: copy {:.2f} TB/s, bf16 mma.sync {:.0f} TFLOP/s", rates.copy_bytes_per_s / 1e12,
                    rates.mma_flops_per_s / 1e12));
  const JitFigures jf = time_jit(qwen35::required_kernels(config, group, dev.arch(), o.max_chunk), dev.arch());
  o.log(fmt::format("JIT: {} kernels cold {:.0f} ms, warm {:.0f} ms", jf.kernels, jf.cold_ms, jf.warm_ms));

  const BuildFn build = [&](JitEngine& jit, const GpuModelOptions& opts) {
    if (!info) return std::make_unique<GpuModel>(driver, ctx, jit, config, opts, 1234);
    Checkpoint ckpt(info->dir);
    return std::make_unique<GpuModel>(driver, ctx, jit, config, ckpt, opts);
  };
  std::vector<SetFigures> figures;
  for (const std::string& s : sets) figures.push_back(run_set(s, ctx, build, o, plan));

  // ---- per kernel: the tuned config of every bucket against the default, re-timed here ----
  TuneReport kernel_report;
  if (args.flag("kernels")) {
    const std::shared_ptr<const TuneTable> table = load_tuning(dev, true, o.log);
    JitEngine jit(default_cache_dir());
    KernelSet kernels(jit, ctx);
    const qwen35::TuneDevice device{driver, ctx, jit, kernels};
    TuneOptions topt;
    topt.buckets = clip_buckets(default_tune_buckets(), 1, o.max_chunk);
    topt.log = o.log;
    Tuner tuner(driver, ctx, jit, kernels, topt);
    kernel_report = tuner.compare(qwen35::tune_ops(config, group, dev.arch(), &device), *table);
  }

  // ---- floors ----
  const qwen35::ModelWork work(config, group);
  struct PrefillFloor {
    double ms, compute_ms, memory_ms;
  };
  std::vector<PrefillFloor> prefill_floor;
  for (int64_t L : plan.prefill)
    prefill_floor.push_back({work.prefill_floor_ms(L, rates.mma_flops_per_s, rates.copy_bytes_per_s),
                             work.prefill_compute_ms(L, rates.mma_flops_per_s),
                             work.prefill_memory_ms(L, rates.copy_bytes_per_s)});
  std::vector<double> decode_floor;
  for (int64_t c : plan.contexts) decode_floor.push_back(work.decode_floor_ms(c, rates.copy_bytes_per_s));
  // Batched steps: each sequence's context in the middle of the timed steps.
  const int64_t batch_ctx = plan.batch_context + 2 + plan.steps / 2;
  std::vector<double> batch_floor;
  for (int64_t B : plan.batches) batch_floor.push_back(work.decode_batch_floor_ms(B, batch_ctx, rates.copy_bytes_per_s));

  // ---- table ----
  const std::string model_name = info ? src.name() : "synthetic " + src.name();
  std::printf("%s (%s, %d SMs, %.1f GiB), %s, %s\n", dev.name.c_str(), dev.arch().c_str(), dev.sm_count,
              double(dev.total_mem) / double(1ull << 30), model_name.c_str(), weights.c_str());
  std::printf("measured: copy %.2f TB/s (read + written, %zu MiB buffer), bf16 mma.sync %.0f TFLOP/s (medians of %d)\n",
              rates.copy_bytes_per_s / 1e12, rates.copy_bytes >> 20, rates.mma_flops_per_s / 1e12, rates.runs);
  std::printf("work per token: %.0f M active params = %.3f GB of weights, DeltaNet state 2 x %.1f MB, KV %.1f KiB "
              "per token of context; prefill %.2f GFLOP per token + %.3f MFLOP x context\n",
              work.active_params() / 1e6, work.weight_bytes_per_token() / 1e9,
              (work.gdn_state_bytes() + work.conv_state_bytes()) / 1e6, work.kv_bytes_per_token() / 1024.0,
              (work.projection_flops_per_token() + work.gdn_chunk_flops_per_token()) / 1e9,
              work.attention_flops(1) / 1e6);
  std::printf("JIT, %zu kernels for %s on %d threads: cold %s (%d NVRTC), warm %s (%d disk hits)\n", jf.kernels,
              jf.arch.c_str(), jf.threads, fmt_ms(jf.cold_ms).c_str(), jf.cold_compiled, fmt_ms(jf.warm_ms).c_str(),
              jf.warm_disk_hits);
  for (const SetFigures& f : figures)
    if (f.name == "tuned")
      std::printf("tuned configs: %s\n", f.tuning.empty() ? "none for this GPU (defaults everywhere)"
                                                          : fmt::format("{}", fmt::join(f.tuning, ", ")).c_str());
  std::printf("decode: CUDA graph steps chained on the device (each input the previous sample), GPU time by CUDA "
              "events, median of 3 runs of %lld steps; host loop: median of %lld single decode() calls (launch, "
              "copy the id back, synchronize) after 2 warm-up steps; prefill: median of %d after 1 warm-up\n\n",
              (long long)std::max<int64_t>(plan.steps / 3, 1), (long long)plan.steps, plan.repeats);

  std::vector<std::string> head = {"figure"};
  for (const SetFigures& f : figures) head.push_back(f.name);
  head.push_back("floor");
  for (const SetFigures& f : figures) head.push_back(f.name + "/floor");
  std::vector<std::vector<std::string>> rows = {head};
  auto row = [&](const std::string& label, auto cell, const std::string& floor_cell, auto ratio) {
    std::vector<std::string> r = {label};
    for (const SetFigures& f : figures) r.push_back(cell(f));
    r.push_back(floor_cell);
    for (const SetFigures& f : figures) r.push_back(ratio(f));
    rows.push_back(std::move(r));
  };
  const auto none = [](const SetFigures&) { return std::string(); };
  row("load", [](const SetFigures& f) { return fmt_ms(f.load_ms); }, "", none);
  row("weights on the GPU", [](const SetFigures& f) { return fmt_gb(double(f.weight_bytes)); },
      fmt_gb(double(work.model_weight_bytes())) + " (config)", none);
  row("peak GPU memory", [](const SetFigures& f) { return fmt_gb(double(f.peak_bytes)); }, "", none);
  for (size_t i = 0; i < plan.prefill.size(); ++i) {
    const double L = double(plan.prefill[i]);
    const PrefillFloor& pf = prefill_floor[i];
    row(fmt::format("prefill {} (TTFT)", plan.prefill[i]),
        [&](const SetFigures& f) { return fmt_time_rate(f.prefill_ms[i], L); },
        fmt_time_rate(pf.ms, L) + (pf.memory_ms > pf.compute_ms ? " (bytes)" : " (FLOPs)"),
        [&](const SetFigures& f) { return percent(pf.ms, f.prefill_ms[i]); });
  }
  for (size_t i = 0; i < plan.contexts.size(); ++i)
    row(fmt::format("decode at {}", plan.contexts[i]),
        [&](const SetFigures& f) { return fmt_time_rate(f.decode_ms[i], 1); }, fmt_time_rate(decode_floor[i], 1),
        [&](const SetFigures& f) { return percent(decode_floor[i], f.decode_ms[i]); });
  // Achieved bandwidth: the bytes a step must read (the floor's bytes) over its measured time,
  // beside the measured copy bandwidth the floor assumes.
  for (size_t i = 0; i < plan.contexts.size(); ++i) {
    const double bytes = double(work.decode_bytes(plan.contexts[i]));
    row(fmt::format("decode at {}: bytes / time", plan.contexts[i]),
        [&](const SetFigures& f) { return fmt::format("{:.2f} TB/s", bytes / (f.decode_ms[i] * 1e-3) / 1e12); },
        fmt::format("{:.2f} TB/s (copy)", rates.copy_bytes_per_s / 1e12),
        [&](const SetFigures& f) { return percent(decode_floor[i], f.decode_ms[i]); });
  }
  if (!plan.contexts.empty()) {
    const double layers = double(config.num_layers);
    row("decode launches per step",
        [&](const SetFigures& f) {
          return fmt::format("{} ({:.2f} per layer)", f.decode_nodes.kernels, f.decode_nodes.kernels / layers);
        },
        "", none);
    row("decode graph nodes besides kernels",
        [](const SetFigures& f) {
          return fmt::format("{} memcpy, {} memset, {} other", f.decode_nodes.memcpys, f.decode_nodes.memsets,
                             f.decode_nodes.other);
        },
        "", none);
  }
  // Batched decode: the step's time, total and per-sequence tok/s; floor = the union of experts
  // the B tokens route to (uniform routing) + every sequence's state and KV rows, over the copy rate.
  for (size_t i = 0; i < plan.batches.size(); ++i) {
    const int64_t B = plan.batches[i];
    const auto cell = [B](double ms) {
      return fmt::format("{}  {} tok/s ({} per seq)", fmt_ms(ms), with_commas(double(B) * 1000.0 / ms),
                         with_commas(1000.0 / ms));
    };
    row(fmt::format("decode batch {} (step, ctx {})", B, batch_ctx),
        [&](const SetFigures& f) { return cell(f.batch_ms[i]); }, cell(batch_floor[i]),
        [&](const SetFigures& f) { return percent(batch_floor[i], f.batch_ms[i]); });
  }
  for (size_t i = 0; i < plan.batches.size(); ++i) {
    const double bytes = work.decode_batch_bytes(plan.batches[i], batch_ctx);
    row(fmt::format("decode batch {}: bytes / time", plan.batches[i]),
        [&](const SetFigures& f) {
          return fmt::format("{:.2f} GB / {:.2f} TB/s", bytes / 1e9, bytes / (f.batch_ms[i] * 1e-3) / 1e12);
        },
        fmt::format("{:.2f} TB/s (copy)", rates.copy_bytes_per_s / 1e12),
        [&](const SetFigures& f) { return percent(batch_floor[i], f.batch_ms[i]); });
  }
  for (size_t i = 0; i < plan.batches.size(); ++i)
    row(fmt::format("decode batch {}: launches per step", plan.batches[i]),
        [&](const SetFigures& f) { return std::to_string(f.batch_nodes[i].kernels); }, "", none);
  for (size_t i = 0; i < plan.contexts.size(); ++i)
    row(fmt::format("decode at {} (host loop)", plan.contexts[i]),
        [&](const SetFigures& f) { return fmt_time_rate(f.decode_host_ms[i], 1); }, fmt_time_rate(decode_floor[i], 1),
        [&](const SetFigures& f) { return percent(decode_floor[i], f.decode_host_ms[i]); });
  std::vector<size_t> width(head.size(), 0);
  for (const auto& r : rows)
    for (size_t c = 0; c < r.size(); ++c) width[c] = std::max(width[c], r[c].size());
  for (const auto& r : rows) {
    std::string line;
    for (size_t c = 0; c < r.size(); ++c)
      line += c ? fmt::format("  {:>{}}", r[c], width[c]) : fmt::format("{:<{}}", r[c], width[c]);
    std::printf("%s\n", line.c_str());
  }
  std::printf("floors: decode = bytes per token (weights, DeltaNet state read + written, KV read) / copy bandwidth; "
              "prefill = the larger of FLOPs / mma rate and the weights the prompt touches / copy bandwidth\n");
  if (!plan.batches.empty())
    std::printf("batched decode: B sequences of %lld random tokens each (slots 0..B-1), one token per sequence per "
                "step; GPU time of each CUDA-graph replay by CUDA events, median of %lld steps after 2 warm-up steps "
                "(B = 1: the single-sequence graph); floor = weights once (routed experts: the expected union of the "
                "B tokens' top-k under uniform routing) + per sequence DeltaNet state read + written and KV rows, "
                "over the copy bandwidth\n",
                (long long)plan.batch_context, (long long)plan.steps);

  if (args.flag("kernels")) {
    std::printf("\nper kernel, tuned config vs default re-timed (median of graph replays, microseconds):\n%s",
                format_summary(kernel_report).c_str());
    int slower = 0, changed = 0;
    for (const TuneRow& r : kernel_report.rows) {
      changed += r.best_us != r.default_us;
      slower += r.best_us > r.default_us * 1.02;
    }
    std::printf("%zu kernel x bucket pairs, %d with a tuned config other than the default; %d slower than the default "
                "by more than 2%%\n",
                kernel_report.rows.size(), changed, slower);
  }

  // ---- JSON ----
  if (auto path = args.get("json")) {
    nlohmann::json j;
    j["device"] = {{"name", dev.name}, {"arch", dev.arch()}, {"sm_count", dev.sm_count}, {"memory_bytes", dev.total_mem}};
    j["model"] = src.name();
    j["synthetic"] = !info;
    j["weights"] = weights;
    j["settings"] = {{"decode_steps", plan.steps}, {"repeats", plan.repeats}, {"max_chunk", o.max_chunk},
                     {"max_context", o.max_context}, {"max_batch", o.max_batch},
                     {"batch_context", plan.batch_context}};
    j["rates"] = {{"copy_bytes_per_s", rates.copy_bytes_per_s}, {"mma_flops_per_s", rates.mma_flops_per_s},
                  {"copy_buffer_bytes", rates.copy_bytes}, {"runs", rates.runs}};
    nlohmann::json parts = nlohmann::json::object();
    for (const qwen35::WeightPart& p : work.decode_parts()) parts[p.name] = {{"params", p.params}, {"bytes", p.bytes}};
    j["work"] = {{"active_params", work.active_params()},
                 {"parts", parts},
                 {"weight_bytes_per_token", work.weight_bytes_per_token()},
                 {"gdn_state_bytes", work.gdn_state_bytes()},
                 {"conv_state_bytes", work.conv_state_bytes()},
                 {"kv_bytes_per_token", work.kv_bytes_per_token()},
                 {"model_weight_bytes", work.model_weight_bytes()},
                 {"prefill_flops_per_token", work.projection_flops_per_token() + work.gdn_chunk_flops_per_token()},
                 {"attention_flops_per_token_of_context", work.attention_flops(1)}};
    j["jit"] = {{"kernels", jf.kernels}, {"arch", jf.arch},         {"threads", jf.threads},
                {"cold_ms", jf.cold_ms}, {"cold_compiled", jf.cold_compiled},
                {"warm_ms", jf.warm_ms}, {"warm_disk_hits", jf.warm_disk_hits}};
    nlohmann::json floors;
    for (size_t i = 0; i < plan.prefill.size(); ++i) {
      const PrefillFloor& pf = prefill_floor[i];
      floors["prefill"].push_back({{"tokens", plan.prefill[i]},
                                   {"ms", pf.ms},
                                   {"tok_s", plan.prefill[i] * 1000.0 / pf.ms},
                                   {"compute_ms", pf.compute_ms},
                                   {"memory_ms", pf.memory_ms},
                                   {"bound", pf.memory_ms > pf.compute_ms ? "bytes" : "flops"}});
    }
    for (size_t i = 0; i < plan.contexts.size(); ++i)
      floors["decode"].push_back({{"context", plan.contexts[i]},
                                  {"ms_per_token", decode_floor[i]},
                                  {"tok_s", 1000.0 / decode_floor[i]},
                                  {"bytes_per_token", work.decode_bytes(plan.contexts[i])}});
    for (size_t i = 0; i < plan.batches.size(); ++i)
      floors["decode_batch"].push_back({{"batch", plan.batches[i]},
                                        {"context", batch_ctx},
                                        {"ms_per_step", batch_floor[i]},
                                        {"tok_s", double(plan.batches[i]) * 1000.0 / batch_floor[i]},
                                        {"expected_experts_per_layer", work.expected_experts(plan.batches[i])},
                                        {"bytes_per_step", work.decode_batch_bytes(plan.batches[i], batch_ctx)}});
    j["floors"] = floors;
    for (const SetFigures& f : figures) {
      nlohmann::json s = {{"load_ms", f.load_ms},
                          {"weight_bytes", f.weight_bytes},
                          {"peak_gpu_bytes", f.peak_bytes}};
      if (f.name == "tuned") s["tuning"] = f.tuning;
      for (size_t i = 0; i < plan.prefill.size(); ++i)
        s["prefill"].push_back({{"tokens", plan.prefill[i]},
                                {"ms", f.prefill_ms[i]},
                                {"tok_s", plan.prefill[i] * 1000.0 / f.prefill_ms[i]},
                                {"of_floor", prefill_floor[i].ms / f.prefill_ms[i]}});
      s["decode_graph"] = {{"kernels", f.decode_nodes.kernels},
                           {"kernels_per_layer", double(f.decode_nodes.kernels) / double(config.num_layers)},
                           {"memcpys", f.decode_nodes.memcpys},
                           {"memsets", f.decode_nodes.memsets},
                           {"other", f.decode_nodes.other}};
      for (size_t i = 0; i < plan.contexts.size(); ++i)
        s["decode"].push_back({{"context", plan.contexts[i]},
                               {"achieved_bytes_per_s", double(work.decode_bytes(plan.contexts[i])) / (f.decode_ms[i] * 1e-3)},
                               {"ms_per_token", f.decode_ms[i]},
                               {"ms_per_token_host_loop", f.decode_host_ms[i]},
                               {"tok_s", 1000.0 / f.decode_ms[i]},
                               {"of_floor", decode_floor[i] / f.decode_ms[i]}});
      for (size_t i = 0; i < plan.batches.size(); ++i) {
        const double B = double(plan.batches[i]);
        s["decode_batch"].push_back(
            {{"batch", plan.batches[i]},
             {"context", batch_ctx},
             {"ms_per_step", f.batch_ms[i]},
             {"tok_s", B * 1000.0 / f.batch_ms[i]},
             {"tok_s_per_sequence", 1000.0 / f.batch_ms[i]},
             {"achieved_bytes_per_s", work.decode_batch_bytes(plan.batches[i], batch_ctx) / (f.batch_ms[i] * 1e-3)},
             {"of_floor", batch_floor[i] / f.batch_ms[i]},
             {"kernels_per_step", f.batch_nodes[i].kernels}});
      }
      j["configs"][f.name] = s;
    }
    for (const TuneRow& r : kernel_report.rows)
      j["kernels"].push_back({{"family", r.family},
                              {"signature", r.signature},
                              {"label", r.label},
                              {"m", r.bucket},
                              {"config", r.best},
                              {"tuned_us", r.best_us},
                              {"default_us", r.default_us}});
    std::ofstream out(*path);
    out << j.dump(2) << "\n";
    if (!out) fail("q35jit bench: cannot write --json {}", *path);
  }
  if (auto path = args.get("trace-json")) {
    std::ofstream out(*path);
    out << trace_json.dump() << "\n";
    if (!out) fail("q35jit bench: cannot write --trace-json {}", *path);
  }
  return 0;
}

}  // namespace q35::cli
