#include "server/chat_output.h"

#include <algorithm>
#include <charconv>

namespace q35::server {
namespace {

constexpr std::string_view kThinkEnd = "</think>";
constexpr std::string_view kCallOpen = "<tool_call>";
constexpr std::string_view kCallClose = "</tool_call>";
constexpr std::string_view kFunction = "<function=";

// Length of the longest tail of `s` that is a proper prefix of `tag`.
size_t partial_tail(std::string_view s, std::string_view tag) {
  for (size_t n = std::min(s.size(), tag.size() - 1); n > 0; --n)
    if (s.substr(s.size() - n) == tag.substr(0, n)) return n;
  return 0;
}

size_t trailing_space(std::string_view s) {
  size_t n = 0;
  while (n < s.size() && (s[s.size() - 1 - n] == '\n' || s[s.size() - 1 - n] == ' ' || s[s.size() - 1 - n] == '\t' ||
                          s[s.size() - 1 - n] == '\r'))
    ++n;
  return n;
}

// What must wait for more text: a tail that may start `tag`, with the whitespace before it (dropped
// if the tag follows).
size_t held_back(std::string_view s, std::string_view tag) {
  const size_t p = partial_tail(s, tag);
  return p + trailing_space(s.substr(0, s.size() - p));
}

std::string strip(std::string_view s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string_view::npos) return {};
  return std::string(s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1));
}

}  // namespace

void ChatDelta::append(ChatDelta&& o) {
  reasoning += o.reasoning;
  content += o.content;
  for (auto& t : o.tool_calls) tool_calls.push_back(std::move(t));
}

nlohmann::ordered_json typed_value(const std::string& text, const std::string& type) {
  const std::string t = strip(text);
  if (type == "integer") {
    int64_t v = 0;
    auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
    if (ec == std::errc() && p == t.data() + t.size() && !t.empty()) return v;
  } else if (type == "number") {
    int64_t i = 0;
    auto [pi, eci] = std::from_chars(t.data(), t.data() + t.size(), i);
    if (eci == std::errc() && pi == t.data() + t.size() && !t.empty()) return i;
    double d = 0;
    auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), d);
    if (ec == std::errc() && p == t.data() + t.size() && !t.empty()) return d;
  } else if (type == "boolean") {
    std::string lower = t;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    if (lower == "true") return true;
    if (lower == "false") return false;
  } else if (type == "null") {
    if (t == "null" || t == "None") return nullptr;
  } else if (type == "object" || type == "array") {
    auto v = nlohmann::ordered_json::parse(t, nullptr, false);
    if (!v.is_discarded() && (type == "object" ? v.is_object() : v.is_array())) return v;
  }
  return text;
}

ChatOutputParser::ChatOutputParser(bool in_reasoning, bool parse_tools, ToolSchemas schemas,
                                   std::function<std::string()> make_id)
    : mode_(in_reasoning ? Mode::Reasoning : Mode::Content), parse_tools_(parse_tools), schemas_(std::move(schemas)),
      make_id_(std::move(make_id)) {}

ChatDelta ChatOutputParser::push(std::string_view text) {
  buf_ += text;
  ChatDelta out;
  step(out, false);
  return out;
}

ChatDelta ChatOutputParser::finish() {
  ChatDelta out;
  step(out, true);
  return out;
}

