"""The command line: ``astral`` and ``python -m astral``.

All parsing lives here (argparse, one subcommand each)::

    astral call URL CAPABILITY [JSON]     call a capability, print the result as JSON
    astral token mint / verify            make or check a JWT
    astral serve MODULE:CAPABILITIES      run a principal serving a module's capabilities
    astral demo [--trio]                  a principal and a worker talking over wss://

Exit status: 0 success, 1 the call (or the token) was refused or failed, 2
usage (bad arguments, unreadable files, a missing extra), 3 the connection
or the authentication failed. Every error is one line on stderr, never a
traceback. Secrets (keys, tokens) are never printed, except the token that
``token mint`` was asked to make.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import signal
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import anyio

from ._exceptions import (
    AstralError,
    AuthenticationError,
    ConnectError,
    ConnectionClosed,
    RemoteError,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

__all__ = ["main"]

OK = 0
FAILED = 1
USAGE = 2
UNREACHABLE = 3

TRIO_MISSING = "--trio needs trio: pip install 'astral-rpc[trio]'"


class _Usage(Exception):
    """Bad arguments found after parsing: exit status 2."""


class _Failed(Exception):
    """The call or the token was refused: exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own usage errors: the usage line, then one line, status 2.
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


# -- helpers ---------------------------------------------------------------


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _Usage(f"cannot read {what} {path!r}: {reason}") from None


def _secret(value: str | None, file: str | None, env: str, what: str) -> str | None:
    if value is not None:
        return value
    if file is not None:
        return _read(file, what).strip() or None
    return os.environ.get(env) or None


def _key(args: argparse.Namespace, option: str = "--key") -> str:
    key = _secret(args.key, args.key_file, "ASTRAL_KEY", "key file")
    if key is None:
        raise _Usage(f"no key: give {option}, {option}-file or $ASTRAL_KEY")
    return key


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


def _backend(args: argparse.Namespace) -> str:
    if not getattr(args, "trio", False):
        return "asyncio"
    try:
        import trio  # noqa: F401, PLC0415 - only to say early that it is missing
    except ImportError:
        raise _Usage(TRIO_MISSING) from None
    return "trio"


def _leaf(exc: BaseException) -> BaseException:
    # A task group wraps what one task raised; report that error itself.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _run(main: Callable[[], Awaitable[None]], backend: str) -> None:
    """``anyio.run(main)``, raising what one task raised rather than its group."""
    try:
        anyio.run(main, backend=backend)
    except BaseException as exc:
        error = _leaf(exc)
        if error is exc or not isinstance(error, Exception):
            raise
        raise error from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _client_tls(cacert: str | None) -> ssl.SSLContext | None:
    if cacert is None:
        return None
    _read(cacert, "CA certificate file")  # a clear message for a missing file
    try:
        return ssl.create_default_context(cafile=cacert)
    except ssl.SSLError as exc:
        raise _Usage(f"cannot load CA certificate file {cacert!r}: {exc.reason}") from None


# -- astral call -----------------------------------------------------------


def _run_call(args: argparse.Namespace) -> int:
    from ._client import connect  # noqa: PLC0415
    from ._peer import Stream  # noqa: PLC0415

    if args.input is None:
        value = None
    else:
        text = sys.stdin.read() if args.input == "-" else args.input
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise _Usage(f"input is not JSON: {exc}") from None
    token = _secret(args.token, args.token_file, "ASTRAL_TOKEN", "token file")
    context = _client_tls(args.cacert)
    backend = _backend(args)
    timeout: float = args.timeout if args.timeout is not None else 30.0
    open_timeout: float = args.timeout if args.timeout is not None else 10.0

    async def call() -> None:
        async with connect(
            args.url,
            token=token,
            ssl=context,
            token_in_query=args.query_token,
            timeout=timeout,
            open_timeout=open_timeout,
        ) as peer:
            result = await peer.call(args.capability, value)
            if isinstance(result, Stream):
                async with result:
                    async for item in result:
                        _print_json(item)
            else:
                _print_json(result)

    _run(call, backend)
    return OK


# -- astral token ----------------------------------------------------------


def _run_mint(args: argparse.Namespace) -> int:
    from ._auth import mint_token  # noqa: PLC0415

    claims: dict[str, Any] | None = None
    if args.claims is not None:
        try:
            claims = json.loads(args.claims)
        except ValueError as exc:
            raise _Usage(f"--claims is not JSON: {exc}") from None
        if not isinstance(claims, dict):
            raise _Usage("--claims must be a JSON object")
    try:
        token = mint_token(
            _key(args),
            subject=args.subject,
            algorithm=args.algorithm,
            expires_in=args.expires_in,
            issuer=args.issuer,
            audience=args.audience,
            kid=args.kid,
            claims=claims,
        )
    except (TypeError, ValueError) as exc:
        raise _Usage(str(exc)) from None
    print(token, flush=True)
    return OK


