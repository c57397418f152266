#pragma once
// Test helper: FP8 and GPTQ-Int4 checkpoints in the official formats (models/qwen35/hf_quant.h),
// built from the formats' definitions independently of the loader: random codes and scales packed
// as GPTQ / FP8 store them, with the values they mean computed directly. Header-only; used by the
// CPU tests (test_hf_quant) and the GPU tests (gpu/test_gpu_hf_quant).
#include <cmath>
#include <cstring>
#include <random>

#include "models/qwen35/hf_quant.h"
#include "models/qwen35/quantized.h"
#include "runtime/io/json_file.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

namespace q35::test {

using qwen35::Config;
using qwen35::ExpertLayout;
using qwen35::HostTensor;
using qwen35::QuantMethod;

template <typename T>
inline std::vector<uint8_t> bytes_of(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// A normal fp16 scale around 2^-6 .. 2^-3 with a random 10-bit mantissa (so that fp16 -> bf16 is
// inexact for most of them).
inline uint16_t random_f16_scale(std::mt19937_64& rng) {
  const uint16_t exp = uint16_t(15 - 6 + rng() % 4), man = uint16_t(rng() % 1024);
  return uint16_t(exp << 10 | man);
}

// GPTQ tensors of one [N, K] weight with random codes, as the format stores them, and the values
// they mean: w[n, k] = (q[k, n] - 8) * scale[k / G, n].
struct GptqWeight {
  std::vector<int32_t> qweight, qzeros, g_idx;
  std::vector<uint16_t> scales;
  std::vector<float> values;  // [N, K]
  std::vector<uint8_t> codes;  // q[n * K + k]
};

inline GptqWeight make_gptq(int64_t N, int64_t K, int64_t G, int zero_offset, std::mt19937_64& rng) {
  GptqWeight g;
  const int64_t zcols = (N + 7) / 8;
  g.qweight.assign(size_t(K / 8 * N), 0);
  g.qzeros.assign(size_t(K / G * zcols), 0);
  g.scales.resize(size_t(K / G * N));
  g.values.resize(size_t(N * K));
  g.codes.resize(size_t(N * K));
  for (auto& s : g.scales) s = random_f16_scale(rng);
  for (int64_t gi = 0; gi < K / G; ++gi)
    for (int64_t n = 0; n < N; ++n)
      g.qzeros[size_t(gi * zcols + n / 8)] |= int32_t(uint32_t(8 - zero_offset) << (4 * (n % 8)));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t q = uint8_t(rng() % 16);
      g.codes[size_t(n * K + k)] = q;
      g.qweight[size_t(k / 8 * N + n)] |= int32_t(uint32_t(q) << (4 * (k % 8)));
      g.values[size_t(n * K + k)] = float(int(q) - 8) * f16_to_f32(g.scales[size_t(k / G * N + n)]);
    }
  for (int64_t k = 0; k < K; ++k) g.g_idx.push_back(int32_t(k / G));
  return g;
}

// An FP8 weight [N, K] with block scales [ceil(N / bn), ceil(K / bk)] and the values it means.
struct Fp8Weight {
  std::vector<uint8_t> w;
  std::vector<float> scale_inv, values;
};

inline Fp8Weight make_fp8(int64_t N, int64_t K, int64_t bn, int64_t bk, std::mt19937_64& rng) {
  Fp8Weight f;
  const int64_t sn = (N + bn - 1) / bn, sk = (K + bk - 1) / bk;
  for (int64_t i = 0; i < sn * sk; ++i) f.scale_inv.push_back(std::ldexp(1.0f + float(rng() % 1000) / 1000.f, -8));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      uint8_t b = uint8_t(rng() % 256);
      if ((b & 0x7f) == 0x7f) b = 0x3c;  // no NaN codes
      f.w.push_back(b);
      // e4m3fn from its definition: (-1)^s 2^(e-7) (1 + m/8), or 2^-6 m/8 when e = 0.
      const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
      const double v = (e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7)) * (s ? -1 : 1);
      f.values.push_back(float(v) * f.scale_inv[size_t(n / bn * sk + k / bk)]);
    }
  return f;
}

