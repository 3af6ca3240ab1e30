"""Graceful drain: Peer.drain, serve(grace=...) and astral.asgi.App on shutdown.

New calls are refused ("shutting down") while the calls in flight finish,
within the grace period; what is left then is cancelled and the connection
closes with 1001.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import astral
import astral.asgi
from astral._frames import Call, Result, decode, encode
from astral._protocol import SHUTTING_DOWN, PeerState, Reply, StartInbound
from astral.testing import connected_pair
from tests.helpers import SECRET, running_principal, token
from tests.test_asgi import PATH, SERVERS, VERIFIER, run
from tests.test_asgi import token as asgi_token


async def until_refused(peer: astral.Peer, capability: str, *args: Any, **kwargs: Any) -> str:
    """Call until the remote refuses: the drain has begun. Returns the refusal."""
    while True:
        try:
            await peer.call(capability, *args, **kwargs)
        except astral.RemoteError as exc:
            return exc.message


def test_a_draining_state_refuses_new_calls_and_keeps_running_ones() -> None:
    async def echo(value: Any) -> Any:
        return value

    state: PeerState[object, object] = PeerState({"echo": echo}, object, max_inbound_calls=5)
    running = state.receive(encode(Call("1", "echo", 1)))
    assert isinstance(running, StartInbound)
    state.draining = True
    refused = state.receive(encode(Call("2", "echo", 2)))
    assert isinstance(refused, Reply)
    assert decode(refused.text) == Result("2", error=SHUTTING_DOWN)
    assert list(state.inbound) == ["1"]  # the running call goes on


class Gate:
    """A capability that runs until the test opens the gate."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.open = anyio.Event()
        self.cancelled = anyio.Event()

    async def __call__(self, value: Any) -> Any:
        self.started.set()
        try:
            await self.open.wait()
        except BaseException:
            self.cancelled.set()
            raise
        return value


async def test_drain_lets_calls_in_flight_finish_and_refuses_new_ones() -> None:
    gate = Gate()
    async with connected_pair({"gate": gate, "echo": gate}, {}) as (a, b):
        results: list[Any] = []

        async def in_flight() -> None:
            results.append(await b.call("gate", "done"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await gate.started.wait()
            drained = anyio.Event()

            async def drain() -> None:
                await a.drain(10)
                drained.set()

            tg.start_soon(drain)
            # b's new calls are refused by a; a's own new calls too.
            with pytest.raises(astral.RemoteError, match=r"^shutting down$"):
                await b.call("echo", 1)
            with pytest.raises(astral.ConnectionClosed) as refused:
                await a.call("anything")
            assert (str(refused.value), refused.value.code) == ("shutting down", None)
            assert not drained.is_set()
            gate.open.set()
        assert results == ["done"]
        closed = await a.wait_closed()
        assert (closed.code, closed.reason) == (1001, "going away")
        assert not gate.cancelled.is_set()


async def test_drain_waits_for_the_calls_this_peer_made_too() -> None:
    gate = Gate()
    async with connected_pair({}, {"gate": gate}) as (a, b):
        results: list[Any] = []

        async def in_flight() -> None:
            results.append(await a.call("gate", "answer"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await gate.started.wait()
            tg.start_soon(a.drain, 10)
            # a's drain leaves b free to answer: only new calls are refused.
            with pytest.raises(astral.RemoteError, match="shutting down"):
                await b.call("anything")
            gate.open.set()
        assert results == ["answer"]
        assert a.closed


async def test_drain_ends_when_this_peer_gives_up_its_last_call() -> None:
    gate = Gate()
    async with connected_pair({}, {"gate": gate}) as (a, b):
        caller = anyio.CancelScope()
        drained = anyio.Event()

        async def in_flight() -> None:
            with caller:
                await a.call("gate", timeout=None)

        async def drain() -> None:
            await a.drain(60)
            drained.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await gate.started.wait()
            tg.start_soon(drain)
            with pytest.raises(astral.RemoteError, match="shutting down"):
                await b.call("anything")  # the drain has begun
            caller.cancel()  # the only call left in flight is given up
            with anyio.fail_after(5):  # not the 60 s grace
                await drained.wait()
        await gate.cancelled.wait()
        assert (await a.wait_closed()).code == 1001


async def test_drain_cancels_what_is_left_after_the_grace_period() -> None:
    gate = Gate()
    async with connected_pair({"gate": gate}, {}) as (a, b):
        failures: list[BaseException] = []

        async def in_flight() -> None:
            with pytest.raises(astral.ConnectionClosed) as info:
                await b.call("gate")
            failures.append(info.value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await gate.started.wait()
            before = anyio.current_time()
            await a.drain(0.2, code=4000, reason="redeploy")
            assert anyio.current_time() - before >= 0.2
        await gate.cancelled.wait()
        assert len(failures) == 1
        assert (await a.wait_closed()).code == 4000


async def test_drain_without_calls_closes_at_once_and_validates() -> None:
    async with connected_pair() as (a, _):
        with pytest.raises(ValueError, match=r"^grace must not be negative$"):
            await a.drain(-1)
        with pytest.raises(ValueError, match="close code"):
            await a.drain(1, code=1011)
        with anyio.fail_after(1):
            await a.drain(60)
        assert a.closed
        await a.drain(60)  # closed already: returns


async def test_stopping_serve_drains_then_closes_with_1001() -> None:
    gate = Gate()
    async with running_principal(capabilities={"gate": gate}, grace=10) as principal:
        async with astral.connect(principal.url, token=token()) as worker:
            results: list[Any] = []

            async def in_flight() -> None:
                results.append(await worker.call("gate", "finished", timeout=None))

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_flight)
                await gate.started.wait()
                principal.stop()
                # Until the drain begins the call is served; then it is refused.
                assert await until_refused(worker, "echo", 1) == "shutting down"
                # The listener is closed: no new worker gets in meanwhile.
                with pytest.raises(astral.ConnectError) as refused:
                    async with astral.connect(principal.url, token=token("late"), open_timeout=5):
                        pass
                assert not isinstance(refused.value, astral.ConnectTimeout)
                gate.open.set()
            assert results == ["finished"]
            closed = await worker.wait_closed()
            assert (closed.code, closed.reason) == (1001, "server shutting down")
    assert not gate.cancelled.is_set()


async def test_stopping_serve_cancels_calls_still_running_after_grace() -> None:
    gate = Gate()
    async with running_principal(capabilities={"gate": gate}, grace=0.2) as principal:
        async with astral.connect(principal.url, token=token()) as worker:
            failures: list[astral.ConnectionClosed] = []

            async def in_flight() -> None:
                with pytest.raises(astral.ConnectionClosed) as info:
                    await worker.call("gate", timeout=None)
                failures.append(info.value)

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_flight)
                await gate.started.wait()
                principal.stop()
            assert failures[0].code == 1001
            await gate.cancelled.wait()


async def test_serve_refuses_a_negative_grace() -> None:
    with pytest.raises(ValueError, match=r"^grace must not be negative$"):
        await astral.serve(verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]), grace=-1)
    with pytest.raises(ValueError, match=r"^grace must not be negative$"):
        astral.asgi.App(verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]), grace=-1)


