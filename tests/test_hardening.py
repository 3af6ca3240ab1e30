"""What a remote can make a principal hold, and when it is cut off (issue 7).

Each test attacks a live principal over a real socket, with a raw client
(frames built by hand, parsed with wsproto) since no well-behaved library
sends these. Memory is read with ``tracemalloc``: it counts every Python
allocation of this process exactly (the server runs in it), where the RSS of
a process on a shared machine moves with the allocator and the neighbours.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
import struct
import tracemalloc
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketStream
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Pong, TextMessage

import astral
from astral import _peer
from astral._frames import Call, Result, decode, encode
from astral._ws_connection import WRITE_HIGH_WATER, WebSocketConnection, read_ahead_limiter
from astral.testing import memory_transport_pair

from .helpers import SECRET, running_principal, token

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


MiB = 1 << 20


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One client frame (masked), built by hand so it can be anything."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def upgrade_request(subject: str = "worker-1") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET /astral?token=" + token(subject).encode() + b" HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


async def open_raw(port: int, *, small_window: bool = False) -> SocketStream:
    """A TCP connection that has done the upgrade; nothing read beyond the 101."""
    if small_window:
        # A client that reads nothing fills the server's buffers sooner when
        # its window is small (set before connecting, so TCP agrees on it).
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        with anyio.fail_after(5):
            while sock.connect_ex(("127.0.0.1", port)) not in (0, errno.EISCONN):
                await anyio.wait_writable(sock)
        stream = await SocketStream.from_socket(sock)
    else:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(upgrade_request())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive(1)  # byte by byte: leave the frames unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


class Watch:
    """The principal's side of the one connection a test opens."""

    def __init__(self) -> None:
        self.connected = anyio.Event()
        self.peer: astral.Peer | None = None

    async def on_connect(self, peer: astral.Peer) -> None:
        self.peer = peer
        self.connected.set()

    async def websocket(self) -> WebSocketConnection:
        await self.connected.wait()
        assert self.peer is not None
        transport = self.peer._transport
        assert isinstance(transport, WebSocketConnection)
        return transport


@asynccontextmanager
async def traced() -> AsyncIterator[Any]:
    """Yield a function returning the bytes this process allocated since entry."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        yield lambda: tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


class Client:
    """The client side of a raw connection, parsed by wsproto: whole messages."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.ws = Connection(ConnectionType.CLIENT)
        self.partial = ""
        self.close: CloseConnection | None = None
        self.pongs = 0

    async def receive(self, *, until_pong: bool = False) -> str | None:
        """Return the next whole text message, or None at the close frame or EOF.

        With ``until_pong``, return None as soon as a pong arrives, too.
        """
        while True:
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self.partial += event.data
                    if event.message_finished:
                        message, self.partial = self.partial, ""
                        return message
                elif isinstance(event, CloseConnection):
                    self.close = event
                    return None
                elif isinstance(event, Pong):
                    self.pongs += 1
                    if until_pong:
                        return None
            if self.close is not None:
                return None
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
            self.ws.receive_data(data)


async def read_until_close(stream: SocketStream) -> tuple[list[str], CloseConnection | None]:
    """Read what the server sent, as a client, until its close frame or EOF."""
    client = Client(stream)
    messages = []
    while (message := await client.receive()) is not None:
        messages.append(message)
    return messages, client.close


# -- 1. pongs count against the write high-water mark -----------------------------------


@pytest.mark.time_limit(60)
async def test_a_worker_that_pings_without_reading_is_cut_off_with_bounded_memory() -> None:
    watch = Watch()
    async with running_principal(on_connect=watch.on_connect, close_timeout=1) as principal:
        stream = await open_raw(principal.port, small_window=True)
        websocket = await watch.websocket()
        chunk = frame(0x9, b"p" * 125) * 500  # 65 KB of pings
        sent = 0
        async with stream, traced() as grown:
            # Until the server drops us: what it has not read yet must not
            # pile up either (AnyIO's asyncio stream reads ahead unless told).
            while True:
                try:
                    await stream.send(chunk)
                except (anyio.BrokenResourceError, OSError):
                    break  # the server dropped us
                sent += len(chunk)
                # The pongs it does not read stay in the kernel, and then only
                # up to the high-water mark with us.
                assert len(websocket._out) <= WRITE_HIGH_WATER + 512
                assert grown() < 4 * MiB, f"server grew by {grown()} bytes"
                assert sent < 512 * MiB, "never cut off"
            assert grown() < 4 * MiB
        assert watch.peer is not None
        with anyio.fail_after(5):
            await watch.peer.wait_closed()
        assert websocket.close_code == 1008


