"""``astral.asgi``: a principal served by any ASGI 3 server.

An optional integration: ``import astral`` never imports it. The application
answers ``websocket`` scopes with an astral :class:`~astral.Peer`, exactly as
``astral.serve`` does over its own WebSocket server::

    import astral.asgi

    workers = astral.PeerRegistry()
    app = astral.asgi.App(verifier=verifier, capabilities=caps, registry=workers)
    # uvicorn module:app, or hypercorn module:app (asyncio or trio workers)

Authentication happens before the upgrade. The token is read from the
``Authorization: Bearer`` header, else from the ``token`` query parameter (what
the original TypeScript worker sends), and verified before
``websocket.accept``. A refused token never gets a WebSocket:

* servers offering the ``websocket.http.response`` ASGI extension (uvicorn,
  with each of its WebSocket implementations, and hypercorn; checked with
  uvicorn 0.54 and hypercorn 0.18) answer **HTTP 401** with
  ``WWW-Authenticate: Bearer``, which :func:`astral.connect` reports as
  :class:`astral.Unauthorized`;
* servers without it (daphne, for one) can only be told ``websocket.close``
  before the accept, which the ASGI spec turns into **HTTP 403**; clients see
  a :class:`astral.HandshakeError` with ``status == 403``. The token is still
  checked before anything is accepted.

The token never appears in astral's logs or errors. The ASGI server's own
access log, however, records the request line: with ``?token=`` that line
holds the token (uvicorn logs ``"WebSocket /path?token=..."`` at INFO level).
Prefer the header, or silence the access log, when workers can send it.

Server shutdown: uvicorn closes every WebSocket with 1012 and tells the
application ``websocket.disconnect``; hypercorn waits ``graceful_timeout``
seconds, then cancels the application, which then closes the connection
with 1001. (Except hypercorn on asyncio under Python 3.12.1 and later: it
waits for every client to leave and never tells the application,
pgjones/hypercorn#308. Its trio worker is not affected.) Either way the
worker's pending calls fail with :class:`astral.ConnectionClosed` and this
side's with the same.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import parse_qsl

import anyio

from . import _defaults
from ._auth import Verifier, verify_token
from ._dispatch import resolve
from ._exceptions import AuthenticationError, ConnectionClosed
from ._handshake import RemoteLimits, advertise
from ._peer import (
    DEFAULT_MAX_BUFFERED_ITEMS,
    DEFAULT_MAX_INBOUND_CALLS,
    DEFAULT_TIMEOUT,
    Peer,
    check_limits,
)
from ._principal import expiry_leeway, host_worker, token_from

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._dispatch import Capabilities
    from ._frames import JsonDefault
    from ._middleware import Middleware
    from ._principal import Registry

__all__ = ["App"]

logger = logging.getLogger("astral.asgi")

_Scope: TypeAlias = MutableMapping[str, Any]
_Receive: TypeAlias = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_DENIAL_EXTENSION = "websocket.http.response"
_TEXT_PLAIN = (b"content-type", b"text/plain; charset=utf-8")
_Refusal: TypeAlias = tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]
_UNAUTHORIZED: _Refusal = (
    401,
    b"unauthorized\n",
    ((b"www-authenticate", b'Bearer realm="astral"'),),
)
_NOT_FOUND: _Refusal = (404, b"not found\n", ())
_SHUTTING_DOWN: _Refusal = (503, b"shutting down\n", ())
_CLOSED_HERE = "connection closed by this peer"
_CLOSED_THERE = "connection closed by the remote peer"


class App:
    """An ASGI 3 application that serves astral workers over WebSockets.

    * ``websocket`` scopes: the worker's token is verified before
      ``websocket.accept`` (see the module documentation for what a refused
      worker sees); an accepted connection runs one :class:`~astral.Peer` with
      ``capabilities`` and the worker's verified claims until either side
      closes it.
    * ``lifespan`` scopes: startup and shutdown are acknowledged.
    * ``http`` scopes: ``404 Not Found``, plain text.

    Args:
        verifier: Checks each token: an :class:`astral.JWTVerifier`, or any
            ``verify(token) -> claims`` callable, sync or async. Required:
            there is no unauthenticated mode.
        capabilities: What workers may call on the principal.
        registry: Filled with connected peers, keyed by their token's ``sub``:
            a :class:`astral.PeerRegistry`, or an :class:`astral.redis.RedisRegistry`
            shared by every process (``uvicorn --workers``).
        on_connect: Awaited with each connected peer; the connection stays
            open after it returns, until the worker leaves. If it raises, that
            connection is closed (1011) and the error logged.
        path: Only accept upgrades whose ASGI ``scope["path"]`` equals this,
            a trailing slash aside (``"/astral"`` and ``"/astral/"`` are one
            path); others are refused with 404 before their token is looked
            at. ``None`` accepts any path.
        timeout: Default seconds a call to a worker waits for its first frame.
        close_timeout: Longest wait, in seconds, for the ASGI server to take
            our ``websocket.close`` message.
        max_inbound_calls: Calls one worker may have running here at once.
        max_buffered_items: Items buffered per streaming call.
        middleware: Wrap every call to and from each worker, first one outermost
            (see :data:`astral.Middleware`).
        hide_internal_errors: Send ``"internal error"`` instead of the
            message of an unexpected exception in a capability here (code
            ``"internal"`` still); the full error is logged here.
        grace: Seconds calls in flight may take to finish on shutdown
            (``lifespan.shutdown``, or the server cancelling the application)
            before the connection closes with 1001; new calls are refused
            with ``"shutting down"`` meanwhile. ``0`` cancels them at once.
        close_on_token_expiry: Close each connection (4401 ``"token
            expired"``) when its token's ``exp`` passes, after the leeway of a
            :class:`astral.JWTVerifier` (none for other verifiers).
        max_message_size: The largest message the ASGI server accepts, told
            to workers (``Astral-Max-Message-Size``) so that a too-big call
            fails alone. Set it to the server's own limit or below (uvicorn's
            ``ws_max_size``, hypercorn's ``websocket_max_message_size``).
        json_default: Converts values outside the value rule (see
            :class:`astral.Peer`); ``None`` refuses them.

    Raises:
        TypeError: A capability is not async.
        ValueError: A limit is not positive, or ``grace`` is negative.
    """

    def __init__(
        self,
        *,
        verifier: Verifier,
        capabilities: Capabilities | None = None,
        registry: Registry | None = None,
        on_connect: Callable[[Peer], Awaitable[None]] | None = None,
        path: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        close_timeout: float = _defaults.CLOSE_TIMEOUT,
        max_inbound_calls: int = DEFAULT_MAX_INBOUND_CALLS,
        max_buffered_items: int = DEFAULT_MAX_BUFFERED_ITEMS,
        middleware: Sequence[Middleware] = (),
        hide_internal_errors: bool = False,
        grace: float = _defaults.GRACE,
        close_on_token_expiry: bool = True,
        max_message_size: int = _defaults.MAX_MESSAGE_SIZE,
        json_default: JsonDefault | None = None,
    ) -> None:
        # Fail now, not at the first connection, on a sync capability or a bad
        # limit. Every connection gets this one table, not one resolved for it.
        table = resolve(capabilities)
        check_limits(timeout, max_inbound_calls, max_buffered_items)
        if not grace >= 0:
            raise ValueError("grace must not be negative")
        self._grace = grace
        if max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        self._accept_headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in advertise(max_message_size)
        ]
        self._expiry_leeway = expiry_leeway(verifier, close_on_token_expiry)
        self._hosted: set[Peer] = set()
        self._stopping = False
        self._verifier = verifier
        self._capabilities = table
        self._registry = registry
        self._on_connect = on_connect
        self._path = path
        self._timeout = timeout
        self._close_timeout = close_timeout
        self._max_inbound_calls = max_inbound_calls
        self._max_buffered_items = max_buffered_items
        self._middleware = tuple(middleware)
        self._hide_internal_errors = hide_internal_errors
        self._json_default = json_default

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """Serve one ASGI connection.

        Raises:
            ValueError: The scope type is not ``websocket``, ``http`` or
                ``lifespan`` (the ASGI spec asks applications to fail there).
        """
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            status, body, headers = _NOT_FOUND
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [*headers, _TEXT_PLAIN],
                }
            )
            await send({"type": "http.response.body", "body": body})
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    async def _websocket(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # the client left before the server handed us the request
        if self._path is not None and not _same_path(scope.get("path"), self._path):
            await _deny(scope, send, *_NOT_FOUND)
            return
        if self._stopping:
            await _deny(scope, send, *_SHUTTING_DOWN)
            return
        try:
            claims = await verify_token(self._verifier, _token_of(scope))
        except AuthenticationError as exc:
            # The message never quotes the token (verify_token's contract).
            logger.info("refused connection from %s: %s", _address(scope), exc)
            await _deny(scope, send, *_UNAUTHORIZED)
            return
        await send({"type": "websocket.accept", "headers": self._accept_headers})
        transport = _ASGITransport(receive, send, close_timeout=self._close_timeout)
        await host_worker(
            transport,
            transport.close,
            claims,
            capabilities=self._capabilities,
            registry=self._registry,
            on_connect=self._on_connect,
            where=_address(scope),
            grace=self._grace,
            expiry_leeway=self._expiry_leeway,
            hosted=self._hosted,
            **RemoteLimits.from_headers(_headers_of(scope)).peer_options(),
            timeout=self._timeout,
            max_inbound_calls=self._max_inbound_calls,
            max_buffered_items=self._max_buffered_items,
            middleware=self._middleware,
            hide_internal_errors=self._hide_internal_errors,
            json_default=self._json_default,
        )

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        while True:
            kind = (await receive())["type"]
            if kind == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                await self.drain()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def drain(self) -> None:
        """Drain every connection at once and close each with 1001.

        Done on ``lifespan.shutdown``; call it yourself when your server
        sends that only after closing the WebSockets (uvicorn does). From
        then on new connections are refused (HTTP 503), new calls with
        ``"shutting down"``, and calls in flight get ``grace`` seconds to
        finish.
        """
        self._stopping = True
        async with anyio.create_task_group() as tg:
            for peer in list(self._hosted):
                tg.start_soon(_drain, peer, self._grace)


async def _drain(peer: Peer, grace: float) -> None:
    await peer.drain(grace, code=1001, reason="server shutting down")


def _same_path(path: object, expected: str) -> bool:
    # Routers mount an app at "/astral" and hand it "/astral/" (Starlette's
    # Mount), or route "/astral" itself: both are the same endpoint.
    return isinstance(path, str) and (path.rstrip("/") or "/") == (expected.rstrip("/") or "/")


class _ASGITransport:
    """An accepted ASGI WebSocket as an astral :class:`~astral.Transport`.

    The ASGI spec says nothing about calling ``send`` from several tasks at
    once, and ``websocket.close`` must come after every ``websocket.send``
    (servers raise on a send after the close), so every message goes through
    one lock. uvicorn's sans-IO implementation and hypercorn happen to
    serialize each message synchronously; servers need not.
    """

    def __init__(self, receive: _Receive, send: _Send, *, close_timeout: float) -> None:
        self._receive = receive
        self._send = send
        self._close_timeout = close_timeout
        self._lock = anyio.Lock()
        # Why the connection ended, once it has: (reason, code).
        self._ended: tuple[str, int | None] | None = None
        self._disconnected = False  # the server reported websocket.disconnect
        self._close_started = False

    def _closed_error(self) -> ConnectionClosed:
        assert self._ended is not None
        reason, code = self._ended
        return ConnectionClosed(reason, code=code)

    async def send(self, item: str, /) -> None:
        """Send one text message.

        Raises:
            ConnectionClosed: The connection has ended.
        """
        async with self._lock:
            if self._ended is not None:
                raise self._closed_error()
            try:
                await self._send({"type": "websocket.send", "text": item})
            except OSError as exc:  # uvicorn's ClientDisconnected, a broken socket
                self._ended = self._ended or ("connection lost", 1006)
                raise self._closed_error() from exc

    async def receive(self) -> str:
        """Return the next message; binary ones are decoded as UTF-8.

        Raises:
            ConnectionClosed: The client disconnected (with its close code),
                or sent a binary message that is not UTF-8 (1007).
        """
        while True:
            if self._disconnected:
                raise self._closed_error()
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                if message.get("text") is not None:
                    return str(message["text"])
                if message.get("bytes") is not None:
                    try:
                        return bytes(message["bytes"]).decode("utf-8")
                    except UnicodeDecodeError as exc:
                        await self.close(1007, "invalid UTF-8 in binary message")
                        raise self._closed_error() from exc
            elif kind == "websocket.disconnect":
                self._disconnected = True
                self._ended = self._ended or (
                    message.get("reason") or _CLOSED_THERE,
                    message.get("code", 1005),
                )
                raise self._closed_error()
            # Anything else (a stray websocket.connect) carries no message.

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection with ``code`` and ``reason``. Idempotent; never raises."""
        await self.close(code, reason)

    async def close(self, code: int, reason: str = "") -> None:
        """Send ``websocket.close`` once, unless the client has already left.

        Waits at most ``close_timeout`` seconds for the server (and for a
        concurrent send) to take it. Never raises.
        """
        if self._close_started:
            return
        self._close_started = True
        self._ended = self._ended or (reason or _CLOSED_HERE, code)
        if self._disconnected:
            return
        with anyio.move_on_after(self._close_timeout):
            async with self._lock:
                try:
                    await self._send({"type": "websocket.close", "code": code, "reason": reason})
                except OSError:
                    pass  # gone already: nothing left to close


async def _deny(
    scope: _Scope,
    send: _Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]],
) -> None:
    """Refuse an upgrade: an HTTP response if the server can send one, else 403."""
    if _DENIAL_EXTENSION in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [*headers, _TEXT_PLAIN],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        # A close before the accept is all the base spec offers: the server
        # answers 403 whatever the reason.
        await send({"type": "websocket.close", "code": 1008})


def _headers_of(scope: _Scope) -> list[tuple[str, str]]:
    return [
        (bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
        for name, value in scope.get("headers", ())
    ]


def _token_of(scope: _Scope) -> str | None:
    """The bearer token of the ``Authorization`` header, else ``?token=``.

    Like ``astral.serve``: repeated ``Authorization`` headers are joined with
    ``", "`` as HTTP prescribes, so a request carrying two never validates.
    """
    values = [
        bytes(value).decode("latin-1")
        for name, value in scope.get("headers", ())
        if bytes(name).lower() == b"authorization"
    ]
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    query_token = next(
        (value for key, value in parse_qsl(query, keep_blank_values=True) if key == "token"),
        None,
    )
    return token_from(", ".join(values) if values else None, query_token)


def _address(scope: Mapping[str, Any]) -> str:
    client = scope.get("client")
    if not client:
        return "unknown address"
    host, port = client[:2]
    return f"{host}:{port}"
