"""What a principal does with each authenticated connection.

Shared by :func:`astral.serve` (astral's own WebSocket server) and
:class:`astral.asgi.App` (any ASGI server): run one :class:`~astral.Peer`
with the worker's verified claims, list it in the :class:`PeerRegistry`
under the token's subject, run ``on_connect``, and close with the right code
(1011 when ``on_connect`` fails, 1001 when the server shuts down, after
draining; :data:`TOKEN_EXPIRED_CODE` when the worker's token expires).

This module knows no WebSocket library: each server hands it a transport and
a way to close that transport with a code.

:class:`Registry` and :class:`Worker` are the shape every registry has, the
in-process :class:`PeerRegistry` and the cluster-wide
:class:`astral.redis.RedisRegistry` alike, so code written against one runs
on the other. The servers only use ``_add`` and ``_remove``, the seam a
registry offers them (``hosting`` wraps the two for your own servers).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ._alarm import Alarm
from ._auth import JWTVerifier
from ._exceptions import ConnectionClosed
from ._logs import ClosingLog, log_connection
from ._peer import Peer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from types import EllipsisType

    from ._dispatch import Capabilities
    from ._transport import AnyTransport

__all__ = [
    "TOKEN_EXPIRED",
    "TOKEN_EXPIRED_CODE",
    "PeerRegistry",
    "Registry",
    "Worker",
    "expiry_leeway",
    "host_worker",
    "token_from",
]

logger = logging.getLogger("astral.server")

#: The close code and reason of a connection whose token's ``exp`` has passed
#: (an application code; 4401 mirrors HTTP 401, as graphql-ws does).
TOKEN_EXPIRED_CODE = 4401
TOKEN_EXPIRED = "token expired"  # noqa: S105 - a close reason


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
        self,
        capability: str,
        input: Any = None,
        *,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
    ) -> Any:
        """Call a capability of the worker; see :meth:`astral.Peer.call`."""
        ...

    def stream(
        self,
        capability: str,
        input: Any = None,
        *,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
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
    transport: AnyTransport,
    close: Callable[[int, str], Awaitable[None]],
    claims: Mapping[str, Any],
    *,
    capabilities: Capabilities | None,
    registry: Registry | None,
    on_connect: Callable[[Peer], Awaitable[None]] | None,
    where: str,
    grace: float = 0.0,
    expiry_leeway: float | None = 0.0,
    hosted: set[Peer] | None = None,
    hosting: Hosting | None = None,
    **peer_options: Any,
) -> None:
    """Serve one authenticated worker until it leaves, its token expires or the server stops.

    The peer runs in a task shielded from the server's cancellation, so that
    when the server stops, calls in flight can finish: this task is
    cancelled, drains the peer for ``grace`` seconds (new calls refused with
    ``"shutting down"``), closes it with 1001, and only then cancels what is
    left (``on_connect`` included).

    Args:
        transport: The accepted connection.
        close: Closes it with a WebSocket close code and reason.
        claims: The worker's verified token claims.
        capabilities: What the worker may call.
        registry: Where to list the peer under its ``sub`` claim, if a string.
        on_connect: Awaited with the peer; if it raises, the connection is
            closed with 1011 and the error logged.
        where: Who the worker is, for log lines (its address).
        grace: Seconds calls in flight may take to finish when the server stops.
        expiry_leeway: Seconds after the token's ``exp`` to close the
            connection with :data:`TOKEN_EXPIRED_CODE`; ``None`` never closes
            it for that.
        hosted: A set the peer is kept in while it runs (for a server that
            drains them all itself, as the ASGI app does on lifespan shutdown).
        hosting: When given, the server drains its peers itself when it
            stops (see :class:`Hosting`): the peer then runs in this task,
            shielded, with no task of its own waiting for the server to stop.
        **peer_options: For :class:`~astral.Peer` (``timeout``, limits).
    """
    sub = claims.get("sub")
    # Connections whose token has no string subject are served, not listed.
    subject = sub if isinstance(sub, str) and registry is not None else None
    expires_in = _expires_in(claims, expiry_leeway)
    # Each level below takes what it needs as arguments, and the Peer's
    # options as this one dict: the frames of a connection's task live as
    # long as the connection (memory per idle connection).
    if hosting is not None:
        await _host_inline(
            transport,
            close,
            claims,
            sub,
            capabilities=capabilities,
            registry=registry,
            subject=subject,
            on_connect=on_connect,
            where=where,
            expires_in=expires_in,
            hosting=hosting,
            peer_options=peer_options,
        )
        return
    with log_connection(where, sub) as closing:
        await _host(
            transport,
            close,
            claims,
            closing,
            capabilities=capabilities,
            registry=registry,
            subject=subject,
            on_connect=on_connect,
            where=where,
            grace=grace,
            expires_in=expires_in,
            hosted=hosted,
            peer_options=peer_options,
        )


async def _host(
    transport: AnyTransport,
    close: Callable[[int, str], Awaitable[None]],
    claims: Mapping[str, Any],
    closing: ClosingLog,
    *,
    capabilities: Capabilities | None,
    registry: Registry | None,
    subject: str | None,
    on_connect: Callable[[Peer], Awaitable[None]] | None,
    where: str,
    grace: float,
    expires_in: float | None,
    hosted: set[Peer] | None,
    peer_options: dict[str, Any],
) -> None:
    """The peer in a task of its own, shielded, while this task waits for the server to stop."""
    shield = anyio.CancelScope(shield=True)
    running: list[Peer] = []
    finished = anyio.Event()
    # The token's expiry is a deadline on the wait below, not a sleeping task
    # of its own: one task less per connection. ``expired`` tells a peer that
    # was not yet running when the deadline passed to close at once.
    expired = False

    async def run() -> None:
        try:
            with shield:
                async with Peer(
                    transport, capabilities=capabilities, claims=claims, **peer_options
                ) as peer:
                    closing.opened("accepted connection from %s", peer)
                    running.append(peer)
                    if hosted is not None:
                        hosted.add(peer)
                    try:
                        with _listed(registry, subject, peer):
                            if expired:
                                await _expire(peer)
                            await _serve_worker(peer, close, closing, on_connect, where)
                    finally:
                        if hosted is not None:
                            hosted.discard(peer)
        finally:
            finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            if expires_in is not None:
                with anyio.move_on_after(expires_in):
                    await finished.wait()
                if not finished.is_set():
                    expired = True
                    if running:
                        with anyio.CancelScope(shield=True):
                            await _expire(running[0])
                        # on_connect too ends with the session, as when hosted inline.
                        shield.cancel()
            await finished.wait()
        except anyio.get_cancelled_exc_class():
            # The server is shutting down: drain, say so, then stop the rest.
            closing.code = 1001
            with anyio.CancelScope(shield=True):
                try:
                    if running:
                        await running[0].drain(grace, code=1001, reason="server shutting down")
                    else:
                        await close(1001, "server shutting down")
                finally:
                    shield.cancel()  # whatever the close did: never outlive the server
            raise


class Hosting:
    """The peers of one server: their token expiries, and their drain when it stops.

    With it a connection needs no task of its own beside its reader
    (memory per idle connection). The server runs :meth:`drain_on_stop`
    beside its listener: one task that closes each peer whose token expires
    (with :data:`TOKEN_EXPIRED_CODE`), and, when cancelled, drains every peer
    at once, then cancels what is left of each (``on_connect`` included). A
    peer that starts while the server is stopping drains itself.

    Args:
        grace: Seconds calls in flight may take to finish when the server stops.
    """

    __slots__ = ("_entries", "_tasks", "grace", "stopping")

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.stopping = False
        self._entries: dict[Peer, tuple[anyio.CancelScope, ClosingLog, Alarm | None]] = {}
        self._tasks: anyio.abc.TaskGroup | None = None  # drain_on_stop's: runs the expiries

    def _add(
        self, peer: Peer, shield: anyio.CancelScope, closing: ClosingLog, expires_in: float | None
    ) -> None:
        alarm = None
        if expires_in is not None:
            # An alarm (no task of its own), not a deadline on a waiting task.
            alarm = Alarm(functools.partial(self._expired, peer))
            alarm.set(anyio.current_time() + expires_in)
        self._entries[peer] = (shield, closing, alarm)

    def _remove(self, peer: Peer) -> None:
        alarm = self._entries.pop(peer)[2]
        if alarm is not None:
            alarm.cancel()  # and it lets go of the peer

    def _expired(self, peer: Peer) -> None:
        if self._tasks is not None and peer in self._entries:
            self._tasks.start_soon(_expire, peer)

    async def drain_on_stop(self) -> None:
        """Close peers whose token expires until cancelled, then drain every peer and return."""
        try:
            async with anyio.create_task_group() as self._tasks:
                await anyio.sleep_forever()
        finally:
            self._tasks = None
            self.stopping = True
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for peer in list(self._entries):
                        tg.start_soon(self._stop, peer)

    async def _stop(self, peer: Peer) -> None:
        entry = self._entries.get(peer)
        if entry is None:
            return
        scope, closing, _ = entry
        closing.code = 1001
        try:
            await peer.drain(self.grace, code=1001, reason="server shutting down")
        finally:
            scope.cancel()


async def _host_inline(
    transport: AnyTransport,
    close: Callable[[int, str], Awaitable[None]],
    claims: Mapping[str, Any],
    sub: object,
    *,
    capabilities: Capabilities | None,
    registry: Registry | None,
    subject: str | None,
    on_connect: Callable[[Peer], Awaitable[None]] | None,
    where: str,
    expires_in: float | None,
    hosting: Hosting,
    peer_options: dict[str, Any],
) -> None:
    """The peer in the calling task, shielded, for a server that drains through ``hosting``.

    This task is the peer's reader, and ``on_connect`` runs beside it in a
    task of the peer's; the token's expiry is ``hosting``'s to act on. So
    an idle connection is this one task (memory per idle connection).
    """
    with log_connection(where, sub) as closing, anyio.CancelScope(shield=True) as shield:
        peer = Peer(transport, capabilities=capabilities, claims=claims, **peer_options)
        closing.opened("accepted connection from %s", peer)
        hosting._add(peer, shield, closing, expires_in)
        try:
            with _listed(registry, subject, peer):
                body: Callable[[Peer], Coroutine[Any, Any, object]] | None = None
                if hosting.stopping:
                    body = hosting._stop
                elif on_connect is not None:
                    body = functools.partial(
                        _connected,
                        close=close,
                        closing=closing,
                        on_connect=on_connect,
                        where=where,
                    )
                # Unlisted as soon as it has ended, as wait_closed() would
                # have it, not once its last task has finished.
                unlist = (
                    None
                    if subject is None or registry is None
                    else functools.partial(registry._remove, subject, peer)
                )
                await peer._serve_here(body, unlist)
        finally:
            hosting._remove(peer)


@contextmanager
def _listed(registry: Registry | None, subject: str | None, peer: Peer) -> Iterator[None]:
    """``peer`` in ``registry`` under ``subject`` while the block runs (nothing without one)."""
    if subject is None:
        yield
        return
    assert registry is not None
    registry._add(subject, peer)
    try:
        yield
    finally:
        registry._remove(subject, peer)


async def _expire(peer: Peer) -> None:
    """Close a session whose token has expired, with 4401."""
    logger.info("closing the connection: %s", TOKEN_EXPIRED)
    await peer.aclose(TOKEN_EXPIRED_CODE, TOKEN_EXPIRED)


async def _serve_worker(
    peer: Peer,
    close: Callable[[int, str], Awaitable[None]],
    closing: ClosingLog,
    on_connect: Callable[[Peer], Awaitable[None]] | None,
    where: str,
) -> None:
    if on_connect is not None and not await _connected(
        peer, close=close, closing=closing, on_connect=on_connect, where=where
    ):
        return  # closed with 1011: over
    await peer.wait_closed()


async def _connected(
    peer: Peer,
    *,
    close: Callable[[int, str], Awaitable[None]],
    closing: ClosingLog,
    on_connect: Callable[[Peer], Awaitable[None]],
    where: str,
) -> bool:
    """Await ``on_connect(peer)``; if it fails, log it and close the connection with 1011.

    Returns:
        False if it failed (and the connection was closed), else True.
    """
    try:
        await on_connect(peer)
    except ConnectionClosed:
        pass  # the worker left while on_connect talked to it
    except Exception:
        logger.exception("on_connect failed for %s; closing that connection", where)
        closing.code = 1011
        await close(1011, "internal error")
        return False
    return True


def expiry_leeway(verifier: object, close_on_token_expiry: bool) -> float | None:
    """The leeway after ``exp`` before a session ends, or ``None`` when it never does.

    A :class:`~astral.JWTVerifier` accepts a token until ``exp + leeway``; the
    session lasts as long. Other verifiers get no leeway.
    """
    if not close_on_token_expiry:
        return None
    return verifier.leeway if isinstance(verifier, JWTVerifier) else 0.0


def _expires_in(claims: Mapping[str, Any], leeway: float | None) -> float | None:
    """Seconds until the session must end, from the token's ``exp`` and the leeway."""
    exp = claims.get("exp")
    if leeway is None or isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    if not math.isfinite(exp):
        return None
    return max(0.0, exp + leeway - time.time())