async def test_pings_from_a_reader_are_all_answered() -> None:
    watch = Watch()
    async with running_principal(on_connect=watch.on_connect) as principal:
        stream = await open_raw(principal.port)
        pings = 3000
        await stream.send(b"".join(frame(0x9, struct.pack("!I", i)) for i in range(pings)))
        ws = Connection(ConnectionType.CLIENT)
        pongs = 0
        while pongs < pings:
            ws.receive_data(await stream.receive())
            pongs += sum(1 for _ in ws.events())
        websocket = await watch.websocket()
        assert websocket.close_code is None
        await stream.aclose()


# -- 2. fragments count by number as well as by bytes -----------------------------------


@pytest.mark.time_limit(60)
async def test_empty_continuation_frames_count_against_the_message_limit() -> None:
    watch = Watch()
    async with running_principal(
        on_connect=watch.on_connect, max_message_size=65536, close_timeout=1
    ) as principal:
        stream = await open_raw(principal.port)
        websocket = await watch.websocket()
        chunk = frame(0x0, b"", fin=False) * 10_000  # 60 KB of empty fragments
        sent = 0
        async with stream, traced() as grown:
            await stream.send(frame(0x1, b"[", fin=False))
            while websocket.close_code is None:
                try:
                    await stream.send(chunk)
                except (anyio.BrokenResourceError, OSError):
                    break
                sent += 10_000
                assert grown() < 4 * MiB, f"server grew by {grown()} bytes"
                assert sent < 5_000_000, "never cut off"
            _, close = await read_until_close(stream)
        assert websocket.close_code == 1009
        assert close is not None
        assert close.code == 1009


