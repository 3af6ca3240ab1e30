"""astral peers against peers built with the `websockets` library (asyncio only).

Both directions, speaking astral's frames: a hand-written `websockets` client
against `astral.serve`, and `astral.connect` against a `websockets` server that
runs `astral.accept` (the documented way to embed astral in your own server).
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import InvalidStatus

import astral

from .helpers import running_principal, token

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio"])


async def test_websockets_client_speaks_astral_frames_to_serve() -> None:
    async with running_principal() as principal:
        headers = {"Authorization": f"Bearer {token('ws-client')}"}
        async with ws_connect(principal.url, additional_headers=headers) as ws:
            # The client calls the principal: one result, then a stream.
            await ws.send('{"type":"call","id":"a","capability":"echo","input":{"x":1}}')
            assert json.loads(await ws.recv()) == {"type": "result", "id": "a", "output": {"x": 1}}
            await ws.send('{"type":"call","id":"b","capability":"count","input":3}')
            frames = [json.loads(await ws.recv()) for _ in range(4)]
            assert frames == [
                {"type": "yield", "id": "b", "output": 0},
                {"type": "yield", "id": "b", "output": 1},
                {"type": "yield", "id": "b", "output": 2},
                {"type": "result", "id": "b"},
            ]
            await ws.send('{"type":"call","id":"c","capability":"__class__"}')
            assert json.loads(await ws.recv()) == {
                "type": "result",
                "id": "c",
                "error": "unknown capability",
            }

            # The principal calls the client, which answers by hand.
            principal_side = await principal.registry.wait_for("ws-client")
            async with anyio.create_task_group() as tg:
                answers: list[Any] = []

                async def call() -> None:
                    answers.append(await principal_side.call("shout", "hi"))

                tg.start_soon(call)
                incoming = json.loads(await ws.recv())
                assert incoming["type"] == "call"
                assert incoming["capability"] == "shout"
                assert incoming["input"] == "hi"
                reply = {"type": "result", "id": incoming["id"], "output": "HI"}
                await ws.send(json.dumps(reply))
            assert answers == ["HI"]


async def test_websockets_client_without_a_token_gets_401() -> None:
    async with running_principal() as principal:
        with pytest.raises(InvalidStatus) as caught:
            async with ws_connect(principal.url):
                pass
        assert caught.value.response.status_code == 401
        assert principal.connected == []


async def test_connect_against_a_websockets_server_running_accept() -> None:
    async def whoami(_: Any) -> str:
        return "websockets principal"

    principal_peers: list[astral.Peer] = []
    worker_called = anyio.Event()

    async def handler(ws: ServerConnection) -> None:
        async with astral.accept(send=ws.send, capabilities={"whoami": whoami}) as peer:
            principal_peers.append(peer)
            try:
                async for message in ws:
                    await peer.receive(str(message))
            except WsConnectionClosed:
                pass

    async def bash(command: str) -> str:
        worker_called.set()
        return f"ran {command}"

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with astral.connect(
            f"ws://127.0.0.1:{port}/", token="unused", capabilities={"bash": bash}
        ) as worker:
            assert await worker.call("whoami") == "websockets principal"
            assert await principal_peers[0].call("bash", "ls") == "ran ls"
            assert worker_called.is_set()
            with pytest.raises(astral.RemoteError, match="unknown capability"):
                await worker.call("nope")
