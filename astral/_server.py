"""``astral.serve``: a principal that authenticates workers before the upgrade.

Each upgrade request's token (``?token=`` or ``Authorization: Bearer``) is
verified *before* the WebSocket is accepted: a missing or invalid token gets
HTTP 401 and never a connection. Each accepted connection runs one
:class:`~astral.Peer` with the principal's capabilities and the worker's
verified claims; connected peers are kept in a :class:`PeerRegistry` keyed
by the token's subject (``sub``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from . import _defaults
from ._auth import Verifier, verify_token
from ._dispatch import resolve
from ._exceptions import AuthenticationError
from ._handshake import RemoteLimits, advertise
from ._peer import (
    DEFAULT_MAX_BUFFERED_ITEMS,
    DEFAULT_MAX_INBOUND_CALLS,
    DEFAULT_TIMEOUT,
    Peer,
    check_limits,
)
from ._principal import Hosting, Registry, expiry_leeway, host_worker, token_from
from ._websocket import HandshakeRequest, Rejection, WebSocketConnection, serve_websocket

if TYPE_CHECKING:
    import ssl as _ssl
    from collections.abc import Awaitable, Callable, Sequence

    from ._dispatch import Capabilities
    from ._frames import JsonDefault
    from ._middleware import Middleware

__all__ = ["serve"]

logger = logging.getLogger("astral.server")

_UNAUTHORIZED = Rejection(
    401,
    "unauthorized\n",
    (("WWW-Authenticate", 'Bearer realm="astral"'), ("Content-Type", "text/plain")),
)
_NOT_FOUND = Rejection(404, "not found\n", (("Content-Type", "text/plain"),))


def _token_of(request: HandshakeRequest) -> str | None:
    return token_from(request.header("authorization"), request.query_param("token"))


async def serve(
    *,
    verifier: Verifier,
    capabilities: Capabilities | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl: _ssl.SSLContext | None = None,
    path: str | None = None,
    on_connect: Callable[[Peer], Awaitable[None]] | None = None,
    registry: Registry | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    open_timeout: float | None = _defaults.OPEN_TIMEOUT,
    ping_interval: float | None = _defaults.PING_INTERVAL,
    ping_timeout: float | None = _defaults.PING_TIMEOUT,
    close_timeout: float = _defaults.CLOSE_TIMEOUT,
    max_message_size: int = _defaults.MAX_MESSAGE_SIZE,
    max_header_size: int = _defaults.MAX_HEADER_SIZE,
    max_inbound_calls: int = DEFAULT_MAX_INBOUND_CALLS,
    max_buffered_items: int = DEFAULT_MAX_BUFFERED_ITEMS,
    middleware: Sequence[Middleware] = (),
    hide_internal_errors: bool = False,
    grace: float = _defaults.GRACE,
    close_on_token_expiry: bool = True,
    json_default: JsonDefault | None = None,
    max_connections: int = _defaults.MAX_CONNECTIONS,
    max_handshakes: int = _defaults.MAX_HANDSHAKES,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a principal until cancelled.

    Start it in a task group; ``start`` returns once it listens, with the
    bound port::

        async with anyio.create_task_group() as tg:
            port = await tg.start(functools.partial(
                astral.serve, verifier=verifier, capabilities=caps, registry=workers))
            ...
            tg.cancel_scope.cancel()   # drains, then every connection closes with 1001

    Stopping it (cancelling it) stops accepting connections at once; each
    connection then refuses new calls (``"shutting down"``), gives the calls
    in flight up to ``grace`` seconds to finish, and closes with 1001; what
    is left is cancelled. A connection whose token's ``exp`` passes (plus
    the verifier's leeway) is closed with 4401 ``"token expired"``.

    Args:
        verifier: Checks each token: an :class:`astral.JWTVerifier`, or any
            ``verify(token) -> claims`` callable, sync or async. Required:
            there is no unauthenticated mode.
        capabilities: What workers may call on the principal.
        host: Address to listen on.
        port: Port to listen on; ``0`` picks a free one.
        ssl: TLS context to serve ``wss://``; ``None`` serves ``ws://``.
        path: Only accept upgrades on this path (others get 404); ``None``
            accepts any path.
        on_connect: Awaited with each connected peer; the connection stays
            open after it returns, until the worker leaves. If it raises,
            that connection is closed (1011) and the error logged.
        registry: Filled with connected peers, keyed by token subject: a
            :class:`PeerRegistry`, an :class:`astral.redis.RedisRegistry` (shared
            by every principal process on one Redis), or any :class:`Registry`.
        timeout: Default seconds a call to a worker waits for its first frame.
        open_timeout: Seconds a client has for TLS and the upgrade request.
        ping_interval: Seconds between keepalive pings; ``None`` disables.
        ping_timeout: Seconds to wait for a pong before closing.
        close_timeout: Seconds to wait for a closing handshake.
        max_message_size: Largest incoming message, in bytes (close 1009);
            told to each worker (``Astral-Max-Message-Size``), which then
            fails a too-big call or answer alone instead of sending it. An
            answer larger than a worker's own limit (1 MiB if it says none)
            is sent as the error ``"result larger than N bytes"``.
        max_header_size: Largest upgrade request head, in bytes (431).
        max_inbound_calls: Calls one worker may have running here at once.
        max_buffered_items: Items buffered per streaming call.
        middleware: Wrap every call to and from each worker, first one outermost
            (see :data:`astral.Middleware`).
        hide_internal_errors: Send ``"internal error"`` instead of the
            message of an unexpected exception in a capability here (code
            ``"internal"`` still); the full error is logged here.
        grace: Seconds calls in flight may take to finish once the server
            is stopped; ``0`` cancels them at once.
        close_on_token_expiry: Close each connection (4401 ``"token
            expired"``) when its token's ``exp`` passes, after the leeway of a
            :class:`astral.JWTVerifier` (none for other verifiers).
        json_default: Converts values outside the value rule (see
            :class:`astral.Peer`); ``None`` refuses them.
        max_connections: Connections held at once, handshakes included; one
            more gets HTTP 503 (over TLS, is closed).
        max_handshakes: Connections in TLS or the upgrade request (not yet
            authenticated) at once; one more gets HTTP 503 (over TLS, is
            closed).
        task_status: Receives the bound port (see ``TaskGroup.start``).

    Raises:
        OSError: The address cannot be bound.
        TypeError: A capability is not async.
        ValueError: A limit is not positive, or ``grace`` is negative.
    """
    # Fail fast, before listening, on a capability that is not async or a bad
    # limit. Every connection gets this one table, not one resolved for it.
    table = resolve(capabilities)
    check_limits(timeout, max_inbound_calls, max_buffered_items)
    if not grace >= 0:
        raise ValueError("grace must not be negative")
    leeway = expiry_leeway(verifier, close_on_token_expiry)
    # Drains every connection when the server stops, so that no connection
    # needs a task of its own waiting for that.
    hosting = Hosting(grace)

    async def process_request(request: HandshakeRequest) -> Rejection | None:
        if path is not None and request.path.partition("?")[0] != path:
            return _NOT_FOUND
        try:
            request.state["claims"] = await verify_token(verifier, _token_of(request))
        except AuthenticationError as exc:
            logger.info("refused connection from %s: %s", _address(request), exc)
            return _UNAUTHORIZED
        return None

    async def run_connection(websocket: WebSocketConnection) -> None:
        request = websocket.request
        assert request is not None
        claims = request.state["claims"]
        where = _address(request)
        remote = RemoteLimits.from_headers(request.headers).peer_options()
        # Nothing reads the upgrade request after this: drop it rather than
        # keep its headers, the bearer token among them, for the
        # connection's life.
        websocket._request = None
        del request
        await host_worker(
            websocket,
            websocket.aclose,
            claims,
            capabilities=table,
            registry=registry,
            on_connect=on_connect,
            where=where,
            **remote,
            grace=grace,
            hosting=hosting,
            expiry_leeway=leeway,
            timeout=timeout,
            max_inbound_calls=max_inbound_calls,
            max_buffered_items=max_buffered_items,
            middleware=middleware,
            hide_internal_errors=hide_internal_errors,
            json_default=json_default,
        )

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(hosting.drain_on_stop)
            await serve_websocket(
                run_connection,
                host,
                port,
                ssl_context=ssl,
                process_request=process_request,
                open_timeout=open_timeout,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                close_timeout=close_timeout,
                max_message_size=max_message_size,
                max_header_size=max_header_size,
                response_headers=advertise(max_message_size),
                max_connections=max_connections,
                max_handshakes=max_handshakes,
                reader_task=False,  # each peer reads its connection (deliver)
                task_status=task_status,
            )
    except BaseExceptionGroup as group:
        # The error of the listener (say, an address in use) as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _address(request: HandshakeRequest) -> str:
    if request.remote_address is None:
        return "unknown address"
    host, port = request.remote_address[:2]
    return f"{host}:{port}"
