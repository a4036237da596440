"""A transformers model generating through IceCache: its KV cache lives in icecached.

    python examples/python/transformers_generate.py --socket /run/icecache/icecached.sock \
        --model "$(scripts/fetch_model.sh)" --prompt "What is the capital of France?"

Prefill in full (the prompt's K/V go to the daemon, which indexes them), then each new token
attends to the budget's tokens only: sink, the pages the daemon selects, window. Without
--socket it starts the icecached given by --icecached (or on PATH) on a private socket.
Token ids come from the C++ tokenizer of the GGUF (icecache.tokenizer), the reference for
this model (transformers' GGUF tokenizer lacks its digit split).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

import icecache
import icecache.hf
from icecache.tokenizer import GgufTokenizer


class PrintStreamer(BaseStreamer):
    """Prints each generated token as it comes."""

    def __init__(self, tokenizer: GgufTokenizer, stop: list[int]) -> None:
        self.tokenizer, self.stop, self.skip, self.count, self.start = (
            tokenizer, set(stop), True, 0, 0.0)

    def put(self, value: torch.Tensor) -> None:
        if self.skip:  # the first call carries the prompt
            self.skip, self.start = False, time.perf_counter()
            return
        self.count += value.numel()
        ids = [i for i in value.flatten().tolist() if i not in self.stop]
        print(self.tokenizer.decode(ids), end="", flush=True)

    def end(self) -> None:
        dt = time.perf_counter() - self.start
        print(f"\n[{self.count} tokens in {dt:.1f} s, {self.count / max(dt, 1e-9):.1f} tokens/s]")


def start_daemon(binary: str, directory: str) -> tuple[subprocess.Popen, str]:
    socket = os.path.join(directory, "icecached.sock")
    proc = subprocess.Popen([binary, f"--socket={socket}", "--metrics-port=-1"])
    for _ in range(600):
        try:
            icecache.Client.attach(socket, timeout=2)
            return proc, socket
        except icecache.UnavailableError:
            time.sleep(0.05)
    raise RuntimeError("icecached did not start")


def main() -> int:
    p = argparse.ArgumentParser(description="transformers + IceCache")
    p.add_argument("--model", required=True, help="a GGUF file (scripts/fetch_model.sh)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--file", help="prepend this file's text to the prompt (a long context)")
    p.add_argument("--max_new", type=int, default=48)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--socket", help="a running icecached's socket")
    p.add_argument("--icecached",
                   default=shutil.which("icecached") or "build/server/main/icecached")
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="icecache-example-")
    daemon = None
    socket = args.socket
    if socket is None:
        daemon, socket = start_daemon(args.icecached, tmp.name)
        print(f"[1/4] started icecached at {socket}")
    else:
        print(f"[1/4] using icecached at {socket}")
    client = icecache.Client.attach(socket)
    print(f"      attached in {client.mode.name} mode")

    t = time.perf_counter()
    path = pathlib.Path(args.model)
    icecache.hf.register()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        attn_implementation=icecache.hf.ATTN_IMPLEMENTATION)
    if client.mode == icecache.ExecutionMode.CUDA:
        model = model.to("cuda")
    tokenizer = GgufTokenizer.from_file(str(path))
    print(f"[2/4] loaded {path.name} ({model.config.num_hidden_layers} layers) in "
          f"{time.perf_counter() - t:.1f} s")

    text = pathlib.Path(args.file).read_text(errors="replace") + "\n\n" if args.file else ""
    chat = f"<|im_start|>user\n{text}{args.prompt}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(chat)
    cache = icecache.hf.IceCacheCache(client, model.config, max_tokens=len(ids) + args.max_new,
                                      budget_tokens=args.budget)
    print(f"[3/4] prompt: {len(ids)} tokens; IceCache budget {args.budget} tokens per step")
    print("[4/4] generating:\n")
    x = torch.tensor([ids], device=model.device)
    stop = tokenizer.encode("<|im_end|>")
    # transformers 5.24 prefers cache=, older ones know only past_key_values=.
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), past_key_values=cache,
                       max_new_tokens=args.max_new, do_sample=False,
                       eos_token_id=stop, pad_token_id=0,
                       streamer=PrintStreamer(tokenizer, stop))
    c = client.counters()
    seq = cache.sequence
    print(f"KV kept on the engine's side: {seq.kv_device_bytes / 2**20:.2f} MiB; page-cache hit "
          f"rate {c.hit_rate:.2f} ({c.cache_hits} hits, {c.cache_misses} misses); "
          f"{c.fetched_bytes / 2**20:.2f} MiB fetched from the daemon")
    cache.drop()
    if daemon is not None:
        daemon.terminate()
        daemon.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
