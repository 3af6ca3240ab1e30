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


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"leeway": -1}, ValueError, "leeway must be a finite number of seconds >= 0"),
        ({"leeway": math.inf}, ValueError, "leeway must be a finite number of seconds >= 0"),
        ({"max_lifetime": 0}, ValueError, "max_lifetime must be a finite number of seconds > 0"),
        ({"algorithms": "HS256"}, TypeError, "algorithms must be a sequence of names, not a str"),
        ({"algorithms": ["none"]}, ValueError, "algorithm 'none' can never be allowed"),
        ({"algorithms": ["NONE"]}, ValueError, "algorithm 'none' can never be allowed"),
        ({"algorithms": ["HS256", "none"]}, ValueError, "algorithm 'none' can never be allowed"),
        ({"algorithms": ["XS999"]}, ValueError, "unsupported algorithm 'XS999'"),
        ({"algorithms": []}, ValueError, "algorithms must name at least one algorithm"),
        ({"max_token_size": 0}, ValueError, "max_token_size must be > 0"),
        ({"required_claims": "exp"}, TypeError, "required_claims must be a sequence of names"),
        ({"issuer": ""}, ValueError, "issuer must not be empty"),
        ({"audience": ""}, ValueError, "audience must be a non-empty string or strings"),
        ({"audience": []}, ValueError, "audience must be a non-empty string or strings"),
        ({"algorithms": ["RS256"]}, ValueError, "the key fits none of the allowed algorithms"),
    ],
)
def test_verifier_arguments_are_refused_with_their_reason(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    options.setdefault("algorithms", ["HS256"])
    with pytest.raises(error, match=re.escape(message)):
        astral.JWTVerifier(SECRET, **options)


def test_a_max_lifetime_under_a_second_is_allowed_and_enforced() -> None:
    now = 1_700_000_000.0
    verifier = astral.JWTVerifier(SECRET, algorithms=["HS256"], max_lifetime=0.5, clock=lambda: now)
    one_second = astral.mint_token(SECRET, subject="w", now=now, expires_in=1)
    with pytest.raises(astral.AuthenticationError, match="token lifetime too long"):
        verifier.verify(one_second)


def test_current_peer_outside_a_capability_says_so() -> None:
    with pytest.raises(
        RuntimeError, match=re.escape("current_peer() called outside a capability run by a peer")
    ):
        astral.current_peer()


def test_the_smallest_token_size_limit_is_one_byte() -> None:
    verifier = astral.JWTVerifier(SECRET, algorithms=["HS256"], max_token_size=1)
    with pytest.raises(astral.AuthenticationError):
        verifier.verify(astral.mint_token(SECRET, subject="w"))
