#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, AddressSanitizer + UndefinedBehaviorSanitizer) and runs
# each for a given time on a copy of its seed corpus (tests/fuzz/corpus/<target>).
#
#   scripts/fuzz.sh [--seconds N] [--jobs J] [--out FILE.json] [TARGET ...]
#
# Defaults: 10 seconds per target, one target at a time, every target. The build goes to
# $ICECACHE_SAN_BUILD_DIR (default build-asan next to the build directory), the same tree
# scripts/sanitize.sh runs the tests from. Prints executions, speed and crashes per target;
# exits non-zero when a target crashed, leaked or tripped a sanitizer (its reproducer is
# kept under <build>/tests/fuzz/artifacts/<target>/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${ICECACHE_SAN_BUILD_DIR:-${ICECACHE_BUILD_DIR:-$root/build}-asan}"
seconds=10
jobs=1
out=""
targets=()
while (($#)); do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=(fuzz_ring fuzz_attach fuzz_control fuzz_gguf fuzz_tokenizer fuzz_index)
((${#targets[@]})) || targets=("${all[@]}")

"$root/scripts/sanitize.sh" --configure-only
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" >"$log" 2>&1; then
  grep -E "error|FAILED" -A3 "$log" | head -60; echo "fuzz.sh: build failed" >&2; exit 1
fi

results="$build/tests/fuzz/results"
mkdir -p "$results"
run_one() {
  local t="$1" work="$build/tests/fuzz/corpus/$1" art="$build/tests/fuzz/artifacts/$1/"
  local seeds=()
  mkdir -p "$work" "$art"
  touch "$results/$t.start"
  # New inputs go to the build tree's corpus; the repository's seeds (tests/fuzz/make_seeds.py)
  # are read only.
  [[ -d "$root/tests/fuzz/corpus/$t" ]] && seeds=("$root/tests/fuzz/corpus/$t")
  set +e
  ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1}" UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}" \
    "$build/tests/fuzz/$t" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 \
    -print_final_stats=1 -artifact_prefix="$art" "$work" "${seeds[@]}" \
    >"$results/$t.log" 2>&1
  echo $? >"$results/$t.rc"
  set -e
}
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if ((running >= jobs)); then wait -n; running=$((running - 1)); fi
done
wait

failed=0
json="["
printf "%-16s %14s %10s %8s %s\n" target executions "exec/s" crashes corpus
for t in "${targets[@]}"; do
  execs=$(grep -oE "stat::number_of_executed_units: *[0-9]+" "$results/$t.log" | grep -oE "[0-9]+$" | tail -1)
  speed=$(grep -oE "stat::average_exec_per_sec: *[0-9]+" "$results/$t.log" | grep -oE "[0-9]+$" | tail -1)
  rc=$(cat "$results/$t.rc")
  # A crash, leak, timeout or out-of-memory stops the run and leaves a reproducer; a non-zero
  # exit without one (a sanitizer report outside an input, a bad flag) still counts as one.
  crashes=$(find "$build/tests/fuzz/artifacts/$t" -type f -newer "$results/$t.start" | wc -l)
  if [[ "$rc" != 0 ]]; then ((crashes)) || crashes=1; failed=1; fi
  files=$(find "$build/tests/fuzz/corpus/$t" -type f | wc -l)
  printf "%-16s %14s %10s %8s %s\n" "$t" "${execs:-?}" "${speed:-?}" "$crashes" "$files"
  json+="{\"target\":\"$t\",\"seconds\":$seconds,\"executions\":${execs:-0},\"exec_per_sec\":${speed:-0},\"crashes\":$crashes,\"exit_status\":$rc,\"corpus\":$files},"
  if [[ "$rc" != 0 ]]; then
    echo "---- $t failed (exit $rc); the end of its log:"; tail -40 "$results/$t.log"
    ls "$build/tests/fuzz/artifacts/$t/" 2>/dev/null | sed 's/^/reproducer: /'
  fi
done
json="${json%,}]"
[[ -n "$out" ]] && echo "$json" >"$out"
exit "$failed"
