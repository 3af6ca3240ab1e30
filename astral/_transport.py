"""The seam between a peer and whatever carries its messages.

A :class:`Transport` moves whole text messages. AnyIO's object streams
(``anyio.streams.stapled.StapledObjectStream`` over memory object streams)
satisfy it as they are; so does astral's WebSocket connection, and the
adapters for trio-websocket and ASGI.

End of input is signalled by :meth:`Transport.receive` raising one of
:data:`CLOSED_ERRORS`.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

import anyio

from ._exceptions import ConnectionClosed

if TYPE_CHECKING:
    from anyio.abc import ObjectStream

__all__ = ["CLOSED_ERRORS", "AnyTransport", "Transport", "close_transport"]


@runtime_checkable
class Transport(Protocol):
    """Anything that sends and receives whole text messages.

    Implementations must allow :meth:`send` to be called from several tasks at
    once (messages are never interleaved) while one task calls :meth:`receive`.

    A transport may also have ``try_send(item) -> bool``: queue one message
    without waiting and return True, or queue nothing and return False if
    that would mean waiting. A peer sends its control frames (credit,
    cancels, refusals) through it when there is one, rather than through a
    control task; astral's WebSocket connection has it.
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
        """Close the transport, telling the remote ``code`` and ``reason``. Idempotent.

        Transports that carry no close code (AnyIO's object streams) may take
        no arguments: astral then calls ``aclose()`` alone.
        """


#: What a peer runs over: a :class:`Transport`, or an AnyIO object stream of
#: text (whose ``aclose`` takes no close code).
AnyTransport: TypeAlias = "Transport | ObjectStream[str]"

#: Exceptions from a transport that mean "this connection is over".
CLOSED_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionClosed,
    anyio.EndOfStream,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)


def _takes_code(aclose: object) -> bool:
    try:
        parameters = inspect.signature(aclose).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters
    )


async def close_transport(transport: AnyTransport, code: int = 1000, reason: str = "") -> None:
    """Close ``transport`` with ``code`` and ``reason`` if its ``aclose`` takes them.

    AnyIO's object streams (and older transports) have ``aclose()`` with no
    arguments: they are closed without a code.
    """
    aclose = transport.aclose
    if _takes_code(aclose):
        await aclose(code, reason)  # type: ignore[call-arg]
    else:
        await aclose()