def _verifier(args: argparse.Namespace, option: str) -> Any:
    from ._auth import JWTVerifier  # noqa: PLC0415

    key = _key(args, option)
    try:
        return JWTVerifier(
            key,
            algorithms=args.algorithm or ["HS256"],
            issuer=args.issuer,
            audience=args.audience,
            leeway=args.leeway,
        )
    except (TypeError, ValueError) as exc:
        raise _Usage(str(exc)) from None


def _run_verify(args: argparse.Namespace) -> int:
    verifier = _verifier(args, "--key")
    if args.token == "-":  # noqa: S105 - the stdin marker, not a secret
        token: str | None = sys.stdin.read().strip()
    else:
        token = _secret(args.token, args.token_file, "ASTRAL_TOKEN", "token file")
    if not token:
        raise _Usage("no token: give TOKEN, '-' for stdin, --token-file or $ASTRAL_TOKEN")
    try:
        claims = verifier.verify(token)
    except AuthenticationError as exc:
        raise _Failed(f"token refused: {exc}") from None
    print(json.dumps(claims, ensure_ascii=False, indent=2, sort_keys=True), flush=True)
    return OK


# -- astral serve ----------------------------------------------------------


def _load(spec: str) -> Mapping[str, Any]:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise _Usage(f"expected MODULE:CAPABILITIES, got {spec!r}")
    # Like uvicorn: modules in the current directory are importable.
    cwd = str(Path.cwd())
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        value: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything
        raise _Usage(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise _Usage(f"{module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(value, Mapping):
        raise _Usage(f"{spec} is a {type(value).__name__}, not a mapping of capabilities")
    return value


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.certfile is None:
        if args.keyfile is not None:
            raise _Usage("--keyfile needs --certfile")
        return None
    _read(args.certfile, "certificate file")
    if args.keyfile is not None:
        _read(args.keyfile, "key file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.certfile, args.keyfile)
    except ssl.SSLError as exc:
        raise _Usage(f"cannot load the certificate: {exc.reason}") from None
    return context


def _run_serve(args: argparse.Namespace) -> int:
    from ._server import serve  # noqa: PLC0415

    capabilities = _load(args.capabilities)
    verifier = _verifier(args, "--verifier-key")
    context = _server_tls(args)
    backend = _backend(args)
    scheme = "wss" if context is not None else "ws"

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            try:
                port = await tg.start(
                    functools.partial(
                        serve,
                        verifier=verifier,
                        capabilities=capabilities,
                        host=args.host,
                        port=args.port,
                        ssl=context,
                        path=args.path,
                    )
                )
            except OSError as exc:
                raise ConnectError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
            host = f"[{args.host}]" if ":" in args.host else args.host
            names = ", ".join(sorted(capabilities)) or "none"
            print(
                f"astral: serving {names} on {scheme}://{host}:{port}{args.path or '/'}",
                flush=True,
            )
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            tg.cancel_scope.cancel()

    _run(run, backend)
    return OK


# -- astral demo -----------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    backend = _backend(args)
    from ._demo import _demo  # noqa: PLC0415

    print(f"astral demo on {backend}", flush=True)
    anyio.run(_demo, backend=backend)
    return OK


# -- the parser ------------------------------------------------------------


def _add_key_options(parser: argparse.ArgumentParser, name: str = "--key") -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        name,
        dest="key",
        metavar="KEY",
        help="HMAC secret or PEM key (default: $ASTRAL_KEY); prefer the -file form, "
        "command lines are visible to other users",
    )
    group.add_argument(f"{name}-file", dest="key_file", metavar="PATH", help="read KEY from PATH")


def _add_policy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--algorithm",
        action="append",
        metavar="ALG",
        help="accepted signature algorithm, repeatable (default: HS256)",
    )
    parser.add_argument("--issuer", help="require this 'iss' claim")
    parser.add_argument("--audience", help="require this 'aud' claim")
    parser.add_argument(
        "--leeway", type=float, default=30.0, help="seconds of clock skew tolerated (default: 30)"
    )


def _parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: PLC0415

    parser = _Parser(
        prog="astral",
        description="Secure bidirectional RPC over one WebSocket: a command line to call, "
        "serve, and make or check tokens.",
        epilog="Exit status: 0 ok, 1 call or token refused, 2 usage, 3 connection or auth failed.",
    )
    parser.add_argument("--version", action="version", version=f"astral {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    call = commands.add_parser(
        "call",
        help="call a capability of a principal and print the result as JSON",
        description="Call CAPABILITY at URL with the JSON input and print the result as JSON, "
        "or each streamed item as one JSON line.",
    )
    call.add_argument("url", metavar="URL", help="ws:// or wss:// URL of the principal")
    call.add_argument("capability", metavar="CAPABILITY", help="the capability's name")
    call.add_argument(
        "input",
        metavar="JSON",
        nargs="?",
        help="the input as JSON ('-' reads stdin; default: none)",
    )
    tokens = call.add_mutually_exclusive_group()
    tokens.add_argument("--token", help="the JWT (default: $ASTRAL_TOKEN)")
    tokens.add_argument("--token-file", metavar="PATH", help="read the JWT from PATH")
    call.add_argument(
        "--query-token",
        action="store_true",
        help="send the token as ?token= (what the TypeScript principal reads) instead of a header",
    )
    call.add_argument("--cacert", metavar="PEM", help="trust the CA certificates in PEM for wss://")
    call.add_argument(
        "--timeout",
        type=_positive,
        metavar="SECONDS",
        help="limit for opening the connection, and for the first answer (default: 10 and 30)",
    )
    call.add_argument("--trio", action="store_true", help="run on trio instead of asyncio")
    call.set_defaults(run=_run_call)

    token = commands.add_parser(
        "token", help="mint or verify a JWT", description="Mint or verify a JWT."
    )
    token_commands = token.add_subparsers(
        dest="action", metavar="ACTION", parser_class=_Parser, required=True
    )
    mint = token_commands.add_parser(
        "mint",
        help="sign a token and print it",
        description="Sign a token for a worker and print it.",
    )
    _add_key_options(mint)
    mint.add_argument("--subject", required=True, help="the 'sub' claim: who the worker is")
    mint.add_argument("--algorithm", default="HS256", help="signature algorithm (default: HS256)")
    mint.add_argument(
        "--expires-in", type=float, default=300.0, metavar="SECONDS", help="(default: 300)"
    )
    mint.add_argument("--issuer", help="the 'iss' claim")
    mint.add_argument("--audience", help="the 'aud' claim")
    mint.add_argument("--kid", help="the 'kid' header")
    mint.add_argument("--claims", metavar="JSON", help="extra claims, a JSON object")
    mint.set_defaults(run=_run_mint)
    verify = token_commands.add_parser(
        "verify",
        help="check a token and print its claims",
        description="Check a token as a principal would, and print its claims, "
        "or why it was refused (exit status 1).",
    )
    verify.add_argument(
        "token",
        metavar="TOKEN",
        nargs="?",
        help="the JWT ('-' reads stdin; default: $ASTRAL_TOKEN)",
    )
    verify.add_argument("--token-file", metavar="PATH", help="read the JWT from PATH")
    _add_key_options(verify)
    _add_policy_options(verify)
    verify.set_defaults(run=_run_verify)

    serve = commands.add_parser(
        "serve",
        help="run a principal serving a module's capabilities",
        description="Run a principal serving the capabilities mapping MODULE:CAPABILITIES "
        "(e.g. myapp.workers:capabilities) until interrupted.",
    )
    serve.add_argument("capabilities", metavar="MODULE:CAPABILITIES")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8830, help="port to listen on, 0 for any (default: %(default)s)"
    )
    serve.add_argument("--path", help="only accept upgrades on this path (default: any)")
    _add_key_options(serve, "--verifier-key")
    _add_policy_options(serve)
    serve.add_argument("--certfile", metavar="PEM", help="serve wss:// with this certificate chain")
    serve.add_argument("--keyfile", metavar="PEM", help="the certificate's private key")
    serve.add_argument("--trio", action="store_true", help="run on trio instead of asyncio")
    serve.set_defaults(run=_run_serve)

    demo = commands.add_parser(
        "demo",
        help="run a principal and a worker talking over wss://",
        description="Run a principal and a worker talking over wss:// on 127.0.0.1.",
    )
    demo.add_argument("--trio", action="store_true", help="run on trio instead of asyncio")
    demo.set_defaults(run=_run_demo)
    return parser


def _exit_status(error: BaseException) -> int:
    if isinstance(error, (ConnectError, ConnectionClosed, AuthenticationError)):
        return UNREACHABLE
    if isinstance(error, (ValueError, TypeError)) and not isinstance(error, AstralError):
        return USAGE  # the arguments: ssl with ws://, a bad URL, a capability not async...
    return FAILED


def _describe(error: BaseException) -> str:
    if isinstance(error, RemoteError):
        return f"remote error: {error}"
    if isinstance(error, AstralError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (tests capture it): nothing will complain


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: The arguments, without the program name; by default
            ``sys.argv[1:]``.

    Returns:
        The exit status: 0 success, 1 the call or token was refused or
        failed, 2 usage, 3 the connection or authentication failed.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else USAGE
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()  # no command at all: help, and success
        return OK
    prog = f"astral {args.command}"
    try:
        return run(args)
    except _Usage as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USAGE
    except _Failed as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``astral call ... | head -1``): stop quietly,
        # and keep Python from complaining when it flushes stdout at exit.
        _silence_stdout()
        return OK
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"{prog}: {_describe(exc)}", file=sys.stderr)
        return _exit_status(exc)
