#!/usr/bin/env bash
# Benchmarks and quality evaluations: their own command, not CI (minutes, not seconds).
# Installs what is missing, builds, runs the index speed benchmark (paper configuration and
# the improvement options, each against the exact scan in the same run), the data-plane
# benchmark (ring round trips against in-process calls, concurrent clients) and the quality
# evaluation (every method and oracle at budgets 64-512), the client's decode step in CPU
# mode (select, fetch, attention against full attention; page-cache hit rate), then draws the
# plots. The GPU benchmarks run on the GPU machine: bench/gpu/pack.sh, then bench/gpu/run.sh.
#
#   scripts/bench.sh [--quick] [--trace=FILE] [--model]
#
# --model also runs the real-model quality benchmark (SmolLM2-135M-Instruct on three long
# Debian texts, about an hour on 2 cores): perplexity, top-1 agreement, recall and passkey
# retrieval of IceCache against full attention, baselines and oracles; it captures each text's
# real attention as a trace (bench/traces/) and runs the index quality evaluation on one.
#
# Results (JSON, CSV, PNG) go to bench/results/ (or $ICECACHE_BENCH_OUT).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${ICECACHE_BUILD_DIR:-$root/build}"
out="${ICECACHE_BENCH_OUT:-$root/bench/results}"
sizes="4096,32768,131072,524288"
quality_args=()
model=false
for arg in "$@"; do
  case "$arg" in
    --quick) sizes="4096,32768" ;;
    --trace=*) quality_args+=("$arg") ;;
    --model) model=true ;;
    *) echo "bench.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

"$root/scripts/bootstrap.sh" --bench
"$root/scripts/build.sh"
mkdir -p "$out"
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
for config in paper all all-r1; do
  echo "== index speed, config $config"
  stack=false
  [[ $config == paper ]] && stack=true
  "$build/bench/index_speed" --config="$config" --sizes="$sizes" --stack="$stack" --out="$out"
done
echo "== data plane (daemon subprocess, ring round trips, concurrent clients)"
"$build/bench/data_plane" --out="$out"
echo "== client decode step (CPU mode: the kernels' CPU references) and page-cache hit rate"
"$build/bench/client_decode" --mode=cpu --contexts=32768 --budgets=256,2048 --steps=16 \
  --hit_steps=300 --out="$out"
echo "== index quality"
"$build/bench/index_quality" --out="$out" "${quality_args[@]}"
if $model; then
  echo "== real model: quality of IceCache against full attention, baselines and oracles"
  model_file="$("$root/scripts/fetch_model.sh")"
  mkdir -p "$root/bench/traces"
  "$build/bench/model_quality" --model="$model_file" --out="$out" --trace_dir="$root/bench/traces"
  echo "== index quality on the real model's attention (bible trace)"
  mkdir -p "$out/real"
  "$build/bench/index_quality" --trace="$root/bench/traces/bible.ictrace" --first_layer=2 \
    --out="$out/real"
fi
/usr/bin/python3 "$root/bench/plot.py" "$out"
