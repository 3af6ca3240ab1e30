"""The registry's two hot Redis connections, speaking RESP on AnyIO streams.

Why not coredis here: a cross-process call takes four Redis steps (the
caller's publish, the delivery to the worker's process, that process's
publish of the answer, its delivery back), and coredis costs 130 - 160 µs of
CPU more per step than the socket itself (every coredis connection runs a
reader and a writer task joined to the caller by memory streams, and a
pub/sub message passes a further stream and consumer task; measured in
``docs/performance.md``). So the connection that publishes frames and the
subscription that receives this process's channel are this thin driver over
the sans-IO :mod:`astral._resp`; coredis remains the client for everything
else (presence, the Lua scripts, heartbeats, lookups, ``subjects()``).

The connections take everything from the registry's URL as coredis does:
host and port, ``rediss://`` with the registry's SSL context, ``AUTH`` with
the user and password, ``SELECT`` of the database, within the connect
timeout. Every failure is an ``OSError``, a ``TimeoutError`` or a
:class:`~astral._resp.RespError` / :class:`~astral._resp.RespProtocolError`,
which the registry counts as Redis's (``is_redis_failure``).
"""

from __future__ import annotations

import ssl
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc

from ._resp import Parser, RespError, encode

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["RespConnection", "Target"]

#: Sent before a ``PUBLISH`` whose reply nobody needs: Redis sends none.
SKIP = encode(b"CLIENT", b"REPLY", b"SKIP")


class Target:
    """Where a RESP connection goes and how it logs in, from a Redis URL.

    Args:
        url: ``redis://`` or ``rediss://`` URL, as the registry has it.
        ssl_context: The context for ``rediss://`` (``None``: the system's
            trust store, as coredis's default).
        connect_timeout: Seconds to connect and log in.
    """

    def __init__(
        self, url: str, ssl_context: ssl.SSLContext | None, connect_timeout: float
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        path = parts.path.strip("/")
        self.db = int(path) if path else 0
        self.ssl_context: ssl.SSLContext | None = None
        if parts.scheme == "rediss":
            self.ssl_context = ssl_context or ssl.create_default_context()
        self.connect_timeout = connect_timeout


class RespConnection:
    """One RESP connection: commands written as given, replies read in order."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._parser = Parser()
        self._ready: deque[Any] = deque()
        self._send_lock = anyio.Lock()
        #: For the publishing connection: the node of each ``PUBLISH`` whose
        #: reply (how many listened) is still to come, oldest first.
        self.pending: deque[str] = deque()

    @classmethod
    async def open(cls, target: Target) -> RespConnection:
        """Connect, log in and select the database.

        Raises:
            OSError: Redis cannot be reached (or TLS fails).
            TimeoutError: Not done within the connect timeout.
            RespError: Redis refused the login or the database.
        """
        with anyio.fail_after(target.connect_timeout):
            if target.ssl_context is not None:
                stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                    target.host,
                    target.port,
                    ssl_context=target.ssl_context,
                    tls_hostname=target.host,
                    tls_standard_compatible=False,
                )
            else:
                stream = await anyio.connect_tcp(target.host, target.port)
            conn = cls(stream)
            try:
                hello = []
                if target.password is not None:
                    if target.username:
                        hello.append(encode(b"AUTH", target.username, target.password))
                    else:
                        hello.append(encode(b"AUTH", target.password))
                if target.db:
                    hello.append(encode(b"SELECT", target.db))
                if hello:
                    await stream.send(b"".join(hello))
                    for _ in hello:
                        reply = await conn.reply()
                        if isinstance(reply, RespError):
                            raise reply
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
        return conn

    async def aclose(self) -> None:
        """Close the connection at once."""
        await anyio.aclose_forcefully(self._stream)

    async def send(self, data: bytes) -> None:
        """Write ``data`` (one or more encoded commands) as one send."""
        async with self._send_lock:
            await self._stream.send(data)

    async def publish(self, messages: Iterable[tuple[str, str, bytes, bool]]) -> None:
        """``PUBLISH`` every ``(node, channel, payload, wants_reply)`` in one send.

        A message without ``wants_reply`` goes after ``CLIENT REPLY SKIP``:
        Redis sends no reply to read. For the others, their node joins
        :attr:`pending`, in the order of their replies.
        """
        async with self._send_lock:
            out = []
            for node, channel, payload, wants_reply in messages:
                if wants_reply:
                    self.pending.append(node)
                else:
                    out.append(SKIP)
                out.append(encode(b"PUBLISH", channel, payload))
            await self._stream.send(b"".join(out))

    async def reply(self) -> Any:
        """The next reply (a :class:`RespError` is returned, not raised).

        Raises:
            ConnectionResetError: Redis closed the connection.
            RespProtocolError: What came is not RESP2.
        """
        while not self._ready:
            self._ready.extend(await self.replies())
        return self._ready.popleft()

    async def replies(self) -> list[Any]:
        """Every reply that has arrived, waiting for at least one.

        Raises:
            ConnectionResetError: Redis closed the connection.
            RespProtocolError: What came is not RESP2.
        """
        if self._ready:
            out = list(self._ready)
            self._ready.clear()
            return out
        parser = self._parser
        while True:
            out = parser.replies()
            if out:
                return out
            try:
                data = await self._stream.receive()
            except anyio.EndOfStream:
                raise ConnectionResetError("Redis closed the connection") from None
            except anyio.BrokenResourceError as exc:
                raise ConnectionResetError(f"the connection to Redis broke: {exc}") from None
            parser.feed(data)
