"""A naive echo straight on wsproto + AnyIO: one ``stream.send`` per frame.

This is what astral's WebSocket layer would be without write coalescing:
every message costs one system call (and one lock hand-off) on each side.
Comparing it with ``wsproto-echo`` shows what coalescing buys.
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

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..common import ServerApp

CLOSED = (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError)


class NaiveWebSocket:
    """Text messages over one wsproto connection; no buffering of writes."""

    def __init__(self, stream: SocketStream, ws: WSConnection, pending: list[Event]) -> None:
        self._stream = stream
        self._ws = ws
        self._events: deque[Event] = deque(pending)
        self._parts: list[str] = []
        self._send_lock = anyio.Lock()

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send(data)

    async def send(self, message: str) -> None:
        await self._write(self._ws.send(TextMessage(data=message)))

    async def receive(self) -> str:
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, TextMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        message = "".join(self._parts)
                        self._parts.clear()
                        return message
                elif isinstance(event, Ping):
                    await self._write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise anyio.EndOfStream
            self._ws.receive_data(await self._stream.receive(65536))
            self._events.extend(self._ws.events())


async def handshake(stream: SocketStream, ws: WSConnection, wanted: type[Event]) -> list[Event]:
    """Read until the ``wanted`` handshake event; return the events after it."""
    while True:
        ws.receive_data(await stream.receive(65536))
        events = list(ws.events())
        for i, event in enumerate(events):
            if isinstance(event, wanted):
                if isinstance(event, Request):
                    await stream.send(ws.send(AcceptConnection()))
                return events[i + 1 :]


class NaiveWsprotoEcho:
    name: ClassVar[str] = "wsproto-echo-naive"
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
                await guarded(CLOSED, echo_server, NaiveWebSocket(stream, ws, pending), app)

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
            async with echo_client(NaiveWebSocket(stream, ws, pending), worker=worker) as conn:
                yield conn
