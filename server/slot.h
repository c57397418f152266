#pragma once
// Per-sequence slots of the scheduler. A slot is one sequence the engine can hold: the request
// bound to it and the host side of that sequence's state (ids fed, position, sampling, recurrent
// snapshots of its prefill). The device side (K/V rows, DeltaNet conv and recurrent state) is the
// engine's sequence slot of the same index (cli::Engine: max_batch() slots); the pool has
// min(--max-batch, engine slots) of them and the scheduler steps every slot in the decode phase
// together. A request acquires a slot through a SlotLease, which gives it back when destroyed: on
// finish, on cancel (the client went away) and on an error alike.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "cli/engine.h"
#include "runtime/core/sampler.h"

namespace q35::server {

class Job;

struct Slot {
  enum class Phase { Free, Prefill, Decode };
  int index = 0;                 // the engine's sequence this slot's device state lives in
  Phase phase = Phase::Free;    // Prefill: its prompt still runs; Decode: one token per decode step
  std::shared_ptr<Job> job;      // the request bound to the slot (null when free)
  std::vector<int32_t> tokens;   // ids in the sequence: the prompt part computed so far, then generated ids
  int64_t cached = 0;            // tokens restored from the prefix cache
  SamplingParams sampling;       // the request's, with its seed drawn when it gave none
  std::map<int64_t, cli::SavedStatePtr> snapshots;  // recurrent state at prefill snapshot points
  int64_t position() const { return int64_t(tokens.size()); }
};

class SlotPool;

// A slot bound to a job; releases it (clearing the slot) when destroyed or on release().
class SlotLease {
 public:
  SlotLease(SlotLease&& o) noexcept : pool_(std::exchange(o.pool_, nullptr)), slot_(std::exchange(o.slot_, nullptr)) {}
  SlotLease& operator=(SlotLease&& o) noexcept;
  SlotLease(const SlotLease&) = delete;
  SlotLease& operator=(const SlotLease&) = delete;
  ~SlotLease() { release(); }

  Slot& operator*() const { return *slot_; }
  Slot* operator->() const { return slot_; }
  void release() noexcept;

 private:
  friend class SlotPool;
  SlotLease(SlotPool* pool, Slot* slot) : pool_(pool), slot_(slot) {}
  SlotPool* pool_;
  Slot* slot_;
};

// A fixed number of slots. acquire/release run on the scheduler's worker thread; the counts may be
// read from any thread (metrics).
class SlotPool {
 public:
  explicit SlotPool(size_t n);  // Error when n == 0
  SlotPool(const SlotPool&) = delete;
  SlotPool& operator=(const SlotPool&) = delete;
  ~SlotPool();  // every lease must be gone (a lease outliving its pool is a bug: std::terminate)

  // A free slot bound to `job` (phase Prefill, state empty), or nullopt when all are in use.
  std::optional<SlotLease> acquire(std::shared_ptr<Job> job);
  size_t size() const { return slots_.size(); }
  size_t in_use() const { return in_use_; }
  size_t available() const { return slots_.size() - in_use_; }
  uint64_t acquired_total() const { return acquired_total_; }

 private:
  friend class SlotLease;
  void release(Slot& slot) noexcept;

  std::vector<Slot> slots_;  // never resized: leases point into it
  std::atomic<size_t> in_use_{0};
  std::atomic<uint64_t> acquired_total_{0};
};

}  // namespace q35::server
