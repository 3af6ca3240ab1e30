"""The AnyIO driver: a :class:`Peer` runs one connection.

Where a frame goes:

* **enters**: :meth:`Peer._on_message`, awaited with each message by the
  peer's one reader task (:meth:`Peer._read_loop`): over astral's WebSocket
  the reader task reads the socket itself and the WebSocket layer hands each
  message over as it is assembled (``WebSocketConnection.deliver``); over
  any other transport it loops on ``transport.receive()``. The text goes to
  the sans-IO :class:`~astral._protocol.PeerState`;
* **is routed**: the event that comes back is acted on without awaiting:
  an item or result goes into the waiting call's memory object stream, a
  call is handed to an idle worker task (one is started when none is
  idle), a cancel cancels that call's scope, credit lets that call's stream
  go on, a refusal is queued for the control writer;
* **leaves**: callers and inbound-call tasks await ``transport.send``
  themselves (so a slow remote pushes back on them, not on the reader), or,
  alone in flight, write at once (``write_now``); the
  reader's own replies, and the caller's cancel and credit frames, go
  through :meth:`Peer._control_loop`, so neither the reader nor a cancelled
  caller ever awaits the network. Call timeouts are kept by one alarm per
  peer (:mod:`astral._alarm`: no task of its own), not a cancel scope per call.

All tasks live in a task group owned by the peer; none outlives
``async with Peer(...)``.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
from collections import deque
from contextlib import aclosing, asynccontextmanager
from types import EllipsisType, MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Self, TypeAlias, TypeVar, overload

import anyio
import anyio.abc
import anyio.lowlevel

from ._alarm import Alarm
from ._deadlines import Deadlines, Until
from ._dispatch import INTERNAL, error_result, input_items, start, stream
from ._exceptions import (
    CallTimeout,
    ConnectionClosed,
    Failure,
    ProtocolError,
    RemoteError,
    StreamOverrun,
)
from ._frames import MAX_SAFE_INTEGER, Cancel, Item, Result, Yield, encode
from ._handshake import agreed
from ._logs import protocol_warnings
from ._middleware import CallInfo, Chain, carried_trace, log_refusal
from ._protocol import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    DEADLINE_EXCEEDED_CODE,
    CancelInbound,
    CreditInbound,
    Deliver,
    Fail,
    InputInbound,
    PeerState,
    Reply,
    StartInbound,
    WantOutbound,
)
from ._ref import unref
from ._transport import CLOSED_ERRORS, AnyTransport, close_transport

if TYPE_CHECKING:
    from collections.abc import (
        AsyncIterable,
        AsyncIterator,
        Awaitable,
        Callable,
        Coroutine,
        Iterable,
        Mapping,
        Sequence,
    )
    from contextlib import AbstractAsyncContextManager

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from ._dispatch import Capabilities
    from ._frames import Call, End, JsonDefault
    from ._middleware import Middleware
    from ._ref import Ref, Signed

__all__ = ["CallContext", "Peer", "Stream", "accept", "current_call", "current_peer"]

logger = logging.getLogger("astral.peer")
capability_logger = logging.getLogger("astral.capability")

_current_peer: contextvars.ContextVar[Peer] = contextvars.ContextVar("astral.current_peer")
# The inbound call whose capability runs in this context (its deadline is
# inherited by the calls it makes, on any peer).
_current_call: contextvars.ContextVar[_Inbound] = contextvars.ContextVar("astral.current_call")

T = TypeVar("T")
OutputT = TypeVar("OutputT")
ArgsT = ParamSpec("ArgsT")

#: Defaults, documented in docs/limits.md.
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_INBOUND_CALLS = 1000
DEFAULT_MAX_BUFFERED_ITEMS = 1024
#: The error a callee sends when its caller streams more input items than it asked for.
INPUT_OVERRUN = "input stream overrun"
#: The feature a call with an input stream needs.
INPUT_STREAM = "input-stream"
#: Seconds the reader waits, with ``max_inbound_calls`` answers queued, for the
#: remote to take any of them before it is cut off as a flooder (1008).
FLOOD_GRACE = 5.0


def check_limits(timeout: float | None, max_inbound_calls: int, max_buffered_items: int) -> None:
    """Refuse limits that cannot work, before anything is opened.

    Raises:
        ValueError: If ``timeout`` is not positive (or ``None``), or a count is below 1.
    """
    if timeout is not None and not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds, or None")
    if max_inbound_calls < 1 or max_buffered_items < 1:
        raise ValueError("max_inbound_calls and max_buffered_items must be at least 1")


#: Close codes :meth:`Peer.aclose` accepts besides 3000-4999 (RFC 6455 7.4).
_CLOSE_CODES = frozenset({1000, 1001})
_MAX_REASON_BYTES = 123


def check_close(code: int, reason: str) -> None:
    """Refuse a close code an application may not send, or a reason too long.

    Raises:
        ValueError: ``code`` is not 1000, 1001 or 3000-4999, or ``reason``
            is longer than 123 bytes of UTF-8.
    """
    if code not in _CLOSE_CODES and not 3000 <= code <= 4999:
        raise ValueError(f"close code must be 1000, 1001 or 3000-4999, not {code}")
    if len(reason.encode("utf-8", "surrogatepass")) > _MAX_REASON_BYTES:
        raise ValueError(f"close reason must be at most {_MAX_REASON_BYTES} bytes of UTF-8")


def current_peer() -> Peer:
    """Return the peer whose remote called the running capability.

    A capability can use it to call back (``await current_peer().call(...)``)
    or to read the caller's verified token claims (``current_peer().claims``).

    Raises:
        RuntimeError: If called outside a capability run by a peer.
    """
    try:
        return _current_peer.get()
    except LookupError:
        raise RuntimeError("current_peer() called outside a capability run by a peer") from None


class CallContext:
    """The remote call a capability is serving: see :func:`current_call`.

    Attributes:
        id: The call's id, as the caller chose it.
        capability: The name it was called by.
        deadline: When the caller stops waiting, on :func:`anyio.current_time`'s
            clock, or ``None`` if the call has no deadline. The capability is
            cancelled then, and the calls it makes meanwhile inherit it.
    """

    __slots__ = ("capability", "deadline", "id")

    def __init__(self, call_id: str, capability: str, deadline: float | None) -> None:
        self.id = call_id
        self.capability = capability
        self.deadline = deadline

    def time_remaining(self) -> float | None:
        """Seconds left until :attr:`deadline` (0 once passed), or ``None`` if none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - anyio.current_time())

    def __repr__(self) -> str:
        return f"CallContext(id={self.id!r:.60}, capability={self.capability!r:.60})"


def call_budget(
    capability: str,
    timeout: float | EllipsisType | None,
    deadline: float | None,
    inherited: float | None,
) -> tuple[int, float | None, float | EllipsisType | None]:
    """A call's deadline: what to send, what the caller enforces, the first-frame timeout.

    ``deadline`` is the caller's explicit one (seconds), ``inherited`` the
    deadline of the capability the call is made from (on the anyio clock).
    Returns the remaining budget in ms (the earlier of the two counts,
    rounded up: a callee never gives up before its caller, so a capability
    that relays a call under its own deadline is ended by that deadline, not
    a moment earlier by the call it made), the
    explicit deadline as a time if it is the earlier one (the caller's to
    enforce, with a timer; an inherited one is enforced by that capability's
    own cancel scope, which ends at the same moment) or ``None``, and the
    first-frame timeout (an explicit deadline replaces the default one).
    Shared by :class:`Peer` and :class:`astral.redis.RemoteWorker`.

    Raises:
        ValueError: ``deadline`` is not a positive number.
        CallTimeout: The inherited deadline has already passed.
    """
    now = anyio.current_time()
    until = math.inf
    own: float | None = None
    if deadline is not None:
        if not deadline > 0:
            raise ValueError("deadline must be a positive number of seconds, or None")
        until = own = now + deadline
        if timeout is ...:
            timeout = None
    if inherited is not None and inherited < until:
        until, own = inherited, None
        if until <= now:
            raise CallTimeout(f"call {capability} missed its deadline")
    return min(MAX_SAFE_INTEGER, math.ceil((until - now) * 1000)), own, timeout


def current_call() -> CallContext:
    """Return the remote call the running capability is serving.

    ::

        async def work(input):
            left = astral.current_call().time_remaining()  # None: no deadline

    Raises:
        RuntimeError: If called outside a capability run by a peer.
    """
    try:
        handle = _current_call.get()
    except LookupError:
        raise RuntimeError("current_call() called outside a capability run by a peer") from None
    call = handle.call
    assert call is not None
    return CallContext(call.id, call.capability, handle.deadline)


