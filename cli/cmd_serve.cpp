// q35jit serve: the OpenAI-compatible HTTP server (server/) over one engine (continuous batching
// over its sequence slots: server/scheduler.h). Blocks SIGINT and
// SIGTERM in every thread and waits for them in one, so a signal stops the server cleanly.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "models/qwen35/chat.h"
#include "runtime/core/error.h"
#include "server/api.h"
#include "server/http_server.h"
#include "server/scheduler.h"

namespace q35::cli {

namespace {

std::vector<FlagSpec> serve_flags() {
  std::vector<FlagSpec> flags = {
      {"model", "DIR", "Hugging Face model folder (config.json, safetensors, tokenizer.json)"},
      {"synthetic", "NAME", "random weights of a published model's shapes instead (35b-a3b; GPU), for load tests"},
      {"tokenizer", "DIR", "with --synthetic: the folder holding tokenizer.json"},
      {"host", "ADDR", "address to bind (default 127.0.0.1; 0.0.0.0 for every interface)"},
      {"port", "N", "TCP port (default 8080; 0: any free port, printed)"},
      {"api-key", "KEY", "require 'Authorization: Bearer KEY' on /v1/* (default: no key)"},
      {"served-name", "NAME", "the model name clients send (default: the model folder's name)"},
      {"max-queue", "N", "requests that may wait for the engine; more get 503 (default 64)"},
      {"prefix-cache-gpu-gb", "G",
       "GPU memory for the prefix cache in GiB, its first tier (default: half the GPU memory free once the model and "
       "its slots are allocated; 0 = none; --device cuda only)"},
      {"prefix-cache-gb", "G",
       "host memory for the prefix cache in GiB (pinned on the GPU): where the GPU tier spills its least recently "
       "used entries, and the CPU engine's only tier (default 4; with --prefix-cache-gpu-gb 0 too: no prefix cache)"},
      {"prefix-cache-block", "N",
       "also snapshot the recurrent state every N prompt tokens, for prompts that share a long start; each snapshot "
       "ends a prefill step (default 0: only at the start of a chat's last turn and at the end of a sequence)"},
      {"prefill-chunk", "N",
       "prompt tokens per prefill step while other sequences decode, and at most this many between two of their "
       "decode steps; a gone client is noticed between steps (default 512)"},
      {"idle-prefill-chunk", "N",
       "prompt tokens per prefill step while no sequence decodes (default 4096 on the GPU, capped by --max-context: "
       "one long call is faster than several short ones, and the prefill scratch is sized for it; --prefill-chunk on "
       "the CPU)"},
      {"max-batch", "N",
       "sequences decoded together, 1..1024 (default 16; each takes a slot of --max-context tokens: on the GPU "
       "all slots are allocated at start and must fit in free memory)"},
      {"max-request-bytes", "N", "largest request body; larger gets 413 (default 8388608)"},
      {"max-connections", "N", "open connections; more get 503 (default 256)"},
      {"gpu", "N",
       "which GPU, counted among those CUDA_VISIBLE_DEVICES shows (default 0); sets CUDA_VISIBLE_DEVICES before the "
       "driver starts"},
  };
  for (FlagSpec f : engine_flags()) flags.push_back(std::move(f));
  return flags;
}

std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The model folder's chat template: chat_template.jinja, else tokenizer_config.json's
// chat_template (a string, or the "default" of a list of {name, template}).
std::optional<std::string> folder_chat_template(const std::filesystem::path& dir) {
  if (std::filesystem::exists(dir / "chat_template.jinja")) return read_file(dir / "chat_template.jinja");
  if (!std::filesystem::exists(dir / "tokenizer_config.json")) return std::nullopt;
  auto j = nlohmann::json::parse(read_file(dir / "tokenizer_config.json"), nullptr, false);
  if (j.is_discarded() || !j.contains("chat_template")) return std::nullopt;
  const auto& t = j["chat_template"];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_array())
    for (const auto& e : t)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
        return e["template"].get<std::string>();
  return std::nullopt;
}

}  // namespace