@pytest.mark.parametrize(("anyio_backend", "server"), [SERVERS[0], SERVERS[3]])
async def test_asgi_app_drains_on_lifespan_shutdown(anyio_backend: str, server: str) -> None:
    gate = Gate()

    async def echo(value: Any) -> Any:
        return value

    app = astral.asgi.App(
        verifier=VERIFIER, capabilities={"gate": gate, "echo": echo}, path=PATH, grace=10
    )
    to_app, app_receives = anyio.create_memory_object_stream[dict[str, Any]](4)
    app_sends, from_app = anyio.create_memory_object_stream[dict[str, Any]](4)

    async def lifespan_receive() -> dict[str, Any]:
        return await app_receives.receive()

    async def lifespan_send(message: Any) -> None:
        await app_sends.send(message)

    async with (
        to_app,
        app_receives,
        app_sends,
        from_app,
        run(server, anyio_backend, app) as running,
        anyio.create_task_group() as outer,
    ):
        # The lifespan scope of the same App, driven by hand (servers send
        # lifespan.shutdown only once their WebSockets are gone).
        outer.start_soon(app, {"type": "lifespan"}, lifespan_receive, lifespan_send)
        await to_app.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"
        async with astral.connect(running.url + PATH, token=asgi_token()) as worker:
            results: list[Any] = []

            async def in_flight() -> None:
                results.append(await worker.call("gate", "kept", timeout=None))

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_flight)
                await gate.started.wait()
                await to_app.send({"type": "lifespan.shutdown"})
                # Until the drain begins the call is served; then it is refused.
                assert await until_refused(worker, "echo", 1) == "shutting down"
                gate.open.set()
            assert results == ["kept"]
            assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"
            closed = await worker.wait_closed()
            assert (closed.code, closed.reason) == (1001, "server shutting down")
        # Once drained, the app lets no new worker in.
        with pytest.raises(astral.HandshakeError) as refused:
            async with astral.connect(running.url + PATH, token=asgi_token()):
                pass
        assert refused.value.status == 503
