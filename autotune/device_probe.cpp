#include "autotune/device_probe.h"

#include <algorithm>

#include "runtime/core/error.h"

namespace q35 {

namespace {

constexpr double kMmaFlops = 2.0 * 16 * 8 * 16;  // one m16n8k16

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

KernelSpec probe_fill_spec() { return {"probe", "probe_fill", {}}; }

KernelSpec probe_copy_spec() {
  return {"probe", "probe_copy",
          {{"THREADS", std::to_string(kProbeCopyThreads)}, {"UNROLL", std::to_string(kProbeCopyUnroll)}}};
}

KernelSpec probe_mma_spec() {
  return {"probe", "probe_mma", {{"THREADS", std::to_string(kProbeMmaThreads)}, {"ACC", std::to_string(kProbeMmaAcc)}}};
}

std::vector<KernelSpec> probe_kernels() { return {probe_fill_spec(), probe_copy_spec(), probe_mma_spec()}; }

DeviceProbe::DeviceProbe(JitEngine& jit, const Context& ctx)
    : ctx_(ctx),
      fill_(jit.load(probe_fill_spec(), ctx)),
      copy_(jit.load(probe_copy_spec(), ctx)),
      mma_(jit.load(probe_mma_spec(), ctx)),
      blocks_(unsigned(std::max(1, ctx.device().sm_count) * 4)) {}

void DeviceProbe::fill(CUdeviceptr dst, size_t bytes, uint64_t seed, const Stream& stream) const {
  if (bytes % 4) fail("probe fill: {} bytes is not a multiple of 4", bytes);
  fill_.launch({{blocks_}, {256}}, stream, dst, (unsigned long long)(bytes / 4), (unsigned long long)seed);
}

void DeviceProbe::copy(CUdeviceptr src, CUdeviceptr dst, size_t bytes, const Stream& stream) const {
  if (bytes % 16 || src % 16 || dst % 16)
    fail("probe copy: {} bytes from {:#x} to {:#x}: size and addresses must be multiples of 16", bytes, src, dst);
  copy_.launch({{blocks_}, {unsigned(kProbeCopyThreads)}}, stream, src, dst, (unsigned long long)(bytes / 16));
}

size_t DeviceProbe::mma_threads() const { return size_t(blocks_) * kProbeMmaThreads; }

double DeviceProbe::mma(CUdeviceptr out, int iters, uint64_t seed, const Stream& stream) const {
  if (iters < 1) fail("probe mma: iterations must be at least 1, got {}", iters);
  mma_.launch({{blocks_}, {unsigned(kProbeMmaThreads)}}, stream, out, iters, (unsigned long long)seed);
  return double(mma_threads() / 32) * iters * kProbeMmaAcc * kMmaFlops;
}

DeviceRates DeviceProbe::measure(const Stream& stream, const ProbeOptions& o) const {
  if (o.runs < 1 || o.warmup < 0) fail("device probe: runs must be >= 1 and warm-up >= 0");
  ctx_.make_current();
  const Driver& driver = ctx_.driver();
  Event start(driver), stop(driver);
  // Milliseconds of one call of `launch`, timed with events on `stream`.
  auto timed_ms = [&](auto&& launch) {
    start.record(stream);
    launch();
    stop.record(stream);
    stop.synchronize();
    const double ms = stop.elapsed_ms_since(start);
    if (ms <= 0) fail("device probe: the event timer returned {} ms", ms);
    return ms;
  };

  DeviceRates r;
  r.runs = o.runs;
  r.copy_bytes = o.copy_bytes / 16 * 16;
  {
    DeviceBuffer src(driver, r.copy_bytes), dst(driver, r.copy_bytes);
    fill(src.ptr(), r.copy_bytes, 0x5eed, stream);
    std::vector<double> per_s;
    for (int i = 0; i < o.warmup + o.runs; ++i) {
      const double ms = timed_ms([&] { copy(src.ptr(), dst.ptr(), r.copy_bytes, stream); });
      if (i >= o.warmup) per_s.push_back(2.0 * double(r.copy_bytes) / (ms * 1e-3));
    }
    r.copy_bytes_per_s = median(per_s);
  }
  {
    DeviceBuffer out(driver, mma_threads() * sizeof(float));
    std::vector<double> per_s;
    for (int i = 0; i < o.warmup + o.runs; ++i) {
      double flops = 0;
      const double ms = timed_ms([&] { flops = mma(out.ptr(), o.mma_iters, 0x5eed + uint64_t(i), stream); });
      if (i >= o.warmup) per_s.push_back(flops / (ms * 1e-3));
    }
    r.mma_flops_per_s = median(per_s);
  }
  stream.synchronize();
  return r;
}

}  // namespace q35
