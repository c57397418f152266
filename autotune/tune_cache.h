#pragma once
// Tune-cache files: the tile configs `q35jit tune` measured as best, one JSON file per GPU kind,
// and their lookup at start-up.
//
// File (format version 1), named tune_file_name(device name), e.g. NVIDIA_H100_80GB_HBM3.json:
//   {
//     "format": "q35jit-tune-cache", "version": 1,
//     "gpu": "NVIDIA H100 80GB HBM3", "sm": "sm_90", "nvrtc": "13.0", "tool": "q35jit 0.1.0",
//     "entries": {
//       "<family>": {                       // e.g. "gemv_w4a16"
//         "<signature>": {                  // the shape (+ dtype / group), e.g. "N9216_K2048_G128_bf16"
//           "<bucket M>": {"config": {...tile fields...}, "us": 5.1, "default_us": 5.9}, ...
//         }, ...
//       }, ...
//     }
//   }
// "config" is the family's tile as autotune/spaces.h writes it; "us" its median time in
// microseconds, "default_us" the heuristic default's median time measured in the same run.
//
// Lookup (TuneTable): files are searched in $Q35JIT_TUNE_DIR, then the user cache dir
// ($XDG_CACHE_HOME/q35jit/tune, else $HOME/.cache/q35jit/tune), then the copy shipped with the
// binary (tune_cache/ beside the executable, then the files embedded at build time). Every layer
// found is kept (a folder named twice is read once): for a (family, signature) the first layer that has it answers. Within it, a
// call of M tokens uses the nearest measured bucket; a tie (M halfway between two buckets) goes
// to the smaller bucket. A file whose format version, GPU name or SM differs from the device is
// rejected with a one-line notice naming the file, and so is a malformed file (never a crash).
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace q35 {

constexpr int kTuneFormatVersion = 1;
constexpr const char* kTuneFormatName = "q35jit-tune-cache";

// vLLM's M buckets: 1 2 4 8 16 24 32 48 64 96 128 256 512 1024 1536 2048 3072 4096.
const std::vector<int64_t>& default_tune_buckets();
// "1..4095" -> {1, 4095}; Error naming `flag` on anything else (lo < 1, hi < lo, junk).
std::pair<int64_t, int64_t> parse_sweep(const std::string& text, const std::string& flag = "--sweep");
// "1,2,4,16" -> sorted, unique, positive; Error naming `flag` otherwise.
std::vector<int64_t> parse_buckets(const std::string& text, const std::string& flag = "--buckets");
// The buckets inside [lo, hi]; when none falls inside, {lo} (so a sweep always measures something).
std::vector<int64_t> clip_buckets(const std::vector<int64_t>& buckets, int64_t lo, int64_t hi);
// The bucket nearest to m (ties to the smaller one). `buckets` sorted ascending, not empty.
int64_t nearest_bucket(const std::vector<int64_t>& buckets, int64_t m);

// "NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3.json": every character outside [A-Za-z0-9._-]
// becomes '_'.
std::string tune_file_name(const std::string& gpu_name);

struct TuneEntry {
  nlohmann::json config;  // the tile (an object)
  double us = 0;          // median time of `config`, microseconds
  double default_us = 0;  // median time of the heuristic default in the same run
};

// Who a file is for.
struct TuneIdentity {
  std::string gpu;    // device name as the driver reports it
  std::string sm;     // "sm_90" (compute capability, no arch suffix)
  std::string nvrtc;  // "13.0"
  std::string tool;   // "q35jit 0.1.0"
};

class TuneFile {
 public:
  TuneFile() = default;
  explicit TuneFile(TuneIdentity id) : id_(std::move(id)) {}

  // Error naming `origin` (the path) and what is wrong: not JSON, wrong "format", another version
  // ("format version 2, this q35jit reads version 1: re-run `q35jit tune`"), a missing or mistyped field, a
  // bucket key that is not a positive integer, a config that is not an object, a negative time.
  static TuneFile parse(const std::string& text, const std::string& origin);
  static TuneFile load(const std::filesystem::path& path);  // Error naming the path if unreadable
  std::string dump() const;                                 // pretty JSON, keys sorted, buckets ascending
  // Writes `path` atomically (temp file in the same folder, then rename); creates the folder.
  void save(const std::filesystem::path& path) const;

  const TuneIdentity& identity() const { return id_; }
  // Empty when the file is for this device, else why not ("for NVIDIA H200 (sm_90), this GPU is ...").
  std::string why_not_for(const TuneIdentity& device) const;

  bool has(const std::string& family, const std::string& signature, int64_t bucket) const;
  bool has(const std::string& family, const std::string& signature) const;
  void set(const std::string& family, const std::string& signature, int64_t bucket, TuneEntry entry);
  // The entry of the bucket nearest to m among those measured for (family, signature); nullptr if none.
  const TuneEntry* find(const std::string& family, const std::string& signature, int64_t m) const;

  // family -> signature -> bucket -> entry
  using Buckets = std::map<int64_t, TuneEntry>;
  const std::map<std::string, std::map<std::string, Buckets>>& entries() const { return entries_; }
  size_t size() const;  // number of (family, signature, bucket) entries

 private:
  TuneIdentity id_;
  std::map<std::string, std::map<std::string, Buckets>> entries_;
};

// The folders searched, in order: $Q35JIT_TUNE_DIR (if set), the user cache dir (if $XDG_CACHE_HOME
// or $HOME is set), `exe_dir`/tune_cache (if exe_dir is not empty). The embedded files come after.
std::vector<std::filesystem::path> tune_search_dirs(const std::filesystem::path& exe_dir);
// Where `q35jit tune` writes by default: <user cache dir>/<tune_file_name(gpu)>; Error if neither
// $XDG_CACHE_HOME nor $HOME is set.
std::filesystem::path default_tune_output(const std::string& gpu_name);

// The tuned configs a run uses: the layers found for one device.
class TuneTable {
 public:
  struct Layer {
    std::string origin;  // the path, or "embedded <name>"
    TuneFile file;
  };
  TuneTable() = default;  // empty: every lookup falls back to the defaults
  explicit TuneTable(std::vector<Layer> layers) : layers_(std::move(layers)) {}

  // Searches tune_search_dirs(exe_dir), then the embedded files, for tune_file_name(device.gpu).
  // Files for another device or malformed ones are skipped; each skip is a one-line notice.
  static TuneTable find(const TuneIdentity& device, const std::filesystem::path& exe_dir,
                        const std::function<void(const std::string&)>& notice);

  // The config tuned for (family, signature) at the bucket nearest to m, from the first layer that
  // has the (family, signature); nullopt if none has it.
  std::optional<nlohmann::json> lookup(const std::string& family, const std::string& signature, int64_t m) const;
  // Like lookup, with the layer's origin and the bucket used (for `tune --show`).
  struct Hit {
    const TuneEntry* entry = nullptr;
    int64_t bucket = 0;
    const std::string* origin = nullptr;
  };
  std::optional<Hit> lookup_hit(const std::string& family, const std::string& signature, int64_t m) const;

  const std::vector<Layer>& layers() const { return layers_; }
  bool empty() const { return layers_.empty(); }

 private:
  std::vector<Layer> layers_;
};

// The identity of the device this process runs on: name, "sm_XY", JitEngine::nvrtc_version(),
// "q35jit <kVersion>".
struct DeviceInfo;
TuneIdentity tune_identity(const DeviceInfo& device);

// The tune-cache files embedded into the binary at build time (tune_cache/*.json): (name, text).
const std::vector<std::pair<std::string, std::string>>& embedded_tune_files();

}  // namespace q35
