#!/usr/bin/env bash
# The icecache Python package on the GPU machine, in one device call (from the bundle of
# bench/gpu/pack.sh; bench/gpu/run.sh runs this last):
#
#   device run: bash bench/gpu/run_python.sh   (carry [".gpu-pack"], timeout_s 420)
#
# 1. Builds the package for that machine's python3 (3.12, torch 2.11, transformers 5.17,
#    nanobind, scikit-build-core, no network) from python/ in the working tree against the
#    prebuilt client in .gpu-pack/prefix: `pip install --no-build-isolation` (scikit-build-core),
#    or CMake directly when that fails.
# 2. bench/gpu/python_batch.py: transformers on a small random Llama through IceCacheCache in
#    CUDA mode (tokens equal to full attention's with the budget covering the context), then the
#    batch sweep (1, 4, 16, 64 sequences of 32k, 8B-shaped layer) with PyTorch CUDA tensors.
# Results to $OUT (or bench/results/gpu).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pack="$root/.gpu-pack"
out="${OUT:-$root/bench/results/gpu}"
mkdir -p "$out"
[[ -d "$pack/prefix" ]] || { echo "run_python.sh: no $pack/prefix (run bench/gpu/pack.sh)"; exit 1; }
py="${PYTHON:-python3}"
export LD_LIBRARY_PATH="$pack/pylib:$pack/prefix/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS=100
libpath="$pack/lib:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:/usr/lib/x86_64-linux-gnu:/usr/lib64"
cat >/tmp/icecached-run <<WRAP
#!/bin/sh
exec "$pack/lib/ld-linux-x86-64.so.2" --library-path "$libpath" "$pack/bin/icecached" "\$@"
WRAP
chmod +x /tmp/icecached-run
log="$out/python.log"
echo "== Python package for $($py --version 2>&1) ($(date +%T))" | tee -a "$log"
site=/tmp/icecache-site
rm -rf "$site" /tmp/icecache-py-build
start=$SECONDS
if $py -m pip install --no-build-isolation --no-deps --no-index --target "$site" \
     -C cmake.define.ICECACHE_PREBUILT_CLIENT="$pack/prefix" \
     -C build-dir=/tmp/icecache-py-build "$root/python" >>"$log" 2>&1; then
  echo "built with pip + scikit-build-core in $((SECONDS - start)) s" | tee -a "$log"
else
  echo "pip build failed (log: $log); CMake directly" | tee -a "$log"
  cmake -S "$root/python" -B /tmp/icecache-py-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v "$py")" -DICECACHE_PREBUILT_CLIENT="$pack/prefix" \
    >>"$log" 2>&1 && cmake --build /tmp/icecache-py-build >>"$log" 2>&1 ||
    { tail -40 "$log"; echo "run_python.sh: the package did not build"; exit 1; }
  site=/tmp/icecache-py-build
  echo "built with CMake in $((SECONDS - start)) s" | tee -a "$log"
fi
export PYTHONPATH="$site"
echo "== transformers on a random Llama + batch sweep, CUDA mode ($(date +%T))" | tee -a "$log"
timeout 400 "$py" -u "$root/bench/gpu/python_batch.py" --icecached=/tmp/icecached-run \
  --out="$out" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
