"""The AnyIO Peer, end to end over astral.testing, on asyncio and trio."""

from __future__ import annotations

import collections
import json
import logging
import math
import uuid
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import pytest

import astral
from astral import (
    Call,
    CallTimeout,
    Cancel,
    ConnectionClosed,
    Peer,
    ProtocolError,
    RemoteError,
    Result,
    Stream,
    StreamOverrun,
    Yield,
    _peer,
    current_peer,
    decode,
    encode,
)
from astral.testing import connected_pair, memory_transport_pair

from .helpers import count, echo

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

    from anyio.streams.stapled import StapledObjectStream

# -- helpers --------------------------------------------------------------------


async def fail(message: str) -> NoReturn:
    raise RuntimeError(message)


async def failing_stream(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i
    raise ValueError(f"failed after {n}")


async def empty_stream(_: Any) -> AsyncIterator[int]:
    return
    yield  # pragma: no cover


async def nothing(_: Any) -> None:
    return None


BASICS: dict[str, Any] = {
    "echo": echo,
    "count": count,
    "fail": fail,
    "failing_stream": failing_stream,
    "empty_stream": empty_stream,
    "nothing": nothing,
}


class Blocker:
    """A capability that blocks until cancelled, and says when it started and ended."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.finished = anyio.Event()
        self.runs = 0

    async def call(self, _: Any) -> None:
        self.runs += 1
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.finished.set()


class Firehose:
    """An endless stream, as fast as it can go; says when it started and ended."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.finished = anyio.Event()
        self.sent = 0

    async def call(self, _: Any) -> AsyncIterator[int]:
        return self._items()

    async def _items(self) -> AsyncIterator[int]:
        self.started.set()
        try:
            while True:
                yield self.sent
                self.sent += 1
        finally:
            self.finished.set()


async def collect_into(items: AsyncIterable[Any], into: list[Any]) -> None:
    """Append each item as it arrives, so a test sees what came before an error."""
    async for item in items:
        into.append(item)  # noqa: PERF401 - the items before an error must be kept


async def assert_settled(*peers: Peer) -> None:
    """Once every task is idle, no peer remembers any call."""
    # In memory (connected_pair): every task is local, so once all are blocked
    # nothing is in flight; not a wait for a remote over a socket.
    await anyio.wait_all_tasks_blocked()
    for peer in peers:
        assert peer._state.outbound == {}
        assert peer._state.inbound == {}


async def capture(coro: Awaitable[Any]) -> Any:
    """Await ``coro``; return its value or the Exception it raised."""
    try:
        return await coro
    except Exception as exc:
        return exc


class Outcomes:
    """Run awaitables in a task group and remember how each ended."""

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self.results: dict[str, Any] = {}
        self.done: dict[str, anyio.Event] = {}

    def start(self, name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        self.done[name] = anyio.Event()

        async def run() -> None:
            self.results[name] = await capture(fn())
            self.done[name].set()

        self._tg.start_soon(run)


# -- calls --------------------------------------------------------------------------


async def test_call_resolves_with_the_output() -> None:
    async with connected_pair(BASICS, {}) as (a, b):
        assert await b.call("echo", {"x": [1, "two", None]}) == {"x": [1, "two", None]}
        assert await b.call("echo") is None
        assert await b.call("nothing", 1) is None
        await assert_settled(a, b)


async def test_inbound_calls_are_dispatched_on_both_sides() -> None:
    seen: list[tuple[str, Any]] = []

    def recorder(side: str) -> Callable[[Any], Awaitable[str]]:
        async def record(input: Any) -> str:
            seen.append((side, input))
            return side

        return record

    async with connected_pair({"who": recorder("a")}, {"who": recorder("b")}) as (a, b):
        assert await b.call("who", 1) == "a"
        assert await a.call("who", 2) == "b"
    assert seen == [("a", 1), ("b", 2)]


async def test_many_concurrent_calls_both_ways_answered_out_of_order() -> None:
    n = 25
    gates = {side: [anyio.Event() for _ in range(n)] for side in "ab"}
    running = {"count": 0}
    all_running = anyio.Event()

    def waiter(side: str) -> Callable[[int], Awaitable[dict[str, Any]]]:
        async def wait(i: int) -> dict[str, Any]:
            running["count"] += 1
            if running["count"] == 2 * n:
                all_running.set()
            await gates[side][i].wait()
            return {"served_by": side, "i": i}

        return wait

    finished: list[tuple[str, int]] = []
    done = {(caller, i): anyio.Event() for caller in "ab" for i in range(n)}

    async with connected_pair({"wait": waiter("a")}, {"wait": waiter("b")}) as (a, b):

        async def one(caller: str, i: int) -> None:
            peer, server = (a, "b") if caller == "a" else (b, "a")
            assert await peer.call("wait", i, timeout=None) == {"served_by": server, "i": i}
            finished.append((caller, i))
            done[caller, i].set()

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, "a", i)
                tg.start_soon(one, "b", i)
            await all_running.wait()
            for peer in (a, b):
                assert len(peer._state.outbound) == n
                assert len(peer._state.inbound) == n
            # Release in reverse order, alternating directions: each result
            # comes back before any call made earlier.
            for i in reversed(range(n)):
                gates["b"][i].set()
                await done["a", i].wait()
                gates["a"][i].set()
                await done["b", i].wait()
        assert finished == [(caller, i) for i in reversed(range(n)) for caller in "ab"]
        await assert_settled(a, b)


async def test_each_call_gets_its_own_answer() -> None:
    async def slow_echo(input: int) -> int:
        for _ in range(input % 5):
            await anyio.lowlevel.checkpoint()
        return input * 10

    async with connected_pair({"e": slow_echo}, {}) as (a, b):
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await b.call("e", i)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert results == {i: i * 10 for i in range(200)}
        await assert_settled(a, b)


async def test_input_that_cannot_be_sent_raises_protocol_error() -> None:
    async with connected_pair(BASICS, {}) as (a, b):
        with pytest.raises(ProtocolError):
            await b.call("echo", object())
        with pytest.raises(ProtocolError, match=r"at input\['n'\]"):
            await b.call("echo", {"n": 2**53 + 1})
        with pytest.raises(ProtocolError, match=r"uuid\.UUID at input"):
            await b.call("echo", uuid.uuid4())
        with pytest.raises(ProtocolError):
            async with b.stream("count", {"x": {1, 2}}):
                pass  # pragma: no cover
        assert await b.call("echo", 2**53 - 1) == 2**53 - 1
        await assert_settled(a, b)


# -- streams ---------------------------------------------------------------------


async def test_call_of_a_streaming_capability_returns_a_stream() -> None:
    async with connected_pair(BASICS, {}) as (a, b):
        stream = await b.call("count", 4)
        assert isinstance(stream, Stream)
        assert stream.capability == "count"
        assert [item async for item in stream] == [0, 1, 2, 3]
        # Exhausted: nothing more, and nothing left behind.
        assert [item async for item in stream] == []
        await assert_settled(a, b)


async def test_stream_context_manager() -> None:
    async with connected_pair(BASICS, {}) as (a, b):
        async with b.stream("count", 3) as items:
            assert isinstance(items, Stream)
            assert [item async for item in items] == [0, 1, 2]
        # A single result is a stream of one item...
        async with b.stream("echo", "only") as items:
            assert [item async for item in items] == ["only"]
        # ...unless it is None.
        async with b.stream("nothing") as items:
            assert [item async for item in items] == []
        await assert_settled(a, b)


async def test_a_long_stream_arrives_in_order() -> None:
    async with connected_pair(BASICS, {}, max_buffered_items=4096) as (a, b):
        async with b.stream("count", 3000) as items:
            assert [item async for item in items] == list(range(3000))
        await assert_settled(a, b)


async def test_a_failing_stream_yields_its_items_then_raises() -> None:
    async with connected_pair(BASICS, {}) as (a, b):
        stream = await b.call("failing_stream", 3)
        received: list[Any] = []
        with pytest.raises(RemoteError, match=r"^failed after 3$"):
            await collect_into(stream, received)
        assert received == [0, 1, 2]

        received = []
        async with b.stream("failing_stream", 2) as items:
            with pytest.raises(RemoteError, match=r"^failed after 2$"):
                await collect_into(items, received)
        assert received == [0, 1]

        # Failing before the first item: call raises at once.
        with pytest.raises(RemoteError, match=r"^failed after 0$"):
            await b.call("failing_stream", 0)
        await assert_settled(a, b)


async def test_an_empty_stream() -> None:
    async with connected_pair(BASICS, {}) as (a, b):
        assert await b.call("empty_stream") is None
        async with b.stream("empty_stream") as items:
            assert [item async for item in items] == []
        assert await b.call("count", 0) is None
        await assert_settled(a, b)


async def test_streams_and_calls_interleave() -> None:
    async with connected_pair(BASICS, BASICS) as (a, b):
        s1 = await a.call("count", 3)
        s2 = await b.call("count", 2)
        assert await anext(s1) == 0
        assert await a.call("echo", "between") == "between"
        assert [x async for x in s2] == [0, 1]
        assert [x async for x in s1] == [1, 2]
        await assert_settled(a, b)


# -- errors -------------------------------------------------------------------------


async def test_remote_error_for_an_unknown_capability() -> None:
    async with connected_pair(BASICS, {}) as (a, b):
        for name in ("nope", "__class__", "__proto__", "call", ""):
            with pytest.raises(RemoteError) as info:
                await b.call(name, 1)
            assert str(info.value) == "unknown capability"
            assert info.value.message == "unknown capability"
            assert isinstance(info.value, astral.CallError)
        # The other direction has nothing registered at all.
        with pytest.raises(RemoteError, match=r"^unknown capability$"):
            await a.call("echo", 1)
        await assert_settled(a, b)


async def test_remote_error_for_a_failing_capability() -> None:
    async with connected_pair(BASICS, {}) as (a, b):
        with pytest.raises(RemoteError) as info:
            await b.call("fail", "the disk is full")
        assert info.value.message == "the disk is full"
        assert str(info.value) == "the disk is full"
        assert info.value.__cause__ is None
        # The connection lives on.
        assert await b.call("echo", 1) == 1
        await assert_settled(a, b)


async def test_an_output_that_cannot_be_sent_is_a_remote_error() -> None:
    async def unserializable(_: Any) -> Any:
        return {"handle": object()}

    async def unsafe_integer(_: Any) -> int:
        return 2**60

    async def bad_item(_: Any) -> AsyncIterator[Any]:
        yield 1
        yield {1, 2}
        yield 3  # pragma: no cover

    caps = {"u": unserializable, "i": unsafe_integer, "s": bad_item}
    async with connected_pair(caps, {}, timeout=None) as (a, b):
        with pytest.raises(RemoteError, match=r"cannot send object at output\['handle'\]"):
            await b.call("u")
        with pytest.raises(RemoteError, match=r"2\*\*53"):
            await b.call("i")
        received: list[Any] = []
        async with b.stream("s") as items:
            with pytest.raises(RemoteError, match="cannot send set at output"):
                await collect_into(items, received)
        assert received == [1]
        await assert_settled(a, b)


async def test_call_timeout() -> None:
    blocker = Blocker()
    async with connected_pair({"block": blocker}, {}) as (a, b):
        with pytest.raises(CallTimeout) as info:
            await b.call("block", timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, astral.CallError)
        assert str(info.value) == "call block timed out"
        # The remote was told to stop.
        await blocker.finished.wait()
        await assert_settled(a, b)


async def test_the_peers_default_timeout_applies() -> None:
    blocker = Blocker()
    async with connected_pair({"block": blocker}, {}, timeout=0.05) as (a, b):
        with pytest.raises(CallTimeout, match=r"^call block timed out$"):
            await b.call("block")
        with pytest.raises(CallTimeout, match=r"^call block timed out$"):
            async with b.stream("block") as items:
                await anext(items)
        await blocker.finished.wait()
        assert blocker.runs == 2
        await assert_settled(a, b)


async def test_the_timeout_covers_only_the_first_frame() -> None:
    gates = [anyio.Event(), anyio.Event()]
    blocker = Blocker()

    async def slow_after_first(gate: int) -> AsyncIterator[str]:
        yield "first"
        await gates[gate].wait()
        yield "second"

    caps: dict[str, Any] = {"s": slow_after_first, "block": blocker}
    async with connected_pair(caps, {}) as (a, b):
        stream = await b.call("s", 0, timeout=0.25)
        async with b.stream("s", 1, timeout=0.25) as items:
            assert await anext(stream) == "first"
            assert await anext(items) == "first"
            # Let well over 0.25 s pass (measured by another call timing out)...
            with pytest.raises(CallTimeout):
                await b.call("block", timeout=0.6)
            # ...and both streams are still alive.
            for gate in gates:
                gate.set()
            assert [x async for x in stream] == ["second"]
            assert [x async for x in items] == ["second"]
        await blocker.finished.wait()
        await assert_settled(a, b)


# -- current_peer and claims ---------------------------------------------------------


async def test_current_peer_inside_a_capability_and_calling_back() -> None:
    seen: dict[str, Any] = {}

    async def ask(question: str) -> Any:
        peer = current_peer()
        seen["peer"] = peer
        return {"answer": await peer.call("answer", question)}

    async def answer(question: str) -> str:
        seen["answer_peer"] = current_peer()
        return f"{question}? 42"

    async with connected_pair({"ask": ask}, {"answer": answer}) as (a, b):
        assert await b.call("ask", "why") == {"answer": "why? 42"}
        assert seen["peer"] is a
        assert seen["answer_peer"] is b
        await assert_settled(a, b)


async def test_current_peer_in_a_streaming_capability() -> None:
    async def who(_: Any) -> AsyncIterator[bool]:
        yield current_peer() is peers[0]
        yield current_peer() is peers[0]

    peers: list[Peer] = []
    async with connected_pair({"who": who}, {}) as (a, b):
        peers.append(a)
        assert [x async for x in await b.call("who")] == [True, True]


async def test_current_peer_outside_a_capability_raises() -> None:
    with pytest.raises(RuntimeError, match="outside a capability"):
        current_peer()
    async with connected_pair(BASICS, {}):
        with pytest.raises(RuntimeError, match="outside a capability"):
            current_peer()


async def test_claims_are_visible_through_current_peer() -> None:
    async def whoami(_: Any) -> Any:
        claims = current_peer().claims
        with pytest.raises(TypeError):
            claims["sub"] = "someone else"  # type: ignore[index]
        return dict(claims)

    claims = {"sub": "worker-1", "scope": ["bash"]}
    async with connected_pair({"whoami": whoami}, {}, claims=claims) as (a, b):
        claims["sub"] = "changed later"
        assert await b.call("whoami") == {"sub": "worker-1", "scope": ["bash"]}
        assert a.claims["sub"] == "worker-1"


async def test_claims_default_to_empty() -> None:
    async with connected_pair(BASICS, {}) as (a, _):
        assert dict(a.claims) == {}


# -- cancellation crosses the wire -------------------------------------------------------


async def test_cancelling_the_callers_scope_cancels_the_remote() -> None:
    blocker = Blocker()
    async with connected_pair({"block": blocker}, {}) as (a, b):
        outcome: list[str] = []

        async def caller(
            *, task_status: anyio.abc.TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED
        ) -> None:
            with anyio.CancelScope() as scope:
                task_status.started(scope)
                await b.call("block", timeout=None)
            outcome.append("cancelled" if scope.cancelled_caught else "returned")

        async with anyio.create_task_group() as tg:
            scope = await tg.start(caller)
            await blocker.started.wait()
            assert len(b._state.outbound) == 1
            assert len(a._state.inbound) == 1
            scope.cancel()
        assert outcome == ["cancelled"]
        with anyio.fail_after(5):
            await blocker.finished.wait()
        await assert_settled(a, b)


async def test_cancelling_a_task_group_with_calls_in_flight() -> None:
    blockers = [Blocker() for _ in range(5)]
    caps = {f"block{i}": blocker for i, blocker in enumerate(blockers)}
    async with connected_pair(caps, {"echo": echo}) as (a, b):
        async with anyio.create_task_group() as tg:
            for name in caps:
                tg.start_soon(b.call, name, None)
            for blocker in blockers:
                await blocker.started.wait()
            tg.cancel_scope.cancel()
        for blocker in blockers:
            await blocker.finished.wait()
        await assert_settled(a, b)
        assert await a.call("echo", "still works") == "still works"


async def test_a_timeout_cancels_the_remote() -> None:
    blocker = Blocker()
    async with connected_pair({"block": blocker}, {}) as (a, b):
        with pytest.raises(CallTimeout):
            await b.call("block", timeout=0.05)
        with anyio.fail_after(5):
            await blocker.finished.wait()
        await assert_settled(a, b)


async def test_leaving_a_stream_early_cancels_the_remote() -> None:
    firehose = Firehose()
    async with connected_pair({"firehose": firehose}, {}, max_buffered_items=10_000) as (a, b):
        async with b.stream("firehose") as items:
            received = [await anext(items) for _ in range(3)]
        assert received == [0, 1, 2]
        with anyio.fail_after(5):
            await firehose.finished.wait()
        await assert_settled(a, b)


async def test_breaking_out_of_a_stream_block_cancels_the_remote() -> None:
    firehose = Firehose()
    async with connected_pair({"firehose": firehose}, {}, max_buffered_items=10_000) as (a, b):
        async with b.stream("firehose") as items:
            async for item in items:
                if item == 5:
                    break
        await firehose.finished.wait()
        await assert_settled(a, b)


async def test_aclose_on_a_stream_from_call_cancels_the_remote() -> None:
    firehose = Firehose()
    async with connected_pair({"firehose": firehose}, {}, max_buffered_items=10_000) as (a, b):
        stream = await b.call("firehose")
        assert await anext(stream) == 0
        await stream.aclose()
        await stream.aclose()  # idempotent
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        await firehose.finished.wait()
        await assert_settled(a, b)


async def test_a_consumer_waiting_on_a_stream_closed_by_another_task_is_told_so() -> None:
    gate_never = anyio.Event()
    parked = anyio.Event()
    raised: list[ConnectionClosed] = []

    async def one_then_wait(_: Any) -> AsyncIterator[int]:
        yield 1
        await gate_never.wait()
        yield 2  # pragma: no cover

    async def consume(items: Stream[Any]) -> None:
        parked.set()  # nothing yields between here and the wait for the next item
        with pytest.raises(ConnectionClosed) as info:
            await anext(items)
        raised.append(info.value)

    async with connected_pair({"s": one_then_wait}, {}) as (_, b):
        with anyio.fail_after(5):
            stream = await b.call("s")
            assert await anext(stream) == 1
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, stream)
                await parked.wait()
                await stream.aclose()
    assert [(str(e), e.reason) for e in raised] == [("call abandoned", "call abandoned")]


