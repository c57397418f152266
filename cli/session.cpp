#include "cli/session.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <thread>

#include "cli/state_memory.h"
#include "models/qwen35/cpu_model.h"
#include "models/qwen35/gpu_model.h"
#include "models/qwen35/hf_quant.h"
#include "models/qwen35/memory.h"
#include "models/qwen35/quantized.h"
#include "models/qwen35/weights.h"
#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"
#include "runtime/cuda/driver.h"
#include "runtime/io/safetensors.h"
#include "runtime/jit/jit_engine.h"

namespace q35::cli {

namespace fs = std::filesystem;

fs::path executable_dir() {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? fs::path() : exe.parent_path();
}

std::shared_ptr<const TuneTable> load_tuning(const DeviceInfo& device, bool enabled,
                                             const std::function<void(const std::string&)>& log) {
  if (!enabled) return nullptr;
  return std::make_shared<const TuneTable>(TuneTable::find(tune_identity(device), executable_dir(), log));
}

ModelInfo load_model_info(const fs::path& dir) {
  if (!fs::exists(dir)) fail("model directory {} does not exist", dir.string());
  if (!fs::is_directory(dir)) fail("--model {} is not a directory", dir.string());
  return {dir, qwen35::Config::from_file(dir / "config.json"),
          qwen35::GenerationConfig::from_file(dir / "generation_config.json")};
}

Tokenizer load_tokenizer(const fs::path& dir) {
  fs::path path = dir / "tokenizer.json";
  if (!fs::exists(path)) fail("{}: no tokenizer.json in the model directory", path.string());
  return Tokenizer::from_file(path);
}

std::vector<FlagSpec> engine_flags() {
  return {
      {"device", "cpu|cuda", "where to run (default: cuda when a GPU is found, else cpu)"},
      {"quant", "bf16|w4a16|fp8",
       "GPU weight format (default w4a16; a quantized checkpoint is w4a16; fp8: e4m3 weights, W8A16 kernels; "
       "with --device cpu, fp8 runs the reference on the FP8-rounded weights)"},
      {"group-size", "G", "W4A16 group size 32|64|128 (default 128, or the largest dividing every K)"},
      {"max-context", "N", "tokens of context to allocate (default min(32768, the model's maximum))"},
      {"no-tune", "", "ignore tune caches: every kernel takes its heuristic default tile"},
      {"verbose", "", "load details: kernels, memory, quantization error per tensor type"},
  };
}

namespace {

// The CPU reference with max_batch sequence slots. A slot's state (K/V caches of max_context rows)
// is allocated when the slot is first used, so a large --max-batch costs memory only when that
// many requests run at once.
class CpuEngine final : public Engine {
 public:
  // fp8: the weights the GPU holds with --quant fp8 (load_host_weights_fp8), else as stored.
  CpuEngine(const ModelInfo& info, int64_t max_context, int max_batch, bool fp8) : max_context_(max_context) {
    if (max_batch < 1) fail("CpuEngine: max_batch must be >= 1, got {}", max_batch);
    // Float, FP8, GPTQ and `q35jit quantize` checkpoints all load as fp32 (dequantized exactly).
    Checkpoint ckpt(info.dir);
    qwen35::validate_checkpoint(info.config, ckpt);
    model_ = std::make_unique<qwen35::CpuModel>(info.config, fp8 ? qwen35::load_host_weights_fp8(info.config, ckpt)
                                                                 : qwen35::load_host_weights(info.config, ckpt));
    states_.resize(size_t(max_batch));
    state(0);
  }
  std::string device() const override { return "cpu"; }
  int max_batch() const override { return int(states_.size()); }
  int64_t max_context() const override { return max_context_; }
  int64_t position(int slot) const override { return states_[checked(slot)] ? states_[size_t(slot)]->pos : 0; }
  std::vector<float> logits(int slot, std::span<const int32_t> tokens, bool all) override {
    return model_->forward(state(slot), tokens, all);
  }
  int32_t prefill(int slot, std::span<const int32_t> tokens, Sampler& sampler) override {
    return sampler.sample(model_->forward(state(slot), tokens, false));
  }
  std::vector<DecodeOutput> decode_batch(std::span<const DecodeEntry> batch) override {
    if (batch.empty() || batch.size() > states_.size())
      fail("decode_batch: {} sequences for an engine of {} slots", batch.size(), states_.size());
    std::vector<qwen35::CpuState*> states;
    std::vector<int32_t> tokens;
    for (const DecodeEntry& e : batch) {
      states.push_back(&state(e.slot));
      tokens.push_back(e.token);
    }
    const std::vector<float> logits = model_->forward_batch(states, tokens);  // [B, vocab]
    const size_t V = logits.size() / batch.size();
    std::vector<DecodeOutput> out(batch.size());
    for (size_t b = 0; b < batch.size(); ++b) {
      std::span<const float> row(logits.data() + b * V, V);
      if (batch[b].sampler)
        out[b].id = batch[b].sampler->sample(row);
      else
        out[b].logits.assign(row.begin(), row.end());
    }
    return out;
  }
  void reset(int slot) override {
    // Rows at and after the position are never read, so emptying needs only the recurrent state.
    qwen35::CpuState& s = state(slot);
    for (auto& v : s.conv_state) std::fill(v.begin(), v.end(), 0.0f);
    for (auto& v : s.gdn_state) std::fill(v.begin(), v.end(), 0.0f);
    s.pos = 0;
  }
  void set_state_memory(size_t device_bytes, size_t host_bytes) override {
    if (device_bytes > 0) fail("the CPU engine keeps saved states in host memory only (a device tier was asked)");
    memory_.set_capacity(0, host_bytes);
  }
  size_t state_capacity(Tier tier) const override { return memory_.capacity(tier); }
  size_t state_used(Tier tier) const override { return memory_.used(tier); }
  size_t state_bytes(StatePart part, int64_t pos) const override {
    const qwen35::CpuState& s = *states_[0];  // every slot has the same shapes (slot 0 exists from the start)
    size_t floats = 0;
    for (size_t i = 0; i < s.k_cache.size(); ++i)
      floats += part == StatePart::Recurrent ? s.conv_state[i].size() + s.gdn_state[i].size()
                                             : 2 * s.k_cache[i].size() / size_t(s.max_context) * size_t(pos);
    return floats * sizeof(float);
  }
  // Layout: per layer, K rows [0, pos) then V rows (KV); the conv inputs then the recurrent state
  // (Recurrent). Copies in the calling thread: nothing is asynchronous on the CPU.
  SavedStatePtr save_state(int slot, StatePart part, Tier tier) override {
    const qwen35::CpuState& s = state(slot);
    std::shared_ptr<SavedState> out = memory_.allocate(part, s.pos, state_bytes(part, s.pos), tier);
    if (!out) return nullptr;
    float* dst = reinterpret_cast<float*>(uintptr_t(out->addr()));
    auto put = [&](const std::vector<float>& v, size_t n) {
      std::memcpy(dst, v.data(), n * sizeof(float));
      dst += n;
    };
    for (size_t i = 0; i < s.k_cache.size(); ++i) {
      if (part == StatePart::Recurrent) {
        put(s.conv_state[i], s.conv_state[i].size());
        put(s.gdn_state[i], s.gdn_state[i].size());
      } else {
        const size_t row = s.k_cache[i].size() / size_t(s.max_context);
        put(s.k_cache[i], row * size_t(s.pos));
        put(s.v_cache[i], row * size_t(s.pos));
      }
    }
    return out;
  }
  SavedStatePtr copy_state(const SavedState& from, Tier tier) override {
    std::shared_ptr<SavedState> out = memory_.allocate(from.part, from.pos, from.bytes, tier);
    if (!out) return nullptr;
    std::memcpy(reinterpret_cast<void*>(uintptr_t(out->addr())), reinterpret_cast<const void*>(uintptr_t(from.addr())),
                from.bytes);
    return out;
  }
  void restore(int slot, const SavedState& kv, const SavedState& recurrent) override {
    qwen35::CpuState& s = state(slot);
    if (kv.part != StatePart::KV || recurrent.part != StatePart::Recurrent)
      fail("restore: the saved states are not a K/V part and a recurrent part");
    if (kv.pos < recurrent.pos || recurrent.pos > s.max_context || recurrent.pos < 0)
      fail("restore: K/V rows for {} tokens cannot restore position {} (max context {})", kv.pos, recurrent.pos,
           s.max_context);
    if (kv.bytes != state_bytes(StatePart::KV, kv.pos) || recurrent.bytes != state_bytes(StatePart::Recurrent, 0))
      fail("restore: saved states of {} and {} bytes do not fit this model", kv.bytes, recurrent.bytes);
    const float* rec = reinterpret_cast<const float*>(uintptr_t(recurrent.addr()));
    const float* rows = reinterpret_cast<const float*>(uintptr_t(kv.addr()));
    for (size_t i = 0; i < s.k_cache.size(); ++i) {
      for (std::vector<float>* v : {&s.conv_state[i], &s.gdn_state[i]}) {
        if (!v->empty()) std::memcpy(v->data(), rec, v->size() * sizeof(float));
        rec += v->size();
      }
      const size_t row = s.k_cache[i].size() / size_t(s.max_context);
      for (std::vector<float>* v : {&s.k_cache[i], &s.v_cache[i]}) {
        if (row) std::memcpy(v->data(), rows, row * size_t(recurrent.pos) * sizeof(float));
        rows += row * size_t(kv.pos);
      }
    }
    s.pos = recurrent.pos;
  }

