"""astral.otel: a span per call on each side, parent and child across the wire."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import astral
from astral import Failure, Peer, RemoteError
from astral.otel import TracingMiddleware
from astral.testing import memory_transport_pair

from .helpers import running_principal, token


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


class Ended(SpanProcessor):
    """Signals each span's end, so tests wait on an event, not a timer."""

    def __init__(self) -> None:
        self.changed: anyio.Event | None = None

    def on_end(self, span: ReadableSpan) -> None:
        if self.changed is not None:
            self.changed.set()


ENDED = Ended()


@pytest.fixture
def provider(spans: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    provider.add_span_processor(ENDED)
    return provider


class Ends:
    """Capability hooks: each call to a capability here signals its end."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.finished = anyio.Event()


def by_kind(spans: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.kind is kind]


async def wait_spans(spans: InMemorySpanExporter, n: int) -> list[ReadableSpan]:
    # A callee's span may end after the caller returned (a cancelled call):
    # wait for the spans' ends, bounded by the test's time limit.
    while len(spans.get_finished_spans()) < n:
        ENDED.changed = anyio.Event()
        await ENDED.changed.wait()
    return list(spans.get_finished_spans())


def assert_child(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.parent is not None
    assert child.context is not None
    assert parent.context is not None
    assert child.context.trace_id == parent.context.trace_id
    assert child.parent.span_id == parent.context.span_id


async def echo(value: Any) -> Any:
    return value


async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def not_found(_: Any) -> None:
    raise Failure("no such thing", code="not_found")


@asynccontextmanager
async def pair(
    provider: TracerProvider, server_caps: dict[str, Any], client_caps: dict[str, Any]
) -> AsyncIterator[tuple[Peer, Peer]]:
    tracing = TracingMiddleware(tracer_provider=provider)
    a, b = memory_transport_pair()
    async with (
        a,
        b,
        Peer(a, capabilities=server_caps, middleware=[tracing]) as server,
        Peer(b, capabilities=client_caps, middleware=[tracing]) as client,
    ):
        yield server, client


async def test_both_directions_over_real_sockets_parent_and_child(
    provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    tracing = TracingMiddleware(tracer_provider=provider)

    async def bash(command: str) -> str:
        return f"ran {command}"

    async with (
        running_principal(middleware=[tracing]) as principal,
        astral.connect(
            principal.url, token=token("w"), capabilities={"bash": bash}, middleware=[tracing]
        ) as worker,
    ):
        assert await worker.call("echo", 1) == 1
        principal_side = await principal.registry.wait_for("w")
        assert await principal_side.call("bash", "ls") == "ran ls"
        finished = await wait_spans(spans, 4)
    clients = [s for s in finished if s.kind is SpanKind.CLIENT]
    servers = [s for s in finished if s.kind is SpanKind.SERVER]
    assert [s.name for s in clients] == ["echo", "bash"]
    assert sorted(s.name for s in servers) == ["bash", "echo"]
    for client in clients:
        [server] = [s for s in servers if s.name == client.name]
        assert_child(server, client)
        for span in (client, server):
            assert span.attributes is not None
            assert span.attributes["rpc.system"] == "astral"
            assert span.attributes["rpc.method"] == client.name
            assert span.attributes["astral.outcome"] == "result"
            assert span.status.status_code is StatusCode.UNSET
        assert client.attributes is not None
        assert server.attributes is not None
        assert client.attributes["astral.call.id"] == server.attributes["astral.call.id"]


async def test_a_capabilitys_own_calls_are_children_of_its_span(
    provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    async def relay(value: Any) -> Any:
        # The callee calls the caller back: a grandchild across the wire.
        return await astral.current_peer().call("echo", value)

    async with pair(provider, {"relay": relay}, {"echo": echo}) as (_, client):
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("request") as request:
            assert await client.call("relay", 5) == 5
        await wait_spans(spans, 5)
    finished = {(s.name, s.kind): s for s in spans.get_finished_spans()}
    request_span = finished[("request", SpanKind.INTERNAL)]
    assert request_span.context is not None
    assert request.get_span_context().span_id == request_span.context.span_id
    assert_child(finished[("relay", SpanKind.CLIENT)], request_span)
    assert_child(finished[("relay", SpanKind.SERVER)], finished[("relay", SpanKind.CLIENT)])
    assert_child(finished[("echo", SpanKind.CLIENT)], finished[("relay", SpanKind.SERVER)])
    assert_child(finished[("echo", SpanKind.SERVER)], finished[("echo", SpanKind.CLIENT)])


async def test_a_stream_is_one_span_per_side_ending_with_the_stream(
    provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    async with pair(provider, {"count": count}, {}) as (_, client):
        async with client.stream("count", 4) as items:
            assert [item async for item in items] == [0, 1, 2, 3]
        await wait_spans(spans, 2)
    [client_span] = by_kind(spans, SpanKind.CLIENT)
    [server_span] = by_kind(spans, SpanKind.SERVER)
    assert_child(server_span, client_span)
    for span in (client_span, server_span):
        assert span.attributes is not None
        assert span.attributes["astral.stream.items"] == 4
        assert span.attributes["astral.outcome"] == "result"


async def test_a_cancelled_call_ends_both_spans_as_cancelled(
    provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    ends = Ends()

    async def forever(_: Any) -> None:
        ends.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            ends.finished.set()

    async with pair(provider, {"forever": forever}, {}) as (_, client):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call, "forever")
            await ends.started.wait()
            tg.cancel_scope.cancel()
        await wait_spans(spans, 2)
    [client_span] = by_kind(spans, SpanKind.CLIENT)
    [server_span] = by_kind(spans, SpanKind.SERVER)
    assert_child(server_span, client_span)
    for span in (client_span, server_span):
        assert span.attributes is not None
        assert span.attributes["astral.outcome"] == "cancelled"
        assert span.status.status_code is StatusCode.UNSET


async def test_errors_set_the_status_and_the_error_type(
    provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    async def divide(_: Any) -> float:
        return 1 / 0

    async with pair(provider, {"divide": divide, "not_found": not_found}, {}) as (_, client):
        with pytest.raises(RemoteError):
            await client.call("divide")
        with pytest.raises(RemoteError):
            await client.call("not_found")
        await wait_spans(spans, 4)
    finished = {(s.name, s.kind): s for s in spans.get_finished_spans()}
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        assert finished[("divide", kind)].status.status_code is StatusCode.ERROR
        assert finished[("not_found", kind)].status.status_code is StatusCode.ERROR
        assert (finished[("not_found", kind)].attributes or {})["error.type"] == "not_found"
    assert (finished[("divide", SpanKind.CLIENT)].attributes or {})["error.type"] == "internal"
    assert (finished[("divide", SpanKind.SERVER)].attributes or {})[
        "error.type"
    ] == "ZeroDivisionError"
    # The unexpected exception is recorded where it ran, never a Failure.
    assert [e.name for e in finished[("divide", SpanKind.SERVER)].events] == ["exception"]
    assert finished[("not_found", SpanKind.SERVER)].events == ()


async def test_a_junk_traceparent_is_ignored_with_a_warning(
    provider: TracerProvider, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="astral.protocol")
    tracing = TracingMiddleware(tracer_provider=provider)
    ours, theirs = memory_transport_pair()
    async with theirs, Peer(ours, capabilities={"echo": echo}, middleware=[tracing]):
        await theirs.send(
            '{"type":"call","id":"1","capability":"echo","input":1,'
            '"trace":{"traceparent":"00-junk-junk-01"}}'
        )
        assert await theirs.receive() == '{"type":"result","id":"1","output":1}'
        # A trace field that is not an object of strings is dropped by the codec.
        await theirs.send(
            '{"type":"call","id":"2","capability":"echo","input":2,"trace":{"traceparent":5}}'
        )
        assert await theirs.receive() == '{"type":"result","id":"2","output":2}'
        await wait_spans(spans, 2)
    for span in by_kind(spans, SpanKind.SERVER):
        assert span.parent is None  # a new trace
    messages = [r.getMessage() for r in caplog.records if r.name == "astral.protocol"]
    assert len(messages) == 2
    assert "traceparent" in messages[0]
    assert "'trace'" in messages[1]


async def test_a_call_from_the_original_starts_a_new_trace(
    provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    tracing = TracingMiddleware(tracer_provider=provider)
    ours, theirs = memory_transport_pair()
    async with theirs, Peer(ours, capabilities={"echo": echo}, middleware=[tracing]):
        await theirs.send('{"type":"call","id":"1","capability":"echo","input":1}')
        assert await theirs.receive() == '{"type":"result","id":"1","output":1}'
        [span] = await wait_spans(spans, 1)
    assert span.parent is None
    assert span.kind is SpanKind.SERVER


def test_import_astral_does_not_import_opentelemetry() -> None:
    code = "import sys, astral\nprint(any(m.startswith('opentelemetry') for m in sys.modules))\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
