// GPU: the driver layer (device queries, memory, streams, events, graphs) and the first kernels
// (embedding, rmsnorm, gemv_bf16) against a CPU computation of the same math (spec §2.1).
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>

#include "autotune/tile_config.h"
#include "tests/gpu/gpu_harness.h"

using namespace q35;
using namespace q35::gpu_test;

TEST_CASE("GPU: device info, memory, streams and events") {
  auto g = open_gpu();
  const DeviceInfo& info = g->ctx.device();
  MESSAGE(info.name << ", sm_" << info.cc_major << info.cc_minor << ", " << info.sm_count << " SMs, "
                    << info.total_mem / (1 << 20) << " MiB, driver " << g->driver.version());
  CHECK(info.cc_major >= 7);
  CHECK(info.sm_count > 0);
  auto [free_bytes, total_bytes] = g->ctx.mem_info();
  CHECK(total_bytes == info.total_mem);
  CHECK(free_bytes <= total_bytes);

  std::vector<uint32_t> host(1000);
  for (size_t i = 0; i < host.size(); ++i) host[i] = uint32_t(i * 2654435761u);
  DeviceBuffer a = to_device(*g, host);
  DeviceBuffer b(g->driver, a.size());
  b.copy_from(a, a.size(), g->stream);
  CHECK(to_host<uint32_t>(*g, b) == host);
  b.fill_bytes(0xab, g->stream);
  CHECK(to_host<uint32_t>(*g, b) == std::vector<uint32_t>(1000, 0xabababab));
  CHECK(error_of([&] { b.upload(host.data(), 4001, g->stream); }).find("4001 bytes") != std::string::npos);
  CHECK(error_of([&] { DeviceBuffer huge(g->driver, size_t(1) << 50); }).find("cuMemAlloc(") != std::string::npos);

  DeviceBuffer moved = std::move(a);
  CHECK(a.ptr() == 0);
  CHECK(to_host<uint32_t>(*g, moved) == host);

  Event start(g->driver), stop(g->driver);
  start.record(g->stream);
  b.fill_bytes(0, g->stream);
  stop.record(g->stream);
  stop.synchronize();
  CHECK(stop.elapsed_ms_since(start) >= 0.f);
}

TEST_CASE("GPU: embedding_gather copies the selected rows") {
  auto g = open_gpu();
  const int vocab = 300, H = 264, T = 5;  // H = 33 vectors: threads loop with a partial last pass
  std::vector<uint16_t> table = random_bf16(size_t(vocab) * H, 1, 1.f);
  std::vector<int> ids = {7, 299, 0, 7, 150};
  DeviceBuffer d_table = to_device(*g, table), d_ids = to_device(*g, ids), d_out(g->driver, size_t(T) * H * 2);
  Function f = g->jit.load(embedding_spec(H, EmbeddingTile{32}), g->ctx);
  f.launch({{unsigned(T)}, {32}}, g->stream, d_table.ptr(), d_ids.ptr(), d_out.ptr());
  std::vector<uint16_t> out = to_host<uint16_t>(*g, d_out);
  for (int t = 0; t < T; ++t)
    CHECK(std::memcmp(out.data() + size_t(t) * H, table.data() + size_t(ids[t]) * H, size_t(H) * 2) == 0);
}

TEST_CASE("GPU: rmsnorm matches the CPU, with and without the residual add; graph replay") {
  auto g = open_gpu();
  // H = 2048: one 16-byte vector per thread; H = 128 (the tiny fixture): half a warp active, guarded.
  for (const int H : {2048, 128}) {
  CAPTURE(H);
  const int rows = 6;
  const float eps = 1e-6f;
  std::vector<uint16_t> x = random_bf16(size_t(rows) * H, 2, 3.f), res = random_bf16(size_t(rows) * H, 3, 1.f),
                        w = random_bf16(H, 4, 0.1f);
  for (bool add : {false, true}) {
    CAPTURE(add);
    // CPU: h = bf16(x + res) (or x), y = bf16(h / sqrt(mean(h^2) + eps) * (1 + w)).
    std::vector<uint16_t> h_ref(x.size()), y_ref(x.size());
    for (int r = 0; r < rows; ++r) {
      double ss = 0;
      for (int i = 0; i < H; ++i) {
        size_t j = size_t(r) * H + i;
        h_ref[j] = add ? f32_to_bf16(bf16_to_f32(x[j]) + bf16_to_f32(res[j])) : x[j];
        ss += double(bf16_to_f32(h_ref[j])) * bf16_to_f32(h_ref[j]);
      }
      float inv = 1.f / std::sqrt(float(ss / H) + eps);
      for (int i = 0; i < H; ++i) {
        size_t j = size_t(r) * H + i;
        y_ref[j] = f32_to_bf16(bf16_to_f32(h_ref[j]) * inv * (1.f + bf16_to_f32(w[i])));
      }
    }
    DeviceBuffer d_x = to_device(*g, x), d_res = to_device(*g, res), d_w = to_device(*g, w),
                 d_y(g->driver, x.size() * 2);
    RmsnormTile tile = default_rmsnorm_tile(H);
    Function f = g->jit.load(rmsnorm_spec(H, add, tile), g->ctx);
    f.launch({{unsigned(rows)}, {unsigned(tile.threads)}}, g->stream, d_x.ptr(), d_res.ptr(), d_w.ptr(), d_y.ptr(), eps);
    std::vector<uint16_t> y = to_host<uint16_t>(*g, d_y), h = to_host<uint16_t>(*g, d_res);
    CHECK(h == (add ? h_ref : res));  // the residual stream is exact (or untouched)
    int exact = 0, close = 0;
    for (size_t j = 0; j < y.size(); ++j) {
      exact += y[j] == y_ref[j];
      close += within_one_ulp(y[j], y_ref[j]);
    }
    CHECK(close == int(y.size()));
    CHECK(exact >= int(y.size() * 99 / 100));

    if (!add) {
      // The same launch captured in a graph and replayed (with PDL allowed) rewrites y identically.
      d_y.fill_bytes(0, g->stream);
      Graph graph = Graph::capture(g->driver, g->stream, [&] {
        f.launch({{unsigned(rows)}, {unsigned(tile.threads)}, 0, true}, g->stream, d_x.ptr(), d_res.ptr(),
                 d_w.ptr(), d_y.ptr(), eps);
      });
      GraphExec exec = graph.instantiate();
      exec.launch(g->stream);
      exec.launch(g->stream);
      CHECK(to_host<uint16_t>(*g, d_y) == y);
    }
  }
  }
}

