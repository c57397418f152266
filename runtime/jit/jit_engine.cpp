#include "runtime/jit/jit_engine.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <nvrtc.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <future>
#include <regex>

#include "runtime/core/error.h"
#include "runtime/core/sha256.h"
#include "runtime/core/thread_pool.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/embedded_kernels.h"

namespace q35 {

namespace fs = std::filesystem;

namespace {

constexpr char kEntryMagic[8] = {'Q', '3', '5', 'J', 'I', 'T', 'C', 'B'};
constexpr uint32_t kEntryVersion = 1;
constexpr size_t kEntryHeaderBytes = 8 + 4 + 8 + 32;

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(uint8_t(v >> (8 * i)));
}
void put_u64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(uint8_t(v >> (8 * i)));
}
uint64_t get_le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

// nvrtcProgram owner.
struct Program {
  nvrtcProgram prog = nullptr;
  ~Program() {
    if (prog) nvrtcDestroyProgram(&prog);
  }
};

}  // namespace

fs::path default_cache_dir() {
  if (const char* dir = env("Q35JIT_CACHE_DIR")) return dir;
  if (const char* xdg = env("XDG_CACHE_HOME")) return fs::path(xdg) / "q35jit";
  if (const char* home = env("HOME")) return fs::path(home) / ".cache" / "q35jit";
  fail("JIT cache folder: none of Q35JIT_CACHE_DIR, XDG_CACHE_HOME, HOME is set; set Q35JIT_CACHE_DIR");
}

bool default_spin_trap() {
  const char* v = env("Q35JIT_SPIN_TRAP");
  return v && std::string(v) != "0";
}

std::optional<fs::path> default_kernel_dir() {
  if (const char* dir = env("Q35JIT_KERNEL_DIR")) return fs::path(dir);
  return std::nullopt;
}

// ---- KernelSources ----

KernelSources::KernelSources(std::string origin, std::vector<std::pair<std::string, std::string>> files)
    : origin_(std::move(origin)), files_(std::move(files)) {
  std::sort(files_.begin(), files_.end());
  Sha256 h;
  for (const auto& [name, text] : files_) h.update_field(name).update_field(text);
  digest_ = to_hex(h.finish());
}

KernelSources KernelSources::embedded() {
  std::vector<std::pair<std::string, std::string>> files;
  for (const EmbeddedFile& f : embedded_kernel_files()) files.emplace_back(f.name, f.content);
  return KernelSources("embedded kernel templates", std::move(files));
}

KernelSources KernelSources::from_dir(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    fail("Q35JIT_KERNEL_DIR: expected a folder of kernel templates, found no folder at {}", dir.string());
  std::vector<std::pair<std::string, std::string>> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::string ext = e.path().extension().string();
    if (!e.is_regular_file() || (ext != ".cuh" && ext != ".cu")) continue;
    std::ifstream in(e.path(), std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!in.good() && !in.eof()) fail("cannot read kernel template {}", e.path().string());
    files.emplace_back(e.path().filename().string(), std::move(text));
  }
  if (files.empty())
    fail("Q35JIT_KERNEL_DIR: expected *.cuh kernel templates in {}, found none", dir.string());
  return KernelSources(dir.string(), std::move(files));
}

bool KernelSources::contains(const std::string& name) const {
  return std::any_of(files_.begin(), files_.end(), [&](const auto& f) { return f.first == name; });
}

// ---- JitEngine ----

JitEngine::JitEngine(fs::path cache_dir, JitOptions options)
    : cache_dir_(std::move(cache_dir)),
      options_(std::move(options)),
      sources_(options_.kernel_dir ? KernelSources::from_dir(*options_.kernel_dir) : KernelSources::embedded()) {
  if (cache_dir_.empty()) fail("JitEngine: the cache folder is empty (use default_cache_dir())");
  if (!options_.notice)
    options_.notice = [](const std::string& text) { fmt::print(stderr, "q35jit: {}\n", text); };
}

std::string JitEngine::nvrtc_version() {
  int major = 0, minor = 0;
  if (nvrtcVersion(&major, &minor) != NVRTC_SUCCESS) fail("nvrtcVersion failed");
  return fmt::format("{}.{}", major, minor);
}

std::string JitEngine::translation_unit(const KernelSpec& spec) const {
  // The instantiation itself is named through nvrtcAddNameExpression.
  return fmt::format("// q35jit: {}\n#include \"{}.cuh\"\n", spec.str(), spec.family);
}

