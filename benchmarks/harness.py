"""Process orchestration, interleaved repetitions, statistics, table and JSON.

Every measurement runs a server process and one or more client processes
(``benchmarks.child``), all on 127.0.0.1. The server listens on port 0 and
announces the port on stdout; the harness then starts the clients. Every
wait is bounded; a failed session is recorded and the run goes on.

Repetitions are interleaved: repetition r runs every (system, backend) once
per session kind, in an order rotated by r, so that a noisy minute on this
shared machine hits all systems alike. Figures are medians over repetitions,
with min-max spread, divided by the reference system on the same backend.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import codec
from .common import WORKLOADS
from .systems import FALLBACK_REFERENCE, REFERENCE, REGISTRY, get_system

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent

# -- what to run --------------------------------------------------------------

FULL: dict[str, dict[str, Any]] = {
    "A": {"warmup": 300, "count": 5_000, "seconds": 3.0},
    "B": {"warmup": 1_000, "count": 30_000, "in_flight": 100, "seconds": 4.0},
    "C": {"warmup": 100, "count": 100_000, "seconds": 30.0},
    "U": {"warmup": 100, "count": 100_000, "seconds": 30.0},
    "E": {"rtt_count": 200, "count": 50, "delay": 0.010, "seconds": 10.0},
    "D": {"count": 1_000, "processes": 1, "concurrency": 32},
    "F": {"count": 10_000, "processes": 4, "concurrency": 32},
}
QUICK: dict[str, dict[str, Any]] = {
    "A": {"warmup": 50, "count": 400, "seconds": 0.4},
    "B": {"warmup": 200, "count": 1_500, "in_flight": 100, "seconds": 0.8},
    "C": {"warmup": 100, "count": 3_000, "seconds": 2.0},
    "U": {"warmup": 100, "count": 3_000, "seconds": 2.0},
    "E": {"rtt_count": 50, "count": 8, "delay": 0.010, "seconds": 2.0},
    "D": {"count": 100, "processes": 1, "concurrency": 32},
    "F": {"count": 200, "processes": 2, "concurrency": 32},
}

#: (workload, key, label, unit, lower_is_better, decimals)
METRICS: list[tuple[str, str, str, str, bool, int]] = [
    ("A", "calls_per_s", "sequential calls", "/s", False, 0),
    ("A", "p50_us", "sequential p50 latency", "µs", True, 0),
    ("A", "p99_us", "sequential p99 latency", "µs", True, 0),
    ("A", "client_cpu", "sequential: client CPU", "cores", False, 2),
    ("A", "server_cpu", "sequential: server CPU", "cores", False, 2),
    ("B", "calls_per_s", "calls, 100 in flight", "/s", False, 0),
    ("B", "client_cpu", "100 in flight: client CPU", "cores", False, 2),
    ("B", "server_cpu", "100 in flight: server CPU", "cores", False, 2),
    ("C", "items_per_s", "streamed items, one call", "/s", False, 0),
    ("C", "client_cpu", "streaming: client CPU", "cores", False, 2),
    ("C", "server_cpu", "streaming: server CPU", "cores", False, 2),
    ("U", "items_per_s", "uploaded items, one call", "/s", False, 0),
    ("U", "client_cpu", "upload: client CPU", "cores", False, 2),
    ("U", "server_cpu", "upload: server CPU", "cores", False, 2),
    ("D", "kib_per_conn", "server memory per idle connection", "KiB", True, 1),
    ("E", "cancel_ms", "cancel -> remote finally", "ms", True, 2),
    ("E", "rtt_ms", "round trip (same connection)", "ms", True, 2),
    ("F", "kib_per_worker", "principal memory per worker", "KiB", True, 1),
    ("F", "principal_mib", "principal RSS after fan-out", "MiB", True, 0),
    ("F", "fanout_s", "time for the principal to call all workers", "s", True, 2),
]

PACKAGES = [
    "astral-rpc",
    "anyio",
    "trio",
    "wsproto",
    "websockets",
    "grpcio",
    "python-socketio",
    "python-engineio",
    "aiohttp",
    "uvicorn",
    "orjson",
    "msgspec",
    "psutil",
]


@dataclasses.dataclass
class Config:
    quick: bool = False
    repeat: int = 5
    systems: list[str] = dataclasses.field(default_factory=lambda: list(REGISTRY))
    backends: list[str] = dataclasses.field(default_factory=lambda: ["asyncio", "trio"])
    workloads: str = WORKLOADS
    json_path: Path | None = None
    markdown_path: Path | None = None
    codec: bool = True

    @property
    def params(self) -> dict[str, dict[str, Any]]:
        return QUICK if self.quick else FULL


@dataclasses.dataclass(frozen=True)
class Row:
    system: str
    backend: str

    @property
    def label(self) -> str:
        return f"{self.system} [{self.backend}]"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- child processes ------------------------------------------------------------

_LIVE: set[Child] = set()


class ChildError(Exception):
    """A child process failed, died or did not answer in time."""


class Child:
    """One ``benchmarks.child`` process and its pipes.

    Closing its stdin tells it to exit at once; :meth:`close` does that, waits
    a little, then kills. Every live child is killed at interpreter exit too.
    """

    #: Where children import ``benchmarks`` and ``astral`` from (see :func:`snapshot`).
    source_root: Path = REPO_ROOT

    def __init__(self, label: str, spec: dict[str, Any]) -> None:
        self.label = label
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.source_root), env.get("PYTHONPATH", "")) if p
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.source_root,
            env=env,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        _LIVE.add(self)
        self._lines: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=20)
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("BENCH "):
                tag, _, payload = line[6:].rstrip("\n").partition(" ")
                self._lines.put((tag, payload))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip("\n"))

    def error(self, message: str) -> ChildError:
        tail = "\n".join(f"    | {line}" for line in self._stderr)
        return ChildError(f"{self.label}: {message}" + (f"\n{tail}" if tail else ""))

    def expect(self, tag: str, timeout: float) -> str:
        """Wait for the next protocol line; it must carry ``tag``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.error(f"no {tag} within {timeout:.0f} s")
            try:
                item = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is None:
                self._threads[1].join(timeout=1)
                raise self.error(f"exited with {self.proc.wait(timeout=5)} before {tag}")
            got, payload = item
            if got == tag:
                return payload
            raise self.error(f"expected {tag}, got {got} {payload[:300]}")

    def expect_json(self, tag: str, timeout: float) -> Any:
        return json.loads(self.expect(tag, timeout))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise self.error(f"cannot send {command!r}: {exc}") from exc

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        _LIVE.discard(self)


