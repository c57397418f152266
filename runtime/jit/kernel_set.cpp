#include "runtime/jit/kernel_set.h"

namespace q35 {

void KernelSet::preload(const std::vector<KernelSpec>& specs, int threads) {
  jit_.compile_all(specs, ctx_.device().arch(), threads);
  for (const KernelSpec& s : specs) get(s);
}

const Function& KernelSet::get(const KernelSpec& spec) {
  const std::string key = spec.str();
  auto it = loaded_.find(key);
  if (it == loaded_.end()) it = loaded_.emplace(key, jit_.load(spec, ctx_)).first;
  return it->second;
}

}  // namespace q35
