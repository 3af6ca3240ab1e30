"""Deadlines that reach the callee (feature ``deadline``).

``peer.call(..., deadline=s)`` sends the remaining budget in the call frame;
the callee runs the capability under a cancel scope that ends then and
answers ``"deadline exceeded"``; calls made from inside inherit what is left.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import astral
from astral._websocket import open_websocket
from astral.testing import connected_pair, memory_transport_pair
from tests.helpers import BUDGET_ROUNDING, running_principal, token


class Watch:
    """What a capability saw of its deadline, and how it ended."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []
        self.started = anyio.Event()
        self.cancelled = anyio.Event()
        self.cancelled_at = 0.0

    async def forever(self, _: Any) -> None:
        self.remaining.append(astral.current_call().time_remaining())
        self.started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled_at = anyio.current_time()
            self.cancelled.set()
            raise


async def test_the_callee_is_cancelled_at_the_callers_deadline() -> None:
    watch = Watch()
    async with connected_pair({"forever": watch.forever}, {}) as (_, b):
        start = anyio.current_time()
        with pytest.raises(astral.CallTimeout, match="call forever missed its deadline"):
            await b.call("forever", None, deadline=0.3)
        await watch.cancelled.wait()
    [remaining] = watch.remaining
    assert remaining is not None
    assert 0 < remaining <= 0.3 + BUDGET_ROUNDING
    assert watch.cancelled_at - start >= 0.3 - 0.01


async def test_the_callee_stops_by_itself_and_sends_one_terminal_frame() -> None:
    """A hand-written caller that never cancels: the callee's own scope ends the call."""
    watch = Watch()
    mine, theirs = memory_transport_pair()
    async with mine, theirs, astral.Peer(theirs, capabilities={"forever": watch.forever}):
        await mine.send('{"type":"call","id":"1","capability":"forever","deadline":100}')
        start = anyio.current_time()
        answer = json.loads(await mine.receive())
        assert anyio.current_time() - start >= 0.1 - 0.01
        assert answer == {
            "type": "result",
            "id": "1",
            "error": "deadline exceeded",
            "code": "deadline_exceeded",
        }
        assert watch.cancelled.is_set()
        # A late cancel changes nothing: no second terminal frame.
        await mine.send('{"type":"cancel","id":"1"}')
        await mine.send('{"type":"call","id":"2","capability":"forever","deadline":0}')
        assert json.loads(await mine.receive())["id"] == "2"
        # Bounded proof that nothing more comes (in memory), not a wait for it.
        with anyio.move_on_after(0.05):
            extra = await mine.receive()
            pytest.fail(f"a second frame was sent: {extra}")


async def test_a_malformed_deadline_refuses_the_call() -> None:
    mine, theirs = memory_transport_pair()
    async with mine, theirs, astral.Peer(theirs, capabilities={"f": Watch().forever}):
        for bad in ('"1"', "-1", "1.5", "true", "9007199254740992"):
            await mine.send(f'{{"type":"call","id":"x","capability":"f","deadline":{bad}}}')
            answer = json.loads(await mine.receive())
            assert answer["id"] == "x"
            assert "deadline" in answer["error"]


async def test_a_capability_that_finishes_in_time_is_unaffected() -> None:
    async def quick(x: int) -> dict[str, Any]:
        call = astral.current_call()
        return {"x": x, "capability": call.capability, "has_deadline": call.deadline is not None}

    async with connected_pair({"quick": quick}, {}) as (_, b):
        assert await b.call("quick", 1, deadline=5) == {
            "x": 1,
            "capability": "quick",
            "has_deadline": True,
        }
        assert await b.call("quick", 2) == {"x": 2, "capability": "quick", "has_deadline": False}
        # Nothing left armed: the timer has no deadline to wait for.
        assert len(b._until) == 0


