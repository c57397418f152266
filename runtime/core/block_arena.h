#pragma once
// A first-fit allocator of byte ranges inside memory reserved on demand in large segments, up to a
// capacity. The prefix cache's tiers (device memory, pinned host memory, plain host memory) place
// each saved state in one contiguous block of such an arena, so saving, moving and restoring it is
// a few large copies and no allocation call on the hot path (cuMemFree synchronises the device).
//
// Device-agnostic: addresses are integers (a CUdeviceptr or a host pointer), segments come from the
// `reserve` callback (at most capacity bytes in all; a segment is max(segment_bytes, the request),
// cut to what is left of the capacity) and go back through `release` only when the arena is
// destroyed. Free ranges coalesce within a segment, never across two. Not thread-safe.
//
// Blocks are move-only handles that free their range when destroyed; a block that outlives its
// arena frees nothing (its memory is gone with the arena). The owner of the memory must order reuse:
// on the GPU every copy into or out of a block runs on one stream, so a range freed and handed out
// again is written only after the copies that read it.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <vector>

namespace q35 {

class BlockArena {
  struct State;

 public:
  static constexpr size_t kAlign = 256;  // every block starts and ends on a multiple of this

  struct Memory {
    // Reserves `bytes` and returns the address, or 0 when there is no more memory. After a 0 the
    // arena keeps what it has (its capacity becomes what it reserved).
    std::function<uint64_t(size_t bytes)> reserve;
    std::function<void(uint64_t addr, size_t bytes)> release;
  };

  class Block {
   public:
    Block() = default;
    Block(Block&& o) noexcept;
    Block& operator=(Block&& o) noexcept;
    Block(const Block&) = delete;
    Block& operator=(const Block&) = delete;
    ~Block();

    uint64_t addr() const { return addr_; }
    size_t bytes() const { return bytes_; }  // the range held (a multiple of kAlign)
    explicit operator bool() const { return addr_ != 0; }

   private:
    friend class BlockArena;
    Block(std::weak_ptr<State> arena, uint64_t addr, size_t bytes) : arena_(std::move(arena)), addr_(addr), bytes_(bytes) {}
    void release() noexcept;
    std::weak_ptr<State> arena_;
    uint64_t addr_ = 0;
    size_t bytes_ = 0;
  };

  // Error when segment_bytes is 0 or a callback is missing.
  BlockArena(size_t capacity, size_t segment_bytes, Memory memory);
  ~BlockArena();  // releases every segment
  BlockArena(const BlockArena&) = delete;
  BlockArena& operator=(const BlockArena&) = delete;

  // A block of at least `bytes` (> 0), or nullopt when it does not fit: no free range of the
  // reserved segments is large enough and a new segment would pass the capacity (or `reserve`
  // returned 0).
  std::optional<Block> allocate(size_t bytes);

  size_t capacity() const;
  size_t reserved() const;   // bytes of the segments
  size_t used() const;       // bytes of the live blocks
  size_t segments() const;
  size_t largest_free() const;  // the largest range a block could take without a new segment
  bool reserve_failed() const;  // `reserve` returned 0 once

 private:
  std::shared_ptr<State> state_;
};

}  // namespace q35
