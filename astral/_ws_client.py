"""The client side: parse the URL, connect (TLS), do the HTTP upgrade with h11.

:class:`_ClientHandshake` is sans-IO; :func:`open_websocket` is the AnyIO
driver. Every failure before the connection is open comes out as a
:class:`~astral.ConnectError` (or a subclass), the original as ``__cause__``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import h11
from anyio.streams.tls import TLSStream
from wsproto.connection import Connection, ConnectionType

from . import _defaults
from ._exceptions import ConnectError, ConnectTimeout, HandshakeError, TLSError, Unauthorized
from ._ws_connection import (
    READ_SIZE,
    STREAM_ERRORS,
    WebSocketConnection,
    check_options,
    peer_address,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from anyio.abc import ByteStream

__all__ = ["open_websocket"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Headers astral writes itself; passing them in ``headers`` is a ValueError.
_RESERVED = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "content-length",
        "transfer-encoding",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
#: How much of a refusal's body we keep for the error message.
_BODY_LIMIT = 4096


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    secure: bool
    resource: str
    host_header: str


def redact(url: str) -> str:
    """The URL as given, less its query string and credentials, for messages and logs.

    A worker may carry its token in ``?token=``; no error text may repeat it.
    Done on the text, not with ``urlsplit``, so that a URL without a scheme
    (``127.0.0.1:8830/astral``) is quoted as it was written.
    """
    base, query, _ = url.partition("#")[0].partition("?")
    scheme, separator, rest = base.partition("://")
    if not separator:
        scheme, rest = "", base
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2]
    return f"{scheme}{separator}{authority}{slash}{path}{'?...' if query else ''}"


_TLS_HINT = "; is it a TLS server? try wss://"


def _parse_url(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname or ""
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        resource.encode("ascii")
        host_header = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise ConnectError(f"invalid WebSocket URL {redact(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if "://" not in url or scheme not in ("ws", "wss"):
        shown = redact(url)
        rest = shown.partition("://")[2] if "://" in shown else shown
        raise ConnectError(
            f"invalid WebSocket URL {shown!r}: it needs a ws:// or wss:// scheme"
            f" (wss:// for TLS), as in 'ws://{rest}'"
        )
    if not host:
        raise ConnectError(f"invalid WebSocket URL {redact(url)!r}: it has no host")
    if parts.username is not None or parts.password is not None:
        raise ConnectError("credentials in a WebSocket URL are not supported; use headers")
    secure = scheme == "wss"
    default_port = 443 if secure else 80
    if port is None:
        port = default_port
    if ":" in host_header:
        host_header = f"[{host_header}]"
    if port != default_port:
        host_header = f"{host_header}:{port}"
    return _Target(host, port, secure, resource, host_header)


class _ClientHandshake:
    """Sans-IO client half of the RFC 6455 opening handshake, over h11."""

    def __init__(
        self, target: _Target, headers: Sequence[tuple[str, str]], max_header_size: int
    ) -> None:
        """Build the upgrade request.

        Raises:
            ValueError: If ``headers`` name a header astral sets itself, or hold
                characters HTTP forbids.
        """
        for name, _ in headers:
            if name.lower() in _RESERVED:
                raise ValueError(f"the {name!r} header is set by astral")
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()  # noqa: S324 - RFC 6455
        self._accept = base64.b64encode(digest)
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_size)
        self._budget = max_header_size + 1  # bytes we may read before the head ends
        fields: list[tuple[str, str]] = [
            ("host", target.host_header),
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", key),
            ("sec-websocket-version", "13"),
            *headers,
        ]
        try:
            request = h11.Request(method="GET", target=target.resource, headers=fields)
            self.request = self._h11.send(request) or b""
        except h11.LocalProtocolError as exc:
            # Not h11's text: it may quote the value, a token included.
            raise ValueError(f"invalid request header ({type(exc).__name__})") from None
        #: The status of a refusal, once its head has arrived.
        self.status: int | None = None
        #: The 101 response's headers (names lower-cased), once it has arrived.
        self.response_headers: tuple[tuple[str, str], ...] = ()
        self._body = bytearray()
        self._secure = target.secure
        self._first = b""  # the first byte the server sent

    @property
    def secure(self) -> bool:
        """Whether the connection is TLS (``wss://``)."""
        return self._secure

    @property
    def read_size(self) -> int:
        """How many bytes to read next: never past the head-size limit.

        h11 checks that limit only while it waits for more data.
        """
        if self.status is not None:
            return READ_SIZE
        return max(1, min(READ_SIZE, self._budget))

    def receive_data(self, data: bytes) -> bytes | None:
        """Feed bytes from the server (``b""`` at end of stream).

        Returns:
            ``None`` while more is needed; once the server switched protocols,
            the bytes it sent after its response (already WebSocket frames).

        Raises:
            Unauthorized: If the server answered 401.
            HandshakeError: For any other answer, or none.
        """
        if self.status is None:
            self._budget -= len(data)
            self._first = self._first or data[:1]
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self.status is not None or not data:
                    raise self.refusal() from exc
                if not self._secure and self._first in (b"\x15", b"\x16"):
                    # A TLS record (alert or handshake) where HTTP was expected.
                    raise HandshakeError(
                        "the server answered in TLS, not HTTP: try wss://"
                    ) from exc
                raise HandshakeError(f"invalid HTTP response: {exc}") from exc
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._check(event)
                    return bytes(self._h11.trailing_data[0])
            elif isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.Data):
                self._body += event.data[: _BODY_LIMIT - len(self._body)]
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                raise self.refusal()
            else:  # PAUSED cannot come before a 101
                raise HandshakeError(f"unexpected HTTP event {event!r}")

    def _check(self, response: h11.InformationalResponse) -> None:
        fields: dict[bytes, bytes] = {}
        for name, value in response.headers:
            fields[name] = fields[name] + b", " + value if name in fields else value
        problem = None
        if fields.get(b"upgrade", b"").lower() != b"websocket":
            problem = "missing 'Upgrade: websocket'"
        elif b"upgrade" not in {
            t.strip().lower() for t in fields.get(b"connection", b"").split(b",")
        }:
            problem = "missing 'Connection: Upgrade'"
        elif fields.get(b"sec-websocket-accept") != self._accept:
            problem = "wrong Sec-WebSocket-Accept"
        elif b"sec-websocket-extensions" in fields or b"sec-websocket-protocol" in fields:
            problem = "server chose an extension or subprotocol we did not offer"
        if problem is not None:
            raise HandshakeError(f"invalid WebSocket upgrade response: {problem}", status=101)
        self.response_headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers
        )

    def refusal(self) -> HandshakeError:
        """Return the error for a server that answered without switching protocols."""
        if self.status is None:
            hint = "" if self._secure else _TLS_HINT
            return HandshakeError(f"the server closed the connection without answering{hint}")
        body = self._body.decode("utf-8", "replace").strip()[:200]
        detail = f": {body}" if body else ""
        if self.status == 401:
            return Unauthorized(f"server rejected the token (HTTP 401){detail}")
        return HandshakeError(
            f"server refused the WebSocket upgrade with HTTP {self.status}{detail}",
            status=self.status,
        )


