#pragma once
// Shared pieces of the GPU tests (tests/gpu/, one executable `test_gpu`, CTest label "gpu").
// They run only on a machine with a GPU (scripts/gpu_check.sh); without one they FAIL, never skip.
// Inputs are fresh random values each run (seeded from the clock unless Q35_TEST_SEED is set, and
// the seed is printed); outputs are poisoned (NaN bit pattern) before every launch.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "models/qwen35/config.h"
#include "models/qwen35/gpu_model.h"
#include "runtime/core/error.h"
#include "runtime/core/half.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"
#include "tests/test_util.h"

namespace q35::gpu_test {

using q35::test::error_of;

// Everything a GPU test needs. The JIT cache is the normal one ($Q35JIT_CACHE_DIR...), so cubins
// compiled on the build machine for sm_90a are reused.
struct Gpu {
  Driver driver;
  Context ctx{driver, 0};
  Stream stream{driver};
  JitEngine jit{default_cache_dir(), JitOptions{}};
};

// One Gated DeltaNet layer of hk key / hv value heads of 128, conv 4 (the GDN and batch tests).
inline qwen35::Config gdn_layer_config(int64_t hk, int64_t hv) {
  qwen35::Config c;
  c.layer_types = {qwen35::LayerType::LinearAttention};
  c.linear_num_key_heads = hk;
  c.linear_num_value_heads = hv;
  c.linear_key_head_dim = 128;
  c.linear_value_head_dim = 128;
  c.linear_conv_kernel_dim = 4;
  c.rms_norm_eps = 1e-6;
  return c;
}

// The GpuModel options the model-level tests run the synthetic 35B-A3B with: W4A16 g128 and the
// given context, prefill chunk and slots.
inline qwen35::GpuModelOptions synthetic_35b_options(int64_t max_context, int64_t max_chunk, int max_batch = 1) {
  qwen35::GpuModelOptions o;
  o.format = qwen35::WeightFormat::W4A16;
  o.group = 128;
  o.max_context = max_context;
  o.max_chunk = max_chunk;
  o.max_batch = max_batch;
  return o;
}

inline std::unique_ptr<Gpu> open_gpu() {
  try {
    return std::make_unique<Gpu>();
  } catch (const Error& e) {
    FAIL("the GPU tests need a GPU: " << e.what());
  }
  return nullptr;
}

// Seed for this run's random inputs: $Q35_TEST_SEED, else the clock (printed once per test case).
inline uint32_t run_seed() {
  if (const char* s = std::getenv("Q35_TEST_SEED")) return uint32_t(std::strtoul(s, nullptr, 10));
  static const uint32_t seed = uint32_t(std::chrono::steady_clock::now().time_since_epoch().count());
  return seed;
}

inline std::vector<float> random_f32(size_t n, uint32_t salt, float scale) {
  std::mt19937 rng(run_seed() * 2654435761u + salt);
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

inline std::vector<uint16_t> random_bf16(size_t n, uint32_t salt, float scale) {
  std::vector<uint16_t> v(n);
  std::vector<float> f = random_f32(n, salt, scale);
  for (size_t i = 0; i < n; ++i) v[i] = f32_to_bf16(f[i]);
  return v;
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& f) {
  std::vector<uint16_t> v(f.size());
  for (size_t i = 0; i < f.size(); ++i) v[i] = f32_to_bf16(f[i]);
  return v;
}

inline std::vector<float> to_f32(const std::vector<uint16_t>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = bf16_to_f32(b[i]);
  return v;
}

template <typename T>
DeviceBuffer to_device(const Gpu& g, const std::vector<T>& host) {
  DeviceBuffer b(g.driver, host.size() * sizeof(T));
  b.upload(host.data(), b.size(), g.stream);
  return b;
}

// An output buffer filled with 0xFF bytes (NaN in bf16 and fp32) so unwritten elements show.
inline DeviceBuffer poisoned(const Gpu& g, size_t bytes) {
  DeviceBuffer b(g.driver, bytes);
  b.fill_bytes(0xff, g.stream);
  return b;
}

template <typename T>
std::vector<T> to_host(const Gpu& g, const DeviceBuffer& b) {
  std::vector<T> host(b.size() / sizeof(T));
  b.download(host.data(), b.size(), g.stream);
  g.stream.synchronize();
  return host;
}

// ||got - want|| / ||want|| (L2); infinite if any value is not finite.
inline double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    double d = double(got[i]) - double(want[i]);
    num += d * d;
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// bf16 values within one unit in the last place (output rounding of a differently ordered sum).
// max |got - want| / max |want|; infinite when a value is not finite.
inline double max_rel(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  double d = 0, m = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    d = std::max(d, double(std::fabs(got[i] - want[i])));
    m = std::max(m, double(std::fabs(want[i])));
  }
  return d / std::max(m, 1e-30);
}

inline bool within_one_ulp(uint16_t got, uint16_t want) {
  return std::abs(int(got) - int(want)) <= 1 && ((got ^ want) & 0x8000) == 0;
}

}  // namespace q35::gpu_test