class _Channel:
    """The frames the reader hands one of our calls, and the call's fate.

    A deque and, only while the consumer waits, an event: no memory object
    stream (whose ``receive()`` spends a turn of the loop before it waits,
    and which allocates five objects per call).
    """

    __slots__ = (
        "buffered",
        "call_id",
        "capability",
        "ended",
        "error",
        "frames",
        "gone",
        "pump",
        "size",
        "until",
        "waiter",
    )

    def __init__(self, capability: str, size: int) -> None:
        self.capability = capability
        self.until: float | None = None  # the call's deadline, if any
        self.pump: _Pump | None = None  # the call's input stream, if any
        self.call_id = ""
        self.error: BaseException | None = None
        self.buffered = 0  # frames delivered and not yet taken
        self.frames: deque[Yield | Result] = deque()
        # One slot more than the flow-control window: the terminal result
        # must fit behind a full window of items.
        self.size = size + 1
        self.ended = False  # no frame will be added (result, failure)
        self.gone = False  # the consumer has left: frames are dropped
        self.waiter: anyio.Event | None = None  # the consumer waits for a frame

    def put(self, frame: Yield | Result) -> bool | None:
        """Add a frame: True if added, False if the buffer is full, None if no one reads."""
        if self.gone or self.ended:
            return None
        if len(self.frames) >= self.size:
            return False
        self.frames.append(frame)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter.set()
        return True

    def end(self) -> None:
        """No more frames: the consumer reads what is buffered, then the end."""
        self.ended = True
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter.set()

    def leave(self) -> None:
        """The consumer has gone: drop what is buffered, take nothing more."""
        self.gone = True
        self.frames.clear()
        self.end()

    def fail(self, error: BaseException) -> None:
        # The buffer may be full, so the error travels beside the frames: the
        # consumer reads what arrived, then meets the error at the end.
        if self.error is None:
            self.error = error
        self.end()

    async def next(self) -> Yield | Result:
        # Buffered frames are taken without a trip through the event loop; at
        # most a window of them. Waiting is a cancellation point as usual.
        frames = self.frames
        while not frames and not self.ended:
            waiter = self.waiter = anyio.Event()
            await waiter.wait()
        if frames:
            self.buffered -= 1
            return frames.popleft()
        error = self.error
        if isinstance(error, ConnectionClosed):
            # The connection's error is shared by every pending call: raise a
            # copy per call, so tracebacks do not pile up on one instance.
            raise ConnectionClosed(error.reason, code=error.code) from error
        raise error or ConnectionClosed("call abandoned")


_Work: TypeAlias = "tuple[Call, Callable[[Any], Any], _Inbound]"


class _Idle:
    """An idle worker: the event it waits on, and the call handed to it."""

    __slots__ = ("wake", "work")

    def __init__(self) -> None:
        self.wake = anyio.Event()
        self.work: _Work | None = None


#: A worker that finishes the only call in flight parks for the next one only if
#: the last two calls began less than this many seconds apart; otherwise it ends.
WORKER_IDLE = 1.0


class _Latch:
    """A one-way flag with ``anyio.Event``'s API, whose event is made only if someone waits.

    One per connection for "closed" and "stopped": most are set without
    anyone waiting (memory per idle connection: an asyncio ``Event`` costs
    about 900 bytes, this 56).
    """

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: anyio.Event | None = None

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if self._set:
            await anyio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class _Pump:
    """The input stream of one of our calls: what the callee wants, and its task's scope."""

    __slots__ = ("credit", "more", "scope")

    def __init__(self) -> None:
        self.credit = 0  # items the callee has asked for and not yet received
        self.more: anyio.Event | None = None
        self.scope = anyio.CancelScope()

    def grant(self, n: int) -> None:
        self.credit += n
        if self.more is not None:
            self.more.set()

    def stop(self) -> None:
        """The call has ended: stop sending, at once."""
        self.scope.cancel()

    async def spend(self) -> None:
        """Wait until the callee wants one more item, and take it."""
        while self.credit <= 0:
            self.more = anyio.Event()
            await self.more.wait()
        self.more = None
        self.credit -= 1


