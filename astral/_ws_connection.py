"""One open WebSocket: a thin AnyIO driver around ``wsproto.connection.Connection``.

Theory of operation
-------------------

wsproto is the sans-IO core: it turns bytes into frames and frames into bytes.
This module only moves those bytes and keeps the books, with at most two
background tasks per connection, both inside the task group of :meth:`_run`:

* the **reader** reads the stream, feeds wsproto, and turns its events into
  whole messages in a deque (fragments are gathered in one growing buffer,
  binary is decoded as UTF-8, sizes are checked). Pings are answered here. It
  is the only task that ever closes the stream, so the socket's lifetime has
  one owner. A peer does not need it as a task: opened with
  ``reader_task=False``, the connection is read by the peer's own task
  through :meth:`WebSocketConnection.deliver`, which runs the same reader
  and awaits the peer's handler with each message as it is assembled (no
  hand-over between tasks, one task less per connection).
* the **writer** drains one shared ``bytearray``. :meth:`send` serialises its
  frame synchronously into that buffer (so a frame is always whole, and a
  cancelled send either appended all of it or nothing) and returns; the writer
  wakes once and ships everything that piled up meanwhile in one
  ``stream.send``. Senders wait only when the buffer holds at least
  :data:`WRITE_HIGH_WATER` bytes. On AnyIO's plain asyncio socket stream the
  buffer is instead written straight to the transport at the end of the
  loop's turn (:class:`DirectWriter`), and the writer task is started only
  once the transport stops taking data or a close frame is left to flush.
* the **keepalive** is not a task: it is the deadline of the reader's cancel
  scope. When it passes, the pending read is cancelled (the stream keeps what
  it holds; nothing is lost), a ping goes out, and reading resumes in a fresh
  scope whose deadline is ``ping_timeout`` away; a matching pong moves the
  deadline ``ping_interval`` on, and a deadline that passes while a pong is
  still awaited fails the connection with 1011. That is on a plain socket,
  whose reads lose nothing when cancelled; under TLS a read may be flushing a
  TLS record of its own, so there the same deadline is slept on by a
  keepalive task instead.

The background tasks run inside shielded cancel scopes of their own, so that
when the code using the connection is cancelled (the server shutting down,
say) the close handshake can still go out; they are cancelled explicitly
(:meth:`_abort`) once the connection is done with.

What a remote can make us hold is bounded (figures in ``docs/limits.md``):

* received messages wait in the deque up to ``max(max_message_size, READ_SIZE)``
  characters, each message counted as at least :data:`MESSAGE_OVERHEAD`; then
  the reader stops reading until :meth:`receive` catches up;
* a message being reassembled holds at most ``max_message_size`` bytes in one
  growing buffer, and has at most one fragment per :data:`FRAGMENT_OVERHEAD`
  bytes of that limit (16 at least): a stream of empty continuation frames is
  "too big" (1009) like a stream of bytes;
* control replies count against the write high-water mark: a ping that comes
  while :data:`WRITE_HIGH_WATER` bytes wait to be written is answered later,
  with one pong for the latest ping (RFC 6455 section 5.5.3 allows it); a
  remote that sends more than :data:`MAX_PINGS_UNREAD` pings while one write
  of ours is stuck (it does not read) is cut off with 1008.

Closing: whichever side sends the first close frame sets :attr:`close_code`;
from then on nothing more is sent or delivered, and one deadline
(``close_timeout``) bounds the rest: waiting for the peer's close frame,
flushing ours, and (client side) waiting for the server to drop TCP first.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import struct
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import anyio.lowlevel
from anyio.abc import SocketAttribute
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import XorMaskerSimple

from ._exceptions import ConnectionClosed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine

    from anyio.abc import ByteStream
    from wsproto.connection import Connection

__all__ = ["HandshakeRequest", "WebSocketConnection"]

logger = logging.getLogger("astral.websocket")

#: Bytes asked of the stream per read.
READ_SIZE = 65536
#: Senders wait while the outgoing buffer holds at least this many bytes.
WRITE_HIGH_WATER = 65536
#: A message may have one fragment per this many bytes of ``max_message_size``.
FRAGMENT_OVERHEAD = 64
#: ...and at least this many fragments, however small the limit.
MIN_FRAGMENTS = 16
#: What one received message counts for at least, against the receive buffer.
MESSAGE_OVERHEAD = 64
#: Pings a remote may send while one write of ours is stuck, before it is cut off.
MAX_PINGS_UNREAD = 64
#: The writer task parks between two writes that begin less than this many
#: seconds apart; after a write with no such neighbour it ends.
WRITER_IDLE = 1.0
#: Queued bytes that are written at once instead of at the end of the turn.
FLUSH_AT = 2048

#: Errors of a byte stream that mean "the transport is gone".
STREAM_ERRORS: tuple[type[Exception], ...] = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.BusyResourceError,
    anyio.EndOfStream,
    OSError,  # includes ssl.SSLError
)

_DESCRIPTIONS = {
    1000: "normal closure",
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1005: "no status code",
    1006: "connection lost",
    1007: "invalid message data",
    1008: "policy violation",
    1009: "message too big",
    1010: "missing extension",
    1011: "internal error",
    1012: "service restart",
    1013: "try again later",
    1014: "bad gateway",
}
_SENDABLE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})
_OPEN = ConnectionState.OPEN
_PLAIN_TEXT = 0x81  # FIN, no RSV bits, opcode text
_REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING


@dataclass
class HandshakeRequest:
    """The HTTP upgrade request a client opened a WebSocket with (server side).

    Attributes:
        path: The request target, query string included (``"/rpc?token=..."``).
        headers: The request headers in order, names lower-cased, values
            decoded as Latin-1.
        remote_address: The client's ``(host, port)``, when known.
        state: Free-form storage: ``process_request`` may stash things here
            (verified claims, say) for the connection handler.
    """

    path: str
    headers: tuple[tuple[str, str], ...]
    remote_address: tuple[str, int] | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """Return the value of header ``name`` (case-insensitive), or ``None``.

        Repeated headers are joined with ``", "`` as HTTP prescribes, so a
        request carrying two ``Authorization`` headers never validates.
        """
        name = name.lower()
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None

    def query_param(self, name: str) -> str | None:
        """Return the first value of query parameter ``name``, percent-decoded, or ``None``."""
        for key, value in parse_qsl(urlsplit(self.path).query, keep_blank_values=True):
            if key == name:
                return value
        return None


def peer_address(stream: ByteStream) -> tuple[str, int] | None:
    """Return the ``(host, port)`` at the other end of ``stream``, if it is a TCP stream."""
    address = stream.extra(SocketAttribute.remote_address, None)  # noqa: S610
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    return None


def check_options(
    *,
    open_timeout: float | None,
    ping_interval: float | None,
    ping_timeout: float | None,
    close_timeout: float,
    max_message_size: int,
    max_header_size: int,
) -> None:
    """Raise :class:`ValueError` for a limit or timeout that makes no sense."""
    for name, value in (
        ("open_timeout", open_timeout),
        ("ping_interval", ping_interval),
        ("ping_timeout", ping_timeout),
    ):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive or None, not {value!r}")
    if not close_timeout >= 0:
        raise ValueError(f"close_timeout must not be negative, not {close_timeout!r}")
    if max_message_size < 1 or max_header_size < 1:
        raise ValueError("max_message_size and max_header_size must be positive")


def check_close_code(code: int) -> None:
    """Raise :class:`ValueError` unless ``code`` may be sent in a close frame."""
    if code not in _SENDABLE_CODES and not 3000 <= code <= 4999:
        raise ValueError(f"{code} is not a close code an endpoint may send")


def cap_asyncio_reads(stream: ByteStream, size: int) -> None:
    """Make AnyIO's asyncio socket (under TLS too) read at most ``size`` bytes at a time.

    asyncio's transport reads 256 KiB at a time, and Python allocates the
    whole buffer for every read: above glibc's mmap threshold (128 KiB) each
    read maps and unmaps it (about 10 µs a read, measured). Nothing else
    (trio, other streams) is touched.
    """
    inner: Any = getattr(stream, "transport_stream", stream)  # under TLS, the socket
    transport: Any = getattr(inner, "_transport", None)
    if getattr(transport, "max_size", 0) > size:
        transport.max_size = size


def read_ahead_limiter(stream: ByteStream) -> Callable[[], None] | None:
    """Return a function that stops AnyIO's asyncio socket from reading far ahead of us.

    AnyIO's asyncio ``SocketStream`` pauses its transport only when
    ``receive()`` finds nothing queued; a remote that sends faster than we
    process never lets that happen, and the transport keeps queueing 256 KiB
    reads without bound (measured: 64 MiB of pings grew the server by 64 MiB
    on asyncio, none on trio). The returned function pauses the transport once
    two reads are queued; ``receive()`` resumes it when the queue runs dry.
    It also caps the transport's reads at :data:`READ_SIZE` (:func:`cap_asyncio_reads`).
    Returns ``None`` for any other stream (trio's reads only what is asked).
    """
    inner: Any = getattr(stream, "transport_stream", stream)  # under TLS, the socket
    queue = getattr(getattr(inner, "_protocol", None), "read_queue", None)
    pause = getattr(getattr(inner, "_transport", None), "pause_reading", None)
    if not isinstance(queue, deque) or pause is None:
        return None
    cap_asyncio_reads(stream, READ_SIZE)

    def limit() -> None:
        if len(queue) >= 2:
            pause()

    return limit


class DirectWriter:
    """Writes to an asyncio transport without a task: what AnyIO's ``send`` does, minus the hop.

    AnyIO's asyncio ``SocketStream.send`` writes to the transport at once
    when its buffer is empty (it sets the transport's high-water mark to 0,
    so "not paused" means "the kernel took everything so far"). Doing the
    same from :meth:`WebSocketConnection._queue` saves the wake-up of the
    writer task and a turn of the event loop per write. Only an empty
    transport is written to directly; while it is paused the writer task
    waits for it as before, so backpressure is unchanged.
    """

    __slots__ = ("_protocol", "_transport", "call_soon")

    def __init__(self, transport: Any, protocol: Any) -> None:
        self._transport = transport
        self._protocol = protocol
        #: Runs a callback at the end of this turn of the event loop.
        self.call_soon: Callable[[Callable[[], None]], object] = (
            asyncio.get_running_loop().call_soon
        )

    def ready(self) -> bool:
        """Tell whether a write now goes straight to the kernel (nothing is pending)."""
        return bool(self._protocol.write_event.is_set()) and not self._transport.is_closing()

    async def drained(self) -> None:
        """Wait until the transport has handed everything written to the kernel."""
        await self._protocol.write_event.wait()

    def write(self, data: bytes) -> bool:
        """Write ``data``; return False if the transport is gone."""
        if self._protocol.exception is not None or self._transport.is_closing():
            return False
        try:
            self._transport.write(data)
        except RuntimeError:  # closed under us
            return False
        return True


def direct_writer(stream: ByteStream) -> DirectWriter | None:
    """Return a :class:`DirectWriter` for AnyIO's plain asyncio socket stream, else ``None``.

    Under TLS, on trio, or on any other stream, writes go through the
    writer task and ``stream.send`` as always.
    """
    transport = getattr(stream, "_transport", None)
    protocol = getattr(stream, "_protocol", None)
    if (
        transport is None
        or getattr(transport, "write", None) is None
        or getattr(transport, "is_closing", None) is None
        or getattr(protocol, "write_event", None) is None
        or not hasattr(protocol, "exception")
    ):
        return None
    return DirectWriter(transport, protocol)


def raw_sender(stream: ByteStream) -> Callable[[bytes | bytearray], int] | None:
    """Return the non-blocking ``send`` of the socket under AnyIO's plain trio stream.

    ``None`` for any other stream.

    Only there: under TLS the bytes must go through the TLS object, and
    asyncio has :class:`DirectWriter`.
    """
    if not isinstance(stream, anyio.abc.SocketStream) or not type(stream).__module__.endswith(
        "._trio"
    ):
        return None
    raw = stream.extra(SocketAttribute.raw_socket, None)  # noqa: S610
    if raw is None or raw.getblocking():
        return None
    send: Callable[[bytes | bytearray], int] = raw.send
    return send


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def only(exc: BaseException, kind: type[BaseException]) -> bool:
    """Tell whether ``exc`` is a ``kind``, or a group of nothing but ``kind``."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kind)[1] is None
    return isinstance(exc, kind)


def exit_code(exc: BaseException | None) -> tuple[int, str]:
    """Choose the close code for leaving a connection's scope with ``exc``."""
    if exc is None or only(exc, ConnectionClosed):
        return 1000, ""
    if not isinstance(exc, Exception):  # cancellation, KeyboardInterrupt...
        return 1001, "going away"
    return 1011, "internal error"


class WebSocketConnection:
    """One open WebSocket connection; satisfies :class:`astral._transport.Transport`.

    Made by :func:`~astral._websocket.open_websocket` and
    :func:`~astral._websocket.serve_websocket`, never directly. Any number of
    tasks may :meth:`send` at once; frames are never interleaved.

    Binary messages from the peer are decoded as UTF-8 and delivered as text.
    """

    # One per connection: slots, not a dict of some 50 entries (memory per idle connection).
    __slots__ = (
        "_broken",
        "_client",
        "_close_code",
        "_close_deadline",
        "_close_reason",
        "_close_timeout",
        "_closed",
        "_context",
        "_direct",
        "_flush_pending",
        "_fragments",
        "_keepalive_at",
        "_keepalive_scope",
        "_last_write",
        "_max_chars_cheap",
        "_max_fragments",
        "_max_size",
        "_messages",
        "_on_end",
        "_on_message",
        "_out",
        "_partial",
        "_peer_done",
        "_ping_count",
        "_ping_in_reader",
        "_ping_interval",
        "_ping_payload",
        "_ping_timeout",
        "_pings_unread",
        "_pong_owed",
        "_pong_wanted",
        "_pushing",
        "_queued",
        "_raw_send",
        "_read_scope",
        "_reader_scope",
        "_reader_started",
        "_reassembling",
        "_recv_closed",
        "_recv_high",
        "_recv_low",
        "_recv_waiter",
        "_remote_address",
        "_request",
        "_resume",
        "_space",
        "_stream",
        "_task_scopes",
        "_tasks",
        "_wakeup",
        "_write_closed",
        "_writer_busy",
        "_writer_done",
        "_writer_started",
        "_writes_close",
        "_ws",
        "response_headers",
    )

    def __init__(
        self,
        stream: ByteStream,
        ws: Connection,
        *,
        request: HandshakeRequest | None,
        remote_address: tuple[str, int] | None,
        ping_interval: float | None,
        ping_timeout: float | None,
        close_timeout: float,
        max_message_size: int,
    ) -> None:
        self._stream = stream
        self._ws = ws
        self._client = ws.client
        self._request = request
        #: The server's 101 response headers, names lower-cased (client side).
        self.response_headers: tuple[tuple[str, str], ...] = ()
        self._remote_address = remote_address
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        self._max_size = max_message_size
        # A message of at most this many characters fits whatever its encoding.
        self._max_chars_cheap = max_message_size // 4

        # Receiving: whole messages, and the message being reassembled.
        self._messages: deque[str] = deque()
        self._queued = 0  # characters in _messages
        # The reader pauses when this many characters wait for receive(), and
        # resumes below half of it.
        self._recv_high = max(max_message_size, READ_SIZE)
        self._recv_low = self._recv_high // 2
        self._recv_waiter: anyio.Event | None = None
        self._resume: anyio.Event | None = None  # set: the reader may read again
        # The message being reassembled, UTF-8, in one growing buffer, and
        # how many of its frames have ended.
        self._partial = bytearray()
        self._reassembling = False
        self._fragments = 0
        self._max_fragments = max(MIN_FRAGMENTS, max_message_size // FRAGMENT_OVERHEAD)
        self._recv_closed = False  # no more messages will be queued
        # Delivery (see deliver()): the reader runs in the task that reads,
        # and hands each message to ``_on_message`` as it is assembled.
        self._on_message: Callable[[str], Awaitable[None]] | None = None
        self._on_end: Callable[[ConnectionClosed], None] | None = None
        self._pushing = False  # on_message is running
        # The reader runs (as a task of _run, or in deliver()'s caller), in
        # this shielded scope.
        self._reader_started = False
        self._reader_scope: anyio.CancelScope | None = None

        # Sending.
        self._out = bytearray()
        self._wakeup: anyio.Event | None = None  # the writer is idle
        self._space: anyio.Event | None = None  # senders wait for room
        self._write_closed = False  # a close frame is queued, or the stream is gone
        self._writer_done: anyio.Event | None = None  # made when the writer starts
        # With a DirectWriter (asyncio) the writer task is started only when a
        # write has to wait, or a close frame has to be flushed: one task less
        # per connection.
        self._writer_started = False
        # When the writer task last began a write, and whether that came less
        # than WRITER_IDLE after the one before: it parks between writes that
        # come close together, and ends otherwise.
        self._last_write = -math.inf
        self._writes_close = False
        self._tasks: anyio.abc.TaskGroup | None = None
        # The context _run was entered in: lazily started tasks run in it.
        self._context = contextvars.Context()
        self._writer_busy = False  # the writer task is inside ``stream.send``
        # asyncio only: write from _queue, no writer task hop (see DirectWriter).
        self._direct = direct_writer(stream)
        # trio only: the plain socket's own non-blocking send (see write_now).
        self._raw_send = raw_sender(stream) if self._direct is None else None
        self._flush_pending = False  # a direct flush is scheduled for this turn's end
        # Pings that came while the buffer was full: answered (the latest
        # one) once the writer drains it; how many since a write last completed.
        self._pong_owed: bytes | None = None
        self._pings_unread = 0

        # Keepalive: a deadline on the reader's cancel scope, not a task of
        # its own (see _read_main). ``_keepalive_at`` is when the next ping is
        # due, or, while a pong is awaited, when it is overdue.
        self._ping_payload = b""
        self._pong_wanted = False
        self._ping_count = 0
        self._keepalive_at = math.inf
        # The keepalive task's sleep, when it runs as a task: a pong moves its
        # deadline as it moves the reader's.
        self._keepalive_scope: anyio.CancelScope | None = None
        # A plain socket's reads may be cancelled and lose nothing: there the
        # keepalive is the reader's deadline. Elsewhere (TLS) it is a task.
        self._ping_in_reader = ping_interval is not None and isinstance(
            stream, anyio.abc.SocketStream
        )

        # Closing.
        self._close_code: int | None = None
        self._close_reason: str | None = None
        self._close_deadline: float | None = None
        self._broken = False  # the stream failed: nothing left to flush
        self._peer_done = False  # close handshake complete (client waits for EOF)
        # The stream is closed: True, or an event while aclose waits for it.
        self._closed: anyio.Event | bool = False
        self._read_scope = anyio.CancelScope()
        self._task_scopes: list[anyio.CancelScope] = []

    # --- public API -------------------------------------------------------

    @property
    def request(self) -> HandshakeRequest | None:
        """The upgrade request (server side), ``None`` on the client side."""
        return self._request

    @property
    def remote_address(self) -> tuple[str, int] | None:
        """The peer's ``(host, port)``, when known."""
        return self._remote_address

    @property
    def close_code(self) -> int | None:
        """The close code, or ``None`` while the connection is open.

        It is the code of the first close frame sent or received (so a
        connection we closed for an oversized message reports 1009 even if the
        peer never answered), or 1006 when TCP ended with no close frame at all.
        """
        return self._close_code

    @property
    def close_reason(self) -> str | None:
        """The reason that came with :attr:`close_code`, ``None`` while open."""
        return self._close_reason

    async def send(self, item: str, /) -> None:
        """Send one text message.

        Returns once the frame is queued for the writer task; waits first if
        at least :data:`WRITE_HIGH_WATER` bytes are already queued.

        Raises:
            ConnectionClosed: If the connection is closing or closed.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        while len(self._out) >= WRITE_HIGH_WATER and not self._write_closed:
            space = self._space
            if space is None:
                space = self._space = anyio.Event()
            await space.wait()
        if self._write_closed:
            raise self._closed_error()
        self._queue(self._ws.send(TextMessage(data=item)))

    def try_send(self, item: str, /) -> bool:
        """Queue one text message if that needs no waiting; return whether it was queued.

        It is not queued (False) when at least :data:`WRITE_HIGH_WATER` bytes
        already wait, or the connection is closing: then use :meth:`send`.
        The peer sends its control frames (credit, cancels) this way, so they
        never wait for a task of their own.
        """
        if self._write_closed or len(self._out) >= WRITE_HIGH_WATER:
            return False
        self._queue(self._ws.send(TextMessage(data=item)))
        return True

    def write_now(self, item: str, /) -> bool:
        """Write one text message at once if nothing is queued; return whether it went.

        For a message that nothing else would join (a call or a result alone
        in flight): it skips the wait for the end of the loop's turn (asyncio)
        or the writer task's turn (trio). It goes only when no frame is queued
        or being written, and the write needs no waiting: straight to
        asyncio's transport, or to the plain socket on trio (what the socket
        does not take at once is queued for the writer). Otherwise nothing is
        sent and the caller uses :meth:`send`.
        """
        if self._write_closed or self._out or self._writer_busy or self._broken:
            return False
        direct = self._direct
        if not (direct.ready() if direct is not None else self._raw_send is not None):
            return False
        self._out += self._ws.send(TextMessage(data=item))
        self._flush_now()
        if self._out:
            self._wake_writer()  # what the socket did not take at once
        return True

    async def receive(self) -> str:
        """Return the next message (binary messages decoded as UTF-8).

        Messages that arrived before the connection closed are still handed out.

        Raises:
            ConnectionClosed: Once the connection is closed and no message is
                left, with the close code (1005 if the peer's close frame had
                none, 1006 if TCP died without a close frame).
        """
        # A message already assembled is returned at once, with no trip
        # through the event loop: this is the RPC hot path. Waiting for the
        # next one is a cancellation point as usual.
        while True:
            messages = self._messages
            if messages:
                message = messages.popleft()
                self._queued -= len(message) + MESSAGE_OVERHEAD
                resume = self._resume
                if resume is not None and self._queued < self._recv_low:
                    self._resume = None
                    resume.set()
                return message
            if self._recv_closed:
                raise self._closed_error()
            if self._on_message is not None:
                raise RuntimeError("this connection's messages go to deliver()")
            if not self._reader_started:
                self._start_reader()
            waiter = self._recv_waiter
            if waiter is None:
                waiter = self._recv_waiter = anyio.Event()
            await waiter.wait()

    async def deliver(
        self,
        on_message: Callable[[str], Awaitable[None]],
        on_end: Callable[[ConnectionClosed], None],
    ) -> None:
        """Read the connection in this task, awaiting ``on_message`` with each message.

        The alternative to :meth:`receive` for the one consumer of a
        connection (a peer): no reader task of its own, and no hand-over
        between tasks per message. ``on_end`` is called once, as soon as no
        more messages will come, with the :class:`ConnectionClosed` that
        :meth:`receive` would raise (messages that arrived first are delivered
        first). Returns once the connection is closed; the reading is shielded
        from cancellation like the reader task's, so that the close handshake
        completes (:meth:`aclose` bounds it).

        When the connection already reads in a task of its own (it was
        opened with ``reader_task=True``), this is a loop over :meth:`receive`.
        """
        if self._reader_started:
            try:
                while True:
                    await on_message(await self.receive())
            except ConnectionClosed as exc:
                on_end(exc)
            return
        self._on_message, self._on_end = on_message, on_end
        self._reader_started = True
        try:
            await self._reader()
        finally:
            self._on_message = None
            self._end_delivery(force=True)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection with the WebSocket close handshake. Idempotent.

        Waits at most ``close_timeout`` seconds for the handshake, then drops
        the TCP connection. If cancelled meanwhile, drops it at once. A task
        blocked in :meth:`receive` gets :class:`ConnectionClosed`.

        Args:
            code: The close code to send (1000 normal, 1001 going away...).
            reason: A short reason, truncated to fit a control frame.

        Raises:
            ValueError: If ``code`` may not be sent in a close frame.
        """
        check_close_code(code)
        self._start_close(code, reason)
        closed = self._closed
        if closed is True:
            await anyio.lowlevel.checkpoint()
            return
        if closed is False:
            closed = self._closed = anyio.Event()
        if not self._reader_started:
            self._start_reader()  # no one read yet: the handshake needs a reader
        deadline = self._close_deadline
        if deadline is None:  # the stream broke; the reader is finishing
            deadline = anyio.current_time() + self._close_timeout
        try:
            with anyio.CancelScope(deadline=deadline):
                await closed.wait()
        finally:
            if not closed.is_set():
                self._abort()

    def close_soon(self, code: int = 1000, reason: str = "") -> None:
        """Begin the close handshake and return at once; the reader completes it.

        For the task that reads the connection through :meth:`deliver`,
        which cannot wait in :meth:`aclose` for a close frame it has to read
        itself. Idempotent, like :meth:`aclose`.

        Raises:
            ValueError: If ``code`` may not be sent in a close frame.
        """
        check_close_code(code)
        self._start_close(code, reason)

    # --- lifetime ---------------------------------------------------------

    @asynccontextmanager
    async def _run(self, *, reader_task: bool = True) -> AsyncIterator[None]:
        """Run the background tasks around the body, then close the connection.

        With ``reader_task=False`` no task reads: the body's consumer reads
        through :meth:`deliver` (a task starts only if :meth:`receive` or
        :meth:`aclose` finds no one reading).

        The close code follows the way the body ends (see :func:`exit_code`);
        the close handshake is shielded from the body's cancellation and
        bounded by ``close_timeout``. The body's exception comes out as it went
        in, not wrapped in an exception group.
        """
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            if self._ping_interval is not None:
                self._keepalive_at = anyio.current_time() + self._ping_interval
                if not self._ping_in_reader:
                    tg.start_soon(self._shielded, self._keepalive_main)
            self._tasks = tg
            self._context = contextvars.copy_context()  # see _start_reader
            if reader_task:
                self._start_reader()
            if self._out:
                self._start_writer()  # the first write starts it otherwise
            try:
                yield
            except BaseException as exc:  # noqa: BLE001 - re-raised below, unwrapped
                error = exc
            finally:
                code, reason = exit_code(error)
                with anyio.CancelScope(shield=True):
                    await self.aclose(code, reason)
                self._abort()
        if error is not None:
            raise error

    async def _reader(self) -> None:
        with anyio.CancelScope(shield=True) as scope:
            self._reader_scope = scope
            await self._read_main()

    async def _shielded(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        with anyio.CancelScope(shield=True) as scope:
            self._task_scopes.append(scope)
            try:
                await fn()
            finally:
                self._task_scopes.remove(scope)

    def _abort(self) -> None:
        """Stop every background task now; the reader closes the stream on its way out."""
        self._lost("connection aborted")
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        for scope in self._task_scopes:
            scope.cancel()

    def _closed_error(self) -> ConnectionClosed:
        code = self._close_code if self._close_code is not None else 1006
        reason = self._close_reason or _DESCRIPTIONS.get(code, "connection closed")
        return ConnectionClosed(reason, code=code)

    def _set_closing(self, code: int, reason: str) -> None:
        """Note that a close frame went out or came in: stop sending and delivering."""
        if self._close_code is None:
            self._close_code, self._close_reason = code, reason
        self._write_closed = self._recv_closed = True
        if self._close_deadline is None:
            self._close_deadline = anyio.current_time() + self._close_timeout
            self._read_scope.deadline = self._close_deadline
        self._wake_all()
        self._end_delivery()

    def _start_close(self, code: int, reason: str) -> None:
        """Begin the closing handshake from our side, unless it has begun already."""
        if not self._write_closed:
            self._queue(self._ws.send(CloseConnection(code=code, reason=reason)))
            self._set_closing(code, reason)

    def _fail(self, code: int, reason: str) -> None:
        """Send a close frame if we still can, then drop TCP without waiting for the peer."""
        self._start_close(code, reason)
        self._read_scope.cancel()

    def _lost(self, reason: str) -> None:
        """The stream is gone (or being dropped): nothing more goes in or out."""
        if self._close_code is None:
            self._close_code, self._close_reason = 1006, reason
        self._broken = self._write_closed = self._recv_closed = True
        self._out.clear()
        self._read_scope.cancel()
        self._wake_all()
        self._end_delivery()

    def _end_delivery(self, *, force: bool = False) -> None:
        """Tell deliver()'s consumer that no more messages will come, once.

        Not while a message is being handed over or others wait to be: those
        go first, and the reader calls this again when they are out.
        """
        on_end = self._on_end
        if on_end is not None and (
            force or (self._recv_closed and not self._pushing and not self._messages)
        ):
            self._on_end = None
            on_end(self._closed_error())

    def _start_reader(self) -> None:
        if not self._reader_started and self._tasks is not None:
            self._reader_started = True
            # In the connection's own context, not the caller's: a task that
            # lives as long as the connection must not keep what was set in
            # the context of the call that happened to start it.
            self._context.run(self._tasks.start_soon, self._reader)

    def _start_writer(self) -> None:
        if not self._writer_started and self._tasks is not None:
            self._writer_started = True
            self._writer_done = anyio.Event()
            self._context.run(self._tasks.start_soon, self._shielded, self._write_main)

    def _wake_writer(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()
        elif not self._writer_started:
            self._start_writer()  # it finds the buffer full at its first step

    def _wake_all(self) -> None:
        events = (self._recv_waiter, self._resume, self._wakeup, self._space)
        self._recv_waiter = self._resume = self._wakeup = self._space = None
        for event in events:
            if event is not None:
                event.set()

    # --- writer -----------------------------------------------------------

    def _queue(self, data: bytes | bytearray) -> None:
        out = self._out
        out += data
        if len(out) >= FLUSH_AT and not self._writer_busy and not self._broken:
            # Enough for a write of its own: it goes now, so that the remote
            # starts on it while we make the rest. Holding whole batches to
            # the end of the turn made the two ends take turns, each idle
            # half the time (100 calls in flight: 0.5 of a core each).
            self._flush_now()
            if not out:
                return
        direct = self._direct
        if direct is not None and not self._writer_busy and not self._broken:
            if self._flush_pending:
                return  # goes out with the flush already scheduled for this turn
            if direct.ready():
                # The frames queued during the rest of this turn go out together
                # in one write at its end: a batch of replies is one syscall,
                # with no task woken for it. (Writing the first frame at once
                # was measured: it split B's batches and cost 50% more CPU per
                # call, for no gain in A.)
                self._flush_pending = True
                direct.call_soon(self._flush_direct)
                return
        self._wake_writer()

    def _flush_now(self) -> None:
        """Write what is queued at once, if that needs no waiting (see :meth:`write_now`)."""
        direct = self._direct
        if direct is not None:
            if direct.ready():
                self._write_direct(direct)
            return
        raw = self._raw_send
        if raw is None:
            return
        try:
            sent = raw(self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            logger.debug("write failed: %r", exc)
            self._lost(f"write failed: {exc!r}")
            return
        del self._out[:sent]
        if not self._out:
            self._written()

    def _flush_direct(self) -> None:
        """Write what is queued straight to the asyncio transport (see :class:`DirectWriter`)."""
        self._flush_pending = False
        direct = self._direct
        if not self._out or self._broken or self._writer_busy or direct is None:
            return
        if not direct.ready():
            # The kernel has not taken the last write: the writer task waits for it.
            self._wake_writer()
            return
        self._write_direct(direct)

    def _write_direct(self, direct: DirectWriter) -> None:
        data = bytes(self._out)
        self._out.clear()
        if not direct.write(data):
            logger.debug("write failed: transport closed")
            self._lost("write failed: transport closed")
            return
        self._written()

    def _written(self) -> None:
        """A write completed: the remote reads; pay an owed pong, let senders on."""
        self._pings_unread = 0
        owed = self._pong_owed
        if owed is not None:
            self._pong_owed = None
            if not self._write_closed:
                self._queue(self._ws.send(Pong(payload=owed)))
        space = self._space
        if space is not None:
            self._space = None
            space.set()
        if self._write_closed and not self._out:
            wakeup = self._wakeup  # the writer task may finish now
            if wakeup is not None:
                self._wakeup = None
                wakeup.set()

    async def _write_main(self) -> None:
        try:
            while True:
                if not self._out:
                    if self._write_closed:
                        return
                    if not self._writes_close:
                        # Writes come rarely (or this was the first burst):
                        # end, rather than park for ever (memory per idle
                        # connection); the next write starts a writer again.
                        self._writer_started = False
                        return
                    wakeup = self._wakeup = anyio.Event()
                    await wakeup.wait()
                    continue
                data = bytes(self._out)
                self._out.clear()
                now = anyio.current_time()
                self._writes_close = now - self._last_write < WRITER_IDLE
                self._last_write = now
                self._writer_busy = True
                try:
                    await self._stream.send(data)
                except STREAM_ERRORS as exc:
                    logger.debug("write failed: %r", exc)
                    self._lost(f"write failed: {exc!r}")
                    return
                finally:
                    self._writer_busy = False
                    data = b""  # not kept while the writer waits for more
                self._written()
        finally:
            assert self._writer_done is not None
            self._writer_done.set()

    # --- keepalive --------------------------------------------------------

    def _keep_alive(self, scope: anyio.CancelScope) -> bool:
        """The reader's scope ``scope`` ended: act if it was the keepalive deadline.

        Returns whether to read on (in a new scope, whose deadline is then
        ``_keepalive_at``). Every other way the scope ends (a close deadline,
        ``_fail``, ``_lost``) leaves a flag that says so, and stops the reader.
        """
        if (
            not self._ping_in_reader
            or not scope.cancelled_caught
            or self._write_closed
            or self._broken
            or self._close_deadline is not None
            or self._ping_interval is None
            or anyio.current_time() < self._keepalive_at
        ):
            return False
        return self._ping_due()

    def _ping_due(self) -> bool:
        """The keepalive deadline passed: ping, or fail; return whether to go on."""
        assert self._ping_interval is not None
        if self._pong_wanted:
            logger.info("no pong within %s s; closing", self._ping_timeout)
            self._fail(1011, "keepalive ping timeout")
            return False
        self._ping_count += 1
        self._ping_payload = payload = struct.pack("!Q", self._ping_count)
        self._queue(self._ws.send(Ping(payload=payload)))
        if self._ping_timeout is None:
            self._keepalive_at = anyio.current_time() + self._ping_interval
        else:
            self._pong_wanted = True
            self._keepalive_at = anyio.current_time() + self._ping_timeout
        return True

    def _on_pong(self, payload: bytes | bytearray) -> None:
        if self._pong_wanted and payload == self._ping_payload:
            self._pong_wanted = False
            assert self._ping_interval is not None
            self._keepalive_at = anyio.current_time() + self._ping_interval
            if self._ping_in_reader:
                if self._close_deadline is None:
                    self._read_scope.deadline = self._keepalive_at
            elif self._keepalive_scope is not None:
                # The task sleeps to when the pong was due: wake it sooner.
                self._keepalive_scope.deadline = self._keepalive_at

    async def _keepalive_main(self) -> None:
        """The keepalive as a task, for streams whose reads must not be cancelled.

        Under TLS a read may be flushing a TLS record of its own, and AnyIO
        marks the stream broken if that is cancelled; so there the keepalive
        sleeps in a task of its own, on the same deadline, instead of
        cancelling the reader.
        """
        while True:
            self._keepalive_scope = scope = anyio.CancelScope(deadline=self._keepalive_at)
            with scope:
                await anyio.sleep_forever()
            # The scope's deadline is ``_keepalive_at`` (a pong moves both):
            # waking here means the ping is due, or a pong is overdue.
            if self._write_closed or self._broken or not self._ping_due():
                return

    # --- reader -----------------------------------------------------------

    async def _read_main(self) -> None:
        try:
            scope = self._read_scope
            if self._ping_in_reader and self._close_deadline is None:
                scope.deadline = self._keepalive_at
            with scope:
                # wsproto may hold frames that came in with the handshake.
                if not await self._take_events():
                    await self._read_loop()
            # The keepalive is this task's deadline: when it passes, the read
            # is cancelled (no data is lost: the stream keeps what it holds),
            # a ping goes out or a missing pong closes, and reading resumes.
            while self._keep_alive(scope):
                scope = self._read_scope = anyio.CancelScope(deadline=self._keepalive_at)
                with scope:
                    await self._read_loop()
            deadline = self._close_deadline
            if not self._broken and deadline is not None:
                # Give our close frame its chance to reach the wire.
                self._wake_all()
                if self._out:
                    self._start_writer()
                with anyio.CancelScope(deadline=deadline):
                    if self._writer_done is not None:
                        await self._writer_done.wait()
                    if self._direct is not None:
                        await self._direct.drained()  # what went straight to the transport
        finally:
            self._lost("connection closed")
            try:
                await anyio.aclose_forcefully(self._stream)
            finally:
                closed, self._closed = self._closed, True
                if not isinstance(closed, bool):
                    closed.set()
                for scope in self._task_scopes:
                    scope.cancel()  # the writer and keepalive (the reader is done)

    async def _read_loop(self) -> None:
        receive = self._stream.receive
        limit_read_ahead = read_ahead_limiter(self._stream)
        while True:
            resume = self._resume
            if resume is not None:
                await resume.wait()
            try:
                data = await receive(READ_SIZE)
                if limit_read_ahead is not None:
                    limit_read_ahead()
            except anyio.EndOfStream:
                if not self._peer_done:
                    self._lost("connection closed without a close frame")
                return
            except STREAM_ERRORS as exc:
                logger.debug("read failed: %r", exc)
                self._lost(f"read failed: {exc!r}")
                return
            if self._peer_done:
                continue  # client side, waiting for the server to drop TCP
            taken = self._take_plain_frames(data)
            if taken < len(data):
                self._ws.receive_data(data[taken:] if taken else data)
            data = b""  # not kept while the next read waits
            if await self._take_events(got_message=taken > 0):
                return

    async def _take_events(self, *, got_message: bool = False) -> bool:
        """Act on wsproto's events, then hand the messages to deliver()'s consumer.

        Returns whether to stop reading (see :meth:`_handle_events`).
        """
        stop = self._handle_events(got_message=got_message)
        if self._on_message is not None and self._messages:
            await self._push()
        return stop

    async def _push(self) -> None:
        """Hand the queued messages to deliver()'s consumer, in order."""
        on_message, messages = self._on_message, self._messages
        assert on_message is not None
        self._pushing = True
        try:
            while messages:
                message = messages.popleft()
                self._queued -= len(message) + MESSAGE_OVERHEAD
                await on_message(message)
        finally:
            self._pushing = False
        resume = self._resume
        if resume is not None:
            self._resume = None
            resume.set()
        self._end_delivery()

    def _take_plain_frames(self, data: bytes) -> int:
        """Queue the whole, plain text frames at the start of ``data`` without wsproto.

        The hot path: most frames are one unfragmented text message each, and
        wsproto's general parser costs more per frame than everything else
        the reader does. Only while wsproto is between frames (nothing
        buffered, no message in progress) and the connection is open; only
        frames that are complete, FIN, text, without RSV bits, masked exactly
        when this side requires it, minimally length-encoded, within
        ``max_message_size`` and valid UTF-8. The first frame that is anything
        else (a control frame, a fragment, a bad frame) stops it: that frame
        and the rest go to wsproto, which judges them as always.

        Returns:
            How many bytes of ``data`` were taken.
        """
        ws = self._ws
        proto = ws._proto  # wsproto's frame protocol: only its state is read
        decoder = proto._frame_decoder
        if (
            decoder.header is not None
            or len(decoder.buffer)
            or proto._message_decoder.opcode is not None
            or ws.state is not _OPEN
            or self._recv_closed
            or self._reassembling
        ):
            return 0
        masked = not self._client  # a client masks every frame; a server none
        max_size, messages = self._max_size, self._messages
        end = len(data)
        pos = 0
        while pos + 2 <= end:
            second = data[pos + 1]
            if data[pos] != _PLAIN_TEXT or (second >= 0x80) is not masked:
                break
            size = second & 0x7F
            head = pos + 2
            if size == 126:
                size = int.from_bytes(data[head : head + 2])
                head += 2
                if size < 126:
                    break  # not minimal: wsproto says so
            elif size == 127:
                size = int.from_bytes(data[head : head + 8])
                head += 8
                if size <= 0xFFFF or size >> 63:
                    break
            if size > max_size:
                break  # too big: wsproto and _on_data close with 1009
            if masked:
                key = data[head : head + 4]
                head += 4
            if head + size > end:
                break  # incomplete: wsproto waits for the rest
            payload: bytes | bytearray = data[head : head + size]
            if masked:
                payload = XorMaskerSimple(key).process(bytearray(payload))
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                break  # wsproto closes with 1007
            messages.append(text)
            self._queued += len(text) + MESSAGE_OVERHEAD
            pos = head + size
        return pos

    def _handle_events(self, *, got_message: bool = False) -> bool:
        """Act on wsproto's events; return whether to stop reading.

        ``got_message``: messages were queued already (by
        :meth:`_take_plain_frames`), so a waiting :meth:`receive` is woken.
        """
        ws = self._ws
        for event in ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                if not self._recv_closed:
                    got_message |= self._on_data(event)
            elif isinstance(event, Ping):
                if not self._write_closed and self._on_ping(event):
                    return True
            elif isinstance(event, Pong):
                self._on_pong(event.payload)
            elif isinstance(event, CloseConnection):
                return self._on_close(event)
        if got_message:
            waiter = self._recv_waiter
            if waiter is not None:
                self._recv_waiter = None
                waiter.set()
            if self._queued >= self._recv_high and self._resume is None:
                self._resume = anyio.Event()  # pause reading until receive() catches up
        return False

    def _on_ping(self, event: Ping) -> bool:
        """Answer a ping, or owe the answer; return whether the remote is cut off."""
        if len(self._out) < WRITE_HIGH_WATER:
            self._queue(self._ws.send(event.response()))
            return False
        # The remote has not read what we already owe it: answer later, once,
        # with the latest payload, and count how long it keeps this up.
        self._pong_owed = bytes(event.payload)
        self._pings_unread += 1
        if self._pings_unread <= MAX_PINGS_UNREAD:
            return False
        logger.info("remote sends pings without reading the pongs; closing (1008)")
        self._fail(1008, "pings sent without reading the pongs")
        return True

    def _on_data(self, event: TextMessage | BytesMessage) -> bool:
        """Add a message fragment; return whether a whole message was queued."""
        data = event.data
        if (
            type(data) is str  # the hot path: one text frame, read whole
            and event.message_finished
            and not self._reassembling
        ):
            if len(data) > self._max_chars_cheap and _utf8_len(data) > self._max_size:
                self._too_big()
                return False
            self._messages.append(data)
            self._queued += len(data) + MESSAGE_OVERHEAD
            return True
        self._reassembling = True
        chunk = data.encode("utf-8") if isinstance(data, str) else data
        # Fragments count by number as well as by bytes: empty continuation
        # frames cost no bytes, but each costs the reader a trip.
        self._fragments += event.frame_finished
        if (
            len(self._partial) + len(chunk) > self._max_size
            or self._fragments > self._max_fragments
        ):
            self._too_big()
            return False
        self._partial += chunk
        if not event.message_finished:
            return False
        buffer = self._partial
        self._reset_partial()
        try:
            message = buffer.decode("utf-8")
        except UnicodeDecodeError:  # only binary: wsproto checks text as it comes
            self._start_close(1007, "invalid UTF-8 in binary message")
            return False
        self._messages.append(message)
        self._queued += len(message) + MESSAGE_OVERHEAD
        return True

    def _reset_partial(self) -> None:
        self._partial = bytearray()
        self._reassembling = False
        self._fragments = 0

    def _too_big(self) -> None:
        self._reset_partial()
        self._start_close(1009, f"message larger than {self._max_size} bytes")

    def _on_close(self, event: CloseConnection) -> bool:
        state = self._ws.state
        if state is _REMOTE_CLOSING:  # the peer began the handshake: answer it
            self._queue(self._ws.send(event.response()))
            self._set_closing(event.code, event.reason or "")
        elif state is _OPEN:  # wsproto could not parse the stream: fail it
            logger.info("protocol violation from peer: %s", event.reason)
            self._fail(event.code, event.reason or "")
            return True
        # The handshake is complete. RFC 6455 section 7.1.1: the server drops
        # TCP first; the client waits (until the close deadline) for it to.
        self._peer_done = True
        return not self._client
