"""Behaviour that mutation testing found unpinned (round 5, second batch).

Each test pins one behaviour a planted bug ("mutant") changed without any
test noticing: the decoder's exact refusals, the send-size limit at its
boundary, the callee's deadline budget, and what the WebSocket layer says
on the wire and to its user when a remote misbehaves or closes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import anyio
import orjson
import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage

import astral
from astral import ProtocolError, Result, Yield, decode, encode
from astral._frames import MAX_ID_LENGTH, Call, Item
from astral._protocol import PeerState
from astral._websocket import WebSocketConnection, open_websocket
from astral._ws_connection import WRITE_HIGH_WATER
from astral.testing import memory_transport_pair

from .test_websocket import (
    HOST,
    Reporter,
    accept_upgrade,
    closed_with,
    frame,
    raw_client,
    raw_server,
    read_to_end,
    server,
)
from .test_ws_read_pause import Feed, open_over


@pytest.fixture
def reporter() -> Iterator[Reporter]:
    reporter = Reporter()
    with reporter.send, reporter.receive:
        yield reporter


# --- decode: what it refuses, exactly ---------------------------------------------------


def _orjson_account(text: str | bytes) -> str:
    """orjson's own account of why ``text`` is not JSON."""
    with pytest.raises(orjson.JSONDecodeError) as info:
        orjson.loads(text)
    return str(info.value)


