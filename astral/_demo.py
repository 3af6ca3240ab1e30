"""``python -m astral demo``: a principal and a worker talking over wss://.

Everything is real: a TLS certificate made on the spot (signed by a
throwaway CA), a TCP socket on 127.0.0.1, the WebSocket upgrade with a JWT
checked before it is accepted, and calls in both directions.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import secrets
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ._auth import JWTVerifier, mint_token
from ._client import connect
from ._exceptions import Unauthorized
from ._peer import Peer, current_peer
from ._principal import PeerRegistry
from ._server import serve
from ._worker import Backoff, run_worker

if TYPE_CHECKING:
    from collections.abc import Callable


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client trusting it.

    Both certificates carry the extensions a strict verifier requires, as
    trustme builds them: Python 3.13's default context sets
    ``VERIFY_X509_STRICT``, which refuses a chain without key identifiers
    ("Missing Authority Key Identifier") or key usage.
    """
    from cryptography import x509  # noqa: PLC0415 - only the demo needs it
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    def key_usage(*, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        )

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "astral demo CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert.public_bytes(pem))
        key_path.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        key_path.chmod(0o600)
        server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cadata=ca_cert.public_bytes(pem).decode())
    # Python 3.13's default; set here so the demo checks the same on every Python.
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    return server, client


async def _demo() -> None:
    say = functools.partial(print, flush=True)
    secret = secrets.token_bytes(32)
    server_tls, client_tls = _tls_contexts()
    workers = PeerRegistry()
    finally_ran = anyio.Event()

    # -- the principal's capabilities --------------------------------------
    async def transcription(audio: str) -> str:
        caller = current_peer()
        say(f"  principal: transcribing for {caller.claims['sub']!r}")
        return audio.upper()

    async def countdown(n: int):  # type: ignore[no-untyped-def]  # noqa: ANN202
        for i in range(n, 0, -1):
            yield i

    # -- the worker's capabilities -----------------------------------------
    async def bash(command: str) -> str:
        return f"$ {command}\nok"

    async def long_job(_: object) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            finally_ran.set()

    async with anyio.create_task_group() as tg:
        port = await tg.start(
            functools.partial(
                serve,
                verifier=JWTVerifier(secret, algorithms=["HS256"]),
                capabilities={"transcription": transcription, "countdown": countdown},
                ssl=server_tls,
                registry=workers,
                path="/astral",
            )
        )
        url = f"wss://127.0.0.1:{port}/astral"
        say(f"principal listening on {url} (TLS, JWT checked before the upgrade)")

        token = functools.partial(mint_token, secret, subject="worker-1", expires_in=60)
        async with connect(
            url, token=token, ssl=client_tls, capabilities={"bash": bash, "long_job": long_job}
        ) as worker:
            say("worker-1 connected")
            say("worker -> principal: transcription('hello astral')")
            say(f"  = {await worker.call('transcription', 'hello astral')!r}")

            say("worker -> principal: countdown(3), streamed")
            async with worker.stream("countdown", 3) as items:
                async for item in items:
                    say(f"  item {item}")

            principal_side = await workers.wait_for("worker-1")
            say("principal -> worker: bash('uptime')")
            say(f"  = {await principal_side.call('bash', 'uptime')!r}")

            say("principal -> worker: long_job, cancelled after it starts")
            with anyio.move_on_after(0.2):
                await principal_side.call("long_job", timeout=None)
            with anyio.fail_after(5):
                await finally_ran.wait()
            say("  the worker's long_job was cancelled and its finally block ran")

        bad = mint_token(secrets.token_bytes(32), subject="mallory")
        say("a worker with a token signed by the wrong key tries to connect")
        try:
            async with connect(url, token=bad, ssl=client_tls):
                pass
        except Unauthorized as exc:
            say(f"  refused before the upgrade: {exc}")
        tg.cancel_scope.cancel()
    say("principal stopped; every connection closed")
    await _restart_scene(say, secret, server_tls, client_tls)


async def _restart_scene(
    say: Callable[..., None],
    secret: bytes,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
) -> None:
    """A worker kept connected by ``run_worker`` survives its principal's restart."""
    verifier = JWTVerifier(secret, algorithms=["HS256"])
    answered = [anyio.Event(), anyio.Event()]
    connections = 0

    async def hello(name: str) -> str:
        return f"hello {name}"

    async def work(principal: Peer) -> None:
        nonlocal connections
        connections += 1
        say(f"  worker-2: connection {connections}: {await principal.call('hello', 'worker-2')!r}")
        answered[connections - 1].set()

    principal = anyio.CancelScope()
    stopped = anyio.Event()

    async def first_principal(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        try:
            with principal:
                await serve(
                    verifier=verifier,
                    capabilities={"hello": hello},
                    ssl=server_tls,
                    path="/astral",
                    task_status=task_status,
                )
        finally:
            stopped.set()

    say("a worker kept connected by run_worker, while its principal restarts")
    async with anyio.create_task_group() as tg:
        port = await tg.start(first_principal)
        tg.start_soon(
            functools.partial(
                run_worker,
                f"wss://127.0.0.1:{port}/astral",
                token=functools.partial(mint_token, secret, subject="worker-2", expires_in=60),
                ssl=client_tls,
                on_connect=work,
                backoff=Backoff(initial=0.05, maximum=0.5),
            )
        )
        with anyio.fail_after(10):
            await answered[0].wait()
        say("  principal stops (its connections close with 1001) ...")
        principal.cancel()
        await stopped.wait()
        say(f"  ... and starts again on port {port}; the worker reconnects by itself")
        await tg.start(
            functools.partial(
                serve,
                verifier=verifier,
                capabilities={"hello": hello},
                ssl=server_tls,
                path="/astral",
                port=port,
            )
        )
        with anyio.fail_after(10):
            await answered[1].wait()
        tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """The ``astral-demo`` script: ``astral demo`` (parsed in :mod:`astral._cli`)."""
    import sys  # noqa: PLC0415

    from ._cli import main as cli  # noqa: PLC0415

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["demo"]:
        args = args[1:]
    return cli(["demo", *args])