void ChatOutputParser::step(ChatDelta& out, bool final) {
  while (true) {
    if (mode_ == Mode::Reasoning) {
      if (size_t at = buf_.find(kThinkEnd); at != std::string::npos) {
        std::string_view r = std::string_view(buf_).substr(0, at);
        out.reasoning += r.substr(0, r.size() - trailing_space(r));
        buf_.erase(0, at + kThinkEnd.size());
        mode_ = Mode::Content;
        skip_newlines_ = true;
        continue;
      }
      size_t hold = final ? 0 : held_back(buf_, kThinkEnd);
      out.reasoning += buf_.substr(0, buf_.size() - hold);
      buf_.erase(0, buf_.size() - hold);
      return;
    }
    if (mode_ == Mode::Content) {
      if (skip_newlines_) {
        size_t b = buf_.find_first_not_of('\n');
        if (b == std::string::npos) {
          buf_.clear();
          return;
        }
        buf_.erase(0, b);
        skip_newlines_ = false;
      }
      if (parse_tools_) {
        if (size_t at = buf_.find(kCallOpen); at != std::string::npos) {
          std::string_view c = std::string_view(buf_).substr(0, at);
          const size_t ws = trailing_space(c);
          out.content += c.substr(0, c.size() - ws);
          space_before_call_ = std::string(c.substr(c.size() - ws));
          buf_.erase(0, at + kCallOpen.size());
          mode_ = Mode::ToolCall;
          name_sent_ = false;
          continue;
        }
      }
      size_t hold = final || !parse_tools_ ? 0 : held_back(buf_, kCallOpen);
      out.content += buf_.substr(0, buf_.size() - hold);
      buf_.erase(0, buf_.size() - hold);
      return;
    }
    // Mode::ToolCall: buf_ holds the text after <tool_call>.
    if (!name_sent_) {
      size_t f = buf_.find(kFunction);
      size_t gt = f == std::string::npos ? std::string::npos : buf_.find('>', f);
      if (gt != std::string::npos && strip(std::string_view(buf_).substr(0, f)).empty()) {
        ParsedToolCall call;
        call.id = make_id_();
        call.name = strip(std::string_view(buf_).substr(f + kFunction.size(), gt - f - kFunction.size()));
        calls_.push_back(call);
        out.tool_calls.push_back({int(calls_.size() - 1), call.name, call.id, ""});
        name_sent_ = true;
      } else if (final || (f == std::string::npos && buf_.size() > kFunction.size() + 8) ||
                 (f != std::string::npos && !strip(std::string_view(buf_).substr(0, f)).empty())) {
        // Not a call after all: the text is content.
        out.content += space_before_call_ + std::string(kCallOpen) + buf_;
        buf_.clear();
        mode_ = Mode::Content;
        if (final) return;
        continue;
      } else {
        return;
      }
    }
    size_t close = buf_.find(kCallClose);
    if (close == std::string::npos && !final) return;
    std::string block = buf_.substr(0, close == std::string::npos ? buf_.size() : close);
    buf_.erase(0, close == std::string::npos ? buf_.size() : close + kCallClose.size());
    close_call(out, block);
    mode_ = Mode::Content;
    skip_newlines_ = true;
    if (final && buf_.empty()) return;
  }
}

void ChatOutputParser::close_call(ChatDelta& out, std::string_view block) {
  ParsedToolCall& call = calls_.back();
  const auto schema = schemas_.find(call.name);
  constexpr std::string_view kParam = "<parameter=", kParamEnd = "</parameter>";
  size_t at = 0;
  while ((at = block.find(kParam, at)) != std::string_view::npos) {
    size_t gt = block.find('>', at);
    if (gt == std::string_view::npos) break;
    size_t end = block.find(kParamEnd, gt);
    if (end == std::string_view::npos) break;  // unfinished parameter: dropped
    std::string key = strip(block.substr(at + kParam.size(), gt - at - kParam.size()));
    std::string value(block.substr(gt + 1, end - gt - 1));
    if (value.starts_with('\n')) value.erase(0, 1);
    if (value.ends_with('\n')) value.pop_back();
    std::string type;
    if (schema != schemas_.end())
      if (auto p = schema->second.find(key); p != schema->second.end()) type = p->second;
    call.arguments[key] = typed_value(value, type);
    at = end + kParamEnd.size();
  }
  out.tool_calls.push_back({int(calls_.size() - 1), std::nullopt, "", call.arguments.dump()});
}

}  // namespace q35::server
