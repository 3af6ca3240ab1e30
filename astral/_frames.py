"""The wire format: frames as immutable values, and their JSON encoding.

One frame is one JSON object in one text message. The three frames of the
original protocol, plus one extension::

    {"type":"call","id":"7","capability":"echo","input":{"x":1}}
    {"type":"yield","id":"7","output":1}
    {"type":"result","id":"7","output":{"x":1}}      # or "error":"message"
    {"type":"cancel","id":"7"}                         # astral extension

:func:`encode` writes exactly what the original TypeScript peer writes
(compact JSON, these key names, optional keys omitted when ``None``).
:func:`decode` is strict: anything malformed raises :class:`ProtocolError`
and nothing else. Values must survive a round trip through a JavaScript
peer, so integers beyond ±(2**53 - 1), NaN and the infinities, lone
surrogates and nesting deeper than :data:`MAX_DEPTH` are refused.

The optional extension fields (a result's ``code`` and ``data``, a call's
``window`` and ``trace``) are validated on receipt too; a malformed ``code``,
``data`` or ``trace`` is dropped field by field, with a rate-limited warning
on the ``astral.protocol`` logger, and the frame is still delivered.

This module does no I/O besides that logging.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeGuard

import orjson

from ._exceptions import MAX_CODE_LENGTH, ProtocolError
from ._logs import protocol_warnings

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "MAX_DEPTH",
    "MAX_ID_LENGTH",
    "MAX_SAFE_INTEGER",
    "MAX_TRACE_FIELDS",
    "MAX_TRACE_VALUE",
    "Call",
    "Cancel",
    "Credit",
    "Frame",
    "Result",
    "Yield",
    "decode",
    "encode",
]

#: Deepest nesting of arrays and objects accepted in a frame, the frame's own
#: object included.
MAX_DEPTH: Final = 64
#: Longest call id accepted, in characters.
MAX_ID_LENGTH: Final = 256
#: Largest integer magnitude a JavaScript peer represents exactly (2**53 - 1).
MAX_SAFE_INTEGER: Final = 2**53 - 1
#: Most entries accepted in a call's ``trace`` object (astral extension).
MAX_TRACE_FIELDS: Final = 8
#: Longest value accepted in a call's ``trace`` object, in characters.
MAX_TRACE_VALUE: Final = 8192


@dataclass(frozen=True, slots=True)
class Call:
    """Invoke ``capability`` on the other peer.

    Attributes:
        id: Correlates the call with its yields and result; chosen by the
            caller, unique among the caller's calls in flight.
        capability: The registered name to invoke.
        input: Any JSON value; ``None`` is sent as an absent ``input``.
        window: astral extension: how many ``yield`` frames the caller can
            take before the callee must wait for :class:`Credit`; ``None``
            (absent, as from the original) means no flow control.
        trace: astral extension: trace context (W3C ``traceparent``,
            ``tracestate``...) as string keys and values, so the callee's
            span can be a child of the caller's; ``None`` when absent.
            Received junk is dropped with a warning (see :data:`MAX_TRACE_FIELDS`).
    """

    id: str
    capability: str
    input: Any = None
    window: int | None = None
    trace: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Yield:
    """One item of a streaming result.

    Attributes:
        id: The call this item belongs to.
        output: The item, any JSON value.
    """

    id: str
    output: Any = None


@dataclass(frozen=True, slots=True)
class Result:
    """The terminal frame of a call.

    Attributes:
        id: The call this result ends.
        output: The return value (``None`` for a stream's end, or when the
            capability returned nothing); sent as an absent ``output``.
        error: The error message when the call failed, else ``None``. Any
            ``error`` key on the wire, even ``null`` or ``""``, means failure;
            if both are present the error wins.
        code: astral extension: a short machine-readable error code, sent
            only with ``error``; a received one that is not a string of at
            most 128 characters is dropped with a warning.
        data: astral extension: any JSON value detailing the error, sent
            only with ``error``.
    """

    id: str
    output: Any = None
    error: str | None = None
    code: str | None = None
    data: Any = None


@dataclass(frozen=True, slots=True)
class Cancel:
    """astral extension: the caller no longer wants the call ``id``.

    The callee cancels the running capability and answers with exactly one
    terminal :class:`Result` (``error="cancelled"``) unless the call already
    finished. The original TypeScript peer ignores this frame.

    Attributes:
        id: The call to cancel.
    """

    id: str


@dataclass(frozen=True, slots=True)
class Credit:
    """astral extension: the caller took ``n`` more items of stream ``id``.

    A callee that received a ``window`` with the call may send ``n`` more
    ``yield`` frames. The original TypeScript peer ignores this frame.

    Attributes:
        id: The streaming call.
        n: How many more items may be sent (at least 1).
    """

    id: str
    n: int


Frame: TypeAlias = Call | Yield | Result | Cancel | Credit

# An integer literal of 16+ digits may exceed MAX_SAFE_INTEGER (16 digits).
# It can only start a digit run that is not a fraction, and is not followed by
# a fraction or exponent. Strings with long digit runs match too; that only
# costs an exact check.
_LONG_INTEGER = re.compile(r"(?<![\d.])\d{16,}(?![\d.eE])")
# A much cheaper first filter: most frames have no run of 16 digits at all.
_DIGITS_16 = re.compile(r"\d{16}")


def encode(frame: Frame) -> str:
    """Encode a frame as the original's compact JSON.

    Args:
        frame: The frame to encode.

    Returns:
        The JSON text for one WebSocket text message.

    Raises:
        ProtocolError: If a value cannot be carried faithfully: not JSON
            serializable, an integer beyond ±(2**53 - 1), a lone surrogate,
            or nesting deeper than :data:`MAX_DEPTH`. NaN and the infinities
            are sent as ``null``, as JavaScript's ``JSON.stringify`` does.
    """
    if type(frame) is Result:
        obj: dict[str, Any] = {"type": "result", "id": frame.id}
        if frame.output is not None:
            obj["output"] = frame.output
        if frame.error is not None:
            obj["error"] = frame.error
            if frame.code is not None:
                obj["code"] = frame.code
            if frame.data is not None:
                obj["data"] = frame.data
    elif type(frame) is Yield:
        obj = {"type": "yield", "id": frame.id, "output": frame.output}
    elif type(frame) is Call:
        obj = {"type": "call", "id": frame.id, "capability": frame.capability}
        if frame.input is not None:
            obj["input"] = frame.input
        if frame.window is not None:
            obj["window"] = frame.window
        if frame.trace:
            obj["trace"] = dict(frame.trace)
    elif type(frame) is Cancel:
        obj = {"type": "cancel", "id": frame.id}
    elif type(frame) is Credit:
        obj = {"type": "credit", "id": frame.id, "n": frame.n}
    else:
        raise ProtocolError(f"not a frame: {type(frame).__name__}")
    try:
        text = orjson.dumps(obj).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ProtocolError(f"value is not JSON-serializable: {exc}", frame_id=frame.id) from None
    try:
        # Checked on the text, not on ``obj``: orjson also writes tuples,
        # dataclasses and subclasses of dict and list, which the walk skips.
        _check_text(text, None)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), frame_id=frame.id) from None
    return text


def decode(text: str | bytes) -> Frame:
    """Decode and validate one frame.

    Unknown extra fields are ignored, so peers may add optional fields. A
    malformed ``code``, ``data`` or ``trace`` extension field is dropped
    (with a rate-limited WARNING on ``astral.protocol``), not the frame.

    Args:
        text: One text message.

    Returns:
        The frame: :class:`Call`, :class:`Yield`, :class:`Result` or
        :class:`Cancel`.

    Raises:
        ProtocolError: On anything malformed: not JSON, not an object,
            missing or unknown ``type``, wrong field types, NaN/Infinity,
            unsafe integers, lone surrogates, excessive nesting. Its
            ``frame_id`` is set when the frame's ``id`` could be read.
    """
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not valid JSON: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - orjson also raises TypeError, MemoryError...
        raise ProtocolError(f"not valid JSON: {type(exc).__name__}") from None
    if type(obj) is not dict:
        raise ProtocolError(f"frame must be a JSON object, not {_json_type(obj)}")
    kind = obj.get("type")
    if type(kind) is not str:
        kind = None
    frame_id = obj.get("id")
    if type(frame_id) is not str:
        raise ProtocolError("frame has no string 'id'", frame_type=kind)
    if len(frame_id) > MAX_ID_LENGTH:
        raise ProtocolError(f"frame id longer than {MAX_ID_LENGTH} characters", frame_type=kind)
    if not isinstance(text, str):
        # bytes, or any other buffer orjson accepted (bytearray, memoryview)
        text = bytes(text).decode("utf-8", "replace")
    try:
        _check_text(text, obj)
    except ProtocolError as exc:
        if not _without_bad_extension(obj, kind):
            raise ProtocolError(str(exc), frame_id=frame_id, frame_type=kind) from None
    if kind == "result":
        if "error" in obj:
            error = obj["error"]
            if error is None:
                error = ""
            elif type(error) is not str:
                raise ProtocolError(
                    "result 'error' must be a string", frame_id=frame_id, frame_type=kind
                )
            if "code" in obj or "data" in obj:
                return Result(frame_id, obj.get("output"), error, *_error_details(obj, frame_id))
            return Result(frame_id, obj.get("output"), error)
        return Result(frame_id, obj.get("output"))
    if kind == "yield":
        return Yield(frame_id, obj.get("output"))
    if kind == "call":
        capability = obj.get("capability")
        if type(capability) is not str:
            raise ProtocolError(
                "call has no string 'capability'", frame_id=frame_id, frame_type=kind
            )
        window = obj.get("window")
        if window is not None and not _is_count(window):
            raise ProtocolError(
                "call 'window' must be a positive integer", frame_id=frame_id, frame_type=kind
            )
        trace = obj.get("trace")
        if trace is not None:
            trace = _trace_context(trace, frame_id)
        return Call(frame_id, capability, obj.get("input"), window, trace)
    if kind == "cancel":
        return Cancel(frame_id)
    if kind == "credit":
        n = obj.get("n")
        if not _is_count(n):
            raise ProtocolError(
                "credit 'n' must be a positive integer", frame_id=frame_id, frame_type=kind
            )
        return Credit(frame_id, n)
    if kind is None:
        raise ProtocolError("frame has no string 'type'", frame_id=frame_id)
    raise ProtocolError(f"unknown frame type {kind!r:.40}", frame_id=frame_id, frame_type=kind)


def _error_details(obj: dict[str, Any], frame_id: str) -> tuple[str | None, Any]:
    # Extension fields are checked one by one: a bad one is dropped, the
    # error itself still ends the call.
    code = obj.get("code")
    if code is not None and not (type(code) is str and 0 < len(code) <= MAX_CODE_LENGTH):
        protocol_warnings.warning(
            "ignored malformed 'code' in result %.60r: not a string of 1 to %d characters",
            frame_id,
            MAX_CODE_LENGTH,
        )
        code = None
    return code, obj.get("data")


def _trace_context(trace: Any, frame_id: str) -> dict[str, str] | None:
    if (
        type(trace) is dict
        and len(trace) <= MAX_TRACE_FIELDS
        and all(
            type(value) is str and len(key) <= 256 and len(value) <= MAX_TRACE_VALUE
            for key, value in trace.items()
        )
    ):
        return trace
    protocol_warnings.warning(
        "ignored malformed 'trace' in call %.60r: not an object of at most %d short strings",
        frame_id,
        MAX_TRACE_FIELDS,
    )
    return None


def _without_bad_extension(obj: dict[str, Any], kind: str | None) -> bool:
    """Drop an extension field that broke a value rule; True if the rest passes.

    A result's ``data`` or a call's ``trace`` that breaks a value rule
    (an unsafe integer, excessive nesting) is ignored like any malformed
    extension field; the frame itself is still delivered.
    """
    field = {"result": "data", "call": "trace"}.get(kind or "")
    if field is None or field not in obj:
        return False
    value = obj.pop(field)
    try:
        _check_text(orjson.dumps(obj).decode(), obj)
    except (ProtocolError, TypeError, orjson.JSONEncodeError):
        obj[field] = value
        return False
    protocol_warnings.warning(
        "ignored %r of %s %.60r: it breaks the value rules", field, kind, obj.get("id")
    )
    return True


def _is_count(value: Any) -> TypeGuard[int]:
    return type(value) is int and 1 <= value <= MAX_SAFE_INTEGER


def _check_text(text: str, obj: dict[str, Any] | None) -> None:
    """Run the checks orjson does not, but only when the text could fail them.

    Counting brackets and searching for long digit runs are C-speed scans of
    the text; the exact walk runs only when one of them fires. ``obj`` is the
    text already parsed by orjson, or ``None`` to parse it only if needed.
    Integers that pass are at most 2**53 - 1, which orjson reads exactly, so
    ``obj`` needs no re-parse.
    """
    if text.count("[") + text.count("{") > MAX_DEPTH:
        _check_depth(orjson.loads(text) if obj is None else obj)
    if _DIGITS_16.search(text) is not None and _LONG_INTEGER.search(text) is not None:
        # orjson turns integer literals beyond 64 bits into floats; re-read
        # exactly with the standard library (orjson already vetted the text).
        exact = json.loads(text)
        _check_integers(exact)


def _check_depth(value: Any) -> None:
    level = [value]
    for _ in range(MAX_DEPTH):
        next_level: list[Any] = []
        for item in level:
            if type(item) is dict:
                next_level.extend(item.values())
            elif type(item) is list:
                next_level.extend(item)
        if not next_level:
            return
        level = next_level
    if any(type(item) in (dict, list) for item in level):
        raise ProtocolError(f"nesting deeper than {MAX_DEPTH} levels")


def _check_integers(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is int:
            if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                raise ProtocolError("integer beyond what JSON peers represent exactly (2**53 - 1)")
        elif kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"
