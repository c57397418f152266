#include "server/scheduler.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "runtime/core/error.h"
#include "server/text_stream.h"

namespace q35::server {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// log_softmax(logits)[id] and the `k` most likely ids with theirs.
struct Logprobs {
  float chosen = 0;
  std::vector<std::pair<int32_t, float>> top;
};

Logprobs logprobs_of(std::span<const float> logits, int32_t id, int k) {
  float mx = -std::numeric_limits<float>::infinity();
  for (float v : logits) mx = std::max(mx, v);
  double sum = 0;
  for (float v : logits) sum += std::exp(double(v - mx));
  const float lse = mx + float(std::log(sum));
  Logprobs out;
  out.chosen = logits[size_t(id)] - lse;
  if (k > 0) {
    std::vector<int32_t> idx(logits.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = int32_t(i);
    std::partial_sort(idx.begin(), idx.begin() + std::min<size_t>(size_t(k), idx.size()), idx.end(),
                      [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b); });
    for (int i = 0; i < k && size_t(i) < idx.size(); ++i) out.top.push_back({idx[size_t(i)], logits[size_t(idx[size_t(i)])] - lse});
  }
  return out;
}

}  // namespace

void Job::push(JobEvent e) {
  {
    std::lock_guard lock(mutex_);
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

bool Job::pop(JobEvent& e, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (!cv_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return false;
  e = std::move(events_.front());
  events_.pop_front();
  return true;
}

// A request in a slot, from admission to its last event.
struct Scheduler::Running {
  Running(SlotLease l, const Tokenizer& tok, std::function<std::string()> make_id)
      : lease(std::move(l)),
        job(lease->job),
        r(job->request()),
        decoder(tok),
        stop(r.stop),
        parser(r.chat && r.thinking, r.parse_tools, r.schemas, std::move(make_id)) {}
  Slot& slot() { return *lease; }

  SlotLease lease;
  std::shared_ptr<Job> job;
  const GenerationRequest& r;
  Clock::time_point t0 = Clock::now(), t_first, t_prev;
  std::optional<Sampler> sampler;  // the request's own: parameters, seed, random stream
  bool done = false;               // finished, cancelled or failed: leaves at the end of the step

  // Prefill: the prompt runs in pieces of at most the turn's piece size that also end at the
  // snapshot points `stops` (ascending, < prompt size); the last piece is the rest.
  std::vector<int64_t> stops;
  size_t next_stop = 0;
  int64_t pieces = 0;  // engine calls of the prefill (the log line says how many)
  int64_t pos = 0;  // prompt tokens fed

  // Decode.
  bool host = false;          // the host chooses each id (logprobs, a tool-name constraint)
  std::vector<float> logits;  // host: the logits the last id was chosen from [vocab]
  int32_t next = -1;          // the last id drawn: fed at the next step
  std::string name_text;      // tool_choice "required": the function name generated so far
  bool name_done = true;
  StreamDecoder decoder;
  StopMatcher stop;
  ChatOutputParser parser;
  ChatDelta pending;
  int64_t generated = 0;
  double ttft_ms = 0;
};

Scheduler::Scheduler(cli::Engine& engine, const Tokenizer& tokenizer, std::vector<int32_t> stop_ids,
                     SchedulerOptions options, Metrics& metrics, std::function<void(const std::string&)> log)
    : engine_(engine), tok_(tokenizer), stop_ids_(std::move(stop_ids)), options_(options), metrics_(metrics),
      log_(std::move(log)), cache_(engine), rng_(std::random_device{}()),
      slots_(size_t(std::clamp(options.max_batch, 1, std::max(1, engine.max_batch())))) {
  if (options_.max_batch < 1) q35::fail("Scheduler: max_batch (--max-batch) must be >= 1, got {}", options_.max_batch);
  if (options_.prefill_chunk < 1)
    q35::fail("Scheduler: prefill_chunk (--prefill-chunk) must be >= 1, got {}", options_.prefill_chunk);
  if (options_.snapshot_block < 0 || options_.idle_prefill_chunk < 0)
    q35::fail("Scheduler: snapshot_block and idle_prefill_chunk must be >= 0, got {} and {}", options_.snapshot_block,
              options_.idle_prefill_chunk);
  publish_cache();
  token_text_.resize(size_t(tok_.num_ids()));
  assigned_.resize(size_t(tok_.num_ids()), false);
  for (int32_t id = 0; id < tok_.num_ids(); ++id) {
    try {
      std::string_view bytes = tok_.token_bytes(id);
      assigned_[size_t(id)] = true;
      if (!tok_.is_special(id)) token_text_[size_t(id)] = std::string(bytes);
    } catch (const Error&) {
      // an id the vocabulary does not assign: decodes to nothing, never allowed by a constraint
    }
  }
  thread_ = std::thread([this] { worker(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Scheduler::submit(std::shared_ptr<Job> job) {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) throw ApiError(503, "server_error", "The server is shutting down", "", "shutting_down");
    if (queue_.size() >= options_.max_queue)
      throw ApiError(503, "server_error",
                     fmt::format("The server is busy: {} requests are already waiting (--max-queue)", queue_.size()),
                     "", "queue_full");
    queue_.push_back(std::move(job));
  }
  cv_.notify_all();
}

int64_t Scheduler::queue_length() const {
  std::lock_guard lock(mutex_);
  return int64_t(queue_.size());
}

void Scheduler::worker() {
  while (true) {
    // 1. Admission: the oldest queued requests into free slots.
    std::vector<Running*> admitted;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty() || !running_.empty(); });
      if (stopping_) {
        for (auto& j : queue_) {
          JobEvent e;
          e.kind = JobEvent::Kind::Failed;
          e.error = ApiError(503, "server_error", "The server is shutting down", "", "shutting_down");
          j->push(std::move(e));
        }
        queue_.clear();
        if (running_.empty()) return;
      }
      while (!queue_.empty() && slots_.available() > 0) {
        std::shared_ptr<Job> job = std::move(queue_.front());
        queue_.pop_front();
        if (job->cancelled()) continue;  // its client left while it waited
        std::optional<SlotLease> lease = slots_.acquire(std::move(job));
        if (!lease) throw std::logic_error("Scheduler: no free slot although the pool counts one");
        running_.push_back(
            std::make_unique<Running>(std::move(*lease), tok_, [this] { return fmt::format("call_{:016x}", rng_()); }));
        admitted.push_back(running_.back().get());
      }
    }
    for (Running* r : admitted) {
      try {
        start(*r);
      } catch (const std::exception& ex) {
        fail(*r, ex);
      }
    }
    // 2. Prefill, bounded; 3. one decode step of every sequence past its prompt. Finished ones
    // leave (their leases free the slots) after each.
    auto leave = [&] { std::erase_if(running_, [](const std::unique_ptr<Running>& r) { return r->done; }); };
    prefill_step();
    leave();
    decode_step();
    leave();
  }
}

void Scheduler::start(Running& r) {
  Slot& slot = r.slot();
  const std::span<const int32_t> prompt(r.r.prompt);
  const int64_t n = int64_t(prompt.size());
  slot.sampling = r.r.sampling;
  if (!r.r.seeded) slot.sampling.seed = rng_();
  r.sampler.emplace(slot.sampling);

  // Resume from the longest cached prefix (at least one prompt token is left to compute logits),
  // restored into this slot whichever slot it was saved from: copies from the cache's blocks (device
  // memory or pinned host memory) that the engine issues without waiting for them.
  std::optional<PrefixCache::Hit> hit;
  if (cache_.enabled()) {
    hit = cache_.lookup(prompt, n - 1);
    metrics_.prefix_lookup(hit.has_value());
  }
  if (hit) {
    engine_.restore(slot.index, *hit->kv, *hit->recurrent);
    slot.cached = hit->pos;
    metrics_.prefix_restored(int(hit->kv->tier), engine_.state_bytes(cli::StatePart::KV, hit->pos));
    metrics_.prefix_restored(int(hit->recurrent->tier), hit->recurrent->bytes);
    hit.reset();  // the blocks may be reused: the copies out of them run first on the engine's stream
  } else {
    engine_.reset(slot.index);
  }
  const int64_t cached = slot.cached;
  slot.tokens.assign(prompt.begin(), prompt.begin() + cached);
  r.pos = cached;

  // Snapshot points, only where a later request can resume: the start of a chat's last turn (the
  // next turn re-renders this turn's reply and so shares the prompt up to there), and block
  // boundaries when --prefix-cache-block asks for them (prompts sharing a long start). Each ends a
  // prefill piece; the end of the sequence is kept when it finishes. Without a prefix cache nothing
  // is kept.
  std::set<int64_t> stops;
  if (cache_.enabled()) {
    if (options_.snapshot_block > 0)
      for (int64_t p = (cached / options_.snapshot_block + 1) * options_.snapshot_block; p < n; p += options_.snapshot_block)
        stops.insert(p);
    if (r.r.turn_start > cached && r.r.turn_start < n) stops.insert(r.r.turn_start);
  }
  r.stops.assign(stops.begin(), stops.end());
  r.host = r.r.logprobs || !r.r.name_choices.empty();
  r.name_done = r.r.name_choices.empty();
  if (!r.r.forced_prefix.empty()) r.pending = r.parser.push(r.r.forced_prefix);
}

void Scheduler::prefill_step() {
  // The piece size and the turn's budget: --prefill-chunk while a sequence decodes (it waits for
  // this turn's prefill before its next token), else the engine's best call size.
  const bool decoding = std::any_of(running_.begin(), running_.end(), [](const std::unique_ptr<Running>& r) {
    return !r->done && r->slot().phase == Slot::Phase::Decode;
  });
  const int64_t limit = decoding ? options_.prefill_chunk : std::max(options_.prefill_chunk, options_.idle_prefill_chunk);
  int64_t budget = limit;  // prompt tokens left for this turn
  for (auto& rp : running_) {
    Running& r = *rp;
    while (!r.done && r.slot().phase == Slot::Phase::Prefill) {
      if (r.job->cancelled()) {
        finish_cancelled_prefill(r);
        break;
      }
      const int64_t stop = r.next_stop < r.stops.size() ? r.stops[r.next_stop] : int64_t(r.r.prompt.size());
      const int64_t end = std::min(stop, r.pos + limit);
      if (end - r.pos > budget) return;  // the oldest prompt goes first; the rest waits for the next turn
      budget -= end - r.pos;
      try {
        prefill_piece(r, end);
      } catch (const std::exception& ex) {
        fail(r, ex);
      }
    }
  }
}

void Scheduler::prefill_piece(Running& r, int64_t end) {
  Slot& slot = r.slot();
  const std::span<const int32_t> prompt(r.r.prompt);
  ++r.pieces;
  if (end < int64_t(prompt.size())) {
    engine_.logits(slot.index, prompt.subspan(size_t(r.pos), size_t(end - r.pos)), false);
    slot.tokens.insert(slot.tokens.end(), prompt.begin() + r.pos, prompt.begin() + end);
    r.pos = end;
    if (r.next_stop < r.stops.size() && r.stops[r.next_stop] == end) {  // a snapshot point
      ++r.next_stop;
      if (cli::SavedStatePtr s = save(slot, cli::StatePart::Recurrent)) slot.snapshots.emplace(end, std::move(s));
      publish_cache();
    }
    return;
  }
  // The last piece draws the first token: on the engine, or on the host from the logits.
  const std::span<const int32_t> rest = prompt.subspan(size_t(r.pos));
  int32_t first;
  if (r.host) {
    r.logits = engine_.logits(slot.index, rest, false);
    first = choose(r);
  } else {
    first = engine_.prefill(slot.index, rest, *r.sampler);
  }
  slot.tokens.insert(slot.tokens.end(), rest.begin(), rest.end());
  r.pos = int64_t(prompt.size());
  slot.phase = Slot::Phase::Decode;
  r.t_first = r.t_prev = Clock::now();
  r.ttft_ms = ms_between(r.t0, r.t_first);
  metrics_.time_to_first_token(r.ttft_ms / 1000.0);
  on_token(r, first);
}

void Scheduler::decode_step() {
  std::vector<Running*> batch;
  std::vector<cli::DecodeEntry> entries;
  for (auto& rp : running_) {
    Running& r = *rp;
    if (r.done || r.slot().phase != Slot::Phase::Decode) continue;
    if (r.job->cancelled()) {
      finish(r, "cancelled");
      continue;
    }
    r.slot().tokens.push_back(r.next);
    batch.push_back(&r);
    entries.push_back({r.slot().index, r.next, r.host ? nullptr : &*r.sampler});
  }
  if (batch.empty()) return;
  std::vector<cli::DecodeOutput> out;
  try {
    out = engine_.decode_batch(entries);
    if (out.size() != entries.size())
      q35::fail("decode_batch returned {} results for {} sequences", out.size(), entries.size());
  } catch (const std::exception& ex) {
    for (Running* r : batch) fail(*r, ex);  // the step's state is unknown for every sequence in it
    return;
  }
  const auto now = Clock::now();
  for (size_t b = 0; b < batch.size(); ++b) {
    Running& r = *batch[b];
    int32_t id = out[b].id;
    if (r.host) {
      r.logits = std::move(out[b].logits);
      id = choose(r);
    }
    metrics_.inter_token_latency(ms_between(r.t_prev, now) / 1000.0);
    r.t_prev = now;
    on_token(r, id);
  }
}

// The host's choice from r.logits: the tool-name constraint masks ids, then the request's sampler.
int32_t Scheduler::choose(Running& r) {
  if (r.logits.empty())
    q35::fail("Scheduler: the engine returned no logits for a host-sampled sequence");
  if (!r.name_done) {
    for (size_t id = 0; id < r.logits.size(); ++id) {
      const std::string* t = id < token_text_.size() ? &token_text_[id] : nullptr;
      bool ok = false;
      if (t && !t->empty())
        for (const auto& c : r.r.name_choices)
          if (c.size() >= r.name_text.size() + t->size() && c.compare(0, r.name_text.size(), r.name_text) == 0 &&
              c.compare(r.name_text.size(), t->size(), *t) == 0)
            ok = true;
      if (!ok) r.logits[id] = -std::numeric_limits<float>::infinity();
    }
  }
  return r.sampler->sample(r.logits);
}

// A drawn id: logprobs, stop ids, text through the decoder, stop strings and the output parser;
// then the end conditions. Sets r.next for the next step, or finishes the request.
void Scheduler::on_token(Running& r, int32_t next) {
  const GenerationRequest& req = r.r;
  auto assigned = [&](int32_t id) { return id >= 0 && size_t(id) < assigned_.size() && assigned_[size_t(id)]; };
  auto emit = [&](ChatDelta d, std::vector<TokenLogprob> lps) {
    if (d.empty() && lps.empty()) return;
    JobEvent e;
    e.delta = std::move(d);
    e.logprobs = std::move(lps);
    r.job->push(std::move(e));
  };
  auto parse = [&](const std::string& text) {
    if (req.chat) return r.parser.push(text);
    ChatDelta d;
    d.content = text;
    return d;
  };
  ++r.generated;
  std::vector<TokenLogprob> lps;
  if (req.logprobs) {
    Logprobs lp = logprobs_of(r.logits, next, req.top_logprobs);
    auto entry = [&](int32_t id, float v) {
      TokenLogprob t;
      std::string_view raw = assigned(id) ? tok_.token_bytes(id) : std::string_view();
      t.bytes.assign(raw.begin(), raw.end());
      utf8_decode_lossy(raw, true, t.token);
      t.logprob = v;
      return t;
    };
    TokenLogprob t = entry(next, lp.chosen);
    for (auto& [id, v] : lp.top) t.top.push_back(entry(id, v));
    lps.push_back(std::move(t));
  }
  if (!req.ignore_eos && std::find(stop_ids_.begin(), stop_ids_.end(), next) != stop_ids_.end()) {
    emit(std::exchange(r.pending, {}), std::move(lps));
    finish(r, "stop");
    return;
  }
  if (!r.name_done) {
    r.name_text += assigned(next) ? token_text_[size_t(next)] : std::string();
    for (const auto& c : req.name_choices) r.name_done = r.name_done || c == r.name_text;
  }
  ChatDelta d = std::exchange(r.pending, {});
  // A padding id of the model's vocabulary (random weights can sample one) decodes to nothing.
  d.append(parse(r.stop.push(assigned(next) ? r.decoder.push(next) : std::string())));
  emit(std::move(d), std::move(lps));
  if (r.stop.stopped()) {
    finish(r, "stop");
  } else if (r.generated >= req.max_tokens || engine_.position(r.slot().index) + 1 > engine_.max_context()) {
    finish(r, "length");
  } else if (r.job->cancelled()) {
    finish(r, "cancelled");
  } else {
    r.next = next;
  }
}

void Scheduler::finish(Running& r, const std::string& reason) {
  const GenerationRequest& req = r.r;
  const auto t_end = Clock::now();
  {
    std::string tail = r.stop.push(r.decoder.flush());
    if (!r.stop.stopped()) tail += r.stop.flush();
    ChatDelta d;
    if (req.chat) {
      d = r.parser.push(tail);
      d.append(r.parser.finish());
    } else {
      d.content = tail;
    }
    if (!d.empty()) {
      JobEvent e;
      e.delta = std::move(d);
      r.job->push(std::move(e));
    }
  }
  const int64_t n = int64_t(req.prompt.size());
  const int64_t cached = r.slot().cached;
  JobEvent done;
  done.kind = JobEvent::Kind::Done;
  done.tool_calls = r.parser.tool_calls();
  done.finish_reason = reason == "stop" && !done.tool_calls.empty() ? "tool_calls" : reason;
  done.prompt_tokens = n;
  done.completion_tokens = r.generated;
  done.cached_tokens = cached;
  done.ttft_ms = r.ttft_ms;
  const double decode_ms = ms_between(r.t_first, t_end);
  done.decode_tps = r.generated > 1 && decode_ms > 0 ? double(r.generated - 1) * 1000.0 / decode_ms : 0.0;
  metrics_.tokens(n, r.generated, cached);
  log_(fmt::format(
      "{} prompt {} tokens ({} cached, {} prefill calls), {} generated, ttft {:.1f} ms, {:.1f} tok/s, finish {} (slot {})",
      r.job->id(), n, cached, r.pieces, r.generated, r.ttft_ms, done.decode_tps, reason, r.slot().index));
  r.job->push(std::move(done));
  r.done = true;
  keep_in_cache(r.slot());
}

void Scheduler::finish_cancelled_prefill(Running& r) {
  Slot& slot = r.slot();
  const int64_t n = int64_t(r.r.prompt.size());
  JobEvent done;
  done.kind = JobEvent::Kind::Done;
  done.finish_reason = "cancelled";
  done.prompt_tokens = n;
  done.cached_tokens = slot.cached;
  log_(fmt::format("{} cancelled during the prefill after {} of {} prompt tokens ({} cached)", r.job->id(),
                   slot.position(), n, slot.cached));
  r.job->push(std::move(done));
  r.done = true;
  keep_in_cache(slot);
}

// The engine failed on this sequence: the job gets a 500, its slot starts empty next time and is
// freed when the sequence leaves at the end of the step.
void Scheduler::fail(Running& r, const std::exception& ex) {
  log_(fmt::format("{} failed: {}", r.job->id(), ex.what()));
  JobEvent e;
  e.kind = JobEvent::Kind::Failed;
  e.error = ApiError(500, "server_error", fmt::format("generation failed: {}", ex.what()));
  r.job->push(std::move(e));
  r.done = true;
  engine_.reset(r.slot().index);
}

void Scheduler::keep_in_cache(Slot& slot) {
  // Keep the sequence for later requests that share its prefix (nothing to copy without a cache):
  // its end state and K/V rows, copied into the cache's blocks on the engine's stream without
  // waiting, so the next request starts at once.
  if (cache_.enabled() && slot.position() > slot.cached && slot.position() == engine_.position(slot.index)) {
    if (cli::SavedStatePtr end = save(slot, cli::StatePart::Recurrent))
      slot.snapshots.insert_or_assign(slot.position(), std::move(end));
    if (!slot.snapshots.empty())
      if (cli::SavedStatePtr kv = save(slot, cli::StatePart::KV))
        cache_.insert(std::exchange(slot.tokens, {}), std::move(kv), std::exchange(slot.snapshots, {}));
  }
  slot.snapshots.clear();
  publish_cache();
}

cli::SavedStatePtr Scheduler::save(const Slot& slot, cli::StatePart part) {
  const int index = slot.index;
  return cache_.save(engine_.state_bytes(part, engine_.position(index)),
                     [&](cli::Tier tier) { return engine_.save_state(index, part, tier); });
}

void Scheduler::publish_cache() {
  PrefixCacheStats s;
  s.entries = int64_t(cache_.entries());
  for (cli::Tier t : {cli::Tier::Device, cli::Tier::Host}) {
    s.bytes[int(t)] = int64_t(cache_.bytes(t));
    s.capacity[int(t)] = int64_t(engine_.state_capacity(t));
    s.saved_bytes[int(t)] = cache_.counters().saved_bytes[int(t)];
  }
  s.spilled_bytes = cache_.counters().spilled_bytes;
  s.evicted_bytes = cache_.counters().evicted_bytes;
  s.evicted_entries = cache_.counters().evicted_entries;
  metrics_.prefix_cache(s);
}

}  // namespace q35::server
