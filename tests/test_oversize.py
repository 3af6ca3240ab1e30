"""Too big fails one call: each side learns the other's limit at the upgrade.

``Astral-Max-Message-Size`` travels in the upgrade request and the 101
response; a frame larger than the remote's limit is never sent: the caller
gets ProtocolError at once, a callee sends ``"result larger than N bytes"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import astral
from astral._frames import Result, Yield, decode
from astral._handshake import DEFAULT_MAX_MESSAGE_SIZE, RemoteLimits
from astral._protocol import PeerState
from astral._websocket import WebSocketConnection, open_websocket, serve_websocket
from astral.testing import memory_transport_pair
from tests.helpers import running_principal, token

# --- the sans-IO rule ------------------------------------------------------------------


def state(limit: int | None) -> PeerState[object, object]:
    return PeerState({}, object, max_inbound_calls=10, max_send_size=limit)


def test_a_call_larger_than_the_remote_accepts_is_refused_and_not_registered() -> None:
    peer = state(100)
    with pytest.raises(astral.ProtocolError, match="larger than the 100 bytes"):
        peer.start_call("echo", "x" * 100, object())
    assert peer.outbound == {}
    call_id, text = peer.start_call("echo", "x" * 40, object())
    assert len(text.encode()) <= 100
    assert call_id in peer.outbound


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    peer = state(100)
    # 30 characters, 90 bytes of UTF-8 in the value alone.
    with pytest.raises(astral.ProtocolError):
        peer.start_call("echo", "日" * 30, object())
    peer.start_call("echo", "a" * 30, object())


@pytest.mark.parametrize("frame", [Result("7", "x" * 200), Yield("7", "x" * 200)])
def test_an_answer_too_big_becomes_an_error_result_that_ends_the_call(
    frame: Result | Yield,
) -> None:
    text, ended = state(100).reply(frame)
    assert ended
    assert decode(text) == Result("7", error="result larger than 100 bytes")


def test_without_a_limit_nothing_is_checked() -> None:
    text, ended = state(None).reply(Result("7", "x" * 10_000))
    assert ended
    assert decode(text) == Result("7", "x" * 10_000)


@pytest.mark.parametrize(
    ("headers", "size"),
    [
        ([], DEFAULT_MAX_MESSAGE_SIZE),
        ([("astral-max-message-size", "1000")], 1000),
        ([("Astral-Max-Message-Size", " 2048 ")], 2048),
        ([("astral-max-message-size", "0")], DEFAULT_MAX_MESSAGE_SIZE),
        ([("astral-max-message-size", "-5")], DEFAULT_MAX_MESSAGE_SIZE),
        ([("astral-max-message-size", "1e6")], DEFAULT_MAX_MESSAGE_SIZE),
        ([("astral-max-message-size", "١٢٣")], DEFAULT_MAX_MESSAGE_SIZE),  # not ASCII digits
        ([("astral-max-message-size", "9" * 40)], DEFAULT_MAX_MESSAGE_SIZE),
        ([("astral-max-message-size", "10"), ("astral-max-message-size", "20")], 2**20),
    ],
)
def test_the_header_is_read_strictly(headers: list[tuple[str, str]], size: int) -> None:
    assert RemoteLimits.from_headers(headers).max_message_size == size


async def test_a_peer_refuses_a_limit_below_one() -> None:
    a, b = memory_transport_pair()
    async with a, b:
        with pytest.raises(ValueError, match="remote_max_message_size"):
            astral.Peer(a, remote_max_message_size=0)


# --- over real sockets ------------------------------------------------------------------


async def big(n: int) -> str:
    return "x" * n


async def stream_then_big(n: int) -> Any:
    yield "small"
    yield "x" * n


async def test_each_side_advertises_its_limit_in_the_upgrade() -> None:
    async with running_principal(max_message_size=1000) as principal:
        headers = [("astral-max-message-size", "777")]
        async with open_websocket(principal.url, headers=[*headers, auth()]) as ws:
            assert ("astral-max-message-size", "1000") in ws.response_headers
        seen: list[str | None] = []

        async def record(peer: astral.Peer) -> None:
            seen.append(str(peer._state._max_send))

        async with running_principal(on_connect=record) as other:
            async with astral.connect(other.url, token=token(), max_message_size=4321):
                await other.registry.wait_for("worker-1")
        assert seen == ["4321"]


async def test_connect_refuses_to_send_astrals_own_header_twice() -> None:
    with pytest.raises(ValueError, match="set by astral"):
        async with astral.connect("ws://127.0.0.1:1/", headers=[("ASTRAL-MAX-MESSAGE-SIZE", "5")]):
            pass


def auth() -> tuple[str, str]:
    return ("Authorization", f"Bearer {token()}")


async def test_a_call_too_big_for_the_principal_fails_alone() -> None:
    async with running_principal(max_message_size=1000) as principal:
        async with astral.connect(principal.url, token=token()) as worker:
            with pytest.raises(astral.ProtocolError) as info:
                await worker.call("echo", "x" * 1000)
            assert str(info.value) == (
                "call echo: the call is larger than the 1000 bytes "
                "the remote accepts in one message"
            )
            # It names the frame it refused to send: the worker's first call.
            assert (info.value.frame_id, info.value.frame_type) == ("1", "call")
            assert await worker.call("echo", "still open") == "still open"
            assert not worker.closed


async def test_an_answer_too_big_for_the_worker_fails_that_call_alone() -> None:
    caps = {"big": big, "stream_then_big": stream_then_big}
    async with running_principal(capabilities=caps) as principal:
        async with astral.connect(principal.url, token=token(), max_message_size=2000) as worker:
            with pytest.raises(astral.RemoteError, match=r"^result larger than 2000 bytes$"):
                await worker.call("big", 5000)
            items: list[Any] = []
            with pytest.raises(astral.RemoteError, match="result larger than 2000 bytes"):
                async with worker.stream("stream_then_big", 5000) as stream:
                    async for item in stream:
                        items.append(item)  # noqa: PERF401 - kept up to the error
            assert items == ["small"]
            assert await worker.call("big", 10) == "x" * 10
            assert not worker.closed


async def test_a_worker_answer_too_big_for_the_principal_fails_alone() -> None:
    async with running_principal(max_message_size=1000) as principal:
        async with astral.connect(principal.url, token=token(), capabilities={"big": big}):
            server_side = await principal.registry.wait_for("worker-1")
            with pytest.raises(astral.RemoteError, match="result larger than 1000 bytes"):
                await server_side.call("big", 3000)
            assert await server_side.call("big", 3) == "xxx"


async def test_a_remote_that_says_nothing_is_assumed_to_take_one_mebibyte() -> None:
    # An astral WebSocket server without astral's header, as the original is.
    async def handler(ws: WebSocketConnection) -> None:
        async with astral.Peer(ws, capabilities={"echo": big}) as peer:
            await peer.wait_closed()

    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_websocket(
                handler, "127.0.0.1", 0, max_message_size=2**22, task_status=task_status
            )
        )
        async with astral.connect(f"ws://127.0.0.1:{port}/", max_message_size=2**22) as worker:
            with pytest.raises(astral.ProtocolError, match=f"{DEFAULT_MAX_MESSAGE_SIZE} bytes"):
                await worker.call("echo", "x" * DEFAULT_MAX_MESSAGE_SIZE)
            assert await worker.call("echo", 5) == "xxxxx"
        tg.cancel_scope.cancel()


async def test_a_message_that_really_arrives_too_big_still_closes_with_1009() -> None:
    async with running_principal(max_message_size=1000) as principal:
        async with astral.connect(principal.url, token=token()) as worker:
            # A peer that does not check (as the original does not) sends it anyway.
            worker._state._max_send = None
            with pytest.raises(astral.ConnectionClosed) as info:
                await worker.call("echo", "x" * 2000)
            assert info.value.code == 1009


async def test_an_answer_too_big_fails_alone_with_middleware_too() -> None:
    # The middleware path encodes answers itself: the same size rule holds there.
    outcomes: list[tuple[str, str | None]] = []

    @contextlib.asynccontextmanager
    async def observe(call: astral.CallInfo) -> AsyncIterator[None]:
        yield
        if call.direction == "inbound":
            outcomes.append((call.capability, call.outcome))

    caps = {"big": big, "stream_then_big": stream_then_big}
    async with running_principal(capabilities=caps, middleware=[observe]) as principal:
        async with astral.connect(principal.url, token=token(), max_message_size=2000) as worker:
            with pytest.raises(astral.RemoteError, match=r"^result larger than 2000 bytes$"):
                await worker.call("big", 5000)
            items: list[Any] = []
            with pytest.raises(astral.RemoteError, match=r"^result larger than 2000 bytes$"):
                async with worker.stream("stream_then_big", 5000) as stream:
                    async for item in stream:
                        items.append(item)  # noqa: PERF401 - kept up to the error
            assert items == ["small"]
            assert await worker.call("big", 10) == "x" * 10
            assert not worker.closed
    assert outcomes == [("big", "error"), ("stream_then_big", "error"), ("big", "result")]
