#include "runtime/core/block_arena.h"

#include <algorithm>
#include <iterator>
#include <utility>

#include "runtime/core/error.h"

namespace q35 {

namespace {

size_t round_up(size_t n) { return (n + BlockArena::kAlign - 1) / BlockArena::kAlign * BlockArena::kAlign; }

}  // namespace

struct BlockArena::State {
  struct Segment {
    uint64_t addr = 0;
    size_t bytes = 0;
    std::map<uint64_t, size_t> free;  // start -> length, disjoint, not adjacent (coalesced)
  };
  size_t capacity = 0, segment_bytes = 0, reserved = 0, used = 0;
  bool reserve_failed = false;
  Memory memory;
  std::vector<Segment> segments;
  std::map<uint64_t, size_t> live;  // block start -> its segment

  std::optional<uint64_t> take(Segment& s, size_t n) {
    for (auto it = s.free.begin(); it != s.free.end(); ++it) {
      if (it->second < n) continue;
      const uint64_t at = it->first;
      const size_t left = it->second - n;
      s.free.erase(it);
      if (left) s.free.emplace(at + n, left);
      return at;
    }
    return std::nullopt;
  }

  void give_back(uint64_t addr, size_t n) noexcept {
    auto l = live.find(addr);
    if (l == live.end()) return;
    Segment& s = segments[l->second];
    live.erase(l);
    used -= n;
    auto next = s.free.lower_bound(addr);
    uint64_t start = addr;
    size_t len = n;
    if (next != s.free.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == addr) {
        start = prev->first;
        len += prev->second;
        s.free.erase(prev);
      }
    }
    if (next != s.free.end() && addr + n == next->first) {
      len += next->second;
      s.free.erase(next);
    }
    s.free.emplace(start, len);
  }
};

BlockArena::Block::Block(Block&& o) noexcept
    : arena_(std::move(o.arena_)), addr_(std::exchange(o.addr_, 0)), bytes_(std::exchange(o.bytes_, 0)) {}

BlockArena::Block& BlockArena::Block::operator=(Block&& o) noexcept {
  if (this != &o) {
    release();
    arena_ = std::move(o.arena_);
    addr_ = std::exchange(o.addr_, 0);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

BlockArena::Block::~Block() { release(); }

void BlockArena::Block::release() noexcept {
  if (addr_)
    if (std::shared_ptr<State> s = arena_.lock()) s->give_back(addr_, bytes_);
  addr_ = 0;
  bytes_ = 0;
  arena_.reset();
}

BlockArena::BlockArena(size_t capacity, size_t segment_bytes, Memory memory) : state_(std::make_shared<State>()) {
  if (segment_bytes == 0) fail("BlockArena: segment_bytes must be positive");
  if (!memory.reserve || !memory.release) fail("BlockArena: reserve and release are both needed");
  state_->capacity = capacity;
  state_->segment_bytes = round_up(segment_bytes);
  state_->memory = std::move(memory);
}

BlockArena::~BlockArena() {
  for (const State::Segment& s : state_->segments) state_->memory.release(s.addr, s.bytes);
  state_->segments.clear();
  state_->live.clear();
}

std::optional<BlockArena::Block> BlockArena::allocate(size_t bytes) {
  if (bytes == 0) fail("BlockArena::allocate: 0 bytes");
  State& st = *state_;
  const size_t n = round_up(bytes);
  for (size_t i = 0; i < st.segments.size(); ++i)
    if (std::optional<uint64_t> at = st.take(st.segments[i], n)) {
      st.live.emplace(*at, i);
      st.used += n;
      return Block(state_, *at, n);
    }
  if (st.reserved >= st.capacity) return std::nullopt;
  // A new segment: at least the request, usually segment_bytes, never past the capacity (kept a
  // multiple of kAlign so that block ends stay aligned).
  const size_t left = (st.capacity - st.reserved) / kAlign * kAlign;
  const size_t size = std::min(std::max(st.segment_bytes, n), left);
  if (size < n) return std::nullopt;
  const uint64_t addr = st.memory.reserve(size);
  if (addr == 0) {
    st.reserve_failed = true;
    st.capacity = st.reserved;
    return std::nullopt;
  }
  if (addr % kAlign) {
    st.memory.release(addr, size);
    fail("BlockArena: reserve returned an address ({:#x}) not aligned to {} bytes", addr, kAlign);
  }
  State::Segment s;
  s.addr = addr;
  s.bytes = size;
  if (size > n) s.free.emplace(addr + n, size - n);
  st.segments.push_back(std::move(s));
  st.reserved += size;
  st.live.emplace(addr, st.segments.size() - 1);
  st.used += n;
  return Block(state_, addr, n);
}

size_t BlockArena::capacity() const { return state_->capacity; }
size_t BlockArena::reserved() const { return state_->reserved; }
size_t BlockArena::used() const { return state_->used; }
size_t BlockArena::segments() const { return state_->segments.size(); }
bool BlockArena::reserve_failed() const { return state_->reserve_failed; }

size_t BlockArena::largest_free() const {
  size_t m = 0;
  for (const State::Segment& s : state_->segments)
    for (const auto& [a, n] : s.free) m = std::max(m, n);
  return m;
}

}  // namespace q35
