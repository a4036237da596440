#!/usr/bin/env bash
# Prepares the GPU run (on the development machine): builds, then bundles the GPU tests, the
# GPU benchmarks, icecached and every shared library they load (glibc and its loader too, so
# the bundle runs whatever the GPU machine's own libraries are) into .gpu-pack/, which the
# device call carries:
#
#   bench/gpu/pack.sh            # here
#   device run: bash bench/gpu/run.sh   with carry [".gpu-pack"]
#
# The GPU machine has CUDA's driver and toolchain but not this project's Debian libraries
# (gRPC, Protobuf, Abseil, prometheus-cpp), so nothing is built there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${ICECACHE_BUILD_DIR:-$root/build}"
pack="$root/.gpu-pack"

"$root/scripts/build.sh"
rm -rf "$pack"
mkdir -p "$pack/bin" "$pack/lib"
bins=(
  "$build/tests/kernels_gpu_test"
  "$build/tests/client_gpu_test"
  "$build/server/main/icecached"
  "$build/bench/gpu_gather"
  "$build/bench/client_decode"
  "$build/bench/token_step"
)
for b in "${bins[@]}"; do
  [[ -x "$b" ]] || { echo "pack.sh: missing $b (is CUDA enabled in the build?)" >&2; exit 1; }
  objcopy --strip-debug "$b" "$pack/bin/$(basename "$b")"
  # Every library the dynamic loader resolves, except the driver's (it comes with the machine).
  ldd "$b" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
    case "$(basename "$lib")" in
      libcuda.so*|libnvidia*) continue ;;
    esac
    dest="$pack/lib/$(basename "$lib")"
    [[ -e "$dest" ]] || objcopy --strip-debug "$(readlink -f "$lib")" "$dest"
  done
done
# The loader, by its usual name.
loader="$(ldd "$build/server/main/icecached" | awk '/ld-linux/ {print $1}')"
cp -L "$loader" "$pack/lib/ld-linux-x86-64.so.2"
chmod +x "$pack/lib/ld-linux-x86-64.so.2"
du -sh "$pack"
size_kib="$(du -sk "$pack" | cut -f1)"
if (( size_kib > 60 * 1024 )); then
  echo "pack.sh: the bundle is over 60 MiB; the device call carries at most 64 MiB" >&2
  exit 1
fi
echo "pack.sh: bundle ready in $pack"
