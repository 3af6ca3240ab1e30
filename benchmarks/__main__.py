"""``python -m benchmarks``: run the suite, print the table, write JSON.

Examples::

    python -m benchmarks --quick                    # smoke test, well under a minute
    python -m benchmarks                            # full run, 5 interleaved repetitions
    python -m benchmarks --systems wsproto-echo,grpc --workloads AB --repeat 3
    python -m benchmarks --list                     # systems and whether they can run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .common import WORKLOADS
from .harness import Config, log, render_markdown, render_table, run, write_atomic
from .systems import REGISTRY, get_system

RESULTS = Path(__file__).resolve().parent / "results"


def _names(text: str, allowed: list[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts and one repetition: a smoke test"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help="interleaved repetitions per figure (default 5, quick 1)",
    )
    parser.add_argument(
        "--systems",
        type=lambda t: _names(t, list(REGISTRY), "system"),
        default=list(REGISTRY),
        metavar="A,B",
        help=f"systems to run (default all: {', '.join(REGISTRY)})",
    )
    parser.add_argument(
        "--backends",
        type=lambda t: _names(t, ["asyncio", "trio"], "backend"),
        default=["asyncio", "trio"],
        metavar="A,B",
        help="event-loop backends (default asyncio,trio)",
    )
    parser.add_argument(
        "--workloads",
        default=WORKLOADS,
        metavar="LETTERS",
        help=f"workloads to run, e.g. AB (default {WORKLOADS})",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to write the JSON (default benchmarks/results/latest.json;"
        " with --quick, a file in the temp directory)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to write the table as Markdown (default: beside the JSON)",
    )
    parser.add_argument("--no-codec", action="store_true", help="skip the codec micro-benchmark")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="run the cluster workloads instead (calls through Redis; see benchmarks/cluster.py)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: print the table of a results JSON and write its Markdown",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the systems and whether they can run here, then exit",
    )
    args = parser.parse_args(argv)

    if args.cluster:
        from . import cluster  # noqa: PLC0415 - only this mode needs it

        cluster_argv = ["--quick"] if args.quick else []
        if args.repeat is not None:
            cluster_argv += ["--repeat", str(args.repeat)]
        if args.backends:
            cluster_argv += ["--backends", ",".join(args.backends)]
        if args.json is not None:
            cluster_argv += ["--json", str(args.json)]
        return cluster.main(cluster_argv)

    if args.list:
        for name in REGISTRY:
            system = get_system(name)
            reason = system.unavailable()
            status = "ok" if reason is None else f"skip: {reason}"
            print(f"{name:<22} {','.join(system.backends):<13} {system.workloads:<7} {status}")
        return 0

    if args.render:
        document = json.loads(args.render.read_text(encoding="utf-8"))
        print(render_table(document["summary"], document["reference"], markdown=False))
        markdown_path = args.markdown or args.render.with_suffix(".md")
        write_atomic(markdown_path, render_markdown(document))
        log(f"wrote {markdown_path}")
        return 0

    workloads = "".join(w for w in WORKLOADS if w in args.workloads.upper())
    if not workloads:
        parser.error(f"--workloads must name some of {WORKLOADS}")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    json_path = args.json
    if json_path is None:
        json_path = (
            Path(tempfile.gettempdir()) / "astral-bench-quick.json"
            if args.quick
            else RESULTS / "latest.json"
        )
    markdown_path = args.markdown or json_path.with_suffix(".md")

    config = Config(
        quick=args.quick,
        repeat=repeat,
        systems=args.systems,
        backends=args.backends,
        workloads=workloads,
        json_path=json_path,
        markdown_path=markdown_path,
        codec=not args.no_codec,
    )
    try:
        return run(config)
    except KeyboardInterrupt:
        log("interrupted; child processes stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
