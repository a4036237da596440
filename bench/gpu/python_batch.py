"""The icecache package in CUDA mode on the GPU machine (bench/gpu/run.sh runs it).

1. transformers on a small randomly initialised Llama (no model file travels to that machine):
   generate() through IceCacheCache in CUDA mode, budget covering the context, must give the
   tokens of full attention (PyTorch SDPA, DynamicCache) on the same model.
2. Batch sweep, PyTorch CUDA tensors through the package: an 8B-shaped layer (32 query / 8
   KV heads of 128, bf16) at --context tokens per sequence, batches of 1, 4, 16, 64 sequences.
   Each step decodes the layer for every sequence of the batch: with Client.decode_batch where
   the library has it (one call per step), else one Sequence.decode per sequence. Reports
   tokens per second and the time per sequence and step; the goal is a per-sequence cost
   independent of the batch size.

    python bench/gpu/python_batch.py --icecached PATH --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import icecache


def start_daemon(binary: str, directory: str) -> tuple[subprocess.Popen, str]:
    socket = os.path.join(directory, "icecached.sock")
    proc = subprocess.Popen([binary, f"--socket={socket}", "--metrics-port=-1"])
    for _ in range(1200):
        try:
            icecache.Client.attach(socket, mode=icecache.ExecutionMode.CPU, timeout=2)
            return proc, socket
        except icecache.UnavailableError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("icecached did not start")


def hf_check(client: icecache.Client) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import icecache.hf

    icecache.hf.register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=2048,
                         attn_implementation=icecache.hf.ATTN_IMPLEMENTATION)
    model = LlamaForCausalLM(config).to("cuda", torch.float32).eval()
    ids = torch.randint(0, 512, (1, 300), device="cuda")
    new = 16
    with torch.inference_mode():
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)
        cache = icecache.hf.IceCacheCache(client, config, max_tokens=ids.shape[1] + new,
                                          budget_tokens=1024, full_kv_layers=1)
        ice = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    last = cache.sequence.last_decode()
    cache.drop()
    equal = torch.equal(full, ice)
    print(f"transformers, random Llama (4 layers, 8/2 heads of 64), CUDA mode, budget covering "
          f"the context: tokens equal to full attention: {equal} (last step attended "
          f"{last.attended_tokens} rows, {last.total_us:.0f} us)")
    return {"equal": equal, "tokens": new, "attended_tokens": last.attended_tokens}


def sweep(client: icecache.Client, context: int, batches: list[int], steps: int) -> list[dict]:
    hq, hk, d = 32, 8, 128
    dev = torch.device("cuda", client.device)
    stream = torch.cuda.current_stream(dev)
    g = torch.Generator(device=dev).manual_seed(1)
    rows = []
    has_batch = hasattr(client, "decode_batch")
    for batch in batches:
        seqs = []
        for _ in range(batch):
            s = client.create_sequence(1, hq, hk, d, max_tokens=context + steps + 1,
                                       dtype=icecache.DType.BF16, full_kv_layers=0,
                                       budget_tokens=256)
            k = torch.randn(context, hk, d, device=dev, generator=g).to(torch.bfloat16)
            v = torch.randn(context, hk, d, device=dev, generator=g).to(torch.bfloat16)
            s.prefill(0, k, v, stream=stream)
            seqs.append(s)
        q = torch.randn(batch, hq, d, device=dev, generator=g).to(torch.bfloat16)
        kn = torch.randn(batch, hk, d, device=dev, generator=g).to(torch.bfloat16)
        vn = torch.randn(batch, hk, d, device=dev, generator=g).to(torch.bfloat16)
        out = torch.empty(batch, hq, d, device=dev, dtype=torch.bfloat16)
        times = []
        for step in range(steps + 1):  # the first step waits for the index builds
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            if has_batch:
                client.decode_batch(0, seqs, q, kn, vn, out, stream=stream)
            else:
                for i, s in enumerate(seqs):
                    s.decode(0, q[i], kn[i], vn[i], out[i], stream=stream)
            torch.cuda.synchronize(dev)
            if step > 0:
                times.append(time.perf_counter() - t0)
        for s in seqs:
            s.drop()
        step_s = statistics.median(times)
        row = {"batch": batch, "context": context, "path": "decode_batch" if has_batch else
               "decode per sequence", "step_us": step_s * 1e6,
               "per_sequence_us": step_s * 1e6 / batch, "tokens_per_s": batch / step_s}
        print(f"  batch {batch:3d}: step {row['step_us']:9.1f} us, per sequence "
              f"{row['per_sequence_us']:8.1f} us, {row['tokens_per_s']:9.1f} tokens/s "
              f"({row['path']})")
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--icecached", required=True)
    p.add_argument("--out", default=".")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="icecache-gpu-py-") as tmp:
        proc, socket = start_daemon(args.icecached, tmp)
        try:
            client = icecache.Client.attach(socket, mode=icecache.ExecutionMode.CUDA)
            results["hf"] = hf_check(client)
            print(f"batch sweep: 8B-shaped layer (32/8 heads of 128, bf16), {args.context} "
                  "tokens each, budget 256, CUDA mode, PyTorch CUDA tensors")
            results["sweep"] = sweep(client, args.context,
                                     [int(b) for b in args.batches.split(",")], args.steps)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    with open(os.path.join(args.out, "python_batch.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0 if results["hf"]["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
