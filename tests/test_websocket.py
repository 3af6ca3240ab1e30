"""astral's WebSocket client against astral's WebSocket server, and against raw sockets.

Everything here runs on asyncio and on trio. Raw-socket peers (a few lines of
hand-made HTTP and frames, parsed back with wsproto) inject the faults a
well-behaved library would never produce.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import trustme
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Event, Ping, Pong, TextMessage

from astral._exceptions import (
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    HandshakeError,
    TLSError,
    Unauthorized,
)
from astral._transport import Transport
from astral._websocket import (
    HandshakeRequest,
    Rejection,
    WebSocketConnection,
    open_websocket,
    serve_websocket,
)
from astral._ws_client import redact

from .helpers import eventually
from .test_ws_read_pause import Feed, open_over

if TYPE_CHECKING:
    from anyio.abc import SocketStream, TaskGroup, TaskStatus

HOST = "127.0.0.1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
Handler = Callable[[WebSocketConnection], Awaitable[None]]


# --- helpers ------------------------------------------------------------------


async def echo(conn: WebSocketConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await conn.send(await conn.receive())


async def start_server(
    tg: TaskGroup, handler: Handler, **kwargs: Any
) -> tuple[int, anyio.CancelScope, anyio.Event]:
    """Start serve_websocket in ``tg``; return its port, a scope to stop it, and a done event."""
    scope = anyio.CancelScope()
    done = anyio.Event()

    async def run(*, task_status: TaskStatus[int]) -> None:
        try:
            with scope:
                await serve_websocket(handler, HOST, 0, task_status=task_status, **kwargs)
        finally:
            done.set()

    port = await tg.start(run)
    return port, scope, done


@asynccontextmanager
async def server(handler: Handler = echo, **kwargs: Any) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port, scope, _ = await start_server(tg, handler, **kwargs)
        try:
            yield port
        finally:
            scope.cancel()


class Reporter:
    """Carries what a server-side handler saw back to the test."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[Any](100)


@pytest.fixture
def reporter() -> Iterator[Reporter]:
    reporter = Reporter()
    with reporter.send, reporter.receive:
        yield reporter


def mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One raw frame; clients mask, servers don't."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head.append(bit | n)
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + mask(payload, key)


async def read_head(stream: SocketStream) -> tuple[bytes, bytes]:
    """Read an HTTP head; return it and whatever came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data, b""
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def read_to_end(stream: SocketStream) -> bytes:
    data = b""
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            data += await stream.receive()
    return data


def upgrade_request(path: bytes = b"/", extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


class RawPeer:
    """A socket that did the upgrade by hand; wsproto only parses what comes back."""

    def __init__(self, stream: SocketStream, head: bytes, rest: bytes, *, client: bool) -> None:
        self.stream = stream
        self.head = head
        self.ws = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self.ws.receive_data(rest)
        self.masked = client

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        await self.stream.send(frame(opcode, payload, fin=fin, masked=self.masked))

    async def next_event(self) -> Event | None:
        """The next wsproto event, or None at end of stream."""
        while True:
            for event in self.ws.events():
                return event
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
            self.ws.receive_data(data)


@asynccontextmanager
async def raw_client(port: int, request: bytes | None = None) -> AsyncIterator[RawPeer]:
    async with await anyio.connect_tcp(HOST, port) as stream:
        await stream.send(request or upgrade_request())
        head, rest = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 101"), head
        yield RawPeer(stream, head, rest, client=True)


async def accept_upgrade(stream: SocketStream, after: bytes = b"") -> RawPeer:
    """Answer a client's upgrade request by hand, optionally with frames right after."""
    head, rest = await read_head(stream)
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    await stream.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + after
    )
    return RawPeer(stream, head, rest, client=False)


