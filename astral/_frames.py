r"""The wire format: frames as immutable values, and their JSON encoding.

One frame is one JSON object in one text message. The three frames of the
original protocol, plus two extensions::

    {"type":"call","id":"7","capability":"echo","input":{"x":1}}
    {"type":"yield","id":"7","output":1}
    {"type":"result","id":"7","output":{"x":1}}      # or "error":"message"
    {"type":"cancel","id":"7"}                         # astral extension
    {"type":"credit","id":"7","n":512}                 # astral extension
    {"type":"call",...,"deadline":2500}                # astral extension (negotiated)
    {"type":"call",...,"input_stream":true}            # astral extension (negotiated)
    {"type":"want","id":"7","n":64}                    # callee: send 64 more items
    {"type":"item","id":"7","value":"chunk"}           # caller: one input item
    {"type":"end","id":"7"}                            # caller: no more input items

:func:`encode` writes exactly what the original TypeScript peer writes
(compact JSON, these key names, optional keys omitted when ``None``).
:func:`decode` is strict: anything malformed raises :class:`ProtocolError`
and nothing else.

The rule for values (``docs/protocol.md`` states it for users): a value is
sent only if it comes back as the same Python type. ``dict`` (with ``str``
keys), ``list``, ``str``, ``int``, ``float``, ``bool`` and ``None`` do, and
nothing else: tuples, subclasses, enums, UUIDs, datetimes, dataclasses,
bytes, sets, decimals... are refused with an error naming the type and its
path in the value, unless a ``json_default`` hook converts them (as
``json.dumps(default=...)`` does). Two more limits keep a JavaScript peer
faithful: an integer is sent only if a JavaScript peer reads it as a number
it writes back as the same integer (``10**16`` goes, ``2**53 + 1`` does not:
JavaScript reads it as ``2**53``), and NaN and the infinities are sent as
``null``, as ``JSON.stringify`` writes them. What JavaScript sends is
accepted as it is: lone UTF-16 surrogates (``"\ud800"``, a string cut
inside an emoji) are read as ``str`` holds them and sent back escaped, and
integers are read exactly: any that fits in 64 bits, and beyond that any
written as JavaScript writes numbers.

Why two paths: orjson encodes and decodes plain frames at C speed, with
options that make it refuse (rather than convert) every type outside the
rule except tuples, enums and UUIDs, which one cheap walk of the value
catches. Everything orjson refuses, or cannot read (lone surrogates, NaN,
integers beyond 64 bits), takes a slower path in Python and the standard
library's ``json`` that either carries the frame faithfully or names exactly
what is wrong, with the frame's id whenever it can be read.

The optional extension fields (a result's ``code`` and ``data``, a call's
``window``, ``deadline`` and ``trace``) are validated on receipt too; a malformed ``code``,
``data`` or ``trace`` is dropped field by field, with a rate-limited warning
on the ``astral.protocol`` logger, and the frame is still delivered.

This module does no I/O besides that logging.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
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
    "End",
    "Frame",
    "Item",
    "Result",
    "Want",
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
        deadline: astral extension (feature ``deadline``): the caller's
            remaining budget in whole milliseconds when it sent the call
            (0 or more); the callee stops the capability once that much time
            has passed on its own clock. ``None`` (absent) means no deadline.
        input_stream: astral extension (feature ``input-stream``): the caller
            streams input items to the capability (:class:`Item`,
            :class:`End`), as the callee asks for them (:class:`Want`).
    """

    id: str
    capability: str
    input: Any = None
    window: int | None = None
    trace: Mapping[str, str] | None = None
    deadline: int | None = None
    input_stream: bool = False


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


@dataclass(frozen=True, slots=True)
class Want:
    """astral extension (``input-stream``): the callee takes ``n`` more input items.

    Sent by the callee of a call made with ``input_stream``, first when the
    call starts (its window), then as the capability consumes items. The
    caller never has more items in flight than it was granted.

    Attributes:
        id: The caller's call.
        n: How many more items may be sent (at least 1).
    """

    id: str
    n: int


@dataclass(frozen=True, slots=True)
class Item:
    """astral extension (``input-stream``): one input item, caller to callee.

    Attributes:
        id: The call it belongs to.
        value: The item, any JSON value.
    """

    id: str
    value: Any = None


@dataclass(frozen=True, slots=True)
class End:
    """astral extension (``input-stream``): the caller has no more input items.

    Attributes:
        id: The call whose input ends.
    """

    id: str


Frame: TypeAlias = Call | Yield | Result | Cancel | Credit | Want | Item | End

if TYPE_CHECKING:
    from collections.abc import Callable

#: A conversion hook, as ``json.dumps(default=...)``: called with each value
#: of a type outside the rule, it returns a value to send in its place.
JsonDefault: TypeAlias = "Callable[[Any], Any]"

