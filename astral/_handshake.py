"""What astral peers tell each other in the HTTP upgrade, beside the WebSocket itself.

One place for astral's own upgrade headers, so that new ones (features,
versions) are added here and nowhere else. Today there are two:

* ``Astral-Max-Message-Size``: the largest message, in bytes, the side that
  sends it accepts. The worker sends it in its upgrade request, the principal
  in its 101 response. Each side then refuses to send the other a frame it
  would have to close the connection over (1009): that call fails alone.
* ``Astral-Features``: the protocol extensions the side that sends it
  understands, as a comma-separated list of tokens
  (``cancel, credit, deadline, input-stream``). What both sides name is what the
  connection uses (:attr:`astral.Peer.features`); tokens a side does not
  know are ignored, so new extensions are added by new tokens.

The original TypeScript peer neither sends nor reads them; a side that does
not hear them assumes :data:`DEFAULT_MAX_MESSAGE_SIZE` and no features. The
two extensions older than the header (``cancel``, ``credit``) are still used
then: the original ignores their frames and fields, and astral peers from
before the header understand them. Newer extensions are used only when both
sides named them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FEATURES",
    "FEATURES_HEADER",
    "MAX_MESSAGE_SIZE_HEADER",
    "RemoteLimits",
    "advertise",
    "agreed",
    "parse_features",
]

logger = logging.getLogger("astral.websocket")

MAX_MESSAGE_SIZE_HEADER = "Astral-Max-Message-Size"
#: astral's default ``max_message_size``, assumed of a remote that says nothing.
DEFAULT_MAX_MESSAGE_SIZE = 2**20
_MAX_DIGITS = 18  # anything longer is not a size anyone means

FEATURES_HEADER = "Astral-Features"
#: The protocol extensions this astral implements, in the order it names them.
FEATURES: tuple[str, ...] = ("cancel", "credit", "deadline", "input-stream")
_KNOWN = frozenset(FEATURES)
_NONE: frozenset[str] = frozenset()
_AGREED: dict[frozenset[str], frozenset[str]] = {_NONE: _NONE, _KNOWN: _KNOWN}
# A remote's list is read only this far: a header is not a place for a novel.
_MAX_FEATURES_HEADER = 1024
_TOKEN = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")


def advertise(max_message_size: int) -> list[tuple[str, str]]:
    """The headers that tell the remote our limits and features."""
    return [
        (MAX_MESSAGE_SIZE_HEADER, str(max_message_size)),
        (FEATURES_HEADER, ", ".join(FEATURES)),
    ]


def parse_features(headers: Iterable[tuple[str, str]]) -> frozenset[str] | None:
    """The feature tokens the remote named in its upgrade headers.

    Repeated headers are read as one list (as HTTP folds them); tokens are
    compared in lower case, and anything that is not a token is skipped.

    Returns:
        The tokens, or ``None`` if the remote sent no ``Astral-Features``
        header at all (the original, or an astral from before the header).
    """
    wanted = FEATURES_HEADER.lower()
    values = [value for name, value in headers if name.lower() == wanted]
    if not values:
        return None
    text = ",".join(values)[:_MAX_FEATURES_HEADER]
    tokens = (token.strip().lower() for token in text.split(","))
    return frozenset(token for token in tokens if _TOKEN.fullmatch(token))


def agreed(remote: Iterable[str] | None) -> frozenset[str]:
    """What a connection uses: the features both sides named.

    Args:
        remote: The remote's tokens, ``None`` when it sent no header.
    """
    if remote is None:
        return _NONE
    features = _KNOWN.intersection(remote)
    # One shared set per combination (subsets of FEATURES, so few), not one
    # per connection: each connection keeps its set for its whole life.
    return _AGREED.setdefault(features, features)


@dataclass(frozen=True)
class RemoteLimits:
    """What the remote told us in the upgrade, or the defaults."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: The remote's feature tokens; ``None`` when it sent no header.
    features: frozenset[str] | None = None

    def peer_options(self) -> dict[str, Any]:
        """What :class:`astral.Peer` takes of these (its keyword arguments)."""
        return {"remote_max_message_size": self.max_message_size, "features": self.features}

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, str]]) -> RemoteLimits:
        """Read the remote's upgrade headers (names in any case).

        A header that is missing, repeated or not a positive decimal number
        counts as absent: the default applies.
        """
        headers = list(headers)
        return cls(_max_message_size(headers), parse_features(headers))


def _max_message_size(headers: list[tuple[str, str]]) -> int:
    wanted = MAX_MESSAGE_SIZE_HEADER.lower()
    values = [value.strip() for name, value in headers if name.lower() == wanted]
    if not values:
        return DEFAULT_MAX_MESSAGE_SIZE
    value = values[0]
    if len(values) > 1 or not value.isascii() or not value.isdigit() or len(value) > _MAX_DIGITS:
        logger.debug("ignored an invalid %s header", MAX_MESSAGE_SIZE_HEADER)
        return DEFAULT_MAX_MESSAGE_SIZE
    size = int(value)
    return size if size > 0 else DEFAULT_MAX_MESSAGE_SIZE
