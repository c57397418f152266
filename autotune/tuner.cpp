#include "autotune/tuner.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <future>
#include <set>
#include <thread>

#include "runtime/core/error.h"
#include "runtime/core/thread_pool.h"

namespace q35 {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// A one-line progress bar on stderr, redrawn in place.
class Progress {
 public:
  Progress(bool enabled, std::string title, size_t total)
      : enabled_(enabled && total > 0), title_(std::move(title)), total_(total), t0_(Clock::now()) {}
  void update(size_t done, const std::string& what) {
    if (!enabled_) return;
    const double frac = double(done) / double(total_);
    const int width = 24, filled = int(frac * width);
    const double elapsed = seconds_since(t0_);
    const std::string eta = done > 0 && done < total_ ? format_duration(elapsed / double(done) * double(total_ - done)) : "-";
    std::string line = fmt::format("\r[{}] [{}{}] {}/{} {:3.0f}%  ETA {}  {}", title_, std::string(size_t(filled), '#'),
                                   std::string(size_t(width - filled), '.'), done, total_, frac * 100, eta, what);
    if (line.size() > 150) line.resize(150);
    std::fprintf(stderr, "%s\033[K", line.c_str());
    std::fflush(stderr);
  }
  void finish() {
    if (enabled_) std::fprintf(stderr, "\n");
  }

 private:
  bool enabled_;
  std::string title_;
  size_t total_;
  Clock::time_point t0_;
};

struct Work {
  TuneOp* op;
  int64_t m;
  std::vector<json> candidates;
  json fallback;
};

}  // namespace

double relative_l2(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || a.empty()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  return den > 0 ? std::sqrt(num / den) : (num > 0 ? INFINITY : 0.0);
}

std::string format_duration(double s) {
  if (s < 60) return fmt::format("{:.1f} s", s);
  const int total = int(s + 0.5);
  if (total < 3600) return fmt::format("{}m{:02d}s", total / 60, total % 60);
  return fmt::format("{}h{:02d}m", total / 3600, total / 60 % 60);
}

std::string format_summary(const TuneReport& r) {
  std::string out = fmt::format("{:<18} {:<34} {:>6} {:>11} {:>11} {:>8} {:>6}\n", "family", "signature", "M",
                                "default us", "tuned us", "speedup", "cands");
  for (const TuneRow& row : r.rows) {
    if (row.skipped) continue;
    out += fmt::format("{:<18} {:<34} {:>6} {:>11.2f} {:>11.2f} {:>7.2f}x {:>3}/{:<3}\n", row.family, row.signature,
                       row.bucket, row.default_us, row.best_us, row.best_us > 0 ? row.default_us / row.best_us : 0.0,
                       row.candidates - row.discarded, row.candidates);
  }
  return out;
}

Tuner::Tuner(const Driver& driver, const Context& ctx, JitEngine& jit, KernelSet& kernels, TuneOptions options)
    : driver_(driver), ctx_(ctx), jit_(jit), kernels_(kernels), options_(std::move(options)), stream_(driver) {}

double Tuner::time_config(TuneOp& op, const json& config, int64_t m, int reps) {
  Graph g = Graph::capture(driver_, stream_, [&] {
    for (int i = 0; i < reps; ++i) op.run(config, m, i, stream_);
  });
  GraphExec exec = g.instantiate();
  exec.launch(stream_);  // warm-up
  stream_.synchronize();
  Event start(driver_), end(driver_);
  std::vector<double> us;
  for (int r = 0; r < options_.replays; ++r) {
    start.record(stream_);
    exec.launch(stream_);
    end.record(stream_);
    end.synchronize();
    us.push_back(double(end.elapsed_ms_since(start)) * 1000.0 / reps);
  }
  return median(us);
}

Tuner::Baseline Tuner::baseline(TuneOp& op, const json& def, int64_t m) {
  Baseline b;
  op.prepare(def, m);
  op.run(def, m, 0, stream_);
  b.ref = op.output(stream_);
  // Random inputs never give an all-zero output; a non-finite or zero one means the op is broken.
  const bool nonzero = std::any_of(b.ref.begin(), b.ref.end(), [](float v) { return v != 0.f; });
  if (relative_l2(b.ref, b.ref) != 0 || !nonzero)
    fail("{} {} M={}: the default config's output is {}", op.family(), op.label(), m,
         nonzero ? "not finite" : "all zero");
  b.reps = reps_for(op, def, m);
  b.us = time_config(op, def, m, b.reps);
  return b;
}

