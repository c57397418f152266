#include "runtime/text/tokenizer.h"

#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <utility>

#include "runtime/core/error.h"
#include "runtime/core/mapped_file.h"

namespace q35 {
namespace {

using json = nlohmann::json;

// ByteLevel's pre-tokenizer regex when use_regex=true (GPT-2's).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr size_t kCacheMaxWordBytes = 256;  // longer pieces are not cached (as HF's BPE cache)

// ---------------------------------------------------------------- UTF-8 helpers

// Decodes the code point at s[i] of valid UTF-8 and advances i.
char32_t next_code_point(std::string_view s, size_t& i) {
  auto b = [&](size_t k) { return char32_t(uint8_t(s[i + k])); };
  char32_t c = b(0);
  if (c < 0x80) { i += 1; return c; }
  if (c < 0xE0) { c = ((c & 0x1F) << 6) | (b(1) & 0x3F); i += 2; return c; }
  if (c < 0xF0) { c = ((c & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F); i += 3; return c; }
  c = ((c & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  i += 4;
  return c;
}

// The code point that ends at s[end) of valid UTF-8, and its start.
char32_t prev_code_point(std::string_view s, size_t end, size_t& start) {
  start = end - 1;
  while (start > 0 && (uint8_t(s[start]) & 0xC0) == 0x80) --start;
  size_t i = start;
  return next_code_point(s, i);
}

// The bytes of a valid UTF-8 sequence starting with lead byte c: its length and the allowed range of
// its second byte (Unicode Table 3-7). Length 0 for a byte that cannot start a character.
struct Utf8Lead {
  int length;
  uint8_t lo, hi;
};
Utf8Lead utf8_lead(uint8_t c) {
  if (c < 0x80) return {1, 0, 0};
  if (c >= 0xC2 && c <= 0xDF) return {2, 0x80, 0xBF};
  if (c == 0xE0) return {3, 0xA0, 0xBF};
  if (c == 0xED) return {3, 0x80, 0x9F};
  if (c >= 0xE1 && c <= 0xEF) return {3, 0x80, 0xBF};
  if (c == 0xF0) return {4, 0x90, 0xBF};
  if (c >= 0xF1 && c <= 0xF3) return {4, 0x80, 0xBF};
  if (c == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

// Offset of the first byte that is not part of valid UTF-8, or npos.
size_t invalid_utf8_offset(std::string_view s) {
  size_t i = 0, n = s.size();
  while (i < n) {
    if (uint8_t(s[i]) < 0x80) {
      ++i;
      continue;
    }
    Utf8Lead lead = utf8_lead(uint8_t(s[i]));
    if (lead.length == 0 || i + size_t(lead.length) > n) return i;
    uint8_t b1 = uint8_t(s[i + 1]);
    if (b1 < lead.lo || b1 > lead.hi) return i;
    for (int k = 2; k < lead.length; ++k)
      if ((uint8_t(s[i + k]) & 0xC0) != 0x80) return i;
    i += size_t(lead.length);
  }
  return std::string_view::npos;
}

// Rust's char::is_whitespace (the Unicode White_Space property): what HF's lstrip/rstrip remove.
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Regex \w as HF's single_word check uses it: letters, marks, numbers, connector punctuation.
bool is_word_char(char32_t c) {
  switch (utf8proc_category(utf8proc_int32_t(c))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO: case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

// True when NFC leaves the code point alone and it cannot combine with a neighbour: a starter
// (combining class 0) without a canonical decomposition that is never the second half of a
// composition (utf8proc marks those with comb_index >= 0x8000). Hangul jamo compose algorithmically.
bool nfc_inert(char32_t c) {
  if (c >= 0x1100 && c <= 0x11FF) return false;
  const utf8proc_property_t* p = utf8proc_get_property(utf8proc_int32_t(c));
  bool canonical_decomposition = p->decomp_seqindex != UINT16_MAX && p->decomp_type == 0;
  bool composition_second = p->comb_index != UINT16_MAX && p->comb_index >= 0x8000;
  return p->combining_class == 0 && !canonical_decomposition && !composition_second;
}

// Steps over the character at s[i] of valid UTF-8; true when NFC cannot change it or join it with
// what comes before (a character below U+0300, which all are such starters, or an inert one).
bool step_stable_starter(std::string_view s, size_t& i) {
  uint8_t lead = uint8_t(s[i]);
  if (lead < 0x80) {
    i += 1;
    return true;
  }
  if (lead < 0xCC) {  // two-byte character below U+0300
    i += 2;
    return true;
  }
  return nfc_inert(next_code_point(s, i));
}

// NFC of valid UTF-8. Normalization only reaches from one stable starter to the next, so only the
// spans around characters that are not stable starters go through utf8proc. Returns `s` itself
// when nothing changes, else the normalized text in `storage`.
std::string_view nfc(std::string_view s, std::string& storage) {
  size_t emitted = 0, boundary = 0, i = 0;  // s[0, emitted) is in storage; a stable starter begins at boundary
  bool changed = false;
  while (i < s.size()) {
    size_t at = i;
    if (step_stable_starter(s, i)) {
      boundary = at;
      continue;
    }
    size_t end = i;  // the span to normalize runs from the last stable starter to the next one
    while (end < s.size()) {
      size_t next = end;
      if (step_stable_starter(s, next)) break;
      end = next;
    }
    if (!changed) storage.clear();
    changed = true;
    storage.append(s.substr(emitted, boundary - emitted));
    utf8proc_uint8_t* out = nullptr;
    utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + boundary),
                                      utf8proc_ssize_t(end - boundary), &out,
                                      utf8proc_option_t(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (n < 0) fail("NFC normalization failed: {}", utf8proc_errmsg(n));
    storage.append(reinterpret_cast<const char*>(out), size_t(n));
    std::free(out);
    emitted = boundary = i = end;
  }
  if (!changed) return s;
  storage.append(s.substr(emitted));
  return storage;
}

// ---------------------------------------------------------------- GPT-2 byte-level alphabet

// Byte b is written as the code point byte_to_cp[b]: printable Latin-1 bytes as themselves, the other
// 68 bytes as U+0100.. in byte order. All code points are below U+0144.
struct ByteLevelAlphabet {
  std::array<char32_t, 256> byte_to_cp{};
  std::array<int16_t, 0x144> cp_to_byte{};

  ByteLevelAlphabet() {
    cp_to_byte.fill(-1);
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_cp[size_t(b)] = printable ? char32_t(b) : next++;
      cp_to_byte[byte_to_cp[size_t(b)]] = int16_t(b);
    }
  }

  // The bytes a byte-level string stands for; nullopt if it has a character outside the alphabet.
  std::optional<std::string> decode(std::string_view token) const {
    std::string bytes;
    bytes.reserve(token.size());
    for (size_t i = 0; i < token.size();) {
      char32_t c = next_code_point(token, i);
      if (c >= cp_to_byte.size() || cp_to_byte[c] < 0) return std::nullopt;
      bytes += char(cp_to_byte[c]);
    }
    return bytes;
  }
};

// ---------------------------------------------------------------- PCRE2 regex

class Regex {
 public:
  // `where` names the pattern's origin (file and field) for error messages.
  Regex(const std::string& pattern, std::string where) : where_(std::move(where)) {
    int err = 0;
    PCRE2_SIZE err_offset = 0;
    code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                              &err, &err_offset, nullptr));
    if (!code_) fail("{}: cannot compile the regex at offset {}: {}", where_, err_offset, message(err));
    jit_ = pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE) == 0;
    match_data_.reset(pcre2_match_data_create_from_pattern(code_.get(), nullptr));
    context_.reset(pcre2_match_context_create(nullptr));
    // Long whitespace runs backtrack through \s+(?!\S); the default 32 KiB JIT stack is too small.
    stack_.reset(pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr));
    if (!match_data_ || !context_ || !stack_) fail("{}: out of memory for the regex matcher", where_);
    pcre2_jit_stack_assign(context_.get(), nullptr, stack_.get());
  }

  // HF Split(behavior=Isolated): every match and every gap between matches is a piece. Calls
  // piece(std::string_view) for each non-empty piece in order. Not reentrant (one match buffer).
  template <typename F>
  void split(std::string_view s, F&& piece) const {
    auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t gap = 0, at = 0;
    while (at < s.size()) {
      int rc = jit_ ? pcre2_jit_match(code_.get(), subject, s.size(), at, 0, match_data_.get(), context_.get())
                    : pcre2_match(code_.get(), subject, s.size(), at, PCRE2_NO_UTF_CHECK, match_data_.get(),
                                  context_.get());
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) fail("{}: matching a {}-byte text failed: {}", where_, s.size(), message(rc));
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match_data_.get());
      size_t begin = ov[0], end = ov[1];
      if (end == begin) {  // an empty match splits nothing: step over one character
        at = begin + size_t(std::max(1, utf8_lead(uint8_t(s[begin])).length));
        continue;
      }
      if (begin > gap) piece(s.substr(gap, begin - gap));
      piece(s.substr(begin, end - begin));
      gap = at = end;
    }
    if (gap < s.size()) piece(s.substr(gap));
  }

 private:
  static std::string message(int code) {
    PCRE2_UCHAR buf[256];
    int n = pcre2_get_error_message(code, buf, sizeof buf);
    return n < 0 ? fmt::format("PCRE2 error {}", code) : std::string(reinterpret_cast<const char*>(buf), size_t(n));
  }
  template <typename T, void (*Free)(T*)>
  struct Deleter {
    void operator()(T* p) const { Free(p); }
  };

  std::string where_;
  std::unique_ptr<pcre2_code, Deleter<pcre2_code, pcre2_code_free>> code_;
  std::unique_ptr<pcre2_match_data, Deleter<pcre2_match_data, pcre2_match_data_free>> match_data_;
  std::unique_ptr<pcre2_match_context, Deleter<pcre2_match_context, pcre2_match_context_free>> context_;
  std::unique_ptr<pcre2_jit_stack, Deleter<pcre2_jit_stack, pcre2_jit_stack_free>> stack_;
  bool jit_ = false;
};

// ---------------------------------------------------------------- merge table

// (left id, right id) -> (rank, merged id): open addressing, power-of-two capacity, load <= 1/2.
class MergeTable {
 public:
  struct Entry {
    uint64_t key = kEmpty;
    int32_t rank = 0;
    int32_t id = 0;
  };

  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    slots_.assign(cap, Entry{});
    shift_ = 64 - std::countr_zero(cap);
  }
  // A later duplicate pair replaces the earlier one (HF collects the merges into a HashMap).
  void insert_or_assign(int32_t left, int32_t right, int32_t rank, int32_t id) {
    uint64_t key = pack(left, right);
    for (size_t i = slot(key);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].key == kEmpty || slots_[i].key == key) {
        slots_[i] = {key, rank, id};
        return;
      }
    }
  }
  const Entry* find(int32_t left, int32_t right) const {
    uint64_t key = pack(left, right);
    for (size_t i = slot(key);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].key == key) return &slots_[i];
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  static uint64_t pack(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  size_t slot(uint64_t key) const { return size_t((key * 0x9E3779B97F4A7C15ull) >> shift_); }

  std::vector<Entry> slots_;
  int shift_ = 60;
};

