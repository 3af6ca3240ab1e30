"""astral's WebSocket layer: text messages over RFC 6455, on asyncio and trio.

It knows nothing of RPC or tokens; it moves whole text messages, and the peer
and the authentication plug in above it (``process_request`` is where a token
gets checked, :attr:`HandshakeRequest.state` where its claims are left for the
handler).

Layout, all private:

* ``_ws_connection``: :class:`WebSocketConnection` (the AnyIO driver around
  ``wsproto.connection.Connection``) and :class:`HandshakeRequest`;
* ``_ws_client``: :func:`open_websocket` and the client half of the upgrade;
* ``_ws_server``: :func:`serve_websocket`, :class:`Rejection` and the server
  half of the upgrade.

The HTTP/1.1 upgrade is done with h11 directly rather than through wsproto's
``H11Handshake``, so that the request head can be bounded by
``max_header_size`` (h11's ``max_incomplete_event_size``): the default, 128 KiB,
lets a 100 KB token in the query string or an ``Authorization`` header reach
``process_request``. permessage-deflate is never offered nor accepted.

Import rule: only these modules import wsproto and h11.
"""

from __future__ import annotations

from ._ws_client import open_websocket
from ._ws_connection import HandshakeRequest, WebSocketConnection
from ._ws_server import Rejection, serve_websocket

__all__ = [
    "HandshakeRequest",
    "Rejection",
    "WebSocketConnection",
    "open_websocket",
    "serve_websocket",
]
