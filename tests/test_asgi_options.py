"""Each option of astral.asgi.App reaches the peer it builds.

Like tests/test_server_options.py for serve: a mutation run showed the app
could drop ``timeout``, ``max_inbound_calls`` or ``max_buffered_items`` (or
skip checking them) without a test noticing. The app is driven in memory
here, with the ASGI messages a server would send, and the worker's side is
written frame by frame.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import astral
import astral.asgi

from .helpers import SECRET, token


@dataclass
class Connection:
    """The worker's end of one ASGI WebSocket, and the principal's registry."""

    to_app: MemoryObjectSendStream[dict[str, Any]]
    from_app: MemoryObjectReceiveStream[dict[str, Any]]
    registry: astral.PeerRegistry

    async def send_frame(self, frame: dict[str, Any]) -> None:
        await self.to_app.send({"type": "websocket.receive", "text": json.dumps(frame)})

    async def receive_frame(self) -> dict[str, Any]:
        message = await self.from_app.receive()
        assert message["type"] == "websocket.send", message
        frame: dict[str, Any] = json.loads(message["text"])
        return frame


@asynccontextmanager
async def connected(app_options: dict[str, Any], **capabilities: Any) -> AsyncIterator[Connection]:
    registry = astral.PeerRegistry()
    app = astral.asgi.App(
        verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]),
        capabilities=capabilities,
        registry=registry,
        **app_options,
    )
    to_app, app_in = anyio.create_memory_object_stream[dict[str, Any]](100)
    app_out, from_app = anyio.create_memory_object_stream[dict[str, Any]](100)
    scope = {
        "type": "websocket",
        "path": "/",
        "query_string": f"token={token()}".encode(),
        "headers": [],
        "client": ("127.0.0.1", 4321),
        "extensions": {"websocket.http.response": {}},
    }
    async with to_app, app_in, app_out, from_app, anyio.create_task_group() as tg:
        await to_app.send({"type": "websocket.connect"})
        tg.start_soon(app, scope, app_in.receive, app_out.send)
        assert (await from_app.receive())["type"] == "websocket.accept"
        yield Connection(to_app, from_app, registry)
        tg.cancel_scope.cancel()


@pytest.mark.time_limit(5)
async def test_timeout_is_the_principals_default_call_timeout() -> None:
    async with connected({"timeout": 0.2}) as conn:
        principal_side = await conn.registry.wait_for("worker-1")
        with pytest.raises(astral.CallTimeout):
            await principal_side.call("hang")  # the worker never answers


@pytest.mark.time_limit(5)
async def test_max_inbound_calls_refuses_one_more() -> None:
    started, release = anyio.Event(), anyio.Event()

    async def sleepy(_: Any) -> str:
        started.set()
        await release.wait()
        return "released"

    async with connected({"max_inbound_calls": 1}, sleepy=sleepy) as conn:
        await conn.send_frame({"type": "call", "id": "1", "capability": "sleepy", "input": None})
        await started.wait()
        await conn.send_frame({"type": "call", "id": "2", "capability": "sleepy", "input": None})
        frame = await conn.receive_frame()
        assert frame == {"type": "result", "id": "2", "error": "too many concurrent calls"}
        # Let the first call finish, so nothing is in flight when the app stops.
        release.set()
        frame = await conn.receive_frame()
        assert frame == {"type": "result", "id": "1", "output": "released"}


async def test_max_buffered_items_is_the_window_the_principal_announces() -> None:
    async with connected({"max_buffered_items": 4}) as conn:
        principal_side = await conn.registry.wait_for("worker-1")
        async with principal_side.stream("items", timeout=None):
            frame = await conn.receive_frame()
            assert (frame["type"], frame["capability"], frame["window"]) == ("call", "items", 4)


async def test_json_default_converts_what_a_capability_returns_and_the_principal_sends() -> None:
    class Stamp:
        def __init__(self, text: str) -> None:
            self.text = text

    async def when(_: Any) -> Any:
        return Stamp("2024-01-02")

    async with connected({"json_default": lambda value: value.text}, when=when) as conn:
        await conn.send_frame({"type": "call", "id": "1", "capability": "when", "input": None})
        assert await conn.receive_frame() == {"type": "result", "id": "1", "output": "2024-01-02"}
        principal_side = await conn.registry.wait_for("worker-1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: principal_side.call("echo", Stamp("sent"), timeout=None))
            frame = await conn.receive_frame()
            assert (frame["capability"], frame["input"]) == ("echo", "sent")
            tg.cancel_scope.cancel()


async def test_by_default_a_raised_exceptions_message_is_sent() -> None:
    async def boom(_: Any) -> None:
        raise KeyError("detail")

    async with connected({}, boom=boom) as conn:
        await conn.send_frame({"type": "call", "id": "1", "capability": "boom", "input": None})
        assert await conn.receive_frame() == {
            "type": "result",
            "id": "1",
            "error": "'detail'",
            "code": "internal",
        }


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"timeout": -1.0}, {"max_inbound_calls": 0}, {"max_buffered_items": 0}],
)
def test_bad_limits_are_refused_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        astral.asgi.App(verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]), **options)


def test_the_smallest_message_size_is_accepted_and_zero_refused() -> None:
    verifier = astral.JWTVerifier(SECRET, algorithms=["HS256"])
    astral.asgi.App(verifier=verifier, max_message_size=1)
    with pytest.raises(ValueError, match=r"^max_message_size must be positive$"):
        astral.asgi.App(verifier=verifier, max_message_size=0)


def app() -> astral.asgi.App:
    return astral.asgi.App(verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]))


async def messages_for(scope: dict[str, Any], *incoming: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the app on one scope to its end; return every message it sent."""
    sent: list[dict[str, Any]] = []
    pending = list(incoming)

    async def receive() -> dict[str, Any]:
        return pending.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app()(scope, receive, send)
    return sent


