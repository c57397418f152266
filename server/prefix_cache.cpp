#include "server/prefix_cache.h"

#include <algorithm>

#include "runtime/core/error.h"

namespace q35::server {
namespace {

size_t common_prefix(std::span<const int32_t> a, std::span<const int32_t> b) {
  size_t n = std::min(a.size(), b.size()), i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

}  // namespace

size_t PrefixCache::Entry::bytes() const {
  size_t n = kv ? kv->bytes() : 0;
  for (const auto& [p, r] : recurrent) n += r->bytes();
  return n;
}

std::optional<PrefixCache::Hit> PrefixCache::lookup(std::span<const int32_t> tokens, int64_t max_pos) {
  auto best = entries_.end();
  Hit hit;
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    const int64_t limit = std::min<int64_t>(int64_t(common_prefix(it->tokens, tokens)), max_pos);
    auto r = it->recurrent.upper_bound(limit);
    if (r == it->recurrent.begin()) continue;
    --r;
    if (r->first > hit.pos) {
      hit = {r->first, it->kv, r->second};
      best = it;
    }
  }
  if (best == entries_.end()) return std::nullopt;
  entries_.splice(entries_.begin(), entries_, best);
  return hit;
}

void PrefixCache::insert(std::vector<int32_t> tokens, cli::StateCopy kv, std::map<int64_t, cli::StateCopy> recurrent) {
  if (kv.pos != int64_t(tokens.size()))
    fail("prefix cache: K/V rows for {} tokens stored with {} tokens", kv.pos, tokens.size());
  Entry e{std::move(tokens), std::make_shared<const cli::StateCopy>(std::move(kv)), {}};
  for (auto& [p, r] : recurrent) {
    if (p <= 0 || p > int64_t(e.tokens.size()) || r.pos != p)
      fail("prefix cache: a recurrent snapshot at {} (of position {}) for {} tokens", p, r.pos, e.tokens.size());
    e.recurrent.emplace(p, std::make_shared<const cli::StateCopy>(std::move(r)));
  }
  for (auto it = entries_.begin(); it != entries_.end();) {
    const size_t common = common_prefix(it->tokens, e.tokens);
    if (common == it->tokens.size()) {  // an older, shorter sequence: its snapshots move here
      for (auto& [p, r] : it->recurrent) e.recurrent.emplace(p, r);
      bytes_ -= it->bytes();
      it = entries_.erase(it);
    } else if (common == e.tokens.size()) {  // the new one is a prefix of a longer entry
      bytes_ -= it->bytes();
      for (auto& [p, r] : e.recurrent) it->recurrent.emplace(p, r);
      bytes_ += it->bytes();
      entries_.splice(entries_.begin(), entries_, it);
      evict();
      return;
    } else {
      ++it;
    }
  }
  if (e.recurrent.empty()) return;  // nothing to resume from
  bytes_ += e.bytes();
  entries_.push_front(std::move(e));
  evict();
}

void PrefixCache::evict() {
  while (bytes_ > budget_ && !entries_.empty()) {
    bytes_ -= entries_.back().bytes();
    entries_.pop_back();
  }
}

}  // namespace q35::server
