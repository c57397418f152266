// Tokenizer tests: ids against Hugging Face `tokenizers` on the real Qwen3.5 vocabulary (goldens from
// tests/python/gen_tokenizer_goldens.py), decode round trips, streaming decode, added-token flags,
// hand-made tokenizer.json files with ids worked out by hand, and load errors.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "runtime/core/error.h"
#include "runtime/text/tokenizer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using q35::StreamDecoder;
using q35::Tokenizer;
using Ids = std::vector<int32_t>;

namespace {

fs::path goldens_dir() {
  const char* env = std::getenv("Q35_GOLDENS_DIR");
  return env && *env ? fs::path(env) : fs::path(Q35_BINARY_DIR) / "goldens";
}

std::string missing_goldens(const fs::path& p) {
  return fmt::format(
      "{} is missing: generate the goldens with\n  pip install -r {}/tests/python/requirements-goldens.txt\n"
      "  python3 {}/tests/python/gen_tokenizer_goldens.py --out {}",
      p.string(), Q35_SOURCE_DIR, Q35_SOURCE_DIR, goldens_dir().string());
}

json read_json(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE_MESSAGE(in.good(), missing_goldens(p));
  return json::parse(in);
}

const json& goldens() {
  static const json g = read_json(goldens_dir() / "tokenizer_goldens.json");
  return g;
}

// Loaded once per process: the real vocabulary takes a moment to parse.
const Tokenizer& qwen35(bool ignore_merges) {
  static std::map<bool, Tokenizer> toks;
  auto it = toks.find(ignore_merges);
  if (it == toks.end()) {
    fs::path p = goldens_dir() / goldens()[ignore_merges ? "tokenizer_ignore_merges" : "tokenizer"].get<std::string>();
    REQUIRE_MESSAGE(fs::exists(p), missing_goldens(p));
    it = toks.emplace(ignore_merges, Tokenizer::from_file(p)).first;
  }
  return it->second;
}

std::string escaped(const std::string& s) {
  std::string e = json(s).dump();
  return e.size() > 200 ? e.substr(0, 197) + "..." : e;
}

// Independent UTF-8 validity check (not the decoder under test).
bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    unsigned char c = s[i];
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n;
  }
  return true;
}

// Compares encode() with HF's ids for every case; reports the first mismatches with their text.
void check_ids(const Tokenizer& tok, const json& cases, const char* key) {
  int mismatches = 0;
  for (const json& c : cases) {
    std::string text = c["text"].get<std::string>();
    Ids want = c[key].get<Ids>();
    Ids got = tok.encode(text);
    if (got != want && ++mismatches <= 5)
      MESSAGE(fmt::format("{}: {}\n  HF:   {}\n  ours: {}", tok.path().filename().string(), escaped(text),
                          fmt::join(want, ","), fmt::join(got, ",")));
  }
  CHECK_MESSAGE(mismatches == 0, mismatches, " of ", cases.size(), " strings tokenize differently from HF");
}

Ids concat(std::initializer_list<Ids> parts) {
  Ids all;
  for (const Ids& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

// A per-process scratch directory, removed at exit.
struct TempDir {
  fs::path path = fs::temp_directory_path() / fmt::format("q35-test-tokenizer-{}", ::getpid());
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

fs::path write_temp(const std::string& name, const std::string& text) {
  static const TempDir dir;
  fs::path p = dir.path / name;
  std::ofstream(p, std::ios::binary) << text;
  return p;
}

// A hand-made byte-level BPE: bytes a b c and space (Ġ), merges a+b (rank 0), ab+c (1), Ġ+a (2), b+c (3),
// the unmergeable token "ca", and one special token.
json tiny_tokenizer() {
  return json::parse(R"({
    "version": "1.0", "truncation": null, "padding": null,
    "added_tokens": [{"id": 9, "content": "<|end|>", "single_word": false, "lstrip": false, "rstrip": false,
                      "normalized": false, "special": true}],
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "\\s+|[^\\s]+"}, "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
    "post_processor": null,
    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
              "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
              "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5, "Ġa": 6, "bc": 7, "ca": 8},
              "merges": ["a b", "ab c", "Ġ a", "b c"]}
  })");
}

Tokenizer load_json(const std::string& name, const json& doc) {
  return Tokenizer::from_file(write_temp(name, doc.dump()));
}

