"""A principal in a process of its own, for tests that kill it.

Run as ``python principal_process.py PORT BACKEND``.

Prints ``ready`` once it listens. Serves ``echo`` to workers with tokens
signed by ``tests.helpers.SECRET``.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import anyio

import astral

SECRET = b"s" * 32  # tests.helpers.SECRET


async def echo(value: Any) -> Any:
    return value


async def main(port: int) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(
            functools.partial(
                astral.serve,
                verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]),
                capabilities={"echo": echo},
                port=port,
            )
        )
        print("ready", flush=True)


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]), backend=sys.argv[2])
