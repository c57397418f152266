#!/usr/bin/env bash
# Installs what q35jit needs to build and test, from Debian packages and PyPI only.
#   scripts/setup.sh          build dependencies (Debian packages) + check the CUDA toolkit
#   scripts/setup.sh --test   also the Python venv (.venv) for the tokenizer goldens and the server tests
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(cmake g++ make pkg-config libfmt-dev nlohmann-json3-dev doctest-dev libpcre2-dev libutf8proc-dev libboost-dev python3-venv)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -f "$CUDA_HOME/include/nvrtc.h" ] || [ ! -f "$CUDA_HOME/include/cuda.h" ]; then
  echo "[setup] error: the CUDA toolkit (NVRTC + headers) was not found under CUDA_HOME=$CUDA_HOME." >&2
  echo "[setup]        Install the CUDA 13 toolkit or set CUDA_HOME." >&2
  exit 1
fi

if [ "${1:-}" = "--test" ]; then
  REQS=(tests/python/requirements-goldens.txt tests/python/requirements-server.txt)
  STAMP=.venv/.requirements.sha256
  want=$(cat "${REQS[@]}" | sha256sum | cut -d' ' -f1)
  if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "[setup] creating .venv from ${REQS[*]}"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check "${REQS[@]/#/-r}"
    echo "$want" > "$STAMP"
  fi
fi
