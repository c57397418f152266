// Host-side rules of the GPU runner's sequence slots and batched decode step, checked on the CPU
// (no GPU): the graph buckets a batch replays (models/qwen35/batch.h), a slot's state bytes and the
// memory need of max_batch slots with its refusal naming --max-batch / --max-context
// (models/qwen35/memory.h), and the batched decode floor (models/qwen35/floors.h: the union of
// experts a batch routes to).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>

#include "models/qwen35/batch.h"
#include "models/qwen35/floors.h"
#include "models/qwen35/memory.h"
#include "tests/test_util.h"

using namespace q35;
using namespace q35::qwen35;
using q35::test::config_35b;
using q35::test::config_tiny;
using q35::test::contains;
using q35::test::error_of;

TEST_CASE("batched decode graph buckets: powers of two below min(max_batch, 64), then that bound") {
  CHECK(decode_buckets(1) == std::vector<int>{1});
  CHECK(decode_buckets(2) == std::vector<int>{1, 2});
  CHECK(decode_buckets(16) == std::vector<int>{1, 2, 4, 8, 16});
  CHECK(decode_buckets(64) == std::vector<int>{1, 2, 4, 8, 16, 32, 64});
  CHECK(decode_buckets(48) == std::vector<int>{1, 2, 4, 8, 16, 32, 48});
  CHECK(decode_buckets(100) == std::vector<int>{1, 2, 4, 8, 16, 32, 64});  // a step runs at most 64 rows
  CHECK(decode_buckets(kMaxBatch).back() == kMaxStepRows);
  // A step of n sequences replays the smallest bucket holding n rows (the rest are padding).
  CHECK(decode_bucket(1, 64) == 1);
  CHECK(decode_bucket(2, 64) == 2);
  CHECK(decode_bucket(3, 64) == 4);
  CHECK(decode_bucket(5, 64) == 8);
  CHECK(decode_bucket(17, 64) == 32);
  CHECK(decode_bucket(33, 64) == 64);
  CHECK(decode_bucket(64, 64) == 64);
  CHECK(decode_bucket(33, 48) == 48);
  CHECK(decode_bucket(7, 7) == 7);
  for (int max_batch : {1, 3, 16, 48, 64, 100}) {
    int graphs = 0;
    for (int n = 1; n <= std::min(max_batch, kMaxStepRows); ++n) {
      const int b = decode_bucket(n, max_batch);
      CHECK(b >= n);
      CHECK(b <= max_batch);
      CHECK(b < 2 * n);  // never more padding rows than real ones
    }
    graphs = int(decode_buckets(max_batch).size());
    CHECK(graphs <= 1 + int(std::ceil(std::log2(double(max_batch)))));
  }
  CHECK(contains(error_of([] { decode_buckets(0); }), "--max-batch 0 is not in [1, 1024]"));
  CHECK(contains(error_of([] { decode_buckets(1025); }), "--max-batch 1025"));
  CHECK(contains(error_of([] { decode_bucket(0, 8); }), "0 sequences for 8 slots (--max-batch 8)"));
  CHECK(contains(error_of([] { decode_bucket(9, 8); }), "9 sequences for 8 slots (--max-batch 8)"));
  CHECK(contains(error_of([] { decode_bucket(65, 128); }), "a step of 65 rows is more than the 64"));
}

TEST_CASE("a batch of more sequences than one step runs splits into consecutive groups of at most 64 rows") {
  using G = std::vector<std::pair<int, int>>;
  CHECK(step_groups(1, 1) == G{{0, 1}});
  CHECK(step_groups(64, 64) == G{{0, 64}});
  CHECK(step_groups(65, 128) == G{{0, 64}, {64, 1}});
  CHECK(step_groups(200, 1024) == G{{0, 64}, {64, 64}, {128, 64}, {192, 8}});
  for (int n : {1, 63, 64, 65, 127, 128, 129, 1000}) {
    int covered = 0;
    for (const auto& [first, count] : step_groups(n, kMaxBatch)) {
      CHECK(first == covered);
      CHECK(count >= 1);
      CHECK(count <= kMaxStepRows);
      CHECK(decode_bucket(count, kMaxBatch) >= count);
      covered += count;
    }
    CHECK(covered == n);
  }
  CHECK(contains(error_of([] { step_groups(0, 8); }), "0 sequences for 8 slots"));
  CHECK(contains(error_of([] { step_groups(9, 8); }), "9 sequences for 8 slots"));
}

TEST_CASE("a slot's state: K/V rows of max_context tokens, DeltaNet conv ring and fp32 state") {
  // 35B: 10 full-attention layers x (K, V) x 2 kv heads x 256 x bf16 per row; 30 DeltaNet layers x
  // (conv ring 4 x 8192 bf16 + fp32 state 32 x 128 x 128).
  const Config c = config_35b();
  const int64_t kv = int64_t(10) * 2 * 32768 * 2 * 256 * 2;
  const int64_t gdn = int64_t(30) * (4 * 8192 * 2 + 32 * 128 * 128 * 4);
  CHECK(slot_state_bytes(c, 32768) == kv + gdn);
  CHECK(slot_state_bytes(c, 32768) == 735969280);
  CHECK(slot_state_bytes(c, 1) == int64_t(10) * 2 * 2 * 256 * 2 + gdn);
  // The tiny fixture: 1 attention layer (1 kv head x 256), 3 DeltaNet layers (conv_dim 2*2*128 + 4*128 =
  // 1024, 4 value heads x 128 x 128).
  const Config t = config_tiny();
  CHECK(slot_state_bytes(t, 100) == 1 * 2 * 100 * 1 * 256 * 2 + 3 * (4 * 1024 * 2 + 4 * 128 * 128 * 4));
  CHECK(contains(error_of([&] { slot_state_bytes(c, 0); }), "--max-context 0"));
}

