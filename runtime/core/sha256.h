#pragma once
// SHA-256 (FIPS 180-4), incremental. Used for JIT cache keys and cache-entry checksums.
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace q35 {

using Sha256Digest = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  Sha256& update(std::span<const uint8_t> bytes);
  Sha256& update(std::string_view text);
  // Length-prefixed field (u64 LE length, then the bytes): keeps concatenated fields unambiguous.
  Sha256& update_field(std::string_view text);
  Sha256Digest finish();  // the object must not be updated afterwards

 private:
  void compress(const uint8_t* block);  // one 64-byte block
  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_{};
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

Sha256Digest sha256(std::span<const uint8_t> bytes);
std::string to_hex(std::span<const uint8_t> bytes);  // lower-case
std::string sha256_hex(std::string_view text);

}  // namespace q35