async def test_without_the_feature_the_field_is_not_sent_but_the_caller_stops() -> None:
    watch = Watch()
    async with connected_pair({"forever": watch.forever}, {}, features=None) as (_, b):
        with pytest.raises(astral.CallTimeout):
            await b.call("forever", None, deadline=0.2)
        # The callee learns nothing of the deadline, but is told to stop.
        await watch.cancelled.wait()
    assert watch.remaining == [None]


async def test_a_deadline_replaces_the_default_first_frame_timeout() -> None:
    async def slow(_: Any) -> str:
        await anyio.sleep(0.3)  # a capability slower than the 0.1 s timeout: what is tested
        return "done"

    async with connected_pair({"slow": slow}, {}, timeout=0.1) as (_, b):
        with pytest.raises(astral.CallTimeout, match="timed out"):
            await b.call("slow")
        assert await b.call("slow", deadline=5) == "done"
        with pytest.raises(astral.CallTimeout, match="timed out"):
            await b.call("slow", deadline=5, timeout=0.1)


async def test_a_deadline_covers_a_whole_stream() -> None:
    async def ticks(_: Any) -> Any:
        i = 0
        while True:
            yield i
            i += 1
            await anyio.sleep(0.02)  # a steady producer that outlives the deadline

    async with connected_pair({"ticks": ticks}, {}) as (_, b):
        got: list[int] = []
        with pytest.raises(astral.CallTimeout):
            async with b.stream("ticks", deadline=0.3) as items:
                async for item in items:
                    got.append(item)  # noqa: PERF401 - kept when the stream fails
        assert len(got) > 1


@pytest.mark.parametrize("bad", [0, -1, float("nan")])
async def test_a_deadline_must_be_positive(bad: float) -> None:
    async with connected_pair({}, {}) as (_, b):
        with pytest.raises(
            ValueError, match=r"^deadline must be a positive number of seconds, or None$"
        ):
            await b.call("x", deadline=bad)
        assert b._state.outbound == {}


async def test_calls_made_inside_inherit_the_remaining_budget() -> None:
    watch = Watch()
    seen: list[float | None] = []

    async def relay(_: Any) -> None:
        seen.append(astral.current_call().time_remaining())
        # A later deadline of its own does not extend the caller's.
        await astral.current_peer().call("forever", None, deadline=60)

    async with connected_pair({"relay": relay}, {"forever": watch.forever}) as (_, b):
        with pytest.raises(astral.CallTimeout):
            # A budget the relay's own inner call can start within on a busy machine:
            # the inner call must reach "forever" before the deadline passes.
            await b.call("relay", None, deadline=1.0)
        await watch.cancelled.wait()
    [outer] = seen
    [inner] = watch.remaining
    assert outer is not None
    assert inner is not None
    assert inner <= outer + BUDGET_ROUNDING  # no later than the relay's own deadline
    assert outer <= 1.0 + BUDGET_ROUNDING


async def test_a_call_made_after_the_inherited_deadline_fails_at_once() -> None:
    outcome: list[BaseException] = []
    sent = anyio.Event()

    async def late(_: Any) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.15)  # time passes, past the deadline
            try:
                await astral.current_peer().call("anything")
            except astral.CallTimeout as exc:
                outcome.append(exc)
            sent.set()

    async with connected_pair({"late": late}, {}) as (a, b):
        with pytest.raises(astral.CallTimeout):
            await b.call("late", deadline=0.1)
        await sent.wait()
        # Never sent: nothing registered, and b never saw a call.
        assert a._state.outbound == {}
        assert b._state.inbound == {}
    assert [str(exc) for exc in outcome] == ["call anything missed its deadline"]


async def test_current_call_outside_a_capability_raises() -> None:
    with pytest.raises(RuntimeError, match="outside a capability"):
        astral.current_call()


