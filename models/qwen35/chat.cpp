#include "models/qwen35/chat.h"

#include <algorithm>
#include <optional>
#include <string_view>

#include "runtime/core/error.h"

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

}  // namespace

std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt, bool enable_thinking) {
  if (messages.empty()) fail("render_chat: no messages");
  size_t last_query = messages.size();
  for (size_t i = messages.size(); i-- > 0;)
    if (messages[i].role == "user" && !is_tool_response(trim(messages[i].content))) {
      last_query = i;
      break;
    }
  if (last_query == messages.size())
    fail("render_chat: no user query found in {} messages (a user message that is not only a tool response)",
         messages.size());

  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    std::string_view content = trim(messages[i].content);
    if (role == "system") {
      if (i != 0) fail("render_chat: message {} has role system; the system message must be the first", i);
      out += "<|im_start|>system\n";
      out += content;
      out += "<|im_end|>\n";
    } else if (role == "user") {
      out += "<|im_start|>user\n";
      out += content;
      out += "<|im_end|>\n";
    } else if (role == "assistant") {
      std::string_view reasoning;
      if (size_t end = content.find("</think>"); end != std::string_view::npos) {
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
