#pragma once
// Loading a model folder for the CLI: config, generation config, tokenizer, and an Engine (sequence
// slots on the CPU reference or on the GPU) behind one interface.
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "autotune/tune_cache.h"
#include "cli/args.h"
#include "cli/engine.h"
#include "models/qwen35/config.h"
#include "models/qwen35/gpu_model.h"
#include "models/qwen35/gpu_weights.h"
#include "runtime/core/sampler.h"
#include "runtime/text/tokenizer.h"

namespace q35 {
struct DeviceInfo;
class Context;
}

namespace q35::cli {

struct ModelInfo {
  std::filesystem::path dir;
  qwen35::Config config;
  qwen35::GenerationConfig generation;
};
// Config + generation config. Errors name the folder / file.
ModelInfo load_model_info(const std::filesystem::path& dir);
Tokenizer load_tokenizer(const std::filesystem::path& dir);

// The model of `bench` and `tune`: a checkpoint folder (--model DIR) or a published model's shapes
// with random weights (--synthetic NAME); exactly one (Error naming the command otherwise).
struct ModelSource {
  std::optional<ModelInfo> info;  // set for --model
  qwen35::Config config;
  std::string synthetic;          // the --synthetic name
  std::filesystem::path dir() const { return info ? info->dir : std::filesystem::path(); }
  std::string name() const { return info ? info->dir.string() : synthetic; }  // for output
};
ModelSource model_source(const Args& args);

// --quant and --group-size, checked against the config's shapes and, when `dir` holds a checkpoint
// written by `q35jit quantize`, against its format note (empty `dir`: a synthetic model).
struct WeightChoice {
  qwen35::WeightFormat format = qwen35::WeightFormat::W4A16;
  int group = 0;             // the kernels' format code (runtime/core/weight_format.h): W4A16 group, 0 bf16, kFp8Group
  bool prequantized = false;
};
WeightChoice weight_choice(const Args& args, const qwen35::Config& config, const std::filesystem::path& dir);

// Stops before loading, with one line saying what the model needs and what the GPU has, when the
// model (models/qwen35/memory.h) does not fit in the GPU's free memory. `name` names the model.
void check_gpu_memory(const Context& ctx, const qwen35::Config& config, const qwen35::GpuModelOptions& options,
                      const std::string& name);

// The flags every command that loads weights shares.
std::vector<FlagSpec> engine_flags();
// Builds the engine the flags ask for: --device (default: cuda when a GPU is found, else cpu),
// --quant, --group-size, --max-context, --verbose. `log` gets one-line notices. Both engines hold
// `max_batch` sequence slots (the CPU one allocates a slot's state on first use; the GPU one all of
// them at start, after checking they fit in free memory: an error names --max-batch / --max-context).
// max_chunk: the GPU's prefill tokens per forward call (its scratch is sized for them; 0: the
// model's default, 2048), capped by the context.
std::unique_ptr<Engine> make_engine(const Args& args, const ModelInfo& info, int64_t default_max_context,
                                    const std::function<void(const std::string&)>& log, int max_batch = 1,
                                    int64_t max_chunk = 0);
// Random weights of `config`'s shapes on the GPU (--synthetic); the same flags.
std::unique_ptr<Engine> make_synthetic_engine(const Args& args, const qwen35::Config& config,
                                              int64_t default_max_context,
                                              const std::function<void(const std::string&)>& log,
                                              int max_batch = 1, int64_t max_chunk = 0);
// The CPU reference engine of a model folder (what --device cpu builds without --quant fp8): max_batch
// slots of max_context tokens, the weights as stored.
std::unique_ptr<Engine> make_cpu_engine(const ModelInfo& info, int64_t max_context, int max_batch = 1);

// The folder of the running executable (/proc/self/exe), empty if unknown: shipped tune caches
// live in its tune_cache/ subfolder.
std::filesystem::path executable_dir();
// The tuned tile configs for `device` (autotune/tune_cache.h lookup order), each skipped file a
// notice through `log`; nullptr when `enabled` is false (--no-tune).
std::shared_ptr<const TuneTable> load_tuning(const DeviceInfo& device, bool enabled,
                                             const std::function<void(const std::string&)>& log);

inline double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace q35::cli
