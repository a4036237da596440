"""The daemon's operator API (gRPC ``icecache.v1.IceCache``) through Python's grpcio.

The same API the ``icecache`` CLI uses, over the daemon's unix socket (or its --tcp address):

    with icecache.operator.Operator("/run/icecache/icecached.sock") as op:
        print(op.stats().memory_used_bytes)
        for s in op.sequences():
            print(s.handle, s.num_tokens)

Seeing and dropping sequences needs a token: by default an operator attachment is made on the
attach socket (granted to the daemon's --operator-uids; it sees every client's sequences);
``token=client.token`` shows one client's own. Stats and config need none. The messages are
the generated ``icecache.v1.icecache_pb2`` classes; failed calls raise the icecache.errors
exception of their gRPC status code (the same numbers as absl's).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from icecache import _core
from icecache.errors import error_from_status

try:
    from icecache.v1 import icecache_pb2, icecache_pb2_grpc
except ImportError as e:  # built without grpcio-tools
    raise ImportError(
        "icecache.operator needs the gRPC stubs generated at build time with grpcio-tools"
    ) from e

TOKEN_METADATA_KEY = "icecache-client-token"

__all__ = ["Operator", "icecache_pb2"]


class Operator:
    """A gRPC channel to icecached's control API.

    Args:
        socket: the daemon's control socket; None: the default path (as icecached resolves it).
        address: "host:port" of the daemon's --tcp listener instead of the socket (stats and
            config only: no attachment there).
        token: the icecache-client-token for sequence calls; None: attach as an operator on
            first need (unix socket only).
        timeout: seconds per call.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        address: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if address is None and socket is None:
            socket = _core.default_socket_path()
        self.socket = socket
        self.timeout = timeout
        self._token = token
        self._operator: Any = None
        target = address if address is not None else f"unix:{socket}"
        self._channel = grpc.insecure_channel(target)
        self._stub = icecache_pb2_grpc.IceCacheStub(self._channel)

    # -- plumbing
    def _metadata(self, needs_token: bool) -> list[tuple[str, str]]:
        if not needs_token:
            return []
        if self._token is None:
            if self.socket is None:
                raise ValueError("sequence calls need a token: pass token= or use the socket")
            self._operator = _core.OperatorAttachment.attach(self.socket, self.timeout)
            self._token = self._operator.token
        return [(TOKEN_METADATA_KEY, self._token)]

    def _call(self, method: str, request: Any, needs_token: bool = False) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=self.timeout, metadata=self._metadata(needs_token)
            )
        except grpc.RpcError as e:
            raise error_from_status(e.code().value[0], e.details() or "") from None

    # -- the API
    def stats(self) -> icecache_pb2.GetStatsResponse:
        """Daemon-wide counters and gauges: memory, sequences, uptime, version."""
        return self._call("GetStats", icecache_pb2.GetStatsRequest())

    def config(self) -> icecache_pb2.GetConfigResponse:
        """The configuration in force and the limits a geometry must meet."""
        return self._call("GetConfig", icecache_pb2.GetConfigRequest())

    def sequences(self, page_size: int = 100) -> Iterator[icecache_pb2.Sequence]:
        """Every live sequence the token sees, ordered by handle (paged through)."""
        page_token = ""
        while True:
            req = icecache_pb2.ListSequencesRequest(page_size=page_size, page_token=page_token)
            resp = self._call("ListSequences", req, needs_token=True)
            yield from resp.sequences
            page_token = resp.next_page_token
            if not page_token:
                return

    def sequence(self, handle: str) -> icecache_pb2.Sequence:
        """One sequence. Raises NotFoundError, InvalidArgumentError (malformed handle)."""
        req = icecache_pb2.GetSequenceRequest(handle=handle)
        return self._call("GetSequence", req, needs_token=True).sequence

    def drop(self, handle: str) -> None:
        """Drops a sequence. Raises NotFoundError (also when already dropped)."""
        self._call("DropSequence", icecache_pb2.DropSequenceRequest(handle=handle), True)

    def close(self) -> None:
        self._channel.close()
        self._operator = None

    def __enter__(self) -> Operator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
