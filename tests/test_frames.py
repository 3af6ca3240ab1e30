"""Frames: the exact wire encoding, and a decoder that only ever raises ProtocolError."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import json
import math
import random
import re
import uuid
from typing import Any, NamedTuple

import pydantic
import pytest

import astral
from astral import Call, Cancel, Credit, ProtocolError, Result, Want, Yield, decode, encode
from astral._frames import MAX_DEPTH, MAX_ID_LENGTH, MAX_SAFE_INTEGER

from .helpers import plain_id

# -- encode: exactly what the original writes ---------------------------------


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        (
            Call("7", "echo", {"x": 1}),
            '{"type":"call","id":"7","capability":"echo","input":{"x":1}}',
        ),
        (Call("7", "ping"), '{"type":"call","id":"7","capability":"ping"}'),
        (Call("7", "ping", 0), '{"type":"call","id":"7","capability":"ping","input":0}'),
        (Call("7", "ping", ""), '{"type":"call","id":"7","capability":"ping","input":""}'),
        (Call("7", "ping", False), '{"type":"call","id":"7","capability":"ping","input":false}'),
        (Yield("7", 1), '{"type":"yield","id":"7","output":1}'),
        (Yield("7", [1, "a", None]), '{"type":"yield","id":"7","output":[1,"a",null]}'),
        (Result("7", {"x": 1}), '{"type":"result","id":"7","output":{"x":1}}'),
        (Result("7"), '{"type":"result","id":"7"}'),
        (Result("7", error="boom"), '{"type":"result","id":"7","error":"boom"}'),
        (Result("7", error=""), '{"type":"result","id":"7","error":""}'),
        (Result("7", 0), '{"type":"result","id":"7","output":0}'),
        (Result("7", 1, "e"), '{"type":"result","id":"7","output":1,"error":"e"}'),
        (Cancel("7"), '{"type":"cancel","id":"7"}'),
    ],
)
def test_encode_is_the_originals_compact_json(frame: astral.Frame, text: str) -> None:
    assert encode(frame) == text


def test_encode_does_not_escape_non_ascii() -> None:
    text = encode(Yield("1", "héllo ✓ 😀 日本"))
    assert text == '{"type":"yield","id":"1","output":"héllo ✓ 😀 日本"}'
    assert "\\u" not in text


def test_encode_keeps_input_key_order() -> None:
    assert encode(Call("1", "f", {"b": 1, "a": 2})) == (
        '{"type":"call","id":"1","capability":"f","input":{"b":1,"a":2}}'
    )


def test_encode_sends_nan_and_infinities_as_null_like_json_stringify() -> None:
    text = encode(Result("1", [float("nan"), float("inf"), float("-inf")]))
    assert text == '{"type":"result","id":"1","output":[null,null,null]}'


@pytest.mark.parametrize(
    "value",
    [
        object(),
        {1, 2},
        b"bytes",
        {1: "int key"},
        {"nested": [object()]},
        MAX_SAFE_INTEGER + 2,
        -MAX_SAFE_INTEGER - 2,
        2**64 + 1,
        -(2**70) - 1,
        10**400,
        [1, [2, 2**53 + 1]],
    ],
    ids=lambda value: re.sub(r" at 0x[0-9a-f]+", "", repr(value)),
)
def test_encode_refuses_values_json_cannot_carry(value: Any) -> None:
    for frame in (Call("9", "f", value), Yield("9", value), Result("9", value)):
        with pytest.raises(ProtocolError):
            encode(frame)


def test_encode_refusal_names_the_frame() -> None:
    with pytest.raises(ProtocolError) as info:
        encode(Call("42", "f", object()))
    assert info.value.frame_id == "42"


def test_encode_accepts_the_largest_safe_integers() -> None:
    for value in (MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER):
        text = encode(Yield("1", value))
        assert decode(text) == Yield("1", value)


def _nested(depth: int, leaf: Any = 0, *, container: type = list) -> Any:
    value = leaf
    for _ in range(depth):
        value = container([value]) if container is not dict else {"k": value}
    return value


@pytest.mark.parametrize("container", [list, dict])
def test_encode_refuses_nesting_deeper_than_the_limit(container: type) -> None:
    # The frame's own object is level 1, so its input may nest MAX_DEPTH - 1 deep.
    ok = Call("1", "f", _nested(MAX_DEPTH - 1, container=container))
    assert decode(encode(ok)) == ok
    with pytest.raises(ProtocolError, match="nesting"):
        encode(Call("1", "f", _nested(MAX_DEPTH, container=container)))
    # The slow path (here: a lone surrogate in the frame) counts the same way.
    assert decode(encode(Call("\ud800", "f", ok.input))) == Call("\ud800", "f", ok.input)
    with pytest.raises(ProtocolError, match="nesting"):
        encode(Call("\ud800", "f", _nested(MAX_DEPTH, container=container)))


class _Dict(dict[str, Any]):
    pass


@dataclasses.dataclass
class _Box:
    inner: Any


def _convert(value: Any) -> Any:
    if isinstance(value, _Dict):
        return dict(value)
    if isinstance(value, _Box):
        return [value.inner]
    raise TypeError(type(value).__name__)


def test_encode_depth_counts_every_container_json_default_makes() -> None:
    deep_subclass: Any = 0
    deep_dataclass: Any = 0
    for _ in range(MAX_DEPTH):
        deep_subclass = _Dict(k=deep_subclass)
        deep_dataclass = _Box(deep_dataclass)
    for value in (deep_subclass, deep_dataclass):
        with pytest.raises(ProtocolError, match="nesting") as info:
            encode(Result("3", value), json_default=_convert)
        assert info.value.frame_id == "3"
    a_level_less = _Box(_Box(0))
    assert encode(Result("3", a_level_less), json_default=_convert) == (
        '{"type":"result","id":"3","output":[[0]]}'
    )


def test_encode_refuses_a_cycle_as_too_deep() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ProtocolError, match="nesting"):
        encode(Result("3", cycle))


def test_encode_inexact_integer_names_the_frame_and_the_path() -> None:
    with pytest.raises(ProtocolError, match="2\\*\\*53") as info:
        encode(Yield("8", [1, {"n": MAX_SAFE_INTEGER + 2}]))
    assert info.value.frame_id == "8"
    assert "9007199254740993 at output[1]['n']" in str(info.value)


def test_encode_refuses_what_is_not_a_frame() -> None:
    with pytest.raises(ProtocolError):
        encode({"type": "call", "id": "1", "capability": "f"})  # type: ignore[arg-type]


# -- decode: round trips ------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        Call("1", "echo", {"x": [1, 2.5, None, True, "s"]}),
        Call("1", "echo"),
        Call("", ""),
        Call("x" * MAX_ID_LENGTH, "cap"),
        Yield("2", "héllo 😀"),
        Yield("2", None),
        Yield("2", {"nested": {"deep": [[]]}}),
        Result("3", 1.5),
        Result("3"),
        Result("3", error="boom"),
        Result("3", error=""),
        Result("3", output={"a": 1}, error="both"),
        Cancel("4"),
    ],
    ids=plain_id,
)
def test_decode_round_trips(frame: astral.Frame) -> None:
    text = encode(frame)
    assert decode(text) == frame
    assert decode(text.encode()) == frame


def test_decode_ignores_extra_fields() -> None:
    frame = decode('{"type":"call","id":"1","capability":"f","input":2,"x":{},"priority":5}')
    assert frame == Call("1", "f", 2)
    assert decode('{"id":"1","output":3,"type":"yield","window":8}') == Yield("1", 3)
    assert decode('{"type":"result","id":"1","output":3,"code":"E1"}') == Result("1", 3)
    assert decode('{"type":"cancel","id":"1","reason":"bored"}') == Cancel("1")


def test_decode_accepts_whitespace_and_any_key_order() -> None:
    assert decode(' { "input" : [ 1 ] , "capability":"f" ,"id":"1","type":"call" } \n') == Call(
        "1", "f", [1]
    )


@pytest.mark.parametrize("error_json", ["null", '""'])
def test_decode_error_null_or_empty_is_a_failure(error_json: str) -> None:
    frame = decode('{"type":"result","id":"1","output":5,"error":' + error_json + "}")
    assert isinstance(frame, Result)
    assert frame.error == ""
    assert frame.error is not None


def test_decode_result_without_error_is_a_success() -> None:
    frame = decode('{"type":"result","id":"1","output":null}')
    assert frame == Result("1")
    assert isinstance(frame, Result)
    assert frame.error is None


def test_decode_result_with_output_and_error_keeps_the_error() -> None:
    assert decode('{"type":"result","id":"1","output":1,"error":"e"}') == Result("1", 1, "e")


# -- decode: everything malformed is a ProtocolError -----------------------------

MALFORMED: list[str | bytes] = [
    # not JSON
    "",
    " ",
    "hello",
    "{",
    '{"type":"call"',
    '{"type":"call","id":"1","capability":"f"}{}',
    "{'type':'call'}",
    '{"type":"call","id":"1","capability":"f",}',
    '{"type":"call","id":"1","capability":"f","input":01}',
    '{"type":"call","id":"1","capability":"f","input":"\t"}',
    '\ufeff{"type":"cancel","id":"1"}',
    # bytes that are not UTF-8
    b"\xff\xfe",
    b'{"type":"call","id":"1","capability":"\xc3\x28"}',
    b'{"type":"call","id":"\xed\xa0\x80","capability":"f"}',
    # not an object
    "[]",
    '[{"type":"call","id":"1","capability":"f"}]',
    '"call"',
    "1",
    "1.5",
    "null",
    "true",
    # type
    '{"id":"1","capability":"f"}',
    '{"type":"ping","id":"1"}',
    '{"type":"CALL","id":"1","capability":"f"}',
    '{"type":1,"id":"1"}',
    '{"type":null,"id":"1"}',
    '{"type":["call"],"id":"1","capability":"f"}',
    # id
    '{"type":"call","capability":"f"}',
    '{"type":"call","id":1,"capability":"f"}',
    '{"type":"call","id":null,"capability":"f"}',
    '{"type":"result","id":["1"]}',
    '{"type":"yield","id":{"x":"1"},"output":1}',
    '{"type":"cancel","id":' + '"' + "x" * (MAX_ID_LENGTH + 1) + '"}',
    # call without a string capability
    '{"type":"call","id":"1"}',
    '{"type":"call","id":"1","capability":null}',
    '{"type":"call","id":"1","capability":7}',
    '{"type":"call","id":"1","capability":["f"]}',
    # result error of the wrong type
    '{"type":"result","id":"1","error":1}',
    '{"type":"result","id":"1","error":false}',
    '{"type":"result","id":"1","error":{"message":"x"}}',
    '{"type":"result","id":"1","error":["x"]}',
    # NaN and the infinities
    '{"type":"yield","id":"1","output":NaN}',
    '{"type":"yield","id":"1","output":Infinity}',
    '{"type":"yield","id":"1","output":-Infinity}',
    '{"type":"yield","id":"1","output":1e400}',
    '{"type":"yield","id":"1","output":-1e400}',
    '{"type":"yield","id":"1","output":[1E999]}',
    # integers beyond 64 bits that a double does not hold exactly
    '{"type":"yield","id":"1","output":18446744073709551617}',
    '{"type":"yield","id":"1","output":-18446744073709551617}',
    '{"type":"yield","id":"1","output":123456789012345678901234567890}',
    '{"type":"yield","id":"1","output":-123456789012345678901234567890}',
    '{"type":"yield","id":"1","output":' + "9" * 300 + "}",
    '{"type":"yield","id":"1","output":' + "9" * 5000 + "}",
    '{"type":"call","id":"1","capability":"f","input":{"a":[1,{"b":18446744073709551616}]}}',
    '{"type":"yield","id":"1","output":1000000000000000000000}',
    # escapes that are not JSON
    '{"type":"yield","id":"1","output":"\\ud80"}',
    '{"type":"yield","id":"1","output":"\\uzzzz"}',
    '{"type":"yield","id":"1","output":"\\x41"}',
]


@pytest.mark.parametrize("text", MALFORMED, ids=plain_id)
def test_decode_refuses_malformed_frames(text: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(text)


@pytest.mark.parametrize(
    "text",
    [t for t in MALFORMED if isinstance(t, str) and t.isascii()],
    ids=plain_id,
)
def test_decode_refuses_malformed_frames_given_as_bytes(text: str) -> None:
    with pytest.raises(ProtocolError):
        decode(text.encode())


@pytest.mark.parametrize(
    "value", [None, 1, 1.5, [], {}, object()], ids=["None", "1", "1.5", "[]", "{}", "object"]
)
def test_decode_refuses_what_is_not_text(value: Any) -> None:
    with pytest.raises(ProtocolError):
        decode(value)


def test_decode_accepts_bytes_like_objects() -> None:
    text = b'{"type":"call","id":"1","capability":"f","input":[1]}'
    assert decode(bytearray(text)) == Call("1", "f", [1])  # type: ignore[arg-type]
    assert decode(memoryview(text)) == Call("1", "f", [1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        MAX_SAFE_INTEGER,
        -MAX_SAFE_INTEGER,
        MAX_SAFE_INTEGER + 1,
        MAX_SAFE_INTEGER + 2,
        10**16,
        -(10**16),
        2**63 - 1,
        2**63,
        -(2**63),
        -(2**63) - 1,
        12345678901234567890,
        2**64 - 1,
        -(2**64) + 1,
        # Beyond 64 bits, what a double holds exactly (as JavaScript writes 2**64).
        18446744073709552000,
        -18446744073709552000,
        10**20,
        999999999999999900000,
    ],
)
def test_decode_reads_integers_exactly(value: int) -> None:
    for text in (
        '{"type":"yield","id":"1","output":' + str(value) + "}",
        '{"type":"yield","id":"1","output":{"a":[0,' + str(value) + "]}}",
    ):
        frame = decode(text)
        assert isinstance(frame, Yield)
        found = frame.output if type(frame.output) is int else frame.output["a"][1]
        assert type(found) is int
        assert found == value


def test_decode_refuses_integers_beyond_64_bits_that_a_double_rounds() -> None:
    with pytest.raises(ProtocolError, match="64 bits") as info:
        decode('{"type":"yield","id":"4","output":{"a":[0,18446744073709551617]}}')
    assert info.value.frame_id == "4"
    assert "at output['a'][1]" in str(info.value)


def test_decode_long_digit_runs_that_are_not_integers() -> None:
    digits = "1234567890" * 5
    text = '{"type":"call","id":"' + digits + '","capability":"f","input":"' + digits + '"}'
    assert decode(text) == Call(digits, "f", digits)
    assert decode('{"type":"yield","id":"1","output":{"' + digits + '":1}}') == Yield(
        "1", {digits: 1}
    )
    # Floats with many digits are floats, as in JavaScript.
    frame = decode('{"type":"yield","id":"1","output":[0.12345678901234567890,1.5e300,1e22]}')
    assert frame == Yield("1", [0.12345678901234568, 1.5e300, 1e22])
    frame = decode('{"type":"yield","id":"1","output":12345678901234567890.5}')
    assert frame == Yield("1", 12345678901234567890.5)
    assert decode('{"type":"yield","id":"1","output":12345678901234567890e0}') == Yield(
        "1", 1.2345678901234567e19
    )


def test_decode_nesting_limit() -> None:
    def frame_text(levels: int) -> str:
        # ``levels`` arrays inside the frame object: the frame is levels + 1 deep.
        return '{"type":"yield","id":"1","output":' + "[" * levels + "]" * levels + "}"

    assert decode(frame_text(MAX_DEPTH - 1)) == Yield("1", _nested(MAX_DEPTH - 2, []))
    with pytest.raises(ProtocolError, match="nesting"):
        decode(frame_text(MAX_DEPTH))
    with pytest.raises(ProtocolError):
        decode(frame_text(5000))
    objects = '{"type":"yield","id":"1","output":' + '{"a":' * MAX_DEPTH + "1" + "}" * MAX_DEPTH
    with pytest.raises(ProtocolError, match="nesting"):
        decode(objects + "}")
    ok = '{"type":"yield","id":"1","output":' + '{"a":' * (MAX_DEPTH - 1) + "1"
    assert isinstance(decode(ok + "}" * MAX_DEPTH), Yield)


def test_decode_many_brackets_that_are_not_nesting() -> None:
    wide = "[" + ",".join(["[]"] * 500) + "]"
    brackets_in_a_string = "[" * 500
    text = (
        '{"type":"call","id":"1","capability":"f","input":{"w":'
        + wide
        + ',"s":"'
        + brackets_in_a_string
        + '"}}'
    )
    frame = decode(text)
    assert isinstance(frame, Call)
    assert frame.input["s"] == brackets_in_a_string


def test_decode_accepts_surrogate_pairs() -> None:
    assert decode('{"type":"yield","id":"1","output":"\\ud83d\\ude00"}') == Yield("1", "😀")


def test_decode_id_length_limit() -> None:
    assert decode('{"type":"cancel","id":"' + "x" * MAX_ID_LENGTH + '"}') == Cancel(
        "x" * MAX_ID_LENGTH
    )
    # The limit is in characters, not bytes.
    assert decode('{"type":"cancel","id":"' + "é" * MAX_ID_LENGTH + '"}') == Cancel(
        "é" * MAX_ID_LENGTH
    )


# -- ProtocolError says which frame it was about ------------------------------


@pytest.mark.parametrize(
    ("text", "frame_id", "frame_type"),
    [
        ("not json", None, None),
        ("[1]", None, None),
        ('{"type":"call","id":"5"}', "5", "call"),
        ('{"type":"call","id":"5","capability":"f","input":NaN}', "5", "call"),
        ('{"type":"call","id":"5","capability":"f","input":[-Infinity]}', "5", "call"),
        ('{"type":"call","id":"5","capability":"f","input":1e999}', "5", "call"),
        ('{"type":"call","id":"5","capability":"f","input":28446744073709551616}', "5", "call"),
        ('{"type":"result","id":"5","output":"\\ud800","error":7}', "5", "result"),
        ('{"type":"result","id":"6","error":3}', "6", "result"),
        ('{"type":"yield","id":"7","output":' + "[" * 80 + "]" * 80 + "}", "7", "yield"),
        ('{"type":"ping","id":"8"}', "8", "ping"),
        ('{"type":3,"id":"9"}', "9", None),
        ('{"id":"9"}', "9", None),
        ('{"type":"result","id":3}', None, "result"),
        ('{"type":"result"}', None, "result"),
        ('{"type":"result","id":"' + "x" * 300 + '"}', None, "result"),
    ],
    ids=plain_id,
)
def test_protocol_error_names_the_frame_when_readable(
    text: str, frame_id: str | None, frame_type: str | None
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert info.value.frame_id == frame_id
    assert info.value.frame_type == frame_type
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, astral.AstralError)


# -- fuzz ---------------------------------------------------------------------

_SEEDS = [
    '{"type":"call","id":"1","capability":"echo","input":{"x":[1,2.5,"s",null,true]}}',
    '{"type":"yield","id":"22","output":"h\\u00e9llo \\ud83d\\ude00"}',
    '{"type":"result","id":"3","output":9007199254740991}',
    '{"type":"result","id":"3","error":"boom"}',
    '{"type":"cancel","id":"4"}',
    '{"type":"call","id":"5","capability":"f","input":[[[[[{"a":[-1e10]}]]]]]}',
    '{"type":"yield","id":"6","output":"12345678901234567890"}',
]
_ALPHABET = [
    *'{}[]",:\\0123456789-+.eEtruefalsnNIy \t\n',
    "\\u",
    "\\ud800",
    "é",
    "😀",
    "\x00",
    "\x7f",
    "1234567890123456789",
    "[" * 70,
    "NaN",
    "Infinity",
    '"type"',
    '"id"',
    '"call"',
    '"result"',
    '"error"',
]


def _mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        if not text:
            text = rng.choice(_SEEDS)
        i = rng.randrange(len(text) + 1)
        op = rng.randrange(6)
        if op == 0:
            text = text[:i] + text[i + 1 :]
        elif op == 1:
            text = text[:i] + rng.choice(_ALPHABET) + text[i:]
        elif op == 2:
            text = text[:i] + rng.choice(_ALPHABET) + text[i + 1 :]
        elif op == 3:
            j = rng.randrange(len(text) + 1)
            text = text[:i] + text[min(i, j) : max(i, j)] + text[i:]
        elif op == 4:
            text = text[:i]
        else:
            text = text[i:] + text[:i]
    return text


def test_fuzzed_frames_raise_only_protocol_error() -> None:
    rng = random.Random(20240607)
    outcomes = {"ok": 0, "refused": 0, "inexact": 0}
    for _ in range(4000):
        mutated = _mutate(rng, rng.choice(_SEEDS))
        text: str | bytes = mutated
        if rng.random() < 0.3:
            raw = bytearray(mutated.encode("utf-8", "surrogatepass"))
            if raw and rng.random() < 0.5:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            text = bytes(raw)
        try:
            frame = decode(text)
        except ProtocolError:
            outcomes["refused"] += 1
            continue
        outcomes["ok"] += 1
        # What decode accepts, encode can send again, and it means the same;
        # except integers beyond 2**53 that JavaScript would not write back.
        try:
            again = encode(frame)
        except ProtocolError as exc:
            refusal = str(exc)
        else:
            assert decode(again) == frame
            continue
        assert "a JavaScript peer would read it" in refusal
        outcomes["inexact"] += 1
    # The fuzz must exercise both paths to mean anything.
    assert outcomes["ok"] > 100
    assert outcomes["refused"] > 1000


def test_flow_control_extension_round_trips() -> None:
    call = astral.Call("7", "generate", "hi", window=1024)
    text = astral.encode(call)
    assert text == '{"type":"call","id":"7","capability":"generate","input":"hi","window":1024}'
    assert astral.decode(text) == call
    credit = astral.Credit("7", 512)
    assert astral.encode(credit) == '{"type":"credit","id":"7","n":512}'
    assert astral.decode(astral.encode(credit)) == credit
    # Without a window, a call is exactly the original's.
    assert astral.encode(astral.Call("7", "x")) == '{"type":"call","id":"7","capability":"x"}'


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"call","id":"1","capability":"x","window":0}',
        '{"type":"call","id":"1","capability":"x","window":-3}',
        '{"type":"call","id":"1","capability":"x","window":1.5}',
        '{"type":"call","id":"1","capability":"x","window":true}',
        '{"type":"call","id":"1","capability":"x","window":"8"}',
        '{"type":"credit","id":"1"}',
        '{"type":"credit","id":"1","n":0}',
        '{"type":"credit","id":"1","n":9007199254740992}',
        '{"type":"credit","id":"1","n":null}',
    ],
)
def test_flow_control_fields_are_validated(text: str) -> None:
    with pytest.raises(astral.ProtocolError) as info:
        astral.decode(text)
    assert info.value.frame_id == "1"


@pytest.mark.parametrize(
    ("text", "frame"),
    [
        (
            '{"type":"call","id":"1","capability":"x","window":9007199254740991}',
            astral.Call("1", "x", window=MAX_SAFE_INTEGER),
        ),
        ('{"type":"credit","id":"1","n":9007199254740991}', astral.Credit("1", MAX_SAFE_INTEGER)),
        ('{"type":"want","id":"1","n":9007199254740991}', astral.Want("1", MAX_SAFE_INTEGER)),
        ('{"type":"credit","id":"1","n":1}', astral.Credit("1", 1)),
    ],
)
def test_flow_control_counts_run_from_one_to_the_largest_safe_integer(
    text: str, frame: Any
) -> None:
    assert astral.decode(text) == frame


# -- JavaScript fidelity: lone surrogates ----------------------------------------


def test_decode_reads_a_lone_surrogate_as_javascript_wrote_it() -> None:
    # A JS string cut inside an emoji, as JSON.stringify writes it.
    text = '{"type":"call","id":"1","capability":"echo","input":"a\\ud800b"}'
    assert decode(text) == Call("1", "echo", "a\ud800b")
    assert decode(text.encode()) == Call("1", "echo", "a\ud800b")


def test_encode_escapes_a_lone_surrogate_as_json_stringify_does() -> None:
    assert encode(Result("1", "a\ud800b")) == '{"type":"result","id":"1","output":"a\\ud800b"}'
    # Only the surrogate is escaped; other non-ASCII text stays as it is.
    assert encode(Yield("1", ["é", "😀\udfff"])) == (
        '{"type":"yield","id":"1","output":["é","😀\\udfff"]}'
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"result","id":"1","output":"a\\ud800b"}',
        '{"type":"result","id":"1","error":"cut \\ud83d"}',
        '{"type":"yield","id":"\\udfff","output":{"\\ud83d":["x\\udc00y","😀",1]}}',
        '{"type":"call","id":"7","capability":"\\ud800","input":["\\udbff\\udbff"]}',
    ],
    ids=plain_id,
)
def test_a_javascript_string_with_lone_surrogates_comes_back_identical(text: str) -> None:
    assert encode(decode(text)) == text


def test_a_raw_surrogate_in_python_text_reads_like_its_escape() -> None:
    assert decode('{"type":"yield","id":"1","output":"\ud800"}') == Yield("1", "\ud800")


# -- JavaScript fidelity: integers ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (10**16, "10000000000000000"),
        (-(10**16), "-10000000000000000"),
        (2**53, "9007199254740992"),
        (1152921504606847000, "1152921504606847000"),  # how JavaScript writes 2**60
        (18446744073709552000, "18446744073709552000"),  # ... and 2**64, beyond 64 bits
        (999999999999999900000, "999999999999999900000"),
    ],
)
def test_encode_sends_integers_javascript_writes_back_unchanged(value: int, text: str) -> None:
    for frame in (Call("1", "f", [value]), Yield("1", {"n": value}), Result("1", value)):
        encoded = encode(frame)
        assert text in encoded
        assert decode(encoded) == frame


@pytest.mark.parametrize(
    ("value", "read_as"),
    [
        (2**53 + 1, "as 9007199254740992"),
        (-(2**53) - 1, "as -9007199254740992"),
        (2**60, "as 1152921504606847000"),
        (2**63 - 1, "as 9223372036854776000"),
        (10**21, "not as an integer"),
        (10**400, "not as an integer"),
    ],
)
def test_encode_refuses_integers_javascript_would_change(value: int, read_as: str) -> None:
    with pytest.raises(ProtocolError) as info:
        encode(Yield("3", {"list": [0, value]}))
    assert info.value.frame_id == "3"
    message = str(info.value)
    assert "at output['list'][1]" in message
    assert f"would read it {read_as}" in message


def test_what_encode_sends_decode_reads_as_the_same_integer() -> None:
    rng = random.Random(8)
    sent = 0
    for _ in range(3000):
        value = rng.choice([1, -1]) * rng.randrange(2 ** rng.randrange(1, 80))
        try:
            text = encode(Yield("1", value))
        except ProtocolError:
            assert abs(value) > MAX_SAFE_INTEGER
            continue
        sent += 1
        frame = decode(text)
        assert isinstance(frame, Yield)
        assert type(frame.output) is int
        assert frame.output == value
    assert sent > 1000


# -- one rule for values ------------------------------------------------------------


class _Color(enum.Enum):
    RED = 1


class _Size(enum.IntEnum):
    SMALL = 1


class _Name(enum.StrEnum):
    ALICE = "alice"


class _Pair(NamedTuple):
    a: int
    b: int


class _Str(str):
    __slots__ = ()


class _Int(int):
    pass


class _Float(float):
    pass


class _List(list[Any]):
    pass


class _Model(pydantic.BaseModel):
    x: int


REFUSED: list[tuple[Any, str]] = [
    (datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC), "datetime.datetime"),
    (datetime.date(2024, 1, 2), "datetime.date"),
    (datetime.time(3, 4), "datetime.time"),
    (datetime.timedelta(seconds=5), "datetime.timedelta"),
    (uuid.UUID(int=7), "uuid.UUID"),
    (_Box(1), "tests.test_frames._Box"),
    ((1, 2), "tuple"),
    (_Pair(1, 2), "tests.test_frames._Pair"),
    (b"bytes", "bytes"),
    (bytearray(b"x"), "bytearray"),
    ({1, 2}, "set"),
    (frozenset({1}), "frozenset"),
    (decimal.Decimal("1.5"), "decimal.Decimal"),
    (fractions.Fraction(1, 3), "fractions.Fraction"),
    (1j, "complex"),
    (_Color.RED, "tests.test_frames._Color"),
    (_Size.SMALL, "tests.test_frames._Size"),
    (_Name.ALICE, "tests.test_frames._Name"),
    (_Str("s"), "tests.test_frames._Str"),
    (_Int(1), "tests.test_frames._Int"),
    (_Float(1.5), "tests.test_frames._Float"),
    (_List([1]), "tests.test_frames._List"),
    (_Dict(a=1), "tests.test_frames._Dict"),
    (collections.OrderedDict(a=1), "collections.OrderedDict"),
    (collections.defaultdict(list), "collections.defaultdict"),
    (range(3), "range"),
    (_Model(x=1), "tests.test_frames._Model"),
    (object(), "object"),
]


@pytest.mark.parametrize(("value", "type_name"), REFUSED, ids=[name for _, name in REFUSED])
def test_encode_refuses_what_would_not_come_back_as_the_same_type(
    value: Any, type_name: str
) -> None:
    for frame, where in (
        (Call("5", "f", value), "input"),
        (Yield("5", [0, {"v": value}]), "output[1]['v']"),
        (Result("5", {"a": [value]}), "output['a'][0]"),
    ):
        with pytest.raises(ProtocolError) as info:
            encode(frame)
        assert info.value.frame_id == "5"
        assert f"cannot send {type_name} at {where}:" in str(info.value)
        assert "json_default" in str(info.value)


@pytest.mark.parametrize(("value", "type_name"), REFUSED, ids=[name for _, name in REFUSED])
def test_json_default_converts_what_the_rule_refuses(value: Any, type_name: str) -> None:
    seen: list[Any] = []

    def convert(item: Any) -> Any:
        seen.append(item)
        return f"<{type_name}>"

    text = encode(Yield("5", [0, {"v": value}]), json_default=convert)
    assert decode(text) == Yield("5", [0, {"v": f"<{type_name}>"}])
    assert len(seen) == 1
    assert seen[0] is value


def test_json_default_is_not_called_for_plain_values() -> None:
    def convert(item: Any) -> Any:
        raise AssertionError(item)  # pragma: no cover

    value = {"a": [1, 2.5, "s", None, True, {"b": []}], "c": "\ud800", "n": 10**16}
    assert decode(encode(Result("1", value), json_default=convert)) == Result("1", value)


def test_json_default_results_are_converted_again_and_checked() -> None:
    @dataclasses.dataclass
    class Event:
        when: datetime.datetime
        tags: tuple[str, ...]

    def convert(item: Any) -> Any:
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
        if isinstance(item, datetime.datetime):
            return item.isoformat()
        if isinstance(item, tuple):
            return list(item)
        if isinstance(item, uuid.UUID):
            return 2**60  # an integer JavaScript would change: still refused
        raise TypeError(f"cannot convert {type(item).__name__}")

    event = Event(datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC), ("a", "b\ud800"))
    text = encode(Result("1", [event]), json_default=convert)
    assert text == (
        '{"type":"result","id":"1","output":'
        '[{"when":"2024-01-02T00:00:00+00:00","tags":["a","b\\ud800"]}]}'
    )
    with pytest.raises(ProtocolError, match=r"at output\[0\]: a JavaScript peer would read"):
        encode(Result("1", [uuid.UUID(int=1)]), json_default=convert)
    with pytest.raises(ProtocolError) as info:
        encode(Result("1", {"s": {1}}), json_default=convert)
    assert str(info.value).startswith("cannot send set at output['s']: json_default raised")
    assert isinstance(info.value.__cause__, TypeError)


def test_json_default_that_keeps_returning_other_types_is_refused() -> None:
    with pytest.raises(ProtocolError, match="keeps returning"):
        encode(Result("1", {1, 2}), json_default=lambda item: item)


class _Nested:
    """A value ``json_default`` turns into another one ``depth`` times before a plain one."""

    def __init__(self, depth: int) -> None:
        self.depth = depth


def _unwrap(value: Any) -> Any:
    return _Nested(value.depth - 1) if value.depth else "plain"


@pytest.mark.parametrize(
    "place", [lambda v: v, lambda v: [v], lambda v: {"k": v}], ids=["output", "list", "object"]
)
def test_json_default_may_convert_a_value_sixteen_times_wherever_it_is(place: Any) -> None:
    """The limit counts the conversions of one value, the same at any depth."""
    sixteen = encode(Result("1", place(_Nested(15))), json_default=_unwrap)
    assert json.loads(sixteen)["output"] == place("plain")
    with pytest.raises(ProtocolError, match="json_default keeps returning values to convert"):
        encode(Result("1", place(_Nested(16))), json_default=_unwrap)


def test_a_non_finite_float_is_sent_as_null_on_the_slow_path_too() -> None:
    """As JSON.stringify writes it, also when a lone surrogate sends the frame the slow way."""
    text = encode(Result("1", [math.nan, math.inf, -math.inf, "\ud800"]))
    assert text == '{"type":"result","id":"1","output":[null,null,null,"\\ud800"]}'


def test_json_default_does_not_convert_keys() -> None:
    for key in (1, (1, 2), _Str("k"), _Name.ALICE, None):
        with pytest.raises(ProtocolError, match=r"cannot send the key .* at output\[0\]"):
            encode(Result("1", [{key: 1}]), json_default=str)


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _plain_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randrange(-(2**53), 2**53)
    if kind == 3:
        return rng.uniform(-1e300, 1e300)
    if kind == 4:
        return "".join(
            # Never a high surrogate then a low one: see the test below.
            rng.choice(["a", "é", "😀", "a\udc00", "\ud800", '"', "\\", "\n"])
            for _ in range(rng.randrange(5))
        )
    if kind == 5:
        return rng.choice([10**16, -(10**17), 0.0, -0.0, 1e22])
    if kind == 6:
        return [_plain_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        f"k{i}\ud83d"[: rng.randrange(2, 4)]: _plain_value(rng, depth + 1)
        for i in range(rng.randrange(4))
    }


def test_every_plain_value_comes_back_as_the_same_type_on_both_paths() -> None:
    rng = random.Random(88)
    for _ in range(1500):
        value = _plain_value(rng)
        for frame in (Yield("1", value), Yield("\ud800", value)):  # fast path, slow path
            back = decode(encode(frame))
            assert isinstance(back, Yield)
            assert _same(back.output, value), (value, back.output)


def test_a_surrogate_pair_held_as_two_code_points_comes_back_as_one_character() -> None:
    # JavaScript cannot tell them apart: both are the same UTF-16 string.
    text = encode(Yield("1", "\ud83d\ude00"))
    assert text == '{"type":"yield","id":"1","output":"\\ud83d\\ude00"}'
    assert decode(text) == Yield("1", "😀")


# -- decode: what each malformed field is called, and what a failed result keeps


@pytest.mark.parametrize(
    ("text", "message", "kind"),
    [
        (
            '{"type":"result","id":"r1","error":7}',
            "result 'error' must be a string",
            "result",
        ),
        ('{"type":"call","id":"r1","capability":7}', "call has no string 'capability'", "call"),
        ('{"type":"call","id":"r1"}', "call has no string 'capability'", "call"),
        (
            '{"type":"call","id":"r1","capability":"echo","window":0}',
            "call 'window' must be a positive integer",
            "call",
        ),
        *(
            (
                f'{{"type":"call","id":"r1","capability":"echo","deadline":{bad}}}',
                "call 'deadline' must be a whole number of milliseconds, 0 or more",
                "call",
            )
            for bad in (-1, 1.5, '"5"', MAX_SAFE_INTEGER + 1)
        ),
        (
            '{"type":"call","id":"r1","capability":"echo","input_stream":1}',
            "call 'input_stream' must be a boolean",
            "call",
        ),
        ('{"type":"credit","id":"r1","n":0}', "credit 'n' must be a positive integer", "credit"),
        ('{"type":"want","id":"r1"}', "want 'n' must be a positive integer", "want"),
        ('{"type":"nope","id":"r1"}', "unknown frame type 'nope'", "nope"),
        ('{"type":7,"id":"r1"}', "frame has no string 'type'", None),
    ],
)
def test_a_malformed_field_is_named_with_the_frames_id_and_type(
    text: str, message: str, kind: str | None
) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(text)
    assert str(caught.value) == message
    assert (caught.value.frame_id, caught.value.frame_type) == ("r1", kind)


@pytest.mark.parametrize(
    ("extra", "code", "data"),
    [
        ({"data": {"field": "name"}}, None, {"field": "name"}),
        ({"code": "invalid"}, "invalid", None),
        ({"code": "invalid", "data": [1, 2]}, "invalid", [1, 2]),
        ({}, None, None),
    ],
)
def test_a_failed_result_keeps_its_output_code_and_data(
    extra: dict[str, Any], code: str | None, data: Any
) -> None:
    frame = {"type": "result", "id": "r1", "output": {"partial": True}, "error": "bad", **extra}
    assert decode(json.dumps(frame)) == Result("r1", {"partial": True}, "bad", code, data)


def test_counts_and_deadlines_reach_the_largest_safe_integer() -> None:
    top = MAX_SAFE_INTEGER
    call = decode(f'{{"type":"call","id":"c","capability":"echo","window":{top},"deadline":{top}}}')
    assert isinstance(call, Call)
    assert (call.window, call.deadline) == (top, top)
    assert decode('{"type":"call","id":"c","capability":"echo","deadline":0}') == Call(
        "c", "echo", deadline=0
    )
    assert decode(f'{{"type":"credit","id":"c","n":{top}}}') == Credit("c", top)
    assert decode('{"type":"want","id":"c","n":1}') == Want("c", 1)


def test_a_failed_result_is_sent_with_its_code_and_data() -> None:
    frame = Result("r1", None, "bad input", "invalid", {"field": "name"})
    assert encode(frame) == (
        '{"type":"result","id":"r1","error":"bad input","code":"invalid","data":{"field":"name"}}'
    )
    assert decode(encode(frame)) == frame


@pytest.mark.parametrize(
    ("data", "refused"),
    [
        ({"n": 2**60}, "would read it as 1152921504606847000"),
        (_nested(MAX_DEPTH), f"nesting deeper than {MAX_DEPTH} levels"),
    ],
)
def test_a_failed_results_data_follows_the_value_rules(data: Any, refused: str) -> None:
    # As deep as an output may be (the frame's own object is level 1)...
    ok = Result("r1", None, "bad input", None, _nested(MAX_DEPTH - 1))
    assert decode(encode(ok)) == ok
    # ...and no deeper, nor with an integer JavaScript would change.
    with pytest.raises(ProtocolError) as info:
        encode(Result("r1", None, "bad input", None, data))
    assert info.value.frame_id == "r1"
    assert refused in str(info.value)


def test_a_call_is_sent_with_every_extension_it_carries() -> None:
    frame = Call(
        "c1",
        "echo",
        [1],
        window=16,
        trace={"traceparent": "00-abc-def-01"},
        deadline=1500,
        input_stream=True,
    )
    assert encode(frame) == (
        '{"type":"call","id":"c1","capability":"echo","input":[1],"window":16,'
        '"trace":{"traceparent":"00-abc-def-01"},"deadline":1500,"input_stream":true}'
    )
    assert decode(encode(frame)) == frame


@pytest.mark.parametrize(
    ("value", "name"),
    [(object(), "object"), ({"type": "call"}, "dict"), (None, "NoneType"), ("call", "str")],
)
def test_encoding_something_that_is_not_a_frame_names_its_type(value: Any, name: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        encode(value)
    assert str(caught.value) == f"not a frame: {name}"