class _InputItems:
    """What a capability iterates to read its caller's input stream.

    The reader puts items in without waiting (at most the window it asked
    for); each half window taken is asked for again with a ``want`` frame.
    """

    __slots__ = ("_batch", "_call_id", "_peer", "_receive", "_send", "_taken")

    def __init__(self, peer: Peer, call_id: str, window: int) -> None:
        self._peer = peer
        self._call_id = call_id
        self._batch = max(1, window // 2)
        self._taken = 0
        self._send, self._receive = anyio.create_memory_object_stream[Any](window)

    def put(self, value: Any) -> bool:
        """Hand over one item; False if the caller sent more than it was granted."""
        try:
            self._send.send_nowait(value)
        except anyio.WouldBlock:
            return False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # ended, or the capability stopped reading: nothing to feed
        return True

    def end(self) -> None:
        self._send.close()

    def close(self) -> None:
        self._send.close()
        self._receive.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        try:
            try:
                value = self._receive.receive_nowait()
            except anyio.WouldBlock:
                value = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None
        self._taken += 1
        if self._taken >= self._batch:
            peer = self._peer
            peer._send_control(peer._state.want(self._call_id, self._taken))
            self._taken = 0
        return value


class _Inbound:
    """A remote call running here: its cancel scope, who cancelled it, its credit."""

    __slots__ = ("by_remote", "call", "credit", "deadline", "error", "items", "more", "scope")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.by_remote = False
        self.call: Call | None = None
        # When the caller's deadline passes, on this peer's clock.
        self.deadline: float | None = None
        self.items: _InputItems | None = None  # its input stream, if the capability takes one
        self.error: str | None = None  # why this side stopped it (the caller broke a rule)
        # Items it may still stream; None when the caller asked for no flow
        # control (the original never does).
        self.credit: int | None = None
        self.more: anyio.Event | None = None

    def grant(self, n: int) -> None:
        if self.credit is not None:
            self.credit += n
            if self.more is not None:
                self.more.set()

    async def spend(self) -> None:
        """Wait until one more item may be sent, and take it."""
        if self.credit is None:
            return
        while self.credit <= 0:
            self.more = anyio.Event()
            await self.more.wait()
        self.more = None
        self.credit -= 1


class Stream(Generic[T]):
    """The items of a streaming call, as an async iterator.

    Generic in the type of its items: ``Stream[str]`` from a typed reference
    (:func:`astral.ref`), ``Stream[Any]`` from a call by name.

    ``async for item in stream`` yields each item in order and ends when the
    remote's stream ends. A result's output, if any, is the last item. If the
    remote fails part-way, the items it sent come first, then
    :class:`RemoteError` is raised.

    Leaving early must tell the remote to stop: use the stream as an async
    context manager (:meth:`Peer.stream` does) or call :meth:`aclose`.

    Raises (from iteration):
        RemoteError: The remote stream failed.
        CallTimeout: No first item arrived within the call's timeout.
        StreamOverrun: This consumer fell more than ``max_buffered_items``
            behind; the remote was told to stop.
        ValidationError: An item did not fit the typed reference's output
            type; the stream goes on.
        ConnectionClosed: The connection ended.
    """

    __slots__ = ("_chain", "_channel", "_convert", "_done", "_first", "_peer", "_taken")

    def __init__(
        self,
        peer: Peer,
        channel: _Channel,
        first: Yield | None,
        *,
        chain: Chain | None = None,
        convert: Callable[[Any], T] | None = None,
    ) -> None:
        self._peer = peer
        self._channel = channel
        self._first = first
        self._convert = convert
        self._done = False
        self._taken = 0
        # The middleware watching this call; left once the stream ends.
        self._chain = chain

    @property
    def capability(self) -> str:
        """The name of the remote capability this stream comes from."""
        return self._channel.capability

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        # One coroutine per item, not two: this is the hot path of a stream.
        if self._first is not None:
            first, self._first = self._first, None
            self._took()
            return self._item(first.output)
        if self._done:
            raise StopAsyncIteration
        try:
            frame = await self._channel.next()
        except BaseException as exc:
            self._close()
            if self._chain is not None:
                await self._leave(exc)
            raise
        if isinstance(frame, Yield):
            self._took()
            return self._item(frame.output)
        self._close()
        if frame.error is not None:
            error = _remote_error(frame, self._channel.capability)
            if self._chain is not None:
                await self._leave(error)
            raise error
        if frame.output is None:
            if self._chain is not None:
                await self._leave(None)
            raise StopAsyncIteration
        if self._chain is not None:
            await self._leave(None)
        return self._item(frame.output)

    def _item(self, output: Any) -> T:
        convert = self._convert
        return output if convert is None else convert(output)

    async def _leave(self, error: BaseException | None, outcome: str | None = None) -> None:
        chain, self._chain = self._chain, None
        assert chain is not None
        failure = await chain.end(error, outcome)
        if failure is not None and error is None and outcome is None:
            raise failure

    def __del__(self) -> None:
        # A stream dropped without aclose() must not leave the remote waiting
        # for credit, holding a slot, until the connection ends. Only on the
        # peer's own thread: the cyclic GC may run a finalizer in any thread.
        if not self._done and threading.get_ident() == self._peer._thread:
            try:
                self._close()
            except Exception:  # noqa: BLE001, S110 - never raise from a finalizer
                pass

    def _took(self) -> None:
        if self._chain is not None:
            self._chain.info.items += 1
        # Flow control: hand the remote credit for half a window at a time,
        # so it never waits while this consumer keeps up.
        self._taken += 1
        if self._taken >= self._peer._credit_batch:
            self._peer._grant(self._channel, self._taken)
            self._taken = 0

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._peer._abandon(self._channel)

    async def aclose(self) -> None:
        """Stop the stream; if it is still running, the remote is told to stop.

        Never raises. Blocks only while middleware record how the call ended.
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


class Peer:
    """One end of an astral connection: calls out, serves calls in.

    Use it as an async context manager; it runs a reader task (and one task
    per inbound call) in its own task group, and leaving the block closes the
    transport and ends every task::

        async with Peer(transport, capabilities={"echo": echo}) as peer:
            print(await peer.call("add", [1, 2]))

    Args:
        transport: Carries text messages (see :class:`astral.Transport`;
            an AnyIO object stream of ``str`` will do too).
        capabilities: The names the remote may call, mapped to capabilities
            (see :class:`astral.Callable`).
        claims: The remote's verified token claims, for capabilities to read
            through ``current_peer().claims``.
        timeout: Default seconds a :meth:`call` waits for its first frame;
            ``None`` waits forever.
        max_inbound_calls: How many remote calls may run here at once; one
            more is refused with ``"too many concurrent calls"``.
        max_buffered_items: Items buffered per streaming call before the
            consumer counts as overrun (see :class:`astral.StreamOverrun`).
        middleware: Wrap every call in both directions, first one
            outermost (see :data:`astral.Middleware`).
        hide_internal_errors: Send ``"internal error"`` instead of the
            message of a capability's unexpected exception (anything but
            :class:`astral.Failure`); the code stays ``"internal"``, and the
            full error is still logged here.
        remote_max_message_size: The largest message the remote accepts, in
            bytes. A call larger than that fails at once with
            :class:`ProtocolError`, and a result or stream item larger than
            that is replaced by the error result ``"result larger than N
            bytes"``, instead of the remote closing the connection (1009).
            ``None`` (the default) checks nothing; :func:`astral.connect` and
            :func:`astral.serve` set it from the upgrade.
        json_default: Converts values outside the value rule (datetimes,
            UUIDs, dataclasses, tuples...) in the inputs this peer sends and
            the outputs its capabilities return, like
            ``json.dumps(default=...)``; ``None`` refuses them (see
            :func:`astral.encode`).
        features: The protocol extensions the remote named in its
            ``Astral-Features`` upgrade header, or ``None`` if it sent none
            (the original TypeScript peer). What both sides support is
            :attr:`features`. :func:`astral.connect`, :func:`astral.serve`
            and the ASGI app set it from the upgrade; over your own server
            (:func:`astral.accept`) pass what you negotiated.

    Raises:
        TypeError: If a capability is not async.
        ValueError: If a limit is not positive.
    """

    # One per connection: slots, not a dict of some 35 entries (memory per idle connection).
    __slots__ = (
        "_alarm",
        "_calls_close",
        "_claims",
        "_close_error",
        "_close_with",
        "_closed",
        "_context",
        "_control_busy",
        "_control_receive",
        "_control_send",
        "_control_sent",
        "_control_started",
        "_credit_batch",
        "_deadlines",
        "_features",
        "_hide_internal_errors",
        "_idle",
        "_idle_workers",
        "_json_default",
        "_last_call",
        "_max_buffered",
        "_max_inbound",
        "_middleware",
        "_on_close",
        "_outer",
        "_send_deadline",
        "_send_now",
        "_state",
        "_stopped",
        "_tasks",
        "_thread",
        "_timeout",
        "_transport",
        "_unstarted",
        "_until",
        "_work_closed",
        "_write_now",
    )

    def __init__(
        self,
        transport: AnyTransport,
        *,
        capabilities: Capabilities | None = None,
        claims: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_inbound_calls: int = DEFAULT_MAX_INBOUND_CALLS,
        max_buffered_items: int = DEFAULT_MAX_BUFFERED_ITEMS,
        middleware: Sequence[Middleware] = (),
        hide_internal_errors: bool = False,
        remote_max_message_size: int | None = None,
        json_default: JsonDefault | None = None,
        features: Iterable[str] | None = None,
    ) -> None:
        check_limits(timeout, max_inbound_calls, max_buffered_items)
        if remote_max_message_size is not None and remote_max_message_size < 1:
            raise ValueError("remote_max_message_size must be positive, or None")
        self._transport = transport
        self._state: PeerState[_Channel, _Inbound] = PeerState(
            capabilities,
            _Inbound,
            max_inbound_calls=max_inbound_calls,
            max_send_size=remote_max_message_size,
            json_default=json_default,
        )
        self._claims: Mapping[str, Any] = MappingProxyType(dict(claims or {}))
        self._features = agreed(features)
        # Whether calls carry their deadline to the remote.
        self._send_deadline = "deadline" in self._features
        self._middleware = tuple(middleware)
        self._json_default = json_default
        self._hide_internal_errors = hide_internal_errors
        sub = self._claims.get("sub")
        # Who the remote is, in log lines: never the token, only its subject.
        self._state.remote = f"subject {sub!r:.80}" if isinstance(sub, str) else "the remote peer"
        self._timeout = timeout
        self._max_inbound = max_inbound_calls
        self._max_buffered = max_buffered_items
        self._credit_batch = max(1, max_buffered_items // 2)
        # The reader's own replies, made when one has to wait (see
        # _control_stream). Unbounded as a stream, but the reader stops
        # reading while max_inbound_calls of them wait (see _wait_for_replies).
        self._control_send: MemoryObjectSendStream[str] | None = None
        self._control_receive: MemoryObjectReceiveStream[str] | None = None
        # A transport that can queue a message without waiting (astral's own
        # WebSocket) takes control frames straight from the task that makes
        # them: credit and cancels never wait for the control loop's turn, and
        # the control loop is started only once something has to wait.
        try_send = getattr(transport, "try_send", None)
        self._send_now: Callable[[str], bool] | None = try_send if callable(try_send) else None
        # A transport that can write a message at once (astral's WebSocket):
        # used for a call or a result alone in flight, which nothing would
        # join by the end of the loop's turn.
        write_now = getattr(transport, "write_now", None)
        self._write_now: Callable[[str], bool] | None = write_now if callable(write_now) else None
        self._control_started = False
        self._control_busy = False  # the control loop holds a frame it is sending
        # Set each time the control loop sends one; made only while the reader
        # waits for replies to go out (see _wait_for_replies).
        self._control_sent: anyio.Event | None = None
        self._close_error: ConnectionClosed | None = None
        self._close_with = (1000, "")  # the close code and reason the transport gets
        self._idle: anyio.Event | None = None  # set once a drain has no call left
        # Idle workers, each parked on its own event; a call is handed to one
        # directly (no memory object stream: its receive() spends a turn of
        # the loop before it even waits). A list, not a deque (760 bytes even
        # empty): the last one parked takes the next call.
        self._idle_workers: list[_Idle] = []
        self._work_closed = False
        # When the last inbound call began, and whether it came less than
        # WORKER_IDLE after the one before (see _worker).
        self._last_call = -math.inf
        self._calls_close = False
        self._unstarted = 0  # calls handed to a worker that has not taken them yet
        self._deadlines: Deadlines[_Channel] = Deadlines()
        self._until: Until[_Channel] = Until()  # deadlines of whole calls
        # Rings when the earliest call timeout or deadline passes (made with
        # the first call that has one): no task of its own (see _alarm).
        self._alarm: Alarm | None = None
        self._closed = _Latch()
        self._stopped = _Latch()
        self._outer: anyio.abc.TaskGroup | None = None
        self._thread = threading.get_ident()
        self._tasks: anyio.abc.TaskGroup | None = None
        self._context = contextvars.Context()  # set by _run
        # Called once the connection has ended (see _serve_here).
        self._on_close: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._outer is not None:
            raise RuntimeError("a Peer can be entered only once")
        self._thread = threading.get_ident()  # the event loop's thread
        self._outer = anyio.create_task_group()
        await self._outer.__aenter__()
        try:
            # Not TaskGroup.start(): cancelled meanwhile, it would wait for
            # the reader to end, and a reader in its shielded delivery
            # (WebSocketConnection.deliver) ends only with the transport,
            # which is closed below.
            started = anyio.Event()
            self._outer.start_soon(self._run, started)
            await started.wait()
        except BaseException as exc:
            # The transport goes first: a reader that already runs in its
            # shielded delivery ends with it. Cancelled (the usual way to get
            # here), the remote is told we are going away.
            if not isinstance(exc, Exception):
                self._close_with = (1001, "going away")
            self._shutdown(ConnectionClosed("peer stopped"))
            await self._close_transport(*self._close_with)
            self._outer.cancel_scope.cancel()
            await self._outer.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._outer is not None
        try:
            with anyio.CancelScope(shield=True):
                await self.aclose()
        finally:
            try:
                suppress = await self._outer.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                # The task group wraps an exception from the body of the
                # ``async with`` in a group; when it is the only one, let it
                # propagate as it was raised (returning False re-raises it).
                if exc is None or len(group.exceptions) != 1 or group.exceptions[0] is not exc:
                    raise
                suppress = False
        return suppress

    async def _serve_here(
        self,
        body: Callable[[Peer], Coroutine[Any, Any, object]] | None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """Run the peer with this task as its reader, and ``body(self)`` in a task of its own.

        What ``async with peer: await body(peer); await peer.wait_closed()``
        does, with one task and two task groups less: a server's connection
        task serves its peer this way (memory per idle connection). Returns
        once the connection has ended and every task of the peer (``body``
        included) has finished; cancelling it is as cancelling that block.
        ``on_close()`` is called as soon as the connection has ended (when
        :meth:`wait_closed` would return), before the peer's tasks finish.

        Raises:
            RuntimeError: If the peer was already run.
        """
        if self._outer is not None or self._tasks is not None:
            raise RuntimeError("a Peer can be entered only once")
        self._thread = threading.get_ident()
        self._on_close = on_close
        await self._run(None, body)

    async def _run(
        self,
        started: anyio.Event | None,
        body: Callable[[Peer], Coroutine[Any, Any, object]] | None = None,
    ) -> None:
        """Run the peer's tasks, and read in this task until the connection ends.

        ``started`` is set once calls can be made (or ``_run`` has ended).
        """
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                # Tasks that live as long as the peer start in this context
                # (see _send_control, _wake_timer), whoever needs them first.
                self._context = contextvars.copy_context()
                if self._send_now is None and self._close_error is None:
                    self._control_started = True
                    tasks.start_soon(self._control_loop, self._control_stream()[1])
                # Over a transport with try_send (astral's WebSocket) the
                # control loop starts with the first control frame that has to
                # wait (see _send_control): a principal that only answers calls
                # may never need it.
                if started is not None:
                    started.set()
                if body is not None:
                    tasks.start_soon(body, self)
                # This task is the reader (one task less per connection);
                # cancelling the group's scope stops it with the others.
                await self._read_loop()
        finally:
            if started is not None:
                started.set()  # ended before it started: __aenter__ goes on to see why
            self._shutdown(ConnectionClosed("peer stopped"))
            try:
                # However the peer stopped (the remote left, a flood was cut
                # off, aclose), the transport goes too, so the remote learns it.
                await self._close_transport(*self._close_with)
            finally:
                self._stopped.set()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection and end every task of this peer. Idempotent.

        Pending calls and open streams fail with :class:`ConnectionClosed`;
        running inbound calls are cancelled. Called from inside one of this
        peer's capabilities, it cancels that capability too. The remote's
        pending calls fail with a :class:`ConnectionClosed` carrying ``code``
        and ``reason`` (over a WebSocket; in-memory transports carry no code).
        Only the first close counts.

        Args:
            code: The WebSocket close code: 1000 (normal), 1001 (going away)
                or an application code from 3000 to 4999.
            reason: A short reason, at most 123 bytes of UTF-8.

        Raises:
            ValueError: ``code`` is not one of those, or ``reason`` is too long.
        """
        check_close(code, reason)
        if self._close_error is None:
            self._close_with = (code, reason)
        self._shutdown(ConnectionClosed(reason or "connection closed by this peer", code=code))
        await self._close_transport(*self._close_with)
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
            # Only a peer whose tasks started will ever be stopped.
            await self._stopped.wait()

    async def drain(self, grace: float, *, code: int = 1001, reason: str = "going away") -> None:
        """Leave gracefully: finish the calls in flight, then close.

        New calls are refused at once, both ways: the remote's get an error
        result ``"shutting down"`` (:class:`RemoteError` there), this peer's
        raise :class:`ConnectionClosed` ``"shutting down"``. Calls already
        running here, and calls this peer is waiting on, get up to ``grace``
        seconds to finish; then the connection closes (see :meth:`aclose`)
        and whatever is left is cancelled or fails.

        Args:
            grace: Longest wait for the calls in flight, in seconds.
            code: The close code (1000, 1001 or 3000-4999).
            reason: The close reason.

        Raises:
            ValueError: ``grace`` is negative, or ``code`` or ``reason`` is
                refused as by :meth:`aclose`.
        """
        check_close(code, reason)
        if not grace >= 0:
            raise ValueError("grace must not be negative")
        if self._close_error is None and self._tasks is not None:
            self._state.draining = True
            if self._idle is None:
                self._idle = anyio.Event()
            self._check_idle()
            with anyio.move_on_after(grace):
                await self._idle.wait()
        await self.aclose(code, reason)

    def _check_idle(self) -> None:
        idle = self._idle
        if idle is not None and not self._state.inbound and not self._state.outbound:
            idle.set()

    async def _close_transport(self, code: int = 1000, reason: str = "") -> None:
        with anyio.CancelScope(shield=True):
            try:
                await close_transport(self._transport, code, reason)
            except Exception:
                logger.debug("transport raised while closing", exc_info=True)

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the connection has ended, for any reason.

        Returns:
            The :class:`ConnectionClosed` that pending calls failed with; its
            ``code`` and ``reason`` say why.
        """
        await self._closed.wait()
        assert self._close_error is not None
        return self._close_error

    @property
    def closed(self) -> bool:
        """Whether the connection has ended."""
        return self._close_error is not None

    @property
    def features(self) -> frozenset[str]:
        """The protocol extensions this connection uses (see ``docs/protocol.md``).

        What both sides named in their ``Astral-Features`` upgrade header,
        such as ``frozenset({"cancel", "credit", "deadline"})``; empty when
        the remote sent no header (the original TypeScript peer, or an
        astral from before the header). ``cancel`` and ``credit`` frames are
        sent either way: peers that do not know them ignore them.
        """
        return self._features

    @property
    def claims(self) -> Mapping[str, Any]:
        """The remote's verified token claims (read-only; empty if none)."""
        return self._claims

    @property
    def subject(self) -> str | None:
        """The ``sub`` claim of the remote's token, if it is a string, else ``None``."""
        sub = self._claims.get("sub")
        return sub if isinstance(sub, str) else None

    def _shutdown(self, error: ConnectionClosed) -> None:
        if self._close_error is not None:
            return
        self._close_error = error
        outbound, inbound = self._state.close()
        for channel in outbound:
            channel.fail(error)
            if channel.pump is not None:
                channel.pump.stop()
        for handle in inbound:
            handle.scope.cancel()
        # Both ends: queued replies and cancels have no one to go to any more.
        if self._control_send is not None:
            self._control_send.close()
        if self._control_receive is not None:
            self._control_receive.close()
        # Calls still waiting for a worker were cancelled above: never start them.
        self._work_closed = True
        while self._idle_workers:
            self._idle_workers.pop().wake.set()  # with no work: it ends
        if self._alarm is not None:
            self._alarm.cancel()
        if self._idle is not None:
            self._idle.set()  # a drain has nothing left to wait for
        self._closed.set()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def _check_open(self) -> None:
        if self._close_error is not None:
            raise self._close_error
        if self._state.draining:
            raise ConnectionClosed("shutting down")
        if self._tasks is None:
            raise RuntimeError("use the Peer inside 'async with' before calling")

    # -- where frames enter --------------------------------------------------

    async def _read_loop(self) -> None:
        transport = self._transport
        error = ConnectionClosed("peer stopped")
        try:
            deliver = getattr(transport, "deliver", None)
            if deliver is not None:
                # astral's WebSocket: it reads in this task and hands each
                # message over as it is assembled (no reader task of its own,
                # no hop between tasks per message).
                await deliver(self._on_message, self._on_end)
                return
            receive, on_message = transport.receive, self._on_message
            while True:
                await on_message(await receive())
        except CLOSED_ERRORS as exc:
            error = _closed_by(exc)
        finally:
            self._shutdown(error)

    def _on_end(self, exc: ConnectionClosed) -> None:
        """No more messages will come (see ``WebSocketConnection.deliver``)."""
        self._shutdown(_closed_by(exc))

    async def _on_message(self, text: str) -> None:
        """Act on one message from the remote: where every frame enters."""
        if self._close_error is not None:
            return  # shut down: nothing is waited for any more
        state, limit = self._state, self._max_inbound
        if len(state.inbound) >= limit and self._unstarted:
            await self._let_workers_start()
        event = state.receive(text)
        if isinstance(event, Deliver):
            if self._deliver(event):
                # A producer that ignores flow control (the original)
                # can outrun a consumer that never got scheduled:
                # let it run before the buffer overruns.
                await anyio.lowlevel.checkpoint()
            elif self._idle is not None:
                self._check_idle()  # draining: that may have been the last call
        elif isinstance(event, StartInbound):
            self._start_inbound(event.call, event.invoke, event.handle, event.items)
        elif isinstance(event, CreditInbound):
            event.handle.grant(event.n)
        elif isinstance(event, CancelInbound):
            event.handle.by_remote = True
            event.handle.scope.cancel()
        elif isinstance(event, InputInbound):
            self._input(event.handle, event.frame)
        elif isinstance(event, WantOutbound):
            if event.handle.pump is not None:
                event.handle.pump.grant(event.n)
        elif isinstance(event, Reply):
            self._send_control(event.text)
            if self._control_queued() >= limit:
                await self._wait_for_replies()
        elif isinstance(event, Fail):
            event.handle.fail(event.error)
            if self._idle is not None:
                self._check_idle()
            if event.error.frame_type == "yield":
                # A result ends the call remotely; a yield means the
                # stream still runs there: stop it.
                self._send_control(encode(Cancel(event.handle.call_id)))

    def _input(self, handle: _Inbound, frame: Item | End) -> None:
        """Feed an input item, or its end, to the inbound call under ``handle``."""
        items = handle.items
        if items is None:
            return  # not a call with an input stream: ignored, like any stray frame
        if type(frame) is not Item:
            items.end()
        elif not items.put(frame.value):
            protocol_warnings.warning(
                "call %.60r from %s: more input items than asked for; stopped",
                frame.id,
                self._state.remote,
            )
            handle.error = INPUT_OVERRUN
            handle.scope.cancel()

    def _deliver(self, event: Deliver[_Channel]) -> bool:
        """Hand a frame to its call without waiting; True if the consumer lags."""
        channel, frame = event.handle, event.frame
        self._deadlines.discard(channel)  # the timeout covers the first frame only
        added = channel.put(frame)
        if added is False:
            channel.fail(
                StreamOverrun(
                    f"call {channel.capability}: consumer fell more than "
                    f"{self._max_buffered} items behind"
                )
            )
            # Not _abandon: the consumer still reads what is buffered first.
            self._forget(channel)
            return False
        if added is None:
            self._abandon(channel)  # the consumer has gone away
            return False
        channel.buffered += 1
        if type(frame) is Result:
            channel.end()
            if channel.until is not None:
                self._until.discard(channel)
            if channel.pump is not None:
                channel.pump.stop()  # the callee has ended: send no more input
            return False
        return channel.buffered > self._credit_batch

    async def _let_workers_start(self) -> None:
        # Every slot is taken, but some by calls whose worker has not run yet
        # (on trio the reader drains a burst of calls without yielding). Let
        # them run, so a call is refused only when the slots are taken by
        # calls that really are running, whatever the backend.
        while (
            self._unstarted
            and len(self._state.inbound) >= self._max_inbound
            and self._close_error is None
        ):
            await anyio.lowlevel.checkpoint()

    async def _wait_for_replies(self) -> None:
        """Stop reading while ``max_inbound_calls`` of our replies wait to be sent.

        A burst of refused calls only pauses the reader until the control
        loop has handed the replies to the transport, which it does as fast as
        the remote reads them: a remote that reads is never cut off. One that
        reads nothing at all for :data:`FLOOD_GRACE` seconds, while it has
        that many answers waiting, is provoking replies it does not read: the
        connection is closed with 1008.
        """
        while self._control_queued() >= self._max_inbound and self._close_error is None:
            sent = self._control_sent = anyio.Event()
            with anyio.move_on_after(FLOOD_GRACE):
                await sent.wait()
            if sent.is_set():
                continue
            reason = "remote provokes replies it does not read"
            logger.warning("remote floods refused calls without reading; closing (1008)")
            self._close_with = (1008, reason)
            self._shutdown(ConnectionClosed(reason, code=1008))
            close_soon = getattr(self._transport, "close_soon", None)
            if close_soon is not None:
                # This task may be the one reading the connection
                # (WebSocketConnection.deliver): it cannot wait here for the
                # close handshake it has to read. It goes on reading until
                # the handshake is done.
                close_soon(*self._close_with)
            else:
                await self._close_transport(*self._close_with)
            if self._tasks is not None:
                self._tasks.cancel_scope.cancel()

    def _control_queued(self) -> int:
        """How many control frames wait for the control loop."""
        queue = self._control_send
        return 0 if queue is None else queue.statistics().current_buffer_used

    def _control_stream(
        self,
    ) -> tuple[MemoryObjectSendStream[str], MemoryObjectReceiveStream[str]]:
        """The control loop's queue, made the first time a frame has to wait."""
        if self._control_send is None or self._control_receive is None:
            self._control_send, self._control_receive = anyio.create_memory_object_stream[str](
                math.inf
            )
        return self._control_send, self._control_receive

    def _send_control(self, text: str) -> None:
        if self._close_error is not None:
            return  # closing: the remote needs no answer any more
        send_now = self._send_now
        if (
            send_now is not None
            and not self._control_busy
            and not self._control_queued()
            and send_now(text)
        ):
            return  # queued on the transport, behind nothing of ours
        queue, receive = self._control_stream()
        queue.send_nowait(text)
        if not self._control_started and self._tasks is not None:
            self._control_started = True
            # In the peer's own context, not that of the call that needs it.
            self._context.run(self._tasks.start_soon, self._control_loop, receive)

    async def _control_loop(self, queue: MemoryObjectReceiveStream[str]) -> None:
        send = self._transport.send
        try:
            async for text in queue:
                self._control_busy = True  # later frames queue behind this one
                try:
                    await send(text)
                finally:
                    self._control_busy = False
                sent = self._control_sent
                if sent is not None:
                    sent.set()
        except CLOSED_ERRORS:
            pass  # the reader sees the end too, and shuts the peer down

    # -- calls the remote makes ----------------------------------------------

    async def _worker(self, work: _Work) -> None:
        # Inbound calls are served by a pool of reusable worker tasks, not a
        # task each: spawning an AnyIO task costs ten times a hand-over. Each
        # call is handed to one worker (an idle one, or a new one), which
        # takes no other: a worker that took call after call without yielding
        # would fill the write buffer and park the others in send().
        _current_peer.set(self)
        idle = self._idle_workers
        while True:
            if self._work_closed:
                return  # the call was cancelled with the peer: never start it
            self._unstarted -= 1
            await self._serve(*work)
            del work  # an idle worker keeps nothing of the call it served
            if not self._state.inbound and not self._calls_close:
                # No other call in flight, and calls come rarely (or this was
                # the first): end rather than park. An idle connection then
                # holds no worker task (memory per idle connection); calls
                # that come close together, or at once, reuse parked workers.
                return
            slot = _Idle()
            idle.append(slot)
            try:
                await slot.wake.wait()
            except BaseException:  # cancelled while idle
                if not slot.wake.is_set():
                    idle.remove(slot)
                raise
            if slot.work is None:
                return  # the peer stopped
            work = slot.work

    def _start_inbound(
        self, call: Call, invoke: Callable[[Any], Any], handle: _Inbound, items: bool
    ) -> None:
        handle.credit = call.window
        handle.call = call
        if items:
            handle.items = _InputItems(self, call.id, self._max_buffered)
            if call.input_stream:
                self._send_control(self._state.want(call.id, self._max_buffered))
            else:
                handle.items.end()  # the caller streams nothing: an empty stream
        now = anyio.current_time()
        if call.deadline is not None:
            # The budget runs from now, on our clock: the time the call took
            # to get here is the caller's to spend (it is on its own clock).
            handle.deadline = handle.scope.deadline = now + call.deadline / 1000
        self._calls_close = now - self._last_call < WORKER_IDLE
        self._last_call = now
        self._unstarted += 1
        if self._idle_workers:
            slot = self._idle_workers.pop()  # the last worker parked takes this call
            slot.work = (call, invoke, handle)
            slot.wake.set()
        else:
            assert self._tasks is not None
            self._tasks.start_soon(self._worker, (call, invoke, handle))

    def _on_error(self, call: Call, exc: Exception) -> Result:
        """Log a capability's failure here, and make its error result."""
        if isinstance(exc, CallTimeout):
            handle = _current_call.get(None)
            if (
                handle is not None
                and handle.deadline is not None
                and anyio.current_time() >= handle.deadline
            ):
                # A call it made ran out of the budget it inherited: this call
                # missed its deadline too, which is no failure of the capability.
                return _deadline_exceeded(call)
        extra = {
            "astral_capability": call.capability,
            "astral_call_id": call.id,
            "astral_remote": self._state.remote,
        }
        if isinstance(exc, Failure):
            capability_logger.debug(
                "capability %r failed on purpose (call %.60r from %s): code %r",
                call.capability,
                call.id,
                self._state.remote,
                exc.code,
                extra=extra,
            )
        else:
            capability_logger.error(
                "capability %r raised %s (call %.60r from %s)",
                call.capability,
                type(exc).__name__,
                call.id,
                self._state.remote,
                exc_info=exc,
                extra=extra,
            )
        return error_result(call, exc, hide_internal_errors=self._hide_internal_errors)

    async def _serve(self, call: Call, invoke: Callable[[Any], Any], handle: _Inbound) -> None:
        if self._middleware:
            await self._serve_observed(call, invoke, handle)
            return
        state, send = self._state, self._transport.send
        final: str | None = None
        # Reset when the call ends: the worker's context outlives the call.
        call_token = _current_call.set(handle)
        items_token = input_items.set(handle.items) if handle.items is not None else None
        try:
            with handle.scope:
                first = await start(invoke, call, self._on_error)
                if isinstance(first, Result):
                    final = state.reply(first)[0]
                else:
                    async with aclosing(stream(call, first, self._on_error)) as frames:
                        async for frame in frames:
                            text, ended = state.reply(frame)
                            if ended:
                                final = text
                                break
                            await handle.spend()
                            await send(text)
            if final is None:
                if handle.by_remote:
                    final = encode(Result(call.id, error=CANCELLED))
                elif handle.error is not None:
                    final = encode(Result(call.id, error=handle.error))
                elif self._past_deadline(handle):
                    final = encode(_deadline_exceeded(call))
            if final is not None:
                # Outside the call's scope: once the capability has finished,
                # a late cancel cannot interrupt its one terminal result.
                write_now = self._write_now
                # Alone in flight, it goes out at once: nothing would join it.
                if write_now is None or len(state.inbound) != 1 or not write_now(final):
                    await send(final)
        except CLOSED_ERRORS:
            pass  # the connection ended; the reader shuts the peer down
        finally:
            state.finished(call.id, handle)
            if handle.items is not None:
                handle.items.close()
            if self._idle is not None:
                self._check_idle()
            if items_token is not None:
                input_items.reset(items_token)
            _current_call.reset(call_token)

    async def _serve_observed(
        self, call: Call, invoke: Callable[[Any], Any], handle: _Inbound
    ) -> None:
        """:meth:`_serve` inside the middleware chain (kept apart: the plain path is hot)."""
        send = self._transport.send
        info = CallInfo(
            "inbound", call.capability, call.id, peer=self, input=call.input, trace=call.trace
        )
        chain = Chain(self._middleware, info)
        final: Result | None = None
        # Reset when the call ends: the worker's context outlives the call.
        call_token = _current_call.set(handle)
        items_token = input_items.set(handle.items) if handle.items is not None else None

        def on_error(call: Call, exc: Exception) -> Result:
            info.end("error", error=exc)
            return self._on_error(call, exc)

        try:
            try:
                with handle.scope:
                    refused = await chain.enter()
                    if refused is not None:
                        info.end("error", error=refused)
                        final = self._refused(info, call, refused)
                    else:
                        first = await start(invoke, call, on_error)
                        if isinstance(first, Result):
                            final = first
                        else:
                            info.streaming = True
                            async with aclosing(stream(call, first, on_error)) as frames:
                                async for frame in frames:
                                    if type(frame) is Result:
                                        final = frame
                                        break
                                    try:
                                        text = encode(frame, json_default=self._json_default)
                                    except ProtocolError as exc:
                                        info.end("error", error=exc)
                                        final = Result(call.id, error=str(exc), code=INTERNAL)
                                        break
                                    if not self._state.fits(text):
                                        final = self._state.oversize(call.id)
                                        info.end("error", error=ProtocolError(final.error or ""))
                                        break
                                    await handle.spend()
                                    await send(text)
                                    info.items += 1
                if final is None and handle.by_remote:
                    final = Result(call.id, error=CANCELLED)
                    info.end("cancelled")
                elif final is None and handle.error is not None:
                    final = Result(call.id, error=handle.error)
                elif final is None and self._past_deadline(handle):
                    final = _deadline_exceeded(call)
                if final is not None:
                    final, text = _encoded(final, self._json_default)
                    if not self._state.fits(text):
                        final = self._state.oversize(call.id)
                        text = encode(final)
                    if final.error is None:
                        info.end("result", output=final.output)
                    else:
                        info.end("error", error=ProtocolError(final.error))
            finally:
                # Cancelled by the connection's end when nothing was decided.
                failure = await chain.leave()
            if final is None:
                return
            if failure is not None and final.error is None:
                # A middleware failed on the way out: the call fails after all.
                text = _encoded(
                    self._refused(info, call, failure, logged=True), self._json_default
                )[1]
            # Outside the call's scope: once the capability has finished,
            # a late cancel cannot interrupt its one terminal result.
            await send(text)
        except CLOSED_ERRORS:
            pass  # the connection ended; the reader shuts the peer down
        finally:
            self._state.finished(call.id, handle)
            if handle.items is not None:
                handle.items.close()
            if self._idle is not None:
                self._check_idle()
            if items_token is not None:
                input_items.reset(items_token)
            _current_call.reset(call_token)

    def _past_deadline(self, handle: _Inbound) -> bool:
        """Whether an inbound call ended because its deadline passed (not the connection)."""
        return (
            handle.deadline is not None
            and handle.scope.cancelled_caught
            and self._close_error is None
            and anyio.current_time() >= handle.deadline
        )

    def _refused(
        self, info: CallInfo, call: Call, exc: Exception, *, logged: bool = False
    ) -> Result:
        """The error result for a middleware that refused a call or failed."""
        if not logged:
            log_refusal(info, exc)
        return error_result(call, exc, hide_internal_errors=self._hide_internal_errors)

    # -- calls we make -------------------------------------------------------

    async def _open(  # noqa: PLR0917 - private, on the hot path
        self,
        capability: str,
        input: Any,
        timeout: float | EllipsisType | None,
        info: CallInfo | None = None,
        deadline: float | None = None,
        input_stream: AsyncIterable[Any] | None = None,
    ) -> _Channel:
        self._check_open()
        if input_stream is not None and INPUT_STREAM not in self._features:
            raise ProtocolError(
                f"call {capability}: the remote does not take input streams (it did not"
                f" agree to the {INPUT_STREAM!r} feature)"
            )
        channel = _Channel(capability, self._max_buffered)
        budget = None
        if input_stream is not None:
            channel.pump = _Pump()
        try:
            inherited = _current_call.get(None)
            if deadline is not None or (inherited is not None and inherited.deadline is not None):
                budget, timeout = self._budget(channel, timeout, deadline, inherited)
            # Without middleware, a trace context carried across the cluster
            # hop (astral.redis) still goes on to the worker.
            trace = carried_trace.get() if info is None else info.trace
            if info is None and not trace and budget is None and input_stream is None:
                channel.call_id, text = self._state.start_call(
                    capability, input, channel, self._max_buffered
                )
            else:
                channel.call_id, text = self._state.start_call(
                    capability,
                    input,
                    channel,
                    self._max_buffered,
                    trace=trace,
                    call_id=None if info is None else info.call_id,
                    deadline=budget if self._send_deadline else None,
                    input_stream=input_stream is not None,
                )
            self._arm(channel, timeout)
            if channel.until is not None:
                self._arm_until(channel, channel.until)
        except (ValueError, CallTimeout):  # ProtocolError included
            channel.leave()  # nothing was registered or sent
            raise
        try:
            write_now = self._write_now
            # Alone in flight, it goes out at once: nothing would join it.
            if write_now is None or len(self._state.outbound) != 1 or not write_now(text):
                await self._transport.send(text)
        except CLOSED_ERRORS as exc:
            self._abandon(channel)
            if self._close_error is not None:
                error = self._close_error
                raise ConnectionClosed(error.reason, code=error.code) from exc
            if isinstance(exc, ConnectionClosed):
                raise  # the transport's own account of what happened
            raise ConnectionClosed("connection closed") from exc
        except BaseException:
            self._abandon(channel)
            raise
        if input_stream is not None:
            assert self._tasks is not None
            self._tasks.start_soon(self._pump_input, channel, input_stream)
        return channel

    async def _pump_input(self, channel: _Channel, items: AsyncIterable[Any]) -> None:
        """Send a call's input items as the callee asks for them, then ``end``.

        Runs in the peer's task group, as long as the call does: when the
        call ends (result, cancellation, timeout, the connection), the pump
        stops at once and closes ``items``.
        """
        pump = channel.pump
        assert pump is not None
        send, state = self._transport.send, self._state
        iterator = aiter(items)
        try:
            with pump.scope:
                while True:
                    await pump.spend()
                    try:
                        value = await anext(iterator)
                    except StopAsyncIteration:
                        text = state.end(channel.call_id)
                        if text is not None:
                            await send(text)
                        return
                    text = state.item(channel.call_id, value)
                    if text is None:
                        return
                    await send(text)
        except CLOSED_ERRORS:
            pass  # the connection ended: the reader fails the call
        except Exception as exc:  # noqa: BLE001 - the caller's items failed, or cannot be sent
            # The call fails with it, and the remote is told to stop.
            channel.fail(exc)
            self._forget(channel)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with anyio.move_on_after(1, shield=True):
                    await aclose()

    def _budget(
        self,
        channel: _Channel,
        timeout: float | EllipsisType | None,
        deadline: float | None,
        inherited: _Inbound | None,
    ) -> tuple[int, float | EllipsisType | None]:
        """The call's deadline: the remaining budget in ms, and the first-frame timeout.

        An explicit ``deadline`` is the caller's to enforce (a timer, as for
        timeouts) and replaces the default first-frame timeout. A deadline
        inherited from the capability we run in is enforced by that
        capability's own cancel scope, which ends at the same moment.

        Raises:
            ValueError: ``deadline`` is not a positive number.
            CallTimeout: The inherited deadline has already passed.
        """
        budget, channel.until, timeout = call_budget(
            channel.capability, timeout, deadline, None if inherited is None else inherited.deadline
        )
        return budget, timeout

    def _grant(self, channel: _Channel, n: int) -> None:
        text = self._state.credit(channel.call_id, n)
        if text is not None:
            self._send_control(text)

    def _forget(self, channel: _Channel) -> None:
        self._deadlines.discard(channel)
        if channel.until is not None:
            self._until.discard(channel)
        if channel.pump is not None:
            channel.pump.stop()
        # Route nothing more to this call; if it is still running, tell the remote.
        text = self._state.abandon(channel.call_id)
        if text is not None:
            self._send_control(text)
        if self._idle is not None:
            self._check_idle()

    def _abandon(self, channel: _Channel) -> None:
        # The consumer has gone: also drop whatever is buffered.
        channel.leave()
        self._forget(channel)

    # -- timeouts: one alarm per peer, no cancel scope per call --------------

    def _arm(self, channel: _Channel, timeout: float | EllipsisType | None) -> None:
        if timeout is ...:
            timeout = self._timeout
        if timeout is None:
            return
        self._wake_timer(self._deadlines.add(channel, timeout, anyio.current_time()))

    def _arm_until(self, channel: _Channel, until: float) -> None:
        self._until.add(channel, until)
        self._wake_timer(until)

    def _wake_timer(self, deadline: float) -> None:
        alarm = self._alarm
        if alarm is None:
            alarm = self._alarm = Alarm(self._on_alarm)
        if deadline < alarm.when and self._close_error is None:
            alarm.set(deadline)

    def _on_alarm(self) -> None:
        """The earliest timeout or deadline has come: fail what is due, set the next."""
        if self._close_error is not None:
            return
        deadlines, until = self._deadlines, self._until
        now = anyio.current_time()
        for channel in deadlines.expired(now):
            channel.fail(CallTimeout(f"call {channel.capability} timed out"))
            self._forget(channel)  # and tell the remote to stop
        for channel in until.expired(now):
            channel.fail(CallTimeout(f"call {channel.capability} missed its deadline"))
            self._forget(channel)
        earliest = min(deadlines.earliest(), until.earliest())
        if earliest < math.inf and self._alarm is not None:
            self._alarm.set(earliest)

    # A typed reference brings its own signature (input, then timeout): see
    # astral._ref.Signed for why it is a ParamSpec and not a TypeVar.
    @overload
    async def call(
        self, capability: Signed[ArgsT, OutputT], /, *args: ArgsT.args, **kwargs: ArgsT.kwargs
    ) -> OutputT: ...

    @overload
    async def call(
        self,
        capability: str,
        input: Any = None,
        *,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
        input_stream: AsyncIterable[Any] | None = None,
    ) -> Any: ...

    async def call(  # type: ignore[misc]  # the ParamSpec overload stands for (input, timeout)
        self,
        capability: str | Ref[Any, Any],
        input: Any = None,
        *,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
        input_stream: AsyncIterable[Any] | None = None,
    ) -> Any:
        """Call a capability of the remote peer.

        Args:
            capability: The registered name on the remote, or a typed
                reference to it (see :func:`astral.ref`), which types the
                input and the output.
            input: Any JSON value (of the reference's input type).
            timeout: Seconds to wait for the first frame (the result, or the
                first item of a stream); ``None`` waits forever; by default
                the peer's ``timeout``. Once a stream has started it has no
                timeout. With a ``deadline`` and no ``timeout``, there is no
                first-frame timeout.
            deadline: Seconds the whole call may take, stream included. When
                the remote agreed to the ``deadline`` feature it learns the
                budget and stops the capability at that time (see
                :func:`current_call`); either way this peer stops waiting then.
                Inside a capability, calls inherit what is left of its own
                deadline (the earlier of the two counts).
            input_stream: Items to stream to the capability, which takes them
                as its second parameter (feature ``input-stream``). Each is
                sent when the callee asks for more (flow control), in order,
                then the end of the input. When the call ends, sending stops
                at once and ``input_stream`` is closed (``aclose``), so a
                producer writing into it fails at once. If iterating it
                raises, the call fails with that error and the remote is
                told to stop.

        Returns:
            The remote's output, or a :class:`Stream` if the remote streams.
            An empty stream returns ``None``, as in the original.

        Raises:
            RemoteError: The remote capability failed or is unknown.
            CallTimeout: Nothing arrived within ``timeout``, or the call
                missed its deadline; the remote was told to stop.
            ConnectionClosed: The connection ended before the answer.
            ProtocolError: ``input`` cannot be sent (a type outside the value
                rule, an integer JavaScript would change, nesting too deep),
                or the call is larger than the remote accepts in one message,
                or ``input_stream`` is given and the remote did not agree to
                ``input-stream`` (the original, for one).
            ValueError: ``deadline`` is not a positive number.
            ValidationError: The output does not fit the reference's model
                output type.
        """
        capability, input, convert = unref(capability, input)
        if self._middleware:
            return await self._call_observed(
                capability, input, timeout, convert, deadline, input_stream
            )
        channel = await self._open(capability, input, timeout, None, deadline, input_stream)
        try:
            frame = await channel.next()
        except BaseException:
            self._abandon(channel)
            raise
        if isinstance(frame, Yield):
            return Stream(self, channel, frame, convert=convert)
        channel.leave()
        if frame.error is not None:
            raise _remote_error(frame, capability)
        if convert is not None:  # None too: no output does not fit a model type
            return convert(frame.output)
        return frame.output

    async def _enter_outbound(self, capability: str, input: Any) -> Chain:
        """Run the middleware's entry for a call we are about to send."""
        self._check_open()
        info = CallInfo(
            "outbound",
            capability,
            self._state.next_id(),
            peer=self,
            input=input,
            trace=carried_trace.get(),
        )
        chain = Chain(self._middleware, info)
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

    async def _call_observed(  # noqa: PLR0917 - private
        self,
        capability: str,
        input: Any,
        timeout: float | EllipsisType | None,
        convert: Callable[[Any], Any] | None,
        deadline: float | None,
        input_stream: AsyncIterable[Any] | None,
    ) -> Any:
        chain = await self._enter_outbound(capability, input)
        info = chain.info
        try:
            channel = await self._open(capability, input, timeout, info, deadline, input_stream)
            try:
                frame = await channel.next()
            except BaseException:
                self._abandon(channel)
                raise
        except BaseException as exc:
            await chain.end(exc)
            raise
        if isinstance(frame, Yield):
            info.streaming = True
            return Stream(self, channel, frame, chain=chain, convert=convert)
        channel.leave()
        error: Exception | None = None
        if frame.error is not None:
            error = _remote_error(frame, capability)
        else:
            info.output = frame.output
        failure = await chain.end(error)
        if error is not None:
            raise error
        if failure is not None:
            raise failure
        if convert is not None:  # None too: no output does not fit a model type
            return convert(frame.output)
        return frame.output

    @overload
    def stream(
        self, capability: Signed[ArgsT, OutputT], /, *args: ArgsT.args, **kwargs: ArgsT.kwargs
    ) -> AbstractAsyncContextManager[Stream[OutputT]]: ...

    @overload
    def stream(
        self,
        capability: str,
        input: Any = None,
        *,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
        input_stream: AsyncIterable[Any] | None = None,
    ) -> AbstractAsyncContextManager[Stream[Any]]: ...

    def stream(  # type: ignore[misc]  # the ParamSpec overload stands for (input, timeout)
        self,
        capability: str | Ref[Any, Any],
        input: Any = None,
        *,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
        input_stream: AsyncIterable[Any] | None = None,
    ) -> AbstractAsyncContextManager[Stream[Any]]:
        """Call a capability and iterate over what it streams.

        ::

            async with peer.stream("generate", {"prompt": "hi"}) as items:
                async for item in items:
                    print(item)

        Leaving the block early, or cancelling the surrounding scope, tells
        the remote to stop. A capability that returns a single value streams
        that one value.

        Args:
            capability: The registered name on the remote, or a typed
                reference to it (see :func:`astral.ref`): the stream's items
                are then of its output type.
            input: Any JSON value (of the reference's input type).
            timeout: Seconds to wait for the first item or the result; see
                :meth:`call`.
            deadline: Seconds the whole stream may take; see :meth:`call`.
            input_stream: Items to stream to the capability while it streams
                back (a two-way stream); see :meth:`call`.

        Returns:
            An async context manager yielding the :class:`Stream`.

        Raises:
            ConnectionClosed: The connection is closed.
            ProtocolError: ``input`` cannot be sent (see :meth:`call`).
            ProtocolError: ``input_stream`` is given and the remote did not
                agree to ``input-stream``.
            ValueError: ``deadline`` is not a positive number.
        """
        return self._stream(capability, input, timeout, deadline, input_stream)

    @asynccontextmanager
    async def _stream(
        self,
        capability: str | Ref[Any, Any],
        input: Any,
        timeout: float | EllipsisType | None,
        deadline: float | None,
        input_stream: AsyncIterable[Any] | None,
    ) -> AsyncIterator[Stream[Any]]:
        capability, input, convert = unref(capability, input)
        if not self._middleware:
            channel = await self._open(capability, input, timeout, None, deadline, input_stream)
            stream: Stream[Any] = Stream(self, channel, None, convert=convert)
            try:
                yield stream
            finally:
                stream._close()
            return
        chain = await self._enter_outbound(capability, input)
        chain.info.streaming = True
        try:
            channel = await self._open(
                capability, input, timeout, chain.info, deadline, input_stream
            )
        except BaseException as exc:
            await chain.end(exc)
            raise
        stream = Stream(self, channel, None, chain=chain, convert=convert)
        try:
            yield stream
        finally:
            await stream.aclose()


