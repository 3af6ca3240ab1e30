"""The sans-IO state of one astral connection.

Theory of operation
-------------------
A connection carries calls in both directions. Each peer picks the ids of
the calls it makes, so the two directions never share an id space:

* ``outbound`` maps the id of every call *we* made and are still waiting on
  to an opaque handle the driver chose (the per-call channel). A ``yield``
  for such an id is delivered to it; a ``result`` is delivered and removes
  the entry. Giving up on a call (timeout, cancellation, early exit, buffer
  overrun) removes the entry at once and produces a ``cancel`` frame; any
  frame that still arrives for that id is then an unknown id, ignored.
* ``inbound`` maps the id of every call the *remote* made that is running
  here to a handle the driver chose (a cancel scope). A ``cancel`` for it is
  handed to the driver; the driver reports the end with :meth:`finished`.
* Input streams (feature ``input-stream``) reuse both maps: the ``item``
  and ``end`` frames a caller sends name one of its calls, so they are
  routed through ``inbound``; the ``want`` frames a callee sends name one
  of ours, so they are routed through ``outbound``.

:meth:`PeerState.receive` turns one text message into at most one event for
the driver, and never raises: bad input is dropped, or answered, as the
table in ``docs/protocol.md`` says; protocol violations are logged at WARNING
on ``astral.protocol``, rate-limited, and the rest at DEBUG. Frames go
out through :meth:`start_call`, :meth:`abandon` and :meth:`reply`.

This module does no I/O and knows no event loop.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._dispatch import INTERNAL, UNKNOWN_CAPABILITY, resolve, takes_items
from ._exceptions import ProtocolError
from ._frames import Call, Cancel, Credit, End, Item, Result, Want, Yield, decode, encode
from ._logs import protocol_warnings

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ._frames import JsonDefault

__all__ = [
    "CancelInbound",
    "CreditInbound",
    "Deliver",
    "Fail",
    "InputInbound",
    "PeerState",
    "Reply",
    "StartInbound",
    "WantOutbound",
]

logger = logging.getLogger("astral.peer")

Out = TypeVar("Out")
In = TypeVar("In")

#: Error strings this peer sends in results it makes up itself.
CANCELLED = "cancelled"
DUPLICATE_ID = "duplicate call id"
TOO_MANY_CALLS = "too many concurrent calls"
SHUTTING_DOWN = "shutting down"
#: The error string and code of a call stopped by its deadline (``deadline`` feature).
DEADLINE_EXCEEDED = "deadline exceeded"
DEADLINE_EXCEEDED_CODE = "deadline_exceeded"
#: Sent for a call with an input stream to a capability that takes none.
NO_INPUT_STREAM = "capability takes no input stream"
INVALID_INPUT = "invalid_input"


@dataclass(slots=True)
class Deliver(Generic[Out]):
    """A ``yield`` or ``result`` for an outbound call; a result ends it."""

    handle: Out
    frame: Yield | Result


@dataclass(slots=True)
class Fail(Generic[Out]):
    """A malformed frame named an outbound call: fail it with ``error``."""

    handle: Out
    error: ProtocolError


@dataclass(slots=True)
class StartInbound(Generic[In]):
    """Run ``invoke(call.input)`` for the remote, under ``handle``."""

    call: Call
    invoke: Callable[[Any], Any]
    handle: In
    #: The capability takes an input stream (fed when ``call.input_stream``).
    items: bool = False


@dataclass(slots=True)
class CancelInbound(Generic[In]):
    """The remote cancelled the inbound call running under ``handle``."""

    handle: In


@dataclass(slots=True)
class CreditInbound(Generic[In]):
    """The remote took ``n`` more items of the inbound stream under ``handle``."""

    handle: In
    n: int


@dataclass(slots=True)
class InputInbound(Generic[In]):
    """An input item, or the end of the input, for the inbound call under ``handle``."""

    handle: In
    frame: Item | End


@dataclass(slots=True)
class WantOutbound(Generic[Out]):
    """The callee of our call under ``handle`` takes ``n`` more input items."""

    handle: Out
    n: int


@dataclass(slots=True)
class Reply:
    """Send ``text`` back at once; no capability runs."""

    text: str


class PeerState(Generic[Out, In]):
    """Calls in flight in both directions, and the rules for every frame.

    Args:
        capabilities: The local capabilities the remote may call.
        new_inbound: Makes the handle of a newly started inbound call.
        max_inbound_calls: How many remote calls may run here at once; one
            more is answered ``"too many concurrent calls"``.
        max_send_size: The largest message the remote accepts, in bytes of
            UTF-8; a frame we would send that is larger fails its one call
            instead (the remote would close the connection over it).
            ``None`` for no check.
        json_default: Converts values of other types in our inputs and
            outputs (see :func:`astral.encode`); ``None`` refuses them.
    """

    def __init__(
        self,
        capabilities: Any,
        new_inbound: Callable[[], In],
        *,
        max_inbound_calls: int,
        max_send_size: int | None = None,
        json_default: JsonDefault | None = None,
    ) -> None:
        self._capabilities = resolve(capabilities)
        self._json_default = json_default
        self._new_inbound = new_inbound
        self._max_inbound = max_inbound_calls
        self._max_send = max_send_size
        # A text of at most this many characters fits whatever its encoding.
        self._max_send_cheap = max_send_size // 4 if max_send_size is not None else 0
        self._ids = itertools.count(1)
        #: Who the remote is, for log lines (set by the driver).
        self.remote = "the remote peer"
        self.outbound: dict[str, Out] = {}
        self.inbound: dict[str, In] = {}
        #: Set while the connection drains: new calls are refused with
        #: ``"shutting down"``, calls in flight go on.
        self.draining = False

    # -- frames we send ----------------------------------------------------

    def start_call(
        self,
        capability: str,
        input: Any,
        handle: Out,
        window: int | None = None,
        *,
        trace: Mapping[str, str] | None = None,
        call_id: str | None = None,
        deadline: int | None = None,
        input_stream: bool = False,
    ) -> tuple[str, str]:
        """Register an outbound call; return its id and its ``call`` frame.

        Args:
            capability: The remote name.
            input: The input value.
            handle: What the driver wants delivered with this call's frames.
            window: Items the callee may stream before it needs credit.
            trace: Trace context to carry in the frame.
            call_id: An id taken earlier from :meth:`next_id`, else a new one.
            deadline: The caller's remaining budget in milliseconds, for
                the callee (only when the remote agreed to ``deadline``).
            input_stream: The caller will stream input items.

        Raises:
            ProtocolError: If ``input`` cannot be encoded, or the frame is
                larger than the remote accepts (nothing is registered).
        """
        if call_id is None:
            call_id = str(next(self._ids))
        text = encode(
            Call(call_id, capability, input, window, trace, deadline, input_stream),
            json_default=self._json_default,
        )
        if not self.fits(text):
            raise ProtocolError(
                f"call {capability}: the call is larger than the {self._max_send} bytes "
                "the remote accepts in one message",
                frame_id=call_id,
                frame_type="call",
            )
        self.outbound[call_id] = handle
        return call_id, text

    def next_id(self) -> str:
        """Reserve the id of an outbound call before starting it."""
        return str(next(self._ids))

    def abandon(self, call_id: str) -> str | None:
        """Stop waiting for an outbound call.

        Returns:
            The ``cancel`` frame to send, or ``None`` if the call had already
            ended (nothing to tell the remote).
        """
        if self.outbound.pop(call_id, None) is None:
            return None
        return encode(Cancel(call_id))

    def reply(self, frame: Yield | Result) -> tuple[str, bool]:
        """Encode a frame of an inbound call's answer.

        Returns:
            The text to send, and whether it ends the call. An output that
            cannot be encoded, or that is larger than the remote accepts, is
            replaced by an error result, which ends it.
        """
        try:
            text = encode(frame, json_default=self._json_default)
        except ProtocolError as exc:
            return encode(Result(frame.id, error=str(exc), code=INTERNAL)), True
        if not self.fits(text):
            logger.info(
                "call %r: answer larger than %s bytes, sent as an error", frame.id, self._max_send
            )
            return encode(self.oversize(frame.id)), True
        return text, type(frame) is Result

    def fits(self, text: str) -> bool:
        """Whether the remote accepts ``text`` as one message."""
        limit = self._max_send
        return (
            limit is None
            or len(text) <= self._max_send_cheap
            or len(text.encode("utf-8", "surrogatepass")) <= limit
        )

    def oversize(self, call_id: str) -> Result:
        """The error result that replaces an answer larger than the remote accepts."""
        return Result(call_id, error=f"result larger than {self._max_send} bytes")

    def credit(self, call_id: str, n: int) -> str | None:
        """The consumer of an outbound stream took ``n`` items.

        Returns:
            The ``credit`` frame to send, or ``None`` if the call has ended.
        """
        if call_id not in self.outbound:
            return None
        return encode(Credit(call_id, n))

    def item(self, call_id: str, value: Any) -> str | None:
        """Encode one input item of an outbound call.

        Returns:
            The ``item`` frame, or ``None`` if the call has ended.

        Raises:
            ProtocolError: ``value`` cannot be sent, or is larger than the
                remote accepts in one message.
        """
        if call_id not in self.outbound:
            return None
        text = encode(Item(call_id, value), json_default=self._json_default)
        if not self.fits(text):
            raise ProtocolError(
                f"input item larger than the {self._max_send} bytes the remote accepts",
                frame_id=call_id,
                frame_type="item",
            )
        return text

    def end(self, call_id: str) -> str | None:
        """The ``end`` frame of an outbound call's input, or ``None`` if it has ended."""
        if call_id not in self.outbound:
            return None
        return encode(End(call_id))

    def want(self, call_id: str, n: int) -> str:
        """The ``want`` frame granting the caller of an inbound call ``n`` more items."""
        return encode(Want(call_id, n))

    def finished(self, call_id: str, handle: In) -> None:
        """Forget an inbound call that has ended (its result is sent or moot)."""
        if self.inbound.get(call_id) is handle:
            del self.inbound[call_id]

    def close(self) -> tuple[list[Out], list[In]]:
        """Forget everything; return the handles to fail and to cancel."""
        outbound, inbound = list(self.outbound.values()), list(self.inbound.values())
        self.outbound.clear()
        self.inbound.clear()
        return outbound, inbound

    # -- frames we receive ---------------------------------------------------

    def receive(
        self, text: str
    ) -> (
        Deliver[Out]
        | Fail[Out]
        | StartInbound[In]
        | CancelInbound[In]
        | CreditInbound[In]
        | InputInbound[In]
        | WantOutbound[Out]
        | Reply
        | None
    ):
        """Route one incoming text message. Never raises.

        Returns:
            The event for the driver, or ``None`` when the message is ignored.
        """
        try:
            frame = decode(text)
        except ProtocolError as exc:
            return self._receive_malformed(exc)
        kind = type(frame)
        if kind is Result:
            handle = self.outbound.pop(frame.id, None)
        elif kind is Yield:
            handle = self.outbound.get(frame.id)
        elif kind is Call:
            return self._receive_call(frame)  # type: ignore[arg-type]
        elif kind is Want:
            handle = self.outbound.get(frame.id)
            if handle is None:
                logger.debug("ignored want for unknown call id %r", frame.id)
                return None
            return WantOutbound(handle, frame.n)  # type: ignore[union-attr]
        else:
            inbound = self.inbound.get(frame.id)
            if inbound is None:
                logger.debug("ignored %s for call %r: not running", kind.__name__.lower(), frame.id)
                return None
            if kind is Credit:
                return CreditInbound(inbound, frame.n)  # type: ignore[union-attr]
            if kind is Item or kind is End:
                return InputInbound(inbound, frame)  # type: ignore[arg-type]
            return CancelInbound(inbound)
        if handle is None:
            logger.debug("ignored %s for unknown call id %r", kind.__name__.lower(), frame.id)
            return None
        return Deliver(handle, frame)  # type: ignore[arg-type]

    def _receive_malformed(self, exc: ProtocolError) -> Fail[Out] | Reply | None:
        # Ids are scoped per direction: a malformed yield or result names one
        # of our calls, a malformed call names one of the remote's.
        if exc.frame_id is not None and exc.frame_type in ("yield", "result"):
            handle = self.outbound.pop(exc.frame_id, None)
            if handle is not None:
                protocol_warnings.warning(
                    "malformed %s for call %.60r from %s: %s",
                    exc.frame_type,
                    exc.frame_id,
                    self.remote,
                    exc,
                )
                return Fail(handle, exc)
        elif exc.frame_id is not None and exc.frame_type == "call":
            protocol_warnings.warning(
                "refused malformed call %.60r from %s: %s", exc.frame_id, self.remote, exc
            )
            return Reply(encode(Result(exc.frame_id, error=f"malformed call: {exc}")))
        protocol_warnings.warning("ignored malformed frame from %s: %s", self.remote, exc)
        return None

    def _receive_call(self, call: Call) -> StartInbound[In] | Reply:
        if call.id in self.inbound:
            protocol_warnings.warning(
                "refused call %.60r from %s: id already running", call.id, self.remote
            )
            return Reply(encode(Result(call.id, error=DUPLICATE_ID)))
        if self.draining:
            logger.debug("refused call %r: shutting down", call.id)
            return Reply(encode(Result(call.id, error=SHUTTING_DOWN)))
        invoke = self._capabilities.get(call.capability)
        if invoke is None:
            logger.debug("refused call %r: unknown capability %.60r", call.id, call.capability)
            return Reply(encode(Result(call.id, error=UNKNOWN_CAPABILITY)))
        items = takes_items(invoke)
        if call.input_stream and not items:
            logger.debug("refused call %r: %.60r takes no input stream", call.id, call.capability)
            return Reply(encode(Result(call.id, error=NO_INPUT_STREAM, code=INVALID_INPUT)))
        if len(self.inbound) >= self._max_inbound:
            logger.debug("refused call %r: %d calls running", call.id, len(self.inbound))
            return Reply(encode(Result(call.id, error=TOO_MANY_CALLS)))
        handle = self._new_inbound()
        self.inbound[call.id] = handle
        return StartInbound(call, invoke, handle, items)
