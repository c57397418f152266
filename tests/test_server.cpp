// The server's pieces without sockets: SSE framing, the stop-string matcher, the reasoning /
// tool-call parser, error bodies, request validation, the Python-compatible JSON of the chat
// template, and a restored state continuing exactly like a full prefill. (The prefix cache's LRU and
// tiers: test_prefix_cache.cpp.)
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>

#include "models/qwen35/chat.h"
#include "models/qwen35/config.h"
#include "models/qwen35/cpu_model.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/io/safetensors.h"
#include "server/api_error.h"
#include "server/chat_output.h"
#include "server/request.h"
#include "server/text_stream.h"

namespace fs = std::filesystem;
using namespace q35::server;
using ojson = nlohmann::ordered_json;

namespace {

// Feeds `text` to `push` in pieces of `n` bytes and concatenates what comes out.
template <typename F>
std::string in_pieces(const std::string& text, size_t n, F push) {
  std::string out;
  for (size_t i = 0; i < text.size(); i += n) out += push(text.substr(i, n));
  return out;
}

ChatDelta parse_all(ChatOutputParser& p, const std::string& text, size_t piece) {
  ChatDelta all;
  for (size_t i = 0; i < text.size(); i += piece) all.append(p.push(text.substr(i, piece)));
  all.append(p.finish());
  return all;
}

std::function<std::string()> ids() {
  return [n = 0]() mutable { return "call_" + std::to_string(n++); };
}

}  // namespace

TEST_CASE("SSE events are one data line and a blank line; [DONE] ends the stream") {
  CHECK(sse_event({{"a", "x\ny"}}) == "data: {\"a\":\"x\\ny\"}\n\n");
  CHECK(sse_done() == "data: [DONE]\n\n");
}

TEST_CASE("Stop strings are found across pieces and never emitted") {
  for (size_t n : {1, 2, 3, 7}) {
    StopMatcher m({"STOP", "xyz"});
    std::string out = in_pieces("hello STxSTOP world", n, [&](const std::string& s) { return m.push(s); });
    CHECK(out == "hello STx");
    CHECK(m.stopped());
    CHECK(m.push("more") == "");
  }
  StopMatcher none({"abc"});
  CHECK(none.push("xxab") == "xx");  // "ab" may start "abc"
  CHECK(none.push("d") == "abd");
  CHECK(none.push("ab") == "");
  CHECK(none.flush() == "ab");
  CHECK_FALSE(none.stopped());
  StopMatcher earliest({"later", "b"});
  CHECK(earliest.push("a later b") == "a ");
}

TEST_CASE("Reasoning ends at </think>; newlines around it are dropped") {
  for (size_t n : {1, 3, 100}) {
    ChatOutputParser p(true, false, {}, ids());
    ChatDelta d = parse_all(p, "I think so.\n</think>\n\nThe answer.", n);
    CHECK(d.reasoning == "I think so.");
    CHECK(d.content == "The answer.");
  }
  ChatOutputParser off(false, false, {}, ids());
  CHECK(parse_all(off, "plain </think> text", 2).content == "plain </think> text");
  ChatOutputParser unfinished(true, false, {}, ids());
  ChatDelta u = parse_all(unfinished, "still thinking\n", 4);
  CHECK(u.reasoning == "still thinking\n");
  CHECK(u.content.empty());
}

