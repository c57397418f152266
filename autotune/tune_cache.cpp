#include "autotune/tune_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string_view>

#include "autotune/embedded_tune_cache.h"
#include "runtime/core/error.h"
#include "runtime/core/version.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"

namespace q35 {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

// The whole of `s` as a decimal integer (an optional '-', then digits), else nullopt.
std::optional<int64_t> parse_int(std::string_view s) {
  int64_t v = 0;
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, v);
  if (s.empty() || ec != std::errc() || p != end) return std::nullopt;
  return v;
}

// $XDG_CACHE_HOME/q35jit/tune, else $HOME/.cache/q35jit/tune, else nullopt.
std::optional<fs::path> user_tune_dir() {
  if (const char* xdg = env("XDG_CACHE_HOME")) return fs::path(xdg) / "q35jit" / "tune";
  if (const char* home = env("HOME")) return fs::path(home) / ".cache" / "q35jit" / "tune";
  return std::nullopt;
}

// A key as it appears in a field path: bare when it is an identifier, else quoted.
std::string path_key(const std::string& key) {
  const bool bare = !key.empty() && !(key[0] >= '0' && key[0] <= '9') &&
                    std::all_of(key.begin(), key.end(), [](char c) {
                      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
                    });
  return bare ? key : json(key).dump();
}

// "string \"abc\"", "number -1", "object", ... (for "found ..." in messages).
std::string describe(const json& j) {
  if (j.is_structured()) return j.type_name();
  std::string text = j.dump();
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return fmt::format("{} {}", j.type_name(), text);
}

// Field checks of TuneFile::parse; every error names the origin and the field path.
struct Reader {
  const std::string& origin;

  [[noreturn]] void wrong(const std::string& path, std::string_view expected, const json& found) const {
    fail("{}: {}: expected {}, found {}", origin, path, expected, describe(found));
  }
  const json& field(const json& obj, const std::string& parent, const char* key, std::string_view expected) const {
    const std::string path = parent.empty() ? key : parent + "." + key;
    auto it = obj.find(key);
    if (it == obj.end()) fail("{}: {}: missing (expected {})", origin, path, expected);
    return *it;
  }
  std::string string(const json& obj, const char* key) const {
    const json& v = field(obj, "", key, "a string");
    if (!v.is_string()) wrong(key, "a string", v);
    return v.get<std::string>();
  }
  const json& object(const json& obj, const std::string& parent, const char* key) const {
    const json& v = field(obj, parent, key, "an object");
    if (!v.is_object()) wrong(parent + "." + key, "an object", v);
    return v;
  }
  double time_us(const json& obj, const std::string& parent, const char* key) const {
    const json& v = field(obj, parent, key, "a time in microseconds");
    if (!v.is_number()) wrong(parent + "." + key, "a time in microseconds (a number)", v);
    const double us = v.get<double>();
    if (!(us >= 0) || !std::isfinite(us)) wrong(parent + "." + key, "a time >= 0 in microseconds", v);
    return us;
  }
};

// The entry of the bucket nearest to m (ties to the smaller bucket); nullptr when `b` is empty.
const TuneFile::Buckets::value_type* nearest_entry(const TuneFile::Buckets& b, int64_t m) {
  if (b.empty()) return nullptr;
  auto hi = b.lower_bound(m);
  if (hi == b.begin()) return &*hi;
  auto lo = std::prev(hi);
  if (hi == b.end()) return &*lo;
  return (m - lo->first <= hi->first - m) ? &*lo : &*hi;
}

// Writes all of `text` to `path` and flushes it to the disk; Error naming the path on failure.
void write_file_synced(const fs::path& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create {}: {}", path.string(), std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      fail("cannot write {}: {}", path.string(), std::strerror(err));
    }
    done += size_t(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    fail("cannot write {}: {}", path.string(), std::strerror(err));
  }
  if (::close(fd) != 0) fail("cannot write {}: {}", path.string(), std::strerror(errno));
}

}  // namespace

// ---- buckets and flags ----

