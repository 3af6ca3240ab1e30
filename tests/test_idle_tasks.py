"""An idle connection keeps no task it does not need (issue #10).

Inbound calls run on pooled worker tasks: a worker that finishes the only
call in flight parks for the next call only when calls come close
together (the last two began less than ``WORKER_IDLE`` seconds apart);
otherwise it ends, so a connection that called once and went quiet holds
no worker task. Workers stay pooled through a burst of concurrent calls.
The WebSocket's writer task (trio; on asyncio writes go straight to the
transport) follows the same rule.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import astral._peer
from astral._websocket import open_websocket
from astral.testing import connected_pair

from .helpers import echo, eventually
from .test_websocket import HOST, server

pytestmark = pytest.mark.anyio


def workers() -> int:
    """Worker tasks running now (each one serves inbound calls)."""
    return sum(task.name.endswith("Peer._worker") for task in anyio.get_running_tasks())


async def settled(peer: astral.Peer) -> None:
    """Wait until no inbound call of ``peer`` is in flight or waits for its worker."""
    await eventually(lambda: not peer._state.inbound and not peer._unstarted)


async def test_a_connection_that_called_once_keeps_no_worker() -> None:
    async with connected_pair({"echo": echo}, {}) as (a, b):
        assert await b.call("echo", 1) == 1
        await settled(a)
        await eventually(lambda: workers() == 0)
        assert a._idle_workers == []


async def test_calls_that_come_close_together_reuse_one_parked_worker() -> None:
    async with connected_pair({"echo": echo}, {}) as (a, b):
        for i in range(5):
            assert await b.call("echo", i) == i
        await settled(a)
        await eventually(lambda: len(a._idle_workers) == 1)
        assert workers() == 1


async def test_rare_calls_park_no_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every gap counts as long: each call gets a worker that ends with it.
    monkeypatch.setattr(astral._peer, "WORKER_IDLE", 0.0)
    async with connected_pair({"echo": echo}, {}) as (a, b):
        for i in range(3):
            assert await b.call("echo", i) == i
            await settled(a)
            await eventually(lambda: workers() == 0)
        assert a._idle_workers == []


async def test_workers_stay_pooled_through_a_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(astral._peer, "WORKER_IDLE", 0.0)
    release = anyio.Event()
    running = 0

    async def hold(_: Any) -> None:
        nonlocal running
        running += 1
        await release.wait()

    async with connected_pair({"hold": hold}, {}) as (a, b):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(b.call, "hold", None)
            await eventually(lambda: running == 5)
            release.set()
        await settled(a)
        # The first four to finish had others in flight and parked; the last
        # one, alone and after a long gap, ended.
        await eventually(lambda: workers() == 4)
        assert len(a._idle_workers) == 4


def writers() -> int:
    """WebSocket writer tasks running now (the keepalive task is TLS-only)."""
    return sum(
        task.name.endswith("WebSocketConnection._shielded") for task in anyio.get_running_tasks()
    )


async def test_a_connection_that_wrote_once_keeps_no_writer_task() -> None:
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        await ws.send("one")
        assert await ws.receive() == "one"
        await eventually(lambda: writers() == 0)


@pytest.mark.parametrize("anyio_backend", ["trio"])  # asyncio writes need no task
async def test_writes_that_come_close_together_keep_the_writer_parked() -> None:
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        for text in ["one", "two", "three"]:
            await ws.send(text)
            assert await ws.receive() == text
        # Each side's writer wrote more than once within WRITER_IDLE: parked.
        await eventually(lambda: writers() == 2)
        await ws.send("four")
        assert await ws.receive() == "four"
        assert writers() == 2