 private:
  size_t checked(int slot) const {
    if (slot < 0 || size_t(slot) >= states_.size())
      fail("slot {} outside the engine's {} slots (--max-batch)", slot, states_.size());
    return size_t(slot);
  }
  // The slot's state, allocated (empty) on first use.
  qwen35::CpuState& state(int slot) {
    std::optional<qwen35::CpuState>& s = states_[checked(slot)];
    if (!s) s = model_->new_state(max_context_);
    return *s;
  }
  const qwen35::CpuState& state(int slot) const {
    const std::optional<qwen35::CpuState>& s = states_[checked(slot)];
    if (!s) fail("slot {} holds no sequence yet: reset or restore it first", slot);
    return *s;
  }
  std::unique_ptr<qwen35::CpuModel> model_;
  int64_t max_context_;
  std::vector<std::optional<qwen35::CpuState>> states_;  // [max_batch], empty until first used
  StateMemory memory_{std::nullopt, heap_memory(), size_t(64) << 20};  // host tier only, 64 MiB pieces
};

// The GPU runner with options.max_batch sequence slots (fixed at start: their K/V rows and DeltaNet
// states are allocated with the model, see models/qwen35/batch.h); a step of several slots is the
// batched decode step, a step of one slot its single-sequence CUDA graph.
class GpuEngine final : public Engine {
 public:
  GpuEngine(const ModelInfo& info, qwen35::GpuModelOptions options, bool tuned)
      : ctx_(driver_, 0), jit_(default_cache_dir()), log_(options.log) {
    options.tuning = load_tuning(ctx_.device(), tuned, options.log);
    Checkpoint ckpt(info.dir);
    if (options.prequantized)
      qwen35::validate_quantized_checkpoint(info.config, ckpt, options.group);
    else
      qwen35::validate_checkpoint(info.config, ckpt);
    check_gpu_memory(ctx_, info.config, options, info.dir.filename().string());
    model_ = std::make_unique<qwen35::GpuModel>(driver_, ctx_, jit_, info.config, ckpt, options);
  }
  // Random weights of `config`'s shapes (serve --synthetic).
  GpuEngine(const qwen35::Config& config, qwen35::GpuModelOptions options, bool tuned, uint64_t seed)
      : ctx_(driver_, 0), jit_(default_cache_dir()), log_(options.log) {
    options.tuning = load_tuning(ctx_.device(), tuned, options.log);
    qwen35::GpuModelOptions need = options;
    need.prequantized = true;  // random weights are generated in place: no staging buffer
    check_gpu_memory(ctx_, config, need, "synthetic " + std::to_string(config.num_layers) + "-layer model");
    model_ = std::make_unique<qwen35::GpuModel>(driver_, ctx_, jit_, config, options, seed);
  }
  std::string device() const override { return ctx_.device().name; }
  int max_batch() const override { return model_->max_batch(); }
  int64_t max_context() const override { return model_->max_context(); }
  int64_t position(int slot) const override { return model_->position(slot); }
  std::vector<float> logits(int slot, std::span<const int32_t> tokens, bool all) override {
    bind();
    return model_->forward(tokens, all, slot);
  }
  int32_t prefill(int slot, std::span<const int32_t> tokens, Sampler& sampler) override {
    bind();
    return model_->prefill(tokens, sampler.params(), slot);
  }
  // Sampling on the device with each entry's parameters and seed (the slot's device rng); entries
  // without a sampler get their logits.
  std::vector<DecodeOutput> decode_batch(std::span<const DecodeEntry> batch) override {
    bind();
    std::vector<qwen35::GpuModel::BatchEntry> rows;
    rows.reserve(batch.size());
    for (const DecodeEntry& e : batch)
      rows.push_back({e.slot, e.token, e.sampler ? e.sampler->params() : SamplingParams{}, e.sampler == nullptr});
    qwen35::GpuModel::BatchResult r = model_->decode_batch(rows);
    std::vector<DecodeOutput> out(batch.size());
    for (size_t b = 0; b < batch.size(); ++b) {
      out[b].id = batch[b].sampler ? r.ids[b] : -1;
      out[b].logits = std::move(r.logits[b]);
    }
    return out;
  }
  void reset(int slot) override {
    bind();
    model_->reset(slot);
  }
  void set_state_memory(size_t device_bytes, size_t host_bytes) override {
    memory_.set_capacity(device_bytes, host_bytes);
  }
  size_t state_capacity(Tier tier) const override { return memory_.capacity(tier); }
  size_t state_used(Tier tier) const override { return memory_.used(tier); }
  size_t state_bytes(StatePart part, int64_t pos) const override {
    return part == StatePart::KV ? model_->kv_block_bytes(pos) : model_->recurrent_block_bytes();
  }
  // The copies are issued on the model's stream and return at once (device to device, or device to
  // pinned host memory): no host synchronisation.
  SavedStatePtr save_state(int slot, StatePart part, Tier tier) override {
    bind();  // the arena may reserve a segment (cuMemAlloc / cuMemHostAlloc) on this thread
    const int64_t pos = model_->position(slot);
    std::shared_ptr<SavedState> out = memory_.allocate(part, pos, state_bytes(part, pos), tier);
    if (!out) return nullptr;
    if (part == StatePart::KV)
      model_->save_kv_block(slot, pos, out->addr());
    else
      model_->save_recurrent_block(slot, out->addr());
    return out;
  }
  SavedStatePtr copy_state(const SavedState& from, Tier tier) override {
    bind();
    std::shared_ptr<SavedState> out = memory_.allocate(from.part, from.pos, from.bytes, tier);
    if (!out) return nullptr;
    model_->copy_block(out->addr(), from.addr(), from.bytes);  // one copy: the block is contiguous
    return out;
  }
  void restore(int slot, const SavedState& kv, const SavedState& recurrent) override {
    if (kv.part != StatePart::KV || recurrent.part != StatePart::Recurrent)
      fail("restore: the saved states are not a K/V part and a recurrent part");
    if (kv.pos < recurrent.pos)
      fail("restore: K/V rows for {} tokens cannot restore position {}", kv.pos, recurrent.pos);
    if (kv.bytes != model_->kv_block_bytes(kv.pos) || recurrent.bytes != model_->recurrent_block_bytes())
      fail("restore: saved states of {} and {} bytes do not fit this model", kv.bytes, recurrent.bytes);
    bind();
    model_->restore_blocks(slot, recurrent.pos, kv.addr(), kv.pos, recurrent.addr());
  }
  size_t device_free_bytes() const override {
    bind();
    return ctx_.mem_info().first;
  }
  int64_t idle_prefill_tokens() const override { return model_->max_chunk(); }
  ~GpuEngine() override {
    try {
      model_->stream().synchronize();  // copies into or out of saved states finish before their memory goes
    } catch (const Error&) {
    }
  }

