// GPU: the small kernels of the runner: embedding gather at the tiny and 35B shapes against
// ref::embedding, the device-side step bookkeeping, and the random fills of synthetic models.
#include <doctest/doctest.h>

#include <cmath>

#include "autotune/tile_config.h"
#include "models/qwen35/reference_ops.h"
#include "tests/gpu/gpu_harness.h"

using namespace q35;
using namespace q35::gpu_test;

TEST_CASE("GPU: embedding_gather at the tiny (H 128) and 35B (H 2048) shapes equals ref::embedding") {
  auto g = open_gpu();
  for (auto [vocab, H] : {std::pair<int64_t, int64_t>{1536, 128}, std::pair<int64_t, int64_t>{248320, 2048}}) {
    CAPTURE(H);
    std::vector<uint16_t> table = random_bf16(size_t(vocab * H), 11, 1.f);
    std::vector<int32_t> ids = {0, int32_t(vocab - 1), 17, 17, int32_t(vocab / 2), 3, 1000};
    const int T = int(ids.size());
    DeviceBuffer d_table = to_device(*g, table), d_ids = to_device(*g, ids), d_out = poisoned(*g, size_t(T * H) * 2);
    const EmbeddingTile tile = default_embedding_tile(H);
    g->jit.load(embedding_spec(H, tile), g->ctx)
        .launch({{unsigned(T)}, {unsigned(tile.threads)}}, g->stream, d_table.ptr(), d_ids.ptr(), d_out.ptr());
    std::vector<float> want(size_t(T * H));
    qwen35::ref::embedding(to_f32(table), vocab, H, ids, want);
    CHECK(to_f32(to_host<uint16_t>(*g, d_out)) == want);  // a gather is exact
  }
}

TEST_CASE("GPU: rmsnorm with the fp32 residual stream equals ref::add_rmsnorm (tiny and 35B H)") {
  auto g = open_gpu();
  const int rows = 5;
  const float eps = 1e-6f;
  for (int64_t H : {int64_t(128), int64_t(2048)}) {
    CAPTURE(H);
    std::vector<uint16_t> delta = random_bf16(size_t(rows * H), 21, 2.f), w = random_bf16(size_t(H), 22, 0.1f);
    std::vector<float> residual = random_f32(size_t(rows * H), 23, 3.f);
    DeviceBuffer d_delta = to_device(*g, delta), d_res = to_device(*g, residual), d_w = to_device(*g, w),
                 d_y = poisoned(*g, size_t(rows * H) * 2);
    const RmsnormTile tile = default_rmsnorm_tile(H);
    g->jit.load(rmsnorm_spec(H, true, tile, true), g->ctx)
        .launch({{unsigned(rows)}, {unsigned(tile.threads)}}, g->stream, d_delta.ptr(), d_res.ptr(), d_w.ptr(),
                d_y.ptr(), eps);
    std::vector<float> want_res = residual, want_y(residual.size());
    qwen35::ref::add_rmsnorm(want_res, to_f32(delta), to_f32(w), want_y, rows, H, eps);
    CHECK(to_host<float>(*g, d_res) == want_res);  // fp32 adds of the same values: exact
    CHECK(rel_l2(to_f32(to_host<uint16_t>(*g, d_y)), want_y) <= 1e-2);
  }
}

TEST_CASE("GPU: step_advance moves the position and feeds the sampled id back") {
  auto g = open_gpu();
  const Function f = g->jit.load({"step", "step_advance", {}}, g->ctx);
  std::vector<int32_t> pos = {41}, next = {777}, tokens = {5, 6};
  DeviceBuffer d_pos = to_device(*g, pos), d_next = to_device(*g, next), d_tok = to_device(*g, tokens);
  f.launch({{1}, {1}}, g->stream, d_pos.ptr(), 3, CUdeviceptr(0), CUdeviceptr(0));
  CHECK(to_host<int32_t>(*g, d_pos)[0] == 44);
  CHECK(to_host<int32_t>(*g, d_tok) == tokens);
  f.launch({{1}, {1}}, g->stream, d_pos.ptr(), 1, d_next.ptr(), d_tok.ptr());
  CHECK(to_host<int32_t>(*g, d_pos)[0] == 45);
  CHECK(to_host<int32_t>(*g, d_tok) == std::vector<int32_t>{777, 6});
}

TEST_CASE("GPU: random fills have the asked mean, spread and range, and depend on the seed") {
  auto g = open_gpu();
  const size_t n = 1 << 20;
  const Function normal = g->jit.load({"fill", "fill_normal_bf16", {}}, g->ctx);
  const Function uniform = g->jit.load({"fill", "fill_uniform_f32", {}}, g->ctx);
  DeviceBuffer a = poisoned(*g, n * 2), b = poisoned(*g, n * 2), u = poisoned(*g, n * 4);
  normal.launch({{264}, {256}}, g->stream, a.ptr(), (unsigned long long)n, 5ull, 0.5f, 0.02f);
  normal.launch({{264}, {256}}, g->stream, b.ptr(), (unsigned long long)n, 6ull, 0.5f, 0.02f);
  uniform.launch({{264}, {256}}, g->stream, u.ptr(), (unsigned long long)n, 5ull, -1.f, 3.f);
  std::vector<float> x = to_f32(to_host<uint16_t>(*g, a)), y = to_f32(to_host<uint16_t>(*g, b));
  std::vector<float> z = to_host<float>(*g, u);
  double mean = 0, var = 0, umean = 0;
  for (float v : x) mean += v;
  mean /= double(n);
  for (float v : x) var += (v - mean) * (v - mean);
  const double sd = std::sqrt(var / double(n));
  CHECK(mean == doctest::Approx(0.5).epsilon(0.001));
  CHECK(sd == doctest::Approx(0.02).epsilon(0.05));  // bf16 rounding near 0.5 adds ~0.0005
  CHECK(x != y);
  for (float v : z) REQUIRE((v > -1.f && v <= 3.f));
  for (float v : z) umean += v;
  CHECK(umean / double(n) == doctest::Approx(1.0).epsilon(0.01));
}
