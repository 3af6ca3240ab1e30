"""astral.accept: the original's server-side form, fed by the test."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

import astral
from astral import (
    AcceptedPeer,
    Call,
    ConnectionClosed,
    Peer,
    RemoteError,
    Result,
    Yield,
    _peer,
    accept,
    current_peer,
    decode,
    encode,
)
from astral.testing import memory_transport_pair

from .helpers import count, echo

if TYPE_CHECKING:
    from collections.abc import AsyncIterable

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream


async def whoami(_: Any) -> Any:
    return {"claims": dict(current_peer().claims), "accepted": isinstance(current_peer(), Peer)}


CAPS: dict[str, Any] = {"echo": echo, "count": count, "whoami": whoami}


async def collect_into(items: AsyncIterable[Any], into: list[Any]) -> None:
    """Append each item as it arrives, so a test sees what came before an error."""
    async for item in items:
        into.append(item)  # noqa: PERF401 - the items before an error must be kept


async def feed_refused_calls(peer: AcceptedPeer, most: int) -> None:
    for i in range(most):
        await peer.receive(encode(Call(str(i), "unknown")))
    raise AssertionError("the flood was never cut off")


def wire() -> tuple[MemoryObjectSendStream[str], MemoryObjectReceiveStream[str]]:
    """What the accepted peer sends, for the test to read."""
    return anyio.create_memory_object_stream[str](100)


async def test_accept_answers_calls_fed_to_receive() -> None:
    sent, outbox = wire()
    async with sent, outbox, accept(send=sent.send, capabilities=CAPS) as peer:
        assert isinstance(peer, AcceptedPeer)
        await peer.receive(encode(Call("1", "echo", {"hi": "é"})))
        assert await outbox.receive() == '{"type":"result","id":"1","output":{"hi":"é"}}'
        await peer.receive('{"type":"call","id":"2","capability":"count","input":2}')
        assert [decode(await outbox.receive()) for _ in range(3)] == [
            Yield("2", 0),
            Yield("2", 1),
            Result("2"),
        ]
        await peer.receive(encode(Call("3", "constructor")))
        assert decode(await outbox.receive()) == Result("3", error="unknown capability")


async def test_accept_calls_out_through_send() -> None:
    sent, outbox = wire()
    async with sent, outbox, accept(send=sent.send, timeout=None) as peer:
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def call() -> None:
                results.append(await peer.call("transcription", {"audio": "..."}))

            tg.start_soon(call)
            frame = decode(await outbox.receive())
            assert isinstance(frame, Call)
            assert frame.capability == "transcription"
            await peer.receive(encode(Result(frame.id, "text")))
        assert results == ["text"]

        async with peer.stream("generate") as items:
            frame = decode(await outbox.receive())
            await peer.receive(encode(Yield(frame.id, "a")))
            await peer.receive(encode(Yield(frame.id, "b")))
            await peer.receive('{"type":"result","id":"' + frame.id + '","error":"oops"}')
            received: list[Any] = []
            with pytest.raises(RemoteError, match=r"^oops$"):
                await collect_into(items, received)
            assert received == ["a", "b"]


async def test_accept_with_a_peer_on_the_other_side_calls_both_ways() -> None:
    async def ask_back(question: str) -> Any:
        return await current_peer().call("answer", question)

    async def answer(question: str) -> str:
        return question.upper()

    client_transport, server_transport = memory_transport_pair()
    claims = {"sub": "worker-7"}
    async with (
        server_transport,
        accept(
            send=server_transport.send,
            capabilities={**CAPS, "ask_back": ask_back},
            claims=claims,
        ) as server,
        anyio.create_task_group() as pump_group,
    ):

        async def pump() -> None:
            # The server's message handler: every text received goes to the peer.
            async for text in server_transport:
                await server.receive(text)

        pump_group.start_soon(pump)
        async with Peer(client_transport, capabilities={"answer": answer}) as client:
            assert await client.call("echo", [1, 2]) == [1, 2]
            assert [x async for x in await client.call("count", 3)] == [0, 1, 2]
            assert await client.call("ask_back", "why") == "WHY"
            assert await client.call("whoami") == {
                "claims": {"sub": "worker-7"},
                "accepted": True,
            }
            assert await server.call("answer", "hey") == "HEY"
            with pytest.raises(RemoteError, match="unknown capability"):
                await server.call("echo", 1)
        # The client left: the pump sees the end of input and returns.


async def test_receive_after_close_raises_connection_closed() -> None:
    sent, outbox = wire()
    async with sent, outbox:
        async with accept(send=sent.send, capabilities=CAPS) as peer:
            await peer.receive(encode(Call("1", "echo", 1)))
            assert decode(await outbox.receive()) == Result("1", 1)
            await peer.aclose()
            assert peer.closed
            with pytest.raises(ConnectionClosed, match=r"^peer is closed$"):
                await peer.receive(encode(Call("2", "echo", 2)))
            with pytest.raises(ConnectionClosed):
                await peer.call("anything")
        with pytest.raises(ConnectionClosed, match=r"^peer is closed$"):
            await peer.receive(encode(Call("3", "echo", 3)))


async def test_receive_after_leaving_the_block_raises_connection_closed() -> None:
    sent, outbox = wire()
    async with sent, outbox:
        async with accept(send=sent.send) as peer:
            pass
        with pytest.raises(ConnectionClosed):
            await peer.receive("{}")


async def test_closing_fails_pending_calls_and_cancels_running_capabilities() -> None:
    started = anyio.Event()
    finished = anyio.Event()

    async def block(_: Any) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            finished.set()

    sent, outbox = wire()
    async with sent, outbox:
        outcome: list[ConnectionClosed] = []
        async with accept(send=sent.send, capabilities={"block": block}, timeout=None) as peer:
            await peer.receive(encode(Call("r", "block")))
            await started.wait()
            async with anyio.create_task_group() as tg:

                async def pending() -> None:
                    try:
                        await peer.call("remote")
                    except ConnectionClosed as exc:
                        outcome.append(exc)

                tg.start_soon(pending)
                assert isinstance(decode(await outbox.receive()), Call)
                await peer.aclose()
        assert finished.is_set()
        assert len(outcome) == 1
        assert outcome[0].code == 1000


async def test_bad_input_through_receive_is_ignored_or_answered() -> None:
    sent, outbox = wire()
    async with sent, outbox, accept(send=sent.send, capabilities=CAPS) as peer:
        for text in ("", "not json", "[]", '{"type":"ping","id":"1"}', '{"type":"result"}'):
            await peer.receive(text)
        await peer.receive('{"type":"call","id":"m"}')
        frame = decode(await outbox.receive())
        assert isinstance(frame, Result)
        assert frame.id == "m"
        assert frame.error is not None
        assert frame.error.startswith("malformed call")
        await peer.receive(encode(Call("ok", "echo", "still fine")))
        assert decode(await outbox.receive()) == Result("ok", "still fine")
        assert not peer.closed


async def test_a_flood_through_receive_closes_the_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_peer, "FLOOD_GRACE", 0.2)
    replies: list[str] = []
    blocked = anyio.Event()
    never = anyio.Event()

    async def send_that_stalls(text: str) -> None:
        # A remote that never reads: the first answer never leaves.
        replies.append(text)
        blocked.set()
        await never.wait()

    limit = 4
    async with accept(send=send_that_stalls, max_inbound_calls=limit) as peer:
        with pytest.raises(ConnectionClosed):
            await feed_refused_calls(peer, 10_000)
        reason = await peer.wait_closed()
        assert reason.code == 1008
        assert blocked.is_set()
        assert len(replies) == 1


@pytest.mark.parametrize("limit", [1, 4])
async def test_the_reader_pauses_with_exactly_max_inbound_calls_replies_waiting(limit: int) -> None:
    """One refusal is being sent (the remote reads nothing), ``limit`` wait behind it:
    the peer reads no further call until one goes out, then reads on."""
    replies: list[str] = []
    reading = anyio.Event()

    async def send_when_read(text: str) -> None:
        await reading.wait()
        replies.append(text)

    fed: list[int] = []

    async def feed() -> None:
        for i in range(3 * limit):
            await peer.receive(encode(Call(str(i), "unknown")))
            fed.append(i)

    async with (
        accept(send=send_when_read, max_inbound_calls=limit, input_buffer=0) as peer,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(feed)
        await anyio.wait_all_tasks_blocked()  # in memory: proves it reads no more
        # Taken by the reader: the one being sent, and the limit waiting behind it.
        assert len(fed) == 1 + limit
        assert replies == []
        reading.set()
        await anyio.wait_all_tasks_blocked()  # in memory: everything has gone through
        assert len(fed) == 3 * limit
        assert [decode(text).id for text in replies] == [str(i) for i in range(3 * limit)]


async def test_accept_checks_capabilities() -> None:
    async def send(_: str) -> None:  # pragma: no cover
        pass

    def sync(_: Any) -> Any:  # pragma: no cover
        return None

    with pytest.raises(TypeError):
        async with accept(send=send, capabilities={"sync": sync}):
            pass  # pragma: no cover


async def test_an_exception_in_the_body_propagates_as_raised() -> None:
    sent, outbox = wire()
    async with sent, outbox:
        with pytest.raises(LookupError, match="mine"):
            async with accept(send=sent.send, capabilities=CAPS):
                raise LookupError("mine")


async def test_a_failing_send_callback_closes_the_connection_instead_of_crashing() -> None:
    class Disconnected(Exception):
        pass

    async def send(_: str) -> None:
        raise Disconnected("client went away")

    async with astral.accept(send=send) as peer:
        with pytest.raises(astral.ConnectionClosed, match="send failed: Disconnected"):
            await peer.call("anything", timeout=None)
