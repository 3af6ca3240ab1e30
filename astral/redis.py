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
themselves travel as described in ``astral._cluster``. Lookups and listings
are Lua scripts that build key names from the namespace, which a single Redis
(or a primary with replicas) runs; Redis Cluster's sharding is not supported.

Failures, and why they never hang:

* A process that dies stops answering: Redis drops its subscription at once,
  so a frame sent to it finds no listener and its calls fail with
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
import logging
import uuid
from collections import deque
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import anyio
import anyio.abc

try:
    import coredis
    import coredis.connection
    import coredis.exceptions
    import coredis.retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("astral.redis needs coredis: pip install 'astral-rpc[redis]'") from exc

from ._cluster import (
    RemoteCall,
    RemoteStream,
    RemoteWorker,
    batch,
    describe,
    dump,
    load,
    parse,
)
from ._exceptions import ClusterError, ConnectionClosed, ProtocolError
from ._middleware import Middleware, carried_trace
from ._peer import DEFAULT_TIMEOUT, Peer, Stream

if TYPE_CHECKING:
    import ssl as _ssl
    from collections.abc import AsyncIterator, Sequence
    from types import TracebackType

__all__ = ["RedisRegistry", "RemoteStream", "RemoteWorker"]

logger = logging.getLogger("astral.redis")

#: Largest pub/sub payload a batch grows to before another one starts.
MAX_BATCH_BYTES = 256 * 1024
#: Announcements sent in one pipeline (each pipeline has its own deadline).
ANNOUNCE_CHUNK = 256

