#pragma once
// Read-only memory map of a whole file (RAII). Pages are only read when touched, so mapping a
// 5 GB shard costs no host memory until its tensors are used.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>

namespace q35 {

class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path);  // throws Error naming the file
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }
  // Tell the kernel these pages may be dropped (after a tensor was copied out).
  void release_pages(size_t offset, size_t length) const;

 private:
  std::filesystem::path path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace q35
