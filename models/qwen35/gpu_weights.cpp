#include "models/qwen35/gpu_weights.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/core/half.h"
#include "runtime/core/int4_format.h"
#include "runtime/io/safetensors.h"

namespace q35::qwen35 {

namespace {

// One checkpoint tensor as bf16 host bytes: a view of the mmap'ed shard when it is stored as
// bf16, else a converted copy (f32 / f16 checkpoints).
struct Bf16View {
  std::span<const uint8_t> bytes;
  std::vector<uint16_t> converted;
  const SafetensorsFile* file = nullptr;
  const TensorInfo* info = nullptr;
};

Bf16View read_bf16(const Checkpoint& ckpt, const std::string& name) {
  TensorRef t = ckpt.get(name);
  Bf16View v{{}, {}, t.file, t.info};
  if (t.info->dtype == DType::BF16) {
    v.bytes = t.bytes;
  } else {
    std::vector<float> f = to_f32(t);
    v.converted.resize(f.size());
    for (size_t i = 0; i < f.size(); ++i) v.converted[i] = f32_to_bf16(f[i]);
    v.bytes = {reinterpret_cast<const uint8_t*>(v.converted.data()), v.converted.size() * 2};
  }
  return v;
}

class Uploader {
 public:
  Uploader(const Driver& driver, const Stream& stream, const Checkpoint& ckpt, const UploadOptions& options,
           size_t max_tensor_bytes)
      : driver_(driver), stream_(stream), ckpt_(ckpt), options_(options) {
    if (options.prequantized && options.format != WeightFormat::W4A16)
      fail("{} is a W4A16 checkpoint: it loads only with --quant w4a16", ckpt.dir().string());
    if (options.format == WeightFormat::W4A16 && !options.prequantized) {
      if (!options.quantize) fail("upload_weights: W4A16 needs a quantize function");
      staging_ = DeviceBuffer(driver, max_tensor_bytes);
    }
  }

  // A bf16 vector/table copied as is.
  DeviceBuffer raw(const std::string& name) {
    Bf16View v = read_bf16(ckpt_, name);
    DeviceBuffer b(driver_, v.bytes.size());
    b.upload(v.bytes.data(), v.bytes.size(), stream_);
    finish(v);
    return b;
  }

  // An fp32 vector (A_log, dt_bias: the spec keeps the gating math in fp32).
  DeviceBuffer f32(const std::string& name) {
    std::vector<float> f = to_f32(ckpt_.get(name));
    DeviceBuffer b(driver_, f.size() * 4);
    b.upload(f.data(), f.size() * 4, stream_);
    stream_.synchronize();
    return b;
  }

  GpuMatrix matrix(int64_t experts, int64_t N, int64_t K, bool quantize) {
    GpuMatrix m;
    m.format = quantize ? options_.format : WeightFormat::BF16;
    m.experts = experts;
    m.N = N;
    m.K = K;
    const size_t count = size_t(std::max<int64_t>(experts, 1));
    if (m.format == WeightFormat::BF16) {
      m.w = DeviceBuffer(driver_, count * size_t(N * K) * 2);
    } else {
      m.group = options_.group;
      if (K % m.group != 0)
        fail("W4A16: K = {} is not a multiple of --group-size {}", K, m.group);
      m.qweight = DeviceBuffer(driver_, count * size_t(N * K / 8) * 4);
      m.scales = DeviceBuffer(driver_, count * size_t(N * K / m.group) * 2);
    }
    return m;
  }

