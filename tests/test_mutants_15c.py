"""Behaviour that surviving mutants of ``_ws_connection`` and ``asgi`` showed no test pinned.

Each test here pins one behaviour a plausible bug would break: the keepalive
deadline a pong moves on (in the reader, and in the task used over TLS), and a
close handshake the keepalive leaves alone; pings that come while a write is
stuck (one late pong, a count that starts again from the last completed
write, the 1008 cut-off exactly past the limit) and a close answered after
the queued messages; a refused call answered once; and how the ASGI
application reads a request (the root path, the optional ``query_string``, a
blank ``token`` parameter) and hands its options to each connection; and the
fragment limit applying to every message alike.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
from typing import Any

import anyio
import anyio.abc
import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

import astral
import astral.asgi
from astral._websocket import open_websocket
from astral._ws_connection import (
    FRAGMENT_OVERHEAD,
    MAX_PINGS_UNREAD,
    WRITE_HIGH_WATER,
    WebSocketConnection,
)

from .helpers import SECRET, eventually, make_tls, running_principal, token
from .test_asgi import VERIFIER as ASGI_VERIFIER
from .test_asgi import FakeServer, bearer
from .test_asgi import token as asgi_token
from .test_hardening import Client, frame, open_raw
from .test_websocket import echo, raw_client, server
from .test_ws_read_pause import Feed, open_over

# --- keepalive: a pong moves the next ping a whole interval on ---------------------------


@pytest.mark.time_limit(15)
async def test_answered_pings_keep_a_connection_open_when_the_interval_exceeds_the_timeout() -> (
    None
):
    # ping_interval > ping_timeout: after each pong the reader's deadline must
    # move to the next ping, ping_interval away. A reader that kept the pong's
    # deadline (ping_timeout after the ping) would wake before the next ping
    # is due and drop a healthy connection.
    async with (
        # Generous for a loaded machine: a pong has a whole second to come.
        server(echo, ping_interval=1.2, ping_timeout=1.0) as port,
        raw_client(port) as peer,
    ):
        for _ in range(2):  # the second ping comes after the first ping's timeout
            event = await peer.next_event()
            assert isinstance(event, Ping)
            await peer.stream.send(peer.ws.send(event.response()))
        await peer.send_frame(1, b"still here")
        while not isinstance(event := await peer.next_event(), TextMessage):
            assert isinstance(event, Ping), event  # open, and still pinging
            await peer.stream.send(peer.ws.send(event.response()))
        assert event.data == "still here"


@pytest.mark.time_limit(15)
async def test_keepalive_over_tls_keeps_pinging_when_the_interval_exceeds_the_timeout() -> None:
    # Over TLS the keepalive is a task that sleeps until the ping's timeout;
    # a pong meanwhile moves the next ping further on (ping_interval >
    # ping_timeout): the task must sleep on to it and ping again, not stop.
    tls = make_tls()
    async with (
        server(ssl_context=tls.server, ping_interval=None) as port,
        open_websocket(
            f"wss://127.0.0.1:{port}/",
            ssl_context=tls.client,
            ping_interval=1.2,  # a pong has a whole second to come
            ping_timeout=1.0,
        ) as ws,
    ):
        assert ws._ping_in_reader is False
        # The second ping comes only if the task slept on past the first one's timeout.
        await eventually(lambda: ws._ping_count >= 2)
        await ws.send("still here")
        assert await ws.receive() == "still here"
        assert ws.close_code is None


# --- the ASGI application's reading of the request ----------------------------------------


VERIFIER = astral.JWTVerifier(SECRET, algorithms=["HS256"])


async def first_answer(app: astral.asgi.App, scope: dict[str, Any]) -> dict[str, Any]:
    """Run ``app`` on ``scope`` in memory; return its first message after websocket.connect."""
    to_app, app_in = anyio.create_memory_object_stream[dict[str, Any]](10)
    app_out, from_app = anyio.create_memory_object_stream[dict[str, Any]](10)
    async with to_app, app_in, app_out, from_app, anyio.create_task_group() as tg:
        await to_app.send({"type": "websocket.connect"})
        tg.start_soon(app, scope, app_in.receive, app_out.send)
        answer = await from_app.receive()
        tg.cancel_scope.cancel()  # an accepted worker would stay connected
    return answer


def websocket_scope(path: str, **extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "websocket",
        "path": path,
        "headers": [],
        "extensions": {"websocket.http.response": {}},
    }
    scope.update(extra)
    return scope


async def test_an_asgi_app_at_the_root_path_serves_the_root_and_only_it() -> None:
    app = astral.asgi.App(verifier=VERIFIER, path="/")
    query = f"token={token()}".encode()
    for path in ("/", "//"):  # a trailing slash aside, the root itself
        answer = await first_answer(app, websocket_scope(path, query_string=query))
        assert answer["type"] == "websocket.accept", path
    answer = await first_answer(app, websocket_scope("/astral", query_string=query))
    assert (answer["type"], answer["status"]) == ("websocket.http.response.start", 404)


async def test_an_asgi_app_compares_its_whole_path_a_trailing_slash_aside() -> None:
    # Only trailing slashes are dropped when paths are compared: a configured
    # path keeps its last character, whatever that character is.
    app = astral.asgi.App(verifier=VERIFIER, path="/rpcX")
    query = f"token={token()}".encode()
    for path in ("/rpcX", "/rpcX/"):
        answer = await first_answer(app, websocket_scope(path, query_string=query))
        assert answer["type"] == "websocket.accept", path
    for path in ("/rpc", "/rpc/", "/rpcXX"):
        answer = await first_answer(app, websocket_scope(path, query_string=query))
        assert (answer["type"], answer["status"]) == ("websocket.http.response.start", 404), path


async def test_an_asgi_scope_without_its_optional_keys_is_served() -> None:
    # The ASGI spec makes a websocket scope's query_string (and client,
    # root_path, scheme...) optional: a bearer header is all it takes.
    app = astral.asgi.App(verifier=VERIFIER)
    scope = websocket_scope("/", headers=[(b"authorization", f"Bearer {token()}".encode())])
    answer = await first_answer(app, scope)
    assert answer["type"] == "websocket.accept"


async def test_the_first_token_parameter_counts_even_when_blank() -> None:
    # As with serve (HandshakeRequest.query_param): the first ``token`` is the
    # token, so a blank one is refused whatever follows it.
    app = astral.asgi.App(verifier=VERIFIER)
    good = token()
    blank_first = websocket_scope("/", query_string=f"token=&token={good}".encode())
    answer = await first_answer(app, blank_first)
    assert (answer["type"], answer["status"]) == ("websocket.http.response.start", 401)
    # The control: the same token first is accepted.
    good_first = websocket_scope("/", query_string=f"token={good}&token=".encode())
    answer = await first_answer(app, good_first)
    assert answer["type"] == "websocket.accept"


# --- pings while a write is stuck: owed, answered once, counted from the last write ------


class StuckFeed(Feed):
    """An in-memory stream whose ``send`` waits while the test holds it shut."""

    def __init__(self) -> None:
        super().__init__()
        self.open = anyio.Event()
        self.sending = False

    def hold(self) -> None:
        self.open = anyio.Event()

    async def send(self, item: bytes) -> None:
        # Like AnyIO's streams: one send at a time (a second one is refused).
        if self.sending:
            raise anyio.BusyResourceError("sending")
        self.sending = True
        try:
            await self.open.wait()
            self.sent += item
        finally:
            self.sending = False


def events_of(data: bytes) -> list[Any]:
    """Parse what the server sent, as its client."""
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    return list(client.events())


async def fill(feed: StuckFeed, conn: WebSocketConnection, big: str) -> None:
    """Leave one message stuck in ``send`` and another queued: ``_out`` at the high-water mark."""
    feed.hold()
    await conn.send(big)
    await anyio.wait_all_tasks_blocked()  # in memory: the writer is stuck in send
    await conn.send(big)
    assert len(conn._out) >= WRITE_HIGH_WATER


async def test_pings_while_a_write_is_stuck_get_one_late_pong_and_a_bounded_count() -> None:
    big = "x" * (WRITE_HIGH_WATER + 100)
    pinger = Connection(ConnectionType.CLIENT)
    feed = StuckFeed()
    async with open_over(feed, max_message_size=2 * len(big)) as conn:
        # Round 1: as many pings as allowed while the write is stuck.
        await fill(feed, conn, big)
        feed.push(*(pinger.send(Ping(payload=b"a%d" % i)) for i in range(MAX_PINGS_UNREAD)))
        await anyio.wait_all_tasks_blocked()  # in memory: every ping is read
        assert conn.close_code is None
        feed.open.set()
        await anyio.wait_all_tasks_blocked()  # in memory: the writer has drained
        sent = events_of(bytes(feed.sent))
        # One pong, for the latest ping, after what was already queued.
        assert [type(e) for e in sent] == [TextMessage, TextMessage, Pong]
        assert sent[2].payload == b"a%d" % (MAX_PINGS_UNREAD - 1)

        # Round 2: the count starts again from the write that completed.
        del feed.sent[:]
        await fill(feed, conn, big)
        feed.push(*(pinger.send(Ping(payload=b"b%d" % i)) for i in range(MAX_PINGS_UNREAD)))
        await anyio.wait_all_tasks_blocked()  # in memory: every ping is read
        assert conn.close_code is None
        feed.push(pinger.send(Ping(payload=b"one too many")))
        await anyio.wait_all_tasks_blocked()  # in memory: the ping is read
        assert conn.close_code == 1008
        feed.open.set()
        await anyio.wait_all_tasks_blocked()  # in memory: the writer has drained
        sent = events_of(bytes(feed.sent))
        # No pong for a remote that is cut off: the queued messages, then the close.
        assert [type(e) for e in sent] == [TextMessage, TextMessage, CloseConnection]
        assert (sent[2].code, sent[2].reason) == (1008, "pings sent without reading the pongs")


# --- a refusal is a control frame: sent once ------------------------------------------------


async def test_each_call_gets_exactly_one_answer_refusals_included() -> None:
    # A refused call is answered from the reader, without a task, when the
    # write buffer has room (try_send). Answered there, it must not be
    # answered again through the control task: the worker gets one result
    # per call, in the order it waited for them.
    async with running_principal() as principal:
        client = Client(await open_raw(principal.port))
        async with client.stream:
            answers: list[dict[str, Any]] = []
            calls = [("1", "no such capability"), ("2", "echo"), ("3", "echo")]
            for call_id, capability in calls:
                call = {"type": "call", "id": call_id, "capability": capability, "input": call_id}
                await client.stream.send(frame(0x1, json.dumps(call).encode()))
                while True:  # until this call's answer: anything before it is recorded too
                    message = await client.receive()
                    assert message is not None
                    answers.append(json.loads(message))
                    if answers[-1]["id"] == call_id:
                        break
            assert answers == [
                {"type": "result", "id": "1", "error": "unknown capability"},
                {"type": "result", "id": "2", "output": "2"},
                {"type": "result", "id": "3", "output": "3"},
            ]


async def test_a_close_while_a_write_is_stuck_is_answered_after_the_queued_messages() -> None:
    # The reader waits (up to close_timeout) for the writer it has, which is
    # stuck in send: what was queued and the close reply go out once that
    # send completes, in order, and only then is the stream closed.
    big = "x" * (WRITE_HIGH_WATER + 100)
    client = Connection(ConnectionType.CLIENT)
    feed = StuckFeed()
    async with open_over(feed, max_message_size=2 * len(big)) as conn:
        await fill(feed, conn, big)
        feed.push(client.send(CloseConnection(code=1000, reason="bye")))
        await anyio.wait_all_tasks_blocked()  # in memory: the close is read
        assert (conn.close_code, conn.close_reason) == (1000, "bye")
        feed.open.set()
        await anyio.wait_all_tasks_blocked()  # in memory: the writer has drained
        sent = events_of(bytes(feed.sent))
        assert [type(e) for e in sent] == [TextMessage, TextMessage, CloseConnection]
        assert (sent[2].code, sent[2].reason) == (1000, "bye")


@pytest.mark.time_limit(15)
async def test_a_keepalive_deadline_during_the_close_handshake_does_not_cut_it_short() -> None:
    # An in-memory stream is not a socket, so the keepalive runs as a task,
    # as over TLS. Once our close has begun the keepalive has nothing left to
    # do: a pong deadline that passes while we wait for the peer's close reply
    # must not drop the connection before the reply (or close_timeout) comes.
    feed = Feed()
    conn = WebSocketConnection(
        feed,
        Connection(ConnectionType.SERVER),
        request=None,
        remote_address=None,
        ping_interval=0.05,
        ping_timeout=1.0,
        close_timeout=10.0,
        max_message_size=1 << 20,
    )
    client = Connection(ConnectionType.CLIENT)
    async with conn._run():
        assert conn._ping_in_reader is False
        await eventually(lambda: conn._pong_wanted)  # pinged; the pong is due within 1 s
        closed = anyio.Event()

        async def close() -> None:
            await conn.aclose(1000, "done")
            closed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(close)
            # The timer under test: the pong deadline passes during the handshake.
            await anyio.sleep(1.5)
            assert not closed.is_set()
            assert not feed._eof  # the stream is still open, waiting for the reply
            feed.push(client.send(CloseConnection(code=1000, reason="done")))
        assert closed.is_set()
        assert (conn.close_code, conn.close_reason) == (1000, "done")


# --- the ASGI application's options reach each connection --------------------------------


async def call_in_memory(app: astral.asgi.App, capability: str, value: Any) -> dict[str, Any]:
    """Connect a worker to ``app`` in memory, make one call, return the answer frame."""
    with FakeServer() as fake:
        async with anyio.create_task_group() as tg:
            await tg.start(fake.run, app, fake.scope(headers=bearer(asgi_token("mem"))))
            await fake.to_app.send({"type": "websocket.connect"})
            assert (await fake.from_app.receive())["type"] == "websocket.accept"
            call = {"type": "call", "id": "1", "capability": capability, "input": value}
            await fake.to_app.send({"type": "websocket.receive", "text": json.dumps(call)})
            reply = await fake.from_app.receive()
            await fake.to_app.send({"type": "websocket.disconnect", "code": 1000})
    assert reply["type"] == "websocket.send"
    answer: dict[str, Any] = json.loads(reply["text"])
    return answer


async def test_an_asgi_app_sends_a_capabilitys_error_message_by_default() -> None:
    async def fail(_: Any) -> None:
        raise ValueError("boom")

    app = astral.asgi.App(verifier=ASGI_VERIFIER, capabilities={"fail": fail})
    answer = await call_in_memory(app, "fail", None)
    assert (answer["id"], answer["error"]) == ("1", "boom")  # not hidden unless asked


async def test_an_asgi_app_converts_values_with_its_json_default() -> None:
    async def today(_: Any) -> datetime.date:
        return datetime.date(2024, 1, 2)

    def iso(value: Any) -> Any:
        if isinstance(value, datetime.date):
            return value.isoformat()
        raise TypeError(type(value).__name__)

    app = astral.asgi.App(verifier=ASGI_VERIFIER, capabilities={"today": today}, json_default=iso)
    answer = await call_in_memory(app, "today", None)
    assert answer == {"type": "result", "id": "1", "output": "2024-01-02"}


def test_an_asgi_app_takes_a_max_message_size_of_one_and_not_less() -> None:
    astral.asgi.App(verifier=ASGI_VERIFIER, max_message_size=1)  # the smallest limit
    with pytest.raises(ValueError, match="max_message_size"):
        astral.asgi.App(verifier=ASGI_VERIFIER, max_message_size=0)


async def test_an_asgi_app_cancelled_by_its_server_gives_calls_in_flight_their_grace() -> None:
    started, release = anyio.Event(), anyio.Event()

    async def hold(_: Any) -> str:
        started.set()
        await release.wait()
        return "done"

    app = astral.asgi.App(verifier=ASGI_VERIFIER, capabilities={"hold": hold}, grace=5.0)
    server_scope = anyio.CancelScope()

    async def serve(fake: FakeServer, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with server_scope:
            await fake.run(
                app, fake.scope(headers=bearer(asgi_token("mem"))), task_status=task_status
            )

    with FakeServer() as fake:
        async with anyio.create_task_group() as tg:
            await tg.start(serve, fake)
            await fake.to_app.send({"type": "websocket.connect"})
            assert (await fake.from_app.receive())["type"] == "websocket.accept"
            call = {"type": "call", "id": "1", "capability": "hold", "input": None}
            await fake.to_app.send({"type": "websocket.receive", "text": json.dumps(call)})
            await started.wait()
            server_scope.cancel()  # the ASGI server shuts the application down
            # Bookkeeping with no event of its own: the connection is draining.
            await eventually(lambda: any(peer._state.draining for peer in app._hosted))
            release.set()  # within the grace: the call finishes and is answered
            reply = await fake.from_app.receive()
            assert reply["type"] == "websocket.send"
            assert json.loads(reply["text"]) == {"type": "result", "id": "1", "output": "done"}
            close = await fake.from_app.receive()
            assert (close["type"], close["code"]) == ("websocket.close", 1001)


@pytest.mark.time_limit(15)
async def test_an_asgi_app_told_not_to_close_on_token_expiry_keeps_the_connection_open() -> None:
    async def echo_value(value: Any) -> Any:
        return value

    app = astral.asgi.App(
        verifier=ASGI_VERIFIER, capabilities={"echo": echo_value}, close_on_token_expiry=False
    )
    expiring = asgi_token("mem", expires_in=1)
    exp = json.loads(base64.urlsafe_b64decode(expiring.split(".")[1] + "=="))["exp"]
    with FakeServer() as fake:
        async with anyio.create_task_group() as tg:
            await tg.start(fake.run, app, fake.scope(headers=bearer(expiring)))
            await fake.to_app.send({"type": "websocket.connect"})
            assert (await fake.from_app.receive())["type"] == "websocket.accept"
            # The timer under test: the token's exp passes (its leeway, 30 s, does not matter).
            await anyio.sleep(max(0.0, exp - time.time()) + 0.3)
            call = {"type": "call", "id": "1", "capability": "echo", "input": "still open"}
            await fake.to_app.send({"type": "websocket.receive", "text": json.dumps(call)})
            reply = await fake.from_app.receive()
            assert reply["type"] == "websocket.send", reply
            assert json.loads(reply["text"])["output"] == "still open"
            await fake.to_app.send({"type": "websocket.disconnect", "code": 1000})


# --- fragments: each message's count starts at zero ---------------------------------------


def fragmented(client: Connection, text: str, pieces: int) -> list[bytes]:
    """``text`` as one message of exactly ``pieces`` frames."""
    size = len(text) // pieces
    parts = [text[i * size : (i + 1) * size] for i in range(pieces - 1)]
    parts.append(text[(pieces - 1) * size :])
    return [
        client.send(TextMessage(data=part, message_finished=i == pieces - 1))
        for i, part in enumerate(parts)
    ]


async def test_every_message_may_have_the_most_fragments_not_only_the_first() -> None:
    feed = Feed()
    client = Connection(ConnectionType.CLIENT)
    async with open_over(feed, max_message_size=4096) as conn:
        most = conn._max_fragments  # 4096 // FRAGMENT_OVERHEAD
        assert most == 4096 // FRAGMENT_OVERHEAD
        feed.push(*fragmented(client, "a" * most, 2))  # a first fragmented message
        assert await conn.receive() == "a" * most
        feed.push(*fragmented(client, "b" * most, most))  # then one at exactly the limit
        assert await conn.receive() == "b" * most
        feed.push(*fragmented(client, "c" * (most + 1), most + 1))  # one more is too many
        with pytest.raises(astral.ConnectionClosed) as info:
            await conn.receive()
        assert info.value.code == 1009