async def test_a_fragmented_message_within_the_limits_is_delivered() -> None:
    watch = Watch()
    async with running_principal(on_connect=watch.on_connect, max_message_size=65536) as principal:
        stream = await open_raw(principal.port)
        text = encode(Call("f", "echo", "é" * 20_000)).encode()  # 40 KB, 2 bytes a char
        # 1,024 fragments (the most 64 KiB allows), cut inside characters too.
        size = -(-len(text) // 1024)
        parts = [text[i : i + size] for i in range(0, len(text), size)]
        parts += [b""] * (1024 - len(parts))
        frames = [frame(0x1 if i == 0 else 0x0, p, fin=False) for i, p in enumerate(parts)]
        frames[-1] = frame(0x0, parts[-1], fin=True)
        await stream.send(b"".join(frames))
        answer = await Client(stream).receive()
        assert answer is not None
        assert decode(answer) == Result("f", "é" * 20_000)
        await stream.aclose()


# -- 3. the flood rule measures what the remote fails to read ---------------------------


@pytest.mark.time_limit(60)
async def test_bursts_of_calls_from_a_client_that_reads_are_all_answered() -> None:
    # 8 bursts of 2,500 calls, each burst sent at once, while reading: every
    # call is answered and the connection stays open, on both backends.
    async with running_principal() as principal:
        stream = await open_raw(principal.port)
        bursts, size = 8, 2500
        answers: list[Result] = []

        async def read_all() -> None:
            client = Client(stream)
            while (message := await client.receive()) is not None:
                result = decode(message)
                assert isinstance(result, Result)
                answers.append(result)
                if len(answers) == bursts * size:
                    return
            raise AssertionError(f"cut off after {len(answers)} answers")

        async with stream, anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            for b in range(bursts):
                calls = (encode(Call(f"{b}.{i}", "echo", i)).encode() for i in range(size))
                await stream.send(b"".join(frame(0x1, c) for c in calls))
        assert len(answers) == bursts * size
        assert [a for a in answers if a.error is not None] == []


async def test_astral_sees_no_spurious_refusals_for_concurrent_quick_calls() -> None:
    # 1,500 concurrent calls of a quick capability against the default
    # max_inbound_calls (1,000): each is over before the table is full.
    async with (
        running_principal() as principal,
        astral.connect(principal.url, token=token("w")) as peer,
    ):
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await peer.call("echo", i)

        async with anyio.create_task_group() as tg:
            for i in range(1500):
                tg.start_soon(one, i)
        assert results == {i: i for i in range(1500)}


async def test_a_burst_of_quick_calls_sent_at_once_gets_no_refusal() -> None:
    # 1,500 calls of a quick capability in one write, against the default
    # max_inbound_calls (1,000): the reader lets each call run before it
    # counts the table full, so none is refused, on either backend.
    async with running_principal() as principal:
        stream = await open_raw(principal.port)
        n = 1500
        await stream.send(
            b"".join(frame(0x1, encode(Call(str(i), "echo", i)).encode()) for i in range(n))
        )
        client = Client(stream)
        answers = []
        while len(answers) < n:
            message = await client.receive()
            assert message is not None, "cut off"
            answers.append(decode(message))
        assert sorted(answers, key=lambda a: int(a.id)) == [  # type: ignore[union-attr]
            Result(str(i), i) for i in range(n)
        ]
        await stream.aclose()


async def test_a_burst_beyond_max_inbound_calls_gets_exactly_its_refusals() -> None:
    release = anyio.Event()
    running = 0
    all_running = anyio.Event()
    limit, burst = 10, 25

    async def hold(i: int) -> int:
        nonlocal running
        running += 1
        if running == limit:
            all_running.set()
        await release.wait()
        return i

    async with (
        running_principal(capabilities={"hold": hold}, max_inbound_calls=limit) as principal,
        astral.connect(principal.url, token=token("w")) as peer,
    ):
        outcomes: dict[int, Any] = {}
        refusals_in = anyio.Event()

        async def one(i: int) -> None:
            try:
                outcomes[i] = await peer.call("hold", i)
            except astral.RemoteError as exc:
                outcomes[i] = exc
            if len(outcomes) == burst - limit:
                refusals_in.set()  # the calls held by the principal cannot end yet

        async with anyio.create_task_group() as tg:
            for i in range(burst):
                tg.start_soon(one, i)
            await all_running.wait()
            await refusals_in.wait()
            refused = [i for i, o in outcomes.items() if isinstance(o, astral.RemoteError)]
            assert len(refused) == burst - limit
            assert all(str(outcomes[i]) == "too many concurrent calls" for i in refused)
            release.set()
        answered = [i for i, o in outcomes.items() if not isinstance(o, astral.RemoteError)]
        assert sorted(answered) == sorted(set(range(burst)) - set(refused))
        assert not peer.closed


# -- 4. the flood cut-off says 1008 on the wire ------------------------------------------


@pytest.mark.time_limit(60)
async def test_a_flood_of_refused_calls_is_closed_with_1008_on_the_wire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_peer, "FLOOD_GRACE", 0.5)
    watch = Watch()
    async with running_principal(on_connect=watch.on_connect, close_timeout=10) as principal:
        stream = await open_raw(principal.port, small_window=True)
        await watch.connected.wait()
        assert watch.peer is not None
        # Long ids make long refusals: the server's buffers fill sooner.
        calls = b"".join(
            frame(0x1, encode(Call(f"{i:0250}", "unknown")).encode()) for i in range(1000)
        )
        sent = 0
        async with stream:
            with anyio.move_on_after(30):  # a bound on the flood, not a wait for an event
                # Sends stall once the server stops reading us; it must end
                # up closing the connection.
                async with anyio.create_task_group() as tg:

                    async def flood() -> None:
                        nonlocal sent
                        while True:
                            await stream.send(calls)
                            sent += 1000

                    tg.start_soon(flood)
                    reason = await watch.peer.wait_closed()
                    tg.cancel_scope.cancel()
            assert reason.code == 1008
            messages, close = await read_until_close(stream)
        assert messages
        assert {decode(m).error for m in messages} == {"unknown capability"}  # type: ignore[union-attr]
        assert close is not None
        assert close.code == 1008


# -- connection caps ----------------------------------------------------------------------


async def read_http_answer(stream: SocketStream) -> bytes:
    answer = b""
    try:
        while True:
            answer += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return answer


