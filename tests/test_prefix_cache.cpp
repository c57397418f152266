// The prefix cache's memory and tiers without a GPU: the block arena (first fit, coalescing, segments
// reserved on demand up to the capacity), the cache's device / host tiers with a store whose two
// tiers are heap memory (new states in the device tier, least recently used entries spilled to the
// host tier and dropped from it, hits from either tier, the contents carried over), and the CPU
// engine's saved states: a prefix restored into any slot continues with exactly the logits of the
// sequence that was never saved.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <optional>

#include "cli/session.h"
#include "cli/state_memory.h"
#include "runtime/core/block_arena.h"
#include "runtime/core/error.h"
#include "server/prefix_cache.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using q35::BlockArena;
using q35::cli::SavedState;
using q35::cli::SavedStatePtr;
using q35::cli::StatePart;
using q35::cli::Tier;
using q35::server::PrefixCache;
using q35::test::contains;
using q35::test::error_of;

namespace {

constexpr size_t U = BlockArena::kAlign;  // one unit of the arenas

// Heap memory that counts what it reserved and can be told to refuse.
struct CountingMemory {
  size_t reserved = 0;
  int reserves = 0, releases = 0;
  bool refuse = false;
  BlockArena::Memory memory() {
    BlockArena::Memory heap = q35::cli::heap_memory();
    return {[this, heap](size_t n) -> uint64_t {
              if (refuse) return 0;
              ++reserves;
              reserved += n;
              return heap.reserve(n);
            },
            [this, heap](uint64_t a, size_t n) {
              ++releases;
              reserved -= n;
              heap.release(a, n);
            }};
  }
};

// A store of two heap-memory tiers: the prefix cache's view of an engine.
struct FakeStore final : q35::cli::StateStore {
  q35::cli::StateMemory memory{q35::cli::heap_memory(), q35::cli::heap_memory(), size_t(1) << 20};
  int copies = 0;
  FakeStore(size_t device, size_t host) { memory.set_capacity(device, host); }
  size_t state_capacity(Tier t) const override { return memory.capacity(t); }
  SavedStatePtr copy_state(const SavedState& s, Tier t) override {
    auto c = memory.allocate(s.part, s.pos, s.bytes, t);
    if (c) {
      ++copies;
      std::memcpy(reinterpret_cast<void*>(uintptr_t(c->addr())), reinterpret_cast<const void*>(uintptr_t(s.addr())),
                  s.bytes);
    }
    return c;
  }
  // What an engine's save_state does: a state of `units` blocks whose first word is `tag`.
  std::function<SavedStatePtr(Tier)> make(StatePart part, int64_t pos, size_t units, uint32_t tag) {
    return [=, this](Tier t) -> SavedStatePtr {
      auto s = memory.allocate(part, pos, units * U, t);
      if (s) std::memcpy(reinterpret_cast<void*>(uintptr_t(s->addr())), &tag, 4);
      return s;
    };
  }
};

uint32_t tag_of(const SavedStatePtr& s) {
  uint32_t t = 0;
  std::memcpy(&t, reinterpret_cast<const void*>(uintptr_t(s->addr())), 4);
  return t;
}

// A sequence's K/V rows and its end snapshot, each `units` blocks, tagged 100 * id + 1 / + 2, made
// room for by the cache.
void insert_seq(PrefixCache& cache, FakeStore& store, std::vector<int32_t> tokens, size_t kv_units, size_t rec_units,
                uint32_t id) {
  const int64_t n = int64_t(tokens.size());
  SavedStatePtr rec = cache.save(rec_units * U, store.make(StatePart::Recurrent, n, rec_units, 100 * id + 2));
  SavedStatePtr kv = cache.save(kv_units * U, store.make(StatePart::KV, n, kv_units, 100 * id + 1));
  REQUIRE(rec);
  REQUIRE(kv);
  cache.insert(std::move(tokens), std::move(kv), {{n, std::move(rec)}});
}

}  // namespace

