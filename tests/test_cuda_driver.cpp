// The CUDA driver layer without a GPU (this build machine, CI): the failure messages. The GPU side
// (device queries, memory, graphs, kernels) is in tests/gpu/, run by scripts/gpu_check.sh.
#include <doctest/doctest.h>


#include "runtime/core/error.h"
#include "runtime/cuda/driver.h"
#include "runtime/cuda/kernel_trace.h"
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


TEST_CASE("kernel trace: the summary of a timeline counts busy time as the union, gaps, PDL overlap, per repeat") {
  // Two repeats of: A [0, 10) us, gap 5, B [15, 25), C [20, 30) (overlaps B by 5: PDL), gap 2, A [32, 40).
  std::vector<KernelRecord> recs;
  auto add = [&](const char* name, uint64_t s_us, uint64_t e_us) {
    KernelRecord r;
    r.name = name;
    r.start = s_us * 1000;
    r.end = e_us * 1000;
    recs.push_back(r);
  };
  for (uint64_t base : {0u, 100u}) {
    add("void q35k::a<1, 2>(int)", base + 0, base + 10);
    add("void q35k::b(float*)", base + 15, base + 25);
    add("void q35k::c<(q35k::Fmt)3>(int)", base + 20, base + 30);
    add("void q35k::a<1, 2>(int)", base + 32, base + 40);
  }
  std::swap(recs[1], recs[6]);  // input order does not matter: sorted by start
  const TraceSummary s = summarize_trace(recs, 2);
  CHECK(s.span_us == doctest::Approx(70.0));   // 0 .. 140 us over 2 repeats
  CHECK(s.busy_us == doctest::Approx(33.0));   // 10 + 15 + 8 per repeat
  CHECK(s.kernels == doctest::Approx(4.0));
  REQUIRE(s.rows.size() == 3);
  CHECK(s.rows[0].name == "void q35k::a<1, 2>(int)");  // 18 us per repeat, the largest
  CHECK(s.rows[0].launches == doctest::Approx(2.0));
  CHECK(s.rows[0].busy_us == doctest::Approx(18.0));
  CHECK(s.rows[0].mean_us == doctest::Approx(9.0));
  // a's idle: 2 before its second launch per repeat, plus the 60 us between the repeats (once in 2).
  CHECK(s.rows[0].idle_before_us == doctest::Approx(2.0 + 30.0));
  const auto row = [&](const std::string& n) {
    for (const TraceSummary::Row& r : s.rows)
      if (r.name == n) return r;
    FAIL("no row " << n);
    return TraceSummary::Row{};
  };
  CHECK(row("void q35k::b(float*)").idle_before_us == doctest::Approx(5.0));
  CHECK(row("void q35k::c<(q35k::Fmt)3>(int)").overlap_us == doctest::Approx(5.0));
  CHECK(row("void q35k::c<(q35k::Fmt)3>(int)").idle_before_us == doctest::Approx(0.0));
  const std::string text = format_trace_summary(s, "t");
  CHECK(text.find("a<1, 2>") != std::string::npos);
  CHECK(text.find("void") == std::string::npos);
  CHECK(summarize_trace({}, 1).rows.empty());
  CHECK(error_of([&] { summarize_trace(recs, 0); }).find("repeats") != std::string::npos);
}

TEST_CASE("kernel trace: short kernel names drop the namespace and the parameters, and shorten long arguments") {
  CHECK(short_kernel_name("void q35k::gemv<128, 2048>(unsigned int const*, int)") == "gemv<128, 2048>");
  CHECK(short_kernel_name("moe_router<2048, 256, 8>(q35k::bf16 const*)") == "moe_router<2048, 256, 8>");
  CHECK(short_kernel_name("plain") == "plain");
  CHECK(short_kernel_name("void k<0123456789>(int)", 4) == "k<0123..>");
}

TEST_CASE("kernel trace: a CUPTI library that does not load is named in the error") {
  const std::string e = error_of([] { KernelTrace t("/nonexistent/libcupti.so.13"); });
  CHECK(e.find("/nonexistent/libcupti.so.13") != std::string::npos);
}
