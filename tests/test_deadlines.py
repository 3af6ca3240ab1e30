"""The deadline table behind call timeouts: plain sync tests, no event loop."""

from __future__ import annotations

import math

from astral._deadlines import Deadlines, Until


def test_empty_table_has_no_deadline() -> None:
    table: Deadlines[str] = Deadlines()
    assert table.earliest() == math.inf
    assert table.expired(1e9) == []
    assert len(table) == 0


def test_calls_expire_in_deadline_order_across_timeouts() -> None:
    table: Deadlines[str] = Deadlines()
    table.add("a", 30.0, now=0.0)  # 30
    table.add("b", 5.0, now=1.0)  # 6
    table.add("c", 30.0, now=2.0)  # 32
    table.add("d", 5.0, now=3.0)  # 8
    assert table.earliest() == 6.0
    assert table.expired(5.9) == []
    assert sorted(table.expired(8.0)) == ["b", "d"]
    assert table.earliest() == 30.0
    assert table.expired(31.0) == ["a"]
    assert table.expired(100.0) == ["c"]
    assert len(table) == 0
    assert table.earliest() == math.inf


def test_discarded_calls_never_expire() -> None:
    table: Deadlines[str] = Deadlines()
    table.add("answered", 1.0, now=0.0)
    table.add("waiting", 1.0, now=0.5)
    table.discard("answered")
    table.discard("answered")  # twice is fine
    table.discard("never added")
    assert table.earliest() == 1.5
    assert table.expired(10.0) == ["waiting"]


def test_until_expires_in_deadline_order_and_forgets_discarded_keys() -> None:
    until: Until[str] = Until()
    assert until.earliest() == math.inf
    until.add("c", 3.0)
    until.add("a", 1.0)
    until.add("b", 2.0)
    until.discard("a")
    until.discard("nothing")
    assert len(until) == 2
    assert until.earliest() == 2.0
    assert until.expired(2.5) == ["b"]
    assert until.expired(2.5) == []
    assert until.expired(3.0) == ["c"]
    assert len(until) == 0


def test_until_keeps_memory_proportional_to_waiting_keys() -> None:
    until: Until[int] = Until()
    for key in range(10_000):
        until.add(key, 100.0 + key)
        until.discard(key)
    assert len(until) == 0
    assert len(until._heap) <= 64 + 2
    until.add(-1, 5.0)
    assert until.earliest() == 5.0
