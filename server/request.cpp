#include "server/request.h"

#include <cmath>

#include "models/qwen35/chat.h"
#include "runtime/core/error.h"
#include "server/api_error.h"

namespace q35::server {
namespace {

using ojson = nlohmann::ordered_json;

std::string type_name(const ojson& v) {
  switch (v.type()) {
    case ojson::value_t::null: return "null";
    case ojson::value_t::boolean: return "a boolean";
    case ojson::value_t::string: return "a string";
    case ojson::value_t::array: return "an array";
    case ojson::value_t::object: return "an object";
    default: return "a number";
  }
}

// Typed getters: absent or null -> nullopt; the wrong type -> 400 naming the field.
std::optional<bool> get_bool(const ojson& o, const char* key, const std::string& prefix = "") {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) bad_request(prefix + key, "'{}{}' must be a boolean, found {}", prefix, key, type_name(*it));
  return it->get<bool>();
}

std::optional<double> get_number(const ojson& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) bad_request(key, "'{}' must be a number, found {}", key, type_name(*it));
  return it->get<double>();
}

std::optional<int64_t> get_int(const ojson& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return std::nullopt;
  if (it->is_number_integer() || it->is_number_unsigned()) {
    if (it->is_number_unsigned() && it->get<uint64_t>() > uint64_t(INT64_MAX))
      bad_request(key, "'{}' is out of range", key);
    return it->get<int64_t>();
  }
  if (it->is_number_float()) {
    double d = it->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return int64_t(d);
  }
  bad_request(key, "'{}' must be an integer, found {}", key, type_name(*it));
}

std::optional<std::string> get_string(const ojson& o, const char* key, const std::string& prefix = "") {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) bad_request(prefix + key, "'{}{}' must be a string, found {}", prefix, key, type_name(*it));
  return it->get<std::string>();
}

void check_model(const ojson& body, const ServeContext& ctx) {
  if (auto m = get_string(body, "model"); m && *m != ctx.served_name)
    throw ApiError(404, "invalid_request_error",
                   fmt::format("The model '{}' does not exist; this server serves '{}'", *m, ctx.served_name), "model",
                   "model_not_found");
}

// Sampling, stop, max_tokens, n, logprobs: the fields chat and completions share.
void parse_common(const ojson& body, const ServeContext& ctx, GenerationRequest& r) {
  check_model(body, ctx);
  if (auto n = get_int(body, "n"); n && *n != 1)
    bad_request("n", "'n' must be 1: this server returns one choice per request (found {})", *n);
  if (auto b = get_int(body, "best_of"); b && *b != 1) bad_request("best_of", "'best_of' must be 1 (found {})", *b);
  for (const char* k : {"presence_penalty", "frequency_penalty"})
    if (auto v = get_number(body, k); v && *v != 0.0) bad_request(k, "'{}' is not supported (only 0)", k);
  if (auto v = get_number(body, "repetition_penalty"); v && *v != 1.0)
    bad_request("repetition_penalty", "'repetition_penalty' is not supported (only 1)");

  const auto& gen = ctx.generation;
  r.sampling.temperature = float(gen.do_sample ? gen.temperature : 0.0);
  r.sampling.top_k = int(gen.top_k);
  r.sampling.top_p = float(gen.top_p);
  if (auto t = get_number(body, "temperature")) {
    if (!(*t >= 0.0 && *t <= 2.0))
      bad_request("temperature", "'temperature' must be between 0 and 2, found {}", *t);
    r.sampling.temperature = float(*t);
  }
  if (auto p = get_number(body, "top_p")) {
    if (!(*p > 0.0 && *p <= 1.0)) bad_request("top_p", "'top_p' must be in (0, 1], found {}", *p);
    r.sampling.top_p = float(*p);
  }
  if (auto k = get_int(body, "top_k")) {
    if (*k < -1 || *k > (int64_t(1) << 30)) bad_request("top_k", "'top_k' must be -1 (off) or >= 0, found {}", *k);
    r.sampling.top_k = *k < 0 ? 0 : int(*k);
  }
  if (auto s = get_int(body, "seed")) {
    r.sampling.seed = uint64_t(*s);
    r.seeded = true;
  }
  if (auto it = body.find("stop"); it != body.end() && !it->is_null()) {
    if (it->is_string()) {
      r.stop.push_back(it->get<std::string>());
    } else if (it->is_array()) {
      if (it->size() > 16) bad_request("stop", "'stop' may hold at most 16 strings, found {}", it->size());
      for (size_t i = 0; i < it->size(); ++i) {
        if (!(*it)[i].is_string())
          bad_request("stop", "'stop[{}]' must be a string, found {}", i, type_name((*it)[i]));
        r.stop.push_back((*it)[i].get<std::string>());
      }
    } else {
      bad_request("stop", "'stop' must be a string or an array of strings, found {}", type_name(*it));
    }
    for (const auto& s : r.stop)
      if (s.empty()) bad_request("stop", "'stop' strings must not be empty");
  }
  r.ignore_eos = get_bool(body, "ignore_eos").value_or(false);
  r.stream = get_bool(body, "stream").value_or(false);
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) bad_request("stream_options", "'stream_options' must be an object, found {}", type_name(*it));
    if (!r.stream) bad_request("stream_options", "'stream_options' is only allowed with 'stream': true");
    r.include_usage = get_bool(*it, "include_usage", "stream_options.").value_or(false);
  }
}

