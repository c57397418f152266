#pragma once
// Qwen3.5 chat format: ChatML with <think> blocks, rendered byte for byte as the chat_template.jinja
// shipped with Qwen3.5-35B-A3B renders text contents, tool schemas, assistant tool calls and tool
// results (no images; tests/fixtures/qwen35-chat-template.jinja is that template, and the server
// tests compare with jinja2's rendering of it). Every content is trimmed (Jinja's |trim, i.e.
// Python's str.strip()).
//
//   <|im_start|>system\n{system}<|im_end|>\n          only as the first message; with tools:
//   <|im_start|>system\n# Tools ... <tools>\n{tool JSON}...\n</tools> ...instructions...[\n\n{system}]<|im_end|>\n
//   <|im_start|>user\n{user}<|im_end|>\n
//   <|im_start|>assistant\n{answer}<|im_end|>\n        turns before the last user query: reasoning dropped
//   <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n   turns after it
//   <|im_start|>user\n<tool_response>\n{tool}\n</tool_response><|im_end|>\n        consecutive tool turns share one
//   generation prompt: <|im_start|>assistant\n then <think>\n (thinking) or <think>\n\n</think>\n\n
//
// An assistant message's reasoning is its reasoning_content when given, else the text of its content
// before the first </think> (after its last <think>), and the answer is the text after the last
// </think>. Its tool calls follow the answer as
//   [\n\n if the answer is not empty]<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n...
//   </function>\n</tool_call>   (further calls start with \n<tool_call>)
// where VALUE is a string as is, an object or array as JSON (Python's json.dumps, ensure_ascii off),
// anything else as Python's str() (True, None, 1.5). The "last user query" is the last user message
// that is not only a <tool_response>...</tool_response> block.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/qwen35/config.h"
#include "runtime/text/tokenizer.h"

namespace q35::qwen35 {

struct ToolCall {
  std::string name;
  nlohmann::ordered_json arguments = nlohmann::ordered_json::object();  // KEY -> value, in order
};

struct ChatMessage {
  ChatMessage() = default;
  ChatMessage(std::string r, std::string c) : role(std::move(r)), content(std::move(c)) {}
  std::string role;  // "system", "user", "assistant" or "tool"
  std::string content;
  std::optional<std::string> reasoning_content;  // assistant: replaces a <think> block in content
  std::vector<ToolCall> tool_calls;              // assistant
};

// Throws Error (as the template raises) on: no messages, a system message that is not the first, no
// user query, or another role. `tools` are the tool definitions as the client sent them (each
// rendered with Python's json.dumps, keys in the given order); empty: no tools block.
std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt, bool enable_thinking,
                        const std::vector<nlohmann::ordered_json>& tools = {});

// Whether `template_text` is the chat template of the Qwen3.5 checkpoints (SHA-256 of the text,
// a trailing newline ignored; tests/fixtures/qwen35-chat-template holds it).
bool is_qwen35_chat_template(std::string_view template_text);

// Python's json.dumps(value, ensure_ascii=False) (separators ", " and ": ", floats as repr): what
// the template's |tojson writes.
std::string python_json_dumps(const nlohmann::ordered_json& value);
// Python's str(value) for a JSON scalar (True, False, None, 3, 1.5, the string itself).
std::string python_str(const nlohmann::ordered_json& value);

// The text to feed for a further turn of a conversation whose state already holds every earlier
// turn up to the assistant's last generated token (generation stopped at <|im_end|>, which was not
// fed): "<|im_end|>\n" closing that reply, then `turn` rendered with the generation prompt.
std::string render_next_turn(const std::vector<ChatMessage>& turn, bool enable_thinking);

// Ids that end generation: generation_config's eos ids, then <|im_end|> and <|endoftext|> when the
// vocabulary has them; no duplicates. Error if an eos id is not a token of `tok`.
std::vector<int32_t> stop_token_ids(const Tokenizer& tok, const GenerationConfig& gen);

}  // namespace q35::qwen35
