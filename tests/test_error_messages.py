"""Errors say what is wrong: the message of each argument and frame error.

Messages are part of what a user sees; a mutation run showed that any of
these could be blanked or garbled without a test noticing.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

import astral
from astral.testing import memory_transport_pair

from .helpers import SECRET


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("[1, 2]", "an array"),
        ('"call"', "a string"),
        ("null", "null"),
        ("true", "a boolean"),
        ("1.5", "a number"),
    ],
)
def test_a_frame_that_is_not_an_object_is_named_by_its_json_type(text: str, kind: str) -> None:
    with pytest.raises(astral.ProtocolError) as info:
        astral.decode(text)
    assert str(info.value) == f"frame must be a JSON object, not {kind}"


FITS_NONE = (
    "the key fits none of the allowed algorithms (wrong key type, or an HMAC "
    "secret shorter than the hash)"
)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"leeway": -1}, ValueError, "leeway must be a finite number of seconds >= 0"),
        ({"leeway": math.inf}, ValueError, "leeway must be a finite number of seconds >= 0"),
        (
            {"max_lifetime": 0},
            ValueError,
            "max_lifetime must be a finite number of seconds > 0, or None",
        ),
        ({"algorithms": "HS256"}, TypeError, "algorithms must be a sequence of names, not a str"),
        ({"algorithms": ["none"]}, ValueError, "algorithm 'none' can never be allowed"),
        ({"algorithms": ["NONE"]}, ValueError, "algorithm 'none' can never be allowed"),
        ({"algorithms": ["HS256", "none"]}, ValueError, "algorithm 'none' can never be allowed"),
        ({"algorithms": ["XS999"]}, ValueError, "unsupported algorithm 'XS999'"),
        ({"algorithms": []}, ValueError, "algorithms must name at least one algorithm"),
        ({"max_token_size": 0}, ValueError, "max_token_size must be > 0"),
        (
            {"required_claims": "exp"},
            TypeError,
            "required_claims must be a sequence of names, not a str",
        ),
        ({"issuer": ""}, ValueError, "issuer must not be empty"),
        ({"audience": ""}, ValueError, "audience must be a non-empty string or strings"),
        ({"audience": []}, ValueError, "audience must be a non-empty string or strings"),
        ({"algorithms": ["RS256"]}, ValueError, FITS_NONE),
    ],
)
def test_verifier_arguments_are_refused_with_their_reason(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    options.setdefault("algorithms", ["HS256"])
    with pytest.raises(error, match=exactly(message)):
        astral.JWTVerifier(SECRET, **options)


def test_a_max_lifetime_under_a_second_is_allowed_and_enforced() -> None:
    now = 1_700_000_000.0
    verifier = astral.JWTVerifier(SECRET, algorithms=["HS256"], max_lifetime=0.5, clock=lambda: now)
    one_second = astral.mint_token(SECRET, subject="w", now=now, expires_in=1)
    with pytest.raises(astral.AuthenticationError, match="token lifetime too long"):
        verifier.verify(one_second)


def exactly(message: str) -> str:
    """A ``match=`` pattern for exactly ``message``, nothing before or after it."""
    return "^" + re.escape(message) + "$"


def test_current_peer_outside_a_capability_says_so() -> None:
    with pytest.raises(
        RuntimeError, match=exactly("current_peer() called outside a capability run by a peer")
    ):
        astral.current_peer()


def test_current_call_outside_a_capability_says_so() -> None:
    with pytest.raises(
        RuntimeError, match=exactly("current_call() called outside a capability run by a peer")
    ):
        astral.current_call()


async def test_calling_a_peer_before_entering_it_says_how_to_use_it() -> None:
    ours, theirs = memory_transport_pair()
    async with ours, theirs:
        peer = astral.Peer(ours)
        message = exactly("use the Peer inside 'async with' before calling")
        with pytest.raises(RuntimeError, match=message):
            await peer.call("echo", 1)
        with pytest.raises(RuntimeError, match=message):
            async with peer.stream("count", 3):
                pass  # pragma: no cover
        async with peer:  # still usable as told (and its own streams closed)
            assert not peer.closed


def test_the_smallest_token_size_limit_is_one_byte() -> None:
    verifier = astral.JWTVerifier(SECRET, algorithms=["HS256"], max_token_size=1)
    with pytest.raises(astral.AuthenticationError):
        verifier.verify(astral.mint_token(SECRET, subject="w"))


# -- what encode refuses to send, and decode refuses to read -------------------------
#
# These messages reach the user as the ProtocolError of a call, and the
# remote as the error text of a refused call's result.


def test_an_integer_javascript_would_change_is_refused_with_the_rule() -> None:
    with pytest.raises(astral.ProtocolError) as info:
        astral.encode(astral.Yield("8", [1, {"n": 2**53 + 1}]))
    assert str(info.value) == (
        "cannot send the integer 9007199254740993 at output[1]['n']: a JavaScript peer would"
        " read it as 9007199254740992 (beyond 2**53 only integers exactly as JavaScript"
        " writes them come back unchanged)"
    )


@pytest.mark.parametrize(
    ("value", "named"),
    [
        # Up to 128 bits an integer is named by its digits, beyond by its size.
        (2**127 + 1, "170141183460469231731687303715884105729"),
        (2**128 + 1, "of 129 bits"),
    ],
    ids=["128-bits", "129-bits"],
)
def test_a_long_integer_is_named_by_its_digits_up_to_128_bits(value: int, named: str) -> None:
    with pytest.raises(astral.ProtocolError) as info:
        astral.encode(astral.Yield("1", value))
    assert str(info.value) == (
        f"cannot send the integer {named} at output: a JavaScript peer would read it not as an"
        " integer (beyond 2**53 only integers exactly as JavaScript writes them come back"
        " unchanged)"
    )
    with pytest.raises(astral.ProtocolError) as info:
        astral.decode(f'{{"type":"yield","id":"1","output":{value}}}')
    assert str(info.value) == (
        f"integer {named} at output is beyond 64 bits, and not a number as JavaScript writes it"
    )


def test_a_key_that_is_not_a_string_is_refused_naming_its_type() -> None:
    with pytest.raises(astral.ProtocolError) as info:
        astral.encode(astral.Result("1", [{1: "one"}]))
    assert str(info.value) == "cannot send the key 1 (int) at output[0]: object keys must be str"


def test_a_value_of_another_type_is_refused_with_what_to_do() -> None:
    with pytest.raises(astral.ProtocolError) as info:
        astral.encode(astral.Result("1", {"s": {1}}))
    assert str(info.value) == (
        "cannot send set at output['s']: it would not come back as the same type"
        " (convert it first, or pass json_default=)"
    )


@pytest.mark.parametrize(
    "text",
    [None, b"\xff", b"{\xff", "{", b"{"],
    ids=["not-text", "bad-utf8", "bad-utf8-in-object", "str-garbage", "bytes-garbage"],
)
def test_what_is_not_json_is_refused_as_such(text: Any) -> None:
    # What follows the colon is the JSON parser's own account of the error.
    with pytest.raises(astral.ProtocolError, match=r"^not valid JSON: \S"):
        astral.decode(text)


def test_an_integer_beyond_64_bits_is_refused_on_receipt_with_the_rule() -> None:
    with pytest.raises(astral.ProtocolError) as info:
        astral.decode('{"type":"yield","id":"1","output":{"a":[0,18446744073709551617]}}')
    assert str(info.value) == (
        "integer 18446744073709551617 at output['a'][1] is beyond 64 bits, and not a number"
        " as JavaScript writes it"
    )


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("1e400", "inf at output is not a JSON number"),
        ("[-1e400]", "-inf at output[0] is not a JSON number"),
        ("NaN", "NaN at output is not a JSON number"),
        ("[0,Infinity]", "Infinity at output[1] is not a JSON number"),
    ],
)
def test_a_number_json_cannot_hold_is_refused_on_receipt(output: str, message: str) -> None:
    text = '{"type":"yield","id":"1","output":' + output + "}"
    for given in (text, text.encode()):
        with pytest.raises(astral.ProtocolError) as info:
            astral.decode(given)
        assert str(info.value) == message