TEST_CASE("Tool calls in Qwen3.5's XML form, typed by the schema, also right after the think block") {
  ToolSchemas schemas = {{"get_weather", {{"city", "string"}, {"days", "integer"}, {"metric", "boolean"},
                                          {"ratio", "number"}, {"opts", "object"}, {"tags", "array"}}}};
  const std::string reply =
      "plan\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
      "<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n<parameter=ratio>\n0.5\n"
      "</parameter>\n<parameter=opts>\n{\"a\": [1]}\n</parameter>\n<parameter=tags>\nnot json\n</parameter>\n"
      "</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nline1\nline2\n</parameter>\n"
      "<parameter=extra>\n7\n</parameter>\n</function>\n</tool_call>";
  for (size_t n : {1, 5, 1000}) {
    ChatOutputParser p(true, true, schemas, ids());
    ChatDelta d = parse_all(p, reply, n);
    CHECK(d.reasoning == "plan");
    CHECK(d.content == "");
    REQUIRE(p.tool_calls().size() == 2);
    CHECK(p.tool_calls()[0].arguments.dump() ==
          R"({"city":"New York","days":3,"metric":true,"ratio":0.5,"opts":{"a":[1]},"tags":"not json"})");
    CHECK(p.tool_calls()[1].arguments.dump() == R"({"city":"line1\nline2","extra":"7"})");
    // Streaming deltas: the name (with the id) first, then the arguments, per call index.
    std::vector<std::string> seen;
    for (const auto& t : d.tool_calls) seen.push_back(std::to_string(t.index) + (t.name ? ":" + *t.name : "") + "+" + t.arguments);
    CHECK(seen == std::vector<std::string>{"0:get_weather+", "0+" + p.tool_calls()[0].arguments.dump(),
                                           "1:get_weather+", "1+" + p.tool_calls()[1].arguments.dump()});
  }
  ChatOutputParser with_text(false, true, schemas, ids());
  ChatDelta t = parse_all(with_text, "Let me check.\n\n<tool_call>\n<function=get_weather>\n</function>\n</tool_call>", 3);
  CHECK(t.content == "Let me check.");
  REQUIRE(with_text.tool_calls().size() == 1);
  CHECK(with_text.tool_calls()[0].arguments.dump() == "{}");
  // Not a call: the text stays content. An unclosed call keeps its complete parameters.
  ChatOutputParser fake(false, true, schemas, ids());
  CHECK(parse_all(fake, "a <tool_call> is a tag", 4).content == "a <tool_call> is a tag");
  ChatOutputParser cut(false, true, schemas, ids());
  parse_all(cut, "<tool_call>\n<function=get_weather>\n<parameter=days>\n12\n</parameter>\n<parameter=city>\nPa", 6);
  REQUIRE(cut.tool_calls().size() == 1);
  CHECK(cut.tool_calls()[0].arguments.dump() == R"({"days":12})");
}

TEST_CASE("typed_value follows the JSON schema type and falls back to the string") {
  CHECK(typed_value("42", "integer") == 42);
  CHECK(typed_value("4.5", "integer") == "4.5");
  CHECK(typed_value("-1e3", "number") == -1000.0);
  CHECK(typed_value("FALSE", "boolean") == false);
  CHECK(typed_value("[1,2]", "array") == ojson::array({1, 2}));
  CHECK(typed_value("{\"a\":1}", "array") == "{\"a\":1}");
  CHECK(typed_value(" 7 ", "") == " 7 ");
}

TEST_CASE("Errors: OpenAI JSON bodies naming the field, with the status") {
  ApiError e(404, "invalid_request_error", "no such model", "model", "model_not_found");
  CHECK(e.body().dump() ==
        R"({"error":{"code":"model_not_found","message":"no such model","param":"model","type":"invalid_request_error"}})");
  CHECK(ApiError(500, "server_error", "x").body()["error"]["param"].is_null());
  auto status_of = [](const std::string& body) {
    try {
      parse_body(body);
      return 0;
    } catch (const ApiError& err) {
      return err.status();
    }
  };
  CHECK(status_of("{\"a\": 1}") == 0);
  CHECK(status_of("{\"a\": ") == 400);
  CHECK(status_of("[1]") == 400);
  CHECK(status_of(std::string(100, '[') + std::string(100, ']')) == 400);
  CHECK(status_of("{\"s\": \"\xff\"}") == 400);  // not UTF-8
}

