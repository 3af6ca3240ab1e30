"""Every exception astral raises.

One root, :class:`AstralError`, so ``except astral.AstralError`` catches
anything astral raises on purpose. Foreign errors (wsproto, joserfc, TLS,
sockets) are translated at the boundary with ``raise ... from``, so their
originals stay visible as ``__cause__``::

    AstralError
    ├── ProtocolError            a frame or message broke the wire protocol
    ├── AuthenticationError      a token was missing, invalid or refused
    ├── ConnectError             a connection could not be opened
    │   ├── ConnectTimeout       ... in time (also a TimeoutError)
    │   ├── TLSError             ... because the TLS handshake failed
    │   └── HandshakeError       ... because the WebSocket upgrade was refused
    │       └── Unauthorized     ... with HTTP 401 (also an AuthenticationError)
    ├── ConnectionClosed         the connection is gone; pending calls fail with it
    │   └── ClusterError         ... because Redis, behind a cluster registry, is
    │                            unreachable (also a ConnectError)
    └── CallError                one call failed; the connection lives on
        ├── RemoteError          the remote capability reported an error
        ├── CallTimeout          no answer in time (also a TimeoutError)
        └── StreamOverrun        the consumer fell behind a streaming call

Trio's vocabulary applies to :class:`ConnectionClosed`: ``code`` and ``reason``
tell whether we closed it (1000/1001) or the peer or network broke it.
"""

from __future__ import annotations

__all__ = [
    "AstralError",
    "AuthenticationError",
    "CallError",
    "CallTimeout",
    "ClusterError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "HandshakeError",
    "ProtocolError",
    "RemoteError",
    "StreamOverrun",
    "TLSError",
    "Unauthorized",
]


class AstralError(Exception):
    """Root of every exception astral raises on purpose."""


class ProtocolError(AstralError, ValueError):
    """A frame or message broke the astral wire protocol.

    Raised by :func:`astral.decode` on anything malformed and by
    :func:`astral.encode` on values JSON cannot carry faithfully.

    Attributes:
        frame_id: The ``id`` of the offending frame when it could be read,
            so a peer can fail exactly that call instead of leaving it to its
            timeout; ``None`` otherwise.
        frame_type: The frame's ``type`` when it was a string, else ``None``.
    """

    def __init__(
        self, message: str, *, frame_id: str | None = None, frame_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.frame_id = frame_id
        self.frame_type = frame_type


class AuthenticationError(AstralError):
    """A token was missing, invalid, expired or refused.

    The message never contains the token itself.
    """


class ConnectError(AstralError):
    """A connection could not be opened (refused, unreachable, bad URL...)."""


class ConnectTimeout(ConnectError, TimeoutError):
    """Opening the connection (TCP, TLS and upgrade) took too long."""


class TLSError(ConnectError):
    """The TLS handshake failed (untrusted certificate, wrong host name...)."""


class HandshakeError(ConnectError):
    """The server refused or botched the WebSocket upgrade.

    Attributes:
        status: The HTTP status the server answered with, or ``None`` when
            it did not send a usable HTTP response.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unauthorized(HandshakeError, AuthenticationError):
    """The server refused the token: it answered the upgrade with HTTP 401."""

    def __init__(self, message: str = "server rejected the token (HTTP 401)") -> None:
        super().__init__(message, status=401)


class ConnectionClosed(AstralError):
    """The connection is closed; nothing more can be sent or received on it.

    Every pending call and open stream of a peer fails with this exception the
    moment its connection ends.

    Attributes:
        code: The WebSocket close code when there was one (1000 normal,
            1001 going away, 1006 abnormal, 1009 too big...), else ``None``.
        reason: The close reason, or a short description of what happened.
    """

    def __init__(self, reason: str = "connection closed", *, code: int | None = None) -> None:
        # int(): a foreign enum (wsproto's CloseReason) must not leak out as the code.
        self.code = None if code is None else int(code)
        self.reason = reason
        super().__init__(reason if code is None else f"{reason} (code {self.code})")


class ClusterError(ConnectError, ConnectionClosed):
    """The Redis behind an :class:`astral.redis.RedisRegistry` cannot be reached.

    Raised when a registry starts and cannot reach Redis, by a call to a
    worker held by another process while Redis is unreachable (at once, never
    after a timeout), and to every such call in flight when the link to Redis
    is lost. The message names Redis and its address, never its password.
    Workers connected to this process stay callable meanwhile.

    It is a :class:`ConnectionClosed` (the route to the worker is gone, as
    when a local worker leaves) and a :class:`ConnectError` (the route could
    not be opened), so code written against a local registry catches it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)


class CallError(AstralError):
    """One call failed; the connection itself is still usable."""


class RemoteError(CallError):
    """The remote capability failed, or the remote peer refused the call.

    ``str(error)`` and :attr:`message` are the remote's error string, for
    example ``"unknown capability"``. No remote traceback ever crosses the wire.

    Attributes:
        message: The error string the remote peer sent.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CallTimeout(CallError, TimeoutError):
    """No answer arrived in time; the remote was told to stop.

    The message is ``"call <capability> timed out"``, as in the original.
    """


class StreamOverrun(CallError):
    """A streaming call's consumer fell so far behind that its buffer filled.

    That one call fails with this error and the remote is told to stop; other
    calls on the connection are untouched.
    """
