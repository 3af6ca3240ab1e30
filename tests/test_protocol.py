"""The sans-IO PeerState, driven frame by frame: no event loop, plain objects as handles."""

from __future__ import annotations

import ast
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest

import astral._logs
from astral import Call, Cancel, ProtocolError, Result, Yield, decode, encode
from astral._protocol import (
    CancelInbound,
    CreditInbound,
    Deliver,
    Fail,
    PeerState,
    Reply,
    StartInbound,
)

from .helpers import plain_id

MAX_INBOUND = 3


class Handle:
    """A stand-in for whatever the driver uses (a channel, a cancel scope)."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Handle({self.name!r})"


async def echo(input: Any) -> Any:  # pragma: no cover - never run here
    return input


async def other(input: Any) -> Any:  # pragma: no cover - never run here
    return input


def make_state(max_inbound_calls: int = MAX_INBOUND) -> PeerState[Handle, Handle]:
    made = iter(range(1_000_000))
    return PeerState(
        {"echo": echo, "other": other},
        lambda: Handle(f"in{next(made)}"),
        max_inbound_calls=max_inbound_calls,
    )


def call_text(call_id: str, capability: str = "echo", input: Any = None) -> str:
    return encode(Call(call_id, capability, input))


def reply_frame(event: object) -> Result:
    assert isinstance(event, Reply)
    frame = decode(event.text)
    assert isinstance(frame, Result)
    return frame


# -- calls we make --------------------------------------------------------------


def test_start_call_registers_the_call_and_returns_its_frame() -> None:
    state = make_state()
    handle = Handle("out")
    call_id, text = state.start_call("remote_cap", {"x": [1, 2]}, handle)
    assert decode(text) == Call(call_id, "remote_cap", {"x": [1, 2]})
    assert state.outbound == {call_id: handle}


def test_outbound_ids_are_unique() -> None:
    state = make_state()
    ids = [state.start_call("f", i, Handle())[0] for i in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, str) and i for i in ids)
    # Still unique after calls have ended.
    for call_id in ids:
        state.receive(encode(Result(call_id)))
    more = [state.start_call("f", None, Handle())[0] for _ in range(100)]
    assert not set(more) & set(ids)


def test_start_call_with_unencodable_input_registers_nothing() -> None:
    state = make_state()
    with pytest.raises(ProtocolError):
        state.start_call("f", object(), Handle())
    with pytest.raises(ProtocolError):
        state.start_call("f", 2**60, Handle())
    assert state.outbound == {}


def test_a_yield_is_delivered_and_keeps_the_call() -> None:
    state = make_state()
    handle = Handle()
    call_id, _ = state.start_call("f", None, handle)
    for item in range(3):
        event = state.receive(encode(Yield(call_id, item)))
        assert event == Deliver(handle, Yield(call_id, item))
    assert state.outbound == {call_id: handle}


def test_a_result_is_delivered_and_ends_the_call() -> None:
    state = make_state()
    handle = Handle()
    call_id, _ = state.start_call("f", None, handle)
    event = state.receive(encode(Result(call_id, {"ok": True})))
    assert isinstance(event, Deliver)
    assert event.handle is handle
    assert event.frame == Result(call_id, {"ok": True})
    assert state.outbound == {}


def test_an_error_result_is_delivered() -> None:
    state = make_state()
    handle = Handle()
    call_id, _ = state.start_call("f", None, handle)
    assert state.receive(encode(Result(call_id, error="boom"))) == Deliver(
        handle, Result(call_id, error="boom")
    )
    assert state.outbound == {}


def test_results_are_routed_to_their_own_call_in_any_order() -> None:
    state = make_state()
    handles = [Handle(str(i)) for i in range(5)]
    ids = [state.start_call("f", i, h)[0] for i, h in enumerate(handles)]
    for index in (3, 0, 4, 1, 2):
        event = state.receive(encode(Result(ids[index], index)))
        assert event == Deliver(handles[index], Result(ids[index], index))
    assert state.outbound == {}


def test_a_second_result_is_ignored() -> None:
    state = make_state()
    call_id, _ = state.start_call("f", None, Handle())
    assert isinstance(state.receive(encode(Result(call_id, 1))), Deliver)
    assert state.receive(encode(Result(call_id, 2))) is None
    assert state.receive(encode(Result(call_id, error="late"))) is None
    assert state.outbound == {}


def test_a_yield_after_the_result_is_ignored() -> None:
    state = make_state()
    call_id, _ = state.start_call("f", None, Handle())
    assert isinstance(state.receive(encode(Result(call_id))), Deliver)
    assert state.receive(encode(Yield(call_id, 1))) is None
    assert state.outbound == {}


def test_frames_for_unknown_ids_are_ignored() -> None:
    state = make_state()
    handle = Handle()
    call_id, _ = state.start_call("f", None, handle)
    for frame in (Result("nope", 1), Yield("nope", 1), Result("", error="x"), Yield(call_id + "0")):
        assert state.receive(encode(frame)) is None
    assert state.outbound == {call_id: handle}


def test_a_malformed_result_for_a_pending_call_fails_it() -> None:
    state = make_state()
    handle, bystander = Handle("victim"), Handle("bystander")
    call_id, _ = state.start_call("f", None, handle)
    other_id, _ = state.start_call("f", None, bystander)
    event = state.receive('{"type":"result","id":"' + call_id + '","error":42}')
    assert isinstance(event, Fail)
    assert event.handle is handle
    assert isinstance(event.error, ProtocolError)
    assert event.error.frame_id == call_id
    assert event.error.frame_type == "result"
    # The call is over; the other one is untouched.
    assert state.outbound == {other_id: bystander}
    assert state.receive(encode(Result(call_id, 1))) is None


@pytest.mark.parametrize(
    "template",
    [
        '{"type":"yield","id":"%s","output":[NaN',
        '{"type":"yield","id":"%s","output":NaN}',
        '{"type":"yield","id":"%s","output":[-Infinity]}',
        '{"type":"yield","id":"%s","output":18446744073709551617}',
        '{"type":"yield","id":"%s","output":' + "[" * 70 + "]" * 70 + "}",
        '{"type":"result","id":"%s","output":-18446744073709551617}',
        '{"type":"result","id":"%s","output":"\\ud800","error":["x"]}',
    ],
    ids=plain_id,
)
def test_a_malformed_yield_or_result_with_a_known_id_fails_that_call(template: str) -> None:
    state = make_state()
    handle = Handle()
    call_id, _ = state.start_call("f", None, handle)
    event = state.receive(template % call_id)
    if template.endswith("[NaN"):
        # Not even JSON: the id cannot be read, so nothing can be failed.
        assert event is None
        assert state.outbound == {call_id: handle}
    else:
        assert isinstance(event, Fail)
        assert event.handle is handle
        assert state.outbound == {}


def test_a_malformed_yield_or_result_with_an_unknown_id_is_ignored() -> None:
    state = make_state()
    handle = Handle()
    call_id, _ = state.start_call("f", None, handle)
    assert state.receive('{"type":"result","id":"zzz","error":1}') is None
    assert state.receive('{"type":"yield","id":"zzz","output":9007199254740993}') is None
    assert state.outbound == {call_id: handle}


def test_abandon_returns_a_cancel_frame_once() -> None:
    state = make_state()
    call_id, _ = state.start_call("f", None, Handle())
    text = state.abandon(call_id)
    assert text == encode(Cancel(call_id))
    assert text == '{"type":"cancel","id":"' + call_id + '"}'
    assert state.outbound == {}
    assert state.abandon(call_id) is None
    assert state.abandon("never-existed") is None
    # Whatever still arrives for it is an unknown id.
    assert state.receive(encode(Yield(call_id, 1))) is None
    assert state.receive(encode(Result(call_id, error="cancelled"))) is None


def test_abandon_after_the_result_sends_nothing() -> None:
    state = make_state()
    call_id, _ = state.start_call("f", None, Handle())
    state.receive(encode(Result(call_id)))
    assert state.abandon(call_id) is None


# -- calls the remote makes -----------------------------------------------------


def test_a_call_starts_an_inbound_call() -> None:
    state = make_state()
    event = state.receive(call_text("r1", "echo", {"a": 1}))
    assert isinstance(event, StartInbound)
    assert event.call == Call("r1", "echo", {"a": 1})
    assert event.invoke is echo
    assert state.inbound == {"r1": event.handle}


def test_ids_are_scoped_per_direction() -> None:
    state = make_state()
    out = Handle("out")
    call_id, _ = state.start_call("f", None, out)
    inbound = state.receive(call_text(call_id))
    assert isinstance(inbound, StartInbound)
    assert state.receive(encode(Result(call_id, "ours"))) == Deliver(out, Result(call_id, "ours"))
    assert state.inbound == {call_id: inbound.handle}


@pytest.mark.parametrize(
    "name",
    ["nope", "__proto__", "constructor", "toString", "__class__", "__init__", "call", "", "get"],
)
def test_a_call_to_an_unknown_capability_is_answered(name: str) -> None:
    state = make_state()
    assert reply_frame(state.receive(call_text("r1", name))) == Result(
        "r1", error="unknown capability"
    )
    assert state.inbound == {}


def test_a_malformed_call_with_an_id_is_answered() -> None:
    state = make_state()
    for text in (
        '{"type":"call","id":"m1"}',
        '{"type":"call","id":"m1","capability":5}',
        '{"type":"call","id":"m1","capability":"echo","input":18446744073709551617}',
        '{"type":"call","id":"m1","capability":"echo","input":{"a":NaN}}',
        '{"type":"call","id":"m1","capability":"echo","input":' + "[" * 80 + "]" * 80 + "}",
    ):
        frame = reply_frame(state.receive(text))
        assert frame.id == "m1"
        assert frame.error is not None
        assert frame.error.startswith("malformed call: ")
    assert state.inbound == {}


def test_a_malformed_call_without_a_readable_id_is_ignored() -> None:
    state = make_state()
    assert state.receive('{"type":"call","capability":"echo"}') is None
    assert state.receive('{"type":"call","id":7,"capability":"echo"}') is None
    assert state.receive('{"type":"call","id":"' + "x" * 300 + '","capability":"echo"}') is None
    assert state.inbound == {}


def test_a_call_reusing_a_running_id_is_refused() -> None:
    state = make_state()
    first = state.receive(call_text("dup"))
    assert isinstance(first, StartInbound)
    assert reply_frame(state.receive(call_text("dup", "other"))) == Result(
        "dup", error="duplicate call id"
    )
    assert state.inbound == {"dup": first.handle}
    # Once it has finished, the id may be used again.
    state.finished("dup", first.handle)
    assert state.inbound == {}
    again = state.receive(call_text("dup"))
    assert isinstance(again, StartInbound)
    assert again.handle is not first.handle


def test_finished_with_a_stale_handle_forgets_nothing() -> None:
    state = make_state()
    first = state.receive(call_text("a"))
    assert isinstance(first, StartInbound)
    state.finished("a", first.handle)
    second = state.receive(call_text("a"))
    assert isinstance(second, StartInbound)
    state.finished("a", first.handle)  # the first run reporting late
    assert state.inbound == {"a": second.handle}
    state.finished("never", Handle())
    assert state.inbound == {"a": second.handle}


def test_too_many_concurrent_calls_are_refused() -> None:
    state = make_state(max_inbound_calls=MAX_INBOUND)
    started = [state.receive(call_text(f"c{i}")) for i in range(MAX_INBOUND)]
    assert all(isinstance(event, StartInbound) for event in started)
    assert reply_frame(state.receive(call_text("over"))) == Result(
        "over", error="too many concurrent calls"
    )
    assert set(state.inbound) == {f"c{i}" for i in range(MAX_INBOUND)}
    # One finishing makes room for one more.
    first = started[0]
    assert isinstance(first, StartInbound)
    state.finished("c0", first.handle)
    assert isinstance(state.receive(call_text("next")), StartInbound)
    assert isinstance(state.receive(call_text("over2")), Reply)


def test_the_limit_does_not_count_unknown_or_refused_calls() -> None:
    state = make_state(max_inbound_calls=1)
    assert isinstance(state.receive(call_text("a", "nope")), Reply)
    assert isinstance(state.receive(call_text("b", "echo")), StartInbound)


def test_a_cancel_for_a_running_call_cancels_it() -> None:
    state = make_state()
    started = state.receive(call_text("r"))
    assert isinstance(started, StartInbound)
    event = state.receive(encode(Cancel("r")))
    assert event == CancelInbound(started.handle)
    assert isinstance(event, CancelInbound)
    assert event.handle is started.handle
    # The driver reports the end; until then the call is still running.
    assert state.inbound == {"r": started.handle}
    state.finished("r", started.handle)
    assert state.receive(encode(Cancel("r"))) is None


def test_a_cancel_for_an_unknown_call_is_ignored() -> None:
    state = make_state()
    out = Handle()
    call_id, _ = state.start_call("f", None, out)
    # A cancel names the remote's calls, never ours.
    assert state.receive(encode(Cancel(call_id))) is None
    assert state.receive(encode(Cancel("nothing"))) is None
    assert state.outbound == {call_id: out}


# -- answering inbound calls ---------------------------------------------------


def test_reply_encodes_yields_and_results() -> None:
    state = make_state()
    assert state.reply(Yield("r", 1)) == ('{"type":"yield","id":"r","output":1}', False)
    assert state.reply(Result("r", 2)) == ('{"type":"result","id":"r","output":2}', True)
    assert state.reply(Result("r", error="x")) == ('{"type":"result","id":"r","error":"x"}', True)


@pytest.mark.parametrize(
    "value", [object(), 2**53 + 1, {1: 2}, (1, 2)], ids=["object", "2**53+1", "int-key", "tuple"]
)
@pytest.mark.parametrize("kind", [Yield, Result])
def test_reply_turns_an_unencodable_output_into_an_error_result(value: Any, kind: type) -> None:
    state = make_state()
    text, ended = state.reply(kind("r", value))
    assert ended is True
    frame = decode(text)
    assert isinstance(frame, Result)
    assert frame.id == "r"
    assert frame.output is None
    assert frame.error is not None


def test_reply_of_an_error_message_with_a_lone_surrogate_is_sent_escaped() -> None:
    state = make_state()
    text, ended = state.reply(Result("r", error="bad \udc80 message"))
    assert ended is True
    assert text == '{"type":"result","id":"r","error":"bad \\udc80 message"}'
    assert decode(text) == Result("r", error="bad \udc80 message")


# -- closing --------------------------------------------------------------------


def test_close_returns_everything_and_empties_both_tables() -> None:
    state = make_state()
    outs = [Handle(f"out{i}") for i in range(3)]
    for handle in outs:
        state.start_call("f", None, handle)
    ins = []
    for i in range(2):
        event = state.receive(call_text(f"r{i}"))
        assert isinstance(event, StartInbound)
        ins.append(event.handle)
    outbound, inbound = state.close()
    assert outbound == outs
    assert inbound == ins
    assert state.outbound == {}
    assert state.inbound == {}
    assert state.close() == ([], [])


# -- robustness -----------------------------------------------------------------

BAD_INPUT = [
    "",
    "not json",
    "[1,2]",
    '"a string"',
    "42",
    "null",
    "{}",
    '{"type":"ping","id":"1"}',
    '{"type":"yield"}',
    '{"type":"result","id":3}',
    '{"type":"cancel"}',
    '{"type":"result","id":"unknown","output":NaN}',
    '{"type":"yield","id":"1","output":"\\ud8"}',
    '{"type":"yield","id":"1","output":[NaN',
    "\ud800",
    '{"type":"call","id":"1","capability":"echo"}' * 2,
]


def test_receive_never_raises_on_bad_input() -> None:
    state = make_state()
    pending = Handle("pending")
    call_id, _ = state.start_call("f", None, pending)
    for text in BAD_INPUT:
        assert state.receive(text) is None, text
    rng = random.Random(7)
    seeds = [call_text("1"), encode(Result(call_id, [1])), encode(Yield(call_id, "x"))]
    for _ in range(2000):
        text = rng.choice(seeds)
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice('{}[]":,\\x0123456789eE-') + text[i + 1 :]
        event = state.receive(text)
        assert event is None or isinstance(event, Deliver | Fail | StartInbound | Reply)
        if isinstance(event, StartInbound):
            state.finished(event.call.id, event.handle)
        if not state.outbound:
            call_id, _ = state.start_call("f", None, pending)


# -- logging: each ignored frame once, at DEBUG ------------------------------------


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name in ("astral.peer", "astral.protocol")]


# Broke the protocol: a WARNING on astral.protocol (rate-limited).
MALFORMED = [*BAD_INPUT, '{"type":"result","id":"unknown","error":1}']
# Normal races (a late frame for a call that ended): DEBUG on astral.peer.
LATE = [encode(Result("unknown", 1)), encode(Yield("unknown", 1)), encode(Cancel("unknown"))]


@pytest.mark.parametrize("text", MALFORMED, ids=plain_id)
def test_each_malformed_frame_is_one_warning(text: str, caplog: pytest.LogCaptureFixture) -> None:
    state = make_state()
    caplog.set_level(logging.DEBUG)
    assert state.receive(text) is None
    records = _records(caplog)
    assert len(records) == 1, records
    assert (records[0].name, records[0].levelno) == ("astral.protocol", logging.WARNING)


@pytest.mark.parametrize("text", LATE, ids=plain_id)
def test_each_late_frame_is_logged_once_at_debug(
    text: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = make_state()
    caplog.set_level(logging.DEBUG)
    assert state.receive(text) is None
    records = _records(caplog)
    assert len(records) == 1, records
    assert (records[0].name, records[0].levelno) == ("astral.peer", logging.DEBUG)


def test_second_result_and_late_yield_are_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = make_state()
    call_id, _ = state.start_call("f", None, Handle())
    abandoned, _ = state.start_call("f", None, Handle())
    state.abandon(abandoned)
    caplog.set_level(logging.DEBUG, logger="astral.peer")
    assert isinstance(state.receive(encode(Result(call_id))), Deliver)
    assert _records(caplog) == []
    for text in (
        encode(Result(call_id)),
        encode(Yield(call_id, 1)),
        encode(Result(abandoned, error="cancelled")),
    ):
        caplog.clear()
        assert state.receive(text) is None
        records = _records(caplog)
        assert len(records) == 1
        assert records[0].levelno == logging.DEBUG


def test_refusals_and_failures_are_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = make_state(max_inbound_calls=1)
    call_id, _ = state.start_call("f", None, Handle())
    caplog.set_level(logging.DEBUG)
    assert isinstance(state.receive(call_text("r")), StartInbound)
    assert _records(caplog) == []
    for text, kind, level in (
        (call_text("r"), Reply, logging.WARNING),  # a duplicate id breaks the protocol
        (call_text("s"), Reply, logging.DEBUG),  # too many calls: a limit, not a violation
        (call_text("t", "nope"), Reply, logging.DEBUG),
        ('{"type":"call","id":"u"}', Reply, logging.WARNING),
        ('{"type":"result","id":"' + call_id + '","error":1}', Fail, logging.WARNING),
    ):
        caplog.clear()
        assert isinstance(state.receive(text), kind)
        records = _records(caplog)
        assert len(records) == 1
        assert records[0].levelno == level


def test_warnings_name_the_remote(caplog: pytest.LogCaptureFixture) -> None:
    state = make_state()
    state.remote = "'worker-7' at 10.0.0.1:5000"
    caplog.set_level(logging.WARNING, logger="astral.protocol")
    state.receive("not json")
    assert "'worker-7' at 10.0.0.1:5000" in caplog.records[0].getMessage()


def test_a_flood_of_malformed_frames_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    state = make_state()
    caplog.set_level(logging.WARNING, logger="astral.protocol")
    for _ in range(1000):
        assert state.receive("not json") is None
    records = _records(caplog)
    assert 1 <= len(records) <= astral._logs.BURST + 1


def test_nothing_is_logged_above_debug_for_late_frames(caplog: pytest.LogCaptureFixture) -> None:
    state = make_state()
    caplog.set_level(logging.INFO)
    for text in LATE:
        state.receive(text)
    assert _records(caplog) == []


# -- the sans-IO core knows no event loop ---------------------------------------------


@pytest.mark.parametrize("module", ["_frames.py", "_dispatch.py", "_protocol.py"])
def test_the_core_imports_no_io_library(module: str) -> None:
    source = (Path(__file__).parent.parent / "astral" / module).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert imported
    forbidden = {"anyio", "trio", "asyncio", "wsproto", "joserfc", "socket", "ssl"}
    assert not imported & forbidden


def test_credit_for_a_running_call_is_handed_to_the_driver() -> None:
    state = make_state()
    started = state.receive(encode(Call("9", "echo", 1, window=4)))
    assert isinstance(started, StartInbound)
    assert started.call.window == 4
    event = state.receive('{"type":"credit","id":"9","n":2}')
    assert isinstance(event, CreditInbound)
    assert event.handle is started.handle
    assert event.n == 2
    # For a call not running here, credit is ignored.
    assert state.receive('{"type":"credit","id":"nope","n":2}') is None


def test_credit_is_only_sent_for_a_pending_call() -> None:
    state = make_state()
    call_id, text = state.start_call("gen", None, Handle("out"), 8)
    assert json.loads(text)["window"] == 8
    assert state.credit(call_id, 4) == '{"type":"credit","id":"' + call_id + '","n":4}'
    state.abandon(call_id)
    assert state.credit(call_id, 4) is None
