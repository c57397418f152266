#pragma once
// The NVRTC JIT (DeepGEMM style). For each KernelSpec the engine generates a two-line translation
// unit that #includes kernel_templates/<family>.cuh and names exactly one instantiation
// (nvrtcAddNameExpression / nvrtcGetLoweredName), compiles it straight to a CUBIN for one target
// ("sm_90a", "sm_80", ...), and caches the result:
//   - in memory, per engine;
//   - on disk, one file per kernel named by the cache key, written to a temp file in the same
//     folder and renamed, so concurrent or killed processes never leave a partial entry.
// Cache key = SHA-256 of (cache format, NVRTC version, arch, every compile option, the generated
// TU, the name expression, and the name + full text of every kernel template file). Any edit to any
// template therefore invalidates every entry; entries are small and recompiling is cheap.
//
// Entry file: "Q35JITCB" | u32 format version | u64 payload bytes | SHA-256(payload) | payload,
// payload = u32 n | cache key (n bytes) | u32 m | lowered name (m bytes) | cubin.
// A corrupt, truncated or foreign entry is reported as a one-line notice, deleted and recompiled.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "runtime/jit/kernel_spec.h"

namespace q35 {

class Context;
class Function;

// $Q35JIT_CACHE_DIR, else $XDG_CACHE_HOME/q35jit, else $HOME/.cache/q35jit (Error if none is set).
std::filesystem::path default_cache_dir();
// $Q35JIT_KERNEL_DIR (dev flag: compile against the kernel_templates folder on disk), if set.
std::optional<std::filesystem::path> default_kernel_dir();
// $Q35JIT_SPIN_TRAP=1 (debug flag): compile with Q35_SPIN_TRAP defined (kernel_templates/
// sm90_pipeline.cuh: mbarrier waits give up after 2^26 polls, print the block's barrier state and trap).
bool default_spin_trap();

// The kernel template files the JIT compiles against: the copy embedded in the binary, or every
// *.cuh / *.cu file of a folder.
class KernelSources {
 public:
  static KernelSources embedded();
  static KernelSources from_dir(const std::filesystem::path& dir);  // Error if missing or empty

  const std::vector<std::pair<std::string, std::string>>& files() const { return files_; }  // sorted by name
  bool contains(const std::string& name) const;
  const std::string& origin() const { return origin_; }  // "embedded kernel templates" or the folder
  const std::string& digest() const { return digest_; }  // SHA-256 hex over every (name, text)

 private:
  KernelSources(std::string origin, std::vector<std::pair<std::string, std::string>> files);
  std::string origin_;
  std::vector<std::pair<std::string, std::string>> files_;
  std::string digest_;
};

struct CompiledKernel {
  std::vector<uint8_t> cubin;  // ELF image for cuModuleLoadData
  std::string lowered_name;    // mangled symbol of the instantiation
  std::string key;             // cache key (hex)
  bool from_cache = false;     // served from the memory or disk cache
  double compile_ms = 0;       // wall time of this request (NVRTC, or the cache read)
  std::string log;             // NVRTC's log when compiled now (e.g. ptxas -v output); "" from a cache
};

struct JitStats {
  int requests = 0;
  int compiled = 0;     // NVRTC runs
  int memory_hits = 0;  // served from this engine's memory
  int disk_hits = 0;    // served from the disk cache
  int corrupt_entries = 0;
  double nvrtc_ms = 0;  // summed over NVRTC runs (parallel runs overlap)
  int cache_hits() const { return memory_hits + disk_hits; }
};

struct JitOptions {
  std::optional<std::filesystem::path> kernel_dir = default_kernel_dir();  // nullopt: embedded
  std::vector<std::string> extra_options;  // appended to the NVRTC options (part of the key)
  bool spin_trap = default_spin_trap();     // -DQ35_SPIN_TRAP=1 (a compile option: part of the key)
  // One-line notices (corrupt cache entries). Default: "q35jit: <text>" on stderr.
  std::function<void(const std::string&)> notice;
};

class JitEngine {
 public:
  explicit JitEngine(std::filesystem::path cache_dir, JitOptions options = {});
  JitEngine(const JitEngine&) = delete;
  JitEngine& operator=(const JitEngine&) = delete;

  // Thread-safe. Throws Error naming the spec (family + template arguments) and arch, with
  // NVRTC's log, when the kernel does not compile.
  CompiledKernel compile(const KernelSpec& spec, const std::string& arch);
  // Compiles independent specs on `threads` threads; results in the order of `specs`.
  std::vector<CompiledKernel> compile_all(const std::vector<KernelSpec>& specs, const std::string& arch,
                                          int threads);
  // Compiles for the context's device and loads the kernel there.
  Function load(const KernelSpec& spec, const Context& ctx);

  std::string translation_unit(const KernelSpec& spec) const;
  std::vector<std::string> compile_options(const std::string& arch) const;
  std::string cache_key(const KernelSpec& spec, const std::string& arch) const;
  std::filesystem::path cache_entry_path(const std::string& key) const;

  const std::filesystem::path& cache_dir() const { return cache_dir_; }
  const KernelSources& sources() const { return sources_; }
  JitStats stats() const;

  static std::string nvrtc_version();  // "13.0"

 private:
  struct Entry {
    std::vector<uint8_t> cubin;
    std::string lowered_name;
    std::string log;  // NVRTC's log of this compile (not stored in the disk cache)
  };
  std::optional<Entry> read_disk_entry(const std::string& key);
  void write_disk_entry(const std::string& key, const Entry& entry) const;
  Entry run_nvrtc(const KernelSpec& spec, const std::string& arch) const;
  void check_spec(const KernelSpec& spec, const std::string& arch) const;

  std::filesystem::path cache_dir_;
  JitOptions options_;
  KernelSources sources_;
  mutable std::mutex mutex_;  // guards memory_ and stats_
  std::unordered_map<std::string, std::shared_ptr<const Entry>> memory_;
  JitStats stats_;
};

}  // namespace q35
