#include "server/scheduler.h"

#include <fmt/format.h>

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

Scheduler::Scheduler(cli::Engine& engine, const Tokenizer& tokenizer, std::vector<int32_t> stop_ids,
                     SchedulerOptions options, Metrics& metrics, std::function<void(const std::string&)> log)
    : engine_(engine), tok_(tokenizer), stop_ids_(std::move(stop_ids)), options_(options), metrics_(metrics),
      log_(std::move(log)), cache_(options.prefix_cache_bytes), rng_(std::random_device{}()) {
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
  if (options_.snapshot_block < 1 || options_.prefill_chunk < 1)
    fail("Scheduler: snapshot_block and prefill_chunk must be >= 1, got {} and {}", options_.snapshot_block,
         options_.prefill_chunk);
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
    std::shared_ptr<Job> job;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) {
        for (auto& j : queue_) {
          JobEvent e;
          e.kind = JobEvent::Kind::Failed;
          e.error = ApiError(503, "server_error", "The server is shutting down", "", "shutting_down");
          j->push(std::move(e));
        }
        queue_.clear();
        return;
      }
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    if (job->cancelled()) continue;  // its client left while it waited
    // Requests run to completion in turn, so the one slot is free here.
    std::optional<SlotLease> slot = slots_.acquire(std::move(job));
    if (!slot) throw std::logic_error("Scheduler: no free slot for a job (slots leaked)");
    try {
      run(**slot);
    } catch (const std::exception& ex) {
      // The engine failed mid-request: the job gets a 500, its slot is released (the lease going
      // out of scope) and the sequence starts empty next time.
      Job& failed = *(*slot)->job;
      log_(fmt::format("{} failed: {}", failed.id(), ex.what()));
      JobEvent e;
      e.kind = JobEvent::Kind::Failed;
      e.error = ApiError(500, "server_error", fmt::format("generation failed: {}", ex.what()));
      failed.push(std::move(e));
      engine_.reset();
    }
  }
}

