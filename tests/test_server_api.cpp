// The API and the scheduler end to end without sockets: a scripted engine (it always continues a
// fixed reply) behind the real Scheduler and Api, and a ResponseWriter that records what the HTTP
// server would send. Checks the tool-call path that the random tiny model cannot take by itself
// (tool_choice auto, a call after the think block, finish_reason tool_calls), streaming deltas, the
// prefix cache's resume point, and the error statuses. Then the slots: their bookkeeping, their
// release on finish / cancel / error, the queue bound, and a cancel noticed during a long prefill.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "cli/state_memory.h"
#include "models/qwen35/chat.h"
#include "runtime/core/error.h"
#include "server/api.h"

namespace fs = std::filesystem;
using namespace q35::server;
using json = nlohmann::json;

namespace {

// Logits that always pick the next token of `script` after the longest suffix of the fed tokens
// that is a prefix of it (script[0] after a prompt). `slots` sequences, each fed on its own; every
// engine call is logged (prefill pieces and decode steps, with their slots) for the batching tests.
class ScriptedEngine final : public q35::cli::Engine {
 public:
  ScriptedEngine(std::vector<int32_t> script, int32_t vocab, int slots = 1)
      : script_(std::move(script)), vocab_(vocab), fed_(size_t(slots)) {
    memory_.set_capacity(0, size_t(64) << 20);
  }
  std::string device() const override { return "script"; }
  int max_batch() const override { return int(fed_.size()); }
  int64_t position(int slot) const override { return int64_t(fed_.at(size_t(slot)).size()); }
  int64_t max_context() const override { return 4096; }
  std::vector<float> logits(int slot, std::span<const int32_t> tokens, bool all) override {
    REQUIRE_FALSE(all);
    record({Call::Prefill, {slot}, int64_t(tokens.size()), position(slot), tokens.empty() ? -1 : tokens[0]});
    if (on_feed) on_feed(tokens);  // runs on the scheduler's worker thread; may block or throw
    if (on_prefill) on_prefill(tokens);
    return feed(slot, tokens);
  }
  int32_t prefill(int slot, std::span<const int32_t> tokens, q35::Sampler& s) override {
    return s.sample(logits(slot, tokens, false));
  }
  std::vector<q35::cli::DecodeOutput> decode_batch(std::span<const q35::cli::DecodeEntry> batch) override {
    Call c{Call::Decode, {}, int64_t(batch.size()), -1, -1};
    std::vector<int32_t> tokens;
    for (const auto& e : batch) {
      c.slots.push_back(e.slot);
      tokens.push_back(e.token);
    }
    record(c);
    if (on_feed) on_feed(tokens);
    if (on_decode) on_decode(batch.size());
    std::vector<q35::cli::DecodeOutput> out;
    for (const auto& e : batch) {
      q35::cli::DecodeOutput o;
      o.logits = feed(e.slot, std::span<const int32_t>(&e.token, 1));
      if (e.sampler) o.id = e.sampler->sample(std::exchange(o.logits, {}));
      out.push_back(std::move(o));
    }
    return out;
  }
  void reset(int slot) override { fed_.at(size_t(slot)).clear(); }
  // Saved states hold the ids fed so far (both parts), in a "device" and a host tier of heap memory
  // (the host tier's 64 MiB only, unless a test sets both).
  void set_state_memory(size_t device_bytes, size_t host_bytes) override {
    memory_.set_capacity(device_bytes, host_bytes);
  }
  size_t state_capacity(q35::cli::Tier t) const override { return memory_.capacity(t); }
  size_t state_used(q35::cli::Tier t) const override { return memory_.used(t); }
  size_t state_bytes(q35::cli::StatePart, int64_t pos) const override { return size_t(std::max<int64_t>(pos, 1)) * 4; }
  q35::cli::SavedStatePtr save_state(int slot, q35::cli::StatePart part, q35::cli::Tier tier) override {
    const std::vector<int32_t>& fed = fed_.at(size_t(slot));
    auto s = memory_.allocate(part, int64_t(fed.size()), state_bytes(part, int64_t(fed.size())), tier);
    if (s) std::memcpy(reinterpret_cast<void*>(uintptr_t(s->addr())), fed.data(), fed.size() * 4);
    return s;
  }
  q35::cli::SavedStatePtr copy_state(const q35::cli::SavedState& from, q35::cli::Tier tier) override {
    auto s = memory_.allocate(from.part, from.pos, from.bytes, tier);
    if (s) std::memcpy(reinterpret_cast<void*>(uintptr_t(s->addr())), reinterpret_cast<const void*>(uintptr_t(from.addr())),
                       from.bytes);
    return s;
  }
  void restore(int slot, const q35::cli::SavedState& kv, const q35::cli::SavedState& recurrent) override {
    std::vector<int32_t>& fed = fed_.at(size_t(slot));
    fed.resize(size_t(recurrent.pos));
    std::memcpy(fed.data(), reinterpret_cast<const void*>(uintptr_t(kv.addr())), fed.size() * 4);
    ++restores;
    std::lock_guard lock(mutex_);
    restored_slots.push_back(slot);
    restored_tiers.push_back(kv.tier);
  }
  int restores = 0;
  std::function<void(std::span<const int32_t>)> on_feed;     // every call: the tokens fed
  std::function<void(std::span<const int32_t>)> on_prefill;  // prompt pieces, after on_feed
  std::function<void(size_t)> on_decode;                     // decode steps (sequences), after on_feed