async def test_middleware_sees_a_call_ended_by_its_deadline() -> None:
    ended: dict[str, astral.CallInfo] = {}
    inbound_done = anyio.Event()

    @asynccontextmanager
    async def observe(info: astral.CallInfo) -> AsyncIterator[None]:
        try:
            yield
        finally:
            ended[info.direction] = info
            if info.direction == "inbound":
                inbound_done.set()

    watch = Watch()
    async with connected_pair({"forever": watch.forever}, {}, middleware=[observe]) as (_, b):
        with pytest.raises(astral.CallTimeout):
            await b.call("forever", None, deadline=0.2)
        await inbound_done.wait()
    assert ended["outbound"].outcome == "error"
    assert isinstance(ended["outbound"].error, astral.CallTimeout)
    # The callee ended it itself, or was told to stop first: either way, once.
    assert ended["inbound"].outcome in ("error", "cancelled")
    assert watch.cancelled.is_set()


# --- two hops over real sockets: A calls B calls C --------------------------------------


async def test_a_deadline_reaches_through_two_hops() -> None:
    """A (a worker) calls B (the principal), whose capability calls C (another worker)."""
    watch = Watch()

    async def relay(_: Any) -> Any:
        c = await principal.registry.wait_for("C")
        return await c.call("forever")  # no deadline of its own: A's is inherited

    async with running_principal(capabilities={"relay": relay}) as principal:
        async with (
            astral.connect(
                principal.url, token=token("C"), capabilities={"forever": watch.forever}
            ),
            astral.connect(principal.url, token=token("A")) as a,
        ):
            await principal.registry.wait_for("C")
            start = anyio.current_time()
            with pytest.raises(astral.CallTimeout):
                await a.call("relay", None, deadline=0.5)
            failed_at = anyio.current_time()
            await watch.cancelled.wait()
    [remaining] = watch.remaining
    assert remaining is not None
    assert 0 < remaining <= 0.5 + BUDGET_ROUNDING
    assert failed_at - start >= 0.5 - 0.01
    # C stopped at A's deadline: its budget ran out as A's did, give or take
    # the time its call took to get there.
    assert watch.cancelled_at >= start + 0.5 - 0.01


async def test_two_hops_stop_by_the_deadline_alone_when_nobody_cancels() -> None:
    """A hand-written A sends a deadline and never cancels: B and C stop by themselves."""
    watch = Watch()
    relay_ended = anyio.Event()

    async def relay(_: Any) -> Any:
        try:
            c = await principal.registry.wait_for("C")
            return await c.call("forever")
        finally:
            relay_ended.set()

    async with running_principal(capabilities={"relay": relay}) as principal:
        async with astral.connect(
            principal.url, token=token("C"), capabilities={"forever": watch.forever}
        ):
            await principal.registry.wait_for("C")
            headers = [("Authorization", f"Bearer {token('A')}"), ("Astral-Features", "deadline")]
            async with open_websocket(principal.url, headers=headers) as a:
                start = anyio.current_time()
                await a.send('{"type":"call","id":"1","capability":"relay","deadline":300}')
                answer = json.loads(await a.receive())
                await watch.cancelled.wait()
                await relay_ended.wait()
    assert answer == {
        "type": "result",
        "id": "1",
        "error": "deadline exceeded",
        "code": "deadline_exceeded",
    }
    [remaining] = watch.remaining
    assert remaining is not None
    assert remaining <= 0.3 + BUDGET_ROUNDING
    assert watch.cancelled_at - start >= 0.3 - 0.01


def test_the_deadline_field_on_the_wire() -> None:
    call = astral.Call("1", "f", None, deadline=2500)
    text = astral.encode(call)
    assert text == '{"type":"call","id":"1","capability":"f","deadline":2500}'
    assert astral.decode(text) == call
    assert astral.decode('{"type":"call","id":"1","capability":"f","deadline":0}').deadline == 0


# --- a capability whose own call fails with CallTimeout ---------------------------------


