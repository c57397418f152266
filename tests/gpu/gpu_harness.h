#pragma once
// Shared pieces of the GPU tests (tests/gpu/, one executable `test_gpu`, CTest label "gpu").
// They run only on a machine with a GPU (scripts/gpu_check.sh); without one they FAIL, never skip.
// Inputs are fresh random values each run (seeded from the clock unless Q35_TEST_SEED is set, and
// the seed is printed); outputs are poisoned (NaN bit pattern) before every launch.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "models/qwen35/config.h"
#include "models/qwen35/gpu_model.h"
#include "models/qwen35/reference_ops.h"
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

// The GpuModel options the model-level tests run the synthetic 35B-A3B with: W4A16 g128 (or `format`)
// and the given context, prefill chunk and slots.
inline qwen35::GpuModelOptions synthetic_35b_options(int64_t max_context, int64_t max_chunk, int max_batch = 1,
                                                     qwen35::WeightFormat format = qwen35::WeightFormat::W4A16) {
  qwen35::GpuModelOptions o;
  o.format = format;
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

// The rows of one call of T rows whose bytes (all: the call's output, row_bytes per row) differ from
// that row computed alone: run_one(r, out) computes row r by itself into `out` (row_bytes, poisoned).
template <typename F>
int rows_unlike_alone(const Gpu& g, const std::vector<uint8_t>& all, size_t row_bytes, int T, F&& run_one) {
  REQUIRE(all.size() >= size_t(T) * row_bytes);
  DeviceBuffer d_one = poisoned(g, row_bytes);
  int differ = 0;
  for (int r = 0; r < T; ++r) {
    run_one(r, d_one);
    const std::vector<uint8_t> one = to_host<uint8_t>(g, d_one);
    differ += std::memcmp(one.data(), all.data() + size_t(r) * row_bytes, row_bytes) != 0;
  }
  return differ;
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

// ---- dense products on a sample of rows and columns (the dense and FP8 tests) ----

// Fast random bf16 (hashed counter, triangular in [-scale, scale]): the 35B lm_head has 508M values.
inline std::vector<uint16_t> fast_random_bf16(size_t n, uint32_t salt, float scale) {
  std::vector<uint16_t> v(n);
  const uint64_t seed = (uint64_t(run_seed()) << 32) ^ (uint64_t(salt) * 0x9e3779b97f4a7c15ull);
  for (size_t i = 0; i < n; ++i) {
    uint64_t z = seed + i * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 31)) * 0x94d049bb133111ebull;
    z ^= z >> 29;
    const float a = float(uint32_t(z) >> 8) * 0x1p-24f, b = float(uint32_t(z >> 32) >> 8) * 0x1p-24f;
    v[i] = f32_to_bf16((a - b) * scale);
  }
  return v;
}

// Indices checked of a dimension of size n: all when small, else the first 8, ~`count` random, the last 8.
inline std::vector<int64_t> sample_indices(int64_t n, int64_t count, uint32_t salt) {
  std::vector<int64_t> idx;
  if (n <= count) {
    idx.resize(size_t(n));
    std::iota(idx.begin(), idx.end(), 0);
    return idx;
  }
  std::mt19937 rng(run_seed() + salt);
  for (int64_t i = 0; i < 8; ++i) idx.push_back(i), idx.push_back(n - 1 - i);
  while (int64_t(idx.size()) < count) idx.push_back(int64_t(rng() % uint64_t(n)));
  std::sort(idx.begin(), idx.end());
  idx.erase(std::unique(idx.begin(), idx.end()), idx.end());
  return idx;
}

// Rows `rows` of a row-major bf16 matrix [*, k] as fp32.
inline std::vector<float> rows_f32(const std::vector<uint16_t>& m, int64_t k, const std::vector<int64_t>& rows) {
  std::vector<float> out(rows.size() * size_t(k));
  for (size_t i = 0; i < rows.size(); ++i)
    for (int64_t j = 0; j < k; ++j) out[i * size_t(k) + j] = bf16_to_f32(m[size_t(rows[i] * k + j)]);
  return out;
}

// rel_l2 of y (bf16 or fp32 [M, n] on the device) at rows m_idx x cols n_idx against
// ref::matmul(x[m_idx], w_sub) where w_sub [n_idx.size(), k] fp32 holds the weights of n_idx.
inline double check_product(const std::vector<float>& x_sub, const std::vector<float>& w_sub, const std::vector<int64_t>& m_idx,
                     const std::vector<int64_t>& n_idx, int64_t n, int64_t k, const std::vector<float>& y_full) {
  std::vector<float> ref(m_idx.size() * n_idx.size()), got(ref.size());
  qwen35::ref::matmul(x_sub, w_sub, ref, int64_t(m_idx.size()), int64_t(n_idx.size()), k);
  for (size_t i = 0; i < m_idx.size(); ++i)
    for (size_t j = 0; j < n_idx.size(); ++j) got[i * n_idx.size() + j] = y_full[size_t(m_idx[i] * n + n_idx[j])];
  return rel_l2(got, ref);
}

// Median time per launch of `launch(i)` recorded `per_graph` times into one CUDA graph, replayed
// `reps` times after a warm-up.
template <typename F>
double graph_us(Gpu& g, int per_graph, F launch, int reps = 20) {
  Graph graph = Graph::capture(g.driver, g.stream, [&] {
    for (int i = 0; i < per_graph; ++i) launch(i);
  });
  GraphExec exec = graph.instantiate();
  exec.launch(g.stream);
  g.stream.synchronize();
  std::vector<double> t;
  Event a(g.driver), b(g.driver);
  for (int r = 0; r < reps; ++r) {
    a.record(g.stream);
    exec.launch(g.stream);
    b.record(g.stream);
    b.synchronize();
    t.push_back(b.elapsed_ms_since(a) * 1e3 / per_graph);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace q35::gpu_test
