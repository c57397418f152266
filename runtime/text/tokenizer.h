#pragma once
// Hugging Face tokenizer.json byte-level BPE tokenizer (the Qwen2/Qwen3/Qwen3.5 kind), exact against
// the `tokenizers` library:
//
//   text --added tokens matched whole--> segments --normalizer (NFC)--> --Split(regex, isolated)-->
//        pieces --ByteLevel (bytes as GPT-2's printable alphabet)--> --BPE (merge ranks)--> ids
//
// The split regex is read from the file and run by PCRE2 (UTF + UCP, JIT). BPE runs on raw bytes:
// the vocabulary is translated from the byte-level alphabet once at load, so encoding never builds
// the byte-level string. BPE results are cached per pre-token piece.
//
// Supported components (anything else is an Error naming the file and the field):
//   model BPE (merges "a b" or ["a","b"], rank = index; ignore_merges; no unk/dropout/byte_fallback),
//   normalizer null | NFC, pre_tokenizer Sequence[Split(Regex, Isolated), ByteLevel] | ByteLevel,
//   decoder ByteLevel, post_processor null | ByteLevel, added_tokens with special / normalized /
//   lstrip / rstrip / single_word.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace q35 {

class Tokenizer {
 public:
  // Throws Error naming the file (and the JSON field) when it is missing, malformed or unsupported.
  static Tokenizer from_file(const std::filesystem::path& tokenizer_json);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Added tokens are matched as whole strings first; no BOS/EOS is added. `text` must be valid
  // UTF-8 (Error otherwise). Safe to call from several threads (they share the BPE cache).
  std::vector<int32_t> encode(std::string_view text) const;
  // Concatenated token bytes, invalid UTF-8 replaced by U+FFFD per maximal subpart (as HF's
  // decode and Python's errors="replace"). Error on an id outside the vocabulary.
  std::string decode(std::span<const int32_t> ids) const;
  // Id of a vocabulary token (as written in the file, e.g. "Ġhello") or of an added token.
  std::optional<int32_t> token_id(std::string_view token) const;
  int32_t num_ids() const;  // max id + 1

  // The bytes `id` decodes to (possibly part of a UTF-8 character); Error if id is not assigned.
  std::string_view token_bytes(int32_t id) const;
  // An added token flagged "special" (what decode(skip_special_tokens=True) drops in HF).
  bool is_special(int32_t id) const;
  const std::filesystem::path& path() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Incremental decode for streaming generation: push() returns only complete UTF-8 characters, so
// the concatenation of everything returned (push... then flush) equals Tokenizer::decode of all ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok);
  std::string push(int32_t id);  // the newly complete text (may be empty)
  std::string flush();           // whatever remains; an unfinished character becomes U+FFFD

 private:
  const Tokenizer* tok_;
  std::string pending_;  // the start of a UTF-8 character that later bytes may complete (<= 3 bytes)
};

// Appends the UTF-8 decoding of `bytes` to `out`, each maximal invalid subpart replaced by U+FFFD.
// With final=false a trailing incomplete (but so far valid) character is left unconsumed. Returns the
// number of bytes consumed.
size_t utf8_decode_lossy(std::string_view bytes, bool final, std::string& out);

}  // namespace q35
