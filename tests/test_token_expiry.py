"""Token lifetime is the session's lifetime: a principal closes with 4401 once ``exp`` passes."""

from __future__ import annotations

import functools
import gc
import math
import time
from typing import Any

import anyio
import pytest

import astral
import astral.asgi
from astral._logs import ClosingLog
from astral._principal import Hosting, _expires_in, expiry_leeway
from astral.testing import memory_transport_pair
from tests.helpers import SECRET, running_principal, token
from tests.test_asgi import PATH, SERVERS, run

STRICT = astral.JWTVerifier(SECRET, algorithms=["HS256"], leeway=0)


async def test_in_flight_calls_fail_with_token_expired_on_both_sides() -> None:
    running = anyio.Event()

    async def hold(_: Any) -> None:
        running.set()
        await anyio.sleep_forever()

    async with running_principal(STRICT) as principal:
        # exp is one to two seconds away (iat is rounded down to the second): never
        # so close that the token expires before the handshake checks it.
        async with astral.connect(
            principal.url, token=token(expires_in=2), capabilities={"hold": hold}
        ) as worker:
            server_side = await principal.registry.wait_for("worker-1")
            failures: list[astral.ConnectionClosed] = []

            async def principal_calls() -> None:
                with pytest.raises(astral.ConnectionClosed) as info:
                    await server_side.call("hold", timeout=None)
                failures.append(info.value)

            async def worker_calls() -> None:
                with pytest.raises(astral.ConnectionClosed) as info:
                    await worker.call("sleepy", timeout=None)
                failures.append(info.value)

            async with anyio.create_task_group() as tg:
                tg.start_soon(principal_calls)
                tg.start_soon(worker_calls)
                await running.wait()
            assert sorted((f.code, f.reason) for f in failures) == [
                (4401, "token expired"),
                (4401, "token expired"),
            ]
            assert time.time() >= token_exp(server_side)
            closed = await worker.wait_closed()
            assert (closed.code, closed.reason) == (4401, "token expired")


def token_exp(peer: astral.Peer) -> float:
    return float(peer.claims["exp"])


def past_exp_verifier(token: str) -> dict[str, Any]:
    """A custom verifier (no leeway) that accepts a token whose exp has passed."""
    del token
    return {"sub": "worker-1", "exp": time.time() - 100}


async def test_an_expired_session_is_closed_at_once() -> None:
    async with running_principal(past_exp_verifier) as principal:
        async with astral.connect(principal.url, token="anything") as worker:
            closed = await worker.wait_closed()
            assert (closed.code, closed.reason) == (4401, "token expired")


async def test_expiry_can_be_switched_off() -> None:
    async def nap(_: Any) -> str:
        await anyio.sleep(0.2)  # a call in progress while exp lies in the past: what is tested
        return "still here"

    async with running_principal(
        past_exp_verifier, capabilities={"nap": nap}, close_on_token_expiry=False
    ) as principal:
        async with astral.connect(principal.url, token="anything") as worker:
            assert await worker.call("nap") == "still here"
            assert not worker.closed


def test_the_session_lasts_until_exp_plus_the_verifiers_leeway() -> None:
    now = time.time()
    assert expiry_leeway(astral.JWTVerifier(SECRET, algorithms=["HS256"]), True) == 30.0
    assert expiry_leeway(past_exp_verifier, True) == 0.0
    assert expiry_leeway(STRICT, False) is None
    remaining = _expires_in({"exp": now + 100}, 30.0)
    assert remaining is not None
    assert 129 < remaining <= 130
    assert _expires_in({"exp": now - 100}, 30.0) == 0.0
    for claims in ({}, {"exp": None}, {"exp": "soon"}, {"exp": True}, {"exp": float("nan")}):
        assert _expires_in(claims, 30.0) is None
    assert _expires_in({"exp": now}, None) is None


@pytest.mark.parametrize(("anyio_backend", "server"), [SERVERS[0], SERVERS[3]])
async def test_the_asgi_app_closes_expired_sessions_too(anyio_backend: str, server: str) -> None:
    app = astral.asgi.App(verifier=past_exp_verifier, path=PATH)
    async with (
        run(server, anyio_backend, app) as running,
        astral.connect(running.url + PATH, token="anything") as worker,
    ):
        closed = await worker.wait_closed()
        assert (closed.code, closed.reason) == (4401, "token expired")


