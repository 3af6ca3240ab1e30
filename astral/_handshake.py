"""What astral peers tell each other in the HTTP upgrade, beside the WebSocket itself.

One place for astral's own upgrade headers, so that new ones (features,
versions) are added here and nowhere else. Today there is one:

* ``Astral-Max-Message-Size``: the largest message, in bytes, the side that
  sends it accepts. The worker sends it in its upgrade request, the principal
  in its 101 response. Each side then refuses to send the other a frame it
  would have to close the connection over (1009): that call fails alone.

The original TypeScript peer neither sends nor reads it; a side that does
not hear it assumes :data:`DEFAULT_MAX_MESSAGE_SIZE`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "MAX_MESSAGE_SIZE_HEADER", "RemoteLimits", "advertise"]

logger = logging.getLogger("astral.websocket")

MAX_MESSAGE_SIZE_HEADER = "Astral-Max-Message-Size"
#: astral's default ``max_message_size``, assumed of a remote that says nothing.
DEFAULT_MAX_MESSAGE_SIZE = 2**20
_MAX_DIGITS = 18  # anything longer is not a size anyone means


def advertise(max_message_size: int) -> list[tuple[str, str]]:
    """The headers that tell the remote our limits."""
    return [(MAX_MESSAGE_SIZE_HEADER, str(max_message_size))]


@dataclass(frozen=True)
class RemoteLimits:
    """What the remote told us in the upgrade, or the defaults."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, str]]) -> RemoteLimits:
        """Read the remote's upgrade headers (names in any case).

        A header that is missing, repeated or not a positive decimal number
        counts as absent: the default applies.
        """
        wanted = MAX_MESSAGE_SIZE_HEADER.lower()
        values = [value.strip() for name, value in headers if name.lower() == wanted]
        if not values:
            return cls()
        value = values[0]
        if (
            len(values) > 1
            or not value.isascii()
            or not value.isdigit()
            or len(value) > _MAX_DIGITS
        ):
            logger.debug("ignored an invalid %s header", MAX_MESSAGE_SIZE_HEADER)
            return cls()
        size = int(value)
        return cls(size) if size > 0 else cls()
