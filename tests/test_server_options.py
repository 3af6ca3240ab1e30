"""Each option of astral.serve reaches the layer that acts on it.

A mutation run (docs/testing.md) showed that serve could drop any of its
limits and timeouts on the way to the WebSocket server or the peer without a
test noticing. Each test sets one option to a small value and watches its
effect from the other end of a real connection on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

import astral

from .helpers import running_principal, token

HOST = "127.0.0.1"


class RawWorker:
    """A worker made of wsproto and TCP, to see frames as they are on the wire."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def open(self) -> None:
        target = f"/astral?token={token()}"
        await self.stream.send(self.ws.send(Request(host=HOST, target=target)))
        while True:
            self.ws.receive_data(await self.stream.receive())
            for event in self.ws.events():
                assert isinstance(event, AcceptConnection), event
                return

    async def next_event(self, *kinds: type) -> Any:
        """Read until an event of one of ``kinds`` arrives, answering nothing."""
        while True:
            for event in self.ws.events():
                if isinstance(event, kinds):
                    return event
            self.ws.receive_data(await self.stream.receive())


@asynccontextmanager
async def raw_worker(port: int) -> AsyncIterator[RawWorker]:
    async with await anyio.connect_tcp(HOST, port) as stream:
        worker = RawWorker(stream)
        await worker.open()
        yield worker


async def test_max_message_size_closes_with_1009() -> None:
    # A raw worker, so that the principal's own limit is what acts (an astral
    # worker may refuse an oversized call before sending it).
    async with (
        running_principal(max_message_size=1000) as principal,
        raw_worker(principal.port) as worker,
    ):
        call = {"type": "call", "id": "1", "capability": "echo", "input": "x" * 900}
        await worker.stream.send(worker.ws.send(TextMessage(json.dumps(call))))
        result = json.loads((await worker.next_event(TextMessage)).data)
        assert (result["id"], result["output"]) == ("1", "x" * 900)
        call = {**call, "id": "2", "input": "x" * 2000}
        await worker.stream.send(worker.ws.send(TextMessage(json.dumps(call))))
        close = await worker.next_event(CloseConnection)
        assert close.code == 1009


async def test_max_header_size_answers_431() -> None:
    async with running_principal(max_header_size=2048) as principal:
        async with astral.connect(
            principal.url, token=token(), headers=[("x-pad", "p" * 1000)]
        ) as worker:
            assert await worker.call("echo", 1) == 1
        with pytest.raises(astral.HandshakeError) as info:
            async with astral.connect(
                principal.url, token=token(), headers=[("x-pad", "p" * 3000)]
            ):
                pytest.fail("connected with an oversized request head")
        assert info.value.status == 431


@pytest.mark.time_limit(5)
async def test_timeout_is_the_principals_default_call_timeout() -> None:
    async def hang(_: Any) -> None:
        await anyio.sleep_forever()

    async with (
        running_principal(timeout=0.2) as principal,
        astral.connect(principal.url, token=token(), capabilities={"hang": hang}),
    ):
        principal_side = await principal.registry.wait_for("worker-1")
        start = anyio.current_time()
        with pytest.raises(astral.CallTimeout):
            await principal_side.call("hang")
        # 0.2 s, not the 30 s default (the time limit) nor sooner. Whether the
        # call reached the worker first is not asserted: over TCP on a loaded
        # machine that races the 0.2 s timer.
        assert anyio.current_time() - start >= 0.2 - 0.01


async def test_max_inbound_calls_refuses_one_more() -> None:
    async with (
        running_principal(max_inbound_calls=1) as principal,
        astral.connect(principal.url, token=token()) as worker,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: worker.call("sleepy", timeout=None))
        await principal.sleepy_started.wait()
        with pytest.raises(astral.RemoteError, match="too many concurrent calls"):
            await worker.call("echo", 1)
        tg.cancel_scope.cancel()


async def test_max_buffered_items_is_the_window_the_principal_announces() -> None:
    async with (
        running_principal(max_buffered_items=4) as principal,
        raw_worker(principal.port) as worker,
    ):
        principal_side = await principal.registry.wait_for("worker-1")
        async with principal_side.stream("items", timeout=None):
            event = await worker.next_event(TextMessage)
            frame = json.loads(event.data)
            assert (frame["type"], frame["capability"]) == ("call", "items")
            assert frame["window"] == 4


@pytest.mark.time_limit(5)
async def test_ping_interval_and_timeout_close_a_silent_worker_with_1011() -> None:
    async with (
        running_principal(ping_interval=0.05, ping_timeout=0.05) as principal,
        raw_worker(principal.port) as worker,
    ):
        # The raw worker never answers: a ping comes, then the close.
        assert isinstance(await worker.next_event(Ping), Ping)
        close = await worker.next_event(CloseConnection)
        assert close.code == 1011


@pytest.mark.time_limit(5)
async def test_open_timeout_drops_a_client_that_never_sends_its_request() -> None:
    async with running_principal(open_timeout=0.1) as principal:
        async with await anyio.connect_tcp(HOST, principal.port) as stream:
            # Nothing sent: the server gives up and drops the connection.
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()


async def test_a_refused_token_is_logged_with_the_address_and_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="astral.server")
    async with running_principal() as principal:
        with pytest.raises(astral.Unauthorized):
            async with astral.connect(principal.url, token=token(expires_in=-3600)):
                pytest.fail("connected with an expired token")
    # Whatever the wording, the line names the client and the reason.
    [message] = [r.getMessage() for r in caplog.records if "token expired" in r.getMessage()]
    assert "127.0.0.1:" in message


@pytest.mark.time_limit(5)
async def test_close_timeout_bounds_the_wait_for_a_worker_that_never_answers_the_close() -> None:
    async with (
        running_principal(close_timeout=0.3, grace=0) as principal,
        raw_worker(principal.port) as worker,
    ):
        await principal.registry.wait_for("worker-1")
        principal.stop()  # shutdown: the principal sends its close frame...
        close = await worker.next_event(CloseConnection)
        assert close.code == 1001
        asked = anyio.current_time()
        # ...and the raw worker never answers it: after close_timeout (not the
        # 10 s default) the principal drops TCP.
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await worker.next_event(TextMessage)
        assert anyio.current_time() - asked >= 0.3 - 0.05