async def _open_stream(target: _Target, ssl_context: ssl.SSLContext | None) -> ByteStream:
    try:
        tcp = await anyio.connect_tcp(target.host, target.port)
    except OSError as exc:
        raise ConnectError(f"cannot connect to {target.host}:{target.port}: {exc}") from exc
    if not target.secure:
        return tcp
    try:
        return await TLSStream.wrap(
            tcp,
            hostname=target.host,
            ssl_context=ssl_context or ssl.create_default_context(),
            standard_compatible=False,
        )
    except BaseException as exc:
        await anyio.aclose_forcefully(tcp)
        if isinstance(exc, ssl.SSLError):
            raise TLSError(f"TLS handshake with {target.host} failed: {exc}") from exc
        if isinstance(exc, STREAM_ERRORS):
            raise TLSError(f"connection lost during the TLS handshake: {exc!r}") from exc
        raise


async def _upgrade(stream: ByteStream, handshake: _ClientHandshake) -> bytes:
    try:
        await stream.send(handshake.request)
        while True:
            try:
                data = await stream.receive(handshake.read_size)
            except anyio.EndOfStream:
                data = b""
            trailing = handshake.receive_data(data)
            if trailing is not None:
                return trailing
    except STREAM_ERRORS as exc:
        if handshake.status is not None:
            raise handshake.refusal() from exc
        hint = "" if handshake.secure else _TLS_HINT
        raise HandshakeError(
            f"connection lost during the WebSocket upgrade: {exc!r}{hint}"
        ) from exc