class BurstTransport:
    """A transport that hands over queued messages without yielding, as one socket
    read returns a whole burst of frames: only the peer itself lets the consumer run."""

    def __init__(self) -> None:
        self.inbox: collections.deque[str] = collections.deque()
        self.called = anyio.Event()
        self._more = anyio.Event()

    def push(self, *texts: str) -> None:
        self.inbox.extend(texts)
        self._more.set()

    async def receive(self) -> str:
        while not self.inbox:
            self._more = anyio.Event()
            await self._more.wait()
        return self.inbox.popleft()

    async def send(self, text: str) -> None:
        if json.loads(text)["type"] == "call":
            self.called.set()

    async def aclose(self) -> None:
        pass


async def test_a_consumer_that_keeps_up_outlasts_a_burst_that_ignores_flow_control() -> None:
    # The original protocol streams with no credit at all. The reader yields to a
    # lagging consumer, so one that takes each item as it comes never overruns,
    # however large the burst that arrives at once.
    transport = BurstTransport()
    got: list[int] = []

    async def consume(peer: Peer) -> None:
        async with await peer.call("s") as stream:
            async for item in stream:
                got.append(item)
                await anyio.lowlevel.checkpoint()  # the consumer's own work

    async with Peer(transport, max_buffered_items=8) as peer:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, peer)
                await transport.called.wait()
                transport.push(*(encode(Yield("1", i)) for i in range(40)), encode(Result("1")))
    assert got == list(range(40))


