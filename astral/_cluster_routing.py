"""The registry's routing: frames to and from the other principal processes.

This side of :class:`astral.redis.RemoteWorker` (the ``Router`` of
``astral._cluster``): outgoing calls, their inboxes, and the outbox. Frames
for one process are batched into one pub/sub message and published on the
link's own connection; when nothing is queued or on its way, a frame is
published by its poster at once (one task hop less on a call's path). What
arrives on this process's channel is dispatched here without waiting.
"""

from __future__ import annotations

from typing import Any

import anyio

from ._cluster import RemoteCall, batch, dump, parse
from ._cluster_redis import MAX_BATCH_BYTES, RegistryBase, is_redis_failure, logger, text
from ._exceptions import ClusterError, ConnectionClosed

__all__ = ["Routing"]


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
        if (
            not self._outbox
            and not self._replies
            and not self._burst
            and publisher is not None
            and publisher.usable
        ):
            # Nothing is waiting to go, nothing is on its way: publish now,
            # without waking the outbound task first (one task hop less on a
            # call's path). coredis only queues the command here. Whatever
            # comes next, until the outbound task has run, waits in the
            # outbox and goes out as one batch.
            #
            # Only a call needs Redis's reply (how many listened: none means
            # its process is gone, and the caller learns it at once). The
            # rest (answers, items, credit, cancel) goes with CLIENT REPLY
            # SKIP: no reply to read, so no wake-up of this process for it.
            # A process that left is still found by the heartbeat.
            wants_reply = part.startswith(b'["call",')
            try:
                request = publisher.create_request(
                    b"PUBLISH",
                    self._node_channel(node),
                    batch(self.node, [part]),
                    noreply=not wants_reply,
                    timeout=self._op_timeout,
                )
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                # The connection just broke: the outbox path reports it.
            else:
                if wants_reply:
                    self._replies.append((node, request))
                else:
                    self._burst = True
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
            self._burst = False
            try:
                await self._settle()
                await self._flush()
            except Exception as exc:
                if not is_redis_failure(exc):
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
        channel, data = text(message.get("channel")), message.get("data")
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
