#pragma once
// Token sampling on the host: greedy, temperature, top-k, top-p, seeded. The same rules run on
// the GPU path later; this is their reference.
#include <cstdint>
#include <random>
#include <span>

namespace q35 {

struct SamplingParams {
  float temperature = 0.0f;  // <= 0: greedy (argmax, lowest id on ties)
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // logits: [vocab] fp32. Returns the chosen id.
  int32_t sample(std::span<const float> logits);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

// Index of the largest value; the lowest index wins ties (as torch.argmax on CPU).
int32_t argmax(std::span<const float> logits);

}  // namespace q35
