// The CUDA driver layer without a GPU (this build machine, CI): the failure messages. The GPU side
// (device queries, memory, graphs, kernels) is in tests/gpu/, run by scripts/gpu_check.sh.
#include <doctest/doctest.h>


#include "runtime/core/error.h"
#include "runtime/cuda/driver.h"
#include "tests/test_util.h"

using namespace q35;
#include <filesystem>
namespace fs = std::filesystem;

using q35::test::error_of;

namespace {

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

}  // namespace

TEST_CASE("DeviceInfo::arch names the NVRTC target") {
  auto arch = [](int major, int minor) { return DeviceInfo{0, "", major, minor, 0, 0}.arch(); };
  CHECK(arch(9, 0) == "sm_90a");
  CHECK(arch(8, 0) == "sm_80");
  CHECK(arch(8, 9) == "sm_89");
  CHECK(arch(12, 0) == "sm_120");
}

TEST_CASE("a missing or stub libcuda gives a one-line 'no CUDA driver found: ' error") {
  std::string e = error_of([] { Driver d("libq35-no-such-driver.so.1"); });
  CHECK(starts_with(e, "no CUDA driver found: "));
  CHECK(e.find("libq35-no-such-driver.so.1") != std::string::npos);
  CHECK(e.find('\n') == std::string::npos);

  // The toolkit's link stub exports every symbol but is not a driver.
  const char* cuda_home = std::getenv("CUDA_HOME");
  const fs::path stub = fs::path(cuda_home ? cuda_home : "/usr/local/cuda") / "lib64" / "stubs" / "libcuda.so";
  if (fs::exists(stub)) {
    e = error_of([&] { Driver d(stub.string()); });
    CHECK(starts_with(e, "no CUDA driver found: "));
    CHECK(e.find("stub") != std::string::npos);
    CHECK(e.find('\n') == std::string::npos);
  }

  // The default driver: on a machine without the NVIDIA kernel driver it must fail this way.
  if (!fs::exists("/dev/nvidiactl")) {
    e = error_of([] { Driver d; });
    CHECK((starts_with(e, "no CUDA driver found: ") || starts_with(e, "no CUDA device found: ")));
    CHECK(e.find('\n') == std::string::npos);
  }
}

