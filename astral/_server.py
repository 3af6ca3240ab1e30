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
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._auth import Verifier, verify_token
from ._dispatch import resolve
from ._exceptions import AuthenticationError, ConnectionClosed
from ._peer import (
    DEFAULT_MAX_BUFFERED_ITEMS,
    DEFAULT_MAX_INBOUND_CALLS,
    DEFAULT_TIMEOUT,
    Peer,
    check_limits,
)
from ._websocket import HandshakeRequest, Rejection, WebSocketConnection, serve_websocket

if TYPE_CHECKING:
    import ssl as _ssl
    from collections.abc import Awaitable, Callable

    from ._dispatch import Capabilities

__all__ = ["PeerRegistry", "serve"]

logger = logging.getLogger("astral.server")

_UNAUTHORIZED = Rejection(
    401,
    "unauthorized\n",
    (("WWW-Authenticate", 'Bearer realm="astral"'), ("Content-Type", "text/plain")),
)
_NOT_FOUND = Rejection(404, "not found\n", (("Content-Type", "text/plain"),))


class PeerRegistry(Mapping[str, Peer]):
    """The connected workers of a principal, keyed by their token's ``sub``.

    A read-only mapping that :func:`serve` keeps up to date. Application code
    anywhere can reach a worker through it::

        peer = await registry.wait_for("worker-1")
        await peer.call("bash", "uptime")

    When a second connection arrives with the same subject it replaces the
    first in the registry (the newest connection wins; the older one keeps
    running until it closes, but is no longer listed). Connections whose token
    has no ``sub`` are served but not listed.
    """

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}
        self._waiters: dict[str, anyio.Event] = {}

    def __getitem__(self, subject: str) -> Peer:
        return self._peers[subject]

    def __iter__(self) -> Iterator[str]:
        return iter(self._peers)

    def __len__(self) -> int:
        return len(self._peers)

    async def wait_for(self, subject: str) -> Peer:
        """Return the peer of ``subject``, waiting until it connects.

        Bound the wait with ``anyio.fail_after`` if it may never come.
        """
        while True:
            peer = self._peers.get(subject)
            if peer is not None and not peer.closed:
                return peer
            event = self._waiters.get(subject)
            if event is None:
                event = self._waiters[subject] = anyio.Event()
            await event.wait()

    def _add(self, subject: str, peer: Peer) -> None:
        self._peers[subject] = peer
        event = self._waiters.pop(subject, None)
        if event is not None:
            event.set()

    def _remove(self, subject: str, peer: Peer) -> None:
        if self._peers.get(subject) is peer:
            del self._peers[subject]


def _token_of(request: HandshakeRequest) -> str | None:
    authorization = request.header("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return request.query_param("token")


async def serve(
    *,
    verifier: Verifier,
    capabilities: Capabilities | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl: _ssl.SSLContext | None = None,
    path: str | None = None,
    on_connect: Callable[[Peer], Awaitable[None]] | None = None,
    registry: PeerRegistry | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    open_timeout: float | None = 10.0,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    close_timeout: float = 10.0,
    max_message_size: int = 2**20,
    max_header_size: int = 128 * 1024,
    max_inbound_calls: int = DEFAULT_MAX_INBOUND_CALLS,
    max_buffered_items: int = DEFAULT_MAX_BUFFERED_ITEMS,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a principal until cancelled.

    Start it in a task group; ``start`` returns once it listens, with the
    bound port::

        async with anyio.create_task_group() as tg:
            port = await tg.start(functools.partial(
                astral.serve, verifier=verifier, capabilities=caps, registry=workers))
            ...
            tg.cancel_scope.cancel()   # every connection closes with 1001

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
        registry: Filled with connected peers, keyed by token subject.
        timeout: Default seconds a call to a worker waits for its first frame.
        open_timeout: Seconds a client has for TLS and the upgrade request.
        ping_interval: Seconds between keepalive pings; ``None`` disables.
        ping_timeout: Seconds to wait for a pong before closing.
        close_timeout: Seconds to wait for a closing handshake.
        max_message_size: Largest incoming message, in bytes (close 1009).
        max_header_size: Largest upgrade request head, in bytes (431).
        max_inbound_calls: Calls one worker may have running here at once.
        max_buffered_items: Items buffered per streaming call.
        task_status: Receives the bound port (see ``TaskGroup.start``).

    Raises:
        OSError: The address cannot be bound.
        TypeError: A capability is not async.
        ValueError: A limit is not positive.
    """
    # Fail fast, before listening, on a capability that is not async or a bad limit.
    resolve(capabilities)
    check_limits(timeout, max_inbound_calls, max_buffered_items)

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
        assert websocket.request is not None
        claims: Mapping[str, Any] = websocket.request.state["claims"]
        subject = claims.get("sub")
        async with Peer(
            websocket,
            capabilities=capabilities,
            claims=claims,
            timeout=timeout,
            max_inbound_calls=max_inbound_calls,
            max_buffered_items=max_buffered_items,
        ) as peer:
            if isinstance(subject, str) and registry is not None:
                registry._add(subject, peer)
            try:
                if on_connect is not None:
                    try:
                        await on_connect(peer)
                    except ConnectionClosed:
                        pass  # the worker left while on_connect talked to it
                    except Exception:
                        logger.exception("on_connect failed; closing that connection")
                        await websocket.aclose(1011, "internal error")
                        return
                await peer.wait_closed()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await websocket.aclose(1001, "server shutting down")
                raise
            finally:
                if isinstance(subject, str) and registry is not None:
                    registry._remove(subject, peer)

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
        task_status=task_status,
    )


def _address(request: HandshakeRequest) -> str:
    if request.remote_address is None:
        return "unknown address"
    host, port = request.remote_address[:2]
    return f"{host}:{port}"
