// GPU: the prefix cache's saved states (GpuModel's contiguous blocks: K/V rows of the attention layers,
// the DeltaNet conv + fp32 states). A prefix saved from one slot into device memory or pinned host
// memory, copied between the two, and restored into another slot continues with the logits of the
// sequence that was never saved; on the 35B shapes the save and restore of a 4,000-token prefix are
// timed (CUDA events, printed) from device memory and from pinned host memory.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>

#include "models/qwen35/gpu_model.h"
#include "runtime/io/safetensors.h"
#include "tests/gpu/gpu_harness.h"

using namespace q35;
using namespace q35::gpu_test;
using namespace q35::qwen35;

namespace {

uint64_t addr(const DeviceBuffer& b) { return b.ptr(); }
uint64_t addr(const PinnedBuffer& b) { return uint64_t(reinterpret_cast<uintptr_t>(b.data())); }

std::vector<int32_t> tokens_of(size_t n, size_t salt, int64_t vocab) {
  std::vector<int32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = int32_t((i * 7919 + salt * 104729 + 13) % size_t(vocab));
  return t;
}

// Slot `from` runs `prefix`, saves it into the blocks, then moves on to other tokens; slot `to`
// restores it (kv_rows: the K/V block's rows) and runs `rest`: its logits against slot `ref`, which
// ran prefix + rest without saving anything. Returns the max relative difference.
template <typename KvBlock, typename RecBlock>
double restored_vs_uncached(GpuModel& model, const std::vector<int32_t>& prefix, const std::vector<int32_t>& rest,
                            int ref, int from, int to, const KvBlock& kv, const RecBlock& rec, const char* what) {
  const int64_t p = int64_t(prefix.size());
  model.reset(ref);
  model.forward(prefix, false, ref);
  const std::vector<float> want = model.forward(rest, true, ref);
  model.reset(from);
  model.forward(prefix, false, from);
  model.save_kv_block(from, p, addr(kv));
  model.save_recurrent_block(from, addr(rec));
  model.forward(tokens_of(7, 99, model.config().vocab_size), false, from);  // the slot moves on at once
  model.restore_blocks(to, p, addr(kv), p, addr(rec));
  CHECK(model.position(to) == p);
  const std::vector<float> got = model.forward(rest, true, to);
  const double d = max_rel(got, want);
  MESSAGE(fmt::format("{}: restored prefix of {} tokens into slot {}: max|dlogit|/max|logit| = {:.3g}{}", what, p, to, d,
                      got == want ? " (bit-identical)" : ""));
  return d;
}

}  // namespace

