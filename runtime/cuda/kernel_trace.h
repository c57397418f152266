#pragma once
// Kernel timelines through CUPTI's activity API: the device start / end timestamps of every kernel
// that runs between start() and stop(), CUDA graph replays included (one record per kernel node),
// with programmatic-dependent-launch overlap as it really happened. Nsight Systems is not on every
// machine; libcupti ships with the CUDA toolkit (and PyTorch). It is dlopen'ed like libcuda, so the
// binary runs without it until a trace is asked for.
//
// CUPTI hands its filled buffers to a C callback that carries no user pointer, so one KernelTrace
// may be recording at a time per process; a second start() throws.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace q35 {

struct KernelRecord {
  std::string name;          // demangled; template arguments kept
  uint64_t start = 0, end = 0;  // ns, the device's timestamps
  uint32_t stream = 0;
  uint64_t graph_node = 0;   // 0 outside graphs
  int grid[3] = {0, 0, 0}, block[3] = {0, 0, 0};
};

class KernelTrace {
 public:
  // Loads `library`: Q35JIT_CUPTI if set, else libcupti.so.13 / libcupti.so from the loader's path
  // and the CUDA toolkit's lib folders. Throws Error naming the library tried when none loads.
  explicit KernelTrace(const std::string& library = "");
  ~KernelTrace();
  KernelTrace(const KernelTrace&) = delete;
  KernelTrace& operator=(const KernelTrace&) = delete;

  void start();                       // records every kernel from now on
  std::vector<KernelRecord> stop();   // flushes, stops recording; the records sorted by start
  uint64_t dropped() const { return dropped_; }  // records CUPTI could not store (0 expected)
  const std::string& library() const { return library_; }

  struct Api;  // the CUPTI entry points (defined in kernel_trace.cpp)

 private:
  std::unique_ptr<Api> api_;
  void* handle_ = nullptr;
  std::string library_;
  bool recording_ = false;
  uint64_t dropped_ = 0;
};

// What one region of a timeline spent, for people: per kernel (by name), how often it ran, its total
// and mean time, and the idle time before it (no kernel of the trace running: launch gaps, host
// waits). `repeats` divides the totals (e.g. the number of decode steps recorded).
struct TraceSummary {
  struct Row {
    std::string name;
    double launches = 0;   // per repeat
    double busy_us = 0;    // per repeat, sum of durations
    double mean_us = 0;    // per launch
    double idle_before_us = 0;  // per repeat, the gaps that ended with this kernel's start
    double overlap_us = 0;      // per repeat, how long it ran beside its predecessors (PDL)
  };
  double span_us = 0;      // per repeat: first start to last end
  double busy_us = 0;      // per repeat: union of the kernels' intervals
  double kernels = 0;      // per repeat
  std::vector<Row> rows;   // by busy time, largest first
};
TraceSummary summarize_trace(std::span<const KernelRecord> records, int repeats);
std::string format_trace_summary(const TraceSummary& s, const std::string& title, size_t max_rows = 40);
// Short kernel name: the demangled name without its namespace, template arguments shortened to
// `max_args` characters.
std::string short_kernel_name(const std::string& demangled, size_t max_args = 48);

}  // namespace q35