async def test_cancelling_a_stream_consumer_cancels_the_remote() -> None:
    gate_never = anyio.Event()
    finished = anyio.Event()

    async def one_then_wait(_: Any) -> AsyncIterator[int]:
        try:
            yield 1
            await gate_never.wait()
            yield 2  # pragma: no cover
        finally:
            finished.set()

    async with connected_pair({"s": one_then_wait}, {}) as (a, b):
        async with b.stream("s") as items:
            assert await anext(items) == 1
            with anyio.CancelScope() as scope:
                scope.cancel()
                await anext(items)
        await finished.wait()
        await assert_settled(a, b)


@pytest.mark.parametrize("via", ["call", "stream"])
async def test_a_consumer_overrun_fails_that_call_only(via: str) -> None:
    # Between astral peers flow control prevents overruns (next test). A
    # producer that ignores it, as the original TypeScript peer does, is played
    # here by a hand-written remote that sends past the window.
    limit = 4
    ours, theirs = memory_transport_pair()
    remote = RawRemote(theirs)
    caps: dict[str, Any] = {"echo": echo}
    async with (
        theirs,
        Peer(ours, capabilities=caps, max_buffered_items=limit, timeout=None) as peer,
    ):
        received: list[int] = []
        if via == "call":
            answers: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    answers.append(await peer.call("firehose"))

                tg.start_soon(call)
                frame = await remote.receive()
                await remote.send(encode(Yield(frame.id, 0)))
            stream = answers[0]
            assert isinstance(stream, Stream)
            received.append(await anext(stream))
            context: Any = stream
        else:
            context = peer.stream("firehose")
            stream = await context.__aenter__()
            frame = await remote.receive()
        first = len(received)
        assert isinstance(frame, Call)
        assert frame.window == limit
        try:
            for i in range(first, first + limit + 3):
                await remote.send(encode(Yield(frame.id, i)))
            # The remote is told to stop...
            seen: list[astral.Frame] = []
            while Cancel(frame.id) not in seen:
                seen.append(await remote.receive())
            # ...and the connection still answers other calls.
            await remote.probe()
            with pytest.raises(StreamOverrun) as info:
                await collect_into(stream, received)
        finally:
            await context.__aexit__(None, None, None)
        assert "firehose" in str(info.value)
        assert isinstance(info.value, astral.CallError)
        # Every buffered item first, in order, none lost, none invented. The
        # buffer holds a window of items plus one slot for the final result.
        assert received == list(range(limit + 1 + first))
        await assert_settled(peer)


async def test_flow_control_paces_an_astral_producer_to_its_consumer() -> None:
    limit = 4
    firehose = Firehose()
    async with connected_pair({"firehose": firehose}, {}, max_buffered_items=limit) as (a, b):
        async with b.stream("firehose", timeout=None) as items:
            await firehose.started.wait()
            await anyio.wait_all_tasks_blocked()  # in memory: proves it sends no more
            # Nothing taken yet: the producer waits at exactly the window.
            assert firehose.sent == limit
            taken = [await anext(items) for _ in range(50)]
            assert taken == list(range(50))
            await anyio.wait_all_tasks_blocked()  # in memory: proves it sends no more
            # Credit came back for every item taken: a window ahead, no more.
            assert firehose.sent == 50 + limit
        await firehose.finished.wait()
        await assert_settled(a, b)


