"""astral.redis.RedisRegistry against a real redis-server, in one test process.

Each "principal process" here is a RedisRegistry with its own ``astral.serve``
(so its own node id, subscription and sockets) in the test's event loop; the
real multi-process runs are in test_redis_cluster.py.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import pytest
import trustme

import astral
from astral._peer import _current_call
from astral.testing import connected_pair

from .helpers import BUDGET_ROUNDING, SECRET, eventually, make_tls, token
from .redis_server import RedisServer, free_port, needs_redis, redis_server, write_file

pytestmark = needs_redis

redis = pytest.importorskip("astral.redis")
coredis = pytest.importorskip("coredis")


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def namespace() -> str:
    # One namespace per test: tests share one redis-server without meeting.
    return "t" + secrets.token_hex(4)


@dataclass
class Node:
    registry: Any
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"


@asynccontextmanager
async def node(
    url: str, namespace: str, serve_options: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[Node]:
    """A principal process: a RedisRegistry and astral.serve on it."""
    async with redis.RedisRegistry(url, namespace=namespace, **options) as registry:
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                functools.partial(
                    astral.serve,
                    verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]),
                    registry=registry,
                    **(serve_options or {}),
                )
            )
            yield Node(registry, port)
            tg.cancel_scope.cancel()


@dataclass
class Worker:
    """Capabilities of a worker, and what the test can observe of them."""

    started: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)
    produced: int = 0
    limit_reached: anyio.Event = field(default_factory=anyio.Event)
    limit: int = 10**9

    def capabilities(self) -> dict[str, Any]:
        async def echo(value: Any) -> Any:
            return value

        async def count(n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

        async def endless(_: Any) -> AsyncIterator[int]:
            i = 0
            while True:
                self.produced = i + 1
                if self.produced >= self.limit:
                    self.limit_reached.set()
                yield i
                i += 1

        async def sleepy(_: Any) -> None:
            self.started.set()
            try:
                await anyio.sleep_forever()
            finally:
                self.stopped.set()

        async def fail(message: str) -> None:
            raise ValueError(message)

        async def empty(_: Any) -> AsyncIterator[int]:
            return
            yield 0

        async def fails_midway(_: Any) -> AsyncIterator[int]:
            yield 1
            yield 2
            raise RuntimeError("broke after two")

        return {
            "echo": echo,
            "count": count,
            "endless": endless,
            "sleepy": sleepy,
            "fail": fail,
            "empty": empty,
            "fails_midway": fails_midway,
        }


async def test_a_worker_on_another_process_is_callable(
    shared_redis: RedisServer, namespace: str
) -> None:
    work = Worker()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(
            b.url, token=token("w1", claims={"role": "gpu"}), capabilities=work.capabilities()
        ),
    ):
        here = await b.registry.wait_for("w1")
        assert isinstance(here, astral.Peer)
        there = await a.registry.wait_for("w1")
        assert isinstance(there, redis.RemoteWorker)
        assert there.subject == "w1"
        assert there.claims["role"] == "gpu"
        assert not there.closed
        assert await there.call("echo", {"x": [1, "é", None]}) == {"x": [1, "é", None]}
        assert await there.call("count", 0) is None  # an empty stream, as locally
        with pytest.raises(astral.RemoteError, match=r"^unknown capability$") as caught:
            await there.call("nope")
        assert caught.value.message == "unknown capability"
        with pytest.raises(astral.RemoteError, match=r"^boom$"):
            await there.call("fail", "boom")
        assert await a.registry.subjects() == ["w1"]
        assert await a.registry.lookup("nobody") is None
        assert await b.registry.lookup("w1") is here
        assert a.registry.local == {}
        assert b.registry.local == {"w1": here}


async def test_streams_arrive_in_order_and_whole(shared_redis: RedisServer, namespace: str) -> None:
    work = Worker()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace, window=64) as b,
        astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()),
    ):
        there = await a.registry.wait_for("w1")
        async with there.stream("count", 10_000) as items:
            assert [item async for item in items] == list(range(10_000))
        stream = await there.call("count", 3)
        assert isinstance(stream, redis.RemoteStream)
        assert stream.capability == "count"
        assert [item async for item in stream] == [0, 1, 2]
        async with there.stream("echo", "one") as items:
            assert [item async for item in items] == ["one"]
        async with there.stream("empty") as items:
            assert [item async for item in items] == []
        got = []
        with pytest.raises(astral.RemoteError, match=r"^broke after two$"):
            async with there.stream("fails_midway") as items:
                async for item in items:
                    got.append(item)  # noqa: PERF401 - kept when the stream fails
        assert got == [1, 2]


async def test_a_slow_consumer_paces_the_worker(shared_redis: RedisServer, namespace: str) -> None:
    # At most a window between the processes, plus the worker connection's
    # own buffer: the worker must stop producing well before 200 items.
    work = Worker(limit=200)
    async with (
        node(shared_redis.url, namespace, window=16) as a,
        node(shared_redis.url, namespace, {"max_buffered_items": 16}) as b,
        astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()),
    ):
        # The principal's side of the worker connection buffers up to 16 too.
        there = await a.registry.wait_for("w1")
        async with there.stream("endless") as items:
            taken = [await anext(items) for _ in range(5)]
            assert taken == [0, 1, 2, 3, 4]
            with anyio.move_on_after(1.0):
                await work.limit_reached.wait()
            assert not work.limit_reached.is_set(), work.produced
            # And it goes on when the consumer does.
            more = [await anext(items) for _ in range(300)]
            assert more == list(range(5, 305))


async def test_cancelling_the_caller_cancels_the_worker_capability(
    shared_redis: RedisServer, namespace: str
) -> None:
    work = Worker()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()) as worker,
    ):
        there = await a.registry.wait_for("w1")
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                await there.call("sleepy")

            tg.start_soon(call)
            await work.started.wait()
            tg.cancel_scope.cancel()
        await work.stopped.wait()
        # The worker connection and the route are still good.
        assert await there.call("echo", 1) == 1
        assert not worker.closed


async def test_leaving_a_stream_early_stops_the_worker(
    shared_redis: RedisServer, namespace: str
) -> None:
    work = Worker()
    caps = work.capabilities()

    async def ticking(_: Any) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            work.stopped.set()

    caps["ticking"] = ticking
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=caps),
    ):
        there = await a.registry.wait_for("w1")
        async with there.stream("ticking") as items:
            async for item in items:
                if item == 3:
                    break
        await work.stopped.wait()


async def test_timeout_is_a_call_timeout_and_stops_the_worker(
    shared_redis: RedisServer, namespace: str
) -> None:
    work = Worker()
    async with (
        node(shared_redis.url, namespace, timeout=0.3) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()),
    ):
        there = await a.registry.wait_for("w1")
        with pytest.raises(astral.CallTimeout, match=r"^call sleepy timed out$"):
            await there.call("sleepy")
        await work.stopped.wait()
        work.stopped = anyio.Event()
        with pytest.raises(astral.CallTimeout):
            async with there.stream("sleepy", timeout=0.2) as items:
                await anext(items)
        await work.stopped.wait()


async def test_worker_leaving_mid_call_is_connection_closed(
    shared_redis: RedisServer, namespace: str
) -> None:
    work = Worker()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
    ):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def run_worker() -> None:
                with scope:
                    async with astral.connect(
                        b.url, token=token("w1"), capabilities=work.capabilities()
                    ):
                        await anyio.sleep_forever()

            tg.start_soon(run_worker)
            there = await a.registry.wait_for("w1")

            async def leave() -> None:
                await work.started.wait()
                scope.cancel()

            tg.start_soon(leave)
            with pytest.raises(astral.ConnectionClosed):
                await there.call("sleepy")
        # Gone from the cluster: b withdraws it once its server has seen the
        # connection end, which may come after the caller got its error.
        while await a.registry.lookup("w1") is not None:
            await anyio.sleep(0.01)  # polls a condition, as eventually() does
        with pytest.raises(astral.ConnectionClosed, match="not connected"):
            await there.call("echo", 1)


async def test_wait_for_wakes_when_the_worker_connects_elsewhere(
    shared_redis: RedisServer, namespace: str
) -> None:
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
    ):
        async with anyio.create_task_group() as tg:
            found: list[Any] = []

            async def wait() -> None:
                found.append(await a.registry.wait_for("late"))

            tg.start_soon(wait)
            # The waiter is registered (and found nothing) before the worker connects.
            await eventually(lambda: "late" in a.registry._waiters)
            caps = Worker().capabilities()
            async with astral.connect(b.url, token=token("late"), capabilities=caps):
                with anyio.fail_after(1.5):  # the announcement wakes it, not a heartbeat
                    await eventually(lambda: bool(found))
                assert await found[0].call("echo", "hi") == "hi"


async def test_the_newest_connection_wins_across_processes(
    shared_redis: RedisServer, namespace: str
) -> None:
    async def who(_: Any) -> str:
        return "first"

    async def who2(_: Any) -> str:
        return "second"

    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(a.url, token=token("w1"), capabilities={"who": who}),
    ):
        assert await (await b.registry.wait_for("w1")).call("who") == "first"
        async with astral.connect(b.url, token=token("w1"), capabilities={"who": who2}):
            # b lists it once its server has the connection.
            await eventually(lambda: "w1" in b.registry.local)
            assert await (await b.registry.wait_for("w1")).call("who") == "second"
            while isinstance(await a.registry.lookup("w1"), astral.Peer):
                await anyio.sleep(0.01)  # until a hears of the newer connection
            assert await (await a.registry.wait_for("w1")).call("who") == "second"
            assert await a.registry.subjects() == ["w1"]


async def test_bad_data_on_the_channels_is_dropped_with_a_log_line(
    shared_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    work = Worker()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()),
    ):
        client = coredis.Redis.from_url(shared_redis.url)
        async with client:
            channel = f"{namespace}:node:{a.registry.node}"
            for junk in (
                b"not json",
                b'{"f": 1}',
                b"[1, 2]",
                b'{"f": "x", "m": [["item"], ["call", 1, 2], 7, ["done", 99999, 1]]}',
                b"\xff\xfe",
            ):
                await client.publish(channel, junk)
            await client.publish(f"{namespace}:presence", b"garbage")
            with caplog.at_level(logging.WARNING, logger="astral.redis"):
                there = await a.registry.wait_for("w1")
                # Everything published before is read before this call's answer.
                assert await there.call("echo", 5) == 5
        assert "dropped" in caplog.text
        assert "malformed announcement" in caplog.text


async def test_no_token_reaches_redis(shared_redis: RedisServer, namespace: str) -> None:
    secret_token = token("w1", claims={"role": "x"})
    seen: list[bytes] = []
    client = coredis.Redis.from_url(shared_redis.url)
    async with client, client.pubsub(patterns=[f"{namespace}:*"]) as pubsub:
        async with anyio.create_task_group() as tg:

            async def listen() -> None:
                async for message in pubsub:
                    if isinstance(message["data"], bytes):
                        seen.append(message["data"])  # noqa: PERF401 - never ends

            tg.start_soon(listen)
            async with (
                node(shared_redis.url, namespace) as a,
                node(shared_redis.url, namespace) as b,
                astral.connect(b.url, token=secret_token, capabilities=Worker().capabilities()),
            ):
                there = await a.registry.wait_for("w1")
                assert await there.call("echo", "payload") == "payload"
                stored = []
                async for key in client.scan_iter(match=f"{namespace}:*"):
                    kind = await client.type(key)
                    if kind == b"hash":
                        stored.append(repr(await client.hgetall(key)).encode())
                    elif kind == b"string":
                        stored.append(await client.get(key) or b"")
            tg.cancel_scope.cancel()
    everything = b"\n".join(seen + stored)
    assert b"payload" in everything  # the test does see the traffic
    assert secret_token.encode() not in everything
    assert secret_token.split(".")[2].encode() not in everything  # nor its signature


async def test_starting_without_redis_is_a_clear_error() -> None:
    port = free_port()
    registry = redis.RedisRegistry(f"redis://:hunter2@127.0.0.1:{port}/0", connect_timeout=2)
    expected = rf"cannot reach Redis at redis://127\.0\.0\.1:{port}"
    with pytest.raises(astral.ClusterError, match=expected) as caught:
        async with registry:
            pass
    assert "hunter2" not in str(caught.value)
    assert isinstance(caught.value, astral.ConnectError)


async def test_a_registry_not_entered_says_so() -> None:
    registry = redis.RedisRegistry("redis://127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match="async with"):
        await registry.lookup("w1")
    with pytest.raises(RuntimeError, match="async with"):
        await registry.subjects()


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="redis://"):
        redis.RedisRegistry("http://127.0.0.1")
    with pytest.raises(ValueError, match="positive"):
        redis.RedisRegistry("redis://127.0.0.1", presence_ttl=0)
    with pytest.raises(ValueError, match="positive"):
        redis.RedisRegistry("redis://127.0.0.1", timeout=-1)


async def test_auth_in_the_url() -> None:
    with redis_server("--requirepass", "s3cret-pw") as server:
        good = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        bad = f"redis://:wrong-pw@127.0.0.1:{server.port}/0"
        async with (
            node(good, "auth") as a,
            node(good, "auth") as b,
            astral.connect(b.url, token=token("w1"), capabilities=Worker().capabilities()),
        ):
            assert await (await a.registry.wait_for("w1")).call("echo", 1) == 1
        with pytest.raises(astral.ClusterError, match="Redis") as caught:
            async with redis.RedisRegistry(bad):
                pass
        assert "wrong-pw" not in str(caught.value)


async def test_rediss_with_a_private_ca() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    tls_port = free_port()
    server = RedisServer()
    directory = server.directory
    cert_file = write_file(directory, "cert.pem", cert.cert_chain_pems[0].bytes())
    key_file = write_file(directory, "key.pem", cert.private_key_pem.bytes())
    ca_file = write_file(directory, "ca.pem", ca.cert_pem.bytes())
    server.extra = (
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        cert_file,
        "--tls-key-file",
        key_file,
        "--tls-ca-cert-file",
        ca_file,
        "--tls-auth-clients",
        "no",
    )
    server.start()
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        client_ctx = make_tls().client
        ca.configure_trust(client_ctx)
        async with (
            node(url, "tls", ssl_context=client_ctx) as a,
            node(url, "tls", ssl_context=client_ctx) as b,
            astral.connect(b.url, token=token("w1"), capabilities=Worker().capabilities()),
        ):
            assert await (await a.registry.wait_for("w1")).call("echo", "tls") == "tls"
    finally:
        server.cleanup()


@pytest.mark.time_limit(30)
async def test_a_redis_outage_fails_fast_keeps_local_workers_and_heals(namespace: str) -> None:
    work = Worker()
    server = RedisServer()
    server.start()
    try:
        async with (
            node(server.url, namespace, presence_ttl=1.5, connect_timeout=1) as a,
            node(server.url, namespace, presence_ttl=1.5, connect_timeout=1) as b,
            astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()),
        ):
            there = await a.registry.wait_for("w1")
            assert await there.call("echo", 1) == 1
            pending: list[BaseException] = []

            async def in_flight() -> None:
                try:
                    await there.call("sleepy", timeout=None)
                except astral.ClusterError as exc:
                    pending.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_flight)
                await work.started.wait()
                server.stop()
            # The call in flight failed as soon as the link broke, naming Redis.
            assert "Redis" in str(pending[0])
            # Callable here, from the process holding it.
            local = await b.registry.wait_for("w1")
            assert await local.call("echo", 2) == 2
            # From the other one: a clear error at once, never a hang.
            with anyio.fail_after(2):
                with pytest.raises(astral.ClusterError, match="Redis") as caught:
                    while True:  # until a's link notices (its next Redis round trip)
                        await there.call("echo", 3)
                assert str(server.port) in str(caught.value)
                with pytest.raises(astral.ClusterError):
                    await a.registry.wait_for("w1")
                with pytest.raises(astral.ClusterError):
                    await a.registry.subjects()
            server.start()
            with anyio.fail_after(10):
                while True:
                    try:
                        worker = await a.registry.wait_for("w1")
                        assert await worker.call("echo", 4) == 4
                        break
                    except astral.ClusterError:
                        await anyio.sleep(0.05)
            assert await a.registry.subjects() == ["w1"]
    finally:
        server.cleanup()


async def test_a_dropped_stream_stops_the_worker(shared_redis: RedisServer, namespace: str) -> None:
    work = Worker()
    caps = work.capabilities()

    async def ticking(_: Any) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            work.stopped.set()

    caps["ticking"] = ticking
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=caps),
    ):
        there = await a.registry.wait_for("w1")
        stream = await there.call("ticking")
        assert isinstance(stream, redis.RemoteStream)
        del stream
        gc.collect()
        await work.stopped.wait()


async def code_written_for_any_registry(registry: astral.Registry) -> list[Any]:
    with anyio.fail_after(5):
        worker = await registry.wait_for("w1")
    async with worker.stream("count", 3) as items:
        streamed = [item async for item in items]
    found = await registry.lookup("w1")
    assert found is not None
    return [
        worker.subject,
        worker.claims["sub"],
        await worker.call("echo", "x"),
        streamed,
        await registry.subjects(),
        await registry.lookup("nobody"),
    ]


async def test_one_shape_for_one_process_and_for_many(
    shared_redis: RedisServer, namespace: str
) -> None:
    expected = ["w1", "w1", "x", [0, 1, 2], ["w1"], None]
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=Worker().capabilities()),
    ):
        assert await code_written_for_any_registry(a.registry) == expected  # remote
        assert await code_written_for_any_registry(b.registry) == expected  # local
    local = astral.PeerRegistry()
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            functools.partial(
                astral.serve,
                verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]),
                registry=local,
            )
        )
        async with astral.connect(
            f"ws://127.0.0.1:{port}/", token=token("w1"), capabilities=Worker().capabilities()
        ):
            assert await code_written_for_any_registry(local) == expected
        tg.cancel_scope.cancel()


async def test_a_process_shutting_down_fails_the_calls_it_serves(
    shared_redis: RedisServer, namespace: str
) -> None:
    work = Worker()
    async with node(shared_redis.url, namespace) as a, anyio.create_task_group() as tg:
        b_ready, b_stop = anyio.Event(), anyio.Event()

        async def run_b() -> None:
            async with (
                node(shared_redis.url, namespace) as b,
                astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()),
            ):
                b_ready.set()
                await b_stop.wait()

        async def stop_b_once_called() -> None:
            await work.started.wait()
            b_stop.set()

        tg.start_soon(run_b)
        await b_ready.wait()
        there = await a.registry.wait_for("w1")
        tg.start_soon(stop_b_once_called)
        with pytest.raises(astral.ConnectionClosed):
            await there.call("sleepy", timeout=None)


# -- deadlines across the hop ------------------------------------------------


@dataclass
class Watched:
    """A worker capability that waits forever, and what it saw of its deadline."""

    remaining: list[float | None] = field(default_factory=list)
    started: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)
    stopped_at: float = 0.0

    def capabilities(self) -> dict[str, Any]:
        async def forever(_: Any) -> None:
            self.remaining.append(astral.current_call().time_remaining())
            self.started.set()
            try:
                await anyio.sleep_forever()
            finally:
                self.stopped_at = anyio.current_time()
                self.stopped.set()

        async def one_then_forever(_: Any) -> AsyncIterator[int]:
            self.remaining.append(astral.current_call().time_remaining())
            try:
                yield 1
                self.started.set()
                await anyio.sleep_forever()
            finally:
                self.stopped_at = anyio.current_time()
                self.stopped.set()

        async def remaining(_: Any) -> float | None:
            return astral.current_call().time_remaining()

        return {"forever": forever, "one_then_forever": one_then_forever, "remaining": remaining}


async def test_a_deadline_crosses_the_hop_and_cancels_the_worker(
    shared_redis: RedisServer, namespace: str
) -> None:
    watch = Watched()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=watch.capabilities()) as worker,
    ):
        there = await a.registry.wait_for("w1")
        assert isinstance(there, redis.RemoteWorker)
        start = anyio.current_time()
        with pytest.raises(astral.CallTimeout, match=r"^call forever missed its deadline$"):
            await there.call("forever", deadline=0.4)
        took = anyio.current_time() - start
        assert 0.4 - 0.01 <= took < 2.0
        await watch.stopped.wait()
        # The worker's capability knew its budget: it crossed X -> Redis -> Y -> worker.
        [remaining] = watch.remaining
        assert remaining is not None
        assert 0 < remaining <= 0.4 + BUDGET_ROUNDING
        assert watch.stopped_at - start < 2.0
        # One outcome, nothing left behind on either side; the route still works.
        assert await there.call("remaining") is None  # no deadline: as before
        assert await there.call("remaining", timeout=5) is None
        left = await there.call("remaining", deadline=5)
        assert left is not None
        assert 0 < left <= 5
        assert a.registry._calls == {}
        # Y pops its entry once its serving task ends, after the worker saw the cancel.
        await eventually(lambda: not b.registry._served)
        assert not worker.closed


async def test_a_stream_deadline_covers_the_whole_stream(
    shared_redis: RedisServer, namespace: str
) -> None:
    watch = Watched()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=watch.capabilities()),
    ):
        there = await a.registry.wait_for("w1")
        items: list[int] = []
        with pytest.raises(astral.CallTimeout, match=r"missed its deadline$"):
            async with there.stream("one_then_forever", deadline=0.4) as stream:
                async for item in stream:
                    items.append(item)  # noqa: PERF401 - the failure ends the loop
        assert items == [1]
        await watch.stopped.wait()
        [remaining] = watch.remaining
        assert remaining is not None
        assert 0 < remaining <= 0.4 + BUDGET_ROUNDING
        assert a.registry._calls == {}
        # Y pops its entry once its serving task ends, after the worker saw the cancel.
        await eventually(lambda: not b.registry._served)


async def test_a_capability_on_x_passes_its_deadline_to_a_worker_on_y(
    shared_redis: RedisServer, namespace: str
) -> None:
    watch = Watched()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=watch.capabilities()),
    ):
        there = await a.registry.wait_for("w1")
        relayed: list[BaseException] = []

        async def relay(capability: str) -> Any:
            # Runs on X under a deadline; the call it makes inherits it.
            try:
                return await there.call(capability)
            except BaseException as exc:
                relayed.append(exc)
                raise

        async with connected_pair({"relay": relay}, {}) as (_, caller):
            start = anyio.current_time()
            with pytest.raises(astral.CallTimeout, match=r"^call relay missed its deadline$"):
                await caller.call("relay", "forever", deadline=0.4)
            await watch.stopped.wait()
            [remaining] = watch.remaining
            assert remaining is not None
            assert 0 < remaining <= 0.4 + BUDGET_ROUNDING
            assert watch.stopped_at - start < 2.0
            # The relay was cancelled by its own deadline (its scope), once:
            # the caller's own deadline may answer it a step before the relay
            # on X has unwound, so wait for that, not for the instant.
            await eventually(lambda: bool(relayed))
            assert len(relayed) == 1
            assert isinstance(relayed[0], anyio.get_cancelled_exc_class())
            await eventually(lambda: not a.registry._calls)
            # Without a deadline the relayed call carries none.
            assert await caller.call("relay", "remaining") is None


async def test_a_deadline_already_passed_or_invalid_sends_nothing(
    shared_redis: RedisServer, namespace: str
) -> None:
    watch = Watched()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=watch.capabilities()),
    ):
        there = await a.registry.wait_for("w1")
        for bad in (0, -1, math.nan):
            with pytest.raises(ValueError, match="deadline must be a positive number"):
                await there.call("forever", deadline=bad)
            with pytest.raises(ValueError, match="deadline must be a positive number"):
                async with there.stream("forever", deadline=bad):
                    pass
        token_ = _current_call.set(SimpleNamespace(deadline=anyio.current_time() - 1))  # type: ignore[arg-type]
        try:
            with pytest.raises(astral.CallTimeout, match=r"^call forever missed its deadline$"):
                await there.call("forever")
            with pytest.raises(astral.CallTimeout, match=r"^call forever missed its deadline$"):
                async with there.stream("forever"):
                    pass
        finally:
            _current_call.reset(token_)
        assert a.registry._calls == {}
        assert await there.call("remaining") is None
        assert watch.remaining == []  # forever never ran
        # Y pops its entry once its serving task ends, after the worker saw the cancel.
        await eventually(lambda: not b.registry._served)


async def test_the_budget_is_enforced_on_y_and_validated_on_receipt(
    shared_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-written caller that never cancels: Y ends the call at the budget by itself."""
    watch = Watched()
    async with (
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=watch.capabilities()),
    ):
        await b.registry.wait_for("w1")
        client = coredis.Redis.from_url(shared_redis.url)
        async with client:
            channel = f"{namespace}:node:{b.registry.node}"
            answers = f"{namespace}:node:fake"
            async with client.pubsub(channels=[answers]) as pubsub:

                async def publish(*messages: list[Any]) -> None:
                    payload = json.dumps({"f": "fake", "m": list(messages)})
                    await client.publish(channel, payload)

                async def answer() -> list[Any]:
                    async for message in pubsub:
                        if message["type"] == "message":
                            [got] = json.loads(message["data"])["m"]
                            return list(got)
                    raise AssertionError("subscription ended")

                with caplog.at_level(logging.WARNING, logger="astral.redis"):
                    # Bad budgets: each message is dropped as malformed, logged.
                    await publish(
                        ["call", 1, "w1", "forever", None, 8, -1],
                        ["call", 2, "w1", "forever", None, 8, 1.5],
                        ["call", 3, "w1", "forever", None, 8, "100"],
                        ["call", 4, "w1", "forever", None, 8, True],
                        ["call", 5, "w1", "forever", None, 8, None],
                        ["call", 6, "w1", "forever", None, 8, 2**53],
                        ["call", 7, "w1", "forever", None, 8, 100, "extra"],
                        # A trace must be an object of strings, within the limit.
                        ["call", 17, "w1", "forever", None, 8, None, {"traceparent": 1}],
                        ["call", 18, "w1", "forever", None, 8, -1, {}],
                        ["call", 19, "w1", "forever", None, 8, 100, {}, "extra"],
                        ["call", 21, "w1", "forever", None, 8, None, {"ts": "x" * 9000}],
                        [
                            "call",
                            20,
                            "w1",
                            "forever",
                            None,
                            8,
                            None,
                            {str(i): "" for i in range(99)},
                        ],
                    )
                    # Old-style (no budget) still works, with no deadline.
                    await publish(["call", 8, "w1", "remaining", None, 8])
                    assert await answer() == ["done", 8, None]
                assert "dropped 12 malformed frames" in caplog.text
                assert watch.remaining == []
                # A budget of 0 fails at once; nothing runs.
                await publish(["call", 9, "w1", "forever", None, 8, 0])
                assert await answer() == [
                    "fail",
                    9,
                    "timeout",
                    "call forever missed its deadline",
                    None,
                ]
                assert watch.remaining == []
                # A budget, and no cancel ever: the worker is cancelled at it,
                # and Y answers with one timeout.
                start = anyio.current_time()
                await publish(["call", 10, "w1", "forever", None, 8, 300])
                reply = await answer()
                assert reply[:3] == ["fail", 10, "timeout"]
                await watch.stopped.wait()
                assert watch.stopped_at - start >= 0.3 - 0.01
                [remaining] = watch.remaining
                assert remaining is not None
                assert 0 < remaining <= 0.3 + BUDGET_ROUNDING
                with anyio.move_on_after(0.3):
                    extra = await answer()
                    pytest.fail(f"a second terminal message: {extra}")
                # Y pops its entry once its serving task ends, after the worker saw the cancel.
        await eventually(lambda: not b.registry._served)


