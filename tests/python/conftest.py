"""Fixtures of the Python suites: a real icecached (the build's binary), an attached client in
CPU mode, and the real model where it has been fetched.

Environment (tests/python/tests.cmake sets it for ctest): ICECACHE_ICECACHED_BIN (the daemon),
ICECACHE_MODEL_REFERENCE_BIN (the C++ model path), ICECACHE_MODEL (the GGUF; default: the path
scripts/fetch_model.sh caches it at).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

import icecache

REPO = pathlib.Path(__file__).resolve().parents[2]


def _binary(var: str) -> str:
    path = os.environ.get(var)
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"{var} must name an executable (run the suites through ctest)")
    return path


class Daemon:
    """icecached on a private socket, stopped with SIGTERM at the end."""

    def __init__(self, *flags: str) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="icecache-py-")
        self.socket = os.path.join(self.dir.name, "icecached.sock")
        self.log = open(os.path.join(self.dir.name, "icecached.log"), "w+")
        self.proc = subprocess.Popen(
            [
                _binary("ICECACHE_ICECACHED_BIN"),
                f"--socket={self.socket}",
                "--metrics-port=-1",
                "--memory-limit=4GiB",
                *flags,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                icecache.Client.attach(self.socket, mode=icecache.ExecutionMode.CPU, timeout=5)
                break
            except icecache.UnavailableError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    raise RuntimeError("icecached did not start:\n" + self.log.read())
                time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.dir.cleanup()
        return self.proc.returncode


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="session")
def client(daemon: Daemon) -> icecache.Client:
    return icecache.Client.attach(daemon.socket, mode=icecache.ExecutionMode.CPU)


def model_path() -> pathlib.Path | None:
    """The fetched GGUF (scripts/fetch_model.sh), or None."""
    env = os.environ.get("ICECACHE_MODEL")
    if env:
        return pathlib.Path(env)
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    path = cache / "icecache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None
