#include "runtime/cuda/kernel_trace.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>

#include "runtime/core/error.h"

#if __has_include(<cupti_activity.h>)
#include <cupti_activity.h>
#include <cupti_result.h>
#include <cupti_version.h>
#define Q35_HAVE_CUPTI 1
#else
#define Q35_HAVE_CUPTI 0
#endif

namespace q35 {

std::string short_kernel_name(const std::string& demangled, size_t max_args) {
  std::string s = demangled;
  // "void q35k::foo<...>(args)" -> "foo<...>": drop the return type, the parameter list, namespaces.
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  int depth = 0;
  size_t paren = std::string::npos;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    if (s[i] == '>') --depth;
    if (s[i] == '(' && depth == 0) {
      paren = i;
      break;
    }
  }
  if (paren != std::string::npos) s = s.substr(0, paren);
  const size_t lt = s.find('<');
  const size_t ns = s.rfind("::", lt == std::string::npos ? std::string::npos : lt);
  if (ns != std::string::npos) s = s.substr(ns + 2);
  const size_t open = s.find('<');
  if (open != std::string::npos && s.size() - open > max_args + 2) s = s.substr(0, open + 1 + max_args) + "..>";
  return s;
}

TraceSummary summarize_trace(std::span<const KernelRecord> records, int repeats) {
  TraceSummary out;
  if (records.empty()) return out;
  if (repeats < 1) fail("summarize_trace: repeats = {} must be positive", repeats);
  std::vector<const KernelRecord*> by_start;
  for (const KernelRecord& r : records) by_start.push_back(&r);
  std::stable_sort(by_start.begin(), by_start.end(),
                   [](const KernelRecord* a, const KernelRecord* b) { return a->start < b->start; });
  std::map<std::string, TraceSummary::Row> rows;
  uint64_t first = by_start.front()->start, last_end = by_start.front()->start, busy = 0;
  for (const KernelRecord* r : by_start) {
    TraceSummary::Row& row = rows[r->name];
    row.name = r->name;
    row.launches += 1;
    const uint64_t dur = r->end > r->start ? r->end - r->start : 0;
    row.busy_us += double(dur) * 1e-3;
    if (r->start > last_end) {
      row.idle_before_us += double(r->start - last_end) * 1e-3;
      busy += dur;
    } else {
      const uint64_t end = std::min(r->end, last_end);
      row.overlap_us += double(end > r->start ? end - r->start : 0) * 1e-3;
      busy += r->end > last_end ? r->end - last_end : 0;
    }
    last_end = std::max(last_end, r->end);
  }
  const double k = 1.0 / repeats;
  out.span_us = double(last_end - first) * 1e-3 * k;
  out.busy_us = double(busy) * 1e-3 * k;
  out.kernels = double(records.size()) * k;
  for (auto& [name, row] : rows) {
    row.mean_us = row.busy_us / row.launches;
    row.launches *= k;
    row.busy_us *= k;
    row.idle_before_us *= k;
    row.overlap_us *= k;
    out.rows.push_back(row);
  }
  std::sort(out.rows.begin(), out.rows.end(),
            [](const TraceSummary::Row& a, const TraceSummary::Row& b) { return a.busy_us > b.busy_us; });
  return out;
}

std::string format_trace_summary(const TraceSummary& s, const std::string& title, size_t max_rows) {
  std::string out = fmt::format(
      "{}: {:.1f} us from the first kernel's start to the last one's end, kernels busy {:.1f} us ({:.0f}%), "
      "idle {:.1f} us, {:.1f} kernels\n",
      title, s.span_us, s.busy_us, s.span_us > 0 ? 100.0 * s.busy_us / s.span_us : 0.0, s.span_us - s.busy_us,
      s.kernels);
  out += fmt::format("| {:<64} | {:>8} | {:>9} | {:>8} | {:>9} | {:>9} |\n", "kernel", "launches", "busy us",
                     "mean us", "idle bef.", "overlap");
  out += fmt::format("|{:-<66}|{:-<10}|{:-<11}|{:-<10}|{:-<11}|{:-<11}|\n", "", "", "", "", "", "");
  for (size_t i = 0; i < s.rows.size() && i < max_rows; ++i) {
    const TraceSummary::Row& r = s.rows[i];
    out += fmt::format("| {:<64} | {:>8.1f} | {:>9.1f} | {:>8.2f} | {:>9.1f} | {:>9.1f} |\n", short_kernel_name(r.name),
                       r.launches, r.busy_us, r.mean_us, r.idle_before_us, r.overlap_us);
  }
  if (s.rows.size() > max_rows) out += fmt::format("({} more kernels)\n", s.rows.size() - max_rows);
  return out;
}

#if Q35_HAVE_CUPTI

struct KernelTrace::Api {
  decltype(&::cuptiGetVersion) get_version = nullptr;
  decltype(&::cuptiGetResultString) result_string = nullptr;
  decltype(&::cuptiActivityRegisterCallbacks) register_callbacks = nullptr;
  decltype(&::cuptiActivityEnable) enable = nullptr;
  decltype(&::cuptiActivityDisable) disable = nullptr;
  decltype(&::cuptiActivityFlushAll) flush_all = nullptr;
  decltype(&::cuptiActivityGetNextRecord) next_record = nullptr;
  decltype(&::cuptiActivityGetNumDroppedRecords) dropped = nullptr;

  void check(CUptiResult r, const char* what) const {
    if (r == CUPTI_SUCCESS) return;
    const char* s = nullptr;
    if (result_string) result_string(r, &s);
    fail("{} failed: CUPTI error {} ({})", what, int(r), s ? s : "unknown");
  }
};

