#pragma once
// Prefix cache for the hybrid model. An entry holds, for the token sequence a finished request
// left in the engine, the attention K/V rows of all its tokens and copies of the recurrent
// (DeltaNet) state at a few positions: the start of its last turn, its end, and prompt block
// boundaries when --prefix-cache-block asks for them. The recurrent state cannot be cut back to a
// shorter prefix, so a new request can resume only at such a snapshot: the longest one inside its
// common prefix with an entry (any entry sharing the first p tokens has the same state at p, so K/V
// rows and snapshot may come from the same entry).
//
// Where the states live: each is one contiguous block of the engine's state memory (cli/engine.h)
// in one of two tiers, Device (GPU memory: saving and restoring are device-to-device copies on the
// engine's stream) and Host (pinned host memory on the GPU; the CPU engine's only tier), each with a
// byte budget. New states go to the Device tier when it has a budget; when it is full, the least
// recently used entries' device states move to the Host tier (one copy each, spilling); when the
// Host tier is full, the least recently used entries there are dropped. So the most recently used
// entries sit in device memory, older ones in pinned host memory, and the cache never holds more
// than the two budgets. Not thread-safe (the scheduler's worker owns it).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "cli/engine.h"

namespace q35::server {

class PrefixCache {
 public:
  // `store` moves states between tiers and says their budgets (the engine).
  explicit PrefixCache(cli::StateStore& store) : store_(store) {}

  // Whether any tier has a budget (--prefix-cache-gb and --prefix-cache-gpu-gb not both 0).
  bool enabled() const;

  struct Hit {
    int64_t pos = 0;  // tokens restored
    cli::SavedStatePtr kv, recurrent;
  };
  // The longest cached prefix of `tokens` of at most `max_pos` tokens (> 0), or nullopt. Marks the
  // entry as recently used.
  std::optional<Hit> lookup(std::span<const int32_t> tokens, int64_t max_pos);

  // A new saved state of `bytes`: `save(tier)` makes it in that tier or returns nullptr when the
  // tier has no room. The Device tier first (when it has a budget): entries' device states move to
  // the Host tier, least recently used first, until it fits or none is left there; then the Host
  // tier, dropping least recently used entries until it fits. nullptr when it fits in neither.
  cli::SavedStatePtr save(size_t bytes, const std::function<cli::SavedStatePtr(cli::Tier)>& save);

  // Stores the state of `tokens` (kv->pos == tokens.size()) with recurrent snapshots keyed by
  // position (<= tokens.size()), all made by save(). An entry whose tokens are a prefix of these is
  // merged into the new one (its snapshots move over, its K/V rows go); if these are a prefix of an
  // existing entry, the snapshots join that entry instead. The new entry is the most recently used.
  void insert(std::vector<int32_t> tokens, cli::SavedStatePtr kv, std::map<int64_t, cli::SavedStatePtr> recurrent);

  size_t bytes() const;                // both tiers
  size_t bytes(cli::Tier tier) const;  // the entries' states in one tier
  size_t entries() const { return entries_.size(); }

  // Totals since the start, for /metrics.
  struct Counters {
    uint64_t saved_bytes[2] = {0, 0};  // new states, by the tier they were made in
    uint64_t spilled_bytes = 0;        // moved from the Device to the Host tier
    uint64_t evicted_bytes = 0, evicted_entries = 0;  // dropped to make room
  };
  const Counters& counters() const { return counters_; }

 private:
  struct Entry {
    std::vector<int32_t> tokens;
    cli::SavedStatePtr kv;
    std::map<int64_t, cli::SavedStatePtr> recurrent;
    size_t bytes(std::optional<cli::Tier> tier = std::nullopt) const;
  };
  using Iter = std::list<Entry>::iterator;
  // The least recently used entry holding states in `tier`, or end().
  Iter lru_with(cli::Tier tier);
  void drop(Iter it);
  // Moves the entry's device states to the Host tier (dropping other entries there, least recently
  // used first, to make room); drops the entry when the Host tier cannot hold them.
  void spill(Iter it);

  cli::StateStore& store_;
  std::list<Entry> entries_;  // most recently used first
  Counters counters_;
};

}  // namespace q35::server