@pytest.mark.parametrize("text", ["{", b"{", '{"type":"call",', b"[1,]", "nul"])
def test_what_is_not_json_is_refused_with_the_parsers_own_account(text: str | bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert str(info.value) == f"not valid JSON: {_orjson_account(text)}"
    assert (info.value.frame_id, info.value.frame_type) == (None, None)


def test_a_parser_failure_of_another_kind_is_still_a_protocol_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # orjson raises JSONDecodeError for every input it can be given today; the
    # decoder's contract ("ProtocolError and nothing else") also covers the
    # parser running out of memory, simulated here.
    def out_of_memory(text: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(orjson, "loads", out_of_memory)
    with pytest.raises(ProtocolError) as info:
        decode('{"type":"cancel","id":"1"}')
    assert str(info.value) == "not valid JSON: MemoryError"
    assert (info.value.frame_id, info.value.frame_type) == (None, None)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    "given", [{}, {"id": 7}, {"id": None}, {"id": ["7"]}], ids=["absent", "int", "null", "list"]
)
def test_a_frame_without_a_string_id_is_refused_naming_its_type(given: dict[str, Any]) -> None:
    obj = {"type": "yield", "output": 1, **given}
    with pytest.raises(ProtocolError) as info:
        decode(json.dumps(obj))
    assert str(info.value) == "frame has no string 'id'"
    assert (info.value.frame_id, info.value.frame_type) == (None, "yield")


def test_an_id_one_longer_than_the_limit_is_refused_naming_the_limit() -> None:
    assert MAX_ID_LENGTH == 256
    assert decode(encode(Call("i" * 256, "echo"))) == Call("i" * 256, "echo")
    with pytest.raises(ProtocolError) as info:
        decode(encode(Call("i" * 257, "echo")))
    assert str(info.value) == "frame id longer than 256 characters"
    assert (info.value.frame_id, info.value.frame_type) == (None, "call")


@pytest.mark.parametrize("error", ["5", "true", "[]", '{"m":"x"}'])
def test_a_result_error_that_is_not_a_string_is_refused_with_the_frames_id(error: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode('{"type":"result","id":"9","error":' + error + "}")
    assert str(info.value) == "result 'error' must be a string"
    assert (info.value.frame_id, info.value.frame_type) == ("9", "result")


# --- the send-size limit, at its boundary -----------------------------------------------


def _limit_of(frame: Any) -> int:
    return len(encode(frame).encode())


@pytest.mark.parametrize("char", ["x", "é", "😀"], ids=["1-byte", "2-byte", "4-byte"])
def test_an_answer_of_exactly_the_remotes_limit_is_sent_and_one_byte_more_is_not(
    char: str,
) -> None:
    exact = Yield("7", char * 64)
    limit = _limit_of(exact)  # well over a quarter of it in characters: counted exactly
    state: PeerState[object, object] = PeerState(
        {}, object, max_inbound_calls=10, max_send_size=limit
    )
    assert state.reply(exact) == (encode(exact), False)
    text, ended = state.reply(Yield("7", char * 64 + "x"))
    assert ended
    assert decode(text) == Result("7", error=f"result larger than {limit} bytes")


def test_a_call_and_an_input_item_of_exactly_the_limit_are_sent() -> None:
    call = Call("1", "echo", "é" * 40)
    limit = _limit_of(call)
    state: PeerState[object, object] = PeerState(
        {}, object, max_inbound_calls=10, max_send_size=limit
    )
    assert state.start_call("echo", "é" * 40, "handle") == ("1", encode(call))
    item = Item("1", "é" * ((limit - _limit_of(Item("1", ""))) // 2))
    assert _limit_of(item) == limit
    assert state.item("1", item.value) == encode(item)
    with pytest.raises(ProtocolError) as info:
        state.item("1", item.value + "x")
    assert str(info.value) == f"input item larger than the {limit} bytes the remote accepts"


# --- the callee's deadline budget -------------------------------------------------------


async def test_the_callees_budget_is_the_calls_milliseconds_from_its_arrival() -> None:
    seen: list[float | None] = []

    async def budget(_: Any) -> None:
        seen.append(astral.current_call().time_remaining())

    mine, theirs = memory_transport_pair()
    async with mine, theirs, astral.Peer(theirs, capabilities={"budget": budget}):
        before = anyio.current_time()
        # 1,000 seconds: whatever the machine's speed, a budget read in other
        # units (or rounded) is off by far more than the call takes.
        await mine.send('{"type":"call","id":"1","capability":"budget","deadline":1000000}')
        assert json.loads(await mine.receive()) == {"type": "result", "id": "1"}
        elapsed = anyio.current_time() - before
    [remaining] = seen
    assert remaining is not None
    assert 1000 - elapsed <= remaining <= 1000 + 1e-6


# --- the WebSocket layer: what a remote sees, and what the user is told -----------------


async def test_invalid_utf8_in_a_binary_message_is_named_in_the_close_frame(
    reporter: Reporter,
) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        closed = await closed_with(conn.receive())
        await reporter.send.send((closed.code, closed.reason))

    async with server(handler) as port, raw_client(port) as peer:
        await peer.send_frame(2, b"ok \xff\xfe")
        assert await reporter.receive.receive() == (1007, "invalid UTF-8 in binary message")
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1007, "invalid UTF-8 in binary message")


async def test_a_protocol_violation_is_named_in_the_close_frame(reporter: Reporter) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        closed = await closed_with(conn.receive())
        await reporter.send.send((closed.code, closed.reason))

    reason = "server received unexpected unmasked frame"  # wsproto's account
    async with server(handler) as port, raw_client(port) as peer:
        await peer.stream.send(frame(1, b"unmasked", masked=False))
        assert await reporter.receive.receive() == (1002, reason)
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1002, reason)
        assert await peer.next_event() is None


async def test_a_close_frame_without_a_reason_is_reported_with_the_codes_description(
    reporter: Reporter,
) -> None:
    async def handler(conn: WebSocketConnection) -> None:
        closed = await closed_with(conn.receive())
        await reporter.send.send((closed.code, closed.reason, conn.close_reason))

    async with server(handler) as port, raw_client(port) as peer:
        await peer.send_frame(8, struct.pack("!H", 1000))
        assert await reporter.receive.receive() == (1000, "normal closure", "")
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1000, "")


async def test_a_client_ignores_what_the_server_sends_after_the_close_handshake() -> None:
    answered = anyio.Event()

    async def behaviour(stream: Any) -> None:
        peer = await accept_upgrade(stream)
        await peer.send_frame(8, struct.pack("!H", 1000) + b"bye")
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        answered.set()
        # A broken server: a frame after the handshake, then it drops TCP.
        await peer.send_frame(1, b"late")
        await stream.send_eof()
        await read_to_end(stream)

    async with raw_server(behaviour) as port:
        async with open_websocket(f"ws://{HOST}:{port}/", close_timeout=5) as ws:
            closed = await closed_with(ws.receive())
            assert (closed.code, closed.reason) == (1000, "bye")
            await answered.wait()
        assert (ws.close_code, ws.close_reason) == (1000, "bye")


class _GatedFeed(Feed):
    """A :class:`Feed` whose writes complete only once ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = anyio.Event()
        self.gate = anyio.Event()

    async def send(self, item: bytes) -> None:
        self.writing.set()
        await self.gate.wait()
        await super().send(item)


async def test_send_waits_once_exactly_the_high_water_mark_is_queued() -> None:
    feed = _GatedFeed()
    release = anyio.Event()

    async def releaser() -> None:
        await release.wait()
        feed.gate.set()

    big = "b" * (WRITE_HIGH_WATER - 4)  # a server frame: 4 header bytes, unmasked
    assert len(Connection(ConnectionType.SERVER).send(TextMessage(data=big))) == WRITE_HIGH_WATER
    async with open_over(feed, max_message_size=2**17) as conn, anyio.create_task_group() as tg:
        tg.start_soon(releaser)
        await conn.send("a")
        await feed.writing.wait()  # the transport holds that write
        await conn.send(big)  # exactly WRITE_HIGH_WATER bytes now wait
        release.set()  # the write completes only once this task lets others run
        await conn.send("c")
        assert feed.gate.is_set()  # so send() waited for the transport
    assert _client_view(bytes(feed.sent)) == ["a", big, "c"]


def _client_view(data: bytes) -> list[str]:
    ws = Connection(ConnectionType.CLIENT)
    ws.receive_data(data)
    return [event.data for event in ws.events() if isinstance(event, TextMessage)]


async def test_try_send_refuses_once_exactly_the_high_water_mark_is_queued() -> None:
    feed = _GatedFeed()
    big = "b" * (WRITE_HIGH_WATER - 4)  # a server frame: 4 header bytes, unmasked
    async with open_over(feed, max_message_size=2**17) as conn:
        await conn.send("a")
        await feed.writing.wait()  # the transport holds that write
        assert conn.try_send(big)  # exactly WRITE_HIGH_WATER bytes now wait
        assert not conn.try_send("c")  # refused: the caller must use send()
        feed.gate.set()
        await conn.send("c")
    assert _client_view(bytes(feed.sent)) == ["a", big, "c"]
