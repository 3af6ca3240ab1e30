"""The hop between principal processes: its messages and the caller's side of a call.

Theory of operation. Principal processes ("nodes") that share a Redis talk
over Redis pub/sub: each node listens on its own channel. A call from node X
to a worker held by node Y goes X -> Redis -> Y -> worker and back:

* X sends ``["call", id, subject, capability, input, window]`` to Y. ``id``
  is X's own counter; Y knows the call as ``(X, id)``. A call with a
  deadline carries a seventh element, ``budget``: the milliseconds left when
  X sent it (``null`` if none). Y counts them from when it received the
  message and hands them to its local peer as the call's ``deadline``; X
  stops waiting (and sends ``cancel``) at its own deadline. A call whose
  middleware filled a trace context (:class:`astral.otel.TracingMiddleware`
  does) carries it as an eighth element, an object of strings; Y's local
  peer sends it on in the call frame, so the worker's span is a child of
  the caller's.
* Y calls its local :class:`~astral.Peer` and answers with
  ``["done", id, output]`` (a single result), or ``["item", id, output]``
  per streamed item and then ``["end", id]``, or ``["fail", id, kind,
  message, code]`` (``kind`` names the exception: see :data:`KINDS`).
* X sends ``["cancel", id]`` when its caller gives up (cancelled, timed out,
  left a stream early) and ``["credit", id, n]`` as its consumer takes items.
  Y sends an item only while it holds credit, and pulls the next item from
  its local stream only then: a slow consumer on X paces the worker, and at
  most ``window`` items of a call are ever between them (on Y, in Redis, on
  X).

Messages travel in batches: one pub/sub message is ``{"f": sender, "m":
[message, ...]}``, so a burst of frames to one node costs one publish. One
task per node publishes, in order, so the frames of a call arrive in order.
Anything that does not parse is dropped with a log line.

This module holds the message codec and the caller's objects
(:class:`RemoteWorker`, :class:`RemoteStream`); it knows no Redis client. The
:class:`Router` it talks to is :class:`astral.redis.RedisRegistry`.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from types import EllipsisType, MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import anyio
import orjson

from ._exceptions import (
    CallTimeout,
    ClusterError,
    ConnectionClosed,
    ProtocolError,
    RemoteError,
    StreamOverrun,
)
from ._frames import MAX_SAFE_INTEGER, MAX_TRACE_FIELDS, MAX_TRACE_VALUE
from ._middleware import CallInfo, Chain, log_refusal
from ._peer import _current_call, call_budget

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._middleware import Middleware

__all__ = ["RemoteStream", "RemoteWorker", "Router"]

#: Exception kinds a ``fail`` message carries, and the exception each becomes.
KINDS = ("remote", "closed", "timeout", "overrun", "protocol", "cluster")
#: Attributes of a RemoteError, besides its message, that cross the hop.
_REMOTE_EXTRAS = ("code", "data")
#: The largest budget (ms) a ``call`` message may carry, as on the wire protocol.
MAX_BUDGET = MAX_SAFE_INTEGER


def dump(value: Any) -> bytes:
    """Encode one message as JSON bytes.

    Raises:
        ProtocolError: The value cannot be written as JSON.
    """
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        pass
    try:
        # orjson stops at 64-bit integers; the worker's own codec decides
        # what it accepts, so wider ones are carried as they are.
        return json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"value is not JSON-serializable: {exc}") from None


def load(data: bytes) -> Any:
    """Decode JSON bytes (any integer width)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # integers beyond 64 bits; raises ValueError otherwise


def batch(sender: str, parts: list[bytes]) -> bytes:
    """One pub/sub payload carrying already encoded messages, in order."""
    return b'{"f":' + orjson.dumps(sender) + b',"m":[' + b",".join(parts) + b"]}"


def parse(data: bytes | str) -> tuple[str, list[list[Any]], int]:
    """Read one pub/sub payload: its sender, its well-formed messages, how many were not.

    Raises:
        ValueError: The payload is not a batch at all (not JSON, wrong shape);
            a malformed message inside a good batch is left out instead, so
            what is well-formed still gets through.
    """
    if isinstance(data, str):
        data = data.encode()
    obj = load(data)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - one error for bad data
    sender, messages = obj.get("f"), obj.get("m")
    if not isinstance(sender, str) or not isinstance(messages, list):
        raise ValueError("no sender or message list")  # noqa: TRY004
    good = [m for m in messages if _well_formed(m)]
    return sender, good, len(messages) - len(good)


