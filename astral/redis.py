"""``astral.redis``: one registry for every principal process that shares a Redis.

An optional integration (``pip install 'astral-rpc[redis]'``, which brings
coredis); ``import astral`` never imports it. Run one :class:`RedisRegistry`
per principal process, all on the same Redis (or Valkey) and namespace, and
pass it where a :class:`astral.PeerRegistry` would go::

    async with astral.redis.RedisRegistry("redis://redis.internal:6379/0") as workers:
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(astral.serve, verifier=v, registry=workers))
            worker = await workers.wait_for("worker-7")  # on this process or another
            print(await worker.call("uptime"))

What lives in Redis (``<ns>`` is the namespace):

* ``<ns>:alive:<node>``: one key per principal process ("node"), with a TTL
  of ``presence_ttl`` seconds, refreshed every ``presence_ttl / 3``;
* ``<ns>:subjects:<node>``: a hash, subject -> the worker's claims (JSON),
  with the same TTL, so a killed process's subjects vanish with it;
* ``<ns>:where``: a hash, subject -> ``"<node> <generation>"``, the newest
  connection of each subject (the generation is an ``INCR`` of ``<ns>:gen``);
* pub/sub channels ``<ns>:node:<node>`` (frames to that process) and
  ``<ns>:presence`` (announcements, so ``wait_for`` wakes at once).

No token ever goes to Redis: only subjects, claims and call frames. The calls
themselves travel as described in ``astral._cluster``.

This module is the public face: :class:`RedisRegistry` (its lifecycle, the
link to Redis, the lookups) is made of three private parts, each a module:
``_cluster_presence`` (listing and heartbeats), ``_cluster_routing`` (frames
to and from other processes: the caller's side) and ``_cluster_serving``
(calls from other processes run here); ``_cluster_redis`` holds what they
share (their state, the Lua scripts, failure handling). The two hot
connections (this process's subscription and its publisher) speak RESP
themselves (``_cluster_wire`` over the sans-IO ``_resp``); coredis is the
client for the rest. Lookups and listings
are Lua scripts that build key names from the namespace, which a single Redis
(or a primary with replicas) runs; Redis Cluster's sharding is not supported.

Failures, and why they never hang:

* A process that dies stops answering: Redis drops its subscription at once,
  so a new call sent to it finds no listener and fails with
  :class:`astral.ConnectionClosed`; calls already waiting on it fail at the
  next heartbeat (``presence_ttl / 3``); its subjects vanish when its keys
  expire (``presence_ttl``).
* Redis going away fails every cross-process call in flight, and every new
  one at once, with :class:`astral.ClusterError`; workers connected to this
  process stay callable here. The registry reconnects by itself (backing off
  up to a second) and announces its workers again.
"""

from __future__ import annotations

import itertools
import uuid
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import anyio
import anyio.abc
import coredis
import coredis.connection
import coredis.retry

from ._cluster import RemoteStream, RemoteWorker, dump
from ._cluster_presence import Presence
from ._cluster_redis import (
    ANNOUNCE,
    LOOKUP,
    SUBJECTS,
    WITHDRAW,
    TCPConnection,
    is_redis_failure,
    leaf_of,
    leaves,
    load_claims,
    logger,
    text,
)
from ._cluster_routing import Routing
from ._cluster_serving import Serving
from ._cluster_wire import RespConnection, Target
from ._exceptions import ClusterError, ConnectionClosed
from ._peer import DEFAULT_TIMEOUT, Peer
from ._resp import RespError, RespProtocolError, encode

if TYPE_CHECKING:
    import ssl as _ssl
    from collections.abc import Sequence
    from types import TracebackType

    from ._cluster import RemoteCall
    from ._cluster_presence import Local
    from ._cluster_serving import Served
    from ._middleware import Middleware

__all__ = ["RedisRegistry", "RemoteStream", "RemoteWorker"]


