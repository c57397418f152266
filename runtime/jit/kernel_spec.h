#pragma once
// One kernel instantiation: a kernel family (= kernel_templates/<family>.cuh), the name of the
// __global__ template in it, and its template arguments (shapes, tile configs) as compile-time
// constants, in the template's parameter order.
//
//   KernelSpec{"rmsnorm", "rmsnorm", {{"H", "2048"}, {"THREADS", "256"}, {"ADD_RESIDUAL", "true"}}}
//   instantiation() == "rmsnorm<2048, 256, true>"
//   str()           == "rmsnorm/rmsnorm<H=2048, THREADS=256, ADD_RESIDUAL=true>"
#include <string>
#include <utility>
#include <vector>

namespace q35 {

struct KernelSpec {
  std::string family;  // file kernel_templates/<family>.cuh
  std::string kernel;  // __global__ function template in it
  std::vector<std::pair<std::string, std::string>> args;  // (parameter name, value as C++ text)

  std::string instantiation() const;  // the C++ name expression of the instantiation
  std::string str() const;            // for messages and logs
  bool operator==(const KernelSpec&) const = default;
};

}  // namespace q35
