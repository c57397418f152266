#include "models/qwen35/gpu_weights.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "models/qwen35/hf_quant.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/core/fp8_format.h"
#include "runtime/core/half.h"
#include "runtime/core/int4_format.h"
#include "runtime/core/weight_format.h"
#include "runtime/io/safetensors.h"

namespace q35::qwen35 {

namespace {

// One checkpoint tensor as bf16 host bytes: a view of the mmap'ed shard when it is stored as
// bf16, else a converted copy (f32 / f16 checkpoints, or FP8 / GPTQ weights dequantized exactly to
// fp32 first: models/qwen35/hf_quant.h).
struct Bf16View {
  std::span<const uint8_t> bytes;
  std::vector<uint16_t> converted;
  const SafetensorsFile* file = nullptr;
  const TensorInfo* info = nullptr;
};

Bf16View read_bf16(const Checkpoint& ckpt, const HfQuant& quant, const std::string& name,
                   const std::vector<int64_t>& shape) {
  const Storage storage = check_weight(ckpt, quant, name, shape);
  if (storage == Storage::Float && ckpt.get(name).info->dtype == DType::BF16) {
    TensorRef t = ckpt.get(name);
    return {t.bytes, {}, t.file, t.info};
  }
  Bf16View v;
  std::vector<float> f = read_weight_f32(ckpt, quant, name, shape);
  release_weight(ckpt, name);
  v.converted.resize(f.size());
  for (size_t i = 0; i < f.size(); ++i) v.converted[i] = f32_to_bf16(f[i]);
  v.bytes = {reinterpret_cast<const uint8_t*>(v.converted.data()), v.converted.size() * 2};
  return v;
}

// Where weights come from: a checkpoint, or random values (synthetic models).
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual DeviceBuffer raw(const std::string& name, size_t count) = 0;  // bf16 vector / table
  virtual DeviceBuffer f32(const std::string& name, size_t count) = 0;  // fp32 vector
  virtual GpuMatrix matrix(int64_t experts, int64_t N, int64_t K) = 0;
  // Checkpoint tensor `name` -> rows [row0, row0 + rows) of expert `expert` (-1: a single matrix).
  virtual void put(GpuMatrix& m, const std::string& name, int64_t expert, int64_t row0, int64_t rows,
                   const std::string& kind) = 0;
  virtual void report() const {}
};

GpuMatrix allocate_matrix(const Driver& driver, WeightFormat format, int group, int64_t experts, int64_t N,
                          int64_t K) {
  GpuMatrix m;
  m.format = format;
  m.experts = experts;
  m.N = N;
  m.K = K;
  const size_t count = size_t(std::max<int64_t>(experts, 1));
  if (m.format == WeightFormat::BF16) {
    m.w = DeviceBuffer(driver, count * size_t(N * K) * 2);
  } else if (m.format == WeightFormat::FP8) {
    m.group = kFp8Group;
    if (K % 64 != 0) fail("FP8: K = {} is not a multiple of 64 (the FP8 kernels' 64-k steps)", K);
    m.codes = DeviceBuffer(driver, count * size_t(N * K));
    m.scales = DeviceBuffer(driver, count * size_t(N * ((K + fp8::kGpuBlockK - 1) / fp8::kGpuBlockK)) * 4);
  } else {
    m.group = group;
    if (K % m.group != 0) fail("W4A16: K = {} is not a multiple of --group-size {}", K, m.group);
    m.qweight = DeviceBuffer(driver, count * size_t(N * K / 8) * 4);
    m.scales = DeviceBuffer(driver, count * size_t(N * K / m.group) * 2);
  }
  return m;
}

class CheckpointSource final : public WeightSource {
 public:
  CheckpointSource(const Driver& driver, const Stream& stream, const Checkpoint& ckpt, const UploadOptions& options,
                   size_t max_tensor_bytes, const std::vector<TensorSpec>& specs)
      : driver_(driver), stream_(stream), ckpt_(ckpt), options_(options), quant_(HfQuant::of(ckpt)) {
    for (const TensorSpec& t : specs) shapes_[t.name] = t.shape;
    if (options.prequantized && options.format != WeightFormat::W4A16)
      fail("{} is a W4A16 checkpoint: it loads only with --quant w4a16", ckpt.dir().string());
    if (options.format != WeightFormat::BF16 && !options.prequantized) {
      if (!options.quantize) fail("upload_weights: W4A16 and FP8 need a quantize function");
      staging_ = DeviceBuffer(driver, max_tensor_bytes);
    }
  }

