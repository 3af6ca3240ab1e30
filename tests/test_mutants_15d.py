"""Principal-side behaviour that mutation testing found unpinned (``_principal``, ``_auth``).

Each test pins one behaviour a planted bug ("mutant") changed without any
test noticing; docs/testing.md and the issue-15 notes list the mutants.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import astral
import astral.asgi
from astral._principal import Hosting, host_worker
from astral._websocket import WebSocketConnection, serve_websocket
from astral.testing import connected_pair, memory_transport_pair

from .helpers import SECRET, running_principal, token
from .test_asgi import PATH, SERVERS, run

HOST = "127.0.0.1"


# --- the registry ----------------------------------------------------------------------


async def test_a_listed_peer_that_has_closed_is_not_looked_up() -> None:
    registry = astral.PeerRegistry()
    async with connected_pair() as (left, right):
        async with registry.hosting("x", left):
            assert await registry.lookup("x") is left
            await right.aclose()
            await left.wait_closed()
            # Still listed until its server gets to remove it, but gone.
            assert "x" in registry
            assert await registry.lookup("x") is None
            assert await registry.subjects() == []


# --- a connection that arrives while the server is stopping ---------------------------


async def test_a_connection_hosted_once_the_server_is_stopping_is_closed_with_1001() -> None:
    """A peer that starts after the server's drain began drains itself at once."""
    hosting = Hosting(grace=0)
    # The server's drain task, cancelled: the server is stopping (no peer yet).
    with anyio.CancelScope() as stopped:
        stopped.cancel()
        await hosting.drain_on_stop()
    registry = astral.PeerRegistry()
    hosted = anyio.Event()

    async def handler(websocket: WebSocketConnection) -> None:
        try:
            await host_worker(
                websocket,
                websocket.aclose,
                {"sub": "late"},
                capabilities={},
                registry=registry,
                on_connect=None,
                where="late worker",
                hosting=hosting,
                expiry_leeway=None,
            )
        finally:
            hosted.set()

    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_websocket(handler, HOST, 0, task_status=task_status)
        )
        # The worker never leaves by itself: the principal closes it.
        async with astral.connect(f"ws://{HOST}:{port}/", token="unchecked") as worker:
            closed = await worker.wait_closed()
            assert (closed.code, closed.reason) == (1001, "server shutting down")
        await hosted.wait()
        assert "late" not in registry
        tg.cancel_scope.cancel()


async def test_a_server_stopping_before_the_peer_started_closes_the_connection_with_1001() -> None:
    """Cancelled before its peer runs, a connection is closed with 1001, shielded."""
    principal_end, worker_end = memory_transport_pair()
    closes: list[tuple[int, str]] = []

    async def close(code: int, reason: str) -> None:
        await anyio.lowlevel.checkpoint()  # a real close sends a frame: it waits
        closes.append((code, reason))
        await principal_end.aclose()

    registry = astral.PeerRegistry()
    async with principal_end, worker_end:
        with anyio.CancelScope() as server:
            server.cancel()  # the server is stopping as the connection arrives
            await host_worker(
                principal_end,
                close,
                {"sub": "early"},
                capabilities={},
                registry=registry,
                on_connect=None,
                where="memory",
            )
        assert server.cancelled_caught
        assert closes == [(1001, "server shutting down")]
        assert "early" not in registry


# --- on_connect when the session never expires -----------------------------------------


def no_exp_verifier(token: str) -> dict[str, Any]:
    """A custom verifier whose claims carry no ``exp``: the session never expires."""
    return {"sub": token}


@pytest.mark.parametrize("never_expires", ["expiry off", "no exp claim"])
async def test_on_connect_runs_and_its_failure_closes_only_that_connection_without_expiry(
    never_expires: str, caplog: pytest.LogCaptureFixture
) -> None:
    ran = {"bad": anyio.Event(), "good": anyio.Event()}

    async def on_connect(peer: astral.Peer) -> None:
        assert peer.subject is not None
        ran[peer.subject].set()
        if peer.subject == "bad":
            raise RuntimeError("handler bug")

    if never_expires == "expiry off":
        options: dict[str, Any] = {"close_on_token_expiry": False}

        def token_of(subject: str) -> str:
            return token(subject)
    else:
        options = {"verifier": no_exp_verifier}

        def token_of(subject: str) -> str:
            return subject

    caplog.set_level(logging.ERROR, logger="astral")
    async with running_principal(on_connect=on_connect, **options) as principal:
        async with astral.connect(principal.url, token=token_of("bad")) as bad:
            error = await bad.wait_closed()
            assert (error.code, error.reason) == (1011, "internal error")
        # Logged once, with the worker's address and the traceback.
        [record] = [r for r in caplog.records if r.exc_info is not None]
        assert "on_connect failed for 127.0.0.1:" in record.getMessage()
        assert "handler bug" in caplog.text
        async with astral.connect(principal.url, token=token_of("good")) as good:
            assert await good.call("echo", 1) == 1
            await ran["good"].wait()  # set by on_connect, in the principal
            assert await good.call("echo", 2) == 2


# --- token expiry of a running session behind an ASGI server ---------------------------


@pytest.mark.parametrize(("anyio_backend", "server"), [SERVERS[0], SERVERS[3]])
async def test_the_asgi_app_closes_a_running_session_when_its_token_expires(
    anyio_backend: str, server: str
) -> None:
    async def hold(_: Any) -> None:
        await anyio.sleep_forever()

    app = astral.asgi.App(
        verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"], leeway=0),
        capabilities={"hold": hold},
        path=PATH,
    )
    minted_at = time.time()
    # exp is one to two seconds away (iat is rounded down to the second).
    expiring = token(expires_in=2, now=minted_at)
    async with (
        run(server, anyio_backend, app) as running,
        astral.connect(running.url + PATH, token=expiring) as worker,
    ):
        with pytest.raises(astral.ConnectionClosed) as info:
            await worker.call("hold", timeout=None)
        assert (info.value.code, info.value.reason) == (4401, "token expired")
        assert time.time() >= int(minted_at) + 2
        closed = await worker.wait_closed()
        assert (closed.code, closed.reason) == (4401, "token expired")


# --- the verifier's repr ----------------------------------------------------------------


def test_the_repr_of_a_verifier_without_audience_or_issuer() -> None:
    text = repr(astral.JWTVerifier(SECRET, algorithms=["HS256"]))
    assert text == "JWTVerifier(algorithms=['HS256'], issuer=None, audience=None, keys=1)"