  struct Call {
    enum Kind { Prefill, Decode } kind;
    std::vector<int> slots;
    int64_t tokens = 0;  // prefill: tokens fed; decode: sequences in the step
    int64_t pos0 = -1;   // prefill: the slot's position before the piece
    int32_t first = -1;  // prefill: the piece's first id
  };
  std::vector<Call> calls() const {
    std::lock_guard lock(mutex_);
    return calls_;
  }
  std::vector<int> restored_slots;  // guarded by mutex_
  std::vector<q35::cli::Tier> restored_tiers;  // of the K/V rows; guarded by mutex_

 private:
  void record(Call c) {
    std::lock_guard lock(mutex_);
    calls_.push_back(std::move(c));
  }
  std::vector<float> feed(int slot, std::span<const int32_t> tokens) {
    std::vector<int32_t>& fed = fed_.at(size_t(slot));
    fed.insert(fed.end(), tokens.begin(), tokens.end());
    std::vector<float> l(size_t(vocab_), 0.0f);
    l[size_t(next(fed))] = 30.0f;
    return l;
  }
  int32_t next(const std::vector<int32_t>& fed) const {
    for (size_t k = std::min(script_.size() - 1, fed.size()); k > 0; --k)
      if (std::equal(script_.begin(), script_.begin() + long(k), fed.end() - long(k))) return script_[k];
    return script_[0];
  }
  std::vector<int32_t> script_;
  int32_t vocab_;
  std::vector<std::vector<int32_t>> fed_;  // per slot
  mutable std::mutex mutex_;
  std::vector<Call> calls_;
  q35::cli::StateMemory memory_{q35::cli::heap_memory(), q35::cli::heap_memory(), size_t(1) << 20};
};

struct Recorder final : ResponseWriter {
  int status = 0;
  std::string body;
  std::vector<json> events;
  bool done = false;
  void send(int s, std::string_view, const std::string& b) override {
    status = s;
    body = b;
  }
  bool start_stream(std::string_view) override {
    status = 200;
    return true;
  }
  bool write(std::string_view chunk) override {
    REQUIRE(chunk.starts_with("data: "));
    REQUIRE(chunk.ends_with("\n\n"));
    std::string_view data = chunk.substr(6, chunk.size() - 8);
    if (data == "[DONE]") done = true;
    else events.push_back(json::parse(data));
    return true;
  }
  void end_stream() override {}
  bool client_gone() override { return false; }
};

const char* kTools = R"([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object",
  "properties":{"city":{"type":"string"},"days":{"type":"integer"}}}}}])";

}  // namespace

TEST_CASE("Scripted replies through the scheduler and the API: tool calls, streaming, cache, errors") {
  const fs::path dir = fs::path(Q35_SOURCE_DIR) / "tests/fixtures/tiny-qwen35moe";
  q35::Tokenizer tok = q35::Tokenizer::from_file(dir / "tokenizer.json");
  q35::qwen35::GenerationConfig gen = q35::qwen35::GenerationConfig::from_file(dir / "generation_config.json");
  std::vector<int32_t> script = tok.encode(
      "Let me look it up.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
      "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call><|im_end|>");
  ScriptedEngine engine(script, 1536);
  Metrics metrics;
  SchedulerOptions opts;
  opts.snapshot_block = 16;
  Scheduler scheduler(engine, tok, q35::qwen35::stop_token_ids(tok, gen), opts, metrics,
                      [&](const std::string&) {});
  Api api({tok, gen, "tiny", 4096}, scheduler, metrics, "key", [](const std::string&) {});
  auto call = [&](const std::string& method, const std::string& path, const std::string& body,
                  const std::string& auth = "Bearer key") {
    Recorder r;
    api.handle({method, path, body, auth}, r);
    return r;
  };
  const std::string request = std::string(R"({"model":"tiny","seed":1,"tools":)") + kTools +
                              R"(,"messages":[{"role":"system","content":")" + std::string(40, 's') +
                              R"("},{"role":"user","content":"Weather in Paris?"}])";

  Recorder r = call("POST", "/v1/chat/completions", request + "}");
  REQUIRE(r.status == 200);
  json j = json::parse(r.body);
  const json& choice = j["choices"][0];
  CHECK(choice["finish_reason"] == "tool_calls");
  CHECK(choice["message"]["reasoning_content"] == "Let me look it up.");
  CHECK(choice["message"]["content"].is_null());
  REQUIRE(choice["message"]["tool_calls"].size() == 1);
  CHECK(choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather");
  CHECK(json::parse(choice["message"]["tool_calls"][0]["function"]["arguments"].get<std::string>()) ==
        json({{"city", "Paris"}, {"days", 3}}));
  CHECK(j["usage"]["completion_tokens"] == int64_t(script.size()));  // the <|im_end|> counted
  CHECK(j["usage"]["prompt_tokens_details"]["cached_tokens"] == 0);

  // The same request streamed, resumed from the cache: deltas as the OpenAI client assembles them.
  Recorder s = call("POST", "/v1/chat/completions", request + R"(,"stream":true,"stream_options":{"include_usage":true}})");
  REQUIRE(s.status == 200);
  CHECK(s.done);
  CHECK(engine.restores == 1);
  std::string reasoning, name, arguments;
  std::vector<std::string> finishes;
  for (const json& e : s.events) {
    if (e["choices"].empty()) continue;
    const json& c = e["choices"][0];
    const json& d = c["delta"];
    if (d.contains("reasoning_content")) reasoning += d["reasoning_content"].get<std::string>();
    CHECK((!d.contains("content") || d["content"] == ""));
    if (d.contains("tool_calls"))
      for (const json& t : d["tool_calls"]) {
        CHECK(t["index"] == 0);
        if (t["function"].contains("name")) name += t["function"]["name"].get<std::string>();
        arguments += t["function"]["arguments"].get<std::string>();
      }
    if (!c["finish_reason"].is_null()) finishes.push_back(c["finish_reason"]);
  }
  CHECK(reasoning == "Let me look it up.");
  CHECK(name == "get_weather");
  CHECK(json::parse(arguments) == json({{"city", "Paris"}, {"days", 3}}));
  CHECK(finishes == std::vector<std::string>{"tool_calls"});
  const json& usage = s.events.back()["usage"];
  CHECK(usage["prompt_tokens_details"]["cached_tokens"].get<int64_t>() > 0);
  CHECK(usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]);

  // tool_choice none: the call is plain content (no parsing), finish_reason stop.
  Recorder n = call("POST", "/v1/chat/completions", request + R"(,"tool_choice":"none"})");
  json nj = json::parse(n.body);
  CHECK(nj["choices"][0]["finish_reason"] == "stop");
  CHECK(nj["choices"][0]["message"]["content"].get<std::string>().starts_with("<tool_call>"));

  // ignore_eos: the reply goes on past <|im_end|> (a stop id) until max_tokens.
  const size_t past = script.size() + 5;
  Recorder ie = call("POST", "/v1/chat/completions",
                     request + fmt::format(R"(,"tool_choice":"none","ignore_eos":true,"max_tokens":{}}})", past));
  REQUIRE(ie.status == 200);
  json iej = json::parse(ie.body);
  CHECK(iej["choices"][0]["finish_reason"] == "length");
  CHECK(iej["usage"]["completion_tokens"] == int64_t(past));
  CHECK(call("POST", "/v1/chat/completions", request + R"(,"ignore_eos":1})").status == 400);

  // Stop strings end the reply before the call.
  Recorder st = call("POST", "/v1/chat/completions", request + R"(,"stop":["it up"]})");
  json sj = json::parse(st.body);
  CHECK(sj["choices"][0]["finish_reason"] == "stop");
  CHECK(sj["choices"][0]["message"]["reasoning_content"] == "Let me look ");  // the text before the stop string

  // Errors: status, type and the field.
  CHECK(call("POST", "/v1/chat/completions", request + "}", "").status == 401);
  CHECK(call("POST", "/v1/chat/completions", request + "}", "Bearer nope").status == 401);
  CHECK(call("GET", "/health", "", "").status == 200);
  CHECK(call("GET", "/v1/chat/completions", "").status == 405);
  CHECK(call("GET", "/nowhere", "").status == 404);
  Recorder bad = call("POST", "/v1/completions", R"({"prompt":"x","max_tokens":"many"})");
  CHECK(bad.status == 400);
  CHECK(json::parse(bad.body)["error"]["param"] == "max_tokens");
  Recorder model = call("POST", "/v1/completions", R"({"prompt":"x","model":"gpt"})");
  CHECK(model.status == 404);
  CHECK(json::parse(model.body)["error"]["code"] == "model_not_found");
  const std::string m = call("GET", "/metrics", "").body;
  CHECK(m.find("q35jit_requests_total{endpoint=\"/v1/chat/completions\",status=\"401\"} 2") != std::string::npos);
  CHECK(m.find("q35jit_prefix_cache_hits_total ") != std::string::npos);
}

