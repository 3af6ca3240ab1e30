"""``astral._alarm``: call timeouts need no task per peer (issue #10, workload F).

On asyncio an alarm is an event-loop handle; on trio one system task serves
every alarm of the run. These pin what a peer relies on: it rings once at
the time set, a new time replaces the old, a cancelled alarm stays silent,
and a failing callback is logged without taking the loop down.
"""

from __future__ import annotations

import logging

import anyio
import pytest

from astral._alarm import Alarm
from astral.testing import connected_pair

from .helpers import echo

pytestmark = pytest.mark.anyio


class Rings:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.event = anyio.Event()

    def callback(self, name: str) -> Alarm:
        def ring() -> None:
            self.log.append(name)
            self.event.set()

        return Alarm(ring)

    async def next(self) -> str:
        with anyio.fail_after(5):
            await self.event.wait()
        self.event = anyio.Event()
        return self.log[-1]


async def test_an_alarm_rings_once_at_its_time() -> None:
    rings = Rings()
    alarm = rings.callback("a")
    start = anyio.current_time()
    alarm.set(start + 0.05)
    assert alarm.when == start + 0.05
    assert await rings.next() == "a"
    assert anyio.current_time() >= start + 0.05
    assert alarm.when == float("inf")
    late = rings.callback("late")
    late.set(anyio.current_time() + 0.05)
    assert await rings.next() == "late"
    assert rings.log == ["a", "late"]  # "a" rang once


async def test_a_new_time_replaces_the_old_and_cancel_silences() -> None:
    rings = Rings()
    first, second, third = (rings.callback(name) for name in "abc")
    now = anyio.current_time()
    first.set(now + 0.2)
    first.set(now + 0.01)  # sooner: replaces the later time
    second.set(now + 0.03)
    second.cancel()
    third.set(now + 0.06)
    assert await rings.next() == "a"
    assert await rings.next() == "c"
    assert rings.log == ["a", "c"]


async def test_a_failing_callback_is_logged_and_later_alarms_still_ring(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    rings = Rings()
    broken = Alarm(boom)
    after = rings.callback("after")
    now = anyio.current_time()
    broken.set(now + 0.01)
    after.set(now + 0.03)
    with caplog.at_level(logging.ERROR, logger="astral"):
        assert await rings.next() == "after"
    assert any("alarm" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_many_cancelled_alarms_do_not_pile_up(anyio_backend: str) -> None:
    rings = Rings()
    alarms = [rings.callback(str(i)) for i in range(500)]
    now = anyio.current_time()
    for alarm in alarms:
        alarm.set(now + 3600)
        alarm.cancel()
    last = rings.callback("last")
    last.set(now + 0.01)
    assert await rings.next() == "last"
    if anyio_backend == "trio":
        from astral._alarm import _trio_alarms  # noqa: PLC0415 - trio only

        assert len(_trio_alarms().heap) <= 2 * 64 + 2


async def test_calls_with_timeouts_start_no_task_per_peer() -> None:
    async with connected_pair({"echo": echo}, {"echo": echo}) as (a, b):
        before = len(anyio.get_running_tasks())
        assert await a.call("echo", 1, timeout=30) == 1
        assert await b.call("echo", 2, timeout=30) == 2
        # The workers that served them may have ended or parked; no timer task.
        assert not any("timer" in task.name for task in anyio.get_running_tasks())
        assert len(anyio.get_running_tasks()) <= before + 2


async def test_a_call_still_times_out() -> None:
    release = anyio.Event()

    async def hold(_: object) -> None:
        await release.wait()

    async with connected_pair({"hold": hold}, {}) as (_a, b):
        with pytest.raises(TimeoutError):
            await b.call("hold", None, timeout=0.05)
        release.set()
