#include "models/qwen35/tune_ops.h"

#include <fmt/format.h>

#include <algorithm>
#include <limits>
#include <map>

#include "autotune/spaces.h"
#include "autotune/tiles_wgmma.h"
#include "models/qwen35/gpu/attention.h"
#include "models/qwen35/gpu/dense.h"
#include "models/qwen35/gpu/gdn.h"
#include "models/qwen35/gpu/moe.h"
#include "models/qwen35/kernels.h"
#include "runtime/core/error.h"
#include "runtime/core/half.h"
#include "runtime/core/weight_format.h"

namespace q35::qwen35 {

namespace {

using nlohmann::json;

constexpr size_t kRotateBytes = size_t(256) << 20;  // inputs rotate over about this many bytes
constexpr int kMaxCopies = 64;

int copies_for(size_t bytes) { return int(std::clamp<size_t>((kRotateBytes + bytes - 1) / std::max<size_t>(bytes, 1), 1, kMaxCopies)); }

template <typename T>
std::vector<json> to_json_all(const std::vector<T>& v) {
  std::vector<json> out;
  for (const T& t : v) out.push_back(tune::to_json(t));
  return out;
}

// Shared plumbing: device access, random fills, downloads.
class OpBase : public TuneOp {
 public:
  OpBase(const TuneDevice* dev, std::string family, std::string signature, std::string label)
      : dev_(dev), family_(std::move(family)), signature_(std::move(signature)), label_(std::move(label)) {}
  std::string family() const override { return family_; }
  std::string signature() const override { return signature_; }
  std::string label() const override { return label_; }
  void add_label(const std::string& more) { label_ += ", " + more; }

 protected:
  const TuneDevice& dev() const {
    if (!dev_) fail("tune: {} {} needs a GPU to run", family_, label_);
    return *dev_;
  }
  const Function& fn(const KernelSpec& s) const { return dev().kernels.get(s); }
  DeviceBuffer alloc(size_t bytes) const { return DeviceBuffer(dev().driver, std::max<size_t>(bytes, 16)); }
  // bf16 N(mean, scale^2) values (or random bits, for packed INT4 words).
  void normal(const DeviceBuffer& b, size_t count, float mean, float scale, const Stream& s) {
    const unsigned blocks = unsigned(dev().ctx.device().sm_count * 8);
    fn({"fill", "fill_normal_bf16", {}}).launch({{blocks}, {256}}, s, b.ptr(), (unsigned long long)count,
                                               (unsigned long long)(++seed_ * 0x9E3779B97F4A7C15ull), mean, scale);
  }
  void uniform(const DeviceBuffer& b, size_t count, float lo, float hi, const Stream& s) {
    const unsigned blocks = unsigned(dev().ctx.device().sm_count * 8);
    fn({"fill", "fill_uniform_f32", {}}).launch({{blocks}, {256}}, s, b.ptr(), (unsigned long long)count,
                                               (unsigned long long)(++seed_ * 0x9E3779B97F4A7C15ull), lo, hi);
  }
  // A buffer of `count` random bf16 values, and `copies` of them.
  DeviceBuffer random_bf16(size_t count, float mean, float scale, const Stream& s) {
    DeviceBuffer b = alloc(count * 2);
    normal(b, count, mean, scale, s);
    return b;
  }
  std::vector<DeviceBuffer> random_bf16_copies(int copies, size_t count, float mean, float scale, const Stream& s) {
    std::vector<DeviceBuffer> out;
    for (int c = 0; c < copies; ++c) out.push_back(random_bf16(count, mean, scale, s));
    return out;
  }
  // Random FP8 weights [rows, K] (codes uint8, scales fp32 [rows, ceil(K / 128)]): N(0, 0.02^2) bf16
  // quantized on the GPU as a checkpoint is (random bits would hold NaN codes).
  void random_fp8(DeviceBuffer& codes, DeviceBuffer& scales, int64_t rows, int64_t K, const Stream& s) {
    const DeviceBuffer staging = random_bf16(size_t(rows * K), 0.f, 0.02f, s);
    codes = alloc(size_t(rows * K));
    scales = alloc(size_t(rows * ((K + 127) / 128)) * 4);
    const gpu::QuantizePlan p = gpu::quantize_plan(K, kFp8Group);
    gpu::launch_quantize(p, fn(p.quantize_spec()), s, staging.ptr(), codes.ptr(), scales.ptr(), rows);
    s.synchronize();  // before the staging buffer goes
  }
  // The output y: fp32 or bf16 values.
  static std::vector<float> download_out(const DeviceBuffer& y, bool f32, const Stream& s) {
    return f32 ? download_f32(y, y.size() / 4, s) : download_bf16(y, y.size() / 2, s);
  }
  static std::vector<float> download_bf16(const DeviceBuffer& b, size_t count, const Stream& s) {
    std::vector<uint16_t> raw(count);
    b.download(raw.data(), count * 2, s);
    s.synchronize();
    std::vector<float> out(count);
    for (size_t i = 0; i < count; ++i) out[i] = bf16_to_f32(raw[i]);
    return out;
  }
  static std::vector<float> download_f32(const DeviceBuffer& b, size_t count, const Stream& s, size_t offset = 0) {
    std::vector<float> out(count);
    b.download(out.data(), count * 4, s, offset);
    s.synchronize();
    return out;
  }