namespace {

// Blocks the engine's worker thread while closed.
class Gate {
 public:
  void pass() {
    std::unique_lock lock(mutex_);
    ++waiting_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return !closed_; });
    --waiting_;
  }
  void close() {
    std::lock_guard lock(mutex_);
    closed_ = true;
  }
  void open() {
    {
      std::lock_guard lock(mutex_);
      closed_ = false;
    }
    cv_.notify_all();
  }
  // True once a thread waits at the gate (false after 10 s).
  bool wait_for_waiter() {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [&] { return waiting_ > 0; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool closed_ = false;
  int waiting_ = 0;
};

// Polls `pred` for up to 10 s.
bool eventually(const std::function<bool()>& pred) {
  for (int i = 0; i < 1000; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

// The last event of a job (Done or Failed); fails the test when none comes within 10 s.
JobEvent finish_of(Job& job) {
  JobEvent e;
  do {
    REQUIRE(job.pop(e, std::chrono::seconds(10)));
  } while (e.kind == JobEvent::Kind::Delta);
  return e;
}

std::shared_ptr<Job> completion_job(const std::string& id, std::vector<int32_t> prompt, int64_t max_tokens) {
  GenerationRequest r;
  r.chat = false;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.seeded = true;
  return std::make_shared<Job>(id, std::move(r));
}

struct SchedulerSetup {
  q35::Tokenizer tok;
  q35::qwen35::GenerationConfig gen;
  std::vector<int32_t> script;
  SchedulerSetup()
      : tok(q35::Tokenizer::from_file(fs::path(Q35_SOURCE_DIR) / "tests/fixtures/tiny-qwen35moe/tokenizer.json")),
        gen(q35::qwen35::GenerationConfig::from_file(fs::path(Q35_SOURCE_DIR) /
                                                     "tests/fixtures/tiny-qwen35moe/generation_config.json")),
        script(tok.encode("one two three four five six seven eight nine ten")) {}
  std::vector<int32_t> prompt(size_t n) const {  // n ids of the text, repeated
    const std::vector<int32_t> base = tok.encode("The quick brown fox jumps over the lazy dog. ");
    std::vector<int32_t> p;
    while (p.size() < n) p.push_back(base[p.size() % base.size()]);
    return p;
  }
};

}  // namespace

TEST_CASE("SlotPool: acquire, release through the lease, and no leak") {
  CHECK_THROWS_AS(SlotPool(0), q35::Error);
  SlotPool pool(2);
  CHECK(pool.size() == 2);
  CHECK(pool.available() == 2);
  auto j1 = completion_job("a", {1, 2}, 1), j2 = completion_job("b", {1}, 1), j3 = completion_job("c", {1}, 1);
  {
    std::optional<SlotLease> a = pool.acquire(j1);
    REQUIRE(a.has_value());
    CHECK((*a)->index == 0);
    CHECK((*a)->phase == Slot::Phase::Prefill);
    CHECK((*a)->job == j1);
    (*a)->tokens = {1, 2, 3};
    (*a)->cached = 2;
    (*a)->snapshots.emplace(2, std::make_shared<q35::cli::SavedState>());
    std::optional<SlotLease> b = pool.acquire(j2);
    REQUIRE(b.has_value());
    CHECK((*b)->index == 1);
    CHECK(pool.in_use() == 2);
    CHECK_FALSE(pool.acquire(j3).has_value());  // full
    CHECK(j3.use_count() == 1);     // a refused acquire keeps no reference

    a->release();
    CHECK(pool.in_use() == 1);
    CHECK(j1.use_count() == 1);  // the slot let go of its job
    a->release();                // twice is harmless
    CHECK(pool.in_use() == 1);
    std::optional<SlotLease> c = pool.acquire(j3);
    REQUIRE(c.has_value());
    CHECK((*c)->index == 0);  // the freed slot, emptied
    CHECK((*c)->job == j3);
    CHECK((*c)->tokens.empty());
    CHECK((*c)->cached == 0);
    CHECK((*c)->snapshots.empty());
    CHECK((*c)->position() == 0);

    SlotLease moved = std::move(*c);  // moving hands the slot over, never releases it twice
    c.reset();
    CHECK(pool.in_use() == 2);
    CHECK(moved->job == j3);
  }
  CHECK(pool.in_use() == 0);  // leases destroyed at the end of the scope
  CHECK(j2.use_count() == 1);

  // Released when the scope is left by an exception.
  try {
    SlotLease l = *pool.acquire(j1);
    CHECK(pool.in_use() == 1);
    throw std::runtime_error("engine failure");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "engine failure");
  }
  CHECK(pool.in_use() == 0);

  const uint64_t before = pool.acquired_total();
  for (int i = 0; i < 1000; ++i) {
    std::optional<SlotLease> x = pool.acquire(j1), y = pool.acquire(j2);
    REQUIRE(x.has_value());
    REQUIRE(y.has_value());
    CHECK_FALSE(pool.acquire(j3).has_value());
  }
  CHECK(pool.in_use() == 0);
  CHECK(pool.available() == 2);
  CHECK(pool.acquired_total() == before + 2000);
  CHECK(j1.use_count() == 1);
}

TEST_CASE("Scheduler slots: freed on finish, cancel and engine error; the queue bound; no leak") {
  SchedulerSetup setup;
  ScriptedEngine engine(setup.script, 1536);
  Gate gate;
  bool fail_next = false;      // written only while the worker waits at the gate or is idle
  std::shared_ptr<Job> cancel_on_decode;  // cancelled at its second engine call (its first decode step)
  int feeds = 0;
  engine.on_feed = [&](std::span<const int32_t>) {
    gate.pass();
    if (std::exchange(fail_next, false)) throw std::runtime_error("engine broke");
    if (cancel_on_decode && ++feeds == 2) cancel_on_decode->cancel();
  };
  Metrics metrics;
  SchedulerOptions opts;
  opts.max_queue = 2;
  Scheduler scheduler(engine, setup.tok, q35::qwen35::stop_token_ids(setup.tok, setup.gen), opts, metrics,
                      [](const std::string&) {});
  CHECK(scheduler.slots().size() == 1);
  CHECK(scheduler.running() == 0);

  // A runs (held at the gate in its prefill) and holds the slot; B and C wait; D is refused.
  gate.close();
  auto a = completion_job("a", setup.prompt(20), 4), b = completion_job("b", setup.prompt(21), 4),
       c = completion_job("c", setup.prompt(22), 4), d = completion_job("d", setup.prompt(23), 4);
  scheduler.submit(a);
  REQUIRE(gate.wait_for_waiter());
  CHECK(scheduler.running() == 1);
  CHECK(scheduler.slots().available() == 0);
  scheduler.submit(b);
  scheduler.submit(c);
  CHECK(scheduler.queue_length() == 2);
  try {
    scheduler.submit(d);
    FAIL("a third waiting request was accepted with --max-queue 2");
  } catch (const ApiError& e) {
    CHECK(e.status() == 503);
    CHECK(e.code() == "queue_full");
  }
  c->cancel();  // its client leaves while it waits: it never takes a slot
  gate.open();
  JobEvent ea = finish_of(*a), eb = finish_of(*b);
  CHECK(ea.kind == JobEvent::Kind::Done);
  CHECK(ea.finish_reason == "length");
  CHECK(ea.completion_tokens == 4);
  CHECK(eb.kind == JobEvent::Kind::Done);
  CHECK(eventually([&] { return scheduler.running() == 0 && scheduler.queue_length() == 0; }));
  JobEvent none;
  CHECK_FALSE(c->pop(none, std::chrono::milliseconds(100)));
  CHECK(scheduler.slots().acquired_total() == 2);
  CHECK(eventually([&] { return a.use_count() == 1; }));  // the finished slots dropped their jobs
  CHECK(eventually([&] { return b.use_count() == 1; }));
  CHECK(eventually([&] { return c.use_count() == 1; }));

  // The engine throws: the job fails with 500, the slot is freed, the next request runs.
  fail_next = true;
  auto e = completion_job("e", setup.prompt(30), 4);
  scheduler.submit(e);
  JobEvent ee = finish_of(*e);
  REQUIRE(ee.kind == JobEvent::Kind::Failed);
  CHECK(ee.error->status() == 500);
  CHECK(std::string(ee.error->what()).find("engine broke") != std::string::npos);
  CHECK(eventually([&] { return scheduler.running() == 0; }));
  CHECK(eventually([&] { return e.use_count() == 1; }));
  auto f = completion_job("f", setup.prompt(30), 4);
  scheduler.submit(f);
  CHECK(finish_of(*f).finish_reason == "length");

  // Cancelled while decoding (the client left): finish "cancelled", slot freed.
  auto g = completion_job("g", setup.prompt(40), 50);
  cancel_on_decode = g;
  scheduler.submit(g);
  JobEvent eg = finish_of(*g);
  CHECK(eg.finish_reason == "cancelled");
  CHECK(eg.completion_tokens < 50);
  CHECK(eventually([&] { return scheduler.running() == 0; }));
  cancel_on_decode.reset();
  CHECK(eventually([&] { return g.use_count() == 1; }));

  // Many requests in turn, some cancelled while queued: every slot comes back.
  const uint64_t before = scheduler.slots().acquired_total();
  int ran = 0;
  for (int i = 0; i < 200; ++i) {
    auto j = completion_job(fmt::format("m{}", i), setup.prompt(size_t(10 + i % 37)), 1 + i % 5);
    if (i % 4 == 3) {
      // Held at the gate behind another request, then cancelled: skipped without a slot.
      gate.close();
      auto holder = completion_job(fmt::format("h{}", i), setup.prompt(12), 1);
      scheduler.submit(holder);
      REQUIRE(gate.wait_for_waiter());
      scheduler.submit(j);
      j->cancel();
      gate.open();
      CHECK(finish_of(*holder).kind == JobEvent::Kind::Done);
      ++ran;
      CHECK(eventually([&] { return scheduler.queue_length() == 0 && scheduler.running() == 0; }));
      CHECK_FALSE(j->pop(none, std::chrono::milliseconds(1)));
      continue;
    }
    scheduler.submit(j);
    JobEvent ej = finish_of(*j);
    CHECK(ej.kind == JobEvent::Kind::Done);
    CHECK(ej.completion_tokens == 1 + i % 5);
    ++ran;
  }
  CHECK(eventually([&] { return scheduler.running() == 0; }));
  CHECK(scheduler.slots().available() == scheduler.slots().size());
  CHECK(scheduler.slots().acquired_total() == before + uint64_t(ran));
}

TEST_CASE("A client gone during a long prefill is noticed at the next prefill step") {
  SchedulerSetup setup;
  ScriptedEngine engine(setup.script, 1536);
  std::shared_ptr<Job> victim;
  std::vector<size_t> calls;  // tokens per engine call (read after the job's last event)
  engine.on_feed = [&](std::span<const int32_t> tokens) {
    calls.push_back(tokens.size());
    if (victim) victim->cancel();  // the client leaves while the first step runs
  };
  Metrics metrics;
  SchedulerOptions opts;
  opts.prefill_chunk = 64;
  opts.snapshot_block = 1 << 20;
  Scheduler scheduler(engine, setup.tok, q35::qwen35::stop_token_ids(setup.tok, setup.gen), opts, metrics,
                      [](const std::string&) {});
  const std::vector<int32_t> prompt = setup.prompt(1000);

  victim = completion_job("long", prompt, 8);
  scheduler.submit(victim);
  JobEvent e = finish_of(*victim);
  REQUIRE(e.kind == JobEvent::Kind::Done);
  CHECK(e.finish_reason == "cancelled");
  CHECK(e.completion_tokens == 0);
  CHECK(e.prompt_tokens == 1000);
  CHECK(calls == std::vector<size_t>{64});  // one step of the prompt, not all of it
  CHECK(eventually([&] { return scheduler.running() == 0; }));
  victim.reset();

  // The same prompt again: it resumes after the step the cancelled one computed, and the rest runs
  // in steps of at most 64 tokens (the last one gives the first token).
  calls.clear();
  auto again = completion_job("again", prompt, 3);
  scheduler.submit(again);
  JobEvent e2 = finish_of(*again);
  REQUIRE(e2.kind == JobEvent::Kind::Done);
  CHECK(e2.finish_reason == "length");
  CHECK(e2.cached_tokens == 64);
  CHECK(e2.completion_tokens == 3);
  std::vector<size_t> expected(14, 64);
  expected.push_back(1000 - 64 - 14 * 64);  // 40
  expected.push_back(1);                     // two decode steps
  expected.push_back(1);
  CHECK(calls == expected);
}

namespace {

// Every content delta of a job and its last event.
std::pair<std::string, JobEvent> reply_of(Job& job) {
  std::string text;
  JobEvent e;
  do {
    REQUIRE(job.pop(e, std::chrono::seconds(10)));
    text += e.delta.content;
  } while (e.kind == JobEvent::Kind::Delta);
  return {text, e};
}

}  // namespace

TEST_CASE("Continuous batching: admission order, capacity, the prefill bound, per-sequence replies") {
  SchedulerSetup setup;
  ScriptedEngine engine(setup.script, 1536, 4);
  Gate gate;
  std::atomic<bool> gated = true;
  engine.on_feed = [&](std::span<const int32_t>) {
    if (gated) gate.pass();
  };
  Metrics metrics;
  SchedulerOptions opts;
  opts.max_batch = 3;  // below the engine's 4 slots: the pool has 3
  opts.prefill_chunk = 16;
  opts.snapshot_block = 1 << 20;
  Scheduler scheduler(engine, setup.tok, q35::qwen35::stop_token_ids(setup.tok, setup.gen), opts, metrics,
                      [](const std::string&) {});
  CHECK(scheduler.slots().size() == 3);

  // Prompt k starts with id 1000 + k (marks its first piece), then 39 ids of the text.
  auto prompt = [&](int k) {
    std::vector<int32_t> p = setup.prompt(40);
    p[0] = 1000 + k;
    return p;
  };
  const std::vector<int64_t> max_tokens = {30, 25, 1, 20, 12, 8};
  // The replies alone, one request at a time (the scripted reply's first max_tokens tokens).
  std::vector<std::string> alone;
  gated = false;
  for (size_t k = 0; k < max_tokens.size(); ++k) {
    auto j = completion_job(fmt::format("alone{}", k), prompt(int(k)), max_tokens[k]);
    scheduler.submit(j);
    auto [text, e] = reply_of(*j);
    REQUIRE(e.kind == JobEvent::Kind::Done);
    CHECK(e.completion_tokens == max_tokens[k]);
    alone.push_back(text);
  }
  CHECK(alone[0] != alone[1]);
  const size_t calls_before = engine.calls().size();

  // Job 0 holds the worker in its first piece while the others queue; then all run together.
  // (The prompts differ from the cached ones in their first id, so none resumes from the cache.)
  gated = true;
  gate.close();
  std::vector<std::shared_ptr<Job>> jobs;
  auto fresh = [&](int k) {
    std::vector<int32_t> p = prompt(k);
    p[0] = 1100 + k;
    return completion_job(fmt::format("j{}", k), p, max_tokens[size_t(k)]);
  };
  jobs.push_back(fresh(0));
  scheduler.submit(jobs[0]);
  REQUIRE(gate.wait_for_waiter());
  for (int k = 1; k < 6; ++k) {
    jobs.push_back(fresh(k));
    scheduler.submit(jobs.back());
  }
  CHECK(scheduler.queue_length() == 5);
  CHECK(scheduler.running() == 1);
  gated = false;
  gate.open();
  for (size_t k = 0; k < jobs.size(); ++k) {
    auto [text, e] = reply_of(*jobs[k]);
    REQUIRE(e.kind == JobEvent::Kind::Done);
    CHECK(e.finish_reason == "length");
    CHECK(e.completion_tokens == max_tokens[k]);
    CHECK(text == alone[k]);  // the same reply as alone, whatever ran beside it
  }
  CHECK(eventually([&] { return scheduler.running() == 0; }));
  CHECK(scheduler.slots().available() == 3);

  // Admission in submission order: the first pieces of the prompts.
  const std::vector<ScriptedEngine::Call> calls = engine.calls();
  std::vector<int32_t> first_pieces;
  for (size_t i = calls_before; i < calls.size(); ++i)
    if (calls[i].kind == ScriptedEngine::Call::Prefill && calls[i].pos0 == 0) first_pieces.push_back(calls[i].first);
  CHECK(first_pieces == std::vector<int32_t>{1100, 1101, 1102, 1103, 1104, 1105});
  // A sequence in two consecutive decode steps waited for at most --prefill-chunk prompt tokens.
  int64_t prefill_since_decode = 0;
  const ScriptedEngine::Call* last_decode = nullptr;
  size_t widest = 0, bounded_gaps = 0;
  bool decode_between_pieces = false;  // a decode step between two prompt pieces
  for (size_t i = calls_before; i < calls.size(); ++i) {
    const auto& c = calls[i];
    if (c.kind == ScriptedEngine::Call::Prefill) {
      CHECK(c.tokens <= 16);
      prefill_since_decode += c.tokens;
      continue;
    }
    if (last_decode && std::find_first_of(c.slots.begin(), c.slots.end(), last_decode->slots.begin(),
                                          last_decode->slots.end()) != c.slots.end()) {
      CHECK(prefill_since_decode <= 16);
      bounded_gaps += prefill_since_decode > 0;
    }
    prefill_since_decode = 0;
    last_decode = &c;
    widest = std::max(widest, c.slots.size());
    std::vector<int> sorted = c.slots;
    std::sort(sorted.begin(), sorted.end());
    CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());  // distinct slots
    for (int s : c.slots) CHECK((s >= 0 && s < 3));
    if (i > calls_before && i + 1 < calls.size() && calls[i - 1].kind == ScriptedEngine::Call::Prefill &&
        calls[i + 1].kind == ScriptedEngine::Call::Prefill)
      decode_between_pieces = true;
  }
  CHECK(bounded_gaps > 5);  // prompts came in while others decoded
  CHECK(widest == 3);  // three sequences decoded in one step, never more
  CHECK(decode_between_pieces);
}

