#pragma once
// safetensors files: a u64 LE header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data
// (offsets relative to the end of the header). Read through mmap; the header is validated
// (JSON, dtypes, shapes, offsets inside the file, sizes = numel * dtype size, no overlaps).
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/core/mapped_file.h"

namespace q35 {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the data section
  uint64_t end = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);  // validates; throws Error naming the file

  const std::filesystem::path& path() const { return file_.path(); }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;  // nullptr if absent
  std::span<const uint8_t> data(const TensorInfo& t) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Drop the pages of a tensor from the page cache mapping after it was copied out.
  void release(const TensorInfo& t) const;

 private:
  MappedFile file_;
  uint64_t data_offset_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// One tensor of a checkpoint: its header entry, its bytes and the file it lives in.
struct TensorRef {
  const TensorInfo* info = nullptr;
  std::span<const uint8_t> bytes;
  const SafetensorsFile* file = nullptr;
};

// Converts F32/F16/BF16 data to fp32; any other dtype is an Error naming the tensor and file.
std::vector<float> to_f32(const TensorRef& t);

// An entry to write with write_safetensors.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::span<const uint8_t> bytes;
};

// Streams a safetensors file: the header (from the declarations) first, then each tensor's bytes
// in declaration order, so only one tensor need be in memory. Written to a temp file in the same
// folder and renamed by commit(); destroyed without commit, the temp file is removed.
struct TensorDecl {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
};

class SafetensorsWriter {
 public:
  SafetensorsWriter(std::filesystem::path path, std::vector<TensorDecl> tensors,
                    const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;
  void write(const std::string& name, std::span<const uint8_t> bytes);  // Error on order or size
  void commit();

 private:
  std::filesystem::path path_, tmp_;
  std::vector<TensorDecl> tensors_;
  std::vector<uint64_t> sizes_;
  std::ofstream out_;
  size_t next_ = 0;
  bool committed_ = false;
};

// Writes a safetensors file atomically (temp file in the same folder, then rename).
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// A Hugging Face checkpoint folder: model.safetensors.index.json + shards, or one
// model.safetensors. Shards are opened (and their headers validated) when constructed; data
// pages are only read when a tensor's bytes are touched.
class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& dir);  // throws Error naming dir / file

  const std::filesystem::path& dir() const { return dir_; }
  // The file that lists the tensors: model.safetensors.index.json, or the single model.safetensors.
  const std::filesystem::path& source() const { return source_; }
  bool has(const std::string& name) const;
  TensorRef get(const std::string& name) const;  // throws Error naming the tensor when missing
  std::vector<std::string> names() const;        // sorted
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::filesystem::path dir_;
  std::filesystem::path source_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<size_t, const TensorInfo*>> where_;  // name -> (file, entry)
};

}  // namespace q35
