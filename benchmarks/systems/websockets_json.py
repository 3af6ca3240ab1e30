"""A hand-rolled JSON call/result protocol on ``websockets`` (asyncio).

What a user might write instead of an RPC library: a dict of pending
futures keyed by id, ``json.dumps``/``json.loads`` from the standard library,
one task per inbound call, and no cancellation on the wire. It is symmetric,
so the server can call its workers too (workload F).

Frames: ``{"id", "method", "params"}`` for a call, ``{"id", "item"}`` for one
streamed item, ``{"id", "result"}`` or ``{"id", "error"}`` to finish.
"""

# Libraries are imported lazily, only by the processes that use them.
# ruff: noqa: PLC0415

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import anyio

from ..common import PAYLOAD, ServerApp

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

_END = object()


class JsonPeer:
    def __init__(self, ws: Any, handlers: dict[str, Callable[..., Any]]) -> None:
        self.ws = ws
        self.handlers = handlers
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.streams: dict[int, asyncio.Queue[Any]] = {}
        self.next_id = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Read frames until the connection closes."""
        async for raw in self.ws:
            frame = json.loads(raw)
            if "method" in frame:
                task = asyncio.create_task(self._serve(frame))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif "item" in frame:
                self.streams[frame["id"]].put_nowait(frame["item"])
            elif frame["id"] in self.streams:
                self.streams[frame["id"]].put_nowait(_END)
            else:
                future = self.pending.pop(frame["id"], None)
                if future is not None and not future.done():
                    if "error" in frame:
                        future.set_exception(RuntimeError(frame["error"]))
                    else:
                        future.set_result(frame["result"])

    async def _serve(self, frame: dict[str, Any]) -> None:
        id_ = frame["id"]
        try:
            handler = self.handlers[frame["method"]]
            if inspect.isasyncgenfunction(handler):
                async for item in handler(frame["params"]):
                    await self.ws.send(json.dumps({"id": id_, "item": item}))
                reply: dict[str, Any] = {"id": id_, "result": None}
            else:
                reply = {"id": id_, "result": await handler(frame["params"])}
        except Exception as exc:
            reply = {"id": id_, "error": str(exc)}
        await self.ws.send(json.dumps(reply))

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    async def call(self, method: str, params: Any) -> Any:
        id_ = self._new_id()
        future = asyncio.get_running_loop().create_future()
        self.pending[id_] = future
        try:
            await self.ws.send(json.dumps({"id": id_, "method": method, "params": params}))
            return await future
        finally:
            self.pending.pop(id_, None)

    @asynccontextmanager
    async def stream(self, method: str, params: Any) -> AsyncIterator[AsyncIterator[Any]]:
        id_ = self._new_id()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.streams[id_] = queue

        async def items() -> AsyncIterator[Any]:
            while (item := await queue.get()) is not _END:
                yield item

        try:
            await self.ws.send(json.dumps({"id": id_, "method": method, "params": params}))
            yield items()
        finally:
            del self.streams[id_]


class JsonConn:
    def __init__(self, peer: JsonPeer) -> None:
        self._peer = peer

    async def call(self) -> Any:
        return await self._peer.call("echo", PAYLOAD)

    def stream(self, n: int) -> Any:
        return self._peer.stream("stream", n)

    async def sleepy(self, i: int) -> None:
        await self._peer.call("sleepy", {"i": i})


async def _echo(params: Any) -> Any:
    return params


class WebsocketsJson:
    name: ClassVar[str] = "websockets-json"
    backends: ClassVar[tuple[str, ...]] = ("asyncio",)
    # E is n/a: a hand-rolled protocol like this one has no cancel frame.
    workloads: ClassVar[str] = "ABCDF"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("websockets") is None:
            return "websockets is not installed"
        return None

    async def serve(self, app: ServerApp, *, task_status: Any) -> None:
        from websockets.asyncio.server import serve
        from websockets.exceptions import ConnectionClosed

        capabilities = app.capabilities()

        async def handler(ws: Any) -> None:
            peer = JsonPeer(ws, capabilities)
            try:
                if app.mode == "F":
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(peer.run)
                        await app.on_connect(lambda: peer.call("echo", PAYLOAD))
                else:
                    await peer.run()
            except* ConnectionClosed:
                pass

        async with serve(handler, "127.0.0.1", 0, compression=None) as server:
            task_status.started(next(iter(server.sockets)).getsockname()[1])
            await anyio.sleep_forever()

    @asynccontextmanager
    async def connect(
        self, port: int, *, worker: bool = False, index: int = 0
    ) -> AsyncIterator[JsonConn | None]:
        from websockets.asyncio.client import connect

        async with connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
            peer = JsonPeer(ws, {"echo": _echo} if worker else {})
            async with anyio.create_task_group() as tg:
                tg.start_soon(peer.run)
                yield None if worker else JsonConn(peer)
                tg.cancel_scope.cancel()
