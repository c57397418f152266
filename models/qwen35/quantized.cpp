#include "models/qwen35/quantized.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/core/half.h"
#include "runtime/core/int4_format.h"
#include "runtime/io/json_file.h"
#include "runtime/io/safetensors.h"

namespace q35::qwen35 {

namespace fs = std::filesystem;

namespace {

// The weight kind used in reports: "experts.down_proj", "self_attn.q_proj", "lm_head", ...
std::string weight_kind(const std::string& name) {
  if (name == "lm_head.weight") return "lm_head";
  std::string stem = name.size() > 7 && name.ends_with(".weight") ? name.substr(0, name.size() - 7) : name;
  const size_t last = stem.rfind('.');
  size_t before = last == std::string::npos ? std::string::npos : stem.rfind('.', last - 1);
  std::string parent = before == std::string::npos ? "" : stem.substr(before + 1, last - before - 1);
  if (!parent.empty() && std::all_of(parent.begin(), parent.end(), ::isdigit)) parent = "experts";  // per-expert
  return parent + "." + stem.substr(last + 1);
}

std::vector<TensorSpec> model_tensors(const Config& config, const CheckpointLayout& layout) {
  std::vector<TensorSpec> specs = expected_tensors(config, layout);
  if (config.tie_word_embeddings) specs.push_back({"lm_head.weight", {config.vocab_size, config.hidden_size}});
  return specs;
}

std::vector<int64_t> packed_shape(std::vector<int64_t> shape, int64_t divisor) {
  shape.back() /= divisor;
  return shape;
}

void check_tensor(const Checkpoint& ckpt, const std::string& name, DType dtype, const std::vector<int64_t>& shape) {
  TensorRef t = ckpt.get(name);
  if (t.info->dtype != dtype || t.info->shape != shape)
    fail("tensor {}: expected [{}] {}, found [{}] {} in {}", name, fmt::join(shape, ", "), dtype_name(dtype),
         fmt::join(t.info->shape, ", "), dtype_name(t.info->dtype), t.file->path().string());
}

// Values [offset, offset + out.size()) of a checkpoint tensor as fp32.
void widen(const TensorRef& t, size_t offset, std::span<float> out) {
  const uint8_t* p = t.bytes.data();
  for (size_t i = 0; i < out.size(); ++i) {
    const size_t j = offset + i;
    switch (t.info->dtype) {
      case DType::BF16: out[i] = bf16_to_f32(uint16_t(p[2 * j] | (p[2 * j + 1] << 8))); break;
      case DType::F16: out[i] = f16_to_f32(uint16_t(p[2 * j] | (p[2 * j + 1] << 8))); break;
      case DType::F32: std::memcpy(&out[i], p + 4 * j, 4); break;
      default: fail("tensor {}: dtype {} cannot be quantized", t.info->name, dtype_name(t.info->dtype));
    }
  }
}

}  // namespace

std::optional<QuantNote> read_quant_note(const fs::path& config_json) {
  nlohmann::json j = read_json_file(config_json);
  if (!j.contains("q35jit_quantization")) return std::nullopt;
  const auto& q = j["q35jit_quantization"];
  QuantNote note;
  try {
    note.format = q.at("format").get<std::string>();
    note.version = q.at("version").get<int>();
    note.group_size = q.at("group_size").get<int>();
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed \"q35jit_quantization\": {}", config_json.string(), e.what());
  }
  if (note.format != "w4a16" || note.version != kQuantFormatVersion)
    fail("{}: quantized as {} version {}, this q35jit reads w4a16 version {}: quantize the original checkpoint again "
         "with `q35jit quantize`",
         config_json.string(), note.format, note.version, kQuantFormatVersion);
  return note;
}

bool is_quantized_weight(const std::string& name) {
  if (name == "lm_head.weight") return true;
  std::string stem = name.ends_with(".weight") ? name.substr(0, name.size() - 7) : name;
  const size_t last = stem.rfind('.');
  const std::string leaf = last == std::string::npos ? stem : stem.substr(last + 1);
  return leaf.find("_proj") != std::string::npos;
}

void check_group_size(const Config& config, int group) {
  if (group != 32 && group != 64 && group != 128) fail("--group-size must be 32, 64 or 128, got {}", group);
  for (const TensorSpec& t : model_tensors(config, CheckpointLayout{"model.", ExpertLayout::Fused}))
    if (is_quantized_weight(t.name) && t.shape.back() % group != 0)
      fail("--group-size {} does not divide K = {} of {}: use a group size that divides it", group, t.shape.back(),
           weight_kind(t.name));
}

int default_group_size(const Config& config) {
  for (int g : {128, 64, 32}) {
    bool ok = true;
    for (const TensorSpec& t : model_tensors(config, CheckpointLayout{"model.", ExpertLayout::Fused}))
      ok = ok && (!is_quantized_weight(t.name) || t.shape.back() % g == 0);
    if (ok) return g;
  }
  fail("no W4A16 group size (128, 64, 32) divides every projection's K of this model; use --quant bf16");
}

void validate_quantized_checkpoint(const Config& config, const Checkpoint& ckpt, int group) {
  const CheckpointLayout layout = detect_layout(ckpt);
  for (const TensorSpec& t : model_tensors(config, layout)) {
    if (!is_quantized_weight(t.name)) {
      TensorRef r = ckpt.get(t.name);
      if (r.info->shape != t.shape)
        fail("tensor {}: expected shape [{}], found [{}] in {}", t.name, fmt::join(t.shape, ", "),
             fmt::join(r.info->shape, ", "), r.file->path().string());
      continue;
    }
    check_tensor(ckpt, t.name + ".qweight", DType::U32, packed_shape(t.shape, 8));
    check_tensor(ckpt, t.name + ".scales", DType::BF16, packed_shape(t.shape, group));
  }
}