  // Writes checkpoint tensor `name` (rows [rows, K], or a stack of experts) at row `row0` of
  // expert `expert` of `m`. `kind` names the tensor type for the quantization-error report.
  void put(GpuMatrix& m, const std::string& name, int64_t expert, int64_t row0, const std::string& kind) {
    if (options_.prequantized) return put_quantized(m, name, expert, row0);
    Bf16View v = read_bf16(ckpt_, name);
    const size_t values = v.bytes.size() / 2;
    if (values % size_t(m.K) != 0) fail("tensor {}: {} values is not a multiple of K = {}", name, values, m.K);
    const int64_t rows = int64_t(values / size_t(m.K));
    const int64_t base_row = std::max<int64_t>(expert, 0) * m.N + row0;
    if (m.format == WeightFormat::BF16) {
      m.w.upload(v.bytes.data(), v.bytes.size(), stream_, size_t(base_row * m.K) * 2);
    } else {
      staging_.upload(v.bytes.data(), v.bytes.size(), stream_);
      options_.quantize(staging_.ptr(), rows, m.K, m.group, m.qweight.ptr() + size_t(base_row * m.K / 8) * 4,
                        m.scales.ptr() + size_t(base_row * m.K / m.group) * 2);
      if (options_.report_error) sample_error(v, m.K, m.group, kind);
    }
    finish(v);
  }

  // A tensor already quantized on disk: its packed rows and scales are copied as they are.
  void put_quantized(GpuMatrix& m, const std::string& name, int64_t expert, int64_t row0) {
    TensorRef q = ckpt_.get(name + ".qweight"), s = ckpt_.get(name + ".scales");
    const size_t base_row = size_t(std::max<int64_t>(expert, 0) * m.N + row0);
    m.qweight.upload(q.bytes.data(), q.bytes.size(), stream_, base_row * size_t(m.K / 8) * 4);
    m.scales.upload(s.bytes.data(), s.bytes.size(), stream_, base_row * size_t(m.K / m.group) * 2);
    stream_.synchronize();
    q.file->release(*q.info);
    s.file->release(*s.info);
  }

  // Relative Frobenius error of the INT4 quantization, per tensor kind, sampled on the first 64
  // rows of every tensor (the CPU quantizer is bit-exact with the GPU one).
  void sample_error(const Bf16View& v, int64_t K, int group, const std::string& kind) {
    const int64_t rows = std::min<int64_t>(64, int64_t(v.bytes.size() / 2) / K);
    std::vector<float> w(size_t(rows * K));
    const auto* src = reinterpret_cast<const uint16_t*>(v.bytes.data());
    for (size_t i = 0; i < w.size(); ++i) w[i] = bf16_to_f32(src[i]);
    std::vector<float> back = int4::dequantize(int4::quantize(w, rows, K, group), rows, K, group);
    auto& e = errors_[kind];
    for (size_t i = 0; i < w.size(); ++i) {
      e.first += double(back[i] - w[i]) * (back[i] - w[i]);
      e.second += double(w[i]) * w[i];
    }
  }

  void report() const {
    if (!options_.report_error) return;
    for (const auto& [kind, e] : errors_) options_.report_error(kind, std::sqrt(e.first / std::max(e.second, 1e-30)));
  }

 private:
  // Waits for the copy out of the mmap'ed pages, then lets the kernel drop them.
  void finish(const Bf16View& v) {
    stream_.synchronize();
    if (v.converted.empty()) v.file->release(*v.info);
  }

  const Driver& driver_;
  const Stream& stream_;
  const Checkpoint& ckpt_;
  const UploadOptions& options_;
  DeviceBuffer staging_;
  std::map<std::string, std::pair<double, double>> errors_;
};

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
  size_t max_bytes = 0;
  for (const TensorSpec& t : expected_tensors(c, layout)) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    max_bytes = std::max(max_bytes, size_t(n) * 2);
  }
  Uploader up(driver, stream, ckpt, options, max_bytes);
  const std::string& P = layout.prefix;
  const int64_t H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size, Is = c.shared_expert_intermediate_size;
  const int64_t Hv = c.linear_num_value_heads;

