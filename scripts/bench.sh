#!/usr/bin/env bash
# Benchmarks and quality evaluations: their own command, not CI (minutes, not seconds).
# Installs what is missing, builds, runs the index speed benchmark (the daemon's default
# preset, the paper configuration and the tuned preset, each against the exact scan in the
# same run; on a real model's trace too when bench/traces/bible.ictrace or --trace exists), the data-plane
# benchmark (ring round trips against in-process calls, concurrent clients) and the quality
# evaluation (every method and oracle at budgets 64-512), the client's decode step in CPU
# mode (select, fetch, attention against full attention; page-cache hit rate), the Python
# binding's overhead per decode call against the C++ call, the stall a daemon crash costs a
# decode (SIGKILL, successor, the client's recovery) beside a re-prefill, then draws the plots. The GPU
# benchmarks run on the GPU machine: bench/gpu/pack.sh, then bench/gpu/run.sh.
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
venv="$("$root/scripts/python_env.sh")"  # the Python package's benchmark
"$root/scripts/build.sh" -DPython_EXECUTABLE="$venv/bin/python"
mkdir -p "$out"
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
# The index: the daemon's default preset (what index_speed runs without --config; it also
# builds the 8B-shaped stacks), the paper's reference and the tuned preset, each against the
# exact scan in the same run; then the same on a real model's trace when there is one.
stacks="32768,131072"
[[ $sizes == "4096,32768" ]] && stacks="32768"
echo "== the index's float kernels at every SIMD level of this CPU, side by side"
"$build/bench/kernel_speed" --out="$out"
echo "== index speed, the daemon's default preset (and the 8B-shaped stacks)"
"$build/bench/index_speed" --sizes="$sizes" --stack=true --stack_tokens="$stacks" --build_reps=3 \
  --insert_pages=1024 --out="$out"
for config in paper all; do
  echo "== index speed, config $config"
  "$build/bench/index_speed" --config="$config" --sizes="$sizes" --stack=false --insert_pages=1024 \
    --out="$out"
done
index_trace=""
for arg in "${quality_args[@]}"; do index_trace="${arg#--trace=}"; done
[[ -z $index_trace && -f $root/bench/traces/bible.ictrace ]] && index_trace="$root/bench/traces/bible.ictrace"
if [[ -n $index_trace ]]; then
  mkdir -p "$out/real"
  echo "== index speed on the trace $index_trace: the daemon's default, paper, tuned"
  "$build/bench/index_speed" --trace="$index_trace" --out="$out/real"
  for config in paper all; do
    "$build/bench/index_speed" --config="$config" --trace="$index_trace" --out="$out/real"
  done
fi
echo "== data plane (daemon subprocess, ring round trips, concurrent clients)"
"$build/bench/data_plane" --out="$out"
echo "== client decode step (CPU mode: the kernels' CPU references) and page-cache hit rate"
"$build/bench/client_decode" --mode=cpu --contexts=32768 --budgets=256,2048 --steps=16 \
  --hit_steps=300 --out="$out"
echo "== per-token step at the 8B shape: daemon CPU against the exact scan, sync against async"
token_contexts="32768,131072"
[[ $sizes == "4096,32768" ]] && token_contexts="32768"
"$build/bench/token_step" --contexts="$token_contexts" --out="$out"
echo "== batched decode against single-sequence calls (8B-shaped layer)"
# 64 sequences of 16k: what a 24 GiB machine admits (bench/gpu/run.sh runs 32k each).
batch_tokens=16384
[[ $sizes == "4096,32768" ]] && batch_tokens=8192
"$build/bench/batch_decode" --batches=1,4,16,64 --tokens="$batch_tokens" --out="$out"
echo "== a daemon crash during an 8B-shaped decode: the client's stall against a re-prefill"
restart_tokens=32768
[[ $sizes == "4096,32768" ]] && restart_tokens=8192
"$build/bench/restart" --tokens="$restart_tokens" --kills=3 --out="$out"
echo "== Python binding overhead per decode call against the C++ call (same run)"
PYTHONPATH="$build/python" "$venv/bin/python" "$root/bench/python_overhead.py" \
  --icecached="$build/server/main/icecached" --cpp="$build/bench/python_overhead" --out="$out"
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