 private:
  const TuneDevice* dev_;
  std::string family_, signature_, label_;
  uint64_t seed_ = 0;
};

// ---- dense projections ----

// W4A16 or FP8 GEMV (M <= 16): projections and the lm_head (families gemv_w4a16, gemv_fp8).
class W4GemvOp final : public OpBase {
 public:
  W4GemvOp(const TuneDevice* d, int64_t n, int64_t k, int group, bool f32, const std::string& label)
      : OpBase(d, group == kFp8Group ? tune::kGemvFp8 : tune::kGemvW4, tune::dense_signature(n, k, group, f32), label),
        n_(n), k_(k), g_(group), f32_(f32) {}
  bool serves(int64_t m) const override { return m <= 16; }
  std::vector<json> candidates(int64_t m) const override { return to_json_all(tune::w4_gemv_candidates(n_, k_, g_, m)); }
  json default_config(int64_t m) const override { return tune::to_json(default_w4_gemv_tile(n_, k_, g_, int(m))); }
  std::vector<KernelSpec> kernels(const json& c, int64_t m) const override { return {plan(c, m).spec()}; }
  void setup(int64_t m, const Stream& s) override {
    release();
    if (g_ == kFp8Group) {
      const int copies = copies_for(size_t(n_ * k_));
      q_.resize(size_t(copies)), sc_.resize(size_t(copies));
      for (int c = 0; c < copies; ++c) random_fp8(q_[size_t(c)], sc_[size_t(c)], n_, k_, s);
    } else {
      const size_t qwords = size_t(n_ * k_ / 8), nscales = size_t(n_ * k_ / g_);
      const int copies = copies_for(qwords * 4 + nscales * 2);
      q_ = random_bf16_copies(copies, qwords * 2, 0.f, 1.f, s);  // random bits
      sc_ = random_bf16_copies(copies, nscales, 0.f, 0.02f, s);
    }
    x_ = random_bf16(size_t(m * k_), 0.f, 1.f, s);
    y_ = alloc(size_t(m * n_) * (f32_ ? 4 : 2));
  }
  void run(const json& c, int64_t m, int it, const Stream& s) override {
    const gpu::W4GemvPlan p = plan(c, m);
    const size_t i = size_t(it) % q_.size();
    gpu::launch(p, fn(p.spec()), s, q_[i].ptr(), sc_[i].ptr(), x_.ptr(), y_.ptr(), int(m));
  }
  std::vector<float> output(const Stream& s) override { return download_out(y_, f32_, s); }
  void release() override { q_.clear(), sc_.clear(), x_ = {}, y_ = {}; }

 private:
  gpu::W4GemvPlan plan(const json& c, int64_t m) const {
    return {n_, k_, g_, tune::w4_gemv_from_json(c, m), f32_};
  }
  int64_t n_, k_;
  int g_;
  bool f32_;
  std::vector<DeviceBuffer> q_, sc_;
  DeviceBuffer x_, y_;
};

// bf16 GEMV (M <= 16, bf16 weights).
class Bf16GemvOp final : public OpBase {
 public:
  Bf16GemvOp(const TuneDevice* d, int64_t n, int64_t k, bool f32, const std::string& label)
      : OpBase(d, tune::kGemvBf16, tune::dense_signature(n, k, 0, f32), label), n_(n), k_(k), f32_(f32) {}
  bool serves(int64_t m) const override { return m <= 16; }
  std::vector<json> candidates(int64_t m) const override { return to_json_all(tune::gemv_bf16_candidates(n_, k_, m)); }
  json default_config(int64_t m) const override { return tune::to_json(default_gemv_tile(n_, k_, int(m))); }
  std::vector<KernelSpec> kernels(const json& c, int64_t m) const override { return {plan(c, m).spec()}; }
  void setup(int64_t m, const Stream& s) override {
    release();
    w_ = random_bf16_copies(copies_for(size_t(n_ * k_) * 2), size_t(n_ * k_), 0.f, 0.02f, s);
    x_ = random_bf16(size_t(m * k_), 0.f, 1.f, s);
    y_ = alloc(size_t(m * n_) * (f32_ ? 4 : 2));
  }
  void run(const json& c, int64_t m, int it, const Stream& s) override {
    const gpu::GemvBf16Plan p = plan(c, m);
    gpu::launch(p, fn(p.spec()), s, w_[size_t(it) % w_.size()].ptr(), x_.ptr(), y_.ptr(), int(m));
  }
  std::vector<float> output(const Stream& s) override { return download_out(y_, f32_, s); }
  void release() override { w_.clear(), x_ = {}, y_ = {}; }

 private:
  gpu::GemvBf16Plan plan(const json& c, int64_t m) const { return {n_, k_, tune::gemv_bf16_from_json(c, m), f32_}; }
  int64_t n_, k_;
  bool f32_;
  std::vector<DeviceBuffer> w_;
  DeviceBuffer x_, y_;
};

// Prefill GEMM (M > 16). mma.sync (gemm_bf16): bf16 weights (W4A16 ones are dequantized into bf16
// first, outside the timing) or FP8 ones (read in its loop). wgmma (sm_90a, gemm_wgmma): the
// checkpoint's format, W4A16 / FP8 weights dequantized inside the GEMM, so the signature carries
// the format. A W4A16 checkpoint on sm_90a has two: in the loop for M < kWgmmaDequantFirstM, bf16 above.
class GemmOp final : public OpBase {
 public:
  GemmOp(const TuneDevice* d, int64_t n, int64_t k, int group, bool wgmma, int64_t min_m, int64_t max_m,
         const std::string& label)
      : OpBase(d, tune::kGemm, tune::dense_signature(n, k, wgmma ? group : gpu::mma_gemm_group(group), false), label),
        n_(n),
        k_(k),
        group_(wgmma ? group : gpu::mma_gemm_group(group)),
        wgmma_(wgmma),
        min_m_(min_m),
        max_m_(max_m) {}
  bool serves(int64_t m) const override { return m > 16 && m >= min_m_ && m < max_m_; }
  std::vector<json> candidates(int64_t m) const override {
    return to_json_all(tune::gemm_candidates(n_, k_, m, wgmma_, group_));
  }
  json default_config(int64_t m) const override { return tune::to_json(default_gemm_tile(n_, k_, m, wgmma_)); }
  std::vector<KernelSpec> kernels(const json& c, int64_t) const override { return {plan(c).spec()}; }
  void setup(int64_t m, const Stream& s) override {
    release();
    if (group_ == 0) {
      w_ = random_bf16_copies(copies_for(size_t(n_ * k_) * 2), size_t(n_ * k_), 0.f, 0.02f, s);
    } else if (group_ == kFp8Group) {
      const int copies = copies_for(size_t(n_ * k_));
      w_.resize(size_t(copies)), scales_.resize(size_t(copies));
      for (int c = 0; c < copies; ++c) random_fp8(w_[size_t(c)], scales_[size_t(c)], n_, k_, s);
    } else {  // random bits of the u32 words, scales of a realistic size
      const int copies = copies_for(size_t(n_ * k_) / 2);
      w_ = random_bf16_copies(copies, size_t(n_ * k_ / 4), 0.f, 1.f, s);
      scales_ = random_bf16_copies(copies, size_t(n_ * k_ / group_), 0.f, 0.003f, s);
    }
    x_ = random_bf16(size_t(m * k_), 0.f, 1.f, s);
    y_ = alloc(size_t(m * n_) * 2);
  }
  void prepare(const json& c, int64_t) override { gpu::prepare(plan(c), fn(plan(c).spec())); }
  void run(const json& c, int64_t m, int it, const Stream& s) override {
    const gpu::GemmPlan p = plan(c);
    const size_t i = size_t(it) % w_.size();
    gpu::launch(p, fn(p.spec()), s, x_.ptr(), w_[i].ptr(), y_.ptr(), int(m), group_ ? scales_[i].ptr() : 0);
  }
  std::vector<float> output(const Stream& s) override { return download_bf16(y_, y_.size() / 2, s); }
  void release() override { w_.clear(), scales_.clear(), x_ = {}, y_ = {}; }

