"""gRPC through grpcio's asyncio API (``grpc.aio``), without code generation.

Generic method handlers with JSON (de)serializers carry the same ``{"x": 1}``
payload as every other system: unary ``Echo`` (A, B, D), server-streaming
``Stream`` (C) and unary ``Sleepy`` (E; gRPC propagates cancellation). F is
n/a: a gRPC server cannot call its clients.

Every client connection is its own channel with a local subchannel pool, so
each really is one TCP connection (by default channels to one target share
their subchannels).
"""

# Libraries are imported lazily, only by the processes that use them.
# ruff: noqa: PLC0415

from __future__ import annotations

import importlib.util
import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import anyio

from ..common import PAYLOAD, ServerApp

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

SERVICE = "astral.bench.Bench"


def _serialize(value: Any) -> bytes:
    return json.dumps(value).encode()


def _deserialize(data: bytes) -> Any:
    return json.loads(data)


class GrpcConn:
    def __init__(self, channel: Any) -> None:
        codec = {"request_serializer": _serialize, "response_deserializer": _deserialize}
        self._echo = channel.unary_unary(f"/{SERVICE}/Echo", **codec)
        self._stream = channel.unary_stream(f"/{SERVICE}/Stream", **codec)
        self._sleepy = channel.unary_unary(f"/{SERVICE}/Sleepy", **codec)

    async def call(self) -> Any:
        return await self._echo(PAYLOAD)

    @asynccontextmanager
    async def stream(self, n: int) -> AsyncIterator[AsyncIterator[Any]]:
        call = self._stream(n)
        try:
            yield call
        finally:
            call.cancel()

    async def sleepy(self, i: int) -> None:
        await self._sleepy({"i": i})


class Grpc:
    name: ClassVar[str] = "grpc"
    backends: ClassVar[tuple[str, ...]] = ("asyncio",)
    workloads: ClassVar[str] = "ABCDE"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("grpc") is None:
            return "grpcio is not installed"
        return None

    async def serve(self, app: ServerApp, *, task_status: Any) -> None:
        import grpc  # type: ignore[import-untyped,unused-ignore]

        capabilities = app.capabilities()

        async def echo(request: Any, context: Any) -> Any:
            return await capabilities["echo"](request)

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            async for item in capabilities["stream"](request):
                yield item

        async def sleepy(request: Any, context: Any) -> Any:
            return await capabilities["sleepy"](request)

        codec = {"request_deserializer": _deserialize, "response_serializer": _serialize}
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, **codec),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, **codec),
            "Sleepy": grpc.unary_unary_rpc_method_handler(sleepy, **codec),
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            task_status.started(port)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await server.stop(None)

    @asynccontextmanager
    async def connect(
        self, port: int, *, worker: bool = False, index: int = 0
    ) -> AsyncIterator[GrpcConn]:
        import grpc  # type: ignore[import-untyped,unused-ignore]

        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            yield GrpcConn(channel)
