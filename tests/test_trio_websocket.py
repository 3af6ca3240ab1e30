"""astral.trio_websocket: astral over trio-websocket connections, either side (trio only)."""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import trio
import trio_websocket

import astral
from astral._auth import verify_token
from astral.trio_websocket import TrioWebSocketTransport, _translate, open_peer

from .helpers import SECRET, count, echo, token, whoami

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import anyio.abc

VERIFIER = astral.JWTVerifier(SECRET, algorithms=["HS256"])

trio_only = pytest.mark.parametrize("anyio_backend", ["trio"])


async def bash(command: str) -> str:
    return f"ran {command}"


@asynccontextmanager
async def open_websocket_url(url: str, **options: Any) -> AsyncIterator[Any]:
    """trio_websocket.open_websocket_url, minus a socket leak.

    trio-websocket 0.12.2 never closes a client's socket when the server
    closes the connection first (the reader stops at EOF, and ``aclose`` then
    has nothing to do): the socket is left to the garbage collector and its
    ResourceWarning. Close it here.
    """
    ws = None
    try:
        async with trio_websocket.open_websocket_url(url, **options) as ws:
            yield ws
    finally:
        if ws is not None:
            with trio.CancelScope(shield=True):
                await ws._stream.aclose()


# --- a trio-websocket principal, astral.connect workers ------------------------------


def token_of(request: trio_websocket.WebSocketRequest) -> str | None:
    for name, raw in request.headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = raw.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
    for key, value in parse_qsl(urlsplit(request.path).query):
        if key == "token":
            return value
    return None


@dataclass
class TrioPrincipal:
    url: str
    peers: list[astral.Peer] = field(default_factory=list)
    connected: trio.Event = field(default_factory=trio.Event)
    sleepy_started: trio.Event = field(default_factory=trio.Event)
    handlers_done: list[trio.Event] = field(default_factory=list)
    refused: int = 0


@asynccontextmanager
async def trio_websocket_principal() -> AsyncIterator[TrioPrincipal]:
    principal = TrioPrincipal("")

    async def sleepy(_: Any) -> None:
        principal.sleepy_started.set()
        await trio.sleep_forever()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        done = trio.Event()
        principal.handlers_done.append(done)
        try:
            try:
                claims = await verify_token(VERIFIER, token_of(request))
            except astral.AuthenticationError:
                principal.refused += 1
                await request.reject(
                    401,
                    extra_headers=[(b"WWW-Authenticate", b'Bearer realm="astral"')],
                    body=b"unauthorized\n",
                )
                return
            ws = await request.accept()
            async with open_peer(
                ws,
                capabilities={"echo": echo, "count": count, "whoami": whoami, "sleepy": sleepy},
                claims=claims,
            ) as peer:
                principal.peers.append(peer)
                principal.connected.set()
                await peer.wait_closed()
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        )
        principal.url = f"ws://127.0.0.1:{server.port}/astral"
        yield principal
        nursery.cancel_scope.cancel()


@trio_only
async def test_trio_websocket_principal_with_an_astral_worker() -> None:
    async with (
        trio_websocket_principal() as principal,
        astral.connect(principal.url, token=token(), capabilities={"bash": bash}) as worker,
    ):
        assert await worker.call("echo", {"a": [1, None]}) == {"a": [1, None]}
        assert await worker.call("whoami") == "worker-1"
        await principal.connected.wait()
        (principal_side,) = principal.peers
        assert principal_side.claims["sub"] == "worker-1"
        assert await principal_side.call("bash", "uptime") == "ran uptime"
        async with worker.stream("count", 4) as items:
            assert [item async for item in items] == [0, 1, 2, 3]

        async def both(i: int) -> None:
            assert await worker.call("echo", i) == i
            assert await principal_side.call("bash", str(i)) == f"ran {i}"

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(both, i)


@trio_only
async def test_trio_websocket_principal_rejects_with_401() -> None:
    async with trio_websocket_principal() as principal:
        for bad in (None, "forged", token(expires_in=-3600)):
            with pytest.raises(astral.Unauthorized):
                async with astral.connect(principal.url, token=bad):
                    pytest.fail("connected with a refused token")
        assert principal.refused == 3
        assert principal.peers == []


@trio_only
async def test_closing_either_side_fails_the_other_sides_pending_calls() -> None:
    worker_started = trio.Event()

    async def hang(_: Any) -> None:
        worker_started.set()
        await trio.sleep_forever()

    async with trio_websocket_principal() as principal:
        # The worker leaves: the principal's pending call fails.
        errors: list[astral.ConnectionClosed] = []
        async with trio.open_nursery() as nursery:
            async with astral.connect(principal.url, token=token(), capabilities={"hang": hang}):
                await principal.connected.wait()
                principal_side = principal.peers[0]

                async def pending() -> None:
                    with pytest.raises(astral.ConnectionClosed) as info:
                        await principal_side.call("hang", timeout=None)
                    errors.append(info.value)

                nursery.start_soon(pending)
                await worker_started.wait()
        assert len(errors) == 1
        assert errors[0].code == 1000
        await principal.handlers_done[0].wait()

        # The principal leaves: the worker's pending call fails.
        errors.clear()
        async with astral.connect(principal.url, token=token()) as worker:
            async with trio.open_nursery() as nursery:

                async def pending_on_worker() -> None:
                    with pytest.raises(astral.ConnectionClosed) as info:
                        await worker.call("sleepy", timeout=None)
                    errors.append(info.value)

                nursery.start_soon(pending_on_worker)
                await principal.sleepy_started.wait()
                await principal.peers[1].aclose()
        assert [error.code for error in errors] == [1000]


