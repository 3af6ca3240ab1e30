"""Helpers shared by the network tests: TLS from trustme, a running principal."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import trustme

import astral

SECRET = b"s" * 32


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token signed with HMAC-SHA256 over ``key`` whatever ``header`` says."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


@dataclass
class TLS:
    server: ssl.SSLContext
    client: ssl.SSLContext
    untrusting_client: ssl.SSLContext


def make_tls() -> TLS:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    untrusting = ssl.create_default_context()
    trustme.CA().configure_trust(untrusting)
    return TLS(server, client, untrusting)


@dataclass
class Principal:
    port: int
    registry: astral.PeerRegistry
    scheme: str = "ws"
    connected: list[astral.Peer] = field(default_factory=list)
    sleepy_started: anyio.Event = field(default_factory=anyio.Event)
    finally_ran: anyio.Event = field(default_factory=anyio.Event)
    stop: Callable[[], None] = lambda: None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/astral"


async def echo(value: Any) -> Any:
    return value


async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def whoami(_: Any) -> Any:
    return astral.current_peer().claims.get("sub")


@asynccontextmanager
async def running_principal(
    verifier: Any = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    capabilities: dict[str, Any] | None = None,
    on_connect: Callable[[astral.Peer], Any] | None = None,
    **options: Any,
) -> AsyncIterator[Principal]:
    """A principal listening on 127.0.0.1 in a task group, cancelled on exit."""
    registry = astral.PeerRegistry()
    principal = Principal(0, registry, "wss" if ssl_context else "ws")

    async def sleepy(_: Any) -> None:
        principal.sleepy_started.set()
        try:
            await anyio.sleep_forever()
        finally:
            principal.finally_ran.set()

    async def record(peer: astral.Peer) -> None:
        principal.connected.append(peer)
        if on_connect is not None:
            await on_connect(peer)

    caps = {"echo": echo, "count": count, "whoami": whoami, "sleepy": sleepy}
    caps.update(capabilities or {})

    async def run(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        # Its own scope, so stop() shuts the server down and nothing else.
        with anyio.CancelScope() as scope:
            principal.stop = scope.cancel
            await astral.serve(
                verifier=verifier or astral.JWTVerifier(SECRET, algorithms=["HS256"]),
                capabilities=caps,
                registry=registry,
                ssl=ssl_context,
                on_connect=record,
                path="/astral",
                task_status=task_status,
                **options,
            )

    async with anyio.create_task_group() as tg:
        principal.port = await tg.start(run)
        yield principal
        tg.cancel_scope.cancel()


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds, for state the remote changes without an event.

    Used where a server-side task updates bookkeeping (the registry, a call
    table) after the last event a test can wait on. It polls a condition, not
    a duration: a slow machine only makes it take longer, and the test's
    ``fail_after`` bounds it.
    """
    while not predicate():
        await anyio.sleep(0.005)  # the polling step, not a guessed duration


def token(subject: str = "worker-1", **kwargs: Any) -> str:
    return astral.mint_token(SECRET, subject=subject, **kwargs)


def plain_id(value: object) -> str:
    """A test id for ``value`` with no backslash in it.

    pytest escapes non-ASCII and control characters in ids with backslashes,
    and such an id is not found when selected again in a second pytest
    session in the same process (which is how mutmut runs the tests), so
    escapes are written ``~`` instead.
    """
    return ascii(value)[:60].replace("\\", "~")


#: A deadline crosses the wire as whole milliseconds, rounded up (so a callee
#: never stops before its caller): what a callee sees left may exceed the
#: caller's own figure by up to this much.
BUDGET_ROUNDING = 0.001
