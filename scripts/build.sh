#!/usr/bin/env bash
# Configures and builds IceCache into ./build (or $ICECACHE_BUILD_DIR): warnings as errors,
# CUDA when nvcc is found. Quiet unless something fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${ICECACHE_BUILD_DIR:-$root/build}"
jobs="$(nproc)"

"$root/scripts/bootstrap.sh"
# nvcc lives outside PATH on some machines; CMake finds it through CUDACXX.
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc && -z "${CUDACXX:-}" ]]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
     -DICECACHE_WERROR=ON "$@" >"$log" 2>&1; then
  cat "$log"; echo "build.sh: cmake configure failed" >&2; exit 1
fi
grep -E "^-- IceCache:" "$log" || true
if ! cmake --build "$build" -j "$jobs" >"$log" 2>&1; then
  grep -E "error|FAILED" -A3 "$log" | head -80; echo "build.sh: build failed (full log above)" >&2
  exit 1
fi
echo "build.sh: built in $build"
