"""Hugging Face transformers through IceCache, on the real model (SmolLM2-135M-Instruct GGUF),
against a real icecached, compared with the C++ model path (tests/python/model_reference.cc:
model/llama.h with ServiceAttention against the same daemon).

Both paths get the C++ tokenizer's token ids (transformers' tokenizer built from this GGUF
lacks the smollm digit split). Skipped where the model has not been fetched
(scripts/fetch_model.sh; the test command fetches it).
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import weakref

import pytest
import torch

import icecache
import icecache.hf
from conftest import Daemon, model_path

MODEL = model_path()
pytestmark = [
    pytest.mark.skipif(MODEL is None, reason="the model is not fetched"),
    # past_key_values= works in the transformers pinned here (5.24, which prefers cache=) and in
    # the GPU machine's (5.17, which knows only past_key_values=).
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]

torch.manual_seed(0)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    icecache.hf.register()
    assert MODEL is not None
    m = AutoModelForCausalLM.from_pretrained(
        str(MODEL.parent),
        gguf_file=MODEL.name,
        attn_implementation=icecache.hf.ATTN_IMPLEMENTATION,
        dtype=torch.float32,
    )
    m.eval()
    return m


@pytest.fixture(scope="module")
def tokenizer() -> object:
    from icecache.tokenizer import GgufTokenizer

    return GgufTokenizer.from_file(str(MODEL))


def cpp_reference(daemon: Daemon, **flags: object) -> dict:
    """The C++ model path's answer (one JSON object) against the same daemon."""
    args = [os.environ["ICECACHE_MODEL_REFERENCE_BIN"], f"--model={MODEL}",
            f"--socket={daemon.socket}", "--mode=cpu"]
    args += [f"--{k}={v}" for k, v in flags.items()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def cache_for(client: icecache.Client, model: torch.nn.Module, max_tokens: int,
              budget: int) -> icecache.hf.IceCacheCache:
    # q and k reach the daemon in the C++ model's (GGUF's) dimension order, so that both paths'
    # indexes project the same vectors (docs/client.md, "Python").
    return icecache.hf.IceCacheCache(client, model.config, max_tokens=max_tokens,
                                     budget_tokens=budget, full_kv_layers=2,
                                     qk_layout="interleaved")


@torch.inference_mode()
def generate(model: torch.nn.Module, ids: list[int], new: int, cache: object = None) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), past_key_values=cache,
                         max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def teacher_forced_nll(model: torch.nn.Module, prompt: list[int], continuation: list[int],
                       cache: object) -> list[float]:
    """nll of each continuation token: the prompt in one forward, then one token per step."""
    logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache,
                   use_cache=True).logits[0, -1]
    nll = []
    for i, token in enumerate(continuation):
        nll.append(-torch.log_softmax(logits.double(), -1)[token].item())
        if i + 1 < len(continuation):
            logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                           use_cache=True).logits[0, -1]
    return nll


def ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def test_budget_covering_the_context_generates_full_attentions_tokens(
        model: torch.nn.Module, tokenizer: object, daemon: Daemon,
        client: icecache.Client) -> None:
    text = ("The King James Bible was first printed in 1611. It has 66 books, 1189 chapters "
            "and 31102 verses. ") * 6 + "In the beginning God created"
    ids = tokenizer.encode(text)
    assert 150 < len(ids) < 400
    new = 24
    full = generate(model, ids, new)
    cache = cache_for(client, model, len(ids) + new, budget=1024)
    ice = generate(model, ids, new, cache)
    # Every step of every offloaded layer attended the whole context: 30 layers x 3 KV heads.
    last = cache.sequence.last_decode()
    assert not last.full_kv
    assert last.attended_tokens == (len(ids) + new - 1) * 3
    assert ice == full, (tokenizer.decode(full), tokenizer.decode(ice))
    # The C++ forward pass on the same ids agrees (full attention and its IceCache path).
    ref = cpp_reference(daemon, task="generate", ids=",".join(map(str, ids)), max_new=new,
                        budget=1024)
    assert ref["full"] == full
    assert ref["service"] == full
    cache.drop()


def test_a_model_that_does_not_attend_through_icecache_is_refused(
        model: torch.nn.Module, tokenizer: object, client: icecache.Client) -> None:
    """With SDPA instead of the "icecache" attention, a decode would attend only the new
    token's K/V (the cache keeps none) and generate nonsense without an error: it raises."""
    ids = tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    cache = cache_for(client, model, len(ids) + 8, budget=1024)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(RuntimeError, match="attn_implementation='icecache'"):
            generate(model, ids, 4, cache)
    finally:
        model.set_attn_implementation(icecache.hf.ATTN_IMPLEMENTATION)
    cache.drop()


