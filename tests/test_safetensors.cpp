// safetensors reading, writing, header validation and fp32 conversion.
#include <doctest/doctest.h>

#include <cstring>

#include "runtime/core/error.h"
#include "runtime/core/half.h"
#include "runtime/io/safetensors.h"
#include "tests/synthetic_checkpoint.h"
#include "tests/test_util.h"

using namespace q35;
namespace fs = std::filesystem;
using q35::test::TempDir;
using q35::test::write_raw_safetensors;

using q35::test::error_of;

namespace {

template <typename T>
std::span<const uint8_t> as_bytes(const std::vector<T>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)};
}

// The Error text of `f()`, or "" when it does not throw.
// One tensor "w" of `dtype` and `shape` whose data section holds `data`.
std::string header_for(const std::string& dtype, const std::string& shape, uint64_t begin, uint64_t end) {
  return fmt::format(R"({{"w":{{"dtype":"{}","shape":{},"data_offsets":[{},{}]}}}})", dtype, shape, begin, end);
}

}  // namespace

TEST_CASE("write_safetensors round trip: names, dtypes, shapes, bytes, metadata, alignment") {
  TempDir dir("st-roundtrip");
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, -0.125f, 1e-20f};        // F32 [2, 3]
  const std::vector<uint16_t> b = {0x3F80, 0xC020, 0x4049, 0x0001};                  // BF16 [4]
  const std::vector<int32_t> c = {7, -9};                                            // I32 [2]
  const std::vector<uint8_t> d = {1, 2, 3};                                          // U8 [1, 3]
  write_safetensors(dir / "x.safetensors",
                    {{"a", DType::F32, {2, 3}, as_bytes(a)},
                     {"b", DType::BF16, {4}, as_bytes(b)},
                     {"c", DType::I32, {2}, as_bytes(c)},
                     {"d", DType::U8, {1, 3}, as_bytes(d)},
                     {"empty", DType::F32, {0, 5}, {}}},
                    {{"format", "pt"}, {"note", "x"}});
  CHECK(!fs::exists(dir / fmt::format("x.safetensors.tmp.{}", ::getpid())));

  SafetensorsFile f(dir / "x.safetensors");
  REQUIRE(f.tensors().size() == 5);
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"note", "x"}});
  const TensorInfo* ta = f.find("a");
  REQUIRE(ta);
  CHECK(ta->dtype == DType::F32);
  CHECK(ta->shape == std::vector<int64_t>{2, 3});
  CHECK(ta->numel() == 6);
  auto da = f.data(*ta);
  REQUIRE(da.size() == 24);
  CHECK(std::memcmp(da.data(), a.data(), 24) == 0);
  const TensorInfo* tc = f.find("c");
  REQUIRE(tc);
  CHECK(tc->dtype == DType::I32);
  CHECK(std::memcmp(f.data(*tc).data(), c.data(), 8) == 0);
  const TensorInfo* td = f.find("d");
  REQUIRE(td);
  CHECK(td->shape == std::vector<int64_t>{1, 3});
  CHECK(std::memcmp(f.data(*td).data(), d.data(), 3) == 0);
  const TensorInfo* te = f.find("empty");
  REQUIRE(te);
  CHECK(te->numel() == 0);
  CHECK(f.data(*te).empty());
  CHECK(f.find("missing") == nullptr);

  // The data section starts 8-byte aligned and the file is exactly header + data.
  std::ifstream in(dir / "x.safetensors", std::ios::binary);
  uint64_t len = 0;
  in.read(reinterpret_cast<char*>(&len), 8);
  CHECK((8 + len) % 8 == 0);
  CHECK(fs::file_size(dir / "x.safetensors") == 8 + len + 24 + 8 + 8 + 3);

  // Released pages are re-read from the file on the next touch.
  f.release(*ta);
  CHECK(std::memcmp(f.data(*ta).data(), a.data(), 24) == 0);
}