# orjson hands subclasses, datetimes and dataclasses to ``default``; with no
# ``default`` it raises, which sends the frame down the slow path. It still
# writes tuples, enums and UUIDs itself: ``_plain`` catches those.
_FAST_OPTIONS: Final = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_STRICT_INTEGER
)
_LEAVES: Final = frozenset((str, int, float, bool, type(None)))
_UINT64: Final = 2**64
# How many times in a row ``json_default`` may return a value it must convert again.
_MAX_CONVERSIONS: Final = 16
# A lone surrogate left in text the standard library wrote with ensure_ascii=False.
_SURROGATE = re.compile("[\ud800-\udfff]")
# A run of 19+ digits may be an integer literal beyond 64 bits (orjson reads
# those as floats). It can only start a digit run that is not a fraction, and
# is not followed by a fraction or exponent. Strings with long digit runs
# match too; that only costs an exact re-read.
_LONG_INTEGER = re.compile(r"(?<![0-9.])[0-9]{19,}(?![0-9.eE])")
# A much cheaper first filter: most frames have no run of 19 digits at all.
_DIGITS_19 = re.compile(r"[0-9]{19}")


def encode(frame: Frame, *, json_default: JsonDefault | None = None) -> str:
    r"""Encode a frame as the original's compact JSON.

    Args:
        frame: The frame to encode.
        json_default: Converts values of other types, like
            ``json.dumps(default=...)``: called with each one, it returns a
            value to send instead (converted again if need be); raising
            refuses the value. ``None`` refuses every such value.

    Returns:
        The JSON text for one WebSocket text message.

    Raises:
        ProtocolError: If a value would not come back as the same Python
            type (anything but ``dict`` with ``str`` keys, ``list``, ``str``,
            ``int``, ``float``, ``bool`` and ``None``, unless
            ``json_default`` converts it), is an integer a JavaScript peer
            would read as another (beyond 2**53, only integers exactly as
            JavaScript writes them go: ``10**16`` does, ``2**53 + 1`` does
            not), or nests deeper than :data:`MAX_DEPTH`. The
            message names the type and its path in the value. NaN and the
            infinities are sent as ``null``, as ``JSON.stringify`` does;
            lone surrogates are sent escaped (``"\ud800"``).
    """
    if type(frame) is Result:
        obj: dict[str, Any] = {"type": "result", "id": frame.id}
        value = frame.output
        if value is not None:
            obj["output"] = value
        if frame.error is not None:
            obj["error"] = frame.error
            if frame.code is not None:
                obj["code"] = frame.code
            if frame.data is not None:
                obj["data"] = frame.data
                value = [value, frame.data]  # both checked by _plain (a level deeper)
    elif type(frame) is Yield:
        value = frame.output
        obj = {"type": "yield", "id": frame.id, "output": value}
    elif type(frame) is Call:
        value = frame.input
        obj = {"type": "call", "id": frame.id, "capability": frame.capability}
        if value is not None:
            obj["input"] = value
        if frame.window is not None:
            obj["window"] = frame.window
        if frame.trace:
            obj["trace"] = dict(frame.trace)
        if frame.deadline is not None:
            obj["deadline"] = frame.deadline
        if frame.input_stream:
            obj["input_stream"] = True
    elif type(frame) is Cancel:
        value = None
        obj = {"type": "cancel", "id": frame.id}
    elif type(frame) is Credit:
        value = None
        obj = {"type": "credit", "id": frame.id, "n": frame.n}
    elif type(frame) is Item:
        value = frame.value
        obj = {"type": "item", "id": frame.id, "value": value}
    elif type(frame) is Want:
        value = None
        obj = {"type": "want", "id": frame.id, "n": frame.n}
    elif type(frame) is End:
        value = None
        obj = {"type": "end", "id": frame.id}
    else:
        raise ProtocolError(f"not a frame: {type(frame).__name__}")
    try:
        data = orjson.dumps(obj, option=_FAST_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError included
        return _encode_slow(obj, frame.id, json_default)
    if type(value) not in _LEAVES and not _plain(value):
        return _encode_slow(obj, frame.id, json_default)
    return data.decode()


def _plain(value: Any) -> bool:
    """Whether ``value`` holds only the types of the rule, nested at most as allowed.

    Level by level: the frame is level 1, so ``value`` is level 2.
    """
    level = [value]
    for _ in range(MAX_DEPTH - 1):
        next_level: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is dict:
                next_level.extend(item.values())
            elif kind is list:
                next_level.extend(item)
            elif kind not in _LEAVES:
                return False
        if not next_level:
            return True
        level = next_level
    return all(type(item) in _LEAVES for item in level)


def _encode_slow(obj: dict[str, Any], frame_id: str, json_default: JsonDefault | None) -> str:
    """Encode what orjson refused or :func:`_plain` doubted, or say exactly why not."""
    try:
        native = _to_json(obj, (), json_default, 0)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), frame_id=frame_id) from exc.__cause__
    try:
        return orjson.dumps(native).decode()
    except TypeError:
        # Lone surrogates, or integers beyond 64 bits that a double holds
        # exactly: the standard library writes both, the surrogates raw, so
        # they are escaped as JSON.stringify escapes them.
        text = json.dumps(native, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return _SURROGATE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _to_json(value: Any, path: tuple[str | int, ...], json_default: Any, converted: int) -> Any:
    """Return ``value`` as plain JSON types, applying the rule and ``json_default``."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        written = _as_javascript_writes(value)
        if written != value:
            read = "not as an integer" if written is None else f"as {written}"
            raise ProtocolError(
                f"cannot send the integer {_int_text(value)} at {_where(path)}: a JavaScript"
                f" peer would read it {read} (beyond 2**53 only integers exactly as"
                " JavaScript writes them come back unchanged)"
            )
        return value
    if kind is float:
        return value if math.isfinite(value) else None  # as JSON.stringify writes it
    if kind is dict or kind is list:
        if len(path) >= MAX_DEPTH:
            raise ProtocolError(f"nesting deeper than {MAX_DEPTH} levels at {_where(path)}")
        if kind is list:
            return [_to_json(item, (*path, i), json_default, 0) for i, item in enumerate(value)]
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise ProtocolError(
                    f"cannot send the key {key!r:.60} ({_type_name(type(key))}) at"
                    f" {_where(path)}: object keys must be str"
                )
            out[key] = _to_json(item, (*path, key), json_default, 0)
        return out
    where = f"{_type_name(kind)} at {_where(path)}"
    if json_default is None:
        raise ProtocolError(
            f"cannot send {where}: it would not come back as the same type"
            " (convert it first, or pass json_default=)"
        )
    if converted >= _MAX_CONVERSIONS:
        raise ProtocolError(f"cannot send {where}: json_default keeps returning values to convert")
    try:
        replacement = json_default(value)
    except Exception as exc:
        raise ProtocolError(f"cannot send {where}: json_default raised {exc!r:.200}") from exc
    return _to_json(replacement, path, json_default, converted + 1)


def _as_javascript_writes(value: int) -> int | None:
    """The integer a JavaScript peer writes back after reading ``value``, if it is one.

    JavaScript reads a number as the nearest double and writes it back with
    the fewest digits that read as that double, then zeros (``2**60`` comes
    back as ``1152921504606847000``), and from 1e21 on in exponent form,
    which reads as a float.
    """
    if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return value
    try:
        double = float(value)
    except OverflowError:
        return None
    if abs(double) >= 1e21:
        return None
    # repr() is the shortest text that reads back as the double, as in JavaScript.
    return int(Decimal(repr(double)))


def _int_text(value: int) -> str:
    if value.bit_length() > 128:
        return f"of {value.bit_length()} bits"
    return str(value)


def _where(path: tuple[str | int, ...]) -> str:
    # Never empty: the frame's own object is always sound, so a path starts
    # with one of its fields (``input``, ``output``, ``id``...).
    first, *rest = path
    return str(first) + "".join(f"[{key!r:.60}]" for key in rest)


def _type_name(kind: type) -> str:
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


class _NonFinite:
    """What the standard library's ``json`` reads ``NaN`` and the infinities as, to refuse."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def decode(text: str | bytes) -> Frame:
    r"""Decode and validate one frame.

    Unknown extra fields are ignored, so peers may add optional fields. A
    malformed ``code``, ``data`` or ``trace`` extension field is dropped
    (with a rate-limited WARNING on ``astral.protocol``), not the frame.
    Strings may hold lone UTF-16 surrogates (``"\ud800"``), as JavaScript
    writes them; integers are read exactly.

    Args:
        text: One text message.

    Returns:
        The frame: :class:`Call`, :class:`Yield`, :class:`Result`,
        :class:`Cancel`, :class:`Credit`, :class:`Want`, :class:`Item` or
        :class:`End`.

    Raises:
        ProtocolError: On anything malformed: not JSON, not an object,
            missing or unknown ``type``, wrong field types, NaN/Infinity,
            integers beyond 64 bits not written as JavaScript writes numbers,
            excessive nesting. Its ``frame_id`` is set whenever the frame's
            ``id`` could be read.
    """
    slow = False
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        obj, slow = _loads_slow(text, exc), True
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
    try:
        if slow:
            _check_received(obj, ())
        else:
            obj = _check_fast(text, obj)
    except ProtocolError as exc:
        if not slow:
            obj = json.loads(_as_text(text))  # exactly, big integers included
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
        deadline = obj.get("deadline")
        if deadline is not None and not (
            type(deadline) is int and 0 <= deadline <= MAX_SAFE_INTEGER
        ):
            raise ProtocolError(
                "call 'deadline' must be a whole number of milliseconds, 0 or more",
                frame_id=frame_id,
                frame_type=kind,
            )
        input_stream = obj.get("input_stream", False)
        if type(input_stream) is not bool:
            raise ProtocolError(
                "call 'input_stream' must be a boolean", frame_id=frame_id, frame_type=kind
            )
        return Call(frame_id, capability, obj.get("input"), window, trace, deadline, input_stream)
    if kind == "cancel":
        return Cancel(frame_id)
    if kind == "credit":
        n = obj.get("n")
        if not _is_count(n):
            raise ProtocolError(
                "credit 'n' must be a positive integer", frame_id=frame_id, frame_type=kind
            )
        return Credit(frame_id, n)
    if kind == "item":
        return Item(frame_id, obj.get("value"))
    if kind == "want":
        n = obj.get("n")
        if not _is_count(n):
            raise ProtocolError(
                "want 'n' must be a positive integer", frame_id=frame_id, frame_type=kind
            )
        return Want(frame_id, n)
    if kind == "end":
        return End(frame_id)
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
        _check_received(obj, ())
    except ProtocolError:
        obj[field] = value
        return False
    protocol_warnings.warning(
        "ignored %r of %s %.60r: it breaks the value rules", field, kind, obj.get("id")
    )
    return True


def _is_count(value: Any) -> TypeGuard[int]:
    return type(value) is int and 1 <= value <= MAX_SAFE_INTEGER


def _loads_slow(text: str | bytes, error: orjson.JSONDecodeError) -> Any:
    """Read what orjson refused: lone surrogates, NaN, deep nesting, or real garbage.

    The standard library reads lone surrogates as ``str`` holds them, and
    ``NaN`` as a marker :func:`_check_received` refuses once the frame's id
    is known. Otherwise its grammar is orjson's, so garbage stays garbage.
    """
    if not isinstance(text, str):
        if not isinstance(text, bytes | bytearray | memoryview):
            raise ProtocolError(f"not valid JSON: {error}")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"not valid JSON: {error}") from None
    try:
        return json.loads(text, parse_constant=_NonFinite)
    except (ValueError, RecursionError):
        raise ProtocolError(f"not valid JSON: {error}") from None


