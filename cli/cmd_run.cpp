// q35jit run: text completion or chat, streamed to stdout; timing to stderr.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "models/qwen35/chat.h"
#include "runtime/core/error.h"
#include "runtime/core/sampler.h"

namespace q35::cli {

namespace {

std::vector<FlagSpec> run_flags() {
  std::vector<FlagSpec> flags = {
    {"model", "DIR", "Hugging Face model folder (config.json, safetensors, tokenizer.json)"},
    {"prompt", "TEXT", "the prompt (with --chat: the first user message)"},
    {"prompt-file", "FILE", "read the prompt from FILE"},
    {"chat", "", "chat format; without a prompt: interactive multi-turn chat on stdin"},
    {"system", "TEXT", "system prompt for --chat"},
    {"no-think", "", "with --chat: thinking off (empty <think></think> block)"},
    {"max-new-tokens", "N", "tokens to generate per reply (default 256)"},
    {"temperature", "T", "sampling temperature; 0 = greedy (default: generation_config.json)"},
    {"top-k", "K", "top-k sampling, 0 = off (default: generation_config.json)"},
    {"top-p", "P", "nucleus sampling, 1 = off (default: generation_config.json)"},
    {"seed", "S", "sampling seed (default: random, printed)"},
  };
  for (FlagSpec f : engine_flags()) flags.push_back(std::move(f));
  return flags;
}

struct Stats {
  int64_t prompt_tokens = 0;
  int64_t generated = 0;
  double prefill_ms = 0;   // prompt forward until the first token is chosen
  double decode_ms = 0;    // the rest
};

// One generation: feeds `prompt`, then samples until a stop id or max_new tokens, streaming the
// text. The stop id itself is not fed to the model (the next chat turn starts by feeding it).
std::vector<int32_t> generate(Engine& engine, const Tokenizer& tok, std::span<const int32_t> prompt,
                              const std::vector<int32_t>& stop_ids, int64_t max_new, Sampler& sampler, Stats& stats) {
  std::vector<int32_t> out;
  StreamDecoder stream(tok);
  auto t0 = std::chrono::steady_clock::now();
  int32_t next = engine.prefill(prompt, sampler);
  stats.prompt_tokens += int64_t(prompt.size());
  stats.prefill_ms += ms_since(t0);
  auto t1 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < max_new; ++i) {
    if (std::find(stop_ids.begin(), stop_ids.end(), next) != stop_ids.end()) break;
    out.push_back(next);
    std::string piece = stream.push(next);
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
    if (i + 1 == max_new) break;
    if (engine.position() + 1 > engine.max_context())
      fail("context overflow: {} tokens used, --max-context is {}", engine.position(), engine.max_context());
    next = engine.decode(next, sampler);
  }
  std::string rest = stream.flush();
  std::fwrite(rest.data(), 1, rest.size(), stdout);
  std::fflush(stdout);
  stats.generated += int64_t(out.size());
  stats.decode_ms += ms_since(t1);
  return out;
}

void print_stats(const Stats& s) {
  double ttft = s.prefill_ms;
  double decode_tps = s.generated > 1 ? double(s.generated - 1) * 1000.0 / s.decode_ms : 0.0;
  std::fprintf(stderr, "\n[q35jit] prompt %lld tokens, time to first token %.1f ms (%.1f tok/s prefill); "
               "generated %lld tokens, %.1f tok/s\n",
               (long long)s.prompt_tokens, ttft, s.prompt_tokens * 1000.0 / std::max(ttft, 1e-9),
               (long long)s.generated, decode_tps);
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("--prompt-file {}: cannot read the file", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

int cmd_run(int argc, char** argv) {
  Args args("run", run_flags(), argc, argv, 2);
  if (args.help()) {
    std::printf("usage: q35jit run --model DIR [--prompt TEXT | --prompt-file F] [--chat] [flags]\n\n%s",
                args.usage().c_str());
    return 0;
  }
  const std::string dir = args.require("model");
  if (args.has("prompt") && args.has("prompt-file")) fail("q35jit run: give --prompt or --prompt-file, not both");
  std::optional<std::string> prompt = args.get("prompt");
  if (auto f = args.get("prompt-file")) prompt = read_text_file(*f);
  const bool chat = args.flag("chat");
  if (!prompt && !chat) fail("q35jit run: give --prompt, --prompt-file or --chat");
  if (!chat && (args.has("system") || args.has("no-think"))) fail("q35jit run: --system and --no-think need --chat");

  auto t_load = std::chrono::steady_clock::now();
  ModelInfo info = load_model_info(dir);
  Tokenizer tok = load_tokenizer(info.dir);
  auto log = [](const std::string& line) { std::fprintf(stderr, "[q35jit] %s\n", line.c_str()); };
  std::unique_ptr<Engine> engine = make_engine(args, info, 32768, log);
  std::fprintf(stderr, "[q35jit] loaded %s in %.0f ms (%lld layers, %lld experts top-%lld, device %s)\n", dir.c_str(),
               ms_since(t_load), (long long)info.config.num_layers, (long long)info.config.num_experts,
               (long long)info.config.num_experts_per_tok, engine->device().c_str());

  const auto& gen = info.generation;
  SamplingParams sp;
  sp.temperature = float(args.get_double("temperature", gen.do_sample ? gen.temperature : 0.0));
  if (!(sp.temperature >= 0)) fail("q35jit run: --temperature must be >= 0 (0 = greedy), got {}", sp.temperature);
  sp.top_k = int(args.get_int("top-k", gen.top_k, 0, int64_t(1) << 30));
  sp.top_p = float(args.get_double("top-p", gen.top_p));
  if (args.has("seed")) {
    sp.seed = uint64_t(args.get_int("seed", 0, 0, INT64_MAX));
  } else {
    sp.seed = std::random_device{}();
    if (sp.temperature > 0) std::fprintf(stderr, "[q35jit] seed %llu\n", (unsigned long long)sp.seed);
  }
  Sampler sampler(sp);
  const int64_t max_new = args.get_int("max-new-tokens", 256, 1, int64_t(1) << 30);
  const int64_t max_context = engine->max_context();
  const std::vector<int32_t> stop_ids = qwen35::stop_token_ids(tok, gen);
  const bool thinking = !args.flag("no-think");

  Stats stats;
  auto check_fits = [&](size_t n) {
    if (engine->position() + int64_t(n) > max_context)
      fail("context overflow: the prompt needs {} tokens at position {}, --max-context is {}", n, engine->position(),
           max_context);
  };
  if (!chat) {
    std::vector<int32_t> ids = tok.encode(*prompt);
    if (ids.empty()) fail("q35jit run: the prompt is empty");
    check_fits(ids.size());
    generate(*engine, tok, ids, stop_ids, max_new, sampler, stats);
    print_stats(stats);
    return 0;
  }

  std::vector<qwen35::ChatMessage> first;
  if (auto sys = args.get("system")) first.push_back({"system", *sys});
  bool interactive = !prompt;
  bool first_turn = true;
  std::string line;
  while (true) {
    std::string user;
    if (interactive) {
      std::fputs(first_turn ? "> " : "\n> ", stderr);
      if (!std::getline(std::cin, line)) break;
      if (line.empty()) continue;
      user = line;
    } else {
      user = *prompt;
    }
    std::vector<qwen35::ChatMessage> turn = first_turn ? first : std::vector<qwen35::ChatMessage>{};
    turn.push_back({"user", user});
    // The model state already holds every earlier turn; only the new turn's tokens are fed.
    const std::string text =
        first_turn ? qwen35::render_chat(turn, true, thinking) : qwen35::render_next_turn(turn, thinking);
    std::vector<int32_t> ids = tok.encode(text);
    check_fits(ids.size());
    generate(*engine, tok, ids, stop_ids, max_new, sampler, stats);
    first_turn = false;
    if (!interactive) break;
  }
  print_stats(stats);
  return 0;
}

}  // namespace q35::cli
