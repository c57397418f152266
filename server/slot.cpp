#include "server/slot.h"

#include <exception>

#include "runtime/core/error.h"

namespace q35::server {

SlotLease& SlotLease::operator=(SlotLease&& o) noexcept {
  if (this != &o) {
    release();
    pool_ = std::exchange(o.pool_, nullptr);
    slot_ = std::exchange(o.slot_, nullptr);
  }
  return *this;
}

void SlotLease::release() noexcept {
  if (pool_ && slot_) pool_->release(*slot_);
  pool_ = nullptr;
  slot_ = nullptr;
}

SlotPool::SlotPool(size_t n) {
  if (n == 0) fail("SlotPool: at least one slot is needed");
  slots_.resize(n);
  for (size_t i = 0; i < n; ++i) slots_[i].index = int(i);
}

SlotPool::~SlotPool() {
  if (in_use_ != 0) std::terminate();
}

std::optional<SlotLease> SlotPool::acquire(std::shared_ptr<Job> job) {
  for (Slot& s : slots_) {
    if (s.phase != Slot::Phase::Free) continue;
    s.phase = Slot::Phase::Prefill;
    s.job = std::move(job);
    ++in_use_;
    ++acquired_total_;
    return SlotLease(this, &s);
  }
  return std::nullopt;
}

void SlotPool::release(Slot& slot) noexcept {
  const int index = slot.index;
  slot = Slot{};
  slot.index = index;
  --in_use_;
}

}  // namespace q35::server