def _well_formed(message: Any) -> bool:
    if not isinstance(message, list) or len(message) < 2:
        return False
    kind, call_id, n = message[0], message[1], len(message)
    if type(call_id) is not int:
        return False
    if kind in {"item", "done"}:
        return n == 3
    if kind in {"end", "cancel"}:
        return n == 2
    if kind == "credit":
        return n == 3 and type(message[2]) is int and message[2] > 0
    if kind == "call":
        return (
            (
                n == 6
                or (n == 7 and _budget_ok(message[6]))
                # null only as a placeholder before a trace
                or (
                    n == 8
                    and (message[6] is None or _budget_ok(message[6]))
                    and _trace_ok(message[7])
                )
            )
            and isinstance(message[2], str)
            and isinstance(message[3], str)
            and type(message[5]) is int
            and message[5] > 0
        )
    if kind == "fail":
        return (
            (n == 5 or (n == 6 and isinstance(message[5], dict)))
            and message[2] in KINDS
            and isinstance(message[3], str)
            and (message[4] is None or type(message[4]) is int)
        )
    return False


def _budget_ok(budget: Any) -> bool:
    return type(budget) is int and 0 <= budget <= MAX_BUDGET


def _trace_ok(trace: Any) -> bool:
    # What the wire protocol accepts in a call frame's trace (astral._frames).
    return (
        type(trace) is dict
        and len(trace) <= MAX_TRACE_FIELDS
        and all(
            type(value) is str and len(key) <= 256 and len(value) <= MAX_TRACE_VALUE
            for key, value in trace.items()
        )
    )


def failure(
    kind: str, message: str, code: int | None, extra: dict[str, Any] | None = None
) -> BaseException:
    """The exception a ``fail`` message stands for, as the local peer raised it.

    ``extra`` carries a :class:`RemoteError`'s other attributes (its error
    ``code`` and ``data``, where the peer sets them), so they cross too.
    """
    if kind == "remote":
        error = RemoteError(message)
        for name, value in (extra or {}).items():
            if name in _REMOTE_EXTRAS:
                setattr(error, name, value)
        return error
    if kind == "timeout":
        return CallTimeout(message)
    if kind == "overrun":
        return StreamOverrun(message)
    if kind == "protocol":
        return ProtocolError(message)
    if kind == "cluster":
        return ClusterError(message)
    return ConnectionClosed(message, code=code)


def describe(error: BaseException) -> tuple[str, str, int | None, dict[str, Any] | None]:
    """The ``fail`` fields (kind, message, close code, extras) of a local call's exception."""
    if isinstance(error, RemoteError):
        extra = {
            name: value
            for name in _REMOTE_EXTRAS
            if (value := getattr(error, name, None)) is not None
        }
        return "remote", error.message, None, extra or None
    if isinstance(error, CallTimeout):
        return "timeout", str(error), None, None
    if isinstance(error, StreamOverrun):
        return "overrun", str(error), None, None
    if isinstance(error, ProtocolError):
        return "protocol", str(error), None, None
    if isinstance(error, ClusterError):
        return "cluster", error.reason, None, None
    if isinstance(error, ConnectionClosed):
        return "closed", error.reason, error.code, None
    return "remote", "internal error", None, None


class Router(Protocol):
    """What the caller's objects need from the registry that carries them."""

    window: int
    timeout: float | None
    middleware: tuple[Middleware, ...]

    def open_call(self, node: str, capability: str, call_id: int | None = None) -> RemoteCall:
        """Register a new outgoing call to ``node`` (under ``call_id`` if given)."""
        ...

    def next_id(self) -> int:
        """A new call id, for a call about to be opened."""
        ...

    def post(self, node: str, part: bytes) -> None:
        """Queue one encoded message for ``node``; raise ClusterError if Redis is down."""
        ...

    def forget(self, call: RemoteCall, *, cancel: bool) -> None:
        """Route nothing more to ``call``; with ``cancel``, tell its node to stop it."""
        ...

    def node_gone(self, node: str) -> bool:
        """Whether ``node`` is known to have left."""
        ...