async def test_credit_granted_before_the_first_item_is_honoured() -> None:
    # An astral caller grants credit only for items it took; a hand-written
    # remote may grant more before the capability has produced anything.
    gate = anyio.Event()

    async def gated(n: int) -> AsyncIterator[int]:
        await gate.wait()
        for i in range(n):
            yield i

    ours, theirs = memory_transport_pair()
    remote = RawRemote(theirs)
    async with theirs, Peer(ours, capabilities={"gated": gated, "echo": echo}) as peer:
        await remote.send(encode(Call("s", "gated", 3, 1)))  # a window of one item
        await remote.send(encode(astral.Credit("s", 2)))
        assert await remote.probe() == []  # the credit has been read
        gate.set()
        frames = [await remote.receive() for _ in range(4)]
        assert frames == [Yield("s", 0), Yield("s", 1), Yield("s", 2), Result("s")]
        assert not peer.closed


# -- closing ------------------------------------------------------------------------------


async def test_closing_one_side_fails_everything_on_the_other_at_once() -> None:
    a_blocker, b_blocker = Blocker(), Blocker()
    stream_started = anyio.Event()
    stream_gate = anyio.Event()

    async def one_then_wait(_: Any) -> AsyncIterator[str]:
        yield "one"
        await stream_gate.wait()  # never set
        yield "two"  # pragma: no cover

    a_caps: dict[str, Any] = {"block": a_blocker, "stream": one_then_wait}
    async with connected_pair(a_caps, {"block": b_blocker}, timeout=None) as (a, b):
        async with anyio.create_task_group() as tg:
            out = Outcomes(tg)
            # b waits on a (a call and a stream); a waits on b.
            out.start("b_call", lambda: b.call("block"))

            async def b_stream() -> list[str]:
                got: list[str] = []
                async with b.stream("stream") as items:
                    async for item in items:
                        got.append(item)
                        stream_started.set()
                return got  # pragma: no cover

            out.start("b_stream", b_stream)
            out.start("a_call", lambda: a.call("block"))
            await a_blocker.started.wait()
            await b_blocker.started.wait()
            await stream_started.wait()

            await a.aclose()
        for name in ("b_call", "b_stream", "a_call"):
            assert isinstance(out.results[name], ConnectionClosed), (name, out.results[name])
        # b's inbound capability (a's call) was cancelled; so was a's.
        await b_blocker.finished.wait()
        await a_blocker.finished.wait()

        assert a.closed
        a_reason = await a.wait_closed()
        assert a_reason.code == 1000
        with anyio.fail_after(5):
            b_reason = await b.wait_closed()
        assert b.closed
        assert isinstance(b_reason, ConnectionClosed)
        assert out.results["b_call"].reason == b_reason.reason
        for peer in (a, b):
            with pytest.raises(ConnectionClosed):
                await peer.call("block")
            with pytest.raises(ConnectionClosed):
                async with peer.stream("stream"):
                    pass  # pragma: no cover
        await assert_settled(a, b)


async def test_leaving_the_async_with_closes_the_other_side() -> None:
    a_transport, b_transport = memory_transport_pair()
    a_blocker, b_blocker = Blocker(), Blocker()
    async with Peer(b_transport, capabilities={"block": b_blocker}, timeout=None) as b:
        async with anyio.create_task_group() as tg:
            out = Outcomes(tg)
            async with Peer(a_transport, capabilities={"block": a_blocker}, timeout=None) as a:
                out.start("b_call", lambda: b.call("block"))
                out.start("a_call", lambda: a.call("block"))
                await a_blocker.started.wait()
                await b_blocker.started.wait()
            # a has exited: every task of a is gone.
            assert a.closed
            assert a._stopped.is_set()
        assert isinstance(out.results["b_call"], ConnectionClosed)
        assert isinstance(out.results["a_call"], ConnectionClosed)
        await b_blocker.finished.wait()
        assert a_blocker.finished.is_set()
        await b.wait_closed()
        assert b.closed
        with pytest.raises(ConnectionClosed):
            await b.call("block")
        await assert_settled(a, b)


async def test_the_remote_closing_ends_the_peer_on_its_own() -> None:
    ours, theirs = memory_transport_pair()
    async with theirs, Peer(ours) as peer:
        await theirs.aclose()
        reason = await peer.wait_closed()
        assert reason.reason == "connection closed by the remote peer"
        assert peer.closed
        # Its tasks have ended, before the async with is left.
        with anyio.fail_after(5):
            await peer._stopped.wait()


async def test_aclose_is_idempotent_and_works_from_a_capability() -> None:
    entered = anyio.Event()
    finished = anyio.Event()

    async def hang_up(_: Any) -> None:
        entered.set()
        try:
            await current_peer().aclose()
        finally:
            finished.set()

    async with connected_pair({"hang_up": hang_up}, {}, timeout=None) as (a, b):
        with pytest.raises(ConnectionClosed):
            await b.call("hang_up")
        assert entered.is_set()
        await finished.wait()
        assert a.closed
        await a.aclose()
        await a.aclose()
        assert (await b.wait_closed()).code is None


async def test_cancelling_the_task_group_holding_a_peer_tears_down_both_sides() -> None:
    a_transport, b_transport = memory_transport_pair()
    a_blocker, b_blocker = Blocker(), Blocker()
    a_ref: list[Peer] = []
    async with Peer(b_transport, capabilities={"block": b_blocker}, timeout=None) as b:
        async with anyio.create_task_group() as outer:
            out = Outcomes(outer)
            async with anyio.create_task_group() as doomed:

                async def run_a() -> None:
                    async with Peer(a_transport, capabilities={"block": a_blocker}) as a:
                        a_ref.append(a)
                        await a.call("block", timeout=None)  # waits on b

                doomed.start_soon(run_a)
                await b_blocker.started.wait()
                out.start("b_call", lambda: b.call("block"))
                await a_blocker.started.wait()
                doomed.cancel_scope.cancel()
            # a is torn down: its capability was cancelled, its tasks are gone.
            assert a_blocker.finished.is_set()
            assert a_ref[0].closed
            assert a_ref[0]._stopped.is_set()
        # b saw the connection end: its call failed, its capability was cancelled.
        assert isinstance(out.results["b_call"], ConnectionClosed)
        await b_blocker.finished.wait()
        await b.wait_closed()
        await assert_settled(a_ref[0], b)


async def test_cancelling_a_peer_whose_workers_are_idle_ends_it_cleanly() -> None:
    """Cancelled from outside while a worker that served a call waits for the
    next one: the peer ends with the cancellation, and nothing else."""
    holder = anyio.CancelScope()
    served = anyio.Event()

    async def hold() -> None:
        with holder:
            async with connected_pair({}, {"echo": echo}) as (a, _):
                assert await a.call("echo", 1) == 1  # b has a worker, now idle
                served.set()
                await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await served.wait()
        await anyio.wait_all_tasks_blocked()  # in memory: b's worker is parked
        holder.cancel()  # from another task, as a server stopping would
    assert holder.cancelled_caught


async def test_an_exception_in_the_body_propagates_as_raised() -> None:
    # Not wrapped in an ExceptionGroup by the peers' task groups.
    with pytest.raises(RemoteError, match=r"^boom$"):
        async with connected_pair(BASICS, {}) as (_, b):
            await b.call("fail", "boom")
    ours, theirs = memory_transport_pair()
    with pytest.raises(KeyError):
        async with theirs, Peer(ours):
            raise KeyError("mine")

    async def hang_up(_: Any) -> None:
        await current_peer().aclose()

    with pytest.raises(ConnectionClosed):
        async with connected_pair({"hang_up": hang_up}, {}, timeout=None) as (_, b):
            await b.call("hang_up")


