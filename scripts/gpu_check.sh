#!/usr/bin/env bash
# Every GPU test and benchmark, in one run on the GPU machine; writes the report to $OUT (or
# ./gpu-report). Expects the binaries packed by scripts/pack_gpu.sh in dist/ (built on the build
# machine; kernels compile there with NVRTC or come from the carried cache in dist/jit-cache).
#   scripts/gpu_check.sh [--quick]     --quick: tests + the tiny-model checks, no alt model / bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-report}"
mkdir -p "$OUT"
# The kernel cache scripts/pack_gpu.sh compiled (carried compressed): unpacked once into dist/jit-cache.
if [ -f dist/jit-cache.tgz ] && [ ! -d dist/jit-cache ]; then
  mkdir -p dist/jit-cache && tar xzf dist/jit-cache.tgz -C dist/jit-cache
fi
export Q35JIT_CACHE_DIR="${Q35JIT_CACHE_DIR:-$PWD/dist/jit-cache}"
export PYTHONUNBUFFERED=1
REPORT="$OUT/report.md"
BIN=dist/q35jit
status=0
LOG="$OUT/steps.log"   # every step's output, one file (the device returns at most 8 files)
WORK=/tmp/q35-gpu-check && mkdir -p $WORK
step() {  # step NAME CMD...: runs CMD, output to $WORK/NAME.log and steps.log, records PASS/FAIL
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$WORK/$name.log" 2>&1; then r=PASS; else r=FAIL; status=1; fi
  { echo "===== $name: $r"; cat "$WORK/$name.log"; } >> "$LOG"
  echo "- $name: $r ($((SECONDS - t0)) s)" | tee -a "$REPORT"
}

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(cat dist/COMMIT 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/GPU: /'
  echo
} > "$REPORT"

step test_gpu dist/test_gpu
cp $WORK/test_gpu.log "$OUT/test_gpu.log"

M=tests/fixtures/tiny-qwen35moe
PROMPT_FILE="$WORK/prompt.txt"
python3 -c "import json;print(json.load(open('tests/fixtures/goldens/tiny-qwen35moe.json'))['prompt_text'],end='')" > "$PROMPT_FILE"
greedy_same() {
  $BIN run --model $M --prompt-file "$PROMPT_FILE" --temperature 0 --max-new-tokens 32 --device cpu > "$WORK/greedy_cpu.txt" &&
  $BIN run --model $M --prompt-file "$PROMPT_FILE" --temperature 0 --max-new-tokens 32 --device cuda --quant bf16 > "$WORK/greedy_cuda.txt" &&
  cmp "$WORK/greedy_cpu.txt" "$WORK/greedy_cuda.txt"
}
step tiny_greedy_cpu_vs_cuda greedy_same
# run consults the tune caches: the shipped file for this GPU is a layer; the tiny shapes are not in
# it, so the run says how to tune once and takes the defaults.
run_tuning() {
  $BIN run --model $M --prompt hi --temperature 0 --max-new-tokens 4 --device cuda > /dev/null 2> "$WORK/run_tuning.err" || return 1
  cat "$WORK/run_tuning.err"
  local gpu
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/[^A-Za-z0-9._-]/_/g')
  if [ -f "tune_cache/$gpu.json" ]; then grep -q "tune cache: .*$gpu.json" "$WORK/run_tuning.err" || return 1; fi
  [ "$(grep -c 'no tuned config for' "$WORK/run_tuning.err")" = 1 ]
}
step run_uses_tune_cache run_tuning

