#pragma once
// The q35jit version (CMakeLists.txt's project VERSION; tests/test_tune_cache.cpp checks they agree).
namespace q35 {
inline constexpr const char* kVersion = "0.1.0";
}  // namespace q35
