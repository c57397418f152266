#include "models/qwen35/hf_quant.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"
#include "runtime/core/fp8_format.h"
#include "runtime/core/half.h"
#include "runtime/core/int4_format.h"
#include "runtime/io/json_file.h"
#include "runtime/io/safetensors.h"

namespace q35::qwen35 {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

// "X.weight" -> "X" (the module whose quantized tensors are X.qweight, X.weight_scale_inv, ...).
std::string module_of(const std::string& name) {
  return name.ends_with(".weight") ? name.substr(0, name.size() - 7) : name;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string file_of(const TensorRef& t) { return t.file->path().string(); }

// Error unless `t` has dtype `dtype` (or any float dtype when `dtype` is nullopt) and shape `shape`.
void expect(const Checkpoint& ckpt, const std::string& name, std::optional<DType> dtype,
            const std::vector<int64_t>& shape, const std::string& role) {
  if (!ckpt.has(name))
    fail("tensor \"{}\" ({}) [{}] not found in {}", name, role, fmt::join(shape, ", "), ckpt.source().string());
  const TensorRef t = ckpt.get(name);
  const bool dtype_ok = dtype ? t.info->dtype == *dtype : is_float(t.info->dtype);
  if (!dtype_ok || t.info->shape != shape)
    fail("tensor \"{}\" ({}): expected [{}] {}, found [{}] {} in {}", name, role, fmt::join(shape, ", "),
         dtype ? std::string(dtype_name(*dtype)) : "F32/F16/BF16", fmt::join(t.info->shape, ", "),
         dtype_name(t.info->dtype), file_of(t));
}

std::vector<int32_t> read_i32(const Checkpoint& ckpt, const std::string& name) {
  const TensorRef t = ckpt.get(name);
  std::vector<int32_t> v(t.bytes.size() / 4);
  std::memcpy(v.data(), t.bytes.data(), v.size() * 4);
  return v;
}

std::vector<uint16_t> read_u16(const Checkpoint& ckpt, const std::string& name) {
  const TensorRef t = ckpt.get(name);
  std::vector<uint16_t> v(t.bytes.size() / 2);
  std::memcpy(v.data(), t.bytes.data(), v.size() * 2);
  return v;
}

int64_t rows_of(const std::vector<int64_t>& shape) {
  int64_t r = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) r *= shape[i];
  return r;
}

}  // namespace

std::string HfQuant::describe() const {
  switch (method) {
    case QuantMethod::None: return "none";
    case QuantMethod::FP8: return fmt::format("fp8 e4m3, blocks {}x{}", fp8_block_n, fp8_block_k);
    case QuantMethod::GPTQ:
      return fmt::format("gptq int{} {} ({} zeros)", gptq_bits, gptq_group > 0 ? fmt::format("g{}", gptq_group) : "per column",
                         gptq_zero_offset ? "v1" : "v2");
  }
  return "?";
}