// ---------------------------------------------------------------- BPE cache

// BPE result per pre-token piece: raw bytes -> ids. Open addressing over (hash, key, ids) with the
// keys and ids in two arenas; grows to kMaxSlots, then starts over empty.
class WordCache {
 public:
  static uint64_t hash(std::string_view s) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ s.size();
    size_t i = 0;
    for (; i + 8 <= s.size(); i += 8) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
      h ^= h >> 31;
    }
    uint64_t tail = 0;
    std::memcpy(&tail, s.data() + i, s.size() - i);
    h = (h ^ tail) * 0x94D049BB133111EBull;
    h ^= h >> 29;
    return h | 1;  // 0 marks an empty slot
  }

  std::optional<std::span<const int32_t>> find(std::string_view word, uint64_t h) const {
    if (slots_.empty()) return std::nullopt;
    for (size_t i = h & (slots_.size() - 1);; i = (i + 1) & (slots_.size() - 1)) {
      const Slot& s = slots_[i];
      if (s.hash == 0) return std::nullopt;
      if (s.hash == h && std::string_view(keys_).substr(s.key_offset, s.key_length) == word)
        return std::span<const int32_t>(ids_.data() + s.ids_offset, s.ids_length);
    }
  }

  void insert(std::string_view word, uint64_t h, std::span<const int32_t> ids) {
    if (2 * (count_ + 1) > slots_.size()) {
      if (slots_.size() >= kMaxSlots) {
        slots_.assign(kMaxSlots, Slot{});
        keys_.clear();
        ids_.clear();
        count_ = 0;
      } else {
        grow();
      }
    }
    place({h, uint32_t(keys_.size()), uint32_t(word.size()), uint32_t(ids_.size()), uint32_t(ids.size())});
    keys_ += word;
    ids_.insert(ids_.end(), ids.begin(), ids.end());
    ++count_;
  }

 private:
  static constexpr size_t kMaxSlots = size_t(1) << 20;
  struct Slot {
    uint64_t hash = 0;
    uint32_t key_offset = 0, key_length = 0, ids_offset = 0, ids_length = 0;
  };

  void place(const Slot& slot) {
    size_t i = slot.hash & (slots_.size() - 1);
    while (slots_[i].hash != 0) i = (i + 1) & (slots_.size() - 1);
    slots_[i] = slot;
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(std::max<size_t>(4096, 2 * old.size()), Slot{});
    for (const Slot& s : old)
      if (s.hash != 0) place(s);
  }

  std::vector<Slot> slots_;  // power-of-two size, at most half full
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t count_ = 0;
};

