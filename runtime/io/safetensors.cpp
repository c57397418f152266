#include "runtime/io/safetensors.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"
#include "runtime/core/half.h"
#include "runtime/io/json_file.h"

namespace q35 {

namespace {

using nlohmann::json;

// numel * dtype size of a header entry, or nullopt on overflow.
std::optional<uint64_t> byte_size(const std::vector<int64_t>& shape, DType dtype) {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape)
    if (__builtin_mul_overflow(n, uint64_t(d), &n)) return std::nullopt;
  return n;
}

// A non-negative JSON integer, or nullopt.
std::optional<uint64_t> as_count(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return uint64_t(v.get<int64_t>());
  return std::nullopt;
}

TensorInfo parse_entry(const std::string& file, const std::string& name, const json& e,
                       uint64_t data_size) {
  if (!e.is_object())
    fail("{}: tensor \"{}\": expected an object {{dtype, shape, data_offsets}}, found {}", file, name,
         e.type_name());
  TensorInfo t;
  t.name = name;
  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string())
    fail("{}: tensor \"{}\": missing or non-string \"dtype\"", file, name);
  auto dtype = dtype_from_name(dt->get<std::string>());
  if (!dtype) fail("{}: tensor \"{}\": unknown dtype \"{}\"", file, name, dt->get<std::string>());
  t.dtype = *dtype;

  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array())
    fail("{}: tensor \"{}\": missing or non-array \"shape\"", file, name);
  for (const json& d : *sh) {
    auto n = as_count(d);
    if (!n || *n > uint64_t(INT64_MAX))
      fail("{}: tensor \"{}\": shape {} has an entry that is not a non-negative integer", file, name,
           sh->dump());
    t.shape.push_back(int64_t(*n));
  }

  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2 || !as_count((*off)[0]) ||
      !as_count((*off)[1]))
    fail("{}: tensor \"{}\": \"data_offsets\" must be [begin, end] with non-negative integers, found {}",
         file, name, off == e.end() ? std::string("nothing") : off->dump());
  t.begin = *as_count((*off)[0]);
  t.end = *as_count((*off)[1]);
  if (t.begin > t.end || t.end > data_size)
    fail("{}: tensor \"{}\": data_offsets [{}, {}] outside the data section of {} bytes "
         "(truncated file or wrong offsets)", file, name, t.begin, t.end, data_size);
  auto bytes = byte_size(t.shape, t.dtype);
  if (!bytes || *bytes != t.end - t.begin)
    fail("{}: tensor \"{}\": shape [{}] {} needs {} bytes, data_offsets [{}, {}] span {}", file, name,
         fmt::join(t.shape, ", "), dtype_name(t.dtype), bytes ? fmt::to_string(*bytes) : "overflowing",
         t.begin, t.end, t.end - t.begin);
  return t;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : file_(path) {
  const std::string name = path.string();
  auto bytes = file_.bytes();
  if (bytes.size() < 8)
    fail("{}: truncated safetensors file: {} bytes, expected at least the 8-byte header length", name,
         bytes.size());
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[size_t(i)];
  if (header_len > bytes.size() - 8)
    fail("{}: header length {} exceeds the file size {} (truncated or not a safetensors file)", name,
         header_len, bytes.size());
  data_offset_ = 8 + header_len;
  const uint64_t data_size = bytes.size() - data_offset_;

  json header;
  try {
    header = json::parse(bytes.begin() + 8, bytes.begin() + long(data_offset_));
  } catch (const json::parse_error& e) {
    fail("{}: malformed JSON header: {}", name, e.what());
  }
  if (!header.is_object()) fail("{}: header must be a JSON object, found {}", name, header.type_name());

  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) fail("{}: \"__metadata__\" must be an object of strings", name);
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          fail("{}: \"__metadata__\" entry \"{}\" must be a string, found {}", name, mk, mv.type_name());
        metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    index_[key] = tensors_.size();
    tensors_.push_back(parse_entry(name, key, value, data_size));
  }

  // No two tensors may share bytes (zero-sized tensors occupy none).
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : tensors_)
    if (t.end > t.begin) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->begin < by_offset[i - 1]->end)
      fail("{}: tensors \"{}\" [{}, {}] and \"{}\" [{}, {}] overlap", name, by_offset[i - 1]->name,
           by_offset[i - 1]->begin, by_offset[i - 1]->end, by_offset[i]->name, by_offset[i]->begin,
           by_offset[i]->end);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::span<const uint8_t> SafetensorsFile::data(const TensorInfo& t) const {
  return file_.bytes().subspan(data_offset_ + t.begin, t.end - t.begin);
}