 private:
  gpu::GemmPlan plan(const json& c) const { return {n_, k_, tune::gemm_from_json(c), false, group_}; }
  int64_t n_, k_;
  int group_;
  bool wgmma_;
  int64_t min_m_, max_m_;
  std::vector<DeviceBuffer> w_, scales_;
  DeviceBuffer x_, y_;
};

// ---- MoE ----

// One layer's random MoE weights and rotating inputs.
class MoeOpBase : public OpBase {
 protected:
  MoeOpBase(const TuneDevice* d, const char* family, std::string sig, const MoeShape& s)
      : OpBase(d, family, std::move(sig),
               fmt::format("moe E{} k{} I{} {}", s.experts, s.top_k, s.inter, weight_format_name(s.group))),
        s_(s) {}

  // A weight [rows, K] in the shape's format into (main, scales).
  void weight(DeviceBuffer& main, DeviceBuffer& scales, int64_t rows, int64_t K, const Stream& st) {
    if (s_.group == 0) {
      main = random_bf16(size_t(rows * K), 0.f, 0.02f, st);
    } else if (s_.group == kFp8Group) {
      random_fp8(main, scales, rows, K, st);
    } else {
      main = random_bf16(size_t(rows * K / 4), 0.f, 1.f, st);  // random bits of rows * K / 8 u32 words
      scales = random_bf16(size_t(rows * K / s_.group), 0.f, 0.003f, st);
    }
  }
  // Weights, inputs and a workspace for m tokens (routed GEMM blocks up to tune::kMoeMaxBlockM).
  void setup_moe(int64_t m, const Stream& st) {
    release();
    const int64_t E = s_.experts, H = s_.hidden, I = s_.inter, Is = s_.shared_inter;
    router_ = random_bf16(size_t(E * H), 0.f, 0.05f, st);
    shared_gate_ = random_bf16(size_t(H), 0.f, 0.05f, st);
    weight(gate_up_, gate_up_s_, E * 2 * I, H, st);
    weight(down_, down_s_, E * H, I, st);
    weight(sgu_, sgu_s_, 2 * Is, H, st);
    weight(sd_, sd_s_, H, Is, st);
    x_ = random_bf16_copies(std::min(16, copies_for(size_t(m * H) * 2)), size_t(m * H), 0.f, 1.f, st);
    out_ = alloc(size_t(m * H) * 2);
    gpu::MoeTiles widest = gpu::MoeTiles::defaults(s_), narrowest = widest;  // any candidate's block_m fits
    widest.gemm.block_m = std::max(widest.gemm.block_m, tune::kMoeMaxBlockM);
    narrowest.gemm.block_m = tune::kMoeMinBlockM;
    ws_ = alloc(std::max(gpu::moe_workspace_bytes(s_, widest, m), gpu::moe_workspace_bytes(s_, narrowest, m)));
    ws_.fill_bytes(0, st);
  }
  // The GEMM ("prefill") path with tiles t: its kernels, their shared memory opted in, and its launches
  // as moe_forward makes them (router GEMM + top-k, align, the four grouped GEMMs, combine).
  std::vector<KernelSpec> gemm_path_kernels(const gpu::MoeTiles& t) const {
    std::vector<KernelSpec> out = {gemm_bf16_spec(s_.experts, s_.hidden, t.router_gemm, true), moe_router_topk_spec(s_),
                                   moe_align_spec(s_, t.gemm), moe_combine_spec(s_)};
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
      out.push_back(moe_gemm_spec(s_, g, t.gemm));
    return out;
  }
  void prepare_gemm_path(const gpu::MoeTiles& t) {
    fn(gemm_bf16_spec(s_.experts, s_.hidden, t.router_gemm, true)).set_max_dynamic_smem(t.router_gemm.smem_bytes());
    if (!t.gemm.wgmma) return;
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
      fn(moe_gemm_spec(s_, g, t.gemm)).set_max_dynamic_smem(t.gemm.smem_bytes(s_.group));
  }
  void run_gemm_path(const gpu::MoeTiles& t, const gpu::MoeScratch& sc, int64_t m, int it, const Stream& st) {
    gpu::launch_moe_router_prefill(fn(gemm_bf16_spec(s_.experts, s_.hidden, t.router_gemm, true)), t.router_gemm,
                                   fn(moe_router_topk_spec(s_)), st, s_, x(it), weights(), sc, m);
    gpu::launch_moe_align(fn(moe_align_spec(s_, t.gemm)), st, sc, m);
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::SharedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedDown})
      gpu::launch_moe_gemm(fn(moe_gemm_spec(s_, g, t.gemm)), t.gemm, st, s_, g, x(it), weights(), sc, m,
                           dev().ctx.device().sm_count);
    gpu::launch_moe_combine(fn(moe_combine_spec(s_)), st, sc, out_.ptr(), m);
  }
  gpu::MoeWeights weights() const {
    return {router_.ptr(), shared_gate_.ptr(), gate_up_.ptr(), gate_up_s_.ptr(), down_.ptr(), down_s_.ptr(),
            sgu_.ptr(),    sgu_s_.ptr(),       sd_.ptr(),      sd_s_.ptr()};
  }
  CUdeviceptr x(int it) const { return x_[size_t(it) % x_.size()].ptr(); }
  void release() override {
    router_ = {}, shared_gate_ = {}, gate_up_ = {}, gate_up_s_ = {}, down_ = {}, down_s_ = {};
    sgu_ = {}, sgu_s_ = {}, sd_ = {}, sd_s_ = {}, x_.clear(), out_ = {}, ws_ = {};
  }
  std::vector<float> output(const Stream& st) override { return download_bf16(out_, out_.size() / 2, st); }

