#pragma once
// Prefix cache for the hybrid model. An entry holds, for the token sequence a finished request
// left in the engine, the attention K/V rows of all its tokens and copies of the recurrent
// (DeltaNet) state at a few positions: block boundaries of its prompt, the start of its last turn
// and its end. The recurrent state cannot be cut back to a shorter prefix, so a new request can
// resume only at such a snapshot: the longest one inside its common prefix with an entry (any entry
// sharing the first p tokens has the same state at p, so K/V rows and snapshot may come from the
// same entry). Entries are evicted least recently used first to stay within a byte budget.
#include <cstddef>
#include <cstdint>
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
  explicit PrefixCache(size_t budget_bytes) : budget_(budget_bytes) {}

  struct Hit {
    int64_t pos = 0;  // tokens restored
    std::shared_ptr<const cli::StateCopy> kv, recurrent;
  };
  // The longest cached prefix of `tokens` of at most `max_pos` tokens (> 0), or nullopt. Marks the
  // entry as recently used.
  std::optional<Hit> lookup(std::span<const int32_t> tokens, int64_t max_pos);

  // Stores the state of `tokens` (kv.pos == tokens.size()) with recurrent snapshots keyed by
  // position (<= tokens.size()). An entry whose tokens are a prefix of these is merged into the new
  // one; if these are a prefix of an existing entry, the snapshots join that entry instead. Then
  // evicts until the budget holds (the new entry too, if it alone exceeds it).
  void insert(std::vector<int32_t> tokens, cli::StateCopy kv, std::map<int64_t, cli::StateCopy> recurrent);

  size_t bytes() const { return bytes_; }
  size_t entries() const { return entries_.size(); }
  size_t budget() const { return budget_; }

 private:
  struct Entry {
    std::vector<int32_t> tokens;
    std::shared_ptr<const cli::StateCopy> kv;
    std::map<int64_t, std::shared_ptr<const cli::StateCopy>> recurrent;
    size_t bytes() const;
  };
  void evict();

  size_t budget_;
  size_t bytes_ = 0;
  std::list<Entry> entries_;  // most recently used first
};

}  // namespace q35::server
