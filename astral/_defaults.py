"""The defaults of astral's connection and server limits, in one place.

``connect``, ``serve``, :class:`astral.asgi.App`, the trio-websocket adapter
and the WebSocket layer under them all take these options; each takes its
default from here, so they cannot drift apart. ``docs/limits.md`` states
them, and ``tests/test_defaults.py`` checks that every public signature and
that page agree.
"""

from __future__ import annotations

from typing import Final

from ._handshake import DEFAULT_MAX_MESSAGE_SIZE

__all__ = [
    "CLOSE_TIMEOUT",
    "GRACE",
    "MAX_CONNECTIONS",
    "MAX_HANDSHAKES",
    "MAX_HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "OPEN_TIMEOUT",
    "PING_INTERVAL",
    "PING_TIMEOUT",
]

#: Seconds for TCP, TLS and the upgrade (client); TLS and the upgrade request (server).
OPEN_TIMEOUT: Final = 10.0
#: Seconds between keepalive pings.
PING_INTERVAL: Final = 20.0
#: Seconds to wait for a pong before closing with 1011.
PING_TIMEOUT: Final = 20.0
#: Seconds to wait for the closing handshake.
CLOSE_TIMEOUT: Final = 10.0
#: Bytes of one incoming message, fragments included.
MAX_MESSAGE_SIZE: Final = DEFAULT_MAX_MESSAGE_SIZE
#: Bytes of an upgrade request's head (the server answers 431 beyond).
MAX_HEADER_SIZE: Final = 128 * 1024
#: Connections a server holds at once, handshakes included.
MAX_CONNECTIONS: Final = 1024
#: Connections a server holds in TLS or the upgrade request, not yet authenticated.
MAX_HANDSHAKES: Final = 128
#: Seconds a stopping server gives the calls in flight before it closes with 1001.
GRACE: Final = 5.0