async def test_over_max_handshakes_a_client_gets_503_and_the_rest_go_on() -> None:
    async with running_principal(max_handshakes=2, open_timeout=1) as principal:
        # Two clients stall in the upgrade request (accepted in the order
        # they connected: the kernel's queue is first in, first out).
        stalled = [await anyio.connect_tcp("127.0.0.1", principal.port) for _ in range(2)]
        for stream in stalled:
            await stream.send(b"GET /astral HTTP/1.1\r\n")
        async with await anyio.connect_tcp("127.0.0.1", principal.port) as third:
            await third.send(upgrade_request())
            answer = await read_http_answer(third)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert answer.endswith(b"server busy\n")
        # Once the server drops the stalled clients (open_timeout), there is
        # room again: it counts a client out before it closes the socket.
        for stream in stalled:
            assert await read_http_answer(stream) == b""
            await stream.aclose()
        async with astral.connect(principal.url, token=token("w")) as peer:
            assert await peer.call("echo", 1) == 1


async def test_by_default_the_129th_client_in_its_handshake_gets_503() -> None:
    async with running_principal() as principal:
        with anyio.fail_after(10):
            # 128 clients stall in the upgrade request, accepted in the order
            # they connected (the kernel's queue is first in, first out).
            stalled = [await anyio.connect_tcp("127.0.0.1", principal.port) for _ in range(128)]
            try:
                for stream in stalled:
                    await stream.send(b"GET /astral HTTP/1.1\r\n")
                async with await anyio.connect_tcp("127.0.0.1", principal.port) as last:
                    await last.send(upgrade_request())
                    status = b""
                    while b"\r\n" not in status:
                        status += await last.receive()
                assert status.startswith(b"HTTP/1.1 503 "), status
            finally:
                for stream in stalled:
                    await stream.aclose()


async def test_over_max_connections_a_client_gets_503() -> None:
    async with (
        running_principal(max_connections=2) as principal,
        astral.connect(principal.url, token=token("a")) as a,
        astral.connect(principal.url, token=token("b")) as b,
    ):
        assert await a.call("echo", 1) == 1  # both are past their handshake
        assert await b.call("echo", 2) == 2
        with pytest.raises(astral.HandshakeError) as info:
            async with astral.connect(principal.url, token=token("c")):
                pass
        assert info.value.status == 503
        assert await a.call("echo", 3) == 3


async def test_serve_refuses_caps_below_one() -> None:
    verifier = astral.JWTVerifier(SECRET, algorithms=["HS256"])
    for options in ({"max_connections": 0}, {"max_handshakes": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            await astral.serve(verifier=verifier, **options)


# -- Transport.aclose(code, reason) ------------------------------------------------------


class RecordingTransport:
    """An in-memory transport whose aclose takes the close code, and records it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.closed_with: tuple[int, str] | None = None

    async def send(self, item: str, /) -> None:
        await self.inner.send(item)

    async def receive(self) -> str:
        return str(await self.inner.receive())

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if self.closed_with is None:
            self.closed_with = (code, reason)
        await self.inner.aclose()


async def test_the_flood_cut_off_closes_the_transport_with_1008(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_peer, "FLOOD_GRACE", 0.2)
    ours, theirs = memory_transport_pair()
    transport = RecordingTransport(ours)
    assert isinstance(transport, astral.Transport)
    async with theirs, astral.Peer(transport, max_inbound_calls=4) as peer:
        with pytest.raises(anyio.BrokenResourceError):
            for i in range(10_000):  # never reading the answers
                await theirs.send(encode(Call(str(i), "unknown")))
        closed = await peer.wait_closed()
        # The reason tells the user, and the remote, why the connection went.
        assert (closed.code, closed.reason) == (1008, "remote provokes replies it does not read")
    assert transport.closed_with == (1008, "remote provokes replies it does not read")


async def test_a_plain_transport_is_closed_normally() -> None:
    ours, theirs = memory_transport_pair()  # aclose() takes no arguments
    async with theirs:
        async with astral.Peer(ours) as peer:
            pass
        assert peer.closed
        with pytest.raises(anyio.EndOfStream):
            await theirs.receive()


async def test_the_asyncio_socket_is_kept_from_reading_far_ahead(anyio_backend: str) -> None:
    # The limiter reaches into AnyIO's asyncio stream; if AnyIO renames what
    # it uses, this says so instead of the bound silently going away.
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            limit = read_ahead_limiter(stream)
            if anyio_backend == "asyncio":
                assert limit is not None
                limit()  # nothing queued: nothing to pause
            else:
                assert limit is None  # trio reads only what it is asked for
