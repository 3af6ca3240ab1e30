"""``astral.trio_websocket``: run astral over a trio-websocket connection.

An optional integration for trio programs that already use `trio-websocket
<https://trio-websocket.readthedocs.io/>`_ (``pip install
astral-rpc[trio-websocket]``); ``import astral`` never imports it. It works
only under trio, as trio-websocket does.

Either side of the connection can be trio-websocket. A worker::

    from trio_websocket import open_websocket_url
    from astral.trio_websocket import open_peer

    headers = [(b"authorization", f"Bearer {token}".encode())]
    async with (
        open_websocket_url(url, extra_headers=headers) as ws,
        open_peer(ws, capabilities=caps) as peer,
    ):
        print(await peer.call("transcription", {"audio": "..."}))

A principal checks the token itself in its handler, before accepting (see
``astral.serve`` for one that does all of this)::

    async def handler(request):
        authorization = dict(request.headers).get(b"authorization", b"").decode()
        token = authorization.removeprefix("Bearer ") or None
        try:
            claims = await astral.verify_token(verifier, token)
        except astral.AuthenticationError:
            await request.reject(401)
        else:
            ws = await request.accept()
            async with open_peer(ws, capabilities=caps, claims=claims) as peer:
                await peer.wait_closed()

trio-websocket serializes concurrent ``send_message`` calls itself (each frame
is encoded synchronously, then written under a FIFO lock), as
:class:`astral.Transport` requires.

Known issue (trio-websocket 0.12.2): a *client* connection never closes its
socket when the server closes the WebSocket first, or refuses the upgrade; the
socket is left to the garbage collector, which emits a ``ResourceWarning``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket

from . import _defaults
from ._exceptions import ConnectionClosed
from ._peer import Peer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["TrioWebSocketTransport", "open_peer"]


class TrioWebSocketTransport:
    """A :class:`trio_websocket.WebSocketConnection` as an :class:`astral.Transport`.

    Text messages pass through; binary ones are decoded as UTF-8, as the
    original TypeScript astral does. trio-websocket's
    :class:`~trio_websocket.ConnectionClosed` is translated into
    :class:`astral.ConnectionClosed` (its original kept as ``__cause__``),
    carrying the close code and reason.

    Args:
        ws: An open connection (from ``open_websocket_url`` or
            ``WebSocketRequest.accept``). The transport does not own it beyond
            :meth:`aclose`: the context manager that opened it still closes it.
        close_timeout: Longest wait, in seconds, for the closing handshake in
            :meth:`aclose`.
    """

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        *,
        close_timeout: float = _defaults.CLOSE_TIMEOUT,
    ) -> None:
        self._ws = ws
        self._close_timeout = close_timeout

    @property
    def websocket(self) -> trio_websocket.WebSocketConnection:
        """The wrapped trio-websocket connection."""
        return self._ws

    async def send(self, item: str, /) -> None:
        """Send one text message.

        Raises:
            ConnectionClosed: The connection is closed or closing.
        """
        try:
            await self._ws.send_message(item)
        except trio_websocket.ConnectionClosed as exc:
            raise _translate(exc) from exc

    async def receive(self) -> str:
        """Return the next message; binary ones are decoded as UTF-8.

        Raises:
            ConnectionClosed: The connection has ended (with the close code
                when there was one), or a binary message was not UTF-8 (the
                connection is then closed with 1007).
        """
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _translate(exc) from exc
        if isinstance(message, str):
            return message
        try:
            return bytes(message).decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = "invalid UTF-8 in binary message"
            with trio.move_on_after(self._close_timeout):
                await self._ws.aclose(1007, reason)
            raise ConnectionClosed(reason, code=1007) from exc

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection with ``code`` and ``reason``, waiting at most ``close_timeout``.

        Idempotent; never raises.
        """
        with trio.move_on_after(self._close_timeout):
            await self._ws.aclose(code, reason or None)


def _translate(exc: trio_websocket.ConnectionClosed) -> ConnectionClosed:
    close = exc.reason
    if close is None:
        return ConnectionClosed("connection closed")
    return ConnectionClosed(close.reason or close.name, code=close.code)


@asynccontextmanager
async def open_peer(
    ws: trio_websocket.WebSocketConnection,
    *,
    close_timeout: float = _defaults.CLOSE_TIMEOUT,
    **peer_options: Any,
) -> AsyncIterator[Peer]:
    """Run an astral peer over an open trio-websocket connection.

    ::

        async with open_websocket_url(url, extra_headers=headers) as ws:
            async with open_peer(ws, capabilities=caps) as peer:
                await peer.call("echo", "hi")

    Leaving the block closes the WebSocket (1000) and ends the peer's tasks;
    pending calls fail with :class:`astral.ConnectionClosed`.

    Args:
        ws: An open connection.
        close_timeout: Longest wait, in seconds, for the closing handshake.
        **peer_options: Passed on to :class:`astral.Peer` (``capabilities``,
            ``claims``, ``timeout``, ``max_inbound_calls``,
            ``max_buffered_items``, ``middleware``, ``hide_internal_errors``,
            ``json_default``, ``features``). The upgrade is yours here, so
            no features are negotiated unless you pass ``features``: the
            tokens the other side sent in its ``Astral-Features`` header,
            when your side sent its own (see ``docs/protocol.md``).

    Yields:
        The running :class:`astral.Peer`.

    Raises:
        TypeError: A capability is not async, or an unknown option.
    """
    transport = TrioWebSocketTransport(ws, close_timeout=close_timeout)
    async with Peer(transport, **peer_options) as peer:
        yield peer