TEST_CASE("Block arena: first fit, coalescing, segments reserved on demand up to the capacity") {
  CountingMemory mem;
  {
    std::optional<BlockArena::Block> outlives;  // destroyed after the arena
    BlockArena arena(10 * U, 4 * U, mem.memory());
    CHECK(arena.reserved() == 0);  // nothing until the first block
    auto a = arena.allocate(1);    // rounded up to one unit
    REQUIRE(a);
    CHECK(a->bytes() == U);
    CHECK(a->addr() % U == 0);
    CHECK(arena.reserved() == 4 * U);
    CHECK(mem.reserves == 1);
    auto b = arena.allocate(2 * U);
    auto c = arena.allocate(U);
    REQUIRE((b && c));
    CHECK(b->addr() == a->addr() + U);
    CHECK(c->addr() == a->addr() + 3 * U);
    CHECK(arena.used() == 4 * U);
    // A fifth unit: a new segment of 4 units; then one of the 2 left (the capacity), then none.
    auto d = arena.allocate(3 * U);
    REQUIRE(d);
    CHECK(arena.segments() == 2);
    auto e = arena.allocate(2 * U);
    REQUIRE(e);
    CHECK(arena.reserved() == 10 * U);
    CHECK_FALSE(arena.allocate(2 * U));  // one unit free (in the second segment), capacity spent
    auto f = arena.allocate(U);
    REQUIRE(f);
    // Freed neighbours coalesce: a and b give one range of 3 units at the segment's start.
    *a = BlockArena::Block();
    b.reset();
    CHECK(arena.largest_free() == 3 * U);
    auto g = arena.allocate(3 * U);
    REQUIRE(g);
    CHECK(g->addr() % U == 0);
    CHECK(arena.used() == 10 * U);
    // A block larger than a segment gets a segment of its own size (here: no room left).
    CHECK_FALSE(arena.allocate(5 * U));
    // A block outliving its arena frees nothing when it goes.
    outlives = std::move(g);
    CHECK(outlives->bytes() == 3 * U);
  }
  CHECK(mem.reserved == 0);  // every segment back
  CHECK(mem.releases == mem.reserves);

  CountingMemory big;
  BlockArena large(100 * U, 4 * U, big.memory());
  auto h = large.allocate(9 * U);  // larger than a segment: a segment of 9 units
  REQUIRE(h);
  CHECK(large.reserved() == 9 * U);
  // A refused reservation ends the growth: the capacity becomes what was reserved.
  big.refuse = true;
  CHECK_FALSE(large.allocate(4 * U));
  CHECK(large.reserve_failed());
  CHECK(large.capacity() == 9 * U);
  CHECK(error_of([&] { BlockArena bad(U, 0, big.memory()); }) != "");
}

