"""The command line, end to end: real processes, real sockets, both backends.

The CLI under test runs in its own process (``python -m astral ...``), on
asyncio or, with ``--trio``, on trio; the principal or the caller on the
other end runs in the test, on the test's own backend.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import ssl
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import trustme

import astral
from astral import _cli
from astral._demo import main as demo_main

from .helpers import SECRET, running_principal, token

KEY = SECRET.decode()
CLI_BACKENDS = [pytest.param([], id="cli-asyncio"), pytest.param(["--trio"], id="cli-trio")]


@pytest.fixture
def cli(anyio_backend: str) -> list[str]:
    """The CLI's backend flag: the other backend than the test's own.

    So each end runs on each backend once, in half the runs of every pairing.
    """
    return ["--trio"] if anyio_backend == "asyncio" else []


async def cli_in_thread(*args: str) -> tuple[int, str, str]:
    """``astral ...`` in this process, in a worker thread with its own event loop.

    For the many small cases; the real-process tests cover the process itself.
    """

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = _cli.main(list(args))
        return status, out.getvalue(), err.getvalue()

    return await anyio.to_thread.run_sync(run)


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ASTRAL_TOKEN", "ASTRAL_KEY")}
    env.update(extra)
    return env


async def astral_cli(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "astral", *args],
        input=stdin,
        check=False,
        env=env or environment(),
        cwd=cwd,
    )


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "astral", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env or environment(),
    )


def one_line_error(result: subprocess.CompletedProcess[Any]) -> str:
    stderr = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line and not line.startswith("usage:")]
    assert len(lines) == 1, stderr
    return lines[0]


# -- help and usage ----------------------------------------------------------


def test_no_arguments_prints_help_and_succeeds() -> None:
    result = run_cli()
    assert result.returncode == 0
    assert result.stdout.startswith("usage: astral")
    for command in ("call", "token", "serve", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["call", "--help"],
        ["token", "--help"],
        ["token", "mint", "--help"],
        ["token", "verify", "--help"],
        ["serve", "--help"],
        ["demo", "--help"],
    ],
)
def test_help_everywhere(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(args) == 0
    assert capsys.readouterr().out.startswith(f"usage: astral {' '.join(args[:-1])}".rstrip())


@pytest.mark.parametrize(
    "args",
    [
        ["nonsense"],
        ["call"],
        ["call", "ws://127.0.0.1:1"],
        ["call", "ws://127.0.0.1:1", "echo", "{not json"],
        ["call", "ws://127.0.0.1:1", "echo", "--timeout", "0"],
        ["call", "ws://127.0.0.1:1", "echo", "--token", "a", "--token-file", "b"],
        ["call", "ws://127.0.0.1:1", "echo", "--token-file", "/nonexistent/token"],
        ["call", "ws://127.0.0.1:1", "echo", "--cacert", "/nonexistent/ca.pem"],
        ["call", "ws://127.0.0.1:1", "echo", "--cacert", __file__],
        ["token"],
        ["token", "mint", "--key", KEY],
        ["token", "mint", "--subject", "w"],
        ["token", "mint", "--key", "short", "--subject", "w"],
        ["token", "mint", "--key", KEY, "--subject", "w", "--claims", "[1]"],
        ["token", "verify", "--key", KEY],
        ["token", "verify", "x", "--key", KEY, "--algorithm", "none"],
        ["serve", "nomodule"],
        ["serve", "astral_no_such_module:caps", "--verifier-key", KEY],
        ["serve", "astral:__version__", "--verifier-key", KEY],
        ["serve", "astral:missing", "--verifier-key", KEY],
        ["demo", "--bogus"],
    ],
)
def test_usage_errors_exit_2_with_one_line(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.main(args) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line]
    assert lines, captured
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1, captured.err


def test_serve_refuses_a_sync_capability(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "astral_cli_sync.py").write_text("def f(x):\n    return x\ncaps = {'f': f}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        status = _cli.main(["serve", "astral_cli_sync:caps", "--port", "0", "--verifier-key", KEY])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("astral_cli_sync", None)
    assert status == 2
    assert "capability 'f' must be an async function" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        (["--keyfile", "key.pem"], "--keyfile needs --certfile"),
        (["--certfile", "/nonexistent/cert.pem"], "cannot read certificate file"),
        (["--certfile", __file__], "cannot load the certificate"),
        (["--certfile", __file__, "--keyfile", "/nonexistent/key.pem"], "cannot read key file"),
    ],
    ids=["key-without-cert", "no-cert-file", "not-a-cert", "no-key-file"],
)
def test_serve_refuses_tls_files_it_cannot_use(
    tls: list[str], error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "astral_cli_tls.py").write_text("async def f(x):\n    return x\ncaps = {'f': f}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        status = _cli.main(
            ["serve", "astral_cli_tls:caps", "--port", "0", "--verifier-key", KEY, *tls]
        )
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("astral_cli_tls", None)
    assert status == 2
    err = capsys.readouterr().err
    assert error in err
    assert "Traceback" not in err


def test_trio_missing_says_which_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['trio'] = None  # as if trio were not installed\n"
        "from astral._cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for args in (["demo", "--trio"], ["call", "ws://127.0.0.1:1", "x", "--trio"]):
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 2, result
        assert one_line_error(result).endswith("pip install 'astral-rpc[trio]'")


def test_console_scripts_point_at_the_command_line() -> None:
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    assert scripts == {"astral": "astral._cli:main", "astral-demo": "astral._demo:main"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_astral_demo_script_shim_still_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: astral demo")
    assert demo_main(["demo", "--bogus"]) == 2


@pytest.mark.parametrize("args", CLI_BACKENDS)
def test_demo_runs_on_both_backends(args: list[str]) -> None:
    result = run_cli("demo", *args)
    assert result.returncode == 0, result.stderr
    backend = "trio" if args else "asyncio"
    assert result.stdout.startswith(f"astral demo on {backend}\n")
    assert "principal stopped; every connection closed" in result.stdout


# -- astral call ---------------------------------------------------------------


@pytest.mark.time_limit(30)
async def test_call_prints_results_and_streams(cli: list[str]) -> None:
    async with running_principal() as principal:
        url, tok = principal.url, token("cli-worker")
        result = await astral_cli(
            "call", url, "echo", '{"a": ["é", 1.5, null]}', "--token", tok, *cli
        )
        assert (result.returncode, result.stderr) == (0, b"")
        assert json.loads(result.stdout) == {"a": ["é", 1.5, None]}
        assert result.stdout.decode().count("\n") == 1

        result = await astral_cli("call", url, "count", "3", "--token", tok, *cli)
        assert (result.returncode, result.stderr) == (0, b"")
        assert result.stdout.decode().splitlines() == ["0", "1", "2"]

        assert await cli_in_thread("call", url, "whoami", "--token", tok, *cli) == (
            0,
            '"cli-worker"\n',
            "",
        )


@pytest.mark.time_limit(30)
async def test_call_stops_quietly_when_its_reader_goes_away(cli: list[str]) -> None:
    async with running_principal() as principal:
        args = [
            sys.executable, "-m", "astral", "call", principal.url, "count", "1000000",
            "--token", token(), *cli,
        ]  # fmt: skip
        # A pipe of our own: closing its read end really closes it on
        # both backends (anyio's asyncio stream only marks end of input).
        read_end, write_end = os.pipe()
        try:
            async with await anyio.open_process(
                args, stdout=write_end, env=environment()
            ) as process:
                os.close(write_end)
                write_end = -1
                assert process.stderr is not None
                try:
                    first = await anyio.to_thread.run_sync(os.read, read_end, 64)
                finally:
                    os.close(read_end)  # like `| head -1`
                    read_end = -1
                assert first.startswith(b"0")
                assert await process.wait() == 0
                stderr = b""
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        stderr += await process.stderr.receive()
        finally:
            for fd in (read_end, write_end):
                if fd >= 0:
                    os.close(fd)
        assert stderr == b""


@pytest.mark.time_limit(30)
async def test_call_takes_the_token_from_a_file_the_environment_or_the_query(
    cli: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(token("from-file") + "\n")
    async with running_principal() as principal:
        url = principal.url
        result = await astral_cli("call", url, "whoami", "--token-file", str(token_file), *cli)
        assert result.stdout == b'"from-file"\n'
        result = await astral_cli(
            "call", url, "echo", "-", "--token", token(), *cli, stdin=b'{"from": "stdin"}'
        )
        assert json.loads(result.stdout) == {"from": "stdin"}
        status, out, _ = await cli_in_thread(
            "call", url, "whoami", "--query-token", "--token", token("query"), *cli
        )
        assert (status, out) == (0, '"query"\n')
        monkeypatch.setenv("ASTRAL_TOKEN", token("from-env"))
        status, out, _ = await cli_in_thread("call", url, "whoami", *cli)
        assert (status, out) == (0, '"from-env"\n')


async def test_call_exit_statuses(cli: list[str]) -> None:
    async def fail(_: Any) -> None:
        raise ValueError("the disk is full")

    async with running_principal(capabilities={"fail": fail}) as principal:
        url, tok = principal.url, token()
        # A real process once: the status and the one line reach the shell.
        result = await astral_cli("call", url, "fail", "--token", tok, *cli)
        assert result.returncode == 1
        assert result.stdout == b""
        assert one_line_error(result) == "astral call: remote error: the disk is full"

        cases = [
            (("missing", "--token", tok), 1, "astral call: remote error: unknown capability"),
            (
                ("sleepy", "--token", tok, "--timeout", "0.2"),
                1,
                "astral call: call sleepy timed out",
            ),
            (
                ("echo", "1", "--token", "not-a-token"),
                3,
                "astral call: server rejected the token (HTTP 401): unauthorized",
            ),
            (("echo", "1"), 3, "astral call: server rejected the token (HTTP 401): unauthorized"),
        ]
        for args, expected_status, expected_error in cases:
            status, out, err = await cli_in_thread("call", url, *args, *cli)
            assert (status, out, err) == (expected_status, "", expected_error + "\n"), args
        with anyio.fail_after(5):
            await principal.finally_ran.wait()  # the timed-out call was stopped remotely

    status, out, err = await cli_in_thread("call", url, "echo", "1", "--token", tok, *cli)
    assert status == 3  # nobody listens any more
    assert err.startswith("astral call: cannot connect to 127.0.0.1:")
    assert err.count("\n") == 1


@pytest.mark.time_limit(30)
async def test_call_over_tls_with_cacert(cli: list[str], tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with running_principal(ssl_context=server) as principal:
        assert principal.url.startswith("wss://")
        args = ("call", principal.url, "echo", '"over tls"', "--token", token(), *cli)
        result = await astral_cli(*args, "--cacert", str(ca_file))
        assert (result.returncode, result.stdout) == (0, b'"over tls"\n')
        status, out, err = await cli_in_thread(*args)  # the system CAs do not know this one
        assert (status, out) == (3, "")
        assert err.startswith("astral call: TLS handshake with 127.0.0.1 failed:")


# -- astral token ------------------------------------------------------------


def test_token_mint_makes_a_token_the_verifier_accepts(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    result = run_cli(
        "token", "mint", "--key-file", str(key_file), "--subject", "worker-7",
        "--expires-in", "60", "--issuer", "me", "--claims", '{"role": "gpu"}',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    minted = result.stdout.strip()
    assert KEY not in result.stdout
    claims = astral.JWTVerifier(SECRET, algorithms=["HS256"], issuer="me").verify(minted)
    assert (claims["sub"], claims["iss"], claims["role"]) == ("worker-7", "me", "gpu")
    assert claims["exp"] - claims["iat"] == 60


def test_token_verify_prints_claims_or_why_it_was_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = token("worker-9")
    result = run_cli("token", "verify", good, env=environment(ASTRAL_KEY=KEY))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sub"] == "worker-9"

    other_key = "k" * 32
    result = run_cli("token", "verify", good, "--key", other_key)
    assert result.returncode == 1
    assert one_line_error(result) == "astral token: token refused: invalid signature"
    assert other_key not in result.stdout + result.stderr
    assert KEY not in result.stdout + result.stderr

    token_file = tmp_path / "token"
    token_file.write_text(token("worker-9", expires_in=-3600))
    assert _cli.main(["token", "verify", "--token-file", str(token_file), "--key", KEY]) == 1
    assert capsys.readouterr().err == "astral token: token refused: token expired\n"

    assert _cli.main(["token", "verify", good, "--key", KEY, "--issuer", "someone"]) == 1
    assert capsys.readouterr().err == "astral token: token refused: missing claim 'iss'\n"

    monkeypatch.setenv("ASTRAL_TOKEN", good)
    monkeypatch.setattr(sys, "stdin", io.StringIO(token("from-stdin") + "\n"))
    assert _cli.main(["token", "verify", "-", "--key", KEY]) == 0
    assert json.loads(capsys.readouterr().out)["sub"] == "from-stdin"
    assert _cli.main(["token", "verify", "--key", KEY]) == 0
    assert json.loads(capsys.readouterr().out)["sub"] == "worker-9"


# -- astral serve ------------------------------------------------------------


async def read_banner(process: Any) -> str:
    """The line ``astral serve`` prints once it listens."""
    banner = b""
    while not banner.endswith(b"\n"):
        banner += await process.stdout.receive()
    return banner.decode().strip()


SERVED_MODULE = """
from collections.abc import AsyncIterator

