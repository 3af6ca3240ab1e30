"""The reference: a lean echo on wsproto + AnyIO, sharing no code with astral.

Every ratio in the table is taken against this system, so it must not move
when astral's own layers do (``wsproto-echo`` runs on ``astral._websocket``,
and a slower WebSocket layer there would *improve* astral's ratios to it).
Nothing here imports astral.

What makes it lean, and what an RPC library could match:

- **No task hops on the server.** One task per connection reads the socket,
  feeds wsproto, handles every event of that read (an echo appends its reply
  frame to one output buffer) and then ships the whole buffer in **one**
  ``stream.send`` before it reads again. No writer task, no per-message event.
- **Write-through on the client.** A caller appends its frame to the output
  buffer; if nobody is sending, it sends the buffer itself (everything other
  callers appended meanwhile goes in the same ``stream.send``), otherwise it
  returns and the sender in progress ships it. A frame appended by the task
  that also reads (the server's loop) waits for that task's next read, so a
  batch of replies leaves in one write. Above a 64 KiB high-water mark the
  buffer is shipped at once and other senders wait for it to drain, so memory
  stays bounded when the remote does not read.
- **One read, every event.** Each ``stream.receive`` is fed to wsproto and
  every message it completes is handed over before the next read.
- Pings are answered through the same buffer; nothing else is handled (no
  size limits, no timeouts): a reference, not a server to deploy.

The client side is the shared :class:`~benchmarks.systems.echo.EchoConn`
(one reader task resolving calls in order), as for every echo system.
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

#: Above this many unsent bytes the buffer is shipped at once, and senders wait.
HIGH_WATER = 1 << 16
READ_SIZE = 1 << 16


class BareWebSocket:
    """Text messages over one wsproto connection, writes coalesced without a writer task."""

    def __init__(self, stream: SocketStream, ws: WSConnection, pending: list[Event]) -> None:
        self._stream = stream
        self._ws = ws
        self._events: deque[Event] = deque(pending)
        self._parts: list[str] = []
        self._out = bytearray()
        self._sending = False  # a task is inside ``stream.send``
        self._reading = False  # a task is inside ``stream.receive``
        self._drained: anyio.Event | None = None  # set when a send finished

    async def _flush(self) -> None:
        """Ship the buffer, and whatever is appended while it goes, one send each."""
        self._sending = True
        try:
            while self._out:
                data = bytes(self._out)
                self._out.clear()
                await self._stream.send(data)
        finally:
            self._sending = False
            if self._drained is not None:
                self._drained.set()
                self._drained = None

    async def _write(self, data: bytes) -> None:
        self._out += data
        if self._sending:
            # The send in progress takes this frame too; wait only above the mark.
            while self._sending and len(self._out) > HIGH_WATER:
                if self._drained is None:
                    self._drained = anyio.Event()
                await self._drained.wait()
        elif self._reading or len(self._out) > HIGH_WATER:
            # The reader is parked on the socket (or too much is waiting): send now.
            await self._flush()
        # else: the task that reads will ship it, with the rest of its batch,
        # before it reads again.

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
                    self._out += self._ws.send(event.response())
                elif isinstance(event, CloseConnection):
                    raise anyio.EndOfStream
            if self._out and not self._sending:
                await self._flush()  # the batch of replies goes in one send
            self._reading = True
            try:
                data = await self._stream.receive(READ_SIZE)
            finally:
                self._reading = False
            self._ws.receive_data(data)
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
                # One task: echo_server's receive reads and flushes, its send appends.
                await guarded(CLOSED, echo_server, BareWebSocket(stream, ws, pending), app)

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
            async with echo_client(BareWebSocket(stream, ws, pending), worker=worker) as echo:
                yield echo
