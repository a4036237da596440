#!/usr/bin/env bash
# The installed tree works for an engine outside this repository (ctest: install_tree):
#   1. `cmake --install` into an empty prefix: daemon, CLI, client library, headers, package
#      config, pkg-config file, Python package;
#   2. every public header compiles on its own with only the prefix (and Abseil) on the include
#      path: the installed tree is self-contained;
#   3. examples/cpp builds against it with find_package(IceCache) + icecache::client, and again
#      with pkg-config alone;
#   4. both binaries run a decode loop against the installed icecached, the installed CLI
#      reaches it, and the installed Python package (when built) attaches to it.
#   tests/install/run.sh BUILD_DIR [PYTHON]
set -euo pipefail
build="$1"
python="${2:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="$(mktemp -d)"
daemon_pid=""
cleanup() {
  [[ -n "$daemon_pid" ]] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
prefix="$work/prefix"

echo "== cmake --install into $prefix"
cmake --install "$build" --prefix "$prefix" >"$work/install.log"
for f in bin/icecached bin/icecache include/icecache/client.h include/icecache/attachment.h \
         include/icecache/execution_mode.h include/icecache/deps/common/dtype.h \
         include/icecache/deps/proto/icecache/v1/abi.h lib/cmake/IceCache/IceCacheConfig.cmake \
         lib/pkgconfig/icecache-client.pc; do
  [[ -e "$prefix/$f" ]] || { echo "missing $f"; exit 1; }
done
ls "$prefix"/lib/libicecache_client.so* >/dev/null
# Nothing of the build tree is referenced by the installed library.
if readelf -d "$prefix"/lib/libicecache_client.so | grep -q "$build"; then
  echo "libicecache_client.so references the build tree"; exit 1
fi
# Only the public API's symbols are exported (the internal archives stay hidden).
if nm -D --defined-only "$prefix"/lib/libicecache_client.so | c++filt | grep -q "google::protobuf"; then
  echo "libicecache_client.so exports protobuf symbols"; exit 1
fi

echo "== public headers alone"
for h in client.h attachment.h execution_mode.h; do
  echo "#include \"icecache/$h\"" >"$work/h.cc"
  c++ -std=c++20 -fsyntax-only -I"$prefix/include" -I"$prefix/include/icecache/deps" "$work/h.cc"
done

echo "== examples/cpp with find_package(IceCache)"
cmake -S "$root/examples/cpp" -B "$work/example" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" \
  >"$work/configure.log" || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/example" >"$work/build.log" || { cat "$work/build.log"; exit 1; }

echo "== examples/cpp with pkg-config"
PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --exists icecache-client
# shellcheck disable=SC2046
c++ -std=c++20 "$root/examples/cpp/decode_loop.cc" -o "$work/decode_loop_pc" \
  $(PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --cflags --libs icecache-client)

echo "== run against the installed icecached"
sock="$work/icecached.sock"
"$prefix/bin/icecached" --socket="$sock" --metrics-port=-1 --memory-limit=1GiB \
  >"$work/icecached.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 200); do [[ -S "$sock" ]] && break; sleep 0.05; done
"$prefix/bin/icecache" --socket="$sock" status >/dev/null
for bin in "$work/example/decode_loop" "$work/decode_loop_pc"; do
  out="$("$bin" "$sock")"
  echo "$out"
  grep -q "^decoded 32 steps x 4 layers" <<<"$out"
done
if [[ -n "$python" ]]; then
  site="$(ls -d "$prefix"/lib/python3*/site-packages 2>/dev/null | head -1)"
  [[ -d "$site/icecache" ]] || { echo "the Python package was not installed"; exit 1; }
  PYTHONPATH="$site" "$python" - "$sock" <<'PY'
import sys
import icecache, icecache._core
assert icecache._core.__file__.startswith(sys.path[1]) or "site-packages" in icecache._core.__file__
c = icecache.Client.attach(sys.argv[1], mode=icecache.ExecutionMode.CPU)
s = c.create_sequence(2, 4, 2, 64, max_tokens=64, dtype=icecache.DType.FP16)
print("python from the installed tree:", icecache._core.__file__, s.handle)
PY
fi
echo "install_tree: ok"
