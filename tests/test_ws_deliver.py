"""``WebSocketConnection.deliver``: the consumer's task reads the connection itself.

A peer over astral's WebSocket reads through ``deliver`` (``reader_task=False``
on the server and the client): no reader task of its own and no hand-over
between tasks per message. These tests pin what ``deliver`` promises, on both
backends: messages in order, then the end once; the close handshake still
completes when nobody reads; a close begun by the delivering task itself does
not wait for the close timeout.
"""

from __future__ import annotations

import anyio
import pytest

from astral._exceptions import ConnectionClosed
from astral._websocket import WebSocketConnection, open_websocket
from astral._ws_connection import FLUSH_AT

from .test_websocket import HOST, closed_with, server

pytestmark = pytest.mark.anyio


class Delivered:
    """Records what deliver() handed over, in order."""

    def __init__(self) -> None:
        self.log: list[str | ConnectionClosed] = []
        self.ended = anyio.Event()

    async def on_message(self, text: str) -> None:
        assert not self.ended.is_set(), "a message after the end"
        self.log.append(text)
        await anyio.lowlevel.checkpoint()  # the consumer may wait

    def on_end(self, exc: ConnectionClosed) -> None:
        assert not self.ended.is_set(), "the end told twice"
        self.log.append(exc)
        self.ended.set()


async def test_messages_come_in_order_then_the_end_once() -> None:
    got = Delivered()

    async def handler(conn: WebSocketConnection) -> None:
        await conn.deliver(got.on_message, got.on_end)

    async with server(handler, reader_task=False) as port:
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            for text in ["a", "b", "é" * 70_000, "c"]:
                await ws.send(text)
            await ws.aclose(4000, "bye")
        with anyio.fail_after(5):
            await got.ended.wait()
    *messages, end = got.log
    assert messages == ["a", "b", "é" * 70_000, "c"]
    assert isinstance(end, ConnectionClosed)
    assert (end.code, end.reason) == (4000, "bye")


async def test_a_close_from_this_side_ends_the_delivery() -> None:
    got = Delivered()
    delivering = anyio.Event()

    async def handler(conn: WebSocketConnection) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.deliver, got.on_message, got.on_end)
            await delivering.wait()
            await conn.aclose(4002, "enough")  # completes: the delivery reads the reply

    async with server(handler, reader_task=False) as port:
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.send("first")
            delivering.set()
            closed = await closed_with(ws.receive())
            assert (closed.code, closed.reason) == (4002, "enough")
        assert ws.close_code == 4002
        with anyio.fail_after(5):
            await got.ended.wait()
    assert got.log[:-1] in ([], ["first"])
    end = got.log[-1]
    assert isinstance(end, ConnectionClosed)
    assert end.code == 4002


async def test_receive_is_refused_while_deliver_reads() -> None:
    errors: list[BaseException] = []
    started = anyio.Event()

    async def on_message(text: str) -> None:
        started.set()

    async def handler(conn: WebSocketConnection) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.deliver, on_message, lambda exc: None)
            await started.wait()
            try:
                await conn.receive()
            except RuntimeError as exc:
                errors.append(exc)
            conn.close_soon()

    async with server(handler, reader_task=False) as port:
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.send("x")
            await closed_with(ws.receive())
    assert len(errors) == 1
    assert "deliver" in str(errors[0])


async def test_deliver_reads_through_receive_when_a_reader_task_runs() -> None:
    got = Delivered()

    async def handler(conn: WebSocketConnection) -> None:
        await conn.deliver(got.on_message, got.on_end)

    async with server(handler) as port:  # reader_task=True: the default
        async with open_websocket(f"ws://{HOST}:{port}/") as ws:
            await ws.send("one")
            await ws.send("two")
            await ws.aclose(4001, "done")
        with anyio.fail_after(5):
            await got.ended.wait()
    assert got.log[:2] == ["one", "two"]
    end = got.log[2]
    assert isinstance(end, ConnectionClosed)
    assert (end.code, end.reason) == (4001, "done")


async def test_the_close_handshake_completes_when_nobody_reads() -> None:
    # reader_task=False and the handler never reads: leaving it closes with
    # 1000, and a reader starts for the handshake; the client sees a clean
    # close, not a dropped connection (1006) after its close timeout.
    async def handler(conn: WebSocketConnection) -> None:
        await conn.send("hello")

    async with server(handler, reader_task=False, close_timeout=30) as port:
        with anyio.fail_after(5):
            async with open_websocket(f"ws://{HOST}:{port}/", close_timeout=30) as ws:
                assert await ws.receive() == "hello"
                closed = await closed_with(ws.receive())
    assert closed.code == 1000
    assert ws.close_code == 1000


async def test_a_close_begun_by_the_delivering_task_does_not_wait_for_the_timeout() -> None:
    ends: list[ConnectionClosed] = []
    conns: list[WebSocketConnection] = []

    async def handler(conn: WebSocketConnection) -> None:
        conns.append(conn)

        async def on_message(text: str) -> None:
            conn.close_soon(4003, text)

        await conn.deliver(on_message, ends.append)

    # A close timeout far above the test's bound: waiting for it would fail the test.
    async with server(handler, reader_task=False, close_timeout=60) as port:
        with anyio.fail_after(5):
            async with open_websocket(f"ws://{HOST}:{port}/", close_timeout=60) as ws:
                await ws.send("stop")
                closed = await closed_with(ws.receive())
    assert (closed.code, closed.reason) == (4003, "stop")
    assert [(e.code, e.reason) for e in ends] == [(4003, "stop")]
    with pytest.raises(ValueError, match="1005"):
        conns[0].close_soon(1005)


# --- write_now: a message alone in flight goes out at once ----------------------


async def test_write_now_sends_at_once_when_nothing_is_queued() -> None:
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        assert ws.write_now("alone")
        assert not ws._out  # not left for the end of the turn or the writer
        assert await ws.receive() == "alone"


async def test_write_now_never_overtakes_what_is_queued() -> None:
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        assert ws.try_send("first")  # queued, not yet written
        assert not ws.write_now("second")  # it would overtake "first"
        await ws.send("second")
        assert [await ws.receive(), await ws.receive()] == ["first", "second"]


async def test_write_now_refuses_once_closing() -> None:
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        ws.close_soon(1000)
        assert not ws.write_now("too late")
        await closed_with(ws.send("too late"))


async def test_a_batch_worth_a_write_goes_out_before_the_turn_ends() -> None:
    # Frames made in one turn are written together at its end, except that
    # once FLUSH_AT bytes are queued they go at once: the remote starts on
    # them while the rest is made (no lockstep of whole batches).
    texts = [f"{i:04d}" + "x" * 100 for i in range(3 * FLUSH_AT // 100)]
    async with server() as port, open_websocket(f"ws://{HOST}:{port}/") as ws:
        held = []
        for text in texts:  # one turn: no await between the sends
            assert ws.try_send(text)
            held.append(len(ws._out))
        assert max(held) < FLUSH_AT + 200  # never more than one write's worth held
        assert [await ws.receive() for _ in texts] == texts
