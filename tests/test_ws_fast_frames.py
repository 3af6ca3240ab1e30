"""The reader's own parse of plain text frames, beside wsproto (issue #10).

``WebSocketConnection._take_plain_frames`` takes whole, unfragmented text
frames straight from a read and leaves everything else to wsproto. These
tests send bursts of raw frames in one write, so that plain frames, control
frames, fragments, split frames and bad frames meet in the same read, and
check that what comes out is what wsproto alone would make of it: the same
messages in the same order, the same answers, the same close codes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import anyio
import pytest
from wsproto.events import CloseConnection, Pong

from astral._websocket import WebSocketConnection, open_websocket

from .test_websocket import (
    Reporter,
    accept_upgrade,
    frame,
    raw_client,
    raw_server,
    server,
)

pytestmark = pytest.mark.anyio

# Lengths on each side of the 7-, 16- and 64-bit length encodings.
SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


@pytest.fixture
def reporter() -> Iterator[Reporter]:
    reporter = Reporter()
    with reporter.send, reporter.receive:
        yield reporter


def collect(reporter: Reporter, count: int) -> Callable[[WebSocketConnection], Awaitable[None]]:
    async def handler(conn: WebSocketConnection) -> None:
        for _ in range(count):
            await reporter.send.send(await conn.receive())

    return handler


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    return frame(opcode, payload, fin=fin, masked=True)


@pytest.mark.parametrize("reader_task", [True, False], ids=["receive", "deliver"])
async def test_a_burst_of_plain_frames_of_every_length_encoding(
    reporter: Reporter, reader_task: bool
) -> None:
    texts = [("é" if n % 2 else "x") * (n // 2 if n % 2 else n) for n in SIZES]
    burst = b"".join(masked_frame(1, text.encode()) for text in texts)

    if reader_task:
        handler = collect(reporter, len(texts))
    else:

        async def handler(conn: WebSocketConnection) -> None:
            async def on_message(text: str) -> None:
                await reporter.send.send(text)

            await conn.deliver(on_message, lambda exc: None)

    async with server(handler, reader_task=reader_task) as port, raw_client(port) as peer:
        await peer.stream.send(burst)
        got = [await reporter.receive.receive() for _ in texts]
    assert got == texts


async def test_control_frames_and_fragments_between_plain_frames_keep_their_order(
    reporter: Reporter,
) -> None:
    burst = (
        masked_frame(1, b"one")
        + masked_frame(9, b"ping!")
        + masked_frame(1, b"two")
        + masked_frame(1, b"thr", fin=False)
        + masked_frame(0, b"ee")
        + masked_frame(1, b"four")
        + masked_frame(2, "fünf".encode())  # binary: wsproto's, decoded as UTF-8
        + masked_frame(1, b"six")
    )
    async with server(collect(reporter, 6)) as port, raw_client(port) as peer:
        await peer.stream.send(burst)
        got = [await reporter.receive.receive() for _ in range(6)]
        pong = await peer.next_event()
    assert got == ["one", "two", "three", "four", "fünf", "six"]
    assert isinstance(pong, Pong)
    assert pong.payload == b"ping!"


async def test_frames_split_across_reads_are_whole_when_delivered(reporter: Reporter) -> None:
    texts = [f"message {i} " + "y" * (i * 997 % 3000) for i in range(40)]
    data = b"".join(masked_frame(1, text.encode()) for text in texts)
    async with server(collect(reporter, len(texts))) as port, raw_client(port) as peer:
        # Cut at awkward places: inside headers, masks and payloads.
        step = 1
        pos = 0
        while pos < len(data):
            step = step * 7 % 1013 + 1
            await peer.stream.send(data[pos : pos + step])
            pos += step
        got = [await reporter.receive.receive() for _ in texts]
    assert got == texts


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (masked_frame(1, b"ok \xff not utf-8"), 1007),
        (frame(1, b"unmasked", masked=False), 1002),
        (bytes([0xC1, 0x80]) + b"\0\0\0\0", 1002),  # an RSV bit, no extension
        (bytes([0x81, 0x80 | 126, 0x00, 0x05]) + b"\0\0\0\0" + b"hello", 1002),  # 16 bits for 5
    ],
    ids=["invalid-utf8", "unmasked", "rsv-bit", "non-minimal-length"],
)
async def test_a_bad_frame_after_plain_ones_is_judged_by_wsproto(
    reporter: Reporter, bad: bytes, code: int
) -> None:
    async with server(collect(reporter, 2)) as port, raw_client(port) as peer:
        await peer.stream.send(masked_frame(1, b"first") + masked_frame(1, b"second") + bad)
        got = [await reporter.receive.receive() for _ in range(2)]
        event = await peer.next_event()
        while event is not None and not isinstance(event, CloseConnection):
            event = await peer.next_event()
    assert got == ["first", "second"]
    assert isinstance(event, CloseConnection)
    assert event.code == code


async def test_an_oversized_plain_frame_closes_with_1009(reporter: Reporter) -> None:
    async with (
        server(collect(reporter, 1), max_message_size=1000) as port,
        raw_client(port) as peer,
    ):
        await peer.stream.send(masked_frame(1, b"small") + masked_frame(1, b"z" * 1001))
        assert await reporter.receive.receive() == "small"
        event = await peer.next_event()
        while event is not None and not isinstance(event, CloseConnection):
            event = await peer.next_event()
    assert isinstance(event, CloseConnection)
    assert event.code == 1009


async def test_a_client_reads_plain_frames_from_a_server() -> None:
    # The client side: frames must come unmasked; the same parse applies.
    texts = ["a" * n for n in SIZES]

    async def behaviour(stream: anyio.abc.SocketStream) -> None:
        await accept_upgrade(
            stream, after=b"".join(frame(1, t.encode(), masked=False) for t in texts)
        )
        await anyio.sleep_forever()

    async with (
        raw_server(behaviour) as port,
        open_websocket(f"ws://127.0.0.1:{port}/", close_timeout=0.1) as ws,
    ):
        got = [await ws.receive() for _ in texts]
    assert got == texts