  // A bf16 vector/table copied as is.
  DeviceBuffer raw(const std::string& name, size_t) override {
    Bf16View v = read_bf16(ckpt_, quant_, name, shape(name));
    DeviceBuffer b(driver_, v.bytes.size());
    b.upload(v.bytes.data(), v.bytes.size(), stream_);
    finish(v);
    return b;
  }

  // An fp32 vector (A_log, dt_bias: the spec keeps the gating math in fp32).
  DeviceBuffer f32(const std::string& name, size_t) override {
    std::vector<float> f = read_weight_f32(ckpt_, quant_, name, shape(name));
    DeviceBuffer b(driver_, f.size() * 4);
    b.upload(f.data(), f.size() * 4, stream_);
    stream_.synchronize();
    return b;
  }

  GpuMatrix matrix(int64_t experts, int64_t N, int64_t K) override {
    return allocate_matrix(driver_, options_.format, options_.group, experts, N, K);
  }

  // Writes checkpoint tensor `name` (rows [rows, K], or a stack of experts) at row `row0` of
  // expert `expert` of `m`. `kind` names the tensor type for the quantization-error report.
  void put(GpuMatrix& m, const std::string& name, int64_t expert, int64_t row0, int64_t,
           const std::string& kind) override {
    if (options_.prequantized) return put_quantized(m, name, expert, row0);
    const Storage storage = check_weight(ckpt_, quant_, name, shape(name));
    if (m.format == WeightFormat::W4A16 && storage == Storage::GPTQ) return put_gptq(m, name, expert, row0, kind);
    if (m.format == WeightFormat::FP8 && storage == Storage::FP8) return put_fp8(m, name, expert, row0);
    Bf16View v = read_bf16(ckpt_, quant_, name, shape(name));
    const size_t values = v.bytes.size() / 2;
    if (values % size_t(m.K) != 0) fail("tensor {}: {} values is not a multiple of K = {}", name, values, m.K);
    const int64_t rows = int64_t(values / size_t(m.K));
    const int64_t base_row = std::max<int64_t>(expert, 0) * m.N + row0;
    if (m.format == WeightFormat::BF16) {
      m.w.upload(v.bytes.data(), v.bytes.size(), stream_, size_t(base_row * m.K) * 2);
    } else {
      staging_.upload(v.bytes.data(), v.bytes.size(), stream_);
      options_.quantize(staging_.ptr(), rows, m.K, m.group, quantized_at(m, base_row), scales_at(m, base_row));
      if (options_.report_error) sample_error(v, m.K, m.group, kind);
    }
    finish(v);
  }

  // An FP8 weight of an FP8 checkpoint: its codes byte for byte, its block scales repeated over the
  // rows of their blocks (exact: fp8::row_scales). Experts stacked [E, N, K] convert one by one.
  void put_fp8(GpuMatrix& m, const std::string& name, int64_t expert, int64_t row0) {
    const std::vector<int64_t>& sh = shape(name);
    const int64_t N = sh[sh.size() - 2], K = sh.back();
    if (K != m.K) fail("tensor {}: K = {}, the FP8 matrix it loads into has K = {}", name, K, m.K);
    int64_t batch = 1;
    for (size_t i = 0; i + 2 < sh.size(); ++i) batch *= sh[i];
    const std::string scale_name = (name.ends_with(".weight") ? name.substr(0, name.size() - 7) : name) + ".weight_scale_inv";
    const TensorRef codes = ckpt_.get(name);
    const std::vector<float> block_scales = to_f32(ckpt_.get(scale_name));
    const size_t per_matrix = block_scales.size() / size_t(batch);
    const int64_t base_row = std::max<int64_t>(expert, 0) * m.N + row0;
    m.codes.upload(codes.bytes.data(), codes.bytes.size(), stream_, size_t(base_row * m.K));
    for (int64_t b = 0; b < batch; ++b) {
      const std::vector<float> rs = fp8::row_scales(std::span(block_scales).subspan(size_t(b) * per_matrix, per_matrix),
                                                    N, K, quant_.fp8_block_n, quant_.fp8_block_k);
      m.scales.upload(rs.data(), rs.size() * 4, stream_, size_t(base_row + b * N) * rs.size() / size_t(N) * 4);
      stream_.synchronize();  // rs is freed at the end of the iteration
    }
    release_weight(ckpt_, name);
  }

