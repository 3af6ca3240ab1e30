"""astral.asgi.App in FastAPI and Starlette, at `/astral` and `/astral/`, under real servers.

Starlette's ``Mount("/astral", app)`` only routes ``/astral/...``; a WebSocket
to ``/astral`` itself finds no route and is refused with 403 before astral sees
it. The documented recipe (docs/howto.md) adds a ``WebSocketRoute`` for the
path itself; ``App(path=...)`` takes either form.
"""

from __future__ import annotations

from typing import Any

import fastapi
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute

import astral
import astral.asgi

from .test_asgi import SECRET, SERVERS, run, token

on_every_server = pytest.mark.parametrize(("anyio_backend", "server"), SERVERS)


async def echo(value: Any) -> Any:
    return value


def _astral_app(path: str | None) -> astral.asgi.App:
    return astral.asgi.App(
        verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]),
        capabilities={"echo": echo},
        path=path,
    )


def starlette_app(path: str | None) -> Any:
    astral_app = _astral_app(path)

    async def home(_: Request) -> PlainTextResponse:
        return PlainTextResponse("home")  # pragma: no cover

    return Starlette(
        routes=[
            Route("/", home),
            WebSocketRoute("/astral", astral_app),
            Mount("/astral", astral_app),
        ]
    )


def fastapi_app(path: str | None) -> Any:
    astral_app = _astral_app(path)
    app = fastapi.FastAPI()

    @app.get("/")
    async def home() -> str:
        return "home"  # pragma: no cover

    app.mount("/astral", astral_app)
    app.router.add_websocket_route("/astral", astral_app)
    return app


@on_every_server
@pytest.mark.parametrize("make_app", [starlette_app, fastapi_app], ids=["starlette", "fastapi"])
@pytest.mark.parametrize("path", [None, "/astral", "/astral/"], ids=["any", "no-slash", "slash"])
async def test_mounted_app_answers_at_the_path_with_and_without_a_slash(
    anyio_backend: str, server: str, make_app: Any, path: str | None
) -> None:
    async with run(server, anyio_backend, make_app(path)) as running:
        for url in (running.url + "/astral", running.url + "/astral/"):
            async with astral.connect(url, token=token()) as worker:
                assert await worker.call("echo", url) == url
        if path is not None:
            # Below the mount, but not the App's path: astral's own 404.
            with pytest.raises(astral.HandshakeError) as info:
                async with astral.connect(running.url + "/astral/other", token=token()):
                    pytest.fail("connected on the wrong path")
            assert info.value.status == 404


@on_every_server
async def test_a_mount_alone_does_not_route_the_bare_path(anyio_backend: str, server: str) -> None:
    # Why the recipe needs the WebSocketRoute: Starlette refuses /astral itself.
    app = fastapi.FastAPI()
    app.mount("/astral", _astral_app("/astral"))
    async with run(server, anyio_backend, app) as running:
        async with astral.connect(running.url + "/astral/", token=token()) as worker:
            assert await worker.call("echo", 1) == 1
        with pytest.raises(astral.HandshakeError) as info:
            async with astral.connect(running.url + "/astral", token=token()):
                pytest.fail("Starlette routed the bare path after all")  # pragma: no cover
        assert info.value.status == 403