  MoeShape s_;
  DeviceBuffer router_, shared_gate_, gate_up_, gate_up_s_, down_, down_s_, sgu_, sgu_s_, sd_, sd_s_;
  std::vector<DeviceBuffer> x_;
  DeviceBuffer out_, ws_;
};

class MoeRouterOp final : public MoeOpBase {
 public:
  MoeRouterOp(const TuneDevice* d, const MoeShape& s) : MoeOpBase(d, tune::kMoeRouter, tune::router_signature(s), s) {}
  // The grouped path's router (every decode step, prompt chunks up to kMoeGroupedMaxTokens); the GEMM
  // path routes through the router GEMM + moe_router_topk (in MoeGemmOp).
  bool serves(int64_t m) const override { return m <= kMoeGroupedMaxTokens; }
  std::vector<json> candidates(int64_t m) const override { return to_json_all(tune::moe_router_candidates(s_, m)); }
  json default_config(int64_t m) const override { return tune::to_json(default_moe_router_tile(s_, m)); }
  std::vector<KernelSpec> kernels(const json& c, int64_t) const override {
    return {moe_router_spec(s_, tune::moe_router_from_json(c))};
  }
  void setup(int64_t m, const Stream& st) override {
    setup_moe(m, st);
    m_ = m;
  }
  void run(const json& c, int64_t m, int it, const Stream& st) override {
    const MoeRouterTile t = tune::moe_router_from_json(c);
    gpu::launch_moe_router(fn(moe_router_spec(s_, t)), t, st, s_, x(it), weights(), scratch(m), m);
  }
  // Router logits (fp32 [m, E + 1]) and the renormalised top-k weights.
  std::vector<float> output(const Stream& st) override {
    const gpu::MoeScratch sc = scratch(m_);
    std::vector<float> out = download_f32(ws_, size_t(m_ * (s_.experts + 1)), st, size_t(sc.logits - ws_.ptr()));
    std::vector<float> w = download_f32(ws_, size_t(m_ * s_.top_k), st, size_t(sc.weights - ws_.ptr()));
    out.insert(out.end(), w.begin(), w.end());
    return out;
  }

 private:
  gpu::MoeScratch scratch(int64_t m) const { return gpu::moe_scratch(s_, gpu::MoeTiles::defaults(s_), m, ws_.ptr()); }
  int64_t m_ = 0;
};

// The decode path (router with its default tile, then the two expert GEMVs being tuned).
class MoeDecodeOp final : public MoeOpBase {
 public:
  MoeDecodeOp(const TuneDevice* d, const MoeShape& s) : MoeOpBase(d, tune::kMoeDecode, tune::moe_signature(s), s) {}
  // The runner takes the M = 1 tiles for every decode T (their K splits are part of each token's
  // arithmetic, gpu/tuned.cpp), so only M = 1 is tuned.
  bool serves(int64_t m) const override { return m == 1; }
  std::vector<json> candidates(int64_t) const override { return to_json_all(tune::moe_decode_candidates(s_)); }
  json default_config(int64_t) const override {
    return tune::to_json(tune::MoeDecodeConfig{default_moe_gate_up_tile(s_), default_moe_down_tile(s_)});
  }
  std::vector<KernelSpec> kernels(const json& c, int64_t m) const override {
    const tune::MoeDecodeConfig d = tune::moe_decode_from_json(c);
    return {moe_router_spec(s_, default_moe_router_tile(s_, m)), moe_decode_gate_up_spec(s_, d.gate_up),
            moe_decode_down_spec(s_, d.down)};
  }
  void setup(int64_t m, const Stream& st) override { setup_moe(m, st); }
  void prepare(const json& c, int64_t m) override {
    const tune::MoeDecodeConfig d = tune::moe_decode_from_json(c);
    fn(moe_decode_gate_up_spec(s_, d.gate_up)).set_max_dynamic_smem(int(moe_gate_up_smem_bytes(d.gate_up, m)));
    fn(moe_decode_down_spec(s_, d.down)).set_max_dynamic_smem(int(moe_down_smem_bytes(s_, d.down, m)));
  }
  void run(const json& c, int64_t m, int it, const Stream& st) override {
    const tune::MoeDecodeConfig d = tune::moe_decode_from_json(c);
    const gpu::MoeTiles tiles = gpu::MoeTiles::defaults(s_);
    const gpu::MoeScratch sc = gpu::moe_scratch(s_, tiles, m, ws_.ptr());
    const MoeRouterTile rt = default_moe_router_tile(s_, m);
    gpu::launch_moe_router(fn(moe_router_spec(s_, rt)), rt, st, s_, x(it), weights(), sc, m);
    gpu::launch_moe_decode_gate_up(fn(moe_decode_gate_up_spec(s_, d.gate_up)), d.gate_up, st, s_, x(it), weights(), sc, m);
    gpu::launch_moe_decode_down(fn(moe_decode_down_spec(s_, d.down)), d.down, st, s_, weights(), sc, out_.ptr(), m);
  }
};

