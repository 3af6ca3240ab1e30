"""A principal in a process of its own, for tests that kill it.

Run as ``python principal_process.py PORT BACKEND``; PORT 0 picks a free port.

Prints ``ready PORT`` once it listens. Serves ``echo`` to workers with tokens
signed by ``tests.helpers.SECRET``.
"""

from __future__ import annotations

import errno
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
        serve = functools.partial(
            astral.serve,
            verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]),
            capabilities={"echo": echo},
            port=port,
        )
        # A restart on a given port: while the test's worker retries that port,
        # one of its connection attempts can hold it for a moment (another
        # process's ephemeral port, or a TCP self-connect). Binding again a
        # bounded number of times is not a wait for an event: nothing signals
        # that the kernel released the port.
        for attempt in range(100):
            try:
                bound = await tg.start(serve)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or port == 0 or attempt == 99:
                    raise
                await anyio.sleep(0.02)
        print("ready", bound, flush=True)


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]), backend=sys.argv[2])
