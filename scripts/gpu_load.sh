#!/usr/bin/env bash
# Continuous batching under load (issue 11), on the GPU machine from the folder scripts/pack_gpu.sh packs:
# `q35jit serve --synthetic 35b-a3b` (W4A16 g128, --max-batch $MAX_BATCH) on 127.0.0.1, driven by
# tests/server/load_test.py (Python standard library only):
#   1. one stream of $PROMPT-token prompts: the single-stream time between tokens (p95)
#   2. $STREAMS streams of $PROMPT-token prompts: new prompts keep arriving (each stream starts a new
#      request when its reply ends) while the others decode; total tok/s, TTFT, time between tokens
# PASS when no request fails, the server exits 0 on SIGTERM and the p95 time between tokens of (2) is at
# most 2.5x that of (1). Prints one summary block (also $OUT/load.md); the JSON of each run and the
# server log go to $OUT.
#   scripts/gpu_load.sh          (or dist/gpu_load.sh)        ~1.5 minutes on an H200
# Environment: OUT (default ./gpu-report), MAX_BATCH (16), MAX_CONTEXT (8192), STREAMS (16), PROMPT (2000), TOKENS (256, max
# tokens of each reply), DURATION (30 s for (2); (1) runs a third of it), SERVE_FLAGS (more serve flags),
# SERVE_MODEL (model flags instead of the synthetic 35B, e.g. "--model tests/fixtures/tiny-qwen35moe --device cpu").
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/gpu_lib.sh
. "$HERE/gpu_lib.sh"
q35_find_dist gpu_load.sh "$HERE"
cd "$DIST/.."
OUT="${OUT:-$PWD/gpu-report}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOADTEST=$DIST/load_test.py
[ -f "$LOADTEST" ] || LOADTEST=tests/server/load_test.py
MAX_BATCH=${MAX_BATCH:-16} STREAMS=${STREAMS:-16} PROMPT=${PROMPT:-2000} TOKENS=${TOKENS:-256} DURATION=${DURATION:-30}
WORK=$(mktemp -d /tmp/q35-gpu-load.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
TOK=$WORK/tokenizer
if [ -n "${SERVE_MODEL:-}" ]; then
  MODEL_ARGS=$SERVE_MODEL
elif q35_unpack_tokenizer "$TOK"; then
  MODEL_ARGS="--synthetic 35b-a3b --tokenizer $TOK --quant w4a16 --group-size 128"
else
  echo "gpu_load.sh: no $DIST/qwen35-tokenizer.json.gz (scripts/pack_gpu.sh after make goldens)" >&2
  exit 2
fi
status=0
# shellcheck disable=SC2086
"$DIST/q35jit" serve $MODEL_ARGS --host 127.0.0.1 \
  --port 0 --max-batch "$MAX_BATCH" --max-context "${MAX_CONTEXT:-8192}" ${SERVE_FLAGS:-} 2> "$OUT/serve_batch.log" > /dev/null &
pid=$!
port=""
for _ in $(seq 1200); do  # the port from the "serving ... on http://127.0.0.1:PORT" line, 120 s at most
  port=$(sed -n 's/.*serving .* on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$OUT/serve_batch.log" | head -1)
  [ -n "$port" ] || ! kill -0 $pid 2>/dev/null && break
  sleep 0.1
done
one() {  # one load test: name, concurrency, duration
  timeout $(( ${3%.*} * 4 + 120 )) $PY "$LOADTEST" --url "http://127.0.0.1:$port" --concurrency "$2" --duration "$3" \
    --max-tokens "$TOKENS" --prompt-tokens "$PROMPT" --json > "$OUT/load_$1.json" 2> "$WORK/$1.err" \
    || { status=1; echo "- $1: load_test.py failed: $(head -c 400 "$WORK/$1.err")" | tee -a "$OUT/load.md"; }
}
if [ -n "$port" ]; then
  one single 1 $((DURATION / 3))
  one batch "$STREAMS" "$DURATION"
else
  echo "- the server did not start (see $OUT/serve_batch.log)" | tee -a "$OUT/load.md"
  status=1
fi
kill -TERM $pid 2>/dev/null
wait $pid || { status=1; echo "- the server did not exit 0 after SIGTERM" | tee -a "$OUT/load.md"; }
$PY - "$OUT/load_single.json" "$OUT/load_batch.json" "$STREAMS" "$PROMPT" "$MAX_BATCH" <<'PYEOF' | tee -a "$OUT/load.md"
import json, sys
try:
    s, b = (json.load(open(p)) for p in sys.argv[1:3])
except (OSError, ValueError) as e:
    print(f"- no load-test results: {e}"); sys.exit(1)
def row(name, r):
    f = lambda p, k: f"{p[k]:.1f}" if p else "n/a"
    return (f"| {name} | {r['requests']} ({r['errors']} errors) | {r['total_tok_s']:.0f} | {f(r['per_stream_tok_s'], 'p50')} | "
            f"{f(r['ttft_ms'], 'p50')} / {f(r['ttft_ms'], 'p95')} | {f(r['tbt_ms'], 'p50')} / {f(r['tbt_ms'], 'p95')} |")
print(f"## load test: {sys.argv[4]}-token prompts, --max-batch {sys.argv[5]}")
print("| streams | requests | total tok/s | per-stream tok/s p50 | TTFT ms p50 / p95 | between tokens ms p50 / p95 |")
print("|---|---|---|---|---|---|")
print(row("1", s)); print(row(sys.argv[3], b))
ok = not s["errors"] and not b["errors"] and s["tbt_ms"] and b["tbt_ms"]
ratio = b["tbt_ms"]["p95"] / s["tbt_ms"]["p95"] if ok else float("nan")
print(f"- p95 between tokens, {sys.argv[3]} streams / 1 stream: {ratio:.2f}x (target <= 2.5x)")
sys.exit(0 if ok and ratio <= 2.5 else 1)
PYEOF
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "- overall: $([ $status = 0 ] && echo PASS || echo FAIL)" | tee -a "$OUT/load.md"
exit $status
