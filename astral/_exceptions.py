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
    ├── Failure                  raised by a capability to fail on purpose, with a code
    └── CallError                one call failed; the connection lives on
        ├── RemoteError          the remote capability reported an error
        ├── CallTimeout          no answer in time (also a TimeoutError)
        ├── StreamOverrun        the consumer fell behind a streaming call
        └── ValidationError      a value did not match its declared type (also a ValueError)

Trio's vocabulary applies to :class:`ConnectionClosed`: ``code`` and ``reason``
tell whether we closed it (1000/1001) or the peer or network broke it.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "AstralError",
    "AuthenticationError",
    "CallError",
    "CallTimeout",
    "ClusterError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "Failure",
    "HandshakeError",
    "ProtocolError",
    "RemoteError",
    "StreamOverrun",
    "TLSError",
    "Unauthorized",
    "ValidationError",
]

#: Longest error code accepted, in characters (:class:`Failure`, the wire).
MAX_CODE_LENGTH: Final = 128


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


class Failure(AstralError):
    """Raised by a capability (or a middleware) to fail a call on purpose.

    The caller's :class:`RemoteError` gets the same message, ``code`` and
    ``data``; they travel as optional fields of the ``result`` frame, so the
    original TypeScript peer still sees only the message::

        async def get_user(user_id):
            if user_id not in users:
                raise astral.Failure("no such user", code="not_found", data={"id": user_id})
            return users[user_id]

    A failure is expected, so the side where it ran logs it at DEBUG only,
    without a traceback; any other exception is logged at ERROR and sent
    with code ``"internal"``.

    Args:
        message: The error string the caller sees.
        code: A short machine-readable code (at most 128 characters).
        data: Any JSON value with details for the caller.

    Raises:
        TypeError: If ``message`` or ``code`` is not a string.
        ValueError: If ``code`` is empty or longer than 128 characters.

    Attributes:
        message: The error string.
        code: The code, or ``None``.
        data: The data, or ``None``.
    """

    def __init__(self, message: str, *, code: str | None = None, data: Any = None) -> None:
        if not isinstance(message, str):
            raise TypeError(f"Failure message must be a string, not {type(message).__name__}")
        if code is not None:
            if not isinstance(code, str):
                raise TypeError(f"Failure code must be a string, not {type(code).__name__}")
            if not 0 < len(code) <= MAX_CODE_LENGTH:
                raise ValueError(f"Failure code must be 1 to {MAX_CODE_LENGTH} characters")
        super().__init__(message)
        self.message = message
        self.code = code
        self.data = data


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

    Args:
        message: The error string the remote peer sent.
        code: The remote's error code, if it sent a valid one.
        data: The remote's error data, if it sent any.

    Attributes:
        message: The error string the remote peer sent.
        code: The error code: what the remote's :class:`Failure` said,
            ``"internal"`` when an astral capability raised anything else,
            ``None`` when the remote sent none (the original never does).
        data: The JSON value of the remote's :class:`Failure` ``data``, or
            ``None``.
    """

    def __init__(self, message: str, *, code: str | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.data = data


class CallTimeout(CallError, TimeoutError):
    """No answer arrived in time; the remote was told to stop.

    The message is ``"call <capability> timed out"``, as in the original.
    """


class StreamOverrun(CallError):
    """A streaming call's consumer fell so far behind that its buffer filled.

    That one call fails with this error and the remote is told to stop; other
    calls on the connection are untouched.
    """


class ValidationError(CallError, ValueError):
    """A value did not match the type declared for it.

    Raised by :meth:`Peer.call <astral.Peer.call>` and :class:`Stream
    <astral.Stream>` when the remote's output does not fit the ``output``
    type of a typed reference (:func:`astral.ref`); a capability whose input
    does not fit its annotated parameter fails the call with the same
    message, which the caller receives as :class:`RemoteError`. The message
    names the path and the problem, for example
    ``"invalid output: Expected `int`, got `str` - at `$.age`"``; it never
    quotes the value.
    """