async def test_a_peer_is_used_inside_async_with_only() -> None:
    ours, theirs = memory_transport_pair()
    peer = Peer(ours)
    with pytest.raises(RuntimeError, match="async with"):
        await peer.call("x")
    async with theirs, peer:
        with pytest.raises(RuntimeError, match="only once"):
            await peer.__aenter__()


async def test_aclose_of_a_peer_never_entered_returns() -> None:
    ours, theirs = memory_transport_pair()
    peer = Peer(ours)
    with anyio.fail_after(5):
        await peer.aclose()
    assert peer.closed
    with pytest.raises(ConnectionClosed):
        await peer.call("x")
    with pytest.raises(anyio.EndOfStream):
        await theirs.receive()
    await theirs.aclose()


async def test_connected_pair_checks_capabilities() -> None:
    def sync(_: Any) -> Any:  # pragma: no cover
        return None

    with pytest.raises(TypeError):
        async with connected_pair({"echo": echo}, {"sync": sync}):
            pass  # pragma: no cover
    with pytest.raises(TypeError):
        async with connected_pair({"sync": sync}):
            pass  # pragma: no cover


async def test_capabilities_are_checked_when_the_peer_is_made() -> None:
    def sync(_: Any) -> Any:  # pragma: no cover
        return None

    ours, theirs = memory_transport_pair()
    async with ours, theirs:
        with pytest.raises(TypeError, match="'sync'"):
            Peer(ours, capabilities={"sync": sync})


# -- transports that end or fail -------------------------------------------------------------


class ScriptedTransport:
    """A transport whose input ends, on cue, with a given error."""

    def __init__(
        self,
        end: BaseException,
        *,
        broken_send: bool = False,
        stuck_send: bool = False,
        failing_close: bool = False,
    ) -> None:
        self.sent: list[str] = []
        self.sending = anyio.Event()  # a first frame was sent
        self.end = anyio.Event()
        self.closed = False
        self._error = end
        self._broken_send = broken_send
        self._stuck_send = stuck_send  # sends wait until the end, then break
        self._failing_close = failing_close

    async def send(self, item: str, /) -> None:
        if self._broken_send:
            raise anyio.BrokenResourceError
        self.sent.append(item)
        self.sending.set()
        if self._stuck_send:
            await self.end.wait()
            raise anyio.BrokenResourceError

    async def receive(self) -> str:
        await self.end.wait()
        raise self._error

    async def aclose(self) -> None:
        self.closed = True
        self.end.set()
        if self._failing_close:
            raise OSError("the socket was already gone")


async def test_the_transports_close_code_reaches_pending_calls() -> None:
    transport = ScriptedTransport(ConnectionClosed("server going away", code=1001))
    assert isinstance(transport, astral.Transport)
    async with Peer(transport, timeout=None) as peer:
        async with anyio.create_task_group() as tg:
            out = Outcomes(tg)
            out.start("call", lambda: peer.call("f"))
            await transport.sending.wait()
            assert len(transport.sent) == 1
            transport.end.set()
        error = out.results["call"]
        assert isinstance(error, ConnectionClosed)
        assert (error.code, error.reason) == (1001, "server going away")
        reason = await peer.wait_closed()
        assert (reason.code, reason.reason) == (1001, "server going away")
        assert isinstance(reason.__cause__, ConnectionClosed)
    assert transport.closed


@pytest.mark.parametrize(
    "end", [anyio.EndOfStream(), anyio.BrokenResourceError(), anyio.ClosedResourceError()]
)
async def test_any_end_of_input_closes_the_peer(end: BaseException) -> None:
    transport = ScriptedTransport(end)
    async with Peer(transport, timeout=None) as peer:
        transport.end.set()
        reason = await peer.wait_closed()
        assert reason.__cause__ is end
        with pytest.raises(ConnectionClosed):
            await peer.call("f")
    assert transport.closed


async def test_a_send_that_fails_fails_the_call_with_connection_closed() -> None:
    transport = ScriptedTransport(anyio.EndOfStream(), broken_send=True)
    async with Peer(transport, timeout=None) as peer:
        with pytest.raises(ConnectionClosed) as info:
            await peer.call("f")
        error = info.value
        assert (str(error), error.reason, error.code) == (
            "connection closed",
            "connection closed",
            None,
        )
        assert isinstance(error.__cause__, anyio.BrokenResourceError)
        assert peer._state.outbound == {}


async def test_a_call_whose_send_the_close_cuts_off_fails_with_that_close() -> None:
    """A call still being sent when the peer closes fails as its pending calls do."""
    transport = ScriptedTransport(anyio.EndOfStream(), stuck_send=True)
    async with Peer(transport, timeout=None) as peer:
        async with anyio.create_task_group() as tg:
            out = Outcomes(tg)
            out.start("call", lambda: peer.call("f"))
            await transport.sending.wait()  # the call frame is stuck in send()
            await peer.aclose(4000, "bye")
        error = out.results["call"]
        assert isinstance(error, ConnectionClosed)
        assert (str(error), error.reason, error.code) == ("bye (code 4000)", "bye", 4000)
        assert isinstance(error.__cause__, anyio.BrokenResourceError)


async def test_a_call_cancelled_while_its_frame_is_sent_is_given_up_quietly() -> None:
    transport = ScriptedTransport(anyio.EndOfStream(), stuck_send=True)
    async with Peer(transport, timeout=None) as peer:
        caller = anyio.CancelScope()
        given_up = anyio.Event()

        async def call() -> None:
            with caller:
                await peer.call("f")
            given_up.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await transport.sending.wait()  # the call frame is stuck in send()
            caller.cancel()
            await given_up.wait()
        assert caller.cancelled_caught
        assert not peer.closed
        # Nothing is left waiting for it: a drain has no call to wait for.
        await peer.drain(60)


async def test_a_transport_failing_to_close_does_not_break_closing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="astral.peer")
    transport = ScriptedTransport(anyio.EndOfStream(), failing_close=True)
    async with Peer(transport) as peer:
        pass
    assert peer.closed
    assert transport.closed
    assert any("closing" in record.getMessage() for record in caplog.records)


# -- bad input from the remote never crashes the peer ----------------------------------------


class RawRemote:
    """A hand-written remote speaking raw JSON text to a Peer."""

    def __init__(self, transport: StapledObjectStream[str]) -> None:
        self.transport = transport
        self.unexpected: list[astral.Frame] = []
        self._probes = 0

    async def send(self, text: str) -> None:
        await self.transport.send(text)

    async def receive(self) -> astral.Frame:
        return decode(await self.transport.receive())

    async def receive_text(self) -> str:
        return await self.transport.receive()

    async def probe(self) -> list[astral.Frame]:
        """Make a normal call; return the other frames that arrived before its answer."""
        self._probes += 1
        probe_id = f"probe-{self._probes}"
        await self.send(encode(Call(probe_id, "echo", {"probe": self._probes})))
        others: list[astral.Frame] = []
        while True:
            frame = await self.receive()
            if frame.id == probe_id:
                assert frame == Result(probe_id, {"probe": self._probes})
                return others
            others.append(frame)