async def _connect(
    url: str,
    ssl_context: ssl.SSLContext | None,
    headers: Sequence[tuple[str, str]],
    open_timeout: float | None,
    max_header_size: int,
) -> tuple[ByteStream, bytes, tuple[tuple[str, str], ...]]:
    target = _parse_url(url)
    if ssl_context is not None and not target.secure:
        raise ValueError("ssl_context given for a ws:// URL; use wss://")
    handshake = _ClientHandshake(target, headers, max_header_size)
    stream: ByteStream | None = None
    done = False
    try:
        with anyio.move_on_after(open_timeout):
            stream = await _open_stream(target, ssl_context)
            trailing = await _upgrade(stream, handshake)
            done = True
            return stream, trailing, handshake.response_headers
        if handshake.status is not None:  # refused, but the body never ended
            raise handshake.refusal()
        raise ConnectTimeout(f"opening {redact(url)} took more than {open_timeout} s")
    finally:
        if stream is not None and not done:
            await anyio.aclose_forcefully(stream)


@asynccontextmanager
async def open_websocket(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    headers: Sequence[tuple[str, str]] = (),
    open_timeout: float | None = _defaults.OPEN_TIMEOUT,
    ping_interval: float | None = _defaults.PING_INTERVAL,
    ping_timeout: float | None = _defaults.PING_TIMEOUT,
    close_timeout: float = _defaults.CLOSE_TIMEOUT,
    max_message_size: int = _defaults.MAX_MESSAGE_SIZE,
    max_header_size: int = _defaults.MAX_HEADER_SIZE,
    reader_task: bool = True,
) -> AsyncIterator[WebSocketConnection]:
    """Open a WebSocket connection to ``url`` for the duration of the block.

    Leaving the block closes the connection: with 1000 normally, 1001 "going
    away" when cancelled, 1011 when an exception escapes the block (the
    exception itself comes out unchanged). The close handshake takes at most
    ``close_timeout`` seconds and is not cut short by the cancellation.

    Args:
        url: ``ws://host[:port]/path?query`` or ``wss://...``.
        ssl_context: Client TLS context for ``wss://``; defaults to
            :func:`ssl.create_default_context`.
        headers: Extra request headers, e.g. ``[("authorization", "Bearer ...")]``.
        open_timeout: Seconds for TCP, TLS and the upgrade together; ``None``
            for no limit.
        ping_interval: Seconds between keepalive pings; ``None`` for none.
        ping_timeout: Seconds to wait for a pong before closing with 1011;
            ``None`` to wait forever.
        close_timeout: Seconds to wait for a close handshake.
        max_message_size: Largest message accepted, in bytes (reassembled);
            bigger ones close the connection with 1009.
        max_header_size: Largest response head accepted, in bytes.
        reader_task: Read the connection in a task of its own. ``False``
            when the block's consumer reads through
            :meth:`~astral._ws_connection.WebSocketConnection.deliver` (a
            peer does): one task less.

    Yields:
        The open connection.

    Raises:
        ConnectError: If the URL is invalid or the server cannot be reached.
        ConnectTimeout: If opening takes more than ``open_timeout`` seconds.
        TLSError: If the TLS handshake fails (e.g. an untrusted certificate).
        Unauthorized: If the server answers the upgrade with HTTP 401.
        HandshakeError: If it answers with any other status, or botches the
            upgrade.
        ValueError: For a bad limit, a reserved or invalid header, or an
            ``ssl_context`` with a ``ws://`` URL.
    """
    check_options(
        open_timeout=open_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        max_message_size=max_message_size,
        max_header_size=max_header_size,
    )
    stream, trailing, response_headers = await _connect(
        url, ssl_context, headers, open_timeout, max_header_size
    )
    conn = WebSocketConnection(
        stream,
        Connection(ConnectionType.CLIENT, trailing_data=trailing),
        request=None,
        remote_address=peer_address(stream),
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        max_message_size=max_message_size,
    )
    conn.response_headers = response_headers
    async with conn._run(reader_task=reader_task):
        yield conn