// The prefill path (router with its default tile, align, the four GEMMs being tuned, combine).
class MoeGemmOp final : public MoeOpBase {
 public:
  MoeGemmOp(const TuneDevice* d, const MoeShape& s, bool wgmma)
      : MoeOpBase(d, tune::kMoeGemm, tune::moe_signature(s), s), wgmma_(wgmma) {}
  bool serves(int64_t m) const override { return m > kDecodeStepMaxRows; }
  std::vector<json> candidates(int64_t m) const override {
    return to_json_all(tune::moe_gemm_candidates(s_, m, wgmma_));
  }
  json default_config(int64_t m) const override {
    return tune::to_json(default_moe_gemm_tile(s_, wgmma_, m));
  }
  void prepare(const json& c, int64_t) override {
    const gpu::MoeTiles t = tiles(c);
    prepare_gemm_path(t);
  }
  std::vector<KernelSpec> kernels(const json& c, int64_t m) const override {
    gpu::MoeTiles t = tiles(c);
    return gemm_path_kernels(t);
  }
  void setup(int64_t m, const Stream& st) override { setup_moe(m, st); }
  void run(const json& c, int64_t m, int it, const Stream& st) override {
    const gpu::MoeTiles t = tiles(c);
    const gpu::MoeScratch sc = gpu::moe_scratch(s_, t, m, ws_.ptr());
    run_gemm_path(t, sc, m, it, st);
  }

 private:
  gpu::MoeTiles tiles(const json& c) const {
    gpu::MoeTiles t = gpu::MoeTiles::defaults(s_, wgmma_);
    t.gemm = tune::moe_gemm_from_json(c);
    return t;
  }
  bool wgmma_;
};

// Which path a prompt chunk of m tokens takes (kDecodeStepMaxRows < m <= the grouped bound): the
// grouped path (router + gate_up + down with the default M = 1 tiles, in the streaming form from its
// default min_tokens, as moe_forward runs it) against the GEMM path (router GEMM + top-k, align, the
// four grouped GEMMs, combine) with every GEMM tile of the moe_gemm space, each timed whole: the
// runner's GEMM path runs the tuned moe_gemm tile at m, so the path must be decided against the best
// tile, not the heuristic one (H200, 35B g128, m = 256: default tile 567 us, tuned 365, grouped 395).
// A GEMM arm's config carries its tile ("gemm"); the runner reads only "grouped". The default is
// moe_grouped_for's (grouped up to kMoeGroupedDefaultMaxTokens); the tuner records the other path
// only when it is faster by its min_gain.
class MoePathOp final : public MoeOpBase {
 public:
  MoePathOp(const TuneDevice* d, const MoeShape& s, bool wgmma, int64_t smem_optin)
      : MoeOpBase(d, tune::kMoePath, tune::moe_signature(s), s),
        wgmma_(wgmma),
        grouped_max_(moe_grouped_max_tokens(s, default_moe_gate_up_tile(s), default_moe_down_tile(s), smem_optin)) {}
  bool serves(int64_t m) const override { return m > kDecodeStepMaxRows && m <= grouped_max_; }
  std::vector<json> candidates(int64_t m) const override {
    std::vector<json> out = {tune::to_json(tune::MoePathConfig{true})};
    for (const MoeGemmTile& t : tune::moe_gemm_candidates(s_, m, wgmma_)) {
      json c = tune::to_json(tune::MoePathConfig{false});
      c["gemm"] = tune::to_json(t);
      out.push_back(std::move(c));
    }
    return out;
  }
  json default_config(int64_t m) const override {
    if (moe_grouped_for(m, grouped_max_)) return tune::to_json(tune::MoePathConfig{true});
    json c = tune::to_json(tune::MoePathConfig{false});
    c["gemm"] = tune::to_json(default_moe_gemm_tile(s_, wgmma_, m));
    return c;
  }
  std::vector<KernelSpec> kernels(const json& c, int64_t m) const override {
    const gpu::MoeTiles t = tiles(c, m);
    if (tune::moe_path_from_json(c).grouped) {
      if (t.stream.serves(m))
        return {moe_router_spec(s_, t.router(m)), moe_stream_gate_up_spec(s_, t.gate_up, t.stream),
                moe_stream_down_spec(s_, t.down, t.stream), moe_stream_combine_spec(s_)};
      return {moe_router_spec(s_, t.router(m)), moe_decode_gate_up_spec(s_, t.gate_up), moe_decode_down_spec(s_, t.down)};
    }
    return gemm_path_kernels(t);
  }
  void setup(int64_t m, const Stream& st) override { setup_moe(m, st); }
  void prepare(const json& c, int64_t m) override {
    const gpu::MoeTiles t = tiles(c, m);
    if (tune::moe_path_from_json(c).grouped) {
      if (t.stream.serves(m)) {
        const Function& gu = fn(moe_stream_gate_up_spec(s_, t.gate_up, t.stream));
        const Function& dn = fn(moe_stream_down_spec(s_, t.down, t.stream));
        gate_up_blocks_ = gpu::moe_stream_blocks(gu, t.stream, dev().ctx.device().sm_count);
        down_blocks_ = gpu::moe_stream_blocks(dn, t.stream, dev().ctx.device().sm_count);
        return;
      }
      fn(moe_decode_gate_up_spec(s_, t.gate_up)).set_max_dynamic_smem(int(moe_gate_up_smem_bytes(t.gate_up, m)));
      fn(moe_decode_down_spec(s_, t.down)).set_max_dynamic_smem(int(moe_down_smem_bytes(s_, t.down, m)));
      return;
    }
    prepare_gemm_path(t);
  }
  void run(const json& c, int64_t m, int it, const Stream& st) override {
    const gpu::MoeTiles t = tiles(c, m);
    const gpu::MoeScratch sc = gpu::moe_scratch(s_, t, m, ws_.ptr());
    if (tune::moe_path_from_json(c).grouped) {
      const MoeRouterTile& rt = t.router(m);
      gpu::launch_moe_router(fn(moe_router_spec(s_, rt)), rt, st, s_, x(it), weights(), sc, m);
      if (t.stream.serves(m)) {
        gpu::launch_moe_stream_gate_up(fn(moe_stream_gate_up_spec(s_, t.gate_up, t.stream)), t.stream, gate_up_blocks_,
                                       st, s_, x(it), weights(), sc, m);
        gpu::launch_moe_stream_down(fn(moe_stream_down_spec(s_, t.down, t.stream)), fn(moe_stream_combine_spec(s_)),
                                    t.stream, down_blocks_, st, s_, weights(), sc, out_.ptr(), m);
        return;
      }
      gpu::launch_moe_decode_gate_up(fn(moe_decode_gate_up_spec(s_, t.gate_up)), t.gate_up, st, s_, x(it), weights(), sc, m);
      gpu::launch_moe_decode_down(fn(moe_decode_down_spec(s_, t.down)), t.down, st, s_, weights(), sc, out_.ptr(), m);
      return;
    }
    run_gemm_path(t, sc, m, it, st);
  }

