// GPU: the device probe (autotune/device_probe, kernel_templates/probe.cuh) behind the floors of
// `q35jit bench`: the copy kernel copies exactly, the fill is seeded random bits, the tensor-core
// kernel computes the products it is timed on (against a CPU model of the m16n8k16 fragments), and
// the measured rates are positive and physically sane.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>

#include "autotune/device_probe.h"
#include "tests/gpu/gpu_harness.h"

using namespace q35;
using namespace q35::gpu_test;

namespace {

// probe.cuh's probe_hash and probe_bf16x2, on the host.
uint64_t probe_hash(uint64_t seed, uint64_t i) {
  uint64_t x = seed ^ (i * 0x632be59bd9b4e019ull);
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The two bf16 values (low half first) a register holds.
std::pair<float, float> probe_bf16x2(uint64_t bits) {
  const float lo = float(int(bits & 0xffffu) - 32768) * (1.f / 32768.f);
  const float hi = float(int((bits >> 16) & 0xffffu) - 32768) * (1.f / 32768.f);
  return {round_bf16(lo), round_bf16(hi)};
}

// What probe_mma writes for thread `t`: per accumulator j, D = A . B_j (m16n8k16) assembled from
// the warp's registers (g = lane / 4, c = lane % 4: a0 A[g][2c..], a1 A[g+8][2c..], a2 A[g][2c+8..],
// a3 A[g+8][2c+8..]; b0 B[2c..][g], b1 B[2c+8..][g]; the lane's D elements (g, 2c..) and (g+8, 2c..)),
// times `iters`, summed.
std::vector<float> mma_reference(size_t threads, int iters, uint64_t seed) {
  std::vector<float> out(threads);
  for (size_t w = 0; w < threads / 32; ++w) {
    for (int j = 0; j < kProbeMmaAcc; ++j) {
      double A[16][16], B[16][8];
      for (int lane = 0; lane < 32; ++lane) {
        const uint64_t t = w * 32 + lane;
        const int g = lane / 4, c = lane % 4;
        const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * c, 2 * c, 2 * c + 8, 2 * c + 8};
        for (int r = 0; r < 4; ++r) {
          auto [lo, hi] = probe_bf16x2(probe_hash(seed, t * 128 + r));
          A[rows[r]][cols[r]] = lo;
          A[rows[r]][cols[r] + 1] = hi;
        }
        for (int h = 0; h < 2; ++h) {
          auto [lo, hi] = probe_bf16x2(probe_hash(seed, t * 128 + 4 + 2 * j + h));
          B[2 * c + 8 * h][g] = lo;
          B[2 * c + 8 * h + 1][g] = hi;
        }
      }
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, c = lane % 4;
        double sum = 0;
        for (int row : {g, g + 8})
          for (int col : {2 * c, 2 * c + 1})
            for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        out[w * 32 + lane] += float(sum * iters);
      }
    }
  }
  return out;
}

}  // namespace

TEST_CASE("GPU probe: the copy kernel copies exactly, remainders included, and nothing past the end") {
  auto g = open_gpu();
  const DeviceProbe probe(g->jit, g->ctx);
  // 7 vectors (fewer than one block), one more than a whole unrolled grid pass, and a large odd count.
  const size_t grid_pass = size_t(g->ctx.device().sm_count) * 4 * kProbeCopyThreads * kProbeCopyUnroll;
  for (size_t vectors : {size_t(7), grid_pass + 1, size_t(1000003)}) {
    CAPTURE(vectors);
    const size_t bytes = vectors * 16;
    std::vector<uint32_t> host(bytes / 4);
    std::mt19937 rng(run_seed() + uint32_t(vectors));
    for (auto& x : host) x = rng();
    DeviceBuffer src = to_device(*g, host), dst = poisoned(*g, bytes + 4096);
    probe.copy(src.ptr(), dst.ptr(), bytes, g->stream);
    std::vector<uint32_t> got = to_host<uint32_t>(*g, dst);
    CHECK(std::equal(host.begin(), host.end(), got.begin()));
    CHECK(std::all_of(got.begin() + host.size(), got.end(), [](uint32_t x) { return x == 0xffffffffu; }));
  }
  DeviceBuffer a(g->driver, 64);
  CHECK(error_of([&] { probe.copy(a.ptr(), a.ptr(), 40, g->stream); }).find("multiples of 16") != std::string::npos);
}

