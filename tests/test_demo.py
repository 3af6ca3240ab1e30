"""The README's first run, `python -m astral demo`: in-process on both backends, and run."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

import pytest

from astral._demo import _demo, _tls_contexts

EXPECTED = [
    "principal listening on wss://127.0.0.1:",
    "worker-1 connected",
    "  = 'HELLO ASTRAL'",
    "  item 3",
    "  item 1",
    "  = '$ uptime\\nok'",
    "  the worker's long_job was cancelled and its finally block ran",
    "  refused before the upgrade: ",
    "principal stopped; every connection closed",
]


def _assert_demo_output(out: str) -> None:
    position = 0
    for line in EXPECTED:
        found = out.find(line, position)
        assert found >= 0, f"{line!r} missing from the demo's output:\n{out}"
        position = found + len(line)


@pytest.mark.time_limit(30)
async def test_the_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    await _demo()
    _assert_demo_output(capsys.readouterr().out)


def test_the_demo_ca_passes_strict_verification() -> None:
    # Python 3.13 verifies with VERIFY_X509_STRICT by default: a CA without
    # key identifiers or key usage fails there ("Missing Authority Key
    # Identifier"). The demo sets the flag on every Python, so this test and
    # the one above would fail on 3.11 too.
    server, client = _tls_contexts()
    assert client.verify_flags & ssl.VERIFY_X509_STRICT
    assert client.check_hostname
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert server.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize("args", [["demo"], ["demo", "--trio"]], ids=["asyncio", "trio"])
def test_python_m_astral_demo(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "astral", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    _assert_demo_output(done.stdout)