namespace {

// The recording trace's sink. CUPTI's buffer callbacks carry no user pointer, so they find it here;
// KernelTrace::start() installs it and stop() removes it (one recording trace per process).
struct Sink {
  std::mutex mu;
  const KernelTrace::Api* api = nullptr;
  std::vector<KernelRecord> records;
  uint64_t dropped = 0;
  bool active = false;
};
Sink& sink() {
  static Sink s;
  return s;
}

constexpr size_t kBufferBytes = size_t(8) << 20;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;  // as many as fit
}

std::string demangle(const char* name) {
  if (!name) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : name;
  std::free(d);
  return out;
}

void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t, size_t valid) {
  Sink& s = sink();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.api && valid > 0) {
      CUpti_Activity* rec = nullptr;
      while (s.api->next_record(buffer, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && rec->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
        KernelRecord r;
        r.name = demangle(k->name);
        r.start = k->start;
        r.end = k->end;
        r.stream = k->streamId;
        r.graph_node = k->graphNodeId;
        r.grid[0] = k->gridX, r.grid[1] = k->gridY, r.grid[2] = k->gridZ;
        r.block[0] = k->blockX, r.block[1] = k->blockY, r.block[2] = k->blockZ;
        s.records.push_back(std::move(r));
      }
      size_t dropped = 0;
      if (s.api->dropped(ctx, stream, &dropped) == CUPTI_SUCCESS) s.dropped += dropped;
    }
  }
  std::free(buffer);
}

}  // namespace

KernelTrace::KernelTrace(const std::string& library) : api_(std::make_unique<Api>()) {
  std::vector<std::string> tries;
  if (!library.empty()) {
    tries.push_back(library);
  } else if (const char* env = std::getenv("Q35JIT_CUPTI"); env && *env) {
    tries.push_back(env);
  } else {
    tries = {"libcupti.so.13", "libcupti.so", "/usr/local/cuda/lib64/libcupti.so.13",
             "/usr/local/cuda/extras/CUPTI/lib64/libcupti.so.13", "/usr/local/cuda/lib/libcupti.so.13"};
  }
  std::string why;
  for (const std::string& t : tries) {
    handle_ = dlopen(t.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_) {
      library_ = t;
      break;
    }
    const char* e = dlerror();
    why += fmt::format("\n  {}: {}", t, e ? e : "not loadable");
  }
  if (!handle_) fail("kernel trace: cannot load CUPTI (set Q35JIT_CUPTI to libcupti.so's path):{}", why);
  try {
    auto resolve = [&](const char* symbol, auto& fn) {
      void* p = dlsym(handle_, symbol);
      if (!p) fail("kernel trace: {} has no {}", library_, symbol);
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    };
    resolve("cuptiGetVersion", api_->get_version);
    resolve("cuptiGetResultString", api_->result_string);
    resolve("cuptiActivityRegisterCallbacks", api_->register_callbacks);
    resolve("cuptiActivityEnable", api_->enable);
    resolve("cuptiActivityDisable", api_->disable);
    resolve("cuptiActivityFlushAll", api_->flush_all);
    resolve("cuptiActivityGetNextRecord", api_->next_record);
    resolve("cuptiActivityGetNumDroppedRecords", api_->dropped);
    uint32_t v = 0;
    api_->check(api_->get_version(&v), "cuptiGetVersion");
    // The kernel record's layout (CUpti_ActivityKernel10) is the one of the headers built against.
    if (v < CUPTI_API_VERSION)
      fail("kernel trace: {} is CUPTI API version {}, older than the {} this binary was built for", library_, v,
           CUPTI_API_VERSION);
  } catch (...) {
    dlclose(handle_);
    throw;
  }
}

KernelTrace::~KernelTrace() {
  if (recording_) {
    try {
      stop();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kernel trace: stopping at destruction failed: %s\n", e.what());
    }
  }
  // libcupti stays loaded: CUPTI keeps hooks in the driver for the life of the process.
}

void KernelTrace::start() {
  Sink& s = sink();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.active) fail("kernel trace: another trace is already recording in this process");
    s.active = true;
    s.api = api_.get();
    s.records.clear();
    s.dropped = 0;
  }
  try {
    api_->check(api_->register_callbacks(buffer_requested, buffer_completed), "cuptiActivityRegisterCallbacks");
    api_->check(api_->enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityEnable(CONCURRENT_KERNEL)");
  } catch (...) {
    std::lock_guard<std::mutex> lock(s.mu);
    s.active = false;
    s.api = nullptr;
    throw;
  }
  recording_ = true;
}

std::vector<KernelRecord> KernelTrace::stop() {
  if (!recording_) fail("kernel trace: stop() without start()");
  recording_ = false;
  Sink& s = sink();
  std::vector<KernelRecord> out;
  api_->check(api_->disable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityDisable(CONCURRENT_KERNEL)");
  api_->check(api_->flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "cuptiActivityFlushAll");
  {
    std::lock_guard<std::mutex> lock(s.mu);
    out = std::move(s.records);
    s.records.clear();
    dropped_ = s.dropped;
    s.active = false;
    s.api = nullptr;
  }
  std::stable_sort(out.begin(), out.end(), [](const KernelRecord& a, const KernelRecord& b) { return a.start < b.start; });
  return out;
}

#else  // built without the CUPTI headers

struct KernelTrace::Api {};

KernelTrace::KernelTrace(const std::string&) {
  fail("kernel trace: this q35jit was built without CUPTI's headers (cupti_activity.h in the CUDA toolkit)");
}
KernelTrace::~KernelTrace() = default;
void KernelTrace::start() {}
std::vector<KernelRecord> KernelTrace::stop() { return {}; }

#endif

}  // namespace q35
