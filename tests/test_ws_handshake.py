"""The sans-IO parts of the WebSocket layer, without an event loop or a socket."""

from __future__ import annotations

import base64
import hashlib

import pytest

from astral._exceptions import ConnectError, ConnectionClosed, HandshakeError, Unauthorized
from astral._ws_client import _ClientHandshake, _parse_url, _Target
from astral._ws_connection import HandshakeRequest, check_close_code, exit_code
from astral._ws_server import Rejection, _BadRequest, _ServerHandshake

KEY = base64.b64encode(b"0123456789abcdef")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def request(*lines: bytes, target: bytes = b"/") -> bytes:
    head = [
        b"GET " + target + b" HTTP/1.1",
        b"Host: example",
        b"Upgrade: websocket",
        b"Connection: keep-alive, Upgrade",
        b"Sec-WebSocket-Key: " + KEY,
        b"Sec-WebSocket-Version: 13",
        *lines,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n"


# --- server side --------------------------------------------------------------


def test_server_parses_an_upgrade_arriving_in_pieces() -> None:
    handshake = _ServerHandshake(max_header_size=4096)
    data = request(b"Authorization: Bearer abc", target=b"/rpc?token=t%20k&x=") + b"FRAMES"
    assert not handshake.receive_data(data[:10])
    assert handshake.receive_data(data[10:])
    parsed = handshake.request(("10.0.0.1", 5000))
    assert parsed.path == "/rpc?token=t%20k&x="
    assert parsed.query_param("token") == "t k"
    assert parsed.query_param("x") == ""
    assert parsed.query_param("missing") is None
    assert parsed.header("AUTHORIZATION") == "Bearer abc"
    assert parsed.header("x-missing") is None
    assert ("host", "example") in parsed.headers
    assert parsed.remote_address == ("10.0.0.1", 5000)
    assert parsed.state == {}
    response, trailing = handshake.accept()
    assert trailing == b"FRAMES"
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    accept = base64.b64encode(hashlib.sha1(KEY + GUID).digest())
    assert b"sec-websocket-accept: " + accept in response
    assert b"extensions" not in response


def test_repeated_headers_are_joined() -> None:
    parsed = HandshakeRequest("/", (("authorization", "a"), ("authorization", "b")))
    assert parsed.header("Authorization") == "a, b"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x16\x03\x01garbage\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        (request().replace(b"GET", b"PUT", 1), 400),
        (request().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400),
        (request().replace(b"keep-alive, Upgrade", b"keep-alive"), 400),
        (request().replace(b"Version: 13", b"Version: 7"), 426),
        (request().replace(KEY, b"short"), 400),
        (request(b"Content-Length: 3"), 400),
        (request(b"X-Pad: " + b"p" * 5000), 431),
    ],
    ids=[
        "garbage",
        "plain-http",
        "put",
        "http10",
        "no-connection",
        "version",
        "key",
        "body",
        "big",
    ],
)
def test_server_refuses_bad_requests(data: bytes, status: int) -> None:
    handshake = _ServerHandshake(max_header_size=4096)

    def feed() -> None:
        while data := data_left.pop() if data_left else b"":
            handshake.receive_data(data[: handshake.read_size])
            if len(data) > handshake.read_size:
                data_left.append(data[handshake.read_size :])

    data_left = [data]
    with pytest.raises(_BadRequest) as info:
        feed()
    assert info.value.status == status
    response = handshake.reject(status, str(info.value), info.value.headers)
    assert response.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"garbage" not in response  # never echo what the client sent


def test_client_vanishing_gets_no_answer() -> None:
    handshake = _ServerHandshake(max_header_size=4096)
    handshake.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(_BadRequest) as info:
        handshake.receive_data(b"")
    assert info.value.status is None
    with pytest.raises(_BadRequest) as info:
        _ServerHandshake(max_header_size=4096).receive_data(b"")
    assert info.value.status is None


def test_read_size_never_exceeds_the_head_limit() -> None:
    handshake = _ServerHandshake(max_header_size=100)
    assert handshake.read_size == 101
    handshake.receive_data(b"GET / HTTP/1.1\r\n")
    assert handshake.read_size == 101 - 16


def test_read_size_grows_with_what_arrived() -> None:
    # A stalled client holds what it sent, not a read buffer sized in advance.
    handshake = _ServerHandshake(max_header_size=1 << 20)
    assert handshake.read_size == 4096
    line = b"GET /" + b"a" * 4999 + b" HTTP/1.1\r\n"
    handshake.receive_data(line)
    assert handshake.read_size == len(line)
    handshake.receive_data(b"x-pad: " + b"b" * 100_000 + b"\r\n")
    assert handshake.read_size == 65536  # and never beyond READ_SIZE


