// q35jit tune: measure the best tile config of every tunable kernel a checkpoint needs, per M bucket,
// into this GPU's tune-cache file (autotune/tuner.h, autotune/tune_cache.h); `--check FILE` validates
// a file and `--show` prints the config each kernel of a run would use.
#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include <fmt/format.h>

#include "autotune/spaces.h"
#include "autotune/tune_cache.h"
#include "autotune/tuner.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "models/qwen35/tune_ops.h"
#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"
#include "runtime/jit/kernel_set.h"

namespace q35::cli {

namespace {

namespace fs = std::filesystem;

const std::vector<FlagSpec> kTuneFlags = {
    {"model", "DIR", "checkpoint folder (only config.json is read)"},
    {"synthetic", "NAME", "the shapes of a published model instead: 35b-a3b, 122b-a10b, 397b-a17b"},
    {"quant", "bf16|w4a16|fp8", "weight format to tune for (default w4a16)"},
    {"group-size", "G", "W4A16 group size (default 128, or the largest dividing every K)"},
    {"sweep", "LO..HI", "token counts M to cover (default 1..4096)"},
    {"buckets", "LIST", "M buckets, comma-separated (default vLLM's 1,2,4,8,16,24,32,48,64,96,128,256,512,...,4096)"},
    {"out", "FILE", "tune file to write (default: the user cache dir, <GPU name>.json)"},
    {"resume", "", "keep the entries already in --out and measure only the missing ones"},
    {"replays", "N", "timed graph replays per config, median taken (default 15)"},
    {"min-gain", "PCT", "a candidate replaces the default only when this many percent faster (default 3)"},
    {"threads", "N", "parallel NVRTC compiles (default: hardware threads)"},
    {"quiet", "", "no progress bar"},
    {"check", "FILE", "validate a tune file and exit"},
    {"show", "", "print the config every tunable kernel would run with, and where it comes from"},
    {"gpu", "NAME", "with --show and no GPU: the device name to look up (e.g. \"NVIDIA H100 80GB HBM3\")"},
    {"sm", "SM", "with --gpu: its compute capability (e.g. sm_90)"},
};

// Set by SIGINT; the tuner finishes the current measurement, saves and returns.
std::atomic<bool> g_interrupted{false};
extern "C" void on_sigint(int) { g_interrupted.store(true); }

int check_file(const fs::path& path) {
  const TuneFile f = TuneFile::load(path);  // Error names the file and field
  std::vector<std::string> problems;
  for (const auto& [family, sigs] : f.entries())
    for (const auto& [sig, buckets] : sigs)
      for (const auto& [bucket, entry] : buckets)
        if (std::string why = tune::why_malformed(family, entry.config); !why.empty())
          problems.push_back(fmt::format("entries.{}.{}.\"{}\".config: {}", family, sig, bucket, why));
  if (!problems.empty()) {
    for (const std::string& p : problems) std::fprintf(stderr, "%s: %s\n", path.string().c_str(), p.c_str());
    fail("{}: {} invalid entr{} (see above)", path.string(), problems.size(), problems.size() == 1 ? "y" : "ies");
  }
  const TuneIdentity& id = f.identity();
  std::printf("%s: OK, format version %d, %zu entries for %s (%s), NVRTC %s, %s\n", path.string().c_str(),
              kTuneFormatVersion, f.size(), id.gpu.c_str(), id.sm.c_str(), id.nvrtc.c_str(), id.tool.c_str());
  return 0;
}

}  // namespace

int cmd_tune(int argc, char** argv) {
  Args args("tune", kTuneFlags, argc, argv, 2);
  if (args.help()) {
    std::printf(
        "usage: q35jit tune (--model DIR | --synthetic NAME) [--sweep 1..4095] [--buckets LIST] [--out FILE] "
        "[--resume]\n       q35jit tune --check FILE\n       q35jit tune (--model DIR | --synthetic NAME) --show\n\n%s",
        args.usage().c_str());
    return 0;
  }
  if (auto path = args.get("check")) return check_file(*path);
  const ModelSource src = model_source(args);
  const qwen35::Config& config = src.config;
  const WeightChoice w = weight_choice(args, config, src.dir());
  const auto [lo, hi] = parse_sweep(args.get("sweep").value_or("1..4096"));
  const std::vector<int64_t> buckets =
      clip_buckets(args.has("buckets") ? parse_buckets(*args.get("buckets")) : default_tune_buckets(), lo, hi);
  auto log = [](const std::string& line) { std::fprintf(stderr, "[q35jit] %s\n", line.c_str()); };

  if (args.flag("show")) {
    // The device: the GPU present, or --gpu/--sm.
    TuneIdentity id;
    std::string arch = "sm_90a";
    if (args.has("gpu")) {
      id.gpu = args.require("gpu");
      id.sm = args.require("sm");
      arch = id.sm == "sm_90" ? "sm_90a" : id.sm;
    } else {
      Driver driver;
      Context ctx(driver, 0);
      id = tune_identity(ctx.device());
      arch = ctx.device().arch();
    }
    const TuneTable table = TuneTable::find(id, executable_dir(), log);
    std::printf("device: %s (%s); tune files:", id.gpu.c_str(), id.sm.c_str());
    if (table.empty()) std::printf(" none (run q35jit tune)");
    for (const TuneTable::Layer& l : table.layers()) std::printf(" %s", l.origin.c_str());
    std::printf("\n%-18s %-34s %6s  %-8s %s\n", "family", "signature", "M", "source", "config");
    for (const auto& op : qwen35::tune_ops(config, w.group, arch, nullptr))
      for (int64_t m : buckets) {
        if (!op->serves(m)) continue;
        std::optional<TuneTable::Hit> hit = table.lookup_hit(op->family(), op->signature(), m);
        if (hit)
          std::printf("%-18s %-34s %6lld  tuned    %s  (M=%lld of %s: %.2f us, default %.2f us)\n", op->family().c_str(),
                      op->signature().c_str(), (long long)m, hit->entry->config.dump().c_str(), (long long)hit->bucket,
                      hit->origin->c_str(), hit->entry->us, hit->entry->default_us);
        else
          std::printf("%-18s %-34s %6lld  default  %s\n", op->family().c_str(), op->signature().c_str(), (long long)m,
                      op->default_config(m).dump().c_str());
      }
    return 0;
  }
  if (args.has("gpu") || args.has("sm")) fail("q35jit tune: --gpu and --sm go with --show");

  Driver driver;
  Context ctx(driver, 0);
  JitEngine jit(default_cache_dir());
  KernelSet kernels(jit, ctx);
  const TuneIdentity id = tune_identity(ctx.device());
  const fs::path out = args.has("out") ? fs::path(*args.get("out")) : default_tune_output(id.gpu);
  TuneFile file(id);
  if (fs::exists(out)) {
    file = TuneFile::load(out);
    if (std::string why = file.why_not_for(id); !why.empty())
      fail("--out {}: {}; write this GPU's results to another file", out.string(), why);
  } else if (args.flag("resume")) {
    log(fmt::format("--resume: {} does not exist yet, starting a new file", out.string()));
  }

  TuneOptions opt;
  opt.buckets = buckets;
  opt.compile_threads = int(args.get_int("threads", 0, 0, 1024));
  opt.replays = int(args.get_int("replays", 15, 3, 1000));
  opt.resume = args.flag("resume");
  opt.min_gain = args.get_double("min-gain", 3.0) / 100.0;
  if (!(opt.min_gain >= 0 && opt.min_gain < 1)) fail("q35jit tune: --min-gain must be in [0, 100), got {}", *args.get("min-gain"));
  opt.out = out;
  opt.progress = !args.flag("quiet");
  opt.log = log;
  opt.stop = &g_interrupted;
  g_interrupted.store(false);
  auto previous = std::signal(SIGINT, on_sigint);

  const qwen35::TuneDevice device{driver, ctx, jit, kernels};
  const auto ops = qwen35::tune_ops(config, w.group, ctx.device().arch(), &device);
  log(fmt::format("tuning {} kernel instances for {} ({}) at M in {}..{} ({} buckets), {} -> {}", ops.size(), id.gpu,
                  weight_format_name(w.group), buckets.front(), buckets.back(), buckets.size(),
                  src.name(), out.string()));
  Tuner tuner(driver, ctx, jit, kernels, opt);
  TuneReport report;
  try {
    report = tuner.run(ops, file);
  } catch (...) {
    std::signal(SIGINT, previous);
    throw;
  }
  std::signal(SIGINT, previous);

  std::printf("%s", format_summary(report).c_str());
  int measured = 0, skipped = 0;
  for (const TuneRow& r : report.rows) (r.skipped ? skipped : measured) += 1;
  std::printf("%d entries measured, %d kept from the file; %d kernels compiled in %s, measured in %s; saved %s\n",
              measured, skipped, report.kernels_compiled, format_duration(report.compile_s).c_str(),
              format_duration(report.measure_s).c_str(), out.string().c_str());
  if (report.interrupted) {
    std::fprintf(stderr, "interrupted: every finished measurement is saved in %s; run again with --resume to continue\n",
                 out.string().c_str());
    return 130;
  }
  return 0;
}

}  // namespace q35::cli
