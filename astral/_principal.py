"""What a principal does with each authenticated connection.

Shared by :func:`astral.serve` (astral's own WebSocket server) and
:class:`astral.asgi.App` (any ASGI server): run one :class:`~astral.Peer`
with the worker's verified claims, list it in the :class:`PeerRegistry`
under the token's subject, run ``on_connect``, and close with the right code
(1011 when ``on_connect`` fails, 1001 when the server shuts down).

This module knows no WebSocket library: each server hands it a transport and
a way to close that transport with a code.

:class:`Registry` and :class:`Worker` are the shape every registry has, the
in-process :class:`PeerRegistry` and the cluster-wide
:class:`astral.redis.RedisRegistry` alike, so code written against one runs
on the other. The servers only use ``_add`` and ``_remove``, the seam a
registry offers them (``hosting`` wraps the two for your own servers).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ._exceptions import ConnectionClosed
from ._peer import Peer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import EllipsisType

    from ._dispatch import Capabilities
    from ._transport import Transport

__all__ = ["PeerRegistry", "Registry", "Worker", "host_worker", "token_from"]

logger = logging.getLogger("astral.server")


class Worker(Protocol):
    """A connected worker as a registry hands it out: what code may rely on.

    A :class:`~astral.Peer` is one (for a worker connected to this process);
    :class:`astral.redis.RemoteWorker` is another (for a worker connected to
    another principal process). Both raise the same exceptions.
    """

    @property
    def subject(self) -> str | None:
        """The ``sub`` claim of the worker's token."""
        ...

    @property
    def claims(self) -> Mapping[str, Any]:
        """The worker's verified token claims (read-only)."""
        ...

    @property
    def closed(self) -> bool:
        """Whether this worker is known to be gone."""
        ...

    async def call(
        self, capability: str, input: Any = None, *, timeout: float | EllipsisType | None = ...
    ) -> Any:
        """Call a capability of the worker; see :meth:`astral.Peer.call`."""
        ...

    def stream(
        self, capability: str, input: Any = None, *, timeout: float | EllipsisType | None = ...
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """Call a capability and iterate over its items; see :meth:`astral.Peer.stream`."""
        ...


class Registry(Protocol):
    """Where a principal lists its connected workers, keyed by token subject.

    :func:`astral.serve` and :class:`astral.asgi.App` accept anything of this
    shape: :class:`PeerRegistry` (one process) or
    :class:`astral.redis.RedisRegistry` (every process sharing one Redis).
    """

    async def wait_for(self, subject: str) -> Worker:
        """Return the worker of ``subject``, waiting until it connects."""
        ...

    async def lookup(self, subject: str) -> Worker | None:
        """Return the worker of ``subject`` if it is connected now, else ``None``."""
        ...

    async def subjects(self) -> list[str]:
        """The subjects of every connected worker, sorted."""
        ...

    def _add(self, subject: str, peer: Peer) -> None:
        """List ``peer`` under ``subject`` (the servers call it once connected)."""
        ...

    def _remove(self, subject: str, peer: Peer) -> None:
        """Unlist ``peer`` if it is still the one listed (the servers call it at the end)."""
        ...


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

    async def lookup(self, subject: str) -> Peer | None:
        """Return the peer of ``subject`` if it is connected now, else ``None``.

        Never waits (it is ``async`` to share :class:`Registry`'s shape).
        """
        peer = self._peers.get(subject)
        return peer if peer is not None and not peer.closed else None

    async def subjects(self) -> list[str]:
        """The subjects of the connected workers, sorted."""
        return sorted(subject for subject, peer in self._peers.items() if not peer.closed)

    @asynccontextmanager
    async def hosting(self, subject: str, peer: Peer) -> AsyncIterator[None]:
        """List ``peer`` under ``subject`` while the block runs (for your own servers).

        Args:
            subject: The worker's token subject.
            peer: Its running peer; it replaces any peer listed under ``subject``.
        """
        self._add(subject, peer)
        try:
            yield
        finally:
            self._remove(subject, peer)

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
    registry: Registry | None,
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
    async with Peer(transport, capabilities=capabilities, claims=claims, **peer_options) as peer:
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
                    await close(1011, "internal error")
                    return
            await peer.wait_closed()
        except anyio.get_cancelled_exc_class():
            # The server is shutting down: say so before the peer tears down.
            with anyio.CancelScope(shield=True):
                await close(1001, "server shutting down")
            raise
        finally:
            if subject is not None:
                assert registry is not None
                registry._remove(subject, peer)
