"""The sans-IO RESP2 encoder and parser (astral._resp), without Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
import sniffio

from astral import _resp
from astral._cluster_wire import RespConnection, Target
from astral._resp import Parser, RespError, RespProtocolError, encode

from .helpers import eventually


def _backend() -> str:
    return sniffio.current_async_library()


# Every kind of reply, in one stream, with what it parses to.
STREAM = (
    b"+OK\r\n"
    b"-WRONGPASS invalid username-password pair\r\n"
    b":42\r\n"
    b":-7\r\n"
    b"$5\r\nhel\r\n\r\n"
    b"$0\r\n\r\n"
    b"$-1\r\n"
    b"*-1\r\n"
    b"*0\r\n"
    b"*3\r\n$7\r\nmessage\r\n$4\r\nch:1\r\n$2\r\n[]\r\n"
    b"*2\r\n*2\r\n:1\r\n*1\r\n+x\r\n$-1\r\n"
)


def expected() -> list[Any]:
    return [
        "OK",
        ("error", "WRONGPASS invalid username-password pair"),
        42,
        -7,
        b"hel\r\n",
        b"",
        None,
        None,
        [],
        [b"message", b"ch:1", b"[]"],
        [[1, ["x"]], None],
    ]


def normal(replies: list[Any]) -> list[Any]:
    return [("error", str(r)) if isinstance(r, RespError) else r for r in replies]


def test_encode_writes_bulk_strings() -> None:
    assert encode(b"PUBLISH", "ch:é", 12) == (
        b"*3\r\n$7\r\nPUBLISH\r\n$5\r\nch:\xc3\xa9\r\n$2\r\n12\r\n"
    )
    assert Parser().replies() == []
    parser = Parser()
    parser.feed(encode(b"SET", b"k\r\nv"))
    assert parser.replies() == [[b"SET", b"k\r\nv"]]


def test_all_at_once() -> None:
    parser = Parser()
    parser.feed(STREAM)
    assert normal(parser.replies()) == expected()
    assert parser.replies() == []


@pytest.mark.parametrize("split", range(1, len(STREAM)))
def test_cut_at_every_point(split: int) -> None:
    parser = Parser()
    parser.feed(STREAM[:split])
    first = parser.replies()
    parser.feed(STREAM[split:])
    assert normal(first + parser.replies()) == expected()


def test_one_byte_at_a_time() -> None:
    parser = Parser()
    got: list[Any] = []
    for i in range(len(STREAM)):
        parser.feed(STREAM[i : i + 1])
        got += parser.replies()
    assert normal(got) == expected()


@pytest.mark.parametrize(
    "data",
    [
        b"?what\r\n",
        b"$abc\r\n",
        b"$-2\r\n",
        b"*x\r\n",
        b":1.5\r\n",
        b"$3\r\nabcde\r\n",
    ],
)
def test_what_is_not_resp2_is_refused(data: bytes) -> None:
    parser = Parser()
    parser.feed(data)
    with pytest.raises(RespProtocolError):
        parser.replies()


def test_bounds() -> None:
    parser = Parser(max_bulk=10)
    parser.feed(b"$11\r\n")
    with pytest.raises(RespProtocolError, match="too long"):
        parser.replies()
    parser = Parser(max_bulk=10)
    parser.feed(b"$10\r\n0123456789\r\n")
    assert parser.replies() == [b"0123456789"]

    parser = Parser()
    parser.feed(b"+" + b"x" * (_resp.MAX_LINE + 1))  # no end of line yet
    with pytest.raises(RespProtocolError, match="line is too long"):
        parser.replies()

    parser = Parser()
    parser.feed(b"*%d\r\n" % (_resp.MAX_ITEMS + 1))
    with pytest.raises(RespProtocolError, match="too long"):
        parser.replies()

    parser = Parser()
    parser.feed(b"*1\r\n" * (_resp.MAX_DEPTH + 1) + b":1\r\n")
    with pytest.raises(RespProtocolError, match="nested"):
        parser.replies()
    parser = Parser()
    parser.feed(b"*1\r\n" * _resp.MAX_DEPTH + b":1\r\n")
    reply = parser.replies()[0]
    for _ in range(_resp.MAX_DEPTH):
        reply = reply[0]
    assert reply == 1


def test_a_partial_bulk_string_longer_than_a_line_waits() -> None:
    parser = Parser()
    body = b"y" * (_resp.MAX_LINE * 2)
    parser.feed(b"$%d\r\n" % len(body) + body[:-5])
    assert parser.replies() == []
    parser.feed(body[-5:] + b"\r\n")
    assert parser.replies() == [body]


# -- the driver (astral._cluster_wire) against a stand-in Redis on a real socket


@asynccontextmanager
async def stand_in(
    handler: Callable[[anyio.abc.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 running ``handler`` per connection; yields its port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def run(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await handler(stream)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, run)
            yield port
            tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


async def test_login_and_database_then_a_large_write_waits_for_the_socket() -> None:
    size = 32 * 1024 * 1024  # far beyond what a socket buffer takes at once
    got = bytearray()
    done = anyio.Event()

    async def redis(stream: anyio.abc.SocketStream) -> None:
        parser = Parser()
        hello: list[Any] = []
        while len(hello) < 2:
            parser.feed(await stream.receive())
            hello += parser.replies()
        assert hello == [[b"AUTH", b"u", b"p w"], [b"SELECT", b"5"]]
        await stream.send(b"+OK\r\n+OK\r\n")
        while len(got) < size:
            got.extend(await stream.receive())
        done.set()
        await stream.send(b":1\r\n")

    async with stand_in(redis) as port:
        conn = await RespConnection.open(Target(f"redis://u:p%20w@127.0.0.1:{port}/5", None, 5))
        try:
            assert conn.direct
            conn.write(b"x" * size)  # more than the socket takes at once
            assert not conn.idle
            assert not conn.direct
            await conn.drain()
            assert conn.idle
            await done.wait()
            assert got == b"x" * size
            assert await conn.reply() == 1
        finally:
            await conn.aclose()


async def test_a_reply_that_comes_while_nobody_reads_is_read_later() -> None:
    # On asyncio the connection keeps the socket watched by the event loop
    # between reads, and stops watching it when it is readable while nobody
    # reads (else the loop would call back on every turn); either way every
    # reply is read, whenever it comes.
    async def redis(stream: anyio.abc.SocketStream) -> None:
        await stream.send(b":1\r\n")
        await stream.receive()  # the client read the first reply
        await stream.send(b":2\r\n")
        await stream.receive()

    async with stand_in(redis) as port:
        conn = await RespConnection.open(Target(f"redis://127.0.0.1:{port}", None, 5))
        try:
            assert await conn.reply() == 1
            await conn.send(b"+next\r\n")
            if _backend() == "asyncio":
                # ":2" comes while nobody reads: the loop stops watching.
                await eventually(lambda: conn._loop is None)
            assert await conn.reply() == 2
            await conn.send(b"+bye\r\n")
        finally:
            await conn.aclose()


async def test_closing_the_connection_ends_a_read_that_waits() -> None:
    async def redis(stream: anyio.abc.SocketStream) -> None:
        # Nothing is ever sent: the client's read can only end by closing.
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await stream.receive()

    async with stand_in(redis) as port:
        conn = await RespConnection.open(Target(f"redis://127.0.0.1:{port}", None, 5))
        failed: list[BaseException] = []

        async def read() -> None:
            try:
                await conn.reply()
            except (OSError, anyio.ClosedResourceError) as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            if _backend() == "asyncio":
                await eventually(lambda: conn._waiter is not None)
            else:
                await anyio.wait_all_tasks_blocked()  # nothing comes: the reader waits
            await conn.aclose()
        assert len(failed) == 1


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (b"-WRONGPASS invalid username-password pair\r\n", RespError, "WRONGPASS"),
        (b"", ConnectionResetError, "closed the connection"),
        (b"HTTP/1.1 400 Bad Request\r\n", RespProtocolError, "not a RESP2 reply"),
    ],
)
async def test_a_refused_login_a_closed_or_foreign_server_is_a_clear_error(
    answer: bytes, error: type[Exception], match: str
) -> None:
    async def redis(stream: anyio.abc.SocketStream) -> None:
        await stream.receive()
        if answer:
            await stream.send(answer)
        await stream.aclose()

    async with stand_in(redis) as port:
        with pytest.raises(error, match=match):
            await RespConnection.open(Target(f"redis://:pw@127.0.0.1:{port}/0", None, 5))


async def test_nobody_listening_is_an_oserror() -> None:
    async def redis(stream: anyio.abc.SocketStream) -> None:
        await stream.aclose()

    async with stand_in(redis) as port:
        pass  # the port is free again
    with pytest.raises(OSError, match=r"127\.0\.0\.1"):
        await RespConnection.open(Target(f"redis://127.0.0.1:{port}", None, 5))
