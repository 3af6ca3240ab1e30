"""Bare echo over a WebSocket, no RPC: the limit an RPC layer can approach.

The server echoes each text message; a message ``S<n>`` asks it to send
``n`` small messages back instead (workload C). In workload F the server
sends the payload to each worker and waits for the echo.

The client resolves replies in order through one reader task, the least an
RPC client needs to have several calls in flight; so the reference includes
that hop, and the ratio of an RPC system to it is the cost of the RPC layer.

Any transport with ``send(str)`` and ``receive() -> str`` plugs in: astral's
own WebSocket layer (``wsproto-echo``), the naive wsproto echo and the
``websockets`` library.
"""

# Libraries are imported lazily, only by the processes that use them.
# ruff: noqa: PLC0415

from __future__ import annotations

import functools
import importlib.util
from collections import deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import anyio

from ..common import PAYLOAD_TEXT, ServerApp

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable


class TextTransport(Protocol):
    async def send(self, message: str, /) -> None: ...
    async def receive(self) -> str: ...


# -- server side ------------------------------------------------------------


async def echo_server(conn: TextTransport, app: ServerApp) -> None:
    """Serve one connection until it closes (the caller catches that)."""
    if app.mode == "F":

        async def call() -> str:
            await conn.send(PAYLOAD_TEXT)
            return await conn.receive()

        await app.on_connect(call)
        while True:  # stay open until the worker leaves
            await conn.receive()
    while True:
        message = await conn.receive()
        if message[0] == "S":
            for i in range(int(message[1:])):
                await conn.send(str(i))
        else:
            await conn.send(message)


# -- client side ------------------------------------------------------------


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply = ""


class _Items:
    """The next ``n`` messages of a stream, handed over by the reader in batches.

    The reader appends to a deque and wakes the consumer only when it is
    waiting, so the consumer takes every item already read without a turn of
    the event loop per item (a memory object stream would cost one
    checkpoint per item, which made the harness client the bottleneck of C
    for every system).
    """

    def __init__(self, n: int) -> None:
        self.queue: deque[str] = deque()
        self.waiting: anyio.Event | None = None
        self._left = n

    def put(self, message: str) -> None:
        self.queue.append(message)
        if self.waiting is not None:
            self.waiting.set()
            self.waiting = None

    def __aiter__(self) -> _Items:
        return self

    async def __anext__(self) -> str:
        if self._left == 0:
            raise StopAsyncIteration
        while not self.queue:
            self.waiting = anyio.Event()
            await self.waiting.wait()
        self._left -= 1
        return self.queue.popleft()


class EchoConn:
    """Client side: calls answered in order, streams routed to their consumer."""

    def __init__(self, transport: TextTransport) -> None:
        self._transport = transport
        self._waiters: deque[_Waiter] = deque()
        self._sink: _Items | None = None

    async def read(self) -> None:
        receive = self._transport.receive
        while True:
            message = await receive()
            if self._sink is not None:
                self._sink.put(message)
            elif self._waiters:
                waiter = self._waiters.popleft()
                waiter.reply = message
                waiter.event.set()
            # else: the tail of a stream abandoned at its deadline

    async def call(self) -> str:
        waiter = _Waiter()
        self._waiters.append(waiter)
        await self._transport.send(PAYLOAD_TEXT)
        await waiter.event.wait()
        return waiter.reply

    @asynccontextmanager
    async def stream(self, n: int) -> AsyncIterator[AsyncIterator[str]]:
        self._sink = items = _Items(n)
        try:
            await self._transport.send(f"S{n}")
            yield items
        finally:
            self._sink = None

    async def sleepy(self, i: int) -> None:
        raise NotImplementedError("an echo has no cancellation")


async def _echo_back(transport: TextTransport) -> None:
    while True:
        await transport.send(await transport.receive())


@asynccontextmanager
async def echo_client(transport: TextTransport, *, worker: bool) -> AsyncIterator[EchoConn | None]:
    """Run the client side of an open transport: a caller, or an F worker."""
    async with anyio.create_task_group() as tg:
        if worker:
            tg.start_soon(_echo_back, transport)
            yield None
        else:
            conn = EchoConn(transport)
            tg.start_soon(conn.read)
            yield conn
        tg.cancel_scope.cancel()


