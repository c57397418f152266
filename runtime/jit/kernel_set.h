#pragma once
// The loaded kernels of one model: compiled in parallel up front (preload), then looked up by
// spec; a spec not preloaded is compiled and loaded on first use (from the JIT caches).
#include <map>
#include <string>
#include <vector>

#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"

namespace q35 {

class KernelSet {
 public:
  KernelSet(JitEngine& jit, const Context& ctx) : jit_(jit), ctx_(ctx) {}
  // Compiles every spec on `threads` threads (NVRTC or the caches) and loads them.
  void preload(const std::vector<KernelSpec>& specs, int threads);
  const Function& get(const KernelSpec& spec);
  size_t size() const { return loaded_.size(); }

 private:
  JitEngine& jit_;
  const Context& ctx_;
  std::map<std::string, Function> loaded_;  // by KernelSpec::str()
};

}  // namespace q35