@asynccontextmanager
async def raw_server(behaviour: Callable[[SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    """A TCP server running ``behaviour`` on each connection."""
    async with await anyio.create_tcp_listener(local_host=HOST) as listener:

        async def one(stream: SocketStream) -> None:
            async with stream:
                await behaviour(stream)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, one)
            try:
                yield listener.extra(anyio.abc.SocketAttribute.local_port)
            finally:
                tg.cancel_scope.cancel()


async def ignore_everything(stream: SocketStream) -> None:
    """Complete the upgrade, then read and discard forever."""
    await accept_upgrade(stream)
    await read_to_end(stream)


async def closed_with(coro: Awaitable[Any]) -> ConnectionClosed:
    with pytest.raises(ConnectionClosed) as info:
        await coro
    return info.value


# --- the happy path -----------------------------------------------------------


async def test_echo_and_transport_protocol() -> None:
    seen: list[HandshakeRequest] = []

    async def handler(conn: WebSocketConnection) -> None:
        assert conn.request is not None
        seen.append(conn.request)
        await echo(conn)

    async with server(handler) as port, open_websocket(f"ws://{HOST}:{port}/rpc?x=1") as ws:
        assert isinstance(ws, Transport)
        assert ws.request is None
        assert ws.remote_address == (HOST, port)
        assert ws.close_code is None
        for text in ["hello", "", "é🚀" * 1000, "x" * 200_000]:
            await ws.send(text)
            assert await ws.receive() == text
    assert ws.close_code == 1000
    request = seen[0]
    assert request.path == "/rpc?x=1"
    assert request.query_param("x") == "1"
    assert request.header("Upgrade") == "websocket"
    assert request.remote_address is not None
    assert request.remote_address[0] == HOST
    # permessage-deflate is never offered.
    assert request.header("sec-websocket-extensions") is None


async def test_many_concurrent_senders_never_interleave() -> None:
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        expected = {f"{task}:{i}:" + "p" * (task * 37) for task in range(100) for i in range(20)}

        async def sender(task: int) -> None:
            for i in range(20):
                await ws.send(f"{task}:{i}:" + "p" * (task * 37))

        async with anyio.create_task_group() as tg:
            for task in range(100):
                tg.start_soon(sender, task)
            received = {await ws.receive() for _ in expected}
        assert received == expected


async def test_messages_queued_before_close_are_still_delivered() -> None:
    async def handler(conn: WebSocketConnection) -> None:
        for i in range(3):
            await conn.send(str(i))
        await conn.aclose(4000, "done here")

    async with server(handler) as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        assert [await ws.receive() for _ in range(3)] == ["0", "1", "2"]
        closed = await closed_with(ws.receive())
        assert (closed.code, closed.reason) == (4000, "done here")
        assert (ws.close_code, ws.close_reason) == (4000, "done here")
        await closed_with(ws.send("too late"))


async def test_frames_sent_with_the_handshake_are_not_lost(reporter: Reporter) -> None:
    async def behaviour(stream: SocketStream) -> None:
        await accept_upgrade(stream, after=frame(1, b"early", masked=False))
        await read_to_end(stream)

    async with raw_server(behaviour) as port:
        async with open_websocket(f"ws://{HOST}:{port}/", close_timeout=0.2) as ws:
            assert await ws.receive() == "early"

    async def handler(conn: WebSocketConnection) -> None:
        await reporter.send.send(await conn.receive())

    async with server(handler) as port:
        async with await anyio.connect_tcp(HOST, port) as stream:
            await stream.send(upgrade_request() + frame(1, b"eager"))
            assert await reporter.receive.receive() == "eager"


async def test_binary_messages_are_delivered_as_text(reporter: Reporter) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        for _ in range(2):
            await reporter.send.send(await conn.receive())

    async with server(handler) as port, raw_client(port) as peer:
        await peer.send_frame(2, "café".encode())
        await peer.send_frame(2, "🚀".encode()[:2], fin=False)
        await peer.send_frame(0, "🚀".encode()[2:])
        assert await reporter.receive.receive() == "café"
        assert await reporter.receive.receive() == "🚀"


async def test_peer_pings_are_answered() -> None:
    async with server() as port, raw_client(port) as peer:
        await peer.send_frame(9, b"are you there")
        event = await peer.next_event()
        assert isinstance(event, Pong)
        assert event.payload == b"are you there"


async def test_fragmented_text_is_reassembled() -> None:
    async with server() as port, raw_client(port) as peer:
        await peer.send_frame(1, b"hel", fin=False)
        await peer.send_frame(9, b"ping in between")
        await peer.send_frame(0, b"lo \xc3", fin=False)
        await peer.send_frame(0, b"\xa9")
        events = [await peer.next_event(), await peer.next_event()]
        assert isinstance(events[0], Pong)
        assert isinstance(events[1], TextMessage)
        assert events[1].data == "hello é"


# --- closing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "reason", "described"),
    [((4321, "bye"), 4321, "bye", "bye"), ((), 1000, "", "normal closure")],
    ids=["code-and-reason", "no-arguments"],
)
async def test_client_close_is_seen_by_the_server(
    args: tuple[Any, ...], code: int, reason: str, described: str, reporter: Reporter
) -> None:
    # With no arguments: 1000 and an empty reason, which the server describes by its code.
    async def handler(conn: WebSocketConnection) -> None:
        closed = await closed_with(conn.receive())
        await reporter.send.send((closed.code, closed.reason, conn.close_code, conn.close_reason))

    async with server(handler) as port:
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.aclose(*args)
            await ws.aclose()  # idempotent
            assert (ws.close_code, ws.close_reason) == (code, reason)
        assert await reporter.receive.receive() == (code, described, code, reason)


async def test_aclose_wakes_a_blocked_receive() -> None:
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        result: list[int | None] = []

        async def reader(*, task_status: TaskStatus[None]) -> None:
            # receive() finds no message and waits before yielding to anyone:
            # by the time start() returns, the reader is blocked in it.
            task_status.started()
            result.append((await closed_with(ws.receive())).code)

        async with anyio.create_task_group() as tg:
            await tg.start(reader)
            await ws.aclose()
        assert result == [1000]


async def test_concurrent_aclose_and_send() -> None:
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:

        async def closing(code: int, *, task_status: TaskStatus[None]) -> None:
            # aclose() queues its close frame before it first waits: once
            # start() returns, the close has begun.
            task_status.started()
            await ws.aclose(code)

        async with anyio.create_task_group() as tg:
            await tg.start(closing, 1000)
            await tg.start(closing, 1001)
            await closed_with(ws.send("during the close"))
        assert ws.close_code in (1000, 1001)  # whichever ran first


async def test_aclose_rejects_reserved_codes() -> None:
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        for code in (999, 1005, 1006, 1015, 2000, 5000):
            with pytest.raises(ValueError, match="close code"):
                await ws.aclose(code)
        await ws.send("still open")
        assert await ws.receive() == "still open"


async def test_close_without_status_reports_1005(reporter: Reporter) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await reporter.send.send((await closed_with(conn.receive())).code)

    async with server(handler) as port, raw_client(port) as peer:
        await peer.send_frame(8, b"")
        assert await reporter.receive.receive() == 1005
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert await peer.next_event() is None  # then the server drops TCP


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (struct.pack("!H", 1001), 1001, "going away"),
        (struct.pack("!H", 1011), 1011, "internal error"),
        (struct.pack("!H", 4000), 4000, "connection closed"),
        (struct.pack("!H", 4000) + b"bye", 4000, "bye"),
    ],
    ids=["1001", "1011", "private-code", "with-reason"],
)
async def test_a_close_without_a_reason_is_described_by_its_code(
    payload: bytes, code: int, reason: str, reporter: Reporter
) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        received = await closed_with(conn.receive())
        sent = await closed_with(conn.send("late"))
        await reporter.send.send([(e.code, e.reason, str(e)) for e in (received, sent)])

    async with server(handler) as port, raw_client(port) as peer:
        await peer.send_frame(8, payload)
        expected = (code, reason, f"{reason} (code {code})")
        assert await reporter.receive.receive() == [expected, expected]