// Tokens, the context check and max_tokens once the prompt is known.
void finish_prompt(const ojson& body, const ServeContext& ctx, GenerationRequest& r, const char* max_key) {
  const int64_t n = int64_t(r.prompt.size());
  if (n == 0) bad_request(r.chat ? "messages" : "prompt", "the prompt is empty");
  if (n >= ctx.max_context)
    throw ApiError(400, "invalid_request_error",
                   fmt::format("This model's maximum context length is {} tokens; the prompt has {} tokens",
                               ctx.max_context, n),
                   r.chat ? "messages" : "prompt", "context_length_exceeded");
  std::optional<int64_t> max = get_int(body, max_key);
  if (!max && std::string(max_key) == "max_completion_tokens") max = get_int(body, "max_tokens");
  if (max) {
    if (*max < 1) bad_request(max_key, "'{}' must be at least 1, found {}", max_key, *max);
    if (n + *max > ctx.max_context)
      throw ApiError(400, "invalid_request_error",
                     fmt::format("This model's maximum context length is {} tokens; the prompt ({} tokens) plus "
                                 "'{}' ({}) exceed it",
                                 ctx.max_context, n, max_key, *max),
                     max_key, "context_length_exceeded");
    r.max_tokens = *max;
  } else {
    r.max_tokens = ctx.max_context - n;
  }
}

