"""Errors with a code and data, and failures logged on the side where they ran."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import anyio
import pytest

import astral
from astral import Failure, Peer, RemoteError, Result, decode, encode
from astral._logs import ClosingLog
from astral._principal import _host
from astral.testing import memory_transport_pair

SECRET_INPUT = "s3cr3t-input-value"


async def not_found(user_id: Any) -> NoReturn:
    raise Failure("no such user", code="not_found", data={"id": user_id, "tries": [1, 2]})


async def divide(_: Any) -> float:
    return 1 / 0


async def lookup(key: Any) -> NoReturn:
    raise KeyError("missing")


async def stream_then_fail(_: Any) -> AsyncIterator[int]:
    yield 1
    yield 2
    raise Failure("quota", code="quota_exceeded", data=2)


async def plain_failure(_: Any) -> NoReturn:
    raise Failure("just a message")


CAPS = {
    "not_found": not_found,
    "divide": divide,
    "lookup": lookup,
    "stream_then_fail": stream_then_fail,
    "plain_failure": plain_failure,
}


@asynccontextmanager
async def pair(**serving: Any) -> AsyncIterator[tuple[Peer, Peer]]:
    """``server`` serves CAPS for ``client``, whose token subject is ``worker-9``."""
    a, b = memory_transport_pair()
    async with (
        a,
        b,
        Peer(a, capabilities=CAPS, claims={"sub": "worker-9"}, **serving) as server,
        Peer(b) as client,
    ):
        yield server, client


@asynccontextmanager
async def raw(**serving: Any) -> AsyncIterator[Any]:
    """A peer serving CAPS, and the raw other end of its transport."""
    ours, theirs = memory_transport_pair()
    async with theirs, Peer(ours, capabilities=CAPS, claims={"sub": "worker-9"}, **serving):
        yield theirs


# -- codes and data round trip -----------------------------------------------------


async def test_a_failure_reaches_the_caller_with_its_code_and_data() -> None:
    async with pair() as (_, client):
        with pytest.raises(RemoteError) as caught:
            await client.call("not_found", 7)
    assert caught.value.message == str(caught.value) == "no such user"
    assert caught.value.code == "not_found"
    assert caught.value.data == {"id": 7, "tries": [1, 2]}


async def test_an_unexpected_exception_sends_its_message_and_code_internal() -> None:
    async with pair() as (_, client):
        with pytest.raises(RemoteError) as caught:
            await client.call("divide")
        assert (str(caught.value), caught.value.code, caught.value.data) == (
            "division by zero",
            "internal",
            None,
        )
        with pytest.raises(RemoteError) as caught:
            await client.call("lookup")
        assert (str(caught.value), caught.value.code) == ("'missing'", "internal")


async def test_a_failure_without_code_sends_none() -> None:
    async with pair() as (_, client):
        with pytest.raises(RemoteError) as caught:
            await client.call("plain_failure")
    assert (caught.value.message, caught.value.code, caught.value.data) == (
        "just a message",
        None,
        None,
    )


async def test_a_stream_failing_part_way_ends_with_its_code_and_data() -> None:
    got: list[int] = []
    async with pair() as (_, client):
        with pytest.raises(RemoteError) as caught:
            async with client.stream("stream_then_fail") as items:
                async for item in items:
                    got.append(item)  # noqa: PERF401 - kept as they come, before the error
    assert got == [1, 2]
    assert (caught.value.code, caught.value.data) == ("quota_exceeded", 2)


async def test_the_original_sees_the_same_error_string_plus_ignorable_fields() -> None:
    async with raw() as theirs:
        await theirs.send('{"type":"call","id":"u-1","capability":"not_found","input":7}')
        text = await theirs.receive()
        assert text == (
            '{"type":"result","id":"u-1","error":"no such user","code":"not_found",'
            '"data":{"id":7,"tries":[1,2]}}'
        )
        # What the original reads from it: the error string, as before.
        assert decode(text).error == "no such user"
        await theirs.send('{"type":"call","id":"u-2","capability":"divide"}')
        assert await theirs.receive() == (
            '{"type":"result","id":"u-2","error":"division by zero","code":"internal"}'
        )


async def test_hide_internal_errors_sends_a_generic_message_but_keeps_failures() -> None:
    async with pair(hide_internal_errors=True) as (_, client):
        with pytest.raises(RemoteError) as caught:
            await client.call("divide")
        assert (str(caught.value), caught.value.code) == ("internal error", "internal")
        with pytest.raises(RemoteError) as caught:
            await client.call("not_found", 1)
        assert (str(caught.value), caught.value.code) == ("no such user", "not_found")


async def test_unencodable_failure_data_still_fails_the_call_with_an_error() -> None:
    async def bad_data(_: Any) -> NoReturn:
        raise Failure("bad", code="c", data={1, 2})

    a, b = memory_transport_pair()
    async with a, b, Peer(a, capabilities={"bad_data": bad_data}) as _, Peer(b) as client:
        with pytest.raises(RemoteError) as caught:
            await client.call("bad_data")
    assert caught.value.code == "internal"
    assert "cannot send set at data" in str(caught.value)


def test_failure_checks_its_arguments() -> None:
    with pytest.raises(TypeError):
        Failure("m", code=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 to 128"):
        Failure("m", code="")
    with pytest.raises(ValueError, match="1 to 128"):
        Failure("m", code="x" * 129)
    with pytest.raises(TypeError):
        Failure(b"m")  # type: ignore[arg-type]
    assert isinstance(Failure("m"), astral.AstralError)


# -- malformed code and data from a remote ------------------------------------------


@pytest.mark.parametrize(
    ("extra", "code", "data"),
    [
        ('"code":5,"data":{"a":1}', None, {"a": 1}),
        ('"code":"","data":[1]', None, [1]),
        ('"code":"' + "x" * 129 + '"', None, None),
        ('"code":{"a":1}', None, None),
        # data with an integer astral refuses on receipt: dropped, code kept
        ('"code":"big","data":{"n":18446744073709551617}', "big", None),
        ('"code":"nan","data":[NaN]', "nan", None),
        ('"code":"deep","data":' + "[" * 70 + "]" * 70, "deep", None),
    ],
)
async def test_malformed_code_or_data_is_dropped_field_by_field(
    extra: str, code: str | None, data: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ours, theirs = memory_transport_pair()
    caplog.set_level(logging.WARNING, logger="astral.protocol")
    async with theirs, Peer(ours) as peer, anyio.create_task_group() as tg:
        outcome: list[BaseException] = []

        async def call() -> None:
            try:
                await peer.call("x")
            except RemoteError as exc:
                outcome.append(exc)

        tg.start_soon(call)
        call_id = decode(await theirs.receive()).id
        await theirs.send('{"type":"result","id":"' + call_id + '","error":"boom",' + extra + "}")
    [error] = outcome
    assert isinstance(error, RemoteError)
    assert (error.message, error.code, error.data) == ("boom", code, data)
    warnings = [r for r in caplog.records if r.name == "astral.protocol"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


def test_decode_keeps_valid_extension_fields_and_encode_sends_them_only_with_an_error() -> None:
    frame = decode('{"type":"result","id":"1","error":"e","code":"c","data":null}')
    assert frame == Result("1", error="e", code="c")
    assert (
        encode(Result("1", output=2, code="c", data=3)) == '{"type":"result","id":"1","output":2}'
    )
    # Without an error, code and data mean nothing and are not read.
    assert decode('{"type":"result","id":"1","output":1,"code":5}') == Result("1", 1)


# -- logs on the side where it ran ----------------------------------------------------


async def test_an_unexpected_exception_is_logged_with_traceback_name_id_and_subject(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="astral")
    async with pair() as (_, client):
        with pytest.raises(RemoteError):
            await client.call("divide", SECRET_INPUT)
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.name == "astral.capability"
    message = record.getMessage()
    assert "'divide'" in message
    assert "worker-9" in message
    assert record.astral_call_id in message  # type: ignore[attr-defined]
    assert record.astral_capability == "divide"  # type: ignore[attr-defined]
    assert record.exc_info is not None
    assert record.exc_info[0] is ZeroDivisionError
    # Never the input or output values.
    assert SECRET_INPUT not in caplog.text


async def test_a_stream_failing_with_an_unexpected_exception_is_logged() -> None:
    async def broken(_: Any) -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("disk on fire")

    a, b = memory_transport_pair()
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    logging.getLogger("astral.capability").addHandler(handler)
    try:
        async with a, b, Peer(a, capabilities={"broken": broken}) as _, Peer(b) as client:
            with pytest.raises(RemoteError):
                async with client.stream("broken") as items:
                    async for _item in items:
                        pass
    finally:
        logging.getLogger("astral.capability").removeHandler(handler)
    [record] = records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
    assert "'broken'" in record.getMessage()
    assert "the remote peer" in record.getMessage()  # no claims, no subject


async def test_a_failure_is_not_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="astral")
    async with pair() as (_, client):
        with pytest.raises(RemoteError):
            await client.call("not_found", 1)
    records = [r for r in caplog.records if r.name == "astral.capability"]
    assert [r.levelno for r in records] == [logging.DEBUG]
    assert records[0].exc_info is None


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_connection_stops_with_the_server_even_if_closing_it_fails() -> None:
    """The server stops before the connection's peer ran, and the close raises.

    The connection's own task runs shielded (it drains on shutdown); whatever
    the close does, the shield is lifted and the connection ends with the
    server instead of keeping it waiting.
    """

    async def close(code: int, reason: str) -> None:
        raise OSError("the socket was already gone")

    raised: list[BaseException] = []
    ours, theirs = memory_transport_pair()
    async with theirs:
        with anyio.fail_after(5):
            try:
                with anyio.CancelScope() as scope:
                    scope.cancel()  # the server is already stopping
                    await _host(
                        ours,
                        close,
                        {},
                        ClosingLog("test", "worker"),
                        capabilities=None,
                        registry=None,
                        subject=None,
                        on_connect=None,
                        where="test",
                        grace=0,
                        expires_in=None,
                        hosted=None,
                        peer_options={},
                    )
            except* OSError as group:
                raised.extend(group.exceptions)
    assert [str(exc) for exc in raised] == ["the socket was already gone"]
