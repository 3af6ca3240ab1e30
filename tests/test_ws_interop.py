"""astral's WebSocket layer against third-party peers.

``websockets`` is asyncio-bound, so its tests run on asyncio only;
``trio-websocket`` is trio-bound, so its tests run on trio only. Both are
selected by parametrizing ``anyio_backend``, not skipped at run time.
"""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import trio
import trio_websocket
import websockets
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from astral._exceptions import ConnectionClosed, Unauthorized
from astral._websocket import (
    HandshakeRequest,
    Rejection,
    WebSocketConnection,
    open_websocket,
    serve_websocket,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

HOST = "127.0.0.1"
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])
trio_only = pytest.mark.parametrize("anyio_backend", ["trio"])


async def echo(conn: WebSocketConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await conn.send(await conn.receive())


@asynccontextmanager
async def astral_server(**kwargs: Any) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_websocket(echo, HOST, 0, task_status=task_status, **kwargs)
        )
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


# --- websockets (asyncio) -----------------------------------------------------


@asyncio_only
async def test_astral_client_against_websockets_server() -> None:
    seen_extensions: list[str | None] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen_extensions.append(ws.request.headers.get("Sec-WebSocket-Extensions"))
        async for message in ws:
            if message == "binary please":
                await ws.send("café".encode())
            elif message == "close please":
                await ws.close(4001, "as you wish")
            else:
                await ws.send(message)

    async with ws_serve(handler, HOST, 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with open_websocket(f"ws://{HOST}:{port}/path") as ws:
            for text in ["hello", "é🚀" * 10, "x" * 500_000]:
                await ws.send(text)
                assert await ws.receive() == text
            await ws.send("binary please")
            assert await ws.receive() == "café"
            await ws.send("close please")
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive()
            assert (info.value.code, info.value.reason) == (4001, "as you wish")
        async with open_websocket(f"ws://{HOST}:{port}/path") as ws:
            await ws.send("bye")
            assert await ws.receive() == "bye"
    assert seen_extensions == [None, None]


@asyncio_only
async def test_websockets_client_against_astral_server() -> None:
    async with astral_server(max_message_size=1000) as port:
        async with ws_connect(f"ws://{HOST}:{port}/", max_size=None) as ws:
            # websockets offers permessage-deflate by default; astral declines.
            assert ws.response is not None
            assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"bytes become text")
            assert await ws.recv() == "bytes become text"
            await ws.ping()  # astral answers pings
            await ws.send("x" * 1001)
            with pytest.raises(websockets.ConnectionClosedError) as info:
                await ws.recv()
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1009
        async with ws_connect(f"ws://{HOST}:{port}/") as ws:
            await ws.send("normal")
            assert await ws.recv() == "normal"
        assert ws.close_code == 1000


@asyncio_only
async def test_websockets_client_sees_the_rejection() -> None:
    async def process_request(request: HandshakeRequest) -> Rejection | None:
        return Rejection(401, "who are you?", (("WWW-Authenticate", "Bearer"),))

    async with astral_server(process_request=process_request) as port:
        with pytest.raises(websockets.InvalidStatus) as info:
            async with ws_connect(f"ws://{HOST}:{port}/"):
                pass
        response = info.value.response
        assert response.status_code == 401
        assert response.body == b"who are you?"
        assert response.headers["WWW-Authenticate"] == "Bearer"


# --- trio-websocket (trio) ----------------------------------------------------


@trio_only
async def test_astral_client_against_trio_websocket_server() -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        if request.path == "/reject":
            await request.reject(401, body=b"no")
            return
        ws = await request.accept()
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                message = await ws.get_message()
                if message == "binary please":
                    await ws.send_message("café".encode())
                elif message == "close please":
                    await ws.aclose(4002, "done")
                else:
                    await ws.send_message(message)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, HOST, 0, None)
        url = f"ws://{HOST}:{server.port}"
        async with open_websocket(f"{url}/") as ws:
            await ws.send("hello")
            assert await ws.receive() == "hello"
            await ws.send("binary please")
            assert await ws.receive() == "café"
            await ws.send("close please")
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive()
            assert (info.value.code, info.value.reason) == (4002, "done")
        with pytest.raises(Unauthorized):
            async with open_websocket(f"{url}/reject"):
                pass
        nursery.cancel_scope.cancel()


@trio_only
async def test_trio_websocket_client_against_astral_server() -> None:
    async with astral_server() as port:
        url = f"ws://{HOST}:{port}/"
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"bytes")
            assert await ws.get_message() == "bytes"
            await ws.ping(b"12345678")
        assert ws.closed is not None
        assert ws.closed.code == 1000
