#pragma once
// Parsing and validating OpenAI request bodies into what the scheduler runs: the prompt's token ids
// (chat messages rendered by the Qwen3.5 chat template), sampling, stop strings, logprobs and the
// tool-call set-up. Every refusal is an ApiError naming the field.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/qwen35/config.h"
#include "runtime/core/sampler.h"
#include "runtime/text/tokenizer.h"
#include "server/chat_output.h"

namespace q35::server {

struct ServeContext {
  const Tokenizer& tokenizer;
  const qwen35::GenerationConfig& generation;
  std::string served_name;
  int64_t max_context = 0;
};

struct GenerationRequest {
  bool chat = true;
  bool stream = false, include_usage = false;
  std::string prompt_text;        // chat: the rendered conversation (+ forced_prefix)
  std::vector<int32_t> prompt;    // token ids fed to the model
  int64_t turn_start = -1;        // chat: position of the last <|im_start|> (a snapshot point)
  int64_t max_tokens = 0;
  SamplingParams sampling;
  bool seeded = false;            // sampling.seed came from the request
  std::vector<std::string> stop;
  bool ignore_eos = false;        // the model's stop ids do not end the reply (vLLM's ignore_eos; benchmarks)
  bool logprobs = false;
  int top_logprobs = 0;
  // chat only
  bool thinking = true;
  bool parse_tools = false;
  ToolSchemas schemas;
  std::string forced_prefix;              // text the reply is forced to start with (tool_choice)
  std::vector<std::string> name_choices;  // tool_choice "required": the function name is one of these
};

// The body as ordered JSON (tool definitions keep their key order). Error 400 on malformed JSON,
// nesting deeper than 64 levels, or a body that is not an object.
nlohmann::ordered_json parse_body(const std::string& body);

GenerationRequest parse_chat_request(const nlohmann::ordered_json& body, const ServeContext& ctx);
GenerationRequest parse_completion_request(const nlohmann::ordered_json& body, const ServeContext& ctx);

}  // namespace q35::server