import astral


async def hello(name: str) -> str:
    return f"hello {name}, I am serving {astral.current_peer().claims['sub']}"


async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


capabilities = {"hello": hello, "count": count}
"""


@pytest.mark.time_limit(30)
async def test_serve_runs_a_principal_for_a_module(cli: list[str], tmp_path: Path) -> None:
    (tmp_path / "served_caps.py").write_text(textwrap.dedent(SERVED_MODULE))
    (tmp_path / "key").write_text(KEY)
    args = [
        sys.executable, "-m", "astral", "serve", "served_caps:capabilities", "--port", "0",
        "--verifier-key-file", str(tmp_path / "key"), "--path", "/astral", *cli,
    ]  # fmt: skip
    async with await anyio.open_process(args, cwd=tmp_path, env=environment()) as process:
        line = await read_banner(process)
        assert line.startswith("astral: serving count, hello on ws://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1]
        assert url.endswith("/astral")
        async with astral.connect(url, token=token("w-1")) as peer:
            assert await peer.call("hello", "you") == "hello you, I am serving w-1"
            async with peer.stream("count", 3) as items:
                assert [item async for item in items] == [0, 1, 2]
            # The CLI's own call talks to the CLI's own principal.
            result = await astral_cli("call", url, "hello", '"cli"', "--token", token("w-2"))
            assert result.stdout == b'"hello cli, I am serving w-2"\n'
            with pytest.raises(astral.Unauthorized):
                async with astral.connect(url, token=astral.mint_token("x" * 32, subject="m")):
                    pass
            process.send_signal(signal.SIGINT)
            closed = await peer.wait_closed()
            assert closed.code == 1001
        assert await process.wait() == 0


@pytest.mark.time_limit(30)
async def test_serve_over_tls_stops_on_sigterm(cli: list[str], tmp_path: Path) -> None:
    (tmp_path / "served_caps.py").write_text(textwrap.dedent(SERVED_MODULE))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    args = [
        sys.executable, "-m", "astral", "serve", "served_caps:capabilities", "--port", "0",
        "--certfile", str(tmp_path / "server.pem"), *cli,
    ]  # fmt: skip
    env = environment(ASTRAL_KEY=KEY)
    async with await anyio.open_process(args, cwd=tmp_path, env=env) as process:
        line = await read_banner(process)
        assert line.startswith("astral: serving count, hello on wss://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1]
        async with astral.connect(url, token=token("tls"), ssl=client) as peer:
            assert await peer.call("hello", "tls") == "hello tls, I am serving tls"
            process.send_signal(signal.SIGTERM)
            assert (await peer.wait_closed()).code == 1001
        assert await process.wait() == 0


@pytest.mark.time_limit(30)
async def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    (tmp_path / "served_caps.py").write_text(textwrap.dedent(SERVED_MODULE))
    async with running_principal() as principal:
        result = await astral_cli(
            "serve", "served_caps:capabilities", "--port", str(principal.port),
            "--verifier-key", KEY, cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 3
    assert one_line_error(result).startswith(
        f"astral serve: cannot listen on 127.0.0.1:{principal.port}"
    )
