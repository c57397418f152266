#pragma once
// Splits a Qwen3.5 reply, as it streams, into reasoning, content and tool calls:
//
//   [reasoning]</think>\n\n[content][\n\n]<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n
//   ...</function>\n</tool_call>[\n<tool_call>...]
//
// With thinking on, the prompt ends inside the think block, so the reply starts as reasoning until
// </think>; newlines around </think> and before <tool_call> are dropped (the chat template puts
// them back). Tool-call arguments become a JSON object whose values are typed by the tool's JSON
// schema ("integer", "number", "boolean", "object", "array", "null"; anything else a string).
// A tool call that is not closed when the reply ends is still returned with the parameters that
// were complete; text that never became a call stays content.
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace q35::server {

// name -> (parameter -> JSON schema type), from the request's tools.
using ToolSchemas = std::map<std::string, std::map<std::string, std::string>>;

struct ToolCallDelta {
  int index = 0;
  std::optional<std::string> name;  // set on a call's first delta (with its id)
  std::string id;
  std::string arguments;            // JSON text to append
};

struct ChatDelta {
  std::string reasoning, content;
  std::vector<ToolCallDelta> tool_calls;
  bool empty() const { return reasoning.empty() && content.empty() && tool_calls.empty(); }
  void append(ChatDelta&& o);
};

struct ParsedToolCall {
  std::string id, name;
  nlohmann::ordered_json arguments = nlohmann::ordered_json::object();
};

// Converts a parameter's text to the type its schema names (a string when it does not parse).
nlohmann::ordered_json typed_value(const std::string& text, const std::string& type);

class ChatOutputParser {
 public:
  // in_reasoning: the reply starts inside <think>. parse_tools: recognise <tool_call> blocks.
  // `make_id` names each call ("call_...").
  ChatOutputParser(bool in_reasoning, bool parse_tools, ToolSchemas schemas, std::function<std::string()> make_id);
  ChatDelta push(std::string_view text);
  ChatDelta finish();  // the end of the reply: whatever was held back
  const std::vector<ParsedToolCall>& tool_calls() const { return calls_; }

 private:
  enum class Mode { Reasoning, Content, ToolCall };
  void step(ChatDelta& out, bool final);
  void close_call(ChatDelta& out, std::string_view block);

  Mode mode_;
  bool parse_tools_;
  ToolSchemas schemas_;
  std::function<std::string()> make_id_;
  std::string buf_;          // text not yet classified
  bool skip_newlines_ = false;  // drop newlines at the start of content
  bool name_sent_ = false;      // the current call's first delta went out
  std::string space_before_call_;  // dropped before <tool_call>; back if it was not a call
  std::vector<ParsedToolCall> calls_;
};

}  // namespace q35::server