# Announce a subject held here: newest generation wins, everyone is told.
_ANNOUNCE = """
local gen = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. gen)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[2] .. ' ' .. gen .. ' ' .. ARGV[1])
return gen
"""
# Withdraw it, unless a newer connection (anywhere) already took it over.
_WITHDRAW = """
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""
# Where a subject is, if its process is alive, listening, and still holds it.
_LOOKUP = """
local where = redis.call('HGET', KEYS[1], ARGV[1])
if not where then return false end
local node = string.match(where, '^(%S+)')
if redis.call('EXISTS', ARGV[2] .. ':alive:' .. node) == 0 then return false end
if redis.call('PUBSUB', 'NUMSUB', ARGV[2] .. ':node:' .. node)[2] == 0 then return false end
local claims = redis.call('HGET', ARGV[2] .. ':subjects:' .. node, ARGV[1])
if not claims then return false end
return {where, claims}
"""
# Every subject whose process is alive and listening; stale entries are cleared.
_SUBJECTS = """
local all = redis.call('HGETALL', KEYS[1])
local out, alive = {}, {}
for i = 1, #all, 2 do
  local node = string.match(all[i + 1], '^(%S+)')
  local ok = alive[node]
  if ok == nil then
    ok = redis.call('EXISTS', ARGV[1] .. ':alive:' .. node) == 1
    if ok and redis.call('PUBSUB', 'NUMSUB', ARGV[1] .. ':node:' .. node)[2] == 0 then
      ok = 'deaf'
    end
    alive[node] = ok
  end
  local held = redis.call('HEXISTS', ARGV[1] .. ':subjects:' .. node, all[i]) == 1
  if ok == true and held then
    out[#out + 1] = all[i]
  elseif not held then
    -- its process's listing is gone (expired: the process died) or moved on
    redis.call('HDEL', KEYS[1], all[i])
  end
  -- else: listed, but its process is late or not listening now: not shown
end
return out
"""


def _is_redis_failure(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_redis_failure(e) for e in exc.exceptions)
    return isinstance(exc, coredis.exceptions.RedisError | OSError | TimeoutError)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _TCPConnection(coredis.connection.TCPConnection):
    """coredis's TCP connection, closing its buffers when it cannot connect.

    coredis 6.9 closes a connection's memory streams only once it has
    connected; a refused connection leaves them to the garbage collector,
    which warns (an error under ``-W error``). Redis outages make many.
    """

    async def _connect(self) -> Any:
        try:
            return await super()._connect()
        except BaseException:
            for name in (
                "_write_buffer_in",
                "_write_buffer_out",
                "_push_message_buffer_in",
                "_push_message_buffer_out",
                "_streamed_message_buffer_in",
                "_streamed_message_buffer_out",
            ):
                stream = getattr(self, name, None)
                if stream is not None:
                    stream.close()
            raise


class _Local:
    """A worker connected to this process, as listed in Redis."""

    __slots__ = ("gen", "peer", "seen", "subject")

    def __init__(self, subject: str, peer: Peer) -> None:
        self.subject = subject
        self.peer = peer
        self.gen = 0  # set once Redis has it; 0 while the announcement is on its way
        self.seen = 0  # the newest generation announced elsewhere meanwhile


class _Served:
    """A call from another process running here: its scope, its credit, its deadline."""

    __slots__ = ("credit", "more", "scope", "stopped", "until")

    def __init__(self, window: int, until: float | None) -> None:
        self.scope = anyio.CancelScope()
        self.credit = window
        self.more: anyio.Event | None = None
        self.until = until  # the caller's deadline, counted from when the call arrived
        self.stopped = False  # the caller sent cancel

    def grant(self, n: int) -> None:
        self.credit += n
        if self.more is not None:
            self.more.set()

    async def spend(self) -> None:
        while self.credit <= 0:
            self.more = anyio.Event()
            await self.more.wait()
        self.more = None
        self.credit -= 1


class RedisRegistry:
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
        self._publisher: Any = None  # the link's connection for PUBLISH, while it is up
        # Publishes sent, whose replies (how many listened) are still to read.
        self._replies: deque[tuple[str, Any]] = deque()
        self._local: dict[str, _Local] = {}
        self._unlisted: dict[str, _Local] = {}  # superseded, still connected
        self._waiters: dict[str, anyio.Event] = {}
        self._ops: list[tuple[str, _Local]] = []
        self._ops_ready = anyio.Event()
        self._presence_lock = anyio.Lock()
        self._outbox: dict[str, list[bytes]] = {}
        self._outbox_ready = anyio.Event()
        self._ids = itertools.count(1)
        self._calls: dict[int, RemoteCall] = {}
        self._served: dict[tuple[str, int], _Served] = {}
        self._gone: set[str] = set()

    def _node_channel(self, node: str) -> str:
        return f"{self.namespace}:node:{node}"

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
                pool.connection_class = _TCPConnection
            # Its pool's task group lives in the stack (no timeout around it:
            # scopes must nest); connecting happens in the link loop.
            await stack.enter_async_context(self._client)
            for name, source in (
                ("announce", _ANNOUNCE),
                ("withdraw", _WITHDRAW),
                ("lookup", _LOOKUP),
                ("subjects", _SUBJECTS),
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
                leaves = _leaves(group)
                if leaves and all(isinstance(e, ClusterError) for e in leaves):
                    raise leaves[0] from None
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
            if not _is_redis_failure(exc):
                raise
            logger.warning("could not withdraw from Redis at %s: %s", self.where, _leaf(exc))

    def _unreachable(self, exc: BaseException) -> str:
        leaf = _leaf(exc)
        detail = str(leaf) or type(leaf).__name__
        if isinstance(leaf, TimeoutError):
            detail = f"no answer within {self._op_timeout:g} s"
        return f"cannot reach Redis at {self.where}: {detail}"

    # -- the link: one subscription, reconnected whenever it breaks ----------

    async def _link_loop(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        delay = 0.05
        while True:
            try:
                with anyio.CancelScope() as scope:
                    self._link_scope = scope
                    # Messages go straight to _on_pubsub from coredis's own
                    # consumer task (a handler per channel), not through the
                    # pubsub's iterator: one task wake less per message. The
                    # publisher is a connection of our own, held while the link
                    # is up, so a flush neither queues for the pool nor pays for
                    # coredis's per-command machinery (see _flush).
                    async with (
                        self._client.pubsub(
                            channel_handlers={
                                self._channel: self._on_pubsub,
                                self._presence: self._on_pubsub,
                            },
                            retry_policy=None,
                            ignore_subscribe_messages=True,
                            subscription_timeout=self._connect_timeout,
                        ),
                        self._client.connection_pool.acquire() as publisher,
                    ):
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
                        await anyio.sleep_forever()  # until the subscription breaks
            except Exception as exc:
                self._publisher = None
                if not _is_redis_failure(exc):
                    raise
                if not started:
                    raise ClusterError(self._unreachable(exc)) from None
                self._link_down(self._unreachable(exc))
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)

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
        self._replies.clear()
        self._wake_all()

    async def _rejoin(self) -> None:
        """(Re)announce this process and every worker it holds."""
        async with self._presence_lock:
            self._ops.clear()
            with anyio.fail_after(self._op_timeout):
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.set(self._k_alive, "1", px=self._ttl_ms)
                    pipe.delete([self._k_subjects])
            await self._announce(list(self._local.values()), [])

    async def _announce(self, adds: list[_Local], removes: list[_Local]) -> None:
        # In chunks, each with its own deadline: thousands of workers
        # connecting at once must not make one pipeline look like an outage.
        for start in range(0, len(removes), ANNOUNCE_CHUNK):
            with anyio.fail_after(self._op_timeout):
                await self._announce_chunk([], removes[start : start + ANNOUNCE_CHUNK])
        for start in range(0, len(adds), ANNOUNCE_CHUNK):
            with anyio.fail_after(self._op_timeout):
                await self._announce_chunk(adds[start : start + ANNOUNCE_CHUNK], [])

    async def _announce_chunk(self, adds: list[_Local], removes: list[_Local]) -> None:
        announce, withdraw = self._scripts["announce"], self._scripts["withdraw"]
        keys = [self._k_where, self._k_subjects, self._k_gen]
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in removes:
                withdraw(
                    keys=keys[:2],
                    args=[entry.subject, f"{self.node} {entry.gen}"],
                    client=pipe,
                )
            for entry in adds:
                announce(
                    keys=keys,
                    args=[
                        entry.subject,
                        self.node,
                        dump(dict(entry.peer.claims)),
                        self._listing_ttl_ms,
                        self._presence,
                    ],
                    client=pipe,
                )
        results: tuple[Any, ...] = tuple(pipe.results or ())
        for entry, gen in zip(adds, results[len(removes) :], strict=False):
            entry.gen = int(gen)
            if entry.seen > entry.gen:
                self._supersede(entry)

    # -- presence ------------------------------------------------------------

    @asynccontextmanager
    async def hosting(self, subject: str, peer: Peer) -> AsyncIterator[None]:
        """List ``peer`` under ``subject``, here and in Redis, while the block runs.

        For your own servers (``astral.serve`` and ``astral.asgi.App`` do it
        for theirs). It never waits for Redis: the announcement goes out in
        the background, and again after Redis comes back.

        Args:
            subject: The worker's token subject.
            peer: Its running peer; the newest connection of a subject wins.
        """
        self._add(subject, peer)
        try:
            yield
        finally:
            self._remove(subject, peer)

    def _add(self, subject: str, peer: Peer) -> None:
        # The servers' seam (see astral.Registry): list now, announce soon.
        entry = _Local(subject, peer)
        self._local[subject] = entry
        self._wake(subject)
        self._queue("add", entry)

    def _remove(self, subject: str, peer: Peer) -> None:
        entry = self._local.get(subject)
        if entry is not None and entry.peer is peer:
            del self._local[subject]
            self._queue("remove", entry)
        unlisted = self._unlisted.get(subject)
        if unlisted is not None and unlisted.peer is peer:
            del self._unlisted[subject]

    def _queue(self, op: str, entry: _Local) -> None:
        self._ops.append((op, entry))
        self._ops_ready.set()

    async def _presence_loop(self) -> None:
        while True:
            await self._ops_ready.wait()
            self._ops_ready = anyio.Event()
            async with self._presence_lock:
                ops, self._ops = self._ops, []
                if not self._up:
                    continue  # _rejoin announces whoever is here when Redis is back
                adds = [e for op, e in ops if op == "add"]
                removed = {id(e) for op, e in ops if op == "remove"}
                removes = [e for op, e in ops if op == "remove" and e.gen]
                adds = [e for e in adds if id(e) not in removed]
                try:
                    await self._announce(adds, removes)
                except Exception as exc:
                    if not _is_redis_failure(exc):
                        raise
                    self._link_down(self._unreachable(exc))

    def _on_presence(self, data: bytes) -> None:
        try:
            node, gen_text, subject = _text(data).split(" ", 2)
            gen = int(gen_text)
        except ValueError:
            logger.warning("dropped a malformed announcement on %s", self._presence)
            return
        entry = self._local.get(subject)
        if entry is not None and node != self.node:
            if entry.gen and gen > entry.gen:
                self._supersede(entry)
            elif not entry.gen:
                entry.seen = max(entry.seen, gen)
        self._wake(subject)

    def _supersede(self, entry: _Local) -> None:
        # A newer connection of this subject on another process: it wins, as
        # locally; this one keeps running but is no longer listed. Handles
        # taken before may still reach it, as a local Peer object would.
        if self._local.get(entry.subject) is entry:
            del self._local[entry.subject]
            self._unlisted[entry.subject] = entry

    def _wake(self, subject: str) -> None:
        event = self._waiters.pop(subject, None)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for event in waiters.values():
            event.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self._heartbeat)
            if self._up:
                try:
                    with anyio.fail_after(self._op_timeout):
                        forgotten = await self._beat()
                    if forgotten:
                        # Redis forgot this process (restarted, flushed, or a
                        # stall beyond the TTL): say everything again.
                        logger.warning(
                            "Redis at %s had forgotten this process; announcing again", self.where
                        )
                        await self._rejoin()
                except Exception as exc:
                    if not _is_redis_failure(exc):
                        raise
                    self._link_down(self._unreachable(exc))
            # Announcements lost in an outage must not leave a waiter waiting.
            self._wake_all()

    async def _beat(self) -> bool:
        """Refresh this process's presence; True if Redis lost its workers' listing."""
        nodes = sorted({c.node for c in self._calls.values()} | {n for n, _ in self._served})
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(self._k_alive, "1", px=self._ttl_ms)
            pipe.pexpire(self._k_subjects, self._listing_ttl_ms)
            if nodes:
                pipe.pubsub_numsub(*[self._node_channel(n) for n in nodes])
        results: tuple[Any, ...] = tuple(pipe.results or ())
        if nodes and len(results) > 2:
            listeners = {_text(k): int(v) for k, v in dict(results[2]).items()}
            for node in nodes:
                if not listeners.get(self._node_channel(node)):
                    self._node_left(node)
        # A heartbeat late beyond the TTL (a starved event loop) only hid this
        # process for a moment: the SET above brings it back. Only a listing
        # that is gone (Redis restarted or flushed, a stall beyond three TTLs)
        # needs everything announced again.
        announced = any(entry.gen for entry in self._local.values())
        return announced and len(results) > 1 and not results[1]

    def _node_left(self, node: str) -> None:
        self._gone.add(node)
        error = ConnectionClosed(f"principal process {node} left")
        for call_id, call in list(self._calls.items()):
            if call.node == node:
                del self._calls[call_id]
                call.done = True
                call.fail(error)
        for (origin, _), served in self._served.items():
            if origin == node:
                served.scope.cancel()

    def node_gone(self, node: str) -> bool:
        """Whether ``node`` (a principal process) is known to have left, or Redis is down."""
        return node in self._gone or not self._up

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
            if not _is_redis_failure(exc):
                raise
            self._link_down(self._unreachable(exc))
            raise ClusterError(self._unreachable(exc)) from None
        if not found:
            return None
        try:
            node = _text(found[0]).split(" ", 1)[0]
            claims = _load_claims(found[1])
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
            if not _is_redis_failure(exc):
                raise
            self._link_down(self._unreachable(exc))
            raise ClusterError(self._unreachable(exc)) from None
        return sorted({_text(s) for s in found} | set(self._local))

    @property
    def local(self) -> dict[str, Peer]:
        """The workers connected to this process, by subject (a copy)."""
        return {subject: entry.peer for subject, entry in self._local.items()}

    # -- calls this process makes (the Router side of RemoteWorker) ----------

    def next_id(self) -> int:
        """A new id for an outgoing call (used by :class:`RemoteWorker`)."""
        return next(self._ids)

    def open_call(self, node: str, capability: str, call_id: int | None = None) -> RemoteCall:
        """Register an outgoing call to ``node`` (used by :class:`RemoteWorker`).

        Raises:
            ClusterError: Redis is unreachable.
            ConnectionClosed: ``node`` is known to have left.
        """
        if not self._up:
            raise ClusterError(f"Redis at {self.where} is unreachable")
        if node in self._gone:
            raise ConnectionClosed(f"principal process {node} left")
        call = RemoteCall(
            next(self._ids) if call_id is None else call_id, node, capability, self.window
        )
        self._calls[call.id] = call
        return call

    def post(self, node: str, part: bytes) -> None:
        """Queue one encoded message for ``node`` (used by :class:`RemoteWorker`).

        Raises:
            ClusterError: Redis is unreachable.
        """
        if not self._up:
            raise ClusterError(f"Redis at {self.where} is unreachable")
        self._enqueue(node, part)

    def _post_quiet(self, node: str, part: bytes) -> None:
        if self._up:
            self._enqueue(node, part)

    def _enqueue(self, node: str, part: bytes) -> None:
        publisher = self._publisher
        if not self._outbox and not self._replies and publisher is not None and publisher.usable:
            # Nothing is waiting to go, nothing is on its way: publish now,
            # without waking the outbound task first (one task hop less on a
            # call's path). coredis only queues the command here; the
            # outbound task reads the reply. Whatever comes while a publish
            # is on its way waits in the outbox and goes out as one batch.
            try:
                request = publisher.create_request(
                    b"PUBLISH",
                    self._node_channel(node),
                    batch(self.node, [part]),
                    timeout=self._op_timeout,
                )
            except Exception as exc:
                if not _is_redis_failure(exc):
                    raise
                # The connection just broke: the outbox path reports it.
            else:
                self._replies.append((node, request))
                self._outbox_ready.set()
                return
        self._outbox.setdefault(node, []).append(part)
        self._outbox_ready.set()

    def forget(self, call: RemoteCall, *, cancel: bool) -> None:
        """Route nothing more to ``call``; with ``cancel``, stop it on its node."""
        if self._calls.pop(call.id, None) is not None and cancel and not call.done:
            self._post_quiet(call.node, dump(["cancel", call.id]))
        call.done = True
        call.send.close()
        call.receive.close()

    async def _outbound_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = anyio.Event()
            try:
                await self._settle()
                await self._flush()
            except Exception as exc:
                if not _is_redis_failure(exc):
                    raise
                self._link_down(self._unreachable(exc))

    async def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        payloads: list[tuple[str, bytes]] = []
        for node, parts in outbox.items():
            start, size = 0, 0
            for i, part in enumerate(parts):
                if size and size + len(part) > MAX_BATCH_BYTES:
                    payloads.append((node, batch(self.node, parts[start:i])))
                    start, size = i, 0
                size += len(part) + 1
            payloads.append((node, batch(self.node, parts[start:])))
        if not payloads:
            return
        publisher = self._publisher
        if publisher is not None and publisher.usable:
            # The hot path: queue every PUBLISH on the link's own connection
            # (coredis sends what is queued in one write), then read the
            # replies. coredis's lower-level connection API, because a client
            # command costs a pool lease, retries and telemetry per call.
            # Each request has its own deadline (command_timeout).
            for node, payload in payloads:
                request = publisher.create_request(
                    b"PUBLISH", self._node_channel(node), payload, timeout=self._op_timeout
                )
                self._replies.append((node, request))
            await self._settle()
            return
        # Leaving after the link broke: through the pool, if Redis is back.
        with anyio.fail_after(self._op_timeout):
            async with self._client.pipeline(transaction=False) as pipe:
                for node, payload in payloads:
                    pipe.publish(self._node_channel(node), payload)
        for (node, _), count in zip(payloads, pipe.results or (), strict=False):
            if not count:
                self._node_left(node)

    async def _settle(self) -> None:
        """Read the replies to the publishes on their way, oldest first."""
        replies = self._replies
        while replies:
            node, request = replies[0]
            count = await request
            if replies and replies[0][1] is request:
                replies.popleft()
            if not count:
                # Nobody listens on that process's channel: it is gone.
                self._node_left(node)

    # -- what arrives --------------------------------------------------------

    def _on_pubsub(self, message: Any) -> None:
        channel, data = _text(message.get("channel")), message.get("data")
        if not isinstance(data, bytes | str):
            return
        if channel == self._presence:
            self._on_presence(data if isinstance(data, bytes) else data.encode())
            return
        try:
            sender, messages, dropped = parse(data)
        except ValueError as exc:
            logger.warning("dropped a message on %s that is not astral's: %s", channel, exc)
            return
        self._gone.discard(sender)
        calls = self._calls
        for msg in messages:
            kind, call_id = msg[0], msg[1]
            if kind == "item":
                call = calls.get(call_id)
                if call is not None and call.node == sender and not call.deliver(msg):
                    self.forget(call, cancel=True)
            elif kind in {"done", "end", "fail"}:
                call = calls.get(call_id)
                if call is not None and call.node == sender:
                    del calls[call_id]
                    call.done = True
                    call.deliver(msg)
                    call.send.close()
            elif kind == "credit":
                served = self._served.get((sender, call_id))
                if served is not None:
                    served.grant(msg[2])
            elif kind == "cancel":
                served = self._served.get((sender, call_id))
                if served is not None:
                    served.stopped = True
                    served.scope.cancel()
            elif kind == "call":
                self._on_call(sender, msg)
        if dropped:
            logger.warning("dropped %d malformed frames from %s on %s", dropped, sender, channel)

    def _on_call(self, sender: str, msg: list[Any]) -> None:
        key = (sender, msg[1])
        if key in self._served or self._tasks is None:
            return
        if self._closing:
            self._post_quiet(
                sender, dump(["fail", msg[1], "closed", "principal process shutting down", 1001])
            )
            return
        # The budget counts from now: the time in transit is the caller's loss.
        budget = msg[6] if len(msg) > 6 else None
        until = None if budget is None else anyio.current_time() + budget / 1000
        served = self._served[key] = _Served(msg[5], until)
        self._tasks.start_soon(self._serve, sender, msg, served)

    async def _serve(self, sender: str, msg: list[Any], served: _Served) -> None:
        call_id, subject, capability, input = msg[1:5]
        key = (sender, call_id)
        post = self._post_quiet
        try:
            entry = self._local.get(subject) or self._unlisted.get(subject)
            if entry is None or entry.peer.closed:
                post(
                    sender,
                    dump(["fail", call_id, "closed", f"worker {subject!r} is not connected", None]),
                )
                return
            deadline = None
            if served.until is not None:
                deadline = served.until - anyio.current_time()
                if deadline <= 0:
                    missed = f"call {capability} missed its deadline"
                    post(sender, dump(["fail", call_id, "timeout", missed, None]))
                    return
                # The local peer enforces the deadline on the call; the scope
                # also ends what waits here (credit from the caller) by then.
                served.scope.deadline = served.until
            # The caller's trace context, for the local peer's call frame.
            carried_trace.set(msg[7] if len(msg) > 7 else None)
            with served.scope:
                try:
                    output = await entry.peer.call(
                        capability, input, timeout=None, deadline=deadline
                    )
                    if isinstance(output, Stream):
                        async with output:
                            async for item in output:
                                await served.spend()
                                post(sender, dump(["item", call_id, item]))
                        post(sender, dump(["end", call_id]))
                    else:
                        post(sender, dump(["done", call_id, output]))
                except (ConnectionClosed, ProtocolError, Exception) as exc:
                    kind, text, code, extra = describe(exc)
                    if kind == "remote" and text == "internal error":
                        logger.exception("serving %s for %s failed", capability, sender)
                    fail = ["fail", call_id, kind, text, code]
                    post(sender, dump([*fail, extra] if extra else fail))
            if served.scope.cancelled_caught and not served.stopped:
                # The deadline ended the call before the local peer answered.
                missed = f"call {capability} missed its deadline"
                post(sender, dump(["fail", call_id, "timeout", missed, None]))
        finally:
            self._served.pop(key, None)


def _load_claims(data: Any) -> dict[str, Any]:
    claims = load(data if isinstance(data, bytes) else _text(data).encode())
    if not isinstance(claims, dict):
        raise ValueError("claims are not an object")  # noqa: TRY004
    return claims