std::string load_error(const std::string& name, const std::string& text) {
  fs::path p = write_temp(name, text);
  try {
    Tokenizer::from_file(p);
  } catch (const q35::Error& e) {
    std::string msg = e.what();
    CHECK_MESSAGE(msg.find(p.string()) != std::string::npos, "error does not name the file: ", msg);
    return msg;
  }
  FAIL("loading ", name, " did not throw");
  return {};
}

}  // namespace

TEST_CASE("Qwen3.5 vocabulary: ids equal HF tokenizers on every golden string") {
  const json& g = goldens();
  REQUIRE(g["cases"].size() >= 2000);
  check_ids(qwen35(false), g["cases"], "ids");
}

TEST_CASE("Qwen3.5 vocabulary with ignore_merges: ids equal HF tokenizers (and tiktoken)") {
  check_ids(qwen35(true), goldens()["cases"], "ids_ignore_merges");
}

TEST_CASE("Qwen3.5 vocabulary: concurrent encode calls give the same ids") {
  const Tokenizer& tok = qwen35(false);
  const json& cases = goldens()["cases"];
  std::vector<int> mismatches(2, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      for (size_t i = size_t(t); i < cases.size(); i += 1 + size_t(t))
        mismatches[size_t(t)] += tok.encode(cases[i]["text"].get<std::string>()) != cases[i]["ids"].get<Ids>();
    });
  for (std::thread& th : threads) th.join();
  CHECK(mismatches == std::vector<int>{0, 0});
}

TEST_CASE("Qwen3.5 vocabulary: size, special tokens and their flags") {
  const Tokenizer& tok = qwen35(false);
  CHECK(tok.num_ids() == goldens()["num_ids"].get<int32_t>());
  CHECK(tok.num_ids() == 248077);
  for (const auto& [content, id] : goldens()["special_tokens"].items()) {
    CHECK_MESSAGE(tok.token_id(content) == id.get<int32_t>(), content);
    CHECK(tok.decode(Ids{id.get<int32_t>()}) == content);
  }
  CHECK(tok.token_id("<|im_end|>") == 248046);
  CHECK(tok.is_special(248046));
  CHECK_FALSE(tok.is_special(248068));  // <think> is an added token that is not special
  CHECK_FALSE(tok.is_special(9419));
  CHECK(tok.token_id("Hello") == 9419);
  CHECK(tok.token_id("Ġworld").has_value());
  CHECK_FALSE(tok.token_id("<|not_a_token|>").has_value());
}

TEST_CASE("Qwen3.5 vocabulary: special tokens inline are matched whole, partial ones are text") {
  const Tokenizer& tok = qwen35(false);
  CHECK(tok.encode("<|im_start|>user\nhi<|im_end|>") == concat({{248045}, tok.encode("user\nhi"), {248046}}));
  CHECK(tok.encode("a<|im_end|>b") == concat({tok.encode("a"), {248046}, tok.encode("b")}));
  CHECK(tok.encode("<think></think>") == Ids{248068, 248069});
  Ids partial = tok.encode("<|im_end");
  CHECK(std::find(partial.begin(), partial.end(), 248046) == partial.end());
  CHECK(tok.decode(partial) == "<|im_end");
  // An added token is not split by NFC across its boundary: U+0301 after ">" stays text.
  CHECK(tok.encode("<|im_end|>\u0301") == concat({{248046}, tok.encode("\u0301")}));
}

TEST_CASE("Qwen3.5 vocabulary: decode(encode(s)) == NFC(s) and HF's decode") {
  const Tokenizer& tok = qwen35(false);
  int failures = 0;
  for (const json& c : goldens()["cases"]) {
    std::string text = c["text"], normalized = c["normalized"], decoded = c["decoded"];
    std::string ours = tok.decode(tok.encode(text));
    std::string ours_from_hf_ids = tok.decode(c["ids"].get<Ids>());
    if ((ours != normalized || ours_from_hf_ids != decoded) && ++failures <= 5)
      MESSAGE(fmt::format("{}: decode gave {} / {}, HF NFC {} decode {}", escaped(text), escaped(ours),
                          escaped(ours_from_hf_ids), escaped(normalized), escaped(decoded)));
  }
  CHECK(failures == 0);
  // NFC composes a decomposed e + U+0301 into U+00E9 before BPE.
  CHECK(tok.encode("e\u0301") == tok.encode("\u00e9"));
  CHECK(tok.encode("\u1112\u1161\u11ab") == tok.encode("\ud55c"));
}