def _closed_by(exc: BaseException) -> ConnectionClosed:
    """The error pending calls fail with when the transport ended with ``exc``."""
    if isinstance(exc, ConnectionClosed):
        error = ConnectionClosed(exc.reason, code=exc.code)
    else:
        error = ConnectionClosed("connection closed by the remote peer")
    error.__cause__ = exc
    return error


def _deadline_exceeded(call: Call) -> Result:
    return Result(call.id, error=DEADLINE_EXCEEDED, code=DEADLINE_EXCEEDED_CODE)


def _remote_error(frame: Result, capability: str) -> Exception:
    """The exception a caller gets for an error result."""
    if frame.code == DEADLINE_EXCEEDED_CODE:
        # The callee stopped at our deadline before our own timer fired.
        return CallTimeout(f"call {capability} missed its deadline")
    return RemoteError(frame.error or "", code=frame.code, data=frame.data)


def _encoded(result: Result, json_default: JsonDefault | None) -> tuple[Result, str]:
    """Encode a terminal result; one that cannot be sent becomes an error that can."""
    try:
        return result, encode(result, json_default=json_default)
    except ProtocolError as exc:
        result = Result(result.id, error=str(exc), code=INTERNAL)
        return result, encode(result)


class AcceptedPeer(Peer):
    """A :class:`Peer` fed by your own server: see :func:`accept`."""

    __slots__ = ()

    async def receive(self, text: str) -> None:
        """Hand the peer one text message your server received.

        Waits while the peer's input buffer is full.

        Raises:
            ConnectionClosed: The peer is closed.
        """
        feed = self._transport
        assert isinstance(feed, _FeedTransport)
        await feed.feed(text)


