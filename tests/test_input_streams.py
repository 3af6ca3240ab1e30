"""Streams from caller to callee (feature ``input-stream``).

A capability with a second parameter takes an async iterator of what the
caller streams with ``input_stream=``; ``want`` frames from the callee keep
the caller within the callee's window, ``item`` and ``end`` carry the input.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import astral
from astral._frames import End, Item, Want, decode, encode
from astral._protocol import InputInbound, PeerState, StartInbound, WantOutbound
from astral._websocket import open_websocket
from astral.testing import connected_pair, memory_transport_pair
from tests.helpers import running_principal, token


async def numbers(n: int, log: list[int] | None = None) -> AsyncIterator[int]:
    for i in range(n):
        if log is not None:
            log.append(i)
        yield i


async def collect(_: Any, items: AsyncIterator[int]) -> list[int]:
    return [item async for item in items]


async def doubles(_: Any, items: AsyncIterator[int]) -> AsyncIterator[int]:
    async for item in items:
        yield 2 * item


# --- frames, sans-IO ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        (Item("7", {"a": 1}), '{"type":"item","id":"7","value":{"a":1}}'),
        (Item("7", None), '{"type":"item","id":"7","value":null}'),
        (Want("7", 64), '{"type":"want","id":"7","n":64}'),
        (End("7"), '{"type":"end","id":"7"}'),
        (
            astral.Call("7", "up", 1, input_stream=True),
            '{"type":"call","id":"7","capability":"up","input":1,"input_stream":true}',
        ),
    ],
)
def test_the_new_frames_on_the_wire(frame: astral.Frame, text: str) -> None:
    assert encode(frame) == text
    assert decode(text) == frame


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"want","id":"7","n":0}',
        '{"type":"want","id":"7"}',
        '{"type":"want","id":"7","n":1.5}',
        '{"type":"call","id":"7","capability":"up","input_stream":1}',
    ],
)
def test_malformed_new_frames_are_refused(text: str) -> None:
    with pytest.raises(astral.ProtocolError):
        decode(text)


# --- uploads ------------------------------------------------------------------------------


async def test_an_upload_arrives_whole_and_in_order() -> None:
    async with connected_pair({"collect": collect}, {}, max_buffered_items=4) as (_, b):
        assert await b.call("collect", None, input_stream=numbers(100)) == list(range(100))
        assert await b.call("collect", None, input_stream=numbers(0)) == []
        assert b._state.outbound == {}


async def test_a_slow_callee_holds_the_caller_to_its_window() -> None:
    produced: list[int] = []
    ahead: list[int] = []

    async def slow(_: Any, items: AsyncIterator[int]) -> int:
        taken = 0
        async for _item in items:
            taken += 1
            ahead.append(len(produced) - taken)
            await anyio.sleep(0.002)  # a slow consumer, not a synchronisation
        return taken

    async with connected_pair({"slow": slow}, {}, max_buffered_items=4) as (_, b):
        assert await b.call("slow", None, input_stream=numbers(60, produced)) == 60
    # Never more than the window in flight, plus the one the pump holds.
    assert max(ahead) <= 4 + 1


async def test_an_upload_with_an_input_value_and_a_capability_without_one() -> None:
    async def tagged(tag: str, items: AsyncIterator[int]) -> str:
        return f"{tag}:{sum([item async for item in items])}"

    async with connected_pair({"tagged": tagged, "collect": collect}, {}) as (_, b):
        assert await b.call("tagged", "sum", input_stream=numbers(5)) == "sum:10"
        # Called without an input stream, a capability that takes one reads none.
        assert await b.call("collect") == []
    # A capability that takes no input stream refuses one at once.
    async with connected_pair({"plain": plain}, {}) as (_, b):
        with pytest.raises(astral.RemoteError, match="takes no input stream") as refused:
            await b.call("plain", None, input_stream=numbers(3))
        assert refused.value.code == "invalid_input"


async def plain(value: Any) -> Any:
    return value


# --- two-way streams ------------------------------------------------------------------------


async def test_a_two_way_stream_with_a_slow_caller() -> None:
    async with connected_pair({"doubles": doubles}, {}, max_buffered_items=4) as (_, b):
        got: list[int] = []
        async with b.stream("doubles", input_stream=numbers(50)) as items:
            async for item in items:
                got.append(item)
                await anyio.sleep(0.001)  # a slow consumer of the output
        assert got == [2 * i for i in range(50)]


async def test_a_two_way_conversation_through_memory_streams() -> None:
    """Each answer is read before the next question is sent: a chat turn by turn."""
    send, receive = anyio.create_memory_object_stream[int](0)
    async with connected_pair({"doubles": doubles}, {}) as (_, b):
        async with send, b.stream("doubles", input_stream=receive) as answers:
            for i in range(5):
                await send.send(i)
                assert await anext(answers) == 2 * i
            await send.aclose()  # the end of the input ends the callee's stream
            with pytest.raises(StopAsyncIteration):
                await anext(answers)


# --- ending from either side -----------------------------------------------------------------


async def test_when_the_callee_ends_the_callers_send_fails_at_once() -> None:
    async def first_two(_: Any, items: AsyncIterator[int]) -> list[int]:
        return [await anext(items), await anext(items)]

    send, receive = anyio.create_memory_object_stream[int](0)
    async with (
        connected_pair({"first_two": first_two}, {}) as (_, b),
        anyio.create_task_group() as tg,
    ):

        async def produce() -> None:
            async with send:
                with pytest.raises(anyio.BrokenResourceError):
                    for i in range(1000):
                        await send.send(i)

        tg.start_soon(produce)
        assert await b.call("first_two", None, input_stream=receive) == [0, 1]
    assert b._state.outbound == {}


async def test_a_callee_that_fails_stops_the_input() -> None:
    closed = anyio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    async def fail_at_three(_: Any, items: AsyncIterator[int]) -> None:
        async for item in items:
            if item == 3:
                raise astral.Failure("enough", code="enough")

    async with connected_pair({"f": fail_at_three}, {}, max_buffered_items=2) as (_, b):
        with pytest.raises(astral.RemoteError, match="enough"):
            await b.call("f", None, input_stream=endless())
        await closed.wait()


async def test_a_caller_that_cancels_ends_both_directions() -> None:
    cancelled = anyio.Event()
    closed = anyio.Event()
    started = anyio.Event()

    async def reader(_: Any, items: AsyncIterator[int]) -> AsyncIterator[int]:
        try:
            async for item in items:
                started.set()
                yield item
        finally:  # cancelled inside ``items`` or closed at ``yield``
            cancelled.set()

    async def endless() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    async with connected_pair({"reader": reader}, {}, max_buffered_items=2) as (a, b):
        with anyio.CancelScope() as scope:
            async with b.stream("reader", input_stream=endless()) as out:
                async for _ in out:
                    await started.wait()
                    scope.cancel()
        await cancelled.wait()
        await closed.wait()
        assert b._state.outbound == {}
        with anyio.fail_after(2):
            while a._state.inbound:
                await anyio.lowlevel.checkpoint()


async def test_a_caller_whose_items_fail_fails_the_call() -> None:
    cancelled = anyio.Event()

    async def broken() -> AsyncIterator[int]:
        yield 1
        raise ValueError("the upload broke")

    async def waits(_: Any, items: AsyncIterator[int]) -> None:
        try:
            async for _item in items:
                pass
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async with connected_pair({"waits": waits}, {}) as (_, b):
        with pytest.raises(ValueError, match="the upload broke"):
            await b.call("waits", None, input_stream=broken())
        await cancelled.wait()


async def test_an_item_that_cannot_be_sent_fails_the_call() -> None:
    async def odd() -> AsyncIterator[Any]:
        yield {1, 2}

    async with connected_pair({"collect": collect}, {}) as (_, b):
        with pytest.raises(astral.ProtocolError, match="set"):
            await b.call("collect", None, input_stream=odd())


async def test_input_items_are_converted_by_the_callers_json_default() -> None:
    """An item outside the value rule goes through ``json_default``, as inputs and outputs do."""

    async def items() -> AsyncIterator[Any]:
        yield dataclasses.make_dataclass("Point", ["x"])(1)

    mine, theirs = memory_transport_pair()
    async with (
        mine,
        theirs,
        astral.Peer(
            theirs, json_default=lambda value: {"x": value.x}, features=["input-stream"]
        ) as peer,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: peer.call("collect", None, input_stream=items(), timeout=None))
        call = json.loads(await mine.receive())
        await mine.send(json.dumps({"type": "want", "id": call["id"], "n": 5}))
        assert json.loads(await mine.receive()) == {
            "type": "item",
            "id": call["id"],
            "value": {"x": 1},
        }
        assert json.loads(await mine.receive()) == {"type": "end", "id": call["id"]}
        tg.cancel_scope.cancel()


async def test_an_input_item_larger_than_the_remote_accepts_fails_the_call() -> None:
    async def items() -> AsyncIterator[str]:
        yield "small"
        yield "x" * 300

    mine, theirs = memory_transport_pair()
    async with (
        mine,
        theirs,
        astral.Peer(theirs, remote_max_message_size=200, features=["input-stream"]) as peer,
        anyio.create_task_group() as tg,
    ):

        async def callee() -> None:
            call = json.loads(await mine.receive())
            await mine.send(json.dumps({"type": "want", "id": call["id"], "n": 5}))
            assert json.loads(await mine.receive())["value"] == "small"
            ids.append(call["id"])
            got_small.set()

        ids: list[str] = []
        got_small = anyio.Event()
        tg.start_soon(callee)
        with pytest.raises(astral.ProtocolError) as caught:
            await peer.call("collect", None, input_stream=items(), timeout=None)
        await got_small.wait()
        # The remote is told to stop; nothing of the item was sent.
        assert json.loads(await mine.receive()) == {"type": "cancel", "id": ids[0]}
    assert str(caught.value) == "input item larger than the 200 bytes the remote accepts"
    assert (caught.value.frame_id, caught.value.frame_type) == (ids[0], "item")


async def test_a_caller_that_ignores_the_window_is_stopped() -> None:
    """A hand-written caller floods items beyond what was asked for."""

    async def hold(_: Any, items: AsyncIterator[int]) -> None:
        await anyio.sleep_forever()  # reads nothing: the window fills

    mine, theirs = memory_transport_pair(buffer=100)
    async with (
        mine,
        theirs,
        astral.Peer(theirs, capabilities={"hold": hold}, max_buffered_items=2),
    ):
        await mine.send('{"type":"call","id":"1","capability":"hold","input_stream":true}')
        assert json.loads(await mine.receive()) == {"type": "want", "id": "1", "n": 2}
        for i in range(3):
            await mine.send(json.dumps({"type": "item", "id": "1", "value": i}))
        answer = json.loads(await mine.receive())
        assert answer == {"type": "result", "id": "1", "error": "input stream overrun"}


# --- negotiation ----------------------------------------------------------------------------


async def test_without_the_feature_an_input_stream_fails_at_once() -> None:
    closed: list[bool] = []

    async def items() -> AsyncIterator[int]:
        closed.append(True)
        yield 1

    async with connected_pair({"collect": collect}, {}, features=["cancel", "credit"]) as (_, b):
        with pytest.raises(astral.ProtocolError, match="'input-stream'"):
            await b.call("collect", None, input_stream=items())
        with pytest.raises(astral.ProtocolError, match="'input-stream'"):
            async with b.stream("collect", input_stream=items()):
                pass  # pragma: no cover
        assert b._state.outbound == {}
    assert closed == []


async def test_middleware_sees_a_call_with_an_input_stream() -> None:
    seen: list[tuple[str, str | None]] = []

    @asynccontextmanager
    async def observe(info: astral.CallInfo) -> AsyncIterator[None]:
        yield
        seen.append((info.direction, info.outcome))

    async with connected_pair({"collect": collect}, {}, middleware=[observe]) as (_, b):
        assert await b.call("collect", None, input_stream=numbers(3)) == [0, 1, 2]
        async with b.stream("collect", input_stream=numbers(2)) as out:
            assert [item async for item in out] == [[0, 1]]
    assert ("outbound", "result") in seen
    assert ("inbound", "result") in seen


async def test_an_upload_and_a_two_way_stream_over_a_websocket() -> None:
    async with running_principal(capabilities={"collect": collect, "doubles": doubles}) as p:
        async with astral.connect(p.url, token=token(), max_buffered_items=8) as worker:
            assert "input-stream" in worker.features
            assert await worker.call("collect", None, input_stream=numbers(300)) == list(range(300))
            async with worker.stream("doubles", input_stream=numbers(100)) as out:
                assert [item async for item in out] == [2 * i for i in range(100)]


class _Countdown:
    """An async iterator that is not a generator: it has no ``aclose``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> _Countdown:
        return self

    async def __anext__(self) -> int:
        if not self.n:
            raise StopAsyncIteration
        self.n -= 1
        return self.n