@trio_only
async def test_binary_messages_are_utf8_and_invalid_utf8_closes_with_1007() -> None:
    async with (
        trio_websocket_principal() as principal,
        open_websocket_url(principal.url + f"?token={token()}") as ws,
    ):
        await ws.send_message(b'{"type":"call","id":"1","capability":"echo","input":"\xc3\xa9"}')
        assert await ws.get_message() == '{"type":"result","id":"1","output":"\u00e9"}'
        await ws.send_message(b"\xff")
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == 1007
        await principal.handlers_done[0].wait()


# --- a trio-websocket worker against astral.serve ------------------------------------


@dataclass
class Served:
    port: int
    registry: Any
    started: trio.Event = field(default_factory=trio.Event)
    finally_ran: trio.Event = field(default_factory=trio.Event)
    stop: Callable[[], None] = lambda: None


@asynccontextmanager
async def astral_principal() -> AsyncIterator[Served]:
    served = Served(0, astral.PeerRegistry())

    async def sleepy(_: Any) -> None:
        served.started.set()
        try:
            await trio.sleep_forever()
        finally:
            served.finally_ran.set()

    async def run_server(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        # A scope of its own, so that stopping the server cancels nothing else.
        with trio.CancelScope() as scope:
            served.stop = scope.cancel
            await astral.serve(
                verifier=VERIFIER,
                capabilities={"echo": echo, "count": count, "whoami": whoami, "sleepy": sleepy},
                registry=served.registry,
                grace=0,  # stopping cancels at once (tests/test_drain.py drains)
                task_status=task_status,
            )

    async with trio.open_nursery() as nursery:
        served.port = await nursery.start(run_server)
        yield served
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def trio_websocket_worker(
    url: str, *, in_query: bool, subject: str = "tw"
) -> AsyncIterator[astral.Peer]:
    headers: list[tuple[bytes, bytes]] = []
    if in_query:
        url += f"?token={token(subject)}"
    else:
        headers.append((b"Authorization", f"Bearer {token(subject)}".encode()))
    async with (
        open_websocket_url(url, extra_headers=headers) as ws,
        open_peer(ws, capabilities={"bash": bash}) as peer,
    ):
        yield peer


@trio_only
@pytest.mark.parametrize("in_query", [False, True], ids=["bearer", "query"])
async def test_trio_websocket_worker_against_astral_serve(in_query: bool) -> None:
    async with astral_principal() as served:
        url = f"ws://127.0.0.1:{served.port}/"
        async with trio_websocket_worker(url, in_query=in_query) as worker:
            assert await worker.call("echo", [1, 2]) == [1, 2]
            assert await worker.call("whoami") == "tw"
            principal_side = await served.registry.wait_for("tw")
            assert await principal_side.call("bash", "ls") == "ran ls"
            async with worker.stream("count", 3) as items:
                assert [item async for item in items] == [0, 1, 2]

            # Cancellation crosses the wire: the principal's capability is cancelled.
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def call_sleepy() -> None:
                        await worker.call("sleepy", timeout=None)

                    nursery.start_soon(call_sleepy)
                    await served.started.wait()
                    scope.cancel()
            assert scope.cancelled_caught
            await served.finally_ran.wait()
            assert await worker.call("echo", "still open") == "still open"


@trio_only
async def test_server_shutdown_fails_the_trio_websocket_workers_calls() -> None:
    async with astral_principal() as served:
        url = f"ws://127.0.0.1:{served.port}/"
        async with trio_websocket_worker(url, in_query=False) as worker:

            async def stop_once_running() -> None:
                await served.started.wait()
                served.stop()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_once_running)
                with pytest.raises(astral.ConnectionClosed) as info:
                    await worker.call("sleepy", timeout=None)
            assert info.value.code == 1001
            await served.finally_ran.wait()
            with pytest.raises(astral.ConnectionClosed):
                await worker.call("echo", 1)


# --- the transport on its own ----------------------------------------------------------


def test_translate_keeps_the_close_code_and_reason() -> None:
    closed = _translate(
        trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1001, "going away"))
    )
    assert (closed.code, closed.reason) == (1001, "going away")
    unnamed = _translate(trio_websocket.ConnectionClosed(trio_websocket.CloseReason(4000, None)))
    assert (unnamed.code, unnamed.reason) == (4000, "PRIVATE_RESERVED")
    unknown = _translate(trio_websocket.ConnectionClosed(None))
    assert (unknown.code, unknown.reason) == (None, "connection closed")


@trio_only
async def test_transport_errors_chain_the_trio_websocket_original() -> None:
    async with (
        trio_websocket_principal() as principal,
        open_websocket_url(principal.url + f"?token={token()}") as ws,
    ):
        transport = TrioWebSocketTransport(ws)
        assert transport.websocket is ws
        assert isinstance(transport, astral.Transport)
        await transport.aclose()
        await transport.aclose()  # idempotent
        with pytest.raises(astral.ConnectionClosed) as sent:
            await transport.send("{}")
        assert isinstance(sent.value.__cause__, trio_websocket.ConnectionClosed)
        with pytest.raises(astral.ConnectionClosed) as received:
            await transport.receive()
        assert isinstance(received.value.__cause__, trio_websocket.ConnectionClosed)
        assert received.value.code == 1000
