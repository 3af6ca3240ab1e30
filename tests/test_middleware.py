"""Middleware: every call in both directions, single or streaming, in one hook."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import astral
import astral.asgi
from astral import CallInfo, Failure, Peer, RemoteError, decode
from astral.testing import memory_transport_pair

from .helpers import running_principal, token
from .test_asgi import VERIFIER, FakeServer, bearer
from .test_asgi import token as asgi_token


class Recorder:
    """A middleware that remembers each call, and signals when each ended."""

    def __init__(self, name: str = "rec", log: list[str] | None = None) -> None:
        self.name = name
        self.log = [] if log is None else log
        self.calls: list[CallInfo] = []
        self.ended: list[CallInfo] = []
        self.any_ended = anyio.Event()

    @asynccontextmanager
    async def __call__(self, call: CallInfo) -> AsyncIterator[None]:
        self.calls.append(call)
        self.log.append(f"{self.name} enter {call.direction} {call.capability}")
        yield
        self.log.append(f"{self.name} leave {call.direction} {call.capability} {call.outcome}")
        self.ended.append(call)
        self.any_ended.set()

    async def wait_ended(self, n: int = 1) -> list[CallInfo]:
        while len(self.ended) < n:
            self.any_ended = anyio.Event()
            await self.any_ended.wait()
        return self.ended


async def echo(value: Any) -> Any:
    return value


async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def divide(_: Any) -> float:
    return 1 / 0


async def failing_stream(_: Any) -> AsyncIterator[int]:
    yield 0
    raise Failure("stopped", code="stopped")


class Blocking:
    """Capabilities that wait forever, and say when they started and ended."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.finished = anyio.Event()

    async def forever(self, _: Any) -> None:
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.finished.set()

    async def endless(self, _: Any) -> AsyncIterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            self.finished.set()


@asynccontextmanager
async def pair(
    server_mw: list[Any], client_mw: list[Any], caps: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Peer, Peer]]:
    a, b = memory_transport_pair()
    capabilities = {
        "echo": echo,
        "count": count,
        "divide": divide,
        "failing_stream": failing_stream,
    }
    capabilities.update(caps or {})
    async with (
        a,
        b,
        Peer(
            a,
            capabilities=capabilities,
            claims={"sub": "w-1", "scope": "echo count"},
            middleware=server_mw,
        ) as server,
        Peer(b, middleware=client_mw, max_buffered_items=4) as client,
    ):
        yield server, client


# -- what middleware see ---------------------------------------------------------------


async def test_a_single_result_is_seen_on_both_sides() -> None:
    inbound, outbound = Recorder(), Recorder()
    async with pair([inbound], [outbound]) as (server, client):
        assert await client.call("echo", {"x": 1}) == {"x": 1}
        [seen_in] = await inbound.wait_ended()
    [seen_out] = outbound.ended
    assert (seen_in.direction, seen_out.direction) == ("inbound", "outbound")
    for seen in (seen_in, seen_out):
        assert seen.capability == "echo"
        assert seen.input == {"x": 1}
        assert (seen.outcome, seen.output, seen.error) == ("result", {"x": 1}, None)
        assert seen.streaming is False
        assert seen.duration is not None
        assert seen.duration >= 0
    assert seen_in.call_id == seen_out.call_id
    assert seen_in.peer is server
    assert seen_in.peer.claims["sub"] == "w-1"
    assert seen_out.peer is client


async def test_an_error_is_seen_with_its_exception_on_each_side() -> None:
    inbound, outbound = Recorder(), Recorder()
    async with pair([inbound], [outbound]) as (_, client):
        with pytest.raises(RemoteError) as caught:
            await client.call("divide")
        [seen_in] = await inbound.wait_ended()
    [seen_out] = outbound.ended
    assert seen_in.outcome == seen_out.outcome == "error"
    assert isinstance(seen_in.error, ZeroDivisionError)
    assert seen_out.error is caught.value


async def test_a_stream_is_seen_once_with_its_items_on_each_side() -> None:
    inbound, outbound = Recorder(), Recorder()
    async with pair([inbound], [outbound]) as (_, client):
        async with client.stream("count", 10) as items:
            assert [item async for item in items] == list(range(10))
        # A stream returned by call() is watched until its end too.
        stream = await client.call("count", 3)
        assert [item async for item in stream] == [0, 1, 2]
        seen_in = await inbound.wait_ended(2)
    for seen, n in zip(seen_in, (10, 3), strict=True):
        assert (seen.outcome, seen.streaming, seen.items) == ("result", True, n)
    assert [(s.outcome, s.streaming, s.items) for s in outbound.ended] == [
        ("result", True, 10),
        ("result", True, 3),
    ]


