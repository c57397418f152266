// Qwen3.5 chat format: rendering rules, the spec's "Hello" test vector on the real vocabulary, the
// golden chats (text rendered per Qwen3.5's chat_template.jinja and ids from HF tokenizers; see
// tests/python/gen_tokenizer_goldens.py) and stop ids.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "models/qwen35/chat.h"
#include "runtime/core/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using q35::qwen35::ChatMessage;
using q35::qwen35::render_chat;
using Ids = std::vector<int32_t>;

namespace {

fs::path goldens_dir() {
  const char* env = std::getenv("Q35_GOLDENS_DIR");
  return env && *env ? fs::path(env) : fs::path(Q35_BINARY_DIR) / "goldens";
}

const json& goldens() {
  static const json g = [] {
    fs::path p = goldens_dir() / "tokenizer_goldens.json";
    std::ifstream in(p, std::ios::binary);
    REQUIRE_MESSAGE(in.good(), fmt::format("{} is missing: generate the goldens with\n  python3 "
                                           "{}/tests/python/gen_tokenizer_goldens.py --out {}",
                                           p.string(), Q35_SOURCE_DIR, goldens_dir().string()));
    return json::parse(in);
  }();
  return g;
}

const q35::Tokenizer& qwen35() {
  static const q35::Tokenizer tok =
      q35::Tokenizer::from_file(goldens_dir() / goldens()["tokenizer"].get<std::string>());
  return tok;
}

}  // namespace

TEST_CASE("Spec test vector: \"Hello\" with thinking off") {
  std::string text = render_chat({{"user", "Hello"}}, true, false);
  CHECK(text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  CHECK(qwen35().encode(text) ==
        Ids{248045, 846, 198, 9419, 248046, 198, 248045, 74455, 198, 248068, 271, 248069, 271});
}

TEST_CASE("Golden chats: text as the Qwen3.5 template renders it, ids as HF tokenizers gives") {
  const json& chats = goldens()["chats"];
  REQUIRE(chats.size() >= 10);
  for (const json& c : chats) {
    std::vector<ChatMessage> messages;
    for (const json& m : c["messages"]) messages.push_back({m["role"], m["content"]});
    std::string text = render_chat(messages, c["add_generation_prompt"], c["enable_thinking"]);
    CHECK(text == c["text"].get<std::string>());
    CHECK(qwen35().encode(text) == c["ids"].get<Ids>());
  }
}

TEST_CASE("System prompt, multi-turn and the generation prompt") {
  CHECK(render_chat({{"system", "  Be brief.\n"}, {"user", "Hi"}}, true, true) ==
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n");
  CHECK(render_chat({{"user", "Hi"}, {"assistant", "Hello!"}, {"user", "Bye"}}, false, true) ==
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n");
}

TEST_CASE("Reasoning is stripped from assistant turns before the last user query and kept after it") {
  std::vector<ChatMessage> chat = {
      {"user", "Q1"},
      {"assistant", "<think>\nfirst thoughts\n</think>\n\nA1"},
      {"user", "Q2"},
      {"assistant", "<think>\nsecond thoughts\n</think>\n\nA2"},
  };
  CHECK(render_chat(chat, false, true) ==
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nsecond thoughts\n</think>\n\nA2<|im_end|>\n");
  // After the last query an assistant turn always carries a (possibly empty) think block.
  CHECK(render_chat({{"user", "Q"}, {"assistant", "A"}}, false, false) ==
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n");
  // Reasoning = before the first </think>, after the last <think>; answer = after the last </think>.
  CHECK(render_chat({{"user", "Q"}, {"assistant", "x<think>r</think>y</think>z"}}, false, true) ==
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nz<|im_end|>\n");
  // A user turn that only carries a tool response is not the last query.
  std::string tool_turn = render_chat({{"user", "Q"},
                                       {"assistant", "<think>plan</think>call"},
                                       {"user", "<tool_response>\n42\n</tool_response>"}},
                                      true, true);
  CHECK(tool_turn.find("<think>\nplan\n</think>\n\ncall") != std::string::npos);
}

TEST_CASE("Tool messages are grouped into one user turn") {
  CHECK(render_chat({{"user", "Q"}, {"assistant", "call"}, {"tool", "r1"}, {"tool", "r2"}}, false, true) ==
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\ncall<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n");
}

TEST_CASE("Contents are trimmed like Python's str.strip()") {
  CHECK(render_chat({{"user", "\x1c\t hi\u00a0\u3000\n"}}, false, true) == "<|im_start|>user\nhi<|im_end|>\n");
  CHECK(render_chat({{"user", "\u200bhi"}}, false, true) == "<|im_start|>user\n\u200bhi<|im_end|>\n");  // not a space
}

TEST_CASE("Invalid conversations are errors") {
  CHECK_THROWS_AS(render_chat({}, true, true), q35::Error);
  CHECK_THROWS_WITH_AS(render_chat({{"user", "a"}, {"system", "b"}}, true, true),
                       doctest::Contains("must be the first"), q35::Error);
  CHECK_THROWS_WITH_AS(render_chat({{"system", "s"}, {"assistant", "a"}}, true, true),
                       doctest::Contains("no user query"), q35::Error);
  CHECK_THROWS_WITH_AS(render_chat({{"user", "<tool_response>x</tool_response>"}}, true, true),
                       doctest::Contains("no user query"), q35::Error);
  CHECK_THROWS_WITH_AS(render_chat({{"user", "a"}, {"robot", "b"}}, true, true), doctest::Contains("\"robot\""),
                       q35::Error);
}

TEST_CASE("Stop ids: generation_config eos ids, then <|im_end|> and <|endoftext|>, no duplicates") {
  const q35::Tokenizer& tok = qwen35();
  q35::qwen35::GenerationConfig gen;
  gen.eos_token_ids = {248046, 248044};
  CHECK(q35::qwen35::stop_token_ids(tok, gen) == Ids{248046, 248044});
  gen.eos_token_ids = {248044};
  CHECK(q35::qwen35::stop_token_ids(tok, gen) == Ids{248044, 248046});
  gen.eos_token_ids = {};
  CHECK(q35::qwen35::stop_token_ids(tok, gen) == Ids{248046, 248044});
  gen.eos_token_ids = {248077};
  CHECK_THROWS_WITH_AS(q35::qwen35::stop_token_ids(tok, gen), doctest::Contains("248077"), q35::Error);
}

TEST_CASE("render_next_turn closes the previous reply, then renders the new turn with the prompt") {
  using namespace q35::qwen35;
  CHECK(render_next_turn({{"user", "and again"}}, false) ==
        "<|im_end|>\n<|im_start|>user\nand again<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  // After a first turn the fed text differs from a fresh render of the whole conversation only in
  // the earlier reply keeping its (here empty) reasoning block, which the template strips.
  const std::string first = render_chat({{"user", "hi"}}, true, false);
  const std::string fed = first + "hello" + render_next_turn({{"user", "and again"}}, false);
  const std::string fresh =
      render_chat({{"user", "hi"}, {"assistant", "hello"}, {"user", "and again"}}, true, false);
  const std::string think = "<think>\n\n</think>\n\n";
  std::string fed_stripped = fed;
  fed_stripped.erase(fed_stripped.find(think), think.size());
  CHECK(fed_stripped == fresh);
}
