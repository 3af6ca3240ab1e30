"""OpenTelemetry tracing for astral calls, as a middleware (optional).

Install with ``pip install 'astral-rpc[otel]'``; ``import astral`` never
imports this module or OpenTelemetry. Give the middleware to both sides::

    from astral.otel import TracingMiddleware

    tracing = TracingMiddleware()  # the global tracer provider and propagator
    async with astral.connect(url, token=token, middleware=[tracing]) as peer: ...
    await astral.serve(verifier=verifier, middleware=[tracing], ...)

Each call gets one span on each side: kind ``CLIENT`` where it was made,
``SERVER`` where it ran, named after the capability, with the RPC semantic
convention attributes (``rpc.system="astral"``, ``rpc.method``) and the
outcome. The caller's trace context travels in the ``call`` frame's
optional ``trace`` field (W3C ``traceparent``/``tracestate``, through the
configured propagator), so the callee's span is a child of the caller's
across the WebSocket, and a capability's own calls are children of its span.
The original TypeScript peer ignores the field: its calls start new traces.

A span covers the whole call: for a stream, until its last item or until
the consumer leaves it. The status is ``ERROR`` when the call failed;
a cancelled call keeps the unset status and has ``astral.outcome`` set to
``"cancelled"``. A ``traceparent`` that is junk is ignored (the server span
starts a new trace) and logged at WARNING on ``astral.protocol``,
rate-limited.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import __version__
from ._exceptions import Failure, RemoteError
from ._logs import protocol_warnings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from opentelemetry.propagators.textmap import TextMapPropagator

    from ._middleware import CallInfo

__all__ = ["TracingMiddleware"]


class TracingMiddleware:
    """A middleware that traces every call with OpenTelemetry.

    Args:
        tracer_provider: Where spans go; by default the global one.
        propagator: How the trace context is written into and read from
            the call frame; by default the global one (W3C trace context
            and baggage unless configured otherwise).

    The same instance can serve any number of peers, on both sides.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("astral", __version__, tracer_provider=tracer_provider)
        self._propagator = propagator

    def _textmap(self) -> TextMapPropagator:
        return self._propagator or propagate.get_global_textmap()

    def __call__(self, call: CallInfo) -> AbstractAsyncContextManager[None]:
        """Wrap one call in a span (the middleware protocol)."""
        if call.direction == "outbound":
            return self._outbound(call)
        return self._inbound(call)

    def _attributes(self, call: CallInfo) -> dict[str, Any]:
        return {
            "rpc.system": "astral",
            "rpc.method": call.capability,
            "astral.call.id": call.call_id,
        }

    @asynccontextmanager
    async def _outbound(self, call: CallInfo) -> AsyncIterator[None]:
        # A context already there came with the call from another principal
        # process (astral.redis): this span continues that trace.
        parent = self._textmap().extract(call.trace) if call.trace else None
        span = self._tracer.start_span(
            call.capability, context=parent, kind=SpanKind.CLIENT, attributes=self._attributes(call)
        )
        self._textmap().inject(call.trace, context=trace.set_span_in_context(span))
        try:
            yield
        finally:
            _finish(span, call)

    @asynccontextmanager
    async def _inbound(self, call: CallInfo) -> AsyncIterator[None]:
        parent = self._textmap().extract(call.trace)
        if "traceparent" in call.trace and not (
            trace.get_current_span(parent).get_span_context().is_valid
        ):
            protocol_warnings.warning(
                "ignored malformed traceparent in call %.60r to %r", call.call_id, call.capability
            )
        span = self._tracer.start_span(
            call.capability, context=parent, kind=SpanKind.SERVER, attributes=self._attributes(call)
        )
        # The capability runs in this task: its own calls become children.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            yield
        finally:
            otel_context.detach(token)
            _finish(span, call)


def _finish(span: trace.Span, call: CallInfo) -> None:
    span.set_attribute("astral.outcome", call.outcome or "cancelled")
    if call.streaming:
        span.set_attribute("astral.stream.items", call.items)
    error = call.error
    if call.outcome == "error" and error is not None:
        # The remote's error code says most; else the exception's class.
        code = error.code if isinstance(error, (Failure, RemoteError)) else None
        span.set_attribute("error.type", code or type(error).__name__)
        if call.direction == "inbound" and not isinstance(error, Failure):
            span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end()
