"""The registry's routing: frames to and from the other principal processes.

This side of :class:`astral.redis.RemoteWorker` (the ``Router`` of
``astral._cluster``): outgoing calls, their inboxes, and the outbox. Frames
for one process are batched into one pub/sub message and published on the
link's own RESP connection (``astral._cluster_wire``), everything queued in
one send. What arrives on this process's channel is dispatched here, from
the task that reads the subscription.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from ._cluster import RemoteCall, batch, dump, parse
from ._cluster_redis import MAX_BATCH_BYTES, RegistryBase, is_redis_failure, logger
from ._exceptions import ClusterError, ConnectionClosed
from ._resp import RespError, RespProtocolError

if TYPE_CHECKING:
    from ._cluster_wire import RespConnection

__all__ = ["Routing"]

#: Seconds after a message went straight out during which the next ones are
#: batched by the outbound task instead (a burst of frames is one publish).
BURST_GAP = 0.0002
#: Seconds the replies to calls' publishes gather before they are read. A
#: reply only says how many processes listened (none: the callee's process is
#: gone); reading each as it came would wake this process once more per call,
#: while its answer wakes it anyway.
REPLY_GATHER = 0.01


class Routing(RegistryBase):
    """Calls this process makes to workers elsewhere, and every frame in and out."""

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
        if not self._outbox and publisher is not None and publisher.direct:
            now = anyio.current_time()
            if now - self._last_direct >= BURST_GAP:
                # Nothing is waiting to go, and nothing went straight out just
                # now: publish from the poster's task, straight onto the
                # socket (no task hop on a call's path). What comes next
                # within BURST_GAP waits in the outbox and goes out as one
                # batch. Only a call wants Redis's reply (see _flush).
                self._last_direct = now
                publisher.write_publish(
                    node,
                    self._node_channel(node),
                    batch(self.node, [part]),
                    part.startswith(b'["call",'),
                )
                if not publisher.idle:
                    # The rest when the socket takes it, or the failure to
                    # the outbound task (which takes the link down).
                    self._outbox_ready.set()
                return
        self._outbox.setdefault(node, []).append(part)
        self._outbox_ready.set()

    def forget(self, call: RemoteCall, *, cancel: bool) -> None:
        """Route nothing more to ``call``; with ``cancel``, stop it on its node."""
        if self._calls.pop(call.id, None) is not None and cancel and not call.done:
            self._post_quiet(call.node, dump(["cancel", call.id]))
        call.done = True
        call.discard()

    async def _outbound_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = anyio.Event()
            try:
                await self._flush()
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                self._link_down(self._unreachable(exc))

    async def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        payloads: list[tuple[str, bytes, bool]] = []
        for node, parts in outbox.items():
            start, size, calls = 0, 0, False
            for i, part in enumerate(parts):
                if size and size + len(part) > MAX_BATCH_BYTES:
                    payloads.append((node, batch(self.node, parts[start:i]), calls))
                    start, size, calls = i, 0, False
                size += len(part) + 1
                calls = calls or part.startswith(b'["call",')
            payloads.append((node, batch(self.node, parts[start:]), calls))
        publisher = self._publisher
        if not payloads:
            if publisher is not None:
                await publisher.drain()  # what a poster wrote, if the socket was full
            return
        if publisher is not None:
            # The hot path: every PUBLISH in one write on the link's own RESP
            # connection (astral._cluster_wire says why not coredis). Only a
            # batch holding a call wants Redis's reply (how many listened:
            # none means its process is gone, and the caller learns it at
            # once); the link's reply reader reads it. The rest (answers,
            # items, credit, cancel) go with CLIENT REPLY SKIP: no reply, no
            # wake-up of this process for it. A process that left is still
            # found by the heartbeat.
            with anyio.fail_after(self._op_timeout):
                await publisher.publish(
                    (node, self._node_channel(node), payload, calls)
                    for node, payload, calls in payloads
                )
            return
        # Leaving after the link broke: through the pool, if Redis is back.
        with anyio.fail_after(self._op_timeout):
            async with self._client.pipeline(transaction=False) as pipe:
                for node, payload, _ in payloads:
                    pipe.publish(self._node_channel(node), payload)
        for (node, _, _), count in zip(payloads, pipe.results or (), strict=False):
            if not count:
                self._node_left(node)

    async def _reply_loop(self, publisher: RespConnection) -> None:
        """Read the replies to the publishes that want one, oldest first.

        Once one is due, the replies gather for :data:`REPLY_GATHER` seconds
        and are read together: at most one wake-up per period for them, and a
        call to a process that is gone fails within that much of being sent.
        A connection Redis closed is found then too (or by the subscription,
        which reads all the time).
        """
        pending = publisher.pending
        while True:
            await publisher.wait_pending()
            await anyio.sleep(REPLY_GATHER)
            for reply in await publisher.replies():
                if not pending:
                    raise RespProtocolError("a reply from Redis that nobody asked for")
                node = pending.popleft()
                if isinstance(reply, RespError):
                    raise reply
                if not reply:
                    # Nobody listens on that process's channel: it is gone.
                    self._node_left(node)

    async def _subscription_loop(self, subscription: RespConnection) -> None:
        """Dispatch what arrives on this process's channels, without a task hop."""
        channel, presence = self._channel.encode(), self._presence.encode()
        while True:
            for reply in await subscription.replies():
                if isinstance(reply, RespError):
                    raise reply
                if not isinstance(reply, list) or len(reply) != 3 or reply[0] != b"message":
                    continue  # subscribe confirmations
                if reply[1] == presence:
                    self._on_presence(reply[2])
                elif reply[1] == channel:
                    self._on_pubsub(reply[2])

    # -- what arrives --------------------------------------------------------

    def _on_pubsub(self, data: bytes) -> None:
        channel = self._channel
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
                    call.close()
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
