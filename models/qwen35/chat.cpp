#include "models/qwen35/chat.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <optional>
#include <string_view>

#include <fmt/format.h>

#include "runtime/core/error.h"
#include "runtime/core/sha256.h"

namespace q35::qwen35 {
namespace {

// Python's str.isspace() for one code point: what Jinja's |trim strips.
bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// The code point that `s` encodes when it is exactly one UTF-8 sequence, else nullopt.
std::optional<char32_t> code_point(std::string_view s) {
  uint8_t lead = uint8_t(s[0]);
  size_t len = lead < 0x80 ? 1 : (lead & 0xE0) == 0xC0 ? 2 : (lead & 0xF0) == 0xE0 ? 3 : (lead & 0xF8) == 0xF0 ? 4 : 0;
  if (len != s.size()) return std::nullopt;
  if (len == 1) return char32_t(lead);
  char32_t c = char32_t(lead) & (0x7F >> len);
  for (size_t k = 1; k < len; ++k) {
    if ((uint8_t(s[k]) & 0xC0) != 0x80) return std::nullopt;
    c = (c << 6) | (char32_t(uint8_t(s[k])) & 0x3F);
  }
  return c;
}

bool is_space_at(std::string_view s) {
  std::optional<char32_t> c = code_point(s);
  return c && is_python_space(*c);
}

std::string_view trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e) {
    uint8_t lead = uint8_t(s[b]);
    size_t len = lead < 0xE0 ? (lead < 0x80 ? 1 : 2) : lead < 0xF0 ? 3 : 4;
    if (!is_space_at(s.substr(b, std::min(len, e - b)))) break;
    b += len;
  }
  while (e > b) {
    size_t start = e - 1;  // back to the lead byte of the last character
    while (start > b && (uint8_t(s[start]) & 0xC0) == 0x80 && e - start < 4) --start;
    if (!is_space_at(s.substr(start, e - start))) break;
    e = start;
  }
  return s.substr(b, e - b);
}

std::string_view strip_newlines_left(std::string_view s) {
  size_t b = s.find_first_not_of('\n');
  return b == std::string_view::npos ? std::string_view{} : s.substr(b);
}

std::string_view strip_newlines_right(std::string_view s) {
  size_t e = s.find_last_not_of('\n');
  return e == std::string_view::npos ? std::string_view{} : s.substr(0, e + 1);
}

std::string_view after_last(std::string_view s, std::string_view tag) {
  size_t at = s.rfind(tag);
  return at == std::string_view::npos ? s : s.substr(at + tag.size());
}

bool is_tool_response(std::string_view content) {
  return content.starts_with("<tool_response>") && content.ends_with("</tool_response>");
}

// Python's repr() of a float: the shortest digits that round-trip, fixed notation for decimal
// exponents -4..15, else d.ddde+XX.
std::string python_float_repr(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, end);  // -d.ddde+XX
  const size_t e = sci.find('e');
  const int exp = std::stoi(sci.substr(e + 1));
  std::string mant = sci.substr(0, e);
  const bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  std::string out = neg ? "-" : "";
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out += "0." + std::string(size_t(-exp - 1), '0') + digits;
    } else if (size_t(exp + 1) >= digits.size()) {
      out += digits + std::string(size_t(exp + 1) - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, size_t(exp + 1)) + "." + digits.substr(size_t(exp + 1));
    }
    return out;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  out += fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
  return out;
}

void dump_string(std::string_view s, std::string& out) {
  out += '"';
  for (char ch : s) {
    const uint8_t c = uint8_t(ch);
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) out += fmt::format("\\u{:04x}", c);
        else out += ch;
    }
  }
  out += '"';
}

void dump(const nlohmann::ordered_json& v, std::string& out) {
  using T = nlohmann::ordered_json::value_t;
  switch (v.type()) {
    case T::null: out += "null"; break;
    case T::boolean: out += v.get<bool>() ? "true" : "false"; break;
    case T::number_integer: out += std::to_string(v.get<int64_t>()); break;
    case T::number_unsigned: out += std::to_string(v.get<uint64_t>()); break;
    case T::number_float: out += python_float_repr(v.get<double>()); break;
    case T::string: dump_string(v.get_ref<const std::string&>(), out); break;
    case T::array: {
      out += '[';
      bool first = true;
      for (const auto& x : v) {
        if (!first) out += ", ";
        first = false;
        dump(x, out);
      }
      out += ']';
      break;
    }
    case T::object: {
      out += '{';
      bool first = true;
      for (const auto& [k, x] : v.items()) {
        if (!first) out += ", ";
        first = false;
        dump_string(k, out);
        out += ": ";
        dump(x, out);
      }
      out += '}';
      break;
    }
    default: fail("python_json_dumps: a JSON value of type {} cannot be rendered", v.type_name());
  }
}

constexpr std::string_view kToolsHead = "# Tools\n\nYou have access to the following functions:\n\n<tools>";
constexpr std::string_view kToolsTail =
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the "
    "specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML "
    "tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in "
    "natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the "
    "question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>";

}  // namespace

