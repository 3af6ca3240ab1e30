"""astral.run_worker: a worker that reconnects, with backoff, fresh tokens and real restarts."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pytest

import astral
from astral._demo import _restart_scene
from astral._websocket import HandshakeRequest, Rejection, WebSocketConnection, serve_websocket
from tests.helpers import SECRET, make_tls, running_principal, token

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

FAST = astral.Backoff(initial=0.01, maximum=0.05)


async def until_refused(peer: astral.Peer, capability: str, *args: Any, **kwargs: Any) -> str:
    """Call until the remote refuses: the drain has begun. Returns the refusal."""
    while True:
        try:
            await peer.call(capability, *args, **kwargs)
        except astral.RemoteError as exc:
            return exc.message


# --- the schedule ---------------------------------------------------------------------


def test_backoff_draws_full_jitter_under_a_growing_capped_bound() -> None:
    backoff = astral.Backoff(initial=0.5, maximum=30.0, multiplier=2.0)
    assert [backoff.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(3, rand=lambda: 0.0) == 0.0
    assert backoff.delay(3, rand=lambda: 0.5) == 2.0
    assert backoff.ceiling(10**6) == 30.0  # no overflow, however long it failed
    assert astral.Backoff(multiplier=1).ceiling(10**6) == 0.5


@pytest.mark.parametrize(
    "options",
    [
        {"initial": 0},
        {"initial": 2, "maximum": 1},
        {"multiplier": 0.5},
        {"reset_after": -1},
    ],
)
def test_backoff_refuses_a_schedule_that_cannot_work(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        astral.Backoff(**options)


# --- reconnecting ---------------------------------------------------------------------


class EventHandler(logging.Handler):
    """Sets an event when a log record contains ``text`` (on the event loop's thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = anyio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.records.append(record)
            self.seen.set()


@asynccontextmanager
async def watching(text: str) -> AsyncIterator[EventHandler]:
    handler = EventHandler(text)
    log = logging.getLogger("astral.worker")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


async def test_it_reconnects_with_a_fresh_token_after_each_connection_ends() -> None:
    minted: list[str] = []

    def fresh_token() -> str:
        minted.append(token())
        return minted[-1]

    async with running_principal() as principal, anyio.create_task_group() as tg:
        tg.start_soon(lambda: astral.run_worker(principal.url, token=fresh_token, backoff=FAST))
        for round_ in range(3):
            peer = await principal.registry.wait_for("worker-1")
            assert len(minted) == round_ + 1
            await peer.aclose(4000, "go away")
        await principal.registry.wait_for("worker-1")
        assert len(minted) == 4
        tg.cancel_scope.cancel()


async def test_on_connect_runs_for_every_connection_and_serves_calls() -> None:
    seen: list[Any] = []
    connections = 0
    first = anyio.Event()
    again = anyio.Event()

    async def work(peer: astral.Peer) -> None:
        nonlocal connections
        connections += 1
        seen.append(await peer.call("whoami"))
        (first if connections == 1 else again).set()
        await peer.call("sleepy", timeout=None)  # until the principal drops us

    async def bash(command: str) -> str:
        return f"ran {command}"

    async with running_principal() as principal, anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: astral.run_worker(
                principal.url,
                token=token,
                capabilities={"bash": bash},
                on_connect=work,
                backoff=FAST,
            )
        )
        peer = await principal.registry.wait_for("worker-1")
        assert await peer.call("bash", "ls") == "ran ls"
        # Not before on_connect's own call came back: closing would fail it.
        await first.wait()
        await peer.aclose()
        await again.wait()
        assert seen == ["worker-1", "worker-1"]
        tg.cancel_scope.cancel()


async def test_a_refused_token_backs_off_with_a_warning_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = iter(["not-a-jwt", "still-not", token()])
    caplog.set_level(logging.WARNING, logger="astral.worker")
    async with running_principal() as principal, anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: astral.run_worker(principal.url, token=lambda: next(tokens), backoff=FAST)
        )
        await principal.registry.wait_for("worker-1")
        tg.cancel_scope.cancel()
    refusals = [r for r in caplog.records if "refused the worker's token" in r.getMessage()]
    assert len(refusals) == 2
    assert all(r.levelno == logging.WARNING for r in refusals)
    assert all("not-a-jwt" not in r.getMessage() for r in refusals)


