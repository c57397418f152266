#pragma once
// One sequence of a model on a device, behind one interface (the CPU reference or the GPU runner),
// and host copies of its state for a prefix cache.
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

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string device() const = 0;  // "cpu" or the GPU's name
  virtual int64_t position() const = 0;
  virtual int64_t max_context() const = 0;
  // fp32 logits [T, vocab] of every position (all) or [vocab] of the last.
  virtual std::vector<float> logits(std::span<const int32_t> tokens, bool all) = 0;
  // Feeds the tokens and returns the next id drawn by `sampler`'s rules.
  virtual int32_t prefill(std::span<const int32_t> tokens, Sampler& sampler) = 0;
  virtual int32_t decode(int32_t token, Sampler& sampler) = 0;

  // Empties the sequence (position 0).
  virtual void reset() = 0;
  // The recurrent part of the state at position(): every DeltaNet layer's conv inputs and fp32
  // recurrent state (size independent of the position).
  virtual StateCopy save_recurrent() const = 0;
  // The attention part: rows [0, position()) of every full-attention layer's K and V caches.
  virtual StateCopy save_kv() const = 0;
  // Sets the sequence to `recurrent.pos` tokens: the recurrent state from `recurrent`, K/V rows
  // [0, recurrent.pos) from `kv`. Error when kv.pos < recurrent.pos or the copies do not fit.
  virtual void restore(const StateCopy& kv, const StateCopy& recurrent) = 0;
};

}  // namespace q35::cli
