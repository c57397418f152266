# Pieces the GPU machine's scripts share (gpu_serve.sh, gpu_load.sh source it; scripts/pack_gpu.sh
# copies it into dist/ beside them).

# q35_find_dist NAME SCRIPT_DIR: DIST = the folder holding the packed q35jit (SCRIPT_DIR itself when
# the script runs from dist/, else SCRIPT_DIR/../dist); exits 2 with a line naming NAME when there is none.
q35_find_dist() {
  local name=$1 here=$2
  if [ -x "$here/q35jit" ]; then DIST=$here; else DIST=$(cd "$here/../dist" 2>/dev/null && pwd) || DIST=""; fi
  if [ -z "$DIST" ] || [ ! -x "$DIST/q35jit" ]; then
    echo "$name: no dist/q35jit beside or above this script: run scripts/pack_gpu.sh first" >&2
    exit 2
  fi
}

# q35_unpack_tokenizer DIR: DIR/tokenizer.json from the real Qwen3.5 vocabulary pack_gpu.sh carries
# ($DIST/qwen35-tokenizer.json.gz, gzip); returns 1 (writing nothing) when the pack has none.
q35_unpack_tokenizer() {
  local dir=$1
  [ -f "$DIST/qwen35-tokenizer.json.gz" ] || return 1
  mkdir -p "$dir"
  "${PYTHON:-python3}" -c "import gzip,shutil,sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$DIST/qwen35-tokenizer.json.gz" "$dir/tokenizer.json"
}
