#include "models/qwen35/quantized.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

#include "models/qwen35/hf_quant.h"
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

void check_fp8_shapes(const Config& config) {
  for (const TensorSpec& t : model_tensors(config, CheckpointLayout{"model.", ExpertLayout::Fused}))
    if (is_quantized_weight(t.name) && t.shape.back() % 64 != 0)
      fail("--quant fp8 needs K a multiple of 64, but {} has K = {}: use --quant w4a16 or bf16", weight_kind(t.name),
           t.shape.back());
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
    // F16 scales: GPTQ experts mapped exactly (models/qwen35/hf_quant.h).
    const DType scale_dtype = ckpt.has(t.name + ".scales") && ckpt.get(t.name + ".scales").info->dtype == DType::F16
                                  ? DType::F16 : DType::BF16;
    check_tensor(ckpt, t.name + ".scales", scale_dtype, packed_shape(t.shape, group));
  }
}

QuantizeReport quantize_checkpoint(const fs::path& src, const fs::path& dst, int group, int threads,
                                   const std::function<void(int64_t, int64_t)>& progress) {
  const Config config = Config::from_file(src / "config.json");
  if (read_quant_note(src / "config.json")) fail("{} is already quantized; quantize the original checkpoint", src.string());
  check_group_size(config, group);
  Checkpoint ckpt(src);
  validate_checkpoint(config, ckpt);
  const HfQuant quant = HfQuant::of(ckpt);
  const CheckpointLayout layout = detect_layout(ckpt);
  const std::vector<TensorSpec> specs = model_tensors(config, layout);
  // The checkpoint tensor each output tensor comes from (a tied lm_head from the embeddings), and
  // its logical shape there.
  auto source = [&](const TensorSpec& t) {
    return t.name == "lm_head.weight" && config.tie_word_embeddings ? layout.prefix + "embed_tokens.weight" : t.name;
  };

  fs::create_directories(dst);
  if (fs::exists(dst / "model.safetensors")) fail("{} already holds a model.safetensors", dst.string());
  std::vector<TensorDecl> decls;
  std::vector<Storage> storage;
  for (const TensorSpec& t : specs) {
    const Storage st = check_weight(ckpt, quant, source(t), t.shape);
    storage.push_back(st);
    if (is_quantized_weight(t.name)) {
      if (st == Storage::GPTQ && gptq_group_of(quant, t.shape) != group)
        fail("tensor {}: GPTQ group size {} differs from --group-size {}: its codes map exactly only at its own group "
             "size",
             t.name, gptq_group_of(quant, t.shape), group);
      decls.push_back({t.name + ".qweight", DType::U32, packed_shape(t.shape, 8)});
      decls.push_back({t.name + ".scales", st == Storage::GPTQ ? DType::F16 : DType::BF16, packed_shape(t.shape, group)});
    } else {
      // Float tensors are copied as stored; a dequantized one is written as fp32 (exact).
      decls.push_back({t.name, st == Storage::Float ? ckpt.get(source(t)).info->dtype : DType::F32, t.shape});
    }
  }
  SafetensorsWriter out(dst / "model.safetensors", decls,
                        {{"format", "pt"}, {"q35jit_quantization", fmt::format("w4a16 v{} g{}", kQuantFormatVersion, group)}});
  QuantizeReport report;
  std::map<std::string, std::pair<double, double>> err;
  auto bytes_of = [](const auto& v) {
    const auto b = std::as_bytes(std::span(v));
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.data()), b.size());
  };
  int64_t done = 0;
  for (size_t ti = 0; ti < specs.size(); ++ti) {
    const TensorSpec& t = specs[ti];
    const std::string from = source(t);
    const std::string module = from.ends_with(".weight") ? from.substr(0, from.size() - 7) : from;
    for (const std::string& n : {from, module + ".weight_scale_inv", module + ".qweight", module + ".qzeros",
                                 module + ".scales", module + ".g_idx"})
      if (ckpt.has(n)) report.bytes_in += ckpt.get(n).bytes.size();
    if (!is_quantized_weight(t.name)) {
      if (storage[ti] == Storage::Float) {
        const TensorRef r = ckpt.get(from);
        out.write(t.name, r.bytes);
        report.bytes_out += r.bytes.size();
      } else {
        const std::vector<float> f = read_weight_f32(ckpt, quant, from, t.shape);
        out.write(t.name, bytes_of(f));
        report.bytes_out += f.size() * 4;
      }
    } else if (storage[ti] == Storage::GPTQ) {
      // Codes and fp16 scales as they are: exact (rel_error 0 by construction).
      const GptqInt4 g = read_gptq_int4(ckpt, quant, from, t.shape);
      out.write(t.name + ".qweight", bytes_of(g.qweight));
      out.write(t.name + ".scales", bytes_of(g.scales_f16));
      report.bytes_out += g.qweight.size() * 4 + g.scales_f16.size() * 2;
      err.try_emplace(weight_kind(t.name) + " (gptq, exact)", std::pair<double, double>{0.0, 1.0});
    } else {
      const int64_t K = t.shape.back();
      int64_t rows = 1;
      for (size_t i = 0; i + 1 < t.shape.size(); ++i) rows *= t.shape[i];
      // fp32 values: widened from the shard as needed (float), or dequantized once (FP8) and rounded
      // to bf16, as the GPU path quantizes them while loading (so both give the same checkpoint).
      std::vector<float> dequantized =
          storage[ti] == Storage::Float ? std::vector<float>() : read_weight_f32(ckpt, quant, from, t.shape);
      for (float& v : dequantized) v = round_bf16(v);
      const TensorRef r = storage[ti] == Storage::Float ? ckpt.get(from) : TensorRef{};
      auto widen = [&](size_t offset, std::span<float> w) {
        if (!dequantized.empty()) {
          std::copy_n(dequantized.begin() + std::ptrdiff_t(offset), w.size(), w.begin());
          return;
        }
        const uint8_t* p = r.bytes.data();
        for (size_t i = 0; i < w.size(); ++i) {
          const size_t j = offset + i;
          switch (r.info->dtype) {
            case DType::BF16: w[i] = bf16_to_f32(uint16_t(p[2 * j] | (p[2 * j + 1] << 8))); break;
            case DType::F16: w[i] = f16_to_f32(uint16_t(p[2 * j] | (p[2 * j + 1] << 8))); break;
            default: std::memcpy(&w[i], p + 4 * j, 4); break;  // F32 (check_weight admits float dtypes only)
          }
        }
      };
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
          widen(size_t(r0 * K), w);
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
      widen(0, w);
      int4::Quantized q{{qweight.begin(), qweight.begin() + sample * K / 8},
                        {scales.begin(), scales.begin() + sample * K / group}};
      std::vector<float> back = int4::dequantize(q, sample, K, group);
      auto& e = err[weight_kind(t.name)];
      for (size_t i = 0; i < w.size(); ++i) {
        e.first += double(back[i] - w[i]) * (back[i] - w[i]);
        e.second += double(w[i]) * w[i];
      }
      out.write(t.name + ".qweight", bytes_of(qweight));
      out.write(t.name + ".scales", bytes_of(scales));
      report.bytes_out += qweight.size() * 4 + scales.size() * 2;
    }
    release_weight(ckpt, from);
    ++report.tensors;
    if (progress) progress(++done, int64_t(specs.size()));
  }
  out.commit();
  for (const auto& [kind, e] : err) report.rel_error[kind] = std::sqrt(e.first / std::max(e.second, 1e-30));

  // config.json with the note (the source's quantization_config dropped: the weights are now ours);
  // the tokenizer and generation files as they are.
  nlohmann::json cfg = read_json_file(src / "config.json");
  cfg.erase("quantization_config");
  if (cfg.contains("text_config") && cfg["text_config"].is_object()) cfg["text_config"].erase("quantization_config");
  cfg["q35jit_quantization"] = {{"format", "w4a16"}, {"version", kQuantFormatVersion}, {"group_size", group}};
  std::ofstream(dst / "config.json") << cfg.dump(2) << "\n";
  for (const char* f : {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                        "special_tokens_map.json", "vocab.json", "merges.txt"})
    if (fs::exists(src / f)) fs::copy_file(src / f, dst / f, fs::copy_options::overwrite_existing);
  return report;
}

}  // namespace q35::qwen35