  // Where rows from `row` of a quantized matrix start: its packed words / codes and its scales.
  static CUdeviceptr quantized_at(const GpuMatrix& m, int64_t row) {
    return m.format == WeightFormat::FP8 ? m.codes.ptr() + size_t(row * m.K) : m.qweight.ptr() + size_t(row * m.K / 8) * 4;
  }
  static CUdeviceptr scales_at(const GpuMatrix& m, int64_t row) {
    return m.format == WeightFormat::FP8
               ? m.scales.ptr() + size_t(row * ((m.K + fp8::kGpuBlockK - 1) / fp8::kGpuBlockK)) * 4
               : m.scales.ptr() + size_t(row * m.K / m.group) * 2;
  }

  // A tensor already quantized on disk: its packed rows and scales are copied as they are.
  void put_quantized(GpuMatrix& m, const std::string& name, int64_t expert, int64_t row0) {
    // A tied lm_head is stored quantized under its own name (models/qwen35/quantized.cpp).
    const std::string stored = name.ends_with("embed_tokens.weight") ? "lm_head.weight" : name;
    TensorRef q = ckpt_.get(stored + ".qweight"), s = ckpt_.get(stored + ".scales");
    const size_t base_row = size_t(std::max<int64_t>(expert, 0) * m.N + row0);
    m.qweight.upload(q.bytes.data(), q.bytes.size(), stream_, base_row * size_t(m.K / 8) * 4);
    std::vector<uint16_t> bf16;  // F16 scales (GPTQ experts, exact on disk) -> bf16 for the kernels
    if (s.info->dtype == DType::F16) {
      bf16.resize(s.bytes.size() / 2);
      for (size_t i = 0; i < bf16.size(); ++i)
        bf16[i] = f32_to_bf16(f16_to_f32(uint16_t(s.bytes[2 * i] | (s.bytes[2 * i + 1] << 8))));
    }
    const void* scales = bf16.empty() ? static_cast<const void*>(s.bytes.data()) : bf16.data();
    m.scales.upload(scales, s.bytes.size(), stream_, base_row * size_t(m.K / m.group) * 2);
    stream_.synchronize();
    q.file->release(*q.info);
    s.file->release(*s.info);
  }

  // A GPTQ weight: its codes repacked into our layout exactly, its fp16 scales rounded to bf16
  // (at most 2^-8 relative change per weight: models/qwen35/hf_quant.h).
  void put_gptq(GpuMatrix& m, const std::string& name, int64_t expert, int64_t row0, const std::string& kind) {
    const GptqInt4 g = read_gptq_int4(ckpt_, quant_, name, shape(name));
    if (g.group != m.group)
      fail("tensor {}: GPTQ group size {} differs from the W4A16 group size {}: load with --group-size {}", name,
           g.group, m.group, g.group);
    const std::vector<uint16_t> scales = g.scales_bf16();
    if (options_.report_error) {  // the only change to the GPTQ weights: fp16 -> bf16 scales
      const std::vector<float> f16 = g.scales_f32();
      auto& e = errors_[kind + " (gptq: fp16 -> bf16 scales)"];
      for (size_t i = 0; i < scales.size(); ++i) {
        const double d = double(bf16_to_f32(scales[i])) - f16[i];
        e.first += d * d;
        e.second += double(f16[i]) * f16[i];
      }
    }
    const size_t base_row = size_t(std::max<int64_t>(expert, 0) * m.N + row0);
    m.qweight.upload(g.qweight.data(), g.qweight.size() * 4, stream_, base_row * size_t(m.K / 8) * 4);
    m.scales.upload(scales.data(), scales.size() * 2, stream_, base_row * size_t(m.K / m.group) * 2);
    stream_.synchronize();
    release_weight(ckpt_, name);
  }

