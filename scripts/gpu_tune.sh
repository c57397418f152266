#!/usr/bin/env bash
# Tunes the Qwen3.5-35B-A3B shapes on the GPU machine into tune_cache/<GPU name>.json (the shipped
# cache), resuming whatever that file already holds, then copies it to $OUT. Expects dist/ from
# scripts/pack_gpu.sh.
#   scripts/gpu_tune.sh SECONDS GROUP...    e.g. scripts/gpu_tune.sh 500 128 32
# The tuner is sent SIGINT after SECONDS in all: it saves every finished measurement and stops, and
# the next call continues (--resume).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-report}"
mkdir -p "$OUT"
budget=$1; shift
export Q35JIT_CACHE_DIR=/tmp/q35jit-tune-cache   # kept while the machine stays warm
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/[^A-Za-z0-9._-]/_/g')
file="tune_cache/$name.json"
t_end=$((SECONDS + budget))
status=0
for g in "$@"; do
  left=$((t_end - SECONDS))
  [ $left -le 10 ] && break
  echo "=== group $g: $left s left" | tee -a "$OUT/tune.log"
  timeout -s INT $left dist/q35jit tune --synthetic 35b-a3b --group-size "$g" --out "$file" --resume --quiet \
    >> "$OUT/tune.log" 2>&1 || status=$?
  echo "=== group $g: exit $status" | tee -a "$OUT/tune.log"
done
cp "$file" "$OUT/" 2>/dev/null || echo "no tune file written" | tee -a "$OUT/tune.log"
exit $status