const std::vector<int64_t>& default_tune_buckets() {
  static const std::vector<int64_t> buckets = {1,   2,   4,   8,    16,   24,   32,   48,   64,
                                               96,  128, 256, 512,  1024, 1536, 2048, 3072, 4096};
  return buckets;
}

std::pair<int64_t, int64_t> parse_sweep(const std::string& text, const std::string& flag) {
  const size_t dots = text.find("..");
  if (dots != std::string::npos) {
    const auto lo = parse_int(std::string_view(text).substr(0, dots));
    const auto hi = parse_int(std::string_view(text).substr(dots + 2));
    if (lo && hi && *lo >= 1 && *hi >= *lo) return {*lo, *hi};
  }
  fail("{} '{}': expected LO..HI with 1 <= LO <= HI (tokens M), e.g. 1..4095", flag, text);
}

std::vector<int64_t> parse_buckets(const std::string& text, const std::string& flag) {
  std::vector<int64_t> out;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string_view item =
        std::string_view(text).substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const auto v = parse_int(item);
    if (!v || *v < 1)
      fail("{} '{}': '{}' is not a positive integer; expected a comma-separated list such as 1,2,4,16", flag, text,
           item);
    out.push_back(*v);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::vector<int64_t> clip_buckets(const std::vector<int64_t>& buckets, int64_t lo, int64_t hi) {
  std::vector<int64_t> out;
  std::copy_if(buckets.begin(), buckets.end(), std::back_inserter(out),
               [&](int64_t b) { return b >= lo && b <= hi; });
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  if (out.empty()) out.push_back(lo);
  return out;
}

int64_t nearest_bucket(const std::vector<int64_t>& buckets, int64_t m) {
  if (buckets.empty()) fail("nearest_bucket: no buckets (for M = {})", m);
  auto hi = std::lower_bound(buckets.begin(), buckets.end(), m);
  if (hi == buckets.begin()) return *hi;
  if (hi == buckets.end()) return buckets.back();
  const int64_t lo = *std::prev(hi);
  return (m - lo <= *hi - m) ? lo : *hi;
}

std::string tune_file_name(const std::string& gpu_name) {
  std::string out = gpu_name;
  for (char& c : out) {
    const bool keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                      c == '_' || c == '-';
    if (!keep) c = '_';
  }
  return out + ".json";
}

// ---- TuneFile ----

TuneFile TuneFile::parse(const std::string& text, const std::string& origin) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    fail("{}: not JSON: {}", origin, e.what());
  }
  if (!root.is_object()) fail("{}: expected a JSON object at the top level, found {}", origin, describe(root));
  const Reader r{origin};

  const std::string format = r.string(root, "format");
  if (format != kTuneFormatName)
    fail("{}: format: expected \"{}\", found \"{}\" (not a q35jit tune cache)", origin, kTuneFormatName, format);
  const json& version = r.field(root, "", "version", "an integer");
  if (!version.is_number_integer()) r.wrong("version", "an integer", version);
  if (version.get<int64_t>() != kTuneFormatVersion)
    fail("{}: format version {}, this q35jit reads version {}: re-run `q35jit tune`", origin, version.dump(),
         kTuneFormatVersion);

  TuneFile file(TuneIdentity{r.string(root, "gpu"), r.string(root, "sm"), r.string(root, "nvrtc"),
                             r.string(root, "tool")});
  const json& entries = r.object(root, "", "entries");
  for (const auto& [family, signatures] : entries.items()) {
    const std::string fpath = "entries." + path_key(family);
    if (!signatures.is_object()) r.wrong(fpath, "an object (signature -> buckets)", signatures);
    for (const auto& [signature, buckets] : signatures.items()) {
      const std::string spath = fpath + "." + path_key(signature);
      if (!buckets.is_object()) r.wrong(spath, "an object (bucket M -> entry)", buckets);
      for (const auto& [key, value] : buckets.items()) {
        const std::string bpath = spath + "." + json(key).dump();
        const auto bucket = parse_int(key);
        if (!bucket || *bucket < 1 || std::to_string(*bucket) != key)
          fail("{}: {}: a bucket key must be a positive integer (tokens M), found \"{}\"", origin, bpath, key);
        if (!value.is_object()) r.wrong(bpath, "an object with config, us, default_us", value);
        TuneEntry entry;
        entry.config = r.object(value, bpath, "config");
        entry.us = r.time_us(value, bpath, "us");
        entry.default_us = r.time_us(value, bpath, "default_us");
        file.entries_[family][signature].emplace(*bucket, std::move(entry));
      }
    }
  }
  return file;
}

