#pragma once
// The generation side of the server: a bounded queue of requests and one worker thread that owns
// the engine. A request takes a slot (server/slot.h: its sequence's state and bookkeeping; one slot
// today, each request runs to completion in turn), restores the longest cached prefix, prefills the
// rest in chunks, samples, and streams events (text split into reasoning / content / tool calls,
// logprobs, the finish) back to the HTTP thread of the request. Cancelling a job (its client went
// away) stops it at the next prefill chunk or before the next token, and frees its slot.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cli/engine.h"
#include "runtime/text/tokenizer.h"
#include "server/api_error.h"
#include "server/chat_output.h"
#include "server/metrics.h"
#include "server/prefix_cache.h"
#include "server/request.h"
#include "server/slot.h"

namespace q35::server {

struct TokenLogprob {
  std::string token;  // the token's text (bytes that are not whole UTF-8 characters replaced)
  std::vector<uint8_t> bytes;
  float logprob = 0;
  std::vector<TokenLogprob> top;  // top_logprobs alternatives (their own `top` empty)
};

struct JobEvent {
  enum class Kind { Delta, Done, Failed } kind = Kind::Delta;
  ChatDelta delta;                     // completions: delta.content only
  std::vector<TokenLogprob> logprobs;  // of the tokens this delta came from
  // Done:
  std::string finish_reason;           // stop | length | tool_calls | cancelled
  int64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
  double ttft_ms = 0, decode_tps = 0;
  std::vector<ParsedToolCall> tool_calls;
  // Failed:
  std::optional<ApiError> error;
};

class Job {
 public:
  Job(std::string id, GenerationRequest request) : id_(std::move(id)), request_(std::move(request)) {}
  const std::string& id() const { return id_; }
  const GenerationRequest& request() const { return request_; }

  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }

  // Worker side.
  void push(JobEvent e);
  // HTTP side: waits up to `timeout` for the next event; false on timeout.
  bool pop(JobEvent& e, std::chrono::milliseconds timeout);

 private:
  std::string id_;
  GenerationRequest request_;
  std::atomic<bool> cancelled_{false};
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<JobEvent> events_;
};

struct SchedulerOptions {
  size_t max_queue = 64;
  size_t prefix_cache_bytes = size_t(4) << 30;
  int64_t snapshot_block = 512;  // recurrent snapshots every this many prompt tokens
  int64_t prefill_chunk = 512;   // prompt tokens per engine call; cancellation is checked between them
};

class Scheduler {
 public:
  Scheduler(cli::Engine& engine, const Tokenizer& tokenizer, std::vector<int32_t> stop_ids, SchedulerOptions options,
            Metrics& metrics, std::function<void(const std::string&)> log);
  ~Scheduler();  // stops the worker after the running job; queued jobs fail with 503
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a job; ApiError 503 (code queue_full) when --max-queue jobs already wait.
  void submit(std::shared_ptr<Job> job);
  int64_t queue_length() const;
  int64_t running() const { return int64_t(slots_.in_use()); }
  // The slots (counts only are safe to read from other threads).
  const SlotPool& slots() const { return slots_; }
  // Prefix cache size for /metrics: bytes, entries (updated by the worker after each job).
  int64_t cache_bytes() const { return cache_bytes_; }
  int64_t cache_entries() const { return cache_entries_; }

 private:
  void worker();
  void run(Slot& slot);
  void finish_cancelled_prefill(Slot& slot);
  void keep_in_cache(Slot& slot);

  cli::Engine& engine_;
  const Tokenizer& tok_;
  std::vector<int32_t> stop_ids_;
  SchedulerOptions options_;
  Metrics& metrics_;
  std::function<void(const std::string&)> log_;
  PrefixCache cache_;
  std::mt19937_64 rng_;  // seeds of unseeded requests and tool-call ids
  SlotPool slots_{1};    // cli::Engine holds one sequence

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
  std::atomic<int64_t> cache_bytes_{0}, cache_entries_{0};
  std::vector<std::string> token_text_;  // bytes of every id (empty: special or unassigned)
  std::vector<bool> assigned_;           // ids the tokenizer can decode (a model's padded vocabulary has more)
  std::thread thread_;
};

}  // namespace q35::server
