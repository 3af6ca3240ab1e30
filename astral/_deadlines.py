"""Call deadlines without a cancel scope per call.

A cancel scope with a deadline costs 10-15 µs to enter and leave, as much as
the rest of a call's bookkeeping. Instead, each peer keeps its calls'
deadlines here and one alarm (:mod:`astral._alarm`, no task of its own)
rings at the earliest.

Calls made with the same timeout expire in the order they were made, so each
timeout value keeps an insertion-ordered ``dict`` (oldest first): adding and
removing a call are O(1), and the earliest deadline is the first entry of
one of a handful of groups.

Deadlines that reach the callee (the ``deadline`` feature) are absolute
times, all different: :class:`Until` keeps them in a heap.

This module does no I/O.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Generic, TypeVar

__all__ = ["Deadlines", "Until"]

K = TypeVar("K")


class Deadlines(Generic[K]):
    """Deadlines of waiting calls, grouped by timeout so each group is in order."""

    def __init__(self) -> None:
        self._groups: dict[float, dict[K, float]] = {}
        self._timeout_of: dict[K, float] = {}

    def __len__(self) -> int:
        return len(self._timeout_of)

    def add(self, key: K, timeout: float, now: float) -> float:
        """Start the clock on ``key``; return its deadline."""
        deadline = now + timeout
        group = self._groups.get(timeout)
        if group is None:
            group = self._groups[timeout] = {}
        group[key] = deadline
        self._timeout_of[key] = timeout
        return deadline

    def discard(self, key: K) -> None:
        """Stop the clock on ``key`` (answered, abandoned...); no-op if not there."""
        timeout = self._timeout_of.pop(key, None)
        if timeout is not None:
            group = self._groups[timeout]
            del group[key]
            if not group:
                del self._groups[timeout]

    def earliest(self) -> float:
        """The earliest deadline, or ``math.inf`` when nothing waits."""
        return min(
            (next(iter(group.values())) for group in self._groups.values()), default=math.inf
        )

    def expired(self, now: float) -> list[K]:
        """Remove and return every key whose deadline is at or before ``now``."""
        out: list[K] = []
        for timeout in list(self._groups):
            group = self._groups[timeout]
            for key, deadline in list(group.items()):
                if deadline > now:
                    break
                out.append(key)
                del group[key]
                del self._timeout_of[key]
            if not group:
                del self._groups[timeout]
        return out


class Until(Generic[K]):
    """Absolute deadlines, earliest first.

    Removal is lazy: a discarded key's heap entry stays until it comes to
    the top, or until discarded entries outnumber live ones and the heap is
    rebuilt, so memory stays proportional to the keys that wait.
    """

    def __init__(self) -> None:
        self._at: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._at)

    def add(self, key: K, deadline: float) -> None:
        """Fail ``key`` at ``deadline``."""
        self._at[key] = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), key))
        if len(self._heap) > 2 * len(self._at) + 64:
            self._heap = [(at, order, k) for at, order, k in self._heap if self._at.get(k) == at]
            heapq.heapify(self._heap)

    def discard(self, key: K) -> None:
        """Forget ``key``; no-op if not there."""
        self._at.pop(key, None)

    def earliest(self) -> float:
        """The earliest deadline, or ``math.inf`` when nothing waits."""
        heap, at = self._heap, self._at
        while heap and at.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def expired(self, now: float) -> list[K]:
        """Remove and return every key whose deadline is at or before ``now``."""
        out: list[K] = []
        heap, at = self._heap, self._at
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            if at.get(key) == deadline:
                del at[key]
                out.append(key)
        return out
