#include "cli/state_memory.h"

#include <cstdlib>

#include "runtime/core/error.h"

namespace q35::cli {

BlockArena::Memory heap_memory() {
  return {[](size_t bytes) -> uint64_t {
            // Segments are multiples of 256 bytes, as std::aligned_alloc wants.
            return uint64_t(reinterpret_cast<uintptr_t>(std::aligned_alloc(BlockArena::kAlign, bytes)));
          },
          [](uint64_t addr, size_t) { std::free(reinterpret_cast<void*>(uintptr_t(addr))); }};
}

StateMemory::StateMemory(std::optional<BlockArena::Memory> device, BlockArena::Memory host, size_t segment_bytes)
    : device_memory_(std::move(device)), host_memory_(std::move(host)), segment_bytes_(segment_bytes) {}

void StateMemory::set_capacity(size_t device_bytes, size_t host_bytes) {
  if (device_bytes > 0 && !device_memory_)
    fail("saved states: this engine has no device memory (a Device tier of {} bytes was asked)", device_bytes);
  const size_t want[2] = {device_bytes, host_bytes};
  for (int t = 0; t < 2; ++t) {
    std::optional<BlockArena>& a = arenas_[t];
    if (a && a->capacity() == want[t]) continue;
    if (a && a->used() > 0)
      fail("saved states: the {} tier's budget cannot change while it holds {} bytes", tier_name(Tier(t)), a->used());
    a.reset();
    if (want[t] > 0) a.emplace(want[t], segment_bytes_, t == 0 ? *device_memory_ : host_memory_);
  }
}

size_t StateMemory::capacity(Tier tier) const {
  const std::optional<BlockArena>& a = arenas_[int(tier)];
  return a ? a->capacity() : 0;
}

size_t StateMemory::used(Tier tier) const {
  const std::optional<BlockArena>& a = arenas_[int(tier)];
  return a ? a->used() : 0;
}

size_t StateMemory::reserved(Tier tier) const {
  const std::optional<BlockArena>& a = arenas_[int(tier)];
  return a ? a->reserved() : 0;
}

std::shared_ptr<SavedState> StateMemory::allocate(StatePart part, int64_t pos, size_t bytes, Tier tier) {
  std::optional<BlockArena>& a = arenas_[int(tier)];
  if (!a || bytes == 0) return nullptr;
  std::optional<BlockArena::Block> b = a->allocate(bytes);
  if (!b) return nullptr;
  auto s = std::make_shared<SavedState>();
  s->part = part;
  s->pos = pos;
  s->tier = tier;
  s->bytes = bytes;
  s->block = std::move(*b);
  return s;
}

}  // namespace q35::cli