HfQuant HfQuant::from_config(const fs::path& config_json) {
  HfQuant q;
  q.file = config_json.string();
  const json root = read_json_file(config_json);
  const json* qc = nullptr;
  if (root.is_object()) {
    if (auto it = root.find("quantization_config"); it != root.end() && !it->is_null()) qc = &*it;
    else if (auto tc = root.find("text_config"); tc != root.end() && tc->is_object())
      if (auto it2 = tc->find("quantization_config"); it2 != tc->end() && !it2->is_null()) qc = &*it2;
  }
  if (!qc) return q;
  const std::string& file = q.file;
  if (!qc->is_object()) fail("{}: key \"quantization_config\": expected an object, found {}", file, qc->dump());
  auto str = [&](const char* key) -> std::optional<std::string> {
    auto it = qc->find(key);
    if (it == qc->end() || it->is_null()) return std::nullopt;
    if (!it->is_string()) fail("{}: quantization_config.{}: expected a string, found {}", file, key, it->dump());
    return it->get<std::string>();
  };
  auto integer = [&](const char* key) -> std::optional<int64_t> {
    auto it = qc->find(key);
    if (it == qc->end() || it->is_null()) return std::nullopt;
    if (!it->is_number_integer()) fail("{}: quantization_config.{}: expected an integer, found {}", file, key, it->dump());
    return it->get<int64_t>();
  };
  auto boolean = [&](const char* key) -> std::optional<bool> {
    auto it = qc->find(key);
    if (it == qc->end() || it->is_null()) return std::nullopt;
    if (!it->is_boolean()) fail("{}: quantization_config.{}: expected true or false, found {}", file, key, it->dump());
    return it->get<bool>();
  };

  const std::optional<std::string> method = str("quant_method");
  if (!method) fail("{}: quantization_config has no \"quant_method\" (supported: fp8, gptq)", file);
  if (*method == "fp8") {
    q.method = QuantMethod::FP8;
    if (auto fmt_ = str("fmt"); fmt_ && *fmt_ != "e4m3")
      fail("{}: quantization_config.fmt: expected \"e4m3\", found \"{}\"", file, *fmt_);
    if (auto act = str("activation_scheme"); act && *act != "dynamic")
      fail("{}: quantization_config.activation_scheme: \"{}\" is not supported (expected \"dynamic\"; weights are "
           "dequantized, activations stay bf16)",
           file, *act);
    if (boolean("weight_per_tensor") == true)
      fail("{}: quantization_config.weight_per_tensor: per-tensor FP8 scales are not supported (expected block-wise "
           "weight_scale_inv)",
           file);
    auto bs = qc->find("weight_block_size");
    if (bs == qc->end() || !bs->is_array() || bs->size() != 2 || !(*bs)[0].is_number_integer() ||
        !(*bs)[1].is_number_integer() || (*bs)[0].get<int64_t>() <= 0 || (*bs)[1].get<int64_t>() <= 0)
      fail("{}: quantization_config.weight_block_size: expected [block_n, block_k] (positive integers), found {}", file,
           bs == qc->end() ? "nothing" : bs->dump());
    q.fp8_block_n = (*bs)[0].get<int64_t>();
    q.fp8_block_k = (*bs)[1].get<int64_t>();
    return q;
  }
  if (*method == "gptq") {
    q.method = QuantMethod::GPTQ;
    const std::optional<int64_t> bits = integer("bits");
    if (bits != 4)
      fail("{}: quantization_config.bits: expected 4 (GPTQ-Int4), found {}", file, bits ? std::to_string(*bits) : "nothing");
    q.gptq_bits = 4;
    const std::optional<int64_t> group = integer("group_size");
    if (!group || (*group <= 0 && *group != -1))
      fail("{}: quantization_config.group_size: expected a positive group size or -1, found {}", file,
           group ? std::to_string(*group) : "nothing");
    q.gptq_group = *group;
    if (boolean("sym") == false)
      fail("{}: quantization_config.sym: asymmetric GPTQ is not supported (expected true)", file);
    if (boolean("desc_act") == true)
      fail("{}: quantization_config.desc_act: act-order GPTQ (desc_act true) is not supported (expected false)", file);
    if (boolean("is_marlin_format") == true)
      fail("{}: quantization_config.is_marlin_format: Marlin-packed GPTQ is not supported", file);
    if (auto pack = str("pack_dtype"); pack && *pack != "int32")
      fail("{}: quantization_config.pack_dtype: expected \"int32\", found \"{}\"", file, *pack);
    std::optional<std::string> format = str("checkpoint_format");
    if (!format) format = str("format");
    const std::string f = format.value_or("gptq");
    if (f == "gptq") q.gptq_zero_offset = 1;
    else if (f == "gptq_v2") q.gptq_zero_offset = 0;
    else fail("{}: quantization_config.checkpoint_format: expected \"gptq\" or \"gptq_v2\", found \"{}\"", file, f);
    if (auto dyn = qc->find("dynamic"); dyn != qc->end() && !dyn->is_null()) {
      if (!dyn->is_object()) fail("{}: quantization_config.dynamic: expected an object, found {}", file, dyn->dump());
      for (const auto& [key, value] : dyn->items())
        if (!key.starts_with("-:") && !(value.is_object() && value.empty()))
          fail("{}: quantization_config.dynamic[\"{}\"]: per-module overrides are not supported (only \"-:\" "
               "exclusions, whose modules stay unquantized)",
               file, key);
    }
    return q;
  }
  fail("{}: quantization_config.quant_method \"{}\" is not supported (supported: fp8, gptq)", file, *method);
}