// ---------------------------------------------------------------- JSON access with file/field errors

struct JsonReader {
  std::string file;

  std::string describe(const json& v) const {
    std::string s = v.dump();
    return s.size() > 80 ? s.substr(0, 77) + "..." : s;
  }
  const json* find(const json& obj, const char* key) const {
    auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
  }
  const json& object(const json& v, const std::string& field) const {
    if (!v.is_object()) fail("{}: {}: expected an object, found {}", file, field, describe(v));
    return v;
  }
  const json& require(const json& obj, const char* key, const std::string& field) const {
    const json* v = find(obj, key);
    if (!v) fail("{}: {}.{}: missing", file, field, key);
    return *v;
  }
  std::string string(const json& obj, const char* key, const std::string& field) const {
    const json& v = require(obj, key, field);
    if (!v.is_string()) fail("{}: {}.{}: expected a string, found {}", file, field, key, describe(v));
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const char* key, const std::string& field, bool fallback) const {
    const json* v = find(obj, key);
    if (!v || v->is_null()) return fallback;
    if (!v->is_boolean()) fail("{}: {}.{}: expected true or false, found {}", file, field, key, describe(*v));
    return v->get<bool>();
  }
  int32_t id(const json& v, const std::string& field) const {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= int64_t(INT32_MAX))
      fail("{}: {}: expected a token id (an integer >= 0), found {}", file, field, describe(v));
    return int32_t(v.get<int64_t>());
  }
  std::string type(const json& obj, const std::string& field) const {
    return string(object(obj, field), "type", field);
  }
  void unsupported(const std::string& field, const std::string& found, const char* expected) const {
    fail("{}: {}: unsupported {}; expected {}", file, field, found, expected);
  }
};

