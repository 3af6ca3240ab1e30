"""The seam between a peer and whatever carries its messages.

A :class:`Transport` moves whole text messages. AnyIO's object streams
(``anyio.streams.stapled.StapledObjectStream`` over memory object streams)
satisfy it as they are; so does astral's WebSocket connection, and the
adapters for trio-websocket and ASGI.

End of input is signalled by :meth:`Transport.receive` raising one of
:data:`CLOSED_ERRORS`.

:meth:`Transport.aclose` takes the WebSocket close code that says why the
connection ends (1008 when a remote is cut off, say). A transport whose
``aclose()`` takes no arguments (AnyIO's object streams) still works: the
code is dropped for it, in one place, :func:`closer`.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio

from ._exceptions import ConnectionClosed

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["CLOSED_ERRORS", "AnyTransport", "Transport", "closer"]


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

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the transport. Idempotent: the first call's code is the one sent.

        Args:
            code: The WebSocket close code saying why (1000 normal, 1001 going
                away, 1008 policy violation, 1009 too big, 1011 internal error).
            reason: A short reason to go with it.
        """


@runtime_checkable
class _PlainTransport(Protocol):
    """A transport whose ``aclose()`` takes no code: AnyIO's object streams."""

    async def send(self, item: str, /) -> None: ...

    async def receive(self) -> str: ...

    async def aclose(self) -> None: ...


#: What a :class:`~astral.Peer` runs over: a :class:`Transport`, or anything
#: with the same ``send``/``receive`` and a plain ``aclose()``.
AnyTransport = Transport | _PlainTransport


def closer(transport: AnyTransport) -> Callable[[int, str], Awaitable[None]]:
    """Return ``close(code, reason)`` for ``transport``, whatever its ``aclose`` takes.

    A transport whose ``aclose`` accepts a code and a reason gets them; one
    whose ``aclose()`` takes nothing (an AnyIO object stream) is closed
    without, since it has no close frame to put them in.
    """
    aclose: Any = transport.aclose
    try:
        inspect.signature(aclose).bind(1000, "")
    except (TypeError, ValueError):  # takes no code, or its signature cannot be read

        async def close(code: int, reason: str) -> None:
            await aclose()

        return close
    return aclose  # type: ignore[no-any-return]


#: Exceptions from a transport that mean "this connection is over".
CLOSED_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionClosed,
    anyio.EndOfStream,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)