TEST_CASE("GPU probe: fill writes seeded random bits") {
  auto g = open_gpu();
  const DeviceProbe probe(g->jit, g->ctx);
  const size_t n = 1 << 20;
  DeviceBuffer a = poisoned(*g, n * 4), b = poisoned(*g, n * 4), c = poisoned(*g, n * 4);
  probe.fill(a.ptr(), n * 4, 11, g->stream);
  probe.fill(b.ptr(), n * 4, 11, g->stream);
  probe.fill(c.ptr(), n * 4, 12, g->stream);
  std::vector<uint32_t> x = to_host<uint32_t>(*g, a), y = to_host<uint32_t>(*g, b), z = to_host<uint32_t>(*g, c);
  CHECK(x == y);
  for (size_t i : {size_t(0), size_t(12345), n - 1}) CHECK(x[i] == uint32_t(probe_hash(11, i)));
  size_t same = 0, ones = 0;
  for (size_t i = 0; i < n; ++i) {
    same += x[i] == z[i];
    ones += size_t(std::popcount(x[i]));
  }
  CHECK(same < 16);
  CHECK(double(ones) / (32.0 * n) == doctest::Approx(0.5).epsilon(0.01));
}

TEST_CASE("GPU probe: the tensor-core kernel computes the m16n8k16 products it is timed on") {
  auto g = open_gpu();
  const DeviceProbe probe(g->jit, g->ctx);
  const size_t threads = probe.mma_threads();
  CHECK(threads == size_t(g->ctx.device().sm_count) * 4 * kProbeMmaThreads);
  const int iters = 5;
  DeviceBuffer out = poisoned(*g, threads * 4);
  const double flops = probe.mma(out.ptr(), iters, 77, g->stream);
  CHECK(flops == double(threads / 32) * iters * kProbeMmaAcc * 4096);
  std::vector<float> got = to_host<float>(*g, out), want = mma_reference(threads, iters, 77);
  CHECK(rel_l2(got, want) <= 1e-4);
  probe.mma(out.ptr(), iters, 78, g->stream);
  std::vector<float> other = to_host<float>(*g, out);
  CHECK(rel_l2(other, mma_reference(threads, iters, 78)) <= 1e-4);
  CHECK(other != got);
}

TEST_CASE("GPU probe: measured copy bandwidth and mma rate are positive and below physical ceilings") {
  auto g = open_gpu();
  ProbeOptions o;
  o.runs = 5;
  const DeviceRates r = measure_device_rates(g->jit, g->ctx, g->stream, o);
  MESSAGE(g->ctx.device().name << ": copy " << r.copy_bytes_per_s / 1e12 << " TB/s (read + written, "
                               << r.copy_bytes / (1 << 20) << " MiB), bf16 mma.sync " << r.mma_flops_per_s / 1e12
                               << " TFLOP/s");
  CHECK(r.copy_bytes == size_t(1) << 30);
  CHECK(r.runs == 5);
  CHECK(r.copy_bytes_per_s > 100e9);   // any sm_80+ part moves more than 100 GB/s
  CHECK(r.copy_bytes_per_s < 10e12);   // no HBM part reaches 10 TB/s
  CHECK(r.mma_flops_per_s > 20e12);    // an A100 does ~300 TFLOP/s of bf16
  CHECK(r.mma_flops_per_s < 5e15);     // above every dense bf16 peak
}