TEST_CASE("GPU: gemv_bf16 matches a double-precision CPU product") {
  auto g = open_gpu();
  struct Case {
    int N, K, T;
    GemvTile tile;
  };
  // Ragged cases: N not a multiple of the block's rows, K with a partial last 256-wide step,
  // T not a multiple of m_tile; plus the default decode tile of a real projection.
  for (const Case& c : {Case{44, 264, 7, GemvTile{4, 2, 4}}, Case{2048, 2048, 1, default_gemv_tile(2048, 2048, 1)},
                        Case{1000, 512, 16, GemvTile{16, 2, 4}}, Case{8192, 2048, 3, default_gemv_tile(8192, 2048, 3)}}) {
    CAPTURE(c.N);
    CAPTURE(c.K);
    CAPTURE(c.T);
    std::vector<uint16_t> W = random_bf16(size_t(c.N) * c.K, 5, 0.05f), x = random_bf16(size_t(c.T) * c.K, 6, 1.f);
    DeviceBuffer d_W = to_device(*g, W), d_x = to_device(*g, x), d_y(g->driver, size_t(c.T) * c.N * 2);
    Function f = g->jit.load(gemv_bf16_spec(c.N, c.K, c.tile), g->ctx);
    const unsigned blocks = unsigned((c.N + c.tile.rows_per_block() - 1) / c.tile.rows_per_block());
    f.launch({{blocks, unsigned((c.T + c.tile.m_tile - 1) / c.tile.m_tile)}, {unsigned(c.tile.threads())}}, g->stream,
             d_W.ptr(), d_x.ptr(), d_y.ptr(), c.T);
    std::vector<uint16_t> y = to_host<uint16_t>(*g, d_y);
    // Warm timing (weights mostly in L2 for the small cases): informative, not asserted.
    Event start(g->driver), stop(g->driver);
    start.record(g->stream);
    for (int rep = 0; rep < 20; ++rep)
      f.launch({{blocks, unsigned((c.T + c.tile.m_tile - 1) / c.tile.m_tile)}, {unsigned(c.tile.threads())}}, g->stream,
               d_W.ptr(), d_x.ptr(), d_y.ptr(), c.T);
    stop.record(g->stream);
    stop.synchronize();
    const double us = stop.elapsed_ms_since(start) * 1e3 / 20;
    MESSAGE(fmt::format("gemv_bf16 N={} K={} T={}: {:.2f} us, {:.0f} GB/s of weights", c.N, c.K, c.T, us,
                        double(W.size()) * 2 / us * 1e-3));
    int bad = 0;
    for (int t = 0; t < c.T; ++t)
      for (int n = 0; n < c.N; ++n) {
        double ref = 0, mag = 0;
        for (int k = 0; k < c.K; ++k) {
          double p = double(bf16_to_f32(W[size_t(n) * c.K + k])) * bf16_to_f32(x[size_t(t) * c.K + k]);
          ref += p;
          mag += std::abs(p);
        }
        // bf16 output rounding (2^-8 relative) plus fp32 accumulation in another order.
        double got = bf16_to_f32(y[size_t(t) * c.N + n]);
        if (std::abs(got - ref) > std::abs(ref) * 0x1p-8 + mag * 1e-6) ++bad;
      }
    CHECK(bad == 0);
  }
}
