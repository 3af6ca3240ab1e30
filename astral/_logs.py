"""Log lines a remote peer can provoke, rate-limited so it cannot flood the logs.

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
from typing import Any, Final

__all__ = ["BURST", "REFILL_SECONDS", "RateLimitedLogger", "protocol_warnings"]

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
