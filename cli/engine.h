#pragma once
// A model on a device behind one interface (the CPU reference or the GPU runner): max_batch()
// sequence slots, each with its own state (K/V rows, DeltaNet conv and recurrent state, position),
// a prompt fed to one slot at a time, a decode step that advances many slots by one token
// together, and host copies of a slot's state for a prefix cache.
//
// The batched step's contract (the CPU reference defines it; a GPU implementation must match it):
// entry b feeds its token to its slot at that slot's position; attention reads only that slot's
// K/V rows, DeltaNet continues only that slot's state; the token's logits, and so the id its
// sampler draws, do not depend on which other slots are in the step.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "runtime/core/sampler.h"

namespace q35::cli {

// Host copy of part of a sequence's state after `pos` tokens, opaque bytes per layer that only an
// engine of the same model and device reads back.
struct StateCopy {
  int64_t pos = 0;
  std::vector<std::vector<std::byte>> parts;
  size_t bytes() const {
    size_t n = 0;
    for (const auto& p : parts) n += p.size();
    return n;
  }
};

// One sequence of a batched decode step.
struct DecodeEntry {
  int slot = 0;
  int32_t token = 0;           // fed at position(slot)
  Sampler* sampler = nullptr;  // the slot's own sampler (parameters, seed, random stream) draws the next
                               // id; null: the step returns this entry's logits for the host to choose
};
struct DecodeOutput {
  int32_t id = -1;             // the drawn id; -1 for an entry without a sampler
  std::vector<float> logits;   // entry without a sampler: fp32 [vocab]; else empty
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string device() const = 0;  // "cpu" or the GPU's name
  virtual int max_batch() const = 0;       // sequence slots 0 .. max_batch() - 1
  virtual int64_t max_context() const = 0; // tokens each slot can hold
  virtual int64_t position(int slot) const = 0;

  // Prefill of one slot. fp32 logits [T, vocab] of every position (all) or [vocab] of the last.
  virtual std::vector<float> logits(int slot, std::span<const int32_t> tokens, bool all) = 0;
  // Feeds the tokens and returns the next id drawn by `sampler`'s rules.
  virtual int32_t prefill(int slot, std::span<const int32_t> tokens, Sampler& sampler) = 0;
  // One decode step of every entry's slot (distinct slots, 1 <= size <= max_batch()): outputs in
  // the entries' order. Error (no slot advanced) on a repeated or unknown slot or a full one.
  virtual std::vector<DecodeOutput> decode_batch(std::span<const DecodeEntry> batch) = 0;

  // Empties the slot (position 0).
  virtual void reset(int slot) = 0;
  // The recurrent part of the slot's state at position(slot): every DeltaNet layer's conv inputs
  // and fp32 recurrent state (size independent of the position).
  virtual StateCopy save_recurrent(int slot) const = 0;
  // The attention part: rows [0, position(slot)) of every full-attention layer's K and V caches.
  virtual StateCopy save_kv(int slot) const = 0;
  // Sets the slot to `recurrent.pos` tokens: the recurrent state from `recurrent`, K/V rows
  // [0, recurrent.pos) from `kv`. Error when kv.pos < recurrent.pos or the copies do not fit. A
  // copy saved from any slot restores into any slot.
  virtual void restore(int slot, const StateCopy& kv, const StateCopy& recurrent) = 0;

  // One sequence in slot 0, for the commands that run one (run, eval).
  int64_t position() const { return position(0); }
  std::vector<float> logits(std::span<const int32_t> tokens, bool all) { return logits(0, tokens, all); }
  int32_t prefill(std::span<const int32_t> tokens, Sampler& sampler) { return prefill(0, tokens, sampler); }
  int32_t decode(int32_t token, Sampler& sampler) {
    const DecodeEntry e{0, token, &sampler};
    return decode_batch(std::span<const DecodeEntry>(&e, 1))[0].id;
  }
  void reset() { reset(0); }
};

}  // namespace q35::cli
