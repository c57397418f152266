// The NVRTC JIT on the CPU (no GPU needed): SHA-256, real kernels compiled to CUBIN for sm_80 and
// sm_90a, the disk cache (hits, corruption, key invalidation), parallel compilation, compile errors,
// tile configs and the Qwen3.5 kernel list.
#include <doctest/doctest.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <set>
#include <thread>

#include "autotune/tile_config.h"
#include "models/qwen35/kernels.h"
#include "runtime/core/error.h"
#include "runtime/core/sha256.h"
#include "runtime/jit/jit_engine.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
namespace fs = std::filesystem;
using q35::test::TempDir;

using q35::test::config_35b;
using q35::test::error_of;
inline std::string arg(const q35::KernelSpec& s, const std::string& n) { return q35::test::spec_arg(s, n); }

namespace {

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

// A copy of the source tree's kernel_templates/ (for Q35JIT_KERNEL_DIR-style engines).
void copy_templates(const fs::path& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(fs::path(Q35_SOURCE_DIR) / "kernel_templates"))
    fs::copy_file(e.path(), to / e.path().filename());
}

// The engine's one-line notices, collected.
struct Notices {
  std::vector<std::string> lines;
  JitOptions options(std::optional<fs::path> kernel_dir = std::nullopt) {
    JitOptions o;
    o.kernel_dir = std::move(kernel_dir);
    o.notice = [this](const std::string& s) { lines.push_back(s); };
    return o;
  }
};

// ELF checks of a CUDA cubin: magic, 64-bit, e_machine EM_CUDA (190), and the symbol name present.
void check_cubin(const CompiledKernel& k) {
  REQUIRE(k.cubin.size() > 64);
  CHECK(std::memcmp(k.cubin.data(), "\x7f" "ELF", 4) == 0);
  CHECK(k.cubin[4] == 2);  // ELFCLASS64
  CHECK((k.cubin[18] | k.cubin[19] << 8) == 190);
  REQUIRE(!k.lowered_name.empty());
  std::string_view image(reinterpret_cast<const char*>(k.cubin.data()), k.cubin.size());
  CHECK(image.find(k.lowered_name) != std::string_view::npos);
}

std::vector<KernelSpec> real_specs() {
  return {embedding_spec(2048, default_embedding_tile(2048)),
          rmsnorm_spec(2048, true, default_rmsnorm_tile(2048)),
          rmsnorm_spec(256, false, default_rmsnorm_tile(256)),
          gemv_bf16_spec(8192, 2048, default_gemv_tile(8192, 2048, 1)),
          gemv_bf16_spec(32, 2048, GemvTile{4, 2, 4}),
          gemv_bf16_spec(2048, 512, GemvTile{16, 2, 4}),
          rmsnorm_spec(2048, true, default_rmsnorm_tile(2048), true)};
}

}  // namespace

