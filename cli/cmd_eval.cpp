// q35jit eval: logits of a token sequence, written as fp32 [T, vocab] to a safetensors file.
#include <charconv>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "runtime/core/error.h"
#include "runtime/io/safetensors.h"

namespace q35::cli {

namespace {

std::vector<FlagSpec> eval_flags() {
  std::vector<FlagSpec> flags = {
      {"model", "DIR", "Hugging Face model folder"},
      {"tokens", "FILE", "whitespace-separated token ids"},
      {"out", "FILE", "output safetensors file: tensor \"logits\" fp32 [T, vocab]"},
      {"mode", "prefill|decode", "prefill: one forward over all tokens; decode: one token at a time (default prefill)"},
  };
  for (FlagSpec f : engine_flags()) flags.push_back(std::move(f));
  return flags;
}

std::vector<int32_t> read_token_file(const std::string& path, int64_t vocab) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("--tokens {}: cannot read the file", path);
  std::vector<int32_t> ids;
  std::string word;
  while (in >> word) {
    int64_t v = 0;
    auto [p, ec] = std::from_chars(word.data(), word.data() + word.size(), v);
    if (ec != std::errc() || p != word.data() + word.size())
      fail("--tokens {}: token {} is '{}', not an integer", path, ids.size(), word);
    if (v < 0 || v >= vocab)
      fail("--tokens {}: token {} is id {}, outside the vocabulary [0, {})", path, ids.size(), v, vocab);
    ids.push_back(int32_t(v));
  }
  if (ids.empty()) fail("--tokens {}: no token ids in the file", path);
  return ids;
}

}  // namespace

int cmd_eval(int argc, char** argv) {
  Args args("eval", eval_flags(), argc, argv, 2);
  if (args.help()) {
    std::printf("usage: q35jit eval --model DIR --tokens FILE --out FILE [--mode prefill|decode] [--device cpu|cuda]\n\n%s",
                args.usage().c_str());
    return 0;
  }
  const std::string dir = args.require("model");
  const std::string tokens_path = args.require("tokens");
  const std::string out_path = args.require("out");
  const std::string mode = args.get("mode").value_or("prefill");
  if (mode != "prefill" && mode != "decode") fail("q35jit eval: --mode must be prefill or decode, got '{}'", mode);

  ModelInfo info = load_model_info(dir);
  const int64_t vocab = info.config.vocab_size;
  std::vector<int32_t> ids = read_token_file(tokens_path, vocab);
  auto log = [](const std::string& line) { std::fprintf(stderr, "[q35jit] %s\n", line.c_str()); };
  std::unique_ptr<Engine> engine = make_engine(args, info, int64_t(ids.size()), log);

  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits;  // [T, vocab]
  if (mode == "prefill") {
    logits = engine->logits(ids, /*all=*/true);
  } else {
    logits.reserve(ids.size() * size_t(vocab));
    for (int32_t id : ids) {
      std::vector<float> row = engine->logits(std::span<const int32_t>(&id, 1), false);
      logits.insert(logits.end(), row.begin(), row.end());
    }
  }
  const double ms = ms_since(t0);
  write_safetensors(out_path,
                    {{"logits", DType::F32, {int64_t(ids.size()), vocab},
                      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(logits.data()), logits.size() * 4)}},
                    {{"mode", mode}, {"device", engine->device()}, {"model", dir}});
  std::fprintf(stderr, "[q35jit] eval %s: %zu tokens in %.1f ms, wrote %s\n", mode.c_str(), ids.size(), ms,
               out_path.c_str());
  return 0;
}

}  // namespace q35::cli
