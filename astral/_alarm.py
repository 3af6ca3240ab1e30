"""Alarms that need no task of their own: a callback when a time on AnyIO's clock comes.

A peer keeps its calls' timeouts and deadlines itself (``_deadlines``); what
it needs from the event loop is to be called back when the earliest one
passes. A task per peer for that costs a spawn on the first call with a
timeout and a parked task for the connection's life: on a principal that
calls each of 10,000 workers once, 10,000 of each. Instead:

* on **asyncio** an alarm is a handle of the event loop (``loop.call_at``),
  and the callback runs as a plain callback of the loop;
* on **trio** one system task per run serves every alarm of the run from a
  heap, sleeping until the earliest.

Either way the callback must be synchronous and quick; an exception from it
is logged, not raised (it would otherwise end the loop's turn or trio's run).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Alarm"]

logger = logging.getLogger("astral")


class Alarm:
    """One re-armable alarm: :meth:`set` makes ``callback()`` run at a time.

    Args:
        callback: Called, with no arguments, once the time set has come.
    """

    __slots__ = ("_callback", "_entry", "_handle", "when")

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        #: The time the alarm is set for (AnyIO's clock), ``inf`` when unset.
        self.when = math.inf
        self._handle: asyncio.TimerHandle | None = None  # asyncio
        self._entry: list[Any] | None = None  # trio: our entry in the run's heap

    def set(self, when: float) -> None:
        """Ring at ``when`` instead of the time set before (if any). Needs a running loop."""
        self.cancel()
        self.when = when
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: trio
            self._entry = _trio_alarms().add(when, self)
        else:
            self._handle = loop.call_at(when, self._ring)

    def cancel(self) -> None:
        """Do not ring (until set again)."""
        self.when = math.inf
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        entry, self._entry = self._entry, None
        if entry is not None:
            entry[2] = None  # left in the heap, dropped when it comes up
            _trio_alarms().dead += 1

    def _ring(self) -> None:
        self.when = math.inf
        self._handle = self._entry = None
        try:
            self._callback()
        except Exception:
            logger.exception("an alarm's callback failed")


class _TrioAlarms:
    """Every alarm of one trio run, served by one system task."""

    __slots__ = ("dead", "heap", "order", "target", "wake")

    def __init__(self) -> None:
        import trio  # noqa: PLC0415 - only ever on trio

        self.heap: list[list[Any]] = []  # [when, order, alarm or None if cancelled]
        self.order = 0
        self.dead = 0  # cancelled entries still in the heap
        self.target = math.inf  # what run() sleeps until
        self.wake = trio.Event()

    def add(self, when: float, alarm: Alarm) -> list[Any]:
        if self.dead > 64 and self.dead > len(self.heap) // 2:
            self.heap = [e for e in self.heap if e[2] is not None]
            heapq.heapify(self.heap)
            self.dead = 0
        self.order += 1
        entry = [when, self.order, alarm]
        heapq.heappush(self.heap, entry)
        if when < self.target:
            self.wake.set()
        return entry

    async def run(self) -> None:
        import trio  # noqa: PLC0415 - only ever on trio

        while True:
            heap = self.heap
            self.target = heap[0][0] if heap else math.inf
            with trio.move_on_at(self.target):
                await self.wake.wait()
            self.wake = trio.Event()
            now = trio.current_time()
            heap = self.heap
            while heap and heap[0][0] <= now:
                alarm = heapq.heappop(heap)[2]
                if alarm is None:
                    self.dead -= 1
                else:
                    alarm._ring()


_RUN_ALARMS: Any = None  # a trio RunVar, made on first use


def _trio_alarms() -> _TrioAlarms:
    import trio  # noqa: PLC0415 - only ever on trio

    global _RUN_ALARMS  # noqa: PLW0603 - made once, on first use on trio
    if _RUN_ALARMS is None:
        _RUN_ALARMS = trio.lowlevel.RunVar("astral_alarms")
    alarms: _TrioAlarms | None = _RUN_ALARMS.get(None)
    if alarms is None:
        alarms = _TrioAlarms()
        _RUN_ALARMS.set(alarms)
        trio.lowlevel.spawn_system_task(alarms.run, name="astral alarms")
    return alarms