TEST_CASE("GPU prefix cache, tiny fixture: a restored prefix (device or pinned host block) gives the uncached logits") {
  auto g = open_gpu();
  const std::filesystem::path dir = q35::test::fixtures_dir() / "tiny-qwen35moe";
  const Config c = Config::from_file(dir / "config.json");
  Checkpoint ckpt(dir);
  for (WeightFormat f : {WeightFormat::BF16, WeightFormat::W4A16}) {
    CAPTURE(int(f));
    GpuModelOptions o;
    o.format = f;
    o.group = f == WeightFormat::W4A16 ? 64 : 0;
    o.max_context = 512;
    o.max_chunk = 128;
    o.max_batch = 3;
    GpuModel model(g->driver, g->ctx, g->jit, c, ckpt, o);
    const std::vector<int32_t> prefix = tokens_of(150, 1, c.vocab_size), rest = tokens_of(40, 2, c.vocab_size);
    const int64_t p = int64_t(prefix.size());
    CHECK(model.kv_block_bytes(p) % 256 == 0);
    CHECK(model.kv_block_bytes(p) == 2 * size_t(c.num_layers_of(LayerType::FullAttention)) *
                                         ((size_t(p * c.num_kv_heads * c.head_dim) * 2 + 255) / 256 * 256));
    CHECK(model.kv_block_copies() == 2);  // one 2D copy for K, one for V
    CHECK(model.recurrent_block_copies() == 2);
    CHECK(g->ctx.device().max_pitch > 0);
    DeviceBuffer kv(g->driver, model.kv_block_bytes(p)), rec(g->driver, model.recurrent_block_bytes());
    PinnedBuffer kv_host(g->driver, kv.size()), rec_host(g->driver, rec.size());
    // Device blocks, restored into an unused slot and into the slot that saved them.
    CHECK(restored_vs_uncached(model, prefix, rest, 0, 1, 2, kv, rec, "device block") <= 1e-4);
    CHECK(restored_vs_uncached(model, prefix, rest, 0, 1, 1, kv, rec, "device block, same slot") <= 1e-4);
    // Pinned host blocks (what the cache spills to), saved and restored directly.
    CHECK(restored_vs_uncached(model, prefix, rest, 2, 0, 1, kv_host, rec_host, "pinned host block") <= 1e-4);
    // A spill and its way back: device -> pinned host -> another device block, one copy each.
    DeviceBuffer kv2(g->driver, kv.size()), rec2(g->driver, rec.size());
    model.reset(1);
    model.forward(prefix, false, 1);
    model.save_kv_block(1, p, addr(kv));
    model.save_recurrent_block(1, addr(rec));
    model.copy_block(addr(kv_host), addr(kv), kv.size());
    model.copy_block(addr(rec_host), addr(rec), rec.size());
    kv.fill_bytes(0xff, model.stream());  // the first blocks are reused for something else
    rec.fill_bytes(0xff, model.stream());
    model.copy_block(addr(kv2), addr(kv_host), kv.size());
    model.copy_block(addr(rec2), addr(rec_host), rec.size());
    model.reset(0);
    model.forward(prefix, false, 0);
    const std::vector<float> want = model.forward(rest, true, 0);
    model.restore_blocks(2, p, addr(kv2), p, addr(rec2));
    const std::vector<float> got = model.forward(rest, true, 2);
    MESSAGE("after device -> pinned -> device: max|dlogit|/max|logit| = " << max_rel(got, want));
    CHECK(max_rel(got, want) <= 1e-4);
    // A shorter prefix from longer K/V rows (the cache resumes at a snapshot before the rows' end).
    model.reset(0);
    model.forward(std::span<const int32_t>(prefix).first(100), false, 0);
    DeviceBuffer rec100(g->driver, rec.size());
    model.save_recurrent_block(0, addr(rec100));
    const std::vector<float> want100 = model.forward(std::span<const int32_t>(prefix).subspan(100), true, 0);
    model.restore_blocks(1, 100, addr(kv2), p, addr(rec100));
    CHECK(model.position(1) == 100);
    const std::vector<float> got100 = model.forward(std::span<const int32_t>(prefix).subspan(100), true, 1);
    CHECK(max_rel(got100, want100) <= 1e-4);
    // Errors.
    CHECK(q35::test::error_of([&] { model.restore_blocks(1, p + 1, addr(kv2), p, addr(rec2)); }) != "");
    CHECK(q35::test::error_of([&] { model.save_kv_block(1, model.position(1) + 1, addr(kv2)); }) != "");
  }
}

