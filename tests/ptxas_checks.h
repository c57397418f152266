#pragma once
// What the CPU kernel tests read from NVRTC's output: the ptxas -v report (register spills and
// stack frames) and the SASS of a cubin (cuobjdump from PyPI's nvidia-cuda-cuobjdump, path in
// $Q35_CUOBJDUMP, which `make test` sets from the test venv).
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>

#include "runtime/jit/jit_engine.h"

namespace q35::test {

// Stack frame + spill store + spill load bytes over every function of a ptxas -v log (compiled with
// --ptxas-options=-v); the log must have at least one such line.
inline int spill_bytes(const CompiledKernel& k, const std::string& what) {
  CAPTURE(what);
  static const std::regex re(R"((\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads)");
  int found = 0, bytes = 0;
  for (auto it = std::sregex_iterator(k.log.begin(), k.log.end(), re); it != std::sregex_iterator(); ++it) {
    ++found;
    bytes += std::stoi((*it)[1]) + std::stoi((*it)[2]) + std::stoi((*it)[3]);
  }
  CHECK(found >= 1);
  return bytes;
}

// Registers per thread from a ptxas -v log (the kernel's "Used N registers" line).
inline int registers(const CompiledKernel& k) {
  static const std::regex re(R"(Used (\d+) registers)");
  std::smatch m;
  REQUIRE(std::regex_search(k.log, m, re));
  return std::stoi(m[1].str());
}

// cuobjdump -sass of a cubin (written to `dir`); stops the test when cuobjdump is missing.
inline std::string sass_of(const CompiledKernel& k, const std::filesystem::path& dir) {
  const char* tool = std::getenv("Q35_CUOBJDUMP");
  REQUIRE_MESSAGE((tool && *tool && std::filesystem::exists(tool)),
                  "set Q35_CUOBJDUMP to cuobjdump (make test takes it from PyPI's nvidia-cuda-cuobjdump in .venv)");
  const std::filesystem::path cubin = dir / (k.key + ".cubin");
  {
    std::ofstream out(cubin, std::ios::binary);
    out.write(reinterpret_cast<const char*>(k.cubin.data()), std::streamsize(k.cubin.size()));
  }
  const std::string cmd = fmt::format("'{}' -sass '{}' 2>&1", tool, cubin.string());
  std::string text;
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  CHECK(pclose(p) == 0);
  return text;
}

}  // namespace q35::test