async def test_server_cancelled_closes_clients_with_1001() -> None:
    async with anyio.create_task_group() as tg:
        port, scope, done = await start_server(tg, echo)
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.send("hi")
            assert await ws.receive() == "hi"
            scope.cancel()
            closed = await closed_with(ws.receive())
            assert closed.code == 1001
            assert closed.reason == "going away"
        await done.wait()


async def test_server_shutdown_is_bounded_by_close_timeout() -> None:
    async with anyio.create_task_group() as tg:
        port, scope, done = await start_server(tg, echo, close_timeout=0.2)
        async with raw_client(port) as peer:
            await peer.send_frame(1, b"hello")
            assert isinstance(await peer.next_event(), TextMessage)
            scope.cancel()  # the raw peer never answers the close frame
            with anyio.fail_after(3):
                await done.wait()
            event = await peer.next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 1001


async def test_aclose_is_bounded_by_close_timeout() -> None:
    async with raw_server(ignore_everything) as port:
        async with open_websocket(f"ws://{HOST}:{port}/", close_timeout=0.2) as ws:
            start = anyio.current_time()
            await ws.aclose()
            assert 0.15 < anyio.current_time() - start < 3
            assert ws.close_code == 1000
            await closed_with(ws.receive())


async def test_cancelled_aclose_drops_the_connection_at_once() -> None:
    async with raw_server(ignore_everything) as port:
        async with open_websocket(f"ws://{HOST}:{port}/", close_timeout=60) as ws:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await ws.aclose()
            await closed_with(ws.receive())


async def test_leaving_the_block_with_an_error_closes_with_1011(reporter: Reporter) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await reporter.send.send((await closed_with(conn.receive())).code)

    async with server(handler) as port:
        with pytest.raises(KeyError):  # unwrapped, not an exception group
            async with open_websocket(f"ws://{HOST}:{port}/"):
                raise KeyError("oops")
        assert await reporter.receive.receive() == 1011

        with anyio.CancelScope() as scope:
            async with open_websocket(f"ws://{HOST}:{port}/"):
                scope.cancel()
                await anyio.lowlevel.checkpoint()
        assert await reporter.receive.receive() == 1001


async def test_handler_error_closes_with_1011_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        message = await conn.receive()
        if message == "boom":
            raise RuntimeError("handler bug")
        if message == "escape":
            await conn.receive()  # ConnectionClosed escapes: not a bug
        await echo(conn)

    async with server(handler) as port:
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.send("boom")
            closed = await closed_with(ws.receive())
            assert closed.code == 1011
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.send("fine")
            await ws.send("again")
            assert await ws.receive() == "again"
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.send("escape")
    errors = [r for r in caplog.records if r.name == "astral.websocket" and r.exc_info]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR


