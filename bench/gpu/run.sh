#!/usr/bin/env bash
# The GPU checks of the client library and kernels, in one call on the GPU machine (the
# `device` tool), from the bundle bench/gpu/pack.sh made here:
#
#   bench/gpu/pack.sh                                    # on the development machine
#   device run: bash bench/gpu/run.sh  (carry [".gpu-pack"], timeout_s 420)
#
# 1. GPU tests (label gpu): kernels against their CPU references; the client flow in CUDA
#    mode against CPU mode through a real daemon.
# 2. Scattered page fetch: gather kernel vs one bulk cudaMemcpy of the same bytes (and vs one
#    memcpy per page), same run.
# 3. Per-layer decode step at 32k and 128k for the 8B shape, budgets 256 and 2048: select,
#    fetch, attention against full attention over the whole context by the same kernel.
# 4. Steady-state page-cache hit rate over 300 decode steps.
# 5. Per-token step of the 8B shape (32 layers) at 32k and 128k, selection synchronous against
#    one step ahead: daemon CPU per token against the exact scan, the critical-path wait for
#    selection (p50/p99), drift fallbacks, the token's wall time.
# Results and logs go to $OUT (or bench/results/gpu); a summary table is printed last.
# Designed to finish in under 6 minutes.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pack="$root/.gpu-pack"
out="${OUT:-$root/bench/results/gpu}"
mkdir -p "$out"
[[ -x "$pack/bin/icecached" ]] || { echo "run.sh: no bundle at $pack (run bench/gpu/pack.sh)"; exit 1; }
libpath="$pack/lib:${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:/usr/lib/x86_64-linux-gnu:/usr/lib64"
run() { "$pack/lib/ld-linux-x86-64.so.2" --library-path "$libpath" "$pack/bin/$1" "${@:2}"; }
cat >/tmp/icecached-run <<WRAP
#!/bin/sh
exec "$pack/lib/ld-linux-x86-64.so.2" --library-path "$libpath" "$pack/bin/icecached" "\$@"
WRAP
chmod +x /tmp/icecached-run
export ICECACHE_ICECACHED_BIN=/tmp/icecached-run
export GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS=100
log="$out/run.log"
: >"$log"
step() { echo "== $* ($(date +%T))" | tee -a "$log"; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  echo "cores: $(nproc)"; } 2>&1 | tee -a "$log"
start=$SECONDS
status=0
step "GPU tests: kernels"
timeout 150 bash -c "$(declare -f run); libpath='$libpath'; pack='$pack'; run kernels_gpu_test --gtest_brief=1" >>"$log" 2>&1 || status=1
tail -3 "$log"
step "GPU tests: client flow, CUDA mode vs CPU mode"
timeout 200 bash -c "$(declare -f run); libpath='$libpath'; pack='$pack'; run client_gpu_test --gtest_brief=1" >>"$log" 2>&1 || status=1
tail -3 "$log"
step "gather vs bulk memcpy"
timeout 90 bash -c "$(declare -f run); libpath='$libpath'; pack='$pack'; run gpu_gather --out='$out'" 2>&1 | tee -a "$log" || status=1
step "decode step breakdown and hit rate"
timeout 240 bash -c "$(declare -f run); libpath='$libpath'; pack='$pack'; run client_decode --mode=cuda --out='$out' --contexts=32768,131072 --budgets=256,2048 --steps=32 --hit_steps=300" 2>&1 | tee -a "$log" || status=1
step "per-token step, sync vs async (8B shape, 32 layers)"
timeout 200 bash -c "$(declare -f run); libpath='$libpath'; pack='$pack'; run token_step --mode=cuda --out='$out' --contexts=32768,131072 --layers_long=32 --steps=24" 2>&1 | tee -a "$log" || status=1
step "batched decode against single calls (8B-shaped layer, 32k each, batch 1-64)"
timeout 240 bash -c "$(declare -f run); libpath='$libpath'; pack='$pack'; run batch_decode --mode=cuda --out='$out' --batches=1,4,16,64 --tokens=32768 --steps=16" 2>&1 | tee -a "$log" || status=1
step "a daemon crash during a CUDA-mode decode (8B shape, 32k): stall against a re-prefill"
timeout 150 bash -c "$(declare -f run); libpath='$libpath'; pack='$pack'; run restart --mode=cuda --out='$out' --tokens=32768 --kills=2 --steps=12" 2>&1 | tee -a "$log" || status=1
step "done in $((SECONDS - start)) s, status $status"

python3 - "$out" <<'PY' 2>&1 | tee -a "$log"
import json, os, sys
out = sys.argv[1]
try:
    g = json.load(open(os.path.join(out, "gpu_gather.json")))
    print(f"gather vs bulk ({g['device']}): page_B pages gather bulk ratio")
    for r in g["rows"]:
        print(f"  {r['page_bytes']:6d} {r['pages']:5d} {r['gather_gbps']:7.1f} {r['bulk_gbps']:7.1f} {r['gather_over_bulk']:.3f}")
except Exception as e:
    print("no gather results:", e)
try:
    c = json.load(open(os.path.join(out, "client_decode_cuda.json")))
    print("decode step (us): context budget select fetch attention sparse_total full_total full/sparse hit")
    for r in c["breakdown"]:
        print(f"  {r['context']:6d} {r['budget']:5d} {r['select_us']:8.1f} {r['fetch_us']:7.1f} {r['attention_us']:7.1f} "
              f"{r['sparse_total_us']:8.1f} {r['full_total_us']:8.1f} {r['full_over_sparse']:6.2f} {r['hit_rate']:.2f}")
    for h in c["hit_rate"]:
        print(f"  hit rate {h['source']}: overall {h['overall']:.3f}, steady {h['steady']:.3f}")
except Exception as e:
    print("no decode results:", e)
try:
    t = json.load(open(os.path.join(out, "token_step.json")))
    print("per token: context mode daemon_cpu_ms scan_cpu_ms wait_p50_us wait_p99_us token_ms")
    for r in t["rows"]:
        print(f"  {r['context']:6d} {r['mode']:5s} {r['daemon_cpu_ms_per_token']:8.1f} {r['scan_cpu_ms_per_token']:8.1f} "
              f"{r['wait_p50_us']:8.0f} {r['wait_p99_us']:8.0f} {r['token_ms_p50']:8.1f}")
except Exception as e:
    print("no per-token results:", e)
try:
    b = json.load(open(os.path.join(out, "batch_decode.json")))
    print("batched decode: batch path step_ms tokens/s us_per_seq daemon_cpu_ms/token batch/single")
    for r in b["rows"]:
        print(f"  {r['batch']:3d} {r['path']:6s} {r['step_ms_p50']:8.2f} {r['tokens_per_s']:9.1f} "
              f"{r['us_per_sequence']:8.0f} {r['daemon_cpu_ms_per_token']:7.2f} {r['batch_over_single']:.3f}")
except Exception as e:
    print("no batched-decode results:", e)
PY
# 6. The Python package in CUDA mode (bench/gpu/run_python.sh: built here for this machine's
#    Python; transformers on a random Llama; the batch sweep with PyTorch CUDA tensors). Also a
#    device call of its own: bash bench/gpu/run_python.sh (carry [".gpu-pack"]).
if [[ "${ICECACHE_GPU_PYTHON:-1}" == 1 ]]; then
  timeout 300 bash "$root/bench/gpu/run_python.sh" 2>&1 | tee -a "$log" || status=1
fi
exit $status
