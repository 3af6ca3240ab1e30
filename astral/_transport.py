"""The seam between a peer and whatever carries its messages.

A :class:`Transport` moves whole text messages. AnyIO's object streams
(``anyio.streams.stapled.StapledObjectStream`` over memory object streams)
satisfy it as they are; so does astral's WebSocket connection, and the
adapters for trio-websocket and ASGI.

End of input is signalled by :meth:`Transport.receive` raising one of
:data:`CLOSED_ERRORS`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import anyio

from ._exceptions import ConnectionClosed

__all__ = ["CLOSED_ERRORS", "Transport"]


@runtime_checkable
class Transport(Protocol):
    """Anything that sends and receives whole text messages.

    Implementations must allow :meth:`send` to be called from several tasks at
    once (messages are never interleaved) while one task calls :meth:`receive`.
    """

    async def send(self, item: str, /) -> None:
        """Send one text message.

        Raises:
            ConnectionClosed: (or an AnyIO closed/broken-resource error) when
                the transport can no longer send.
        """

    async def receive(self) -> str:
        """Return the next text message.

        Raises:
            ConnectionClosed: (or ``anyio.EndOfStream`` and AnyIO's
                closed/broken-resource errors) when no more messages will come.
        """
        ...

    async def aclose(self) -> None:
        """Close the transport. Idempotent."""


#: Exceptions from a transport that mean "this connection is over".
CLOSED_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionClosed,
    anyio.EndOfStream,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)
