// Tune-cache files (autotune/tune_cache.h): the JSON format and its errors, atomic save, buckets and
// the nearest-bucket rule, the flag parsers, the search order and layering of TuneTable, the
// embedded files, and that q35::kVersion matches CMakeLists.txt.
#include <doctest/doctest.h>

#include <cstdlib>
#include <fstream>
#include <optional>
#include <regex>
#include <sstream>

#include "autotune/tune_cache.h"
#include "runtime/core/error.h"
#include "runtime/core/version.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
using nlohmann::json;
using q35::test::contains;
using q35::test::error_of;
using q35::test::TempDir;
namespace fs = std::filesystem;

namespace {

const TuneIdentity kH100{"NVIDIA H100 80GB HBM3", "sm_90", "13.0", "q35jit 0.1.0"};
const TuneIdentity kH200{"NVIDIA H200", "sm_90", "13.0", "q35jit 0.1.0"};

TuneEntry entry(int m_tile, double us, double default_us = 9.0) {
  return TuneEntry{json{{"m_tile", m_tile}, {"warps", 4}}, us, default_us};
}

TuneFile sample_file(const TuneIdentity& id = kH100) {
  TuneFile f(id);
  f.set("gemv_w4a16", "N9216_K2048_G128_bf16", 1, entry(1, 5.1, 5.9));
  f.set("gemv_w4a16", "N9216_K2048_G128_bf16", 16, entry(16, 7.25));
  f.set("gemv_w4a16", "N9216_K2048_G128_bf16", 2, entry(2, 5.5));
  f.set("gemv_w4a16", "N9216_K2048_G128_bf16", 1024, entry(64, 80.0));
  f.set("moe_gemm", "E256_N1024_K2048", 64, entry(32, 120.5, 130.0));
  return f;
}

void write_text(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A valid file as JSON, to be broken by the malformed cases.
json good_json() { return json::parse(sample_file().dump()); }

std::string parse_error(const json& j, const std::string& origin = "/x/H100.json") {
  return error_of([&] { TuneFile::parse(j.dump(), origin); });
}

// Sets (or unsets) environment variables for a scope and restores them afterwards.
class EnvGuard {
 public:
  void set(const char* name, const std::optional<std::string>& value) {
    if (!saved_.count(name)) {
      const char* v = std::getenv(name);
      saved_[name] = v ? std::optional<std::string>(v) : std::nullopt;
    }
    if (value)
      setenv(name, value->c_str(), 1);
    else
      unsetenv(name);
  }
  ~EnvGuard() {
    for (const auto& [name, v] : saved_) {
      if (v)
        setenv(name.c_str(), v->c_str(), 1);
      else
        unsetenv(name.c_str());
    }
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

}  // namespace

TEST_CASE("dump then parse gives the same file; buckets are written in numeric order") {
  const TuneFile f = sample_file();
  CHECK(f.size() == 5);
  const std::string text = f.dump();
  const TuneFile g = TuneFile::parse(text, "round trip");
  CHECK(g.identity().gpu == kH100.gpu);
  CHECK(g.identity().sm == "sm_90");
  CHECK(g.identity().nvrtc == "13.0");
  CHECK(g.identity().tool == "q35jit 0.1.0");
  CHECK(g.size() == 5);
  CHECK(g.dump() == text);
  const TuneEntry* e = g.find("gemv_w4a16", "N9216_K2048_G128_bf16", 1);
  REQUIRE(e);
  CHECK(e->config == json{{"m_tile", 1}, {"warps", 4}});
  CHECK(e->us == 5.1);
  CHECK(e->default_us == 5.9);
  // "1" < "2" < "16" < "1024": numeric, not string order.
  const size_t p1 = text.find("\"1\":"), p2 = text.find("\"2\":"), p16 = text.find("\"16\":"),
               p1024 = text.find("\"1024\":");
  REQUIRE(p1 != std::string::npos);
  REQUIRE(p1024 != std::string::npos);
  CHECK(p1 < p2);
  CHECK(p2 < p16);
  CHECK(p16 < p1024);
  CHECK(text.find("\"format\": \"q35jit-tune-cache\"") != std::string::npos);
  CHECK(text.find("\"version\": 1") != std::string::npos);
  CHECK(text.find("\n  \"entries\"") != std::string::npos);  // indent 2
  CHECK(text.back() == '\n');
  // An empty file round-trips too.
  CHECK(TuneFile::parse(TuneFile(kH200).dump(), "empty").size() == 0);
}

TEST_CASE("has, set and find") {
  TuneFile f = sample_file();
  CHECK(f.has("gemv_w4a16", "N9216_K2048_G128_bf16"));
  CHECK(f.has("gemv_w4a16", "N9216_K2048_G128_bf16", 16));
  CHECK_FALSE(f.has("gemv_w4a16", "N9216_K2048_G128_bf16", 8));
  CHECK_FALSE(f.has("gemv_w4a16", "N1_K1"));
  CHECK_FALSE(f.has("gemm_bf16", "N9216_K2048_G128_bf16"));
  CHECK(f.find("gemv_w4a16", "N1_K1", 1) == nullptr);
  CHECK(f.find("nope", "N9216_K2048_G128_bf16", 1) == nullptr);
  // Buckets 1 2 16 1024: M = 9 is halfway between 2 and 16 -> 2; 10 -> 16; 5000 -> 1024.
  CHECK(f.find("gemv_w4a16", "N9216_K2048_G128_bf16", 9)->config["m_tile"] == 2);
  CHECK(f.find("gemv_w4a16", "N9216_K2048_G128_bf16", 10)->config["m_tile"] == 16);
  CHECK(f.find("gemv_w4a16", "N9216_K2048_G128_bf16", 5000)->config["m_tile"] == 64);
  CHECK(f.find("moe_gemm", "E256_N1024_K2048", 1)->config["m_tile"] == 32);
  // set replaces.
  f.set("moe_gemm", "E256_N1024_K2048", 64, entry(8, 100.0));
  CHECK(f.size() == 5);
  CHECK(f.find("moe_gemm", "E256_N1024_K2048", 64)->us == 100.0);
  // set refuses what parse would refuse.
  CHECK(contains(error_of([&] { f.set("f", "s", 0, entry(1, 1.0)); }), "positive"));
  CHECK(contains(error_of([&] { f.set("f", "s", 4, TuneEntry{json::array(), 1.0, 1.0}); }), "object"));
  CHECK(contains(error_of([&] { f.set("f", "s", 4, entry(1, -1.0)); }), ">= 0"));
  CHECK(f.size() == 5);
}

TEST_CASE("save is atomic and load reads it back") {
  TempDir dir("tune-save");
  const fs::path path = dir / "sub" / "deeper" / tune_file_name(kH100.gpu);
  const TuneFile f = sample_file();
  f.save(path);  // creates the folders
  REQUIRE(fs::exists(path));
  CHECK(read_text(path) == f.dump());
  const TuneFile g = TuneFile::load(path);
  CHECK(g.dump() == f.dump());
  // Overwrite in place; no temp file is left behind.
  TuneFile h(kH100);
  h.set("rmsnorm", "H2048", 1, entry(1, 1.0));
  h.save(path);
  CHECK(TuneFile::load(path).size() == 1);
  int files = 0;
  for (const auto& e : fs::directory_iterator(path.parent_path())) {
    ++files;
    CHECK(e.path().filename() == path.filename());
  }
  CHECK(files == 1);
  // Errors name the path.
  const std::string missing = (dir / "missing.json").string();
  const std::string err = error_of([&] { TuneFile::load(missing); });
  CHECK(contains(err, missing));
  CHECK(contains(error_of([&] { TuneFile::load(dir.path()); }), dir.path().string()));
}

TEST_CASE("malformed files are errors naming the file and the field") {
  const std::string origin = "/x/H100.json";
  CHECK(parse_error(good_json()).empty());

  std::string e = error_of([&] { TuneFile::parse("{\"format\": ", origin); });
  CHECK(contains(e, origin));
  CHECK(contains(e, "not JSON"));
  e = error_of([&] { TuneFile::parse("", origin); });
  CHECK(contains(e, origin));
  CHECK(contains(e, "not JSON"));

  e = parse_error(json::array());
  CHECK(contains(e, origin));
  CHECK(contains(e, "object"));

  json j = good_json();
  j["format"] = "something-else";
  e = parse_error(j);
  CHECK(contains(e, origin));
  CHECK(contains(e, "format"));
  CHECK(contains(e, "something-else"));
  j.erase("format");
  e = parse_error(j);
  CHECK(contains(e, origin));
  CHECK(contains(e, "format: missing"));

  j = good_json();
  j["version"] = 2;
  e = parse_error(j);
  CHECK(contains(e, origin));
  CHECK(contains(e, "format version 2, this q35jit reads version 1"));
  CHECK(contains(e, "q35jit tune"));
  j["version"] = "1";
  e = parse_error(j);
  CHECK(contains(e, "version: expected an integer"));

  for (const char* field : {"gpu", "sm", "nvrtc", "tool"}) {
    j = good_json();
    j.erase(field);
    e = parse_error(j);
    CHECK(contains(e, origin));
    CHECK(contains(e, fmt::format("{}: missing", field)));
    j[field] = 3;
    e = parse_error(j);
    CHECK(contains(e, fmt::format("{}: expected a string, found number 3", field)));
  }

  j = good_json();
  j.erase("entries");
  CHECK(contains(parse_error(j), "entries: missing"));
  j["entries"] = json::array();
  CHECK(contains(parse_error(j), "entries: expected an object"));
  j = good_json();
  j["entries"]["gemv_w4a16"] = 5;
  CHECK(contains(parse_error(j), "entries.gemv_w4a16: expected an object"));
  j = good_json();
  j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"] = "x";
  CHECK(contains(parse_error(j), "entries.gemv_w4a16.N9216_K2048_G128_bf16: expected an object"));

  const std::string sig = "entries.gemv_w4a16.N9216_K2048_G128_bf16.";
  for (const char* key : {"abc", "0", "-4", "016", "1.5", ""}) {
    j = good_json();
    j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"][key] = j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"]["1"];
    e = parse_error(j);
    CAPTURE(key);
    CHECK(contains(e, origin));
    CHECK(contains(e, sig + json(key).dump()));
    CHECK(contains(e, "positive integer"));
  }

  j = good_json();
  j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"]["16"] = 1;
  CHECK(contains(parse_error(j), sig + "\"16\": expected an object"));
  j = good_json();
  j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"]["16"]["config"] = "m_tile=16";
  e = parse_error(j);
  CHECK(contains(e, origin));
  CHECK(contains(e, sig + "\"16\".config: expected an object"));
  j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"]["16"].erase("config");
  CHECK(contains(parse_error(j), sig + "\"16\".config: missing"));

  j = good_json();
  j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"]["16"]["us"] = -1.5;
  e = parse_error(j);
  CHECK(contains(e, origin));
  CHECK(contains(e, sig + "\"16\".us"));
  CHECK(contains(e, "-1.5"));
  j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"]["16"]["us"] = "fast";
  CHECK(contains(parse_error(j), sig + "\"16\".us: expected"));
  j = good_json();
  j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"]["16"]["default_us"] = -3;
  CHECK(contains(parse_error(j), sig + "\"16\".default_us"));
  j["entries"]["gemv_w4a16"]["N9216_K2048_G128_bf16"]["16"].erase("default_us");
  CHECK(contains(parse_error(j), sig + "\"16\".default_us: missing"));

  // A family name that is not an identifier is quoted in the path.
  j = good_json();
  j["entries"]["gemv w4"] = 1;
  CHECK(contains(parse_error(j), "entries.\"gemv w4\": expected an object"));
}

TEST_CASE("why_not_for compares the GPU name and the SM only") {
  const TuneFile f = sample_file(kH100);
  CHECK(f.why_not_for(kH100).empty());
  TuneIdentity other_tools = kH100;
  other_tools.nvrtc = "12.8";
  other_tools.tool = "q35jit 9.9.9";
  CHECK(f.why_not_for(other_tools).empty());
  const std::string why = f.why_not_for(kH200);
  CHECK(contains(why, "NVIDIA H100 80GB HBM3 (sm_90)"));
  CHECK(contains(why, "NVIDIA H200 (sm_90)"));
  TuneIdentity other_sm = kH100;
  other_sm.sm = "sm_100";
  CHECK(contains(f.why_not_for(other_sm), "sm_100"));
}

TEST_CASE("nearest_bucket: nearest, ties to the smaller bucket, clamped at the ends") {
  const std::vector<int64_t> b = {1, 2, 4, 8, 16, 24, 32};
  CHECK(nearest_bucket(b, 1) == 1);
  CHECK(nearest_bucket(b, 3) == 2);  // tie between 2 and 4
  CHECK(nearest_bucket(b, 5) == 4);
  CHECK(nearest_bucket(b, 6) == 4);  // tie between 4 and 8
  CHECK(nearest_bucket(b, 7) == 8);
  CHECK(nearest_bucket(b, 12) == 8);  // tie between 8 and 16
  CHECK(nearest_bucket(b, 13) == 16);
  CHECK(nearest_bucket(b, 20) == 16);  // tie between 16 and 24
  CHECK(nearest_bucket(b, 24) == 24);
  CHECK(nearest_bucket(b, 0) == 1);
  CHECK(nearest_bucket(b, -5) == 1);
  CHECK(nearest_bucket(b, 33) == 32);
  CHECK(nearest_bucket(b, 100000) == 32);
  CHECK(nearest_bucket({64}, 1) == 64);
  CHECK(nearest_bucket({64}, 5000) == 64);
  const auto& d = default_tune_buckets();
  CHECK(d == std::vector<int64_t>{1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096});
  CHECK(nearest_bucket(d, 4095) == 4096);
  CHECK(nearest_bucket(d, 1280) == 1024);  // tie between 1024 and 1536
  CHECK(nearest_bucket(d, 1281) == 1536);
  CHECK(nearest_bucket(d, 9999) == 4096);
}

TEST_CASE("parse_sweep, parse_buckets and clip_buckets") {
  CHECK(parse_sweep("1..4095") == std::pair<int64_t, int64_t>{1, 4095});
  CHECK(parse_sweep("16..16") == std::pair<int64_t, int64_t>{16, 16});
  for (const char* bad : {"", "4095", "0..16", "16..8", "1...4", "a..b", "1..", "..4", "-1..4", " 1..4", "1..4x"}) {
    CAPTURE(bad);
    const std::string e = error_of([&] { parse_sweep(bad); });
    CHECK(contains(e, "--sweep"));
    CHECK(contains(e, fmt::format("'{}'", bad)));
  }
  CHECK(contains(error_of([] { parse_sweep("x", "--range"); }), "--range 'x'"));

  CHECK(parse_buckets("16,1,4,4,2") == std::vector<int64_t>{1, 2, 4, 16});
  CHECK(parse_buckets("7") == std::vector<int64_t>{7});
  for (const char* bad : {"", "1,,2", "1,2,", "0,1", "-4", "1,x", "1.5"}) {
    CAPTURE(bad);
    const std::string e = error_of([&] { parse_buckets(bad); });
    CHECK(contains(e, "--buckets"));
    CHECK(contains(e, fmt::format("'{}'", bad)));
  }
  CHECK(contains(error_of([] { parse_buckets("x", "--m"); }), "--m 'x'"));

  const auto& d = default_tune_buckets();
  CHECK(clip_buckets(d, 1, 4095) == std::vector<int64_t>{1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024,
                                                         1536, 2048, 3072});
  CHECK(clip_buckets(d, 16, 64) == std::vector<int64_t>{16, 24, 32, 48, 64});
  CHECK(clip_buckets(d, 5, 7) == std::vector<int64_t>{5});  // none inside: {lo}
  CHECK(clip_buckets(d, 5000, 9000) == std::vector<int64_t>{5000});
}

TEST_CASE("tune_file_name") {
  CHECK(tune_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json");
  CHECK(tune_file_name("NVIDIA H200") == "NVIDIA_H200.json");
  CHECK(tune_file_name("A/B:c.d-e_f") == "A_B_c.d-e_f.json");
}

TEST_CASE("search folders and the default output follow Q35JIT_TUNE_DIR, XDG_CACHE_HOME, HOME") {
  EnvGuard env;
  env.set("Q35JIT_TUNE_DIR", "/tmp/t");
  env.set("XDG_CACHE_HOME", "/tmp/x");
  env.set("HOME", "/tmp/h");
  CHECK(tune_search_dirs("/opt/q35") ==
        std::vector<fs::path>{"/tmp/t", "/tmp/x/q35jit/tune", "/opt/q35/tune_cache"});
  CHECK(tune_search_dirs("") == std::vector<fs::path>{"/tmp/t", "/tmp/x/q35jit/tune"});
  CHECK(default_tune_output("NVIDIA H200") == fs::path("/tmp/x/q35jit/tune/NVIDIA_H200.json"));
  env.set("Q35JIT_TUNE_DIR", std::nullopt);
  env.set("XDG_CACHE_HOME", std::nullopt);
  CHECK(tune_search_dirs("/opt/q35") == std::vector<fs::path>{"/tmp/h/.cache/q35jit/tune", "/opt/q35/tune_cache"});
  CHECK(default_tune_output("NVIDIA H200") == fs::path("/tmp/h/.cache/q35jit/tune/NVIDIA_H200.json"));
  env.set("HOME", std::nullopt);
  CHECK(tune_search_dirs("/opt/q35") == std::vector<fs::path>{"/opt/q35/tune_cache"});
  CHECK(contains(error_of([] { default_tune_output("NVIDIA H200"); }), "HOME"));
}

TEST_CASE("TuneTable::find uses good files and skips others with a notice") {
  TempDir tune_dir("tune-find"), cache("tune-find-cache"), exe("tune-find-exe");
  EnvGuard env;
  env.set("Q35JIT_TUNE_DIR", tune_dir.path().string());
  env.set("XDG_CACHE_HOME", cache.path().string());
  const std::string name = tune_file_name(kH100.gpu);
  const fs::path user_file = cache.path() / "q35jit" / "tune" / name;
  std::vector<std::string> notices;
  auto notice = [&](const std::string& s) { notices.push_back(s); };

  SUBCASE("no file: empty table, no notice") {
    const TuneTable t = TuneTable::find(kH100, exe.path(), notice);
    // Only an embedded file for this GPU (none in a test build's tune_cache/ unless shipped) may appear.
    for (const auto& layer : t.layers()) CHECK(layer.origin == "embedded " + name);
    CHECK(notices.empty());
  }

  SUBCASE("(a) a good file is used") {
    sample_file().save(tune_dir / name);
    const TuneTable t = TuneTable::find(kH100, exe.path(), notice);
    CHECK(notices.empty());
    REQUIRE_FALSE(t.empty());
    CHECK(t.layers()[0].origin == (tune_dir / name).string());
    const auto hit = t.lookup_hit("gemv_w4a16", "N9216_K2048_G128_bf16", 9);
    REQUIRE(hit);
    CHECK(hit->bucket == 2);
    CHECK(*hit->origin == (tune_dir / name).string());
    CHECK(hit->entry->us == 5.5);
    CHECK(t.lookup("gemv_w4a16", "N9216_K2048_G128_bf16", 3000) == json{{"m_tile", 64}, {"warps", 4}});
    CHECK_FALSE(t.lookup("gemv_w4a16", "N1_K1", 1));
  }

  SUBCASE("(b) a file for another GPU is skipped with a notice naming it") {
    TuneFile other = sample_file(kH200);
    other.save(tune_dir / name);  // H200 contents under the H100 name
    const TuneTable t = TuneTable::find(kH100, exe.path(), notice);
    REQUIRE(notices.size() == 1);
    CHECK(contains(notices[0], (tune_dir / name).string()));
    CHECK(contains(notices[0], "NVIDIA H200"));
    CHECK(notices[0].find('\n') == std::string::npos);
    for (const auto& layer : t.layers()) CHECK(layer.origin != (tune_dir / name).string());
  }

  SUBCASE("(c) a malformed file is skipped with a notice naming it; the next layer still answers") {
    write_text(tune_dir / name, "{ not json");
    TuneFile user(kH100);
    user.set("gemv_w4a16", "N9216_K2048_G128_bf16", 4, entry(4, 3.0));
    user.save(user_file);
    const TuneTable t = TuneTable::find(kH100, exe.path(), notice);
    REQUIRE(notices.size() == 1);
    CHECK(contains(notices[0], (tune_dir / name).string()));
    CHECK(contains(notices[0], "not JSON"));
    CHECK(notices[0].find('\n') == std::string::npos);
    REQUIRE_FALSE(t.empty());
    CHECK(t.layers()[0].origin == user_file.string());
    CHECK(t.lookup("gemv_w4a16", "N9216_K2048_G128_bf16", 1) == json{{"m_tile", 4}, {"warps", 4}});
  }

  SUBCASE("a wrong version and a wrong SM are skipped with notices") {
    json j = json::parse(sample_file().dump());
    j["version"] = 2;
    write_text(tune_dir / name, j.dump());
    TuneIdentity sm = kH100;
    sm.sm = "sm_80";
    sample_file(sm).save(user_file);
    const TuneTable t = TuneTable::find(kH100, exe.path(), notice);
    REQUIRE(notices.size() == 2);
    CHECK(contains(notices[0], (tune_dir / name).string()));
    CHECK(contains(notices[0], "format version 2"));
    CHECK(contains(notices[1], user_file.string()));
    CHECK(contains(notices[1], "sm_80"));
  }

  SUBCASE("layers: the first layer with the (family, signature) answers; others fall through") {
    TuneFile first(kH100);
    first.set("gemv_w4a16", "N9216_K2048_G128_bf16", 1, entry(101, 1.0));
    first.save(tune_dir / name);
    TuneFile second(kH100);
    second.set("gemv_w4a16", "N9216_K2048_G128_bf16", 1, entry(201, 1.0));
    second.set("gemv_w4a16", "N9216_K2048_G128_bf16", 64, entry(264, 1.0));  // not used: first layer has the pair
    second.set("moe_gemm", "E256_N1024_K2048", 8, entry(208, 1.0));
    second.save(user_file);
    TuneFile third(kH100);
    third.set("rmsnorm", "H2048", 1, entry(301, 1.0));
    third.save(exe / "tune_cache" / name);
    const TuneTable t = TuneTable::find(kH100, exe.path(), notice);
    CHECK(notices.empty());
    REQUIRE(t.layers().size() >= 3);
    CHECK(t.layers()[0].origin == (tune_dir / name).string());
    CHECK(t.layers()[1].origin == user_file.string());
    CHECK(t.layers()[2].origin == (exe / "tune_cache" / name).string());
    // The first layer answers even where a later layer has a nearer bucket.
    const auto hit = t.lookup_hit("gemv_w4a16", "N9216_K2048_G128_bf16", 64);
    REQUIRE(hit);
    CHECK(hit->entry->config["m_tile"] == 101);
    CHECK(hit->bucket == 1);
    CHECK(*hit->origin == (tune_dir / name).string());
    // Only in the second / third layer: found there.
    const auto moe = t.lookup_hit("moe_gemm", "E256_N1024_K2048", 1);
    REQUIRE(moe);
    CHECK(moe->entry->config["m_tile"] == 208);
    CHECK(*moe->origin == user_file.string());
    CHECK(t.lookup("rmsnorm", "H2048", 7) == json{{"m_tile", 301}, {"warps", 4}});
  }

  SUBCASE("a folder named twice is read once") {
    env.set("Q35JIT_TUNE_DIR", (cache.path() / "q35jit" / "tune").string());
    sample_file().save(user_file);
    const TuneTable t = TuneTable::find(kH100, exe.path(), notice);
    REQUIRE_FALSE(t.empty());
    CHECK(t.layers()[0].origin == user_file.string());
    CHECK((t.layers().size() == 1 || t.layers()[1].origin == "embedded " + name));
  }

  SUBCASE("a missing notice callback is allowed") {
    write_text(tune_dir / name, "[]");
    CHECK(error_of([&] { TuneTable::find(kH100, exe.path(), {}); }).empty());
  }
}

TEST_CASE("an empty TuneTable answers nothing") {
  const TuneTable t;
  CHECK(t.empty());
  CHECK_FALSE(t.lookup("gemv_w4a16", "N9216_K2048_G128_bf16", 1));
  CHECK_FALSE(t.lookup_hit("gemv_w4a16", "N9216_K2048_G128_bf16", 1));
}

TEST_CASE("every embedded tune-cache file parses and equals tune_cache/ on disk") {
  const fs::path dir = fs::path(Q35_SOURCE_DIR) / "tune_cache";
  size_t on_disk = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".json") ++on_disk;
  const auto& files = embedded_tune_files();
  CHECK(files.size() == on_disk);
  for (const auto& [name, text] : files) {
    CAPTURE(name);
    CHECK(text == read_text(dir / name));
    const std::string e = error_of([&, &name = name, &text = text] {
      const TuneFile f = TuneFile::parse(text, "embedded " + name);
      CHECK(tune_file_name(f.identity().gpu) == name);
    });
    CHECK(e == "");
  }
}

TEST_CASE("q35::kVersion equals the project VERSION in CMakeLists.txt") {
  const std::string cmake = read_text(fs::path(Q35_SOURCE_DIR) / "CMakeLists.txt");
  std::smatch m;
  REQUIRE(std::regex_search(cmake, m, std::regex(R"(project\(q35jit VERSION ([0-9]+\.[0-9]+\.[0-9]+))")));
  CHECK(m[1].str() == std::string(kVersion));
}
