#pragma once
// The device's ceilings, measured in the run whose figures are set against them (shared/perf.md:
// floors use the measured bandwidth and FLOP rate of the same GPU): the copy bandwidth of global
// memory (bytes read + written per second, on a buffer far larger than L2) and the bf16 tensor-core
// rate of mma.sync.m16n8k16 (fp32 accumulation, the instruction the GEMM kernels use). Each is the
// median of several CUDA-event-timed runs after warm-up. Kernels: kernel_templates/probe.cuh.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"
#include "runtime/jit/kernel_spec.h"

namespace q35 {

struct DeviceRates {
  double copy_bytes_per_s = 0;  // bytes read + written per second by a device-to-device copy
  double mma_flops_per_s = 0;   // bf16 mma.sync, 2 FLOPs per multiply-add
  size_t copy_bytes = 0;        // size of the copied buffer
  int runs = 0;                 // timed runs behind each median
};

struct ProbeOptions {
  size_t copy_bytes = size_t(1) << 30;  // 1 GiB: far beyond L2, so the copy streams from DRAM
  int warmup = 2;
  int runs = 11;
  int mma_iters = 8192;  // rounds per warp, about 1 ms on an H100
};

// Launch shapes: threads per block, 16-byte vectors in flight per copy thread, independent
// m16n8k16 accumulators per warp.
constexpr int kProbeCopyThreads = 256, kProbeCopyUnroll = 4;
constexpr int kProbeMmaThreads = 128, kProbeMmaAcc = 8;

// The probe kernels, as DeviceProbe launches them.
KernelSpec probe_fill_spec();
KernelSpec probe_copy_spec();
KernelSpec probe_mma_spec();
std::vector<KernelSpec> probe_kernels();

// The probe kernels loaded on one device, with their launch shapes (a few resident blocks per SM).
class DeviceProbe {
 public:
  DeviceProbe(JitEngine& jit, const Context& ctx);

  // `bytes` of random bits from `seed` at dst (bytes a multiple of 4).
  void fill(CUdeviceptr dst, size_t bytes, uint64_t seed, const Stream& stream) const;
  // dst = src, `bytes` a multiple of 16, both 16-byte aligned.
  void copy(CUdeviceptr src, CUdeviceptr dst, size_t bytes, const Stream& stream) const;
  // One tensor-core launch of `iters` rounds per warp; `out` holds mma_threads() floats (one sum
  // per thread). Returns the FLOPs it performs.
  double mma(CUdeviceptr out, int iters, uint64_t seed, const Stream& stream) const;
  size_t mma_threads() const;

  DeviceRates measure(const Stream& stream, const ProbeOptions& options = {}) const;

 private:
  const Context& ctx_;
  Function fill_, copy_, mma_;
  unsigned blocks_;  // per launch: 4 per SM
};

inline DeviceRates measure_device_rates(JitEngine& jit, const Context& ctx, const Stream& stream,
                                        const ProbeOptions& options = {}) {
  return DeviceProbe(jit, ctx).measure(stream, options);
}

}  // namespace q35
