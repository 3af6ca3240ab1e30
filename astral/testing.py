"""Helpers for testing code that uses astral, without a network.

Like ``trio.testing.memory_stream_pair``: two peers joined in memory, with
the same semantics as over a WebSocket.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.stapled import StapledObjectStream

from ._handshake import FEATURES
from ._peer import Peer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._dispatch import Capabilities

__all__ = ["connected_pair", "memory_transport_pair"]


def memory_transport_pair(
    buffer: float = 64,
) -> tuple[StapledObjectStream[str], StapledObjectStream[str]]:
    """Two in-memory transports joined to each other.

    What one sends, the other receives. Closing one ends the other's input.

    Args:
        buffer: Messages buffered in each direction before ``send`` waits.

    Returns:
        The two transports.
    """
    a_send, b_receive = anyio.create_memory_object_stream[str](buffer)
    b_send, a_receive = anyio.create_memory_object_stream[str](buffer)
    return StapledObjectStream(a_send, a_receive), StapledObjectStream(b_send, b_receive)


@asynccontextmanager
async def connected_pair(
    a_capabilities: Capabilities | None = None,
    b_capabilities: Capabilities | None = None,
    **options: Any,
) -> AsyncIterator[tuple[Peer, Peer]]:
    """Two running peers joined in memory.

    ::

        async with connected_pair({"echo": echo}, {}) as (a, b):
            assert await b.call("echo", 1) == 1

    Args:
        a_capabilities: What peer ``a`` serves.
        b_capabilities: What peer ``b`` serves.
        **options: Passed to both :class:`astral.Peer` constructors
            (``timeout``, ``max_inbound_calls``, ``max_buffered_items``, ``json_default``,
            ``claims``). ``features`` defaults to every extension astral
            implements, as two astral peers would agree over a WebSocket;
            pass ``features=None`` for the original protocol.

    Yields:
        The peers ``(a, b)``.
    """
    options.setdefault("features", FEATURES)
    a_transport, b_transport = memory_transport_pair()
    async with (
        a_transport,  # closed even if a Peer refuses its capabilities
        b_transport,
        Peer(a_transport, capabilities=a_capabilities, **options) as a,
        Peer(b_transport, capabilities=b_capabilities, **options) as b,
    ):
        yield a, b
