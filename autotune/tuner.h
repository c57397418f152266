#pragma once
// The autotuner: for every tunable kernel instance a model needs (a TuneOp: a family + shape
// signature, its config space and a way to run it on random data) and every M bucket it serves,
//   1. compile every candidate in parallel through the JIT caches (a candidate that does not
//      compile or load is discarded),
//   2. run the heuristic default on random inputs and keep its output as the reference,
//   3. run each candidate on the same inputs and discard it unless its output matches the
//      reference (relative L2 within the op's tolerance, every value finite),
//   4. time the default and every surviving candidate: R runs captured in one CUDA graph (inputs
//      rotate over copies so weights come from DRAM, not L2), replayed after a warm-up; each replay
//      timed with CUDA events; the median of the replays divided by R;
//   5. keep the fastest if it beats the default by at least min_gain, else the default (so a tuned
//      entry is never slower than the default measured in the same run), and save the file at
//      once (atomic write).
// Measured entries already in the file are skipped with `resume`; an interrupt (the stop flag)
// ends the run between measurements with everything measured saved.
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <set>
#include <utility>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/tune_cache.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"
#include "runtime/jit/kernel_set.h"

namespace q35 {

// One tunable kernel instance. Construction must not touch the GPU; setup() allocates.
class TuneOp {
 public:
  virtual ~TuneOp() = default;
  virtual std::string family() const = 0;
  virtual std::string signature() const = 0;
  virtual std::string label() const = 0;     // for people: "gdn in_proj [12352 x 2048] g128"
  virtual bool serves(int64_t m) const = 0;  // whether calls of m tokens use this kernel
  // Valid configs for m tokens (why_invalid checked) and the heuristic default.
  virtual std::vector<nlohmann::json> candidates(int64_t m) const = 0;
  virtual nlohmann::json default_config(int64_t m) const = 0;
  // The instantiations `config` needs at m tokens.
  virtual std::vector<KernelSpec> kernels(const nlohmann::json& config, int64_t m) const = 0;
  // Allocates and fills (deterministic random) inputs for m tokens; frees the previous ones.
  virtual void setup(int64_t m, const Stream& stream) = 0;
  // Once per config before its runs, outside graph capture (e.g. dynamic shared memory opt-in).
  virtual void prepare(const nlohmann::json& config, int64_t m) {}
  // Enqueues one run; `iteration` picks the rotating input copy. Must be capturable in a graph.
  virtual void run(const nlohmann::json& config, int64_t m, int iteration, const Stream& stream) = 0;
  // The output of the last run as floats (synchronizes the stream).
  virtual std::vector<float> output(const Stream& stream) = 0;
  // Relative L2 a candidate's output may differ from the default's (accumulation order).
  virtual double tolerance() const { return 1e-2; }
  virtual void release() {}  // frees the inputs
};

struct TuneOptions {
  std::vector<int64_t> buckets;  // M values to tune (each op tunes those it serves)
  int compile_threads = 0;       // 0: hardware threads
  int replays = 15;              // timed graph replays per config (median)
  double graph_us = 1000;        // R is chosen so one graph of the default runs about this long
  // A candidate replaces the default only when at least this much faster (fraction): differences
  // within timing noise of a kernel alone do not carry over into the model (H100: a 1.8% faster
  // GDN decode tile alone was not faster inside the decode graph).
  double min_gain = 0.03;
  bool resume = false;           // skip (family, signature, bucket) already in the file
  std::filesystem::path out;     // the tune file, saved after every bucket
  bool progress = true;          // progress bar with ETA on stderr
  std::function<void(const std::string&)> log;  // one-line notices
  const std::atomic<bool>* stop = nullptr;      // set by Ctrl-C: finish the current measurement, save, return
};

// One tuned (op, bucket): the summary table's row.
struct TuneRow {
  std::string family, signature, label;
  int64_t bucket = 0;
  int candidates = 0;  // valid configs in the space
  int discarded = 0;   // did not compile / load / run, or gave a different output
  double default_us = 0, best_us = 0;
  nlohmann::json best;
  bool skipped = false;  // already in the file (resume)
};

struct TuneReport {
  std::vector<TuneRow> rows;
  bool interrupted = false;
  int kernels_compiled = 0;
  double compile_s = 0, measure_s = 0;
};

class Tuner {
 public:
  Tuner(const Driver& driver, const Context& ctx, JitEngine& jit, KernelSet& kernels, TuneOptions options);
  // Tunes `ops` into `file` (saved to options.out after every measured bucket).
  TuneReport run(const std::vector<std::unique_ptr<TuneOp>>& ops, TuneFile& file);
  // Re-times, for every op and bucket it serves, the config `table` gives there (as a run would
  // pick it) against the heuristic default, same inputs, same method; no file is written. Rows have
  // best = the tuned config (the default when the table has none), candidates = 0.
  TuneReport compare(const std::vector<std::unique_ptr<TuneOp>>& ops, const TuneTable& table);

 private:
  double time_config(TuneOp& op, const nlohmann::json& config, int64_t m, int reps);
  int reps_for(TuneOp& op, const nlohmann::json& config, int64_t m);
  // The default's output (the reference: Error if not finite or all zero), graph length and time.
  struct Baseline {
    std::vector<float> ref;
    int reps = 1;
    double us = 0;
  };
  Baseline baseline(TuneOp& op, const nlohmann::json& def, int64_t m);
  // Relative L2 of one run of `config` against `ref`.
  double deviation(TuneOp& op, const nlohmann::json& config, int64_t m, const std::vector<float>& ref);
  // Compiles `specs` in parallel (JIT caches); returns the specs (str()) that failed and seconds.
  std::pair<std::set<std::string>, double> compile_specs(const std::vector<KernelSpec>& specs);
  const Driver& driver_;
  const Context& ctx_;
  JitEngine& jit_;
  KernelSet& kernels_;
  TuneOptions options_;
  Stream stream_;
};

// Relative L2 distance ||a - b|| / ||b||; +inf if sizes differ or a value is not finite.
double relative_l2(const std::vector<float>& a, const std::vector<float>& b);
// "1.2 s", "3m05s" for the progress bar.
std::string format_duration(double seconds);
// The summary table: per row family, signature, bucket, default us, tuned us, speed-up.
std::string format_summary(const TuneReport& report);

}  // namespace q35
