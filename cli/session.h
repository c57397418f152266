#pragma once
// Loading a model folder for the CLI: config, generation config, tokenizer and the weights on
// the chosen device.
#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include "models/qwen35/config.h"
#include "models/qwen35/cpu_model.h"
#include "runtime/text/tokenizer.h"

namespace q35::cli {

enum class Device { Cpu, Cuda };

// Parses --device (cpu|cuda); absent: cpu.
Device parse_device(const std::string& command, const std::optional<std::string>& value);

// Config + generation config (+ tokenizer when with_tokenizer). Errors name the folder/file.
struct ModelInfo {
  std::filesystem::path dir;
  qwen35::Config config;
  qwen35::GenerationConfig generation;
};
ModelInfo load_model_info(const std::filesystem::path& dir);
Tokenizer load_tokenizer(const std::filesystem::path& dir);

// Validates the checkpoint against the config and loads it for `device`.
std::unique_ptr<qwen35::CpuModel> load_cpu_model(const ModelInfo& info);
// Throws the one-line error for devices this build cannot run yet.
void require_device_supported(const std::string& command, Device device);

// Milliseconds since `t0`.
inline double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace q35::cli
