// q35jit: command-line entry point. Each subcommand parses its flags, then calls into models/
// and runtime/. Every failure below main() is a q35::Error, printed here as one line.
#include <cstdio>
#include <exception>
#include <string_view>

#include <fmt/format.h>

#include "cli/commands.h"
#include "runtime/core/error.h"

namespace {

constexpr std::string_view kUsage =
    "q35jit: a JIT-compiled (NVRTC) inference runtime for Qwen3.5 MoE models\n"
    "\n"
    "usage: q35jit <command> [flags]\n"
    "\n"
    "commands:\n"
    "  run       generate text from a prompt, or chat interactively\n"
    "  eval      write the logits of a token sequence to a safetensors file\n"
    "  compile   compile (and cache) every kernel a checkpoint needs, no GPU required\n"
    "  quantize  write a W4A16 checkpoint that run/eval load directly\n"
    "  bench     prefill and decode speed on the GPU (a checkpoint or --synthetic 35b-a3b|122b-a10b|397b-a17b)\n"
    "  tune      measure the best tile configs per prompt length into this GPU's tune cache\n"
    "  serve     an OpenAI-compatible HTTP server (chat completions, completions, tools, streaming)\n"
    "\n"
    "Run 'q35jit <command> --help' for the flags of a command.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kUsage.data(), stderr);
    return 2;
  }
  std::string_view command = argv[1];
  try {
    if (command == "-h" || command == "--help" || command == "help") {
      std::fputs(kUsage.data(), stdout);
      return 0;
    }
    if (command == "run") return q35::cli::cmd_run(argc, argv);
    if (command == "eval") return q35::cli::cmd_eval(argc, argv);
    if (command == "compile") return q35::cli::cmd_compile(argc, argv);
    if (command == "quantize") return q35::cli::cmd_quantize(argc, argv);
    if (command == "bench") return q35::cli::cmd_bench(argc, argv);
    if (command == "tune") return q35::cli::cmd_tune(argc, argv);
    if (command == "serve") return q35::cli::cmd_serve(argc, argv);
    std::fprintf(stderr, "q35jit: unknown command '%.*s'\n\n%s", int(command.size()), command.data(), kUsage.data());
    return 2;
  } catch (const q35::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "internal error: %s\n", e.what());
    return 3;
  }
}