HfQuant HfQuant::of(const Checkpoint& ckpt) {
  const fs::path cfg = ckpt.dir() / "config.json";
  if (!fs::exists(cfg)) return {};
  return from_config(cfg);
}

int64_t gptq_group_of(const HfQuant& quant, const std::vector<int64_t>& shape) {
  return quant.gptq_group > 0 ? quant.gptq_group : shape.back();
}

Storage check_weight(const Checkpoint& ckpt, const HfQuant& quant, const std::string& name,
                     const std::vector<int64_t>& shape) {
  const std::string module = module_of(name);
  if (ckpt.has(name)) {
    const TensorRef t = ckpt.get(name);
    if (t.info->dtype == DType::F8_E4M3) {
      if (quant.method != QuantMethod::FP8)
        fail("tensor \"{}\" in {} is F8_E4M3, but {} declares no fp8 quantization_config", name, file_of(t),
             quant.file.empty() ? "the model folder" : quant.file);
      if (shape.size() < 2 || !name.ends_with(".weight"))
        fail("tensor \"{}\" in {}: F8_E4M3 is supported for <module>.weight matrices only", name, file_of(t));
      if (t.info->shape != shape)
        fail("tensor \"{}\": expected [{}] F8_E4M3, found [{}] in {}", name, fmt::join(shape, ", "),
             fmt::join(t.info->shape, ", "), file_of(t));
      std::vector<int64_t> s = shape;
      s[s.size() - 2] = ceil_div(shape[shape.size() - 2], quant.fp8_block_n);
      s.back() = ceil_div(shape.back(), quant.fp8_block_k);
      expect(ckpt, module + ".weight_scale_inv", std::nullopt, s,
             fmt::format("the fp32 block scales of {}, blocks {}x{}", name, quant.fp8_block_n, quant.fp8_block_k));
      return Storage::FP8;
    }
    if (t.info->shape != shape || !is_float(t.info->dtype))
      fail("tensor \"{}\": expected [{}] F32/F16/BF16, found [{}] {} in {}", name, fmt::join(shape, ", "),
           fmt::join(t.info->shape, ", "), dtype_name(t.info->dtype), file_of(t));
    return Storage::Float;
  }
  if (ckpt.has(name + ".qweight")) {
    // Written by `q35jit quantize`: [.., N, K / 8] u32 and [.., N, K / G] bf16 (or f16: GPTQ scales).
    const TensorRef s = ckpt.get(name + ".scales");
    const int64_t groups = s.info->shape.empty() ? 0 : s.info->shape.back();
    const int64_t K = shape.back();
    if (groups <= 0 || K % groups != 0 || (K / groups) % 8 != 0 || (s.info->dtype != DType::BF16 && s.info->dtype != DType::F16))
      fail("tensor \"{}.scales\": expected [.., {}, K / G] BF16 or F16 with K = {} a multiple of G (a multiple of 8), "
           "found [{}] {} in {}",
           name, shape[shape.size() - 2], K, fmt::join(s.info->shape, ", "), dtype_name(s.info->dtype), file_of(s));
    std::vector<int64_t> packed = shape, scales = shape;
    packed.back() = K / 8;
    scales.back() = groups;
    expect(ckpt, name + ".qweight", DType::U32, packed, "packed INT4 weights");
    expect(ckpt, name + ".scales", s.info->dtype, scales, "INT4 scales");
    return Storage::Q35Int4;
  }
  if (name.ends_with(".weight") && ckpt.has(module + ".qweight")) {
    const TensorRef qw = ckpt.get(module + ".qweight");
    if (quant.method != QuantMethod::GPTQ)
      fail("tensor \"{}.qweight\" in {} is GPTQ-packed, but {} declares no gptq quantization_config", module,
           file_of(qw), quant.file.empty() ? "the model folder" : quant.file);
    if (shape.size() != 2)
      fail("tensor \"{}\": GPTQ weights must be 2-D matrices, expected shape [{}]", module, fmt::join(shape, ", "));
    const int64_t N = shape[0], K = shape[1], G = gptq_group_of(quant, shape);
    if (K % 8 != 0 || K % G != 0)
      fail("tensor \"{}.qweight\": K = {} must be a multiple of 8 and of the GPTQ group size {}", module, K, G);
    expect(ckpt, module + ".qweight", DType::I32, {K / 8, N}, fmt::format("GPTQ int4 weights of [{}, {}]", N, K));
    expect(ckpt, module + ".qzeros", DType::I32, {K / G, ceil_div(N, 8)}, fmt::format("GPTQ zeros, group {}", G));
    expect(ckpt, module + ".scales", DType::F16, {K / G, N}, fmt::format("GPTQ scales, group {}", G));
    if (ckpt.has(module + ".g_idx")) expect(ckpt, module + ".g_idx", DType::I32, {K}, "GPTQ group index");
    if (ckpt.has(module + ".bias"))
      fail("tensor \"{}.bias\" in {}: this model has no biases", module, file_of(ckpt.get(module + ".bias")));
    return Storage::GPTQ;
  }
  fail("tensor \"{}\" [{}] not found in {}{}", name, fmt::join(shape, ", "), ckpt.source().string(),
       name == "lm_head.weight" ? " (the config has tie_word_embeddings = false)" : "");
}