async def test_bad_input_never_crashes_the_peer() -> None:
    ours, theirs = memory_transport_pair()
    remote = RawRemote(theirs)
    blocker = Blocker()
    caps: dict[str, Any] = {"echo": echo, "block": blocker, "count": count}
    async with theirs, Peer(ours, capabilities=caps, timeout=None) as peer:
        async with anyio.create_task_group() as tg:
            pending = Outcomes(tg)
            pending.start("call", lambda: peer.call("remote_cap", {"q": 1}))
            call = await remote.receive()
            assert isinstance(call, Call)
            assert call.capability == "remote_cap"

            # A call of the remote's, still running here.
            await remote.send(encode(Call("running", "block")))
            await blocker.started.wait()

            ignored = [
                "",
                "not json",
                "{",
                "[1,2,3]",
                '"just a string"',
                "42",
                "null",
                "{}",
                '{"type":"ping","id":"1"}',
                '{"type":"hello","id":"' + call.id + '","output":1}',
                '{"id":"' + call.id + '","output":1}',
                '{"type":"result"}',
                '{"type":"result","id":7,"output":1}',
                '{"type":"call","capability":"echo"}',
                '{"type":"result","id":"unknown","output":1}',
                '{"type":"yield","id":"unknown","output":1}',
                '{"type":"result","id":"unknown","error":"x"}',
                '{"type":"result","id":"unknown","error":5}',
                '{"type":"cancel","id":"unknown"}',
                '{"type":"yield","id":"unknown","output":NaN}',
                '{"type":"yield","id":"' + call.id + '","output":[1,2',
                '{"type":"yield","id":"x","output":"\\ud800"}',
                '{"type":"cancel","id":"' + "x" * 1000 + '"}',
                "[" * 100_000,
                '{"type":"call","id":"' + "x" * 300 + '","capability":"echo"}',
            ]
            for text in ignored:
                await remote.send(text)
                assert await remote.probe() == [], text

            refused = [
                ('{"type":"call","id":"m1"}', Result, "malformed call: "),
                ('{"type":"call","id":"m2","capability":null}', Result, "malformed call: "),
                ('{"type":"call","id":"m3","capability":"echo","input":NaN}', Result, "malformed"),
                (
                    '{"type":"call","id":"m4","capability":"echo","input":18446744073709551617}',
                    Result,
                    "malformed call: ",
                ),
                ('{"type":"call","id":"\\ud800","capability":"nope"}', Result, "unknown"),
                ('{"type":"call","id":"u1","capability":"nope"}', Result, "unknown capability"),
                ('{"type":"call","id":"running","capability":"echo"}', Result, "duplicate call"),
            ]
            for text, kind, error in refused:
                await remote.send(text)
                [answer] = await remote.probe()
                assert isinstance(answer, kind)
                assert answer.id == decode_id(text)
                assert answer.error is not None
                assert answer.error.startswith(error), answer

            # The running call was untouched by the duplicate: cancel it, get its one result.
            assert not blocker.finished.is_set()
            assert set(peer._state.inbound) == {"running"}
            await remote.send(encode(Cancel("running")))
            assert await remote.receive() == Result("running", error="cancelled")
            await blocker.finished.wait()

            # The well-formed pending call was untouched all along.
            assert not pending.done["call"].is_set()
            await remote.send(encode(Result(call.id, {"answer": 1})))
            await pending.done["call"].wait()
            assert pending.results["call"] == {"answer": 1}
        assert not peer.closed
        await assert_settled(peer)


async def send_many(transport: StapledObjectStream[str], n: int) -> None:
    for i in range(n):
        await transport.send(encode(Call(f"after-{i}", "unknown")))


def decode_id(text: str) -> str:
    frame_id: str = json.loads(text)["id"]
    return frame_id


async def test_frames_after_a_call_ended_are_ignored() -> None:
    ours, theirs = memory_transport_pair()
    remote = RawRemote(theirs)
    async with theirs, Peer(ours, capabilities={"echo": echo}, timeout=None) as peer:
        async with anyio.create_task_group() as tg:
            out = Outcomes(tg)
            out.start("first", lambda: peer.call("f"))
            first = await remote.receive()
            out.start("second", lambda: peer.call("g"))
            second = await remote.receive()
            assert first.id != second.id

            await remote.send(encode(Result(first.id, "one")))
            for late in (
                Result(first.id, "again"),
                Result(first.id, error="late error"),
                Yield(first.id, "late item"),
            ):
                await remote.send(encode(late))
                assert await remote.probe() == []
            await out.done["first"].wait()
            assert out.results["first"] == "one"
            assert not out.done["second"].is_set()

            # A stream: a yield after its result is ignored too.
            await remote.send(encode(Yield(second.id, 1)))
            await out.done["second"].wait()
            stream = out.results["second"]
            assert isinstance(stream, Stream)
            await remote.send(encode(Yield(second.id, 2)))
            await remote.send(encode(Result(second.id)))
            await remote.send(encode(Yield(second.id, 3)))
            await remote.send(encode(Result(second.id, error="after the end")))
            assert await remote.probe() == []
            assert [x async for x in stream] == [1, 2]
        await assert_settled(peer)


async def test_a_malformed_result_fails_that_call_at_once() -> None:
    ours, theirs = memory_transport_pair()
    remote = RawRemote(theirs)
    async with theirs, Peer(ours, capabilities={"echo": echo}, timeout=None) as peer:
        async with anyio.create_task_group() as tg:
            out = Outcomes(tg)
            out.start("victim", lambda: peer.call("f"))
            victim = await remote.receive()
            out.start("bystander", lambda: peer.call("g"))
            bystander = await remote.receive()

            await remote.send('{"type":"result","id":"' + victim.id + '","output":[1e999')
            # Not JSON: the id cannot be read, nothing fails.
            assert await remote.probe() == []
            assert not out.done["victim"].is_set()

            # JSON, with a number no JavaScript peer writes: the id is read.
            await remote.send('{"type":"result","id":"' + victim.id + '","output":[1e999]}')
            with anyio.fail_after(5):
                await out.done["victim"].wait()
            error = out.results["victim"]
            assert isinstance(error, ProtocolError)
            assert error.frame_id == victim.id

            assert not out.done["bystander"].is_set()
            assert await remote.probe() == []
            await remote.send(encode(Result(bystander.id, "fine")))
            await out.done["bystander"].wait()
            assert out.results["bystander"] == "fine"
        await assert_settled(peer)


async def test_a_malformed_yield_fails_that_stream_after_its_items() -> None:
    ours, theirs = memory_transport_pair()
    remote = RawRemote(theirs)
    async with theirs, Peer(ours, capabilities={"echo": echo}, timeout=None) as peer:
        async with peer.stream("s") as items:
            call = await remote.receive()
            await remote.send(encode(Yield(call.id, "good")))
            await remote.send(
                '{"type":"yield","id":"' + call.id + '","output":18446744073709551617}'
            )
            assert await anext(items) == "good"
            with pytest.raises(ProtocolError):
                await anext(items)
        # The stream still runs on the remote: it is told to stop, once.
        assert await remote.probe() == [Cancel(call.id)]
        await assert_settled(peer)


async def test_a_flood_of_refused_calls_closes_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_peer, "FLOOD_GRACE", 0.2)
    ours, theirs = memory_transport_pair()
    limit = 8
    async with theirs, Peer(ours, timeout=None, max_inbound_calls=limit) as peer:
        async with anyio.create_task_group() as tg:
            out = Outcomes(tg)
            out.start("pending", lambda: peer.call("anything"))
            assert isinstance(decode(await theirs.receive()), Call)
            # The remote never reads again; every call it sends is refused.
            # Once `limit` answers wait, the peer stops reading it; once it
            # has taken none of them for FLOOD_GRACE, it is cut off, and the
            # remote's send in progress fails.
            sent = 0
            with pytest.raises(anyio.BrokenResourceError):
                while True:
                    await theirs.send(encode(Call(str(sent), "unknown")))
                    sent += 1
                    assert sent < 10_000, "the peer never stopped reading the flood"
            reason = await peer.wait_closed()
            assert reason.code == 1008
            await out.done["pending"].wait()
            assert isinstance(out.results["pending"], ConnectionClosed)
            assert out.results["pending"].code == 1008
            # Memory stayed bounded: at most the limit of queued answers, plus
            # what the transport itself buffers both ways.
            assert sent <= limit + 64 + 2 + 64
        # What was queued is still readable, then the end.
        answers: list[Any] = []
        await collect_into(theirs, answers)  # until the end of the stream
        assert answers
        assert all(isinstance(decode(text), Result) for text in answers)
        assert {decode(text).error for text in answers} == {"unknown capability"}  # type: ignore[union-attr]
        await assert_settled(peer)