 private:
  // The context current on the calling thread: the server calls the engine from its worker thread,
  // and calls without a stream (cuMemAlloc, cuMemHostAlloc, cuMemGetInfo) need it.
  void bind() const {
    thread_local const GpuEngine* bound = nullptr;
    if (bound != this) {
      ctx_.make_current();
      bound = this;
    }
  }
  // The tiers' memory: device segments (cuMemAlloc) and pinned host segments (cuMemHostAlloc),
  // reserved in 1 GiB pieces as the prefix cache first needs them; a failed reservation ends the
  // tier's growth with one notice.
  StateMemory make_memory() {
    BlockArena::Memory device = tier(device_segments_, "device", [](const Driver& d, size_t bytes) {
      DeviceBuffer b(d, bytes);
      return std::pair{uint64_t(b.ptr()), std::move(b)};
    });
    BlockArena::Memory host = tier(host_segments_, "host", [](const Driver& d, size_t bytes) {
      PinnedBuffer b(d, bytes);
      return std::pair{uint64_t(reinterpret_cast<uintptr_t>(b.data())), std::move(b)};
    });
    return StateMemory(std::move(device), std::move(host), size_t(1) << 30);
  }

  // A tier's memory: `make` allocates a segment (address, owning buffer), kept in `segments` until the
  // arena frees it; a failed allocation ends the tier's growth with one notice (address 0).
  template <class Buffer, class Make>
  BlockArena::Memory tier(std::map<uint64_t, Buffer>& segments, const char* name, Make make) {
    return {[this, &segments, name, make](size_t bytes) -> uint64_t {
              try {
                auto [a, b] = make(driver_, bytes);
                segments.emplace(a, std::move(b));
                return a;
              } catch (const Error& e) {
                if (log_) log_(fmt::format("prefix cache: {} tier stops growing: {}", name, e.what()));
                return 0;
              }
            },
            [&segments](uint64_t a, size_t) { segments.erase(a); }};
  }