async def test_peer_dropping_tcp_means_1006(reporter: Reporter) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        closed = await closed_with(conn.receive())
        await reporter.send.send((closed.code, closed.reason))
        await closed_with(conn.send("x"))

    async with server(handler) as port:
        async with raw_client(port):
            pass
        assert await reporter.receive.receive() == (1006, "connection closed without a close frame")
        async with raw_client(port) as peer:  # a reset rather than a FIN
            raw = peer.stream.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        code, reason = await reporter.receive.receive()
        assert code == 1006
        assert reason.startswith("read failed: "), reason

    async def drop(stream: SocketStream) -> None:
        await accept_upgrade(stream)

    async with raw_server(drop) as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        closed = await closed_with(ws.receive())
        assert closed.code == 1006
        assert ws.close_code == 1006


# --- limits and hostile frames ------------------------------------------------


async def test_oversized_message_closes_with_1009(reporter: Reporter) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await reporter.send.send(await conn.receive())
        await reporter.send.send((await closed_with(conn.receive())).code)

    async with server(handler, max_message_size=1000) as port:
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.send("é" * 500)  # 1000 bytes: fits
            assert await reporter.receive.receive() == "é" * 500
            await ws.send("é" * 501)  # 501 characters, but 1002 bytes
            assert await reporter.receive.receive() == 1009
            closed = await closed_with(ws.receive())
            assert (closed.code, closed.reason) == (1009, "message larger than 1000 bytes")

        # The limit counts the reassembled message, however it is fragmented.
        async with raw_client(port) as peer:
            await peer.send_frame(1, b"ok")
            assert await reporter.receive.receive() == "ok"
            await peer.send_frame(1, b"a" * 600, fin=False)
            await peer.send_frame(0, b"a" * 600)
            assert await reporter.receive.receive() == 1009
            event = await peer.next_event()
            assert isinstance(event, CloseConnection)
            assert (event.code, event.reason) == (1009, "message larger than 1000 bytes")


async def test_client_enforces_max_message_size_too() -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await conn.send("x" * 5000)
        await echo(conn)

    async with server(handler) as port:
        async with open_websocket(f"ws://{HOST}:{port}/", max_message_size=4096) as ws:
            closed = await closed_with(ws.receive())
            assert closed.code == 1009


@pytest.mark.parametrize("opcode", [1, 2], ids=["text", "binary"])
async def test_invalid_utf8_closes_with_1007(opcode: int, reporter: Reporter) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await reporter.send.send((await closed_with(conn.receive())).code)

    async with server(handler) as port, raw_client(port) as peer:
        await peer.send_frame(opcode, b"ok \xff\xfe")
        assert await reporter.receive.receive() == 1007
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1007


async def test_protocol_violation_closes_with_1002(reporter: Reporter) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await reporter.send.send((await closed_with(conn.receive())).code)

    async with server(handler) as port, raw_client(port) as peer:
        await peer.stream.send(frame(1, b"unmasked", masked=False))
        assert await reporter.receive.receive() == 1002
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1002
        assert await peer.next_event() is None


async def test_keepalive_timeout_closes_with_1011() -> None:
    async with raw_server(ignore_everything) as port:
        async with open_websocket(
            f"ws://{HOST}:{port}/", ping_interval=0.05, ping_timeout=0.1, close_timeout=0.5
        ) as ws:
            closed = await closed_with(ws.receive())
            assert (closed.code, closed.reason) == (1011, "keepalive ping timeout")


async def test_keepalive_keeps_a_healthy_connection_open(reporter: Reporter) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await reporter.send.send("connected")
        await echo(conn)

    async with server(handler, ping_interval=0.01, ping_timeout=0.5) as port:
        async with raw_client(port) as peer:
            # The raw peer answers pings through wsproto; a few rounds pass.
            for _ in range(5):
                event = await peer.next_event()
                assert isinstance(event, Ping)
                await peer.stream.send(peer.ws.send(event.response()))
            await peer.send_frame(1, b"still here")
            while not isinstance(event := await peer.next_event(), TextMessage):
                assert event is not None
            assert event.data == "still here"


async def test_a_pong_with_another_payload_is_no_answer() -> None:
    async with server(ping_interval=0.01, ping_timeout=0.3) as port, raw_client(port) as peer:
        with anyio.fail_after(5):
            while not isinstance(event := await peer.next_event(), CloseConnection):
                assert isinstance(event, Ping)
                await peer.stream.send(peer.ws.send(Pong(payload=b"not the ping's")))
        assert (event.code, event.reason) == (1011, "keepalive ping timeout")


