"""astral's public face: ``__all__`` is exactly the public names, and each one works."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import types

import pytest

import astral


def public_names() -> list[str]:
    return [
        name
        for name, value in vars(astral).items()
        if not name.startswith("_")
        # Submodules become attributes once imported (astral.testing), and
        # ``from __future__ import annotations`` binds ``annotations``.
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    ]


def test_all_is_exactly_the_public_names() -> None:
    assert astral.__all__ == sorted(public_names())


def test_all_is_sorted_without_duplicates() -> None:
    assert astral.__all__ == sorted(set(astral.__all__))


@pytest.mark.parametrize("name", astral.__all__)
def test_each_public_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from astral import {name}", namespace)
    assert namespace[name] is getattr(astral, name)


@pytest.mark.parametrize("name", astral.__all__)
def test_each_public_name_comes_from_a_private_module(name: str) -> None:
    value = getattr(astral, name)
    if not (inspect.isclass(value) or inspect.isfunction(value)):
        # A type alias such as Frame: its own members are public names too.
        assert not isinstance(value, types.ModuleType)
        return
    module = value.__module__
    assert module.startswith("astral._"), (name, module)
    assert getattr(importlib.import_module(module), name) is value


@pytest.mark.parametrize("name", astral.__all__)
def test_each_public_name_is_documented(name: str) -> None:
    value = getattr(astral, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert inspect.getdoc(value), name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from astral import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == astral.__all__


def test_the_exceptions_share_one_root() -> None:
    errors = [
        value
        for name in astral.__all__
        if inspect.isclass(value := getattr(astral, name)) and issubclass(value, BaseException)
    ]
    assert len(errors) > 10
    for error in errors:
        assert issubclass(error, astral.AstralError), error


def test_version() -> None:
    assert isinstance(astral.__version__, str)
    assert astral.__version__.count(".") >= 2


def test_import_astral_does_not_import_optional_integrations() -> None:
    code = (
        "import sys, astral\n"
        "loaded = sorted(m for m in ('trio', 'trio_websocket', 'uvicorn', 'hypercorn', 'coredis') "
        "if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
