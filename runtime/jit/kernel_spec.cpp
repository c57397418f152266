#include "runtime/jit/kernel_spec.h"

#include <fmt/format.h>

namespace q35 {

std::string KernelSpec::instantiation() const {
  std::string s = kernel;
  if (args.empty()) return s;
  s += '<';
  for (size_t i = 0; i < args.size(); ++i) s += (i ? ", " : "") + args[i].second;
  return s + '>';
}

std::string KernelSpec::str() const {
  std::string s = fmt::format("{}/{}", family, kernel);
  if (args.empty()) return s;
  s += '<';
  for (size_t i = 0; i < args.size(); ++i) s += fmt::format("{}{}={}", i ? ", " : "", args[i].first, args[i].second);
  return s + '>';
}

}  // namespace q35