// A message content: a string, null (nullopt) or an array of {"type": "text", "text": ...} parts.
std::optional<std::string> content_text(const ojson& m, const std::string& where) {
  auto it = m.find("content");
  if (it == m.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (!it->is_array()) bad_request(where + ".content", "'{}.content' must be a string or an array of parts, found {}",
                                   where, type_name(*it));
  std::string text;
  for (size_t i = 0; i < it->size(); ++i) {
    const ojson& part = (*it)[i];
    const std::string p = fmt::format("{}.content[{}]", where, i);
    if (!part.is_object()) bad_request(p, "'{}' must be an object, found {}", p, type_name(part));
    auto type = get_string(part, "type", p + ".");
    if (type != "text")
      bad_request(p + ".type", "'{}.type' is '{}': only text parts are supported", p, type.value_or("(missing)"));
    auto t = get_string(part, "text", p + ".");
    if (!t) bad_request(p + ".text", "'{}.text' is required", p);
    text += *t;
  }
  return text;
}

qwen35::ChatMessage parse_message(const ojson& m, size_t i) {
  const std::string where = fmt::format("messages[{}]", i);
  if (!m.is_object()) bad_request(where, "'{}' must be an object, found {}", where, type_name(m));
  auto role = get_string(m, "role", where + ".");
  if (!role) bad_request(where + ".role", "'{}.role' is required", where);
  if (*role != "system" && *role != "user" && *role != "assistant" && *role != "tool")
    bad_request(where + ".role", "'{}.role' is '{}': expected system, user, assistant or tool", where, *role);
  qwen35::ChatMessage msg;
  msg.role = *role;
  std::optional<std::string> content = content_text(m, where);
  if (!content && *role != "assistant") bad_request(where + ".content", "'{}.content' is required", where);
  msg.content = content.value_or("");
  get_string(m, "name", where + ".");
  if (*role == "tool") {
    get_string(m, "tool_call_id", where + ".");
  } else if (*role == "assistant") {
    msg.reasoning_content = get_string(m, "reasoning_content", where + ".");
    if (auto tc = m.find("tool_calls"); tc != m.end() && !tc->is_null()) {
      if (!tc->is_array()) bad_request(where + ".tool_calls", "'{}.tool_calls' must be an array", where);
      for (size_t k = 0; k < tc->size(); ++k) {
        const std::string p = fmt::format("{}.tool_calls[{}]", where, k);
        const ojson& call = (*tc)[k];
        if (!call.is_object()) bad_request(p, "'{}' must be an object, found {}", p, type_name(call));
        auto fn = call.find("function");
        if (fn == call.end() || !fn->is_object()) bad_request(p + ".function", "'{}.function' must be an object", p);
        auto name = get_string(*fn, "name", p + ".function.");
        if (!name || name->empty()) bad_request(p + ".function.name", "'{}.function.name' is required", p);
        qwen35::ToolCall out{*name, ojson::object()};
        if (auto a = fn->find("arguments"); a != fn->end() && !a->is_null()) {
          if (a->is_string()) {
            const std::string& text = a->get_ref<const std::string&>();
            if (!text.empty()) {
              ojson parsed = ojson::parse(text, nullptr, false);
              if (parsed.is_discarded() || !parsed.is_object())
                bad_request(p + ".function.arguments", "'{}.function.arguments' must be a JSON object in a string", p);
              out.arguments = std::move(parsed);
            }
          } else if (a->is_object()) {
            out.arguments = *a;
          } else {
            bad_request(p + ".function.arguments", "'{}.function.arguments' must be a string, found {}", p,
                        type_name(*a));
          }
        }
        msg.tool_calls.push_back(std::move(out));
      }
    }
  }
  return msg;
}

std::string json_type_of(const ojson& schema) {
  if (!schema.is_object()) return "";
  auto t = schema.find("type");
  if (t == schema.end()) return "";
  if (t->is_string()) return t->get<std::string>();
  if (t->is_array())
    for (const auto& x : *t)
      if (x.is_string() && x.get<std::string>() != "null") return x.get<std::string>();
  return "";
}

// Validates `tools`; returns them as given and their parameter types.
std::vector<ojson> parse_tools(const ojson& body, ToolSchemas& schemas) {
  std::vector<ojson> tools;
  auto it = body.find("tools");
  if (it == body.end() || it->is_null()) return tools;
  if (!it->is_array()) bad_request("tools", "'tools' must be an array, found {}", type_name(*it));
  for (size_t i = 0; i < it->size(); ++i) {
    const std::string p = fmt::format("tools[{}]", i);
    const ojson& t = (*it)[i];
    if (!t.is_object()) bad_request(p, "'{}' must be an object, found {}", p, type_name(t));
    if (get_string(t, "type", p + ".") != "function") bad_request(p + ".type", "'{}.type' must be \"function\"", p);
    auto fn = t.find("function");
    if (fn == t.end() || !fn->is_object()) bad_request(p + ".function", "'{}.function' must be an object", p);
    auto name = get_string(*fn, "name", p + ".function.");
    if (!name || name->empty()) bad_request(p + ".function.name", "'{}.function.name' is required", p);
    auto& types = schemas[*name];
    if (auto params = fn->find("parameters"); params != fn->end() && !params->is_null()) {
      if (!params->is_object())
        bad_request(p + ".function.parameters", "'{}.function.parameters' must be a JSON schema object", p);
      if (auto props = params->find("properties"); props != params->end() && props->is_object())
        for (const auto& [k, v] : props->items()) types[k] = json_type_of(v);
    }
    tools.push_back(t);
  }
  return tools;
}

int64_t last_im_start(const std::vector<int32_t>& ids, const Tokenizer& tok) {
  std::optional<int32_t> im = tok.token_id("<|im_start|>");
  if (!im) return -1;
  for (size_t i = ids.size(); i-- > 0;)
    if (ids[i] == *im) return int64_t(i);
  return -1;
}

}  // namespace

