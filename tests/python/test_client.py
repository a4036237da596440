"""The icecache binding against a real icecached (CPU mode): calls, tensors, errors."""

from __future__ import annotations

import gc
import math
import os
import pathlib
import signal
import threading
import time
import weakref

import numpy as np
import pytest
import torch

import icecache
import icecache._core
from icecache import DType, ExecutionMode, StatusCode

# A small GQA geometry: 3 layers (the first keeps its whole KV), 4 query / 2 KV heads of 64.
LAYERS, HQ, HK, D = 3, 4, 2, 64


def make_sequence(client: icecache.Client, **kw: object) -> icecache.Sequence:
    args: dict = dict(max_tokens=512, dtype=DType.FP16, full_kv_layers=1, label="pytest")
    args.update(kw)
    return client.create_sequence(LAYERS, HQ, HK, D, **args)


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float16)


def attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float64 GQA attention of q [HQ, D] over k, v [T, HK, D]."""
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    out = np.empty((HQ, D))
    for h in range(HQ):
        kv = h // (HQ // HK)
        s = k64[:, kv, :] @ q64[h] / np.sqrt(D)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v64[:, kv, :]
    return out


def test_geometry_defaults(client: icecache.Client) -> None:
    seq = client.create_sequence(2, 8, 2, 128, max_tokens=4096, label="defaults")
    g = seq.geometry
    assert (g.num_layers, g.num_q_heads, g.num_kv_heads, g.head_dim) == (2, 8, 2, 128)
    assert g.dtype == DType.BF16
    assert (g.page_size, g.budget_tokens, g.sink_tokens, g.window_tokens) == (4, 256, 8, 16)
    assert g.full_kv_layers == 2
    assert g.selected_pages == 58
    assert seq.handle.startswith("seq_") and len(seq.handle) == 36
    assert client.mode == ExecutionMode.CPU
    seq.drop()


def test_attach_without_daemon_is_unavailable(tmp_path: pathlib.Path) -> None:
    with pytest.raises(icecache.UnavailableError) as e:
        icecache.Client.attach(str(tmp_path / "none.sock"), mode=ExecutionMode.CPU, timeout=1)
    assert e.value.code == StatusCode.UNAVAILABLE
    assert isinstance(e.value, ConnectionError)


def test_invalid_geometry_names_the_field(client: icecache.Client) -> None:
    with pytest.raises(icecache.InvalidArgumentError) as e:
        client.create_sequence(0, HQ, HK, D, max_tokens=16)
    assert e.value.code == StatusCode.INVALID_ARGUMENT == 3
    assert "num_layers" in e.value.message
    assert isinstance(e.value, ValueError)
    with pytest.raises(icecache.InvalidArgumentError) as e:
        client.create_sequence(2, 5, 2, 64, max_tokens=16)  # 5 query heads over 2 KV heads
    assert "num_q_heads" in e.value.message


def test_tail_estimate_is_named_or_refused(client: icecache.Client) -> None:
    for name in ("none", "mean", "mean-var"):
        seq = client.create_sequence(2, HQ, HK, D, max_tokens=64, tail_estimate=name)
        del seq
    with pytest.raises(icecache.InvalidArgumentError) as e:
        client.create_sequence(2, HQ, HK, D, max_tokens=64, tail_estimate="median")
    assert "tail_estimate" in e.value.message and "median" in e.value.message


def test_memory_limit_is_resource_exhausted(client: icecache.Client) -> None:
    with pytest.raises(icecache.ResourceExhaustedError) as e:
        client.create_sequence(32, 32, 8, 128, max_tokens=1 << 24)  # 2 TiB of K/V
    assert e.value.code == StatusCode.RESOURCE_EXHAUSTED


def test_keyword_only_options(client: icecache.Client) -> None:
    with pytest.raises(TypeError):
        client.create_sequence(LAYERS, HQ, HK, D, 64, DType.FP16)  # type: ignore[misc]


def test_decode_before_prefill_is_failed_precondition(client: icecache.Client) -> None:
    seq = make_sequence(client)
    q = np.zeros((HQ, D), np.float16)
    kv = np.zeros((HK, D), np.float16)
    with pytest.raises(icecache.FailedPreconditionError) as e:
        seq.decode(1, q, kv, kv, np.zeros_like(q))
    assert e.value.code == StatusCode.FAILED_PRECONDITION
    with pytest.raises(icecache.InvalidArgumentError):
        seq.prefill(LAYERS, np.zeros((4, HK, D), np.float16), np.zeros((4, HK, D), np.float16))


def test_decode_equals_float64_attention_when_budget_covers_context(
    client: icecache.Client,
) -> None:
    rng = np.random.default_rng(1)
    prompt, steps = 150, 40  # past the 32-token window several times: hand-overs to the daemon
    seq = make_sequence(client, budget_tokens=1024)
    k = [rand(rng, prompt, HK, D) for _ in range(LAYERS)]
    v = [rand(rng, prompt, HK, D) for _ in range(LAYERS)]
    for layer in range(LAYERS):
        seq.prefill(layer, k[layer], v[layer])
    assert seq.tokens(0) == prompt
    out = np.empty((HQ, D), np.float16)
    for step in range(steps):
        for layer in range(LAYERS):
            q, kn, vn = rand(rng, HQ, D), rand(rng, HK, D), rand(rng, HK, D)
            k[layer] = np.concatenate([k[layer], kn[None]])
            v[layer] = np.concatenate([v[layer], vn[None]])
            out.fill(np.nan)
            seq.decode(layer, q, kn, vn, out)
            np.testing.assert_allclose(
                out.astype(np.float64), attention64(q, k[layer], v[layer]), atol=2e-3, rtol=2e-3
            )
            b = seq.last_decode()
            assert b.layer == layer
            assert b.full_kv == (layer == 0)
            assert b.attended_tokens == (prompt + step + 1) * HK
    assert seq.tokens(2) == prompt + steps
    rows_k, rows_v = seq.last_attended(2, 1)
    assert rows_k.shape == rows_v.shape == (prompt + steps, D)
    assert rows_k.dtype == np.uint16
    # The new token's key is among the attended rows, bit for bit.
    assert any((rows_k == k[2][-1, 1].view(np.uint16)).all(axis=1))
    seq.drop()


def test_sparse_decode_attends_the_budget(client: icecache.Client) -> None:
    rng = np.random.default_rng(2)
    prompt = 600
    # budget 128: 8 sink + 26 pages of 4 + 16 window (the default pages of 4)
    seq = make_sequence(client, budget_tokens=128, max_tokens=1024)
    for layer in range(LAYERS):
        seq.prefill(layer, rand(rng, prompt, HK, D), rand(rng, prompt, HK, D))
    out = np.empty((HQ, D), np.float16)
    before = client.counters()
    for layer in range(LAYERS):
        seq.decode(layer, rand(rng, HQ, D), rand(rng, HK, D), rand(rng, HK, D), out)
    b = seq.last_decode()
    assert not b.full_kv and b.layer == 2
    assert b.selected_pages == 26 * HK
    assert 0 < b.attended_tokens <= 128 * HK
    assert b.hits + b.misses == b.selected_pages
    after = client.counters()
    assert after.decode_steps > before.decode_steps
    assert after.cache_hits + after.cache_misses > before.cache_hits + before.cache_misses
    assert 0.0 <= after.hit_rate <= 1.0
    assert np.isfinite(out.astype(np.float32)).all()
    seq.drop()


def test_out_is_written_in_place_numpy_and_torch(client: icecache.Client) -> None:
    rng = np.random.default_rng(3)
    seq = make_sequence(client)
    k, v = rand(rng, 40, HK, D), rand(rng, 40, HK, D)
    for layer in range(LAYERS):
        seq.prefill(layer, torch.from_numpy(k), torch.from_numpy(v))
    q, kn, vn = rand(rng, HQ, D), rand(rng, HK, D), rand(rng, HK, D)
    out_np = np.zeros((HQ, D), np.float16)
    seq.decode(0, q, kn, vn, out_np)
    out_t = torch.zeros(HQ, D, dtype=torch.float16)
    ptr = out_t.data_ptr()
    seq.decode(1, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn), out_t)
    assert out_t.data_ptr() == ptr and out_t.abs().sum() > 0
    # A view into a larger buffer is written where it points, nothing around it.
    big = torch.zeros(3, HQ, D, dtype=torch.float16)
    seq.decode(2, q, kn, vn, big[1])
    assert big[0].abs().sum() == 0 and big[2].abs().sum() == 0 and big[1].abs().sum() > 0
    seq.drop()


def test_bf16_as_torch_bfloat16_or_raw_uint16_bits(client: icecache.Client) -> None:
    g = torch.Generator().manual_seed(4)
    k = torch.randn(50, HK, D, generator=g).to(torch.bfloat16)
    v = torch.randn(50, HK, D, generator=g).to(torch.bfloat16)
    q = torch.randn(HQ, D, generator=g).to(torch.bfloat16)
    kn = torch.randn(HK, D, generator=g).to(torch.bfloat16)
    outs = []
    for raw in (False, True):
        seq = make_sequence(client, dtype=DType.BF16)
        for layer in range(LAYERS):
            if raw:  # numpy has no bfloat16: its bits as uint16
                seq.prefill(layer, k.view(torch.int16).numpy().view(np.uint16),
                            v.view(torch.int16).numpy().view(np.uint16))
            else:
                seq.prefill(layer, k, v)
        out = torch.empty(HQ, D, dtype=torch.bfloat16)
        for layer in range(LAYERS):
            if raw:
                bits = out.view(torch.int16).numpy().view(np.uint16)
                seq.decode(layer, q.view(torch.int16).numpy().view(np.uint16),
                           kn.view(torch.int16).numpy().view(np.uint16),
                           kn.view(torch.int16).numpy().view(np.uint16), bits)
            else:
                seq.decode(layer, q, kn, kn, out)
        outs.append(out.clone())
        seq.drop()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "case, message",
    [
        ("dtype", "dtype must be float16"),
        ("shape", "shape (4, 32), expected (4, 64)"),
        ("strided", "not C-contiguous"),
        ("out_dtype", "out: dtype"),
    ],
)
def test_bad_tensors_are_invalid_argument(client: icecache.Client, case: str, message: str) -> None:
    seq = make_sequence(client)
    kv = np.zeros((8, HK, D), np.float16)
    for layer in range(LAYERS):
        seq.prefill(layer, kv, kv)
    q = np.zeros((HQ, D), np.float16)
    kn = np.zeros((HK, D), np.float16)
    out = np.zeros((HQ, D), np.float16)
    if case == "dtype":
        q = q.astype(np.float32)
    elif case == "shape":
        q = np.zeros((HQ, 32), np.float16)
    elif case == "strided":
        q = np.zeros((HQ, 2 * D), np.float16)[:, ::2]
    elif case == "out_dtype":
        out = out.astype(np.float32)
    with pytest.raises(icecache.InvalidArgumentError) as e:
        seq.decode(0, q, kn, kn, out)
    assert message in e.value.message
    # Nothing happened: the layer still has its 8 tokens, and a good call goes through.
    assert seq.tokens(0) == 8
    seq.decode(0, np.zeros((HQ, D), np.float16), kn, kn, np.zeros((HQ, D), np.float16))
    assert seq.tokens(0) == 9
    seq.drop()


def test_read_only_out_is_refused(client: icecache.Client) -> None:
    seq = make_sequence(client)
    kv = np.zeros((8, HK, D), np.float16)
    for layer in range(LAYERS):
        seq.prefill(layer, kv, kv)
    out = np.zeros((HQ, D), np.float16)
    out.flags.writeable = False
    with pytest.raises(icecache.InvalidArgumentError) as e:
        seq.decode(0, np.zeros((HQ, D), np.float16), kv[0], kv[0], out)
    assert "out: expected a writable tensor" in e.value.message
    with pytest.raises(icecache.InvalidArgumentError) as e:
        seq.decode(0, [[0.0] * D] * HQ, kv[0], kv[0], np.zeros((HQ, D), np.float16))
    assert "q: expected a tensor" in e.value.message
    seq.drop()


def test_out_that_requires_grad_is_refused(client: icecache.Client) -> None:
    seq = make_sequence(client)
    kv = torch.zeros((8, HK, D), dtype=torch.float16)
    for layer in range(LAYERS):
        seq.prefill(layer, kv, kv)
    q = torch.ones((HQ, D), dtype=torch.float16)
    out = torch.zeros((HQ, D), dtype=torch.float16, requires_grad=True)
    with pytest.raises(icecache.InvalidArgumentError) as e:
        seq.decode(0, q, kv[0], kv[0], out)
    assert "out: a tensor that requires grad" in e.value.message
    assert seq.tokens(0) == 8  # nothing done
    assert not out.detach().any()
    seq.decode(0, q, kv[0], kv[0], out.detach())  # a detached view is written
    assert seq.tokens(0) == 9
    seq.drop()


def test_drop_then_calls_fail(client: icecache.Client) -> None:
    with make_sequence(client) as seq:
        kv = np.zeros((8, HK, D), np.float16)
        seq.prefill(0, kv, kv)
    with pytest.raises(icecache.FailedPreconditionError):
        seq.prefill(1, kv, kv)
    with pytest.raises(icecache.FailedPreconditionError):
        seq.drop()


def test_sequence_keeps_its_client_alive(daemon: object) -> None:
    c = icecache.Client.attach(daemon.socket, mode=ExecutionMode.CPU)  # type: ignore[attr-defined]
    seq = make_sequence(c)
    del c
    kv = np.ones((8, HK, D), np.float16)
    for layer in range(LAYERS):
        seq.prefill(layer, kv, kv)
    out = np.zeros((HQ, D), np.float16)
    seq.decode(0, np.ones((HQ, D), np.float16), kv[0], kv[0], out)
    np.testing.assert_array_equal(out, np.ones((HQ, D), np.float16))


@pytest.mark.parametrize("timeout", [0.0, -1.0, math.inf, math.nan, 1e9])
def test_attach_refuses_a_timeout_that_is_not_a_positive_finite_time(
        daemon: object, timeout: float) -> None:
    socket = daemon.socket  # type: ignore[attr-defined]
    with pytest.raises(icecache.InvalidArgumentError) as e:
        icecache.Client.attach(socket, mode=ExecutionMode.CPU, timeout=timeout)
    assert "timeout must be in (0, 86400]" in e.value.message
    with pytest.raises(icecache.InvalidArgumentError):
        icecache._core.OperatorAttachment.attach(socket, timeout=timeout)


def test_a_drop_while_another_thread_decodes_is_refused(client: icecache.Client) -> None:
    """A Sequence serves one thread at a time: a second thread's drop() during a decode gets
    FailedPreconditionError and drops nothing (it ran against the freed sequence before)."""
    rng = np.random.default_rng(11)
    k, v = rand(rng, 400, HK, D), rand(rng, 400, HK, D)
    q, kn, vn = rand(rng, HQ, D), rand(rng, HK, D), rand(rng, HK, D)
    refused = None
    for _ in range(50):  # each round: decodes in a loop, one drop() a moment in
        seq = make_sequence(client, max_tokens=100000)
        for layer in range(LAYERS):
            seq.prefill(layer, k, v)
        stop = threading.Event()
        errors: list[Exception] = []

        def decode_loop(seq: icecache.Sequence = seq) -> None:
            out = np.zeros((HQ, D), np.float16)
            try:
                while not stop.is_set():
                    for layer in range(LAYERS):
                        seq.decode(layer, q, kn, vn, out)
            except icecache.FailedPreconditionError as e:  # dropped between two decodes
                errors.append(e)

        worker = threading.Thread(target=decode_loop)
        worker.start()
        time.sleep(0.02)
        try:
            seq.drop()
        except icecache.FailedPreconditionError as e:
            refused = e
        stop.set()
        worker.join()
        if refused is not None:
            assert errors == []  # the decodes went on: nothing was dropped
            seq.drop()  # now it goes
            break
        # The drop landed between two decodes: the worker's next one found the sequence gone.
        assert len(errors) == 1 and "dropped" in errors[0].message, errors
    assert refused is not None, "no drop() landed inside a decode in 50 rounds"
    assert "in use by another thread" in refused.message
    with pytest.raises(icecache.FailedPreconditionError):
        seq.decode(0, q, kn, vn, np.zeros((HQ, D), np.float16))


@pytest.mark.skipif(not icecache.HAS_DECODE_BATCH, reason="the C++ library has no DecodeBatch")
def test_decode_batch_holds_its_sequences_for_the_call(client: icecache.Client) -> None:
    """The list given to decode_batch may lose a sequence's last reference in another thread
    during the call (a finished request removed): the call keeps it alive until it returns
    (it freed the sequence under the running batch before). A sequence twice is refused."""
    rng = np.random.default_rng(12)
    k, v = rand(rng, 400, HK, D), rand(rng, 400, HK, D)
    for _ in range(20):
        seqs = [make_sequence(client, max_tokens=100000) for _ in range(2)]
        for layer in range(LAYERS):
            seqs[0].prefill(layer, k, v)
            seqs[1].prefill(layer, k, v)
        gone = weakref.ref(seqs[1])
        q, kn, vn = rand(rng, 2, HQ, D), rand(rng, 2, HK, D), rand(rng, 2, HK, D)
        out = np.zeros((2, HQ, D), np.float16)
        done = threading.Event()
        failures: list[Exception] = []

        def batch_loop(batch: list = seqs) -> None:
            try:
                for _ in range(200):
                    for layer in range(LAYERS):
                        client.decode_batch(layer, batch, q, kn, vn, out)
            except icecache.InvalidArgumentError as e:
                # The list lost its second sequence before a call took it: 2 queries for 1.
                if len(batch) == 2 or "shape (2, 4, 64), expected (1, 4, 64)" not in e.message:
                    failures.append(e)
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(e)
            done.set()

        worker = threading.Thread(target=batch_loop)
        worker.start()
        time.sleep(0.01)
        seqs.pop()  # the last reference to the second sequence, while the worker decodes
        worker.join()
        assert done.is_set() and failures == [], failures
        gc.collect()
        assert gone() is None  # freed once the call that held it returned
    s = seqs[0]
    with pytest.raises(icecache.InvalidArgumentError) as e:
        client.decode_batch(0, [s, s], rand(rng, 2, HQ, D), rand(rng, 2, HK, D),
                            rand(rng, 2, HK, D), np.zeros((2, HQ, D), np.float16))
    assert "twice" in e.value.message
    with pytest.raises(icecache.InvalidArgumentError):
        client.decode_batch(0, [s, "not a sequence"], rand(rng, 2, HQ, D), rand(rng, 2, HK, D),
                            rand(rng, 2, HK, D), np.zeros((2, HQ, D), np.float16))
    s.drop()


def stop_process(pid: int) -> None:
    """SIGSTOP, and wait until every thread is stopped (one still running may yet answer)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue  # a thread that ended
        if states and all(s in ("T", "t") for s in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def test_drops_on_exit_and_collection_let_other_threads_run() -> None:
    """Leaving a with-block and collecting a sequence drop it in the daemon, a round trip that
    a stopped daemon stretches to the request timeout: other Python threads run meanwhile."""
    from conftest import Daemon

    d = Daemon()
    try:
        c = icecache.Client.attach(d.socket, mode=ExecutionMode.CPU, timeout=1)
        ticks = [0]
        stop = threading.Event()

        def ticker() -> None:
            while not stop.is_set():
                ticks[0] += 1
                time.sleep(0.005)

        t = threading.Thread(target=ticker)
        t.start()
        for how in ("exit", "del"):
            seq = make_sequence(c)
            stop_process(d.proc.pid)
            before, start = ticks[0], time.monotonic()
            if how == "exit":
                with seq:
                    pass
            else:
                del seq
            took = time.monotonic() - start
            d.proc.send_signal(signal.SIGCONT)
            # The drop waited about the 1 s timeout; the ticker ran through it (it was frozen).
            assert took > 0.5, (how, took)
            assert ticks[0] - before > 0.25 * took / 0.005, (how, ticks[0] - before, took)
        stop.set()
        t.join()
        del c  # detached before the daemon stops (it would wait for the client)
    finally:
        d.proc.send_signal(signal.SIGCONT)
        d.stop()


def test_sequences_let_go_after_the_daemon_died_are_dropped_at_once() -> None:
    """A sequence dropped or collected after its daemon died is forgotten without waiting for
    a successor (each waited the 60 s reconnect timeout: an interpreter's exit took a minute
    per sequence left alive)."""
    from conftest import Daemon

    d = Daemon()
    try:
        c = icecache.Client.attach(d.socket, mode=ExecutionMode.CPU, timeout=5)
        seqs = [make_sequence(c) for _ in range(3)]
        d.proc.kill()
        d.proc.wait()
        start = time.monotonic()
        seqs[0].drop()
        with seqs[1]:
            pass
        del seqs[2]
        gc.collect()
        took = time.monotonic() - start
        assert took < 10, took
        with pytest.raises(icecache.FailedPreconditionError):
            seqs[0].drop()  # dropped: not twice
        del seqs, c
    finally:
        d.stop()


def test_stubs_and_docstrings_are_installed() -> None:
    import icecache._core as core

    stub = pathlib.Path(core.__file__).with_name("_core.pyi").read_text()
    assert "def decode(self, layer: int, q:" in stub
    assert "def attach(" in stub and "class Sequence" in stub
    assert "written in place" in (icecache.Sequence.decode.__doc__ or "")
    assert (pathlib.Path(core.__file__).parent / "py.typed").exists()


def test_tokenizer_splits_digits_like_llama_cpp() -> None:
    from conftest import model_path

    path = model_path()
    if path is None:
        pytest.skip("the model is not fetched (scripts/fetch_model.sh)")
    from icecache.tokenizer import GgufTokenizer

    tok = GgufTokenizer.from_file(str(path))
    assert tok.pre == "smollm" and tok.vocab_size == 49152
    ids = tok.encode("====\n\n\n1. 12345")
    pieces = [tok.token_text(i) for i in ids]
    assert "\n\n\n" in pieces  # one token, as llama.cpp (transformers' GGUF tokenizer: two)
    assert pieces[-5:] == ["1", "2", "3", "4", "5"]
    assert tok.decode(ids) == "====\n\n\n1. 12345"
    # A byte token that is part of a UTF-8 character: replaced in its text, whole in its bytes.
    byte_a1 = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"\xa1")
    assert tok.token_text(byte_a1) == "\ufffd"
    with pytest.raises(icecache.IceCacheError):
        GgufTokenizer.from_file("/nonexistent.gguf")


