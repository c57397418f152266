#pragma once
// Small helpers shared by the tests.
#include <cstdlib>
#include <filesystem>
#include <string>

#include "models/qwen35/config.h"
#include "runtime/core/error.h"
#include "runtime/jit/kernel_spec.h"

namespace q35::test {

// The message of the q35::Error `f` throws, or "" when it throws none.
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// The repository's tests/fixtures folder, found at run time so a packed test binary runs from any
// folder: $Q35_FIXTURES_DIR, else tests/fixtures under the working directory, else (CPU tests only)
// the source tree the binary was built from.
inline std::filesystem::path fixtures_dir() {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("Q35_FIXTURES_DIR"); env && *env) {
    if (!fs::is_directory(env)) fail("Q35_FIXTURES_DIR={} is not a folder", env);
    return env;
  }
  if (fs::is_directory("tests/fixtures/tiny-qwen35moe")) return fs::absolute("tests/fixtures");
#ifdef Q35_SOURCE_DIR
  return fs::path(Q35_SOURCE_DIR) / "tests" / "fixtures";
#else
  fail("test fixtures not found: set Q35_FIXTURES_DIR to the repository's tests/fixtures folder, or run from the "
       "repository root (working directory {})", fs::current_path().string());
#endif
}

// The 35B-A3B shapes (shared/spec §1) and the committed tiny fixture's config.
inline qwen35::Config config_35b() { return qwen35::Config::preset("35b-a3b"); }
inline qwen35::Config config_tiny() {
  return qwen35::Config::from_file(fixtures_dir() / "tiny-qwen35moe" / "config.json");
}

// The value of template argument `name` of a spec ("" when absent).
inline std::string spec_arg(const KernelSpec& s, const std::string& name) {
  for (const auto& [n, v] : s.args)
    if (n == name) return v;
  return "";
}

}  // namespace q35::test