void SafetensorsFile::release(const TensorInfo& t) const {
  file_.release_pages(data_offset_ + t.begin, t.end - t.begin);
}

std::vector<float> to_f32(const TensorRef& t) {
  const size_t n = size_t(t.info->numel());
  if (t.bytes.size() != n * dtype_size(t.info->dtype))
    fail("tensor \"{}\" in {}: {} bytes for {} elements of {}", t.info->name, t.file->path().string(),
         t.bytes.size(), n, dtype_name(t.info->dtype));
  std::vector<float> out(n);
  const uint8_t* p = t.bytes.data();  // safetensors data is not guaranteed to be aligned
  switch (t.info->dtype) {
    case DType::F32:
      std::memcpy(out.data(), p, n * 4);
      break;
    case DType::BF16:
    case DType::F16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = t.info->dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
      }
      break;
    default:
      fail("tensor \"{}\" in {}: dtype {} cannot be converted to fp32 (expected F32, F16 or BF16)",
           t.info->name, t.file->path().string(), dtype_name(t.info->dtype));
  }
  return out;
}

SafetensorsWriter::SafetensorsWriter(std::filesystem::path path, std::vector<TensorDecl> tensors,
                                     const std::map<std::string, std::string>& metadata)
    : path_(std::move(path)), tensors_(std::move(tensors)) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const TensorDecl& t : tensors_) {
    if (t.name == "__metadata__" || header.contains(t.name))
      fail("{}: cannot write tensor \"{}\": duplicate or reserved name", path_.string(), t.name);
    auto bytes = byte_size(t.shape, t.dtype);
    if (!bytes) fail("{}: cannot write tensor \"{}\": shape [{}] overflows", path_.string(), t.name, fmt::join(t.shape, ", "));
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + *bytes}}};
    sizes_.push_back(*bytes);
    offset += *bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
  tmp_ = path_.parent_path() / fmt::format("{}.tmp.{}", path_.filename().string(), ::getpid());
  out_.open(tmp_, std::ios::binary | std::ios::trunc);
  if (!out_) fail("cannot create {}: {}", tmp_.string(), std::strerror(errno));
  out_.write(reinterpret_cast<const char*>(len), 8);
  out_.write(text.data(), std::streamsize(text.size()));
}

SafetensorsWriter::~SafetensorsWriter() {
  if (!committed_) {
    out_.close();
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
  }
}

void SafetensorsWriter::write(const std::string& name, std::span<const uint8_t> bytes) {
  if (next_ >= tensors_.size() || tensors_[next_].name != name)
    fail("{}: tensor \"{}\" written out of order (expected \"{}\")", path_.string(), name,
         next_ < tensors_.size() ? tensors_[next_].name : std::string("none"));
  const TensorDecl& t = tensors_[next_];
  if (bytes.size() != sizes_[next_])
    fail("{}: cannot write tensor \"{}\": shape [{}] {} needs {} bytes, given {}", path_.string(), name,
         fmt::join(t.shape, ", "), dtype_name(t.dtype), sizes_[next_], bytes.size());
  out_.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  if (!out_) fail("cannot write {}: {}", tmp_.string(), std::strerror(errno));
  ++next_;
}