LENIENT = astral.JWTVerifier(SECRET, algorithms=["HS256"], leeway=60)


async def test_a_session_within_the_verifiers_leeway_stays_open() -> None:
    # exp passed five seconds ago, the verifier allows 60: the session lasts
    # until exp + 60, so calls are answered and nothing closes it.
    async with (
        running_principal(LENIENT) as principal,
        astral.connect(principal.url, token=token(expires_in=-5)) as worker,
    ):
        for _ in range(3):
            assert await worker.call("echo", "still here") == "still here"
        assert not worker.closed


@pytest.mark.parametrize(("anyio_backend", "server"), [SERVERS[0], SERVERS[3]])
async def test_the_asgi_app_keeps_a_session_within_the_verifiers_leeway(
    anyio_backend: str, server: str
) -> None:
    async def echo(value: Any) -> Any:
        return value

    app = astral.asgi.App(verifier=LENIENT, path=PATH, capabilities={"echo": echo})
    async with (
        run(server, anyio_backend, app) as running,
        astral.connect(running.url + PATH, token=token(expires_in=-5)) as worker,
    ):
        for _ in range(3):
            assert await worker.call("echo", "still here") == "still here"
        assert not worker.closed


class HeldOnConnect:
    """An ``on_connect`` that never returns by itself, and says when it is cancelled."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cancelled = anyio.Event()

    async def __call__(self, _: astral.Peer) -> None:
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.cancelled.set()

    async def ends_with_expiry_at(self, url: str) -> None:
        """Connect with a token about to expire: the session closes 4401, on_connect ends."""
        with anyio.fail_after(10):
            # exp is one to two seconds away (iat is rounded down to the second).
            async with astral.connect(url, token=token(expires_in=2)) as worker:
                await self.started.wait()
                closed = await worker.wait_closed()
                assert (closed.code, closed.reason) == (4401, "token expired")
            # on_connect belongs to the session: it ends with it.
            await self.cancelled.wait()


async def test_an_expired_session_cancels_on_connect_too() -> None:
    on_connect = HeldOnConnect()
    async with running_principal(STRICT, on_connect=on_connect) as principal:
        await on_connect.ends_with_expiry_at(principal.url)


@pytest.mark.parametrize(("anyio_backend", "server"), [SERVERS[0], SERVERS[3]])
async def test_the_asgi_app_ends_on_connect_with_an_expired_session(
    anyio_backend: str, server: str
) -> None:
    on_connect = HeldOnConnect()
    app = astral.asgi.App(verifier=STRICT, path=PATH, on_connect=on_connect)
    async with run(server, anyio_backend, app) as running:
        await on_connect.ends_with_expiry_at(running.url + PATH)


async def test_a_sooner_expiry_is_not_kept_waiting_by_a_later_one() -> None:
    # The server acts on every expiry from one task that sleeps until the
    # soonest: a session that arrives already expired must wake it at once,
    # not wait for the expiry of the session that came first.
    expiries = iter([time.time() + 3600, time.time() - 100])

    def verifier(token: str) -> dict[str, Any]:
        return {"sub": token, "exp": next(expiries)}

    async with (
        running_principal(verifier) as principal,
        astral.connect(principal.url, token="long") as first,
        astral.connect(principal.url, token="expired") as second,
    ):
        closed = await second.wait_closed()
        assert (closed.code, closed.reason) == (4401, "token expired")
        assert not first.closed
        assert await principal.registry.wait_for("long") is not None


async def test_a_finished_session_leaves_nothing_behind_in_the_expiry_queue() -> None:
    # Each session's expiry is an alarm; a session that ends first cancels it,
    # and nothing the server keeps refers to its peer any more.
    hosting = Hosting(grace=0)
    ours, theirs = memory_transport_pair()
    async with ours, theirs:
        peer = astral.Peer(ours)
        hosting._add(peer, anyio.CancelScope(), ClosingLog("test", "worker"), 3600)
        alarm = hosting._entries[peer][2]
        assert alarm is not None
        assert alarm.when < math.inf
        hosting._remove(peer)
        assert alarm.when == math.inf
        assert hosting._entries == {}
        gc.collect()
        assert not [r for r in gc.get_referrers(peer) if isinstance(r, functools.partial)]