TEST_CASE("Qwen3.5 vocabulary: streaming decode equals full decode and never emits broken UTF-8") {
  const Tokenizer& tok = qwen35(false);
  int failures = 0;
  size_t partial_tokens = 0;  // tokens that end inside a UTF-8 character
  for (const json& c : goldens()["cases"]) {
    Ids ids = c["ids"].get<Ids>();
    StreamDecoder stream(tok);
    std::string streamed;
    bool all_valid = true;
    for (int32_t id : ids) {
      std::string piece = stream.push(id);
      all_valid = all_valid && valid_utf8(piece);
      partial_tokens += !valid_utf8(std::string(tok.token_bytes(id)));
      streamed += piece;
    }
    std::string rest = stream.flush();
    all_valid = all_valid && valid_utf8(rest);
    streamed += rest;
    if ((!all_valid || streamed != tok.decode(ids)) && ++failures <= 5)
      MESSAGE(fmt::format("{}: streamed {} valid={}", escaped(c["text"]), escaped(streamed), all_valid));
  }
  CHECK(failures == 0);
  CHECK(partial_tokens > 100);  // the goldens do exercise characters split across tokens
}

TEST_CASE("StreamDecoder holds back partial characters and replaces invalid bytes like HF") {
  const Tokenizer& tok = qwen35(false);
  // Byte-level tokens for single bytes: "Ã" is byte 0xC3, "©" is 0xA9 (together U+00E9).
  int32_t c3 = *tok.token_id("Ã"), a9 = *tok.token_id("©"), a = *tok.token_id("a");
  {
    StreamDecoder s(tok);
    CHECK(s.push(c3) == "");
    CHECK(s.push(a9) == "\u00e9");
    CHECK(s.flush() == "");
  }
  {
    StreamDecoder s(tok);
    CHECK(s.push(c3) == "");
    CHECK(s.push(a) == "\ufffda");  // 0xC3 cannot be followed by 'a'
  }
  {
    StreamDecoder s(tok);
    CHECK(s.push(a9) == "\ufffd");  // a lone continuation byte is invalid at once
    CHECK(s.push(c3) == "");
    CHECK(s.flush() == "\ufffd");  // unfinished at the end
  }
  CHECK(tok.decode(Ids{c3, a9, c3}) == "\u00e9\ufffd");
  CHECK_THROWS_AS(tok.decode(Ids{248077}), q35::Error);
  CHECK_THROWS_AS(tok.decode(Ids{-1}), q35::Error);
  StreamDecoder s(tok);
  CHECK_THROWS_AS(s.push(300000), q35::Error);
}

TEST_CASE("utf8_decode_lossy: maximal subparts, as Python's errors=\"replace\"") {
  auto lossy = [](std::string_view in, bool final) {
    std::string out;
    size_t used = q35::utf8_decode_lossy(in, final, out);
    return std::pair{out, used};
  };
  CHECK(lossy("abc", true) == std::pair{std::string("abc"), size_t(3)});
  CHECK(lossy("\xE2\x82\xAC", true).first == "\u20ac");
  CHECK(lossy("a\xE2\x82", false) == std::pair{std::string("a"), size_t(1)});
  CHECK(lossy("a\xE2\x82", true).first == "a\ufffd");       // b'a\xe2\x82'.decode(errors="replace")
  CHECK(lossy("\xE2\x28\xA1", true).first == "\ufffd(\ufffd");  // bad second byte: lead alone is replaced
  CHECK(lossy("\xED\xA0\x80", true).first == "\ufffd\ufffd\ufffd");  // surrogate: three subparts
  CHECK(lossy("\xF0\x9F\x98", true).first == "\ufffd");
  CHECK(lossy("\xF0\x9F\x98\x80", true).first == "\U0001F600");
  CHECK(lossy("\xC0\xAF\xFF", true).first == "\ufffd\ufffd\ufffd");
}