async def test_after_a_pong_the_next_ping_waits_for_the_interval() -> None:
    async with server(ping_interval=0.3, ping_timeout=2) as port, raw_client(port) as peer:
        event = await peer.next_event()
        assert isinstance(event, Ping)
        await peer.stream.send(peer.ws.send(event.response()))
        answered = anyio.current_time()
        assert isinstance(await peer.next_event(), Ping)
        # The interval restarts at the pong: the next ping is not due at once.
        assert anyio.current_time() - answered >= 0.2


async def test_pings_without_timeout_never_close() -> None:
    async with server(ping_interval=0.01, ping_timeout=None) as port, raw_client(port) as peer:
        for _ in range(3):  # unanswered pings, and still open
            assert isinstance(await peer.next_event(), Ping)
        await peer.send_frame(1, b"alive")
        while not isinstance(event := await peer.next_event(), TextMessage):
            assert isinstance(event, Ping)
        assert event.data == "alive"


async def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="ping_interval"):
        async with open_websocket("ws://localhost/", ping_interval=0):
            pass
    with pytest.raises(ValueError, match="close_timeout"):
        async with open_websocket("ws://localhost/", close_timeout=-1):
            pass
    with pytest.raises(ValueError, match="max_message_size"):
        await serve_websocket(echo, HOST, 0, max_message_size=0)


async def test_backpressure_and_cancelled_send_leave_no_partial_frame(reporter: Reporter) -> None:
    go = anyio.Event()

    async def handler(conn: WebSocketConnection) -> None:
        await go.wait()  # read nothing until told to
        with contextlib.suppress(ConnectionClosed):
            while True:
                await reporter.send.send(await conn.receive())

    chunk = "z" * 65536
    async with server(handler, max_message_size=2**17) as port:
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            sent = 0
            while True:  # until the kernel buffers fill and send() blocks
                # The cancelled send is what is tested; the timer only decides when.
                with anyio.move_on_after(0.3) as scope:
                    await ws.send(f"{sent:08d}" + chunk)
                if scope.cancelled_caught:
                    break
                sent += 1
            assert sent > 10
            go.set()
            await ws.send("final")
            for i in range(sent):
                assert await reporter.receive.receive() == f"{i:08d}" + chunk
            assert await reporter.receive.receive() == "final"


# --- opening handshake --------------------------------------------------------


async def test_rejection_401_raises_unauthorized_and_no_handler_runs() -> None:
    handled = []

    async def handler(conn: WebSocketConnection) -> None:
        handled.append(conn)

    async def process_request(request: HandshakeRequest) -> Rejection | None:
        if request.query_param("token") == "good":
            request.state["who"] = "alice"
            return None
        if request.path.startswith("/forbidden"):
            return Rejection(403, "go away")
        return Rejection(401, "bad token", (("WWW-Authenticate", "Bearer"),))

    async with server(handler, process_request=process_request) as port:
        with pytest.raises(Unauthorized, match="bad token") as info:
            async with open_websocket(f"ws://{HOST}:{port}/?token=bad"):
                pass
        assert info.value.status == 401
        with pytest.raises(HandshakeError, match="go away") as error:
            async with open_websocket(f"ws://{HOST}:{port}/forbidden"):
                pass
        assert not isinstance(error.value, Unauthorized)
        assert error.value.status == 403
        assert handled == []
        async with open_websocket(f"ws://{HOST}:{port}/?token=good") as ws:
            await ws.send("hi")
    assert len(handled) == 1
    assert handled[0].request.state == {"who": "alice"}


async def test_huge_token_reaches_process_request() -> None:
    token = "t" * 100_000
    seen: list[tuple[str | None, str | None]] = []

    async def process_request(request: HandshakeRequest) -> Rejection | None:
        seen.append((request.query_param("token"), request.header("authorization")))
        return Rejection(401)

    async with server(echo, process_request=process_request) as port:
        with pytest.raises(Unauthorized):
            async with open_websocket(f"ws://{HOST}:{port}/?token={token}"):
                pass
        with pytest.raises(Unauthorized):
            async with open_websocket(
                f"ws://{HOST}:{port}/", headers=[("Authorization", f"Bearer {token}")]
            ):
                pass
    assert seen == [(token, None), (None, f"Bearer {token}")]


async def test_process_request_failure_answers_500() -> None:
    async def process_request(request: HandshakeRequest) -> Rejection | None:
        raise RuntimeError("bug in process_request")

    async with server(echo, process_request=process_request) as port:
        with pytest.raises(HandshakeError) as info:
            async with open_websocket(f"ws://{HOST}:{port}/"):
                pass
        assert info.value.status == 500