  // Relative Frobenius error of the INT4 / FP8 quantization, per tensor kind, sampled on the first 64
  // rows of every tensor (the CPU quantizers are bit-exact with the GPU ones).
  void sample_error(const Bf16View& v, int64_t K, int group, const std::string& kind) {
    const int64_t rows = std::min<int64_t>(64, int64_t(v.bytes.size() / 2) / K);
    std::vector<float> w(size_t(rows * K));
    const auto* src = reinterpret_cast<const uint16_t*>(v.bytes.data());
    for (size_t i = 0; i < w.size(); ++i) w[i] = bf16_to_f32(src[i]);
    std::vector<float> back;
    if (group == kFp8Group) {
      const fp8::Quantized q = fp8::quantize(w, rows, K, 1, fp8::kGpuBlockK);
      back = fp8::dequantize(q.codes, q.scale_inv, rows, K, 1, fp8::kGpuBlockK);
    } else {
      back = int4::dequantize(int4::quantize(w, rows, K, group), rows, K, group);
    }
    auto& e = errors_[kind];
    for (size_t i = 0; i < w.size(); ++i) {
      e.first += double(back[i] - w[i]) * (back[i] - w[i]);
      e.second += double(w[i]) * w[i];
    }
  }

  void report() const override {
    if (!options_.report_error) return;
    for (const auto& [kind, e] : errors_) options_.report_error(kind, std::sqrt(e.first / std::max(e.second, 1e-30)));
  }

 private:
  // Waits for the copy out of the mmap'ed pages, then lets the kernel drop them.
  void finish(const Bf16View& v) {
    stream_.synchronize();
    if (v.converted.empty()) v.file->release(*v.info);
  }

  const std::vector<int64_t>& shape(const std::string& name) const {
    auto it = shapes_.find(name);
    if (it == shapes_.end()) fail("upload_weights: tensor {} is not a weight of this config", name);
    return it->second;
  }

  const Driver& driver_;
  const Stream& stream_;
  const Checkpoint& ckpt_;
  const UploadOptions& options_;
  const HfQuant quant_;
  std::map<std::string, std::vector<int64_t>> shapes_;  // logical shape of every weight
  DeviceBuffer staging_;
  std::map<std::string, std::pair<double, double>> errors_;
};

class RandomSource final : public WeightSource {
 public:
  RandomSource(const Driver& driver, const Stream& stream, const UploadOptions& options, const RandomFill& fill,
               uint64_t seed, size_t max_tensor_bytes)
      : driver_(driver), stream_(stream), options_(options), fill_(fill), seed_(seed) {
    if (options.format != WeightFormat::BF16) staging_ = DeviceBuffer(driver, max_tensor_bytes);
  }
  DeviceBuffer raw(const std::string& name, size_t count) override {
    DeviceBuffer b(driver_, count * 2);
    // Norm weights are zero-centred offsets, except the DeltaNet norm (a plain scale near 1).
    const bool norm = name.find("norm") != std::string::npos;
    const bool plain_norm = name.find("linear_attn.norm") != std::string::npos;
    const float mean = plain_norm ? 1.f : 0.f, scale = norm ? 0.05f : (name.find("embed") != std::string::npos ? 1.f : 0.02f);
    fill_.normal_bf16(b.ptr(), count, next_seed(), mean, scale);
    return b;
  }
  DeviceBuffer f32(const std::string& name, size_t count) override {
    DeviceBuffer b(driver_, count * 4);
    const bool a_log = name.find("A_log") != std::string::npos;
    fill_.uniform_f32(b.ptr(), count, next_seed(), a_log ? 0.f : -1.f, a_log ? 2.7f : 1.f);
    return b;
  }
  GpuMatrix matrix(int64_t experts, int64_t N, int64_t K) override {
    return allocate_matrix(driver_, options_.format, options_.group, experts, N, K);
  }
  void put(GpuMatrix& m, const std::string&, int64_t expert, int64_t row0, int64_t rows, const std::string&) override {
    const int64_t base_row = std::max<int64_t>(expert, 0) * m.N + row0;
    if (m.format == WeightFormat::BF16) {
      fill_.normal_bf16(m.w.ptr() + size_t(base_row * m.K) * 2, size_t(rows * m.K), next_seed(), 0.f, 0.02f);
    } else {
      fill_.normal_bf16(staging_.ptr(), size_t(rows * m.K), next_seed(), 0.f, 0.02f);
      options_.quantize(staging_.ptr(), rows, m.K, m.group, CheckpointSource::quantized_at(m, base_row),
                        CheckpointSource::scales_at(m, base_row));
    }
  }

