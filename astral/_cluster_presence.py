"""The registry's presence: which principal process holds which subject.

Workers connected here are listed at once in this process and announced to
Redis in the background (batched, in chunks with their own deadlines); a
heartbeat keeps this process's keys alive and finds processes that left;
announcements from others wake :meth:`wait_for` and let a newer connection
of a subject elsewhere supersede this one. See ``astral.redis`` for the keys.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from ._cluster import dump
from ._cluster_redis import ANNOUNCE_CHUNK, RegistryBase, is_redis_failure, logger, text

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._peer import Peer

__all__ = ["Local", "Presence"]


class Local:
    """A worker connected to this process, as listed in Redis."""

    __slots__ = ("gen", "peer", "seen", "subject")

    def __init__(self, subject: str, peer: Peer) -> None:
        self.subject = subject
        self.peer = peer
        self.gen = 0  # set once Redis has it; 0 while the announcement is on its way
        self.seen = 0  # the newest generation announced elsewhere meanwhile


class Presence(RegistryBase):
    """Listing this process's workers in Redis, and hearing of the others'."""

    async def _rejoin(self) -> None:
        """(Re)announce this process and every worker it holds."""
        async with self._presence_lock:
            self._ops.clear()
            with anyio.fail_after(self._op_timeout):
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.set(self._k_alive, "1", px=self._ttl_ms)
                    pipe.delete([self._k_subjects])
            await self._announce(list(self._local.values()), [])

    async def _announce(self, adds: list[Local], removes: list[Local]) -> None:
        # In chunks, each with its own deadline: thousands of workers
        # connecting at once must not make one pipeline look like an outage.
        for start in range(0, len(removes), ANNOUNCE_CHUNK):
            with anyio.fail_after(self._op_timeout):
                await self._announce_chunk([], removes[start : start + ANNOUNCE_CHUNK])
        for start in range(0, len(adds), ANNOUNCE_CHUNK):
            with anyio.fail_after(self._op_timeout):
                await self._announce_chunk(adds[start : start + ANNOUNCE_CHUNK], [])

    async def _announce_chunk(self, adds: list[Local], removes: list[Local]) -> None:
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
        entry = Local(subject, peer)
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

    def _queue(self, op: str, entry: Local) -> None:
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
                    if not is_redis_failure(exc):
                        raise
                    self._link_down(self._unreachable(exc))

    def _on_presence(self, data: bytes) -> None:
        try:
            node, gen_text, subject = text(data).split(" ", 2)
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

    def _supersede(self, entry: Local) -> None:
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
                    if not is_redis_failure(exc):
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
            listeners = {text(k): int(v) for k, v in dict(results[2]).items()}
            for node in nodes:
                if not listeners.get(self._node_channel(node)):
                    self._node_left(node)
        # A heartbeat late beyond the TTL (a starved event loop) only hid this
        # process for a moment: the SET above brings it back. Only a listing
        # that is gone (Redis restarted or flushed, a stall beyond three TTLs)
        # needs everything announced again.
        announced = any(entry.gen for entry in self._local.values())
        return announced and len(results) > 1 and not results[1]

    @property
    def local(self) -> dict[str, Peer]:
        """The workers connected to this process, by subject (a copy)."""
        return {subject: entry.peer for subject, entry in self._local.items()}