TuneFile TuneFile::load(const fs::path& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail("cannot read tune cache {}: it is a folder", path.string());
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read tune cache {}: {}", path.string(), std::strerror(errno));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail("cannot read tune cache {}", path.string());
  return parse(text, path.string());
}

std::string TuneFile::dump() const {
  using ojson = nlohmann::ordered_json;
  ojson root;
  root["format"] = kTuneFormatName;
  root["version"] = kTuneFormatVersion;
  root["gpu"] = id_.gpu;
  root["sm"] = id_.sm;
  root["nvrtc"] = id_.nvrtc;
  root["tool"] = id_.tool;
  ojson entries = ojson::object();
  // std::map iterates families and signatures sorted, buckets in numeric order; ordered_json keeps it.
  for (const auto& [family, signatures] : entries_) {
    ojson& f = entries[family];
    for (const auto& [signature, buckets] : signatures) {
      ojson& s = f[signature];
      for (const auto& [bucket, e] : buckets) {
        ojson& b = s[std::to_string(bucket)];
        b["config"] = ojson(e.config);
        b["us"] = e.us;
        b["default_us"] = e.default_us;
      }
    }
  }
  root["entries"] = std::move(entries);
  return root.dump(2) + "\n";
}

void TuneFile::save(const fs::path& path) const {
  const std::string text = dump();
  const fs::path dir = path.parent_path();
  if (!dir.empty()) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) fail("cannot create folder {} for {}: {}", dir.string(), path.filename().string(), ec.message());
  }
  const fs::path tmp = dir / fmt::format("{}.tmp.{}", path.filename().string(), ::getpid());
  try {
    write_file_synced(tmp, text);
  } catch (const Error&) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    fail("cannot rename {} to {}: {}", tmp.string(), path.string(), ec.message());
  }
}

std::string TuneFile::why_not_for(const TuneIdentity& device) const {
  if (id_.gpu == device.gpu && id_.sm == device.sm) return "";
  return fmt::format("for {} ({}), this GPU is {} ({})", id_.gpu, id_.sm, device.gpu, device.sm);
}

bool TuneFile::has(const std::string& family, const std::string& signature, int64_t bucket) const {
  auto f = entries_.find(family);
  if (f == entries_.end()) return false;
  auto s = f->second.find(signature);
  return s != f->second.end() && s->second.count(bucket) > 0;
}

bool TuneFile::has(const std::string& family, const std::string& signature) const {
  auto f = entries_.find(family);
  if (f == entries_.end()) return false;
  auto s = f->second.find(signature);
  return s != f->second.end() && !s->second.empty();
}

void TuneFile::set(const std::string& family, const std::string& signature, int64_t bucket, TuneEntry entry) {
  if (bucket < 1) fail("tune cache {}/{}: bucket M = {} is not a positive integer", family, signature, bucket);
  if (!entry.config.is_object())
    fail("tune cache {}/{} bucket {}: config must be an object, found {}", family, signature, bucket,
         describe(entry.config));
  for (double us : {entry.us, entry.default_us})
    if (!(us >= 0) || !std::isfinite(us))
      fail("tune cache {}/{} bucket {}: time {} us is not a finite number >= 0", family, signature, bucket, us);
  entries_[family][signature][bucket] = std::move(entry);
}

const TuneEntry* TuneFile::find(const std::string& family, const std::string& signature, int64_t m) const {
  auto f = entries_.find(family);
  if (f == entries_.end()) return nullptr;
  auto s = f->second.find(signature);
  if (s == f->second.end()) return nullptr;
  const auto* hit = nearest_entry(s->second, m);
  return hit ? &hit->second : nullptr;
}