async def test_http_requests_get_a_plain_404() -> None:
    sent = await messages_for({"type": "http", "path": "/", "headers": []})
    assert sent == [
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        },
        {"type": "http.response.body", "body": b"not found\n"},
    ]


async def test_without_the_denial_extension_a_refusal_is_close_1008() -> None:
    scope = {"type": "websocket", "path": "/", "query_string": b"", "headers": []}
    sent = await messages_for(scope, {"type": "websocket.connect"})
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_a_principal_closing_the_peer_closes_the_websocket_with_1000() -> None:
    async with connected({}) as conn:
        principal_side = await conn.registry.wait_for("worker-1")
        await principal_side.aclose()
        message = await conn.from_app.receive()
        assert (message["type"], message["code"]) == ("websocket.close", 1000)


@pytest.mark.time_limit(5)
async def test_close_timeout_bounds_the_wait_for_a_server_that_never_takes_the_close() -> None:
    registry = astral.PeerRegistry()
    app = astral.asgi.App(
        verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]),
        registry=registry,
        close_timeout=0.3,
    )
    scope = {
        "type": "websocket",
        "path": "/",
        "query_string": f"token={token()}".encode(),
        "headers": [],
        "client": ("127.0.0.1", 4321),
    }
    to_app, app_in = anyio.create_memory_object_stream[dict[str, Any]](100)
    closing = anyio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.close":
            closing.set()
            await anyio.sleep_forever()  # a server stuck taking the close

    async with to_app, app_in, anyio.create_task_group() as tg:
        await to_app.send({"type": "websocket.connect"})
        tg.start_soon(app, scope, app_in.receive, send)
        principal_side = await registry.wait_for("worker-1")
        start = anyio.current_time()
        # Returns after close_timeout (not the 10 s default) with the close untaken.
        await principal_side.aclose()
        assert closing.is_set()
        assert anyio.current_time() - start >= 0.3 - 0.05
        assert principal_side.closed


def test_an_app_built_without_options_uses_the_documented_defaults() -> None:
    # docs/reference.md: close_timeout 10 s and grace 5 s, as serve. Observing
    # them from outside would take a test that waits 10 s; the app's own
    # fields are what its connections and its shutdown read.
    app = astral.asgi.App(verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]))
    assert app._close_timeout == 10.0
    assert app._grace == 5.0