void SafetensorsWriter::commit() {
  if (next_ != tensors_.size())
    fail("{}: {} of {} tensors written before commit", path_.string(), next_, tensors_.size());
  out_.close();
  if (!out_) fail("cannot write {}: {}", tmp_.string(), std::strerror(errno));
  std::error_code ec;
  std::filesystem::rename(tmp_, path_, ec);
  if (ec) fail("cannot rename {} to {}: {}", tmp_.string(), path_.string(), ec.message());
  committed_ = true;
}

void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorDecl> decls;
  for (const TensorToWrite& t : tensors) decls.push_back({t.name, t.dtype, t.shape});
  SafetensorsWriter w(path, std::move(decls), metadata);
  for (const TensorToWrite& t : tensors) w.write(t.name, t.bytes);
  w.commit();
}

Checkpoint::Checkpoint(const std::filesystem::path& dir) : dir_(dir) {
  namespace fs = std::filesystem;
  if (!fs::exists(dir)) fail("checkpoint directory {} does not exist", dir.string());
  if (!fs::is_directory(dir)) fail("checkpoint path {} is not a directory", dir.string());

  // Open every shard, then index every tensor of every shard; a name in two shards is an error.
  auto add_file = [&](const fs::path& path) {
    files_.push_back(std::make_unique<SafetensorsFile>(path));
    const size_t f = files_.size() - 1;
    for (const TensorInfo& t : files_[f]->tensors()) {
      auto [it, inserted] = where_.try_emplace(t.name, f, &t);
      if (!inserted)
        fail("tensor \"{}\" appears in two shards: {} and {}", t.name,
             files_[it->second.first]->path().string(), path.string());
    }
  };

  const fs::path index = dir / "model.safetensors.index.json";
  const fs::path single = dir / "model.safetensors";
  if (fs::exists(index)) {
    source_ = index;
    const nlohmann::json j = read_json_file(index);
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail("{}: expected a JSON object with a \"weight_map\" object", index.string());
    const nlohmann::json& map = j["weight_map"];
    std::map<std::string, std::string> first_tensor;  // shard file -> a tensor mapped to it
    for (const auto& [name, shard] : map.items()) {
      if (!shard.is_string())
        fail("{}: weight_map entry \"{}\" must be a file name string, found {}", index.string(), name,
             shard.type_name());
      const std::string s = shard.get<std::string>();
      if (s.empty() || fs::path(s).filename() != fs::path(s))
        fail("{}: weight_map entry \"{}\" names \"{}\", expected a file name inside {}", index.string(),
             name, s, dir.string());
      first_tensor.try_emplace(s, name);
    }
    if (first_tensor.empty()) fail("{}: weight_map is empty", index.string());
    for (const auto& [shard, name] : first_tensor) {
      if (!fs::is_regular_file(dir / shard))
        fail("{}: tensor \"{}\" is mapped to shard {}, which does not exist in {}", index.string(), name,
             shard, dir.string());
      add_file(dir / shard);
    }
    for (const auto& [name, shard] : map.items()) {
      auto it = where_.find(name);
      const std::string s = shard.get<std::string>();
      if (it == where_.end())
        fail("{}: tensor \"{}\" is mapped to {}, but {} has no such tensor", index.string(), name, s, s);
      const fs::path& found = files_[it->second.first]->path();
      if (found.filename() != fs::path(s))
        fail("{}: tensor \"{}\" is mapped to {}, but it is in {}", index.string(), name, s, found.string());
    }
  } else if (fs::exists(single)) {
    source_ = single;
    add_file(single);
  } else {
    fail("checkpoint directory {} has neither model.safetensors.index.json nor model.safetensors",
         dir.string());
  }
}

bool Checkpoint::has(const std::string& name) const { return where_.count(name) != 0; }

TensorRef Checkpoint::get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail("tensor \"{}\" not found in {}", name, source_.string());
  const SafetensorsFile& f = *files_[it->second.first];
  return TensorRef{it->second.second, f.data(*it->second.second), &f};
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, _] : where_) out.push_back(name);
  return out;
}

}  // namespace q35