async def test_a_capability_failing_as_its_inherited_deadline_passed_is_deadline_exceeded() -> None:
    """Its call fails at once (the budget it inherited is spent): the caller is told
    "deadline exceeded", as if the capability had been stopped, not that it failed."""
    raised: list[BaseException] = []

    async def late(_: Any) -> None:
        with anyio.CancelScope(shield=True):
            # The deadline is what is under test: wait it out, not a guess.
            while remaining := astral.current_call().time_remaining():
                await anyio.sleep(remaining)
            try:
                await astral.current_peer().call("anything")
            except astral.CallTimeout as exc:
                raised.append(exc)
                raise

    mine, theirs = memory_transport_pair()
    async with mine, theirs, astral.Peer(theirs, capabilities={"late": late}):
        await mine.send('{"type":"call","id":"7","capability":"late","deadline":50}')
        answer = json.loads(await mine.receive())
    assert [str(exc) for exc in raised] == ["call anything missed its deadline"]
    assert answer == {
        "type": "result",
        "id": "7",
        "error": "deadline exceeded",
        "code": "deadline_exceeded",
    }


@pytest.mark.parametrize(
    ("inner", "deadline", "error"),
    [
        # The caller's deadline is far off: the capability's own deadline is its failure.
        ({"deadline": 0.05}, ',"deadline":60000', "call slow missed its deadline"),
        # No deadline from the caller: the capability's own timeout is its failure.
        ({"timeout": 0.05}, "", "call slow timed out"),
    ],
    ids=["own-shorter-deadline", "own-timeout-without-deadline"],
)
async def test_a_capability_failing_on_its_own_deadline_or_timeout_is_a_failure(
    inner: dict[str, float], deadline: str, error: str
) -> None:
    mine, theirs = memory_transport_pair()

    async def impatient(_: Any) -> None:
        await astral.current_peer().call("slow", **inner)

    async with mine, theirs, astral.Peer(theirs, capabilities={"impatient": impatient}):
        await mine.send('{"type":"call","id":"7","capability":"impatient"' + deadline + "}")
        call = json.loads(await mine.receive())
        assert (call["type"], call["capability"]) == ("call", "slow")
        # Never answered: the capability's own deadline or timeout ends its call.
        answer = json.loads(await mine.receive())
        if answer["type"] == "cancel":
            answer = json.loads(await mine.receive())
    assert answer == {"type": "result", "id": "7", "error": error, "code": "internal"}


async def test_the_budget_on_the_wire_is_rounded_up_to_a_whole_millisecond() -> None:
    mine, theirs = memory_transport_pair()

    async def call() -> None:
        with pytest.raises(astral.CallTimeout, match=r"^call f missed its deadline$"):
            await peer.call("f", None, deadline=0.0105)

    async with (
        mine,
        theirs,
        astral.Peer(theirs, features=["deadline"]) as peer,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(call)
        frame = json.loads(await mine.receive())
    # 10.5 ms left: 11 is sent, so the callee never stops before the caller.
    assert (frame["type"], frame["deadline"]) == ("call", 11)


async def test_a_deadline_exceeded_answer_names_the_capability_called() -> None:
    # The callee stopped at the deadline before this peer's own timer fired:
    # the caller's CallTimeout names the capability, as its own timer would.
    mine, theirs = memory_transport_pair()

    async def call() -> None:
        with pytest.raises(astral.CallTimeout) as info:
            await peer.call("slow", None, timeout=None)
        assert str(info.value) == "call slow missed its deadline"

    async with mine, theirs, astral.Peer(theirs) as peer, anyio.create_task_group() as tg:
        with anyio.fail_after(5):
            tg.start_soon(call)
            frame = json.loads(await mine.receive())
            assert (frame["type"], frame["capability"]) == ("call", "slow")
            await mine.send(
                json.dumps(
                    {
                        "type": "result",
                        "id": frame["id"],
                        "error": "deadline exceeded",
                        "code": "deadline_exceeded",
                    }
                )
            )