def _check_fast(text: str | bytes, obj: dict[str, Any]) -> dict[str, Any]:
    """Run the checks orjson does not, but only when the text could fail them.

    Counting brackets and searching for long digit runs are C-speed scans of
    the text; the exact walk runs only when one of them fires. Returns
    ``obj``, or the text re-read exactly when it holds integers beyond
    64 bits (which orjson reads as floats).
    """
    text = _as_text(text)
    if text.count("[") + text.count("{") > MAX_DEPTH and not _shallow(obj):
        _check_received(obj, ())  # raises, naming where
    if _DIGITS_19.search(text) is not None and _LONG_INTEGER.search(text) is not None:
        # orjson already vetted the text, so the standard library reads it.
        obj = json.loads(text)
        _check_received(obj, ())
    return obj


def _as_text(text: str | bytes) -> str:
    if isinstance(text, str):
        return text
    # bytes, or any other buffer orjson accepted (bytearray, memoryview)
    return bytes(text).decode("utf-8", "replace")


def _shallow(value: Any) -> bool:
    level = [value]
    for _ in range(MAX_DEPTH):
        next_level: list[Any] = []
        for item in level:
            if type(item) is dict:
                next_level.extend(item.values())
            elif type(item) is list:
                next_level.extend(item)
        if not next_level:
            return True
        level = next_level
    return not any(type(item) in (dict, list) for item in level)


def _check_received(value: Any, path: tuple[str | int, ...]) -> None:
    """Refuse non-finite numbers, inexact integers and deep nesting, naming where."""
    kind = type(value)
    if kind is dict or kind is list:
        if len(path) >= MAX_DEPTH:
            raise ProtocolError(f"nesting deeper than {MAX_DEPTH} levels at {_where(path)}")
        items = value.items() if kind is dict else enumerate(value)
        for key, item in items:
            if type(item) not in (str, bool, type(None)):
                _check_received(item, (*path, key))
    elif kind is int:
        if not -_UINT64 < value < _UINT64 and _as_javascript_writes(value) != value:
            raise ProtocolError(
                f"integer {_int_text(value)} at {_where(path)} is beyond 64 bits, and not"
                " a number as JavaScript writes it"
            )
    elif kind is float:
        if not math.isfinite(value):
            raise ProtocolError(f"{value} at {_where(path)} is not a JSON number")
    elif kind is _NonFinite:
        raise ProtocolError(f"{value.name} at {_where(path)} is not a JSON number")


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
