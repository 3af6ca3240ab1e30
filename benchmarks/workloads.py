"""What a client process measures, one function per workload.

Every loop here is bounded twice: by a count and by a deadline. A workload
that hits its deadline reports what it managed, marked ``truncated``.
Workloads D and F only open and hold connections; the server side measures
them (memory, fan-out time) when the harness asks through its control pipe.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

import anyio

from .common import PAYLOAD, PAYLOAD_TEXT, Conn, System

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

Params = dict[str, Any]


def _check(reply: Any) -> None:
    if reply != PAYLOAD and reply != PAYLOAD_TEXT:
        raise AssertionError(f"echo returned {reply!r}")


def _server_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) the server process has used, from /proc."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # not Linux, or the server is gone
        return None
    # Fields 14 and 15 of stat(5) are utime and stime; ``fields`` starts at 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Fraction of a core each process used over one timed window.

    The client measures itself (``time.process_time``) and reads the server's
    counters from /proc, so both cover exactly the timed part of a workload.
    A process that spends its time waiting for the other shows a low figure:
    that is how latency bubbles show up in the table.
    """

    def __init__(self, p: Params) -> None:
        self._pid: int | None = p.get("server_pid")
        self._client = time.process_time()
        self._server = _server_cpu_s(self._pid)

    def read(self, elapsed_s: float) -> dict[str, float]:
        out = {"client_cpu": (time.process_time() - self._client) / elapsed_s}
        server = _server_cpu_s(self._pid)
        if server is not None and self._server is not None:
            out["server_cpu"] = (server - self._server) / elapsed_s
        return out


def _percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    index = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1e3


async def sequential(system: System, port: int, p: Params) -> dict[str, Any]:
    """A: one call in flight at a time; calls/s, p50 and p99 latency."""
    async with system.connect(port) as conn:
        assert conn is not None
        for _ in range(p["warmup"]):
            _check(await conn.call())
        latencies: list[int] = []
        cpu = CpuMeter(p)
        start = time.perf_counter_ns()
        deadline = start + int(p["seconds"] * 1e9)
        now = start
        while len(latencies) < p["count"] and now < deadline:
            await conn.call()
            after = time.perf_counter_ns()
            latencies.append(after - now)
            now = after
        elapsed = (now - start) / 1e9
        usage = cpu.read(elapsed)
    latencies.sort()
    return {
        "calls": len(latencies),
        "elapsed_s": elapsed,
        "truncated": len(latencies) < p["count"],
        "calls_per_s": len(latencies) / elapsed,
        "p50_us": _percentile(latencies, 0.50),
        "p99_us": _percentile(latencies, 0.99),
        **usage,
    }


async def _concurrent(conn: Conn, total: int, in_flight: int, deadline_ns: int) -> int:
    """``in_flight`` tasks calling until ``total`` calls were issued or time is up."""
    issued = done = 0

    async def caller() -> None:
        nonlocal issued, done
        while issued < total and time.perf_counter_ns() < deadline_ns:
            issued += 1
            await conn.call()
            done += 1

    async with anyio.create_task_group() as tg:
        for _ in range(in_flight):
            tg.start_soon(caller)
    return done


async def concurrent(system: System, port: int, p: Params) -> dict[str, Any]:
    """B: ``in_flight`` calls outstanding over one connection; calls/s."""
    async with system.connect(port) as conn:
        assert conn is not None
        _check(await conn.call())
        await _concurrent(conn, p["warmup"], p["in_flight"], time.perf_counter_ns() + 10**10)
        cpu = CpuMeter(p)
        start = time.perf_counter_ns()
        done = await _concurrent(conn, p["count"], p["in_flight"], start + int(p["seconds"] * 1e9))
        elapsed = (time.perf_counter_ns() - start) / 1e9
        usage = cpu.read(elapsed)
    return {
        "calls": done,
        "in_flight": p["in_flight"],
        "elapsed_s": elapsed,
        "truncated": done < p["count"],
        "calls_per_s": done / elapsed,
        **usage,
    }


async def streaming(system: System, port: int, p: Params) -> dict[str, Any]:
    """C: one call streaming ``count`` small items; items/s."""
    async with system.connect(port) as conn:
        assert conn is not None
        async with conn.stream(p["warmup"]) as items:
            async for _ in items:
                pass
        received = 0
        cpu = CpuMeter(p)
        start = time.perf_counter_ns()
        with anyio.move_on_after(p["seconds"]):
            async with conn.stream(p["count"]) as items:
                async for _ in items:
                    received += 1
        elapsed = (time.perf_counter_ns() - start) / 1e9
        usage = cpu.read(elapsed)
    return {
        "items": received,
        "elapsed_s": elapsed,
        "truncated": received < p["count"],
        "items_per_s": received / elapsed,
        **usage,
    }


