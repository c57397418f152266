#!/usr/bin/env bash
# Per-kernel GPU time of whole prefills on the GPU machine, with Nsight Compute: only the timed
# prefills of `bench --profile` are recorded (cuProfilerStart / cuProfilerStop), each kernel's
# gpu__time_duration is read, and scripts/ncu_summary.py sums them per kernel per prefill.
#   scripts/gpu_profile.sh [LENGTHS] [BENCH FLAGS...]   e.g. scripts/gpu_profile.sh 128,4096
#   scripts/gpu_profile.sh decode [BENCH FLAGS...]       one decode step's kernels (3 steps recorded)
# CONFIGS=default profiles the default tiles instead of the tuned ones.
# Writes $OUT/profile_<L>.csv (raw) and $OUT/profile.md (the tables).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-report}"
mkdir -p "$OUT"
# The kernel cache scripts/pack_gpu.sh compiled (carried compressed): unpacked once into dist/jit-cache.
if [ -f dist/jit-cache.tgz ] && [ ! -d dist/jit-cache ]; then
  mkdir -p dist/jit-cache && tar xzf dist/jit-cache.tgz -C dist/jit-cache
fi
export Q35JIT_CACHE_DIR="${Q35JIT_CACHE_DIR:-$PWD/dist/jit-cache}"
LENGTHS=${1:-128,512,4096}
shift || true
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)}
[ -n "$NCU" ] || { echo "gpu_profile: ncu (Nsight Compute) not found; set NCU=/path/to/ncu" >&2; exit 1; }
if [ "$LENGTHS" = decode ]; then  # one decode step's kernels: the first chained run (3 steps) at context 128
  $NCU --profile-from-start off --clock-control none --cache-control none \
       --metrics gpu__time_duration.sum --csv --page raw --print-units base \
       dist/q35jit bench --synthetic 35b-a3b --configs "${CONFIGS:-tuned}" --prefill 16 --repeats 1 \
       --decode-contexts 128 --decode-steps 9 --profile-decode "$@" > "$OUT/profile_decode.csv" 2> "$OUT/profile_decode.err" ||
    { tail -20 "$OUT/profile_decode.err"; exit 1; }
  python3 scripts/ncu_summary.py "$OUT/profile_decode.csv" --title "decode at context 128 (${CONFIGS:-tuned})" --runs 3 | tee -a "$OUT/profile.md"
  exit 0
fi
for L in ${LENGTHS//,/ }; do
  # --clock-control none / --cache-control none: the GPU's own clocks, caches as a real run leaves them.
  $NCU --profile-from-start off --clock-control none --cache-control none \
       --metrics gpu__time_duration.sum --csv --page raw --print-units base \
       dist/q35jit bench --synthetic 35b-a3b --configs "${CONFIGS:-tuned}" --prefill "$L" --repeats 1 \
       --decode-contexts 128 --decode-steps 3 --profile "$@" > "$OUT/profile_$L.csv" 2> "$OUT/profile_$L.err" ||
    { tail -20 "$OUT/profile_$L.err"; exit 1; }
  python3 scripts/ncu_summary.py "$OUT/profile_$L.csv" --title "prefill $L tokens (${CONFIGS:-tuned})" --runs 1 | tee -a "$OUT/profile.md"
done