TEST_CASE("write_safetensors rejects byte counts that do not match the shape, and duplicate names") {
  TempDir dir("st-write-bad");
  const std::vector<float> a = {1, 2, 3};
  std::string e =
      error_of([&] { write_safetensors(dir / "x.safetensors", {{"a", DType::F32, {2, 2}, as_bytes(a)}}); });
  CHECK(e.find("\"a\"") != std::string::npos);
  CHECK(e.find("needs 16 bytes, given 12") != std::string::npos);
  e = error_of([&] {
    write_safetensors(dir / "x.safetensors",
                      {{"a", DType::F32, {3}, as_bytes(a)}, {"a", DType::F32, {3}, as_bytes(a)}});
  });
  CHECK(e.find("duplicate") != std::string::npos);
  CHECK(!fs::exists(dir / "x.safetensors"));
}

TEST_CASE("to_f32 converts BF16 exactly, F16 including subnormals, F32 bit for bit; other dtypes fail") {
  TempDir dir("st-tof32");
  const std::vector<uint16_t> bf = {0x3F80, 0xC020, 0x4049, 0x0001, 0x7F7F, f32_to_bf16(0.1f)};
  const std::vector<uint16_t> hf = {0x3C00, 0xC000, 0x0001, 0x7BFF, 0x3555, 0x8000};
  const std::vector<float> f32 = {0.1f, -3.0e38f, 1.17549435e-38f, 123456.789f};
  const std::vector<int64_t> i64 = {1, 2};
  // A 3-byte U8 tensor first so the following tensors start at odd offsets (unaligned reads).
  const std::vector<uint8_t> pad = {9, 9, 9};
  write_safetensors(dir / "t.safetensors", {{"pad", DType::U8, {3}, as_bytes(pad)},
                                            {"bf", DType::BF16, {2, 3}, as_bytes(bf)},
                                            {"hf", DType::F16, {6}, as_bytes(hf)},
                                            {"f32", DType::F32, {4}, as_bytes(f32)},
                                            {"i64", DType::I64, {2}, as_bytes(i64)}});
  SafetensorsFile f(dir / "t.safetensors");
  auto ref = [&](const char* name) { return TensorRef{f.find(name), f.data(*f.find(name)), &f}; };

  std::vector<float> v = to_f32(ref("bf"));
  REQUIRE(v.size() == 6);
  CHECK(v[0] == 1.0f);
  CHECK(v[1] == -2.5f);
  CHECK(v[2] == 3.140625f);
  CHECK(v[3] == std::ldexp(1.0f, -133));         // bf16 subnormal 2^-133
  CHECK(v[4] == 3.3895313892515355e38f);         // largest finite bf16
  CHECK(v[5] == 0.10009765625f);                 // 0.1 rounded to bf16

  v = to_f32(ref("hf"));
  REQUIRE(v.size() == 6);
  CHECK(v[0] == 1.0f);
  CHECK(v[1] == -2.0f);
  CHECK(v[2] == std::ldexp(1.0f, -24));  // smallest f16 subnormal
  CHECK(v[3] == 65504.0f);               // largest finite f16
  CHECK(v[4] == 0.333251953125f);
  CHECK(v[5] == 0.0f);
  CHECK(std::signbit(v[5]));

  v = to_f32(ref("f32"));
  REQUIRE(v.size() == 4);
  CHECK(std::memcmp(v.data(), f32.data(), 16) == 0);

  std::string e = error_of([&] { to_f32(ref("i64")); });
  CHECK(e.find("\"i64\"") != std::string::npos);
  CHECK(e.find("t.safetensors") != std::string::npos);
  CHECK(e.find("I64") != std::string::npos);
}