TEST_CASE("Continuous batching: a cancel or an engine error frees that slot while the others go on") {
  SchedulerSetup setup;
  ScriptedEngine engine(setup.script, 1536, 3);
  Gate gate;
  std::atomic<bool> gated = true;
  std::shared_ptr<Job> to_cancel;
  int decode_steps = 0;
  engine.on_feed = [&](std::span<const int32_t>) {
    if (gated) gate.pass();
  };
  engine.on_prefill = [&](std::span<const int32_t> tokens) {
    if (tokens[0] == 1201) throw std::runtime_error("engine broke on job 1");
  };
  engine.on_decode = [&](size_t) {
    if (++decode_steps == 3) to_cancel->cancel();
  };
  Metrics metrics;
  SchedulerOptions opts;
  opts.max_batch = 3;
  opts.prefill_chunk = 64;
  std::vector<std::string> log;
  std::mutex log_mutex;
  Scheduler scheduler(engine, setup.tok, q35::qwen35::stop_token_ids(setup.tok, setup.gen), opts, metrics,
                      [&](const std::string& line) {
                        std::lock_guard lock(log_mutex);
                        log.push_back(line);
                      });
  auto job = [&](int k, int64_t max_tokens) {
    std::vector<int32_t> p = setup.prompt(20);
    p[0] = 1200 + k;
    return completion_job(fmt::format("j{}", k), p, max_tokens);
  };
  // 0 runs long, 1 fails in its prefill, 2 is cancelled at the third decode step, 3 waits for a slot.
  gate.close();
  auto j0 = job(0, 10), j1 = job(1, 10), j2 = job(2, 40), j3 = job(3, 5);
  to_cancel = j2;
  scheduler.submit(j0);
  REQUIRE(gate.wait_for_waiter());
  scheduler.submit(j1);
  scheduler.submit(j2);
  scheduler.submit(j3);
  gated = false;
  gate.open();
  auto [t1, e1] = reply_of(*j1);
  REQUIRE(e1.kind == JobEvent::Kind::Failed);
  CHECK(e1.error->status() == 500);
  CHECK(std::string(e1.error->what()).find("engine broke on job 1") != std::string::npos);
  auto [t2, e2] = reply_of(*j2);
  CHECK(e2.finish_reason == "cancelled");
  CHECK(e2.completion_tokens < 40);
  auto [t0, e0] = reply_of(*j0);
  CHECK(e0.finish_reason == "length");
  CHECK(e0.completion_tokens == 10);
  auto [t3, e3] = reply_of(*j3);
  CHECK(e3.finish_reason == "length");
  CHECK(e3.completion_tokens == 5);
  CHECK(eventually([&] { return scheduler.running() == 0; }));
  CHECK(scheduler.slots().available() == 3);
  to_cancel.reset();
  for (auto* j : {&j0, &j1, &j2, &j3}) CHECK(eventually([&] { return j->use_count() == 1; }));
  // j3 took the slot j1 or j2 left while j0 still decoded: j0 finished after j3 started.
  std::lock_guard lock(log_mutex);
  auto at = [&](const std::string& prefix) {
    for (size_t i = 0; i < log.size(); ++i)
      if (log[i].starts_with(prefix)) return i;
    return log.size();
  };
  CHECK(at("j1 failed") < at("j0 prompt"));
  CHECK(at("j2 prompt") < at("j0 prompt"));
  CHECK(at("j3 prompt") < at("j0 prompt"));
  CHECK(at("j0 prompt") < log.size());
}

