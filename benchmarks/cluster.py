"""Cluster workloads: calls that cross principal processes through Redis.

``python -m benchmarks --cluster [--quick]`` (or ``python -m benchmarks.cluster``)
starts a private ``redis-server`` (no persistence, a free port on 127.0.0.1),
principal processes with ``astral.redis.RedisRegistry``, and worker processes,
then measures, per backend:

* **A** sequential calls/s, **B** calls/s with 100 in flight, **C** items/s of
  one 100,000-item stream (quick: 3,000), each run by the principal that does
  *not* hold the worker (X -> Redis -> Y -> worker) and, beside it, by the one
  that does (a direct connection). The ratio is cross-process / direct.
* **F** 10,000 workers (quick: 400) spread over 4 principal processes: one
  principal calls every worker's ``echo`` once (100 in flight): how many
  answered and how long it took.

Every process is a child of this one, killed when it ends; readiness is a
``READY`` line, never a sleep. Figures are medians over ``--repeat`` runs.
"""

# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

RESULTS = Path(__file__).resolve().parent / "results"
SECRET = b"b" * 32
NAMESPACE = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- child processes ----------------------------------------------------------


def _verifier() -> Any:
    import astral

    return astral.JWTVerifier(SECRET, algorithms=["HS256"])


async def _principal(redis_url: str) -> None:
    import anyio

    import astral
    import astral.redis

    async with astral.redis.RedisRegistry(redis_url, namespace=NAMESPACE) as registry:

        async def bench_a(job: dict[str, Any]) -> dict[str, Any]:
            worker = await registry.wait_for(job["subject"])
            for _ in range(job["warmup"]):
                await worker.call("echo", {"x": 1})
            latencies = []
            start = time.perf_counter()
            deadline = start + job["seconds"]
            while len(latencies) < job["n"] and time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await worker.call("echo", {"x": 1})
                latencies.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
            latencies.sort()
            return {
                "calls": len(latencies),
                "rate": len(latencies) / elapsed,
                "p50_ms": latencies[len(latencies) // 2] * 1000,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
                "remote": not isinstance(worker, astral.Peer),
            }

        async def bench_b(job: dict[str, Any]) -> dict[str, Any]:
            worker = await registry.wait_for(job["subject"])
            n, inflight = job["n"], job["inflight"]
            done = 0
            start = time.perf_counter()
            deadline = start + job["seconds"]

            async def one() -> None:
                nonlocal done
                while done < n and time.perf_counter() < deadline:
                    await worker.call("echo", {"x": 1})
                    done += 1

            async with anyio.create_task_group() as tg:
                for _ in range(inflight):
                    tg.start_soon(one)
            return {"calls": done, "rate": done / (time.perf_counter() - start)}

        async def bench_c(job: dict[str, Any]) -> dict[str, Any]:
            worker = await registry.wait_for(job["subject"])
            start = time.perf_counter()
            count = 0
            async with worker.stream("count", job["n"]) as items:
                async for _ in items:
                    count += 1
            return {"calls": count, "rate": count / (time.perf_counter() - start), "items": count}

        async def fanout(job: dict[str, Any]) -> dict[str, Any]:
            subjects, inflight = job["subjects"], job["inflight"]
            ok = 0
            failed: list[str] = []
            start = time.perf_counter()
            queue = list(subjects)

            async def one() -> None:
                nonlocal ok
                while queue:
                    subject = queue.pop()
                    try:
                        with anyio.fail_after(30):
                            worker = await registry.wait_for(subject)
                            if await worker.call("echo", subject) == subject:
                                ok += 1
                    except (astral.AstralError, TimeoutError) as exc:
                        failed.append(f"{subject}: {exc!r}")

            async with anyio.create_task_group() as tg:
                for _ in range(inflight):
                    tg.start_soon(one)
            return {"ok": ok, "seconds": time.perf_counter() - start, "failed": failed[:5]}

        async def count_subjects(_: Any) -> int:
            return len([s for s in await registry.subjects() if s != "driver"])

        caps = {
            "bench_a": bench_a,
            "bench_b": bench_b,
            "bench_c": bench_c,
            "fanout": fanout,
            "count_subjects": count_subjects,
        }
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                functools.partial(
                    astral.serve,
                    verifier=_verifier(),
                    capabilities=caps,
                    registry=registry,
                    max_inbound_calls=10_000,
                    # F: 2,500 workers per principal, above the default cap of 1,024.
                    max_connections=20_000,
                    max_handshakes=1_024,
                )
            )
            print(f"READY {port}", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            tg.cancel_scope.cancel()


async def _workers(urls: list[str], prefix: str, count: int) -> None:
    import resource

    import anyio

    import astral

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def echo(value: Any) -> Any:
        return value

    async def stream(n: int) -> Any:
        for i in range(n):
            yield i

    caps = {"echo": echo, "count": stream}
    ready = 0
    all_ready = anyio.Event()

    async def one(i: int, limiter: anyio.CapacityLimiter) -> None:
        nonlocal ready
        subject = f"{prefix}{i}"
        async with limiter:
            connection = astral.connect(
                urls[i % len(urls)],
                token=astral.mint_token(SECRET, subject=subject, expires_in=3600),
                capabilities=caps,
            )
            peer = await connection.__aenter__()
        ready += 1
        if ready == count:
            all_ready.set()
        try:
            await peer.wait_closed()
        finally:
            await connection.__aexit__(None, None, None)

    async with anyio.create_task_group() as tg:
        limiter = anyio.CapacityLimiter(32)
        for i in range(count):
            tg.start_soon(one, i, limiter)
        await all_ready.wait()
        print("READY", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        tg.cancel_scope.cancel()


# -- the orchestrating process --------------------------------------------------


class _Children:
    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> tuple[subprocess.Popen[str], str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cluster", *args],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        assert process.stdout is not None
        line = _ready_line(process.stdout, timeout=300)
        threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
        return process, line

    def close(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except OSError:
                    pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ready_line(stream: IO[str], timeout: float) -> str:
    result: list[str] = []

    def read() -> None:
        for line in stream:
            if line.startswith("READY"):
                result.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise RuntimeError("a benchmark child did not become ready")
    return result[0]


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass


def _cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


REDIS_PIDS: list[int] = []


def _redis(stack: ExitStack) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (Debian/Ubuntu: apt-get install redis-server)")
    port = _free_port()
    directory = tempfile.mkdtemp(prefix="astral-bench-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "Ready to accept connections" in line:
            break
    threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
    REDIS_PIDS.append(process.pid)

    def stop() -> None:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)

    stack.callback(stop)
    return f"redis://127.0.0.1:{port}/0"


async def _drive(url: str, capability: str, job: dict[str, Any]) -> dict[str, Any]:
    import astral

    token = astral.mint_token(SECRET, subject="driver", expires_in=3600)
    async with astral.connect(url, token=token) as peer:
        result: dict[str, Any] = await peer.call(capability, job, timeout=600)
        return result


def measure(backend: str, *, quick: bool, repeat: int) -> dict[str, Any]:
    import anyio

    n_a, n_b, n_c = (500, 3000, 3000) if quick else (5000, 30000, 100_000)
    workers_f = 400 if quick else 10_000
    figures: dict[str, Any] = {"backend": backend}
    with ExitStack() as stack:
        redis_url = _redis(stack)  # stopped last: the children leave first
        children = _Children()
        stack.callback(children.close)
        # A, B, C: Y holds the worker, X does not.
        process_x, ready_x = children.start("principal", redis_url, backend)
        process_y, ready_y = children.start("principal", redis_url, backend)
        url_x = f"ws://127.0.0.1:{ready_x.split()[1]}/"
        url_y = f"ws://127.0.0.1:{ready_y.split()[1]}/"
        process_w, _ = children.start("workers", backend, "w", "1", url_y)
        # CPU per call of each process (from /proc), to see where a call's
        # cost goes: X (the caller's principal), Y (the worker's), the
        # worker, Redis. Direct runs use Y and the worker only.
        pids = {
            "X": process_x.pid,
            "Y": process_y.pid,
            "worker": process_w.pid,
            "redis": REDIS_PIDS[-1],
        }
        samples: dict[str, list[dict[str, Any]]] = {}
        jobs = {
            "A": ("bench_a", {"subject": "w0", "n": n_a, "warmup": 100, "seconds": 3}),
            "B": ("bench_b", {"subject": "w0", "n": n_b, "inflight": 100, "seconds": 4}),
            "C": ("bench_c", {"subject": "w0", "n": n_c}),
        }
        for _ in range(repeat):
            for letter, (capability, job) in jobs.items():
                for where, url in (("direct", url_y), ("cluster", url_x)):
                    before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
                    result = anyio.run(_drive, url, capability, job, backend=backend)
                    calls = max(1, result["calls"])
                    result["cpu_us"] = {
                        name: (_cpu_seconds(pid) - before[name]) / calls * 1e6
                        for name, pid in pids.items()
                    }
                    samples.setdefault(f"{letter} {where}", []).append(result)
        for key, runs in samples.items():
            figures[key] = {
                "rate": statistics.median(r["rate"] for r in runs),
                "min": min(r["rate"] for r in runs),
                "max": max(r["rate"] for r in runs),
                **(
                    {"p50_ms": statistics.median(r["p50_ms"] for r in runs)}
                    if "p50_ms" in runs[0]
                    else {}
                ),
                "cpu_us": {
                    name: statistics.median(r["cpu_us"][name] for r in runs) for name in pids
                },
            }
        for letter in "ABC":
            figures[f"{letter} ratio"] = (
                figures[f"{letter} cluster"]["rate"] / figures[f"{letter} direct"]["rate"]
            )
    with ExitStack() as stack:
        redis_url = _redis(stack)  # stopped last: the children leave first
        children = _Children()
        stack.callback(children.close)
        urls = []
        for _ in range(4):
            _, ready = children.start("principal", redis_url, backend)
            urls.append(f"ws://127.0.0.1:{ready.split()[1]}/")
        per_process = workers_f // 4
        started = time.perf_counter()
        for p in range(4):
            children.start("workers", backend, f"f{p}-", str(per_process), *urls)
        connect_seconds = time.perf_counter() - started
        subjects = [f"f{p}-{i}" for p in range(4) for i in range(per_process)]
        listed = anyio.run(_drive, urls[0], "count_subjects", {}, backend=backend)
        result = anyio.run(
            _drive, urls[0], "fanout", {"subjects": subjects, "inflight": 100}, backend=backend
        )
        figures["F"] = {
            "workers": workers_f,
            "listed": listed,
            "answered": result["ok"],
            "fanout_seconds": result["seconds"],
            "connect_seconds": connect_seconds,
            "failed": result["failed"],
        }
    return figures


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | workload | direct | through Redis | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    names = {"A": "A sequential calls/s", "B": "B calls/s, 100 in flight", "C": "C items/s"}
    for figures in results:
        for letter in "ABC":
            direct, cluster = figures[f"{letter} direct"], figures[f"{letter} cluster"]
            extra = ""
            if "p50_ms" in direct:
                extra = f" (p50 {direct['p50_ms']:.2f} ms / {cluster['p50_ms']:.2f} ms)"
            lines.append(
                f"| {figures['backend']} | {names[letter]}{extra} | {direct['rate']:,.0f} | "
                f"{cluster['rate']:,.0f} | {figures[f'{letter} ratio']:.2f}x |"
            )
    lines += [
        "",
        "CPU per call (per item for C), microseconds, by process (/proc, 10 ms ticks):",
        "",
        "| backend | workload | X | Y | worker | redis | total |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for figures in results:
        for letter in "ABC":
            for where in ("direct", "cluster"):
                cpu = figures[f"{letter} {where}"].get("cpu_us")
                if cpu:
                    lines.append(
                        f"| {figures['backend']} | {letter} {where} | {cpu['X']:,.0f} | "
                        f"{cpu['Y']:,.0f} | {cpu['worker']:,.0f} | {cpu['redis']:,.0f} | "
                        f"{sum(cpu.values()):,.0f} |"
                    )
    lines += ["", "| backend | workers over 4 processes | listed | answered | fan-out s |"]
    lines += ["| --- | ---: | ---: | ---: | ---: |"]
    for figures in results:
        f = figures["F"]
        lines.append(
            f"| {figures['backend']} | {f['workers']:,} | {f['listed']:,} | {f['answered']:,} | "
            f"{f['fanout_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "principal":
        import anyio

        anyio.run(_principal, argv[1], backend=argv[2])
        return 0
    if argv and argv[0] == "workers":
        import anyio

        backend, prefix, count, *urls = argv[1:]
        anyio.run(_workers, urls, prefix, int(count), backend=backend)
        return 0
    # SIGTERM runs the cleanup too: children and redis-server are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    results = []
    for backend in args.backends.split(","):
        print(f"[cluster] measuring on {backend} ...", file=sys.stderr, flush=True)
        results.append(measure(backend, quick=args.quick, repeat=repeat))
    table = render(results)
    print(table)
    path = args.json or (
        Path(tempfile.gettempdir()) / "astral-cluster-quick.json"
        if args.quick
        else RESULTS / "cluster.json"
    )
    document = {
        "quick": args.quick,
        "repeat": repeat,
        "cpus": os.cpu_count(),
        "results": results,
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(f"[cluster] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