inline bool is_expert(const std::string& name) { return contains(name, ".mlp.experts."); }
inline bool fp8_candidate(const std::string& name, const std::vector<int64_t>& shape) {
  // As in the official FP8 checkpoints: projections and experts in fp8; embeddings, lm_head, router,
  // shared-expert gate, conv1d, in_proj_a/b, A_log, dt_bias and norms in bf16.
  return shape.size() == 2 && qwen35::is_quantized_weight(name) && name != "lm_head.weight" &&
         !contains(name, "in_proj_a") && !contains(name, "in_proj_b");
}

// Writes a per-expert bf16 checkpoint of `c` into `dir`, then stores it as an FP8 or GPTQ
// checkpoint. Returns every logical weight's exact values.
inline std::map<std::string, HostTensor> write_quantized(const fs::path& dir, const Config& c, QuantMethod method,
                                                         int64_t group = 8, int zero_offset = 1, uint64_t seed = 5,
                                                         int64_t fp8_block = 16) {
  SyntheticOptions o;
  o.experts = ExpertLayout::PerExpert;
  o.extras = false;
  std::map<std::string, HostTensor> values = write_synthetic_checkpoint(dir, c, o);
  std::mt19937_64 rng(seed);
  std::vector<std::vector<uint8_t>> keep;  // the new tensors' bytes, alive until the file is written
  rewrite_safetensors(dir / "model.safetensors", [&](std::vector<TensorToWrite>& tensors) {
    keep.reserve(4 * tensors.size());
    std::vector<TensorToWrite> out;
    for (const TensorToWrite& t : tensors) {
      const std::string module = t.name.substr(0, t.name.size() - 7);
      if (method == QuantMethod::GPTQ && is_expert(t.name)) {
        const int64_t N = t.shape[0], K = t.shape[1];
        GptqWeight g = make_gptq(N, K, group, zero_offset, rng);
        values[t.name].data = g.values;
        auto add = [&](const std::string& name, DType dt, std::vector<int64_t> shape, std::vector<uint8_t> b) {
          keep.push_back(std::move(b));
          out.push_back({name, dt, std::move(shape), keep.back()});
        };
        add(module + ".qweight", DType::I32, {K / 8, N}, bytes_of(g.qweight));
        add(module + ".qzeros", DType::I32, {K / group, (N + 7) / 8}, bytes_of(g.qzeros));
        add(module + ".scales", DType::F16, {K / group, N}, bytes_of(g.scales));
        add(module + ".g_idx", DType::I32, {K}, bytes_of(g.g_idx));
      } else if (method == QuantMethod::FP8 && fp8_candidate(t.name, t.shape)) {
        const int64_t N = t.shape[0], K = t.shape[1];
        Fp8Weight f = make_fp8(N, K, fp8_block, fp8_block, rng);
        values[t.name].data = f.values;
        keep.push_back(f.w);
        out.push_back({t.name, DType::F8_E4M3, t.shape, keep.back()});
        keep.push_back(bytes_of(f.scale_inv));
        out.push_back({module + ".weight_scale_inv", DType::F32,
                       {(N + fp8_block - 1) / fp8_block, (K + fp8_block - 1) / fp8_block}, keep.back()});
      } else {
        out.push_back(t);
      }
    }
    tensors = std::move(out);
  });
  nlohmann::json cfg = read_json_file(dir / "config.json");
  if (method == QuantMethod::GPTQ)
    cfg["quantization_config"] = {{"quant_method", "gptq"}, {"bits", 4}, {"group_size", group}, {"sym", true},
                                  {"desc_act", false}, {"checkpoint_format", zero_offset ? "gptq" : "gptq_v2"},
                                  {"dynamic", {{"-:.*shared_expert.*", nlohmann::json::object()}}}};
  else
    cfg["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                  {"weight_block_size", {fp8_block, fp8_block}}};
  write_json(dir / "config.json", cfg);
  return values;
}

// A float (F32) checkpoint holding exactly `values`, in the same per-expert layout.
inline void write_f32_twin(const fs::path& dir, const Config& c, const std::map<std::string, HostTensor>& values) {
  SyntheticOptions o;
  o.experts = ExpertLayout::PerExpert;
  o.extras = false;
  o.dtype = DType::F32;
  write_synthetic_checkpoint(dir, c, o);
  rewrite_safetensors(dir / "model.safetensors", [&](std::vector<TensorToWrite>& tensors) {
    for (TensorToWrite& t : tensors) {
      const std::vector<float>& v = values.at(t.name).data;
      t.bytes = {reinterpret_cast<const uint8_t*>(v.data()), v.size() * 4};
    }
  });
}

}  // namespace q35::test
