// The API and the scheduler end to end without sockets: a scripted engine (it always continues a
// fixed reply) behind the real Scheduler and Api, and a ResponseWriter that records what the HTTP
// server would send. Checks the tool-call path that the random tiny model cannot take by itself
// (tool_choice auto, a call after the think block, finish_reason tool_calls), streaming deltas, the
// prefix cache's resume point, and the error statuses.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>

#include "models/qwen35/chat.h"
#include "server/api.h"

namespace fs = std::filesystem;
using namespace q35::server;
using json = nlohmann::json;

namespace {

// Logits that always pick the next token of `script` after the longest suffix of the fed tokens
// that is a prefix of it (script[0] after a prompt).
class ScriptedEngine final : public q35::cli::Engine {
 public:
  ScriptedEngine(std::vector<int32_t> script, int32_t vocab) : script_(std::move(script)), vocab_(vocab) {}
  std::string device() const override { return "script"; }
  int64_t position() const override { return int64_t(fed_.size()); }
  int64_t max_context() const override { return 4096; }
  std::vector<float> logits(std::span<const int32_t> tokens, bool all) override {
    REQUIRE_FALSE(all);
    fed_.insert(fed_.end(), tokens.begin(), tokens.end());
    std::vector<float> l(size_t(vocab_), 0.0f);
    l[size_t(next())] = 30.0f;
    return l;
  }
  int32_t prefill(std::span<const int32_t> tokens, q35::Sampler& s) override { return s.sample(logits(tokens, false)); }
  int32_t decode(int32_t token, q35::Sampler& s) override { return s.sample(logits({&token, 1}, false)); }
  void reset() override { fed_.clear(); }
  q35::cli::StateCopy save_recurrent() const override { return copy(); }
  q35::cli::StateCopy save_kv() const override { return copy(); }
  void restore(const q35::cli::StateCopy& kv, const q35::cli::StateCopy& recurrent) override {
    fed_.resize(size_t(recurrent.pos));
    std::memcpy(fed_.data(), kv.parts[0].data(), fed_.size() * 4);
    ++restores;
  }
  int restores = 0;

 private:
  q35::cli::StateCopy copy() const {
    std::vector<std::byte> b(fed_.size() * 4);
    std::memcpy(b.data(), fed_.data(), b.size());
    return {int64_t(fed_.size()), {b}};
  }
  int32_t next() const {
    for (size_t k = std::min(script_.size() - 1, fed_.size()); k > 0; --k)
      if (std::equal(script_.begin(), script_.begin() + long(k), fed_.end() - long(k))) return script_[k];
    return script_[0];
  }
  std::vector<int32_t> script_;
  int32_t vocab_;
  std::vector<int32_t> fed_;
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
