"""RESP2, the Redis protocol, without I/O: commands out, replies in.

The cluster registry's two hot connections (the one that publishes frames
to other processes, and the subscription that receives this process's) speak
RESP themselves (see ``astral._cluster_wire``); everything else goes through
coredis. :func:`encode` writes a command as an array of bulk strings;
:class:`Parser` takes bytes as they arrive, in pieces of any size, and
returns each whole reply: a simple string (``str``), an error
(:class:`RespError`, returned, not raised: it is one reply among others),
an integer, a bulk string (``bytes``), an array (``list``, nested as deep
as Redis nests it), or ``None`` (a null bulk string or array).

Sizes are bounded: a line (a simple string, an error, a length) longer than
:data:`MAX_LINE`, a bulk string longer than ``max_bulk``, an array of more
than :data:`MAX_ITEMS` items or nested deeper than :data:`MAX_DEPTH` is a
:class:`RespProtocolError`, as is any byte that is not RESP2.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_LINE",
    "Parser",
    "RespError",
    "RespProtocolError",
    "encode",
]

#: Longest line (simple string, error or length) accepted.
MAX_LINE = 64 * 1024
#: Most items in one array.
MAX_ITEMS = 1024 * 1024
#: Deepest nesting of arrays.
MAX_DEPTH = 32
#: Longest bulk string accepted by default (Redis's own limit is 512 MiB).
MAX_BULK = 512 * 1024 * 1024


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-WRONGPASS ...``)."""


class RespProtocolError(Exception):
    """Bytes from Redis that are not RESP2, or exceed a bound."""


def encode(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings.

    Args:
        *args: The command and its arguments (``str`` is sent as UTF-8).

    Returns:
        The bytes to send.
    """
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = (
            arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
        )
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


class Parser:
    """Replies from a stream of bytes, however it is cut.

    Args:
        max_bulk: The longest bulk string accepted.
    """

    def __init__(self, max_bulk: int = MAX_BULK) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._max_bulk = max_bulk

    def feed(self, data: bytes) -> None:
        """Add bytes as they arrived."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def replies(self) -> list[Any]:
        """Every whole reply fed so far, oldest first; a partial one waits.

        Raises:
            RespProtocolError: The bytes are not RESP2 or exceed a bound;
                the stream cannot be read further.
        """
        out: list[Any] = []
        while True:
            start = self._pos
            try:
                reply = self._read(0)
            except _Incomplete:
                self._pos = start
                return out
            out.append(reply)

    def _line(self) -> bytes:
        buf = self._buf
        end = buf.find(b"\r\n", self._pos)
        if end < 0:
            if len(buf) - self._pos > MAX_LINE:
                raise RespProtocolError("a RESP line is too long")
            raise _Incomplete
        if end - self._pos > MAX_LINE:
            raise RespProtocolError("a RESP line is too long")
        line = bytes(buf[self._pos : end])
        self._pos = end + 2
        return line

    def _length(self, line: bytes, limit: int, what: str) -> int:
        try:
            n = int(line[1:])
        except ValueError:
            raise RespProtocolError(f"a RESP {what} length is not a number") from None
        if n < -1:
            raise RespProtocolError(f"a RESP {what} length is negative")
        if n > limit:
            raise RespProtocolError(f"a RESP {what} is too long ({n})")
        return n

    def _read(self, depth: int) -> Any:
        line = self._line()
        kind = line[:1]
        if kind == b"$":
            n = self._length(line, self._max_bulk, "bulk string")
            if n < 0:
                return None
            end = self._pos + n
            if len(self._buf) < end + 2:
                raise _Incomplete
            if self._buf[end : end + 2] != b"\r\n":
                raise RespProtocolError("a RESP bulk string does not end with CRLF")
            value = bytes(self._buf[self._pos : end])
            self._pos = end + 2
            return value
        if kind == b"*":
            n = self._length(line, MAX_ITEMS, "array")
            if n < 0:
                return None
            if depth >= MAX_DEPTH:
                raise RespProtocolError("RESP arrays nested too deep")
            return [self._read(depth + 1) for _ in range(n)]
        if kind == b":":
            try:
                return int(line[1:])
            except ValueError:
                raise RespProtocolError("a RESP integer is not a number") from None
        if kind == b"+":
            return line[1:].decode(errors="replace")
        if kind == b"-":
            return RespError(line[1:].decode(errors="replace"))
        raise RespProtocolError(f"not a RESP2 reply: {bytes(line[:16])!r}")


class _Incomplete(Exception):
    pass