async def test_bad_requests_get_http_errors_and_the_listener_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "astral.websocket")

    async def exchange(port: int, data: bytes, *, then_close: bool = False) -> bytes:
        async with await anyio.connect_tcp(HOST, port) as stream:
            if data:
                await stream.send(data)
            if then_close:
                return b""
            return await read_to_end(stream)

    async with (
        server(max_header_size=4096) as port,
        open_websocket(f"ws://{HOST}:{port}/") as bystander,
    ):
        assert (await exchange(port, b"\x00\xffgarbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        plain = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert plain.startswith(b"HTTP/1.1 426 ")
        assert b"upgrade: websocket" in plain.lower()
        post = upgrade_request().replace(b"GET", b"POST", 1)
        assert (await exchange(port, post)).startswith(b"HTTP/1.1 400 ")
        bad_version = upgrade_request().replace(b"Version: 13", b"Version: 8")
        assert (await exchange(port, bad_version)).startswith(b"HTTP/1.1 426 ")
        bad_key = upgrade_request().replace(b"Key: ", b"Key: x")
        assert (await exchange(port, bad_key)).startswith(b"HTTP/1.1 400 ")
        huge = upgrade_request(extra=b"X-Big: " + b"b" * 8000 + b"\r\n")
        assert (await exchange(port, huge)).startswith(b"HTTP/1.1 431 ")
        await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n", then_close=True)  # half-sent
        await exchange(port, b"", then_close=True)  # gone before a byte
        async with raw_client(port) as peer:  # a hostile frame after the upgrade
            await peer.send_frame(0xB, b"reserved opcode")
            assert isinstance(await peer.next_event(), CloseConnection)

        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.send("still serving")
            assert await ws.receive() == "still serving"
        await bystander.send("undisturbed")
        assert await bystander.receive() == "undisturbed"
    records = [r for r in caplog.records if r.name == "astral.websocket"]
    assert records
    assert all(r.levelno <= logging.WARNING for r in records)


async def test_server_drops_a_client_that_sends_nothing() -> None:
    async with server(open_timeout=0.1) as port:
        async with await anyio.connect_tcp(HOST, port) as stream:
            assert await read_to_end(stream) == b""


async def test_no_permessage_deflate_even_if_offered() -> None:
    offer = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    async with server() as port, raw_client(port, upgrade_request(extra=offer)) as peer:
        assert b"extensions" not in peer.head.lower()
        await peer.send_frame(1, b"plain")
        event = await peer.next_event()
        assert isinstance(event, TextMessage)
        assert event.data == "plain"


async def test_connection_refused_raises_connect_error() -> None:
    async with await anyio.create_tcp_listener(local_host=HOST) as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
    with pytest.raises(ConnectError) as info:
        async with open_websocket(f"ws://{HOST}:{port}/"):
            pass
    assert type(info.value) is ConnectError
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    "url", ["http://localhost/", "ws://", "ws://localhost:99999/", "ws://u:p@localhost/"]
)
async def test_bad_url_raises_connect_error(url: str) -> None:
    with pytest.raises(ConnectError):
        async with open_websocket(url):
            pass


async def test_reserved_headers_and_plain_ssl_are_refused() -> None:
    with pytest.raises(ValueError, match="set by astral"):
        async with open_websocket("ws://localhost/", headers=[("Sec-WebSocket-Key", "x")]):
            pass
    with pytest.raises(ValueError, match="wss"):
        async with open_websocket("ws://localhost/", ssl_context=ssl.create_default_context()):
            pass


async def test_silent_server_raises_connect_timeout() -> None:
    async def silent(stream: SocketStream) -> None:
        await read_to_end(stream)

    async with raw_server(silent) as port:
        start = anyio.current_time()
        with pytest.raises(ConnectTimeout):
            async with open_websocket(f"ws://{HOST}:{port}/", open_timeout=0.2):
                pass
        assert anyio.current_time() - start < 2


async def test_non_websocket_answers_raise_handshake_error() -> None:
    async def http(stream: SocketStream) -> None:
        await read_head(stream)
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    async with raw_server(http) as port:
        with pytest.raises(HandshakeError, match="hello") as info:
            async with open_websocket(f"ws://{HOST}:{port}/"):
                pass
        assert info.value.status == 200

    async def wrong_accept(stream: SocketStream) -> None:
        await read_head(stream)
        await stream.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: bm9wZQ==\r\n\r\n"
        )

    async with raw_server(wrong_accept) as port:
        with pytest.raises(HandshakeError, match="Accept") as info:
            async with open_websocket(f"ws://{HOST}:{port}/"):
                pass
        assert info.value.status == 101

    async def hang_up(stream: SocketStream) -> None:
        await read_head(stream)

    async with raw_server(hang_up) as port:
        with pytest.raises(HandshakeError, match="without answering") as info:
            async with open_websocket(f"ws://{HOST}:{port}/"):
                pass
        assert info.value.status is None