 private:
  // The heuristic tiles at m, the GEMM arm's tile from its config.
  gpu::MoeTiles tiles(const json& c, int64_t m) const {
    gpu::MoeTiles t = gpu::MoeTiles::defaults(s_, wgmma_, m);
    if (!tune::moe_path_from_json(c).grouped && c.contains("gemm")) t.gemm = tune::moe_gemm_from_json(c["gemm"]);
    return t;
  }
  bool wgmma_;
  int64_t grouped_max_;
  unsigned gate_up_blocks_ = 0, down_blocks_ = 0;  // the streaming kernels' grids (prepare)
};

// ---- attention ----

class AttentionOpBase : public OpBase {
 protected:
  AttentionOpBase(const TuneDevice* d, const char* family, const gpu::AttentionPlan& p)
      : OpBase(d, family, tune::attention_signature(p.hq, p.hkv, p.d),
               fmt::format("attention Hq{} Hkv{} D{}", p.hq, p.hkv, p.d)),
        plan_(p) {}
  // q [m, Hq, D], caches of `rows` rows (copies of them rotate), qkv (gate) [m, qkv_row], pos0 = `pos`.
  void setup_attention(int64_t m, int64_t rows, int32_t pos, const Stream& st) {
    release();
    const size_t cache = size_t(rows * plan_.hkv * plan_.d);
    const int copies = std::min(16, copies_for(cache * 4));
    k_ = random_bf16_copies(copies, cache, 0.f, 1.f, st);
    v_ = random_bf16_copies(copies, cache, 0.f, 1.f, st);
    q_ = random_bf16(size_t(m * plan_.hq * plan_.d), 0.f, 1.f, st);
    qkv_ = random_bf16(size_t(m * plan_.qkv_row()), 0.f, 1.f, st);
    out_ = alloc(size_t(m * plan_.hq * plan_.d) * 2);
    pos_ = alloc(4);
    pos_.upload(&pos, 4, st);
  }
  void release() override { k_.clear(), v_.clear(), q_ = {}, qkv_ = {}, out_ = {}, pos_ = {}, scratch_ = {}; }
  std::vector<float> output(const Stream& st) override { return download_bf16(out_, out_.size() / 2, st); }

  gpu::AttentionPlan plan_;
  std::vector<DeviceBuffer> k_, v_;
  DeviceBuffer q_, qkv_, out_, pos_, scratch_;
};

class AttentionPrefillOp final : public AttentionOpBase {
 public:
  AttentionPrefillOp(const TuneDevice* d, const gpu::AttentionPlan& p, int64_t smem_limit, bool wgmma)
      : AttentionOpBase(d, tune::kAttentionPrefill, p), smem_limit_(smem_limit), wgmma_(wgmma) {}
  bool serves(int64_t m) const override { return m > plan_.max_decode_tokens(); }
  std::vector<json> candidates(int64_t) const override {
    return to_json_all(tune::attention_prefill_candidates(plan_.hq, plan_.hkv, plan_.d, smem_limit_, wgmma_));
  }
  json default_config(int64_t) const override { return tune::to_json(plan_.prefill); }
  std::vector<KernelSpec> kernels(const json& c, int64_t) const override { return {with(c).prefill_spec()}; }
  void setup(int64_t m, const Stream& st) override { setup_attention(m, m, 0, st); }
  void run(const json& c, int64_t m, int it, const Stream& st) override {
    const gpu::AttentionPlan p = with(c);
    const size_t i = size_t(it) % k_.size();
    gpu::launch_attention_prefill(p, fn(p.prefill_spec()), st, q_.ptr(), k_[i].ptr(), v_[i].ptr(), qkv_.ptr(),
                                  out_.ptr(), pos_.ptr(), int(m));
  }

 private:
  gpu::AttentionPlan with(const json& c) const {
    gpu::AttentionPlan p = plan_;
    p.prefill = tune::attention_prefill_from_json(c);
    return p;
  }
  int64_t smem_limit_;
  bool wgmma_;  // sm_90a: the Hopper tiles too
};

class AttentionDecodeOp final : public AttentionOpBase {
 public:
  AttentionDecodeOp(const TuneDevice* d, const gpu::AttentionPlan& p) : AttentionOpBase(d, tune::kAttentionDecode, p) {}
  bool serves(int64_t m) const override { return m <= plan_.max_decode_tokens(); }
  std::vector<json> candidates(int64_t) const override {
    return to_json_all(tune::attention_decode_candidates(plan_.hq, plan_.hkv, plan_.d));
  }
  json default_config(int64_t) const override { return tune::to_json(plan_.decode); }
  std::vector<KernelSpec> kernels(const json& c, int64_t) const override {
    const gpu::AttentionPlan p = with(c);
    return {p.decode_spec(), p.decode_merge_spec()};
  }
  void setup(int64_t m, const Stream& st) override {
    setup_attention(m, kAttentionDecodeContext + m, int32_t(kAttentionDecodeContext), st);
    gpu::AttentionPlan widest = plan_;
    widest.decode.warps = 1;
    scratch_ = alloc(gpu::attention_decode_scratch_bytes(widest, splits(widest, m)));
  }
  void run(const json& c, int64_t m, int it, const Stream& st) override {
    const gpu::AttentionPlan p = with(c);
    const size_t i = size_t(it) % k_.size();
    gpu::launch_attention_decode(p, fn(p.decode_spec()), fn(p.decode_merge_spec()), st, q_.ptr(), k_[i].ptr(),
                                 v_[i].ptr(), qkv_.ptr(), out_.ptr(), scratch_.ptr(), splits(p, m), pos_.ptr(), int(m));
  }