async def upload(system: System, port: int, p: Params) -> dict[str, Any]:
    """U: one call streaming ``count`` small items caller -> callee; items/s."""

    async def numbers(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async with system.connect(port) as conn:
        assert conn is not None
        await conn.upload(numbers(p["warmup"]))
        cpu = CpuMeter(p)
        start = time.perf_counter_ns()
        received = 0
        with anyio.move_on_after(p["seconds"]):
            received = await conn.upload(numbers(p["count"]))
        elapsed = (time.perf_counter_ns() - start) / 1e9
        usage = cpu.read(elapsed)
    return {
        "items": received,
        "elapsed_s": elapsed,
        "truncated": received < p["count"],
        "items_per_s": received / elapsed,
        **usage,
    }


async def cancellation(system: System, port: int, p: Params) -> dict[str, Any]:
    """E: cancel a call in flight; the server records when its finally ran.

    The call is given ``delay`` seconds to reach the server (far more than a
    round trip; the harness checks the server's start time to be sure), then
    the caller's scope is cancelled and ``time.monotonic_ns()`` noted. That
    clock (CLOCK_MONOTONIC) is shared by all processes on Linux, so the
    harness subtracts it from the server's finally time. The round-trip time
    is measured on the same connection for comparison.
    """
    async with system.connect(port) as conn:
        assert conn is not None
        rtts: list[int] = []
        for _ in range(p["rtt_count"]):
            start = time.perf_counter_ns()
            _check(await conn.call())
            rtts.append(time.perf_counter_ns() - start)
        cancelled_at: dict[int, int] = {}
        errors: list[str] = []
        deadline = time.monotonic() + p["seconds"]
        for i in range(p["count"]):
            if time.monotonic() > deadline:
                break
            scope = anyio.CancelScope()

            async def caller(i: int = i, scope: anyio.CancelScope = scope) -> None:
                with scope:
                    try:
                        await conn.sleepy(i)
                    except Exception as exc:
                        errors.append(repr(exc))
                    else:
                        errors.append(f"sleepy({i}) returned instead of being cancelled")

            async with anyio.create_task_group() as tg:
                tg.start_soon(caller)
                await anyio.sleep(p["delay"])
                cancelled_at[i] = time.monotonic_ns()
                scope.cancel()
    return {
        "rtt_ms": statistics.median(rtts) / 1e6,
        "cancelled_at": cancelled_at,
        "errors": errors[:5],
    }


CLIENT_WORKLOADS: dict[str, Callable[[System, int, Params], Awaitable[dict[str, Any]]]] = {
    "A": sequential,
    "B": concurrent,
    "C": streaming,
    "U": upload,
    "E": cancellation,
}


async def hold_connections(
    system: System,
    port: int,
    *,
    count: int,
    first_index: int,
    worker: bool,
    concurrency: int,
    timeout: float,
    held: Callable[[dict[str, Any]], None],
) -> None:
    """D and F: open ``count`` connections, call once on each (unless worker), hold.

    ``held`` is called once every connection is open (or failed). The
    connections then stay open until the process is told to exit.
    """
    limiter = anyio.Semaphore(concurrency)
    ok = failed = 0
    errors: list[str] = []
    all_settled = anyio.Event()

    def settle(exc: Exception | None) -> None:
        nonlocal ok, failed
        if exc is None:
            ok += 1
        else:
            failed += 1
            if len(errors) < 5:
                errors.append(repr(exc))
        if ok + failed == count:
            all_settled.set()

    async def one(index: int) -> None:
        settled = False
        await limiter.acquire()
        acquired = True
        try:
            # Connecting (and the first call) is bounded; holding is not.
            with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
                async with system.connect(port, worker=worker, index=index) as conn:
                    if not worker:
                        assert conn is not None
                        _check(await conn.call())
                    limiter.release()
                    acquired = False
                    settle(None)
                    settled = True
                    scope.deadline = math.inf
                    await anyio.sleep_forever()
            if scope.cancelled_caught and not settled:
                settle(TimeoutError(f"connection {index} not open within {timeout} s"))
        except Exception as exc:
            if not settled:
                settle(exc)
        finally:
            if acquired:
                limiter.release()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for index in range(first_index, first_index + count):
            tg.start_soon(one, index)
        with anyio.move_on_after(timeout):
            await all_settled.wait()
        held(
            {
                "ok": ok,
                "failed": failed,
                "errors": errors,
                "connect_s": time.perf_counter() - start,
            }
        )
        await anyio.sleep_forever()