async def test_an_input_stream_without_aclose_is_sent_whole() -> None:
    async with connected_pair({"collect": collect}, {}) as (_, b):
        assert await b.call("collect", None, input_stream=_Countdown(3)) == [2, 1, 0]
        # The peer goes on serving after the pump ended.
        assert await b.call("collect", None, input_stream=_Countdown(1)) == [0]


async def test_over_a_websocket_each_credit_frame_is_sent_once() -> None:
    """A hand-written caller reads every frame: one ``want`` per half window taken, no more."""
    async with running_principal(capabilities={"collect": collect}) as p:
        headers = [("Authorization", f"Bearer {token()}"), ("Astral-Features", "input-stream")]
        async with open_websocket(p.url, headers=headers) as raw:
            await raw.send('{"type":"call","id":"1","capability":"collect","input_stream":true}')
            first = json.loads(await raw.receive())
            assert (first["type"], first["id"]) == ("want", "1")
            window = first["n"]
            assert window >= 2
            for i in range(window):
                await raw.send(json.dumps({"type": "item", "id": "1", "value": i}))
            await raw.send('{"type":"end","id":"1"}')
            frames = []
            while not frames or frames[-1]["type"] != "result":
                frames.append(json.loads(await raw.receive()))
    half = window // 2
    wants = [{"type": "want", "id": "1", "n": half}] * (window // half)
    assert frames == [*wants, {"type": "result", "id": "1", "output": list(range(window))}]


def test_the_state_routes_input_frames_by_direction() -> None:
    """item/end name the remote's calls (inbound), want names ours (outbound)."""
    state: PeerState[str, object] = PeerState({"collect": collect}, object, max_inbound_calls=5)
    call_id, text = state.start_call("collect", None, "mine", input_stream=True)
    assert '"input_stream":true' in text
    started = state.receive('{"type":"call","id":"1","capability":"collect","input_stream":true}')
    assert isinstance(started, StartInbound)
    assert started.items is True
    # The same id both ways: want goes to our call, item and end to theirs.
    want = state.receive(f'{{"type":"want","id":"{call_id}","n":3}}')
    assert isinstance(want, WantOutbound)
    assert (want.handle, want.n) == ("mine", 3)
    item = state.receive('{"type":"item","id":"1","value":5}')
    assert isinstance(item, InputInbound)
    assert item.frame == Item("1", 5)
    assert isinstance(state.receive('{"type":"end","id":"1"}'), InputInbound)
    assert state.receive('{"type":"item","id":"nobody","value":5}') is None
    assert state.receive('{"type":"want","id":"nobody","n":1}') is None
    assert state.item(call_id, [1]) == f'{{"type":"item","id":"{call_id}","value":[1]}}'
    assert state.end(call_id) == f'{{"type":"end","id":"{call_id}"}}'
    assert state.item("gone", 1) is None
    assert state.end("gone") is None


async def test_a_callee_stopped_by_its_deadline_ends_the_upload() -> None:
    """Cancelled on the callee's side (its deadline): the caller's input stops too."""
    closed = anyio.Event()
    ended = anyio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await anyio.sleep(0.005)  # a steady producer
        finally:
            closed.set()

    async def reads_forever(_: Any, items: AsyncIterator[int]) -> None:
        try:
            async for _item in items:
                pass
        finally:
            ended.set()

    async with connected_pair({"reads": reads_forever}, {}) as (_, b):
        with pytest.raises(astral.CallTimeout):
            await b.call("reads", None, deadline=0.2, input_stream=endless())
        await ended.wait()
        await closed.wait()
        assert b._state.outbound == {}


@pytest.mark.parametrize("ending", ["result", "connection closed"])
async def test_a_producer_whose_cleanup_awaits_is_closed_in_full(ending: str) -> None:
    """The call ends, or the connection, while the pump waits for credit: the
    producer's ``finally`` runs to its end even though it awaits."""
    cleaned = anyio.Event()
    started = anyio.Event()

    async def produce() -> AsyncIterator[int]:
        try:
            for i in range(100):
                yield i
        finally:
            await anyio.lowlevel.checkpoint()  # e.g. closing a resource of its own
            cleaned.set()

    async def first(_: Any, items: AsyncIterator[int]) -> int:
        async for item in items:
            if ending == "result":
                return item
            started.set()  # the producer has started: it has a finally to run
            await anyio.sleep_forever()
        return -1  # pragma: no cover - the stream is never empty

    async with connected_pair({"first": first}, {}, max_buffered_items=2) as (_, b):
        if ending == "result":
            assert await b.call("first", None, input_stream=produce()) == 0
        else:
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    with pytest.raises(astral.ConnectionClosed):
                        await b.call("first", None, input_stream=produce(), timeout=None)

                tg.start_soon(call)
                await started.wait()
                await b.aclose()
    await cleaned.wait()


async def test_a_producer_whose_cleanup_hangs_does_not_hold_the_peer_open() -> None:
    """Its ``aclose`` is given a bounded time (1 s): the peer still closes."""
    started = anyio.Event()
    cleanup_started = anyio.Event()

    async def produce() -> AsyncIterator[int]:
        try:
            for i in range(100):
                yield i
        finally:
            cleanup_started.set()
            await anyio.sleep_forever()  # a cleanup that never ends

    async def hold(_: Any, items: AsyncIterator[int]) -> None:
        async for _item in items:
            started.set()
            await anyio.sleep_forever()

    async with connected_pair({"hold": hold}, {}, max_buffered_items=2) as (_, b):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(astral.ConnectionClosed):
                    await b.call("hold", None, input_stream=produce(), timeout=None)

            tg.start_soon(call)
            await started.wait()
            await b.aclose()
    # Leaving the peers' blocks above needed the pump task to end.
    assert cleanup_started.is_set()


@dataclasses.dataclass
class Options:
    lang: str


async def annotated(options: Options, items: AsyncIterator[int]) -> str:
    return f"{options.lang}:{sum([item async for item in items])}"


async def test_a_validated_input_beside_an_input_stream() -> None:
    async with connected_pair({"annotated": annotated}, {}) as (_, b):
        assert await b.call("annotated", {"lang": "en"}, input_stream=numbers(4)) == "en:6"
        with pytest.raises(astral.RemoteError) as refused:
            await b.call("annotated", {"lang": 1}, input_stream=numbers(4))
        assert refused.value.code == "invalid_input"