TEST_CASE("GPU prefix cache, synthetic 35B-A3B W4A16 g128: save and restore of a 4,000-token prefix (timed)") {
  auto g = open_gpu();
  const Config c = Config::preset("35b-a3b");
  GpuModel model(g->driver, g->ctx, g->jit, c, synthetic_35b_options(4608, 4096, 2), 42);
  const std::vector<int32_t> prefix = tokens_of(4000, 3, c.vocab_size), rest = tokens_of(50, 4, c.vocab_size);
  const int64_t p = int64_t(prefix.size());
  const size_t kv_bytes = model.kv_block_bytes(p), rec_bytes = model.recurrent_block_bytes();
  MESSAGE(fmt::format("35B-A3B, 4,000-token prefix: K/V block {:.1f} MB ({} copies), recurrent block {:.1f} MB ({} copies); "
                      "max 2D pitch {} bytes",
                      kv_bytes / 1e6, model.kv_block_copies(), rec_bytes / 1e6, model.recurrent_block_copies(),
                      g->ctx.device().max_pitch));
  CHECK(model.kv_block_copies() + model.recurrent_block_copies() == 4);
  DeviceBuffer kv(g->driver, kv_bytes), rec(g->driver, rec_bytes);
  PinnedBuffer kv_host(g->driver, kv_bytes), rec_host(g->driver, rec_bytes);

  // The uncached sequence: slot 0, prefix then 50 tokens.
  model.forward(prefix, false, 0);
  model.save_kv_block(0, p, addr(kv));
  model.save_recurrent_block(0, addr(rec));
  model.copy_block(addr(kv_host), addr(kv), kv_bytes);
  model.copy_block(addr(rec_host), addr(rec), rec_bytes);
  const std::vector<float> want = model.forward(rest, false, 0);

  // GPU time (events) and the host time of the call (the copies are only issued), median of 7.
  auto timed = [&](const char* what, auto&& op) {
    std::vector<double> gpu, host;
    for (int i = 0; i < 8; ++i) {
      model.stream().synchronize();
      Event a(g->driver), b(g->driver);
      a.record(model.stream());
      const auto t0 = std::chrono::steady_clock::now();
      op();
      const double h = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      b.record(model.stream());
      b.synchronize();
      if (i == 0) continue;  // warm-up
      gpu.push_back(double(b.elapsed_ms_since(a)));
      host.push_back(h);
    }
    std::sort(gpu.begin(), gpu.end());
    std::sort(host.begin(), host.end());
    MESSAGE(fmt::format("{}: {:.3f} ms GPU ({:.0f} GB/s), {:.3f} ms host (median of 7)", what, gpu[3],
                        double(kv_bytes + rec_bytes) / gpu[3] / 1e6, host[3]));
    return gpu[3];
  };
  model.reset(1);
  model.forward(prefix, false, 1);
  timed("save 4,000-token prefix, device -> device (insert)", [&] {
    model.save_kv_block(1, p, addr(kv));
    model.save_recurrent_block(1, addr(rec));
  });
  const double restore_device = timed("restore 4,000-token prefix from device memory (hit)",
                                      [&] { model.restore_blocks(1, p, addr(kv), p, addr(rec)); });
  const double restore_host = timed("restore 4,000-token prefix from pinned host memory (hit on a spilled entry)",
                                    [&] { model.restore_blocks(1, p, addr(kv_host), p, addr(rec_host)); });
  timed("spill, device -> pinned host (two copies)", [&] {
    model.copy_block(addr(kv_host), addr(kv), kv_bytes);
    model.copy_block(addr(rec_host), addr(rec), rec_bytes);
  });
  // The restore is far below a turn's budget (the target for turn 2 is <= 15 ms in all): four 2D copies.
  CHECK(restore_device < 2.0);
  CHECK(restore_host < 20.0);

  // Slot 1, restored (last from pinned host memory), continues like slot 0.
  const std::vector<float> got = model.forward(rest, false, 1);
  MESSAGE(fmt::format("35B: logits of the 50 tokens after the restored prefix: max|dlogit|/max|logit| = {:.3g}{}",
                      max_rel(got, want), got == want ? " (bit-identical)" : ""));
  CHECK(max_rel(got, want) <= 1e-3);
  // And from device memory into slot 1 again.
  model.restore_blocks(1, p, addr(kv), p, addr(rec));
  const std::vector<float> got2 = model.forward(rest, false, 1);
  CHECK(max_rel(got2, want) <= 1e-3);

  // The first token of turn 2 as the server computes it: restore + a 75-token prefill (timed by the host).
  const std::vector<int32_t> turn = tokens_of(75, 5, c.vocab_size);
  std::vector<double> ttft;
  for (int i = 0; i < 6; ++i) {
    model.stream().synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    model.restore_blocks(1, p, addr(kv), p, addr(rec));
    model.prefill(turn, SamplingParams{}, 1);
    if (i > 0) ttft.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ttft.begin(), ttft.end());
  MESSAGE(fmt::format("restore + 75-token prefill + first token (turn 2 of a chat, in the engine): {:.2f} ms (median of 5)",
                      ttft[2]));
}
