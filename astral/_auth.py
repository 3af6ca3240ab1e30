"""JWT authentication: the principal checks a worker's token before the upgrade.

This is the only astral module that imports joserfc. joserfc supplies the keys
(PEM, JWK, JWKS) and the signature algorithms; this module does the parsing and
the policy itself, so that the order of the checks and the error messages are
ours and nothing foreign ever escapes :meth:`JWTVerifier.verify`.

Theory of operation. :meth:`JWTVerifier.verify` looks at a token in a fixed
order and stops at the first failure, each step trusting only what the steps
before it established:

1. **Size.** ``len(token) <= max_token_size``, before any parsing.
2. **Shape.** Three non-empty base64url segments (canonical, unpadded); the
   header is a UTF-8 JSON object without duplicate names. Five segments
   (JWE) are refused outright.
3. **Header.** ``alg`` is in the configured allowlist, never ``none``; the
   parameters that fetch or embed keys (``jku``, ``x5u``, ``jwk``, ``x5c``)
   are refused, so are ``crit`` and an unencoded payload (``b64``).
4. **Key.** A single key is used whatever the ``kid``. With a key set the
   ``kid`` picks the key: an unknown one fails with ``"unknown key id"``, and a
   token without ``kid`` is refused unless the set holds exactly one usable key.
   The key's type must match the algorithm's family (an RSA key never checks
   an ``HS256`` MAC), decided once in ``__init__``.
5. **Signature.**
6. **Claims**, only once the signature holds: required claims, types,
   ``exp``/``nbf``/``iat`` with leeway, ``iss``, ``aud``, maximum lifetime.

Every failure is an :class:`~astral.AuthenticationError` with a short message
that never quotes the token. Errors are raised outside ``except`` blocks, so
neither ``__cause__`` nor ``__context__`` carries an exception that might.
"""

from __future__ import annotations

import base64
import inspect
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias, cast

from joserfc.errors import JoseError
from joserfc.jwa import JWS_ALGORITHMS, JWSAlgModel
from joserfc.jwk import ECKey, Key, KeySet, KeySetSerialization, OctKey, OKPKey, RSAKey, import_key

from ._exceptions import AuthenticationError

__all__ = ["JWTVerifier", "Verifier", "mint_token", "verify_token"]

Verifier: TypeAlias = Callable[[str], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]
"""What a server accepts to check tokens: a :class:`JWTVerifier`, or any callable
taking the token and returning its claims (or an awaitable of them), raising to
refuse it. Run it with :func:`verify_token`."""

_KeyMaterial: TypeAlias = str | bytes | Key | KeySet | Mapping[str, Any]

# Every JWS algorithm joserfc implements, except "none", which can never be allowed.
_ALGORITHMS: dict[str, JWSAlgModel] = {
    alg.name: alg for alg in JWS_ALGORITHMS if alg.name.lower() != "none"
}
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MIN_SECRET_BYTES = 32
# Header parameters that fetch or embed a key: honouring them lets the token choose its key.
_KEY_HEADERS = ("jku", "x5u", "jwk", "x5c")
_SIGNATURE_CURVES = ("Ed25519", "Ed448")  # OKP keys on X25519/X448 are for key agreement
_COMPACT = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
_PEM_MARKER = b"-----BEGIN "

_Entry: TypeAlias = tuple[Key, frozenset[str]]  # a key and the allowed algorithms it fits