  GpuWeights w;
  w.embed = up.raw(P + "embed_tokens.weight");
  w.final_norm = up.raw(P + "norm.weight");
  w.lm_head = up.matrix(0, c.vocab_size, H, true);
  up.put(w.lm_head, c.tie_word_embeddings ? P + "embed_tokens.weight" : "lm_head.weight", -1, 0, "lm_head");

  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string L = fmt::format("{}layers.{}.", P, i);
    GpuLayer& l = w.layers.emplace_back();
    l.type = c.layer_types[size_t(i)];
    l.input_norm = up.raw(L + "input_layernorm.weight");
    l.post_norm = up.raw(L + "post_attention_layernorm.weight");
    if (l.type == LayerType::FullAttention) {
      const std::string A = L + "self_attn.";
      l.qkv = up.matrix(0, c.q_proj_rows() + 2 * c.kv_dim(), H, true);
      up.put(l.qkv, A + "q_proj.weight", -1, 0, "attn.qkv");
      up.put(l.qkv, A + "k_proj.weight", -1, c.q_proj_rows(), "attn.qkv");
      up.put(l.qkv, A + "v_proj.weight", -1, c.q_proj_rows() + c.kv_dim(), "attn.qkv");
      l.o_proj = up.matrix(0, H, c.attn_out_dim(), true);
      up.put(l.o_proj, A + "o_proj.weight", -1, 0, "attn.o_proj");
      l.q_norm = up.raw(A + "q_norm.weight");
      l.k_norm = up.raw(A + "k_norm.weight");
    } else {
      const std::string G = L + "linear_attn.";
      const int64_t conv = c.linear_conv_dim(), vd = c.linear_value_dim();
      l.in_proj = up.matrix(0, conv + vd + 2 * Hv, H, true);
      up.put(l.in_proj, G + "in_proj_qkv.weight", -1, 0, "gdn.in_proj");
      up.put(l.in_proj, G + "in_proj_z.weight", -1, conv, "gdn.in_proj");
      up.put(l.in_proj, G + "in_proj_b.weight", -1, conv + vd, "gdn.in_proj");
      up.put(l.in_proj, G + "in_proj_a.weight", -1, conv + vd + Hv, "gdn.in_proj");
      l.conv1d = up.raw(G + "conv1d.weight");
      l.A_log = up.f32(G + "A_log");
      l.dt_bias = up.f32(G + "dt_bias");
      l.gdn_norm = up.raw(G + "norm.weight");
      l.out_proj = up.matrix(0, H, vd, true);
      up.put(l.out_proj, G + "out_proj.weight", -1, 0, "gdn.out_proj");
    }
    const std::string M = L + "mlp.";
    l.router = up.raw(M + "gate.weight");
    l.experts_gate_up = up.matrix(E, 2 * I, H, true);
    l.experts_down = up.matrix(E, H, I, true);
    if (layout.experts == ExpertLayout::Fused) {
      up.put(l.experts_gate_up, M + "experts.gate_up_proj", 0, 0, "experts.gate_up");
      up.put(l.experts_down, M + "experts.down_proj", 0, 0, "experts.down");
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const std::string X = fmt::format("{}experts.{}.", M, e);
        up.put(l.experts_gate_up, X + "gate_proj.weight", e, 0, "experts.gate_up");
        up.put(l.experts_gate_up, X + "up_proj.weight", e, I, "experts.gate_up");
        up.put(l.experts_down, X + "down_proj.weight", e, 0, "experts.down");
      }
    }
    l.shared_gate_up = up.matrix(0, 2 * Is, H, true);
    up.put(l.shared_gate_up, M + "shared_expert.gate_proj.weight", -1, 0, "shared.gate_up");
    up.put(l.shared_gate_up, M + "shared_expert.up_proj.weight", -1, Is, "shared.gate_up");
    l.shared_down = up.matrix(0, H, Is, true);
    up.put(l.shared_down, M + "shared_expert.down_proj.weight", -1, 0, "shared.down");
    l.shared_expert_gate = up.raw(M + "shared_expert_gate.weight");
  }
  up.report();
  return w;
}

}  // namespace q35::qwen35