async def test_a_plaintext_client_is_told_the_server_may_speak_tls() -> None:
    async def hang_up(stream: SocketStream) -> None:
        await read_head(stream)

    async def tls_alert(stream: SocketStream) -> None:
        await read_head(stream)
        await stream.send(b"\x15\x03\x01\x00\x02\x02\x32")  # what a TLS server may answer

    async with raw_server(hang_up) as port:
        with pytest.raises(HandshakeError) as info:
            async with open_websocket(f"ws://{HOST}:{port}/"):
                pass
    assert str(info.value).endswith("; is it a TLS server? try wss://")
    async with raw_server(tls_alert) as port:
        with pytest.raises(HandshakeError) as info:
            async with open_websocket(f"ws://{HOST}:{port}/"):
                pass
    assert str(info.value) == "the server answered in TLS, not HTTP: try wss://"
    assert info.value.status is None

    async def reset(stream: SocketStream) -> None:
        await read_head(stream)
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async with raw_server(reset) as port:
        with pytest.raises(HandshakeError) as info:
            async with open_websocket(f"ws://{HOST}:{port}/"):
                pass
    message = str(info.value)
    assert message.startswith("connection lost during the WebSocket upgrade")
    assert message.endswith("; is it a TLS server? try wss://")


def test_redact_quotes_the_url_as_given_without_query_or_credentials() -> None:
    assert redact("127.0.0.1:8830/astral") == "127.0.0.1:8830/astral"
    assert redact("ws://u:secret@host:1/p?token=t#frag") == "ws://host:1/p?..."
    assert redact("user:secret@host/p") == "host/p"
    assert redact("wss://host") == "wss://host"


# --- TLS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_wss_echo(server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext) -> None:
    async with server(ssl_context=server_ssl) as port:
        for host in (HOST, "localhost"):
            async with open_websocket(f"wss://{host}:{port}/", ssl_context=client_ssl) as ws:
                await ws.send("secret" * 10_000)
                assert await ws.receive() == "secret" * 10_000
            assert ws.close_code == 1000


async def test_wss_rejection(server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext) -> None:
    async def process_request(request: HandshakeRequest) -> Rejection | None:
        return Rejection(401, "not you")

    async with server(ssl_context=server_ssl, process_request=process_request) as port:
        with pytest.raises(Unauthorized, match="not you"):
            async with open_websocket(f"wss://{HOST}:{port}/", ssl_context=client_ssl):
                pass


async def test_untrusted_certificate_raises_tls_error(server_ssl: ssl.SSLContext) -> None:
    untrusting = ssl.create_default_context()
    trustme.CA().configure_trust(untrusting)  # some other CA
    async with server(ssl_context=server_ssl) as port:
        with pytest.raises(TLSError) as info:
            async with open_websocket(f"wss://{HOST}:{port}/", ssl_context=untrusting):
                pass
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_tls_listener_survives_plaintext_and_broken_clients(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "astral.websocket")
    async with server(ssl_context=server_ssl) as port:
        async with await anyio.connect_tcp(HOST, port) as stream:
            await stream.send(upgrade_request())  # plaintext to a TLS port
            assert not (await read_to_end(stream)).startswith(b"HTTP")
        async with await anyio.connect_tcp(HOST, port) as stream:
            await stream.send(b"\x16\x03\x01\x00")  # a TLS record cut short
        with pytest.raises(ConnectError):  # a plaintext client on a TLS port
            async with open_websocket(f"ws://{HOST}:{port}/"):
                pass
        async with open_websocket(f"wss://{HOST}:{port}/", ssl_context=client_ssl) as ws:
            await ws.send("still serving")
            assert await ws.receive() == "still serving"
    assert all(r.levelno <= logging.WARNING for r in caplog.records)


