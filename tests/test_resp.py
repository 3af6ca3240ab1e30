"""The sans-IO RESP2 encoder and parser (astral._resp), without Redis."""

from __future__ import annotations

from typing import Any

import pytest

from astral import _resp
from astral._resp import Parser, RespError, RespProtocolError, encode

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
