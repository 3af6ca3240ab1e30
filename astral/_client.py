"""``astral.connect``: a worker opens a WebSocket to a principal.

The token is minted (or taken) once per connection, sent in an
``Authorization: Bearer`` header by default or in the ``?token=`` query
parameter (what the original TypeScript principal reads), and the peer then
runs over the WebSocket exactly as over any transport.
"""

from __future__ import annotations

import inspect
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio

from . import _defaults
from ._handshake import RemoteLimits, advertise
from ._logs import ClosingLog, log_connection
from ._peer import (
    DEFAULT_MAX_BUFFERED_ITEMS,
    DEFAULT_MAX_INBOUND_CALLS,
    DEFAULT_TIMEOUT,
    Peer,
    check_limits,
)
from ._websocket import open_websocket

if TYPE_CHECKING:
    import ssl as _ssl
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

    from ._dispatch import Capabilities
    from ._frames import JsonDefault
    from ._middleware import Middleware

__all__ = ["connect"]


async def _resolve_token(token: str | Callable[[], str | Awaitable[str]] | None) -> str | None:
    if token is None or isinstance(token, str):
        return token
    value = token()
    if inspect.isawaitable(value):
        value = await value
    if not isinstance(value, str):
        raise TypeError(f"token function returned {type(value).__name__}, not str")
    return value


def _with_token_query(url: str, token: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _loggable(url: str) -> str:
    # Never the query string in a log line: it may hold the token.
    try:
        return urlunsplit(urlsplit(url)._replace(query="", fragment=""))
    except ValueError:
        return "an invalid URL"  # open_websocket says what is wrong with it


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | Callable[[], str | Awaitable[str]] | None = None,
    capabilities: Capabilities | None = None,
    ssl: _ssl.SSLContext | None = None,
    token_in_query: bool = False,
    headers: Sequence[tuple[str, str]] = (),
    timeout: float | None = DEFAULT_TIMEOUT,
    open_timeout: float | None = _defaults.OPEN_TIMEOUT,
    ping_interval: float | None = _defaults.PING_INTERVAL,
    ping_timeout: float | None = _defaults.PING_TIMEOUT,
    close_timeout: float = _defaults.CLOSE_TIMEOUT,
    max_message_size: int = _defaults.MAX_MESSAGE_SIZE,
    max_inbound_calls: int = DEFAULT_MAX_INBOUND_CALLS,
    max_buffered_items: int = DEFAULT_MAX_BUFFERED_ITEMS,
    claims: Mapping[str, Any] | None = None,
    middleware: Sequence[Middleware] = (),
    hide_internal_errors: bool = False,
    json_default: JsonDefault | None = None,
) -> AsyncIterator[Peer]:
    """Connect to a principal and run a peer over the WebSocket.

    ::

        async with astral.connect(
            "wss://principal.example/astral",
            token=lambda: astral.mint_token(secret, subject="worker-1"),
            capabilities={"bash": bash},
        ) as peer:
            print(await peer.call("transcription", {"audio": "..."}))

    Args:
        url: ``ws://`` or ``wss://`` URL of the principal.
        token: The JWT, or a sync or async function returning a fresh one
            (called once per connection). ``None`` sends no token.
        capabilities: What this worker lets the principal call.
        ssl: TLS context for ``wss://``; by default the system's trusted CAs
            with host name verification.
        token_in_query: Send the token as ``?token=`` (what the original
            TypeScript principal reads) instead of an
            ``Authorization: Bearer`` header. Query strings end up in proxy
            and server logs: prefer the header where the server reads it.
        headers: Extra HTTP headers for the upgrade request.
        timeout: Default seconds a call waits for its first frame.
        open_timeout: Seconds for TCP, TLS and the upgrade together.
        ping_interval: Seconds between keepalive pings; ``None`` disables.
        ping_timeout: Seconds to wait for a pong before closing.
        close_timeout: Seconds to wait for the closing handshake.
        max_message_size: Largest incoming message, in bytes (close 1009);
            told to the principal (``Astral-Max-Message-Size``), which then
            fails a too-big answer alone instead of sending it. A call larger
            than the principal's own limit (1 MiB if it says none) fails with
            :class:`astral.ProtocolError` before it is sent.
        max_inbound_calls: Remote calls allowed to run here at once.
        max_buffered_items: Items buffered per streaming call.
        claims: Claims describing the principal, for this worker's
            capabilities to read through ``current_peer().claims``.
        middleware: Wrap every call to and from the principal, first one outermost
            (see :data:`astral.Middleware`).
        hide_internal_errors: Send ``"internal error"`` instead of the
            message of an unexpected exception in a capability here (code
            ``"internal"`` still); the full error is logged here.
        json_default: Converts values outside the value rule (see
            :class:`astral.Peer`); ``None`` refuses them.

    Yields:
        The running :class:`astral.Peer`.

    Raises:
        Unauthorized: The principal refused the token (HTTP 401).
        HandshakeError: The principal refused the upgrade otherwise.
        TLSError: The TLS handshake failed.
        ConnectTimeout: Opening took longer than ``open_timeout``.
        ConnectError: The connection was refused or the URL is invalid.
        TypeError: A capability is not async, or the token function
            returned something other than a string.
        ValueError: A limit is not positive, or a header is one astral sets.
    """
    check_limits(timeout, max_inbound_calls, max_buffered_items)
    value = await _resolve_token(token)
    ours = advertise(max_message_size)
    for name, _ in headers:
        if name.lower() in {own.lower() for own, _ in ours}:
            raise ValueError(f"the {name!r} header is set by astral")
    all_headers = [*headers, *ours]
    if value is not None:
        if token_in_query:
            url = _with_token_query(url, value)
        else:
            all_headers.append(("Authorization", f"Bearer {value}"))
    where = _loggable(url)
    subject = (claims or {}).get("sub")
    with log_connection(where, subject) as closing:
        async with _running(
            url,
            all_headers,
            closing,
            ssl=ssl,
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            max_message_size=max_message_size,
            capabilities=capabilities,
            claims=claims,
            timeout=timeout,
            max_inbound_calls=max_inbound_calls,
            max_buffered_items=max_buffered_items,
            middleware=middleware,
            hide_internal_errors=hide_internal_errors,
            json_default=json_default,
        ) as peer:
            yield peer


@asynccontextmanager
async def _running(
    url: str,
    all_headers: list[tuple[str, str]],
    closing: ClosingLog,
    *,
    ssl: _ssl.SSLContext | None,
    open_timeout: float | None,
    ping_interval: float | None,
    ping_timeout: float | None,
    close_timeout: float,
    max_message_size: int,
    **peer_options: Any,
) -> AsyncIterator[Peer]:
    async with (
        open_websocket(
            url,
            ssl_context=ssl,
            headers=all_headers,
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            max_message_size=max_message_size,
            reader_task=False,  # the peer reads it (WebSocketConnection.deliver)
        ) as websocket,
        Peer(
            websocket,
            **RemoteLimits.from_headers(websocket.response_headers).peer_options(),
            **peer_options,
        ) as peer,
    ):
        closing.opened("connected to %s", peer)
        try:
            yield peer
        except BaseException as exc:
            # Say why on the wire: 1001 when the worker is going away
            # (cancelled), 1011 when the code using the peer failed.
            going_away = isinstance(exc, anyio.get_cancelled_exc_class())
            closing.code = 1001 if going_away else 1011
            with anyio.CancelScope(shield=True):
                await websocket.aclose(
                    1001 if going_away else 1011, "going away" if going_away else "error"
                )
            raise
