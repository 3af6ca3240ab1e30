"""What every system under test shares: payload, capabilities, interfaces.

A *system* (see ``benchmarks/systems``) knows how to serve and how to connect.
Its server side is handed a :class:`ServerApp`, which owns the capabilities
(``echo``, ``stream``, ``sleepy``), the per-connection hook used by the
fan-out workload (F) and the bookkeeping that the harness reads back through
the server's control pipe. Its client side yields a :class:`Conn`, the three
verbs the client workloads need.
"""

# Libraries are imported lazily, only by the processes that use them.
# ruff: noqa: PLC0415

from __future__ import annotations

import gc
import os
import time
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import anyio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from contextlib import AbstractAsyncContextManager

#: The call input of workloads A, B, D, E (RTT) and F.
PAYLOAD: dict[str, int] = {"x": 1}
#: The same payload as text, for the echo systems (no RPC, no codec).
PAYLOAD_TEXT = '{"x": 1}'
#: HS256 secret shared by the astral server and its workers. Not a real secret.
SECRET = "astral-benchmark-secret-not-for-production"
#: How long the ``sleepy`` capability sleeps if nobody cancels it.
SLEEPY_SECONDS = 5.0

#: Workloads, in the order the table shows them.
WORKLOADS = "ABCUDEF"


def rss_bytes() -> int:
    """Resident set size of this process, after a full garbage collection."""
    gc.collect()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil  # type: ignore[import-untyped,unused-ignore]

        return int(psutil.Process().memory_info().rss)


class Conn(Protocol):
    """One client connection, as the client workloads use it."""

    async def call(self) -> Any:
        """Call ``echo`` with :data:`PAYLOAD` and return what came back."""

    def stream(self, n: int) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """One call that streams ``n`` small items back."""
        ...

    async def sleepy(self, i: int) -> None:
        """Call ``sleepy`` with ``{"i": i}``; it only returns if not cancelled."""

    async def upload(self, items: AsyncIterator[int]) -> int:
        """One call streaming ``items`` to the server; returns how many it took.

        Only systems whose ``workloads`` include ``U`` implement it.
        """
        ...


class System(Protocol):
    """A system under test: one library (family) on some event-loop backends."""

    name: ClassVar[str]
    backends: ClassVar[tuple[str, ...]]
    #: The workload letters this system takes part in; the others are n/a.
    workloads: ClassVar[str]

    def unavailable(self) -> str | None:
        """Why the system can't run here (a line for the user), or None."""

    async def serve(self, app: ServerApp, *, task_status: Any) -> None:
        """Listen on 127.0.0.1 (any free port); report the port via task_status."""

    def connect(
        self, port: int, *, worker: bool = False, index: int = 0
    ) -> AbstractAsyncContextManager[Conn | None]:
        """Open one connection.

        With ``worker=True`` the connection answers calls from the server
        (workload F) and yields None; ``index`` names the worker.
        """
        ...


class ServerApp:
    """The server process's side of every workload.

    Args:
        mode: ``"calls"`` (workloads A, B, C, E), ``"D"`` or ``"F"``. Only F
            changes behaviour: there each connection waits for the fan-out.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        # E: per call index, when ``sleepy`` started and when its finally ran.
        self.sleepy_started: dict[int, int] = {}
        self.sleepy_finished: dict[int, int] = {}
        self._sleepy_settled = anyio.Event()
        # F: connections seen, fan-out progress.
        self.connected = 0
        self._want = 0
        self._all_connected = anyio.Event()
        self._go = anyio.Event()
        self._done = 0
        self._all_done = anyio.Event()
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []

    # -- capabilities -------------------------------------------------------

    def capabilities(self) -> dict[str, Callable[..., Any]]:
        """Plain functions, as a user would register them."""

        async def echo(input: Any) -> Any:
            return input

        async def stream_items(n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

        async def sleepy(input: dict[str, int]) -> None:
            i = input["i"]
            self.sleepy_started[i] = time.monotonic_ns()
            try:
                await anyio.sleep(SLEEPY_SECONDS)
            finally:
                self.sleepy_finished[i] = time.monotonic_ns()
                if len(self.sleepy_finished) >= len(self.sleepy_started):
                    self._sleepy_settled.set()

        return {"echo": echo, "stream": stream_items, "sleepy": sleepy}

    async def sleepy_records(self, wait: float) -> dict[str, dict[int, int]]:
        """Start and finally times of ``sleepy``, once all started ones ended."""
        if len(self.sleepy_finished) < len(self.sleepy_started):
            self._sleepy_settled = anyio.Event()
            with anyio.move_on_after(wait):
                while len(self.sleepy_finished) < len(self.sleepy_started):
                    await self._sleepy_settled.wait()
                    self._sleepy_settled = anyio.Event()
        return {"started": self.sleepy_started, "finished": self.sleepy_finished}

    # -- F: the principal calls every worker once ---------------------------

    async def on_connect(self, call: Callable[[], Awaitable[Any]]) -> None:
        """Run once per connection; the connection stays open after it returns.

        In F it waits for the fan-out, then calls the worker once: ``call``
        calls the connected worker's ``echo`` with :data:`PAYLOAD`.
        """
        self.connected += 1
        if self._want and self.connected >= self._want:
            self._all_connected.set()
        if self.mode != "F":
            return
        await self._go.wait()
        try:
            await call()
        except Exception as exc:
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(repr(exc))
        else:
            self.ok += 1
        finally:
            self._done += 1
            if self._done >= self._want:
                self._all_done.set()

    async def fan_out(self, n: int, timeout: float) -> dict[str, Any]:
        """Wait for ``n`` connections, then call each once; time all of it."""
        self._want = n
        with anyio.move_on_after(timeout):
            if self.connected < n:
                await self._all_connected.wait()
        if self.connected < n:
            return {"error": f"only {self.connected} of {n} workers connected"}
        rss_held = rss_bytes()
        start = time.perf_counter_ns()
        self._go.set()
        with anyio.move_on_after(timeout):
            await self._all_done.wait()
        elapsed = time.perf_counter_ns() - start
        return {
            "n": n,
            "ok": self.ok,
            "failed": self.failed,
            "unfinished": n - self._done,
            "errors": self.errors,
            "elapsed_s": elapsed / 1e9,
            "rss_held": rss_held,
            "rss_after": rss_bytes(),
        }
