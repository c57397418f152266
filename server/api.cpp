#include "server/api.h"

#include <fmt/format.h>

#include <chrono>
#include <ctime>
#include <random>

#include "server/text_stream.h"

namespace q35::server {
namespace {

using json = nlohmann::json;

int64_t unix_now() { return int64_t(std::time(nullptr)); }

json logprob_json(const TokenLogprob& t, bool with_top) {
  json j = {{"token", t.token}, {"logprob", t.logprob}, {"bytes", t.bytes}};
  if (with_top) {
    json top = json::array();
    for (const auto& a : t.top) top.push_back(logprob_json(a, false));
    j["top_logprobs"] = top;
  }
  return j;
}

// The legacy completions logprobs object for a run of tokens.
json legacy_logprobs(const std::vector<TokenLogprob>& lps, size_t text_offset) {
  json tokens = json::array(), token_lps = json::array(), tops = json::array(), offsets = json::array();
  for (const auto& t : lps) {
    tokens.push_back(t.token);
    token_lps.push_back(t.logprob);
    json top = json::object();
    for (const auto& a : t.top) top[a.token] = a.logprob;
    tops.push_back(top);
    offsets.push_back(text_offset);
    text_offset += t.token.size();
  }
  return {{"tokens", tokens}, {"token_logprobs", token_lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

json usage_json(const JobEvent& done) {
  return {{"prompt_tokens", done.prompt_tokens},
          {"completion_tokens", done.completion_tokens},
          {"total_tokens", done.prompt_tokens + done.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", done.cached_tokens}}}};
}

json tool_call_json(const ParsedToolCall& c) {
  return {{"id", c.id}, {"type", "function"}, {"function", {{"name", c.name}, {"arguments", c.arguments.dump()}}}};
}

}  // namespace

Api::Api(ServeContext ctx, Scheduler& scheduler, Metrics& metrics, std::string api_key,
         std::function<void(const std::string&)> log)
    : ctx_(std::move(ctx)), scheduler_(scheduler), metrics_(metrics), api_key_(std::move(api_key)), log_(std::move(log)),
      nonce_(std::random_device{}()), created_(unix_now()) {}

std::string Api::next_id(const char* prefix) {
  return fmt::format("{}-{:08x}{:08x}", prefix, uint32_t(nonce_), uint32_t(++counter_));
}

void Api::handle(const HttpRequest& req, ResponseWriter& out) {
  int status = 200;
  // Metrics label: the known paths, everything else as "other" (bounded label values).
  static constexpr std::string_view kPaths[] = {"/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                                "/v1/completions", "/tokenize"};
  std::string endpoint = "other";
  for (std::string_view p : kPaths)
    if (req.path == p) endpoint = std::string(p);
  try {
    const bool is_v1 = req.path.starts_with("/v1/") || req.path == "/tokenize";
    if (is_v1 && !api_key_.empty() && req.authorization != "Bearer " + api_key_)
      throw ApiError(401, "invalid_request_error",
                     req.authorization.empty() ? "Missing API key: send 'Authorization: Bearer <key>'"
                                               : "Incorrect API key provided",
                     "", "invalid_api_key");
    auto need = [&](const char* method) {
      if (req.method != method)
        throw ApiError(405, "invalid_request_error",
                       fmt::format("{} {} is not allowed; use {}", req.method, req.path, method), "", "method_not_allowed");
    };
    if (req.path == "/health") {
      need("GET");
      out.send(200, "application/json", R"({"status":"ok"})");
    } else if (req.path == "/metrics") {
      need("GET");
      out.send(200, "text/plain; version=0.0.4",
               metrics_.render(scheduler_.queue_length(), scheduler_.running()));
    } else if (req.path == "/v1/models") {
      need("GET");
      json models = {{"object", "list"},
                     {"data", json::array({{{"id", ctx_.served_name},
                                            {"object", "model"},
                                            {"created", created_},
                                            {"owned_by", "q35jit"},
                                            {"max_model_len", ctx_.max_context}}})}};
      out.send(200, "application/json", models.dump());
    } else if (req.path == "/v1/chat/completions" || req.path == "/v1/completions") {
      need("POST");
      generate(req, req.path == "/v1/chat/completions", out, status);
    } else if (req.path == "/tokenize") {
      need("POST");
      nlohmann::ordered_json body = parse_body(req.body);
      GenerationRequest r = body.contains("messages") ? parse_chat_request(body, ctx_)
                                                      : parse_completion_request(body, ctx_);
      json j = {{"count", r.prompt.size()}, {"tokens", r.prompt}, {"prompt", r.prompt_text},
                {"max_model_len", ctx_.max_context}};
      out.send(200, "application/json", j.dump(-1, ' ', false, json::error_handler_t::replace));
    } else {
      throw ApiError(404, "invalid_request_error", fmt::format("Unknown path {}", req.path), "", "not_found");
    }
  } catch (const ApiError& e) {
    status = e.status();
    log_(fmt::format("{} {} -> {} {}", req.method, req.path, status, e.what()));
    out.send(status, "application/json", e.body().dump(-1, ' ', false, json::error_handler_t::replace));
  } catch (const std::exception& e) {
    status = 500;
    log_(fmt::format("{} {} -> 500 {}", req.method, req.path, e.what()));
    out.send(500, "application/json",
             ApiError(500, "server_error", e.what()).body().dump(-1, ' ', false, json::error_handler_t::replace));
  }
  metrics_.request(endpoint, status);
}

void Api::generate(const HttpRequest& req, bool chat, ResponseWriter& out, int& status) {
  nlohmann::ordered_json body = parse_body(req.body);
  GenerationRequest r = chat ? parse_chat_request(body, ctx_) : parse_completion_request(body, ctx_);
  const bool stream = r.stream, include_usage = r.include_usage, logprobs = r.logprobs, thinking = r.thinking;
  auto job = std::make_shared<Job>(next_id(chat ? "chatcmpl" : "cmpl"), std::move(r));
  scheduler_.submit(job);

  const int64_t created = unix_now();
  const char* object = chat ? (stream ? "chat.completion.chunk" : "chat.completion")
                            : "text_completion";
  auto envelope = [&](json choices) {
    json j = {{"id", job->id()}, {"object", object}, {"created", created}, {"model", ctx_.served_name},
              {"choices", std::move(choices)}};
    if (stream && include_usage) j["usage"] = nullptr;
    return j;
  };
  auto dump = [](const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); };

  // Non-streaming accumulators.
  std::string reasoning, content;
  std::vector<TokenLogprob> all_lps;
  bool streaming_started = false;
  size_t text_offset = 0;
  while (true) {
    JobEvent e;
    if (!job->pop(e, std::chrono::milliseconds(50))) {
      if (out.client_gone()) {
        job->cancel();
        status = 499;  // client closed the request (nginx's code), for the metrics
        log_(fmt::format("{} client disconnected: generation cancelled", job->id()));
        return;
      }
      continue;
    }
    if (e.kind == JobEvent::Kind::Failed) {
      if (streaming_started) {  // the status is sent: the error goes into the stream
        status = e.error->status();
        out.write(sse_event(e.error->body()));
        out.write(sse_done());
        out.end_stream();
        return;
      }
      throw *e.error;
    }
    if (e.kind == JobEvent::Kind::Delta) {
      if (!stream) {
        reasoning += e.delta.reasoning;
        content += e.delta.content;
        for (auto& t : e.logprobs) all_lps.push_back(std::move(t));
        continue;
      }
      if (!streaming_started) {
        if (!out.start_stream("text/event-stream")) {
          job->cancel();
          return;
        }
        streaming_started = true;
        if (chat) {
          json first = envelope(json::array({{{"index", 0},
                                              {"delta", {{"role", "assistant"}, {"content", ""}}},
                                              {"logprobs", nullptr},
                                              {"finish_reason", nullptr}}}));
          out.write(sse_event(first));
        }
      }
      json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
      if (chat) {
        json delta = json::object();
        if (!e.delta.reasoning.empty()) delta["reasoning_content"] = e.delta.reasoning;
        if (!e.delta.content.empty()) delta["content"] = e.delta.content;
        if (!e.delta.tool_calls.empty()) {
          json calls = json::array();
          for (const auto& t : e.delta.tool_calls) {
            json c = {{"index", t.index}};
            if (t.name) {
              c["id"] = t.id;
              c["type"] = "function";
              c["function"] = {{"name", *t.name}, {"arguments", t.arguments}};
            } else {
              c["function"] = {{"arguments", t.arguments}};
            }
            calls.push_back(c);
          }
          delta["tool_calls"] = calls;
        }
        choice["delta"] = delta;
        if (logprobs && !e.logprobs.empty()) {
          json lp = json::array();
          for (const auto& t : e.logprobs) lp.push_back(logprob_json(t, true));
          choice["logprobs"] = {{"content", lp}};
        }
      } else {
        choice["text"] = e.delta.content;
        if (logprobs && !e.logprobs.empty()) choice["logprobs"] = legacy_logprobs(e.logprobs, text_offset);
        text_offset += e.delta.content.size();
      }
      if (!out.write(sse_event(envelope(json::array({choice}))))) {
        job->cancel();
        status = 499;
        log_(fmt::format("{} client disconnected: generation cancelled", job->id()));
        return;
      }
      continue;
    }
    // Done.
    if (stream) {
      if (!streaming_started) {
        if (!out.start_stream("text/event-stream")) return;
        if (chat)
          out.write(sse_event(envelope(json::array({{{"index", 0},
                                                     {"delta", {{"role", "assistant"}, {"content", ""}}},
                                                     {"logprobs", nullptr},
                                                     {"finish_reason", nullptr}}}))));
      }
      json last = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", e.finish_reason}};
      if (chat) last["delta"] = json::object();
      else last["text"] = "";
      out.write(sse_event(envelope(json::array({last}))));
      if (include_usage) {
        json u = envelope(json::array());
        u["usage"] = usage_json(e);
        out.write(sse_event(u));
      }
      out.write(sse_done());
      out.end_stream();
      return;
    }
    json choice = {{"index", 0}, {"finish_reason", e.finish_reason}, {"logprobs", nullptr}};
    if (chat) {
      json message = {{"role", "assistant"},
                      {"content", content.empty() && !e.tool_calls.empty() ? json(nullptr) : json(content)},
                      {"reasoning_content", thinking ? json(reasoning) : json(nullptr)}};
      if (!e.tool_calls.empty()) {
        json calls = json::array();
        for (const auto& c : e.tool_calls) calls.push_back(tool_call_json(c));
        message["tool_calls"] = calls;
      }
      choice["message"] = message;
      if (logprobs) {
        json lp = json::array();
        for (const auto& t : all_lps) lp.push_back(logprob_json(t, true));
        choice["logprobs"] = {{"content", lp}};
      }
    } else {
      choice["text"] = content;
      if (logprobs) choice["logprobs"] = legacy_logprobs(all_lps, 0);
    }
    json resp = envelope(json::array({choice}));
    resp["usage"] = usage_json(e);
    out.send(200, "application/json", dump(resp));
    return;
  }
}

}  // namespace q35::server