std::vector<std::string> JitEngine::compile_options(const std::string& arch) const {
  std::vector<std::string> opts = {"--gpu-architecture=" + arch, "-std=c++17", "-default-device", "-lineinfo"};
  if (options_.spin_trap) opts.push_back("-DQ35_SPIN_TRAP=1");
  opts.insert(opts.end(), options_.extra_options.begin(), options_.extra_options.end());
  return opts;
}

std::string JitEngine::cache_key(const KernelSpec& spec, const std::string& arch) const {
  Sha256 h;
  h.update_field("q35jit kernel cache").update_field(std::to_string(kEntryVersion));
  h.update_field(nvrtc_version()).update_field(arch);
  for (const std::string& o : compile_options(arch)) h.update_field(o);
  h.update_field(translation_unit(spec)).update_field(spec.instantiation());
  h.update_field(sources_.digest());
  return to_hex(h.finish());
}

fs::path JitEngine::cache_entry_path(const std::string& key) const { return cache_dir_ / (key + ".cubin"); }

JitStats JitEngine::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void JitEngine::check_spec(const KernelSpec& spec, const std::string& arch) const {
  static const std::regex arch_re("sm_[0-9]+[af]?");
  if (!std::regex_match(arch, arch_re))
    fail("kernel {}: expected a real GPU architecture like sm_90a or sm_80, found '{}'", spec.str(), arch);
  static const std::regex ident_re("[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*");
  if (!std::regex_match(spec.family, ident_re) || !std::regex_match(spec.kernel, ident_re))
    fail("kernel {}: family and kernel must be C++ identifiers", spec.str());
  if (!sources_.contains(spec.family + ".cuh"))
    fail("kernel {}: no {}.cuh in the {}", spec.str(), spec.family, sources_.origin());
  for (const auto& [name, value] : spec.args)
    if (value.empty()) fail("kernel {}: template argument {} has no value", spec.str(), name);
}

JitEngine::Entry JitEngine::run_nvrtc(const KernelSpec& spec, const std::string& arch) const {
  const std::string tu = translation_unit(spec);
  const std::string expr = spec.instantiation();
  std::vector<const char*> header_text, header_names;
  for (const auto& [name, text] : sources_.files()) {
    header_names.push_back(name.c_str());
    header_text.push_back(text.c_str());
  }
  auto nvrtc_fail = [&](const char* call, nvrtcResult r) {
    fail("kernel {} for {}: {} failed: {}", spec.str(), arch, call, nvrtcGetErrorString(r));
  };

  Program p;
  std::string program_name = fmt::format("q35jit_{}.cu", spec.family);
  nvrtcResult r = nvrtcCreateProgram(&p.prog, tu.c_str(), program_name.c_str(), int(header_text.size()),
                                     header_text.data(), header_names.data());
  if (r != NVRTC_SUCCESS) nvrtc_fail("nvrtcCreateProgram", r);
  if ((r = nvrtcAddNameExpression(p.prog, expr.c_str())) != NVRTC_SUCCESS) nvrtc_fail("nvrtcAddNameExpression", r);

  std::vector<std::string> opts = compile_options(arch);
  std::vector<const char*> opt_ptrs;
  for (const std::string& o : opts) opt_ptrs.push_back(o.c_str());
  nvrtcResult compiled = nvrtcCompileProgram(p.prog, int(opt_ptrs.size()), opt_ptrs.data());

  size_t log_size = 0;
  std::string log;
  if (nvrtcGetProgramLogSize(p.prog, &log_size) == NVRTC_SUCCESS && log_size > 1) {
    log.resize(log_size);
    if (nvrtcGetProgramLog(p.prog, log.data()) != NVRTC_SUCCESS) log.clear();
    while (!log.empty() && (log.back() == '\0' || log.back() == '\n')) log.pop_back();
  }
  if (compiled != NVRTC_SUCCESS)
    fail("kernel {} for {} does not compile ({}; {}; TU {}: #include \"{}.cuh\", instantiation {}); NVRTC log:\n{}",
         spec.str(), arch, nvrtcGetErrorString(compiled), sources_.origin(), program_name, spec.family, expr,
         log.empty() ? "(empty)" : log);

  const char* lowered = nullptr;
  if ((r = nvrtcGetLoweredName(p.prog, expr.c_str(), &lowered)) != NVRTC_SUCCESS || !lowered)
    nvrtc_fail("nvrtcGetLoweredName", r);
  Entry e;
  e.lowered_name = lowered;
  e.log = std::move(log);
  size_t size = 0;
  if ((r = nvrtcGetCUBINSize(p.prog, &size)) != NVRTC_SUCCESS) nvrtc_fail("nvrtcGetCUBINSize", r);
  if (size == 0) fail("kernel {} for {}: NVRTC produced an empty CUBIN", spec.str(), arch);
  e.cubin.resize(size);
  if ((r = nvrtcGetCUBIN(p.prog, reinterpret_cast<char*>(e.cubin.data()))) != NVRTC_SUCCESS)
    nvrtc_fail("nvrtcGetCUBIN", r);
  return e;
}

