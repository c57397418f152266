// The q35jit command line, run as a user would: exit codes, one-line errors, and outputs checked
// against the transformers goldens of the tiny fixture.
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/io/safetensors.h"
#include "runtime/text/tokenizer.h"
#include "tests/synthetic_checkpoint.h"

namespace fs = std::filesystem;
using q35::test::TempDir;

namespace {

const std::string kBin = std::string(Q35_BINARY_DIR) + "/q35jit";
const std::string kModel = std::string(Q35_SOURCE_DIR) + "/tests/fixtures/tiny-qwen35moe";
const std::string kGoldens = std::string(Q35_SOURCE_DIR) + "/tests/fixtures/goldens/tiny-qwen35moe";

struct Result {
  int code;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs `q35jit <args>` with stdin from /dev/null (or `stdin_text`), capturing both streams.
Result q35jit(const std::string& args, const std::string& stdin_text = "") {
  TempDir tmp("cli");
  const fs::path out = tmp.path() / "out", err = tmp.path() / "err", in = tmp.path() / "in";
  std::ofstream(in) << stdin_text;
  const std::string cmd = kBin + " " + args + " <" + in.string() + " >" + out.string() + " 2>" + err.string();
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

TEST_CASE("q35jit --help lists the commands; each command has --help") {
  Result r = q35jit("--help");
  CHECK(r.code == 0);
  for (const char* c : {"run", "eval", "compile"}) CHECK(r.out.find(c) != std::string::npos);
  for (const char* c : {"run", "eval", "compile"}) {
    Result h = q35jit(std::string(c) + " --help");
    CHECK(h.code == 0);
    CHECK(h.out.find("--model") != std::string::npos);
  }
  CHECK(q35jit("").code == 2);
  Result bad = q35jit("frobnicate");
  CHECK(bad.code == 2);
  CHECK(bad.err.find("unknown command 'frobnicate'") != std::string::npos);
}

TEST_CASE("bad flags and bad input are one-line errors naming the flag or file") {
  Result r = q35jit("run --model " + kModel + " --prompt hi --bogus 3");
  CHECK(r.code == 1);
  CHECK(r.err == "error: q35jit run: unknown flag --bogus (see q35jit run --help)\n");

  r = q35jit("run --prompt hi");
  CHECK(r.code == 1);
  CHECK(r.err.find("--model is required") != std::string::npos);

  r = q35jit("run --model /no/such/dir --prompt hi");
  CHECK(r.code == 1);
  CHECK(r.err == "error: model directory /no/such/dir does not exist\n");

  r = q35jit("run --model " + kModel + " --prompt hi --max-new-tokens abc");
  CHECK(r.err.find("--max-new-tokens expects an integer, got 'abc'") != std::string::npos);

  r = q35jit("run --model " + kModel + " --prompt hi --device tpu");
  CHECK(r.err.find("--device must be cpu or cuda") != std::string::npos);

  r = q35jit("eval --model " + kModel + " --tokens /no/such/file --out /tmp/x.safetensors");
  CHECK(r.code == 1);
  CHECK(r.err.find("--tokens /no/such/file: cannot read the file") != std::string::npos);

  TempDir tmp("cli-bad");
  std::ofstream(tmp.path() / "toks.txt") << "1 2 99999 3";
  r = q35jit("eval --model " + kModel + " --tokens " + (tmp.path() / "toks.txt").string() + " --out " +
             (tmp.path() / "o.safetensors").string());
  CHECK(r.code == 1);
  CHECK(r.err.find("toks.txt: token 2 is id 99999, outside the vocabulary [0, 1536)") != std::string::npos);
  CHECK(count_lines(r.err) == 1);
  CHECK(!fs::exists(tmp.path() / "o.safetensors"));

  std::ofstream(tmp.path() / "words.txt") << "1 two 3";
  r = q35jit("eval --model " + kModel + " --tokens " + (tmp.path() / "words.txt").string() + " --out " +
             (tmp.path() / "o.safetensors").string());
  CHECK(r.err.find("token 1 is 'two', not an integer") != std::string::npos);

  // A model folder whose config is broken: the error names the file.
  fs::create_directories(tmp.path() / "m");
  std::ofstream(tmp.path() / "m" / "config.json") << "{ not json";
  r = q35jit("run --model " + (tmp.path() / "m").string() + " --prompt hi");
  CHECK(r.code == 1);
  CHECK(r.err.find("config.json") != std::string::npos);
  CHECK(count_lines(r.err) == 1);
}

TEST_CASE("eval writes the transformers logits, in prefill and in decode mode") {
  q35::SafetensorsFile goldens(kGoldens + ".safetensors");
  q35::TensorRef ids_ref{goldens.find("prompt_ids"), {}, &goldens};
  REQUIRE(ids_ref.info);
  ids_ref.bytes = goldens.data(*ids_ref.info);
  const auto* ids = reinterpret_cast<const int32_t*>(ids_ref.bytes.data());
  const int64_t T = ids_ref.info->shape[0];
  q35::TensorRef want_ref{goldens.find("prompt_logits"), {}, &goldens};
  want_ref.bytes = goldens.data(*want_ref.info);
  std::vector<float> want = q35::to_f32(want_ref);

  TempDir tmp("cli-eval");
  std::ofstream toks(tmp.path() / "prompt.txt");
  for (int64_t t = 0; t < T; ++t) toks << ids[t] << (t % 10 == 9 ? "\n" : " ");
  toks.close();
  for (const char* mode : {"prefill", "decode"}) {
    CAPTURE(mode);
    const fs::path out = tmp.path() / (std::string(mode) + ".safetensors");
    Result r = q35jit("eval --model " + kModel + " --tokens " + (tmp.path() / "prompt.txt").string() + " --out " +
                      out.string() + " --mode " + mode + " --device cpu");
    REQUIRE_MESSAGE(r.code == 0, r.err);
    q35::SafetensorsFile got_file(out);
    const q35::TensorInfo* info = got_file.find("logits");
    REQUIRE(info);
    CHECK(info->shape == std::vector<int64_t>{T, 1536});
    std::vector<float> got = q35::to_f32({info, got_file.data(*info), &got_file});
    double max_diff = 0, max_abs = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      max_diff = std::max(max_diff, double(std::fabs(got[i] - want[i])));
      max_abs = std::max(max_abs, double(std::fabs(want[i])));
    }
    CHECK(max_diff / max_abs <= 1e-4);
  }
}

TEST_CASE("run --temperature 0 streams the transformers greedy continuation") {
  nlohmann::json g = nlohmann::json::parse(slurp(kGoldens + ".json"));
  const std::string prompt = g["prompt_text"];
  std::vector<int32_t> greedy = g["greedy_ids"].get<std::vector<int32_t>>();
  q35::Tokenizer tok = q35::Tokenizer::from_file(kModel + "/tokenizer.json");
  const std::string want = tok.decode(greedy);

  TempDir tmp("cli-run");
  std::ofstream(tmp.path() / "prompt.txt", std::ios::binary) << prompt;
  Result r = q35jit("run --model " + kModel + " --prompt-file " + (tmp.path() / "prompt.txt").string() +
                    " --temperature 0 --max-new-tokens " + std::to_string(greedy.size()) + " --device cpu");
  REQUIRE_MESSAGE(r.code == 0, r.err);
  CHECK(r.out == want);
  CHECK(r.err.find("time to first token") != std::string::npos);
  CHECK(r.err.find("tok/s") != std::string::npos);

  // Seeded sampling is reproducible, and another seed gives another text.
  auto sample = [&](int seed) {
    return q35jit("run --model " + kModel + " --prompt 'The quick brown fox' --temperature 1.5 --top-k 50 --top-p 0.95 " +
                  "--max-new-tokens 24 --device cpu --seed " + std::to_string(seed));
  };
  Result a = sample(1), b = sample(1), c = sample(2);
  CHECK(a.code == 0);
  CHECK(a.out == b.out);
  CHECK(a.out != c.out);
}

TEST_CASE("run --chat: one-shot and interactive multi-turn on stdin") {
  Result one = q35jit("run --model " + kModel + " --chat --no-think --system 'Be brief.' --prompt hello "
                      "--temperature 0 --max-new-tokens 8 --device cpu");
  CHECK_MESSAGE(one.code == 0, one.err);
  CHECK(!one.out.empty());
  // Interactive: two turns from stdin; the first turn's reply equals the one-shot reply.
  Result chat = q35jit("run --model " + kModel + " --chat --no-think --system 'Be brief.' --temperature 0 "
                       "--max-new-tokens 8 --device cpu", "hello\nand again\n");
  CHECK_MESSAGE(chat.code == 0, chat.err);
  CHECK(chat.out.rfind(one.out, 0) == 0);
  CHECK(chat.out.size() > one.out.size());
  CHECK(q35jit("run --model " + kModel + " --no-think --prompt hi").err.find("need --chat") != std::string::npos);
}

TEST_CASE("run: context overflow is one clear line") {
  Result r = q35jit("run --model " + kModel + " --prompt 'a b c d e f g h' --max-context 4 --temperature 0 --device cpu");
  CHECK(r.code == 1);
  CHECK(r.err.find("context overflow") != std::string::npos);
  CHECK(count_lines(r.err) <= 2);  // the load line, then the error
}

TEST_CASE("compile: every kernel of the fixture for sm_80 and sm_90a, then all cache hits") {
  TempDir cache("cli-compile");
  for (const char* arch : {"sm_80", "sm_90a"}) {
    CAPTURE(arch);
    const std::string args = "compile --model " + kModel + " --arch " + arch + " --cache-dir " + cache.path().string();
    Result cold = q35jit(args);
    REQUIRE_MESSAGE(cold.code == 0, cold.err);
    CHECK(cold.out.find(" 0 cache hits") != std::string::npos);
    Result warm = q35jit(args);
    REQUIRE(warm.code == 0);
    CHECK(warm.out.find(" 0 compiled") != std::string::npos);
  }
  CHECK(q35jit("compile --model " + kModel + " --arch sm90").err.find("--arch must look like") != std::string::npos);
  // --moe-tiles: the tuner's MoE tiles too (the fixture's K = 64 admits no register-sourced tile: the
  // same kernels, all cached); a bad kind is named.
  Result rs = q35jit("compile --model " + kModel + " --arch sm_90a --moe-tiles rs --cache-dir " + cache.path().string());
  REQUIRE_MESSAGE(rs.code == 0, rs.err);
  CHECK(rs.out.find(" 0 compiled") != std::string::npos);
  Result bad = q35jit("compile --model " + kModel + " --arch sm_90a --moe-tiles some");
  CHECK(bad.code != 0);
  CHECK(bad.err.find("--moe-tiles must be all, wgmma or rs") != std::string::npos);
  // The register-sourced tiles dequantize INT4 in registers: bf16 and FP8 weights have none.
  for (const char* quant : {"fp8", "bf16"}) {
    CAPTURE(quant);
    Result r = q35jit("compile --model " + kModel + " --arch sm_90a --quant " + quant + " --moe-tiles rs");
    CHECK(r.code == 1);
    CHECK(r.err.find(std::string("--moe-tiles rs: the register-sourced MoE tiles read W4A16 weights only, not --quant ") +
                     quant) != std::string::npos);
  }
}

TEST_CASE("compile: every kernel of the 122B-A10B and 397B-A17B configs for sm_90a and sm_80") {
  // 16 q heads per kv head, 4 DeltaNet value heads per key head, top-10 of 512 experts, H = 3072 / 4096.
  for (const std::string model : {"122b-a10b", "397b-a17b"})
    for (const std::string arch : {"sm_90a", "sm_80"}) {
      CAPTURE(model);
      CAPTURE(arch);
      q35::test::TempDir cache("cli-family");
      Result r = q35jit("compile --synthetic " + model + " --arch " + arch + " --cache-dir " + cache.path().string());
      CHECK_MESSAGE(r.code == 0, r.err);
      CHECK(r.out.find("compiled") != std::string::npos);
    }
}

TEST_CASE("the family's synthetic names are one line each") {
  Result r = q35jit("compile --synthetic 1t --arch sm_80");
  CHECK(r.code == 1);
  CHECK(r.err == "error: unknown synthetic model '1t': known: 35b-a3b, 122b-a10b, 397b-a17b\n");
  r = q35jit("compile --model " + kModel + " --synthetic 35b-a3b --arch sm_80");
  CHECK(r.err == "error: q35jit compile: give --model DIR or --synthetic NAME\n");
}

TEST_CASE("--quant fp8: compile and tune --show take it; run --device cpu runs the FP8-rounded reference; bad values "
          "are one line") {
  TempDir cache("cli-fp8");
  for (const char* arch : {"sm_80", "sm_90a"}) {
    CAPTURE(arch);
    Result r = q35jit("compile --model " + kModel + " --quant fp8 --arch " + arch + " --cache-dir " + cache.path().string());
    CHECK_MESSAGE(r.code == 0, r.err);
    CHECK(r.out.find("fp8") != std::string::npos);
  }
  // The tuner's FP8 families and signatures, without a GPU.
  Result r = q35jit("tune --synthetic 35b-a3b --quant fp8 --show --gpu 'Some GPU' --sm sm_90 --sweep 1..1");
  CHECK_MESSAGE(r.code == 0, r.err);
  CHECK(r.out.find("gemv_fp8") != std::string::npos);
  CHECK(r.out.find("N12352_K2048_FP8_bf16") != std::string::npos);
  CHECK(r.out.find("H2048_E256_K8_I512_IS512_FP8") != std::string::npos);
  CHECK(r.out.find("gemv_w4a16") == std::string::npos);
  // The CPU reference on the weights the GPU keeps in FP8: text, and not the bf16 run's logits.
  Result cpu = q35jit("run --model " + kModel + " --prompt 'The quick brown fox' --temperature 0 --max-new-tokens 8 "
                      "--device cpu --quant fp8");
  CHECK_MESSAGE(cpu.code == 0, cpu.err);
  CHECK(!cpu.out.empty());
  // Bad values and combinations: one line each.
  r = q35jit("run --model " + kModel + " --prompt hi --device cuda --quant int8");
  CHECK(r.code == 1);
  CHECK(r.err == "error: q35jit run: --quant must be bf16, w4a16 or fp8, got 'int8'\n");
  r = q35jit("compile --model " + kModel + " --quant fp8 --group-size 64 --arch sm_80");
  CHECK(r.code == 1);
  CHECK(r.err.find("--group-size applies to --quant w4a16") != std::string::npos);
  CHECK(count_lines(r.err) == 1);
  r = q35jit("run --model " + kModel + " --prompt hi --device cpu --quant w4a16");
  CHECK(r.code == 1);
  CHECK(r.err.find("--quant fp8 runs it on the weights rounded through FP8") != std::string::npos);
}

TEST_CASE("bench --batch: the batch sizes are checked before any GPU work, one line each") {
  Result r = q35jit("bench --synthetic 35b-a3b --batch 0");
  CHECK(r.code == 1);
  CHECK(r.err == "error: q35jit bench: --batch expects positive integers separated by commas, got '0'\n");
  r = q35jit("bench --synthetic 35b-a3b --batch 1,4,x");
  CHECK(r.err == "error: q35jit bench: --batch expects positive integers separated by commas, got 'x'\n");
  // One batched step runs at most 64 rows (bench times one step per batch size).
  r = q35jit("bench --synthetic 35b-a3b --batch 4,65");
  CHECK(r.code == 1);
  CHECK(r.err == "error: q35jit bench: --batch 65: one batched step runs at most 64 rows (larger batches run as "
                 "consecutive steps of at most 64; time those)\n");
  r = q35jit("bench --synthetic 35b-a3b --batch 2048");
  CHECK(r.code == 1);
  CHECK(r.err.find("--batch 2048: one batched step runs at most 64 rows") != std::string::npos);
  r = q35jit("bench --synthetic 35b-a3b --batch-context 64");
  CHECK(r.err == "error: q35jit bench: --batch-context applies to --batch (give the batch sizes)\n");
  r = q35jit("bench --synthetic 35b-a3b --batch 4 --batch-context 0");
  CHECK(r.err.find("--batch-context") != std::string::npos);
  CHECK(count_lines(r.err) == 1);
  r = q35jit("bench --help");
  CHECK(r.code == 0);
  CHECK(r.out.find("--batch LIST") != std::string::npos);
  CHECK(r.out.find("--batch-context N") != std::string::npos);
}

TEST_CASE("--device cuda on a machine without a driver is one line") {
  if (fs::exists("/dev/nvidiactl")) return;  // a GPU machine: the GPU script covers this path
  Result r = q35jit("run --model " + kModel + " --prompt hi --device cuda");
  CHECK(r.code == 1);
  CHECK(count_lines(r.err) == 1);
}

TEST_CASE("tune --check validates a file; --show prints what a run would use; bad flags are one line") {
  const std::string shipped = std::string(Q35_SOURCE_DIR) + "/tune_cache/NVIDIA_H100_80GB_HBM3.json";
  Result r = q35jit("tune --help");
  CHECK(r.code == 0);
  CHECK(r.out.find("--sweep") != std::string::npos);

  r = q35jit("tune --check " + shipped);
  CHECK(r.code == 0);
  CHECK(r.out.find("OK, format version 1") != std::string::npos);
  CHECK(r.out.find("NVIDIA H100 80GB HBM3 (sm_90)") != std::string::npos);

  TempDir tmp("cli-tune");
  const fs::path bad = tmp.path() / "bad.json";
  std::ofstream(bad) << R"({"format": "q35jit-tune-cache", "version": 7})";
  r = q35jit("tune --check " + bad.string());
  CHECK(r.code == 1);
  CHECK(r.err.find("bad.json") != std::string::npos);
  CHECK(r.err.find("version 7") != std::string::npos);
  CHECK(count_lines(r.err) == 1);

  // A well-formed file whose config misses a field: named by its path in the file.
  std::string text = slurp(shipped);
  const size_t at = text.find("\"row_warps\"");
  REQUIRE(at != std::string::npos);
  text.replace(at, 11, "\"rows_warps\"");
  const fs::path broken = tmp.path() / "broken.json";
  std::ofstream(broken) << text;
  r = q35jit("tune --check " + broken.string());
  CHECK(r.code == 1);
  CHECK(r.err.find("missing field \"row_warps\"") != std::string::npos);
  CHECK(r.err.find("entries.gemv_w4a16.") != std::string::npos);

  // --show without a GPU: the shipped (embedded) H100 file answers for the 35B shapes at g128.
  r = q35jit("tune --synthetic 35b-a3b --group-size 128 --show --gpu 'NVIDIA H100 80GB HBM3' --sm sm_90");
  CHECK(r.code == 0);
  CHECK(r.out.find("embedded NVIDIA_H100_80GB_HBM3.json") != std::string::npos);
  CHECK(r.out.find(" tuned ") != std::string::npos);
  CHECK(r.out.find("moe_gemm") != std::string::npos);
  // Another GPU: no file, every kernel its default.
  r = q35jit("tune --synthetic 35b-a3b --show --gpu 'Some GPU' --sm sm_90");
  CHECK(r.code == 0);
  CHECK(r.out.find("none (run q35jit tune)") != std::string::npos);
  CHECK(r.out.find(" tuned ") == std::string::npos);
  // $Q35JIT_TUNE_DIR comes first; a file there for another GPU is skipped with a notice.
  fs::create_directories(tmp.path() / "dir");
  std::string other = slurp(shipped);
  other.replace(other.find("NVIDIA H100 80GB HBM3"), 21, "NVIDIA H200 141GB XX");
  std::ofstream(tmp.path() / "dir" / "NVIDIA_H100_80GB_HBM3.json") << other;
  const std::string env = "Q35JIT_TUNE_DIR=" + (tmp.path() / "dir").string() + " ";
  {
    const std::string cmd = env + kBin + " tune --synthetic 35b-a3b --show --gpu 'NVIDIA H100 80GB HBM3' --sm sm_90 " +
                            "--sweep 1..1 >" + (tmp.path() / "o").string() + " 2>" + (tmp.path() / "e").string();
    CHECK(std::system(cmd.c_str()) == 0);
    const std::string err = slurp(tmp.path() / "e");
    CHECK(err.find("ignoring") != std::string::npos);
    CHECK(err.find("NVIDIA H200 141GB XX") != std::string::npos);
    CHECK(slurp(tmp.path() / "o").find("embedded NVIDIA_H100_80GB_HBM3.json") != std::string::npos);
  }

  r = q35jit("tune --synthetic 35b-a3b --sweep 9..2 --show --gpu x --sm sm_90");
  CHECK(r.code == 1);
  CHECK(r.err.find("--sweep") != std::string::npos);
  r = q35jit("tune --sweep 1..16");
  CHECK(r.code == 1);
  CHECK(r.err.find("--model DIR or --synthetic NAME") != std::string::npos);
  r = q35jit("tune --synthetic 35b-a3b --buckets 1,x --show --gpu x --sm sm_90");
  CHECK(r.code == 1);
  CHECK(r.err.find("--buckets") != std::string::npos);
}
