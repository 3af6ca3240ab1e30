"""Hypothesis against a live principal: WebSocket frames and RPC frames, valid or not.

Each example opens an authenticated connection with a raw client, sends what
Hypothesis made (well-formed frames carrying valid, truncated or mutated RPC
frames, and frames that break RFC 6455), then a ping and the end of its stream: the pong
proves the server has dealt with everything before it (or the server closed
the connection, as it does for a protocol violation or that end of stream). Throughout, the server's
buffers stay within their bounds and a healthy client, connected all along,
is served.
"""

from __future__ import annotations

import json
import logging
import struct
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import astral
from astral._ws_connection import MESSAGE_OVERHEAD, WRITE_HIGH_WATER, WebSocketConnection

from .helpers import running_principal, token
from .test_hardening import Client, frame, open_raw

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

MAX_MESSAGE = 4096

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ids = st.text(max_size=12) | st.integers(-5, 5) | st.none()


@st.composite
def rpc_frames(draw: st.DrawFn) -> bytes:
    """One RPC frame: valid, or truncated, or with bytes flipped."""
    kind = draw(st.sampled_from(["call", "yield", "result", "cancel", "credit", "other"]))
    body: dict[str, Any] = {"type": kind, "id": draw(ids)}
    if kind == "call":
        body["capability"] = draw(st.sampled_from(["echo", "count", "unknown", "__class__", ""]))
        body["input"] = (
            draw(st.integers(0, 40)) if body["capability"] == "count" else draw(json_values)
        )
        if draw(st.booleans()):
            body["window"] = draw(st.integers(-2, 100))
    elif kind in ("yield", "result"):
        body["output"] = draw(json_values)
        if draw(st.booleans()):
            body["error"] = draw(st.text(max_size=10) | st.none())
    elif kind == "credit":
        body["n"] = draw(st.integers(-3, 2**40))
    text = json.dumps(body).encode()
    how = draw(st.sampled_from(["valid", "truncated", "mutated"]))
    if how == "truncated":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif how == "mutated":
        flips = draw(
            st.lists(st.tuples(st.integers(0, len(text) - 1), st.integers(0, 255)), max_size=4)
        )
        data = bytearray(text)
        for at, value in flips:
            data[at] = value
        text = bytes(data)
    return text


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """One WebSocket frame, possibly breaking the protocol."""
    opcode = draw(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB]))
    payload = draw(rpc_frames() | st.binary(max_size=300))
    fin = draw(st.booleans())
    data = frame(opcode, payload, fin=fin)
    mutation = draw(st.sampled_from(["none", "none", "rsv", "unmasked", "truncated", "flip"]))
    if mutation == "rsv":
        data = bytes([data[0] | 0x40]) + data[1:]
    elif mutation == "unmasked":
        data = bytes([data[0], data[1] & 0x7F]) + data[2:]
    elif mutation == "truncated":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    return data


@st.composite
def sessions(draw: st.DrawFn) -> list[bytes]:
    """What one client sends: mostly well-formed text frames carrying RPC frames."""
    well_formed = st.builds(lambda text: frame(0x1, text), rpc_frames())
    return draw(st.lists(well_formed | raw_frames(), min_size=1, max_size=8))


@pytest.fixture
async def live() -> AsyncIterator[tuple[Any, astral.Peer]]:
    async with (
        running_principal(max_message_size=MAX_MESSAGE, close_timeout=1) as principal,
        astral.connect(principal.url, token=token("healthy")) as healthy,
    ):
        yield principal, healthy


def check_bounded(principal: Any) -> None:
    """Every open server-side connection holds no more than its bounds allow."""
    for peer in principal.connected:
        transport = peer._transport
        assert isinstance(transport, WebSocketConnection)
        assert len(transport._partial) <= MAX_MESSAGE
        assert transport._queued <= max(MAX_MESSAGE, 65536) + MAX_MESSAGE + MESSAGE_OVERHEAD
        assert len(transport._out) <= WRITE_HIGH_WATER + 2 * MAX_MESSAGE
        assert len(peer._state.inbound) <= 1000


@pytest.mark.time_limit(120)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(session=sessions())
async def test_fuzzed_frames_never_hurt_the_server(
    live: tuple[Any, astral.Peer], session: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    principal, healthy = live
    with anyio.fail_after(10):
        stream = await open_raw(principal.port)
        async with stream:
            try:
                await stream.send(b"".join(session))
                # A pong for this ping proves everything before it was dealt
                # with; if a truncated frame swallows the ping, our end of
                # stream ends the connection instead.
                await stream.send(frame(0x9, struct.pack("!Q", 2**63)))
                await stream.send_eof()
            except (anyio.BrokenResourceError, OSError):
                pass  # the server dropped a protocol violation at once
            client = Client(stream)
            while await client.receive(until_pong=True) is not None:
                pass  # answers to the calls; then the pong, a close frame or EOF
        check_bounded(principal)
        assert await healthy.call("echo", "still here") == "still here"
        assert not healthy.closed
    # No connection's task failed (the server logs that as an error).
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
