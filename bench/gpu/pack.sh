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
  "$build/bench/batch_decode"
  "$build/bench/restart"
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
# The Python package is built on the GPU machine for its own Python (3.12, torch 2.11) from
# python/ in the working tree (bench/gpu/run_python.sh), against this prebuilt client: the
# shared libicecache_client with CUDA and its headers (cmake --install, component client),
# Abseil's headers (the public API uses absl::Status), and in pylib/ links to the bundled
# libraries it needs, without glibc, libstdc++ or libcudart (the Python process brings its own).
cmake --install "$build" --prefix "$pack/prefix" --component client >/dev/null
cp -r /usr/include/absl "$pack/prefix/include/absl"
mkdir -p "$pack/pylib"
ldd "$pack/prefix/lib/libicecache_client.so" | awk '/=> \// {print $3}' | while read -r lib; do
  name="$(basename "$lib")"
  case "$name" in
    libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|libstdc++.so*|libgcc_s.so*|ld-linux*) continue ;;
    libcuda.so*|libcudart.so*|libnvidia*) continue ;;
  esac
  [[ -e "$pack/lib/$name" ]] || objcopy --strip-debug "$(readlink -f "$lib")" "$pack/lib/$name"
  ln -sf "../lib/$name" "$pack/pylib/$name"
  # The unversioned name the linker looks for (-labsl_status ...), beside the client library.
  ln -sf "../../lib/$name" "$pack/prefix/lib/${name%%.so*}.so"
done
objcopy --strip-debug "$(readlink -f "$pack/prefix/lib/libicecache_client.so")"
du -sh "$pack"
size_kib="$(du -sk "$pack" | cut -f1)"
if (( size_kib > 60 * 1024 )); then
  echo "pack.sh: the bundle is over 60 MiB; the device call carries at most 64 MiB" >&2
  exit 1
fi
echo "pack.sh: bundle ready in $pack"