class JWTVerifier:
    """Checks JSON Web Tokens (JWS compact form) against a key and a policy.

    Build one per server and call it once per connection; keys and the
    algorithm/key pairing are prepared here, so :meth:`verify` only parses,
    looks up and checks. The key is copied in: mutating a :class:`KeySet`
    afterwards has no effect; to rotate keys, build a new verifier.

    HMAC secrets shorter than 32 bytes are refused (``ValueError``), and
    ``HS384``/``HS512`` only use secrets of at least 48/64 bytes, as RFC 7518
    requires. ``EdDSA`` and ``Ed25519``/``Ed448`` (RFC 9864) are both accepted.

    Args:
        key: What checks the signatures: a shared secret (``str``, encoded as
            UTF-8, or ``bytes``) for ``HS*``; a PEM public key (or private key,
            or certificate) as ``str`` or ``bytes``; a joserfc key; a joserfc
            :class:`~joserfc.jwk.KeySet`; a JWKS document (a mapping with
            ``"keys"``), where tokens pick their key by ``kid``; or a single JWK
            mapping. Text containing a PEM header is never used as a secret.
        algorithms: The allowlist of ``alg`` values, required. Never read from
            the token.
        issuer: When set, the ``iss`` claim must be present and equal to it.
        audience: When set, the ``aud`` claim (a string or a list) must be
            present and name one of these. When not set, a token carrying
            ``aud`` is refused (RFC 7519 section 4.1.3).
        leeway: Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
        max_lifetime: Longest accepted ``exp - iat`` in seconds (``exp - now``,
            plus leeway, when there is no ``iat``); ``None`` for no limit.
            When set, ``exp`` is required whatever ``required_claims`` says.
        max_token_size: Longest accepted token, in characters.
        required_claims: Claims that must be present (and not ``null``).
        clock: Returns the current time as a POSIX timestamp; for tests.

    Raises:
        ValueError: An empty or unknown algorithm list, ``none`` in it, a short
            secret, a key that could not be loaded, a key that fits none of the
            algorithms, or an out-of-range limit.
        TypeError: ``algorithms`` given as a single string, or a key of an
            unsupported type.
    """

    def __init__(
        self,
        key: _KeyMaterial,
        *,
        algorithms: Sequence[str],
        issuer: str | None = None,
        audience: str | Sequence[str] | None = None,
        leeway: float = 30.0,
        max_lifetime: float | None = 86400.0,
        max_token_size: int = 16 * 1024,
        required_claims: Sequence[str] = ("exp",),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._algorithms = _algorithm_models(algorithms)
        if not math.isfinite(leeway) or leeway < 0:
            raise ValueError("leeway must be a finite number of seconds >= 0")
        if max_lifetime is not None and not (math.isfinite(max_lifetime) and max_lifetime > 0):
            raise ValueError("max_lifetime must be a finite number of seconds > 0, or None")
        if max_token_size <= 0:
            raise ValueError("max_token_size must be > 0")
        if isinstance(required_claims, str):
            raise TypeError("required_claims must be a sequence of names, not a str")
        if issuer is not None and not issuer:
            raise ValueError("issuer must not be empty")
        self._audience: frozenset[str] | None = None
        if audience is not None:
            self._audience = frozenset([audience] if isinstance(audience, str) else audience)
            if not self._audience or not all(isinstance(a, str) and a for a in self._audience):
                raise ValueError("audience must be a non-empty string or strings")

        required = dict.fromkeys(required_claims)
        if issuer is not None:
            required["iss"] = None
        if audience is not None:
            required["aud"] = None
        if max_lifetime is not None:
            required["exp"] = None
        self._required = tuple(required)
        self._issuer = issuer
        self._leeway = float(leeway)
        self._max_lifetime = max_lifetime
        self._max_token_size = max_token_size
        self._clock = clock

        keys, self._is_set = _load_keys(key)
        entries: list[_Entry] = []
        for candidate in keys:
            fits = frozenset(
                name for name, alg in self._algorithms.items() if _fits(alg, candidate, "verify")
            )
            if fits:
                entries.append((candidate, fits))
        if not entries:
            raise ValueError(
                "the key fits none of the allowed algorithms (wrong key type, or an HMAC "
                "secret shorter than the hash)"
            )
        self._entries = tuple(entries)
        self._by_kid: dict[str, tuple[_Entry, ...]] = {}
        for entry in entries if self._is_set else ():
            kid = entry[0].kid
            if kid is not None:  # pragma: no branch - KeySet gives every key a kid
                self._by_kid[kid] = (*self._by_kid.get(kid, ()), entry)
        # A token without kid may use a set only when there is no choice to make.
        self._sole = self._entries if len(self._entries) == 1 else None

    @property
    def leeway(self) -> float:
        """Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
        return self._leeway

    def __repr__(self) -> str:
        # Never the key: a secret must not end up in a log line.
        return (
            f"JWTVerifier(algorithms={sorted(self._algorithms)!r}, issuer={self._issuer!r}, "
            f"audience={sorted(self._audience) if self._audience else None!r}, "
            f"keys={len(self._entries)})"
        )

    def verify(self, token: str) -> dict[str, Any]:
        """Checks a token and returns its claims.

        Args:
            token: The JWT in compact form (``header.payload.signature``).

        Returns:
            The verified claims, a fresh ``dict``.

        Raises:
            AuthenticationError: For any reason the token is not accepted, with a
                short message such as ``"token too large"``, ``"malformed token"``,
                ``"algorithm not allowed"``, ``"unknown key id"``,
                ``"invalid signature"`` or ``"token expired"``. Nothing else
                escapes, whatever the input.
        """
        try:
            return self._verify(token)
        except AuthenticationError:
            raise
        except Exception:  # noqa: BLE001
            # Hostile input tripped something unexpected in joserfc or cryptography. Its
            # message or attributes may quote the token, so it is dropped, not chained.
            error = AuthenticationError("invalid token")
        raise error

    __call__ = verify

    def _verify(self, token: str) -> dict[str, Any]:
        if not isinstance(token, str):
            raise AuthenticationError("malformed token")
        if not token:
            raise AuthenticationError("missing token")
        if len(token) > self._max_token_size:
            raise AuthenticationError("token too large")
        match = _COMPACT.fullmatch(token)
        if match is None:
            if token.count(".") == 4:
                raise AuthenticationError("encrypted tokens are not supported")
            raise AuthenticationError("malformed token")
        header_segment, payload_segment, signature_segment = match.groups()

        header = _json_object(header_segment)
        if header is None or not isinstance(alg_name := header.get("alg"), str):
            raise AuthenticationError("malformed token")
        alg = self._algorithms.get(alg_name)
        if alg is None or alg_name.lower() == "none":
            raise AuthenticationError("algorithm not allowed")
        if "crit" in header:
            raise AuthenticationError("critical header parameters are not supported")
        for name in _KEY_HEADERS:
            if name in header:
                raise AuthenticationError(f"header parameter {name!r} not allowed")
        if header.get("b64", True) is not True:
            raise AuthenticationError("unencoded payloads are not supported")
        kid = header.get("kid")
        if "kid" in header and not isinstance(kid, str):
            raise AuthenticationError("malformed token")

        key = self._select_key(alg_name, kid)
        signature = _b64decode(signature_segment)
        signing_input = token[: match.end(2)].encode("ascii")
        if signature is None or not alg.verify(signing_input, signature, key):
            raise AuthenticationError("invalid signature")

        claims = _json_object(payload_segment)
        if claims is None:
            raise AuthenticationError("malformed claims")
        self._check_claims(claims)
        return claims

    def _select_key(self, alg: str, kid: str | None) -> Key:
        if not self._is_set:
            candidates = self._entries
        elif kid is None:
            if self._sole is None:
                raise AuthenticationError("missing key id")
            candidates = self._sole
        else:
            found = self._by_kid.get(kid)
            if found is None:
                raise AuthenticationError("unknown key id")
            candidates = found
        for key, fits in candidates:
            if alg in fits:
                return key
        raise AuthenticationError("algorithm does not match key")

    def _check_claims(self, claims: dict[str, Any]) -> None:
        for name in self._required:
            if claims.get(name) is None:
                raise AuthenticationError(f"missing claim {name!r}")
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _is_numeric_date(claims[name]):
                raise AuthenticationError(f"invalid claim {name!r}")
        for name in ("iss", "sub", "jti"):
            if name in claims and not _is_text(claims[name]):
                raise AuthenticationError(f"invalid claim {name!r}")
        audience: frozenset[str] | None = None
        if "aud" in claims:
            audience = _audience_of(claims["aud"])
            if audience is None:
                raise AuthenticationError("invalid claim 'aud'")

        now = self._clock()
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        # Same comparisons as joserfc's JWTClaimsRegistry, in floats.
        if exp is not None and exp <= now - self._leeway:
            raise AuthenticationError("token expired")
        if nbf is not None and nbf > now + self._leeway:
            raise AuthenticationError("token not yet valid")
        if iat is not None and iat > now + self._leeway:
            raise AuthenticationError("token issued in the future")

        if self._issuer is not None and claims["iss"] != self._issuer:
            raise AuthenticationError("issuer not accepted")
        if audience is not None and (self._audience is None or not audience & self._audience):
            raise AuthenticationError("audience not accepted")

        if self._max_lifetime is not None and exp is not None:  # exp is required then
            if iat is not None:
                too_long = exp - iat > self._max_lifetime
            else:
                too_long = exp - now > self._max_lifetime + self._leeway
            if too_long:
                raise AuthenticationError("token lifetime too long")


async def verify_token(verifier: Verifier, token: str | None) -> dict[str, Any]:
    """Runs a verifier, sync or async, on a token and returns the claims.

    Sync verifiers run inline on the event loop: they must be quick (a
    :class:`JWTVerifier` is). A verifier that blocks should be async.

    Args:
        verifier: A :class:`JWTVerifier` or any ``verify(token) -> claims``
            callable, returning a mapping or an awaitable of one.
        token: The token the peer presented, or ``None`` if it sent none.

    Returns:
        The claims, copied into a fresh ``dict``.

    Raises:
        AuthenticationError: ``"missing token"`` when the token is ``None`` or
            empty; the verifier's own :class:`AuthenticationError` unchanged; a
            new one, naming only the exception type, when the verifier raises
            any other :class:`Exception` (it is not chained, since it may quote
            the token); and one when the verifier returns something that is not
            a mapping.
    """
    if token is None or token == "":
        raise AuthenticationError("missing token")
    if not isinstance(token, str):
        raise AuthenticationError("malformed token")
    try:
        result: object = verifier(token)
        if inspect.isawaitable(result):
            result = await result
    except AuthenticationError:
        raise
    except Exception as exc:  # noqa: BLE001
        # Not chained: a custom verifier's error may quote the token.
        failure = f"token rejected by verifier ({type(exc).__name__})"
    else:
        if isinstance(result, Mapping):
            return dict(result)
        failure = "verifier returned no claims"
    raise AuthenticationError(failure)


def mint_token(
    key: _KeyMaterial,
    *,
    subject: str,
    algorithm: str = "HS256",
    expires_in: float = 300.0,
    issuer: str | None = None,
    audience: str | None = None,
    kid: str | None = None,
    claims: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """Signs a token for a worker (or a test).

    Sets ``sub``, ``iat``, ``nbf`` (both ``now`` rounded down to the second) and
    ``exp`` (``iat + expires_in``), and ``iss``, ``aud`` and the ``kid`` header
    when given. With a key set, the key is chosen by ``kid`` (required when
    several keys could sign) and its ``kid`` always goes in the header.

    Args:
        key: The signing key: an HMAC secret (32 bytes or more), a PEM private
            key, a joserfc key, a :class:`~joserfc.jwk.KeySet`, a JWKS mapping
            or a JWK mapping.
        subject: The ``sub`` claim: who the worker is.
        algorithm: The ``alg`` to sign with.
        expires_in: Seconds from ``iat`` to ``exp``; may be negative (expired).
        issuer: The ``iss`` claim, if any.
        audience: The ``aud`` claim, if any (pass a list in ``claims`` for
            several).
        kid: The ``kid`` header; also picks the key from a key set.
        claims: Extra claims. They may not repeat a claim set above.
        now: The issue time as a POSIX timestamp; defaults to the current time.

    Returns:
        The token in compact form.

    Raises:
        ValueError: An unknown algorithm or ``none``, a short secret, a key
            that cannot sign with ``algorithm``, an ambiguous or unknown ``kid``,
            a non-finite time, a repeated claim, or claims JSON cannot carry.
        TypeError: A key of an unsupported type, or claims that are not JSON.
    """
    alg = _ALGORITHMS.get(algorithm)
    if alg is None:
        raise ValueError(f"unsupported algorithm {algorithm!r}")
    issued_at = time.time() if now is None else now
    if not (math.isfinite(issued_at) and math.isfinite(expires_in)):
        raise ValueError("now and expires_in must be finite")

    keys, is_set = _load_keys(key)
    if is_set and kid is not None:
        keys = [k for k in keys if k.kid == kid]
    signers = [k for k in keys if _fits(alg, k, "sign")]
    if not signers:
        raise ValueError(
            f"no key can sign with {algorithm} (wrong key type, public key, or short secret)"
        )
    if is_set and len(signers) > 1:
        raise ValueError("several keys in the set could sign: pass kid to choose one")
    signer = signers[0]
    if is_set:
        kid = signer.kid

    issued = math.floor(issued_at)
    exp = issued + expires_in
    body: dict[str, Any] = {
        "sub": subject,
        "iat": issued,
        "nbf": issued,
        "exp": int(exp) if float(exp).is_integer() else exp,
    }
    if issuer is not None:
        body["iss"] = issuer
    if audience is not None:
        body["aud"] = audience
    for name, value in (claims or {}).items():
        if name in body:
            raise ValueError(f"claim {name!r} is set by mint_token; use its parameter")
        body[name] = value
    header: dict[str, Any] = {"alg": algorithm, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid

    signing_input = _b64json(header) + b"." + _b64json(body)
    return (signing_input + b"." + _b64encode(alg.sign(signing_input, signer))).decode("ascii")


# --- keys and algorithms -------------------------------------------------------------


def _algorithm_models(names: Sequence[str]) -> dict[str, JWSAlgModel]:
    if isinstance(names, str):
        raise TypeError("algorithms must be a sequence of names, not a str")
    models: dict[str, JWSAlgModel] = {}
    for name in names:
        if not isinstance(name, str) or name.lower() == "none":
            raise ValueError("algorithm 'none' can never be allowed")
        model = _ALGORITHMS.get(name)
        if model is None:
            raise ValueError(f"unsupported algorithm {name!r}")
        models[name] = model
    if not models:
        raise ValueError("algorithms must name at least one algorithm")
    return models


def _fits(alg: JWSAlgModel, key: Key, operation: str) -> bool:
    """Tells whether a key may sign or verify with an algorithm."""
    try:
        # Key type and curve against the algorithm family; the key's own use, alg, key_ops.
        alg.check_key(key)
        key.check_key_op(operation)
    except JoseError:
        return False
    if isinstance(key, OctKey):
        return len(key.raw_value) >= _HMAC_MIN_BYTES.get(alg.name, _MIN_SECRET_BYTES)
    if isinstance(key, OKPKey):
        return key.curve_name in _SIGNATURE_CURVES
    return True


def _load_keys(key: _KeyMaterial) -> tuple[list[Key], bool]:
    """Turns what the caller passed into joserfc keys; tells whether it was a set."""
    if isinstance(key, KeySet):
        keys, is_set = list(key.keys), True
    elif isinstance(key, OctKey | RSAKey | ECKey | OKPKey):
        keys, is_set = [key], False
    elif isinstance(key, str | bytes):
        data = key.encode("utf-8") if isinstance(key, str) else key
        keys, is_set = [_import_bytes(data)], False
    elif isinstance(key, Mapping):
        try:
            if "keys" in key:
                keys, is_set = (
                    list(KeySet.import_key_set(cast(KeySetSerialization, dict(key)))),
                    True,
                )
            else:
                keys, is_set = [import_key(dict(key))], False
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"could not load the JWK: {exc}") from exc
    else:
        raise TypeError(f"unsupported key type {type(key).__name__}")
    for k in keys:
        if isinstance(k, OctKey) and len(k.raw_value) < _MIN_SECRET_BYTES:
            raise ValueError(f"HMAC secrets must be at least {_MIN_SECRET_BYTES} bytes")
    return keys, is_set


def _import_bytes(data: bytes) -> Key:
    if _PEM_MARKER not in data:
        # Checked before import: joserfc only warns below 14 bytes.
        if len(data) < _MIN_SECRET_BYTES:
            raise ValueError(f"HMAC secrets must be at least {_MIN_SECRET_BYTES} bytes")
        try:
            return OctKey.import_key(data)
        except (JoseError, ValueError) as exc:  # an SSH public key, for one
            raise ValueError(f"could not use the key as an HMAC secret: {exc}") from exc
    # Anything PEM is an asymmetric key, never a secret: no algorithm confusion.
    for key_type in (RSAKey, ECKey, OKPKey):
        try:
            return key_type.import_key(data)
        except (JoseError, ValueError, TypeError):
            continue
    raise ValueError("could not load the PEM key (RSA, EC or OKP expected)")


# --- encoding ------------------------------------------------------------------------


def _b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64json(value: Mapping[str, Any]) -> bytes:
    return _b64encode(
        json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    )


def _b64decode(segment: str) -> bytes | None:
    """Decodes canonical unpadded base64url, or returns ``None``.

    The segment already matched ``[A-Za-z0-9_-]+``; non-canonical spellings
    (stray low bits in the last character) are refused so a token has one form.
    """
    if len(segment) % 4 == 1:
        return None
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if _b64encode(raw) != segment.encode("ascii"):
        return None
    return raw


def _json_object(segment: str) -> dict[str, Any] | None:
    """Decodes a segment holding a JSON object, or returns ``None``."""
    raw = _b64decode(segment)
    if raw is None:
        return None
    try:
        value = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_unique_names, parse_constant=_no_constant
        )
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, duplicates, deep nesting
        return None
    return value if isinstance(value, dict) else None


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate names are read differently by different parsers; refuse them.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate name")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# --- claims --------------------------------------------------------------------------


def _is_numeric_date(value: object) -> bool:
    # A JSON number, finite; bool is an int in Python but not a number in JSON.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _is_text(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")  # refuses lone surrogates, which "\ud800" in JSON can produce
    except UnicodeEncodeError:
        return False
    return True


def _audience_of(value: object) -> frozenset[str] | None:
    if _is_text(value):
        return frozenset([cast(str, value)])
    if isinstance(value, list) and value and all(_is_text(v) for v in value):
        return frozenset(cast(Iterable[str], value))
    return None