  Driver driver_;
  Context ctx_;
  JitEngine jit_;
  std::unique_ptr<qwen35::GpuModel> model_;
  std::function<void(const std::string&)> log_;
  std::map<uint64_t, DeviceBuffer> device_segments_;
  std::map<uint64_t, PinnedBuffer> host_segments_;
  StateMemory memory_ = make_memory();  // after the segments: destroyed first, releasing them
};

bool gpu_present() {
  try {
    Driver d;
    return d.device_count() > 0;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace

void check_gpu_memory(const Context& ctx, const qwen35::Config& config, const qwen35::GpuModelOptions& o,
                      const std::string& name) {
  const qwen35::MemoryNeed need =
      qwen35::gpu_memory_need(config, o.group, o.max_context, o.max_chunk, !o.prequantized, o.max_batch);
  const auto [free_bytes, total_bytes] = ctx.mem_info();
  qwen35::check_fits(need, free_bytes, total_bytes, ctx.device().name,
                     fmt::format("{} ({}, {} tokens of context{})", name, weight_format_name(o.group), o.max_context,
                                 o.max_batch > 1 ? fmt::format(" x {} slots (--max-batch)", o.max_batch) : ""));
}

ModelSource model_source(const Args& args) {
  if (args.has("model") == args.has("synthetic"))
    fail("q35jit {}: give --model DIR or --synthetic NAME", args.command());
  ModelSource m;
  if (auto dir = args.get("model")) {
    m.info = load_model_info(*dir);
    m.config = m.info->config;
  } else {
    m.synthetic = *args.get("synthetic");
    m.config = qwen35::Config::preset(m.synthetic);
  }
  return m;
}

WeightChoice weight_choice(const Args& args, const qwen35::Config& config, const fs::path& dir) {
  const std::string quant = args.get("quant").value_or("w4a16");
  if (quant != "bf16" && quant != "w4a16" && quant != "fp8")
    fail("q35jit {}: --quant must be bf16, w4a16 or fp8, got '{}'", args.command(), quant);
  const std::optional<qwen35::QuantNote> note =
      dir.empty() ? std::nullopt : qwen35::read_quant_note(dir / "config.json");
  WeightChoice w;
  w.prequantized = note.has_value();
  if (quant != "w4a16" && note)
    fail("{} is a W4A16 checkpoint: it loads only with --quant w4a16", dir.string());
  if (quant != "w4a16" && args.has("group-size"))
    fail("q35jit {}: --group-size applies to --quant w4a16 (bf16 has no groups, fp8 a scale per 128 weights along K)",
         args.command());
  if (quant == "bf16") {
    w.format = qwen35::WeightFormat::BF16;
    return w;
  }
  if (quant == "fp8") {
    qwen35::check_fp8_shapes(config);
    // An FP8 checkpoint keeps its codes and scales: its blocks must map onto 128-k blocks per row.
    const qwen35::HfQuant hf = dir.empty() ? qwen35::HfQuant{} : qwen35::HfQuant::from_config(dir / "config.json");
    if (hf.method == qwen35::QuantMethod::FP8 && hf.fp8_block_k % 128 != 0)
      fail("{}: FP8 weight_block_size [{}, {}]: --quant fp8 keeps the checkpoint's scales and needs blocks of a "
           "multiple of 128 along K: use --quant w4a16 or bf16",
           dir.string(), hf.fp8_block_n, hf.fp8_block_k);
    w.format = qwen35::WeightFormat::FP8;
    w.group = kFp8Group;
    return w;
  }
  if (note) {
    w.group = note->group_size;
    if (args.has("group-size") && args.get_int("group-size", 0, 0, 1 << 20) != note->group_size)
      fail("{} was quantized with group size {}, not --group-size {}: quantize the original checkpoint again",
           dir.string(), note->group_size, *args.get("group-size"));
  } else if (const qwen35::HfQuant hf = dir.empty() ? qwen35::HfQuant{} : qwen35::HfQuant::from_config(dir / "config.json");
             hf.method == qwen35::QuantMethod::GPTQ) {
    // The GPTQ experts keep their own groups (mapped without requantizing): one group size for all.
    if (hf.gptq_group <= 0)
      fail("{}: GPTQ group_size {} (per column) cannot map onto W4A16 groups: use --quant bf16", dir.string(),
           hf.gptq_group);
    w.group = int(hf.gptq_group);
    if (args.has("group-size") && args.get_int("group-size", 0, 0, 1 << 20) != w.group)
      fail("{} is GPTQ with group size {}: its experts load exactly only with --group-size {}", dir.string(), w.group,
           w.group);
    qwen35::check_group_size(config, w.group);
  } else {
    w.group = int(args.get_int("group-size", qwen35::default_group_size(config), 1, 1 << 20));
    qwen35::check_group_size(config, w.group);
  }
  return w;
}

namespace {

qwen35::GpuModelOptions gpu_options(const Args& args, const qwen35::Config& config, const fs::path& dir,
                                    int64_t max_context, const std::function<void(const std::string&)>& log,
                                    int max_batch, int64_t max_chunk) {
  const WeightChoice w = weight_choice(args, config, dir);
  qwen35::GpuModelOptions o;
  o.format = w.format;
  o.group = w.group;
  o.prequantized = w.prequantized;
  o.max_context = max_context;
  o.max_batch = max_batch;
  // The batched step's rows share the chunk's scratch, so it holds at least max_batch rows.
  if (max_chunk > 0) o.max_chunk = std::max<int64_t>(std::min(max_chunk, max_context), max_batch);
  o.verbose = args.flag("verbose");
  o.log = log;
  return o;
}

}  // namespace

std::unique_ptr<Engine> make_cpu_engine(const ModelInfo& info, int64_t max_context, int max_batch) {
  return std::make_unique<CpuEngine>(info, max_context, max_batch, /*fp8=*/false);
}

std::unique_ptr<Engine> make_engine(const Args& args, const ModelInfo& info, int64_t default_max_context,
                                    const std::function<void(const std::string&)>& log, int max_batch,
                                    int64_t max_chunk) {
  const std::string& cmd = args.command();
  std::string device = args.get("device").value_or("");
  if (device.empty()) device = gpu_present() ? "cuda" : "cpu";
  if (device != "cpu" && device != "cuda") fail("q35jit {}: --device must be cpu or cuda, got '{}'", cmd, device);
  const int64_t model_max = info.config.max_position_embeddings > 0 ? info.config.max_position_embeddings : 32768;
  const int64_t max_context = args.get_int("max-context", std::min(default_max_context, model_max), 1, model_max);
  if (device == "cpu") {
    const bool fp8 = args.get("quant") == "fp8";
    if ((args.has("quant") && !fp8) || args.has("group-size") || args.flag("no-tune"))
      fail("q35jit {}: --quant bf16|w4a16, --group-size and --no-tune apply to --device cuda (the CPU reference runs "
           "in fp32; --quant fp8 runs it on the weights rounded through FP8 as the GPU keeps them)",
           cmd);
    if (fp8) weight_choice(args, info.config, info.dir);  // the shapes, an FP8 checkpoint's blocks
    return std::make_unique<CpuEngine>(info, max_context, max_batch, fp8);
  }
  return std::make_unique<GpuEngine>(
      info, gpu_options(args, info.config, info.dir, max_context, log, max_batch, max_chunk), !args.flag("no-tune"));
}

std::unique_ptr<Engine> make_synthetic_engine(const Args& args, const qwen35::Config& config,
                                              int64_t default_max_context,
                                              const std::function<void(const std::string&)>& log, int max_batch,
                                              int64_t max_chunk) {
  if (args.get("device").value_or("cuda") != "cuda")
    fail("q35jit {}: --synthetic runs on the GPU only (--device cuda)", args.command());
  const int64_t model_max = config.max_position_embeddings > 0 ? config.max_position_embeddings : 32768;
  const int64_t max_context = args.get_int("max-context", std::min(default_max_context, model_max), 1, model_max);
  return std::make_unique<GpuEngine>(config, gpu_options(args, config, {}, max_context, log, max_batch, max_chunk),
                                     !args.flag("no-tune"), 1234);
}

}  // namespace q35::cli
