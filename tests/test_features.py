"""Feature negotiation: ``Astral-Features`` in the upgrade, ``peer.features`` what both named.

A remote that sends no header (the original TypeScript peer, or an astral
from before the header) gets exactly the original protocol, plus the two
extensions older than the header (cancel, credit), which it ignores.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

import astral
from astral._handshake import FEATURES, RemoteLimits, agreed, parse_features
from astral._websocket import open_websocket, serve_websocket
from astral.testing import connected_pair, memory_transport_pair
from tests.helpers import running_principal, token

ALL = frozenset({"cancel", "credit", "deadline", "input-stream"})

# --- the header, sans-IO ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "tokens"),
    [
        ([], None),
        ([("Other", "x")], None),
        ([("Astral-Features", "")], frozenset()),
        ([("astral-features", "cancel, credit, deadline, input-stream")], ALL),
        ([("ASTRAL-FEATURES", " Deadline ,,CANCEL ")], frozenset({"deadline", "cancel"})),
        # Repeated headers read as one list, as HTTP folds them.
        ([("Astral-Features", "cancel"), ("Astral-Features", "future-thing")],
         frozenset({"cancel", "future-thing"})),
        # Junk is skipped, not fatal: not tokens, too long, not ASCII.
        ([("Astral-Features", "a b, ;, déjà, " + "x" * 41 + ", credit")], frozenset({"credit"})),
    ],
)  # fmt: skip
def test_the_header_is_read_leniently(
    headers: list[tuple[str, str]], tokens: frozenset[str] | None
) -> None:
    assert parse_features(headers) == tokens
    assert RemoteLimits.from_headers(headers).features == tokens


def test_a_huge_header_is_read_only_so_far() -> None:
    tokens = parse_features([("Astral-Features", "x-1, " * 10_000 + "deadline")])
    assert tokens is not None
    assert "deadline" not in tokens
    assert len(tokens) == 1


def test_what_is_agreed_is_what_both_named() -> None:
    assert agreed(None) == frozenset()
    assert agreed([]) == frozenset()
    assert agreed(["deadline", "future-thing"]) == frozenset({"deadline"})
    assert agreed(FEATURES) == ALL


def test_equal_agreements_are_one_shared_set() -> None:
    # Each connection keeps its set for its life: equal ones are not copies.
    assert agreed(["deadline", "cancel"]) is agreed(frozenset({"cancel", "deadline", "x"}))
    assert agreed(FEATURES) is agreed(list(FEATURES))
    assert agreed(None) is agreed(["future-thing"])


# --- Peer ---------------------------------------------------------------------------------


async def test_a_peer_without_features_uses_the_original_protocol() -> None:
    a, b = memory_transport_pair()
    async with a, b, astral.Peer(a) as peer:
        assert peer.features == frozenset()
    async with connected_pair({}, {}) as (x, y):
        assert x.features == y.features == ALL
    async with connected_pair({}, {}, features=None) as (x, y):
        assert x.features == y.features == frozenset()
    async with connected_pair({}, {}, features=["deadline", "warp-drive"]) as (x, y):
        assert x.features == frozenset({"deadline"})


async def test_accept_takes_what_the_embedding_server_negotiated() -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    async with astral.accept(send=send, features=["cancel", "deadline"]) as peer:
        assert peer.features == frozenset({"cancel", "deadline"})
    async with astral.accept(send=send) as peer:
        assert peer.features == frozenset()


# --- over a real WebSocket ----------------------------------------------------------------


async def test_astral_peers_agree_on_every_feature_over_a_websocket() -> None:
    async with running_principal() as principal:
        async with astral.connect(principal.url, token=token()) as worker:
            server_side = await principal.registry.wait_for("worker-1")
            assert worker.features == ALL
            assert server_side.features == ALL
        async with open_websocket(
            principal.url, headers=[("Authorization", f"Bearer {token('w2')}")]
        ) as ws:
            assert ("astral-features", "cancel, credit, deadline, input-stream") in [
                (name.lower(), value) for name, value in ws.response_headers
            ]


async def test_connect_refuses_to_send_the_features_header_itself() -> None:
    with pytest.raises(ValueError, match="set by astral"):
        async with astral.connect("ws://127.0.0.1:1/", headers=[("astral-features", "x")]):
            pass


async def sleepy(_: Any) -> None:
    await anyio.sleep_forever()


async def test_an_original_like_worker_gets_the_original_protocol() -> None:
    """A hand-written worker that sends no header: no deadline field, cancel still sent."""
    results: list[BaseException] = []
    connected = anyio.Event()
    peers: list[astral.Peer] = []

    async def on_connect(peer: astral.Peer) -> None:
        peers.append(peer)
        connected.set()

    async with running_principal(on_connect=on_connect) as principal:
        url = f"{principal.url}?token={token('original')}"
        async with open_websocket(url) as ws, anyio.create_task_group() as tg:
            await connected.wait()
            peer = peers[0]
            assert peer.features == frozenset()

            async def call() -> None:
                with pytest.raises(astral.CallTimeout) as caught:
                    await peer.call("slow", {"n": 1}, deadline=0.2)
                results.append(caught.value)

            tg.start_soon(call)
            frame = json.loads(await ws.receive())
            # Exactly the original's call frame (and the window the original ignores).
            assert frame["type"] == "call"
            assert frame["capability"] == "slow"
            assert "deadline" not in frame
            # The caller's own deadline still applies, and the cancel frame
            # the original ignores is still sent, as before the header.
            assert json.loads(await ws.receive()) == {"type": "cancel", "id": frame["id"]}
            # The original answers late: ignored, the call is over.
            await ws.send(json.dumps({"type": "result", "id": frame["id"], "output": 1}))
            # The original calls the principal with a deadline field it
            # knows nothing of: a field astral reads whoever sends it.
            await ws.send(
                '{"type":"call","id":"x","capability":"sleepy","input":null,"deadline":50}'
            )
            answer = json.loads(await ws.receive())
            assert answer == {
                "type": "result",
                "id": "x",
                "error": "deadline exceeded",
                "code": "deadline_exceeded",
            }
    assert len(results) == 1
    assert str(results[0]) == "call slow missed its deadline"


async def test_an_original_like_principal_gets_the_original_protocol() -> None:
    """A hand-written principal that sends no header: the astral worker sends no deadline."""
    frames: list[dict[str, Any]] = []
    got_cancel = anyio.Event()

    async def original(ws: Any) -> None:
        while True:
            frame = json.loads(await ws.receive())
            frames.append(frame)
            if frame["type"] == "cancel":
                got_cancel.set()

    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_websocket, original, "127.0.0.1", 0)
        async with astral.connect(f"ws://127.0.0.1:{port}/", token=None) as worker:
            assert worker.features == frozenset()
            with pytest.raises(astral.CallTimeout):
                await worker.call("work", None, deadline=0.2)
            await got_cancel.wait()
        tg.cancel_scope.cancel()
    assert frames[0]["type"] == "call"
    assert "deadline" not in frames[0]
    assert frames[1] == {"type": "cancel", "id": frames[0]["id"]}


async def test_without_a_header_cancel_and_credit_still_work() -> None:
    """An astral from before the header sends none: the older extensions go on."""
    cancelled = anyio.Event()

    async def items(n: int) -> Any:
        for i in range(n):
            yield i

    async def forever(_: Any) -> Any:
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:  # closed where it waits at ``yield``: GeneratorExit, not Cancelled
            cancelled.set()

    async with connected_pair(
        {"items": items, "forever": forever}, {}, features=None, max_buffered_items=4
    ) as (_, b):
        assert b.features == frozenset()
        # 100 items through a window of 4: only credit lets the producer go on.
        async with b.stream("items", 100) as stream:
            assert [item async for item in stream] == list(range(100))
        # Leaving a stream early sends cancel, which stops the capability.
        async with b.stream("forever") as stream:
            async for item in stream:
                if item == 10:
                    break
        await cancelled.wait()


async def test_an_input_stream_to_an_original_like_principal_fails_at_once() -> None:
    received: list[str] = []

    async def original(ws: Any) -> None:
        while True:
            received.append(await ws.receive())

    async def numbers() -> Any:
        yield 1  # pragma: no cover - never iterated

    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_websocket, original, "127.0.0.1", 0)
        async with astral.connect(f"ws://127.0.0.1:{port}/", token=None) as worker:
            with pytest.raises(astral.ProtocolError, match="does not take input streams"):
                await worker.call("upload", None, input_stream=numbers())
            assert worker._state.outbound == {}
            # The connection is fine: a plain call is sent as ever.
            with pytest.raises(astral.CallTimeout):
                await worker.call("echo", 1, timeout=0.05)
        tg.cancel_scope.cancel()
    assert [json.loads(text)["capability"] for text in received if '"call"' in text] == ["echo"]