class RedisRegistry(Presence, Routing, Serving):
    """A registry of workers shared by every principal process on one Redis.

    Accepted wherever a registry is (``astral.serve(registry=...)``,
    ``astral.asgi.App(registry=...)``) and shaped like
    :class:`astral.PeerRegistry` (see :class:`astral.Registry`). Use it as an
    async context manager: its background tasks (the Redis subscription,
    heartbeats, the publisher) live inside the block. Enter it before the
    server starts and leave it after the server stops.

    :meth:`wait_for` and :meth:`lookup` return the :class:`~astral.Peer`
    itself for a worker connected to this process, and a
    :class:`RemoteWorker` for one connected to another process; both raise
    the same exceptions. The newest connection of a subject, on whichever
    process, is the one listed.

    Args:
        url: ``redis://[user:password@]host:port/db``, or ``rediss://`` for
            TLS. The Redis must be private to the deployment (see
            ``docs/security.md``).
        namespace: Prefix of every key and channel; processes sharing a
            namespace share their workers.
        presence_ttl: Seconds a process's presence outlives its last
            heartbeat (heartbeats run every third of it): a killed process's
            subjects vanish within this time.
        timeout: Default seconds a call to a worker on another process waits
            for its first frame; ``None`` waits forever.
        window: Items of one streaming call that may be on their way between
            two processes before the sender waits for credit.
        connect_timeout: Seconds to connect (and subscribe) to Redis.
        command_timeout: The longest any one Redis command may take before
            Redis counts as unreachable. A Redis that is down fails at once
            (the connection is refused or reset); this only catches one that
            hangs, so it is generous: a busy event loop must not look like an
            outage.
        ssl_context: TLS settings for ``rediss://`` (for example a private
            CA); by default the system's trust store.
        middleware: Wrap every call made through a :class:`RemoteWorker`
            handle of this registry, as a :class:`~astral.Peer`'s
            ``middleware`` wraps its outbound calls (``call.peer`` is the
            handle). Give it the list given to ``astral.serve`` so that calls
            to workers on other processes are observed as local ones are; a
            trace context a middleware fills travels with the call.

    Raises:
        ValueError: A limit is not positive, or the URL is not ``redis://``
            or ``rediss://``.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "astral",
        presence_ttl: float = 6.0,
        timeout: float | None = DEFAULT_TIMEOUT,
        window: int = 1024,
        connect_timeout: float = 5.0,
        command_timeout: float = 15.0,
        ssl_context: _ssl.SSLContext | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("url must start with redis:// or rediss://")
        if not presence_ttl > 0 or window < 1 or not min(connect_timeout, command_timeout) > 0:
            raise ValueError(
                "presence_ttl, window, connect_timeout and command_timeout must be positive"
            )
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds, or None")
        self._url = url
        self._ssl_context = ssl_context
        # For messages: where Redis is, never who logs in to it.
        self.where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"
        self.namespace = namespace
        self.node = uuid.uuid4().hex
        self.timeout = timeout
        self.window = window
        self.middleware: tuple[Middleware, ...] = tuple(middleware)
        self._ttl_ms = max(1, round(presence_ttl * 1000))
        # The listing outlives the presence key, so a late heartbeat does not
        # make a live process announce everything again.
        self._listing_ttl_ms = 3 * self._ttl_ms
        self._heartbeat = presence_ttl / 3
        self._connect_timeout = connect_timeout
        self._op_timeout = command_timeout
        ns = namespace
        self._k_where = f"{ns}:where"
        self._k_gen = f"{ns}:gen"
        self._k_alive = f"{ns}:alive:{self.node}"
        self._k_subjects = f"{ns}:subjects:{self.node}"
        self._presence = f"{ns}:presence"
        self._channel = self._node_channel(self.node)
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._tasks: anyio.abc.TaskGroup | None = None
        self._exit: AsyncExitStack | None = None
        self._up = False
        self._closing = False
        self._link_scope: anyio.CancelScope | None = None
        # The link's RESP connection for PUBLISH, while it is up.
        self._publisher: RespConnection | None = None
        # When a message last went out from its poster (see Routing._enqueue).
        self._last_direct = float("-inf")
        self._local: dict[str, Local] = {}
        self._unlisted: dict[str, Local] = {}  # superseded, still connected
        self._waiters: dict[str, anyio.Event] = {}
        self._ops: list[tuple[str, Local]] = []
        self._ops_ready = anyio.Event()
        self._presence_lock = anyio.Lock()
        self._outbox: dict[str, list[bytes]] = {}
        self._outbox_ready = anyio.Event()
        self._ids = itertools.count(1)
        self._calls: dict[int, RemoteCall] = {}
        self._served: dict[tuple[str, int], Served] = {}
        self._idle_servers = []
        self._gone: set[str] = set()

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect to Redis, subscribe, and start the background tasks.

        Raises:
            ClusterError: Redis cannot be reached (or refuses the login).
        """
        if self._exit is not None:
            raise RuntimeError("a RedisRegistry can be entered only once")
        stack = self._exit = AsyncExitStack()
        await stack.__aenter__()
        try:
            options: dict[str, Any] = {
                "connect_timeout": self._connect_timeout,
                "retry_policy": coredis.retry.NoRetryPolicy(),
            }
            if self._ssl_context is not None:
                options["ssl_context"] = self._ssl_context
            try:
                self._client = coredis.Redis.from_url(self._url, **options)
            except (ValueError, TypeError) as exc:
                raise ClusterError(f"bad Redis URL for {self.where}: {exc}") from None
            pool = self._client.connection_pool
            if pool.connection_class is coredis.connection.TCPConnection:
                pool.connection_class = TCPConnection
            # Its pool's task group lives in the stack (no timeout around it:
            # scopes must nest); connecting happens in the link loop.
            await stack.enter_async_context(self._client)
            for name, source in (
                ("announce", ANNOUNCE),
                ("withdraw", WITHDRAW),
                ("lookup", LOOKUP),
                ("subjects", SUBJECTS),
            ):
                self._scripts[name] = self._client.register_script(source)
            self._tasks = await stack.enter_async_context(anyio.create_task_group())
            await self._tasks.start(self._link_loop)
            self._tasks.start_soon(self._heartbeat_loop)
            self._tasks.start_soon(self._outbound_loop)
            self._tasks.start_soon(self._presence_loop)
        except BaseException as exc:
            if self._tasks is not None:
                self._tasks.cancel_scope.cancel()
            try:
                await stack.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseExceptionGroup as group:
                # The task groups wrap it; the caller wants the error itself.
                found = leaves(group)
                if found and all(isinstance(e, ClusterError) for e in found):
                    raise found[0] from None
                raise
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Tell the callers of running calls, withdraw this process, stop."""
        assert self._exit is not None
        assert self._tasks is not None
        self._closing = True
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._connect_timeout):
                await self._leave()
        except BaseException as error:
            self._stop()
            await self._exit.__aexit__(type(error), error, error.__traceback__)
            raise
        self._stop()
        return await self._exit.__aexit__(exc_type, exc, tb)

    def _stop(self) -> None:
        assert self._tasks is not None
        closed = ConnectionClosed("the cluster registry is closed", code=1001)
        for call in list(self._calls.values()):
            call.done = True
            call.fail(closed)
        self._calls.clear()
        self._tasks.cancel_scope.cancel()

    async def _leave(self) -> None:
        for (node, call_id), served in list(self._served.items()):
            self._post_quiet(
                node,
                dump(["fail", call_id, "closed", "principal process shutting down", 1001]),
            )
            served.scope.cancel()
        self._served.clear()
        if not self._up:
            return
        try:
            await self._flush()
            async with self._client.pipeline(transaction=False) as pipe:
                for entry in self._local.values():
                    if entry.gen:
                        self._scripts["withdraw"](
                            keys=[self._k_where, self._k_subjects],
                            args=[entry.subject, f"{self.node} {entry.gen}"],
                            client=pipe,
                        )
                pipe.delete([self._k_alive, self._k_subjects])
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            logger.warning("could not withdraw from Redis at %s: %s", self.where, leaf_of(exc))

    # -- the link: one subscription, reconnected whenever it breaks ----------

    async def _link_loop(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        delay = 0.05
        while True:
            try:
                with anyio.CancelScope() as scope:
                    self._link_scope = scope
                    # The two hot connections (the subscription to this
                    # process's channels, and the one that publishes frames)
                    # speak RESP themselves: see astral._cluster_wire for why.
                    # Messages are dispatched by the subscription's reader,
                    # without a task hop; coredis does everything else.
                    target = Target(self._url, self._ssl_context, self._connect_timeout)
                    subscription = await RespConnection.open(target)
                    try:
                        publisher = await RespConnection.open(target)
                        try:
                            await self._subscribe(subscription)
                            async with anyio.create_task_group() as link:
                                link.start_soon(self._subscription_loop, subscription)
                                link.start_soon(self._reply_loop, publisher)
                                self._publisher = publisher
                                await self._rejoin()  # each Redis round trip has a deadline
                                self._up = True
                                delay = 0.05
                                if started:
                                    logger.warning("reconnected to Redis at %s", self.where)
                                else:
                                    started = True
                                    task_status.started()
                                self._wake_all()
                                await anyio.sleep_forever()  # until the link breaks
                        finally:
                            self._publisher = None
                            await publisher.aclose()
                    finally:
                        await subscription.aclose()
            except Exception as exc:
                self._publisher = None
                if not is_redis_failure(exc):
                    raise
                if not started:
                    raise ClusterError(self._unreachable(exc)) from None
                self._link_down(self._unreachable(exc))
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _subscribe(self, subscription: RespConnection) -> None:
        await subscription.send(encode(b"SUBSCRIBE", self._channel, self._presence))
        with anyio.fail_after(self._connect_timeout):
            for _ in range(2):
                reply = await subscription.reply()
                if isinstance(reply, RespError):
                    raise reply
                if not (isinstance(reply, list) and reply[:1] == [b"subscribe"]):
                    raise RespProtocolError(f"Redis answered SUBSCRIBE with {reply!r:.80}")

    def _link_down(self, reason: str) -> None:
        if self._link_scope is not None:
            self._link_scope.cancel()
        if not self._up:
            return
        self._up = False
        logger.warning("%s; cross-process calls fail until it is back", reason)
        error = ClusterError(reason)
        for call in self._calls.values():
            call.done = True
            call.fail(error)
        self._calls.clear()
        for served in self._served.values():
            served.scope.cancel()
        self._outbox.clear()
        self._wake_all()

    # -- lookups -------------------------------------------------------------

    def _check_entered(self) -> None:
        if self._exit is None:
            raise RuntimeError("use the RedisRegistry inside 'async with' first")

    def _check_up(self, subject: str) -> None:
        self._check_entered()
        if not self._up:
            raise ClusterError(
                f"Redis at {self.where} is unreachable, and worker {subject!r} "
                "is not connected to this process"
            )

    async def lookup(self, subject: str) -> Peer | RemoteWorker | None:
        """Return the worker of ``subject`` if it is connected now, else ``None``.

        Args:
            subject: The worker's token subject.

        Returns:
            The :class:`~astral.Peer` if the worker is connected to this
            process, a :class:`RemoteWorker` if it is connected to another,
            else ``None``.

        Raises:
            ClusterError: The worker is not here and Redis is unreachable.
        """
        entry = self._local.get(subject)
        if entry is not None and not entry.peer.closed:
            return entry.peer
        self._check_up(subject)
        try:
            with anyio.fail_after(self._op_timeout):
                found = await self._scripts["lookup"](
                    keys=[self._k_where], args=[subject, self.namespace]
                )
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            self._link_down(self._unreachable(exc))
            raise ClusterError(self._unreachable(exc)) from None
        if not found:
            return None
        try:
            node = text(found[0]).split(" ", 1)[0]
            claims = load_claims(found[1])
        except ValueError:
            logger.warning("dropped a malformed entry for %r in %s", subject, self._k_where)
            return None
        if node == self.node:
            return None  # our own stale entry: the worker has left this process
        self._gone.discard(node)
        return RemoteWorker(self, subject, node, claims)

    async def wait_for(self, subject: str) -> Peer | RemoteWorker:
        """Return the worker of ``subject``, waiting until it connects anywhere.

        Bound the wait with ``anyio.fail_after`` if it may never come.

        Args:
            subject: The worker's token subject.

        Raises:
            ClusterError: Redis is unreachable (now, or while waiting) and the
                worker is not connected to this process.
        """
        while True:
            event = self._waiters.get(subject)
            if event is None:
                event = self._waiters[subject] = anyio.Event()
            worker = await self.lookup(subject)
            if worker is not None:
                return worker
            await event.wait()

    async def subjects(self) -> list[str]:
        """The subjects of every worker connected to any process, sorted.

        Raises:
            ClusterError: Redis is unreachable.
        """
        self._check_entered()
        if not self._up:
            raise ClusterError(f"Redis at {self.where} is unreachable")
        try:
            with anyio.fail_after(self._op_timeout):
                found = await self._scripts["subjects"](keys=[self._k_where], args=[self.namespace])
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            self._link_down(self._unreachable(exc))
            raise ClusterError(self._unreachable(exc)) from None
        return sorted({text(s) for s in found} | set(self._local))