# Official quantized formats (README "Supported models and formats"): FP8 and GPTQ-Int4 versions of
# the tiny fixture (numpy), the CPU reference (exact dequantization) against the GPU paths.
python3 -c "import json;print(' '.join(map(str,json.load(open('tests/fixtures/goldens/tiny-qwen35moe.json'))['prompt_ids'])))" > "$WORK/tiny_tokens.txt"
step quant_fixtures python3 tests/python/make_quant_fixtures.py --out /tmp/qfx
for kind in fp8 gptq; do
  Q=/tmp/qfx/tiny-$kind
  step "${kind}_cpu" $BIN eval --model $Q --tokens "$WORK/tiny_tokens.txt" --out /tmp/q_${kind}_cpu.safetensors --device cpu
  for quant in bf16 w4a16; do
    tol=2e-2; [ $quant = w4a16 ] && tol=1  # w4a16: deltas reported, not gated
    step "${kind}_${quant}" bash -c "$BIN eval --model $Q --tokens $WORK/tiny_tokens.txt --out /tmp/q_${kind}_${quant}.safetensors --device cuda --quant $quant && python3 tests/python/compare_logits.py --golden /tmp/q_${kind}_cpu.safetensors --tensor logits --got /tmp/q_${kind}_${quant}.safetensors --tol $tol --label ${kind}_${quant} --json $OUT/e2e.jsonl"
    tail -1 "$WORK/${kind}_${quant}.log" | sed 's/^/  /' | tee -a "$REPORT"
  done
done
# Qwen3.5-397B-A17B at W4A16 needs ~217 GB: one GPU refuses before loading, in one line.
refuse_397b() {
  if $BIN bench --synthetic 397b-a17b --prefill 128 --decode-contexts 128 --repeats 1 2> "$WORK/r397.err"; then return 1; fi
  cat "$WORK/r397.err"
  [ "$(grep -c 'needs .* GB of GPU memory' "$WORK/r397.err")" = 1 ]
}
step refuse_397b_one_gpu refuse_397b

if [ "${1:-}" != "--quick" ]; then
  # End to end against transformers on this machine: a random model of other sizes.
  step alt_fixture python3 tests/python/make_tiny_fixture.py --preset alt --out /tmp/fx
  A=/tmp/fx/alt-qwen35moe
  G=/tmp/fx/goldens/alt-qwen35moe.safetensors
  python3 -c "from safetensors.numpy import load_file;print(' '.join(map(str,load_file('$G')['prompt_ids'].tolist())))" > "$WORK/alt_tokens.txt"
  for quant in bf16 w4a16; do
    for mode in prefill decode; do
      tol=2e-2; [ $quant = w4a16 ] && tol=1  # w4a16: deltas reported, not gated
      step "alt_${quant}_${mode}" bash -c "$BIN eval --model $A --tokens $WORK/alt_tokens.txt --out /tmp/alt_${quant}_${mode}.safetensors --mode $mode --device cuda --quant $quant && python3 tests/python/compare_logits.py --golden $G --got /tmp/alt_${quant}_${mode}.safetensors --tol $tol --label alt_${quant}_${mode} --json $OUT/e2e.jsonl"
      tail -1 "$WORK/alt_${quant}_${mode}.log" | sed 's/^/  /' | tee -a "$REPORT"
    done
  done
  step tune_cache_check bash -c "for f in tune_cache/*.json; do $BIN tune --check \$f || exit 1; done; $BIN tune --synthetic 35b-a3b --group-size 128 --show"
  step bench_35b_w4a16_g128 $BIN bench --synthetic 35b-a3b --quant w4a16 --group-size 128 --kernels --json "$OUT/bench_w4a16_g128.json"
  sed 's/^/  /' "$WORK/bench_35b_w4a16_g128.log" | grep -v "^\s*\[q35jit\]" | tee -a "$REPORT"
  # Qwen3.5-122B-A10B shapes (W4A16 ~65 GB): FAMILY=1 scripts/gpu_check.sh. Needs attention_decode
  # for 16 query heads per KV head (README "Supported models and formats").
  if [ "${FAMILY:-0}" = 1 ]; then
    step bench_122b_w4a16_g128 $BIN bench --synthetic 122b-a10b --quant w4a16 --group-size 128 --json "$OUT/bench_122b.json"
    sed 's/^/  /' "$WORK/bench_122b_w4a16_g128.log" | grep -v "^\s*\[q35jit\]" | tee -a "$REPORT"
  fi
fi
echo "- overall: $([ $status = 0 ] && echo PASS || echo FAIL)" | tee -a "$REPORT"
exit $status