async def test_a_call_to_a_process_that_left_fails_at_once(
    shared_redis: RedisServer, namespace: str
) -> None:
    # A call's publish waits for Redis's count of listeners: none means the
    # process is gone, and the caller learns it then, not at a heartbeat
    # (a minute away here).
    work = Worker()
    async with node(shared_redis.url, namespace, presence_ttl=180) as a:
        async with (
            node(shared_redis.url, namespace, presence_ttl=180) as b,
            astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()),
        ):
            there = await a.registry.wait_for("w1")
            assert isinstance(there, redis.RemoteWorker)
            assert await there.call("echo", 1) == 1
        # b has left (its subscription with it); the handle still names it.
        start = anyio.current_time()
        with pytest.raises(astral.ConnectionClosed, match="left"):
            await there.call("echo", 2)
        assert anyio.current_time() - start < 30  # not a heartbeat (60 s)
        assert there.closed
        assert a.registry._calls == {}


async def test_serving_tasks_wait_for_the_next_call(
    shared_redis: RedisServer, namespace: str
) -> None:
    from astral._cluster_serving import IDLE_SERVERS  # noqa: PLC0415

    work = Worker()
    async with (
        node(shared_redis.url, namespace) as a,
        node(shared_redis.url, namespace) as b,
        astral.connect(b.url, token=token("w1"), capabilities=work.capabilities()),
    ):
        there = await a.registry.wait_for("w1")
        for i in range(20):
            assert await there.call("echo", i) == i
        # One task served them all, one after the other, and waits again.
        await eventually(lambda: len(b.registry._idle_servers) == 1)
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await there.call("echo", i)

        async with anyio.create_task_group() as tg:
            for i in range(IDLE_SERVERS + 40):
                tg.start_soon(one, i)
        assert results == {i: i for i in range(IDLE_SERVERS + 40)}
        # No more wait than the bound; the rest ended.
        await eventually(lambda: not b.registry._served)
        await eventually(lambda: len(b.registry._idle_servers) == IDLE_SERVERS)
        # A cancelled call leaves its task free for the next one.
        async with anyio.create_task_group() as tg:
            tg.start_soon(there.call, "sleepy")
            await work.started.wait()
            tg.cancel_scope.cancel()
        await work.stopped.wait()
        assert await there.call("echo", "after") == "after"


