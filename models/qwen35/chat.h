#pragma once
// Qwen3.5 chat format: ChatML with <think> blocks, rendered as the chat_template.jinja shipped with
// Qwen3.5-35B-A3B renders string contents (roles system / user / assistant / tool; no tool schemas,
// no images). Every content is trimmed (Jinja's |trim, i.e. Python's str.strip()).
//
//   <|im_start|>system\n{system}<|im_end|>\n          only as the first message
//   <|im_start|>user\n{user}<|im_end|>\n
//   <|im_start|>assistant\n{answer}<|im_end|>\n        turns before the last user query: reasoning dropped
//   <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n   turns after it
//   <|im_start|>user\n<tool_response>\n{tool}\n</tool_response><|im_end|>\n        consecutive tool turns share one
//   generation prompt: <|im_start|>assistant\n then <think>\n (thinking) or <think>\n\n</think>\n\n
//
// An assistant content's reasoning is the text before its first </think> (after its last <think>);
// the answer is the text after its last </think>. The "last user query" is the last user message
// that is not only a <tool_response>...</tool_response> block.
#include <cstdint>
#include <string>
#include <vector>

#include "models/qwen35/config.h"
#include "runtime/text/tokenizer.h"

namespace q35::qwen35 {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" or "tool"
  std::string content;
};

// Throws Error (as the template raises) on: no messages, a system message that is not the first, no
// user query, or another role.
std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt, bool enable_thinking);

// The text to feed for a further turn of a conversation whose state already holds every earlier
// turn up to the assistant's last generated token (generation stopped at <|im_end|>, which was not
// fed): "<|im_end|>\n" closing that reply, then `turn` rendered with the generation prompt.
std::string render_next_turn(const std::vector<ChatMessage>& turn, bool enable_thinking);

// Ids that end generation: generation_config's eos ids, then <|im_end|> and <|endoftext|> when the
// vocabulary has them; no duplicates. Error if an eos id is not a token of `tok`.
std::vector<int32_t> stop_token_ids(const Tokenizer& tok, const GenerationConfig& gen);

}  // namespace q35::qwen35