async def test_keepalive_over_tls_pings_from_a_task_of_its_own(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    # On a plain socket the keepalive is the reader's deadline (it cancels the
    # pending read); a TLS read may be flushing a record of its own, which must
    # not be cancelled, so there it runs as a task. Pings and pongs flow both
    # ways and the connection stays open and usable.
    async with server(ssl_context=server_ssl, ping_interval=0.01, ping_timeout=0.5) as port:
        async with open_websocket(
            f"wss://{HOST}:{port}/", ssl_context=client_ssl, ping_interval=0.01, ping_timeout=0.5
        ) as ws:
            assert ws._ping_in_reader is False
            await eventually(lambda: ws._ping_count >= 5)
            await ws.send("still here")
            assert await ws.receive() == "still here"
            assert ws.close_code is None


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_after_each_pong_the_next_ping_comes_after_the_interval_not_the_timeout(
    tls: bool, server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    # A ping is answered long before its timeout: the next one is due
    # ``ping_interval`` after the pong, on a plain socket (the reader's
    # deadline) as over TLS (a task). Waiting for the timeout instead would
    # take 60 s a ping here, and a dead remote would be noticed late.
    scheme = "wss" if tls else "ws"
    async with server(ssl_context=server_ssl if tls else None, ping_interval=None) as port:
        async with open_websocket(
            f"{scheme}://{HOST}:{port}/",
            ssl_context=client_ssl if tls else None,
            ping_interval=0.01,
            ping_timeout=60,
        ) as ws:
            assert ws._ping_in_reader is not tls
            with anyio.fail_after(10):
                await eventually(lambda: ws._ping_count >= 5)
            assert ws.close_code is None


async def test_keepalive_on_a_plain_socket_is_the_readers_deadline() -> None:
    async with server(ping_interval=0.01, ping_timeout=0.5) as port:
        async with open_websocket(
            f"ws://{HOST}:{port}/", ping_interval=0.01, ping_timeout=0.5
        ) as ws:
            assert ws._ping_in_reader is True
            await eventually(lambda: ws._ping_count >= 5)
            await ws.send("still here")
            assert await ws.receive() == "still here"
            assert ws.close_code is None


# --- writes: failures and order ------------------------------------------------


class BrokenOnWrite(Feed):
    """A stream whose every write fails, as when the remote reset the connection."""

    async def send(self, item: bytes) -> None:
        raise anyio.BrokenResourceError("reset by peer")


async def test_a_failed_write_closes_with_1006_and_says_why() -> None:
    async with open_over(BrokenOnWrite(), max_message_size=4096) as conn:
        with anyio.fail_after(5):
            await conn.send("hello")  # queued: the writer task meets the error
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
    reason = "write failed: BrokenResourceError('reset by peer')"
    assert (info.value.code, info.value.reason) == (1006, reason)
    assert (conn.close_code, conn.close_reason) == (1006, reason)


class AsyncioLikeStream(Feed):
    """Shaped like AnyIO's asyncio socket stream, so frames may go straight to its transport.

    ``_protocol.write_event`` is set while the transport has nothing pending;
    ``send`` (the writer task's way out) is held until ``release`` is set.
    """

    def __init__(self) -> None:
        super().__init__()
        self.wire = bytearray()
        self.release = anyio.Event()
        self._transport = SimpleNamespace(write=self.wire.extend, is_closing=lambda: False)
        self._protocol = SimpleNamespace(write_event=asyncio.Event(), exception=None)

    async def send(self, item: bytes) -> None:
        await self.release.wait()
        self._transport.write(item)
        await self._protocol.write_event.wait()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # an asyncio transport
async def test_a_frame_queued_while_the_writer_task_writes_goes_out_after_it() -> None:
    stream = AsyncioLikeStream()  # the transport has a write pending
    async with open_over(stream, max_message_size=4096) as conn:
        with anyio.fail_after(5):
            await conn.send("first")  # to the writer task, held inside stream.send
            await anyio.wait_all_tasks_blocked()  # in memory: the writer holds "first"
            stream._protocol.write_event.set()  # the transport has drained meanwhile
            await conn.send("second")  # must not overtake "first" by the direct path
            await anyio.wait_all_tasks_blocked()  # in memory: "second" is queued
            stream.release.set()
            await anyio.wait_all_tasks_blocked()  # in memory: both have been written
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(bytes(stream.wire))
    texts = [event.data for event in client.events() if isinstance(event, TextMessage)]
    assert texts == ["first", "second"]


@pytest.mark.parametrize("after", [b"", b"stray bytes"], ids=["nothing", "stray-bytes"])
async def test_the_client_leaves_dropping_tcp_to_the_server(after: bytes) -> None:
    # RFC 6455 section 7.1.1: after the closing handshake the server drops TCP first; the
    # client waits for it, here until its close deadline, as this server never drops it
    # (bytes arriving after the handshake are ignored, and do not end the wait).
    answered, handshake_done = anyio.Event(), anyio.Event()

    async def answer_the_close_and_keep_tcp(stream: SocketStream) -> None:
        peer = await accept_upgrade(stream)
        while not isinstance(await peer.next_event(), CloseConnection):
            pass
        await peer.send_frame(8, struct.pack("!H", 1000))
        if after:
            await handshake_done.wait()
            await stream.send(after)
        answered.set()
        await read_to_end(stream)

    async with raw_server(answer_the_close_and_keep_tcp) as port:
        async with open_websocket(f"ws://{HOST}:{port}/", close_timeout=0.5) as ws:

            async def watch() -> None:
                await eventually(lambda: ws._peer_done)  # the client read the answer
                handshake_done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                start = anyio.current_time()
                await ws.aclose()
                waited = anyio.current_time() - start
        assert answered.is_set()
        assert ws.close_code == 1000
        assert 0.45 < waited < 3