TEST_CASE("Prefix cache with many sequences: a cached prefix is restored into whichever slot is free") {
  SchedulerSetup setup;
  ScriptedEngine engine(setup.script, 1536, 2);
  Gate gate;
  std::atomic<bool> gated = false;
  engine.on_feed = [&](std::span<const int32_t>) {
    if (gated) gate.pass();
  };
  Metrics metrics;
  SchedulerOptions opts;
  opts.max_batch = 2;
  opts.snapshot_block = 16;
  Scheduler scheduler(engine, setup.tok, q35::qwen35::stop_token_ids(setup.tok, setup.gen), opts, metrics,
                      [](const std::string&) {});
  const std::vector<int32_t> p = setup.prompt(40);
  auto first = completion_job("first", p, 3);
  scheduler.submit(first);
  auto [text, e] = reply_of(*first);  // ran in slot 0
  REQUIRE(e.kind == JobEvent::Kind::Done);
  CHECK(eventually([&] { return scheduler.running() == 0; }));

  // A holder takes slot 0; the same prompt then resumes in slot 1 from the cached block at 32.
  gated = true;
  gate.close();
  std::vector<int32_t> other = setup.prompt(30);
  other[0] = 1300;
  auto holder = completion_job("holder", other, 8);
  scheduler.submit(holder);
  REQUIRE(gate.wait_for_waiter());
  auto again = completion_job("again", p, 3);
  scheduler.submit(again);
  gated = false;
  gate.open();
  auto [text2, e2] = reply_of(*again);
  REQUIRE(e2.kind == JobEvent::Kind::Done);
  CHECK(e2.cached_tokens == 32);
  CHECK(text2 == text);
  CHECK(reply_of(*holder).second.finish_reason == "length");
  CHECK(engine.restores == 1);
  CHECK(engine.restored_slots == std::vector<int>{1});
}