async def test_a_burst_of_refused_calls_from_a_reader_is_answered_in_full() -> None:
    # The remote sends many more refused calls than max_inbound_calls at once,
    # but reads its answers: it is paused, never cut off, and gets every answer.
    ours, theirs = memory_transport_pair(buffer=math.inf)
    limit = 8
    burst = 20 * limit
    async with theirs, Peer(ours, timeout=None, max_inbound_calls=limit) as peer:
        for i in range(burst):
            await theirs.send(encode(Call(str(i), "unknown")))
        answers = [decode(await theirs.receive()) for _ in range(burst)]
        assert {a.id for a in answers} == {str(i) for i in range(burst)}  # type: ignore[union-attr]
        assert not peer.closed
        await theirs.send(encode(Call("last", "unknown")))
        assert decode(await theirs.receive()) == Result("last", error="unknown capability")


async def test_an_unresponsive_remote_is_not_cut_off_for_running_calls() -> None:
    # Calls that run (rather than being refused) are bounded by max_inbound_calls,
    # not by the flood rule.
    ours, theirs = memory_transport_pair()
    blocker = Blocker()
    async with theirs, Peer(ours, capabilities={"block": blocker}, max_inbound_calls=3) as peer:
        for i in range(3):
            await theirs.send(encode(Call(f"b{i}", "block")))
        await theirs.send(encode(Call("over", "block")))
        assert await theirs.receive() == encode(Result("over", error="too many concurrent calls"))
        assert len(peer._state.inbound) == 3
        assert blocker.runs == 3
        assert not peer.closed


# -- the original's semantics on the wire --------------------------------------------------


async def test_calls_are_sent_with_exactly_the_originals_fields() -> None:
    # Plus one optional field, the flow-control window (docs/protocol.md),
    # which the original ignores like any unknown field.
    ours, theirs = memory_transport_pair()
    async with theirs, Peer(ours, timeout=None, max_buffered_items=8) as peer:
        async with anyio.create_task_group() as tg:
            out = Outcomes(tg)
            out.start("with_input", lambda: peer.call("transcription", {"audio": "é"}))
            text = await theirs.receive()
            call = decode(text)
            assert text == (
                '{"type":"call","id":"' + call.id + '","capability":"transcription",'
                '"input":{"audio":"é"},"window":8}'
            )
            out.start("without_input", lambda: peer.call("ping"))
            text = await theirs.receive()
            second = decode(text)
            assert text == '{"type":"call","id":"' + second.id + '","capability":"ping","window":8}'
            await theirs.send(encode(Result(call.id)))
            await theirs.send(encode(Result(second.id)))
        assert out.results == {"with_input": None, "without_input": None}


async def test_answers_are_sent_with_exactly_the_originals_fields() -> None:
    ours, theirs = memory_transport_pair()
    uuid = "0b7c1a9e-3f0e-4c39-9a54-3c1d2f0c8f11"
    async with theirs, Peer(ours, capabilities=BASICS) as _:
        await theirs.send(
            '{"type":"call","id":"' + uuid + '","capability":"count","input":2,"extra":1}'
        )
        assert await theirs.receive() == '{"type":"yield","id":"' + uuid + '","output":0}'
        assert await theirs.receive() == '{"type":"yield","id":"' + uuid + '","output":1}'
        assert await theirs.receive() == '{"type":"result","id":"' + uuid + '"}'
        await theirs.send('{"type":"call","id":"2","capability":"echo","input":{"b":1,"a":"ü"}}')
        assert await theirs.receive() == '{"type":"result","id":"2","output":{"b":1,"a":"ü"}}'
        await theirs.send('{"type":"call","id":"3","capability":"fail","input":"no"}')
        # Plus one optional field, the error code (docs/protocol.md), which
        # the original ignores like any unknown field.
        assert await theirs.receive() == '{"type":"result","id":"3","error":"no","code":"internal"}'
        await theirs.send('{"type":"call","id":"4","capability":"nothing"}')
        assert await theirs.receive() == '{"type":"result","id":"4"}'
        await theirs.send('{"type":"call","id":"5","capability":"__proto__"}')
        assert await theirs.receive() == '{"type":"result","id":"5","error":"unknown capability"}'
        await theirs.send('{"type":"call","id":"6","capability":"failing_stream","input":1}')
        assert await theirs.receive() == '{"type":"yield","id":"6","output":0}'
        assert (
            await theirs.receive()
            == '{"type":"result","id":"6","error":"failed after 1","code":"internal"}'
        )


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ('"output":1,"error":"the error wins"', "the error wins"),
        ('"error":"the error wins","output":1', "the error wins"),
        ('"error":null', ""),
        ('"error":""', ""),
        ('"output":{"ok":true},"error":null', ""),
    ],
)
async def test_any_error_key_fails_the_call(answer: str, message: str) -> None:
    ours, theirs = memory_transport_pair()
    async with theirs, Peer(ours, timeout=None) as peer:
        async with anyio.create_task_group() as tg:
            out = Outcomes(tg)
            out.start("call", lambda: peer.call("f"))
            call = await theirs.receive()
            await theirs.send('{"type":"result","id":"' + decode(call).id + '",' + answer + "}")
        error = out.results["call"]
        assert isinstance(error, RemoteError)
        assert error.message == message


async def test_an_error_result_ends_a_stream_from_the_original() -> None:
    ours, theirs = memory_transport_pair()
    async with theirs, Peer(ours, timeout=None) as peer:
        async with peer.stream("generate") as items:
            call_id = decode(await theirs.receive()).id
            for text in ("a", "b"):
                await theirs.send(encode(Yield(call_id, text)))
            await theirs.send('{"type":"result","id":"' + call_id + '","error":null}')
            received: list[Any] = []
            with pytest.raises(RemoteError):
                await collect_into(items, received)
            assert received == ["a", "b"]


async def test_a_cancel_is_the_only_frame_astral_adds_and_only_when_giving_up() -> None:
    ours, theirs = memory_transport_pair()
    async with theirs, Peer(ours) as peer:
        with pytest.raises(CallTimeout):
            await peer.call("slow", timeout=0.01)
        call = decode(await theirs.receive())
        assert await theirs.receive() == '{"type":"cancel","id":"' + call.id + '"}'
        # The original ignores the cancel and answers anyway: harmless.
        await theirs.send(encode(Result(call.id, "late")))
        await theirs.send(encode(Call("x", "nothing-here")))
        assert decode(await theirs.receive()) == Result("x", error="unknown capability")
        await assert_settled(peer)


async def test_transport_pair_is_joined_both_ways() -> None:
    left, right = memory_transport_pair(buffer=math.inf)
    async with left, right:
        await left.send("to right")
        await right.send("to left")
        assert await right.receive() == "to right"
        assert await left.receive() == "to left"
        await left.aclose()
        with pytest.raises(anyio.EndOfStream):
            await right.receive()


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"timeout": -1.0}, {"max_inbound_calls": 0}, {"max_buffered_items": 0}],
)
async def test_limits_must_be_positive(options: dict[str, Any]) -> None:
    a, b = memory_transport_pair()
    async with a, b:
        with pytest.raises(ValueError, match="must be"):
            astral.Peer(a, **options)


async def test_a_full_window_behind_still_gets_the_final_result() -> None:
    # The producer may send a whole window before the consumer takes anything;
    # its final result must still fit.
    limit = 8

    async def exactly_a_window(_: Any) -> AsyncIterator[int]:
        for i in range(limit):
            yield i

    finished = anyio.Event()

    async def notify(_: Any) -> None:
        finished.set()

    caps = {"window": exactly_a_window, "ping": notify}
    async with connected_pair(caps, {}, max_buffered_items=limit) as (a, b):
        async with b.stream("window") as items:
            await b.call("ping")  # the stream's frames arrived before this answer
            await finished.wait()
            # In memory: a spurious overrun, were there one, has happened by now.
            await anyio.wait_all_tasks_blocked()
            assert [item async for item in items] == list(range(limit))
        await assert_settled(a, b)


