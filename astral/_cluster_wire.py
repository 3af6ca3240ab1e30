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

import asyncio
import errno
import os
import socket
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc
import anyio.lowlevel

from ._resp import Parser, RespError, encode
from ._ws_connection import cap_asyncio_reads

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["RespConnection", "Target"]

#: Bytes read from the socket at once. Python allocates the whole buffer for
#: every read: above glibc's mmap threshold (128 KiB) each read would map and
#: unmap it (about 10 µs a read, measured), so stay under it.
RECEIVE_SIZE = 64 * 1024
#: Reads in a row without waiting, before the reader lets other tasks run.
READS_BEFORE_YIELD = 16
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
    """One RESP connection: commands written as given, replies read in order.

    Plain TCP is a non-blocking socket of its own, read when the event loop
    says it is readable and written at once (:meth:`write` is synchronous,
    so a frame can be published by the task that posts it, without waking
    another). ``rediss://`` goes through an AnyIO TLS stream, written by
    :meth:`drain`.
    """

    def __init__(self, sock: socket.socket | None, stream: anyio.abc.ByteStream | None) -> None:
        self._sock = sock
        self._stream = stream
        self._parser = Parser()
        self._ready: deque[Any] = deque()
        self._out = bytearray()
        self._broken: OSError | None = None
        self._drain_lock = anyio.Lock()
        self._reads = 0
        #: asyncio only: the event loop watches the socket for as long as
        #: reads keep coming (see :meth:`_wait_readable`), ``None`` otherwise.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: For the publishing connection: the node of each ``PUBLISH`` whose
        #: reply (how many listened) is still to come, oldest first.
        self.pending: deque[str] = deque()
        self._pending_waiter: anyio.Event | None = None

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
                stream = await anyio.connect_tcp(
                    target.host,
                    target.port,
                    ssl_context=target.ssl_context,
                    tls_hostname=target.host,
                    tls_standard_compatible=False,
                )
                cap_asyncio_reads(stream, RECEIVE_SIZE)
                conn = cls(None, stream)
            else:
                conn = cls(await _connect(target.host, target.port), None)
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
                    await conn.send(b"".join(hello))
                    for _ in hello:
                        reply = await conn.reply()
                        if isinstance(reply, RespError):
                            raise reply
            except BaseException:
                await conn.aclose()
                raise
        return conn

    async def aclose(self) -> None:
        """Close the connection at once."""
        if self._stream is not None:
            await anyio.aclose_forcefully(self._stream)
        elif self._sock is not None and self._sock.fileno() >= 0:
            self._unwatch()
            anyio.notify_closing(self._sock)
            self._sock.close()

    @property
    def direct(self) -> bool:
        """Whether :meth:`write` sends at once (plain TCP, nothing waiting)."""
        return self._stream is None and not self._out and self._broken is None

    @property
    def idle(self) -> bool:
        """Whether everything written has been sent (and the connection is whole)."""
        return not self._out and self._broken is None

    def write(self, data: bytes) -> None:
        """Send ``data`` now if the socket takes it; keep the rest for :meth:`drain`."""
        if self._out or self._sock is None or self._broken is not None:
            self._out += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._broken = exc
            sent = 0
        if sent < len(data):
            self._out += data[sent:]

    def write_publish(self, node: str, channel: str, payload: bytes, wants_reply: bool) -> None:
        """Write one ``PUBLISH`` (see :meth:`publish`)."""
        if wants_reply:
            self._expect(node)
            self.write(encode(b"PUBLISH", channel, payload))
        else:
            self.write(SKIP + encode(b"PUBLISH", channel, payload))

    def _expect(self, node: str) -> None:
        self.pending.append(node)
        waiter, self._pending_waiter = self._pending_waiter, None
        if waiter is not None:
            waiter.set()

    async def wait_pending(self) -> None:
        """Wait until a reply is expected (:attr:`pending` is not empty)."""
        while not self.pending:
            waiter = self._pending_waiter = anyio.Event()
            await waiter.wait()

    async def drain(self) -> None:
        """Wait until everything written has been sent.

        Raises:
            OSError: The connection broke.
        """
        if not self._out and self._broken is None:
            return  # the usual case: no lock, no checkpoint
        async with self._drain_lock:
            while True:
                if self._broken is not None:
                    raise self._broken
                if not self._out:
                    return
                if self._stream is not None:
                    data = bytes(self._out)
                    self._out.clear()
                    await self._stream.send(data)
                    continue
                assert self._sock is not None
                await anyio.wait_writable(self._sock)
                try:
                    sent = self._sock.send(self._out)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._broken = exc
                    raise
                del self._out[:sent]

    async def send(self, data: bytes) -> None:
        """Write ``data`` (one or more encoded commands) and wait until it is sent."""
        self.write(data)
        await self.drain()

    async def publish(self, messages: Iterable[tuple[str, str, bytes, bool]]) -> None:
        """``PUBLISH`` every ``(node, channel, payload, wants_reply)``, as one write.

        A message without ``wants_reply`` goes after ``CLIENT REPLY SKIP``:
        Redis sends no reply to read. For the others, their node joins
        :attr:`pending`, in the order of their replies.
        """
        out = []
        for node, channel, payload, wants_reply in messages:
            if wants_reply:
                self._expect(node)
            else:
                out.append(SKIP)
            out.append(encode(b"PUBLISH", channel, payload))
        await self.send(b"".join(out))

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
            parser.feed(await self._receive())

    async def _receive(self) -> bytes:
        if self._stream is not None:
            try:
                return await self._stream.receive()
            except anyio.EndOfStream:
                raise ConnectionResetError("Redis closed the connection") from None
            except anyio.BrokenResourceError as exc:
                raise ConnectionResetError(f"the connection to Redis broke: {exc}") from None
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                self._reads = 0
                await self._wait_readable(sock)
                continue
            if not data:
                raise ConnectionResetError("Redis closed the connection")
            self._reads += 1
            if self._reads >= READS_BEFORE_YIELD:
                # Redis keeps sending: let the other tasks run now and then.
                self._reads = 0
                await anyio.lowlevel.checkpoint()
            return data

    async def _wait_readable(self, sock: socket.socket) -> None:
        """Wait until ``sock`` is readable (or may be: a spurious wake-up is harmless).

        On asyncio, :func:`anyio.wait_readable` registers the socket with the
        event loop and unregisters it on every wait (two ``epoll_ctl`` calls
        and a future per read). Here the registration stays while reads keep
        coming: the loop's callback wakes the waiting reader, and unregisters
        the socket only if it fires while nobody waits (a level-triggered
        selector would otherwise call it on every turn of the loop). On trio
        (and an asyncio loop without ``add_reader``) it is anyio's wait.
        """
        loop = self._loop
        if loop is None:
            task = _asyncio_task()
            if task is None:
                await anyio.wait_readable(sock)
                return
            loop = task.get_loop()
            try:
                loop.add_reader(sock.fileno(), self._on_readable)
            except NotImplementedError:  # pragma: no cover - the proactor loop (Windows)
                await anyio.wait_readable(sock)
                return
            self._loop = loop
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is None:
            self._unwatch()  # nobody reads now: stop watching until someone does
        elif not waiter.done():
            waiter.set_result(None)

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and self._sock is not None and self._sock.fileno() >= 0:
            loop.remove_reader(self._sock.fileno())
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the read that follows finds the socket closed


def _asyncio_task() -> asyncio.Task[Any] | None:
    """The asyncio task running, ``None`` on trio (even as asyncio's guest)."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no asyncio loop runs in this thread
        return None


async def _connect(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket, trying each address in turn."""
    error: OSError = OSError(f"cannot resolve {host}")
    for family, kind, proto, _, address in await anyio.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)  # noqa: FBT003 - the socket API
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                await anyio.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, f"connecting to {host}:{port}: {os.strerror(code)}")
        except BaseException as exc:
            if sock.fileno() >= 0:
                anyio.notify_closing(sock)
            sock.close()
            if not isinstance(exc, OSError):
                raise
            error = exc
        else:
            return sock
    raise error