async def test_a_stream_failing_part_way_is_an_error_on_each_side() -> None:
    inbound, outbound = Recorder(), Recorder()
    async with pair([inbound], [outbound]) as (_, client):
        with pytest.raises(RemoteError, match="stopped"):
            async with client.stream("failing_stream") as items:
                async for _item in items:
                    pass
        [seen_in] = await inbound.wait_ended()
    [seen_out] = outbound.ended
    assert (seen_in.outcome, seen_in.items) == ("error", 1)
    assert isinstance(seen_in.error, Failure)
    assert (seen_out.outcome, seen_out.items) == ("error", 1)
    assert isinstance(seen_out.error, RemoteError)
    assert seen_out.error.code == "stopped"


async def test_a_cancelled_call_is_seen_cancelled_on_each_side() -> None:
    blocking = Blocking()
    inbound, outbound = Recorder(), Recorder()
    async with pair([inbound], [outbound], {"forever": blocking.forever}) as (_, client):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                await client.call("forever")

            tg.start_soon(call)
            await blocking.started.wait()
            tg.cancel_scope.cancel()
        [seen_in] = await inbound.wait_ended()
        assert blocking.finished.is_set()
    [seen_out] = outbound.ended
    assert (seen_in.outcome, seen_out.outcome) == ("cancelled", "cancelled")
    assert seen_in.error is None
    assert seen_out.error is None


async def test_a_stream_left_early_is_seen_cancelled_on_each_side() -> None:
    blocking = Blocking()
    inbound, outbound = Recorder(), Recorder()
    async with pair([inbound], [outbound], {"endless": blocking.endless}) as (_, client):
        async with client.stream("endless") as items:
            async for item in items:
                if item == 5:
                    break
        [seen_in] = await inbound.wait_ended()
    [seen_out] = outbound.ended
    assert (seen_in.outcome, seen_in.streaming) == ("cancelled", True)
    assert seen_in.items >= 6
    assert (seen_out.outcome, seen_out.items) == ("cancelled", 6)


async def test_a_call_timing_out_is_an_error_for_the_caller() -> None:
    blocking = Blocking()
    outbound = Recorder()
    async with pair([], [outbound], {"forever": blocking.forever}) as (_, client):
        with pytest.raises(astral.CallTimeout):
            await client.call("forever", timeout=0.05)
    [seen_out] = outbound.ended
    assert seen_out.outcome == "error"
    assert isinstance(seen_out.error, astral.CallTimeout)


async def test_middleware_nest_first_outermost() -> None:
    log: list[str] = []
    first, second = Recorder("first", log), Recorder("second", log)
    async with pair([], [first, second]) as (_, client):
        assert await client.call("echo", 1) == 1
    assert log == [
        "first enter outbound echo",
        "second enter outbound echo",
        "second leave outbound echo result",
        "first leave outbound echo result",
    ]


# -- refusing, and failing -------------------------------------------------------------


@asynccontextmanager
async def authorize(call: CallInfo) -> AsyncIterator[None]:
    """Per-capability authorization from the token's scopes (as in the docs)."""
    scopes = str(call.peer.claims.get("scope", "")).split()
    if call.capability not in scopes:
        raise Failure("forbidden", code="forbidden", data={"capability": call.capability})
    yield


async def test_authorization_from_scopes_refuses_before_the_capability_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    async def secret(_: Any) -> str:
        ran.append("secret")
        return "s"

    caplog.set_level(logging.DEBUG, logger="astral")
    watcher = Recorder()
    async with pair([watcher, authorize], [], {"secret": secret}) as (_, client):
        assert await client.call("echo", 1) == 1
        with pytest.raises(RemoteError) as caught:
            await client.call("secret")
        assert await client.call("echo", 2) == 2  # the connection lives on
        await watcher.wait_ended(3)
    assert ran == []
    assert (str(caught.value), caught.value.code) == ("forbidden", "forbidden")
    assert caught.value.data == {"capability": "secret"}
    # The middleware around the refusing one saw the refusal.
    assert watcher.ended[1].outcome == "error"
    assert isinstance(watcher.ended[1].error, Failure)
    # A deliberate refusal is no error in the logs.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_middleware_that_raises_fails_the_call_on_both_sides_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[Any] = []

    async def record(value: Any) -> Any:
        ran.append(value)
        return value

    @asynccontextmanager
    async def broken(call: CallInfo) -> AsyncIterator[None]:
        if call.input == "break":
            raise RuntimeError("metrics backend down")
        yield

    caplog.set_level(logging.WARNING, logger="astral")
    async with pair([broken], [], {"record": record}) as (_, client):
        with pytest.raises(RemoteError) as caught:
            await client.call("record", "break")
        assert await client.call("record", "ok") == "ok"
    assert ran == ["ok"]
    assert (str(caught.value), caught.value.code) == ("metrics backend down", "internal")
    [record_] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (record_.name, record_.levelno) == ("astral.middleware", logging.ERROR)
    assert "'record'" in record_.getMessage()
    assert record_.exc_info is not None