async def test_a_wrong_url_stops_with_the_error() -> None:
    async with running_principal() as principal:
        with pytest.raises(astral.HandshakeError) as info:
            await astral.run_worker(
                f"ws://127.0.0.1:{principal.port}/wrong", token=token, backoff=FAST
            )
        assert info.value.status == 404


@asynccontextmanager
async def refusing(statuses: list[int]) -> AsyncIterator[tuple[int, anyio.Event]]:
    """A WebSocket server answering each upgrade with the next status, then accepting."""
    accepted = anyio.Event()

    async def process_request(_: HandshakeRequest) -> Rejection | None:
        return Rejection(statuses.pop(0), "no") if statuses else None

    async def handler(ws: WebSocketConnection) -> None:
        async with astral.Peer(ws) as peer:
            accepted.set()
            await peer.wait_closed()

    async with anyio.create_task_group() as tg:
        port = await tg.start(
            functools.partial(
                serve_websocket, handler, "127.0.0.1", 0, process_request=process_request
            )
        )
        yield port, accepted
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_transient_refusals_are_retried(status: int) -> None:
    async with refusing([status, status]) as (port, accepted), anyio.create_task_group() as tg:
        tg.start_soon(lambda: astral.run_worker(f"ws://127.0.0.1:{port}/", backoff=FAST))
        await accepted.wait()
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("status", [400, 403, 404, 410])
async def test_other_4xx_refusals_stop_the_worker(status: int) -> None:
    async with refusing([status]) as (port, _):
        with pytest.raises(astral.HandshakeError) as info:
            await astral.run_worker(f"ws://127.0.0.1:{port}/", backoff=FAST)
        assert info.value.status == status


async def test_an_error_in_on_connect_ends_the_worker() -> None:
    async def broken(peer: astral.Peer) -> None:
        raise LookupError("bug")

    async with running_principal() as principal:
        with pytest.raises(LookupError, match="bug"):
            await astral.run_worker(principal.url, token=token, on_connect=broken, backoff=FAST)


async def test_bad_options_fail_at_once() -> None:
    with pytest.raises(ValueError, match="grace"):
        await astral.run_worker("ws://127.0.0.1:1/", grace=-1)
    with pytest.raises(ValueError, match="positive"):
        await astral.run_worker("ws://127.0.0.1:1/", timeout=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cancellation_stops_it_at_once_during_a_wait() -> None:
    long_wait = astral.Backoff(initial=1000, maximum=1000)
    url = f"ws://127.0.0.1:{free_port()}/astral"  # nobody listens
    async with watching("connecting again") as waiting:
        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: astral.run_worker(url, token=token, backoff=long_wait))
                await waiting.seen.wait()
                tg.cancel_scope.cancel()


async def test_cancellation_stops_it_at_once_during_a_connection() -> None:
    async with running_principal() as principal:
        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: astral.run_worker(principal.url, token=token))
                peer = await principal.registry.wait_for("worker-1")
                tg.cancel_scope.cancel()
        closed = await peer.wait_closed()
        assert closed.code == 1001


async def test_a_leaving_worker_drains_when_given_grace() -> None:
    finished = anyio.Event()
    started = anyio.Event()
    release = anyio.Event()

    async def job(_: Any) -> str:
        started.set()
        await release.wait()
        finished.set()
        return "done"

    async def ping(_: Any) -> str:
        return "pong"

    leave = anyio.CancelScope()

    async def worker() -> None:
        with leave:
            await astral.run_worker(
                principal.url, token=token, capabilities={"job": job, "ping": ping}, grace=10
            )

    async with running_principal() as principal:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            peer = await principal.registry.wait_for("worker-1")
            results: list[str] = []

            async def call() -> None:
                results.append(await peer.call("job", timeout=None))

            async with anyio.create_task_group() as calls:
                calls.start_soon(call)
                await started.wait()
                leave.cancel()  # the worker leaves while job runs
                # Until the drain begins the call is served; then it is refused.
                assert await until_refused(peer, "ping") == "shutting down"
                release.set()
        assert results == ["done"]
        closed = await peer.wait_closed()
        assert closed.code == 1001


