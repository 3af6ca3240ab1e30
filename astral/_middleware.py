"""Middleware: one place to observe and wrap every call, in both directions.

A middleware is a function that takes a :class:`CallInfo` and returns an
async context manager; ``contextlib.asynccontextmanager`` makes one from a
generator with one ``yield``::

    @contextlib.asynccontextmanager
    async def timing(call: astral.CallInfo):
        ...  # before the call: raising here refuses it
        yield
        print(call.capability, call.outcome, call.duration)  # after: how it ended

The context is entered before the call runs (inbound) or is sent
(outbound), and left once the call has ended, for a single result and for a
whole stream alike. The call's own exception is *not* thrown into the
middleware: leaving is always normal, and the outcome is read from
:class:`CallInfo`, so the code after ``yield`` always runs and the author
never handles results, errors, streams and cancellation separately.

Why a context manager per call rather than ``call_next``-style wrapping:
an outbound stream ends long after the call returned, in whichever task
iterates it; a context the peer leaves at the stream's end covers that
without the middleware holding a task.

Leaving runs shielded from cancellation, so keep it short.

This module does no I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import anyio

from ._exceptions import Failure

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._cluster import RemoteWorker
    from ._peer import Peer

__all__ = [
    "CallInfo",
    "Chain",
    "Middleware",
    "Outcome",
    "carried_trace",
    "log_failure",
    "log_refusal",
]

logger = logging.getLogger("astral.middleware")

#: A trace context that came with a call from another principal process
#: (``astral.redis``): the outbound call that carries it on starts with it in
#: :attr:`CallInfo.trace`, and sends it even without middleware.
carried_trace: ContextVar[Mapping[str, str] | None] = ContextVar(
    "astral_carried_trace", default=None
)

#: How a call ended.
Outcome: TypeAlias = Literal["result", "error", "cancelled"]


class CallInfo:
    """One call, as a middleware sees it: who, what, and how it ended.

    Attributes:
        direction: ``"inbound"`` (the remote called a capability here) or
            ``"outbound"`` (this peer called the remote).
        capability: The capability's name.
        call_id: The call's id on the wire (ids are per direction).
        peer: The :class:`astral.Peer` of the connection; ``peer.claims``
            are the remote's verified token claims. For a call through an
            :class:`astral.redis.RemoteWorker` (a worker on another
            principal process), that handle, which has ``subject`` and
            ``claims`` too.
        input: The call's input value.
        trace: The trace context carried in the call frame (string keys
            and values, such as ``traceparent``). Inbound: what the remote
            sent (empty if nothing). Outbound: a middleware may fill it
            before the call is sent.
        outcome: ``None`` while the call runs; then ``"result"``,
            ``"error"`` or ``"cancelled"``.
        output: The single result's output (``None`` for a stream).
        error: The exception the call ended with, when ``outcome`` is
            ``"error"``: inbound, what the capability (or a middleware)
            raised; outbound, what the caller got (:class:`astral.RemoteError`,
            :class:`astral.CallTimeout`, :class:`astral.ConnectionClosed`...).
        streaming: Whether the answer was a stream.
        items: How many stream items were sent (inbound) or taken (outbound).
        start_time: ``time.monotonic()`` when the call started.
        end_time: ``time.monotonic()`` when it ended, else ``None``.
        state: A dict for middleware to keep their own per-call values.
    """

    __slots__ = (
        "call_id",
        "capability",
        "direction",
        "end_time",
        "error",
        "input",
        "items",
        "outcome",
        "output",
        "peer",
        "start_time",
        "state",
        "streaming",
        "trace",
    )

    def __init__(
        self,
        direction: Literal["inbound", "outbound"],
        capability: str,
        call_id: str,
        *,
        peer: Peer | RemoteWorker,
        input: Any,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        self.direction = direction
        self.capability = capability
        self.call_id = call_id
        self.peer = peer
        self.input = input
        self.trace: dict[str, str] = {} if trace is None else dict(trace)
        self.outcome: Outcome | None = None
        self.output: Any = None
        self.error: BaseException | None = None
        self.streaming = False
        self.items = 0
        self.start_time = time.monotonic()
        self.end_time: float | None = None
        self.state: dict[str, Any] = {}

    @property
    def duration(self) -> float | None:
        """Seconds from start to end, or ``None`` while the call runs."""
        if self.end_time is None:
            return None
        return self.end_time - self.start_time

    def end(
        self, outcome: Outcome, *, output: Any = None, error: BaseException | None = None
    ) -> None:
        """Record how the call ended (the first outcome wins)."""
        if self.outcome is None:
            self.outcome = outcome
            self.output = output
            self.error = error
            self.end_time = time.monotonic()

    def __repr__(self) -> str:
        return (
            f"<CallInfo {self.direction} {self.capability!r} id={self.call_id!r} "
            f"outcome={self.outcome}>"
        )


#: A middleware: given the call, an async context manager around it.
Middleware: TypeAlias = Callable[[CallInfo], AbstractAsyncContextManager[object]]


class Chain:
    """The middleware of one call, entered in order and left in reverse."""

    __slots__ = ("_entered", "_middleware", "info")

    def __init__(self, middleware: Sequence[Middleware], info: CallInfo) -> None:
        self._middleware = middleware
        self.info = info
        self._entered: list[AbstractAsyncContextManager[object]] = []

    async def enter(self) -> Exception | None:
        """Enter each middleware; return the exception of one that refused.

        The middleware after a refusing one are not entered. Cancellation
        propagates (the entered ones are left by :meth:`leave`).
        """
        for middleware in self._middleware:
            try:
                context = middleware(self.info)
                await context.__aenter__()
            except Exception as exc:  # noqa: BLE001 - a middleware refusing or failing
                return exc
            self._entered.append(context)
        return None

    async def leave(self) -> Exception | None:
        """Leave every entered middleware, innermost first, shielded.

        Returns:
            The first exception a middleware raised while leaving (each is
            logged), else ``None``.
        """
        if self.info.outcome is None:
            self.info.end("cancelled")
        failure: Exception | None = None
        with anyio.CancelScope(shield=True):
            while self._entered:
                context = self._entered.pop()
                try:
                    await context.__aexit__(None, None, None)
                except Exception as exc:  # noqa: BLE001 - logged, and fails the call
                    log_refusal(self.info, exc, "leaving")
                    failure = failure or exc
                    if self.info.outcome == "result":
                        # The call fails after all: the outer middleware see that.
                        self.info.outcome = "error"
                        self.info.output = None
                        self.info.error = exc
        return failure

    async def end(
        self, error: BaseException | None, outcome: str | None = None
    ) -> Exception | None:
        """Record how an outbound call ended (``error``, or ``outcome="cancelled"``), then leave.

        Returns:
            What :meth:`leave` returns.
        """
        info = self.info
        if outcome == "cancelled" or isinstance(error, anyio.get_cancelled_exc_class()):
            info.end("cancelled")
        elif error is not None:
            info.end("error", error=error)
        else:
            info.end("result", output=info.output)
        return await self.leave()


def log_refusal(info: CallInfo, exc: Exception, when: str = "entering") -> None:
    """Log a middleware that failed a call: DEBUG for a Failure, else ERROR."""
    if isinstance(exc, Failure):
        logger.debug(
            "middleware failed %s call %r (id %r) %s it: %s (code %r)",
            info.direction,
            info.capability,
            info.call_id,
            when,
            exc,
            exc.code,
        )
    else:
        log_failure(info, exc, when)


def log_failure(info: CallInfo, exc: BaseException, when: str) -> None:
    """Log a middleware that raised something other than a deliberate Failure."""
    logger.error(
        "middleware failed %s %s call %r (id %r): %s: %s",
        when,
        info.direction,
        info.capability,
        info.call_id,
        type(exc).__name__,
        exc,
        exc_info=exc,
        extra={"astral_capability": info.capability, "astral_call_id": info.call_id},
    )