async def test_a_middleware_failing_on_the_way_out_fails_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @asynccontextmanager
    async def broken_after(call: CallInfo) -> AsyncIterator[None]:
        yield
        raise RuntimeError("could not record")

    caplog.set_level(logging.ERROR, logger="astral")
    async with pair([broken_after], []) as (_, client):
        with pytest.raises(RemoteError) as caught:
            await client.call("echo", 1)
        with pytest.raises(RemoteError) as caught_stream:
            await client.call("count", 0)  # a stream's end too
        assert not client.closed  # and the connection lives on
    assert caught.value.code == caught_stream.value.code == "internal"
    records = [r for r in caplog.records if r.name == "astral.middleware"]
    assert len(records) == 2
    assert all(r.levelno == logging.ERROR for r in records)


async def test_an_outbound_middleware_can_refuse_before_anything_is_sent() -> None:
    class RateLimited(Exception):
        pass

    @asynccontextmanager
    async def limit(call: CallInfo) -> AsyncIterator[None]:
        if call.capability == "echo" and call.input == "too many":
            raise RateLimited
        yield

    inbound, outbound = Recorder(), Recorder()
    async with pair([inbound], [outbound, limit]) as (_, client):
        with pytest.raises(RateLimited):
            await client.call("echo", "too many")
        with pytest.raises(RateLimited):
            async with client.stream("echo", "too many"):
                pass  # pragma: no cover
        assert await client.call("echo", "fine") == "fine"
        await inbound.wait_ended()
    assert [c.input for c in inbound.calls] == ["fine"]  # nothing else reached the remote
    assert [c.outcome for c in outbound.ended] == ["error", "error", "result"]


async def test_an_outbound_middleware_failing_on_the_way_out_raises_to_the_caller() -> None:
    @asynccontextmanager
    async def broken_after(call: CallInfo) -> AsyncIterator[None]:
        yield
        raise RuntimeError("could not record")

    async with pair([], [broken_after]) as (_, client):
        with pytest.raises(RuntimeError, match="could not record"):
            await client.call("echo", 1)
        with pytest.raises(RuntimeError, match="could not record"):
            async with client.stream("count", 2) as items:
                assert [item async for item in items] == [0, 1]
        assert client.closed is False


async def test_an_outbound_middleware_sets_trace_context_the_callee_sees() -> None:
    @asynccontextmanager
    async def inject(call: CallInfo) -> AsyncIterator[None]:
        call.trace["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
        yield

    inbound = Recorder()
    async with pair([inbound], [inject]) as (_, client):
        assert await client.call("echo", 1) == 1
        [seen] = await inbound.wait_ended()
    assert seen.trace == {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}


async def test_the_trace_field_is_on_the_wire_only_when_set() -> None:
    @asynccontextmanager
    async def inject(call: CallInfo) -> AsyncIterator[None]:
        if call.input == 1:
            call.trace["traceparent"] = "tp"
        yield

    ours, theirs = memory_transport_pair()
    async with theirs, Peer(ours, middleware=[inject], timeout=None) as peer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(peer.call, "x", 1)
            first = await theirs.receive()
            tg.start_soon(peer.call, "x", 2)
            second = await theirs.receive()
            tg.cancel_scope.cancel()
    assert json.loads(first)["trace"] == {"traceparent": "tp"}
    assert "trace" not in json.loads(second)
    assert decode(first).trace == {"traceparent": "tp"}


async def test_a_call_while_the_middleware_enters_is_cancelled_cleanly() -> None:
    entered = anyio.Event()

    @asynccontextmanager
    async def slow(call: CallInfo) -> AsyncIterator[None]:
        if call.input == "hang":
            entered.set()
            await anyio.sleep_forever()
        yield

    watcher = Recorder()
    async with pair([], [watcher, slow]) as (_, client):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call, "echo", "hang")
            await entered.wait()
            tg.cancel_scope.cancel()
        assert await client.call("count", 0) is None
    assert [c.outcome for c in watcher.ended] == ["cancelled", "result"]


