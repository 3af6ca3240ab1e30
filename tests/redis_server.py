"""A real ``redis-server`` for the cluster tests: free port, no persistence.

The Debian package ``redis-server`` provides the binary (``.ci/run`` installs
it). Where it is missing the tests that need it skip, saying how to install it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

BINARY = shutil.which("redis-server")
SKIP_REASON = (
    "redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server) "
    "to run the cluster tests"
)
needs_redis = pytest.mark.skipif(BINARY is None, reason=SKIP_REASON)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process that can be stopped and started again on its port."""

    def __init__(self, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.chosen = port is None  # a port of our own choosing may be replaced
        self.started = False
        self.extra = extra
        self.process: subprocess.Popen[str] | None = None
        self.directory = tempfile.mkdtemp(prefix="astral-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it; a port another process took since it was picked is replaced.

        The first start of a port picked by :func:`free_port` moves to another
        free port if the first one was taken in between (the probe socket is
        closed before redis-server binds). A restart keeps its port, as the
        tests that restart Redis need, and tries it again a bounded number of
        times: nothing signals when the kernel lets the port go.
        """
        for attempt in range(20):
            try:
                self._start_once()
            except _PortTaken:
                if attempt == 19:
                    raise
                if self.chosen and not self.started:
                    self.port = free_port()
                else:
                    time.sleep(0.05)
            else:
                self.started = True
                return

    def _start_once(self) -> None:
        assert BINARY is not None, SKIP_REASON
        self.process = subprocess.Popen(
            [
                BINARY,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        # Its own "ready" line, not a sleep, says when it accepts connections.
        seen = []
        for line in self.process.stdout:
            seen.append(line)
            if "Ready to accept connections" in line:
                break
        else:
            self.process.wait(timeout=10)
            self.process = None
            if any("Address already in use" in line for line in seen):
                raise _PortTaken("".join(seen))
            raise RuntimeError("redis-server did not start:\n" + "".join(seen))
        # Keep reading its output so it never blocks on a full pipe; the pipe
        # is closed once the server has gone.
        self._reader = threading.Thread(target=_drain, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
            self._reader.join(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class _PortTaken(RuntimeError):
    """redis-server could not bind its port."""


def _drain(stdout: IO[str]) -> None:
    with stdout:
        for _ in stdout:
            pass


@contextmanager
def redis_server(*extra: str) -> Iterator[RedisServer]:
    server = RedisServer(*extra)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def write_file(directory: str, name: str, data: bytes) -> str:
    path = Path(directory) / name
    path.write_bytes(data)
    return str(path)
