"""The server side: listen, read the HTTP upgrade with h11, hand connections to a handler.

:class:`_ServerHandshake` is sans-IO (h11 parses, with its head-size limit);
:func:`serve_websocket` is the AnyIO driver. Every connection runs in a task of
its own behind a catch-all that logs, so nothing one client does (or one
handler bug) reaches the listener or another connection.

What unauthenticated clients can make the server hold is bounded: at most
``max_handshakes`` connections are in the TLS/upgrade phase and
``max_connections`` open in all; one more gets HTTP 503 at once (over TLS, it
is just closed: a TLS handshake to refuse would cost what the cap saves). The
request head is read in pieces that grow with what has arrived (4 KiB first),
so a stalled client holds what it sent, not a read buffer sized in advance.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import anyio
import h11
from anyio.abc import SocketAttribute, SocketListener
from anyio.streams.tls import TLSStream
from wsproto.connection import Connection, ConnectionType

from . import _defaults
from ._exceptions import ConnectionClosed
from ._ws_connection import (
    READ_SIZE,
    STREAM_ERRORS,
    HandshakeRequest,
    WebSocketConnection,
    check_options,
    only,
    peer_address,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Sequence

    from anyio.abc import ByteStream, SocketStream, TaskGroup

__all__ = ["Rejection", "serve_websocket"]

logger = logging.getLogger("astral.websocket")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: After refusing a request, how long we keep reading (and discarding) so the
#: client gets to read our answer instead of a TCP reset.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20
#: Refusing a client over the connection caps: how long and how much we read
#: (so our 503 is not lost to a reset), and how many such refusals at once
#: (beyond that, the socket is just closed).
_BUSY_LINGER_SECONDS = 0.5
_BUSY_LINGER_BYTES = 64 * 1024
_MAX_REFUSING = 64
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 12\r\n"
    b"Connection: close\r\n\r\n"
    b"server busy\n"
)
#: The first read of a request head; later reads grow with what has arrived.
_HEAD_FIRST_READ = 4096
#: accept() errors that mean "out of resources, try again shortly".
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True)
class Rejection:
    """A refusal of a WebSocket upgrade, sent as a plain HTTP response.

    Attributes:
        status: The HTTP status, e.g. 401 or 403 (200 to 599).
        body: A text body, sent as ``text/plain; charset=utf-8`` unless a
            ``content-type`` header says otherwise.
        headers: Extra response headers. ``content-length``,
            ``transfer-encoding`` and ``connection`` are set by astral.

    Raises:
        ValueError: If ``status`` is not a final HTTP status (200 to 599).
    """

    status: int
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"a rejection needs a status from 200 to 599, not {self.status}")


class _BadRequest(Exception):
    """The client's request cannot be upgraded.

    ``str(exc)`` is the response body (never an echo of what the client sent);
    ``status`` None means the client is gone and gets no answer; ``detail``
    is for the log.
    """

    def __init__(
        self,
        status: int | None,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.detail = detail or message


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


class _ServerHandshake:
    """Sans-IO server half of the RFC 6455 opening handshake, over h11."""

    def __init__(self, max_header_size: int) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_size)
        self._budget = max_header_size + 1  # bytes we may still read before the head ends
        self._received = 0
        self._target = ""
        self._headers: tuple[tuple[str, str], ...] = ()
        self._key = b""
        self._complete = False

    @property
    def read_size(self) -> int:
        """How many bytes to read next.

        h11 checks its limit only while it waits for more, so a whole oversized
        head read at once would slip through: never read past the limit. Reads
        grow with what has arrived (4 KiB, then as much as came so far), so
        the buffer a read needs is never far beyond what the client sent.
        """
        grown = max(_HEAD_FIRST_READ, self._received)
        return max(1, min(READ_SIZE, grown, self._budget))

    def receive_data(self, data: bytes) -> bool:
        """Feed bytes from the client (``b""`` at end of stream).

        Returns:
            Whether a complete, valid upgrade request has arrived.

        Raises:
            _BadRequest: If the request is not a WebSocket upgrade, is
                malformed or too big, or the client went away.
        """
        self._budget -= len(data)
        self._received += len(data)
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                hint = 431 if exc.error_status_hint == 431 else 400
                message = HTTPStatus(hint).phrase.lower()
                status = hint if data else None
                # Not h11's text: it quotes the offending line, which may
                # carry a token in its query string.
                raise _BadRequest(
                    status, message, detail=f"bad HTTP request ({type(exc).__name__})"
                ) from None
            if event is h11.NEED_DATA:
                return False
            if event is h11.PAUSED:
                self._complete = True
                return True
            if isinstance(event, h11.Request):
                self._check(event)
            elif isinstance(event, h11.ConnectionClosed):
                raise _BadRequest(None, "client closed the connection")
            elif isinstance(event, h11.Data):  # pragma: no cover - _check refuses bodies
                raise _BadRequest(400, "an upgrade request has no body")

    def _check(self, request: h11.Request) -> None:
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers
        )
        self._target = request.target.decode("latin-1")
        self._headers = headers
        fields: dict[str, str] = {}
        for name, value in headers:
            fields[name] = f"{fields[name]}, {value}" if name in fields else value
        if "websocket" not in _tokens(fields.get("upgrade", "")):
            raise _BadRequest(
                426,
                "this is a WebSocket endpoint",
                (("upgrade", "websocket"), ("connection", "Upgrade")),
            )
        if request.method != b"GET" or request.http_version != b"1.1":
            raise _BadRequest(400, "a WebSocket upgrade is a GET over HTTP/1.1")
        if "upgrade" not in _tokens(fields.get("connection", "")):
            raise _BadRequest(400, "missing 'Connection: Upgrade'")
        if fields.get("sec-websocket-version") != "13":
            raise _BadRequest(
                426, "unsupported WebSocket version", (("sec-websocket-version", "13"),)
            )
        if "content-length" in fields or "transfer-encoding" in fields:
            raise _BadRequest(400, "an upgrade request has no body")
        key = fields.get("sec-websocket-key", "")
        try:
            valid = len(base64.b64decode(key, validate=True)) == 16
        except binascii.Error:
            valid = False
        if not valid:
            raise _BadRequest(400, "invalid Sec-WebSocket-Key")
        self._key = key.encode("ascii")

    def request(self, remote_address: tuple[str, int] | None) -> HandshakeRequest:
        """Return the parsed request, once :meth:`receive_data` returned ``True``."""
        assert self._complete
        return HandshakeRequest(self._target, self._headers, remote_address)

    def accept(self, headers: Sequence[tuple[str, str]] = ()) -> tuple[bytes, bytes]:
        """Return the 101 response with extra ``headers``, and what came after the request."""
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())  # noqa: S324 - RFC 6455
        response = h11.InformationalResponse(
            status_code=101,
            reason=b"Switching Protocols",
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", accept),
                *((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers),
            ],
        )
        return self._h11.send(response) or b"", self._h11.trailing_data[0]

    def reject(
        self, status: int, body: str = "", headers: tuple[tuple[str, str], ...] = ()
    ) -> bytes:
        """Return a complete HTTP response refusing the upgrade.

        Raises:
            h11.LocalProtocolError: If ``headers`` hold something HTTP forbids.
        """
        payload = body.encode("utf-8")
        extra = [(name, value) for name, value in headers if name.lower() not in _HOP_HEADERS]
        if body and not any(name.lower() == "content-type" for name, _ in extra):
            extra.append(("content-type", "text/plain; charset=utf-8"))
        try:
            reason = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        response = h11.Response(
            status_code=status,
            reason=reason,
            headers=[*extra, ("content-length", str(len(payload))), ("connection", "close")],
        )
        data = self._h11.send(response) or b""
        if payload:
            data += self._h11.send(h11.Data(data=payload)) or b""
        return data + (self._h11.send(h11.EndOfMessage()) or b"")


@dataclass(frozen=True)
class _Server:
    handler: Callable[[WebSocketConnection], Awaitable[None]]
    ssl_context: ssl.SSLContext | None
    process_request: Callable[[HandshakeRequest], Awaitable[Rejection | None]] | None
    open_timeout: float | None
    ping_interval: float | None
    ping_timeout: float | None
    close_timeout: float
    max_message_size: int
    max_header_size: int
    max_connections: int
    max_handshakes: int
    response_headers: Sequence[tuple[str, str]] = ()
    reader_task: bool = True


class _Admission:
    """How many connections the server holds, and in which phase."""

    def __init__(self, server: _Server) -> None:
        self.max_connections = server.max_connections
        self.max_handshakes = server.max_handshakes
        self.connections = 0  # accepted and not yet closed, handshakes included
        self.handshaking = 0  # in TLS or the upgrade request
        self.refusing = 0  # being told 503

    def full(self) -> bool:
        return self.connections >= self.max_connections or self.handshaking >= self.max_handshakes


async def serve_websocket(
    handler: Callable[[WebSocketConnection], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    process_request: Callable[[HandshakeRequest], Awaitable[Rejection | None]] | None = None,
    open_timeout: float | None = _defaults.OPEN_TIMEOUT,
    ping_interval: float | None = _defaults.PING_INTERVAL,
    ping_timeout: float | None = _defaults.PING_TIMEOUT,
    close_timeout: float = _defaults.CLOSE_TIMEOUT,
    max_message_size: int = _defaults.MAX_MESSAGE_SIZE,
    max_header_size: int = _defaults.MAX_HEADER_SIZE,
    response_headers: Sequence[tuple[str, str]] = (),
    max_connections: int = _defaults.MAX_CONNECTIONS,
    max_handshakes: int = _defaults.MAX_HANDSHAKES,
    reader_task: bool = True,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSocket connections until cancelled.

    For each TCP connection: the TLS handshake (with ``ssl_context``), the HTTP
    upgrade request (within ``max_header_size`` bytes), then
    ``process_request``, all within ``open_timeout`` seconds. A
    :class:`Rejection` is sent as a plain HTTP response and no WebSocket ever
    exists; ``None`` accepts. Requests that are not WebSocket upgrades get
    426 (plain HTTP) or 400, oversized heads 431. Then ``handler(conn)`` runs;
    when it returns, the connection is closed with 1000; if it raises, the
    error is logged and the connection closed with 1011 (a
    :class:`~astral.ConnectionClosed` escaping the handler is not an error).
    Client misbehaviour is logged on the ``astral.websocket`` logger at INFO or
    below, and never disturbs other connections.

    Cancelling the call closes every open connection with 1001 "going away"
    (waiting at most ``close_timeout`` for the close handshakes).

    Args:
        handler: Called with each open connection.
        host: The address to listen on (``"127.0.0.1"``, ``"::"``, a name...).
        port: The port; 0 picks a free one.
        ssl_context: Serve ``wss://`` with this server-side context.
        process_request: Called with the upgrade request before accepting it;
            returns a :class:`Rejection` to refuse it. If it raises, the
            client gets a 500 and the error is logged.
        open_timeout: Seconds for TLS, request and ``process_request``
            together; ``None`` for no limit.
        ping_interval: Seconds between keepalive pings; ``None`` for none.
        ping_timeout: Seconds to wait for a pong before closing with 1011;
            ``None`` to wait forever.
        close_timeout: Seconds to wait for a close handshake.
        max_message_size: Largest message accepted, in bytes (reassembled);
            bigger ones close the connection with 1009.
        max_header_size: Largest upgrade request head, in bytes.
        response_headers: Extra headers for every 101 response.
        max_connections: Connections held at once, handshakes included; one
            more gets HTTP 503 (or, over TLS, is closed).
        max_handshakes: Connections in TLS or the upgrade request at once;
            one more gets HTTP 503 (or, over TLS, is closed).
        reader_task: Read each connection in a task of its own. ``False``
            when the handler's consumer reads through
            :meth:`~astral._ws_connection.WebSocketConnection.deliver` (a
            peer does): one task less per connection.
        task_status: Receives the port actually listened on, once listening.

    Raises:
        OSError: If it cannot listen on ``host:port``.
        ValueError: If a limit or timeout is not positive.
    """
    check_options(
        open_timeout=open_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        max_message_size=max_message_size,
        max_header_size=max_header_size,
    )
    if max_connections < 1 or max_handshakes < 1:
        raise ValueError("max_connections and max_handshakes must be at least 1")
    server = _Server(
        handler,
        ssl_context,
        process_request,
        open_timeout,
        ping_interval,
        ping_timeout,
        close_timeout,
        max_message_size,
        max_header_size,
        max_connections,
        max_handshakes,
        tuple(response_headers),
        reader_task,
    )
    admission = _Admission(server)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener, anyio.create_task_group() as tg:
        listeners = [sub for sub in listener.listeners if isinstance(sub, SocketListener)]
        actual_port = listeners[0].extra(SocketAttribute.local_port)  # noqa: S610
        logger.info("listening on %s port %d", host, actual_port)
        for sub in listeners:
            tg.start_soon(_accept_loop, sub, tg, server, admission)
        task_status.started(actual_port)


