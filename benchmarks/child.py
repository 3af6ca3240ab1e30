"""Entry point of every benchmark process: ``python -m benchmarks.child SPEC``.

SPEC is one JSON object (see ``harness.Child``). The process talks to the
harness through its pipes only:

- stdout carries protocol lines ``BENCH <TAG> <payload>``; anything else on
  stdout is ignored, and stderr is kept for error reports;
- stdin carries commands, one per line. End of input means "stop now": the
  process exits at once with ``os._exit`` (teardown of thousands of
  connections is not what we measure, and must not hang).

Server commands: ``rss``, ``records`` (E), ``go N`` (F). The server prints
``READY <port>`` once listening. Client workloads print ``RESULT <json>`` per
workload; holding clients (D, F) print ``WARM`` (D), ``HELD <json>`` and then
wait for ``go`` (D) or for end of input.

Three things make sure no process outlives the harness: end of stdin, a
parent-death signal (Linux), and a hard deadline on a watchdog thread.
"""

# Libraries are imported lazily, only by the processes that use them.
# ruff: noqa: PLC0415

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import traceback
from typing import Any

import anyio
import anyio.to_thread

from .common import ServerApp, rss_bytes
from .systems import get_system
from .workloads import CLIENT_WORKLOADS, hold_connections

PREFIX = "BENCH"


def emit(tag: str, payload: Any = "") -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    sys.stdout.write(f"{PREFIX} {tag} {text}\n")
    sys.stdout.flush()


def describe(exc: BaseException) -> str:
    """A one-line account of an exception, looking inside exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return repr(exc)[:500]


def hard_exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def read_command() -> list[str]:
    """Next command from the harness; exits the process on end of input."""
    line: str = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    if not line:
        hard_exit(0)
    return line.split()


def guard(deadline: float) -> None:
    """Die with the harness, ignore Ctrl-C (the harness handles it), stay bounded."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the harness died before prctl took effect
            hard_exit(3)

    def expire() -> None:
        sys.stderr.write(f"benchmark child: deadline of {deadline:.0f} s exceeded\n")
        hard_exit(3)

    timer = threading.Timer(deadline, expire)
    timer.daemon = True
    timer.start()


def raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def server_main(spec: dict[str, Any]) -> None:
    system = get_system(spec["system"])
    app = ServerApp(spec["mode"])
    async with anyio.create_task_group() as tg:
        port = await tg.start(system.serve, app)
        emit("READY", str(port))
        while True:
            command = await read_command()
            if command[0] == "rss":
                emit("RSS", str(rss_bytes()))
            elif command[0] == "records":
                emit("RECORDS", await app.sleepy_records(wait=2.0))
            elif command[0] == "go":
                emit("FANOUT", await app.fan_out(int(command[1]), timeout=spec["timeout"]))
            else:
                emit("ERROR", f"unknown command {command!r}")


async def client_main(spec: dict[str, Any]) -> None:
    system = get_system(spec["system"])
    port = spec["port"]
    mode = spec["mode"]
    if mode == "calls":
        for workload in spec["workloads"]:
            params = spec["params"][workload]
            try:
                with anyio.fail_after(spec["timeout"]):
                    result = await CLIENT_WORKLOADS[workload](system, port, params)
            except Exception as exc:  # one workload failing must not hide the others
                traceback.print_exception(exc)
                result = {"error": describe(exc)}
            emit("RESULT", {"workload": workload, **result})
        return

    params = spec["params"]
    hold = functools.partial(
        hold_connections,
        system,
        port,
        count=params["count"],
        first_index=params["first_index"],
        worker=mode == "F",
        concurrency=params["concurrency"],
        timeout=spec["timeout"],
        held=lambda info: emit("HELD", info),
    )
    async with anyio.create_task_group() as tg:
        if mode == "D":
            # One warm connection first, so one-off costs (lazy imports, caches)
            # land before the server's baseline reading, not in the delta.
            await tg.start(hold_one, system, port, spec["timeout"])
            emit("WARM")
            await read_command()
        tg.start_soon(hold)
        while True:  # until end of input, which exits the process
            await read_command()


async def hold_one(system: Any, port: int, timeout: float, *, task_status: Any) -> None:
    with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
        async with system.connect(port, index=0) as conn:
            await conn.call()
            scope.deadline = math.inf
            task_status.started()
            await anyio.sleep_forever()
    raise TimeoutError("warm-up connection not open in time")


def main() -> None:
    spec = json.loads(sys.argv[1])
    guard(spec["deadline"])
    raise_fd_limit()
    entry = server_main if spec["role"] == "server" else client_main
    try:
        anyio.run(entry, spec, backend=spec["backend"])
    except BaseException as exc:
        traceback.print_exception(exc)
        emit("FAILED", describe(exc))
        hard_exit(1)
    hard_exit(0)


if __name__ == "__main__":
    main()