namespace {

std::shared_ptr<Job> turn_job(const std::string& id, std::vector<int32_t> prompt, int64_t turn_start, int64_t max_tokens) {
  auto j = completion_job(id, std::move(prompt), max_tokens);
  const_cast<GenerationRequest&>(j->request()).turn_start = turn_start;
  return j;
}

// The prompt pieces (tokens per call) of slot-less prefill calls from call index `from` whose first
// piece starts at `pos0`.
std::vector<int64_t> pieces_since(const std::vector<ScriptedEngine::Call>& calls, size_t from) {
  std::vector<int64_t> out;
  for (size_t i = from; i < calls.size(); ++i)
    if (calls[i].kind == ScriptedEngine::Call::Prefill) out.push_back(calls[i].tokens);
  return out;
}

double metric_of(const std::string& text, const std::string& name) {
  const size_t at = text.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + name.size() + 2));
}

}  // namespace

TEST_CASE("Prefix cache through the scheduler: snapshots at the turn start only, idle prefill pieces, tiers, metrics") {
  SchedulerSetup setup;
  ScriptedEngine engine(setup.script, 1536, 2);
  // The scripted state is the ids fed (4 bytes each): a 300-token sequence's parts are 5 units of
  // 256 bytes; the "device" tier holds two such sequences, the host tier four.
  engine.set_state_memory(32 * 256, 64 * 256);
  std::atomic<int> decodes{0};
  std::shared_ptr<Job> late;  // submitted while another sequence decodes
  Metrics metrics;
  SchedulerOptions opts;
  opts.prefill_chunk = 16;
  opts.idle_prefill_chunk = 256;
  std::vector<std::string> log;
  std::mutex log_mutex;
  std::unique_ptr<Scheduler> owner = std::make_unique<Scheduler>(
      engine, setup.tok, q35::qwen35::stop_token_ids(setup.tok, setup.gen), opts, metrics, [&](const std::string& line) {
        std::lock_guard lock(log_mutex);
        log.push_back(line);
      });
  Scheduler& scheduler = *owner;
  engine.on_decode = [&](size_t) {
    if (++decodes == 2 && late) scheduler.submit(late);
  };
  auto last_log = [&] {
    std::lock_guard lock(log_mutex);
    return log.back();
  };

  // Turn 1 alone: nobody decodes, so the prompt runs in pieces of up to 256 tokens, cut only at the
  // turn start (290); no snapshot at block boundaries.
  const std::vector<int32_t> p1 = setup.prompt(300);
  size_t mark = engine.calls().size();
  auto a = turn_job("a", p1, 290, 3);
  scheduler.submit(a);
  JobEvent ea = finish_of(*a);
  REQUIRE(ea.kind == JobEvent::Kind::Done);
  CHECK(ea.cached_tokens == 0);
  CHECK(pieces_since(engine.calls(), mark) == std::vector<int64_t>{256, 34, 10});
  CHECK(eventually([&] { return last_log().find("(0 cached, 3 prefill calls)") != std::string::npos; }));
  // Snapshots at 290 and 302, K/V rows of 302 (kept just after the reply's last event).
  CHECK(eventually([&] { return engine.state_used(q35::cli::Tier::Device) == 15 * 256; }));
  CHECK(engine.state_used(q35::cli::Tier::Host) == 0);

  // Turn 2 (shares the first 295 ids): resumes at 290 from device memory, prefills the rest.
  std::vector<int32_t> p2(p1.begin(), p1.begin() + 295);
  for (int i = 0; i < 20; ++i) p2.push_back(1000 + i);
  mark = engine.calls().size();
  auto b = turn_job("b", p2, 310, 3);
  scheduler.submit(b);
  JobEvent eb = finish_of(*b);
  CHECK(eb.cached_tokens == 290);
  CHECK(pieces_since(engine.calls(), mark) == std::vector<int64_t>{20, 5});
  REQUIRE(engine.restored_tiers.size() == 1);
  CHECK(engine.restored_tiers[0] == q35::cli::Tier::Device);

  // A long reply decodes while another prompt comes in: that prompt runs in pieces of
  // --prefill-chunk (16) while the first decodes.
  std::vector<int32_t> p3 = setup.prompt(40), p4 = setup.prompt(100);
  p3[0] = 1400;
  p4[0] = 1401;
  decodes = 0;
  late = completion_job("late", p4, 2);
  mark = engine.calls().size();
  auto c = completion_job("c", p3, 30);
  scheduler.submit(c);
  CHECK(finish_of(*c).completion_tokens == 30);
  JobEvent el = finish_of(*late);
  CHECK(el.completion_tokens == 2);
  {
    const auto calls = engine.calls();
    std::vector<int64_t> late_pieces;
    bool in_late = false;
    for (size_t i = mark; i < calls.size(); ++i)
      if (calls[i].kind == ScriptedEngine::Call::Prefill) {
        if (calls[i].pos0 == 0) in_late = calls[i].first == 1401;
        if (in_late) late_pieces.push_back(calls[i].tokens);
      }
    CHECK(late_pieces == std::vector<int64_t>{16, 16, 16, 16, 16, 16, 4});
  }
  // c and late need device room: the least recently used entry (a) moved to host memory.
  CHECK(engine.state_used(q35::cli::Tier::Host) >= 15 * 256);
  // Turn 2 again: a hit from the host tier.
  auto b2 = turn_job("b2", p2, 310, 3);
  scheduler.submit(b2);
  CHECK(finish_of(*b2).cached_tokens > 0);
  auto a2 = turn_job("a2", p1, 290, 3);
  scheduler.submit(a2);
  CHECK(finish_of(*a2).cached_tokens == 290);
  REQUIRE(engine.restored_tiers.size() == 3);
  CHECK(engine.restored_tiers[2] == q35::cli::Tier::Host);

  // /metrics: lookups, hits and misses, bytes per tier, budgets, saved / restored / spilled bytes.
  CHECK(eventually([&] { return scheduler.running() == 0; }));
  const std::string m = metrics.render(0, 0);
  CHECK(metric_of(m, "q35jit_prefix_cache_queries_total") == 6);
  CHECK(metric_of(m, "q35jit_prefix_cache_hits_total") == 3);
  CHECK(metric_of(m, "q35jit_prefix_cache_misses_total") == 3);
  CHECK(metric_of(m, "q35jit_prefix_cache_spilled_bytes_total") >= 15 * 256);
  CHECK(metric_of(m, "q35jit_prefix_cache_entries") >= 2);
  CHECK(m.find("q35jit_prefix_cache_capacity_bytes{tier=\"device\"} 8192\n") != std::string::npos);
  CHECK(m.find("q35jit_prefix_cache_capacity_bytes{tier=\"host\"} 16384\n") != std::string::npos);
  CHECK(m.find("q35jit_prefix_cache_restored_bytes_total{tier=\"device\"} ") != std::string::npos);
  CHECK(m.find("q35jit_prefix_cache_restored_bytes_total{tier=\"host\"} 0\n") == std::string::npos);
  CHECK(m.find("q35jit_prefix_cache_saved_bytes_total{tier=\"device\"} 0\n") == std::string::npos);
  const double held = metric_of(m, "q35jit_prefix_cache_bytes");
  CHECK(held > 0);
  CHECK(held <= 96 * 256);
  owner.reset();  // the scheduler (and the cache's states) before the engine
}
