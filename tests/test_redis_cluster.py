"""Principal processes sharing their workers through a real redis-server.

Real OS processes: two ``astral.serve`` principals (on the test's backend)
and the ASGI app under ``uvicorn --workers 2`` (asyncio), all on one Redis.
Workers connect to different processes, and each of the four processes holds
at least one (uvicorn hands connections to its processes as they accept them:
the test connects until each has one, within a bound); every process calls
every worker (a result, a cancelled call, a 10,000-item stream from
another process); then one process is SIGKILLed while a call is routed to it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import pytest

import astral

from .helpers import token
from .redis_server import free_port, needs_redis, redis_server

pytestmark = needs_redis

pytest.importorskip("coredis")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent
PRESENCE_TTL = 3.0  # as in tests/cluster_principal.py
UVICORN_WORKERS = 2


def _drain(stream: IO[str]) -> None:
    with stream:
        for _ in stream:
            pass


def _wait_for_line(stream: IO[str], needle: str, times: int = 1) -> str:
    seen = []
    for line in stream:
        seen.append(line)
        if needle in line:
            times -= 1
            if times == 0:
                return line
    raise RuntimeError("process ended before it was ready:\n" + "".join(seen))


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdin is not None:
                process.stdin.close()


def start_serve(
    started: list[subprocess.Popen[str]], redis_url: str, namespace: str, backend: str
) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster_principal", redis_url, namespace, backend],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started.append(process)
    assert process.stdout is not None
    line = _wait_for_line(process.stdout, "READY ")
    drain_in_background(process.stdout)
    return process, int(line.split()[1])


def start_uvicorn(
    started: list[subprocess.Popen[str]], redis_url: str, namespace: str, workers: int
) -> int:
    port = free_port()
    env = {**os.environ, "ASTRAL_REDIS": redis_url, "ASTRAL_NAMESPACE": namespace}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.cluster_principal:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--lifespan",
            "on",
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(process)
    assert process.stderr is not None
    _wait_for_line(process.stderr, "Application startup complete", times=workers)
    drain_in_background(process.stderr)
    return port


def drain_in_background(stream: IO[str]) -> None:
    threading.Thread(target=_drain, args=(stream,), daemon=True).start()


@dataclass
class WorkerState:
    subject: str
    started: dict[str, anyio.Event] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)

    def event(self, tag: str) -> anyio.Event:
        return self.started.setdefault(tag, anyio.Event())

    def capabilities(self) -> dict[str, Any]:
        async def echo(value: Any) -> Any:
            return value

        async def count(n: int) -> Any:
            for i in range(n):
                yield i

        async def sleepy(tag: str) -> None:
            self.event(tag).set()
            try:
                await anyio.sleep_forever()
            finally:
                self.cancelled.add(tag)

        async def was_started(tag: str) -> bool:
            return self.event(tag).is_set()

        async def was_cancelled(tag: str) -> bool:
            return tag in self.cancelled

        return {
            "echo": echo,
            "count": count,
            "sleepy": sleepy,
            "was_started": was_started,
            "was_cancelled": was_cancelled,
        }


@pytest.mark.time_limit(90)
async def test_every_process_calls_every_worker_and_survives_a_sigkill(
    anyio_backend: str,
) -> None:
    namespace = "mp" + secrets.token_hex(4)
    with redis_server() as server, processes() as started:
        p1, port1 = start_serve(started, server.url, namespace, anyio_backend)
        p2, port2 = start_serve(started, server.url, namespace, anyio_backend)
        port3 = start_uvicorn(started, server.url, namespace, workers=UVICORN_WORKERS)
        urls = {
            "p1": f"ws://127.0.0.1:{port1}/",
            "p2": f"ws://127.0.0.1:{port2}/",
            "uv": f"ws://127.0.0.1:{port3}/",
        }
        async with AsyncExitStack() as stack:
            peers: dict[str, astral.Peer] = {}
            states: dict[str, WorkerState] = {}
            pid_of: dict[str, int] = {}

            async def connect(subject: str, url: str, keep: bool = True) -> int:
                state = WorkerState(subject)
                async with AsyncExitStack() as own:
                    peer = await own.enter_async_context(
                        astral.connect(url, token=token(subject), capabilities=state.capabilities())
                    )
                    pid: int = (await peer.call("whereami"))["pid"]
                    if keep or pid not in pid_of.values():
                        states[subject], peers[subject], pid_of[subject] = state, peer, pid
                        stack.push_async_exit(own.pop_all())
                    return pid

            await connect("a1", urls["p1"])
            await connect("a2", urls["p1"])
            await connect("b1", urls["p2"])
            await connect("b2", urls["p2"])
            # uvicorn hands each connection to whichever of its processes
            # accepts it first: connect until each of them holds a worker
            # (keeping one connection per process, closing the extra ones), a
            # bounded number of times. Two more connect afterwards, wherever.
            uvicorn_pids: set[int] = set()
            attempts = 0
            while len(uvicorn_pids) < UVICORN_WORKERS and attempts < 200:
                uvicorn_pids.add(await connect(f"c{attempts}", urls["uv"], keep=False))
                attempts += 1
            for i in range(2):
                await connect(f"d{i}", urls["uv"])
            assert pid_of["a1"] == p1.pid
            assert pid_of["b1"] == p2.pid
            subjects = sorted(peers)
            # Every process takes part: both astral.serve and each uvicorn worker.
            assert len(uvicorn_pids) == UVICORN_WORKERS, f"after {attempts} connections"
            assert len({pid_of[s] for s in subjects}) == 2 + UVICORN_WORKERS

            # One driver per process: it exercises every worker from there.
            drivers: dict[int, str] = {}
            for subject in subjects:
                drivers.setdefault(pid_of[subject], subject)
            reports: dict[int, dict[str, Any]] = {}

            async def drive(pid: int, driver: str) -> None:
                far = next(s for s in subjects if pid_of[s] != pid)
                reports[pid] = await peers[driver].call(
                    "exercise", {"subjects": subjects, "stream_from": far}, timeout=60
                )

            async with anyio.create_task_group() as tg:
                for pid, driver in drivers.items():
                    tg.start_soon(drive, pid, driver)
            for pid, report in reports.items():
                assert sorted(report) == subjects
                for subject, entry in report.items():
                    assert entry["echo"] == {"from": pid, "to": subject}
                    assert entry["remote"] == (pid_of[subject] != pid)
                    assert entry["cancelled"] is True
                assert sum(1 for e in report.values() if e.get("stream_ok") is True) == 1

            # SIGKILL p2 while p1 has a call routed to b1 (held by p2).
            result: dict[str, Any] = {}

            async def call_through_p1() -> None:
                result.update(await peers["a1"].call("call_sleepy", "b1", timeout=None))

            async with anyio.create_task_group() as tg:
                tg.start_soon(call_through_p1)
                await states["b1"].event("until-killed").wait()
                p2.kill()
            assert result["error"] == "ConnectionClosed"
            assert result["elapsed"] < PRESENCE_TTL + 1

            # Its subjects vanish from the cluster within the presence TTL.
            with anyio.fail_after(PRESENCE_TTL + 3):
                while {"b1", "b2"} & set(await peers["a1"].call("subjects")):
                    await anyio.sleep(0.1)
            listed = await peers["d0"].call("subjects")
            assert "a1" in listed
            assert "b1" not in listed
