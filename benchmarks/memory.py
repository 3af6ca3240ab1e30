"""``python -m benchmarks.memory``: what a hostile client can make a principal hold.

Starts ``astral.serve`` in a separate process (``--serve``, defaults
everywhere) and attacks it from this one, reading the server's resident
memory from ``/proc/<pid>/status`` (``VmRSS``; the peak, ``VmHWM``, reset
through ``/proc/<pid>/clear_refs`` before each phase where the kernel allows
it). It measures memory, not time, so it needs no quiet machine. Phases:

* ``handshake_short`` and ``handshake``: connections that stall in the
  upgrade request (a 27-byte head, and a 100 KiB one), more than
  ``max_handshakes`` of them; per connection held, and in all (the cap makes
  it bounded);
* ``idle``: authenticated connections doing nothing, per connection;
* ``pings``: one worker sends 64 MiB of pings and never reads the pongs;
* ``fragments``: a text frame without FIN, then 2,000,000 empty continuation
  frames (12 MB on the wire);
* ``refused``: a worker floods calls to an unknown capability (long ids, so
  long refusals) and never reads the answers.

The figures go to ``benchmarks/results/memory.json`` and are quoted in
``docs/limits.md`` and ``docs/security.md``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import anyio

import astral

RESULTS = Path(__file__).resolve().parent / "results"
SECRET = b"m" * 32
KiB = 1024
MiB = 1024 * 1024


# -- the server process ------------------------------------------------------------------


def serve(backend: str) -> None:
    async def main() -> None:
        async with anyio.create_task_group() as tg:
            verifier = astral.JWTVerifier(SECRET, algorithms=["HS256"])
            port = await tg.start(functools.partial(astral.serve, verifier=verifier))
            print(port, flush=True)

    anyio.run(main, backend=backend)


# -- the attacks -------------------------------------------------------------------------


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    mask = b"\x00\x00\x00\x00"  # a zero mask: the payload goes as it is
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + payload


def token() -> str:
    return astral.mint_token(SECRET, subject="attacker")


def upgrade(path: str = "/") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        (
            f"GET {path}?token={token()} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        ).encode()
        + key
        + b"\r\n\r\n"
    )


def connect(port: int, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    return sock


def open_ws(port: int, *, rcvbuf: int | None = None) -> socket.socket:
    sock = connect(port, rcvbuf=rcvbuf)
    sock.sendall(upgrade())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


class Server:
    def __init__(self, backend: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.memory", "--serve", backend],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KiB
        raise KeyError(field)

    def rss(self) -> int:
        return self.status("VmRSS")

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def peak(self) -> int:
        return self.status("VmHWM")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def settle() -> None:
    time.sleep(0.5)  # let the server act on what was sent (this measures memory, not time)


def flood(server: Server, sock: socket.socket, chunk: bytes, total: int) -> dict[str, object]:
    """Send ``total`` bytes of ``chunk`` (or until the server drops us); report growth."""
    base = server.rss()
    peak_ok = server.reset_peak()
    sampled = base
    sent = 0
    cut_off = False
    sock.settimeout(10)
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
            sampled = max(sampled, server.rss())
    except OSError:
        cut_off = True
    settle()
    sampled = max(sampled, server.rss())
    peak = server.peak() if peak_ok else sampled
    # What the server said, if it closed with a close frame we can still read.
    code = None
    try:
        sock.settimeout(5)
        data = b""
        while True:
            more = sock.recv(1 << 20)
            if not more:
                break
            data += more
            at = data.rfind(b"\x88")
            if at >= 0 and len(data) >= at + 4 and data[at + 1] >= 2:
                code = struct.unpack("!H", data[at + 2 : at + 4])[0]
    except OSError:
        pass
    sock.close()
    return {
        "sent_bytes": sent,
        "cut_off": cut_off or code is not None,
        "close_code": code,
        "growth_bytes": max(0, peak - base),
    }


def measure(backend: str, n_handshakes: int, n_idle: int) -> dict[str, object]:
    out: dict[str, object] = {"backend": backend}
    server = Server(backend)
    try:
        warm = open_ws(server.port)  # the first connection pays for imports and caches
        settle()

        # Unauthenticated: stalled upgrade requests, a short head and a 100 KiB one.
        for name, head in (
            ("handshake_short", b"GET / HTTP/1.1\r\nHost: x\r\n"),
            ("handshake", b"GET / HTTP/1.1\r\nHost: x\r\nx-pad: " + b"a" * (100 * KiB)),
        ):
            base = server.rss()
            stalled = []
            for _ in range(n_handshakes):
                sock = connect(server.port)
                try:
                    sock.sendall(head)
                except OSError:
                    pass
                stalled.append(sock)
            settle()
            grown = server.rss() - base
            held = min(n_handshakes, 128)
            out[name] = {
                "head_bytes": len(head),
                "connections_opened": n_handshakes,
                "connections_held": held,
                "growth_bytes": grown,
                "per_connection_bytes": grown // held,
            }
            for sock in stalled:
                sock.close()
            settle()

        # Authenticated and idle.
        base = server.rss()
        idle = [open_ws(server.port) for _ in range(n_idle)]
        settle()
        grown = server.rss() - base
        out["idle"] = {"connections": n_idle, "per_connection_bytes": grown // n_idle}
        for sock in idle:
            sock.close()
        settle()

        out["pings"] = flood(
            server, open_ws(server.port, rcvbuf=4096), frame(0x9, b"p" * 125) * 512, 64 * MiB
        )
        sock = open_ws(server.port)
        sock.sendall(frame(0x1, b"[", fin=False))
        out["fragments"] = flood(server, sock, frame(0x0, b"", fin=False) * 10_000, 12_000_000)
        calls = b"".join(
            frame(0x1, json.dumps({"type": "call", "id": f"{i:0250}", "capability": "x"}).encode())
            for i in range(500)
        )
        out["refused"] = flood(server, open_ws(server.port, rcvbuf=4096), calls, 64 * MiB)
        warm.close()
    finally:
        server.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="BACKEND", help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--json", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    results = [measure(b, args.handshakes, args.idle) for b in args.backends.split(",")]
    text = json.dumps(results, indent=2)
    print(text)
    args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
