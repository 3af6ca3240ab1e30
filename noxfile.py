"""Developer sessions.

``nox -s tests``, ``demo``, ``lint``, ``typing``, ``docs``, ``bench``, ``bench-memory``,
``mutants``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.sessions = ["tests", "demo", "lint", "typing", "docs"]
nox.options.reuse_existing_virtualenvs = True

# pyenv installs interpreters it does not activate: their shims then fail.
# Put the real binaries first on PATH so every installed version is found.
for bindir in sorted(Path.home().glob(".pyenv/versions/3.1[1-3]*/bin")):
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"


def _works(version: str) -> bool:
    exe = shutil.which(f"python{version}")
    if exe is None:
        return False
    return subprocess.run([exe, "--version"], capture_output=True, check=False).returncode == 0


PYTHONS = [v for v in ("3.11", "3.12", "3.13") if _works(v)]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite, on asyncio and trio, with branch coverage."""
    session.install("-e", ".[test]")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "report", "--fail-under=94")


@nox.session(python=PYTHONS)
def demo(session: nox.Session) -> None:
    """The README's first run, on asyncio and on trio, with only what the README installs."""
    session.install("-e", ".[trio]")
    session.run("python", "-m", "astral", "demo")
    session.run("python", "-m", "astral", "demo", "--trio")


@nox.session(python=PYTHONS[:1])
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHONS[:1])
def typing(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[lint]")
    session.run("mypy", "astral")


@nox.session(python=PYTHONS[:1])
def docs(session: nox.Session) -> None:
    """Docs: every Python block compiles, every public name is documented."""
    session.install("-e", ".")
    session.run("python", "docs/check.py")


@nox.session(python=PYTHONS[:1])
def bench(session: nox.Session) -> None:
    """The benchmark suite (separate processes on 127.0.0.1): ``nox -s bench -- --quick``."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(name="bench-memory", python=PYTHONS[:1])
def bench_memory(session: nox.Session) -> None:
    """What a hostile client can make a principal hold (memory, not time; ~2 min)."""
    session.install("-e", ".[trio]")
    session.run("python", "-m", "benchmarks.memory", *session.posargs)


#: Tests that start processes, left out of mutation runs (see ``mutants``).
MUTANTS_DESELECT = (
    "tests/test_redis_cluster.py",
    "tests/test_cli.py",
    "tests/test_demo.py",
    "tests/test_typing.py",
    "tests/test_worker.py::test_a_worker_survives_a_killed_and_restarted_principal",
    "tests/test_worker.py::test_keepalive_detects_a_principal_that_stops_answering",
    "tests/test_exported_members.py::test_import_astral_does_not_import_optional_integrations",
    "tests/test_validation.py::test_import_astral_imports_no_validation_library",
    "tests/test_otel.py::test_import_astral_does_not_import_opentelemetry",
    "tests/test_asgi.py::test_import_astral_does_not_import_the_integrations",
    "tests/test_protocol.py::test_the_core_imports_no_io_library",
)


# mutmut's test-map run (one in-process pytest over the whole suite) died
# with a segmentation fault three times out of three on Python 3.11.7, each
# time somewhere else; the same suite under the same trampolines passes under
# plain pytest, and mutmut on 3.12 does not crash.
MUTANTS_PYTHON = "3.12" if "3.12" in PYTHONS else PYTHONS[0]


@nox.session(python=MUTANTS_PYTHON)
def mutants(session: nox.Session) -> None:
    """Mutation testing of the core modules with mutmut (see docs/testing.md).

    Plants one small bug at a time in the modules listed under
    ``[tool.mutmut]`` in pyproject.toml and runs, for each, only the tests
    that reach the mutated function. Results are kept in ``mutants/`` and
    saved to ``mutation/results/`` (committed), so a run resumes where the
    last one stopped and only tests what changed. ``nox -s mutants -- "astral._peer*"``
    runs a subset by mutant name; ``MUTMUT_CHILDREN`` sets the parallelism.
    """
    session.install("-e", ".[test]", "mutmut==3.8.1")
    children = os.environ.get("MUTMUT_CHILDREN", str(os.cpu_count() or 1))
    # A surviving mutant re-runs every test that reaches its function; the
    # tests that start other processes (the CLI, the demo, the multi-process
    # cluster, a killed principal, mypy, the import checks) would cost about
    # half the suite's time per survivor. They are left out of the mutant
    # runs: a mutant only they would catch is counted as a survivor, never
    # the other way round.
    addopts = [f"--deselect {test}" for test in MUTANTS_DESELECT]
    # Every async test runs on asyncio and on trio, and the core is the same
    # code on both: mutants are run against the asyncio half, which halves
    # what a survivor costs. A mutant only the trio half would catch counts
    # as a survivor (again never the other way round). ``-k`` matches names,
    # so the tests named after trio (the trio-websocket adapter) are left out
    # on both backends too. MUTANTS_BOTH_BACKENDS=1 runs everything, to
    # re-check survivors.
    if os.environ.get("MUTANTS_BOTH_BACKENDS") != "1":
        addopts.append("-k 'not trio'")
    env = {"PYTEST_ADDOPTS": " ".join(addopts)}
    # The results committed in mutation/results/ are where this run starts
    # (mutmut keeps each result whose function is unchanged), and this run's
    # are written back there, even if it is stopped: commit them.
    session.run("python", "mutation/sync.py", "restore")
    try:
        session.run("mutmut", "run", "--max-children", children, *session.posargs, env=env)
    finally:
        session.run("python", "mutation/sync.py", "save")
    session.run("mutmut", "results")