async def test_acl_user_and_database_in_the_url() -> None:
    # The hot path's own connections log in as the URL says (AUTH user
    # password) and select its database, as coredis does for the rest.
    with redis_server(
        "--user", "default", "off", "--user", "astral", "on", ">pw-9", "~*", "&*", "+@all"
    ) as server:
        good = f"redis://astral:pw-9@127.0.0.1:{server.port}/3"
        async with (
            node(good, "acl") as a,
            node(good, "acl") as b,
            astral.connect(b.url, token=token("w1"), capabilities=Worker().capabilities()),
        ):
            there = await a.registry.wait_for("w1")
            assert isinstance(there, redis.RemoteWorker)
            assert await there.call("echo", "acl") == "acl"
            # Presence went to database 3, and every connection (the hot
            # path's subscription and publisher too) logged in and selected it.
            assert await a.registry._client.dbsize() > 0
            clients = await a.registry._client.client_list()
            subscribed = [c for c in clients if int(c["sub"]) > 0]
            assert len(subscribed) == 2  # one subscription per process
            assert {(c["user"], str(c["db"])) for c in clients} == {("astral", "3")}
        bad = f"redis://astral:wrong-9@127.0.0.1:{server.port}/3"
        with pytest.raises(astral.ClusterError, match="Redis") as caught:
            async with redis.RedisRegistry(bad, connect_timeout=2):
                pass
        assert "wrong-9" not in str(caught.value)


async def test_a_killed_hot_connection_is_a_redis_failure_and_heals(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis drops the subscription (the hot path's own connection): calls in
    # flight fail with ClusterError, and the registry reconnects by itself.
    with redis_server() as server:
        async with (
            node(server.url, namespace, connect_timeout=2) as a,
            node(server.url, namespace, connect_timeout=2) as b,
            astral.connect(b.url, token=token("w1"), capabilities=Worker().capabilities()),
        ):
            there = await a.registry.wait_for("w1")
            assert await there.call("echo", 1) == 1
            caplog.set_level(logging.WARNING, logger="astral.redis")
            assert await a.registry._client.client_kill(type_=coredis.PureToken.PUBSUB) >= 2
            # Each process noticed, and came back (the log is monotonic; the
            # up flag could flip back before a poll saw it down).
            await eventually(lambda: caplog.text.count("reconnected to Redis") >= 2)
            await eventually(lambda: a.registry._up and b.registry._up)
            there = await a.registry.wait_for("w1")
            assert await there.call("echo", 2) == 2