TEST_CASE("Added-token flags, ByteLevel(add_prefix_space, use_regex) and \"a b\" merges match HF") {
  json g = read_json(goldens_dir() / "flags_tokenizer_goldens.json");
  Tokenizer tok = Tokenizer::from_file(goldens_dir() / g["tokenizer"].get<std::string>());
  check_ids(tok, g["cases"], "ids");
  for (const json& c : g["cases"]) CHECK(tok.decode(tok.encode(c["text"].get<std::string>())) == c["decoded"]);
  int32_t hello = *tok.token_id("hello"), lstrip = *tok.token_id("[L]"), rstrip = *tok.token_id("[R]");
  CHECK(tok.encode("say hello") == concat({tok.encode("say "), {hello}}));
  Ids inside = tok.encode("helloworld");  // single_word: not matched inside a word
  CHECK(std::find(inside.begin(), inside.end(), hello) == inside.end());
  // lstrip / rstrip: the neighbouring spaces become part of the added token (and decode as nothing).
  CHECK(tok.encode("x  [L]") == concat({tok.encode("x"), {lstrip}}));
  CHECK(tok.encode("[R]  y") == concat({{rstrip}, tok.encode("y")}));
  CHECK(tok.decode(tok.encode("x  [L]  y")) == " x[L]  y");  // add_prefix_space adds the first space
  CHECK(tok.encode("cafe\u0301") == Ids{*tok.token_id("café")});  // normalized token matched after NFC
}

