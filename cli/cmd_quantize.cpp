// q35jit quantize: write a W4A16 checkpoint that `run` and `eval` load without quantizing again.
#include <chrono>
#include <cstdio>
#include <thread>

#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "models/qwen35/quantized.h"
#include "runtime/core/error.h"

namespace q35::cli {

namespace {
const std::vector<FlagSpec> kQuantizeFlags = {
    {"model", "DIR", "the original (bf16) Hugging Face model folder"},
    {"out", "DIR", "output folder (model.safetensors, config.json with the format note, tokenizer files)"},
    {"group-size", "G", "W4A16 group size along K: 32, 64 or 128 (default 128, or the largest dividing every K)"},
    {"threads", "N", "CPU threads (default: hardware threads)"},
};
}  // namespace

int cmd_quantize(int argc, char** argv) {
  Args args("quantize", kQuantizeFlags, argc, argv, 2);
  if (args.help()) {
    std::printf("usage: q35jit quantize --model DIR (bf16, FP8 or GPTQ-Int4) --out DIR2 [--group-size 32|64|128]\n\n%s", args.usage().c_str());
    return 0;
  }
  const std::string dir = args.require("model"), out = args.require("out");
  ModelInfo info = load_model_info(dir);
  if (qwen35::read_quant_note(info.dir / "config.json"))
    fail("{} is already quantized; quantize the original checkpoint", info.dir.string());
  // A GPTQ checkpoint's group size by default (its experts map exactly only at that size).
  const int group = weight_choice(args, info.config, info.dir).group;
  const int threads = int(args.get_int("threads", std::max(1u, std::thread::hardware_concurrency()), 1, 1024));
  auto t0 = std::chrono::steady_clock::now();
  const bool tty = ::isatty(2);  // a progress line only on a terminal
  qwen35::QuantizeReport r = qwen35::quantize_checkpoint(dir, out, group, threads, [&](int64_t done, int64_t total) {
    if (tty) std::fprintf(stderr, "\r[q35jit] quantizing: %lld / %lld tensors", (long long)done, (long long)total);
  });
  if (tty) std::fprintf(stderr, "\n");
  std::printf("wrote %s: %lld tensors, %.1f MB -> %.1f MB, W4A16 group %d, in %.1f s\n", out.c_str(),
              (long long)r.tensors, r.bytes_in / 1e6, r.bytes_out / 1e6, group, ms_since(t0) / 1000.0);
  for (const auto& [kind, e] : r.rel_error) std::printf("  %-28s relative error %.4f\n", kind.c_str(), e);
  return 0;
}

}  // namespace q35::cli
