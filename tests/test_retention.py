"""An idle connection keeps nothing it no longer needs (issue #10).

The upgrade request is dropped once served. The last call's input: each
test runs a principal and a worker in this process over a real socket
on 127.0.0.1, makes one call whose input is a large string, then lets the
connection go idle and asks tracemalloc how much of that input this process
still holds. It is mostly the callee side that would keep it (the caller's
frames are gone once its call returns), so each direction is tested: a
worker calling the principal, and the principal calling a worker.

``reader_moved_on`` tells the two ways something can keep the last call:

* ``True``: after the large call, the callee itself makes a small call the
  other way, so that its readers' last message is that small reply. What is
  left is what the idle worker task that served the call keeps (its
  ``work`` tuple, the ``current_call`` and input-stream context variables).
* ``False``: the connection goes idle right after the large call: the
  readers' last message is that call too (and, on trio, the caller's writer
  task's last write).
"""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import astral
from astral._ws_connection import WebSocketConnection

from .helpers import running_principal, token

SIZE = 1_000_000  # characters of the large input (ASCII: one byte each)
# What may stay: far above noise (a few KiB), far below the input (~1 MB,
# held once or several times over: decoded, as text, as bytes).
MARGIN = SIZE // 4


async def length(text: Any) -> int:
    return len(text)


async def pong(_: Any) -> str:
    return "pong"


@contextlib.asynccontextmanager
async def passing(_: astral.CallInfo) -> AsyncIterator[None]:
    yield  # a middleware that only looks: calls take the observed path


@contextlib.contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """tracemalloc running for the block; yields a function giving the memory it traces now."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()

    def now() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    try:
        yield now
    finally:
        if started:
            tracemalloc.stop()


@pytest.mark.time_limit(30)
@pytest.mark.parametrize(
    "reader_moved_on",
    [pytest.param(True, id="worker-task"), pytest.param(False, id="idle")],
)
@pytest.mark.parametrize("observed", [False, True], ids=["plain", "middleware"])
@pytest.mark.parametrize("direction", ["worker-calls-principal", "principal-calls-worker"])
async def test_an_idle_connection_lets_its_last_input_go(
    direction: str, observed: bool, reader_moved_on: bool
) -> None:
    middleware = [passing] if observed else []
    capabilities = {"length": length, "pong": pong}
    async with (
        running_principal(capabilities=capabilities, middleware=middleware) as principal,
        astral.connect(
            principal.url, token=token(), capabilities=capabilities, middleware=middleware
        ) as worker,
    ):
        principal_side = await principal.registry.wait_for("worker-1")
        caller, callee = (
            (worker, principal_side)
            if direction == "worker-calls-principal"
            else (principal_side, worker)
        )

        async def one_call(size: int) -> None:
            text = "x" * size
            assert await caller.call("length", text) == size
            del text
            if reader_moved_on:
                # The callee's readers now hold a small reply, and its
                # worker pool is untouched (it is the callee that calls).
                assert await callee.call("pong") == "pong"

        with traced() as now:
            await one_call(10)  # warm: the worker task exists, caches are filled
            before = now()
            await one_call(SIZE)
            retained = now() - before
        assert retained < MARGIN, f"{retained} bytes still held after the call"


async def test_a_served_connection_drops_its_upgrade_request() -> None:
    # Its headers carry the bearer token: not kept for the connection's life.
    async with (
        running_principal() as principal,
        astral.connect(principal.url, token=token()) as worker,
    ):
        principal_side = await principal.registry.wait_for("worker-1")
        transport = principal_side._transport
        assert isinstance(transport, WebSocketConnection)
        assert transport.request is None
        assert principal_side.claims["sub"] == "worker-1"
        assert await worker.call("whoami") == "worker-1"
