#include "cli/session.h"

#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/io/safetensors.h"

namespace q35::cli {

namespace fs = std::filesystem;

Device parse_device(const std::string& command, const std::optional<std::string>& value) {
  if (!value || *value == "cpu") return Device::Cpu;
  if (*value == "cuda") return Device::Cuda;
  fail("q35jit {}: --device must be cpu or cuda, got '{}'", command, *value);
}

void require_device_supported(const std::string& command, Device device) {
  if (device == Device::Cuda)
    fail("q35jit {}: --device cuda: the GPU forward pass is not part of this build yet; use --device cpu", command);
}

ModelInfo load_model_info(const fs::path& dir) {
  if (!fs::exists(dir)) fail("model directory {} does not exist", dir.string());
  if (!fs::is_directory(dir)) fail("--model {} is not a directory", dir.string());
  ModelInfo info{dir, qwen35::Config::from_file(dir / "config.json"),
                 qwen35::GenerationConfig::from_file(dir / "generation_config.json")};
  return info;
}

Tokenizer load_tokenizer(const fs::path& dir) {
  fs::path path = dir / "tokenizer.json";
  if (!fs::exists(path)) fail("{}: no tokenizer.json in the model directory", path.string());
  return Tokenizer::from_file(path);
}

std::unique_ptr<qwen35::CpuModel> load_cpu_model(const ModelInfo& info) {
  Checkpoint ckpt(info.dir);
  qwen35::validate_checkpoint(info.config, ckpt);
  return std::make_unique<qwen35::CpuModel>(info.config, qwen35::load_host_weights(info.config, ckpt));
}

}  // namespace q35::cli