@pytest.mark.skipif(not icecache.HAS_DECODE_BATCH, reason="the C++ library has no DecodeBatch")
def test_decode_batch_equals_single_sequence_decodes(client: icecache.Client) -> None:
    rng = np.random.default_rng(5)
    prompts = [40, 300, 130]  # different lengths in one batch
    data = [(rand(rng, p, HK, D), rand(rng, p, HK, D)) for p in prompts]
    batched = [make_sequence(client, budget_tokens=128) for _ in prompts]
    single = [make_sequence(client, budget_tokens=128) for _ in prompts]
    for seqs in (batched, single):
        for s, (k, v) in zip(seqs, data):
            for layer in range(LAYERS):
                s.prefill(layer, k, v)
    n = len(prompts)
    for _ in range(20):
        for layer in range(LAYERS):
            q, kn, vn = rand(rng, n, HQ, D), rand(rng, n, HK, D), rand(rng, n, HK, D)
            out_batch = np.full((n, HQ, D), np.nan, np.float16)
            client.decode_batch(layer, batched, q, kn, vn, out_batch)
            out_single = np.full((n, HQ, D), np.nan, np.float16)
            for i, s in enumerate(single):
                s.decode(layer, q[i], kn[i], vn[i], out_single[i])
            np.testing.assert_array_equal(out_batch, out_single)
    # One bad sequence does not stop the others; the error names it and lists every result.
    batched[1].drop()
    q, kn, vn = rand(rng, n, HQ, D), rand(rng, n, HK, D), rand(rng, n, HK, D)
    out = np.zeros((n, HQ, D), np.float16)
    with pytest.raises(icecache.FailedPreconditionError) as e:
        client.decode_batch(0, batched, q, kn, vn, out)
    assert [s is None for s in e.value.statuses] == [True, False, True]
    assert np.abs(out[0].astype(np.float32)).sum() > 0
    with pytest.raises(icecache.InvalidArgumentError):
        client.decode_batch(0, [], q, kn, vn, out)
    for s in batched[0::2] + single:
        s.drop()
