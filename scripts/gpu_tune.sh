#!/usr/bin/env bash
# Tunes a published model's shapes (MODEL, a --synthetic preset: 35b-a3b by default, 122b-a10b, ...)
# on the GPU machine into $OUT/<GPU name>.json, starting from tune_cache/<GPU name>.json when the repo
# has one (resume), so the file in $OUT is current after every measured bucket even if the call is
# cut off. Expects dist/ from scripts/pack_gpu.sh.
#   scripts/gpu_tune.sh SECONDS GROUP...    e.g. scripts/gpu_tune.sh 500 128 32
#   MODEL=122b-a10b scripts/gpu_tune.sh 500 128
#   scripts/gpu_tune.sh 300 fp8             (GROUP fp8: the FP8 weight format, --quant fp8)
# BUCKETS=1,2,4 limits the M buckets (default: the tuner's).
# The tuner is sent SIGINT after SECONDS in all: it saves every finished measurement and stops, and
# the next call continues (--resume).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-report}"
mkdir -p "$OUT"
budget=$1; shift
export Q35JIT_CACHE_DIR=/tmp/q35jit-tune-cache   # kept while the machine stays warm
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/[^A-Za-z0-9._-]/_/g')
file="$OUT/$name.json"
[ -f "tune_cache/$name.json" ] && cp "tune_cache/$name.json" "$file"
t_end=$((SECONDS + budget))
status=0
for g in "$@"; do
  left=$((t_end - SECONDS))
  [ $left -le 10 ] && break
  echo "=== group $g: $left s left" | tee -a "$OUT/tune.log"
  if [ "$g" = fp8 ]; then fmt=(--quant fp8); else fmt=(--quant w4a16 --group-size "$g"); fi
  [ -n "${BUCKETS:-}" ] && fmt+=(--buckets "$BUCKETS")
  timeout -s INT $left dist/q35jit tune --synthetic "${MODEL:-35b-a3b}" "${fmt[@]}" --out "$file" --resume --quiet \
    >> "$OUT/tune.log" 2>&1 || status=$?
  echo "=== group $g: exit $status" | tee -a "$OUT/tune.log"
done
[ -f "$file" ] || echo "no tune file written" | tee -a "$OUT/tune.log"
exit $status
