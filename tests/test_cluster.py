"""The cross-process message codec (astral._cluster), without Redis or an event loop."""

from __future__ import annotations

import pytest

import astral
from astral._cluster import batch, describe, dump, failure, parse

from .helpers import plain_id


def test_a_batch_round_trips_in_order() -> None:
    parts = [dump(["item", 1, {"x": [1, "é"]}]), dump(["end", 1]), dump(["credit", 2, 5])]
    sender, messages, dropped = parse(batch("node-a", parts))
    assert sender == "node-a"
    assert messages == [["item", 1, {"x": [1, "é"]}], ["end", 1], ["credit", 2, 5]]
    assert dropped == 0


def test_wide_integers_travel_as_they_are() -> None:
    # orjson stops at 64 bits; the worker's own codec decides what it accepts.
    _, messages, _ = parse(batch("n", [dump(["done", 1, 2**70])]))
    assert messages == [["done", 1, 2**70]]


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", b'{"f": 1, "m": []}', b'{"f": "n"}', b"\xff", b'{"f": "n", "m": 3}'],
    ids=plain_id,
)
def test_what_is_not_a_batch_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse(data)


def test_malformed_messages_are_left_out_and_counted() -> None:
    good = ["call", 7, "w1", "echo", None, 16]
    payload = batch(
        "n",
        [
            dump(good),
            dump(["call", 7, "w1", "echo", None, 0]),  # no window
            dump(["item"]),
            dump(["credit", 1, -1]),
            dump(["fail", 1, "nonsense", "m", None]),
            dump(["done", "1", 2]),  # id is not an int
            dump(7),
            dump(["cancel", 3]),
        ],
    )
    _, messages, dropped = parse(payload)
    assert messages == [good, ["cancel", 3]]
    assert dropped == 6


@pytest.mark.parametrize(
    "error",
    [
        astral.RemoteError("unknown capability"),
        astral.CallTimeout("call x timed out"),
        astral.StreamOverrun("fell behind"),
        astral.ProtocolError("not JSON"),
        astral.ConnectionClosed("worker left", code=1001),
        astral.ClusterError("cannot reach Redis at redis://h:1"),
    ],
)
def test_each_exception_crosses_the_hop_as_itself(error: astral.AstralError) -> None:
    again = failure(*describe(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    if isinstance(error, astral.ConnectionClosed):
        assert isinstance(again, astral.ConnectionClosed)
        assert again.code == error.code


def test_a_remote_errors_code_and_data_cross_too() -> None:
    error = astral.RemoteError("no such user")
    error.code = "not_found"  # type: ignore[attr-defined]  # set by peers that send codes
    error.data = {"id": 7}  # type: ignore[attr-defined]
    kind, message, code, extra = describe(error)
    _, messages, dropped = parse(batch("n", [dump(["fail", 1, kind, message, code, extra])]))
    assert dropped == 0
    again = failure(*messages[0][2:])
    assert isinstance(again, astral.RemoteError)
    assert again.message == "no such user"
    assert again.code == "not_found"  # type: ignore[attr-defined]
    assert again.data == {"id": 7}  # type: ignore[attr-defined]
    assert describe(astral.RemoteError("plain"))[3] is None


def test_an_unexpected_error_crosses_as_internal_error() -> None:
    assert describe(KeyError("secret path")) == ("remote", "internal error", None, None)


def test_unencodable_input_is_a_protocol_error() -> None:
    with pytest.raises(astral.ProtocolError):
        dump({"x": {1, 2}})