double Tuner::deviation(TuneOp& op, const json& config, int64_t m, const std::vector<float>& ref) {
  op.prepare(config, m);
  op.run(config, m, 0, stream_);
  return relative_l2(op.output(stream_), ref);
}

int Tuner::reps_for(TuneOp& op, const json& config, int64_t m) {
  Event e0(driver_), e1(driver_);
  e0.record(stream_);
  op.run(config, m, 1, stream_);
  e1.record(stream_);
  e1.synchronize();
  const double once_us = std::max(1.0, double(e1.elapsed_ms_since(e0)) * 1000.0);
  return int(std::clamp(options_.graph_us / once_us, 1.0, 64.0));
}

std::pair<std::set<std::string>, double> Tuner::compile_specs(const std::vector<KernelSpec>& specs) {
  const std::string arch = ctx_.device().arch();
  auto t0 = Clock::now();
  std::set<std::string> failed;
  const int threads =
      options_.compile_threads > 0 ? options_.compile_threads : int(std::max(1u, std::thread::hardware_concurrency()));
  Progress bar(options_.progress, "compile", specs.size());
  std::vector<std::future<void>> futures;
  std::vector<std::string> errors(specs.size());
  {
    ThreadPool pool(threads);
    for (size_t i = 0; i < specs.size(); ++i)
      futures.push_back(pool.submit([&, i] {
        try {
          jit_.compile(specs[i], arch);
        } catch (const Error& e) {
          errors[i] = e.what();
        }
      }));
    for (size_t i = 0; i < futures.size(); ++i) {
      futures[i].get();
      bar.update(i + 1, specs[i].kernel);
    }
  }
  bar.finish();
  for (size_t i = 0; i < specs.size(); ++i)
    if (!errors[i].empty()) {
      failed.insert(specs[i].str());
      const std::string first = errors[i].substr(0, errors[i].find('\n'));
      if (options_.log) options_.log(fmt::format("candidate discarded, it does not compile: {}", first.substr(0, 300)));
    }
  return {failed, seconds_since(t0)};
}

TuneReport Tuner::compare(const std::vector<std::unique_ptr<TuneOp>>& ops, const TuneTable& table) {
  TuneReport report;
  auto t0 = Clock::now();
  size_t total = 0;
  for (const auto& op : ops)
    for (int64_t m : options_.buckets) total += op->serves(m);
  {
    std::vector<KernelSpec> specs;
    std::set<std::string> seen;
    for (const auto& op : ops)
      for (int64_t m : options_.buckets) {
        if (!op->serves(m)) continue;
        const json def = op->default_config(m);
        for (const json& c : {def, table.lookup(op->family(), op->signature(), m).value_or(def)})
          for (KernelSpec& s : op->kernels(c, m))
            if (seen.insert(s.str()).second) specs.push_back(std::move(s));
      }
    const auto [failed, compile_s] = compile_specs(specs);
    if (!failed.empty()) fail("{} kernels of the default or tuned configs do not compile (see above)", failed.size());
    report.kernels_compiled = int(specs.size());
    report.compile_s = compile_s;
  }
  Progress bar(options_.progress, "kernels", total);
  size_t done = 0;
  for (const auto& op : ops) {
    for (int64_t m : options_.buckets) {
      if (!op->serves(m)) continue;
      if (options_.stop && options_.stop->load()) {
        report.interrupted = true;
        break;
      }
      bar.update(done++, fmt::format("{} {} M={}", op->family(), op->label(), m));
      const json def = op->default_config(m);
      const json tuned = table.lookup(op->family(), op->signature(), m).value_or(def);
      for (const json* c : {&def, &tuned})
        for (const KernelSpec& s : op->kernels(*c, m)) kernels_.get(s);
      op->setup(m, stream_);
      TuneRow row;
      row.family = op->family(), row.signature = op->signature(), row.label = op->label(), row.bucket = m;
      row.best = tuned;
      const Baseline base = baseline(*op, def, m);
      row.default_us = row.best_us = base.us;
      if (tuned != def) {
        const double err = deviation(*op, tuned, m, base.ref);
        if (!(err <= op->tolerance()))
          fail("{} {} M={}: the tuned config {} gives another output than the default (rel. L2 {:.3g})", op->family(),
               op->label(), m, tuned.dump(), err);
        row.best_us = time_config(*op, tuned, m, base.reps);
      }
      report.rows.push_back(row);
    }
    op->release();
  }
  bar.update(done, "done");
  bar.finish();
  report.measure_s = seconds_since(t0);
  return report;
}