TEST_CASE("Prefix cache: longest snapshot inside the common prefix, merging, LRU eviction by bytes") {
  FakeStore store(0, 9 * U);  // one tier (the CPU engine's)
  PrefixCache cache(store);
  CHECK(cache.enabled());
  std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8};
  cache.insert(a, cache.save(U, store.make(StatePart::KV, 8, 1, 1)),
               {{4, cache.save(U, store.make(StatePart::Recurrent, 4, 1, 2))},
                {8, cache.save(U, store.make(StatePart::Recurrent, 8, 1, 3))}});
  CHECK(cache.bytes() == 3 * U);
  CHECK(cache.bytes(Tier::Host) == 3 * U);
  std::vector<int32_t> q = {1, 2, 3, 4, 5, 9};
  auto hit = cache.lookup(q, int64_t(q.size()) - 1);
  REQUIRE(hit);
  CHECK(hit->pos == 4);
  CHECK(hit->kv->pos == 8);
  CHECK(tag_of(hit->recurrent) == 2);
  CHECK_FALSE(cache.lookup(std::vector<int32_t>{2, 2, 3}, 2));
  auto full = cache.lookup(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9}, 8);
  REQUIRE(full);
  CHECK(full->pos == 8);
  CHECK(cache.lookup(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}, 7)->pos == 4);  // one token must stay to feed
  hit.reset();
  full.reset();

  // A longer sequence that extends `a` absorbs it (its snapshots move over, its K/V rows go).
  std::vector<int32_t> b = a;
  b.push_back(9);
  b.push_back(10);
  insert_seq(cache, store, b, 1, 1, 5);
  CHECK(cache.entries() == 1);
  CHECK(cache.bytes() == 4 * U);
  CHECK(store.memory.used(Tier::Host) == 4 * U);  // a's K/V rows were freed
  CHECK(cache.lookup(std::vector<int32_t>{1, 2, 3, 4, 5, 0}, 5)->pos == 4);

  // Unrelated entries; the least recently used goes first when the tier is full.
  insert_seq(cache, store, {50, 51}, 2, 1, 6);
  cache.lookup(b, 10);  // b is now the most recent
  insert_seq(cache, store, {60, 61}, 2, 1, 7);
  CHECK(cache.bytes() <= 9 * U);
  CHECK_FALSE(cache.lookup(std::vector<int32_t>{50, 51, 52}, 2));
  CHECK(cache.lookup(std::vector<int32_t>{60, 61, 62}, 2));
  CHECK(cache.lookup(b, 9));
  CHECK(cache.counters().evicted_entries == 1);
  CHECK(cache.counters().evicted_bytes == 3 * U);
  CHECK(cache.counters().spilled_bytes == 0);
  // A state larger than the whole budget is not made, and nothing is dropped for it.
  CHECK_FALSE(cache.save(20 * U, store.make(StatePart::KV, 1, 20, 9)));
  CHECK(cache.entries() == 2);
  CHECK_THROWS_AS(cache.insert({1, 2}, cache.save(U, store.make(StatePart::KV, 3, 1, 9)), {}), q35::Error);
  CHECK_THROWS_AS(cache.insert({1, 2}, nullptr, {}), q35::Error);
}

