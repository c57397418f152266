#include "server/metrics.h"

#include <fmt/format.h>

#include <algorithm>

namespace q35::server {

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  size_t i = size_t(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  ++counts_[i];
  sum_ += v;
  ++count_;
}

std::string Histogram::render(const std::string& name) const {
  std::string out;
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, bounds_[i], cum);
  }
  out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, count_, name, sum_, name, count_);
  return out;
}

Metrics::Metrics()
    : ttft_({0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}),
      itl_({0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1}) {}

void Metrics::request(const std::string& endpoint, int status) {
  std::lock_guard lock(mutex_);
  ++requests_[{endpoint, status}];
}

void Metrics::tokens(int64_t prompt, int64_t completion, int64_t cached) {
  std::lock_guard lock(mutex_);
  prompt_tokens_ += uint64_t(prompt);
  completion_tokens_ += uint64_t(completion);
  cached_tokens_ += uint64_t(cached);
}

void Metrics::time_to_first_token(double seconds) {
  std::lock_guard lock(mutex_);
  ttft_.observe(seconds);
}

void Metrics::inter_token_latency(double seconds) {
  std::lock_guard lock(mutex_);
  itl_.observe(seconds);
}

void Metrics::prefix_lookup(bool hit) {
  std::lock_guard lock(mutex_);
  ++cache_lookups_;
  cache_hits_ += hit;
}

void Metrics::prefix_restored(int tier, uint64_t bytes) {
  std::lock_guard lock(mutex_);
  restored_bytes_[tier == 0 ? 0 : 1] += bytes;
}

void Metrics::prefix_cache(const PrefixCacheStats& stats) {
  std::lock_guard lock(mutex_);
  cache_ = stats;
}

std::string Metrics::render(int64_t queue_length, int64_t running) const {
  std::lock_guard lock(mutex_);
  std::string out;
  out += "# HELP q35jit_requests_total HTTP requests by endpoint and status.\n# TYPE q35jit_requests_total counter\n";
  for (const auto& [key, n] : requests_)
    out += fmt::format("q35jit_requests_total{{endpoint=\"{}\",status=\"{}\"}} {}\n", key.first, key.second, n);
  auto counter = [&](const char* name, const char* help, uint64_t v) {
    out += fmt::format("# HELP {0} {1}\n# TYPE {0} counter\n{0} {2}\n", name, help, v);
  };
  auto gauge = [&](const char* name, const char* help, int64_t v) {
    out += fmt::format("# HELP {0} {1}\n# TYPE {0} gauge\n{0} {2}\n", name, help, v);
  };
  counter("q35jit_prompt_tokens_total", "Prompt tokens of finished generations.", prompt_tokens_);
  counter("q35jit_generation_tokens_total", "Generated tokens.", completion_tokens_);
  counter("q35jit_prefix_cache_hit_tokens_total", "Prompt tokens restored from the prefix cache.", cached_tokens_);
  counter("q35jit_prefix_cache_queries_total", "Prefix cache lookups.", cache_lookups_);
  counter("q35jit_prefix_cache_hits_total", "Prefix cache lookups that restored a prefix.", cache_hits_);
  counter("q35jit_prefix_cache_misses_total", "Prefix cache lookups that found nothing to restore.",
          cache_lookups_ - cache_hits_);
  gauge("q35jit_queue_length", "Requests waiting for the engine.", queue_length);
  gauge("q35jit_running_requests", "Requests being generated.", running);
  gauge("q35jit_prefix_cache_bytes", "Bytes of saved states held by the prefix cache (both tiers).",
        cache_.bytes[0] + cache_.bytes[1]);
  gauge("q35jit_prefix_cache_entries", "Sequences held by the prefix cache.", cache_.entries);
  // Per tier: device memory, and host memory (pinned on the GPU).
  auto tiers = [&](const char* name, const char* type, const char* help, auto values) {
    out += fmt::format("# HELP {0} {1}\n# TYPE {0} {2}\n", name, help, type);
    for (int t = 0; t < 2; ++t) out += fmt::format("{}{{tier=\"{}\"}} {}\n", name, t == 0 ? "device" : "host", values[t]);
  };
  tiers("q35jit_prefix_cache_tier_bytes", "gauge", "Bytes of saved states held by the prefix cache, per tier.",
        cache_.bytes);
  tiers("q35jit_prefix_cache_capacity_bytes", "gauge", "The prefix cache's budget per tier.", cache_.capacity);
  tiers("q35jit_prefix_cache_saved_bytes_total", "counter", "Bytes of states saved into the prefix cache, per tier.",
        cache_.saved_bytes);
  tiers("q35jit_prefix_cache_restored_bytes_total", "counter",
        "Bytes restored from the prefix cache into sequence slots, per tier they came from.", restored_bytes_);
  counter("q35jit_prefix_cache_spilled_bytes_total", "Bytes moved from the device tier to the host tier.",
          cache_.spilled_bytes);
  counter("q35jit_prefix_cache_evicted_bytes_total", "Bytes dropped from the prefix cache to make room.",
          cache_.evicted_bytes);
  counter("q35jit_prefix_cache_evictions_total", "Entries dropped from the prefix cache to make room.",
          cache_.evicted_entries);
  out += "# HELP q35jit_time_to_first_token_seconds From the start of generation to the first token.\n"
         "# TYPE q35jit_time_to_first_token_seconds histogram\n";
  out += ttft_.render("q35jit_time_to_first_token_seconds");
  out += "# HELP q35jit_inter_token_latency_seconds Time per generated token after the first.\n"
         "# TYPE q35jit_inter_token_latency_seconds histogram\n";
  out += itl_.render("q35jit_inter_token_latency_seconds");
  return out;
}

}  // namespace q35::server