struct AddedToken {
  std::string content;  // as matched (NFC-normalized when `normalized` and the normalizer is NFC)
  int32_t id = 0;
  bool special = false, normalized = true, lstrip = false, rstrip = false, single_word = false;
};

// Leftmost-longest matching of a set of added tokens (HF: aho-corasick, MatchKind::LeftmostLongest).
struct AddedMatcher {
  std::array<std::vector<const AddedToken*>, 256> by_first_byte;  // longest first

  bool empty() const {
    return std::all_of(by_first_byte.begin(), by_first_byte.end(), [](const auto& v) { return v.empty(); });
  }
};

// A piece of the input: text [begin, end) to tokenize, or an added token id covering it.
struct Segment {
  size_t begin, end;
  int32_t id;  // -1 for text
};

}  // namespace

// ---------------------------------------------------------------- Tokenizer::Impl

struct Tokenizer::Impl {
  std::filesystem::path path;
  ByteLevelAlphabet alphabet;

  // Vocabulary (BPE tokens and added tokens)
  std::vector<std::string> id_bytes;  // [num_ids] what each id decodes to
  std::vector<uint8_t> id_kind;       // [num_ids] kUnassigned / kVocab / kAdded / kSpecial
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  template <typename V>
  using StringMap = std::unordered_map<std::string, V, Hash, std::equal_to<>>;
  StringMap<int32_t> token_ids;    // token as written in the file -> id
  StringMap<int32_t> bytes_vocab;  // raw bytes -> id (for ignore_merges)
  std::array<int32_t, 256> byte_ids{};                   // id of each single byte, -1 if absent
  MergeTable merges;
  bool ignore_merges = false;

  // Normalizer and pre-tokenizer
  bool nfc_normalize = false;
  std::vector<std::unique_ptr<Regex>> splits;  // Split(Regex, Isolated) steps, in order
  bool add_prefix_space = false;
  std::unique_ptr<Regex> byte_level_regex;  // ByteLevel(use_regex=true)

  // Added tokens: matched on the raw text (normalized=false) or on normalized text (normalized=true)
  std::vector<AddedToken> added;
  AddedMatcher raw_matcher, normalized_matcher;

  // Guarded by mutex, which encode() holds throughout (the regex match buffers are shared too).
  mutable std::mutex mutex;
  mutable WordCache cache;

  static constexpr uint8_t kUnassigned = 0, kVocab = 1, kAdded = 2, kSpecial = 3;

  void load(const json& root);
  void load_model(const JsonReader& r, const json& model);
  void load_pre_tokenizer(const JsonReader& r, const json& pre);
  void load_added_tokens(const JsonReader& r, const json& list);
  void assign(int32_t id, std::string bytes, uint8_t kind);