class RemoteCall:
    """One outgoing call's inbox: what its node sent, and how it ended.

    A deque and an event rather than a memory object stream: one consumer,
    messages handed over without waiting, and a call's path is hot.
    """

    __slots__ = (
        "_closed",
        "_inbox",
        "_limit",
        "_waiter",
        "capability",
        "done",
        "error",
        "id",
        "node",
        "until",
    )

    def __init__(self, call_id: int, node: str, capability: str, window: int) -> None:
        self.id = call_id
        self.node = node
        self.capability = capability
        # The caller's own deadline (anyio clock), enforced here; None if none,
        # or if it is inherited (the capability's cancel scope enforces that).
        self.until: float | None = None
        self.error: BaseException | None = None
        self.done = False  # the node sent its terminal message, or the call was forgotten
        self._inbox: deque[list[Any]] = deque()
        self._limit = window + 1  # a window of items, then the terminal message
        self._closed = False  # nothing more will be delivered
        self._waiter: anyio.Event | None = None

    def deliver(self, message: list[Any]) -> bool:
        """Hand over one message without waiting; False if the call must end."""
        if self._closed:
            return False
        if len(self._inbox) >= self._limit:
            # The node ignored flow control: fail this call, not the link.
            self.fail(StreamOverrun(f"call {self.capability}: node sent beyond its credit"))
            return False
        self._inbox.append(message)
        self._wake()
        return True

    def close(self) -> None:
        """Nothing more will arrive; what did is still read."""
        self._closed = True
        self._wake()

    def discard(self) -> None:
        """Nothing more will be read: drop what arrived."""
        self._closed = True
        self._inbox.clear()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.close()

    async def next(self, timeout: float | None) -> list[Any]:
        until = self.until
        if until is not None and anyio.current_time() >= until:
            self.fail(CallTimeout(f"call {self.capability} missed its deadline"))
            self._inbox.clear()  # too late for what arrived
        inbox = self._inbox
        while not inbox and not self._closed:
            wait = math.inf if timeout is None else timeout
            if until is not None:
                wait = min(wait, until - anyio.current_time())
            waiter = self._waiter = anyio.Event()
            if wait == math.inf:
                await waiter.wait()
                continue
            with anyio.move_on_after(wait):
                await waiter.wait()
                continue
            if until is not None and anyio.current_time() >= until:
                self.fail(CallTimeout(f"call {self.capability} missed its deadline"))
            else:
                self.fail(CallTimeout(f"call {self.capability} timed out"))
        if inbox:
            return inbox.popleft()
        error = self.error
        if isinstance(error, ClusterError):
            raise ClusterError(error.reason) from error
        if isinstance(error, ConnectionClosed):
            raise ConnectionClosed(error.reason, code=error.code) from error
        raise error or ConnectionClosed("call abandoned")


def _resolve(router: Router, timeout: float | EllipsisType | None) -> float | None:
    return router.timeout if timeout is ... else timeout


def _budget(
    capability: str, timeout: float | EllipsisType | None, deadline: float | None
) -> tuple[int | None, float | None, float | EllipsisType | None]:
    """A call's deadline, as :meth:`astral.Peer.call` works it out (see :func:`call_budget`).

    The budget is ``None`` when the call has no deadline at all.
    """
    inherited = _current_call.get(None)
    inherited_until = None if inherited is None else inherited.deadline
    if deadline is None and inherited_until is None:
        return None, None, timeout
    return call_budget(capability, timeout, deadline, inherited_until)


