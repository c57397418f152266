#!/usr/bin/env bash
# Packs what the GPU machine needs into dist/ (ignored by git, carried to the device): the stripped
# q35jit and test_gpu binaries, the commit, and the kernel cache compiled here for sm_90a.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
cmake --build "$BUILD" --target q35jit test_gpu -j "$(nproc)"
rm -rf dist && mkdir -p dist
strip -o dist/q35jit "$BUILD/q35jit"
strip -o dist/test_gpu "$BUILD/tests/test_gpu"
git rev-parse --short HEAD > dist/COMMIT
git diff --quiet || echo "(+ uncommitted changes)" >> dist/COMMIT
Q35JIT_CACHE_DIR=$PWD/dist/jit-cache dist/q35jit compile --model tests/fixtures/tiny-qwen35moe --arch sm_90a --quant bf16 >/dev/null
du -sh dist