# -- given to connect, serve and the ASGI app --------------------------------------------


async def test_connect_and_serve_take_middleware_and_hide_internal_errors() -> None:
    inbound, outbound = Recorder(), Recorder()
    async with (
        running_principal(
            middleware=[inbound], hide_internal_errors=True, capabilities={"divide": divide}
        ) as principal,
        astral.connect(principal.url, token=token("w-9"), middleware=[outbound]) as worker,
    ):
        assert await worker.call("echo", 5) == 5
        with pytest.raises(RemoteError) as caught:
            await worker.call("divide")
        await inbound.wait_ended(2)
    assert (str(caught.value), caught.value.code) == ("internal error", "internal")
    assert [(c.capability, c.outcome) for c in inbound.ended] == [
        ("echo", "result"),
        ("divide", "error"),
    ]
    assert inbound.ended[0].peer.claims["sub"] == "w-9"
    assert [c.outcome for c in outbound.ended] == ["result", "error"]


async def test_accept_takes_middleware() -> None:
    inbound = Recorder()
    ours, theirs = memory_transport_pair()
    async with (
        theirs,
        ours,
        astral.accept(send=ours.send, capabilities={"echo": echo}, middleware=[inbound]) as peer,
        Peer(theirs) as other,
        anyio.create_task_group() as tg,
    ):

        async def pump() -> None:
            async for text in ours:
                await peer.receive(text)

        tg.start_soon(pump)
        assert await other.call("echo", 3) == 3
        await inbound.wait_ended()
        tg.cancel_scope.cancel()
    assert inbound.ended[0].outcome == "result"


async def test_the_asgi_app_takes_middleware_and_hide_internal_errors() -> None:
    inbound = Recorder()
    app = astral.asgi.App(
        verifier=VERIFIER,
        capabilities={"divide": divide},
        middleware=[inbound],
        hide_internal_errors=True,
    )
    with FakeServer() as fake:
        async with anyio.create_task_group() as tg:
            await tg.start(fake.run, app, fake.scope(headers=bearer(asgi_token("asgi-1"))))
            await fake.to_app.send({"type": "websocket.connect"})
            assert await fake.from_app.receive() == {
                "type": "websocket.accept",
                "headers": [
                    (b"astral-max-message-size", b"1048576"),
                    (b"astral-features", b"cancel, credit, deadline, input-stream"),
                ],
            }
            call = '{"type":"call","id":"1","capability":"divide"}'
            await fake.to_app.send({"type": "websocket.receive", "text": call})
            reply = await fake.from_app.receive()
            assert reply["text"] == (
                '{"type":"result","id":"1","error":"internal error","code":"internal"}'
            )
            await fake.to_app.send({"type": "websocket.disconnect", "code": 1000})
    [seen] = inbound.ended
    assert (seen.capability, seen.outcome) == ("divide", "error")
    assert seen.peer.claims["sub"] == "asgi-1"


async def test_unencodable_values_fail_only_that_call_when_observed() -> None:
    async def returns_a_set(_: Any) -> Any:
        return {1, 2}

    async def yields_a_set(_: Any) -> AsyncIterator[Any]:
        yield 1
        yield {1, 2}

    @asynccontextmanager
    async def refuse_with_bad_data(call: CallInfo) -> AsyncIterator[None]:
        if call.input == "refuse":
            raise Failure("no", code="no", data={1, 2})
        yield
        if call.input == "fail after":
            raise Failure("late", code="late", data={3})

    inbound = Recorder()
    caps = {"returns_a_set": returns_a_set, "yields_a_set": yields_a_set}
    async with pair([inbound, refuse_with_bad_data], [], caps) as (_, client):
        for capability, value in (
            ("returns_a_set", None),
            ("yields_a_set", None),
            ("echo", "refuse"),
            ("echo", "fail after"),
        ):
            with pytest.raises(RemoteError) as caught:
                result = await client.call(capability, value)
                if isinstance(result, astral.Stream):
                    async for _item in result:
                        pass
            assert caught.value.code == "internal"
            assert caught.value.message.startswith("cannot send set at ")
        assert await client.call("echo", 1) == 1
        await inbound.wait_ended(5)
    # The inner middleware failing on the way out made it an error for the outer one.
    assert [c.outcome for c in inbound.ended] == ["error", "error", "error", "error", "result"]
