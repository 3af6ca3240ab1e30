"""Across the Redis hop: middleware and tracing on the calling process, and drain.

A call through a :class:`astral.redis.RemoteWorker` runs the registry's
``middleware`` as a local :class:`astral.Peer` runs its own for an outbound
call; a trace context crosses to the worker. A principal process whose server
stops drains: calls already running on its workers finish, new ones fail at
once with ConnectionClosed.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import astral
from astral import CallInfo
from astral.otel import TracingMiddleware

from .helpers import SECRET, eventually, token
from .redis_server import RedisServer, needs_redis, redis_server
from .test_redis import Node, Worker, node

pytestmark = needs_redis

redis = pytest.importorskip("astral.redis")


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return "m" + secrets.token_hex(4)


class Recorder:
    """A middleware that remembers each call and how it ended."""

    def __init__(self, refuse: str | None = None) -> None:
        self.calls: list[CallInfo] = []
        self.ended: list[CallInfo] = []
        self.refuse = refuse
        self.changed = anyio.Event()

    @asynccontextmanager
    async def __call__(self, call: CallInfo) -> AsyncIterator[None]:
        self.calls.append(call)
        if call.capability == self.refuse:
            raise astral.Failure("not allowed here", code="refused")
        call.state["entered"] = True
        yield
        self.ended.append(call)
        self.changed.set()

    async def wait_ended(self, n: int) -> list[CallInfo]:
        while len(self.ended) < n:
            self.changed = anyio.Event()
            await self.changed.wait()
        return self.ended


async def test_the_registrys_middleware_sees_each_call_through_a_remote_worker(
    shared_redis: RedisServer, namespace: str
) -> None:
    rec = Recorder(refuse="fail")
    work = Worker()
    async with (
        node(shared_redis.url, namespace, middleware=[rec]) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()),
    ):
        there = await a.registry.wait_for("w1")
        assert isinstance(there, redis.RemoteWorker)

        assert await there.call("echo", {"x": 1}) == {"x": 1}
        (info,) = await rec.wait_ended(1)
        assert info.direction == "outbound"
        assert info.peer is there
        assert info.peer.claims["sub"] == "w1"
        assert (info.capability, info.input) == ("echo", {"x": 1})
        assert (info.outcome, info.output, info.streaming) == ("result", {"x": 1}, False)
        assert info.call_id.isdigit()

        with pytest.raises(astral.RemoteError, match=r"^unknown capability$"):
            await there.call("nope")
        info = (await rec.wait_ended(2))[1]
        assert info.outcome == "error"
        assert isinstance(info.error, astral.RemoteError)

        # A stream is left once it ends, with its items counted.
        async with there.stream("count", 5) as items:
            assert [i async for i in items] == [0, 1, 2, 3, 4]
        info = (await rec.wait_ended(3))[2]
        assert (info.outcome, info.streaming, info.items) == ("result", True, 5)

        # Left early: cancelled, and the worker is told to stop.
        async with there.stream("endless", None) as items:
            async for i in items:
                if i == 2:
                    break
        info = (await rec.wait_ended(4))[3]
        assert (info.outcome, info.items) == ("cancelled", 3)

        # A stream returned by call() is watched until it ends too.
        stream = await there.call("count", 3)
        assert [i async for i in stream] == [0, 1, 2]
        info = (await rec.wait_ended(5))[4]
        assert (info.outcome, info.streaming, info.items) == ("result", True, 3)

        # A refusing middleware stops the call before it is sent.
        with pytest.raises(astral.Failure, match="not allowed here"):
            await there.call("fail", "boom")
        assert rec.calls[-1].capability == "fail"
        assert rec.calls[-1].outcome == "error"
        assert "entered" not in rec.calls[-1].state
        assert a.registry._calls == {}

        # A caller cancelled mid-call: the outcome says so, the worker stops.
        with anyio.move_on_after(30) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(there.call, "sleepy")
                await work.started.wait()
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        info = (await rec.wait_ended(6))[5]
        assert (info.capability, info.outcome) == ("sleepy", "cancelled")
        await work.stopped.wait()


async def test_a_local_worker_keeps_its_peers_own_middleware(
    shared_redis: RedisServer, namespace: str
) -> None:
    # The registry's middleware is for the hop: a Peer handed out for a
    # worker on this process runs serve()'s middleware, once.
    rec, served = Recorder(), Recorder()
    work = Worker()
    async with (
        node(
            shared_redis.url,
            namespace,
            serve_options={"middleware": [served]},
            middleware=[rec],
        ) as a,
        astral.connect(a.url, token=token("w1"), capabilities=work.capabilities()),
    ):
        here = await a.registry.wait_for("w1")
        assert isinstance(here, astral.Peer)
        assert await here.call("echo", 1) == 1
        assert [c.capability for c in await served.wait_ended(1)] == ["echo"]
        assert rec.calls == []


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
def tracing(spans: InMemorySpanExporter) -> TracingMiddleware:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return TracingMiddleware(tracer_provider=provider)


@pytest.mark.parametrize("middle_traces", [True, False], ids=["traced-hop", "plain-hop"])
async def test_one_trace_runs_from_the_caller_through_redis_to_the_worker(
    shared_redis: RedisServer,
    namespace: str,
    spans: InMemorySpanExporter,
    tracing: TracingMiddleware,
    middle_traces: bool,
) -> None:
    work = Worker()
    b_options = {"middleware": [tracing]} if middle_traces else {}
    async with (
        node(shared_redis.url, namespace, middleware=[tracing]) as a,
        node(shared_redis.url, namespace, serve_options=b_options) as b,
        astral.connect(
            b.url, token=token("w1"), capabilities=work.capabilities(), middleware=[tracing]
        ),
    ):
        there = await a.registry.wait_for("w1")
        assert isinstance(there, redis.RemoteWorker)
        assert await there.call("echo", 7) == 7
        want = 3 if middle_traces else 2
        # The worker ends its span once its result is out: wait for it.
        await eventually(lambda: len(spans.get_finished_spans()) >= want)
        found = spans.get_finished_spans()
        assert len(found) == want
        client = [s for s in found if s.kind == SpanKind.CLIENT]
        server = [s for s in found if s.kind == SpanKind.SERVER]
        assert len(server) == 1
        assert len(client) == want - 1
        trace_ids = {s.context.trace_id for s in found}
        assert len(trace_ids) == 1  # one trace, across the hop
        roots = [s for s in client if s.parent is None]
        assert len(roots) == 1
        parent = roots[0]
        if middle_traces:
            (middle,) = [s for s in client if s is not parent]
            assert middle.parent is not None
            assert middle.parent.span_id == parent.context.span_id
            parent = middle
        assert server[0].parent is not None
        assert server[0].parent.span_id == parent.context.span_id
        assert all(s.name == "echo" for s in found)


async def test_a_draining_process_finishes_running_calls_and_refuses_new_ones(
    shared_redis: RedisServer, namespace: str
) -> None:
    release = anyio.Event()
    running = anyio.Event()

    async def slow(value: Any) -> Any:
        running.set()
        await release.wait()
        return value

    async def echo(value: Any) -> Any:
        return value

    async with (
        node(shared_redis.url, namespace) as a,
        redis.RedisRegistry(shared_redis.url, namespace=namespace) as b_registry,
    ):
        verifier = astral.JWTVerifier(SECRET, algorithms=["HS256"])
        async with anyio.create_task_group() as outer:
            b_server = anyio.CancelScope()

            async def serve_b(*, task_status: anyio.abc.TaskStatus[int]) -> None:
                with b_server:
                    await astral.serve(
                        verifier=verifier, registry=b_registry, grace=30, task_status=task_status
                    )

            port = await outer.start(serve_b)
            b = Node(b_registry, port)
            async with astral.connect(
                b.url, token=token("w1"), capabilities={"slow": slow, "echo": echo}
            ):
                there = await a.registry.wait_for("w1")
                assert isinstance(there, redis.RemoteWorker)
                result: list[Any] = []

                async def call_slow() -> None:
                    result.append(await there.call("slow", "kept"))

                outer.start_soon(call_slow)
                await running.wait()
                b_server.cancel()  # B's server stops: its worker drains
                # New calls routed to the draining worker fail at once, once
                # the drain has begun (until then they are answered).
                refused: list[str] = []
                while not refused:
                    try:
                        assert await there.call("echo", 1) == 1
                    except astral.ConnectionClosed as exc:
                        refused.append(str(exc))
                assert "shutting down" in refused[0]
                assert not result  # the running call is still running
                # The call already running finishes and its answer crosses.
                release.set()
                await eventually(lambda: bool(result))
                assert result == ["kept"]
            # Once the worker is gone, it is no longer listed anywhere.
            await eventually(lambda: not b_registry.local)
            while await a.registry.lookup("w1") is not None:
                await anyio.sleep(0.01)  # polls a condition, as eventually() does


async def test_middleware_of_the_registry_is_a_tuple_of_what_was_given(
    shared_redis: RedisServer, namespace: str
) -> None:
    rec = Recorder()
    registry = redis.RedisRegistry(shared_redis.url, namespace=namespace, middleware=[rec])
    assert registry.middleware == (rec,)
    assert redis.RedisRegistry(shared_redis.url).middleware == ()
