"""astral.connect and astral.serve over real sockets on 127.0.0.1, on both backends."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import OctKey

import astral

from .helpers import SECRET, eventually, forge, make_tls, running_principal, token


async def test_worker_and_principal_call_each_other() -> None:
    async def bash(command: str) -> str:
        return f"ran {command}"

    async with (
        running_principal() as principal,
        astral.connect(principal.url, token=token(), capabilities={"bash": bash}) as worker,
    ):
        assert await worker.call("echo", {"x": 1}) == {"x": 1}
        assert await worker.call("whoami") == "worker-1"
        principal_side = await principal.registry.wait_for("worker-1")
        assert principal_side.claims["sub"] == "worker-1"
        assert await principal_side.call("bash", "uptime") == "ran uptime"
        async with worker.stream("count", 5) as items:
            assert [item async for item in items] == [0, 1, 2, 3, 4]
        with pytest.raises(astral.RemoteError, match="unknown capability"):
            await worker.call("__class__")


async def test_many_concurrent_calls_both_ways() -> None:
    async with (
        running_principal() as principal,
        astral.connect(principal.url, token=token(), capabilities={"echo": lambda_echo}) as worker,
    ):
        principal_side = await principal.registry.wait_for("worker-1")

        async def one(peer: astral.Peer, i: int) -> None:
            assert await peer.call("echo", i) == i

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, worker, i)
                tg.start_soon(one, principal_side, i)


async def lambda_echo(value: Any) -> Any:
    return value


@pytest.mark.parametrize("in_query", [False, True], ids=["bearer-header", "query-param"])
async def test_token_in_header_or_query(in_query: bool) -> None:
    async with (
        running_principal() as principal,
        astral.connect(principal.url, token=token("w"), token_in_query=in_query) as worker,
    ):
        assert await worker.call("whoami") == "w"


async def test_token_functions_are_called_per_connection() -> None:
    minted: list[str] = []

    def sync_token() -> str:
        minted.append("sync")
        return token("sync")

    async def async_token() -> str:
        await anyio.lowlevel.checkpoint()
        minted.append("async")
        return token("async")

    async with running_principal() as principal:
        for source, subject in ((sync_token, "sync"), (async_token, "async")):
            async with astral.connect(principal.url, token=source) as worker:
                assert await worker.call("whoami") == subject
        async with astral.connect(principal.url, token=sync_token) as worker:
            assert await worker.call("whoami") == "sync"
    assert minted == ["sync", "async", "sync"]


async def test_wss_with_certificates_made_in_the_test() -> None:
    tls = make_tls()
    async with (
        running_principal(ssl_context=tls.server) as principal,
        astral.connect(principal.url, token=token(), ssl=tls.client) as worker,
    ):
        assert principal.url.startswith("wss://")
        assert await worker.call("echo", "over tls") == "over tls"


async def test_untrusted_certificate_is_a_tls_error() -> None:
    tls = make_tls()
    async with running_principal(ssl_context=tls.server) as principal:
        with pytest.raises(astral.TLSError):
            async with astral.connect(principal.url, token=token(), ssl=tls.untrusting_client):
                pass
        # The listener is unharmed.
        async with astral.connect(principal.url, token=token(), ssl=tls.client) as worker:
            assert await worker.call("echo", 1) == 1


async def test_connection_refused_is_a_connect_error() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    with pytest.raises(astral.ConnectError):
        async with astral.connect(f"ws://127.0.0.1:{port}/", token=token()):
            pass


async def test_cancelling_a_call_cancels_the_remote_capability() -> None:
    async with (
        running_principal() as principal,
        astral.connect(principal.url, token=token()) as worker,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: worker.call("sleepy", timeout=None))
            await principal.sleepy_started.wait()  # the call reached the principal
            tg.cancel_scope.cancel()
        await principal.finally_ran.wait()
        # The connection still works, and neither side kept the call.
        assert await worker.call("echo", "still here") == "still here"
        principal_side = principal.registry["worker-1"]
        assert not worker._state.outbound
        await eventually(lambda: not principal_side._state.inbound)


async def test_server_shutdown_closes_with_1001_and_fails_pending_calls() -> None:
    closed = anyio.Event()
    outcome: list[BaseException] = []
    async with running_principal(grace=0) as principal:  # no drain: see test_drain.py
        async with astral.connect(principal.url, token=token()) as worker:

            async def pending() -> None:
                try:
                    await worker.call("sleepy", timeout=None)
                except astral.ConnectionClosed as exc:
                    outcome.append(exc)
                closed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pending)
                await principal.sleepy_started.wait()
                principal.stop()  # shut the principal down while the call is pending
                await closed.wait()
            error = await worker.wait_closed()
            assert error.code == 1001
    assert len(outcome) == 1
    assert isinstance(outcome[0], astral.ConnectionClosed)


async def test_worker_leaving_fails_principal_pending_calls() -> None:
    worker_sleepy_started = anyio.Event()

    async def sleepy_worker(_: Any) -> None:
        worker_sleepy_started.set()
        await anyio.sleep_forever()

    async with running_principal() as principal:
        errors: list[BaseException] = []
        got = anyio.Event()
        async with astral.connect(
            principal.url, token=token(), capabilities={"sleepy": sleepy_worker}
        ) as worker:
            principal_side = await principal.registry.wait_for("worker-1")

            async def pending() -> None:
                try:
                    await principal_side.call("sleepy", timeout=None)
                except astral.ConnectionClosed as exc:
                    errors.append(exc)
                got.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pending)
                await worker_sleepy_started.wait()
                await worker.aclose()
                await got.wait()
        assert len(errors) == 1
        await principal_side.wait_closed()
        await eventually(lambda: "worker-1" not in principal.registry)


async def test_registry_newest_connection_wins() -> None:
    listed: list[anyio.Event] = [anyio.Event(), anyio.Event()]

    async def on_connect(peer: astral.Peer) -> None:
        # on_connect runs once the peer is listed.
        listed[len(principal.connected) - 1].set()

    async with running_principal(on_connect=on_connect) as principal:
        async with astral.connect(principal.url, token=token("w")):
            await listed[0].wait()
            first = principal.registry["w"]
            async with astral.connect(principal.url, token=token("w")):
                await listed[1].wait()
                second = principal.registry["w"]
                assert second is not first
                assert principal.connected == [first, second]
            await second.wait_closed()
            # The older connection is still open, but no longer listed.
            await eventually(lambda: "w" not in principal.registry)
            assert not first.closed


@pytest.mark.parametrize("expiring", [True, False], ids=["session-ends-at-exp", "no-expiry"])
async def test_on_connect_failure_closes_only_that_connection(
    caplog: pytest.LogCaptureFixture, expiring: bool
) -> None:
    """Sessions that end at the token's ``exp`` and sessions that never do are
    served on two paths: ``on_connect`` runs, and its failure is handled, on both."""

    async def on_connect(peer: astral.Peer) -> None:
        if peer.claims["sub"] == "bad":
            raise RuntimeError("handler bug")

    async with running_principal(
        on_connect=on_connect, close_on_token_expiry=expiring
    ) as principal:
        async with astral.connect(principal.url, token=token("bad")) as bad:
            error = await bad.wait_closed()
            assert (error.code, error.reason) == (1011, "internal error")
        # Logged with the worker's address and the traceback.
        [record] = [r for r in caplog.records if r.exc_info is not None]
        assert "127.0.0.1:" in record.getMessage()
        assert "handler bug" in caplog.text
        async with astral.connect(principal.url, token=token("good")) as good:
            assert await good.call("echo", 1) == 1


# -- the token matrix ---------------------------------------------------------

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
RSA_PRIVATE_PEM = RSA_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "mallory", "iat": now, "exp": now + 300}
    claims.update(overrides)
    return claims


def _hs256_verifier() -> astral.JWTVerifier:
    return astral.JWTVerifier(SECRET, algorithms=["HS256"], issuer="principal", audience="astral")


def _good(**kwargs: Any) -> str:
    return astral.mint_token(
        SECRET, subject="mallory", issuer="principal", audience="astral", **kwargs
    )


def _rs256_verifier() -> astral.JWTVerifier:
    return astral.JWTVerifier(RSA_PUBLIC_PEM, algorithms=["RS256"])


def _jwks_verifier() -> astral.JWTVerifier:
    key = OctKey.import_key(SECRET, {"kid": "a"})
    return astral.JWTVerifier({"keys": [key.as_dict(private=True)]}, algorithms=["HS256"])


TOKEN_CASES: dict[str, tuple[Any, Any]] = {
    # name: (verifier factory, token or None)
    "missing": (_hs256_verifier, None),
    "expired": (_hs256_verifier, lambda: _good(expires_in=-3600)),
    # Expired 45 s ago: beyond the default 30 s leeway.
    "expired-beyond-leeway": (
        _hs256_verifier,
        lambda: _good(now=time.time() - 345, expires_in=300),
    ),
    "not-yet-valid": (
        _hs256_verifier,
        lambda: forge(
            {"alg": "HS256"},
            _claims(nbf=int(time.time()) + 3600, iss="principal", aud="astral"),
            SECRET,
        ),
    ),
    "wrong-audience": (
        _hs256_verifier,
        lambda: astral.mint_token(SECRET, subject="m", issuer="principal", audience="other"),
    ),
    "wrong-issuer": (
        _hs256_verifier,
        lambda: astral.mint_token(SECRET, subject="m", issuer="evil", audience="astral"),
    ),
    "wrong-key": (
        _hs256_verifier,
        lambda: astral.mint_token(b"k" * 32, subject="m", issuer="principal", audience="astral"),
    ),
    "alg-none": (
        _hs256_verifier,
        lambda: forge({"alg": "none"}, _claims(iss="principal", aud="astral"), None),
    ),
    "alg-not-allowed": (
        _hs256_verifier,
        lambda: astral.mint_token(
            b"s" * 64, subject="m", algorithm="HS512", issuer="principal", audience="astral"
        ),
    ),
    "hs256-signed-with-rsa-public-key": (
        _rs256_verifier,
        lambda: forge({"alg": "HS256", "typ": "JWT"}, _claims(), RSA_PUBLIC_PEM),
    ),
    "unknown-kid": (
        _jwks_verifier,
        lambda: forge({"alg": "HS256", "kid": "zzz"}, _claims(), SECRET),
    ),
    "malformed": (_hs256_verifier, lambda: "not.a.jwt!"),
    # 74,000 characters of padding make a token of about 100 KB once base64-encoded.
    "100-kb": (_hs256_verifier, lambda: _good(claims={"pad": "x" * 74_000})),
    "jku-header": (
        _hs256_verifier,
        lambda: forge(
            {"alg": "HS256", "jku": "https://attacker.example/jwks.json"},
            _claims(iss="principal", aud="astral"),
            SECRET,
        ),
    ),
}


@pytest.mark.parametrize("in_query", [False, True], ids=["header", "query"])
@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
async def test_bad_tokens_get_401_and_no_connection(
    case: str, in_query: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    make_verifier, make_token = TOKEN_CASES[case]
    bad = make_token() if make_token is not None else None
    if case == "100-kb":
        assert 98_000 < len(bad) < 128 * 1024
    async with running_principal(make_verifier()) as principal:
        with pytest.raises(astral.Unauthorized) as caught:
            async with astral.connect(principal.url, token=bad, token_in_query=in_query):
                pass
        assert caught.value.status == 401
        assert isinstance(caught.value, astral.AuthenticationError)
        assert principal.connected == []
        assert len(principal.registry) == 0
    if bad:
        texts = [caplog.text, str(caught.value), repr(caught.value)]
        cause = caught.value.__cause__
        while cause is not None:
            texts.append(repr(cause))
            cause = cause.__cause__
        for text in texts:
            assert bad not in text
            for segment in bad.split("."):
                if len(segment) > 8:
                    assert segment not in text


async def test_token_within_leeway_is_accepted() -> None:
    # Expired about 15 s ago, within the default 30 s leeway.
    almost = _good(now=time.time() - 315, expires_in=300)
    async with (
        running_principal(_hs256_verifier()) as principal,
        astral.connect(principal.url, token=almost) as worker,
    ):
        assert await worker.call("whoami") == "mallory"


async def test_rs256_and_custom_async_verifier() -> None:
    rs = astral.mint_token(RSA_PRIVATE_PEM, subject="rsa-worker", algorithm="RS256")
    async with (
        running_principal(_rs256_verifier()) as principal,
        astral.connect(principal.url, token=rs) as worker,
    ):
        assert await worker.call("whoami") == "rsa-worker"

    async def custom(tok: str) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        if tok != "open sesame":
            raise ValueError(f"bad token {tok}")
        return {"sub": "custom"}

    async with running_principal(custom) as principal:
        async with astral.connect(principal.url, token="open sesame") as worker:
            assert await worker.call("whoami") == "custom"
        with pytest.raises(astral.Unauthorized):
            async with astral.connect(principal.url, token="wrong"):
                pass


async def test_wrong_path_is_404() -> None:
    async with running_principal() as principal:
        with pytest.raises(astral.HandshakeError) as caught:
            async with astral.connect(principal.url.replace("/astral", "/other"), token=token()):
                pass
        assert caught.value.status == 404
        assert not isinstance(caught.value, astral.Unauthorized)


def test_serve_refuses_sync_capabilities_before_listening() -> None:
    def not_async(_: Any) -> None:
        return None

    async def main() -> None:
        with pytest.raises(TypeError, match="must be an async function"):
            await astral.serve(verifier=_hs256_verifier(), capabilities={"x": not_async}, port=0)

    anyio.run(main)


# -- the token never leaks into errors or logs --------------------------------


def _assert_no_token(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text


async def test_connect_timeout_message_hides_a_query_token() -> None:
    secret = "TOPSECRETTOKENVALUE"
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener:  # accepts TCP (the kernel does) but never answers
        with pytest.raises(astral.ConnectTimeout) as caught:
            async with astral.connect(
                f"ws://127.0.0.1:{port}/x", token=secret, token_in_query=True, open_timeout=0.2
            ):
                pass
    _assert_no_token(secret, str(caught.value), repr(caught.value), repr(caught.value.__cause__))


async def test_invalid_url_message_hides_its_query() -> None:
    secret = "TOPSECRETTOKENVALUE"
    with pytest.raises(astral.ConnectError) as caught:
        async with astral.connect(f"ws://[::1/?token={secret}"):
            pass
    _assert_no_token(secret, str(caught.value), repr(caught.value), repr(caught.value.__cause__))
    with pytest.raises(ValueError) as header_error:
        async with astral.connect("ws://127.0.0.1:9/", token=f"bad\n{secret}"):
            pass
    _assert_no_token(secret, str(header_error.value), repr(header_error.value.__cause__))


async def test_a_malformed_request_line_is_logged_without_its_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "TOPSECRETTOKENVALUE"
    async with running_principal() as principal:
        stream = await anyio.connect_tcp("127.0.0.1", principal.port)
        async with stream:
            await stream.send(f"GET /astral?token={secret} HTTP/1.1 extra\r\n\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive()
        assert answer.startswith(b"HTTP/1.1 400")
        assert secret.encode() not in answer
    _assert_no_token(secret, caplog.text)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout must be a positive number of seconds, or None"),
        ({"max_inbound_calls": 0}, "max_inbound_calls and max_buffered_items must be at least 1"),
        ({"max_buffered_items": 0}, "max_inbound_calls and max_buffered_items must be at least 1"),
    ],
)
async def test_bad_limits_fail_before_anything_opens(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        await astral.serve(verifier=_hs256_verifier(), **options)
    assert str(caught.value) == message
    with pytest.raises(ValueError) as caught:
        async with astral.connect("ws://127.0.0.1:9/", **options):
            pass
    assert str(caught.value) == message


async def test_a_worker_leaving_normally_closes_with_1000_and_no_reason() -> None:
    async with running_principal() as principal:
        async with astral.connect(principal.url, token=token()):
            principal_side = await principal.registry.wait_for("worker-1")
        error = await principal_side.wait_closed()
        # An empty close reason, described by its code on the principal's side.
        assert (error.code, error.reason) == (1000, "normal closure")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"open_timeout": 0}, "open_timeout must be positive or None, not 0"),
        ({"ping_interval": -1.5}, "ping_interval must be positive or None, not -1.5"),
        ({"ping_timeout": 0}, "ping_timeout must be positive or None, not 0"),
        ({"close_timeout": -1}, "close_timeout must not be negative, not -1"),
        ({"max_message_size": 0}, "max_message_size and max_header_size must be positive"),
        ({"max_header_size": 0}, "max_message_size and max_header_size must be positive"),
    ],
)
async def test_bad_connection_options_are_refused_with_their_name(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        await astral.serve(verifier=_hs256_verifier(), **options)
    assert str(caught.value) == message
    if "max_header_size" not in options:  # a server option only
        with pytest.raises(ValueError) as caught:
            async with astral.connect("ws://127.0.0.1:9/", **options):
                pass
        assert str(caught.value) == message


async def test_one_byte_is_the_smallest_message_and_header_limit() -> None:
    # Valid options; with them nothing can connect, which says they were applied.
    async with running_principal(max_message_size=1, max_header_size=1) as principal:
        with pytest.raises(astral.ConnectError):
            async with astral.connect(principal.url, token=token()):
                pass  # pragma: no cover
    with pytest.raises(astral.ConnectError):
        async with astral.connect("ws://127.0.0.1:9/", max_message_size=1, open_timeout=5):
            pass  # pragma: no cover


async def test_a_worker_leaving_with_an_exception_closes_with_1011() -> None:
    async with running_principal() as principal:
        with pytest.raises(RuntimeError, match="worker bug"):
            async with astral.connect(principal.url, token=token()):
                principal_side = await principal.registry.wait_for("worker-1")
                raise RuntimeError("worker bug")
        error = await principal_side.wait_closed()
        assert error.code == 1011


# -- messages that say what to do -------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown", "suggested"),
    [
        ("127.0.0.1:8830/astral", "'127.0.0.1:8830/astral'", "'ws://127.0.0.1:8830/astral'"),
        ("localhost:8830/astral", "'localhost:8830/astral'", "'ws://localhost:8830/astral'"),
        ("https://example.com/astral", "'https://example.com/astral'", "'ws://example.com/astral'"),
        (
            "127.0.0.1:8830/astral?token=TOPSECRET",
            "'127.0.0.1:8830/astral?...'",
            "'ws://127.0.0.1:8830/astral?...'",
        ),
    ],
)
async def test_a_url_without_a_websocket_scheme_says_so(
    url: str, shown: str, suggested: str
) -> None:
    with pytest.raises(astral.ConnectError) as caught:
        async with astral.connect(url, token=token()):
            pytest.fail("connected without a scheme")  # pragma: no cover
    message = str(caught.value)
    assert message.startswith(f"invalid WebSocket URL {shown}: ")
    assert "needs a ws:// or wss:// scheme" in message
    assert suggested in message
    assert "TOPSECRET" not in message


async def test_ws_to_a_tls_server_suggests_wss() -> None:
    async with running_principal(ssl_context=make_tls().server) as principal:
        plain = principal.url.replace("wss://", "ws://")
        with pytest.raises(astral.HandshakeError) as caught:
            async with astral.connect(plain, token=token()):
                pytest.fail("connected in plaintext to a TLS server")  # pragma: no cover
        assert caught.value.status is None
        assert "TLS" in str(caught.value)
        assert "try wss://" in str(caught.value)


async def test_serve_on_a_port_in_use_raises_oserror_itself() -> None:
    # astral.serve runs its drain task beside the listener; the listener's
    # error still comes out as raised, not wrapped in an exception group.
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as taken:
        port = taken.extra(anyio.abc.SocketAttribute.local_port)
        with pytest.raises(OSError):
            await astral.serve(verifier=astral.JWTVerifier(SECRET, algorithms=["HS256"]), port=port)


async def test_serve_sends_a_capabilitys_error_message_unless_told_to_hide_it() -> None:
    async def broken(_: Any) -> None:
        raise ValueError("the disk is full")

    async with (
        running_principal(capabilities={"broken": broken}) as principal,
        astral.connect(principal.url, token=token()) as worker,
    ):
        with anyio.fail_after(5), pytest.raises(astral.RemoteError) as info:
            await worker.call("broken")
    assert (str(info.value), info.value.code) == ("the disk is full", "internal")


async def test_serve_resolves_its_capabilities_once_for_every_connection() -> None:
    async with (
        running_principal() as principal,
        astral.connect(principal.url, token=token("one")),
        astral.connect(principal.url, token=token("two")) as two,
    ):
        one_side = await principal.registry.wait_for("one")
        two_side = await principal.registry.wait_for("two")
        assert one_side._state._capabilities is two_side._state._capabilities
        assert await two.call("whoami") == "two"