TEST_CASE("Prefix cache tiers: new states in device memory, LRU entries spill to host memory, then drop") {
  FakeStore store(4 * U, 4 * U);
  PrefixCache cache(store);
  auto seq = [](int32_t first) { return std::vector<int32_t>{first, first + 1, first + 2}; };
  // A prompt that continues the sequence (its end snapshot at 3 is inside it).
  auto ask = [](int32_t first) { return std::vector<int32_t>{first, first + 1, first + 2, 7}; };
  auto tier_of = [&](int32_t first) {
    auto h = cache.lookup(ask(first), 3);
    REQUIRE(h);
    CHECK(h->kv->tier == h->recurrent->tier);
    return h->kv->tier;
  };
  insert_seq(cache, store, seq(10), 1, 1, 1);
  insert_seq(cache, store, seq(20), 1, 1, 2);
  CHECK(cache.bytes(Tier::Device) == 4 * U);
  CHECK(cache.bytes(Tier::Host) == 0);
  CHECK(store.copies == 0);
  // The device tier is full: the least recently used entry (10) moves to host memory, one copy per
  // state, its contents with it.
  insert_seq(cache, store, seq(30), 1, 1, 3);
  CHECK(cache.bytes(Tier::Device) == 4 * U);
  CHECK(cache.bytes(Tier::Host) == 2 * U);
  CHECK(cache.counters().spilled_bytes == 2 * U);
  CHECK(store.copies == 2);
  {
    auto h = cache.lookup(ask(10), 3);  // a hit from the host tier (and 10 is now the most recent)
    REQUIRE(h);
    CHECK(h->kv->tier == Tier::Host);
    CHECK(tag_of(h->kv) == 101);
    CHECK(tag_of(h->recurrent) == 102);
  }
  CHECK(tier_of(20) == Tier::Device);
  CHECK(tier_of(30) == Tier::Device);
  CHECK(tier_of(10) == Tier::Host);
  // 40 needs room: of the device entries 20 is the least recently used (30 was looked up after it);
  // it spills, and the host tier holds 10 and 20.
  insert_seq(cache, store, seq(40), 1, 1, 4);
  CHECK(tier_of(20) == Tier::Host);
  CHECK(tier_of(30) == Tier::Device);
  CHECK(tier_of(40) == Tier::Device);
  CHECK(cache.bytes(Tier::Host) == 4 * U);
  // 50: 30 spills (least recently used in device memory), the host tier is full, and its least
  // recently used entry (10) is dropped for it.
  cache.lookup(ask(20), 3);
  insert_seq(cache, store, seq(50), 1, 1, 5);
  CHECK_FALSE(cache.lookup(ask(10), 3));
  CHECK(tier_of(20) == Tier::Host);
  CHECK(tier_of(30) == Tier::Host);
  CHECK(tier_of(40) == Tier::Device);
  CHECK(tier_of(50) == Tier::Device);
  CHECK(cache.counters().evicted_entries == 1);
  CHECK(cache.entries() == 4);
  CHECK(cache.bytes() == 8 * U);
  CHECK(cache.counters().saved_bytes[0] == 10 * U);  // every new state was made in device memory
  CHECK(cache.counters().saved_bytes[1] == 0);

  // A state larger than the device budget goes to the host tier directly, spilling nothing.
  FakeStore small(2 * U, 8 * U);
  PrefixCache c2(small);
  insert_seq(c2, small, seq(10), 1, 1, 1);
  SavedStatePtr big = c2.save(3 * U, small.make(StatePart::KV, 3, 3, 6));
  REQUIRE(big);
  CHECK(big->tier == Tier::Host);
  CHECK(c2.counters().saved_bytes[1] == 3 * U);
  CHECK(c2.counters().spilled_bytes == 0);
  CHECK(c2.lookup(ask(10), 3)->kv->tier == Tier::Device);
}

TEST_CASE("Prefix cache tiers: without a host tier a full device tier drops its LRU entries; without either, off") {
  FakeStore store(4 * U, 0);
  PrefixCache cache(store);
  auto seq = [](int32_t first) { return std::vector<int32_t>{first, first + 1, first + 2}; };
  auto ask = [](int32_t first) { return std::vector<int32_t>{first, first + 1, first + 2, 7}; };
  insert_seq(cache, store, seq(10), 1, 1, 1);
  insert_seq(cache, store, seq(20), 1, 1, 2);
  insert_seq(cache, store, seq(30), 1, 1, 3);
  CHECK_FALSE(cache.lookup(ask(10), 3));
  CHECK(cache.lookup(ask(20), 3));
  CHECK(cache.lookup(ask(30), 3));
  CHECK(cache.counters().spilled_bytes == 0);
  CHECK(cache.counters().evicted_entries == 1);
  // A device tier full of states not yet in the cache (a prefill's snapshots): nothing to spill, no room.
  std::vector<SavedStatePtr> held;
  for (int i = 0; i < 4; ++i) {
    held.push_back(cache.save(U, store.make(StatePart::Recurrent, 1, 1, 0)));
    CHECK(held.back());
    if (i == 1) CHECK(cache.entries() == 1);  // 20 (the least recently used) made room for two
  }
  CHECK(cache.entries() == 0);  // then 30
  CHECK_FALSE(cache.save(U, store.make(StatePart::Recurrent, 1, 1, 0)));

  FakeStore none(0, 0);
  PrefixCache off(none);
  CHECK_FALSE(off.enabled());
  CHECK_FALSE(off.save(U, none.make(StatePart::KV, 1, 1, 0)));
}