std::optional<JitEngine::Entry> JitEngine::read_disk_entry(const std::string& key) {
  const fs::path path = cache_entry_path(key);
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;  // not cached
  std::vector<uint8_t> file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();

  auto corrupt = [&](const std::string& why) -> std::optional<Entry> {
    std::error_code ec;
    fs::remove(path, ec);
    {
      std::lock_guard lock(mutex_);
      ++stats_.corrupt_entries;
    }
    options_.notice(fmt::format("cache entry {} is corrupt ({}); deleted, recompiling", path.string(), why));
    return std::nullopt;
  };
  if (file.size() < kEntryHeaderBytes)
    return corrupt(fmt::format("{} bytes, shorter than the {}-byte header", file.size(), kEntryHeaderBytes));
  if (std::memcmp(file.data(), kEntryMagic, 8) != 0) return corrupt("bad magic");
  uint32_t version = uint32_t(get_le(file.data() + 8, 4));
  if (version != kEntryVersion) return corrupt(fmt::format("format version {}, expected {}", version, kEntryVersion));
  uint64_t payload_bytes = get_le(file.data() + 12, 8);
  if (payload_bytes != file.size() - kEntryHeaderBytes)
    return corrupt(fmt::format("header says {} payload bytes, file has {}", payload_bytes,
                               file.size() - kEntryHeaderBytes));
  std::span<const uint8_t> payload(file.data() + kEntryHeaderBytes, payload_bytes);
  Sha256Digest digest = sha256(payload);
  if (std::memcmp(digest.data(), file.data() + 20, 32) != 0) return corrupt("payload checksum mismatch");

  // The checksum holds, so the fields are as written; still bound every length.
  size_t pos = 0;
  auto take_string = [&](std::string& out) {
    if (payload.size() - pos < 4) return false;
    uint32_t n = uint32_t(get_le(payload.data() + pos, 4));
    pos += 4;
    if (payload.size() - pos < n) return false;
    out.assign(reinterpret_cast<const char*>(payload.data() + pos), n);
    pos += n;
    return true;
  };
  std::string stored_key;
  Entry e;
  if (!take_string(stored_key) || !take_string(e.lowered_name) || pos == payload.size())
    return corrupt("malformed payload");
  if (stored_key != key) return corrupt(fmt::format("holds key {}", stored_key));
  e.cubin.assign(payload.begin() + pos, payload.end());
  return e;
}

void JitEngine::write_disk_entry(const std::string& key, const Entry& entry) const {
  std::error_code ec;
  fs::create_directories(cache_dir_, ec);
  if (ec) fail("JIT cache folder {}: cannot create it: {} (set Q35JIT_CACHE_DIR)", cache_dir_.string(), ec.message());

  std::vector<uint8_t> payload;
  payload.reserve(8 + key.size() + entry.lowered_name.size() + entry.cubin.size());
  put_u32(payload, uint32_t(key.size()));
  payload.insert(payload.end(), key.begin(), key.end());
  put_u32(payload, uint32_t(entry.lowered_name.size()));
  payload.insert(payload.end(), entry.lowered_name.begin(), entry.lowered_name.end());
  payload.insert(payload.end(), entry.cubin.begin(), entry.cubin.end());
  std::vector<uint8_t> file;
  file.reserve(kEntryHeaderBytes + payload.size());
  file.insert(file.end(), kEntryMagic, kEntryMagic + 8);
  put_u32(file, kEntryVersion);
  put_u64(file, payload.size());
  Sha256Digest digest = sha256(payload);
  file.insert(file.end(), digest.begin(), digest.end());
  file.insert(file.end(), payload.begin(), payload.end());

  const fs::path path = cache_entry_path(key);
  std::string tmp = path.string() + ".tmp.XXXXXX";
  int fd = mkstemp(tmp.data());
  if (fd < 0) fail("JIT cache folder {}: cannot create a temp file: {} (set Q35JIT_CACHE_DIR)", cache_dir_.string(),
                   std::strerror(errno));
  size_t done = 0;
  while (done < file.size()) {
    ssize_t n = ::write(fd, file.data() + done, file.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail("JIT cache: writing {} failed: {}", tmp, std::strerror(err));
    }
    done += size_t(n);
  }
  // Data reaches the disk before the rename publishes the name.
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    fail("JIT cache: flushing {} failed: {}", tmp, std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    fail("JIT cache: renaming {} to {} failed: {}", tmp, path.string(), std::strerror(err));
  }
}