 private:
  gpu::AttentionPlan with(const json& c) const {
    gpu::AttentionPlan p = plan_;
    p.decode = tune::attention_decode_from_json(c);
    return p;
  }
  int splits(const gpu::AttentionPlan& p, int64_t m) const {
    return gpu::attention_decode_splits(p, kAttentionDecodeContext + m, dev().ctx.device().sm_count);
  }
};

// ---- Gated DeltaNet ----

class GdnOpBase : public OpBase {
 protected:
  GdnOpBase(const TuneDevice* d, const char* family, const Config& cfg, const std::string& arch)
      : OpBase(d, family, tune::gdn_signature(gpu::gdn_shape(cfg)),
               fmt::format("gated deltanet Hv{} dk{} dv{}", cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                           cfg.linear_value_head_dim)),
        cfg_(cfg), shape_(gpu::gdn_shape(cfg)), stride_((gpu::gdn_proj_columns(cfg) + 7) / 8 * 8),
        cluster_(gdn_arch_has_cluster(arch)) {}

  std::vector<KernelSpec> all_kernels(const gpu::GdnTiles& t) const {
    std::vector<KernelSpec> out = {gpu::gdn_prologue_spec(cfg_, t.prologue), gpu::gdn_recurrent_spec(cfg_, t.recurrent),
                                   gpu::gdn_decode_spec(cfg_, t.recurrent), gpu::gdn_decode_norm_spec(cfg_, t.recurrent),
                                   gpu::gdn_decode_batch_spec(cfg_, t.recurrent),
                                   gpu::gdn_chunk_prepare_spec(cfg_), gpu::gated_rmsnorm_spec(cfg_, t.norm)};
    if (t.chunk.fused) {  // the form GdnKernels loads on this device
      out.push_back(gpu::gdn_chunk_fused_spec(cfg_, t.chunk,
                                              t.chunk.cluster && cluster_));
    } else {
      out.push_back(gpu::gdn_chunk_state_spec(cfg_, t.chunk));
      out.push_back(gpu::gdn_chunk_output_spec(cfg_));
    }
    return out;
  }
  const gpu::GdnKernels& variant(const gpu::GdnTiles& t) {
    const std::string key = t.key();
    auto it = variants_.find(key);
    if (it == variants_.end())
      it = variants_.emplace(key, std::make_unique<gpu::GdnKernels>(dev().jit, dev().ctx, cfg_, t)).first;
    return *it->second;
  }
  void setup_gdn(int64_t m, const Stream& st) {
    release();
    const int64_t C = cfg_.linear_conv_dim(), hv = shape_.hv;
    conv_w_ = random_bf16(size_t(C * shape_.kc), 0.f, 0.3f, st);
    a_log_ = alloc(size_t(hv) * 4);
    uniform(a_log_, size_t(hv), 0.f, 2.f, st);
    dt_bias_ = alloc(size_t(hv) * 4);
    uniform(dt_bias_, size_t(hv), -1.f, 1.f, st);
    norm_w_ = random_bf16(size_t(shape_.dv), 1.f, 0.1f, st);
    const size_t state = gpu::gdn_ssm_state_bytes(cfg_);
    const int copies = std::min(32, copies_for(state + size_t(m * stride_) * 2));
    proj_ = random_bf16_copies(copies, size_t(m * stride_), 0.f, 1.f, st);
    for (int c = 0; c < copies; ++c) {
      conv_.push_back(alloc(gpu::gdn_conv_state_bytes(cfg_)));
      ssm_.push_back(alloc(state));
    }
    ws_ = alloc(gpu::gdn_workspace_bytes(cfg_, m));
    o_ = alloc(size_t(shape_.hv * shape_.dv) * 4);
    y_ = alloc(size_t(m * shape_.hv * shape_.dv) * 2);
    pos_ = alloc(4);
    pos_.fill_bytes(0, st);
  }
  // One call of m tokens on copy `it` (its state zeroed first when it = 0: the checked run).
  void run_gdn(const gpu::GdnTiles& t, int64_t m, int it, bool chunked, const Stream& st) {
    const gpu::GdnKernels& k = variant(t);
    const size_t i = size_t(it) % proj_.size();
    if (it == 0) conv_[i].fill_bytes(0, st), ssm_[i].fill_bytes(0, st);
    const gpu::GdnLayerWeights w{conv_w_.ptr(), a_log_.ptr(), dt_bias_.ptr(), norm_w_.ptr()};
    const gpu::GdnLayerState s{conv_[i].ptr(), ssm_[i].ptr()};
    if (m == 1 && !chunked)
      k.decode(st, proj_[i].ptr(), int(stride_), pos_.ptr(), w, s, o_.ptr());  // o only: the runner's decode step
    else
      k.prefill(st, proj_[i].ptr(), int(stride_), int(m), pos_.ptr(), w, s, gpu::gdn_workspace(cfg_, m, ws_.ptr()),
                y_.ptr(), chunked);
  }
  void release() override {
    conv_w_ = {}, a_log_ = {}, dt_bias_ = {}, norm_w_ = {}, ws_ = {}, o_ = {}, y_ = {}, pos_ = {};
    proj_.clear(), conv_.clear(), ssm_.clear();
  }
  std::vector<float> output(const Stream& st) override { return download_bf16(y_, y_.size() / 2, st); }
  // Candidates differ from the default only in fp32 summation order (split-bf16 products are as
  // accurate as fp32), so the bf16 outputs differ by rare last-bit roundings.
  double tolerance() const override { return 5e-3; }

  Config cfg_;
  GdnShape shape_;
  int64_t stride_;
  bool cluster_;  // the device runs the fused pass's cluster form
  std::map<std::string, std::unique_ptr<gpu::GdnKernels>> variants_;
  DeviceBuffer conv_w_, a_log_, dt_bias_, norm_w_, ws_, o_, y_, pos_;
  std::vector<DeviceBuffer> proj_, conv_, ssm_;
};