def test_a_cache_let_go_frees_its_sequence_without_the_collector(
        model: torch.nn.Module, tokenizer: object, client: icecache.Client) -> None:
    """The cache and its layers make no reference cycle: a cache dropped without drop()
    frees its daemon sequence at once, not at the next garbage collection."""
    ids = tokenizer.encode("In the beginning God created the heaven and the earth.")
    cache = cache_for(client, model, len(ids) + 4, budget=1024)
    generate(model, ids, 2, cache)
    sequence = weakref.ref(cache.sequence)
    gc.disable()
    try:
        del cache
        assert sequence() is None
    finally:
        gc.enable()


def test_passkey_is_answered_like_the_cpp_path(model: torch.nn.Module, tokenizer: object,
                                              daemon: Daemon, client: icecache.Client) -> None:
    new = 8
    ref = cpp_reference(daemon, task="passkey", text="bible", haystack_tokens=2000, depth=0.5,
                        passkey="58213", max_new=new, budget=256)
    prompt = ref["prompt"]
    cache = cache_for(client, model, len(prompt) + new, budget=256)
    ice = generate(model, prompt, new, cache)
    full = generate(model, prompt, new)

    def number(ids: list[int]) -> str:
        digits = ""
        for ch in tokenizer.decode(ids):
            if ch.isdigit():
                digits += ch
            elif digits:
                break
        return digits

    print(f"\npasskey 58213: C++ full {number(ref['full'])}, C++ IceCache "
          f"{number(ref['service'])}; transformers full {number(full)}, IceCache {number(ice)}")
    assert number(ref["full"]) == "58213"
    assert number(full) == number(ref["full"])
    # Answered like the C++ model path (right or wrong: that is the index's quality, measured
    # by bench/model_quality; here the two paths must agree).
    assert number(ice) == number(ref["service"])
    counters = client.counters()
    assert counters.decode_steps > 0 and counters.cache_hits > 0
    cache.drop()


# The perplexity ratio (IceCache / full attention) of a 64-token teacher-forced continuation
# after 1,024 tokens of the Bible, budget 128, through transformers and through the C++ path.
# Full attention agrees to 1e-3 (same ids and weights; only the float summation order differs).
# The sparse path cannot agree exactly: transformers' keys come out of other matmuls, so a few
# of their fp16 roundings differ by one unit, the daemon's index (a DCI tree that projects keys
# on a random direction and promotes tokens by their order) then builds slightly different
# cells, and where two pages score close some decode steps attend a different page. That is
# noise of the selection, so the check is statistical: per continuation token, the difference
# between the two paths' IceCache-minus-full log-likelihood; its mean is the log of the ratio of
# the two ratios, and it must lie within 3 standard errors of 0 (paired, 64 tokens), and the
# ratios within RATIO_CAP of each other. Measured while writing this: 1.2178 against 1.2100
# with q/k in the C++ model's order, 1.1889 against 1.2100 in transformers' own (docs/client.md).
RATIO_CAP = 0.03


def test_perplexity_ratio_matches_the_cpp_path(model: torch.nn.Module, daemon: Daemon,
                                               client: icecache.Client) -> None:
    ref = cpp_reference(daemon, task="ppl", text="bible", prompt_tokens=1024, continuation=64,
                        budget=128)
    tokens, p = ref["tokens"], ref["prompt_tokens"]
    prompt, continuation = tokens[:p], tokens[p:]
    from transformers import DynamicCache

    full_nll = teacher_forced_nll(model, prompt, continuation, DynamicCache(config=model.config))
    cache = cache_for(client, model, len(tokens), budget=128)
    ice_nll = teacher_forced_nll(model, prompt, continuation, cache)
    full_ppl, ice_ppl = ppl(full_nll), ppl(ice_nll)
    ratio = ice_ppl / full_ppl
    print(f"\nfull ppl: transformers {full_ppl:.4f}, C++ {ref['full_ppl']:.4f}; "
          f"IceCache ppl: transformers {ice_ppl:.4f}, C++ {ref['service_ppl']:.4f}; "
          f"ratio: transformers {ratio:.4f}, C++ {ref['ratio']:.4f}")
    assert full_ppl == pytest.approx(ref["full_ppl"], rel=1e-3)
    assert ratio > 1.0  # the budget is below the context: sparse attention costs something
    d = [(i - f) - (cs - cf) for i, f, cs, cf in
         zip(ice_nll, full_nll, ref["service_nll"], ref["full_nll"])]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    print(f"paired per-token difference: mean {mean:+.4f} nats, standard error {se:.4f}")
    assert abs(mean) <= 3 * se + 1e-9
    assert abs(ratio - ref["ratio"]) <= RATIO_CAP
    cache.drop()