CompiledKernel JitEngine::compile(const KernelSpec& spec, const std::string& arch) {
  const auto t0 = std::chrono::steady_clock::now();
  check_spec(spec, arch);
  CompiledKernel out;
  out.key = cache_key(spec, arch);
  auto finish = [&](const Entry& e, bool from_cache) {
    out.cubin = e.cubin;
    out.lowered_name = e.lowered_name;
    out.from_cache = from_cache;
    if (!from_cache) out.log = e.log;
    out.compile_ms = ms_since(t0);
    return out;
  };
  {
    std::lock_guard lock(mutex_);
    ++stats_.requests;
    if (auto it = memory_.find(out.key); it != memory_.end()) {
      ++stats_.memory_hits;
      return finish(*it->second, true);
    }
  }
  std::shared_ptr<const Entry> entry;
  bool from_disk = false;
  if (std::optional<Entry> e = read_disk_entry(out.key)) {
    entry = std::make_shared<const Entry>(std::move(*e));
    from_disk = true;
  } else {
    const auto t_nvrtc = std::chrono::steady_clock::now();
    entry = std::make_shared<const Entry>(run_nvrtc(spec, arch));
    double ms = ms_since(t_nvrtc);
    write_disk_entry(out.key, *entry);
    std::lock_guard lock(mutex_);
    ++stats_.compiled;
    stats_.nvrtc_ms += ms;
  }
  std::lock_guard lock(mutex_);
  if (from_disk) ++stats_.disk_hits;
  memory_.emplace(out.key, entry);
  return finish(*entry, from_disk);
}

std::vector<CompiledKernel> JitEngine::compile_all(const std::vector<KernelSpec>& specs, const std::string& arch,
                                                   int threads) {
  // Identical specs are compiled once.
  std::vector<size_t> unique_of(specs.size());
  std::vector<size_t> unique;
  for (size_t i = 0; i < specs.size(); ++i) {
    auto it = std::find_if(unique.begin(), unique.end(), [&](size_t u) { return specs[u] == specs[i]; });
    unique_of[i] = size_t(it - unique.begin());
    if (it == unique.end()) unique.push_back(i);
  }
  std::vector<std::future<CompiledKernel>> futures;
  {
    ThreadPool pool(std::min<int>(std::max(threads, 1), int(unique.size())));
    for (size_t u : unique) futures.push_back(pool.submit([this, &specs, &arch, u] { return compile(specs[u], arch); }));
  }  // joins: every task has finished
  std::vector<CompiledKernel> done;
  std::exception_ptr first_error;
  int failures = 0;
  for (auto& f : futures) {
    try {
      done.push_back(f.get());
    } catch (...) {
      if (!first_error) first_error = std::current_exception();
      ++failures;
      done.emplace_back();
    }
  }
  if (failures > 1) {
    try {
      std::rethrow_exception(first_error);
    } catch (const std::exception& e) {
      fail("{}\n(and {} more of the {} kernels failed to compile)", e.what(), failures - 1, unique.size());
    }
  }
  if (first_error) std::rethrow_exception(first_error);
  std::vector<CompiledKernel> out;
  out.reserve(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) out.push_back(done[unique_of[i]]);
  return out;
}

Function JitEngine::load(const KernelSpec& spec, const Context& ctx) {
  CompiledKernel k = compile(spec, ctx.device().arch());
  ctx.make_current();
  auto module = std::make_shared<const Module>(ctx.driver(), k.cubin, spec.str());
  return Function(std::move(module), k.lowered_name);
}

}  // namespace q35