class _FeedTransport:
    """A transport whose input is pushed in and whose output is a function."""

    def __init__(self, send: Callable[[str], Awaitable[None]], buffer: int) -> None:
        self._send = send
        self._in, self._out = anyio.create_memory_object_stream[str](buffer)

    async def send(self, item: str, /) -> None:
        try:
            await self._send(item)
        except CLOSED_ERRORS:
            raise
        except Exception as exc:
            # Your server's own "disconnected" error: the connection is broken.
            raise ConnectionClosed(f"send failed: {type(exc).__name__}: {exc}") from exc

    async def receive(self) -> str:
        return await self._out.receive()

    async def feed(self, text: str) -> None:
        try:
            await self._in.send(text)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ConnectionClosed("peer is closed") from None

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        self._in.close()
        self._out.close()


@asynccontextmanager
async def accept(
    *,
    send: Callable[[str], Awaitable[None]],
    capabilities: Capabilities | None = None,
    claims: Mapping[str, Any] | None = None,
    input_buffer: int = 64,
    **options: Any,
) -> AsyncIterator[AcceptedPeer]:
    """Run a peer over a connection your own server manages (the original's ``accept``).

    You supply ``send`` and feed each received text message to
    :meth:`AcceptedPeer.receive`; when your connection ends, leave the block
    (or call ``aclose()``)::

        async with astral.accept(send=websocket.send_text, capabilities=caps) as peer:
            async for text in websocket.iter_text():
                await peer.receive(text)

    Args:
        send: Sends one text message; it may be called from several tasks at
            once.
        capabilities: The names the remote may call.
        claims: The remote's verified token claims.
        input_buffer: Messages buffered between ``receive`` and the reader.
        **options: Passed on to :class:`Peer` (``timeout``,
            ``max_inbound_calls``, ``max_buffered_items``, ``middleware``,
            ``hide_internal_errors``, ``json_default``, and ``features``:
            the tokens the remote sent in its ``Astral-Features`` upgrade
            header, if your server sent its own; without it the connection
            uses the original protocol).

    Yields:
        The running peer.

    Raises:
        TypeError: If a capability is not async.
    """
    transport = _FeedTransport(send, input_buffer)
    try:
        peer = AcceptedPeer(transport, capabilities=capabilities, claims=claims, **options)
    except BaseException:
        await transport.aclose()  # a bad capability: close what was opened for it
        raise
    async with peer:
        yield peer
