"""Micro-benchmark: encode + decode of a typical call frame and its result.

``python -m benchmarks.codec`` prints microseconds per frame pair (the call
encoded and decoded, then the result encoded and decoded) for the standard
library's json, orjson and msgspec (untyped, and decoding into Structs), and
for astral's own ``encode``/``decode`` (orjson plus astral's value rules).
Runs in-process; each figure is the best of several timed batches.
"""

# Libraries are imported lazily, only by the processes that use them.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import sys
import timeit
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

ID = "5f0c8e0a-4b7e-4d43-9a0e-2f1f3c1d9b7a"
CALL = {
    "type": "call",
    "id": ID,
    "capability": "echo",
    "input": {"x": 1},
}
RESULT = {"type": "result", "id": ID, "output": {"x": 1}}


def _stdlib() -> Callable[[], Any]:
    dumps, loads = json.dumps, json.loads

    def pair() -> Any:
        loads(dumps(CALL))
        return loads(dumps(RESULT))

    return pair


def _orjson() -> Callable[[], Any]:
    import orjson

    dumps, loads = orjson.dumps, orjson.loads

    def pair() -> Any:
        loads(dumps(CALL))
        return loads(dumps(RESULT))

    return pair


def _msgspec() -> Callable[[], Any]:
    import msgspec

    encode, decode = msgspec.json.encode, msgspec.json.decode

    def pair() -> Any:
        decode(encode(CALL))
        return decode(encode(RESULT))

    return pair


def _msgspec_typed() -> Callable[[], Any]:
    import msgspec

    class Call(msgspec.Struct, tag_field="type", tag="call"):
        id: str
        capability: str
        input: Any

    class Result(msgspec.Struct, tag_field="type", tag="result"):
        id: str
        output: Any = None

    decoder = msgspec.json.Decoder(Call | Result)
    encode = msgspec.json.encode
    call = Call(id=ID, capability="echo", input={"x": 1})
    result = Result(id=ID, output={"x": 1})

    def pair() -> Any:
        decoder.decode(encode(call))
        return decoder.decode(encode(result))

    return pair


def _astral() -> Callable[[], Any]:
    from astral import Call, Result, decode, encode

    def pair() -> Any:
        decode(encode(Call(ID, "echo", {"x": 1})))
        return decode(encode(Result(ID, {"x": 1})))

    return pair


CODECS: dict[str, Callable[[], Callable[[], Any]]] = {
    "json (stdlib)": _stdlib,
    "orjson": _orjson,
    "msgspec": _msgspec,
    "msgspec (typed Structs)": _msgspec_typed,
    "astral.encode/decode (orjson + rules)": _astral,
}


def measure(quick: bool = False) -> dict[str, dict[str, Any]]:
    """Microseconds per call+result pair for each codec that is installed."""
    number = 2_000 if quick else 20_000
    out: dict[str, dict[str, Any]] = {}
    for name, make in CODECS.items():
        try:
            pair = make()
        except ImportError as exc:
            out[name] = {"error": f"not installed ({exc.name})"}
            continue
        pair()
        times = timeit.repeat(pair, number=number, repeat=5)
        out[name] = {
            "us_per_pair": min(times) / number * 1e6,
            "samples_us": [t / number * 1e6 for t in times],
        }
    return out


def render(results: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    base = results.get("json (stdlib)", {}).get("us_per_pair")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, r["error"], ""])
        else:
            ratio = f"{r['us_per_pair'] / base:.2f}x" if base else "n/a"
            rows.append([name, f"{r['us_per_pair']:.2f}", ratio])
    header = ["codec", "µs per call+result (encode+decode)", "vs json"]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---|---|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    return "\n".join(
        f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2].rjust(widths[2])}"
        for r in [header, *rows]
    )


if __name__ == "__main__":
    print(render(measure(quick="--quick" in sys.argv)))
