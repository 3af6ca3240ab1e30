"""Limits and comparisons pinned at their exact edges, over real sockets where it matters.

Each test here checks behaviour at a boundary (the last value accepted and the
first refused) or in an ordering the other tests do not try, so that a
plausible off-by-one or a loosened check in the library fails a test.
docs/testing.md lists the planted bugs ("mutants") these tests were written
against.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketStream
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol, Opcode

import astral
import astral.asgi
from astral._exceptions import MAX_CODE_LENGTH
from astral._frames import MAX_TRACE_FIELDS, MAX_TRACE_VALUE
from astral._principal import host_worker
from astral._websocket import WebSocketConnection, open_websocket, serve_websocket
from astral.testing import connected_pair, memory_transport_pair

from .helpers import SECRET, forge, running_principal, token

HOST = "127.0.0.1"
#: One character, four bytes in UTF-8: the widest a character gets.
EMOJI = "\U0001f600"
LIMIT = 1000  # max_message_size for the size tests, in bytes


# --- helpers: a WebSocket server that reports, and raw wsproto ends -------------------


@dataclass
class Reports:
    """What the server-side handler saw: each message, then the close code."""

    messages: anyio.abc.ObjectReceiveStream[str | int]


@asynccontextmanager
async def reporting_server(**options: Any) -> AsyncIterator[tuple[int, Reports]]:
    """serve_websocket whose handler reports every message, then its close code."""
    send, receive = anyio.create_memory_object_stream[str | int](100)

    async def handler(conn: WebSocketConnection) -> None:
        try:
            while True:
                await send.send(await conn.receive())
        except astral.ConnectionClosed as exc:
            await send.send(exc.code)

    async with send, receive, anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_websocket(
                handler, HOST, 0, task_status=task_status, **options
            )
        )
        try:
            yield port, Reports(receive)
        finally:
            tg.cancel_scope.cancel()


class RawClient:
    """A WebSocket client made of wsproto and a TCP stream: sends any frame shape."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def open(self) -> None:
        await self.stream.send(self.ws.send(Request(host=HOST, target="/")))
        while True:
            self.ws.receive_data(await self.stream.receive())
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    return
                raise AssertionError(f"upgrade refused: {event!r}")

    async def send_fragments(self, parts: list[str] | list[bytes]) -> None:
        """One message in ``len(parts)`` frames, written to the socket in one go."""
        data = b""
        for i, part in enumerate(parts):
            finished = i == len(parts) - 1
            if isinstance(part, str):
                data += self.ws.send(TextMessage(data=part, message_finished=finished))
            else:
                data += self.ws.send(BytesMessage(data=part, message_finished=finished))
        await self.stream.send(data)

    async def close_code(self) -> int | None:
        """Read until the server's close frame; return its code."""
        while True:
            data = await self.stream.receive()
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, CloseConnection):
                    return event.code


@asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[RawClient]:
    async with await anyio.connect_tcp(HOST, port) as stream:
        client = RawClient(stream)
        await client.open()
        yield client