TEST_CASE("memory need of max_batch slots; the refusal names --max-batch and --max-context") {
  const Config c = config_35b();
  const MemoryNeed one = gpu_memory_need(c, 128, 32768, 2048, true);
  const MemoryNeed sixteen = gpu_memory_need(c, 128, 32768, 2048, true, 16);
  CHECK(one.state == slot_state_bytes(c, 32768));
  CHECK(one.batch == 0);
  CHECK(sixteen.state == 16 * slot_state_bytes(c, 32768));
  CHECK(sixteen.weights == one.weights);
  CHECK(sixteen.scratch == one.scratch);
  // The batched step's own buffers: fp32 logits of the rows past 16, top-k candidates, attention partials.
  CHECK(sixteen.batch > 16 * 64 * 64 * 8);
  CHECK(gpu_memory_need(c, 128, 32768, 2048, true, 64).batch >= int64_t(48) * c.vocab_size * 4);
  // 35B W4A16 with 64 slots of 32768 tokens: 47 GB of state; fits an H200 (139 GiB free), not 32 more.
  const size_t h200_free = size_t(139) << 30, h200_total = size_t(141) << 30;
  CHECK_NOTHROW(check_fits(gpu_memory_need(c, 128, 32768, 2048, true, 64), h200_free, h200_total, "H200", "35b"));
  const MemoryNeed big = gpu_memory_need(c, 128, 131072, 2048, true, 256);
  const std::string e = error_of([&] { check_fits(big, h200_free, h200_total, "NVIDIA H200", "35b (g128)"); });
  INFO(e);
  CHECK(contains(e, "--max-context"));
  CHECK(contains(e, "fewer --max-batch slots (256 slots of --max-context tokens hold"));
  CHECK(e.find('\n') == std::string::npos);
  CHECK(contains(error_of([&] { gpu_memory_need(c, 128, 32768, 2048, true, 0); }), "--max-batch 0"));
  // One slot: the message as before (no --max-batch advice).
  const MemoryNeed huge = gpu_memory_need(Config::preset("397b-a17b"), 128, 32768, 2048, true);
  CHECK_FALSE(contains(error_of([&] { check_fits(huge, h200_free, h200_total, "H200", "397b"); }), "--max-batch"));
}

TEST_CASE("batched decode floor: weights once with the union of routed experts, state and KV per sequence") {
  for (const int group : {0, 128}) {
    CAPTURE(group);
    const ModelWork w(config_35b(), group);
    const Config c = config_35b();
    // B = 1 is the single-sequence decode floor.
    for (int64_t ctx : {0, 128, 4096}) CHECK(w.decode_batch_bytes(1, ctx) == doctest::Approx(double(w.decode_bytes(ctx))));
    // By hand: non-expert weights once, E (1 - (1 - k/E)^B) experts per layer, B embedding rows,
    // per sequence the DeltaNet state read + written and the KV rows read (context + 1) and written.
    int64_t routed = 0;
    for (const WeightPart& p : w.decode_parts())
      if (p.name == "routed experts") routed = p.bytes;
    const double expert = double(routed) / double(c.num_layers * c.num_experts_per_tok);
    for (int64_t B : {2, 4, 16, 64, 256}) {
      CAPTURE(B);
      const double experts = 256.0 * (1.0 - std::pow(1.0 - 8.0 / 256.0, double(B)));
      CHECK(w.expected_experts(B) == doctest::Approx(experts));
      const int64_t ctx = 1000;
      const double want = double(w.weight_bytes_per_token() - routed) + 40.0 * experts * expert +
                          double(B - 1) * 2048 * 2 +
                          double(B) * double(2 * (w.gdn_state_bytes() + w.conv_state_bytes()) +
                                             w.kv_bytes_per_token() * (ctx + 2));
      CHECK(w.decode_batch_bytes(B, ctx) == doctest::Approx(want));
      // Sharing the weights: a batch moves less than B single steps, more than one.
      CHECK(w.decode_batch_bytes(B, ctx) < double(B) * w.decode_batch_bytes(1, ctx));
      CHECK(w.decode_batch_bytes(B, ctx) > w.decode_batch_bytes(B / 2, ctx));
      CHECK(w.decode_batch_floor_ms(B, ctx, 4e12) == doctest::Approx(w.decode_batch_bytes(B, ctx) / 4e12 * 1e3));
    }
    // Many tokens touch nearly every expert: the routed part tends to all E experts of every layer.
    CHECK(w.expected_experts(4096) == doctest::Approx(256.0).epsilon(1e-6));
  }
  const ModelWork w(config_35b(), 128);
  CHECK(contains(error_of([&] { w.decode_batch_bytes(0, 10); }), "B = 0"));
  CHECK(contains(error_of([&] { w.decode_batch_floor_ms(4, 10, 0); }), "bandwidth"));
}
