"""The defaults users read in docs/limits.md are the ones astral uses.

Every entry point that takes a limit or a timeout (``connect``, ``serve``,
``asgi.App``, the trio-websocket adapter, ``run_worker``) is checked against
the tables of docs/limits.md, and the signatures shown in docs/reference.md
against the same values. A default changed in one place only, or a page
left behind, fails here.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import astral
import astral.asgi
import astral.trio_websocket

DOCS = Path(__file__).resolve().parent.parent / "docs"

ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "connect": astral.connect,
    "serve": astral.serve,
    "App": astral.asgi.App,
    "open_peer": astral.trio_websocket.open_peer,
    "TrioWebSocketTransport": astral.trio_websocket.TrioWebSocketTransport,
    "run_worker": astral.run_worker,
}

# What each table row's default reads as, in the units the page writes.
_UNITS = {"s": 1, "KiB": 1024, "MiB": 1024 * 1024}
_ROW = re.compile(r"^\| `(\w+)`(?: \(([^)]*)\))?\s*\|\s*([^|]+?)\s*\|", re.MULTILINE)


def _value(text: str) -> float:
    number, _, unit = text.partition(" ")
    return float(number.replace(",", "")) * _UNITS.get(unit, 1)


def documented_defaults() -> list[tuple[str, str, float]]:
    """``(entry point, option, default)`` for each option docs/limits.md gives a default."""
    found: list[tuple[str, str, float]] = []
    for option, only, default in _ROW.findall((DOCS / "limits.md").read_text()):
        if not re.fullmatch(r"[\d,.]+( (s|KiB|MiB))?", default):
            continue  # "on", "*required*", a tuple: not a number of anything
        names = re.findall(r"`(\w+)`", only) if only else list(ENTRY_POINTS)
        for name in names:
            function = ENTRY_POINTS.get(name)
            if function is not None and option in inspect.signature(function).parameters:
                found.append((name, option, _value(default)))
    return found


DOCUMENTED = documented_defaults()


def test_the_limits_page_gives_the_defaults_of_every_connection_and_server_option() -> None:
    # The parser must have read the rows, or the test below would check nothing.
    checked = {(name, option) for name, option, _ in DOCUMENTED}
    for name in ("connect", "serve"):
        for option in (
            "timeout",
            "max_buffered_items",
            "max_inbound_calls",
            "max_message_size",
            "open_timeout",
            "ping_interval",
            "ping_timeout",
            "close_timeout",
        ):
            assert (name, option) in checked
    for option in ("max_header_size", "max_handshakes", "max_connections", "grace"):
        assert ("serve", option) in checked
    for option in ("close_timeout", "grace", "max_message_size", "timeout"):
        assert ("App", option) in checked
    assert ("run_worker", "grace") in checked
    assert ("open_peer", "close_timeout") in checked
    assert ("TrioWebSocketTransport", "close_timeout") in checked


@pytest.mark.parametrize(
    ("name", "option", "default"), DOCUMENTED, ids=[f"{n}-{o}" for n, o, _ in DOCUMENTED]
)
def test_each_entry_point_uses_the_documented_default(
    name: str, option: str, default: float
) -> None:
    assert inspect.signature(ENTRY_POINTS[name]).parameters[option].default == default


_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
_OWNER = re.compile(r"^(?:async def|def|class) (\w+)", re.MULTILINE)
_DEFAULT = re.compile(r"^\s+(\w+): [^=\n]+ = ([\d.*_ ]+|None|True|False|\(\)),$", re.MULTILINE)


def reference_signatures() -> list[tuple[str, str, str]]:
    """``(entry point, option, default as written)`` from docs/reference.md's signatures."""
    shown: list[tuple[str, str, str]] = []
    for block in _BLOCK.findall((DOCS / "reference.md").read_text()):
        owner = _OWNER.search(block)
        if owner is not None and owner.group(1) in ENTRY_POINTS:
            shown.extend((owner.group(1), option, text) for option, text in _DEFAULT.findall(block))
    return shown


SHOWN = reference_signatures()


def test_the_reference_shows_the_signatures_of_connect_serve_and_run_worker() -> None:
    owners = {name for name, _, _ in SHOWN}
    assert {"connect", "serve", "run_worker"} <= owners
    assert len(SHOWN) >= 30


@pytest.mark.parametrize(("name", "option", "text"), SHOWN, ids=[f"{n}-{o}" for n, o, _ in SHOWN])
def test_the_reference_shows_each_default_the_code_uses(name: str, option: str, text: str) -> None:
    shown = eval(text, {"__builtins__": {}})  # digits and operators only (see _DEFAULT)
    assert inspect.signature(ENTRY_POINTS[name]).parameters[option].default == shown