TEST_CASE("malformed safetensors files are one-line errors naming the file (and the tensor)") {
  TempDir dir("st-bad");
  const fs::path p = dir / "bad.safetensors";
  const std::vector<uint8_t> data(16, 0);  // room for 4 F32 values
  auto open_error = [&] { return error_of([&] { SafetensorsFile f(p); }); };
  auto expect = [&](std::initializer_list<const char*> parts) {
    std::string e = open_error();
    INFO(e);
    CHECK(!e.empty());
    CHECK(e.find("bad.safetensors") != std::string::npos);
    CHECK(e.find('\n') == std::string::npos);
    for (const char* part : parts) CHECK(e.find(part) != std::string::npos);
  };

  SUBCASE("missing file") { expect({"cannot open"}); }
  SUBCASE("shorter than the length field") {
    std::ofstream(p, std::ios::binary) << "abc";
    expect({"truncated", "3 bytes"});
  }
  SUBCASE("header length beyond the end of the file") {
    write_raw_safetensors(p, header_for("F32", "[4]", 0, 16), data, 1000);
    expect({"header length 1000 exceeds the file size"});
  }
  SUBCASE("header is not JSON") {
    write_raw_safetensors(p, R"({"w": {"dtype": "F32",)", data);
    expect({"malformed JSON"});
  }
  SUBCASE("header is not an object") {
    write_raw_safetensors(p, "[1, 2]", data);
    expect({"must be a JSON object", "array"});
  }
  SUBCASE("unknown dtype") {
    write_raw_safetensors(p, header_for("Q4", "[4]", 0, 16), data);
    expect({"\"w\"", "unknown dtype \"Q4\""});
  }
  SUBCASE("negative shape entry") {
    write_raw_safetensors(p, header_for("F32", "[-4]", 0, 16), data);
    expect({"\"w\"", "non-negative integer"});
  }
  SUBCASE("non-integer shape entry") {
    write_raw_safetensors(p, header_for("F32", "[4.5]", 0, 16), data);
    expect({"\"w\"", "non-negative integer"});
  }
  SUBCASE("offsets beyond the data section (header lies)") {
    write_raw_safetensors(p, header_for("F32", "[8]", 0, 32), data);
    expect({"\"w\"", "data_offsets [0, 32] outside the data section of 16 bytes"});
  }
  SUBCASE("begin after end") {
    write_raw_safetensors(p, header_for("F32", "[0]", 12, 8), data);
    expect({"\"w\"", "outside the data section"});
  }
  SUBCASE("size does not match shape x dtype") {
    write_raw_safetensors(p, header_for("F32", "[3]", 0, 16), data);
    expect({"\"w\"", "needs 12 bytes", "span 16"});
  }
  SUBCASE("shape whose byte count overflows") {
    write_raw_safetensors(p, header_for("F32", "[4294967296, 4294967296]", 0, 16), data);
    expect({"\"w\"", "overflowing"});
  }
  SUBCASE("missing data_offsets") {
    write_raw_safetensors(p, R"({"w":{"dtype":"F32","shape":[4]}})", data);
    expect({"\"w\"", "data_offsets"});
  }
  SUBCASE("overlapping tensors") {
    write_raw_safetensors(p,
                          R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                          data);
    expect({"\"w\"", "\"v\"", "overlap"});
  }
  SUBCASE("__metadata__ with a non-string value") {
    write_raw_safetensors(
        p, R"({"__metadata__":{"format":1},"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data);
    expect({"__metadata__", "\"format\""});
  }
  SUBCASE("truncated data section") {
    const std::vector<float> w(64, 1.0f);
    write_safetensors(p, {{"w", DType::F32, {64}, as_bytes(w)}});
    fs::resize_file(p, fs::file_size(p) - 100);
    expect({"\"w\"", "outside the data section"});
  }
}

TEST_CASE("a well-formed hand-written header with padding and adjacent tensors is accepted") {
  TempDir dir("st-raw-ok");
  const std::vector<float> data = {1, 2, 3, 4};
  std::string h = R"({"__metadata__":{"format":"pt"},"v":{"dtype":"F32","shape":[1],"data_offsets":[12,16]},)"
                  R"("w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}   )";
  write_raw_safetensors(dir / "ok.safetensors", h, as_bytes(data));
  SafetensorsFile f(dir / "ok.safetensors");
  REQUIRE(f.find("v"));
  std::vector<float> v = to_f32({f.find("v"), f.data(*f.find("v")), &f});
  CHECK(v == std::vector<float>{4});
  std::vector<float> w = to_f32({f.find("w"), f.data(*f.find("w")), &f});
  CHECK(w == std::vector<float>{1, 2, 3});
}