GptqInt4 gptq_repack(std::span<const int32_t> qweight, std::span<const int32_t> qzeros, std::span<const uint16_t> scales,
                     int64_t N, int64_t K, int64_t group, int zero_offset, const std::string& what) {
  if (N <= 0 || K <= 0 || K % 8 != 0 || group <= 0 || K % group != 0 || group % 8 != 0)
    fail("{}: GPTQ shape N = {}, K = {}, group {}: K must be a multiple of 8 and of the group, the group of 8", what, N,
         K, group);
  const int64_t G = K / group, zcols = ceil_div(N, 8);
  if (qweight.size() != size_t(K / 8 * N) || qzeros.size() != size_t(G * zcols) || scales.size() != size_t(G * N))
    fail("{}: GPTQ arrays of {} / {} / {} values do not match N = {}, K = {}, group {}", what, qweight.size(),
         qzeros.size(), scales.size(), N, K, group);
  GptqInt4 out{N, K, group, std::vector<uint32_t>(size_t(N * K / 8), 0u), std::vector<uint16_t>(size_t(N * G))};
  for (int64_t g = 0; g < G; ++g)
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t word = uint32_t(qzeros[size_t(g * zcols + n / 8)]);
      const int stored = int((word >> (4 * (n % 8))) & 0xfu);
      if (stored + zero_offset != 8)
        fail("{}.qzeros: zero point {} (stored {}) at group {}, column {}: a symmetric 4-bit GPTQ weight has zero point "
             "8 (stored 7 with checkpoint_format \"gptq\", 8 with \"gptq_v2\")",
             what, stored + zero_offset, stored, g, n);
      const uint16_t s = scales[size_t(g * N + n)];
      if (((s >> 10) & 0x1f) == 0x1f)
        fail("{}.scales: scale at group {}, column {} is not finite (fp16 0x{:04x})", what, g, n, s);
      out.scales_f16[size_t(n * G + g)] = s;
    }
  // GPTQ nibble j of qweight[i, n] is k = 8i + j; ours puts natural offset r in slot nibble_slot(r).
  for (int64_t i = 0; i < K / 8; ++i)
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t word = uint32_t(qweight[size_t(i * N + n)]);
      uint32_t ours = 0;
      for (int r = 0; r < 8; ++r) ours |= ((word >> (4 * r)) & 0xfu) << (4 * int4::nibble_slot(r));
      out.qweight[size_t(n * (K / 8) + i)] = ours;
    }
  return out;
}

std::vector<float> GptqInt4::scales_f32() const {
  std::vector<float> f(scales_f16.size());
  for (size_t i = 0; i < f.size(); ++i) f[i] = f16_to_f32(scales_f16[i]);
  return f;
}

