"""The reference: a lean echo on wsproto + AnyIO, sharing no code with astral.

Every ratio in the table is taken against this system, so it must not move
when astral's own layers do (``wsproto-echo`` runs on ``astral._websocket``,
and a slower WebSocket layer there would *improve* astral's ratios to it).
Nothing here imports astral.

What makes it lean, and what an RPC library could match:

- **Coalesced writes.** A sender appends its frame to one output buffer and
  returns; one writer task per connection sends everything buffered in one
  ``stream.send``. A sender waits only while the buffer is over a high-water
  mark, so memory stays bounded when the remote does not read.
- **One read, every event.** Each ``stream.receive`` is fed to wsproto and
  every message it completes is handed over before the next read.
- Pings are answered through the same buffer; nothing else is handled (no
  size limits, no timeouts): a reference, not a server to deploy.
"""

from __future__ import annotations

from collections import deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from anyio.abc import SocketAttribute, SocketStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)

from .echo import EchoConn, echo_client, echo_server, guarded
from .naive import CLOSED, handshake

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..common import ServerApp

#: Senders wait while more than this many bytes are buffered and unsent.
HIGH_WATER = 1 << 16
READ_SIZE = 1 << 16


class BareWebSocket:
    """Text messages over one wsproto connection, writes coalesced."""

    def __init__(self, stream: SocketStream, ws: WSConnection, pending: list[Event]) -> None:
        self._stream = stream
        self._ws = ws
        self._events: deque[Event] = deque(pending)
        self._parts: list[str] = []
        self._out = bytearray()
        self._ready = anyio.Event()  # set when there is something to write
        self._drained = anyio.Event()  # set when the buffer went out

    async def writer(self) -> None:
        """The one task that writes: everything buffered goes in one send."""
        while True:
            await self._ready.wait()
            self._ready = anyio.Event()
            data = bytes(self._out)
            self._out.clear()
            await self._stream.send(data)
            self._drained.set()
            self._drained = anyio.Event()

    async def _write(self, data: bytes) -> None:
        self._out += data
        self._ready.set()
        while len(self._out) > HIGH_WATER:
            await self._drained.wait()

    async def send(self, message: str) -> None:
        await self._write(self._ws.send(TextMessage(data=message)))

    async def receive(self) -> str:
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, TextMessage):
                    if event.message_finished and not self._parts:
                        return event.data
                    self._parts.append(event.data)
                    if event.message_finished:
                        message = "".join(self._parts)
                        self._parts.clear()
                        return message
                elif isinstance(event, Ping):
                    await self._write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise anyio.EndOfStream
            self._ws.receive_data(await self._stream.receive(READ_SIZE))
            self._events.extend(self._ws.events())


class BareWsprotoEcho:
    name: ClassVar[str] = "wsproto-bare"
    backends: ClassVar[tuple[str, ...]] = ("asyncio", "trio")
    workloads: ClassVar[str] = "ABCDF"

    def unavailable(self) -> str | None:
        return None

    async def serve(self, app: ServerApp, *, task_status: Any) -> None:
        async def handler(stream: SocketStream) -> None:
            async with stream:
                ws = WSConnection(ConnectionType.SERVER)
                try:
                    pending = await handshake(stream, ws, Request)
                except CLOSED:
                    return
                conn = BareWebSocket(stream, ws, pending)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(guarded, CLOSED, conn.writer)
                    await guarded(CLOSED, echo_server, conn, app)
                    tg.cancel_scope.cancel()

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            task_status.started(listener.extra(SocketAttribute.local_port))
            await listener.serve(handler)

    @asynccontextmanager
    async def connect(
        self, port: int, *, worker: bool = False, index: int = 0
    ) -> AsyncIterator[EchoConn | None]:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send(ws.send(Request(host=f"127.0.0.1:{port}", target="/")))
            pending = await handshake(stream, ws, AcceptConnection)
            conn = BareWebSocket(stream, ws, pending)
            async with anyio.create_task_group() as tg:
                tg.start_soon(guarded, CLOSED, conn.writer)
                async with echo_client(conn, worker=worker) as echo:
                    yield echo
                tg.cancel_scope.cancel()
