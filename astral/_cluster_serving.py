"""The registry's serving side: calls from other principal processes run here.

A ``call`` message starts a task that calls the local :class:`~astral.Peer`
of the subject and sends back what it answers, pacing a stream by the
caller's credit and ending it at the caller's deadline or cancel.
"""

from __future__ import annotations

from typing import Any

import anyio

from ._cluster import describe, dump
from ._cluster_redis import RegistryBase, logger
from ._exceptions import ConnectionClosed, ProtocolError
from ._middleware import carried_trace
from ._peer import Stream

__all__ = ["Served", "Serving"]


class Served:
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


#: Serving tasks kept waiting for the next call from another process.
IDLE_SERVERS = 128


class _Slot:
    """An idle serving task, waiting to be handed a call."""

    __slots__ = ("event", "job")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.job: tuple[str, list[Any], Served] | None = None

    def hand(self, job: tuple[str, list[Any], Served]) -> None:
        self.job = job
        self.event.set()

    async def wait(self, idle: list[_Slot]) -> tuple[str, list[Any], Served]:
        self.event = anyio.Event()
        idle.append(self)
        try:
            await self.event.wait()
        except BaseException:
            if self in idle:
                idle.remove(self)
            raise
        job, self.job = self.job, None
        assert job is not None
        return job


class Serving(RegistryBase):
    """Running here the calls other processes route to workers connected here."""

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
        served = self._served[key] = Served(msg[5], until)
        job = (sender, msg, served)
        if self._idle_servers:
            self._idle_servers.pop().hand(job)
        else:
            self._tasks.start_soon(self._server, job)

    async def _server(self, job: tuple[str, list[Any], Served]) -> None:
        # Serves one call, then waits for the next, up to IDLE_SERVERS idle at
        # once: waking a waiting task costs less than starting one per call.
        slot: _Slot | None = None
        while True:
            await self._serve(*job)
            if self._closing or len(self._idle_servers) >= IDLE_SERVERS:
                return
            if slot is None:
                slot = _Slot()
            job = await slot.wait(self._idle_servers)

    async def _serve(self, sender: str, msg: list[Any], served: Served) -> None:
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
                except (ConnectionClosed, ProtocolError, Exception) as exc:  # noqa: BLE001 - all go back
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
