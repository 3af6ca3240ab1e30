"""The WebSocket reader stops reading when messages pile up unread, and resumes.

A connection whose application does not call ``receive()`` must not buffer
without bound: once ``_recv_high`` characters (plus a per-message overhead)
wait, the reader stops pulling bytes from the stream (TCP then pushes back on
the sender), and it starts again only once ``receive()`` has brought the queue
below ``_recv_low``. Here the connection runs over an in-memory byte stream
that counts what the reader has pulled, one frame per read, so "stopped
reading" is a number, not a sender blocked on a timer. Every task is local, so
once all are blocked nothing more can happen until the test acts.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage

import astral
from astral._ws_connection import MESSAGE_OVERHEAD, WebSocketConnection

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable


class Feed(anyio.abc.ByteStream):
    """An in-memory stream: hands the reader one queued frame per read."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.taken = 0  # frames the reader has pulled
        self.sent = bytearray()
        self._more = anyio.Event()
        self._eof = False

    def push(self, *frames: bytes) -> None:
        self.frames.extend(frames)
        self._more.set()

    def end(self) -> None:
        self._eof = True
        self._more.set()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while self.taken >= len(self.frames):
            if self._eof:
                raise anyio.EndOfStream
            self._more = anyio.Event()
            await self._more.wait()
        data = self.frames[self.taken]
        assert len(data) <= max_bytes
        self.taken += 1
        return data

    async def send(self, item: bytes) -> None:
        self.sent += item

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.end()


@asynccontextmanager
async def open_over(feed: Feed, max_message_size: int) -> AsyncIterator[WebSocketConnection]:
    conn = WebSocketConnection(
        feed,
        Connection(ConnectionType.SERVER),
        request=None,
        remote_address=None,
        ping_interval=None,
        ping_timeout=None,
        close_timeout=1.0,
        max_message_size=max_message_size,
    )
    async with conn._run():
        yield conn


def text_frames(count: int, chars: str) -> list[bytes]:
    client = Connection(ConnectionType.CLIENT)
    return [client.send(TextMessage(data=f"{i:04d}{chars}")) for i in range(count)]


def binary_frames(count: int, chars: str) -> list[bytes]:
    """Whole messages sent as binary: reassembled and decoded, not the text fast path."""
    client = Connection(ConnectionType.CLIENT)
    return [client.send(BytesMessage(data=f"{i:04d}{chars}".encode())) for i in range(count)]


@pytest.mark.parametrize(
    ("make", "char"),
    [(text_frames, "a"), (text_frames, "\U0001f600"), (binary_frames, "\u00e9")],
    ids=["text-ascii", "text-4-byte", "binary-2-byte"],
)
async def test_the_reader_pauses_at_the_high_mark_and_resumes_below_the_low(
    make: Callable[[int, str], list[bytes]], char: str
) -> None:
    feed = Feed()
    async with open_over(feed, max_message_size=4096) as conn:
        high, low = conn._recv_high, conn._recv_low
        assert (high, low) == (65536, 32768)  # max(max_message_size, READ_SIZE), half of it
        # Each message costs exactly 1,024 of the budget (characters, not
        # bytes, plus the overhead): the marks fall on message boundaries.
        per_message = 1024
        chars = char * (per_message - MESSAGE_OVERHEAD - 4)
        total = 3 * high // per_message
        feed.push(*make(total, chars))
        await anyio.wait_all_tasks_blocked()  # in memory: the reader has stopped
        # Exactly at the high mark it stops (not one message before, not after).
        assert feed.taken == high // per_message
        received: list[str] = []
        # Taking messages down to exactly the low mark does not wake it...
        while len(received) < (high - low) // per_message:
            received.append(await conn.receive())
            await anyio.wait_all_tasks_blocked()  # in memory: proves it reads no more
            assert feed.taken == high // per_message
        # ...one below it does, and it reads until the high mark again.
        received.append(await conn.receive())
        await anyio.wait_all_tasks_blocked()  # in memory: the reader has resumed, or not
        assert feed.taken == high // per_message + (high - low) // per_message + 1
        # Nothing is lost or reordered across the pauses.
        while len(received) < total:
            received.append(await conn.receive())
        assert received == [f"{i:04d}{chars}" for i in range(total)]
        await anyio.wait_all_tasks_blocked()  # in memory: the reader has resumed, or not
        assert feed.taken == total


async def test_a_paused_reader_still_ends_when_the_connection_closes() -> None:
    feed = Feed()
    async with open_over(feed, max_message_size=4096) as conn:
        feed.push(*text_frames(200, "x" * 956))
        await anyio.wait_all_tasks_blocked()  # in memory: the reader is done
        assert feed.taken == 64
        client = Connection(ConnectionType.CLIENT)
        feed.push(client.send(CloseConnection(code=1000)))
        # Reading the queued messages lets the reader resume and see the close.
        count = 0
        with pytest.raises(astral.ConnectionClosed) as info:
            while True:
                await conn.receive()
                count += 1
        assert info.value.code == 1000
        assert count == 200
