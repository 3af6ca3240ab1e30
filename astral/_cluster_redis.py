"""What the parts of :class:`astral.redis.RedisRegistry` share, and Redis itself.

The registry is one object made of three parts, each in its own module:
presence (``_cluster_presence``: which process holds which subject),
routing (``_cluster_routing``: frames to and from other processes) and
serving (``_cluster_serving``: calls from other processes run here).
:class:`RegistryBase` declares the state they share (``RedisRegistry``
sets it up) and the methods they call on each other. This module also holds
the Lua scripts, how a failure is told to be Redis's, and one coredis quirk.
Only this module and ``astral.redis`` import coredis.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

try:
    import coredis
    import coredis.connection
    import coredis.exceptions
    import coredis.retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("astral.redis needs coredis: pip install 'astral-rpc[redis]'") from exc

import anyio
import anyio.abc

from ._cluster import load
from ._resp import RespError, RespProtocolError

if TYPE_CHECKING:
    import itertools

    from ._cluster import RemoteCall
    from ._cluster_presence import Local
    from ._cluster_serving import Served, _Slot
    from ._cluster_wire import RespConnection
    from ._middleware import Middleware

__all__ = ["RegistryBase"]

logger = logging.getLogger("astral.redis")

#: Largest pub/sub payload a batch grows to before another one starts.
MAX_BATCH_BYTES = 256 * 1024
#: Announcements sent in one pipeline (each pipeline has its own deadline).
ANNOUNCE_CHUNK = 256

# Announce a subject held here: newest generation wins, everyone is told.
ANNOUNCE = """
local gen = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. gen)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[2] .. ' ' .. gen .. ' ' .. ARGV[1])
return gen
"""
# Withdraw it, unless a newer connection (anywhere) already took it over.
WITHDRAW = """
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""
# Where a subject is, if its process is alive, listening, and still holds it.
LOOKUP = """
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
SUBJECTS = """
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


def is_redis_failure(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(is_redis_failure(e) for e in exc.exceptions)
    return isinstance(
        exc,
        coredis.exceptions.RedisError
        | OSError
        | TimeoutError
        | RespError
        | RespProtocolError
        | anyio.ClosedResourceError,
    )


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


def leaf_of(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TCPConnection(coredis.connection.TCPConnection):
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


def load_claims(data: Any) -> dict[str, Any]:
    """A worker's claims as listed in Redis.

    Raises:
        ValueError: They are not a JSON object.
    """
    claims = load(data if isinstance(data, bytes) else text(data).encode())
    if not isinstance(claims, dict):
        raise ValueError("claims are not an object")  # noqa: TRY004
    return claims


class RegistryBase:
    """The state the registry's parts share; ``RedisRegistry.__init__`` sets it."""

    node: str
    namespace: str
    where: str
    window: int
    timeout: float | None
    middleware: tuple[Middleware, ...]
    _client: Any
    _scripts: dict[str, Any]
    _tasks: anyio.abc.TaskGroup | None
    _up: bool
    _closing: bool
    _op_timeout: float
    _ttl_ms: int
    _listing_ttl_ms: int
    _heartbeat: float
    _k_where: str
    _k_gen: str
    _k_alive: str
    _k_subjects: str
    _presence: str
    _channel: str
    _publisher: RespConnection | None
    _last_direct: float
    _local: dict[str, Local]
    _unlisted: dict[str, Local]
    _waiters: dict[str, anyio.Event]
    _ops: list[tuple[str, Local]]
    _ops_ready: anyio.Event
    _presence_lock: anyio.Lock
    _outbox: dict[str, list[bytes]]
    _outbox_ready: anyio.Event
    _ids: itertools.count[int]
    _calls: dict[int, RemoteCall]
    _served: dict[tuple[str, int], Served]
    _idle_servers: list[_Slot]
    _gone: set[str]

    def _node_channel(self, node: str) -> str:
        return f"{self.namespace}:node:{node}"

    def _unreachable(self, exc: BaseException) -> str:
        leaf = leaf_of(exc)
        detail = str(leaf) or type(leaf).__name__
        if isinstance(leaf, TimeoutError):
            detail = f"no answer within {self._op_timeout:g} s"
        return f"cannot reach Redis at {self.where}: {detail}"

    if TYPE_CHECKING:
        # Implemented by the parts (and the registry), called across them.
        def _link_down(self, reason: str) -> None: ...
        def _node_left(self, node: str) -> None: ...
        def _post_quiet(self, node: str, part: bytes) -> None: ...
        def _on_presence(self, data: bytes) -> None: ...
        def _on_call(self, sender: str, msg: list[Any]) -> None: ...
        def _wake_all(self) -> None: ...
        async def _flush(self) -> None: ...