QuantizeReport quantize_checkpoint(const fs::path& src, const fs::path& dst, int group, int threads,
                                   const std::function<void(int64_t, int64_t)>& progress) {
  const Config config = Config::from_file(src / "config.json");
  if (read_quant_note(src / "config.json")) fail("{} is already quantized; quantize the original checkpoint", src.string());
  check_group_size(config, group);
  Checkpoint ckpt(src);
  validate_checkpoint(config, ckpt);
  const CheckpointLayout layout = detect_layout(ckpt);
  const std::vector<TensorSpec> specs = model_tensors(config, layout);

  fs::create_directories(dst);
  if (fs::exists(dst / "model.safetensors")) fail("{} already holds a model.safetensors", dst.string());
  std::vector<TensorDecl> decls;
  for (const TensorSpec& t : specs) {
    const std::string from = t.name == "lm_head.weight" && config.tie_word_embeddings
                                 ? layout.prefix + "embed_tokens.weight" : t.name;
    if (is_quantized_weight(t.name)) {
      decls.push_back({t.name + ".qweight", DType::U32, packed_shape(t.shape, 8)});
      decls.push_back({t.name + ".scales", DType::BF16, packed_shape(t.shape, group)});
    } else {
      decls.push_back({t.name, ckpt.get(from).info->dtype, t.shape});
    }
  }
  SafetensorsWriter out(dst / "model.safetensors", decls,
                        {{"format", "pt"}, {"q35jit_quantization", fmt::format("w4a16 v{} g{}", kQuantFormatVersion, group)}});
  QuantizeReport report;
  std::map<std::string, std::pair<double, double>> err;
  int64_t done = 0;
  for (const TensorSpec& t : specs) {
    const std::string from = t.name == "lm_head.weight" && config.tie_word_embeddings
                                 ? layout.prefix + "embed_tokens.weight" : t.name;
    TensorRef r = ckpt.get(from);
    report.bytes_in += r.bytes.size();
    if (!is_quantized_weight(t.name)) {
      out.write(t.name, r.bytes);
      report.bytes_out += r.bytes.size();
    } else {
      const int64_t K = t.shape.back();
      int64_t rows = 1;
      for (size_t i = 0; i + 1 < t.shape.size(); ++i) rows *= t.shape[i];
      std::vector<uint32_t> qweight(size_t(rows * K / 8));
      std::vector<uint16_t> scales(size_t(rows * K / group));
      // Row chunks on `threads` threads: widen to fp32, quantize, place the packed rows.
      const int64_t chunk = std::max<int64_t>(1, (1 << 20) / K);
      std::atomic<int64_t> next{0};
      auto worker = [&] {
        std::vector<float> w;
        for (int64_t r0; (r0 = next.fetch_add(chunk)) < rows;) {
          const int64_t n = std::min(chunk, rows - r0);
          w.resize(size_t(n * K));
          widen(r, size_t(r0 * K), w);
          int4::Quantized q = int4::quantize(w, n, K, group);
          std::copy(q.qweight.begin(), q.qweight.end(), qweight.begin() + r0 * K / 8);
          std::copy(q.scales.begin(), q.scales.end(), scales.begin() + r0 * K / group);
        }
      };
      {
        std::vector<std::jthread> pool;
        for (int i = 1; i < threads; ++i) pool.emplace_back(worker);
        worker();
      }
      // The relative error, sampled on the first 64 rows.
      const int64_t sample = std::min<int64_t>(64, rows);
      std::vector<float> w(size_t(sample * K));
      widen(r, 0, w);
      int4::Quantized q{{qweight.begin(), qweight.begin() + sample * K / 8},
                        {scales.begin(), scales.begin() + sample * K / group}};
      std::vector<float> back = int4::dequantize(q, sample, K, group);
      auto& e = err[weight_kind(t.name)];
      for (size_t i = 0; i < w.size(); ++i) {
        e.first += double(back[i] - w[i]) * (back[i] - w[i]);
        e.second += double(w[i]) * w[i];
      }
      const auto qb = std::as_bytes(std::span(qweight));
      const auto sb = std::as_bytes(std::span(scales));
      out.write(t.name + ".qweight", {reinterpret_cast<const uint8_t*>(qb.data()), qb.size()});
      out.write(t.name + ".scales", {reinterpret_cast<const uint8_t*>(sb.data()), sb.size()});
      report.bytes_out += qb.size() + sb.size();
    }
    r.file->release(*r.info);
    ++report.tensors;
    if (progress) progress(++done, int64_t(specs.size()));
  }
  out.commit();
  for (const auto& [kind, e] : err) report.rel_error[kind] = std::sqrt(e.first / std::max(e.second, 1e-30));

  // config.json with the note; the tokenizer and generation files as they are.
  nlohmann::json cfg = read_json_file(src / "config.json");
  cfg["q35jit_quantization"] = {{"format", "w4a16"}, {"version", kQuantFormatVersion}, {"group_size", group}};
  std::ofstream(dst / "config.json") << cfg.dump(2) << "\n";
  for (const char* f : {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                        "special_tokens_map.json", "vocab.json", "merges.txt"})
    if (fs::exists(src / f)) fs::copy_file(src / f, dst / f, fs::copy_options::overwrite_existing);
  return report;
}

}  // namespace q35::qwen35