def test_rejection_response() -> None:
    handshake = _ServerHandshake(max_header_size=4096)
    handshake.receive_data(request())
    response = handshake.reject(
        401, "no entry", (("WWW-Authenticate", "Bearer"), ("Content-Length", "999"))
    )
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"WWW-Authenticate: Bearer" in head
    assert b"content-length: 8" in head
    assert b"999" not in head
    assert b"content-type: text/plain; charset=utf-8" in head
    assert body == b"no entry"


def test_rejection_needs_a_final_status() -> None:
    assert Rejection(403).body == ""
    for status in (101, 199, 600):
        with pytest.raises(ValueError, match="status"):
            Rejection(status)


# --- client side --------------------------------------------------------------


def target(url: str = "ws://example:8080/rpc?x=1") -> _Target:
    return _parse_url(url)


def test_parse_url() -> None:
    assert target() == _Target("example", 8080, False, "/rpc?x=1", "example:8080")
    assert target("wss://example") == _Target("example", 443, True, "/", "example")
    assert target("ws://[::1]:9000/a").host_header == "[::1]:9000"
    assert target("ws://[::1]/a").host == "::1"
    for bad in ["http://x/", "ws:///nohost", "ws://x:70000/", "ws://u:p@x/", "ws://x/é"]:
        with pytest.raises(ConnectError):
            _parse_url(bad)


def answer(handshake: _ClientHandshake, *lines: bytes, accept: bytes | None = None) -> bytes:
    key = next(
        line.split(b": ", 1)[1]
        for line in handshake.request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key")
    )
    if accept is None:
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    head = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept,
        *lines,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n"


def test_client_request_and_accepted_answer() -> None:
    handshake = _ClientHandshake(target(), [("Authorization", "Bearer t")], 4096)
    assert handshake.request.startswith(b"GET /rpc?x=1 HTTP/1.1\r\nhost: example:8080\r\n")
    assert b"Authorization: Bearer t\r\n" in handshake.request
    assert b"extensions" not in handshake.request.lower()
    data = answer(handshake) + b"\x81\x02hi"
    assert handshake.receive_data(data[:20]) is None
    assert handshake.receive_data(data[20:]) == b"\x81\x02hi"


@pytest.mark.parametrize(
    ("lines", "accept"),
    [
        ((), b"d3Jvbmc="),
        ((b"Sec-WebSocket-Extensions: permessage-deflate",), None),
        ((b"Sec-WebSocket-Protocol: chat",), None),
    ],
    ids=["accept", "extension", "subprotocol"],
)
def test_client_refuses_a_bad_101(lines: tuple[bytes, ...], accept: bytes | None) -> None:
    handshake = _ClientHandshake(target(), [], 4096)
    with pytest.raises(HandshakeError) as info:
        handshake.receive_data(answer(handshake, *lines, accept=accept))
    assert info.value.status == 101


def test_client_reports_refusals_with_status_and_body() -> None:
    handshake = _ClientHandshake(target(), [], 4096)
    with pytest.raises(Unauthorized, match="expired"):
        handshake.receive_data(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 7\r\n\r\nexpired")
    handshake = _ClientHandshake(target(), [], 4096)
    assert handshake.receive_data(b"HTTP/1.1 503 Busy\r\n\r\nno length, so") is None
    assert handshake.status == 503
    with pytest.raises(HandshakeError, match="503: no length, so") as info:
        handshake.receive_data(b"")
    assert info.value.status == 503


def test_client_bounds_the_response_head() -> None:
    handshake = _ClientHandshake(target(), [], 100)
    assert handshake.read_size == 101
    data = b"HTTP/1.1 101 Switching Protocols\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"
    with pytest.raises(HandshakeError, match="invalid HTTP response"):
        handshake.receive_data(data[: handshake.read_size])


def test_client_header_checks() -> None:
    with pytest.raises(ValueError, match="set by astral"):
        _ClientHandshake(target(), [("Sec-WebSocket-Extensions", "permessage-deflate")], 4096)
    with pytest.raises(ValueError, match="invalid request header"):
        _ClientHandshake(target(), [("X-Evil", "a\r\nInjected: yes")], 4096)
    with pytest.raises(HandshakeError, match="invalid HTTP response"):
        _ClientHandshake(target(), [], 4096).receive_data(b"SSH-2.0-OpenSSH\r\n\r\n")


# --- small rules --------------------------------------------------------------


def test_close_codes_and_exit_codes() -> None:
    for code in (1000, 1001, 1011, 3000, 4999):
        check_close_code(code)
    for code in (0, 1004, 1005, 1006, 1015, 2999, 5000):
        with pytest.raises(ValueError, match="close code"):
            check_close_code(code)
    assert exit_code(None) == (1000, "")
    assert exit_code(ConnectionClosed()) == (1000, "")
    assert exit_code(ExceptionGroup("g", [ConnectionClosed()])) == (1000, "")
    assert exit_code(KeyboardInterrupt()) == (1001, "going away")
    assert exit_code(ValueError()) == (1011, "internal error")
    assert exit_code(ExceptionGroup("g", [ConnectionClosed(), ValueError()]))[0] == 1011