TEST_CASE("Hand-made tokenizer: BPE ranks, merges as strings and as pairs, ignore_merges") {
  json doc = tiny_tokenizer();
  Tokenizer strings = load_json("strings.json", doc);
  for (json& m : doc["model"]["merges"]) {
    std::string s = m;
    m = json::array({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
  }
  Tokenizer pairs = load_json("pairs.json", doc);
  doc["model"]["ignore_merges"] = true;
  Tokenizer ignore = load_json("ignore.json", doc);
  for (const Tokenizer* tok : {&strings, &pairs, &ignore}) {
    CHECK(tok->num_ids() == 10);
    CHECK(tok->encode("abc") == Ids{5});        // a b c -> ab c (rank 0) -> abc (rank 1)
    CHECK(tok->encode("bca") == Ids{7, 0});     // b c (rank 3); bc+a is no merge
    CHECK(tok->encode("abc abc") == Ids{5, 3, 5});  // " " is its own piece (split regex)
    CHECK(tok->encode("abc<|end|>ab") == Ids{5, 9, 4});
    CHECK(tok->encode("axb") == Ids{4});  // 'x' has no token: dropped (HF without unk_token), then a+b merge
    CHECK(tok->encode("") == Ids{});
    CHECK(tok->decode(Ids{5, 3, 5, 9}) == "abc abc<|end|>");
    CHECK(tok->token_id("Ġa") == 6);
    CHECK(tok->is_special(9));
    CHECK_THROWS_AS(tok->decode(Ids{10}), q35::Error);
  }
  CHECK(strings.encode("ca") == Ids{2, 0});  // no merge builds "ca"
  CHECK(ignore.encode("ca") == Ids{8});      // ignore_merges: a whole piece in the vocabulary wins
  CHECK(ignore.encode("cab") == Ids{2, 4});
}

TEST_CASE("Hand-made tokenizer: invalid UTF-8 input is an Error, not silently changed") {
  Tokenizer tok = load_json("utf8.json", tiny_tokenizer());
  CHECK_THROWS_WITH_AS(tok.encode("ab\xFF"), doctest::Contains("not valid UTF-8 at byte 2"), q35::Error);
  CHECK_THROWS_AS(tok.encode("\xE2\x82"), q35::Error);
}

TEST_CASE("Load errors name the file and the field") {
  fs::path missing = fs::temp_directory_path() / "q35-no-such-dir" / "tokenizer.json";
  CHECK_THROWS_WITH_AS(Tokenizer::from_file(missing), doctest::Contains(missing.string().c_str()), q35::Error);
  CHECK(load_error("malformed.json", "{\"model\": {").find("not valid JSON") != std::string::npos);

  auto with = [](auto&& edit) {
    json doc = tiny_tokenizer();
    edit(doc);
    return doc.dump();
  };
  auto expect = [&](const char* name, const std::string& text, std::initializer_list<const char*> parts) {
    std::string msg = load_error(name, text);
    for (const char* part : parts) CHECK_MESSAGE(msg.find(part) != std::string::npos, msg, " lacks ", part);
  };
  expect("wordpiece.json", with([](json& d) { d["model"]["type"] = "WordPiece"; }), {"model.type", "WordPiece"});
  expect("nfkc.json", with([](json& d) { d["normalizer"] = {{"type", "NFKC"}}; }), {"normalizer.type", "NFKC"});
  expect("metaspace.json", with([](json& d) { d["pre_tokenizer"] = {{"type", "Metaspace"}}; }),
         {"pre_tokenizer.type", "Metaspace"});
  expect("removed.json", with([](json& d) { d["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; }),
         {"pre_tokenizer.pretokenizers[0].behavior", "Removed"});
  expect("regex.json", with([](json& d) { d["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(a"; }),
         {"pre_tokenizer.pretokenizers[0].pattern.Regex"});
  expect("merge.json", with([](json& d) { d["model"]["merges"][1] = "ab z"; }), {"model.merges[1]", "\"z\""});
  expect("merge3.json", with([](json& d) { d["model"]["merges"][0] = "a b c"; }), {"model.merges[0]"});
  expect("decoder.json", with([](json& d) { d.erase("decoder"); }), {"decoder", "missing"});
  expect("unk.json", with([](json& d) { d["model"]["unk_token"] = "<unk>"; }), {"model.unk_token"});
  expect("template.json", with([](json& d) { d["post_processor"] = {{"type", "TemplateProcessing"}}; }),
         {"post_processor.type", "TemplateProcessing"});
  expect("vocab.json", with([](json& d) { d["model"]["vocab"]["a"] = "zero"; }), {"model.vocab[\"a\"]"});
  expect("added.json", with([](json& d) { d["added_tokens"][0].erase("content"); }), {"added_tokens[0].content"});
}

TEST_CASE("Fixture tokenizer (tests/fixtures/tiny-qwen35moe) loads and matches HF") {
  fs::path fixture = fs::path(Q35_SOURCE_DIR) / "tests/fixtures/tiny-qwen35moe/tokenizer.json";
  if (!fs::exists(fixture)) {
    MESSAGE("no fixture tokenizer at ", fixture.string(), " yet: nothing to compare");
    return;
  }
  Tokenizer tok = Tokenizer::from_file(fixture);
  json g = read_json(goldens_dir() / "fixture_tokenizer_goldens.json");
  REQUIRE(g["cases"].size() >= 100);
  check_ids(tok, g["cases"], "ids");
  for (const json& c : g["cases"]) CHECK(tok.decode(c["ids"].get<Ids>()) == c["decoded"].get<std::string>());
}

TEST_CASE("Encode speed on the real vocabulary (MB/s)") {
  // Corpus: every golden string, then this project's own C++ and Markdown sources.
  std::string goldens_text, source_text;
  for (const json& c : goldens()["cases"]) goldens_text += c["text"].get<std::string>() + "\n";
  for (const char* dir : {"runtime", "models", "tests", "docs"}) {
    fs::path root = fs::path(Q35_SOURCE_DIR) / dir;
    if (!fs::exists(root)) continue;
    for (const auto& e : fs::recursive_directory_iterator(root)) {
      std::string ext = e.path().extension().string();
      if (!e.is_regular_file() || (ext != ".cpp" && ext != ".h" && ext != ".md")) continue;
      std::ifstream in(e.path(), std::ios::binary);
      source_text.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
  }
  auto t0 = std::chrono::steady_clock::now();
  Tokenizer tok = Tokenizer::from_file(goldens_dir() / goldens()["tokenizer"].get<std::string>());
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto mb_per_s = [&](const std::string& text, size_t* n_ids) {
    auto start = std::chrono::steady_clock::now();
    *n_ids = tok.encode(text).size();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return double(text.size()) / 1e6 / s;
  };
  size_t n_src = 0, n_gold = 0;
  double cold_src = mb_per_s(source_text, &n_src), warm_src = mb_per_s(source_text, &n_src);
  double cold_gold = mb_per_s(goldens_text, &n_gold), warm_gold = mb_per_s(goldens_text, &n_gold);
  MESSAGE(fmt::format("tokenizer load {:.2f} s; encode: project sources {:.2f} MB ({} ids) {:.1f} MB/s cold cache, "
                      "{:.1f} MB/s warm; goldens {:.2f} MB ({} ids) {:.1f} MB/s cold, {:.1f} MB/s warm",
                      load_s, source_text.size() / 1e6, n_src, cold_src, warm_src, goldens_text.size() / 1e6, n_gold,
                      cold_gold, warm_gold));
  CHECK(n_src > source_text.size() / 10);  // sanity: about 3-4 bytes per token on code
  CHECK(tok.decode(tok.encode(source_text)) == source_text);
}