def _kill_all() -> None:
    for child in list(_LIVE):
        with contextlib.suppress(Exception):
            child.proc.kill()
            child.proc.wait(timeout=5)


atexit.register(_kill_all)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def spawn(label: str, spec: dict[str, Any]) -> Iterator[Child]:
    child = Child(label, spec)
    try:
        yield child
    finally:
        child.close()


@contextlib.contextmanager
def server(row: Row, mode: str, deadline: float, timeout: float) -> Iterator[tuple[Child, int]]:
    spec = {
        "role": "server",
        "system": row.system,
        "backend": row.backend,
        "mode": mode,
        "deadline": deadline,
        "timeout": timeout,
    }
    with spawn(f"{row.label} server", spec) as child:
        port = int(child.expect("READY", 60))
        yield child, port


def client_spec(row: Row, mode: str, port: int, deadline: float, timeout: float) -> dict[str, Any]:
    return {
        "role": "client",
        "system": row.system,
        "backend": row.backend,
        "mode": mode,
        "port": port,
        "deadline": deadline,
        "timeout": timeout,
    }


# -- sessions: one server, its clients, some workloads ---------------------------


def run_calls(
    row: Row, workloads: str, params: dict[str, Any], samples: list[dict[str, Any]]
) -> None:
    """A, B, C, E against one server, by one client process, in that order."""
    bound = sum(params[w]["seconds"] for w in workloads) + 60
    with server(row, "calls", deadline=bound + 120, timeout=bound) as (srv, port):
        spec = client_spec(row, "calls", port, deadline=bound + 60, timeout=bound)
        # The client reads the server's CPU counters around each timed window.
        pid = {"server_pid": srv.proc.pid}
        spec |= {"workloads": list(workloads), "params": {w: params[w] | pid for w in workloads}}
        with spawn(f"{row.label} client", spec) as client:
            for workload in workloads:
                raw = client.expect_json("RESULT", bound)
                metrics: dict[str, Any]
                if "error" in raw:
                    log(f"    {row.label} {workload} failed: {raw['error']}")
                    samples.append({"workload": workload, "error": raw["error"]})
                    continue
                if workload == "E":
                    srv.send("records")
                    records = srv.expect_json("RECORDS", 30)
                    metrics, raw = cancellation_metrics(raw, records)
                else:
                    keys = [k for w, k, *_ in METRICS if w == workload]
                    metrics = {k: raw[k] for k in keys if k in raw}
                samples.append({"workload": workload, "metrics": metrics, "raw": raw})


