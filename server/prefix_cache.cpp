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

using cli::Tier;

}  // namespace

size_t PrefixCache::Entry::bytes(std::optional<Tier> tier) const {
  size_t n = 0;
  auto add = [&](const cli::SavedStatePtr& s) {
    if (s && (!tier || s->tier == *tier)) n += s->bytes;
  };
  add(kv);
  for (const auto& [p, r] : recurrent) add(r);
  return n;
}

bool PrefixCache::enabled() const {
  return store_.state_capacity(Tier::Device) > 0 || store_.state_capacity(Tier::Host) > 0;
}

size_t PrefixCache::bytes() const {
  size_t n = 0;
  for (const Entry& e : entries_) n += e.bytes();
  return n;
}

size_t PrefixCache::bytes(Tier tier) const {
  size_t n = 0;
  for (const Entry& e : entries_) n += e.bytes(tier);
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

PrefixCache::Iter PrefixCache::lru_with(Tier tier) {
  for (auto it = entries_.end(); it != entries_.begin();) {
    --it;
    if (it->bytes(tier) > 0) return it;
  }
  return entries_.end();
}

void PrefixCache::drop(Iter it) {
  counters_.evicted_bytes += it->bytes();
  ++counters_.evicted_entries;
  entries_.erase(it);
}

void PrefixCache::spill(Iter it) {
  std::vector<cli::SavedStatePtr*> states;
  if (it->kv && it->kv->tier == Tier::Device) states.push_back(&it->kv);
  for (auto& [p, r] : it->recurrent)
    if (r->tier == Tier::Device) states.push_back(&r);
  for (cli::SavedStatePtr* s : states) {
    if ((*s)->bytes > store_.state_capacity(Tier::Host)) {
      drop(it);
      return;
    }
    cli::SavedStatePtr moved;
    while (!(moved = store_.copy_state(**s, Tier::Host))) {
      // Room in the Host tier: drop its least recently used entry other than this one.
      Iter victim = entries_.end();
      for (auto v = entries_.end(); v != entries_.begin();) {
        --v;
        if (v != it && v->bytes(Tier::Host) > 0) {
          victim = v;
          break;
        }
      }
      if (victim == entries_.end()) {
        drop(it);
        return;
      }
      drop(victim);
    }
    counters_.spilled_bytes += (*s)->bytes;
    *s = std::move(moved);  // the device block is free once nothing else holds it
  }
}

cli::SavedStatePtr PrefixCache::save(size_t bytes, const std::function<cli::SavedStatePtr(Tier)>& save) {
  if (bytes == 0) return nullptr;
  auto made = [&](cli::SavedStatePtr s) {
    counters_.saved_bytes[int(s->tier)] += s->bytes;
    return s;
  };
  if (bytes <= store_.state_capacity(Tier::Device)) {
    while (true) {
      if (cli::SavedStatePtr s = save(Tier::Device)) return made(std::move(s));
      Iter it = lru_with(Tier::Device);
      if (it == entries_.end()) break;  // what fills the tier is not in the cache (a prefill's snapshots)
      spill(it);
    }
  }
  if (bytes <= store_.state_capacity(Tier::Host)) {
    while (true) {
      if (cli::SavedStatePtr s = save(Tier::Host)) return made(std::move(s));
      Iter it = lru_with(Tier::Host);
      if (it == entries_.end()) break;
      drop(it);
    }
  }
  return nullptr;
}

void PrefixCache::insert(std::vector<int32_t> tokens, cli::SavedStatePtr kv,
                         std::map<int64_t, cli::SavedStatePtr> recurrent) {
  if (!kv) fail("prefix cache: no K/V rows to store");
  if (kv->pos != int64_t(tokens.size()) || kv->part != cli::StatePart::KV)
    fail("prefix cache: K/V rows for {} tokens stored with {} tokens", kv->pos, tokens.size());
  Entry e{std::move(tokens), std::move(kv), {}};
  for (auto& [p, r] : recurrent) {
    if (!r) continue;
    if (p <= 0 || p > int64_t(e.tokens.size()) || r->pos != p || r->part != cli::StatePart::Recurrent)
      fail("prefix cache: a recurrent snapshot at {} (of position {}) for {} tokens", p, r->pos, e.tokens.size());
    e.recurrent.emplace(p, std::move(r));
  }
  for (auto it = entries_.begin(); it != entries_.end();) {
    const size_t common = common_prefix(it->tokens, e.tokens);
    if (common == it->tokens.size()) {  // an older, shorter sequence: its snapshots move here
      for (auto& [p, r] : it->recurrent) e.recurrent.emplace(p, r);
      it = entries_.erase(it);
    } else if (common == e.tokens.size()) {  // the new one is a prefix of a longer entry
      for (auto& [p, r] : e.recurrent) it->recurrent.emplace(p, r);
      entries_.splice(entries_.begin(), entries_, it);
      return;
    } else {
      ++it;
    }
  }
  if (e.recurrent.empty()) return;  // nothing to resume from
  entries_.push_front(std::move(e));
}

}  // namespace q35::server