async def test_a_dropped_stream_stops_the_remote() -> None:
    firehose = Firehose()
    async with connected_pair({"firehose": firehose}, {}, max_buffered_items=4) as (a, b):
        stream = await b.call("firehose")
        assert isinstance(stream, Stream)
        del stream  # never closed: the finalizer must cancel the call
        await firehose.finished.wait()
        await assert_settled(a, b)


async def test_a_stream_collected_in_another_thread_leaves_the_peer_alone() -> None:
    # The cyclic GC may finalize a dropped stream in any thread; only the
    # peer's own thread may touch its streams. The call is then stopped when
    # the connection ends instead.
    firehose = Firehose()
    async with connected_pair({"firehose": firehose}, {}, max_buffered_items=4) as (a, b):
        stream = await b.call("firehose")
        assert isinstance(stream, Stream)
        await anyio.to_thread.run_sync(stream.__del__)
        await anyio.wait_all_tasks_blocked()  # in memory: proves no cancel was sent
        assert not firehose.finished.is_set()
        await stream.aclose()  # on the peer's thread it works
        await firehose.finished.wait()
        await assert_settled(a, b)


# -- control frames keep their order while writes are held ---------------------------------


class HeldWrites:
    """A transport with ``try_send`` whose writes can be held (a remote that stops reading).

    Frames already received are handed over without a trip through the event
    loop, as astral's WebSocket does. ``wire`` records what left, in order;
    ``release_on`` releases the hold as that frame is received, so the peer
    makes its next frame before any other task has run.
    """

    def __init__(self) -> None:
        self.wire: list[str] = []
        self.inbox: list[str] = []
        self.held = True
        self.release_on: str | None = None
        self.waiting = anyio.Event()  # a send() waits for room
        self.two_left = anyio.Event()
        self._room = anyio.Event()
        self._arrived = anyio.Event()
        self._closed = False

    def feed(self, *texts: str) -> None:
        self.inbox.extend(texts)
        self._arrived.set()

    async def receive(self) -> str:
        while not self.inbox:
            if self._closed:
                raise anyio.EndOfStream
            self._arrived = anyio.Event()
            await self._arrived.wait()
        text = self.inbox.pop(0)
        if text == self.release_on:
            self.held = False
            self._room.set()
        return text

    def _left(self, text: str) -> None:
        self.wire.append(text)
        if len(self.wire) == 2:
            self.two_left.set()

    def try_send(self, text: str, /) -> bool:
        if self.held:
            return False
        self._left(text)
        return True

    async def send(self, text: str, /) -> None:
        while self.held:
            self.waiting.set()
            await self._room.wait()
        self._left(text)

    async def aclose(self) -> None:
        self._closed = True
        self._arrived.set()


async def test_a_reply_made_while_an_earlier_one_is_being_written_leaves_after_it() -> None:
    transport = HeldWrites()
    first, second = encode(Call("1", "nope")), encode(Call("2", "nope"))
    async with Peer(transport, timeout=None):
        transport.feed(first)
        await transport.waiting.wait()  # the refusal of call 1 waits for room
        transport.release_on = second  # room comes back as call 2 arrives
        transport.feed(second)
        with anyio.fail_after(5):
            await transport.two_left.wait()
    assert [json.loads(text)["id"] for text in transport.wire] == ["1", "2"]


async def test_a_reply_made_while_an_earlier_one_waits_in_the_queue_leaves_after_it() -> None:
    transport = HeldWrites()
    first, second = encode(Call("1", "nope")), encode(Call("2", "nope"))
    async with Peer(transport, timeout=None):
        # Both arrive together: the refusal of call 1 finds the writes held
        # and is queued; room comes back before anything has sent it.
        transport.release_on = second
        transport.feed(first, second)
        with anyio.fail_after(5):
            await transport.two_left.wait()
    assert [json.loads(text)["id"] for text in transport.wire] == ["1", "2"]


# -- exact limits and texts of the lifecycle ----------------------------------------


async def test_a_close_reason_may_be_exactly_123_bytes() -> None:
    async with connected_pair() as (a, _b):
        with pytest.raises(ValueError) as caught:
            await a.aclose(1000, "é" * 62)  # 124 bytes of UTF-8
        assert str(caught.value) == "close reason must be at most 123 bytes of UTF-8"
        assert not a.closed
        await a.aclose(1000, "é" * 61 + "x")  # 123 bytes
        assert (await a.wait_closed()).reason == "é" * 61 + "x"


async def test_aclose_without_a_reason_says_this_peer_closed() -> None:
    async with connected_pair() as (a, _b):
        await a.aclose()
        closed = await a.wait_closed()
        assert (closed.code, closed.reason) == (1000, "connection closed by this peer")


async def test_a_peer_is_entered_only_once() -> None:
    ours, theirs = memory_transport_pair()
    async with theirs:
        peer = Peer(ours)
        async with peer:
            with pytest.raises(RuntimeError) as caught:
                await peer.__aenter__()
            assert str(caught.value) == "a Peer can be entered only once"


async def test_the_remote_message_size_may_be_one_byte_but_not_zero() -> None:
    ours, theirs = memory_transport_pair()
    for bad in (0, -1):
        with pytest.raises(ValueError) as caught:
            Peer(ours, remote_max_message_size=bad)
        assert str(caught.value) == "remote_max_message_size must be positive, or None"
    async with theirs, Peer(ours, remote_max_message_size=1) as peer:
        with pytest.raises(ProtocolError):
            await peer.call("echo", "too big for one byte")


async def test_a_stream_flows_with_a_window_of_one_item() -> None:
    # Credit goes back after every item: with a window of one, a batch of two would stall.
    async with connected_pair({"count": count}, max_buffered_items=1, timeout=5) as (_a, b):
        async with b.stream("count", 5) as items:
            assert [item async for item in items] == [0, 1, 2, 3, 4]


class _BrokenOnClose:
    """A transport whose reader fails with a bug of its own once it is closed (a fault)."""

    def __init__(self) -> None:
        self.closed = anyio.Event()

    async def send(self, item: str) -> None:
        pass  # pragma: no cover

    async def receive(self) -> str:
        await self.closed.wait()
        raise RuntimeError("transport bug")

    async def aclose(self) -> None:
        self.closed.set()


async def test_an_error_of_the_reader_is_not_lost_behind_the_bodys_own() -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        async with Peer(_BrokenOnClose()):
            raise ValueError("the body's error")
    bug, body = caught.value.subgroup(RuntimeError), caught.value.subgroup(ValueError)
    assert bug is not None
    assert body is not None
    assert [str(e) for e in _leaves(bug)] == ["transport bug"]
    assert [str(e) for e in _leaves(body)] == ["the body's error"]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for e in group.exceptions
        for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    ]


class _CallThenGone:
    """A remote that sends one call and is gone in the same step, without yielding (a fault)."""

    def __init__(self, frame: str) -> None:
        self.frames = [frame]

    async def send(self, item: str) -> None:
        pass  # pragma: no cover

    async def receive(self) -> str:
        if self.frames:
            return self.frames.pop()
        raise anyio.EndOfStream

    async def aclose(self) -> None:
        pass


async def test_a_call_the_peer_stopped_before_it_started_never_runs() -> None:
    ran: list[Any] = []

    async def record(value: Any) -> None:
        ran.append(value)  # before any await: runs if the capability is called at all

    transport = _CallThenGone(astral.encode(astral.Call("c1", "record", "x")))
    async with Peer(transport, capabilities={"record": record}) as peer:
        await peer.wait_closed()
    assert ran == []
