"""With middleware installed, a callee answers on the wire exactly as without.

A peer with middleware serves its calls on a path of its own (the plain path
is kept lean), so each way a call can end is tried here on both, with a
hand-written caller reading the frames: cancelled by the caller, past its
deadline, flooded with input, failing, or yielding an item that cannot be
sent. With middleware, what the middleware saw is checked too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import astral
from astral import CallInfo
from astral.testing import memory_transport_pair

from .helpers import eventually


class Seen:
    """A middleware that keeps each call it saw, and signals when one ends."""

    def __init__(self) -> None:
        self.ended: list[CallInfo] = []
        self.one_ended = anyio.Event()

    @asynccontextmanager
    async def __call__(self, call: CallInfo) -> AsyncIterator[None]:
        yield
        self.ended.append(call)
        self.one_ended.set()


class Capabilities:
    def __init__(self) -> None:
        self.started = anyio.Event()

    async def forever(self, _: Any) -> None:
        self.started.set()
        await anyio.sleep_forever()

    async def hold(self, _: Any, items: AsyncIterator[int]) -> None:
        self.started.set()
        await anyio.sleep_forever()  # reads nothing: the window fills

    async def fail(self, _: Any) -> None:
        raise astral.Failure("no luck", code="unlucky")

    async def unsendable(self, _: Any) -> AsyncIterator[Any]:
        yield 1
        yield object()

    async def which(self, _: Any) -> list[str]:
        call = astral.current_call()
        return [call.id, call.capability]

    async def huge(self, _: Any) -> AsyncIterator[str]:
        yield "x"
        yield "x" * 5000


@asynccontextmanager
async def raw_caller(observed: bool) -> AsyncIterator[tuple[Any, Capabilities, Seen | None]]:
    """A peer serving a hand-written caller; on the way out, no call is left in its table."""
    caps = Capabilities()
    seen = Seen() if observed else None
    mine, theirs = memory_transport_pair(buffer=100)
    capabilities = {
        "forever": caps.forever,
        "hold": caps.hold,
        "fail": caps.fail,
        "unsendable": caps.unsendable,
        "huge": caps.huge,
        "which": caps.which,
    }
    async with (
        mine,
        theirs,
        astral.Peer(
            theirs,
            capabilities=capabilities,
            max_buffered_items=2,
            middleware=[seen] if seen is not None else [],
            remote_max_message_size=2000,
        ) as peer,
    ):
        yield mine, caps, seen
        # The terminal frame is sent before the table entry goes.
        await eventually(lambda: peer._state.inbound == {})


async def frames_until_result(mine: Any) -> list[dict[str, Any]]:
    frames = []
    while True:
        frames.append(json.loads(await mine.receive()))
        if frames[-1]["type"] == "result":
            return frames


async def outcome(seen: Seen | None) -> CallInfo | None:
    if seen is None:
        return None
    if not seen.ended:
        await seen.one_ended.wait()
    [info] = seen.ended
    return info


observed = pytest.mark.parametrize("observed", [False, True], ids=["plain", "middleware"])


@observed
async def test_a_call_cancelled_by_the_caller_is_answered_cancelled(observed: bool) -> None:
    async with raw_caller(observed) as (mine, caps, seen):
        await mine.send('{"type":"call","id":"1","capability":"forever"}')
        await caps.started.wait()
        await mine.send('{"type":"cancel","id":"1"}')
        assert json.loads(await mine.receive()) == {
            "type": "result",
            "id": "1",
            "error": "cancelled",
        }
        info = await outcome(seen)
        if info is not None:
            assert (info.call_id, info.outcome) == ("1", "cancelled")


@observed
async def test_a_call_past_its_deadline_is_answered_deadline_exceeded(observed: bool) -> None:
    async with raw_caller(observed) as (mine, _, seen):
        await mine.send('{"type":"call","id":"1","capability":"forever","deadline":50}')
        assert json.loads(await mine.receive()) == {
            "type": "result",
            "id": "1",
            "error": "deadline exceeded",
            "code": "deadline_exceeded",
        }
        info = await outcome(seen)
        if info is not None:
            assert (info.call_id, info.outcome) == ("1", "error")
            assert isinstance(info.error, astral.ProtocolError)
            assert str(info.error) == "deadline exceeded"


@observed
async def test_a_caller_flooding_input_is_answered_input_stream_overrun(observed: bool) -> None:
    async with raw_caller(observed) as (mine, caps, seen):
        await mine.send('{"type":"call","id":"1","capability":"hold","input_stream":true}')
        assert json.loads(await mine.receive()) == {"type": "want", "id": "1", "n": 2}
        await caps.started.wait()
        for i in range(3):
            await mine.send(json.dumps({"type": "item", "id": "1", "value": i}))
        assert json.loads(await mine.receive()) == {
            "type": "result",
            "id": "1",
            "error": "input stream overrun",
        }
        info = await outcome(seen)
        if info is not None:
            assert (info.call_id, info.outcome) == ("1", "error")
            assert str(info.error) == "input stream overrun"


@observed
async def test_a_failing_capability_is_answered_with_its_failure(observed: bool) -> None:
    async with raw_caller(observed) as (mine, _, seen):
        await mine.send('{"type":"call","id":"1","capability":"fail"}')
        assert json.loads(await mine.receive()) == {
            "type": "result",
            "id": "1",
            "error": "no luck",
            "code": "unlucky",
        }
        info = await outcome(seen)
        if info is not None:
            assert (info.call_id, info.outcome) == ("1", "error")
            assert isinstance(info.error, astral.Failure)
            assert str(info.error) == "no luck"


@observed
async def test_a_stream_item_that_cannot_be_sent_ends_the_stream_with_an_error(
    observed: bool,
) -> None:
    async with raw_caller(observed) as (mine, _, seen):
        await mine.send('{"type":"call","id":"1","capability":"unsendable"}')
        first, last = await frames_until_result(mine)
        assert first == {"type": "yield", "id": "1", "output": 1}
        assert (last["id"], last["code"]) == ("1", "internal")
        assert "object" in last["error"]
        info = await outcome(seen)
        if info is not None:
            assert (info.call_id, info.outcome, info.items) == ("1", "error", 1)
            assert isinstance(info.error, astral.ProtocolError)
            assert str(info.error) == last["error"]


@observed
async def test_a_stream_item_too_big_for_the_caller_ends_the_stream_with_an_error(
    observed: bool,
) -> None:
    async with raw_caller(observed) as (mine, _, seen):
        await mine.send('{"type":"call","id":"1","capability":"huge"}')
        first, last = await frames_until_result(mine)
        assert first == {"type": "yield", "id": "1", "output": "x"}
        assert last["id"] == "1"
        assert "2000" in last["error"]
        info = await outcome(seen)
        if info is not None:
            assert (info.call_id, info.outcome, info.items) == ("1", "error", 1)
            assert isinstance(info.error, astral.ProtocolError)
            assert str(info.error) == last["error"]


@observed
async def test_a_capability_sees_the_call_id_and_capability_the_caller_sent(observed: bool) -> None:
    async with raw_caller(observed) as (mine, _, seen):
        await mine.send('{"type":"call","id":"abc-7","capability":"which"}')
        assert json.loads(await mine.receive()) == {
            "type": "result",
            "id": "abc-7",
            "output": ["abc-7", "which"],
        }
        info = await outcome(seen)
        if info is not None:
            assert (info.call_id, info.outcome, info.output) == (
                "abc-7",
                "result",
                ["abc-7", "which"],
            )


async def test_a_middleware_refusing_a_call_is_answered_internal_error_when_errors_are_hidden() -> (
    None
):
    @asynccontextmanager
    async def refuse(info: CallInfo) -> AsyncIterator[None]:
        raise RuntimeError("secret detail")
        yield  # pragma: no cover - never reached

    mine, theirs = memory_transport_pair()
    async with (
        mine,
        theirs,
        astral.Peer(
            theirs,
            capabilities={"which": Capabilities().which},
            middleware=[refuse],
            hide_internal_errors=True,
        ),
    ):
        await mine.send('{"type":"call","id":"1","capability":"which"}')
        assert json.loads(await mine.receive()) == {
            "type": "result",
            "id": "1",
            "error": "internal error",
            "code": "internal",
        }


# --- the caller's side, with middleware: outbound calls take a path of their own --------


@asynccontextmanager
async def raw_callee() -> AsyncIterator[tuple[Any, astral.Peer, Seen]]:
    """A peer with middleware whose calls a hand-written remote answers."""
    seen = Seen()
    mine, theirs = memory_transport_pair(buffer=100)
    async with mine, theirs, astral.Peer(theirs, middleware=[seen]) as peer:
        yield mine, peer, seen


async def test_concurrent_calls_each_get_their_own_answer() -> None:
    async with raw_callee() as (mine, peer, seen):
        outputs: dict[str, Any] = {}

        async def call(name: str) -> None:
            outputs[name] = await peer.call(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "first")
            first = json.loads(await mine.receive())
            tg.start_soon(call, "second")
            second = json.loads(await mine.receive())
            assert (first["capability"], second["capability"]) == ("first", "second")
            assert first["id"] != second["id"]
            # Answered in the other order, each to its own call.
            for frame in (second, first):
                answer = {"type": "result", "id": frame["id"], "output": frame["capability"]}
                await mine.send(json.dumps(answer))
    assert outputs == {"first": "first", "second": "second"}
    assert sorted((info.capability, info.call_id) for info in seen.ended) == [
        ("first", first["id"]),
        ("second", second["id"]),
    ]


async def test_a_deadline_exceeded_answer_is_a_call_timeout_naming_the_capability() -> None:
    async with raw_callee() as (mine, peer, seen):
        async with anyio.create_task_group() as tg:

            async def answer() -> None:
                call = json.loads(await mine.receive())
                await mine.send(
                    json.dumps(
                        {
                            "type": "result",
                            "id": call["id"],
                            "error": "deadline exceeded",
                            "code": "deadline_exceeded",
                        }
                    )
                )

            tg.start_soon(answer)
            with pytest.raises(astral.CallTimeout) as caught:
                await peer.call("slow", deadline=60)
    assert str(caught.value) == "call slow missed its deadline"
    [info] = seen.ended
    assert (info.capability, info.outcome, info.error) == ("slow", "error", caught.value)


async def test_a_drain_ends_as_soon_as_the_last_observed_call_has_finished() -> None:
    """The drain waits for calls in flight, not for its grace, with middleware too."""
    release = anyio.Event()
    started = anyio.Event()

    async def gate(_: Any) -> str:
        started.set()
        await release.wait()
        return "done"

    seen = Seen()
    mine, theirs = memory_transport_pair(buffer=100)
    async with (
        mine,
        theirs,
        astral.Peer(theirs, capabilities={"gate": gate}, middleware=[seen]) as peer,
    ):
        await mine.send('{"type":"call","id":"1","capability":"gate"}')
        await started.wait()
        async with anyio.create_task_group() as tg:
            # A grace longer than the test's own limit: only the call's end lets it go.
            tg.start_soon(peer.drain, 3600)
            await anyio.wait_all_tasks_blocked()  # in memory: the drain waits on the call
            assert not peer.closed
            release.set()
        assert peer.closed
        assert json.loads(await mine.receive()) == {"type": "result", "id": "1", "output": "done"}
    assert [info.outcome for info in seen.ended] == ["result"]


async def test_a_failure_raised_by_a_middleware_on_the_way_out_goes_through_json_default() -> None:
    class Point:
        x = 1

    @asynccontextmanager
    async def fail_after(info: CallInfo) -> AsyncIterator[None]:
        yield
        raise astral.Failure("refused after all", code="late", data=Point())

    mine, theirs = memory_transport_pair()
    async with (
        mine,
        theirs,
        astral.Peer(
            theirs,
            capabilities={"which": Capabilities().which},
            middleware=[fail_after],
            json_default=lambda value: {"x": value.x},
        ),
    ):
        await mine.send('{"type":"call","id":"1","capability":"which"}')
        assert json.loads(await mine.receive()) == {
            "type": "result",
            "id": "1",
            "error": "refused after all",
            "code": "late",
            "data": {"x": 1},
        }


@pytest.mark.parametrize("observed", [False, True], ids=["plain", "middleware"])
async def test_a_stream_ended_by_deadline_exceeded_is_a_call_timeout_naming_the_capability(
    observed: bool,
) -> None:
    seen = Seen()
    mine, theirs = memory_transport_pair(buffer=100)
    middleware = [seen] if observed else []
    async with mine, theirs, astral.Peer(theirs, middleware=middleware) as peer:
        async with anyio.create_task_group() as tg:

            async def answer() -> None:
                call = json.loads(await mine.receive())
                for frame in (
                    {"type": "yield", "id": call["id"], "output": 1},
                    {
                        "type": "result",
                        "id": call["id"],
                        "error": "deadline exceeded",
                        "code": "deadline_exceeded",
                    },
                ):
                    await mine.send(json.dumps(frame))

            tg.start_soon(answer)
            items: list[Any] = []
            with pytest.raises(astral.CallTimeout) as caught:
                async with peer.stream("ticks", deadline=60) as stream:
                    async for item in stream:
                        items.append(item)  # noqa: PERF401 - kept up to the error
    assert items == [1]
    assert str(caught.value) == "call ticks missed its deadline"
    if observed:
        [info] = seen.ended
        assert (info.capability, info.outcome, info.items) == ("ticks", "error", 1)
        assert info.error is caught.value


async def test_a_middleware_sees_a_stream_cut_by_the_connection_end_as_an_error() -> None:
    async with raw_callee() as (mine, peer, seen):
        async with anyio.create_task_group() as tg:

            async def answer_then_close() -> None:
                call = json.loads(await mine.receive())
                await mine.send(json.dumps({"type": "yield", "id": call["id"], "output": 1}))
                await got_one.wait()
                await mine.aclose()

            got_one = anyio.Event()
            tg.start_soon(answer_then_close)
            with pytest.raises(astral.ConnectionClosed) as caught:
                async with peer.stream("ticks") as stream:
                    async for _item in stream:
                        got_one.set()
    [info] = seen.ended
    assert (info.capability, info.outcome, info.items) == ("ticks", "error", 1)
    assert info.error is caught.value
