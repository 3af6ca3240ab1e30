"""Operators' log lines: connections opened and closed, rate-limited warnings."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

import astral
import astral._logs
import astral.testing
from astral._logs import BURST, RateLimitedLogger

from .helpers import running_principal, token


class Lines(logging.Handler):
    """Collects astral.* records; tests wait for the line they expect."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    def matching(self, name: str, needle: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.name == name and needle in r.getMessage()]

    async def wait_for(self, name: str, needle: str) -> logging.LogRecord:
        while not (found := self.matching(name, needle)):
            self._changed = anyio.Event()
            await self._changed.wait()
        return found[0]


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger("astral")
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


async def test_connections_accepted_and_closed_are_logged_on_both_sides(lines: Lines) -> None:
    secret_token = token("worker-1")
    async with running_principal() as principal:
        async with astral.connect(principal.url, token=secret_token, token_in_query=True) as w:
            assert await w.call("echo", 1) == 1
        closed = await lines.wait_for("astral.connection", "closed")
        accepted = lines.matching("astral.connection", "accepted connection from 127.0.0.1:")
        server_closed = await lines.wait_for("astral.connection", "(subject 'worker-1') closed")
    [accepted_line] = accepted
    assert accepted_line.levelno == logging.INFO
    assert "subject 'worker-1'" in accepted_line.getMessage()
    [connected] = lines.matching("astral.connection", "connected to ")
    assert f"ws://127.0.0.1:{principal.port}/astral" in connected.getMessage()
    assert connected.levelno == closed.levelno == server_closed.levelno == logging.INFO
    # The worker closed normally (1000), and each side says how long it lasted.
    for line in (closed, server_closed):
        assert "code 1000" in line.getMessage()
        assert " s" in line.getMessage().rsplit("after", 1)[1]
    assert server_closed.astral_close_code == 1000  # type: ignore[attr-defined]
    # The token travelled in the query string: it never reaches a log line.
    assert not [r for r in lines.records if secret_token in r.getMessage()]
    assert not [r for r in lines.records if "token=" in r.getMessage()]


async def test_a_1009_close_is_logged_with_its_code(lines: Lines) -> None:
    async with running_principal(max_message_size=1000) as principal:
        async with astral.connect(principal.url, token=token("big")) as worker:
            # A peer that does not check sizes (as the original does not) sends it anyway.
            worker._state._max_send = None
            with pytest.raises(astral.ConnectionClosed):
                await worker.call("echo", "x" * 5000)
        line = await lines.wait_for("astral.connection", "(subject 'big') closed")
    assert "code 1009" in line.getMessage()
    assert line.levelno == logging.INFO


async def test_server_shutdown_is_logged_as_1001(lines: Lines) -> None:
    async with running_principal() as principal:
        async with astral.connect(principal.url, token=token("leaving")) as worker:
            await principal.registry.wait_for("leaving")
            principal.stop()
            await worker.wait_closed()
            line = await lines.wait_for("astral.connection", "(subject 'leaving') closed")
    assert "code 1001" in line.getMessage()


async def test_refusals_are_logged_as_before_and_open_nothing(lines: Lines) -> None:
    async with running_principal() as principal:
        with pytest.raises(astral.Unauthorized):
            async with astral.connect(principal.url, token="not-a-token"):
                pass  # pragma: no cover
        refused = await lines.wait_for("astral.server", "refused connection from")
    assert refused.levelno == logging.INFO
    assert not lines.matching("astral.connection", "")


# -- the rate limit ----------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    now = [1000.0]
    monkeypatch.setattr(astral._logs.time, "monotonic", lambda: now[0])

    def advance(seconds: float) -> None:
        now[0] += seconds

    return advance


def test_a_burst_then_one_line_per_refill_then_a_count_of_what_was_suppressed(
    clock: Callable[[float], None], caplog: pytest.LogCaptureFixture
) -> None:
    limited = RateLimitedLogger(logging.getLogger("astral.test"), burst=3, refill_seconds=10)
    caplog.set_level(logging.WARNING, logger="astral.test")
    for i in range(10):
        limited.warning("bad frame %d", i)
    assert [r.getMessage() for r in caplog.records] == [
        "bad frame 0",
        "bad frame 1",
        "bad frame 2",
    ]
    clock(9.9)
    limited.warning("still too soon")
    assert len(caplog.records) == 3
    clock(0.1)
    limited.warning("bad frame %d", 99)
    assert caplog.records[-1].getMessage() == "bad frame 99 (8 similar lines suppressed)"
    clock(1000)  # the bucket refills up to its burst, no more
    for i in range(5):
        limited.warning("later %d", i)
    assert len(caplog.records) == 4 + 3


def test_nothing_is_counted_when_warnings_are_off(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLogger(logging.getLogger("astral.test.off"))
    caplog.set_level(logging.ERROR, logger="astral.test.off")
    for _ in range(100):
        limited.warning("x")
    assert limited.suppressed == 0


async def test_a_hostile_peer_cannot_flood_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = astral.testing.memory_transport_pair(buffer=2000)
    caplog.set_level(logging.WARNING, logger="astral.protocol")
    async with theirs, astral.Peer(ours, capabilities={"echo": _echo}) as _:
        for i in range(500):
            await theirs.send(f"junk {i}")
        await theirs.send('{"type":"call","id":"last","capability":"echo","input":1}')
        assert await theirs.receive() == '{"type":"result","id":"last","output":1}'
    warnings = [r for r in caplog.records if r.name == "astral.protocol"]
    assert 1 <= len(warnings) <= BURST + 1


async def _echo(value: Any) -> Any:
    return value


async def test_capability_records_carry_the_documented_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure on purpose is DEBUG, anything else ERROR with its traceback; both carry
    ``astral_capability``, ``astral_call_id`` and ``astral_remote`` (docs/logging.md)."""

    async def fail(_: Any) -> None:
        raise astral.Failure("no", code="nope")

    async def boom(_: Any) -> None:
        raise KeyError("k")

    caplog.set_level(logging.DEBUG, logger="astral.capability")
    mine, theirs = astral.testing.memory_transport_pair()
    async with mine, theirs, astral.Peer(theirs, capabilities={"fail": fail, "boom": boom}):
        await mine.send('{"type":"call","id":"c1","capability":"fail"}')
        await mine.receive()
        await mine.send('{"type":"call","id":"c2","capability":"boom"}')
        await mine.receive()
    records = [r for r in caplog.records if r.name == "astral.capability"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (
            logging.DEBUG,
            "capability 'fail' failed on purpose (call 'c1' from the remote peer): code 'nope'",
        ),
        (logging.ERROR, "capability 'boom' raised KeyError (call 'c2' from the remote peer)"),
    ]
    fields = [
        (r.astral_capability, r.astral_call_id, r.astral_remote)  # type: ignore[attr-defined]
        for r in records
    ]
    assert fields == [("fail", "c1", "the remote peer"), ("boom", "c2", "the remote peer")]
    assert records[1].exc_info is not None
    assert isinstance(records[1].exc_info[1], KeyError)