  void split_added(std::string_view text, const AddedMatcher& m, std::vector<Segment>& out) const;
  void encode_normalized(std::string_view text, std::vector<int32_t>& ids) const;
  void pre_tokenize(std::string_view text, size_t step, std::vector<int32_t>& ids) const;
  void byte_level(std::string_view piece, std::vector<int32_t>& ids) const;
  void bpe(std::string_view word, std::vector<int32_t>& ids) const;
  void bpe_merge(std::string_view word, std::vector<int32_t>& ids) const;
};

void Tokenizer::Impl::assign(int32_t id, std::string bytes, uint8_t kind) {
  if (size_t(id) >= id_bytes.size()) {
    id_bytes.resize(size_t(id) + 1);
    id_kind.resize(size_t(id) + 1, kUnassigned);
  }
  id_bytes[size_t(id)] = std::move(bytes);
  id_kind[size_t(id)] = kind;
}

void Tokenizer::Impl::load(const json& root) {
  JsonReader r{path.string()};
  r.object(root, "top level");
  for (const char* key : {"truncation", "padding"}) {
    const json* v = r.find(root, key);
    if (v && !v->is_null()) r.unsupported(key, r.describe(*v), "null (encode never truncates or pads)");
  }

  const json* normalizer = r.find(root, "normalizer");
  if (normalizer && !normalizer->is_null()) {
    std::string type = r.type(*normalizer, "normalizer");
    if (type != "NFC") r.unsupported("normalizer.type", '"' + type + '"', "\"NFC\" or a null normalizer");
    nfc_normalize = true;
  }
  load_pre_tokenizer(r, r.require(root, "pre_tokenizer", "top level"));
  load_model(r, r.object(r.require(root, "model", "top level"), "model"));

  std::string decoder = r.type(r.require(root, "decoder", "top level"), "decoder");
  if (decoder != "ByteLevel") r.unsupported("decoder.type", '"' + decoder + '"', "\"ByteLevel\"");
  const json* post = r.find(root, "post_processor");
  if (post && !post->is_null()) {
    std::string type = r.type(*post, "post_processor");
    if (type != "ByteLevel")
      r.unsupported("post_processor.type", '"' + type + '"', "\"ByteLevel\" or null (nothing that adds tokens)");
  }
  const json* list = r.find(root, "added_tokens");
  if (list && !list->is_null()) load_added_tokens(r, *list);
}

void Tokenizer::Impl::load_pre_tokenizer(const JsonReader& r, const json& pre) {
  // Accepted: ByteLevel, or Sequence[Split(Regex, Isolated)..., ByteLevel].
  std::vector<const json*> steps;
  std::string type = r.type(pre, "pre_tokenizer");
  if (type == "Sequence") {
    const json& list = r.require(pre, "pretokenizers", "pre_tokenizer");
    if (!list.is_array() || list.empty())
      r.unsupported("pre_tokenizer.pretokenizers", r.describe(list), "a non-empty list");
    for (const json& s : list) steps.push_back(&s);
  } else {
    steps.push_back(&pre);
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    std::string field = type == "Sequence" ? fmt::format("pre_tokenizer.pretokenizers[{}]", i) : "pre_tokenizer";
    const json& step = *steps[i];
    std::string step_type = r.type(step, field);
    bool last = i + 1 == steps.size();
    if (step_type == "Split" && !last) {
      const json& pattern = r.object(r.require(step, "pattern", field), field + ".pattern");
      const json* regex = r.find(pattern, "Regex");
      if (!regex || !regex->is_string())
        r.unsupported(field + ".pattern", r.describe(pattern), "{\"Regex\": \"...\"}");
      std::string behavior = r.string(step, "behavior", field);
      if (behavior != "Isolated") r.unsupported(field + ".behavior", '"' + behavior + '"', "\"Isolated\"");
      if (r.boolean(step, "invert", field, false)) r.unsupported(field + ".invert", "true", "false");
      splits.push_back(std::make_unique<Regex>(regex->get<std::string>(), r.file + ": " + field + ".pattern.Regex"));
    } else if (step_type == "ByteLevel" && last) {
      add_prefix_space = r.boolean(step, "add_prefix_space", field, true);
      if (r.boolean(step, "use_regex", field, true))
        byte_level_regex = std::make_unique<Regex>(kGpt2Pattern, r.file + ": " + field + " (GPT-2 regex)");
    } else {
      r.unsupported(field + ".type", '"' + step_type + '"',
                    last ? "\"ByteLevel\" as the last pre-tokenizer" : "\"Split\" before the final \"ByteLevel\"");
    }
  }
}