TuneReport Tuner::run(const std::vector<std::unique_ptr<TuneOp>>& ops, TuneFile& file) {
  TuneReport report;
  auto log = [&](const std::string& s) {
    if (options_.log) options_.log(s);
  };
  // The (op, bucket) pairs to measure.
  std::vector<Work> work;
  for (const auto& op : ops)
    for (int64_t m : options_.buckets) {
      if (!op->serves(m)) continue;
      if (options_.resume && file.has(op->family(), op->signature(), m)) {
        TuneRow row;
        row.family = op->family(), row.signature = op->signature(), row.label = op->label(), row.bucket = m;
        row.skipped = true;
        report.rows.push_back(row);
        continue;
      }
      work.push_back({op.get(), m, op->candidates(m), op->default_config(m)});
    }

  // 1. Compile every candidate's kernels in parallel (NVRTC or the JIT caches); remember failures.
  std::vector<KernelSpec> specs;
  std::set<std::string> seen;
  for (const Work& w : work) {
    auto add = [&](const json& c) {
      for (KernelSpec& s : w.op->kernels(c, w.m))
        if (seen.insert(s.str()).second) specs.push_back(std::move(s));
    };
    add(w.fallback);
    for (const json& c : w.candidates) add(c);
  }
  const auto [failed, compile_s] = compile_specs(specs);
  report.kernels_compiled = int(specs.size());
  report.compile_s = compile_s;

  // 2-5. Measure.
  auto t0 = Clock::now();
  Progress bar(options_.progress, "tune", work.size());
  TuneOp* current = nullptr;
  int64_t current_m = -1;
  for (size_t wi = 0; wi < work.size(); ++wi) {
    if (options_.stop && options_.stop->load()) {
      report.interrupted = true;
      break;
    }
    Work& w = work[wi];
    TuneOp& op = *w.op;
    bar.update(wi, fmt::format("{} {} M={}", op.family(), op.label(), w.m));
    if (current != &op || current_m != w.m) {
      if (current && current != &op) current->release();
      op.setup(w.m, stream_);
      current = &op, current_m = w.m;
    }
    auto loads = [&](const json& c) {
      for (const KernelSpec& s : op.kernels(c, w.m)) {
        if (failed.count(s.str())) return false;
        kernels_.get(s);
      }
      return true;
    };
    TuneRow row;
    row.family = op.family(), row.signature = op.signature(), row.label = op.label(), row.bucket = w.m;
    row.candidates = int(w.candidates.size());
    // The default: reference output and time (an error here is the op's problem, not a candidate's).
    if (!loads(w.fallback)) fail("{} {} M={}: the default config does not compile", op.family(), op.label(), w.m);
    const Baseline base = baseline(op, w.fallback, w.m);
    row.default_us = row.best_us = base.us;
    row.best = w.fallback;
    for (const json& c : w.candidates) {
      if (options_.stop && options_.stop->load()) break;
      if (c == w.fallback) continue;
      try {
        if (!loads(c)) {
          ++row.discarded;
          continue;
        }
        const double err = deviation(op, c, w.m, base.ref);
        if (!(err <= op.tolerance())) {
          ++row.discarded;
          log(fmt::format("candidate discarded, its output differs from the default's (rel. L2 {:.3g}): {} {} M={} {}",
                          err, op.family(), op.label(), w.m, c.dump()));
          continue;
        }
        const double us = time_config(op, c, w.m, base.reps);
        if (us < row.best_us && us <= row.default_us * (1.0 - options_.min_gain)) row.best_us = us, row.best = c;
      } catch (const Error& e) {
        ++row.discarded;
        log(fmt::format("candidate discarded: {} {} M={} {}: {}", op.family(), op.label(), w.m, c.dump(),
                        std::string(e.what()).substr(0, 200)));
        // A failed launch may leave the stream in error; the next default run tells (and throws).
        stream_.synchronize();
      }
    }
    if (options_.stop && options_.stop->load()) {
      report.interrupted = true;
      break;  // this bucket is incomplete: not saved
    }
    file.set(row.family, row.signature, w.m, TuneEntry{row.best, row.best_us, row.default_us});
    if (!options_.out.empty()) file.save(options_.out);
    report.rows.push_back(row);
  }
  if (current) current->release();
  bar.update(report.interrupted ? work.size() - 1 : work.size(), report.interrupted ? "interrupted" : "done");
  bar.finish();
  report.measure_s = seconds_since(t0);
  return report;
}

}  // namespace q35