TEST_CASE("sha256 matches the FIPS 180-4 test vectors, incrementally too") {
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  CHECK(sha256_hex(two_blocks) == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  const std::string million(1000000, 'a');
  CHECK(sha256_hex(million) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // Odd-sized pieces crossing block boundaries give the same digest.
  Sha256 h;
  for (size_t pos = 0, step = 1; pos < million.size(); pos += step, step = step * 3 % 997 + 1)
    h.update(std::string_view(million).substr(pos, step));
  CHECK(to_hex(h.finish()) == sha256_hex(million));
  // Length-prefixed fields are unambiguous: ("ab", "c") != ("a", "bc").
  CHECK(to_hex(Sha256().update_field("ab").update_field("c").finish()) !=
        to_hex(Sha256().update_field("a").update_field("bc").finish()));
}

TEST_CASE("KernelSpec names its instantiation") {
  KernelSpec s = rmsnorm_spec(2048, true, RmsnormTile{256});
  CHECK(s.instantiation() == "rmsnorm<2048, 256, true>");
  CHECK(s.str() == "rmsnorm/rmsnorm<H=2048, THREADS=256, ADD_RESIDUAL=true>");
  CHECK(rmsnorm_spec(2048, true, RmsnormTile{256}, true).instantiation() == "rmsnorm<2048, 256, true, true>");
  CHECK(error_of([] { rmsnorm_spec(2048, false, RmsnormTile{256}, true); }).find("needs the residual add") !=
        std::string::npos);
  CHECK(gemv_bf16_spec(8192, 2048, GemvTile{1, 4, 4}).instantiation() == "gemv_bf16<8192, 2048, 1, 4, 4>");
}

TEST_CASE("cache folder defaults follow Q35JIT_CACHE_DIR, XDG_CACHE_HOME, HOME") {
  // Restored at the end: other tests in this process read the same variables.
  auto saved = [](const char* n) { const char* v = std::getenv(n); return v ? std::optional<std::string>(v) : std::nullopt; };
  auto restore = [](const char* n, const std::optional<std::string>& v) {
    if (v) setenv(n, v->c_str(), 1); else unsetenv(n);
  };
  const auto cache = saved("Q35JIT_CACHE_DIR"), xdg = saved("XDG_CACHE_HOME"), home = saved("HOME");
  setenv("Q35JIT_CACHE_DIR", "/tmp/a", 1);
  setenv("XDG_CACHE_HOME", "/tmp/x", 1);
  setenv("HOME", "/tmp/h", 1);
  CHECK(default_cache_dir() == fs::path("/tmp/a"));
  unsetenv("Q35JIT_CACHE_DIR");
  CHECK(default_cache_dir() == fs::path("/tmp/x/q35jit"));
  unsetenv("XDG_CACHE_HOME");
  CHECK(default_cache_dir() == fs::path("/tmp/h/.cache/q35jit"));
  unsetenv("HOME");
  CHECK(error_of([] { default_cache_dir(); }).find("Q35JIT_CACHE_DIR") != std::string::npos);
  restore("Q35JIT_CACHE_DIR", cache);
  restore("XDG_CACHE_HOME", xdg);
  restore("HOME", home);
}

TEST_CASE("the embedded kernel templates equal kernel_templates/ on disk") {
  TempDir tmp("jit-embed");
  copy_templates(tmp / "kt");
  KernelSources embedded = KernelSources::embedded();
  KernelSources disk = KernelSources::from_dir(tmp / "kt");
  REQUIRE(embedded.files().size() == disk.files().size());
  CHECK(embedded.contains("common.cuh"));
  CHECK(embedded.contains("gemv_bf16.cuh"));
  CHECK(embedded.digest() == disk.digest());
  CHECK(error_of([&] { KernelSources::from_dir(tmp / "missing"); }).find("Q35JIT_KERNEL_DIR") != std::string::npos);
}

TEST_CASE("real kernels compile to CUBIN for sm_80 and sm_90a; a new engine hits the disk cache") {
  TempDir tmp("jit-real");
  Notices notices;
  const std::vector<KernelSpec> specs = real_specs();
  for (const std::string arch : {"sm_80", "sm_90a"}) {
    std::vector<CompiledKernel> cold;
    {
      JitEngine jit(tmp / "cache", notices.options());
      for (const KernelSpec& s : specs) {
        CAPTURE(s.str());
        CompiledKernel k = jit.compile(s, arch);
        CHECK_FALSE(k.from_cache);
        check_cubin(k);
        CHECK(fs::exists(jit.cache_entry_path(k.key)));
        cold.push_back(std::move(k));
      }
      // Same engine again: memory hits.
      CHECK(jit.compile(specs[0], arch).from_cache);
      JitStats st = jit.stats();
      CHECK(st.compiled == int(specs.size()));
      CHECK(st.memory_hits == 1);
      CHECK(st.disk_hits == 0);
    }
    JitEngine warm(tmp / "cache", notices.options());
    for (size_t i = 0; i < specs.size(); ++i) {
      CompiledKernel k = warm.compile(specs[i], arch);
      CHECK(k.from_cache);
      CHECK(k.key == cold[i].key);
      CHECK(k.lowered_name == cold[i].lowered_name);
      CHECK(k.cubin == cold[i].cubin);
    }
    JitStats st = warm.stats();
    CHECK(st.compiled == 0);
    CHECK(st.disk_hits == int(specs.size()));
  }
  // The lowered names are the instantiations, e.g. gemv_bf16<8192, 2048, 1, 4, 4>.
  JitEngine jit(tmp / "cache", notices.options());
  CHECK(jit.compile(specs[3], "sm_90a").lowered_name == "_Z9gemv_bf16ILi8192ELi2048ELi1ELi4ELi4EEvPKtS1_Pti");
  CHECK(notices.lines.empty());
  // The cache folder holds exactly the entries: no temp files left behind.
  int entries = 0;
  for (const auto& e : fs::directory_iterator(tmp / "cache")) {
    CHECK(e.path().extension() == ".cubin");
    ++entries;
  }
  CHECK(entries == int(2 * specs.size()));
}

TEST_CASE("compile_all compiles distinct specs in parallel, in order, each once") {
  TempDir tmp("jit-parallel");
  Notices notices;
  JitEngine jit(tmp / "cache", notices.options());
  std::vector<KernelSpec> specs;
  for (int64_t n : {16, 24, 40, 48, 56, 72, 88, 104, 120}) specs.push_back(gemv_bf16_spec(n, 256, GemvTile{1, 1, 2}));
  specs.push_back(specs[2]);  // a duplicate is compiled once
  std::vector<CompiledKernel> out = jit.compile_all(specs, "sm_90a", 4);
  REQUIRE(out.size() == specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    check_cubin(out[i]);
    CHECK(out[i].lowered_name.find("ILi" + arg(specs[i], "N") + "ELi256E") != std::string::npos);
  }
  CHECK(out.back().cubin == out[2].cubin);
  CHECK(jit.stats().compiled == 9);
}

TEST_CASE("a corrupt or truncated cache entry is detected, deleted and recompiled") {
  TempDir tmp("jit-corrupt");
  Notices notices;
  const KernelSpec spec = rmsnorm_spec(256, false, RmsnormTile{32});
  std::string key;
  std::vector<uint8_t> good;
  {
    JitEngine jit(tmp / "cache", notices.options());
    CompiledKernel k = jit.compile(spec, "sm_90a");
    key = k.key;
    good = k.cubin;
  }
  JitEngine probe(tmp / "cache", notices.options());
  const fs::path entry = probe.cache_entry_path(key);
  const std::string original = read_text(entry);

  struct Damage {
    const char* name;
    std::string bytes;
    const char* reason;
  };
  std::string flipped = original;
  flipped[original.size() / 2] ^= 0x5a;
  flipped[original.size() / 2 + 1] ^= 0xff;
  std::string bad_magic = original;
  bad_magic[0] = 'X';
  for (const Damage& d : {Damage{"flipped payload bytes", flipped, "checksum mismatch"},
                          Damage{"truncated", original.substr(0, original.size() - 100), "payload bytes"},
                          Damage{"truncated header", original.substr(0, 20), "shorter than"},
                          Damage{"bad magic", bad_magic, "bad magic"}}) {
    CAPTURE(d.name);
    write_text(entry, d.bytes);
    notices.lines.clear();
    JitEngine jit(tmp / "cache", notices.options());
    CompiledKernel k = jit.compile(spec, "sm_90a");
    CHECK_FALSE(k.from_cache);
    CHECK(k.cubin == good);
    CHECK(jit.stats().corrupt_entries == 1);
    REQUIRE(notices.lines.size() == 1);
    CHECK(notices.lines[0].find("corrupt") != std::string::npos);
    CHECK(notices.lines[0].find(d.reason) != std::string::npos);
    CHECK(notices.lines[0].find('\n') == std::string::npos);
    // Rewritten intact.
    CHECK(read_text(entry) == original);
  }
}

TEST_CASE("the cache key changes with any template file, the arch and the options") {
  TempDir tmp("jit-key");
  copy_templates(tmp / "kt");
  Notices notices;
  const KernelSpec spec = gemv_bf16_spec(64, 256, GemvTile{1, 2, 2});
  JitEngine embedded(tmp / "cache", notices.options());
  JitEngine disk(tmp / "cache", notices.options(tmp / "kt"));
  const std::string key = embedded.cache_key(spec, "sm_90a");
  CHECK(key.size() == 64);
  CHECK(disk.cache_key(spec, "sm_90a") == key);  // identical sources, identical key
  CHECK(embedded.cache_key(spec, "sm_80") != key);
  CHECK(embedded.cache_key(gemv_bf16_spec(64, 256, GemvTile{1, 1, 2}), "sm_90a") != key);

  JitOptions flagged = notices.options();
  flagged.extra_options = {"-DQ35_TEST_FLAG=1"};
  JitEngine with_flag(tmp / "cache", flagged);
  CHECK(with_flag.cache_key(spec, "sm_90a") != key);
  CHECK(with_flag.compile_options("sm_90a").back() == "-DQ35_TEST_FLAG=1");

  CHECK_FALSE(disk.compile(spec, "sm_90a").from_cache);
  CHECK(embedded.compile(spec, "sm_90a").from_cache);  // same key: the entry disk just wrote

  // Editing a header the kernel includes (and one it does not) invalidates the entry.
  for (const char* file : {"common.cuh", "embedding.cuh"}) {
    CAPTURE(file);
    write_text(tmp / "kt" / file, read_text(tmp / "kt" / file) + "\n// edited\n");
    JitEngine edited(tmp / "cache", notices.options(tmp / "kt"));
    const std::string new_key = edited.cache_key(spec, "sm_90a");
    CHECK(new_key != key);
    CompiledKernel k = edited.compile(spec, "sm_90a");
    CHECK_FALSE(k.from_cache);
    CHECK(k.key == new_key);
  }
}

TEST_CASE("compile errors name the family, the template arguments and show NVRTC's log") {
  TempDir tmp("jit-error");
  copy_templates(tmp / "kt");
  write_text(tmp / "kt" / "broken.cuh",
             "#pragma once\n"
             "template <int N> __global__ void broken_kernel(float* y) {\n"
             "  y[0] = undeclared_thing<N>;\n"
             "}\n");
  Notices notices;
  JitEngine jit(tmp / "cache", notices.options(tmp / "kt"));
  std::string e = error_of([&] { jit.compile({"broken", "broken_kernel", {{"N", "4"}}}, "sm_90a"); });
  CHECK(e.find("broken/broken_kernel<N=4>") != std::string::npos);
  CHECK(e.find("sm_90a") != std::string::npos);
  CHECK(e.find("NVRTC log") != std::string::npos);
  CHECK(e.find("broken.cuh(3)") != std::string::npos);  // file and line
  CHECK(e.find("undeclared_thing") != std::string::npos);

  // A real template's static_assert fires for a shape it does not support.
  KernelSpec bad{"gemv_bf16", "gemv_bf16", {{"N", "64"}, {"K", "12"}, {"M_TILE", "1"}, {"ROWS_PER_WARP", "1"}, {"WARPS", "1"}}};
  e = error_of([&] { jit.compile(bad, "sm_80"); });
  CHECK(e.find("gemv_bf16/gemv_bf16<N=64, K=12, M_TILE=1, ROWS_PER_WARP=1, WARPS=1>") != std::string::npos);
  CHECK(e.find("K must be a multiple of 8") != std::string::npos);

  CHECK(error_of([&] { jit.compile({"nosuch", "k", {}}, "sm_90a"); }).find("no nosuch.cuh") != std::string::npos);
  CHECK(error_of([&] { jit.compile(real_specs()[0], "compute_90"); }).find("found 'compute_90'") != std::string::npos);
  // compile_all reports a failure and counts the others.
  e = error_of([&] { jit.compile_all({bad, {"broken", "broken_kernel", {{"N", "5"}}}, real_specs()[1]}, "sm_90a", 2); });
  CHECK(e.find("and 1 more of the 3 kernels failed") != std::string::npos);
  CHECK(jit.stats().compiled == 1);  // the good one
}

TEST_CASE("tile configs: validity rules and heuristic defaults") {
  CHECK(why_invalid(GemvTile{1, 2, 4}, 2048, 2048).empty());
  CHECK(why_invalid(GemvTile{1, 2, 4}, 2048, 2044).find("K = 2044") != std::string::npos);
  CHECK(why_invalid(GemvTile{16, 8, 4}, 2048, 2048).find("128 accumulators") != std::string::npos);
  CHECK(why_invalid(GemvTile{17, 1, 4}, 2048, 2048).find("m_tile = 17") != std::string::npos);
  CHECK(why_invalid(RmsnormTile{256}, 2048).empty());
  CHECK(why_invalid(RmsnormTile{512}, 2048).find("leaves whole warps idle") != std::string::npos);
  CHECK(why_invalid(RmsnormTile{48}, 2304).find("threads = 48") != std::string::npos);
  CHECK(why_invalid(EmbeddingTile{128}, 2047).find("H = 2047") != std::string::npos);

  CHECK(default_rmsnorm_tile(2048).threads == 256);
  CHECK(default_rmsnorm_tile(256).threads == 32);
  CHECK(default_rmsnorm_tile(2560).threads == 320);  // one vector per thread, 10 warps
  CHECK(default_rmsnorm_tile(128).threads == 32);   // 16 active threads, last chunk guarded
  CHECK(why_invalid(RmsnormTile{32}, 8 * 32 * 9).find("values per thread exceeds 64") != std::string::npos);
  CHECK(error_of([] { default_rmsnorm_tile(100); }).find("H = 100") != std::string::npos);

  GemvTile t = default_gemv_tile(2048, 2048, 1);  // 256 blocks of 8 rows
  CHECK((t.m_tile == 1 && t.rows_per_warp == 2 && t.warps == 4));
  CHECK(default_gemv_tile(8192, 2048, 1).rows_per_warp == 4);
  CHECK(default_gemv_tile(32, 2048, 1).rows_per_warp == 1);
  CHECK(default_gemv_tile(248320, 2048, 3).m_tile == 4);
  CHECK(default_gemv_tile(248320, 2048, 16).rows_per_warp == 2);  // 16 x 2 accumulators
  CHECK(error_of([] { default_gemv_tile(64, 64, 17); }).find("m = 17") != std::string::npos);
  CHECK(error_of([] { gemv_bf16_spec(64, 60, GemvTile{}); }).find("K = 60") != std::string::npos);
}

TEST_CASE("required_kernels lists every family the 35B-A3B config needs; all compile for sm_90a") {
  const qwen35::Config cfg = config_35b();
  const std::vector<KernelSpec> specs = qwen35::required_kernels(cfg, 128);
  std::set<std::string> families;
  for (const KernelSpec& s : specs) families.insert(s.family);
  for (const char* f : {"embedding", "rmsnorm", "gemv_w4a16", "wgmma_gemm", "quantize_w4", "sample", "attention",
                        "gdn_recurrent", "moe"})
    CHECK_MESSAGE(families.count(f) == 1, f);
  CHECK(families.count("gemm_bf16") == 0);  // sm_90a: every prefill GEMM on wgmma
  std::set<std::string> sm80;
  for (const KernelSpec& s : qwen35::required_kernels(cfg, 128, "sm_80")) sm80.insert(s.family);
  CHECK((sm80.count("gemm_bf16") == 1 && sm80.count("wgmma_gemm") == 0 && sm80.count("moe_gemm") == 1));
  CHECK(families.count("gemv_bf16") == 0);  // W4A16: every projection through the INT4 GEMV
  // Every decode GEMV shape of the W4A16 model, at M = 1: qkv fused, o_proj / out_proj, in_proj fused, lm_head.
  std::set<std::pair<std::string, std::string>> w4_shapes;
  for (const KernelSpec& s : specs)
    if (s.family == "gemv_w4a16") w4_shapes.emplace(arg(s, "N"), arg(s, "K"));
  for (auto nk : std::vector<std::pair<std::string, std::string>>{
           {"9216", "2048"}, {"2048", "4096"}, {"12352", "2048"}, {"248320", "2048"}})
    CHECK_MESSAGE(w4_shapes.count(nk) == 1, nk.first << " x " << nk.second);
  // No duplicates.
  for (size_t i = 0; i < specs.size(); ++i)
    for (size_t j = i + 1; j < specs.size(); ++j) CHECK_FALSE(specs[i] == specs[j]);

  // bf16 weights: bf16 GEMVs, no INT4 kernels.
  std::set<std::string> bf16_families;
  for (const KernelSpec& s : qwen35::required_kernels(cfg, 0)) bf16_families.insert(s.family);
  CHECK(bf16_families.count("gemv_bf16") == 1);
  CHECK(bf16_families.count("gemv_w4a16") == 0);

  // Without full-attention layers there is no attention kernel.
  qwen35::Config linear_only = cfg;
  linear_only.layer_types.assign(4, qwen35::LayerType::LinearAttention);
  for (const KernelSpec& s : qwen35::required_kernels(linear_only, 128)) CHECK(s.family != "attention");

  // Cold (fresh cache, parallel on this machine's cores) and warm (new engine, disk cache).
  TempDir tmp("jit-required");
  Notices notices;
  const int threads = int(std::max(1u, std::thread::hardware_concurrency()));
  auto t0 = std::chrono::steady_clock::now();
  std::vector<CompiledKernel> cold = JitEngine(tmp / "cache", notices.options()).compile_all(specs, "sm_90a", threads);
  double cold_wall = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  JitEngine warm_engine(tmp / "cache", notices.options());
  t0 = std::chrono::steady_clock::now();
  std::vector<CompiledKernel> warm = warm_engine.compile_all(specs, "sm_90a", threads);
  double warm_wall = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  CHECK(warm_engine.stats().disk_hits == int(specs.size()));
  std::string report = fmt::format("sm_90a, {} kernels on {} threads: cold {:.0f} ms, warm {:.1f} ms wall\n",
                                   specs.size(), threads, cold_wall, warm_wall);
  for (size_t i = 0; i < specs.size(); ++i) {
    check_cubin(cold[i]);
    CHECK_FALSE(cold[i].from_cache);
    CHECK(warm[i].from_cache);
    report += fmt::format("  {:70} cold {:7.1f} ms  warm {:5.2f} ms  cubin {} B\n", specs[i].str(),
                          cold[i].compile_ms, warm[i].compile_ms, cold[i].cubin.size());
  }
  MESSAGE(report);
}