size_t TuneFile::size() const {
  size_t n = 0;
  for (const auto& [family, signatures] : entries_)
    for (const auto& [signature, buckets] : signatures) n += buckets.size();
  return n;
}

// ---- lookup ----

std::vector<fs::path> tune_search_dirs(const fs::path& exe_dir) {
  std::vector<fs::path> dirs;
  if (const char* dir = env("Q35JIT_TUNE_DIR")) dirs.emplace_back(dir);
  if (auto user = user_tune_dir()) dirs.push_back(*user);
  if (!exe_dir.empty()) dirs.push_back(exe_dir / "tune_cache");
  return dirs;
}

fs::path default_tune_output(const std::string& gpu_name) {
  if (auto user = user_tune_dir()) return *user / tune_file_name(gpu_name);
  fail("tune cache: neither XDG_CACHE_HOME nor HOME is set, so there is no default output file; pass --out FILE");
}

TuneTable TuneTable::find(const TuneIdentity& device, const fs::path& exe_dir,
                          const std::function<void(const std::string&)>& notice) {
  const std::string name = tune_file_name(device.gpu);
  std::vector<Layer> layers;
  auto skip = [&](const std::string& origin, std::string reason) {
    // Errors from parse/load start with the origin already.
    if (reason.starts_with(origin + ": ")) reason.erase(0, origin.size() + 2);
    if (notice) notice(fmt::format("tune cache: ignoring {}: {}", origin, reason));
  };
  // A file that does not load or is for another device is a notice, never a failure of the run.
  auto add = [&](const std::string& origin, auto&& read) {
    TuneFile file;
    try {
      file = read();
    } catch (const Error& e) {
      skip(origin, e.what());
      return;
    }
    if (std::string why = file.why_not_for(device); !why.empty()) {
      skip(origin, why);
      return;
    }
    layers.push_back(Layer{origin, std::move(file)});
  };

  std::vector<fs::path> seen;
  for (const fs::path& dir : tune_search_dirs(exe_dir)) {
    const fs::path path = dir / name;
    std::error_code ec;
    if (!fs::exists(path, ec)) continue;
    fs::path canonical = fs::weakly_canonical(path, ec);
    if (ec) canonical = path;
    if (std::find(seen.begin(), seen.end(), canonical) != seen.end()) continue;  // same file named twice
    seen.push_back(canonical);
    add(path.string(), [&] { return TuneFile::load(path); });
  }
  for (const auto& [file_name, text] : embedded_tune_files()) {
    if (file_name != name) continue;
    const std::string origin = "embedded " + file_name;
    add(origin, [&] { return TuneFile::parse(text, origin); });
  }
  return TuneTable(std::move(layers));
}

std::optional<TuneTable::Hit> TuneTable::lookup_hit(const std::string& family, const std::string& signature,
                                                    int64_t m) const {
  for (const Layer& layer : layers_) {
    auto f = layer.file.entries().find(family);
    if (f == layer.file.entries().end()) continue;
    auto s = f->second.find(signature);
    if (s == f->second.end()) continue;
    if (const auto* hit = nearest_entry(s->second, m)) return Hit{&hit->second, hit->first, &layer.origin};
  }
  return std::nullopt;
}

std::optional<json> TuneTable::lookup(const std::string& family, const std::string& signature, int64_t m) const {
  if (auto hit = lookup_hit(family, signature, m)) return hit->entry->config;
  return std::nullopt;
}

// ---- identity and embedded files ----

TuneIdentity tune_identity(const DeviceInfo& device) {
  return TuneIdentity{device.name, fmt::format("sm_{}{}", device.cc_major, device.cc_minor),
                      JitEngine::nvrtc_version(), fmt::format("q35jit {}", kVersion)};
}

const std::vector<std::pair<std::string, std::string>>& embedded_tune_files() {
  static const std::vector<std::pair<std::string, std::string>> files = [] {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& [name, text] : detail::embedded_tune_cache_data()) out.emplace_back(name, text);
    return out;
  }();
  return files;
}

}  // namespace q35
