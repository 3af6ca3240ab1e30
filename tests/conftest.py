"""Shared fixtures: every async test runs on asyncio and on trio, bounded in time.

``anyio_backend`` is parametrized over both backends (AnyIO's pytest plugin
picks it up), and every coroutine test is wrapped in ``anyio.fail_after`` so
a hang fails fast with a clear error instead of waiting for pytest-timeout.
A test can ask for a different bound with ``@pytest.mark.time_limit(seconds)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import anyio
import pytest

import astral._logs

DEFAULT_TIME_LIMIT = 10.0


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _full_log_bucket() -> None:
    # Rate-limited warnings share one bucket per logger: each test starts full,
    # so a test that floods cannot hide the warnings another test expects.
    astral._logs.protocol_warnings.reset()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "time_limit(seconds): bound an async test to this many seconds"
    )


def _bounded(
    fn: Callable[..., Coroutine[Any, Any, Any]], seconds: float
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        with anyio.fail_after(seconds):
            return await fn(*args, **kwargs)

    return wrapper


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, None, None]:
    # AnyIO's plugin (auto mode, see pyproject) runs the coroutine found in
    # ``pyfuncitem.obj``; wrapping it only for the call leaves collection and
    # parametrization untouched.
    original = pyfuncitem.obj
    if inspect.iscoroutinefunction(original):
        marker = pyfuncitem.get_closest_marker("time_limit")
        seconds = float(marker.args[0]) if marker else DEFAULT_TIME_LIMIT
        pyfuncitem.obj = _bounded(original, seconds)
    try:
        yield
    finally:
        pyfuncitem.obj = original
