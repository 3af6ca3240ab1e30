"""Values as a JavaScript peer writes them, through real connections on both backends.

A raw WebSocket client stands in for the original TypeScript peer: it sends the
exact text ``JSON.stringify`` writes (lone surrogates escaped, whole numbers
beyond 2**53 written out) and checks the exact text astral sends back. Where
Node.js 20+ is installed, a real JavaScript peer does the same
(``tests/js/round_trip.mjs``, no npm packages).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import astral
from astral._ws_client import open_websocket
from astral.testing import connected_pair

from .helpers import running_principal, token

LONE = "a\ud800b"  # a JS string cut inside an emoji


async def test_a_lone_surrogate_and_10_to_the_16_round_trip_both_ways() -> None:
    async def echo(value: Any) -> Any:
        return value

    async with (
        running_principal() as principal,
        astral.connect(principal.url, token=token(), capabilities={"echo": echo}) as worker,
    ):
        principal_side = await principal.registry.wait_for("worker-1")
        for value in (LONE, 10**16, -(10**16), {"\udfff": [LONE, 10**16]}):
            assert await worker.call("echo", value) == value
            assert await principal_side.call("echo", value) == value
        back = await worker.call("echo", 10**16)
        assert type(back) is int
        with pytest.raises(astral.ProtocolError, match=r"at input\[0\]"):
            await worker.call("echo", [2**53 + 1])


async def test_what_javascript_sends_comes_back_as_the_same_text() -> None:
    async with (
        running_principal() as principal,
        open_websocket(principal.url, headers=[("Authorization", f"Bearer {token('js')}")]) as js,
    ):
        # As JSON.stringify writes them: the text astral sends back must be identical.
        for sent, answer in (
            (
                '{"type":"call","id":"1","capability":"echo","input":"a\\ud800b"}',
                '{"type":"result","id":"1","output":"a\\ud800b"}',
            ),
            (
                '{"type":"call","id":"2","capability":"echo","input":10000000000000000}',
                '{"type":"result","id":"2","output":10000000000000000}',
            ),
            (
                '{"type":"call","id":"3","capability":"echo","input":{"\\udc00":[1152921504606847000]}}',
                '{"type":"result","id":"3","output":{"\\udc00":[1152921504606847000]}}',
            ),
            (
                '{"type":"call","id":"\\ud83d","capability":"nope"}',
                '{"type":"result","id":"\\ud83d","error":"unknown capability"}',
            ),
        ):
            await js.send(sent)
            assert await js.receive() == answer
        # A frame whose id can be read is answered at once, never dropped.
        await js.send('{"type":"call","id":"4","capability":"echo","input":NaN}')
        reply = json.loads(await js.receive())
        assert reply["id"] == "4"
        assert reply["error"].startswith("malformed call: NaN at input")
        # An integer within 64 bits that JavaScript would round is read, and
        # refused on the way back, naming where it was.
        await js.send('{"type":"call","id":"5","capability":"echo","input":[9007199254740993]}')
        reply = json.loads(await js.receive())
        assert reply["id"] == "5"
        assert "9007199254740993 at output[0]" in reply["error"]


async def test_a_result_javascript_could_never_send_fails_the_call_at_once() -> None:
    async with (
        running_principal() as principal,
        open_websocket(principal.url, headers=[("Authorization", f"Bearer {token('js')}")]) as js,
    ):
        principal_side = await principal.registry.wait_for("js")
        async with anyio.create_task_group() as tg:
            outcome: list[BaseException] = []

            async def call() -> None:
                try:
                    await principal_side.call("anything", timeout=None)
                except astral.ProtocolError as exc:
                    outcome.append(exc)

            tg.start_soon(call)
            call_frame = json.loads(await js.receive())
            await js.send('{"type":"result","id":"' + call_frame["id"] + '","output":[NaN]}')
        [error] = outcome
        assert isinstance(error, astral.ProtocolError)
        assert error.frame_id == call_frame["id"]
        assert "NaN at output[0]" in str(error)


async def test_json_default_on_serve_and_connect() -> None:
    async def now(_: Any) -> Any:
        return {"at": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)}

    def convert(value: Any) -> Any:
        if isinstance(value, datetime.datetime | uuid.UUID):
            return str(value)
        raise TypeError(type(value).__name__)

    request = uuid.UUID(int=42)
    async with (
        running_principal(capabilities={"now": now}, json_default=convert) as principal,
        astral.connect(principal.url, token=token(), json_default=convert) as worker,
        astral.connect(principal.url, token=token("strict")) as strict,
    ):
        assert await worker.call("now") == {"at": "2024-05-06 07:08:09+00:00"}
        assert await worker.call("echo", request) == str(request)
        # Without a hook, the worker refuses to send what would change type.
        with pytest.raises(astral.ProtocolError, match=r"cannot send uuid\.UUID at input"):
            await strict.call("echo", request)
        with pytest.raises(astral.ProtocolError, match=r"cannot send tuple at input\['t'\]"):
            await strict.call("echo", {"t": (1, 2)})


def _node_with_websocket() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    probe = subprocess.run(
        [
            node,
            "--experimental-websocket",
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ],
        capture_output=True,
        check=False,
    )
    return node if probe.returncode == 0 else None


NODE = _node_with_websocket()


@pytest.mark.skipif(NODE is None, reason="needs Node.js 20+ (a WebSocket client built in)")
@pytest.mark.time_limit(30)
async def test_a_node_peer_gets_its_values_back_identical() -> None:
    assert NODE is not None
    script = Path(__file__).parent / "js" / "round_trip.mjs"
    async with running_principal() as principal:
        url = f"{principal.url}?token={token('node')}"
        done = await anyio.run_process(
            [NODE, "--experimental-websocket", "--no-warnings", str(script), url], check=False
        )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert out.count("same ") == 5, out


async def test_json_default_on_a_peer_converts_inputs_and_outputs() -> None:
    async def today(_: Any) -> Any:
        return [datetime.date(2024, 1, 2)]

    async def echo(value: Any) -> Any:
        return value

    caps = {"today": today, "echo": echo}
    async with connected_pair(caps, {}, json_default=str) as (_, b):
        assert await b.call("today") == ["2024-01-02"]
        assert await b.call("echo", {"id": uuid.UUID(int=1)}) == {"id": str(uuid.UUID(int=1))}
    async with connected_pair(caps, {}) as (_, b):
        with pytest.raises(astral.RemoteError, match=r"cannot send datetime\.date at output\[0\]"):
            await b.call("today")


async def test_json_default_applies_when_middleware_observe_the_call() -> None:
    # With middleware, answers are encoded on the observed path: same rule.
    @contextlib.asynccontextmanager
    async def observe(call: astral.CallInfo) -> AsyncIterator[None]:
        yield

    async def today(_: Any) -> Any:
        return [datetime.date(2024, 1, 2)]

    async def days(_: Any) -> AsyncIterator[Any]:
        yield datetime.date(2024, 1, 3)

    caps = {"today": today, "days": days}
    options: dict[str, Any] = {"json_default": str, "middleware": [observe]}
    async with connected_pair(caps, {}, **options) as (_, b):
        assert await b.call("today") == ["2024-01-02"]
        async with b.stream("days") as items:
            assert [item async for item in items] == ["2024-01-03"]