TEST_CASE("Request validation against the tiny fixture's tokenizer") {
  const fs::path dir = fs::path(Q35_SOURCE_DIR) / "tests/fixtures/tiny-qwen35moe";
  q35::Tokenizer tok = q35::Tokenizer::from_file(dir / "tokenizer.json");
  q35::qwen35::GenerationConfig gen = q35::qwen35::GenerationConfig::from_file(dir / "generation_config.json");
  ServeContext ctx{tok, gen, "tiny", 64};
  auto param_of = [&](const std::string& body) -> std::string {
    try {
      parse_chat_request(parse_body(body), ctx);
      return "ok";
    } catch (const ApiError& err) {
      return err.param() + "/" + std::to_string(err.status());
    }
  };
  CHECK(param_of(R"({"messages":[{"role":"user","content":"hi"}]})") == "ok");
  CHECK(param_of(R"({"messages":[{"role":"user","content":"hi"}],"model":"other"})") == "model/404");
  CHECK(param_of(R"({"messages":[{"role":"user","content":"hi"}],"temperature":-1})") == "temperature/400");
  CHECK(param_of(R"({"messages":[{"role":"user","content":"hi"}],"max_tokens":60})") == "max_completion_tokens/400");
  CHECK(param_of(R"({"messages":[{"role":"user","content":")" + std::string(400, 'x') + "\"}]}") == "messages/400");
  CHECK(param_of(R"({"messages":[{"role":"assistant","content":"a","tool_calls":[{"function":{"name":"f","arguments":"[1]"}}]},{"role":"user","content":"q"}]})") ==
        "messages[0].tool_calls[0].function.arguments/400");
  GenerationRequest r = parse_chat_request(
      parse_body(R"({"messages":[{"role":"user","content":"hi"}],"seed":5,"stop":"x","top_k":-1,"temperature":0.5})"), ctx);
  CHECK(r.seeded);
  CHECK(r.sampling.seed == 5);
  CHECK(r.sampling.top_k == 0);
  CHECK(r.stop == std::vector<std::string>{"x"});
  CHECK(r.max_tokens == 64 - int64_t(r.prompt.size()));
  CHECK(r.prompt == tok.encode(r.prompt_text));
}

TEST_CASE("Python json.dumps and str() as the chat template's tojson and |string write them") {
  using q35::qwen35::python_json_dumps;
  CHECK(python_json_dumps(ojson::parse(R"({"b": [1, 2.5, null, true], "a": "é\"\n\u0001"})")) ==
        "{\"b\": [1, 2.5, null, true], \"a\": \"é\\\"\\n\\u0001\"}");
  for (auto [v, s] : std::vector<std::pair<double, std::string>>{
           {1.0, "1.0"}, {1e-05, "1e-05"}, {0.0001, "0.0001"}, {1e16, "1e+16"}, {1e15, "1000000000000000.0"},
           {123.456, "123.456"}, {-2.5e-7, "-2.5e-07"}, {0.1 + 0.2, "0.30000000000000004"}})
    CHECK(python_json_dumps(ojson(v)) == s);
  CHECK(q35::qwen35::python_str(ojson(true)) == "True");
  CHECK(q35::qwen35::python_str(ojson(nullptr)) == "None");
  CHECK(q35::qwen35::python_str(ojson("s")) == "s");
}

TEST_CASE("A state copied at a prefix and continued gives the logits of a full prefill") {
  using namespace q35::qwen35;
  const fs::path dir = fs::path(Q35_SOURCE_DIR) / "tests/fixtures/tiny-qwen35moe";
  Config config = Config::from_file(dir / "config.json");
  q35::Checkpoint ckpt(dir);
  CpuModel model(config, load_host_weights(config, ckpt));
  std::vector<int32_t> tokens;
  for (int i = 0; i < 150; ++i) tokens.push_back((i * 37 + 11) % 1400);
  CpuState full = model.new_state(256);
  std::vector<float> want = model.forward(full, tokens, true);
  for (size_t prefix : {64, 100, 149}) {
    CpuState s = model.new_state(256);
    model.forward(s, std::span<const int32_t>(tokens).first(prefix), false);
    CpuState saved = s;  // what the prefix cache keeps
    model.forward(s, std::vector<int32_t>{1, 2, 3}, false);  // the slot moves on to another request
    s = saved;
    std::vector<float> got = model.forward(s, std::span<const int32_t>(tokens).subspan(prefix), true);
    const size_t V = size_t(config.vocab_size);
    double max_err = 0, max_ref = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      max_err = std::max(max_err, double(std::fabs(got[i] - want[prefix * V + i])));
      max_ref = std::max(max_ref, double(std::fabs(want[prefix * V + i])));
    }
    CHECK(max_err <= 1e-5 * max_ref);
  }
}
