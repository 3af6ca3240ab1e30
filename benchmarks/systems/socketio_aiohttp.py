"""python-socketio: an ``AsyncServer`` on aiohttp, ``AsyncClient`` callers.

Calls are ``emit`` with an acknowledgement (``call()``); the server can call
a client the same way, so F works. Clients go straight to the WebSocket
transport (no long-polling first). C and E are n/a: Socket.IO has neither
streamed results nor cancellation of a call.
"""

# Libraries are imported lazily, only by the processes that use them.
# ruff: noqa: PLC0415

from __future__ import annotations

import importlib.util
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import anyio

from ..common import PAYLOAD, ServerApp

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

TIMEOUT = 120


class SioConn:
    def __init__(self, sio: Any) -> None:
        self._sio = sio

    async def call(self) -> Any:
        return await self._sio.call("echo", PAYLOAD, timeout=TIMEOUT)

    def stream(self, n: int) -> Any:
        raise NotImplementedError

    async def sleepy(self, i: int) -> None:
        raise NotImplementedError


async def _echo_worker(data: Any) -> Any:
    return data


class SocketIO:
    name: ClassVar[str] = "socketio"
    backends: ClassVar[tuple[str, ...]] = ("asyncio",)
    workloads: ClassVar[str] = "ABDF"

    def unavailable(self) -> str | None:
        for module in ("socketio", "aiohttp"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        return None

    async def serve(self, app: ServerApp, *, task_status: Any) -> None:
        import socketio  # type: ignore[import-untyped,unused-ignore]
        from aiohttp import web

        sio = socketio.AsyncServer(async_mode="aiohttp", logger=False, engineio_logger=False)
        webapp = web.Application()
        sio.attach(webapp)

        async def echo(sid: str, data: Any) -> Any:
            return data

        sio.on("echo", echo)

        async with anyio.create_task_group() as tg:
            if app.mode == "F":

                async def connect(sid: str, environ: Any) -> None:
                    async def call() -> Any:
                        return await sio.call("echo", PAYLOAD, to=sid, timeout=TIMEOUT)

                    tg.start_soon(app.on_connect, call)

                sio.on("connect", connect)

            runner = web.AppRunner(webapp, handle_signals=False, access_log=None)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                task_status.started(runner.addresses[0][1])
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await runner.cleanup()

    @asynccontextmanager
    async def connect(
        self, port: int, *, worker: bool = False, index: int = 0
    ) -> AsyncIterator[SioConn | None]:
        import socketio  # type: ignore[import-untyped,unused-ignore]

        sio = socketio.AsyncClient(reconnection=False, logger=False, engineio_logger=False)
        if worker:
            sio.on("echo", _echo_worker)
        await sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"], wait_timeout=60)
        try:
            yield None if worker else SioConn(sio)
        finally:
            with anyio.CancelScope(shield=True):
                await sio.disconnect()