 private:
  uint64_t next_seed() { return seed_ + 0x9e3779b97f4a7c15ull * ++counter_; }
  const Driver& driver_;
  const Stream& stream_;
  const UploadOptions& options_;
  const RandomFill& fill_;
  uint64_t seed_, counter_ = 0;
  DeviceBuffer staging_;
};

// The weight structure of a config, filled from `src` (checkpoint names under prefix P).
GpuWeights build(WeightSource& src, const Config& c, const std::string& P, ExpertLayout experts) {
  const int64_t H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size, Is = c.shared_expert_intermediate_size;
  const int64_t Hv = c.linear_num_value_heads, V = c.vocab_size;
  GpuWeights w;
  w.embed = src.raw(P + "embed_tokens.weight", size_t(V * H));
  w.final_norm = src.raw(P + "norm.weight", size_t(H));
  w.lm_head = src.matrix(0, V, H);
  src.put(w.lm_head, c.tie_word_embeddings ? P + "embed_tokens.weight" : "lm_head.weight", -1, 0, V, "lm_head");

  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string L = fmt::format("{}layers.{}.", P, i);
    GpuLayer& l = w.layers.emplace_back();
    l.type = c.layer_types[size_t(i)];
    l.input_norm = src.raw(L + "input_layernorm.weight", size_t(H));
    l.post_norm = src.raw(L + "post_attention_layernorm.weight", size_t(H));
    if (l.type == LayerType::FullAttention) {
      const std::string A = L + "self_attn.";
      const int64_t q = c.q_proj_rows(), kv = c.kv_dim();
      l.qkv = src.matrix(0, q + 2 * kv, H);
      src.put(l.qkv, A + "q_proj.weight", -1, 0, q, "attn.qkv");
      src.put(l.qkv, A + "k_proj.weight", -1, q, kv, "attn.qkv");
      src.put(l.qkv, A + "v_proj.weight", -1, q + kv, kv, "attn.qkv");
      l.o_proj = src.matrix(0, H, c.attn_out_dim());
      src.put(l.o_proj, A + "o_proj.weight", -1, 0, H, "attn.o_proj");
      l.q_norm = src.raw(A + "q_norm.weight", size_t(c.head_dim));
      l.k_norm = src.raw(A + "k_norm.weight", size_t(c.head_dim));
    } else {
      const std::string G = L + "linear_attn.";
      const int64_t conv = c.linear_conv_dim(), vd = c.linear_value_dim();
      l.in_proj = src.matrix(0, conv + vd + 2 * Hv, H);
      src.put(l.in_proj, G + "in_proj_qkv.weight", -1, 0, conv, "gdn.in_proj");
      src.put(l.in_proj, G + "in_proj_z.weight", -1, conv, vd, "gdn.in_proj");
      src.put(l.in_proj, G + "in_proj_b.weight", -1, conv + vd, Hv, "gdn.in_proj");
      src.put(l.in_proj, G + "in_proj_a.weight", -1, conv + vd + Hv, Hv, "gdn.in_proj");
      l.conv1d = src.raw(G + "conv1d.weight", size_t(conv * c.linear_conv_kernel_dim));
      l.A_log = src.f32(G + "A_log", size_t(Hv));
      l.dt_bias = src.f32(G + "dt_bias", size_t(Hv));
      l.gdn_norm = src.raw(G + "norm.weight", size_t(c.linear_value_head_dim));
      l.out_proj = src.matrix(0, H, vd);
      src.put(l.out_proj, G + "out_proj.weight", -1, 0, H, "gdn.out_proj");
    }
    const std::string M = L + "mlp.";
    l.router = src.raw(M + "gate.weight", size_t(E * H));
    l.experts_gate_up = src.matrix(E, 2 * I, H);
    l.experts_down = src.matrix(E, H, I);
    if (experts == ExpertLayout::Fused) {
      src.put(l.experts_gate_up, M + "experts.gate_up_proj", 0, 0, E * 2 * I, "experts.gate_up");
      src.put(l.experts_down, M + "experts.down_proj", 0, 0, E * H, "experts.down");
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const std::string X = fmt::format("{}experts.{}.", M, e);
        src.put(l.experts_gate_up, X + "gate_proj.weight", e, 0, I, "experts.gate_up");
        src.put(l.experts_gate_up, X + "up_proj.weight", e, I, I, "experts.gate_up");
        src.put(l.experts_down, X + "down_proj.weight", e, 0, H, "experts.down");
      }
    }
    l.shared_gate_up = src.matrix(0, 2 * Is, H);
    src.put(l.shared_gate_up, M + "shared_expert.gate_proj.weight", -1, 0, Is, "shared.gate_up");
    src.put(l.shared_gate_up, M + "shared_expert.up_proj.weight", -1, Is, Is, "shared.gate_up");
    l.shared_down = src.matrix(0, H, Is);
    src.put(l.shared_down, M + "shared_expert.down_proj.weight", -1, 0, H, "shared.down");
    l.shared_expert_gate = src.raw(M + "shared_expert_gate.weight", size_t(H));
  }
  src.report();
  return w;
}

