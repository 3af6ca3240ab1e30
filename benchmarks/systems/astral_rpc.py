"""astral itself, on asyncio and on trio; and its ASGI adapter under uvicorn.

Written against the planned public API (``astral.serve``, ``astral.connect``,
``astral.JWTVerifier``, ``astral.mint_token``); the systems skip with a clear
line until that API exists.
"""

# Libraries are imported lazily, only by the processes that use them.
# ruff: noqa: PLC0415

from __future__ import annotations

import functools
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import anyio

from ..common import PAYLOAD, SECRET, ServerApp

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class AstralConn:
    def __init__(self, peer: Any) -> None:
        self._peer = peer

    async def call(self) -> Any:
        return await self._peer.call("echo", PAYLOAD)

    def stream(self, n: int) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        stream: AbstractAsyncContextManager[AsyncIterator[Any]] = self._peer.stream("stream", n)
        return stream

    async def sleepy(self, i: int) -> None:
        await self._peer.call("sleepy", {"i": i})

    async def upload(self, items: AsyncIterator[int]) -> int:
        taken: int = await self._peer.call("upload", None, input_stream=items)
        return taken


async def _upload(_: Any, items: AsyncIterator[int]) -> int:
    """The callee of workload U: counts what the caller streams to it."""
    taken = 0
    async for _item in items:
        taken += 1
    return taken


class _Astral:
    name: ClassVar[str]
    backends: ClassVar[tuple[str, ...]]
    workloads: ClassVar[str] = "ABCUDEF"

    def unavailable(self) -> str | None:
        try:
            import astral

            for name in ("serve", "connect", "JWTVerifier", "mint_token"):
                getattr(astral, name)
        except (ImportError, AttributeError) as exc:
            return f"astral.serve not available yet ({exc})"
        return None

    async def serve(self, app: ServerApp, *, task_status: Any) -> None:
        import astral

        verifier = astral.JWTVerifier(SECRET, algorithms=["HS256"])

        async def on_connect(peer: Any) -> None:
            await app.on_connect(functools.partial(peer.call, "echo", PAYLOAD))

        async with anyio.create_task_group() as tg:
            port = await tg.start(
                functools.partial(
                    astral.serve,
                    host="127.0.0.1",
                    port=0,
                    verifier=verifier,
                    capabilities={**app.capabilities(), "upload": _upload},
                    on_connect=on_connect,
                    # F holds 10,000 workers, opened 4 x 32 at a time: above
                    # the defaults (1,024 connections, 128 in the handshake).
                    max_connections=20_000,
                    max_handshakes=1_024,
                )
            )
            task_status.started(port)

    @asynccontextmanager
    async def connect(
        self, port: int, *, worker: bool = False, index: int = 0
    ) -> AsyncIterator[AstralConn | None]:
        import astral

        async def echo(input: Any) -> Any:
            return input

        async with astral.connect(
            f"ws://127.0.0.1:{port}/",
            token=astral.mint_token(SECRET, subject=f"w{index}"),
            capabilities={"echo": echo} if worker else {},
        ) as peer:
            yield None if worker else AstralConn(peer)


class AstralAsyncio(_Astral):
    name: ClassVar[str] = "astral-asyncio"
    backends: ClassVar[tuple[str, ...]] = ("asyncio",)


class AstralTrio(_Astral):
    name: ClassVar[str] = "astral-trio"
    backends: ClassVar[tuple[str, ...]] = ("trio",)


class AstralAsgiUvicorn(_Astral):
    """astral's ASGI adapter (``astral.asgi.App``) served by uvicorn.

    uvicorn picks its WebSocket implementation as it does by default
    (``ws="auto"``); its access log is off. The socket is bound and listening
    before uvicorn starts, so connections made meanwhile simply wait in the
    backlog: listening is readiness.
    """

    name: ClassVar[str] = "astral-asgi-uvicorn"
    backends: ClassVar[tuple[str, ...]] = ("asyncio",)

    def unavailable(self) -> str | None:
        try:
            import astral.asgi

            astral.asgi.App  # noqa: B018
            import uvicorn  # noqa: F401
        except (ImportError, AttributeError) as exc:
            return f"astral.asgi not available ({exc})"
        return super().unavailable()

    async def serve(self, app: ServerApp, *, task_status: Any) -> None:
        import socket

        import uvicorn

        import astral
        import astral.asgi

        async def on_connect(peer: Any) -> None:
            await app.on_connect(functools.partial(peer.call, "echo", PAYLOAD))

        asgi_app = astral.asgi.App(
            verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]),
            capabilities={**app.capabilities(), "upload": _upload},
            on_connect=on_connect,
        )
        config = uvicorn.Config(asgi_app, lifespan="off", log_level="warning", access_log=False)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        task_status.started(sock.getsockname()[1])
        await uvicorn.Server(config).serve(sockets=[sock])