std::vector<uint16_t> GptqInt4::scales_bf16() const {
  std::vector<uint16_t> b(scales_f16.size());
  for (size_t i = 0; i < b.size(); ++i) b[i] = f32_to_bf16(f16_to_f32(scales_f16[i]));
  return b;
}

GptqInt4 read_gptq_int4(const Checkpoint& ckpt, const HfQuant& quant, const std::string& name,
                        const std::vector<int64_t>& shape) {
  if (check_weight(ckpt, quant, name, shape) != Storage::GPTQ)
    fail("tensor \"{}\": expected GPTQ tensors ({}.qweight, .qzeros, .scales)", name, module_of(name));
  const std::string module = module_of(name);
  const int64_t N = shape[0], K = shape[1], group = gptq_group_of(quant, shape);
  if (ckpt.has(module + ".g_idx")) {
    const std::vector<int32_t> g_idx = read_i32(ckpt, module + ".g_idx");
    for (int64_t k = 0; k < K; ++k)
      if (g_idx[size_t(k)] != k / group)
        fail("tensor \"{}.g_idx\" in {}: g_idx[{}] = {}, expected {} (act-order / desc_act GPTQ is not supported)", module,
             file_of(ckpt.get(module + ".g_idx")), k, g_idx[size_t(k)], k / group);
  }
  return gptq_repack(read_i32(ckpt, module + ".qweight"), read_i32(ckpt, module + ".qzeros"),
                     read_u16(ckpt, module + ".scales"), N, K, group, quant.gptq_zero_offset, module);
}

std::vector<float> read_weight_f32(const Checkpoint& ckpt, const HfQuant& quant, const std::string& name,
                                   const std::vector<int64_t>& shape) {
  switch (check_weight(ckpt, quant, name, shape)) {
    case Storage::Float: return to_f32(ckpt.get(name));
    case Storage::FP8: {
      const TensorRef w = ckpt.get(name);
      const std::vector<float> s = to_f32(ckpt.get(module_of(name) + ".weight_scale_inv"));
      const int64_t N = shape[shape.size() - 2], K = shape.back(), batch = rows_of(shape) / N;
      const size_t block_scales = s.size() / size_t(batch);
      std::vector<float> out;
      out.reserve(size_t(batch * N * K));
      for (int64_t b = 0; b < batch; ++b) {  // experts stacked [E, N, K]: one [N, K] matrix each
        const std::vector<float> m =
            fp8::dequantize(w.bytes.subspan(size_t(b * N * K), size_t(N * K)),
                            std::span(s).subspan(size_t(b) * block_scales, block_scales), N, K, quant.fp8_block_n,
                            quant.fp8_block_k);
        out.insert(out.end(), m.begin(), m.end());
      }
      return out;
    }
    case Storage::GPTQ: {
      const GptqInt4 g = read_gptq_int4(ckpt, quant, name, shape);
      return int4::dequantize(g.qweight, g.scales_f32(), g.N, g.K, g.group);
    }
    case Storage::Q35Int4: {
      const TensorRef s = ckpt.get(name + ".scales");
      const std::vector<float> scales = to_f32(s);
      std::vector<uint32_t> q(ckpt.get(name + ".qweight").bytes.size() / 4);
      std::memcpy(q.data(), ckpt.get(name + ".qweight").bytes.data(), q.size() * 4);
      const int64_t rows = rows_of(shape), K = shape.back();
      return int4::dequantize(q, scales, rows, K, K / s.info->shape.back());
    }
  }
  fail("tensor \"{}\": unknown storage", name);
}

void release_weight(const Checkpoint& ckpt, const std::string& name) {
  const std::string module = module_of(name);
  for (const std::string& n : {name, module + ".weight_scale_inv", module + ".qweight", module + ".qzeros",
                               module + ".scales", module + ".g_idx", name + ".qweight", name + ".scales"})
    if (ckpt.has(n)) {
      const TensorRef t = ckpt.get(n);
      t.file->release(*t.info);
    }
}

}  // namespace q35::qwen35
