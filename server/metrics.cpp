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

std::string Metrics::render(int64_t queue_length, int64_t running, int64_t cache_bytes, int64_t cache_entries) const {
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
  gauge("q35jit_queue_length", "Requests waiting for the engine.", queue_length);
  gauge("q35jit_running_requests", "Requests being generated.", running);
  gauge("q35jit_prefix_cache_bytes", "Host bytes held by the prefix cache.", cache_bytes);
  gauge("q35jit_prefix_cache_entries", "Sequences held by the prefix cache.", cache_entries);
  out += "# HELP q35jit_time_to_first_token_seconds From the start of generation to the first token.\n"
         "# TYPE q35jit_time_to_first_token_seconds histogram\n";
  out += ttft_.render("q35jit_time_to_first_token_seconds");
  out += "# HELP q35jit_inter_token_latency_seconds Time per generated token after the first.\n"
         "# TYPE q35jit_inter_token_latency_seconds histogram\n";
  out += itl_.render("q35jit_inter_token_latency_seconds");
  return out;
}

}  // namespace q35::server