bool is_qwen35_chat_template(std::string_view text) {
  if (text.ends_with('\n')) text.remove_suffix(1);
  return sha256_hex(text) == "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715";
}

std::string python_json_dumps(const nlohmann::ordered_json& value) {
  std::string out;
  dump(value, out);
  return out;
}

std::string python_str(const nlohmann::ordered_json& value) {
  switch (value.type()) {
    case nlohmann::ordered_json::value_t::null: return "None";
    case nlohmann::ordered_json::value_t::boolean: return value.get<bool>() ? "True" : "False";
    case nlohmann::ordered_json::value_t::string: return value.get<std::string>();
    default: return python_json_dumps(value);
  }
}

std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt, bool enable_thinking,
                        const std::vector<nlohmann::ordered_json>& tools) {
  if (messages.empty()) fail("render_chat: no messages");
  std::string out;
  const bool first_is_system = messages[0].role == "system";
  if (!tools.empty()) {
    out += "<|im_start|>system\n";
    out += kToolsHead;
    for (const auto& t : tools) {
      out += '\n';
      out += python_json_dumps(t);
    }
    out += kToolsTail;
    if (first_is_system) {
      std::string_view sys = trim(messages[0].content);
      if (!sys.empty()) {
        out += "\n\n";
        out += sys;
      }
    }
    out += "<|im_end|>\n";
  } else if (first_is_system) {
    out += "<|im_start|>system\n";
    out += trim(messages[0].content);
    out += "<|im_end|>\n";
  }

  size_t last_query = messages.size();
  for (size_t i = messages.size(); i-- > 0;)
    if (messages[i].role == "user" && !is_tool_response(trim(messages[i].content))) {
      last_query = i;
      break;
    }
  if (last_query == messages.size())
    fail("render_chat: no user query found in {} messages (a user message that is not only a tool response)",
         messages.size());

  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const std::string& role = m.role;
    std::string_view content = trim(m.content);
    if (role == "system") {
      if (i != 0) fail("render_chat: message {} has role system; the system message must be the first", i);
    } else if (role == "user") {
      out += "<|im_start|>user\n";
      out += content;
      out += "<|im_end|>\n";
    } else if (role == "assistant") {
      std::string_view reasoning;
      if (m.reasoning_content) {
        reasoning = *m.reasoning_content;
      } else if (size_t end = content.find("</think>"); end != std::string_view::npos) {
        reasoning = strip_newlines_left(after_last(strip_newlines_right(content.substr(0, end)), "<think>"));
        content = strip_newlines_left(after_last(content, "</think>"));
      }
      out += "<|im_start|>assistant\n";
      if (i > last_query) {
        out += "<think>\n";
        out += trim(reasoning);
        out += "\n</think>\n\n";
      }
      out += content;
      for (size_t k = 0; k < m.tool_calls.size(); ++k) {
        const ToolCall& call = m.tool_calls[k];
        out += k > 0 ? "\n<tool_call>\n<function=" : trim(content).empty() ? "<tool_call>\n<function=" : "\n\n<tool_call>\n<function=";
        out += call.name;
        out += ">\n";
        if (!call.arguments.is_object())
          fail("render_chat: the arguments of tool call {} ({}) of message {} are not an object", k, call.name, i);
        for (const auto& [key, value] : call.arguments.items()) {
          out += "<parameter=";
          out += key;
          out += ">\n";
          out += value.is_object() || value.is_array() ? python_json_dumps(value) : python_str(value);
          out += "\n</parameter>\n";
        }
        out += "</function>\n</tool_call>";
      }
      out += "<|im_end|>\n";
    } else if (role == "tool") {
      if (i > 0 && messages[i - 1].role != "tool") out += "<|im_start|>user";
      out += "\n<tool_response>\n";
      out += content;
      out += "\n</tool_response>";
      if (i + 1 == messages.size() || messages[i + 1].role != "tool") out += "<|im_end|>\n";
    } else {
      fail("render_chat: message {} has role \"{}\"; expected system, user, assistant or tool", i, role);
    }
  }
  if (add_generation_prompt) {
    out += "<|im_start|>assistant\n";
    out += enable_thinking ? "<think>\n" : "<think>\n\n</think>\n\n";
  }
  return out;
}

std::vector<int32_t> stop_token_ids(const Tokenizer& tok, const GenerationConfig& gen) {
  std::vector<int32_t> ids;
  auto add = [&](int32_t id) {
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  };
  for (int32_t id : gen.eos_token_ids) {
    if (id < 0 || id >= tok.num_ids())
      fail("generation config eos_token_id {} is not a token of {} (ids 0..{})", id, tok.path().string(),
           tok.num_ids() - 1);
    add(id);
  }
  for (const char* name : {"<|im_end|>", "<|endoftext|>"})
    if (std::optional<int32_t> id = tok.token_id(name)) add(*id);
  return ids;
}

std::string render_next_turn(const std::vector<ChatMessage>& turn, bool enable_thinking) {
  return "<|im_end|>\n" + render_chat(turn, true, enable_thinking);
}

}  // namespace q35::qwen35