TEST_CASE("CPU engine: a saved prefix restored into any slot continues with exactly the uncached logits") {
  const q35::cli::ModelInfo info = q35::cli::load_model_info(q35::test::fixtures_dir() / "tiny-qwen35moe");
  std::unique_ptr<q35::cli::Engine> engine = q35::cli::make_cpu_engine(info, 256, 3);
  CHECK(engine->state_capacity(Tier::Host) == 0);  // no memory until the server sets it
  CHECK(contains(error_of([&] { engine->set_state_memory(1 << 20, 1 << 20); }), "host memory only"));
  engine->set_state_memory(0, size_t(64) << 20);
  PrefixCache cache(*engine);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 150; ++i) tokens.push_back((i * 37 + 11) % 1400);
  const size_t V = size_t(info.config.vocab_size);
  const std::span<const int32_t> all(tokens);

  for (int64_t prefix : {64, 100, 149}) {
    CAPTURE(prefix);
    // Uncached: slot 0 runs the prefix, then the rest.
    engine->reset(0);
    engine->logits(0, all.first(size_t(prefix)), false);
    const std::vector<float> want = engine->logits(0, all.subspan(size_t(prefix)), true);
    // Slot 1 runs the prefix and saves it through the cache; then it moves on to other tokens.
    engine->reset(1);
    engine->logits(1, all.first(size_t(prefix)), false);
    SavedStatePtr rec = cache.save(engine->state_bytes(StatePart::Recurrent, prefix),
                                   [&](Tier t) { return engine->save_state(1, StatePart::Recurrent, t); });
    SavedStatePtr kv = cache.save(engine->state_bytes(StatePart::KV, prefix),
                                  [&](Tier t) { return engine->save_state(1, StatePart::KV, t); });
    REQUIRE((rec && kv));
    CHECK(rec->tier == Tier::Host);
    CHECK(kv->bytes == engine->state_bytes(StatePart::KV, prefix));
    cache.insert(std::vector<int32_t>(tokens.begin(), tokens.begin() + prefix), kv, {{prefix, rec}});
    engine->logits(1, std::vector<int32_t>{1, 2, 3}, false);
    // Each slot restores it (slot 2 has never run; slot 0 and 1 hold other sequences) and continues
    // with bit-identical logits.
    for (int slot : {2, 1, 0}) {
      CAPTURE(slot);
      auto hit = cache.lookup(tokens, int64_t(tokens.size()) - 1);
      REQUIRE(hit);
      CHECK(hit->pos == prefix);
      engine->restore(slot, *hit->kv, *hit->recurrent);
      CHECK(engine->position(slot) == prefix);
      const std::vector<float> got = engine->logits(slot, all.subspan(size_t(prefix)), true);
      REQUIRE(got.size() == want.size());
      CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0);
    }
    // And against one prefill of the whole sequence (other chunking): equal to fp32 rounding.
    engine->reset(0);
    const std::vector<float> whole = engine->logits(0, all, true);
    double err = 0, ref = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      err = std::max(err, double(std::fabs(want[i] - whole[size_t(prefix) * V + i])));
      ref = std::max(ref, double(std::fabs(whole[size_t(prefix) * V + i])));
    }
    CHECK(err <= 1e-5 * ref);
  }
  // A shorter restore from longer K/V rows, and the errors.
  auto hit = cache.lookup(tokens, 149);
  REQUIRE(hit);
  SavedStatePtr early = cache.lookup(tokens, 64)->recurrent;
  engine->restore(2, *hit->kv, *early);
  CHECK(engine->position(2) == 64);
  CHECK(contains(error_of([&] { engine->restore(2, *early, *hit->kv); }), "not a K/V part"));
  auto short_kv = engine->save_state(2, StatePart::KV, Tier::Host);
  CHECK(contains(error_of([&] { engine->restore(2, *short_kv, *hit->recurrent); }), "cannot restore position"));
  CHECK_FALSE(engine->save_state(2, StatePart::KV, Tier::Device));  // no device tier on the CPU
  CHECK(engine->state_used(Tier::Host) > 0);
}