class RemoteStream:
    """The items of a streaming call to a worker on another process.

    Behaves as :class:`astral.Stream`: ``async for`` yields each item in
    order; leaving early (through ``async with``, :meth:`aclose`, or
    cancellation) tells the worker to stop.

    Raises (from iteration):
        RemoteError: The worker's stream failed.
        CallTimeout: No first item arrived within the call's timeout.
        ConnectionClosed: The worker, or the process holding it, left;
            :class:`astral.ClusterError` when Redis went away.
    """

    __slots__ = (
        "_call",
        "_chain",
        "_done",
        "_first",
        "_router",
        "_taken",
        "_thread",
        "_timeout",
    )

    def __init__(
        self,
        router: Router,
        call: RemoteCall,
        first: list[Any] | None,
        timeout: float | None,
        chain: Chain | None = None,
    ) -> None:
        self._router = router
        # The middleware watching this call; left once the stream ends.
        self._chain = chain
        self._call = call
        self._first = first
        self._timeout = timeout
        self._done = False
        self._taken = 0
        self._thread = threading.get_ident()

    def __del__(self) -> None:
        # Dropped without aclose(): the worker must not wait for credit, and
        # the buffer must be closed. Only on the event loop's own thread.
        if not self._done and threading.get_ident() == self._thread:
            try:
                self._close()
            except Exception:  # noqa: BLE001, S110 - never raise from a finalizer
                pass

    @property
    def capability(self) -> str:
        """The name of the remote capability this stream comes from."""
        return self._call.capability

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._first is not None:
            message, self._first = self._first, None
        elif self._done:
            raise StopAsyncIteration
        else:
            try:
                message = await self._call.next(self._timeout)
            except BaseException as exc:
                self._close()
                if self._chain is not None:
                    await self._leave(exc)
                raise
        self._timeout = None  # only the first frame is timed
        kind = message[0]
        if kind == "item":
            self._took()
            return message[2]
        self._close()
        error = failure(*message[2:]) if kind == "fail" else None
        if self._chain is not None:
            await self._leave(error)
        if error is not None:
            raise error
        if kind == "done" and message[2] is not None:
            return message[2]
        raise StopAsyncIteration

    async def _leave(self, error: BaseException | None, outcome: str | None = None) -> None:
        chain, self._chain = self._chain, None
        assert chain is not None
        failed = await chain.end(error, outcome)
        if failed is not None and error is None and outcome is None:
            raise failed

    def _took(self) -> None:
        if self._chain is not None:
            self._chain.info.items += 1
        self._taken += 1
        if self._taken >= max(1, self._router.window // 2) and not self._call.done:
            try:
                self._router.post(self._call.node, dump(["credit", self._call.id, self._taken]))
            except ClusterError:
                return  # the link is down: the call fails on its own
            self._taken = 0

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._router.forget(self._call, cancel=True)

    async def aclose(self) -> None:
        """Stop the stream; if it still runs, the worker is told to stop. Never raises.

        Blocks only while middleware record how the call ended.
        """
        self._close()
        if self._chain is not None:
            await self._leave(None, "cancelled")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class RemoteWorker:
    """A worker connected to another principal process, reached through Redis.

    :meth:`astral.redis.RedisRegistry.wait_for` and ``lookup`` return one for
    a worker held elsewhere (and the :class:`~astral.Peer` itself for one held
    here); both have the shape of :class:`astral.Worker`, with the same
    exceptions.

    Attributes:
        node: The id of the principal process holding the worker.
    """

    __slots__ = ("_claims", "_router", "_subject", "node")

    def __init__(self, router: Router, subject: str, node: str, claims: Mapping[str, Any]) -> None:
        self._router = router
        self._subject = subject
        self._claims: Mapping[str, Any] = MappingProxyType(dict(claims))
        self.node = node

    def __repr__(self) -> str:
        return f"<RemoteWorker {self._subject!r} on {self.node}>"

    @property
    def subject(self) -> str:
        """The ``sub`` claim of the worker's token."""
        return self._subject

    @property
    def claims(self) -> Mapping[str, Any]:
        """The worker's verified token claims, as its principal process saw them."""
        return self._claims

    @property
    def closed(self) -> bool:
        """Whether the process holding the worker is known to have left."""
        return self._router.node_gone(self.node)

    async def _open(
        self,
        capability: str,
        input: Any,
        timeout: float | EllipsisType | None,
        deadline: float | None = None,
        info: CallInfo | None = None,
    ) -> tuple[RemoteCall, float | None]:
        router = self._router
        # Worked out and encoded before anything is registered: a bad input,
        # a bad deadline or one already passed leaves no trace.
        budget, until, timeout = _budget(capability, timeout, deadline)
        rest = b",".join((b"", dump(self._subject), dump(capability), dump(input)))
        rest += b"," + str(router.window).encode()
        trace = None if info is None else info.trace
        if trace:
            rest += b"," + (b"null" if budget is None else str(budget).encode())
            rest += b"," + dump(trace)
        elif budget is not None:
            rest += b"," + str(budget).encode()
        rest += b"]"
        call = router.open_call(self.node, capability, None if info is None else int(info.call_id))
        call.until = until
        try:
            router.post(self.node, b'["call",' + str(call.id).encode() + rest)
        except BaseException:
            router.forget(call, cancel=False)
            raise
        return call, _resolve(router, timeout)

    async def call(
        self,
        capability: str,
        input: Any = None,
        *,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
    ) -> Any:
        """Call a capability of the worker, through the process that holds it.

        Args:
            capability: The registered name on the worker.
            input: Any JSON value.
            timeout: Seconds to wait for the first frame; ``None`` waits
                forever; by default the registry's ``timeout``, or no
                timeout with a ``deadline``.
            deadline: Seconds the whole call may take, stream included, as
                for :meth:`astral.Peer.call`. The budget crosses to the
                process holding the worker, which passes it on: the worker's
                capability is cancelled then (if it agreed to the
                ``deadline`` feature). Called from inside a capability, the
                call inherits that capability's deadline (the earlier of the
                two counts).

        Returns:
            The worker's output, or a :class:`RemoteStream` if it streams.

        Raises:
            RemoteError: The capability failed or is unknown (same message).
            CallTimeout: Nothing arrived within ``timeout``, or the call
                missed its deadline; the worker was told to stop.
            ConnectionClosed: The worker or its process left before the answer.
            ClusterError: Redis is unreachable (a :class:`ConnectionClosed`).
            ProtocolError: ``input`` cannot be sent as JSON.
            ValueError: ``deadline`` is not a positive number.
        """
        if self._router.middleware:
            return await self._call_observed(capability, input, timeout, deadline)
        call, seconds = await self._open(capability, input, timeout, deadline)
        try:
            message = await call.next(seconds)
        except BaseException:
            self._router.forget(call, cancel=True)
            raise
        kind = message[0]
        if kind == "item":
            return RemoteStream(self._router, call, message, None)
        self._router.forget(call, cancel=False)
        if kind == "fail":
            raise failure(*message[2:])
        if kind == "done":
            return message[2]
        return None  # an empty stream, as a local peer returns it

    async def _enter(self, capability: str, input: Any) -> Chain:
        """Run the registry's middleware's entry for a call about to be sent."""
        router = self._router
        info = CallInfo("outbound", capability, str(router.next_id()), peer=self, input=input)
        chain = Chain(router.middleware, info)
        try:
            refused = await chain.enter()
        except BaseException as exc:
            await chain.end(exc)
            raise
        if refused is not None:
            log_refusal(info, refused)
            await chain.end(refused)
            raise refused
        return chain

    async def _call_observed(
        self,
        capability: str,
        input: Any,
        timeout: float | EllipsisType | None,
        deadline: float | None,
    ) -> Any:
        chain = await self._enter(capability, input)
        info = chain.info
        try:
            call, seconds = await self._open(capability, input, timeout, deadline, info)
            try:
                message = await call.next(seconds)
            except BaseException:
                self._router.forget(call, cancel=True)
                raise
        except BaseException as exc:
            await chain.end(exc)
            raise
        kind = message[0]
        if kind == "item":
            info.streaming = True
            return RemoteStream(self._router, call, message, None, chain)
        self._router.forget(call, cancel=False)
        error: BaseException | None = None
        if kind == "fail":
            error = failure(*message[2:])
        else:
            info.output = message[2] if kind == "done" else None
        failed = await chain.end(error)
        if error is not None:
            raise error
        if failed is not None:
            raise failed
        return info.output

    def stream(
        self,
        capability: str,
        input: Any = None,
        *,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
    ) -> _StreamContext:
        """Call a capability and iterate over what it streams.

        ::

            async with worker.stream("generate", {"prompt": "hi"}) as items:
                async for item in items:
                    print(item)

        Args:
            capability: The registered name on the worker.
            input: Any JSON value.
            timeout: Seconds to wait for the first item; see :meth:`call`.
            deadline: Seconds the whole stream may take; see :meth:`call`.

        Returns:
            An async context manager giving a :class:`RemoteStream`.

        Raises:
            ClusterError: Redis is unreachable.
            ProtocolError: ``input`` cannot be sent as JSON.
            ValueError: ``deadline`` is not a positive number.
            CallTimeout: The inherited deadline has already passed.
        """
        return _StreamContext(self, capability, input, timeout, deadline)


class _StreamContext:
    __slots__ = ("_args", "_stream", "_worker")

    def __init__(
        self,
        worker: RemoteWorker,
        capability: str,
        input: Any,
        timeout: float | EllipsisType | None,
        deadline: float | None,
    ) -> None:
        self._worker = worker
        self._args = (capability, input, timeout, deadline)
        self._stream: RemoteStream | None = None

    async def __aenter__(self) -> RemoteStream:
        worker = self._worker
        capability, input, timeout, deadline = self._args
        if not worker._router.middleware:
            call, seconds = await worker._open(capability, input, timeout, deadline)
            self._stream = RemoteStream(worker._router, call, None, seconds)
            return self._stream
        chain = await worker._enter(capability, input)
        chain.info.streaming = True
        try:
            call, seconds = await worker._open(capability, input, timeout, deadline, chain.info)
        except BaseException as exc:
            await chain.end(exc)
            raise
        self._stream = RemoteStream(worker._router, call, None, seconds, chain)
        return self._stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            await self._stream.aclose()
