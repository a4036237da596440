"""icecache.operator: the daemon's gRPC control API through grpcio, against a real icecached."""

from __future__ import annotations

import pytest

import icecache
from icecache.operator import Operator


def test_stats_config_and_sequences(daemon: object, client: icecache.Client) -> None:
    socket = daemon.socket  # type: ignore[attr-defined]
    with Operator(socket) as op:
        before = op.stats()
        seq = client.create_sequence(4, 8, 2, 64, max_tokens=1024, label="operator-test")
        stats = op.stats()
        assert stats.num_sequences == before.num_sequences + 1
        assert stats.sequences_created_total == before.sequences_created_total + 1
        assert stats.memory_used_bytes > before.memory_used_bytes
        assert stats.memory_limit_bytes == 4 << 30
        assert stats.version
        config = op.config()
        assert config.index_preset  # the daemon's preset (its default)

        # The operator attachment sees every client's sequences.
        listed = {s.handle: s for s in op.sequences()}
        assert seq.handle in listed
        s = listed[seq.handle]
        assert s.label == "operator-test"
        assert (s.geometry.num_layers, s.geometry.head_dim, s.geometry.max_tokens) == (4, 64, 1024)
        assert op.sequence(seq.handle).handle == seq.handle

        op.drop(seq.handle)
        with pytest.raises(icecache.NotFoundError) as e:
            op.drop(seq.handle)
        assert e.value.code == icecache.StatusCode.NOT_FOUND
        with pytest.raises(icecache.InvalidArgumentError):
            op.sequence("not-a-handle")
        assert op.stats().sequences_dropped_total == stats.sequences_dropped_total + 1


def test_client_token_sees_only_its_own(daemon: object, client: icecache.Client) -> None:
    socket = daemon.socket  # type: ignore[attr-defined]
    other = icecache.Client.attach(socket, mode=icecache.ExecutionMode.CPU)
    mine = client.create_sequence(2, 4, 2, 64, max_tokens=64, label="mine")
    theirs = other.create_sequence(2, 4, 2, 64, max_tokens=64, label="theirs")
    with Operator(socket, token=client.token) as op:
        handles = {s.handle for s in op.sequences()}
        assert mine.handle in handles and theirs.handle not in handles
        with pytest.raises(icecache.NotFoundError):
            op.sequence(theirs.handle)
    with Operator(socket, token="0" * 32) as op:
        with pytest.raises(icecache.UnauthenticatedError):
            list(op.sequences())
    mine.drop()
    theirs.drop()


def test_unreachable_daemon_is_unavailable(tmp_path: object) -> None:
    with Operator(f"{tmp_path}/none.sock", timeout=2) as op:
        with pytest.raises(icecache.UnavailableError):
            op.stats()
