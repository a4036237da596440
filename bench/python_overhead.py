"""Python binding overhead per decode call against the C++ call, in the same run.

One icecached; the C++ loop (bench/python_overhead.cc, the `python_overhead` binary) and the
same loop through the icecache package, with numpy arrays and with PyTorch CPU tensors, each
round a fresh sequence: prefill --prompt tokens, then --steps Sequence.decode calls of one layer
timed one by one. Per call, what matters is the time outside the library's own measurement of
the step (wall - last_decode().total_us): the step's work varies from call to call and with
the machine's load by far more than a binding's microseconds, and this remainder takes it out
call by call. The three loops alternate --repeats times; the overhead is the Python loop's
median remainder minus the C++ loop's of the same repeat, and the reported figure is the
median over repeats (the wall-time medians are reported beside it).

Two layer kinds: a full-KV layer (no daemon in the loop, the cheapest decode: what the binding
adds shows most) and an offloaded layer (a select round trip to the daemon per call).

    python bench/python_overhead.py --icecached build/server/main/icecached \
        --cpp build/bench/python_overhead --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import icecache


def start_daemon(binary: str, directory: str) -> tuple[subprocess.Popen, str]:
    socket = os.path.join(directory, "icecached.sock")
    proc = subprocess.Popen([binary, f"--socket={socket}", "--metrics-port=-1",
                             "--memory-limit=2GiB"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            icecache.Client.attach(socket, mode=icecache.ExecutionMode.CPU, timeout=2)
            return proc, socket
        except icecache.UnavailableError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("icecached did not start")


def python_loop(client: icecache.Client, args: argparse.Namespace, offloaded: bool,
                flavour: str) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(7)
    hq, hk, d = args.q_heads, args.kv_heads, args.head_dim

    def tensor(*shape: int) -> np.ndarray | torch.Tensor:
        a = rng.uniform(0.125, 1.0, shape).astype(np.float16)
        return torch.from_numpy(a) if flavour == "torch" else a

    k, v = tensor(args.prompt, hk, d), tensor(args.prompt, hk, d)
    q, kn, vn, out = tensor(hq, d), tensor(hk, d), tensor(hk, d), tensor(hq, d)
    times, outside = [], []
    clock = time.perf_counter_ns
    for _ in range(args.rounds):
        seq = client.create_sequence(1, hq, hk, d, max_tokens=args.prompt + args.steps,
                                     dtype=icecache.DType.FP16,
                                     full_kv_layers=0 if offloaded else 1)
        seq.prefill(0, k, v)
        decode = seq.decode
        for _ in range(args.steps):
            t0 = clock()
            decode(0, q, kn, vn, out)
            wall = (clock() - t0) / 1e3
            times.append(wall)
            outside.append(wall - seq.last_decode().total_us)
        seq.drop()
    return times, outside


def cpp_loop(args: argparse.Namespace, socket: str, offloaded: bool) -> dict:
    cmd = [args.cpp, f"--socket={socket}", f"--q_heads={args.q_heads}",
           f"--kv_heads={args.kv_heads}", f"--head_dim={args.head_dim}",
           f"--prompt={args.prompt}", f"--steps={args.steps}", f"--rounds={args.rounds}",
           f"--offloaded={'true' if offloaded else 'false'}"]
    return json.loads(subprocess.check_output(cmd, text=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--icecached", required=True)
    p.add_argument("--cpp", required=True, help="the python_overhead binary")
    p.add_argument("--out", default="")
    p.add_argument("--q_heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="icecache-overhead-") as tmp:
        proc, socket = start_daemon(args.icecached, tmp)
        try:
            client = icecache.Client.attach(socket, mode=icecache.ExecutionMode.CPU,
                                            cpu_threads=1)
            rows = []
            for offloaded in (False, True):
                wall = {"cpp": [], "numpy": [], "torch": []}
                rest = {"cpp": [], "numpy": [], "torch": []}
                for _ in range(args.repeats):
                    c = cpp_loop(args, socket, offloaded)
                    wall["cpp"].append(c["median_us"])
                    rest["cpp"].append(c["median_outside_us"])
                    for flavour in ("numpy", "torch"):
                        w, o = python_loop(client, args, offloaded, flavour)
                        wall[flavour].append(statistics.median(w))
                        rest[flavour].append(statistics.median(o))
                row = {"layer": "offloaded" if offloaded else "full-kv",
                       "calls_per_loop": args.rounds * args.steps,
                       "cpp_median_us": statistics.median(wall["cpp"]),
                       "cpp_outside_us": statistics.median(rest["cpp"])}
                for flavour in ("numpy", "torch"):
                    over = [py - c for py, c in zip(rest[flavour], rest["cpp"])]
                    row[f"{flavour}_median_us"] = statistics.median(wall[flavour])
                    row[f"{flavour}_outside_us"] = statistics.median(rest[flavour])
                    row[f"{flavour}_overhead_us"] = statistics.median(over)
                rows.append(row)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    print(f"Python binding overhead per decode call (median of {args.repeats} repeats of "
          f"{args.rounds * args.steps} calls; geometry {args.q_heads} q / {args.kv_heads} kv "
          f"heads x {args.head_dim}, fp16, CPU mode)")
    print("wall: median time per call; outside: wall - the library's own step time "
          "(last_decode().total_us); overhead: Python's outside - C++'s outside")
    print(f"{'layer':10} {'C++ wall':>9} {'outside':>8} | {'numpy wall':>10} {'outside':>8} "
          f"{'overhead':>8} | {'torch wall':>10} {'outside':>8} {'overhead':>8}")
    for r in rows:
        print(f"{r['layer']:10} {r['cpp_median_us']:9.2f} {r['cpp_outside_us']:8.2f} | "
              f"{r['numpy_median_us']:10.2f} {r['numpy_outside_us']:8.2f} "
              f"{r['numpy_overhead_us']:8.2f} | {r['torch_median_us']:10.2f} "
              f"{r['torch_outside_us']:8.2f} {r['torch_overhead_us']:8.2f}")
    goal = 5.0
    worst = max(max(r["numpy_overhead_us"], r["torch_overhead_us"]) for r in rows)
    print(f"goal <= {goal} us per call: {'met' if worst <= goal else 'NOT met'} "
          f"(worst {worst:.2f} us)")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "python_overhead.json").write_text(json.dumps(
            {"args": vars(args), "rows": rows, "goal_us": goal}, indent=2) + "\n")
        print(f"wrote {out / 'python_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
