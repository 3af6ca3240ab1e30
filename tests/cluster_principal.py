"""A principal process for the multi-process cluster test (test_redis_cluster.py).

Run as ``python -m tests.cluster_principal REDIS_URL NAMESPACE BACKEND`` it
serves with ``astral.serve`` and prints ``READY <port>``; ``app`` is the same
principal as an ASGI application, for ``uvicorn --workers`` (configured by the
``ASTRAL_REDIS`` and ``ASTRAL_NAMESPACE`` environment variables).

Workers call its capabilities over their own connection, so each test step
runs on the process the worker is connected to.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import anyio

import astral
import astral.asgi
import astral.redis

from .helpers import SECRET

PRESENCE_TTL = 3.0


def capabilities(registry: astral.redis.RedisRegistry) -> dict[str, Any]:
    async def whereami(_: Any) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": registry.node}

    async def subjects(_: Any) -> list[str]:
        return await registry.subjects()

    async def exercise(job: dict[str, Any]) -> dict[str, Any]:
        """Call every listed worker: a result, a cancelled call; one long stream."""
        report: dict[str, Any] = {}
        for subject in job["subjects"]:
            with anyio.fail_after(10):
                worker = await registry.wait_for(subject)
            entry: dict[str, Any] = {"remote": not isinstance(worker, astral.Peer)}
            entry["echo"] = await worker.call("echo", {"from": os.getpid(), "to": subject})
            tag = f"{os.getpid()}-{subject}"
            # Cancel the call once it runs on the worker (never on a timer).
            async with anyio.create_task_group() as calls:
                calls.start_soon(_call_sleepy, worker, tag)
                with anyio.fail_after(10):
                    while not await worker.call("was_started", tag):
                        await anyio.sleep(0.02)  # polls the worker's answer, not a duration
                calls.cancel_scope.cancel()
            with anyio.fail_after(5):  # the worker notices the cancel
                while not await worker.call("was_cancelled", tag):
                    await anyio.sleep(0.02)  # polls the worker's answer, not a duration
            entry["cancelled"] = True
            if subject == job.get("stream_from"):
                async with worker.stream("count", 10_000) as items:
                    got = [item async for item in items]
                entry["stream_ok"] = got == list(range(10_000))
            report[subject] = entry
        return report

    async def call_sleepy(subject: str) -> dict[str, Any]:
        worker = await registry.wait_for(subject)
        started = time.monotonic()
        try:
            await worker.call("sleepy", "until-killed", timeout=None)
        except astral.ConnectionClosed as exc:
            return {"error": type(exc).__name__, "elapsed": time.monotonic() - started}
        return {"error": None, "elapsed": time.monotonic() - started}

    return {
        "whereami": whereami,
        "subjects": subjects,
        "exercise": exercise,
        "call_sleepy": call_sleepy,
    }


def _verifier() -> astral.JWTVerifier:
    return astral.JWTVerifier(SECRET, algorithms=["HS256"])


async def _serve(url: str, namespace: str) -> None:
    async with astral.redis.RedisRegistry(
        url, namespace=namespace, presence_ttl=PRESENCE_TTL
    ) as registry:
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                functools.partial(
                    astral.serve,
                    verifier=_verifier(),
                    capabilities=capabilities(registry),
                    registry=registry,
                )
            )
            print(f"READY {port}", flush=True)
            # Until the test closes our stdin (or kills us).
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            tg.cancel_scope.cancel()


class _ClusterApp:
    """astral.asgi.App with a RedisRegistry that lives as long as the lifespan."""

    def __init__(self) -> None:
        self._app: astral.asgi.App | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            registry = astral.redis.RedisRegistry(
                os.environ["ASTRAL_REDIS"],
                namespace=os.environ["ASTRAL_NAMESPACE"],
                presence_ttl=PRESENCE_TTL,
            )
            async with registry:
                self._app = astral.asgi.App(
                    verifier=_verifier(), capabilities=capabilities(registry), registry=registry
                )
                await self._app(scope, receive, send)  # startup ... shutdown
            return
        assert self._app is not None
        await self._app(scope, receive, send)


async def _call_sleepy(worker: Any, tag: str) -> None:
    await worker.call("sleepy", tag, timeout=None)


app = _ClusterApp()


if __name__ == "__main__":
    anyio.run(_serve, sys.argv[1], sys.argv[2], backend=sys.argv[3])