@asynccontextmanager
async def raw_server(behaviour: Callable[[SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    """A TCP server running ``behaviour`` on each connection; yields its port."""
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


async def read_head(stream: SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive()
    return head


async def wait_gone(stream: SocketStream) -> None:
    """Read and drop whatever comes until the client has gone."""
    try:
        while True:
            await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


def accept_key(head: bytes) -> bytes:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(key + guid).digest())


# --- message size: the cheap check and the reassembled size -------------------------


@pytest.mark.parametrize(
    ("message", "accepted"),
    [
        (EMOJI * (LIMIT // 4), True),  # exactly LIMIT bytes
        (EMOJI * (LIMIT // 4) + "a", False),  # LIMIT + 1 bytes in LIMIT / 4 + 1 characters
        (EMOJI * (LIMIT // 2), False),  # 2 * LIMIT bytes in LIMIT / 2 characters
        ("a" * LIMIT, True),
        ("a" * (LIMIT + 1), False),
    ],
    ids=["4-byte-at-limit", "4-byte-limit+1", "4-byte-double", "ascii-at-limit", "ascii-limit+1"],
)
async def test_message_size_is_counted_in_utf8_bytes(message: str, accepted: bool) -> None:
    async with (
        reporting_server(max_message_size=LIMIT) as (port, reports),
        open_websocket(f"ws://{HOST}:{port}/") as ws,
    ):
        await ws.send(message)
        seen = await reports.messages.receive()
        if accepted:
            assert seen == message
        else:
            assert seen == 1009
            with pytest.raises(astral.ConnectionClosed) as info:
                await ws.receive()
            assert info.value.code == 1009


@pytest.mark.parametrize(
    ("parts", "accepted"),
    [
        (["a" * 500, "a" * 500], True),
        (["a" * 500, "a" * 500, "a"], False),
        ([EMOJI * 125, EMOJI * 125], True),
        ([EMOJI * 125, EMOJI * 125, "a"], False),
        ([EMOJI * 200, EMOJI * 51], False),
        ([b"b" * 500, b"b" * 500], True),
        ([b"b" * 500, b"b" * 501], False),
    ],
    ids=[
        "text-at-limit",
        "text-limit+1",
        "4-byte-at-limit",
        "4-byte-limit+1",
        "4-byte-limit+4",
        "binary-at-limit",
        "binary-limit+1",
    ],
)
async def test_a_fragmented_message_is_limited_by_its_reassembled_size(
    parts: list[str] | list[bytes], accepted: bool
) -> None:
    async with (
        reporting_server(max_message_size=LIMIT) as (port, reports),
        raw_client(port) as client,
    ):
        await client.send_fragments(parts)
        seen = await reports.messages.receive()
        if accepted:
            whole = "".join(p if isinstance(p, str) else p.decode() for p in parts)
            assert seen == whole
            # The count starts afresh: the same message again is accepted too.
            await client.send_fragments(parts)
            assert await reports.messages.receive() == whole
        else:
            assert seen == 1009
            assert await client.close_code() == 1009


# --- the client's check of the 101 answer --------------------------------------------


def switching(*, upgrade: bytes | None, connection: bytes | None, accept: bytes | None) -> bytes:
    lines = [b"HTTP/1.1 101 Switching Protocols"]
    if upgrade is not None:
        lines.append(b"Upgrade: " + upgrade)
    if connection is not None:
        lines.append(b"Connection: " + connection)
    if accept is not None:
        lines.append(b"Sec-WebSocket-Accept: " + accept)
    return b"\r\n".join(lines) + b"\r\n\r\n"


GOOD = {"upgrade": b"websocket", "connection": b"Upgrade"}


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ({**GOOD, "upgrade": None}, "Upgrade: websocket"),
        ({**GOOD, "upgrade": b"h2c"}, "Upgrade: websocket"),
        ({**GOOD, "connection": None}, "Connection: Upgrade"),
        ({**GOOD, "connection": b"keep-alive"}, "Connection: Upgrade"),
        ({**GOOD, "connection": b"keep-alive, Upgrades"}, "Connection: Upgrade"),
        ({**GOOD, "accept": b"bm9wZQ=="}, "Sec-WebSocket-Accept"),
        ({**GOOD, "accept": None}, "Sec-WebSocket-Accept"),
    ],
    ids=[
        "no-upgrade",
        "upgrade-h2c",
        "no-connection",
        "connection-keep-alive",
        "connection-near-miss",
        "wrong-accept",
        "no-accept",
    ],
)
async def test_the_client_refuses_a_malformed_101(answer: dict[str, Any], problem: str) -> None:
    async def server(stream: SocketStream) -> None:
        head = await read_head(stream)
        fields = {"accept": accept_key(head), **answer}
        await stream.send(switching(**fields))
        # Stay connected: the client must refuse by itself, not for lack of a peer.
        await wait_gone(stream)

    async with raw_server(server) as port:
        with pytest.raises(astral.HandshakeError, match=problem) as info:
            # close_timeout=0: if it wrongly opens, fail at once rather than
            # wait for a close handshake this server never answers.
            async with open_websocket(f"ws://{HOST}:{port}/", close_timeout=0):
                pytest.fail("opened a WebSocket on a malformed 101")
        assert info.value.status == 101


async def test_the_client_accepts_a_well_formed_101_in_any_case() -> None:
    # The control for the test above: the same server, everything right, with
    # header values in unusual case and a Connection list.
    async def server(stream: SocketStream) -> None:
        head = await read_head(stream)
        answer = switching(
            upgrade=b"WebSocket", connection=b"keep-alive, upgrade", accept=accept_key(head)
        )
        await stream.send(answer + b"\x81\x02hi")  # a text frame right behind
        frames = FrameProtocol(client=False, extensions=[])
        while True:
            frames.receive_bytes(await stream.receive())
            if any(frame.opcode is Opcode.CLOSE for frame in frames.received_frames()):
                await stream.send(frames.close(1000))
                return

    async with raw_server(server) as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        assert await ws.receive() == "hi"


# --- paths: equal, never a prefix either way ------------------------------------------


@pytest.mark.parametrize("path", ["/astralX", "/astra", "/astral-x?token=t", "/xastral"])
async def test_serve_refuses_near_miss_paths(path: str) -> None:
    async with running_principal() as principal:  # path="/astral"
        url = f"ws://{HOST}:{principal.port}{path}"
        with pytest.raises(astral.HandshakeError) as info:
            async with astral.connect(url, token=token()):
                pytest.fail(f"connected on {path}")
        assert info.value.status == 404
        assert principal.connected == []
        # The configured path itself still works.
        async with astral.connect(principal.url, token=token()) as worker:
            assert await worker.call("echo", path) == path


@pytest.mark.parametrize("path", ["/astralX", "/astra", "/xastral"])
async def test_the_asgi_app_refuses_near_miss_paths(path: str) -> None:
    app = astral.asgi.App(verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]), path="/astral")
    to_app, app_in = anyio.create_memory_object_stream[dict[str, Any]](10)
    app_out, from_app = anyio.create_memory_object_stream[dict[str, Any]](10)
    scope = {
        "type": "websocket",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": f"token={token()}".encode(),
        "headers": [],
        "client": (HOST, 4321),
        "extensions": {"websocket.http.response": {}},
    }
    async with to_app, app_in, app_out, from_app, anyio.create_task_group() as tg:
        await to_app.send({"type": "websocket.connect"})
        tg.start_soon(app, scope, app_in.receive, app_out.send)
        start = await from_app.receive()
        assert start["type"] == "websocket.http.response.start"
        assert start["status"] == 404
        tg.cancel_scope.cancel()


# --- flow control: exactly a window, and one more -------------------------------------


WINDOW = 8


def items(n: int) -> Callable[[Any], AsyncIterator[int]]:
    async def produce(_: Any) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    return produce


@pytest.mark.parametrize("n", [WINDOW - 1, WINDOW, WINDOW + 1, WINDOW + 2, 3 * WINDOW])
async def test_a_consumer_that_reads_late_gets_every_item(n: int) -> None:
    # The consumer takes nothing until the producer has sent all it may. With
    # flow control the producer stops at exactly a window; the buffer holds a
    # window plus the result, so no stream of any length overruns.
    async with connected_pair({"items": items(n)}, {}, max_buffered_items=WINDOW) as (_, b):
        async with b.stream("items", timeout=None) as stream:
            # In memory every task is local: once all are blocked, nothing
            # more can arrive until the consumer reads.
            await anyio.wait_all_tasks_blocked()
            channel = stream._channel
            # Held back by the window: at most WINDOW items, plus the result
            # once a short stream has ended.
            assert channel.buffered == (n + 1 if n <= WINDOW else WINDOW)
            assert [item async for item in stream] == list(range(n))


class Counting:
    """A producer that counts how many items it has handed over."""

    def __init__(self) -> None:
        self.handed = 0

    async def __call__(self, _: Any) -> AsyncIterator[int]:
        while True:
            yield self.handed
            self.handed += 1


async def test_an_astral_producer_stops_at_exactly_the_window() -> None:
    producer = Counting()
    async with connected_pair({"items": producer}, {}, max_buffered_items=WINDOW) as (_, b):
        async with b.stream("items", timeout=None) as stream:
            await anyio.wait_all_tasks_blocked()  # in memory: proves it sends no more
            # WINDOW items sent; the producer is suspended handing over the next.
            assert producer.handed == WINDOW
            assert stream._channel.buffered == WINDOW
            taken = [await anext(stream) for _ in range(3 * WINDOW)]
            assert taken == list(range(3 * WINDOW))
            await anyio.wait_all_tasks_blocked()  # in memory: proves it sends no more
            # Credit comes back half a window at a time, as items are taken.
            assert producer.handed == 3 * WINDOW + WINDOW


# --- a producer that ignores flow control (the original) ------------------------------


class RawAstralServer:
    """Plays the original principal: JSON frames over wsproto, no flow control."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.pending: list[dict[str, Any]] = []

    async def accept(self) -> None:
        while True:
            self.ws.receive_data(await self.stream.receive())
            for event in self.ws.events():
                assert isinstance(event, Request)
                await self.stream.send(self.ws.send(AcceptConnection()))
                return

    async def receive(self) -> dict[str, Any]:
        while not self.pending:
            self.ws.receive_data(await self.stream.receive())
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self.pending.append(json.loads(event.data))
        return self.pending.pop(0)

    async def send(self, *frames: dict[str, Any]) -> None:
        """All frames in one write, so the reader finds them in one read."""
        data = b"".join(self.ws.send(TextMessage(json.dumps(frame))) for frame in frames)
        await self.stream.send(data)

    async def answer_close(self) -> None:
        """Read until the client's close frame and answer it."""
        while True:
            self.ws.receive_data(await self.stream.receive())
            for event in self.ws.events():
                if isinstance(event, CloseConnection):
                    await self.stream.send(self.ws.send(event.response()))
                    return


@pytest.mark.parametrize("window", [4, 16])
async def test_a_producer_ignoring_flow_control_does_not_overrun_a_waiting_consumer(
    window: int,
) -> None:
    # The consumer waits for each item; the producer sends many times its
    # window in one burst. The reader must let the consumer run as the buffer
    # fills rather than deliver the whole burst first.
    burst = 6 * window
    call_ids: list[str] = []

    async def original(stream: SocketStream) -> None:
        server = RawAstralServer(stream)
        await server.accept()
        call = await server.receive()
        assert call["capability"] == "firehose"
        call_ids.append(call["id"])
        await server.send({"type": "yield", "id": call["id"], "output": 0})
        go = await server.receive()  # the consumer is waiting for item 1
        yields = [{"type": "yield", "id": call["id"], "output": i} for i in range(1, burst)]
        await server.send(
            *yields,
            {"type": "result", "id": call["id"]},
            {"type": "result", "id": go["id"], "output": "went"},
        )
        await server.answer_close()

    async with (
        raw_server(original) as port,
        astral.connect(
            f"ws://{HOST}:{port}/", max_buffered_items=window, ping_interval=None
        ) as worker,
    ):
        received: list[int] = []
        first = anyio.Event()

        async def consume() -> None:
            async with worker.stream("firehose", timeout=None) as stream:
                async for item in stream:
                    received.append(item)
                    first.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await first.wait()
            assert await worker.call("go") == "went"
        assert received == list(range(burst))


# --- the registry: whichever connection of a subject closes first ---------------------


@asynccontextmanager
async def hosted(
    registry: astral.PeerRegistry, subject: str
) -> AsyncIterator[tuple[astral.Peer, anyio.Event, Callable[[], Awaitable[None]]]]:
    """Host one worker connection in memory; yield its principal-side peer, a done
    event (set once ``host_worker`` has returned) and a way for the worker to leave."""
    principal_end, worker_end = memory_transport_pair()
    done = anyio.Event()
    connected: list[astral.Peer] = []
    listed = anyio.Event()

    async def on_connect(peer: astral.Peer) -> None:
        connected.append(peer)
        listed.set()

    async def close(code: int, reason: str) -> None:
        await principal_end.aclose()

    async def host() -> None:
        try:
            await host_worker(
                principal_end,
                close,
                {"sub": subject},
                capabilities={},
                registry=registry,
                on_connect=on_connect,
                where="memory",
            )
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(host)
        await listed.wait()
        yield connected[0], done, worker_end.aclose
        await worker_end.aclose()


@pytest.mark.parametrize("first_to_leave", ["older", "newer"])
async def test_a_subjects_connections_may_close_in_either_order(first_to_leave: str) -> None:
    registry = astral.PeerRegistry()
    async with hosted(registry, "w") as (older, older_done, older_leave):
        assert registry["w"] is older
        async with hosted(registry, "w") as (newer, newer_done, newer_leave):
            assert registry["w"] is newer  # the newest connection wins
            assert (list(registry), len(registry)) == (["w"], 1)
            if first_to_leave == "older":
                await older_leave()
                await older_done.wait()
                # The live, newer connection stays listed.
                assert registry["w"] is newer
                assert await registry.wait_for("w") is newer
                await newer_leave()
                await newer_done.wait()
            else:
                await newer_leave()
                await newer_done.wait()
                # The older one is not listed again: it was replaced.
                assert "w" not in registry
                assert not older.closed
                await older_leave()
                await older_done.wait()
            assert "w" not in registry
            assert len(registry) == 0


# --- token times at the leeway's edge ---------------------------------------------------


NOW = 1_700_000_000.0
LEEWAY = 30.0


def verifier() -> astral.JWTVerifier:
    return astral.JWTVerifier(SECRET, algorithms=["HS256"], leeway=LEEWAY, clock=lambda: NOW)


@pytest.mark.parametrize(
    ("claim", "ahead_by", "accepted"),
    [
        ("nbf", LEEWAY, True),
        ("nbf", LEEWAY + 0.5, False),
        ("iat", LEEWAY, True),
        ("iat", LEEWAY + 0.5, False),
    ],
)
def test_times_exactly_at_the_leeway_are_accepted(
    claim: str, ahead_by: float, accepted: bool
) -> None:
    claims = {"sub": "w", "exp": NOW + 300, claim: NOW + ahead_by}
    signed = forge({"alg": "HS256", "typ": "JWT"}, claims, SECRET)
    if accepted:
        assert verifier().verify(signed)[claim] == NOW + ahead_by
    else:
        with pytest.raises(astral.AuthenticationError, match=r"not yet valid|in the future"):
            verifier().verify(signed)


@pytest.mark.time_limit(5)
async def test_every_task_waiting_for_a_subject_gets_its_peer() -> None:
    registry = astral.PeerRegistry()
    found: list[astral.Peer] = []
    both = anyio.Event()

    async def waiter(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        found.append(await registry.wait_for("w"))
        if len(found) == 2:
            both.set()

    async with anyio.create_task_group() as tg:
        await tg.start(waiter)
        await tg.start(waiter)
        async with hosted(registry, "w") as (peer, _, _):
            await both.wait()
    assert found == [peer, peer]


# --- a call's trace context: its limits, and a bad one costs only itself -------------


def call_with_trace(trace: object, input_json: str = "1") -> str:
    return (
        '{"type":"call","id":"t","capability":"f","input":' + input_json + ","
        '"trace":' + json.dumps(trace) + "}"
    )


@pytest.mark.parametrize(
    ("trace", "kept"),
    [
        ({f"k{i}": "v" for i in range(MAX_TRACE_FIELDS)}, True),
        ({f"k{i}": "v" for i in range(MAX_TRACE_FIELDS + 1)}, False),
        ({"k" * 256: "v"}, True),
        ({"k" * 257: "v"}, False),
        ({"traceparent": "v" * MAX_TRACE_VALUE}, True),
        ({"traceparent": "v" * (MAX_TRACE_VALUE + 1)}, False),
    ],
    ids=[
        "fields-at-limit",
        "fields-over",
        "key-at-limit",
        "key-over",
        "value-at-limit",
        "value-over",
    ],
)
def test_a_trace_is_kept_up_to_its_limits_and_dropped_past_them(
    trace: dict[str, str], kept: bool
) -> None:
    frame = astral.decode(call_with_trace(trace))
    assert isinstance(frame, astral.Call)
    assert (frame.id, frame.capability, frame.input) == ("t", "f", 1)
    assert frame.trace == (trace if kept else None)


@pytest.mark.parametrize(
    "bad_trace",
    [
        '{"traceparent":18446744073709551617}',
        '{"traceparent":NaN}',
        '{"x":' + "[" * 100 + "]" * 100 + "}",
    ],
    ids=["beyond-64-bits", "nan", "too-deep"],
)
def test_a_trace_breaking_the_value_rules_is_dropped_and_the_call_delivered(bad_trace: str) -> None:
    text = '{"type":"call","id":"t","capability":"f","input":[1,"x"],"trace":' + bad_trace + "}"
    for given in (text, text.encode()):
        frame = astral.decode(given)
        assert frame == astral.Call("t", "f", [1, "x"])


def test_a_call_whose_input_breaks_the_value_rules_is_refused_trace_or_not() -> None:
    bad_trace = ',"trace":{"traceparent":18446744073709551617}'
    for extra in ("", ',"trace":{"traceparent":"ok"}', bad_trace):
        text = '{"type":"call","id":"t","capability":"f","input":18446744073709551617' + extra + "}"
        with pytest.raises(astral.ProtocolError) as info:
            astral.decode(text)
        assert (info.value.frame_id, info.value.frame_type) == ("t", "call")


@pytest.mark.parametrize("value", [2**64, -(2**64)], ids=["2**64", "-2**64"])
def test_an_integer_of_exactly_65_bits_is_refused_on_receipt(value: int) -> None:
    # JavaScript writes 2**64 as 18446744073709552000: not the same number.
    with pytest.raises(astral.ProtocolError, match="beyond 64 bits"):
        astral.decode(f'{{"type":"yield","id":"1","output":{value}}}')
    # One less in magnitude is within 64 bits, and read exactly.
    inside = value - 1 if value > 0 else value + 1
    assert astral.decode(f'{{"type":"yield","id":"1","output":{inside}}}') == astral.Yield(
        "1", inside
    )


async def test_an_upload_stops_at_exactly_the_window_and_resumes_as_items_are_taken() -> None:
    handed: list[int] = []
    take = anyio.Event()
    taken: list[int] = []

    async def produce() -> AsyncIterator[int]:
        i = 0
        while True:
            handed.append(i)
            yield i
            i += 1

    async def reader(_: Any, items: AsyncIterator[int]) -> None:
        await take.wait()
        async for item in items:
            taken.append(item)
            if len(taken) == 3 * WINDOW:
                await anyio.sleep_forever()

    async with connected_pair({"reader": reader}, {}, max_buffered_items=WINDOW) as (_, b):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: b.call("reader", None, input_stream=produce(), timeout=None))
            await anyio.wait_all_tasks_blocked()  # in memory: proves it sends no more
            # Exactly WINDOW items taken from the producer: it waits for credit.
            assert len(handed) == WINDOW
            take.set()
            await anyio.wait_all_tasks_blocked()  # in memory: proves it sends no more
            assert taken == list(range(3 * WINDOW))
            # Credit came back as items were taken: a window ahead, no more.
            assert len(handed) == 3 * WINDOW + WINDOW
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("window", [1, 2, 3])
async def test_an_upload_completes_with_the_smallest_windows(window: int) -> None:
    """Credit goes back for every item taken when the window is one: no stall."""

    async def produce() -> AsyncIterator[int]:
        for i in range(4 * window + 1):
            yield i

    async def total(_: Any, items: AsyncIterator[int]) -> list[int]:
        return [item async for item in items]

    async with connected_pair({"total": total}, {}, max_buffered_items=window) as (_, b):
        got = await b.call("total", None, input_stream=produce(), timeout=None)
    assert got == list(range(4 * window + 1))


@pytest.mark.parametrize("length", [1, MAX_CODE_LENGTH, MAX_CODE_LENGTH + 1])
def test_an_error_code_is_kept_up_to_its_limit_and_dropped_past_it(length: int) -> None:
    """A ``code`` past the limit is dropped; the error itself still ends the call."""
    code = "c" * length
    frame = astral.decode(json.dumps({"type": "result", "id": "1", "error": "no", "code": code}))
    assert frame == astral.Result("1", error="no", code=code if length <= MAX_CODE_LENGTH else None)