size_t largest_tensor_bytes(const Config& c) {
  size_t max_bytes = 0;
  for (const TensorSpec& t : expected_tensors(c, CheckpointLayout{"model.", ExpertLayout::Fused})) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    max_bytes = std::max(max_bytes, size_t(n) * 2);
  }
  return std::max(max_bytes, size_t(c.vocab_size * c.hidden_size) * 2);  // lm_head, also when tied
}

}  // namespace

size_t GpuWeights::bytes() const {
  size_t n = embed.size() + final_norm.size() + lm_head.bytes();
  for (const GpuLayer& l : layers) {
    n += l.input_norm.size() + l.post_norm.size() + l.qkv.bytes() + l.o_proj.bytes() + l.q_norm.size() +
         l.k_norm.size() + l.in_proj.bytes() + l.conv1d.size() + l.A_log.size() + l.dt_bias.size() +
         l.gdn_norm.size() + l.out_proj.bytes() + l.router.size() + l.experts_gate_up.bytes() +
         l.experts_down.bytes() + l.shared_gate_up.bytes() + l.shared_down.bytes() + l.shared_expert_gate.size();
  }
  return n;
}

GpuWeights upload_weights(const Driver& driver, const Stream& stream, const Config& c, const Checkpoint& ckpt,
                          const UploadOptions& options) {
  const CheckpointLayout layout = detect_layout(ckpt);
  CheckpointSource src(driver, stream, ckpt, options, largest_tensor_bytes(c), expected_tensors(c, layout));
  return build(src, c, layout.prefix, layout.experts);
}

GpuWeights random_weights(const Driver& driver, const Stream& stream, const Config& c, const UploadOptions& options,
                          const RandomFill& fill, uint64_t seed) {
  RandomSource src(driver, stream, options, fill, seed, largest_tensor_bytes(c));
  GpuWeights w = build(src, c, "model.", ExpertLayout::Fused);
  stream.synchronize();
  return w;
}

}  // namespace q35::qwen35
