#pragma once
// Server counters and histograms, rendered in the Prometheus text format (GET /metrics).
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace q35::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);  // upper bounds, ascending (+Inf is implied)
  void observe(double v);
  // Lines "<name>_bucket{le=...} n", "<name>_sum", "<name>_count".
  std::string render(const std::string& name) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bound, then +Inf (not cumulative)
  double sum_ = 0;
  uint64_t count_ = 0;
};

// The prefix cache's state for /metrics; tiers indexed as cli::Tier (0 device, 1 host).
struct PrefixCacheStats {
  int64_t entries = 0;
  int64_t bytes[2] = {0, 0};     // held by the entries, per tier
  int64_t capacity[2] = {0, 0};  // the tiers' budgets
  uint64_t saved_bytes[2] = {0, 0};  // states made, per tier
  uint64_t spilled_bytes = 0;        // moved from device to host memory
  uint64_t evicted_bytes = 0, evicted_entries = 0;
};

// Thread-safe; every method locks.
class Metrics {
 public:
  Metrics();
  void request(const std::string& endpoint, int status);
  void tokens(int64_t prompt, int64_t completion, int64_t cached);
  void time_to_first_token(double seconds);
  void inter_token_latency(double seconds);
  void prefix_lookup(bool hit);
  // A hit's restore: bytes copied into the slot from saved states in `tier` (0 device, 1 host).
  void prefix_restored(int tier, uint64_t bytes);
  void prefix_cache(const PrefixCacheStats& stats);  // the cache's latest state
  // The queue gauges are read from their owner when rendering.
  std::string render(int64_t queue_length, int64_t running) const;

 private:
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  uint64_t prompt_tokens_ = 0, completion_tokens_ = 0, cached_tokens_ = 0;
  uint64_t cache_lookups_ = 0, cache_hits_ = 0;
  uint64_t restored_bytes_[2] = {0, 0};
  PrefixCacheStats cache_;
  Histogram ttft_, itl_;
};

}  // namespace q35::server
