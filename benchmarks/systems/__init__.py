"""The systems under test, by name.

Modules are imported only when a system is asked for, and each imports its
library lazily, so the harness can list and probe systems without loading
grpc, socketio or astral itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..common import System

#: name -> (module, class), in the order the table shows them.
REGISTRY: dict[str, tuple[str, str]] = {
    "wsproto-bare": ("bare", "BareWsprotoEcho"),
    "wsproto-echo": ("echo", "WsprotoEcho"),
    "wsproto-echo-naive": ("naive", "NaiveWsprotoEcho"),
    "astral-asyncio": ("astral_rpc", "AstralAsyncio"),
    "astral-trio": ("astral_rpc", "AstralTrio"),
    "astral-asgi-uvicorn": ("astral_rpc", "AstralAsgiUvicorn"),
    "websockets-echo": ("echo", "WebsocketsEcho"),
    "websockets-json": ("websockets_json", "WebsocketsJson"),
    "grpc": ("grpc_aio", "Grpc"),
    "socketio": ("socketio_aiohttp", "SocketIO"),
}

#: The reference every figure is divided by (on the same backend): it shares
#: no code with astral, so it does not move when astral's layers do.
REFERENCE = "wsproto-bare"
#: Used as the reference when the bare echo is not among the systems run.
FALLBACK_REFERENCE = "wsproto-echo-naive"


def get_system(name: str) -> System:
    module_name, class_name = REGISTRY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    system: System = getattr(module, class_name)()
    return system