void Tokenizer::Impl::load_model(const JsonReader& r, const json& model) {
  std::string type = r.type(model, "model");
  if (type != "BPE") r.unsupported("model.type", '"' + type + '"', "\"BPE\"");
  for (const char* key : {"dropout", "unk_token"}) {
    const json* v = r.find(model, key);
    if (v && !v->is_null()) r.unsupported(fmt::format("model.{}", key), r.describe(*v), "null");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json* v = r.find(model, key);
    if (v && !v->is_null() && !(v->is_string() && v->get<std::string>().empty()))
      r.unsupported(fmt::format("model.{}", key), r.describe(*v), "null or \"\"");
  }
  if (r.boolean(model, "byte_fallback", "model", false)) r.unsupported("model.byte_fallback", "true", "false");
  ignore_merges = r.boolean(model, "ignore_merges", "model", false);

  const json& vocab = r.object(r.require(model, "vocab", "model"), "model.vocab");
  token_ids.reserve(vocab.size() + 64);
  if (ignore_merges) bytes_vocab.reserve(vocab.size());
  byte_ids.fill(-1);
  for (const auto& [token, value] : vocab.items()) {
    int32_t id = r.id(value, "model.vocab[\"" + token + "\"]");
    token_ids.emplace(token, id);
    // HF's ByteLevel decoder: a token made only of alphabet characters decodes to its bytes,
    // any other token to its own UTF-8 text.
    std::optional<std::string> bytes = alphabet.decode(token);
    if (bytes) {
      if (bytes->size() == 1) byte_ids[uint8_t((*bytes)[0])] = id;
      if (ignore_merges) bytes_vocab.emplace(*bytes, id);
    }
    assign(id, bytes ? std::move(*bytes) : token, kVocab);
  }

  const json& list = r.require(model, "merges", "model");
  if (!list.is_array()) r.unsupported("model.merges", r.describe(list), "a list");
  merges.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const json& m = list[i];
    std::string field = fmt::format("model.merges[{}]", i);
    std::string left, right;
    if (m.is_string()) {  // "a b"
      const std::string& s = m.get_ref<const std::string&>();
      size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
        fail("{}: {}: expected \"left right\" with one space, found {}", r.file, field, r.describe(m));
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {  // ["a", "b"]
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      fail("{}: {}: expected \"left right\" or [\"left\", \"right\"], found {}", r.file, field, r.describe(m));
    }
    auto l = token_ids.find(left), rt = token_ids.find(right), merged = token_ids.find(left + right);
    if (l == token_ids.end() || rt == token_ids.end() || merged == token_ids.end())
      fail("{}: {}: \"{}\" is not in model.vocab", r.file, field,
           l == token_ids.end() ? left : rt == token_ids.end() ? right : left + right);
    merges.insert_or_assign(l->second, rt->second, int32_t(i), merged->second);
  }
}

void Tokenizer::Impl::load_added_tokens(const JsonReader& r, const json& list) {
  if (!list.is_array()) r.unsupported("added_tokens", r.describe(list), "a list");
  added.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    std::string field = fmt::format("added_tokens[{}]", i);
    const json& t = r.object(list[i], field);
    AddedToken a;
    a.id = r.id(r.require(t, "id", field), field + ".id");
    a.content = r.string(t, "content", field);
    if (a.content.empty()) fail("{}: {}.content: expected a non-empty string", r.file, field);
    a.special = r.boolean(t, "special", field, false);
    a.normalized = r.boolean(t, "normalized", field, true);
    a.lstrip = r.boolean(t, "lstrip", field, false);
    a.rstrip = r.boolean(t, "rstrip", field, false);
    a.single_word = r.boolean(t, "single_word", field, false);
    std::optional<std::string> bytes = alphabet.decode(a.content);
    assign(a.id, bytes ? std::move(*bytes) : a.content, a.special ? kSpecial : kAdded);
    token_ids[a.content] = a.id;
    if (a.normalized && nfc_normalize) {
      std::string storage;
      a.content = std::string(nfc(a.content, storage));
    }
    added.push_back(std::move(a));
  }
  for (const AddedToken& a : added) {
    AddedMatcher& m = a.normalized ? normalized_matcher : raw_matcher;
    m.by_first_byte[uint8_t(a.content[0])].push_back(&a);
  }
  for (AddedMatcher* m : {&raw_matcher, &normalized_matcher})
    for (auto& v : m->by_first_byte)
      std::stable_sort(v.begin(), v.end(), [](const AddedToken* a, const AddedToken* b) {
        return a->content.size() > b->content.size();
      });
}

