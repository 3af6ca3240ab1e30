"""Micro-benchmark: what validating a capability's input costs per call.

``python -m benchmarks.validation`` dispatches one call in-process through
``astral.handle`` (no network, no frames encoded: the capability's own cost
plus astral's dispatch) for the same input, ``{"name": ..., "age": ...,
"tags": [...]}``, to:

* a plain capability (``dict`` in, ``dict`` out): the baseline;
* a capability annotated with a msgspec ``Struct`` (in and out);
* the same with a dataclass and a ``TypedDict`` (msgspec, the fast path);
* a capability annotated with a pydantic model (in and out).

It prints microseconds per call, the overhead over the baseline, and the
ratio. Batches are interleaved; each figure is the best batch.
"""

# ruff: noqa: PLC0415

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any, TypedDict

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

INPUT = {"name": "ada", "age": 36, "tags": ["math", "engines", "poetry"]}


@dataclasses.dataclass
class DUser:
    name: str
    age: int
    tags: list[str]


class TUser(TypedDict):
    name: str
    age: int
    tags: list[str]


try:
    import msgspec
except ImportError:  # pragma: no cover - the bench extra installs it
    msgspec = None
try:
    import pydantic
except ImportError:  # pragma: no cover
    pydantic = None

# Model classes at module level: astral resolves annotations from the module.
if msgspec is not None:

    class MUser(msgspec.Struct):
        name: str
        age: int
        tags: list[str]


if pydantic is not None:

    class PUser(pydantic.BaseModel):
        name: str
        age: int
        tags: list[str]


async def plain(user: dict[str, Any]) -> dict[str, Any]:
    return {"name": user["name"], "age": user["age"] + 1, "tags": user["tags"]}


async def struct(user: MUser) -> MUser:
    return MUser(user.name, user.age + 1, user.tags)


async def data(user: DUser) -> DUser:
    return DUser(user.name, user.age + 1, user.tags)


async def typed_dict(user: TUser) -> TUser:
    return {"name": user["name"], "age": user["age"] + 1, "tags": user["tags"]}


async def model(user: PUser) -> PUser:
    return PUser(name=user.name, age=user.age + 1, tags=user.tags)


def _capabilities() -> dict[str, Any]:
    caps: dict[str, Any] = {"plain (dict)": plain}
    if msgspec is not None:
        caps["msgspec Struct"] = struct
        caps["dataclass (msgspec)"] = data
        caps["TypedDict (msgspec)"] = typed_dict
    if pydantic is not None:
        caps["pydantic model"] = model
    return caps


async def _batch(dispatch: Callable[..., Any], call: Any, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        async for _frame in dispatch(call):
            pass
    return (time.perf_counter() - start) / number * 1e6


async def measure(quick: bool = False, repeat: int = 7) -> dict[str, float]:
    """Microseconds per dispatched call, for each capability that can run.

    Batches are interleaved (one of each capability per round), so the noise
    of a shared machine hits every capability alike; each figure is the best
    batch.
    """
    import astral

    capabilities = _capabilities()
    dispatch = astral.handle(capabilities)
    number = 1_000 if quick else 10_000
    calls = {name: astral.Call("1", name, INPUT) for name in capabilities}
    for call in calls.values():
        frames = [frame async for frame in dispatch(call)]
        assert frames[-1].error is None, frames
    best = dict.fromkeys(capabilities, float("inf"))
    for _ in range(2 if quick else repeat):
        for name, call in calls.items():
            best[name] = min(best[name], await _batch(dispatch, call, number))
    return best


def render(results: dict[str, float], markdown: bool = False) -> str:
    base = results["plain (dict)"]
    header = ["capability input", "µs per call", "overhead µs", "vs plain"]
    rows = [
        [name, f"{us:.2f}", f"{us - base:+.2f}", f"{us / base:.2f}x"]
        for name, us in results.items()
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---|---|---|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    return "\n".join(
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)
        )
        for r in [header, *rows]
    )


if __name__ == "__main__":
    results = anyio.run(measure, "--quick" in sys.argv)
    print(render(results, markdown="--markdown" in sys.argv))
