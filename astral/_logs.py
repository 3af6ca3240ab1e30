"""Log lines for operators: rate-limited warnings, and each connection's life.

A hostile or broken remote can send malformed frames as fast as the network
carries them. Each such line goes through a :class:`RateLimitedLogger`: a
token bucket per logger (a burst of :data:`BURST` lines, then one line per
:data:`REFILL_SECONDS`). Lines over the limit are counted, not written; the
next line written says how many were suppressed. The standard library has no
rate limit of its own, and a ``logging.Filter`` would still pay for
formatting every dropped record, so the bucket sits before the call.

Logger names and levels are listed in ``docs/logging.md``.

This module does no I/O besides logging.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._peer import Peer

__all__ = [
    "BURST",
    "REFILL_SECONDS",
    "ClosingLog",
    "RateLimitedLogger",
    "log_connection",
    "protocol_warnings",
]

connection_logger = logging.getLogger("astral.connection")

#: Lines a rate-limited logger writes at once before it starts suppressing.
BURST: Final = 10
#: Seconds for one more line to be allowed.
REFILL_SECONDS: Final = 6.0


class RateLimitedLogger:
    """A WARNING logger with a token bucket, for lines a remote can provoke.

    Args:
        logger: Where the lines go.
        burst: Lines allowed at once.
        refill_seconds: Seconds for one more line to be allowed.
    """

    def __init__(
        self, logger: logging.Logger, *, burst: int = BURST, refill_seconds: float = REFILL_SECONDS
    ) -> None:
        self.logger = logger
        self._burst = burst
        self._refill = refill_seconds
        self.reset()

    def reset(self) -> None:
        """Fill the bucket and forget suppressed lines (for tests)."""
        self._tokens = float(self._burst)
        self._last = time.monotonic()
        self.suppressed = 0

    def warning(self, message: str, *args: Any, **kwargs: Any) -> None:
        """Log ``message % args`` at WARNING, unless over the rate limit."""
        if not self.logger.isEnabledFor(logging.WARNING):
            return
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) / self._refill)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            return
        self._tokens -= 1
        if self.suppressed:
            message = f"{message} ({self.suppressed} similar lines suppressed)"
            self.suppressed = 0
        self.logger.warning(message, *args, **kwargs)


#: Protocol violations by a remote peer: malformed frames and fields.
protocol_warnings = RateLimitedLogger(logging.getLogger("astral.protocol"))


class ClosingLog:
    """A connection's log lines: :meth:`opened`, and its end (see :func:`log_connection`)."""

    __slots__ = ("code", "peer", "started", "where", "who")

    def __init__(self, where: str, who: str) -> None:
        self.where = where
        self.who = who
        self.peer: Peer | None = None
        self.started = 0.0
        # The close code we sent ourselves, when we closed it.
        self.code: int | None = None

    def opened(self, line: str, peer: Peer) -> None:
        """Log ``line`` (one ``%s`` for where) at INFO: the connection is up."""
        self.peer = peer
        self.started = time.monotonic()
        connection_logger.info(line + " (%s)", self.where, self.who)


@contextmanager
def log_connection(where: str, subject: object) -> Iterator[ClosingLog]:
    """Log a connection's end at INFO on ``astral.connection``, if it had opened.

    Args:
        where: The remote's address or URL (never with a token in it).
        subject: The remote's token subject (``sub``), if any.
    """
    who = f"subject {subject!r:.80}" if isinstance(subject, str) else "no subject"
    closing = ClosingLog(where, who)
    reason = "closed"
    try:
        yield closing
    except BaseException as exc:
        reason = f"ended by {type(exc).__name__}"
        raise
    finally:
        # A connection that never opened says nothing: refusals are logged
        # where they happen.
        peer = closing.peer
        if peer is not None:
            code = closing.code
            error = peer._close_error
            if error is not None:
                code = error.code if code is None else code
                reason = error.reason
            connection_logger.info(
                "connection %s (%s) closed: code %s, %s, after %.1f s",
                where,
                who,
                code if code is not None else "none",
                reason,
                time.monotonic() - closing.started,
                extra={"astral_close_code": code},
            )
