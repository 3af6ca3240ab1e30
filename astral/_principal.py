"""What a principal does with each authenticated connection.

Shared by :func:`astral.serve` (astral's own WebSocket server) and
:class:`astral.asgi.App` (any ASGI server): run one :class:`~astral.Peer`
with the worker's verified claims, list it in the :class:`PeerRegistry`
under the token's subject, run ``on_connect``, and close with the right code
(1011 when ``on_connect`` fails, 1001 when the server shuts down).

This module knows no WebSocket library: each server hands it a transport and
a way to close that transport with a code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from ._exceptions import ConnectionClosed
from ._logs import ClosingLog, log_connection
from ._peer import Peer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._dispatch import Capabilities
    from ._transport import Transport

__all__ = ["PeerRegistry", "host_worker", "token_from"]

logger = logging.getLogger("astral.server")


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


def token_from(authorization: str | None, query_token: str | None) -> str | None:
    """The token a worker presented: a Bearer ``Authorization`` header, else ``?token=``.

    Args:
        authorization: The ``Authorization`` header; repeated headers joined
            with ``", "`` (so a request carrying two never validates).
        query_token: The ``token`` query parameter (what the original sends).
    """
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return query_token


async def host_worker(
    transport: Transport,
    close: Callable[[int, str], Awaitable[None]],
    claims: Mapping[str, Any],
    *,
    capabilities: Capabilities | None,
    registry: PeerRegistry | None,
    on_connect: Callable[[Peer], Awaitable[None]] | None,
    where: str,
    **peer_options: Any,
) -> None:
    """Serve one authenticated worker until it leaves or the server stops.

    Args:
        transport: The accepted connection.
        close: Closes it with a WebSocket close code and reason.
        claims: The worker's verified token claims.
        capabilities: What the worker may call.
        registry: Where to list the peer under its ``sub`` claim, if a string.
        on_connect: Awaited with the peer; if it raises, the connection is
            closed with 1011 and the error logged.
        where: Who the worker is, for log lines (its address).
        **peer_options: For :class:`~astral.Peer` (``timeout``, limits).
    """
    sub = claims.get("sub")
    # Connections whose token has no string subject are served, not listed.
    subject = sub if isinstance(sub, str) and registry is not None else None
    with log_connection(where, sub) as closing:
        await _host(
            transport,
            close,
            claims,
            closing,
            capabilities=capabilities,
            registry=registry,
            on_connect=on_connect,
            where=where,
            subject=subject,
            **peer_options,
        )


async def _host(
    transport: Transport,
    close: Callable[[int, str], Awaitable[None]],
    claims: Mapping[str, Any],
    closing: ClosingLog,
    *,
    capabilities: Capabilities | None,
    registry: PeerRegistry | None,
    on_connect: Callable[[Peer], Awaitable[None]] | None,
    where: str,
    subject: str | None,
    **peer_options: Any,
) -> None:
    async with Peer(transport, capabilities=capabilities, claims=claims, **peer_options) as peer:
        closing.opened("accepted connection from %s", peer)
        if subject is not None:
            assert registry is not None
            registry._add(subject, peer)
        try:
            if on_connect is not None:
                try:
                    await on_connect(peer)
                except ConnectionClosed:
                    pass  # the worker left while on_connect talked to it
                except Exception:
                    logger.exception("on_connect failed for %s; closing that connection", where)
                    closing.code = 1011
                    await close(1011, "internal error")
                    return
            await peer.wait_closed()
        except anyio.get_cancelled_exc_class():
            # The server is shutting down: say so before the peer tears down.
            closing.code = 1001
            with anyio.CancelScope(shield=True):
                await close(1001, "server shutting down")
            raise
        finally:
            if subject is not None:
                assert registry is not None
                registry._remove(subject, peer)