// HF AddedVocabulary::find_matches: leftmost-longest, non-overlapping; single_word rejects a match
// inside a word; lstrip/rstrip widen it over neighbouring whitespace.
void Tokenizer::Impl::split_added(std::string_view text, const AddedMatcher& m, std::vector<Segment>& out) const {
  size_t text_begin = 0, i = 0, n = text.size();
  while (i < n) {
    const auto& candidates = m.by_first_byte[uint8_t(text[i])];
    const AddedToken* hit = nullptr;
    for (const AddedToken* a : candidates)
      if (text.substr(i, a->content.size()) == a->content) {
        hit = a;
        break;
      }
    if (!hit) {
      ++i;
      continue;
    }
    size_t begin = i, end = i + hit->content.size();
    i = end;
    if (hit->single_word) {
      size_t start = 0, after = end;
      bool word_before = begin > 0 && is_word_char(prev_code_point(text, begin, start));
      bool word_after = end < n && is_word_char(next_code_point(text, after));
      if (word_before || word_after) continue;
    }
    if (hit->lstrip) {
      size_t start = 0;
      while (begin > text_begin && is_white_space(prev_code_point(text, begin, start))) begin = start;
    }
    if (hit->rstrip) {
      for (size_t next = end; end < n && is_white_space(next_code_point(text, next)); next = end) end = next;
      i = end;
    }
    if (begin > text_begin) out.push_back({text_begin, begin, -1});
    out.push_back({begin, end, hit->id});
    text_begin = end;
  }
  if (text_begin < n) out.push_back({text_begin, n, -1});
}

// A text segment after normalization: normalized added tokens, then the pre-tokenizer and BPE.
void Tokenizer::Impl::encode_normalized(std::string_view text, std::vector<int32_t>& ids) const {
  if (normalized_matcher.empty()) return pre_tokenize(text, 0, ids);
  std::vector<Segment> segments;
  split_added(text, normalized_matcher, segments);
  for (const Segment& s : segments) {
    if (s.id >= 0)
      ids.push_back(s.id);
    else
      pre_tokenize(text.substr(s.begin, s.end - s.begin), 0, ids);
  }
}

void Tokenizer::Impl::pre_tokenize(std::string_view text, size_t step, std::vector<int32_t>& ids) const {
  if (step == splits.size()) return byte_level(text, ids);
  splits[step]->split(text, [&](std::string_view piece) { pre_tokenize(piece, step + 1, ids); });
}

void Tokenizer::Impl::byte_level(std::string_view piece, std::vector<int32_t>& ids) const {
  std::string prefixed;
  if (add_prefix_space && piece.front() != ' ') {
    prefixed.reserve(piece.size() + 1);
    prefixed += ' ';
    prefixed += piece;
    piece = prefixed;
  }
  if (byte_level_regex)
    byte_level_regex->split(piece, [&](std::string_view word) { bpe(word, ids); });
  else
    bpe(piece, ids);
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& ids) const {
  if (ignore_merges) {
    auto it = bytes_vocab.find(word);
    if (it != bytes_vocab.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  if (word.size() == 1) {  // nothing to merge
    if (int32_t id = byte_ids[uint8_t(word[0])]; id >= 0) ids.push_back(id);
    return;
  }
  if (word.size() > kCacheMaxWordBytes) return bpe_merge(word, ids);
  uint64_t h = WordCache::hash(word);
  if (auto hit = cache.find(word, h)) {
    ids.insert(ids.end(), hit->begin(), hit->end());
    return;
  }
  size_t first = ids.size();
  bpe_merge(word, ids);
  cache.insert(word, h, std::span<const int32_t>(ids).subspan(first));
}

// HF BPE Word::merge_all: repeatedly merge the pair with the lowest rank (leftmost on ties), with
// stale queue entries skipped when the pair now at their position merges to another id.
void Tokenizer::Impl::bpe_merge(std::string_view word, std::vector<int32_t>& ids) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // -1 at the ends
    bool removed;
  };
  struct Candidate {
    int32_t rank, pos, id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Symbol> sym;  // [bytes present in the vocabulary]
  sym.reserve(word.size());
  for (char c : word) {
    int32_t id = byte_ids[uint8_t(c)];
    if (id < 0) continue;  // HF drops characters missing from the vocabulary when there is no unk_token
    int32_t k = int32_t(sym.size());
    sym.push_back({id, k - 1, k + 1, false});
  }
  if (sym.empty()) return;
  sym.back().next = -1;

  std::vector<Candidate> heap;  // min-heap on (rank, pos)
  heap.reserve(sym.size());
  auto push = [&](int32_t pos) {
    const Symbol& s = sym[size_t(pos)];
    if (s.next < 0) return;
    if (const MergeTable::Entry* e = merges.find(s.id, sym[size_t(s.next)].id)) {
      heap.push_back({e->rank, pos, e->id});
      std::push_heap(heap.begin(), heap.end(), std::greater<>{});
    }
  };
  for (int32_t pos = 0; pos + 1 < int32_t(sym.size()); ++pos) push(pos);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
    Candidate top = heap.back();
    heap.pop_back();
    Symbol& s = sym[size_t(top.pos)];
    if (s.removed || s.next < 0) continue;
    Symbol& right = sym[size_t(s.next)];
    const MergeTable::Entry* e = merges.find(s.id, right.id);
    if (!e || e->id != top.id) continue;  // stale entry
    s.id = top.id;
    right.removed = true;
    s.next = right.next;
    if (s.next >= 0) sym[size_t(s.next)].prev = top.pos;
    if (s.prev >= 0) push(s.prev);
    push(top.pos);
  }
  for (const Symbol& s : sym)
    if (!s.removed) ids.push_back(s.id);
}