def cancellation_metrics(
    raw: dict[str, Any], records: dict[str, dict[str, int]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Join the client's cancel times with the server's start/finally times."""
    started, finished = records["started"], records["finished"]
    latencies_ms, problems = [], []
    for i, cancelled in raw.pop("cancelled_at").items():
        if i not in started:
            problems.append(f"call {i} never reached the server")
        elif started[i] > cancelled:
            problems.append(f"call {i} reached the server after it was cancelled")
        elif i not in finished:
            problems.append(f"call {i}: finally did not run within 2 s")
        else:
            latencies_ms.append((finished[i] - cancelled) / 1e6)
    raw |= {"cancel_ms_samples": latencies_ms, "problems": problems[:10]}
    if not latencies_ms:
        raise ChildError("E: no usable cancellation sample: " + "; ".join(problems[:3]))
    metrics = {"cancel_ms": statistics.median(latencies_ms), "rtt_ms": raw["rtt_ms"]}
    return metrics, raw


def run_idle(
    row: Row, params: dict[str, Any], timeout: float, samples: list[dict[str, Any]]
) -> None:
    """D: server memory per idle connection that made one call."""
    count = params["count"]
    with server(row, "D", deadline=timeout * 3, timeout=timeout) as (srv, port):
        spec = client_spec(row, "D", port, deadline=timeout * 3, timeout=timeout)
        spec["params"] = {
            "count": count,
            "first_index": 1,
            "concurrency": params["concurrency"],
        }
        with spawn(f"{row.label} client", spec) as client:
            client.expect("WARM", timeout)
            srv.send("rss")
            before = int(srv.expect("RSS", 30))
            client.send("go")
            held = client.expect_json("HELD", timeout)
            if held["failed"]:
                raise client.error(
                    f"{held['failed']} of {count} connections failed: {held['errors']}"
                )
            srv.send("rss")
            after = int(srv.expect("RSS", 60))
    raw = {"count": count, "rss_before": before, "rss_after": after, **held}
    metrics = {"kib_per_conn": (after - before) / count / 1024}
    samples.append({"workload": "D", "metrics": metrics, "raw": raw})


def run_fanout(
    row: Row, params: dict[str, Any], timeout: float, samples: list[dict[str, Any]]
) -> None:
    """F: a principal holding ``count`` workers calls each of them once."""
    count, processes = params["count"], params["processes"]
    with server(row, "F", deadline=timeout * 4, timeout=timeout) as (srv, port):
        srv.send("rss")
        base = int(srv.expect("RSS", 30))
        with contextlib.ExitStack() as stack:
            clients = []
            share, extra = divmod(count, processes)
            first = 1
            for k in range(processes):
                n = share + (k < extra)
                spec = client_spec(row, "F", port, deadline=timeout * 4, timeout=timeout)
                spec["params"] = {
                    "count": n,
                    "first_index": first,
                    "concurrency": params["concurrency"],
                }
                first += n
                clients.append(stack.enter_context(spawn(f"{row.label} worker {k}", spec)))
            helds = [c.expect_json("HELD", timeout) for c in clients]
            failed = sum(h["failed"] for h in helds)
            if failed:
                errors = [e for h in helds for e in h["errors"]][:5]
                raise ChildError(f"{row.label}: {failed} of {count} workers failed: {errors}")
            srv.send(f"go {count}")
            fanout = srv.expect_json("FANOUT", timeout * 2 + 30)
    if "error" in fanout or fanout["ok"] != count:
        raise ChildError(f"{row.label}: fan-out incomplete: {fanout}")
    raw = {
        "count": count,
        "processes": processes,
        "rss_base": base,
        "connect_s": max(h["connect_s"] for h in helds),
        **fanout,
    }
    metrics = {
        "kib_per_worker": (fanout["rss_held"] - base) / count / 1024,
        "principal_mib": fanout["rss_after"] / 2**20,
        "fanout_s": fanout["elapsed_s"],
    }
    samples.append({"workload": "F", "metrics": metrics, "raw": raw})


# -- the run ----------------------------------------------------------------------


def snapshot(dest: Path) -> dict[str, Any]:
    """Copy ``astral`` and ``benchmarks`` to ``dest`` for the children to import.

    A full run takes the better part of an hour; with a snapshot it measures
    one version of the code even if the work tree changes meanwhile. Returns
    a SHA-256 of each package's sources, to say which code was measured.
    """
    digests: dict[str, Any] = {}
    for package in ("astral", "benchmarks"):
        source = REPO_ROOT / package
        if not source.is_dir():
            continue
        shutil.copytree(
            source, dest / package, ignore=shutil.ignore_patterns("__pycache__", "results")
        )
        digest = hashlib.sha256()
        for path in sorted((dest / package).rglob("*.py")):
            digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
        digests[package] = digest.hexdigest()
    return digests


def select_rows(config: Config) -> tuple[list[Row], dict[str, str]]:
    """Rows that can run, and a skip reason per system that can't."""
    rows, skipped = [], {}
    for name in config.systems:
        system = get_system(name)
        reason = system.unavailable()
        if reason is not None:
            skipped[name] = reason
            continue
        for backend in system.backends:
            if backend not in config.backends:
                continue
            why = getattr(system, "backend_unavailable", lambda _: None)(backend)
            if why is not None:
                skipped[f"{name} [{backend}]"] = why
            else:
                rows.append(Row(name, backend))
    return rows, skipped


def run(config: Config) -> int:
    """Run everything the config asks for; print the table; write the files."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    with tempfile.TemporaryDirectory(prefix="astral-bench-") as tmp:
        Child.source_root = Path(tmp)
        sources = snapshot(Child.source_root)
        try:
            return _run(config, sources)
        finally:
            Child.source_root = REPO_ROOT


def _run(config: Config, sources: dict[str, Any]) -> int:
    started = datetime.datetime.now(datetime.UTC)
    machine = machine_info()  # now, so git describes the code that is measured
    rows, skipped = select_rows(config)
    for name, reason in skipped.items():
        log(f"skip {name}: {reason}")
    params = config.params
    hold_timeout = 120.0 if config.quick else 300.0
    samples: list[dict[str, Any]] = []
    failures = 0
    t0 = time.monotonic()
    for rep in range(config.repeat):
        for session in ("calls", "D", "F"):
            for offset in range(len(rows)):
                row = rows[(offset + rep) % len(rows)]
                wanted = session_workloads(get_system(row.system).workloads, config.workloads)
                wanted = "".join(w for w in wanted if SESSION_OF[w] == session)
                if not wanted:
                    continue
                tick = time.monotonic()
                got: list[dict[str, Any]] = []
                try:
                    if session == "calls":
                        run_calls(row, wanted, params, got)
                    elif session == "D":
                        run_idle(row, params["D"], hold_timeout, got)
                    else:
                        run_fanout(row, params["F"], hold_timeout, got)
                except ChildError as exc:
                    log(f"[rep {rep + 1}/{config.repeat}] FAILED {exc}")
                    done = {s["workload"] for s in got}
                    got += [{"workload": w, "error": str(exc)} for w in wanted if w not in done]
                failures += sum("error" in s for s in got)
                for sample in got:
                    sample |= {"rep": rep, "system": row.system, "backend": row.backend}
                samples.extend(got)
                log(
                    f"[rep {rep + 1}/{config.repeat}] {row.label:<34} {session:<5}"
                    f" {time.monotonic() - tick:6.1f} s  {brief(got)}"
                )
    log(f"measured in {time.monotonic() - t0:.0f} s")

    summary = summarize(samples, rows)
    reference = reference_name(rows)
    table = render_table(summary, reference, markdown=False)
    print(table)
    codec_results = None
    if config.codec:
        codec_results = codec.measure(quick=config.quick)
        print()
        print(codec.render(codec_results))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")

    document = {
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "machine": machine | {"loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "sources_sha256": sources,
        "config": {
            "quick": config.quick,
            "repeat": config.repeat,
            "systems": config.systems,
            "backends": config.backends,
            "workloads": config.workloads,
            "params": params,
        },
        "reference": reference,
        "skipped": skipped,
        "summary": summary,
        "samples": samples,
        "codec": codec_results,
    }
    if config.json_path:
        write_atomic(config.json_path, json.dumps(document, indent=1) + "\n")
        log(f"wrote {config.json_path}")
    if config.markdown_path:
        write_atomic(config.markdown_path, render_markdown(document))
        log(f"wrote {config.markdown_path}")
    return 1 if failures else 0


#: Which session measures each workload: A, B, C and E share a server.
SESSION_OF = {
    "A": "calls",
    "B": "calls",
    "C": "calls",
    "U": "calls",
    "E": "calls",
    "D": "D",
    "F": "F",
}


def session_workloads(supported: str, selected: str) -> str:
    return "".join(w for w in WORKLOADS if w in supported and w in selected)


def brief(samples: list[dict[str, Any]]) -> str:
    parts = []
    for sample in samples:
        if "error" in sample:
            parts.append(f"{sample['workload']}=FAILED")
            continue
        for key, value in sample["metrics"].items():
            parts.append(f"{sample['workload']}.{key}={value:,.1f}")
    return " ".join(parts)


# -- statistics and reporting ----------------------------------------------------


def reference_name(rows: list[Row]) -> str | None:
    names = {row.system for row in rows}
    for name in (REFERENCE, FALLBACK_REFERENCE):
        if name in names:
            return name
    return None


def summarize(samples: list[dict[str, Any]], rows: list[Row]) -> list[dict[str, Any]]:
    """One entry per (metric, row): median, min, max, quartiles, sample count."""
    out = []
    for workload, key, label, unit, lower, _ in METRICS:
        for row in rows:
            values = [
                s["metrics"][key]
                for s in samples
                if s["system"] == row.system
                and s["backend"] == row.backend
                and s["workload"] == workload
                and "metrics" in s
            ]
            errors = sum(
                1
                for s in samples
                if s["system"] == row.system
                and s["backend"] == row.backend
                and s["workload"] == workload
                and "error" in s
            )
            if not values and not errors:
                continue
            entry: dict[str, Any] = {
                "workload": workload,
                "metric": key,
                "label": label,
                "unit": unit,
                "lower_is_better": lower,
                "system": row.system,
                "backend": row.backend,
                "n": len(values),
                "errors": errors,
            }
            if values:
                q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
                entry |= {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "q1": q1,
                    "q3": q3,
                }
            out.append(entry)
    return out


#: Figures that describe a run rather than rank it: shown, never divided.
NO_RATIO = {"client_cpu", "server_cpu"}


def _ratio(entry: dict[str, Any], summary: list[dict[str, Any]], reference: str | None) -> str:
    if reference is None or "median" not in entry or entry["metric"] in NO_RATIO:
        return "n/a"
    for other in summary:
        if (
            other["system"] == reference
            and other["backend"] == entry["backend"]
            and other["metric"] == entry["metric"]
            and other["workload"] == entry["workload"]
            and other.get("median")
        ):
            return f"{entry['median'] / other['median']:.2f}x"
    return "n/a"


def _note(entry: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    notes = []
    if entry["errors"]:
        notes.append(f"{entry['errors']} failed")
    if entry["metric"] == "cancel_ms" and "median" in entry:
        rtt = next(
            (
                e
                for e in summary
                if e["metric"] == "rtt_ms"
                and e["system"] == entry["system"]
                and e["backend"] == entry["backend"]
                and "median" in e
            ),
            None,
        )
        if rtt is not None:
            budget = rtt["median"] + 1.0
            verdict = "within" if entry["median"] <= budget else "OVER"
            notes.append(f"{verdict} RTT+1ms = {budget:.2f} ms")
    return "; ".join(notes)


def _fmt(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def table_rows(summary: list[dict[str, Any]], reference: str | None) -> list[list[str]]:
    decimals = {(w, k): d for w, k, *_, d in METRICS}
    rows = []
    for entry in summary:
        d = decimals[(entry["workload"], entry["metric"])]
        arrow = "lower" if entry["lower_is_better"] else "higher"
        figure = f"{entry['workload']} {entry['label']} ({entry['unit']}, {arrow} is better)"
        if entry["metric"] in NO_RATIO:
            figure = f"{entry['workload']} {entry['label']} (fraction of a core)"
        if "median" in entry:
            median = _fmt(entry["median"], d)
            spread = f"{_fmt(entry['min'], d)} - {_fmt(entry['max'], d)}"
        else:
            median = spread = "failed"
        rows.append(
            [
                figure,
                f"{entry['system']} [{entry['backend']}]",
                median,
                spread,
                _ratio(entry, summary, reference),
                str(entry["n"]),
                _note(entry, summary),
            ]
        )
    return rows


HEADER = ["figure", "system [backend]", "median", "min - max", "vs ref", "n", "note"]


def render_table(summary: list[dict[str, Any]], reference: str | None, *, markdown: bool) -> str:
    rows = table_rows(summary, reference)
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    right = {2, 3, 4, 5}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [f"reference: {reference or 'none'} on the same backend", line(HEADER)]
    previous = None
    for r in rows:
        if previous is not None and r[0] != previous:
            out.append("")
        out.append(line(r))
        previous = r[0]
    return "\n".join(out)


SHORT = {
    ("A", "calls_per_s"): "A calls/s",
    ("A", "p50_us"): "A p50 µs",
    ("A", "p99_us"): "A p99 µs",
    ("A", "client_cpu"): "A CPU cli",
    ("A", "server_cpu"): "A CPU srv",
    ("B", "calls_per_s"): "B calls/s",
    ("B", "client_cpu"): "B CPU cli",
    ("B", "server_cpu"): "B CPU srv",
    ("C", "items_per_s"): "C items/s",
    ("C", "client_cpu"): "C CPU cli",
    ("C", "server_cpu"): "C CPU srv",
    ("U", "items_per_s"): "U items/s",
    ("U", "client_cpu"): "U CPU cli",
    ("U", "server_cpu"): "U CPU srv",
    ("D", "kib_per_conn"): "D KiB/conn",
    ("E", "cancel_ms"): "E cancel ms",
    ("E", "rtt_ms"): "E RTT ms",
    ("F", "kib_per_worker"): "F KiB/worker",
    ("F", "principal_mib"): "F RSS MiB",
    ("F", "fanout_s"): "F fan-out s",
}


def render_matrix(summary: list[dict[str, Any]], reference: str | None) -> str:
    """Markdown: one row per system, one column per figure, "median (ratio)"."""
    decimals = {(w, k): d for w, k, *_, d in METRICS}
    labels = list(dict.fromkeys(f"{e['system']} [{e['backend']}]" for e in summary))
    cells: dict[tuple[str, tuple[str, str]], str] = {}
    for entry in summary:
        key = (entry["workload"], entry["metric"])
        if "median" in entry:
            ratio = _ratio(entry, summary, reference)
            text = _fmt(entry["median"], decimals[key])
            cells[(f"{entry['system']} [{entry['backend']}]", key)] = (
                text if ratio == "n/a" else f"{text} ({ratio})"
            )
        else:
            cells[(f"{entry['system']} [{entry['backend']}]", key)] = "failed"
    columns = [key for key in SHORT if any(k == key for _, k in cells)]
    lines = [
        "| system | " + " | ".join(SHORT[c] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label in labels:
        row = [cells.get((label, c), "n/a") for c in columns]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_markdown(document: dict[str, Any]) -> str:
    machine = document["machine"]
    config = document["config"]
    lines = [
        "# astral benchmark results",
        "",
        f"- when: {document['timestamp']} ({document['duration_s']:.0f} s)",
        f"- machine: {machine['cpu_model']}, {machine['cpus_usable']} usable cores, "
        f"Python {machine['python']}, load average at start {machine['loadavg']}",
        f"- repetitions: {config['repeat']} interleaved"
        f"{' (quick mode)' if config['quick'] else ''}; median, min - max over repetitions",
        f"- code: git {(machine.get('git') or {}).get('commit', 'unknown')[:12]}, astral sources"
        f" sha256 {document.get('sources_sha256', {}).get('astral', 'unknown')[:12]}",
        f"- reference: {document['reference']} on the same backend; (ratio) = figure / reference",
        "",
        "## At a glance",
        "",
        "Medians, with the ratio to the reference in parentheses; n/a where the",
        "workload does not apply to the system (see README).",
        "",
        render_matrix(document["summary"], document["reference"]),
        "",
        "## Every figure, with its spread",
        "",
        render_table(document["summary"], document["reference"], markdown=True),
        "",
    ]
    if document["skipped"]:
        lines += ["Skipped:", ""]
        lines += [f"- {name}: {reason}" for name, reason in document["skipped"].items()]
        lines.append("")
    if document["codec"]:
        lines += ["## Codec (µs per call+result frame pair, encode+decode)", ""]
        lines += [codec.render(document["codec"], markdown=True), ""]
    lines += [
        "Package versions: "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
        + ".",
        "",
    ]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_total = f.readline().split(":", 1)[1].strip()
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory": mem_total,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": packages,
        "git": git_info(),
    }


def git_info() -> dict[str, Any] | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "dirty": bool(dirty)}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
