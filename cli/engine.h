#pragma once
// A model on a device behind one interface (the CPU reference or the GPU runner): max_batch()
// sequence slots, each with its own state (K/V rows, DeltaNet conv and recurrent state, position),
// a prompt fed to one slot at a time, a decode step that advances many slots by one token
// together, and saved copies of a slot's state in the engine's own memory for a prefix cache.
//
// The batched step's contract (the CPU reference defines it; a GPU implementation must match it):
// entry b feeds its token to its slot at that slot's position; attention reads only that slot's
// K/V rows, DeltaNet continues only that slot's state; the token's logits, and so the id its
// sampler draws, do not depend on which other slots are in the step.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/core/block_arena.h"
#include "runtime/core/sampler.h"

namespace q35::cli {

// Saved states (the prefix cache). A saved state is one part of a sequence's state after `pos`
// tokens - the K/V rows of its first `pos` tokens, or its recurrent (DeltaNet conv + fp32) state at
// `pos` - in one contiguous block of the engine's state memory, in one of two tiers: Device (GPU
// memory) or Host (pinned host memory on the GPU engine, plain memory on the CPU engine, which has
// only this tier). Only the engine that saved it reads it; the block is freed for reuse when the
// last reference goes. A state saved from any slot restores into any slot.
enum class Tier { Device = 0, Host = 1 };
inline const char* tier_name(Tier t) { return t == Tier::Device ? "device" : "host"; }
enum class StatePart { KV, Recurrent };

struct SavedState {
  StatePart part = StatePart::KV;
  int64_t pos = 0;
  Tier tier = Tier::Host;
  size_t bytes = 0;        // the layout's size (the block may be rounded up)
  BlockArena::Block block;
  uint64_t addr() const { return block.addr(); }
};
using SavedStatePtr = std::shared_ptr<const SavedState>;

// What the prefix cache needs to move saved states between tiers.
class StateStore {
 public:
  virtual ~StateStore() = default;
  // Bytes of saved states the tier may hold (0: the tier is off).
  virtual size_t state_capacity(Tier tier) const = 0;
  // A copy of `s` in a new block of `tier`, or nullptr when the tier has no room for it. On the GPU
  // the copy is asynchronous (ordered on the engine's stream before anything that reads the copy).
  virtual SavedStatePtr copy_state(const SavedState& s, Tier tier) = 0;
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

class Engine : public StateStore {
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

  // Memory for saved states, per tier, reserved in pieces as it is first needed (so a large budget
  // costs nothing until it is used). Error: device bytes on an engine without a device (the CPU
  // engine), or while saved states of this engine are alive.
  virtual void set_state_memory(size_t device_bytes, size_t host_bytes) = 0;
  // Bytes of saved states held in the tier now (their blocks).
  virtual size_t state_used(Tier tier) const = 0;
  // The size of a saved part of `pos` tokens (the recurrent part does not depend on it).
  virtual size_t state_bytes(StatePart part, int64_t pos) const = 0;
  // The slot's part at position(slot) in a new block of `tier`, or nullptr when the tier has no
  // room. On the GPU the copies are issued on the engine's stream and the call returns at once: the
  // slot's next step runs after them, and nothing waits on the host.
  virtual SavedStatePtr save_state(int slot, StatePart part, Tier tier) = 0;
  // Sets the slot to `recurrent.pos` tokens: the recurrent state from `recurrent`, K/V rows
  // [0, recurrent.pos) from `kv`. Error when kv.pos < recurrent.pos or the parts are not a KV and a
  // Recurrent state of this model. Asynchronous on the GPU like save_state.
  virtual void restore(int slot, const SavedState& kv, const SavedState& recurrent) = 0;

  // Device memory free now, in bytes (0 without a device): the serve command's default budget of
  // the Device tier is half of it, taken after the model and its slots are allocated.
  virtual size_t device_free_bytes() const { return 0; }
  // Prompt tokens the engine takes best in one prefill call (0: no preference): the scheduler feeds
  // prompts in pieces this large while no other sequence is decoding. The GPU's is its prefill chunk
  // (one 4,096-token call runs in 87 ms on the H200, eight calls of 512 in 204 ms).
  virtual int64_t idle_prefill_tokens() const { return 0; }

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