async def _accept_loop(
    listener: SocketListener, tg: TaskGroup, server: _Server, admission: _Admission
) -> None:
    try:
        await _accept_until_cancelled(listener, tg, server, admission)
    finally:
        # Stopping: refuse new connections now, while the open ones drain.
        with anyio.CancelScope(shield=True):
            await listener.aclose()


async def _accept_until_cancelled(
    listener: SocketListener, tg: TaskGroup, server: _Server, admission: _Admission
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY:
                logger.info("accept() failed: %r", exc)
                continue
            logger.warning("accept() failed, retrying shortly: %r", exc)
            await anyio.sleep(0.1)
            continue
        if admission.full():
            if admission.refusing >= _MAX_REFUSING or server.ssl_context is not None:
                logger.info("too many connections; dropped %s", peer_address(stream))
                await anyio.aclose_forcefully(stream)
                continue
            admission.refusing += 1
            tg.start_soon(_refuse_busy, stream, admission)
            continue
        admission.connections += 1
        admission.handshaking += 1
        tg.start_soon(_serve_one, stream, server, admission)


async def _refuse_busy(stream: SocketStream, admission: _Admission) -> None:
    """Answer 503 without reading the request, then close (briefly reading what comes)."""
    logger.info("too many connections; refused %s with 503", peer_address(stream))
    try:
        await _answer_and_close(
            stream, _BUSY_RESPONSE, seconds=_BUSY_LINGER_SECONDS, most=_BUSY_LINGER_BYTES
        )
    finally:
        admission.refusing -= 1


async def _serve_one(raw: SocketStream, server: _Server, admission: _Admission) -> None:
    remote = peer_address(raw)
    try:
        conn = None
        try:
            with anyio.move_on_after(server.open_timeout) as scope:
                conn = await _open(raw, remote, server)
            if scope.cancelled_caught:
                logger.info("opening handshake with %s timed out", remote)
            del scope  # finished: not kept for the connection's life
        finally:
            admission.handshaking -= 1
            if conn is None:
                await anyio.aclose_forcefully(raw)
        if conn is None:
            return
        try:
            async with conn._run(reader_task=server.reader_task):
                await server.handler(conn)
        except Exception as exc:
            if not only(exc, ConnectionClosed):
                raise
            logger.debug("handler for %s ended with %r", remote, exc)
    except Exception:
        # Anything else is a bug in the handler (or in astral): log it, keep serving.
        logger.exception("WebSocket connection from %s failed", remote)
    finally:
        admission.connections -= 1


async def _open(
    raw: SocketStream, remote: tuple[str, int] | None, server: _Server
) -> WebSocketConnection | None:
    """Do TLS and the upgrade; return the connection, or ``None`` if there is none."""
    stream: ByteStream = raw
    if server.ssl_context is not None:
        try:
            stream = await TLSStream.wrap(
                raw, server_side=True, ssl_context=server.ssl_context, standard_compatible=False
            )
        except STREAM_ERRORS as exc:
            logger.info("TLS handshake with %s failed: %r", remote, exc)
            return None
    handshake = _ServerHandshake(server.max_header_size)
    try:
        while True:
            try:
                data = await stream.receive(handshake.read_size)
            except anyio.EndOfStream:
                data = b""
            if handshake.receive_data(data):
                break
        request = handshake.request(remote)
        rejection = None
        if server.process_request is not None:
            try:
                rejection = await server.process_request(request)
            except Exception:
                logger.exception("process_request failed for %s", remote)
                rejection = Rejection(500, "internal server error")
        if rejection is not None:
            logger.debug("rejected %s with HTTP %d", remote, rejection.status)
            response = handshake.reject(rejection.status, rejection.body, rejection.headers)
            await _answer_and_close(stream, response)
            return None
        response, trailing = handshake.accept(server.response_headers)
        await stream.send(response)
    except _BadRequest as exc:
        logger.info("bad upgrade request from %s: %s", remote, exc.detail)
        if exc.status is not None:
            await _answer_and_close(stream, handshake.reject(exc.status, str(exc), exc.headers))
        return None
    except STREAM_ERRORS as exc:
        logger.info("connection from %s lost during the upgrade: %r", remote, exc)
        return None
    return WebSocketConnection(
        stream,
        Connection(ConnectionType.SERVER, trailing_data=trailing),
        request=request,
        remote_address=remote,
        ping_interval=server.ping_interval,
        ping_timeout=server.ping_timeout,
        close_timeout=server.close_timeout,
        max_message_size=server.max_message_size,
    )


async def _answer_and_close(
    stream: ByteStream,
    response: bytes,
    *,
    seconds: float = _LINGER_SECONDS,
    most: int = _LINGER_BYTES,
) -> None:
    """Send a refusal, then read until the client hangs up so it can read the answer.

    Closing with unread request bytes would make the kernel send a reset, which
    may destroy our response before the client reads it.
    """
    try:
        await stream.send(response)
        try:
            await stream.send_eof()
        except NotImplementedError:  # TLS streams cannot half-close
            pass
        with anyio.move_on_after(seconds):
            drained = 0
            while drained < most:
                drained += len(await stream.receive(READ_SIZE))
    except STREAM_ERRORS:
        pass
    finally:
        await anyio.aclose_forcefully(stream)
