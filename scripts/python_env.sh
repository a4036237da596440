#!/usr/bin/env bash
# Makes (once) and prints the path of the cached Python virtual environment the Python package,
# its tests and benchmarks use: Debian's python3 (not the system's site-packages) with every
# package of python/requirements.lock at its pinned version. The directory is named after a
# hash of the lock file and the interpreter, so a changed pin makes a new environment and an
# unchanged one is reused:
#
#   venv="$(scripts/python_env.sh)"      # ~/.cache/icecache/venv-<hash>
#   scripts/python_env.sh --relock       # re-pins python/requirements.lock from requirements.txt
#
# First install: torch's PyPI wheel brings its CUDA libraries (about 5.6 GB installed).
# ICECACHE_VENV=DIR uses DIR instead of the cache.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/python/requirements.txt"
lock="$root/python/requirements.lock"
py=/usr/bin/python3
cache="${XDG_CACHE_HOME:-$HOME/.cache}/icecache"

# Debian's venv module and the headers nanobind compiles against.
need=()
for p in python3-venv python3-dev python3-pip; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]} > 0)); then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "python_env: installing ${need[*]}" >&2
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
fi

if [[ "${1:-}" == "--relock" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$py" -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install -q -r "$req" >&2
  {
    echo "# Every package of the Python side at its pinned version: generated from"
    echo "# requirements.txt by scripts/python_env.sh --relock on $($py --version). Do not edit."
    "$tmp/venv/bin/pip" freeze --all | grep -v -E '^(setuptools|wheel)=='
  } >"$lock"
  echo "python_env: wrote $lock" >&2
  exit 0
fi

hash="$( (cat "$lock"; "$py" --version) | sha256sum | cut -c1-12)"
venv="${ICECACHE_VENV:-$cache/venv-$hash}"
if [[ -f "$venv/.icecache-complete" ]]; then
  echo "$venv"
  exit 0
fi
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
echo "python_env: creating $venv from python/requirements.lock (first time: downloads about" \
     "3 GB of wheels, torch with its CUDA libraries)..." >&2
start=$SECONDS
"$py" -m venv "$venv"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$venv/bin/pip" install --disable-pip-version-check -q --no-deps -r "$lock" >"$log" 2>&1; then
  tail -30 "$log" >&2
  echo "python_env: pip install failed (is pypi.org reachable?)" >&2
  exit 1
fi
touch "$venv/.icecache-complete"
echo "python_env: ready in $((SECONDS - start)) s: $venv" >&2
echo "$venv"