// ---------------------------------------------------------------- Tokenizer

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::filesystem::path& tokenizer_json) {
  auto impl = std::make_unique<Impl>();
  impl->path = tokenizer_json;
  MappedFile file(tokenizer_json);
  auto bytes = file.bytes();
  json root;
  try {
    root = json::parse(bytes.begin(), bytes.end());
  } catch (const json::parse_error& e) {
    fail("{}: not valid JSON: {}", tokenizer_json.string(), e.what());
  }
  impl->load(root);
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  const Impl& m = *impl_;
  if (size_t bad = invalid_utf8_offset(text); bad != std::string_view::npos)
    fail("encode: text is not valid UTF-8 at byte {} (0x{:02x}) of {}", bad, uint8_t(text[bad]), text.size());
  std::lock_guard lock(m.mutex);
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  std::vector<Segment> segments;
  m.split_added(text, m.raw_matcher, segments);
  std::string storage;
  for (const Segment& s : segments) {
    std::string_view part = text.substr(s.begin, s.end - s.begin);
    if (s.id >= 0)
      ids.push_back(s.id);
    else
      m.encode_normalized(m.nfc_normalize ? nfc(part, storage) : part, ids);
  }
  return ids;
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->id_bytes.size() || impl_->id_kind[size_t(id)] == Impl::kUnassigned)
    fail("token id {} is not in the vocabulary of {} ({} ids)", id, impl_->path.string(), num_ids());
  return impl_->id_bytes[size_t(id)];
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string bytes;
  for (int32_t id : ids) bytes += token_bytes(id);
  std::string text;
  text.reserve(bytes.size());
  utf8_decode_lossy(bytes, true, text);
  return text;
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  auto it = impl_->token_ids.find(token);
  if (it == impl_->token_ids.end()) return std::nullopt;
  return it->second;
}

int32_t Tokenizer::num_ids() const { return int32_t(impl_->id_bytes.size()); }

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->id_kind.size() && impl_->id_kind[size_t(id)] == Impl::kSpecial;
}

const std::filesystem::path& Tokenizer::path() const { return impl_->path; }

// ---------------------------------------------------------------- UTF-8 decoding

size_t utf8_decode_lossy(std::string_view s, bool final, std::string& out) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  size_t i = 0, run = 0, n = s.size();  // [run, i) is valid text not yet appended
  while (i < n) {
    uint8_t c = uint8_t(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    Utf8Lead lead = utf8_lead(c);
    size_t j = i + 1;
    bool bad = lead.length == 0;
    for (int k = 1; !bad && k < lead.length && j < n; ++k, ++j) {
      uint8_t b = uint8_t(s[j]);
      bad = k == 1 ? (b < lead.lo || b > lead.hi) : (b & 0xC0) != 0x80;
      if (bad) break;
    }
    if (!bad && j - i == size_t(lead.length)) {
      i = j;
      continue;
    }
    out.append(s.substr(run, i - run));
    if (!bad && !final) return i;  // an unfinished character: wait for more bytes
    out += kReplacement;           // the maximal invalid subpart [i, j)
    i = run = j;
  }
  out.append(s.substr(run, i - run));
  return i;
}

StreamDecoder::StreamDecoder(const Tokenizer& tok) : tok_(&tok) {}

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_->token_bytes(id);
  std::string text;
  pending_.erase(0, utf8_decode_lossy(pending_, false, text));
  return text;
}

std::string StreamDecoder::flush() {
  std::string text;
  utf8_decode_lossy(pending_, true, text);
  pending_.clear();
  return text;
}

}  // namespace q35
