#include "runtime/core/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "runtime/core/error.h"

namespace q35 {

int32_t argmax(std::span<const float> logits) {
  if (logits.empty()) fail("argmax: empty logits");
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {
  if (params.top_k < 0) fail("--top-k must be >= 0, got {}", params.top_k);
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f)) fail("--top-p must be in (0, 1], got {}", params.top_p);
  if (!std::isfinite(params.temperature)) fail("--temperature must be finite");
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (params_.temperature <= 0.0f) return argmax(logits);
  // Candidates sorted by logit, descending (stable: lower id first among equals).
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  size_t keep = ids.size();
  if (params_.top_k > 0) keep = std::min<size_t>(keep, size_t(params_.top_k));
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), by_logit);
  ids.resize(keep);

  // Softmax over the kept candidates at the given temperature (fp64 for the sums).
  std::vector<double> probs(keep);
  const double inv_t = 1.0 / double(params_.temperature);
  const double top = double(logits[ids[0]]);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += probs[i] = std::exp((double(logits[ids[i]]) - top) * inv_t);
  for (double& p : probs) p /= total;

  // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
  if (params_.top_p < 1.0f) {
    double mass = 0;
    size_t n = 0;
    while (n < keep) {
      mass += probs[n++];
      if (mass >= double(params_.top_p)) break;
    }
    probs.resize(n);
    ids.resize(n);
  }
  std::discrete_distribution<size_t> pick(probs.begin(), probs.end());
  return ids[pick(rng_)];
}

}  // namespace q35
