#pragma once
// The generation side of the server: a bounded queue of requests and one worker thread that owns
// the engine and runs continuous batching over its sequence slots (server/slot.h). Each turn of
// the worker loop:
//   1. admit: queued requests, oldest first, take free slots (at most --max-batch run at once); each
//      restores the longest cached prefix into its slot (any slot) or starts it empty;
//   2. prefill: sequences still in their prompt advance, oldest first, by whole pieces of their
//      prompt (a piece ends at a snapshot point or after --prefill-chunk tokens), at most
//      --prefill-chunk prompt tokens in all per turn: the bound on the prefill work between two
//      decode steps. While no sequence is decoding there is nobody to keep waiting, and pieces (and
//      the turn's budget) grow to --idle-prefill-chunk, the size the engine takes best (the GPU: one
//      4,096-token call instead of eight of 512). A prompt's last piece draws its first token;
//   3. decode: every sequence past its prompt advances by one token in one Engine::decode_batch,
//      each with its own sampler (parameters and seed), so its tokens do not depend on the others.
// The prefix cache (server/prefix_cache.h) lives in the engine's state memory: a request restores
// the longest cached prefix into its slot, snapshots the recurrent state where a later request can
// resume (the start of its last turn, block boundaries if asked), and leaves its sequence in the
// cache when it ends; all of these are copies the engine issues without waiting for them.
// Tokens stream as events (text split into reasoning / content / tool calls, logprobs, the finish)
// to the HTTP thread of each request. A sequence that finishes, is cancelled (its client went away:
// noticed before each prefill piece and after each token) or fails leaves at once and frees its slot.
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

// The prefix cache's budgets are the engine's (Engine::set_state_memory); it is on when either is
// above 0.
struct SchedulerOptions {
  size_t max_queue = 64;
  // Recurrent snapshots also every this many prompt tokens (0: only at the start of a chat's last
  // turn and at the end of a sequence). Each ends a prefill piece.
  int64_t snapshot_block = 0;
  int64_t prefill_chunk = 512;       // prompt tokens per engine call, and per turn between decode steps
  int64_t idle_prefill_chunk = 0;    // the same while no sequence decodes (below prefill_chunk: prefill_chunk)
  int max_batch = 16;                // sequences at once (capped by the engine's slots)
};

class Scheduler {
 public:
  Scheduler(cli::Engine& engine, const Tokenizer& tokenizer, std::vector<int32_t> stop_ids, SchedulerOptions options,
            Metrics& metrics, std::function<void(const std::string&)> log);
  // Error naming the option when max_batch or prefill_chunk is below 1, or snapshot_block or
  // idle_prefill_chunk below 0.
  ~Scheduler();  // stops the worker after the running jobs; queued jobs fail with 503
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a job; ApiError 503 (code queue_full) when --max-queue jobs already wait.
  void submit(std::shared_ptr<Job> job);
  int64_t queue_length() const;
  int64_t running() const { return int64_t(slots_.in_use()); }
  // The slots (counts only are safe to read from other threads).
  const SlotPool& slots() const { return slots_; }

 private:
  struct Running;  // a request in a slot: its prefill plan and streaming state (scheduler.cpp)

  void worker();
  void start(Running& r);
  void prefill_step();
  void prefill_piece(Running& r, int64_t end);
  void decode_step();
  int32_t choose(Running& r);
  void on_token(Running& r, int32_t next);
  void finish(Running& r, const std::string& reason);
  void finish_cancelled_prefill(Running& r);
  void fail(Running& r, const std::exception& ex);
  void keep_in_cache(Slot& slot);
  // A recurrent snapshot or K/V rows of the slot's sequence, made room for in the cache; null when
  // it fits nowhere.
  cli::SavedStatePtr save(const Slot& slot, cli::StatePart part);
  void publish_cache();  // the cache's state for /metrics

  cli::Engine& engine_;
  const Tokenizer& tok_;
  std::vector<int32_t> stop_ids_;
  SchedulerOptions options_;
  Metrics& metrics_;
  std::function<void(const std::string&)> log_;
  PrefixCache cache_;
  std::mt19937_64 rng_;  // seeds of unseeded requests and tool-call ids
  SlotPool slots_;       // min(max_batch, the engine's slots)
  std::vector<std::unique_ptr<Running>> running_;  // worker only; in admission order

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
  std::vector<std::string> token_text_;  // bytes of every id (empty: special or unassigned)
  std::vector<bool> assigned_;           // ids the tokenizer can decode (a model's padded vocabulary has more)
  std::thread thread_;
};

}  // namespace q35::server
