#!/usr/bin/env bash
# The server's GPU figures (issue 10), on the GPU machine from the folder scripts/pack_gpu.sh packs
# (dist/q35jit, dist/serve_bench.py, dist/qwen35-tokenizer.json.gz): `q35jit serve --synthetic 35b-a3b`
# (W4A16 g128) on 127.0.0.1 (--port 0: a free port, read from the server's "serving ... on" line),
# measured by tests/server/serve_bench.py (Python standard library only):
#   1. three server starts, the first with an empty kernel cache (cold: every kernel through NVRTC),
#      the others with that cache (warm): process start -> /health ok -> first streamed token; on the
#      last one, the TTFT of turn 2 of a chat (4,000-token history + 50-token message) resumed from
#      the prefix cache and as a new chat, and single-stream decode tok/s (512 tokens, greedy, ignore_eos)
#   2. one start with --prefix-cache-gb 0 --prefix-cache-gpu-gb 0: turn 2 without a prefix cache; one start
#      with --prefix-cache-gpu-gb 0: the cache in pinned host memory only (every hit restored from there)
#   3. `q35jit bench` decode at the context in the middle of the server's decode stream, for comparison
#   4. tests/server/load_test.py, 4 streams for 10 s (p50 / p95 TTFT and time between tokens)
# Each server is stopped with SIGTERM and must exit 0. Prints one summary block (also $OUT/serve.md);
# the JSON of every run, the bench JSON and the server logs go to $OUT. Exit status 1 on any problem.
#   scripts/gpu_serve.sh            (or dist/gpu_serve.sh)      ~2 minutes on an H200 (at most ~5.5:
#   each run has a time limit)
# Environment: OUT (default ./gpu-report), SERVE_MODEL (server flags instead of the synthetic 35B, e.g.
# "--model tests/fixtures/tiny-qwen35moe --device cpu"; bench is then skipped), SIZES (serve_bench.py
# size flags), BENCH=0 (skip bench), LOAD_TEST=0 (skip the load test), CUDA_VISIBLE_DEVICES (which GPU: the runtime uses device 0).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/gpu_lib.sh
. "$HERE/gpu_lib.sh"
q35_find_dist gpu_serve.sh "$HERE"
cd "$DIST/.."
OUT="${OUT:-$PWD/gpu-report}"
mkdir -p "$OUT"
BIN=$DIST/q35jit
PY=${PYTHON:-python3}
CLIENT=$DIST/serve_bench.py
[ -f "$CLIENT" ] || CLIENT=tests/server/serve_bench.py
WORK=$(mktemp -d /tmp/q35-gpu-serve.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
status=0

if [ -n "${SERVE_MODEL:-}" ]; then
  MODEL_ARGS=$SERVE_MODEL
  BENCH=${BENCH:-0}
else
  # The real Qwen3.5 vocabulary (248,077 ids), so the synthetic model's tokens decode to text.
  TOK=$WORK/tokenizer
  if ! q35_unpack_tokenizer "$TOK"; then
    mkdir -p "$TOK"
    echo "gpu_serve.sh: notice: no $DIST/qwen35-tokenizer.json.gz: using the tiny fixture's tokenizer (1,513 ids);" \
         "most generated ids then decode to nothing and stream no chunk" >&2
    cp tests/fixtures/tiny-qwen35moe/tokenizer.json "$TOK/"
  fi
  MODEL_ARGS="--synthetic 35b-a3b --tokenizer $TOK --quant w4a16 --group-size 128"
  BENCH=${BENCH:-1}
fi
SIZES=${SIZES:---history-tokens 4000 --message-tokens 50 --repeats 5 --decode-tokens 512 --decode-prompt-tokens 128 --decode-repeats 3}
LIMITS="--timeout 30 --start-timeout 90"   # seconds a request may stay silent; for the server's serving line
SERVE="$BIN serve $MODEL_ARGS --host 127.0.0.1 --port 0"
CACHE=$WORK/jit-cache   # empty: the first start compiles every kernel

{
  echo "# q35jit serve on the GPU, $(date -u +%Y-%m-%dT%H:%MZ), commit $(cat "$DIST/COMMIT" 2>/dev/null | tr '\n' ' ')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  echo "server: $SERVE"
} | tee "$OUT/serve.md"

t0=$SECONDS
# shellcheck disable=SC2086
timeout 120 $PY "$CLIENT" --label "cold + warm starts, prefix cache on" --starts 3 --cold --cache-dir "$CACHE" $SIZES $LIMITS \
  --json "$OUT/serve_main.json" --server-log "$OUT/serve_main.log" -- $SERVE > "$WORK/main.txt" || status=1
echo "- run 1 (3 starts, turn 2, decode): $((SECONDS - t0)) s" | tee -a "$OUT/serve.md"

t0=$SECONDS
# shellcheck disable=SC2086
Q35JIT_CACHE_DIR=$CACHE timeout 60 $PY "$CLIENT" --label "prefix cache off" --starts 1 --no-expect-cache $SIZES $LIMITS \
  --decode-tokens 0 --json "$OUT/serve_nocache.json" --server-log "$OUT/serve_nocache.log" -- $SERVE --prefix-cache-gb 0 \
  --prefix-cache-gpu-gb 0 > "$WORK/nocache.txt" || status=1
echo "- run 2 (--prefix-cache-gb 0 --prefix-cache-gpu-gb 0, turn 2): $((SECONDS - t0)) s" | tee -a "$OUT/serve.md"

t0=$SECONDS
# shellcheck disable=SC2086
Q35JIT_CACHE_DIR=$CACHE timeout 60 $PY "$CLIENT" --label "prefix cache in pinned host memory only" --starts 1 $SIZES $LIMITS \
  --decode-tokens 0 --json "$OUT/serve_hostcache.json" --server-log "$OUT/serve_hostcache.log" -- $SERVE \
  --prefix-cache-gpu-gb 0 > "$WORK/hostcache.txt" || status=1
echo "- run 2b (--prefix-cache-gpu-gb 0: hits from pinned host memory): $((SECONDS - t0)) s" | tee -a "$OUT/serve.md"

BENCH_ARGS=()
if [ "$BENCH" = 1 ]; then
  CTX=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['decode']['mid_context'])" "$OUT/serve_main.json" 2>/dev/null || echo 384)
  t0=$SECONDS
  if Q35JIT_CACHE_DIR=$CACHE timeout 90 $BIN bench --synthetic 35b-a3b --quant w4a16 --group-size 128 --configs tuned --prefill 128 \
       --decode-contexts "$CTX" --decode-steps 256 --repeats 1 --json "$OUT/serve_bench_decode.json" > "$OUT/bench.log" 2>&1; then
    BENCH_ARGS=(--bench-json "$OUT/serve_bench_decode.json")
  else
    status=1
    echo "- bench FAILED (see $OUT/bench.log):" | tee -a "$OUT/serve.md"
    tail -5 "$OUT/bench.log" | sed 's/^/  /' | tee -a "$OUT/serve.md"
  fi
  echo "- run 3 (bench decode at context $CTX): $((SECONDS - t0)) s" | tee -a "$OUT/serve.md"