@pytest.mark.time_limit(15)
async def test_after_a_token_expiry_it_connects_again_at_once() -> None:
    # The token lives 1 to 2 s (iat is rounded down); the backoff would take 1000 s.
    strict = astral.JWTVerifier(SECRET, algorithms=["HS256"], leeway=0)
    slow = astral.Backoff(initial=1000, maximum=1000, reset_after=1000)
    async with running_principal(strict) as principal, anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: astral.run_worker(
                principal.url, token=lambda: token(expires_in=2), backoff=slow
            )
        )
        first = await principal.registry.wait_for("worker-1")
        closed = await first.wait_closed()
        assert closed.code == 4401
        second = await principal.registry.wait_for("worker-1")
        assert second is not first
        tg.cancel_scope.cancel()


# --- a principal in another process: killed, restarted, frozen ----------------------

SCRIPT = Path(__file__).with_name("principal_process.py")


@asynccontextmanager
async def principal_process(
    port: int, backend: str
) -> AsyncIterator[tuple[anyio.abc.Process, int]]:
    """A principal in its own process on ``port`` (0: a free one), with the port it bound."""
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)}
    process = await anyio.open_process(
        [sys.executable, str(SCRIPT), str(port), backend], env=env, stderr=None
    )
    try:
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive(1)
        word, bound = line.split()
        assert word == b"ready"
        assert port in (0, int(bound))
        yield process, int(bound)
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
        await process.aclose()


class Calls:
    """A worker's on_connect that keeps calling echo, counting per connection."""

    def __init__(self) -> None:
        self.ok = 0
        self.connections = 0
        self.closes: list[astral.ConnectionClosed] = []
        self.progress = anyio.Event()

    async def __call__(self, peer: astral.Peer) -> None:
        self.connections += 1
        try:
            while True:
                assert await peer.call("echo", self.ok, timeout=None) == self.ok
                self.ok += 1
                self.progress.set()
        except astral.ConnectionClosed as exc:
            self.closes.append(exc)
            raise

    async def wait_for(self, calls: int) -> None:
        while self.ok < calls:
            self.progress = anyio.Event()
            await self.progress.wait()


@pytest.mark.time_limit(40)
async def test_a_worker_survives_a_killed_and_restarted_principal(anyio_backend: str) -> None:
    calls = Calls()
    async with anyio.create_task_group() as tg:
        async with principal_process(0, anyio_backend) as (first, port):
            url = f"ws://127.0.0.1:{port}/astral"
            tg.start_soon(
                lambda: astral.run_worker(url, token=token, on_connect=calls, backoff=FAST)
            )
            await calls.wait_for(5)
            first.send_signal(signal.SIGKILL)
            await first.wait()
        # While it is down, the worker keeps trying; then it is back on the same port.
        async with principal_process(port, anyio_backend):
            await calls.wait_for(calls.ok + 5)
            assert calls.connections == 2
            assert calls.closes[0].code == 1006  # TCP died without a close frame
        tg.cancel_scope.cancel()


@pytest.mark.time_limit(40)
async def test_keepalive_detects_a_principal_that_stops_answering(anyio_backend: str) -> None:
    calls = Calls()
    async with (
        anyio.create_task_group() as tg,
        principal_process(0, anyio_backend) as (process, port),
    ):
        url = f"ws://127.0.0.1:{port}/astral"
        async with watching("cannot connect") as retrying:
            tg.start_soon(
                lambda: astral.run_worker(
                    url,
                    token=token,
                    on_connect=calls,
                    backoff=FAST,
                    ping_interval=0.2,
                    ping_timeout=0.5,
                    open_timeout=0.5,
                )
            )
            await calls.wait_for(5)
            process.send_signal(signal.SIGSTOP)
            try:
                await retrying.seen.wait()  # the ping went unanswered, then connecting timed out
            finally:
                process.send_signal(signal.SIGCONT)
        assert calls.closes[0].code == 1011
        assert "keepalive" in calls.closes[0].reason
        await calls.wait_for(calls.ok + 5)
        assert calls.connections >= 2
        tg.cancel_scope.cancel()


async def test_the_demo_shows_a_worker_surviving_a_principal_restart() -> None:
    tls = make_tls()
    lines: list[str] = []
    await _restart_scene(
        lambda *a, **_: lines.append(" ".join(map(str, a))), SECRET, tls.server, tls.client
    )
    assert [line for line in lines if "connection" in line and "hello" in line] == [
        "  worker-2: connection 1: 'hello worker-2'",
        "  worker-2: connection 2: 'hello worker-2'",
    ]
