"""Peer.aclose(code, reason): validated, and the remote's ConnectionClosed carries both."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import astral
from astral.testing import connected_pair
from tests.helpers import running_principal, token


@pytest.mark.parametrize("code", [0, 999, 1002, 1005, 1006, 1011, 1015, 2999, 5000, True])
async def test_aclose_refuses_a_code_an_application_may_not_send(code: int) -> None:
    async with connected_pair() as (a, _):
        with pytest.raises(ValueError, match="close code"):
            await a.aclose(code)
        assert not a.closed  # nothing happened


async def test_aclose_refuses_a_reason_longer_than_a_control_frame() -> None:
    async with connected_pair() as (a, _):
        with pytest.raises(ValueError, match="123 bytes"):
            await a.aclose(4000, "é" * 62)
        await a.aclose(4000, "é" * 61)  # 122 bytes fit
        assert a.closed


async def test_aclose_over_memory_streams_closes_without_a_code() -> None:
    async with connected_pair() as (a, b):
        await a.aclose(4000, "bye")
        assert (await a.wait_closed()).code == 4000
        assert (await b.wait_closed()).code is None  # object streams carry no code


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4000, 4999])
async def test_the_remote_sees_the_code_and_reason_over_a_websocket(code: int) -> None:
    running = anyio.Event()

    async def hold(_: Any) -> None:
        running.set()
        await anyio.sleep_forever()

    async with running_principal() as principal:
        async with astral.connect(principal.url, token=token(), capabilities={"hold": hold}) as w:
            server_side = await principal.registry.wait_for("worker-1")
            failures: list[astral.ConnectionClosed] = []

            async def pending() -> None:
                with pytest.raises(astral.ConnectionClosed) as info:
                    await server_side.call("hold")
                failures.append(info.value)

            async with anyio.create_task_group() as tg:
                tg.start_soon(pending)
                await running.wait()
                await w.aclose(code, "moving on")
            assert (failures[0].code, failures[0].reason) == (code, "moving on")
            closed = await server_side.wait_closed()
            assert (closed.code, closed.reason) == (code, "moving on")
            local = await w.wait_closed()
            assert (local.code, local.reason) == (code, "moving on")