fi

# 4. load_test.py (stdlib only) for 10 s with 4 streams, on a server started here: its p50 / p95 TTFT and
#    time between tokens (the GPU engine runs one sequence at a time: the others queue).
if [ "${LOAD_TEST:-1}" = 1 ]; then
  t0=$SECONDS
  LOADTEST=$DIST/load_test.py
  [ -f "$LOADTEST" ] || LOADTEST=tests/server/load_test.py
  # shellcheck disable=SC2086
  Q35JIT_CACHE_DIR=$CACHE $SERVE 2> "$OUT/serve_load.log" > /dev/null &
  pid=$!
  port=""
  for _ in $(seq 600); do  # the port from the "serving ... on http://127.0.0.1:PORT" line, 60 s at most
    port=$(sed -n 's/.*serving .* on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$OUT/serve_load.log" | head -1)
    [ -n "$port" ] || ! kill -0 $pid 2>/dev/null && break
    sleep 0.1
  done
  if [ -n "$port" ] && $PY -c "import sys,time,urllib.request as u
for _ in range(300):
    try:
        sys.exit(0 if u.urlopen('http://127.0.0.1:$port/health', timeout=5).status == 200 else 1)
    except OSError: time.sleep(0.1)
sys.exit(1)"; then
    timeout 60 $PY "$LOADTEST" --url "http://127.0.0.1:$port" --concurrency 4 --duration 10 --max-tokens 128 \
      > "$WORK/load.txt" 2>&1 || status=1
  else
    echo "- load test: the server did not start (see $OUT/serve_load.log)" | tee -a "$OUT/serve.md"
    status=1
  fi
  kill -TERM $pid 2>/dev/null
  wait $pid || { status=1; echo "- load test: the server did not exit 0 after SIGTERM" | tee -a "$OUT/serve.md"; }
  { echo "- load test (tests/server/load_test.py, 4 streams, 10 s, 128 tokens each): $((SECONDS - t0)) s"
    sed 's/^/    /' "$WORK/load.txt" 2>/dev/null; } | tee -a "$OUT/serve.md"
fi

$PY "$CLIENT" --report "$OUT/serve_main.json" "$OUT/serve_nocache.json" "$OUT/serve_hostcache.json" "${BENCH_ARGS[@]}" \
  | tee -a "$OUT/serve.md"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "- overall: $([ $status = 0 ] && echo PASS || echo FAIL)" | tee -a "$OUT/serve.md"
exit $status
