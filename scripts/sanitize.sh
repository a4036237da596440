#!/usr/bin/env bash
# The tests under sanitizers, with every binary they start (icecached, the CLI, the test
# client) built the same way (clang, no CUDA):
#   --asan  AddressSanitizer + UndefinedBehaviorSanitizer: the unit and integration tests
#           (ctest -L "unit|integration", without the deployment checks and the format check);
#   --tsan  ThreadSanitizer: the data plane, security, client and core tests.
# Default: both. --configure-only configures the ASan tree (shared with scripts/fuzz.sh).
# Build trees: ${ICECACHE_BUILD_DIR:-build}-asan and -tsan. A sanitizer report fails the run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base="${ICECACHE_BUILD_DIR:-$root/build}"
asan_dir="${ICECACHE_SAN_BUILD_DIR:-$base-asan}"
tsan_dir="$base-tsan"
do_asan=0 do_tsan=0 configure_only=0
for a in "$@"; do
  case "$a" in
    --asan) do_asan=1 ;;
    --tsan) do_tsan=1 ;;
    --configure-only) configure_only=1 ;;
    *) echo "sanitize.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
((do_asan || do_tsan || configure_only)) || { do_asan=1; do_tsan=1; }

"$root/scripts/bootstrap.sh"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
configure() {  # dir sanitizers extra...
  local dir="$1" san="$2"
  shift 2
  if ! CC=clang CXX=clang++ cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
       -DICECACHE_SANITIZE="$san" -DICECACHE_ENABLE_CUDA=OFF -DICECACHE_BUILD_BENCHMARKS=OFF \
       -DICECACHE_BUILD_PYTHON=OFF -DICECACHE_INSTALL=OFF "$@" >"$log" 2>&1; then
    cat "$log"; echo "sanitize.sh: configuring $dir failed" >&2; exit 1
  fi
}
build() {  # dir targets...
  local dir="$1"
  shift
  if ! cmake --build "$dir" -j "$(nproc)" ${1:+--target "$@"} >"$log" 2>&1; then
    grep -E "error|FAILED" -A3 "$log" | head -60; echo "sanitize.sh: building in $dir failed" >&2
    exit 1
  fi
}

configure "$asan_dir" "address,undefined" -DICECACHE_BUILD_FUZZERS=ON
((configure_only)) && exit 0

export GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS=100
if ((do_asan)); then
  build "$asan_dir"
  echo "sanitize.sh: ASan+UBSan: unit and integration tests"
  ASAN_OPTIONS="abort_on_error=1:detect_leaks=1" UBSAN_OPTIONS="print_stacktrace=1" \
    ctest --test-dir "$asan_dir" --output-on-failure -j "$(nproc)" --timeout 600 \
    -L "unit|integration" -LE "deploy|gpu|fuzz|image" -E "format_check"
fi
if ((do_tsan)); then
  configure "$tsan_dir" "thread"
  tests=(data_plane_integration_test security_integration_test client_integration_test
         client_test core_test)
  build "$tsan_dir" "${tests[@]}" icecached icecache_test_client icecache_cli
  echo "sanitize.sh: TSan: data plane, security, client and core tests"
  export TSAN_OPTIONS="halt_on_error=1:abort_on_error=1:second_deadlock_stack=1:suppressions=$root/tests/tsan.supp"
  for t in "${tests[@]}"; do
    "$tsan_dir/tests/$t" --gtest_brief=1
  done
fi