nlohmann::ordered_json parse_body(const std::string& body) {
  // Bound the nesting first: the JSON library parses and prints nested values recursively.
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > 64) bad_request("", "the request body nests deeper than 64 levels");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  ojson v = ojson::parse(body, nullptr, false);
  if (v.is_discarded())
    throw ApiError(400, "invalid_request_error", "The request body is not valid JSON", "", "invalid_json");
  if (!v.is_object()) bad_request("", "the request body must be a JSON object, found {}", type_name(v));
  return v;
}

GenerationRequest parse_chat_request(const ojson& body, const ServeContext& ctx) {
  GenerationRequest r;
  r.chat = true;
  parse_common(body, ctx, r);
  auto msgs = body.find("messages");
  if (msgs == body.end()) bad_request("messages", "'messages' is required");
  if (!msgs->is_array() || msgs->empty()) bad_request("messages", "'messages' must be a non-empty array");
  std::vector<qwen35::ChatMessage> messages;
  for (size_t i = 0; i < msgs->size(); ++i) messages.push_back(parse_message((*msgs)[i], i));

  if (auto rf = body.find("response_format"); rf != body.end() && !rf->is_null()) {
    if (!rf->is_object()) bad_request("response_format", "'response_format' must be an object");
    auto type = get_string(*rf, "type", "response_format.");
    if (type && *type != "text")
      bad_request("response_format", "response_format type '{}' is not supported (only \"text\"): this server "
                  "has no constrained JSON decoding", *type);
  }
  if (auto kw = body.find("chat_template_kwargs"); kw != body.end() && !kw->is_null()) {
    if (!kw->is_object()) bad_request("chat_template_kwargs", "'chat_template_kwargs' must be an object");
    if (auto t = get_bool(*kw, "enable_thinking", "chat_template_kwargs.")) r.thinking = *t;
  }
  if (auto t = get_bool(body, "enable_thinking")) r.thinking = *t;
  r.logprobs = get_bool(body, "logprobs").value_or(false);
  if (auto k = get_int(body, "top_logprobs")) {
    if (*k < 0 || *k > 20) bad_request("top_logprobs", "'top_logprobs' must be between 0 and 20, found {}", *k);
    if (!r.logprobs) bad_request("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    r.top_logprobs = int(*k);
  }

  std::vector<ojson> tools = parse_tools(body, r.schemas);
  std::string choice = tools.empty() ? "none" : "auto";
  std::string named;
  if (auto tc = body.find("tool_choice"); tc != body.end() && !tc->is_null()) {
    if (tc->is_string()) {
      choice = tc->get<std::string>();
      if (choice != "none" && choice != "auto" && choice != "required")
        bad_request("tool_choice", "'tool_choice' must be none, auto, required or a function, found '{}'", choice);
    } else if (tc->is_object()) {
      auto fn = tc->find("function");
      auto name = fn != tc->end() && fn->is_object() ? get_string(*fn, "name", "tool_choice.function.") : std::nullopt;
      if (!name) bad_request("tool_choice", "'tool_choice' as an object must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}");
      choice = "function";
      named = *name;
    } else {
      bad_request("tool_choice", "'tool_choice' must be a string or an object, found {}", type_name(*tc));
    }
    if (choice != "none" && tools.empty()) bad_request("tool_choice", "'tool_choice' is '{}' but no tools are given", choice);
    if (choice == "function" && !r.schemas.count(named))
      bad_request("tool_choice", "'tool_choice' names '{}', which is not among the tools", named);
  }
  // tool_choice none: the tools are not shown to the model and nothing is parsed as a call.
  if (choice == "none") tools.clear();
  r.parse_tools = !tools.empty();

  try {
    r.prompt_text = qwen35::render_chat(messages, true, r.thinking, tools);
  } catch (const Error& e) {
    bad_request("messages", "{}", e.what());
  }
  if (choice == "function" || choice == "required") {
    // The reply is forced to start a call (after an empty think block when thinking is on).
    r.forced_prefix = r.thinking ? "\n</think>\n\n" : "";
    r.forced_prefix += "<tool_call>\n<function=";
    if (choice == "function") r.forced_prefix += named + ">\n";
    else
      for (const auto& [name, types] : r.schemas) r.name_choices.push_back(name + ">\n");
  }
  r.prompt = ctx.tokenizer.encode(r.prompt_text + r.forced_prefix);
  r.turn_start = last_im_start(r.prompt, ctx.tokenizer);
  finish_prompt(body, ctx, r, "max_completion_tokens");
  return r;
}

GenerationRequest parse_completion_request(const ojson& body, const ServeContext& ctx) {
  GenerationRequest r;
  r.chat = false;
  r.thinking = false;
  parse_common(body, ctx, r);
  if (get_bool(body, "echo").value_or(false)) bad_request("echo", "'echo' is not supported");
  if (auto s = get_string(body, "suffix"); s && !s->empty()) bad_request("suffix", "'suffix' is not supported");
  auto p = body.find("prompt");
  if (p == body.end() || p->is_null()) bad_request("prompt", "'prompt' is required");
  const ojson* one = &*p;
  if (p->is_array() && !p->empty() && !(*p)[0].is_number()) {
    if (p->size() != 1) bad_request("prompt", "'prompt' must be one prompt (a string or token ids), found {}", p->size());
    one = &(*p)[0];
  }
  if (one->is_string()) {
    r.prompt_text = one->get<std::string>();
    try {
      r.prompt = ctx.tokenizer.encode(r.prompt_text);
    } catch (const Error& e) {
      bad_request("prompt", "{}", e.what());
    }
  } else if (one->is_array()) {
    for (size_t i = 0; i < one->size(); ++i) {
      const ojson& t = (*one)[i];
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= ctx.tokenizer.num_ids())
        bad_request("prompt", "'prompt[{}]' must be a token id in [0, {})", i, ctx.tokenizer.num_ids());
      r.prompt.push_back(int32_t(t.get<int64_t>()));
    }
  } else {
    bad_request("prompt", "'prompt' must be a string or an array of token ids, found {}", type_name(*one));
  }
  if (auto lp = get_int(body, "logprobs")) {
    if (*lp < 0 || *lp > 5) bad_request("logprobs", "'logprobs' must be between 0 and 5, found {}", *lp);
    r.logprobs = true;
    r.top_logprobs = int(*lp);
  }
  finish_prompt(body, ctx, r, "max_tokens");
  if (!get_int(body, "max_tokens")) r.max_tokens = std::min<int64_t>(16, r.max_tokens);  // OpenAI's default
  return r;
}

}  // namespace q35::server