async def guarded(
    closed: tuple[type[BaseException], ...], handler: Callable[..., Awaitable[None]], *args: Any
) -> None:
    """Run a connection handler; a closed connection is its normal end."""
    try:
        await handler(*args)
    except closed:
        pass


# -- systems ----------------------------------------------------------------


class WsprotoEcho:
    """Echo over astral's own WebSocket layer (``astral._websocket``)."""

    name: ClassVar[str] = "wsproto-echo"
    backends: ClassVar[tuple[str, ...]] = ("asyncio", "trio")
    workloads: ClassVar[str] = "ABCDF"

    def unavailable(self) -> str | None:
        try:
            from astral._websocket import open_websocket, serve_websocket  # noqa: F401
        except ImportError as exc:
            return f"astral._websocket not available yet ({exc})"
        return None

    def _closed(self) -> tuple[type[BaseException], ...]:
        from astral._transport import CLOSED_ERRORS

        return CLOSED_ERRORS

    async def serve(self, app: ServerApp, *, task_status: Any) -> None:
        from astral._websocket import serve_websocket

        closed = self._closed()

        async def handler(conn: TextTransport) -> None:
            await guarded(closed, echo_server, conn, app)

        async with anyio.create_task_group() as tg:
            # F holds 10,000 workers: above the default caps (1,024 connections,
            # 128 in the handshake), as for astral's own systems.
            serve = functools.partial(
                serve_websocket,
                handler,
                "127.0.0.1",
                0,
                max_connections=20_000,
                max_handshakes=1_024,
            )
            port = await tg.start(serve)
            task_status.started(port)

    @asynccontextmanager
    async def connect(
        self, port: int, *, worker: bool = False, index: int = 0
    ) -> AsyncIterator[EchoConn | None]:
        from astral._websocket import open_websocket

        async with (
            open_websocket(f"ws://127.0.0.1:{port}/") as ws,
            echo_client(ws, worker=worker) as conn,
        ):
            yield conn


class _WebsocketsTransport:
    """``websockets`` names it ``recv``; compression is off for every system."""

    def __init__(self, ws: Any) -> None:
        self.send = ws.send
        self.receive = ws.recv


class WebsocketsEcho:
    """Echo over the ``websockets`` library: its asyncio and its trio flavours."""

    name: ClassVar[str] = "websockets-echo"
    backends: ClassVar[tuple[str, ...]] = ("asyncio", "trio")
    workloads: ClassVar[str] = "ABCDF"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("websockets") is None:
            return "websockets is not installed"
        return None

    def backend_unavailable(self, backend: str) -> str | None:
        if backend == "trio" and importlib.util.find_spec("websockets.trio") is None:
            return "this websockets has no trio implementation (websockets.trio)"
        return None

    async def serve(self, app: ServerApp, *, task_status: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        async def handler(ws: Any) -> None:
            await guarded((ConnectionClosed,), echo_server, _WebsocketsTransport(ws), app)

        if _backend() == "trio":
            from websockets.trio.server import serve

            async with anyio.create_task_group() as tg:
                server = await tg.start(
                    functools.partial(serve, handler, 0, host="127.0.0.1", compression=None)
                )
                task_status.started(server.listeners[0].socket.getsockname()[1])
            return

        from websockets.asyncio.server import serve as aserve

        async with aserve(handler, "127.0.0.1", 0, compression=None) as server:
            task_status.started(next(iter(server.sockets)).getsockname()[1])
            await anyio.sleep_forever()

    @asynccontextmanager
    async def connect(
        self, port: int, *, worker: bool = False, index: int = 0
    ) -> AsyncIterator[EchoConn | None]:
        if _backend() == "trio":
            from websockets.trio.client import connect
        else:
            from websockets.asyncio.client import connect  # type: ignore[assignment]

        async with (
            connect(f"ws://127.0.0.1:{port}/", compression=None) as ws,
            echo_client(_WebsocketsTransport(ws), worker=worker) as conn,
        ):
            yield conn


def _backend() -> str:
    import sniffio

    return sniffio.current_async_library()