void Scheduler::run(Slot& slot) {
  Job& job = *slot.job;
  const GenerationRequest& r = job.request();
  const auto t0 = Clock::now();
  slot.sampling = r.sampling;
  if (!r.seeded) slot.sampling.seed = rng_();
  Sampler sampler(slot.sampling);
  const std::span<const int32_t> prompt(r.prompt);
  const int64_t n = int64_t(prompt.size());

  // Resume from the longest cached prefix (at least one prompt token is left to compute logits).
  if (auto hit = cache_.lookup(prompt, n - 1)) {
    engine_.restore(*hit->kv, *hit->recurrent);
    slot.cached = hit->pos;
  } else {
    engine_.reset();
  }
  const int64_t cached = slot.cached;
  slot.tokens.assign(prompt.begin(), prompt.begin() + cached);
  metrics_.prefix_lookup(cached > 0);

  // Prefill up to the last chunk in steps of at most prefill_chunk tokens, checking between them
  // whether the client has gone, and stopping at snapshot points: block boundaries and the start of
  // the last turn. The last step (below) gives the first token.
  std::set<int64_t> snapshot_points;
  for (int64_t p = (cached / options_.snapshot_block + 1) * options_.snapshot_block; p < n; p += options_.snapshot_block)
    snapshot_points.insert(p);
  if (r.turn_start > cached && r.turn_start < n) snapshot_points.insert(r.turn_start);
  std::set<int64_t> stops = snapshot_points;
  for (int64_t p = cached + options_.prefill_chunk; p < n; p += options_.prefill_chunk) stops.insert(p);
  int64_t pos = cached;
  for (int64_t p : stops) {  // consecutive stops are at most prefill_chunk tokens apart
    if (job.cancelled()) break;
    engine_.logits(prompt.subspan(size_t(pos), size_t(p - pos)), false);
    slot.tokens.insert(slot.tokens.end(), prompt.begin() + pos, prompt.begin() + p);
    pos = p;
    if (snapshot_points.contains(p)) slot.snapshots.emplace(p, engine_.save_recurrent());
  }
  if (job.cancelled()) {
    finish_cancelled_prefill(slot);
    return;
  }

  // Token choice: on the engine (GPU sampling), or on the host when logprobs or a constraint need
  // the logits.
  auto assigned = [&](int32_t id) { return id >= 0 && size_t(id) < assigned_.size() && assigned_[size_t(id)]; };
  const bool host = r.logprobs || !r.name_choices.empty();
  std::string name_text;  // tool_choice "required": the function name generated so far
  bool name_done = r.name_choices.empty();
  std::vector<float> logits;
  auto choose = [&]() -> int32_t {
    if (!name_done) {
      for (size_t id = 0; id < logits.size(); ++id) {
        const std::string* t = id < token_text_.size() ? &token_text_[id] : nullptr;
        bool ok = false;
        if (t && !t->empty())
          for (const auto& c : r.name_choices)
            if (c.size() >= name_text.size() + t->size() && c.compare(0, name_text.size(), name_text) == 0 &&
                c.compare(name_text.size(), t->size(), *t) == 0)
              ok = true;
        if (!ok) logits[id] = -std::numeric_limits<float>::infinity();
      }
    }
    return sampler.sample(logits);
  };
  int32_t next;
  if (host) {
    logits = engine_.logits(prompt.subspan(size_t(pos)), false);
    next = choose();
  } else {
    next = engine_.prefill(prompt.subspan(size_t(pos)), sampler);
  }
  slot.tokens.insert(slot.tokens.end(), prompt.begin() + pos, prompt.end());
  slot.phase = Slot::Phase::Decode;
  const auto t_first = Clock::now();
  const double ttft_ms = ms_between(t0, t_first);
  metrics_.time_to_first_token(ttft_ms / 1000.0);

  StreamDecoder decoder(tok_);
  StopMatcher stop(r.stop);
  ChatOutputParser parser(r.chat && r.thinking, r.parse_tools, r.schemas,
                          [this] { return fmt::format("call_{:016x}", rng_()); });
  ChatDelta pending;
  if (!r.forced_prefix.empty()) pending = parser.push(r.forced_prefix);
  auto emit = [&](ChatDelta d, std::vector<TokenLogprob> lps) {
    if (d.empty() && lps.empty()) return;
    JobEvent e;
    e.delta = std::move(d);
    e.logprobs = std::move(lps);
    job.push(std::move(e));
  };
  auto parse = [&](const std::string& text) {
    if (r.chat) return parser.push(text);
    ChatDelta d;
    d.content = text;
    return d;
  };
  int64_t generated = 0;
  std::string finish;
  auto t_prev = t_first;
  while (true) {
    ++generated;
    std::vector<TokenLogprob> lps;
    if (r.logprobs) {
      Logprobs lp = logprobs_of(logits, next, r.top_logprobs);
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
    if (std::find(stop_ids_.begin(), stop_ids_.end(), next) != stop_ids_.end()) {
      emit(std::exchange(pending, {}), std::move(lps));
      finish = "stop";
      break;
    }
    if (!name_done) {
      name_text += assigned(next) ? token_text_[size_t(next)] : std::string();
      for (const auto& c : r.name_choices) name_done = name_done || c == name_text;
    }
    ChatDelta d = std::exchange(pending, {});
    // A padding id of the model's vocabulary (random weights can sample one) decodes to nothing.
    d.append(parse(stop.push(assigned(next) ? decoder.push(next) : std::string())));
    emit(std::move(d), std::move(lps));
    if (stop.stopped()) {
      finish = "stop";
      break;
    }
    if (generated >= r.max_tokens || engine_.position() + 1 > engine_.max_context()) {
      finish = "length";
      break;
    }
    if (job.cancelled()) {
      finish = "cancelled";
      break;
    }
    slot.tokens.push_back(next);
    if (host) {
      logits = engine_.logits(std::span<const int32_t>(&next, 1), false);
      next = choose();
    } else {
      next = engine_.decode(next, sampler);
    }
    const auto now = Clock::now();
    metrics_.inter_token_latency(ms_between(t_prev, now) / 1000.0);
    t_prev = now;
  }
  const auto t_end = Clock::now();
  {
    std::string tail = stop.push(decoder.flush());
    if (!stop.stopped()) tail += stop.flush();
    ChatDelta d = parse(tail);
    if (r.chat) d.append(parser.finish());
    emit(std::move(d), {});
  }

  JobEvent done;
  done.kind = JobEvent::Kind::Done;
  done.tool_calls = parser.tool_calls();
  done.finish_reason = finish == "stop" && !done.tool_calls.empty() ? "tool_calls" : finish;
  done.prompt_tokens = n;
  done.completion_tokens = generated;
  done.cached_tokens = cached;
  done.ttft_ms = ttft_ms;
  const double decode_ms = ms_between(t_first, t_end);
  done.decode_tps = generated > 1 && decode_ms > 0 ? double(generated - 1) * 1000.0 / decode_ms : 0.0;
  metrics_.tokens(n, generated, cached);
  log_(fmt::format("{} prompt {} tokens ({} cached), {} generated, ttft {:.1f} ms, {:.1f} tok/s, finish {}", job.id(),
                   n, cached, generated, ttft_ms, done.decode_tps, finish));
  job.push(std::move(done));

  keep_in_cache(slot);
}

void Scheduler::finish_cancelled_prefill(Slot& slot) {
  Job& job = *slot.job;
  const int64_t n = int64_t(job.request().prompt.size());
  JobEvent done;
  done.kind = JobEvent::Kind::Done;
  done.finish_reason = "cancelled";
  done.prompt_tokens = n;
  done.cached_tokens = slot.cached;
  log_(fmt::format("{} cancelled during the prefill after {} of {} prompt tokens ({} cached)", job.id(),
                   slot.position(), n, slot.cached));
  job.push(std::move(done));
  keep_in_cache(slot);
}

void Scheduler::keep_in_cache(Slot& slot) {
  // Keep the sequence for later requests that share its prefix.
  if (slot.position() > slot.cached && slot.position() == engine_.position()) {
    slot.snapshots.insert_or_assign(engine_.position(), engine_.save_recurrent());
    cache_.insert(std::exchange(slot.tokens, {}), engine_.save_kv(), std::exchange(slot.snapshots, {}));
  }
  cache_bytes_ = int64_t(cache_.bytes());
  cache_entries_ = int64_t(cache_.entries());
}

}  // namespace q35::server