int cmd_serve(int argc, char** argv) {
  Args args("serve", serve_flags(), argc, argv, 2);
  if (args.help()) {
    std::printf(
        "usage: q35jit serve (--model DIR | --synthetic 35b-a3b --tokenizer DIR) [flags]\n\n"
        "An OpenAI-compatible server: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,\n"
        "GET /health, GET /metrics (Prometheus), POST /tokenize. One line per request on stderr.\n\n%s",
        args.usage().c_str());
    return 0;
  }
  if (args.has("model") == args.has("synthetic")) fail("q35jit serve: give --model DIR or --synthetic NAME");
  if (args.has("synthetic") != args.has("tokenizer"))
    fail("q35jit serve: --tokenizer DIR goes with --synthetic (a --model folder has its own tokenizer)");
  auto log = [](const std::string& line) { std::fprintf(stderr, "[q35jit] %s\n", line.c_str()); };
  if (args.has("gpu")) {  // the engine opens device 0: make the chosen one the only visible device
    const int64_t gpu = args.get_int("gpu", 0, 0, 1023);
    std::vector<std::string> visible;
    if (const char* v = std::getenv("CUDA_VISIBLE_DEVICES"); v && *v) {
      std::stringstream ss(v);
      for (std::string d; std::getline(ss, d, ',');) visible.push_back(d);
      if (gpu >= int64_t(visible.size()))
        fail("q35jit serve: --gpu {}: CUDA_VISIBLE_DEVICES={} shows {} device(s)", gpu, v, visible.size());
    }
    const std::string chosen = visible.empty() ? std::to_string(gpu) : visible[size_t(gpu)];
    setenv("CUDA_VISIBLE_DEVICES", chosen.c_str(), 1);
  }

  // Signals: blocked here, before any thread starts, so only the waiting thread below sees them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  server::HttpOptions http;
  http.host = args.get("host").value_or("127.0.0.1");
  http.port = int(args.get_int("port", 8080, 0, 65535));
  http.max_body_bytes = size_t(args.get_int("max-request-bytes", 8 << 20, 1024, int64_t(1) << 32));
  http.max_connections = size_t(args.get_int("max-connections", 256, 1, 1 << 16));
  server::SchedulerOptions sched;
  sched.max_queue = size_t(args.get_int("max-queue", 64, 0, 1 << 20));
  // Prefix cache budgets (GiB): checked before loading; the GPU tier's default and its bound need the
  // loaded model (the memory it leaves free).
  auto gib = [&](const char* flag, double fallback) {
    const double g = args.get_double(flag, fallback);
    if (!(g >= 0) || !std::isfinite(g)) fail("q35jit serve: --{} must be a number of GiB >= 0, got {}", flag, g);
    return g;
  };
  const double host_gb = gib("prefix-cache-gb", 4.0);
  const std::optional<double> gpu_gb =
      args.has("prefix-cache-gpu-gb") ? std::optional<double>(gib("prefix-cache-gpu-gb", 0.0)) : std::nullopt;
  const double ram_gb = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE)) / double(1ull << 30);
  if (ram_gb > 0 && host_gb > ram_gb)
    fail("q35jit serve: --prefix-cache-gb {} is more than this machine's {:.1f} GiB of memory", host_gb, ram_gb);
  sched.snapshot_block = args.get_int("prefix-cache-block", 0, 0, int64_t(1) << 30);
  sched.prefill_chunk = args.get_int("prefill-chunk", 512, 1, int64_t(1) << 30);
  const int64_t idle_chunk = args.get_int("idle-prefill-chunk", 0, 1, int64_t(1) << 30);  // 0: not given
  sched.max_batch = int(args.get_int("max-batch", 16, 1, 1024));
  // The GPU's prefill scratch holds one call of --idle-prefill-chunk tokens (default 4096).
  const int64_t gpu_chunk = std::max(idle_chunk > 0 ? idle_chunk : 4096, sched.prefill_chunk);

  auto t_load = std::chrono::steady_clock::now();
  std::optional<ModelInfo> info;
  qwen35::GenerationConfig generation;
  std::unique_ptr<Engine> engine;
  std::optional<Tokenizer> tok;
  double tokenizer_ms = 0;
  auto load_tok = [&](const std::filesystem::path& dir) {
    const auto t = std::chrono::steady_clock::now();
    tok.emplace(load_tokenizer(dir));
    tokenizer_ms = ms_since(t);
  };
  std::string name;
  if (auto dir = args.get("model")) {
    info = load_model_info(*dir);
    generation = info->generation;
    load_tok(info->dir);
    auto tmpl = folder_chat_template(info->dir);
    if (!tmpl || !qwen35::is_qwen35_chat_template(*tmpl))
      log(fmt::format("notice: the chat template of {} {} the Qwen3.5 one; prompts are rendered in the Qwen3.5 "
                      "format (models/qwen35/chat)",
                      *dir, tmpl ? "differs from" : "is missing, not"));
    engine = make_engine(args, *info, 32768, log, sched.max_batch, gpu_chunk);
    name = std::filesystem::path(*dir).lexically_normal().filename().string();
    if (name.empty()) name = std::filesystem::path(*dir).lexically_normal().parent_path().filename().string();
  } else {
    const qwen35::Config config = qwen35::Config::preset(*args.get("synthetic"));
    load_tok(*args.get("tokenizer"));
    engine = make_synthetic_engine(args, config, 32768, log, sched.max_batch, gpu_chunk);
    name = "synthetic-" + *args.get("synthetic");
  }
  name = args.get("served-name").value_or(name);
  // The prefix cache's tiers: GPU memory first (default half of what the model and its slots left
  // free), then host memory (pinned on the GPU), reserved as the cache fills.
  const bool has_device = engine->device() != "cpu";
  if (gpu_gb && *gpu_gb > 0 && !has_device)
    fail("q35jit serve: --prefix-cache-gpu-gb applies to --device cuda; the CPU engine keeps its prefix cache in "
         "host memory (--prefix-cache-gb)");
  const size_t gpu_free = engine->device_free_bytes();
  if (gpu_gb && *gpu_gb * double(1ull << 30) > double(gpu_free))
    fail("q35jit serve: --prefix-cache-gpu-gb {} is more than the {:.1f} GiB of GPU memory free once the model and "
         "its {} slots are allocated",
         *gpu_gb, double(gpu_free) / double(1ull << 30), engine->max_batch());
  const size_t gpu_bytes = gpu_gb ? size_t(*gpu_gb * double(1ull << 30)) : gpu_free / 2;
  const size_t host_bytes = size_t(host_gb * double(1ull << 30));
  engine->set_state_memory(gpu_bytes, host_bytes);
  sched.idle_prefill_chunk = idle_chunk > 0 ? idle_chunk : engine->idle_prefill_tokens();
  const double G = double(1ull << 30);
  if (gpu_bytes + host_bytes == 0)
    log("prefix cache: off");
  else if (has_device)
    log(fmt::format("prefix cache: {:.2f} GiB of GPU memory, then {:.2f} GiB of pinned host memory", double(gpu_bytes) / G,
                    double(host_bytes) / G));
  else
    log(fmt::format("prefix cache: {:.2f} GiB of host memory", double(host_bytes) / G));
  log(fmt::format("loaded {} in {:.0f} ms (tokenizer {:.0f} ms; device {}, context {})", name, ms_since(t_load),
                  tokenizer_ms, engine->device(), engine->max_context()));

  server::Metrics metrics;
  server::Scheduler scheduler(*engine, *tok, qwen35::stop_token_ids(*tok, generation), sched, metrics, log);
  server::Api api({*tok, generation, name, engine->max_context()}, scheduler, metrics,
                  args.get("api-key").value_or(""), log);
  server::HttpServer server(http, api);
  // Tests and scripts read this line for the port.
  std::fprintf(stderr, "[q35jit] serving %s on http://%s:%d\n", name.c_str(), http.host.c_str(), server.port());

  std::atomic<bool> stop{false};
  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    stop = true;
  });
  server.run(stop);
  waiter.join();
  log("stopped");
  return 0;
}

}  // namespace q35::cli
