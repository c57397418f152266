// GPU: top-k sampling (kernel_templates/topk_sample.cuh) against the host sampler's rules.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <numeric>

#include "models/qwen35/gpu/sampling.h"
#include "tests/gpu/gpu_harness.h"

using namespace q35;
using namespace q35::gpu_test;
using namespace q35::qwen35;

namespace {

// The host rules (runtime/core/sampler.cpp): ids and probabilities of the kept candidates.
std::vector<std::pair<int, double>> kept(const std::vector<float>& logits, const SamplingParams& p) {
  std::vector<int> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::sort(ids.begin(), ids.end(), [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  ids.resize(size_t(p.top_k));
  std::vector<double> w;
  double total = 0;
  for (int id : ids) total += w.emplace_back(std::exp((double(logits[id]) - logits[ids[0]]) / p.temperature));
  size_t n = ids.size();
  if (p.top_p < 1.f) {
    double mass = 0;
    for (n = 0; n < ids.size();) {
      mass += w[n++] / total;
      if (mass >= p.top_p) break;
    }
  }
  double kept_mass = 0;
  for (size_t i = 0; i < n; ++i) kept_mass += w[i];
  std::vector<std::pair<int, double>> out;
  for (size_t i = 0; i < n; ++i) out.emplace_back(ids[i], w[i] / kept_mass);
  return out;
}

}  // namespace

TEST_CASE("GPU: top-k sampling keeps the host's candidates and follows their probabilities") {
  auto g = open_gpu();
  for (int64_t V : {int64_t(1536), int64_t(248320)}) {
    const gpu::TopkSamplePlan plan = gpu::topk_sample_plan(V);
    const Function& partial = g->jit.load(plan.partial_spec(), g->ctx);
    const Function& final_ = g->jit.load(plan.final_spec(), g->ctx);
    for (const SamplingParams& p : {SamplingParams{1.0f, 20, 0.95f, 0}, SamplingParams{0.7f, 50, 1.0f, 0},
                                    SamplingParams{1.5f, 5, 0.5f, 0}, SamplingParams{1.0f, 64, 1.0f, 0}}) {
      CAPTURE(V);
      CAPTURE(p.temperature);
      CAPTURE(p.top_k);
      CAPTURE(p.top_p);
      std::vector<float> logits = random_f32(size_t(V), uint32_t(V + p.top_k), 2.0f);
      logits[size_t(V / 3)] = logits[size_t(V / 3 + 1)] = 9.f;  // a tie at the top: lower id first
      const auto want = kept(logits, p);
      DeviceBuffer d_logits = to_device(*g, logits), d_out = poisoned(*g, 4), d_ws(g->driver, plan.workspace_bytes());
      const uint64_t rng0[2] = {run_seed(), 0};
      DeviceBuffer d_rng(g->driver, 16);
      d_rng.upload(rng0, 16, g->stream);
      const int draws = 3000;
      std::map<int, int> count;
      for (int i = 0; i < draws; ++i) {
        gpu::launch_topk_sample(plan, partial, final_, g->stream, d_logits.ptr(), d_out.ptr(), d_rng.ptr(), d_ws.ptr(), p);
        count[to_host<int32_t>(*g, d_out)[0]]++;
      }
      std::map<int, double> prob(want.begin(), want.end());
      for (const auto& [id, c] : count) CHECK_MESSAGE(prob.count(id), "drew id " << id << " outside the kept set");
      for (const auto& [id, pr] : want) {  // within 5 sigma of the binomial
        const double sigma = std::sqrt(draws * pr * (1 - pr));
        CHECK(std::fabs(count[id] - draws * pr) <= 5 * sigma + 1);
      }
      CHECK(to_host<uint64_t>(*g, d_rng)[1] == uint64_t(draws));
    }
    // Speed at this vocabulary, top_k 20 (the Qwen default).
    std::vector<float> logits = random_f32(size_t(V), 99, 2.0f);
    DeviceBuffer d_logits = to_device(*g, logits), d_out(g->driver, 4), d_ws(g->driver, plan.workspace_bytes()),
                 d_rng(g->driver, 16);
    d_rng.fill_bytes(0, g->stream);
    const SamplingParams p{1.0f, 20, 0.95f, 0};
    Event a(g->driver), b(g->driver);
    for (int i = 0; i < 5; ++i)
      gpu::launch_topk_sample(plan, partial, final_, g->stream, d_logits.ptr(), d_out.ptr(), d_rng.ptr(), d_ws.ptr(), p);
    a.record(g->stream);
    for (int i = 0; i < 50; ++i)
      gpu::launch_topk_sample(plan, partial, final_, g->stream, d_logits.ptr(), d_out.ptr(), d_rng.ptr(), d_ws.ptr(), p);
    b.record(g->stream);
    b.synchronize();
    MESSAGE("top-k sampling, V = " << V << ", top_k 20, top_p 0.95: " << b.elapsed_ms_since(a) * 1000.f / 50 << " us per draw");
  }
}