class GdnPrefillOp final : public GdnOpBase {
 public:
  GdnPrefillOp(const TuneDevice* d, const Config& cfg, const std::string& arch)
      : GdnOpBase(d, tune::kGdnPrefill, cfg, arch) {}
  bool serves(int64_t) const override { return true; }  // prefill of every length is chunked
  std::vector<json> candidates(int64_t) const override { return to_json_all(tune::gdn_prefill_candidates(shape_)); }
  json default_config(int64_t) const override {
    const gpu::GdnTiles t = gpu::GdnTiles::defaults(shape_);
    return tune::to_json(tune::GdnPrefillConfig{t.chunk, t.prologue});
  }
  std::vector<KernelSpec> kernels(const json& c, int64_t) const override { return all_kernels(tiles(c)); }
  void setup(int64_t m, const Stream& st) override { setup_gdn(m, st); }
  void prepare(const json& c, int64_t) override { variant(tiles(c)); }
  void run(const json& c, int64_t m, int it, const Stream& st) override { run_gdn(tiles(c), m, it, true, st); }

 private:
  gpu::GdnTiles tiles(const json& c) const {
    gpu::GdnTiles t = gpu::GdnTiles::defaults(shape_);
    const tune::GdnPrefillConfig p = tune::gdn_prefill_from_json(c);
    t.chunk = p.chunk, t.prologue = p.prologue;
    return t;
  }
};

class GdnRecurrentOp final : public GdnOpBase {
 public:
  GdnRecurrentOp(const TuneDevice* d, const Config& cfg, const std::string& arch)
      : GdnOpBase(d, tune::kGdnRecurrent, cfg, arch) {}
  bool serves(int64_t m) const override { return m == 1; }  // decode (gdn_decode)
  std::vector<json> candidates(int64_t) const override { return to_json_all(tune::gdn_recurrent_candidates(shape_)); }
  json default_config(int64_t) const override { return tune::to_json(gpu::GdnTiles::defaults(shape_).recurrent); }
  std::vector<KernelSpec> kernels(const json& c, int64_t) const override { return all_kernels(tiles(c)); }
  void setup(int64_t m, const Stream& st) override { setup_gdn(m, st); }
  void prepare(const json& c, int64_t) override { variant(tiles(c)); }
  void run(const json& c, int64_t m, int it, const Stream& st) override { run_gdn(tiles(c), m, it, false, st); }
  // gdn_decode's output, the recurrence's o fp32 [Hv, dv] (the same for every tile: a row's sums do not
  // depend on the tile).
  std::vector<float> output(const Stream& st) override { return download_f32(o_, o_.size() / 4, st); }

 private:
  gpu::GdnTiles tiles(const json& c) const {
    gpu::GdnTiles t = gpu::GdnTiles::defaults(shape_);
    t.recurrent = tune::gdn_recurrent_from_json(c);
    return t;
  }
};

}  // namespace

std::vector<std::unique_ptr<TuneOp>> tune_ops(const Config& cfg, int group, const std::string& arch,
                                              const TuneDevice* device) {
  std::vector<std::unique_ptr<TuneOp>> ops;
  // Dense projections; shapes that share a signature (o_proj and out_proj of equal sizes) are one op.
  std::map<std::string, OpBase*> by_key;
  auto add = [&](std::unique_ptr<OpBase> op, const std::string& name) {
    const std::string key = op->family() + "/" + op->signature();
    if (auto it = by_key.find(key); it != by_key.end()) {
      it->second->add_label(name);
      return;
    }
    by_key[key] = op.get();
    ops.push_back(std::move(op));
  };
  for (const gpu::DenseShape& d : gpu::dense_shapes(cfg)) {
    const bool f32 = d.proj == gpu::DenseProj::LmHead;
    const std::string name = fmt::format("{} [{} x {}]", d.name, d.n, d.k);
    if (group)
      add(std::make_unique<W4GemvOp>(device, d.n, d.k, group, f32, name), name);
    else
      add(std::make_unique<Bf16GemvOp>(device, d.n, d.k, f32, name), name);
  }
  for (const gpu::DenseShape& d : gpu::dense_shapes(cfg)) {
    if (d.proj == gpu::DenseProj::LmHead) continue;  // prefill needs the last row's logits only (GEMV)
    const std::string name = fmt::format("{} [{} x {}]", d.name, d.n, d.k);
    const bool wgmma = arch_has_wgmma(arch);
    constexpr int64_t any = std::numeric_limits<int64_t>::max();
    if (wgmma && group != 0 && d.k % 64 == 0) {
      add(std::make_unique<GemmOp>(device, d.n, d.k, group, true, 0, gpu::kWgmmaDequantFirstM, name), name);
      add(std::make_unique<GemmOp>(device, d.n, d.k, 0, true, gpu::kWgmmaDequantFirstM, any, name), name);
    } else {
      add(std::make_unique<GemmOp>(device, d.n, d.k, wgmma ? 0 : gpu::mma_gemm_group(group), wgmma, 0, any, name), name);
    }
  }
  const MoeShape ms = gpu::moe_shape(cfg, group);
  ops.push_back(std::make_unique<MoeRouterOp>(device, ms));
  ops.push_back(std::make_unique<MoeDecodeOp>(device, ms));
  ops.push_back(std::make_unique<MoeGemmOp>(device, ms, arch_has_wgmma(arch)));
  ops.push_back(std::make_unique<MoePathOp>(device, ms, arch_has_wgmma(arch), smem_optin_bytes(arch)));
  if (cfg.num_layers_of(LayerType::FullAttention) > 0) {
    const int64_t smem = smem_limit_for(arch);
    const gpu::AttentionPlan p = gpu::attention_plan(cfg, smem, arch_has_wgmma(arch));
    ops.push_back(std::make_unique<AttentionPrefillOp>(device, p, smem, arch_has_wgmma(arch)));
    ops.push_back(std::make_unique<AttentionDecodeOp>(device, p));
  }
  if (cfg.num_layers_of(LayerType::LinearAttention) > 0) {
    ops.push_back(std::make_unique<GdnPrefillOp>(device, cfg, arch));
    ops.push_back(std::make_unique<GdnRecurrentOp>(device, cfg, arch));
  }
  return ops;
}

}  // namespace q35::qwen35
