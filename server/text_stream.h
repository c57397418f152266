#pragma once
// Text-level pieces of a streamed reply: Server-Sent Events framing and the stop-string matcher.
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace q35::server {

// One SSE event carrying `payload` (compact JSON): "data: {...}\n\n".
std::string sse_event(const nlohmann::json& payload);
// The stream's terminator, "data: [DONE]\n\n".
std::string sse_done();

// Finds stop strings in streamed text, also when they span pieces, and never lets one out: push()
// returns the text that is safe to emit now and holds back a tail that could start a stop string.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  // Appends `text`; returns what can be emitted. When a stop string completes, returns the text
  // before it, and stopped() becomes true (later pushes return nothing).
  std::string push(std::string_view text);
  // At the end of generation: the held-back tail (empty after a stop).
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
};

}  // namespace q35::server
