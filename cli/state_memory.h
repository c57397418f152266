#pragma once
// The memory of an engine's saved states (cli/engine.h): one BlockArena per tier over memory the
// engine supplies - device and pinned host memory on the GPU, plain host memory on the CPU (whose
// engine has no Device tier). Capacities are budgets in bytes; segments are reserved as blocks are
// first needed and kept until the engine goes.
#include <cstddef>
#include <optional>
#include <string>

#include "cli/engine.h"
#include "runtime/core/block_arena.h"

namespace q35::cli {

// Host memory from the C heap (256-byte aligned), for the CPU engine's tier and the tests.
BlockArena::Memory heap_memory();

class StateMemory {
 public:
  // `device`: nullopt for an engine without device memory. segment_bytes: the usual size of a
  // reserved piece (a larger block gets a piece of its own size).
  StateMemory(std::optional<BlockArena::Memory> device, BlockArena::Memory host, size_t segment_bytes);

  // Budgets of both tiers. Error when device bytes are asked of an engine without a device, or while
  // blocks of a tier whose budget changes are alive.
  void set_capacity(size_t device_bytes, size_t host_bytes);
  size_t capacity(Tier tier) const;
  size_t used(Tier tier) const;
  size_t reserved(Tier tier) const;
  bool has_device() const { return device_memory_.has_value(); }

  // A saved state of `bytes` with an empty block in `tier` for the engine to fill, or nullptr when
  // the tier has no room (its budget is spent, or its free space is in pieces too small).
  std::shared_ptr<SavedState> allocate(StatePart part, int64_t pos, size_t bytes, Tier tier);

 private:
  std::optional<BlockArena::Memory> device_memory_;
  BlockArena::Memory host_memory_;
  size_t segment_bytes_;
  std::optional<BlockArena> arenas_[2];  // by Tier
};

}  // namespace q35::cli
