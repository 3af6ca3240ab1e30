"""JWT verification: order of checks, algorithm confusion, claims, hostile input, no leaks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwe, jwt
from joserfc.jwk import ECKey, KeySet, OctKey, OKPKey, RSAKey

from astral._auth import JWTVerifier, mint_token, verify_token
from astral._exceptions import AuthenticationError

from .helpers import plain_id

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

SECRET = b"0123456789abcdef0123456789abcdef"  # exactly 32 bytes
NOW = 1_700_000_000.0
LEEWAY = 30.0
NOT_UTF8 = b"\xff\xfe\xfd not utf-8"
HUGE_KID = b'{"alg": "HS256", "kid": ' + b"9" * 5000 + b"}"


# --- helpers -------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def seg(value: Any) -> str:
    return b64(value if isinstance(value, bytes) else json.dumps(value).encode())


def hs_token(header: Any, claims: Any, secret: bytes = SECRET, digest: Any = hashlib.sha256) -> str:
    """A token built by hand, so the header and payload can be anything."""
    signing_input = f"{seg(header)}.{seg(claims)}"
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(mac)}"


def good_claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "worker-1", "iat": NOW, "exp": NOW + 300, **extra}


def make_verifier(key: Any = SECRET, *, at: float = NOW, **kwargs: Any) -> JWTVerifier:
    kwargs.setdefault("algorithms", ["HS256"])
    return JWTVerifier(key, clock=lambda: at, **kwargs)


def rejection(verify: Callable[[str], Any], token: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        verify(token)
    return info.value


def reason(verify: Callable[[str], Any], token: str) -> str:
    return str(rejection(verify, token))


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048)


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256")


@pytest.fixture(scope="module")
def ed_key() -> OKPKey:
    return OKPKey.generate_key("Ed25519")


# --- happy paths ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "secret"),
    [("HS256", b"k" * 32), ("HS384", b"k" * 48), ("HS512", b"k" * 64)],
)
def test_hmac_algorithms_round_trip(algorithm: str, secret: bytes) -> None:
    token = mint_token(secret, subject="w", algorithm=algorithm, now=NOW)
    claims = make_verifier(secret, algorithms=[algorithm]).verify(token)
    assert claims == {"sub": "w", "iat": int(NOW), "nbf": int(NOW), "exp": int(NOW) + 300}


@pytest.mark.parametrize(
    ("algorithm", "fixture"),
    [
        ("RS256", "rsa_key"),
        ("PS256", "rsa_key"),
        ("ES256", "ec_key"),
        ("EdDSA", "ed_key"),
        ("Ed25519", "ed_key"),
    ],
)
@pytest.mark.parametrize("form", ["pem-bytes", "pem-str", "key", "jwk", "jwks"])
def test_asymmetric_algorithms_round_trip(
    algorithm: str, fixture: str, form: str, request: pytest.FixtureRequest
) -> None:
    private: RSAKey | ECKey | OKPKey = request.getfixturevalue(fixture)
    public = type(private).import_key(private.as_dict(private=False))
    key: Any = {
        "pem-bytes": public.as_pem(),
        "pem-str": public.as_pem().decode(),
        "key": public,
        "jwk": public.as_dict(),
        "jwks": {"keys": [public.as_dict()]},
    }[form]
    token = mint_token(private, subject="w", algorithm=algorithm, now=NOW)
    assert make_verifier(key, algorithms=[algorithm]).verify(token)["sub"] == "w"


def test_call_is_verify() -> None:
    token = mint_token(SECRET, subject="w", now=NOW)
    verifier = make_verifier()
    assert verifier(token) == verifier.verify(token)


def test_str_secret_is_utf8() -> None:
    token = mint_token(SECRET, subject="w", now=NOW)
    assert make_verifier(SECRET.decode()).verify(token)["sub"] == "w"


def test_verify_returns_a_fresh_dict() -> None:
    token = mint_token(SECRET, subject="w", now=NOW)
    verifier = make_verifier()
    first = verifier.verify(token)
    first["sub"] = "changed"
    assert verifier.verify(token)["sub"] == "w"


def test_interoperates_with_joserfc(rsa_key: RSAKey) -> None:
    theirs = jwt.encode({"alg": "RS256"}, good_claims(), rsa_key)
    assert make_verifier(rsa_key, algorithms=["RS256"]).verify(theirs)["sub"] == "worker-1"
    ours = mint_token(rsa_key, subject="w", algorithm="RS256", audience="p", issuer="i")
    decoded = jwt.decode(ours, rsa_key, algorithms=["RS256"])
    assert decoded.header == {"alg": "RS256", "typ": "JWT"}
    assert decoded.claims["aud"] == "p"
    assert decoded.claims["iss"] == "i"


def test_repr_never_shows_the_secret() -> None:
    text = repr(make_verifier(audience=["b", "a"], issuer="me"))
    assert SECRET.decode() not in text
    assert "HS256" in text
    assert "['a', 'b']" in text


def test_repr_of_a_verifier_without_audience_or_issuer() -> None:
    assert repr(make_verifier()) == (
        "JWTVerifier(algorithms=['HS256'], issuer=None, audience=None, keys=1)"
    )


# --- configuration -------------------------------------------------------------------


def test_algorithms_is_required_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        JWTVerifier(SECRET)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        JWTVerifier(SECRET, ["HS256"])  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("algorithms", "error"),
    [
        ([], ValueError),
        (["none"], ValueError),
        (["HS256", "NONE"], ValueError),
        (["None"], ValueError),
        (["HS265"], ValueError),
        (["A256GCM"], ValueError),  # a JWE algorithm
        ("HS256", TypeError),  # a str is a sequence of one-letter names
    ],
)
def test_bad_algorithm_lists_are_refused(algorithms: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        JWTVerifier(SECRET, algorithms=algorithms)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"leeway": -1},
        {"leeway": float("inf")},
        {"leeway": float("nan")},
        {"max_lifetime": 0},
        {"max_lifetime": float("nan")},
        {"max_token_size": 0},
        {"issuer": ""},
        {"audience": []},
        {"audience": ""},
        {"audience": ["ok", ""]},
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        JWTVerifier(SECRET, algorithms=["HS256"], **kwargs)


def test_required_claims_as_a_str_is_refused() -> None:
    with pytest.raises(TypeError):
        JWTVerifier(SECRET, algorithms=["HS256"], required_claims="exp")


def test_short_hmac_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        JWTVerifier(b"x" * 31, algorithms=["HS256"])
    with pytest.raises(ValueError, match="32 bytes"):
        JWTVerifier("short", algorithms=["HS256"])
    with pytest.raises(ValueError, match="32 bytes"):
        mint_token(b"x" * 31, subject="w")


def test_hmac_secret_must_be_as_long_as_the_hash() -> None:
    with pytest.raises(ValueError, match="fits none"):
        JWTVerifier(b"x" * 32, algorithms=["HS512"])
    # Usable for HS256 only: an HS512 token then fails at the key step.
    verifier = make_verifier(b"x" * 32, algorithms=["HS256", "HS512"])
    token = hs_token({"alg": "HS512"}, good_claims(), b"x" * 32, hashlib.sha512)
    assert reason(verifier, token) == "algorithm does not match key"


def test_pem_is_never_used_as_a_secret(rsa_key: RSAKey) -> None:
    with pytest.raises(ValueError, match="fits none"):
        JWTVerifier(rsa_key.as_pem(private=False), algorithms=["HS256"])
    with pytest.raises(ValueError, match="PEM"):
        JWTVerifier(b"-----BEGIN PUBLIC KEY-----\ngarbage\n" + b"x" * 40, algorithms=["HS256"])


def test_short_secrets_are_refused_in_every_form() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        JWTVerifier(OctKey.import_key(b"x" * 20), algorithms=["HS256"])
    with pytest.raises(ValueError, match="32 bytes"):
        JWTVerifier({"keys": [{"kty": "oct", "k": b64(b"x" * 20)}]}, algorithms=["HS256"])


def test_ssh_public_key_is_not_a_secret(rsa_key: RSAKey) -> None:
    ssh = rsa_key.public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    with pytest.raises(ValueError, match="HMAC secret"):
        JWTVerifier(ssh, algorithms=["HS256"])


@pytest.mark.parametrize(
    ("key", "name"), [(None, "NoneType"), (42, "int"), (["k"], "list"), (object(), "object")]
)
def test_unsupported_key_types_are_refused(key: Any, name: str) -> None:
    for use in (
        lambda: JWTVerifier(key, algorithms=["HS256"]),
        lambda: mint_token(key, subject="w"),
    ):
        with pytest.raises(TypeError) as info:
            use()
        assert str(info.value) == f"unsupported key type {name}"


@pytest.mark.parametrize("jwks", [{"keys": []}, {"keys": "nope"}, {"kty": "oct"}, {"kty": "??"}])
def test_broken_jwks_are_refused(jwks: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        JWTVerifier(jwks, algorithms=["HS256"])
    if jwks != {"keys": []}:
        assert str(info.value).startswith("could not load the JWK: ")


def test_a_pem_that_holds_no_key_is_refused_as_such() -> None:
    pem = b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"
    for use in (
        lambda: JWTVerifier(pem, algorithms=["RS256"]),
        lambda: mint_token(pem, subject="w", algorithm="RS256"),
    ):
        with pytest.raises(ValueError) as info:
            use()
        assert str(info.value) == "could not load the PEM key (RSA, EC or OKP expected)"


def test_keys_for_encryption_are_not_used(rsa_key: RSAKey) -> None:
    enc_only = RSAKey.import_key(rsa_key.as_dict(private=False), {"use": "enc"})
    with pytest.raises(ValueError, match="fits none"):
        JWTVerifier(enc_only, algorithms=["RS256"])
    x25519 = OKPKey.generate_key("X25519")
    with pytest.raises(ValueError, match="fits none"):
        JWTVerifier(x25519, algorithms=["EdDSA"])


# --- order: size, header, signature, claims ------------------------------------------


def test_size_is_checked_before_anything_else() -> None:
    verifier = make_verifier(max_token_size=100)
    assert reason(verifier, "!" * 101) == "token too large"
    assert reason(verifier, "!" * 100) == "malformed token"


def test_token_at_the_size_limit_passes() -> None:
    token = mint_token(SECRET, subject="w", now=NOW)
    assert make_verifier(max_token_size=len(token)).verify(token)["sub"] == "w"
    assert reason(make_verifier(max_token_size=len(token) - 1), token) == "token too large"


def test_default_size_limit_is_16_kib() -> None:
    token = mint_token(SECRET, subject="w", now=NOW, claims={"pad": "x" * 16_500})
    assert reason(make_verifier(), token) == "token too large"


def test_header_is_checked_before_signature() -> None:
    token = hs_token({"alg": "HS384"}, good_claims(), b"wrong" * 10, hashlib.sha384)
    assert reason(make_verifier(), token) == "algorithm not allowed"


def test_signature_is_checked_before_claims() -> None:
    expired = good_claims(exp=NOW - 3600, iat=NOW - 7200)
    assert reason(make_verifier(), hs_token({"alg": "HS256"}, expired)) == "token expired"
    forged = hs_token({"alg": "HS256"}, expired, b"wrong" * 10)
    assert reason(make_verifier(), forged) == "invalid signature"


def test_claims_are_not_parsed_before_the_signature() -> None:
    forged = hs_token({"alg": "HS256"}, b"not json", b"wrong" * 10)
    assert reason(make_verifier(), forged) == "invalid signature"
    genuine = hs_token({"alg": "HS256"}, b"not json")
    assert reason(make_verifier(), genuine) == "malformed claims"


# --- header --------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_never_accepted(alg: str) -> None:
    unsigned = f"{seg({'alg': alg})}.{seg(good_claims())}."
    assert reason(make_verifier(), unsigned) == "malformed token"
    with_sig = f"{seg({'alg': alg})}.{seg(good_claims())}.{b64(b'x')}"
    assert reason(make_verifier(), with_sig) == "algorithm not allowed"


def test_alg_outside_the_allowlist_is_refused() -> None:
    token = mint_token(b"k" * 64, subject="w", algorithm="HS512", now=NOW)
    assert reason(make_verifier(b"k" * 64), token) == "algorithm not allowed"


@pytest.mark.parametrize(
    "header",
    [
        {},
        {"alg": None},
        {"alg": 256},
        {"alg": ["HS256"]},
        {"alg": "HS256", "kid": 7},
        {"alg": "HS256", "alg ": "x", "kid": None},
    ],
)
def test_malformed_headers_are_refused(header: dict[str, Any]) -> None:
    token = hs_token(header, good_claims())
    assert reason(make_verifier(), token) == "malformed token"


@pytest.mark.parametrize("name", ["jku", "x5u", "jwk", "x5c"])
def test_key_bearing_header_parameters_are_refused(name: str) -> None:
    # Correctly signed, so only the header parameter can be the reason.
    value: Any = {"kty": "oct", "k": b64(SECRET)} if name == "jwk" else "https://evil.test/k"
    token = hs_token({"alg": "HS256", name: value}, good_claims())
    assert reason(make_verifier(), token) == f"header parameter {name!r} not allowed"


@pytest.mark.parametrize("crit", [["exp"], [], ["b64"], "x"])
def test_crit_is_refused(crit: Any) -> None:
    token = hs_token({"alg": "HS256", "crit": crit, "exp": 1, "b64": True}, good_claims())
    assert reason(make_verifier(), token) == "critical header parameters are not supported"


def test_unencoded_payload_is_refused() -> None:
    token = hs_token({"alg": "HS256", "b64": False}, good_claims())
    assert reason(make_verifier(), token) == "unencoded payloads are not supported"


def test_harmless_extra_header_parameters_are_ignored() -> None:
    header = {"alg": "HS256", "typ": "JWT", "kid": "anything", "x-trace": [1, 2]}
    assert make_verifier().verify(hs_token(header, good_claims()))["sub"] == "worker-1"


def test_duplicate_header_names_are_refused() -> None:
    header = b'{"alg":"none","alg":"HS256"}'
    assert reason(make_verifier(), hs_token(header, good_claims())) == "malformed token"


def test_jwe_is_refused() -> None:
    key = OctKey.import_key(SECRET)
    token = jwt.encode(
        {"alg": "dir", "enc": "A256GCM"}, good_claims(), key, registry=jwe.JWERegistry()
    )
    assert token.count(".") == 4
    assert reason(make_verifier(), token) == "encrypted tokens are not supported"


# --- algorithm confusion -------------------------------------------------------------


def forge_with_public_pem(rsa_key: RSAKey) -> str:
    """The classic attack: an HS256 MAC keyed with the verifier's own public key PEM."""
    return hs_token({"alg": "HS256", "typ": "JWT"}, good_claims(), rsa_key.as_pem(private=False))


def test_hs256_token_keyed_with_rsa_pem_is_refused_by_rs256_verifier(rsa_key: RSAKey) -> None:
    forged = forge_with_public_pem(rsa_key)
    for key in (rsa_key.as_pem(private=False), rsa_key.as_pem(private=False).decode(), rsa_key):
        assert reason(make_verifier(key, algorithms=["RS256"]), forged) == "algorithm not allowed"


def test_hs256_token_keyed_with_rsa_pem_fails_even_when_hs256_is_allowed(rsa_key: RSAKey) -> None:
    forged = forge_with_public_pem(rsa_key)
    for key in (
        rsa_key.as_pem(private=False),
        rsa_key,
        {"keys": [rsa_key.as_dict(private=False)]},
    ):
        verifier = make_verifier(key, algorithms=["HS256", "RS256"])
        assert reason(verifier, forged) == "algorithm does not match key"
    genuine = mint_token(rsa_key, subject="w", algorithm="RS256", now=NOW)
    assert make_verifier(rsa_key, algorithms=["HS256", "RS256"]).verify(genuine)["sub"] == "w"


def test_ec_token_against_rsa_key_is_refused(rsa_key: RSAKey, ec_key: ECKey) -> None:
    token = mint_token(ec_key, subject="w", algorithm="ES256", now=NOW)
    verifier = make_verifier(rsa_key, algorithms=["RS256", "ES256"])
    assert reason(verifier, token) == "algorithm does not match key"


def test_token_signed_by_another_key_is_refused(rsa_key: RSAKey) -> None:
    other = RSAKey.generate_key(2048)
    token = mint_token(other, subject="w", algorithm="RS256", now=NOW)
    assert reason(make_verifier(rsa_key, algorithms=["RS256"]), token) == "invalid signature"


# --- key sets and rotation -----------------------------------------------------------


def two_key_jwks() -> dict[str, Any]:
    return {
        "keys": [
            {"kty": "oct", "kid": "a", "k": b64(b"a" * 32)},
            {"kty": "oct", "kid": "b", "k": b64(b"b" * 32)},
        ]
    }


def test_rotation_by_kid() -> None:
    jwks = two_key_jwks()
    token_a = mint_token(jwks, subject="wa", kid="a", now=NOW)
    token_b = mint_token(jwks, subject="wb", kid="b", now=NOW)
    both = make_verifier(jwks)
    assert both.verify(token_a)["sub"] == "wa"
    assert both.verify(token_b)["sub"] == "wb"

    rotated = make_verifier({"keys": [jwks["keys"][1]]})
    assert reason(rotated, token_a) == "unknown key id"
    assert rotated.verify(token_b)["sub"] == "wb"


def test_keyset_object_works_like_a_jwks() -> None:
    keys = KeySet.import_key_set(two_key_jwks())  # type: ignore[arg-type]
    token = mint_token(keys, subject="w", kid="b", now=NOW)
    assert make_verifier(keys).verify(token)["sub"] == "w"


def test_kid_selects_the_key_not_just_any_key_that_works() -> None:
    # Signed with key b but labelled a: key a must be tried, and fail.
    token = hs_token({"alg": "HS256", "kid": "a"}, good_claims(), b"b" * 32)
    assert reason(make_verifier(two_key_jwks()), token) == "invalid signature"


def test_keys_sharing_a_kid_are_all_tried_in_order() -> None:
    # A JWKS may list two keys under one kid (say, during a rotation): a token
    # with that kid is checked against the first key that fits its algorithm.
    jwks = {
        "keys": [
            {"kty": "oct", "kid": "k", "k": b64(b"a" * 32)},
            {"kty": "oct", "kid": "k", "k": b64(b"b" * 32)},
        ]
    }
    token = hs_token({"alg": "HS256", "kid": "k"}, good_claims(), b"a" * 32)
    assert make_verifier(jwks).verify(token)["sub"] == "worker-1"


def test_token_without_kid_is_refused_by_a_multi_key_set() -> None:
    token = hs_token({"alg": "HS256"}, good_claims(), b"a" * 32)
    assert reason(make_verifier(two_key_jwks()), token) == "missing key id"


def test_token_without_kid_is_accepted_by_a_single_key_set() -> None:
    token = hs_token({"alg": "HS256"}, good_claims(), b"b" * 32)
    single = {"keys": [two_key_jwks()["keys"][1]]}
    assert make_verifier(single).verify(token)["sub"] == "worker-1"


def test_single_key_ignores_kid() -> None:
    token = hs_token({"alg": "HS256", "kid": "whatever"}, good_claims())
    assert make_verifier().verify(token)["sub"] == "worker-1"


def test_mixed_key_set(rsa_key: RSAKey, ec_key: ECKey) -> None:
    jwks = {
        "keys": [
            {**rsa_key.as_dict(private=False), "kid": "r"},
            {**ec_key.as_dict(private=False), "kid": "e"},
        ]
    }
    verifier = make_verifier(jwks, algorithms=["RS256", "ES256"])
    rs = mint_token(rsa_key, subject="r", algorithm="RS256", kid="r", now=NOW)
    es = mint_token(ec_key, subject="e", algorithm="ES256", kid="e", now=NOW)
    assert verifier.verify(rs)["sub"] == "r"
    assert verifier.verify(es)["sub"] == "e"
    mislabelled = mint_token(ec_key, subject="e", algorithm="ES256", kid="r", now=NOW)
    assert reason(verifier, mislabelled) == "algorithm does not match key"


def test_key_pinned_to_an_algorithm(rsa_key: RSAKey) -> None:
    pinned = {"keys": [{**rsa_key.as_dict(private=False), "kid": "r", "alg": "PS256"}]}
    verifier = make_verifier(pinned, algorithms=["RS256", "PS256"])
    ps = mint_token(rsa_key, subject="w", algorithm="PS256", kid="r", now=NOW)
    rs = mint_token(rsa_key, subject="w", algorithm="RS256", kid="r", now=NOW)
    assert verifier.verify(ps)["sub"] == "w"
    assert reason(verifier, rs) == "algorithm does not match key"


def test_verifier_keeps_its_own_copy_of_the_key_set() -> None:
    keys = KeySet.import_key_set(two_key_jwks())  # type: ignore[arg-type]
    verifier = make_verifier(keys)
    token = mint_token(keys, subject="w", kid="a", now=NOW)
    keys.keys.clear()
    assert verifier.verify(token)["sub"] == "w"


# --- claims --------------------------------------------------------------------------


def test_exp_is_required_by_default() -> None:
    token = hs_token({"alg": "HS256"}, {"sub": "w"})
    assert reason(make_verifier(), token) == "missing claim 'exp'"
    null = hs_token({"alg": "HS256"}, {"sub": "w", "exp": None})
    assert reason(make_verifier(), null) == "missing claim 'exp'"


def test_no_exp_needs_both_knobs_off() -> None:
    token = hs_token({"alg": "HS256"}, {"sub": "w"})
    # max_lifetime implies exp even when required_claims leaves it out.
    assert reason(make_verifier(required_claims=()), token) == "missing claim 'exp'"
    assert make_verifier(required_claims=(), max_lifetime=None).verify(token) == {"sub": "w"}


def test_custom_required_claims() -> None:
    verifier = make_verifier(required_claims=("exp", "sub", "scope"))
    assert reason(verifier, hs_token({"alg": "HS256"}, good_claims())) == "missing claim 'scope'"
    assert verifier.verify(hs_token({"alg": "HS256"}, good_claims(scope="rpc")))["scope"] == "rpc"


@pytest.mark.parametrize(
    ("late_by", "accepted"), [(LEEWAY - 1, True), (LEEWAY, False), (LEEWAY + 1, False)]
)
def test_exp_leeway_boundary(late_by: float, accepted: bool) -> None:
    token = mint_token(SECRET, subject="w", now=NOW, expires_in=60)
    verifier = make_verifier(at=NOW + 60 + late_by)
    if accepted:
        assert verifier.verify(token)["sub"] == "w"
    else:
        assert reason(verifier, token) == "token expired"


@pytest.mark.parametrize(("early_by", "accepted"), [(LEEWAY - 1, True), (LEEWAY + 1, False)])
def test_nbf_leeway_boundary(early_by: float, accepted: bool) -> None:
    token = hs_token({"alg": "HS256"}, {"exp": NOW + 300, "nbf": NOW + early_by})
    if accepted:
        assert make_verifier().verify(token)["nbf"] == NOW + early_by
    else:
        assert reason(make_verifier(), token) == "token not yet valid"


@pytest.mark.parametrize(("ahead_by", "accepted"), [(LEEWAY - 1, True), (LEEWAY + 1, False)])
def test_iat_in_the_future_beyond_leeway_is_refused(ahead_by: float, accepted: bool) -> None:
    token = hs_token({"alg": "HS256"}, {"exp": NOW + 300, "iat": NOW + ahead_by})
    if accepted:
        assert make_verifier().verify(token)["iat"] == NOW + ahead_by
    else:
        assert reason(make_verifier(), token) == "token issued in the future"


def test_leeway_is_configurable() -> None:
    token = mint_token(SECRET, subject="w", now=NOW, expires_in=60)
    assert reason(make_verifier(at=NOW + 61, leeway=0), token) == "token expired"
    assert make_verifier(at=NOW + 59, leeway=0).verify(token)["sub"] == "w"
    assert make_verifier(at=NOW + 60 + 299, leeway=300).verify(token)["sub"] == "w"


def test_clock_is_read_at_each_verify() -> None:
    now = [NOW]
    verifier = JWTVerifier(SECRET, algorithms=["HS256"], clock=lambda: now[0])
    token = mint_token(SECRET, subject="w", now=NOW, expires_in=60)
    assert verifier.verify(token)["sub"] == "w"
    now[0] = NOW + 3600
    assert reason(verifier, token) == "token expired"


def test_real_clock_is_the_default() -> None:
    verifier = JWTVerifier(SECRET, algorithms=["HS256"])
    assert verifier.verify(mint_token(SECRET, subject="w"))["sub"] == "w"
    assert reason(verifier, mint_token(SECRET, subject="w", now=NOW)) == "token expired"


def test_issuer() -> None:
    verifier = make_verifier(issuer="https://principal")
    ok = mint_token(SECRET, subject="w", now=NOW, issuer="https://principal")
    assert verifier.verify(ok)["iss"] == "https://principal"
    wrong = mint_token(SECRET, subject="w", now=NOW, issuer="https://principal/")
    assert reason(verifier, wrong) == "issuer not accepted"
    missing = mint_token(SECRET, subject="w", now=NOW)
    assert reason(verifier, missing) == "missing claim 'iss'"


def test_issuer_not_configured_accepts_any_issuer() -> None:
    token = mint_token(SECRET, subject="w", now=NOW, issuer="anyone")
    assert make_verifier().verify(token)["iss"] == "anyone"


@pytest.mark.parametrize(
    ("configured", "aud", "accepted"),
    [
        ("p1", "p1", True),
        ("p1", ["x", "p1"], True),
        (["p1", "p2"], "p2", True),
        (("p1", "p2"), ["p3", "p2"], True),
        ("p1", "p2", False),
        ("p1", ["p2", "p3"], False),
        ("p1", "P1", False),
    ],
)
def test_audience(configured: Any, aud: Any, accepted: bool) -> None:
    verifier = make_verifier(audience=configured)
    token = mint_token(SECRET, subject="w", now=NOW, claims={"aud": aud})
    if accepted:
        assert verifier.verify(token)["aud"] == aud
    else:
        assert reason(verifier, token) == "audience not accepted"


def test_audience_configured_but_missing() -> None:
    token = mint_token(SECRET, subject="w", now=NOW)
    assert reason(make_verifier(audience="p"), token) == "missing claim 'aud'"


def test_audience_present_but_not_configured_is_refused() -> None:
    token = mint_token(SECRET, subject="w", now=NOW, audience="somebody-else")
    assert reason(make_verifier(), token) == "audience not accepted"


def test_max_lifetime_from_iat() -> None:
    long = mint_token(SECRET, subject="w", now=NOW, expires_in=86401)
    exact = mint_token(SECRET, subject="w", now=NOW, expires_in=86400)
    assert reason(make_verifier(), long) == "token lifetime too long"
    assert make_verifier().verify(exact)["sub"] == "w"
    assert make_verifier(max_lifetime=None).verify(long)["sub"] == "w"
    assert reason(make_verifier(max_lifetime=60), exact) == "token lifetime too long"


def test_max_lifetime_from_now_without_iat() -> None:
    verifier = make_verifier(max_lifetime=600)
    within = hs_token({"alg": "HS256"}, {"exp": NOW + 600 + LEEWAY})
    beyond = hs_token({"alg": "HS256"}, {"exp": NOW + 600 + LEEWAY + 1})
    assert verifier.verify(within)["exp"] == NOW + 600 + LEEWAY
    assert reason(verifier, beyond) == "token lifetime too long"


def test_huge_exp_is_a_lifetime_problem_not_a_crash() -> None:
    token = hs_token({"alg": "HS256"}, {"exp": 10**300, "iat": NOW})
    assert reason(make_verifier(), token) == "token lifetime too long"
    assert make_verifier(max_lifetime=None).verify(token)["exp"] == 10**300


@pytest.mark.parametrize(
    ("claims", "name"),
    [
        ({"exp": True}, "exp"),
        ({"exp": "2030-01-01"}, "exp"),
        ({"exp": [NOW + 300]}, "exp"),
        ({"nbf": False}, "nbf"),
        ({"nbf": "0"}, "nbf"),
        ({"iat": {}}, "iat"),
        ({"iat": None}, "iat"),
        ({"sub": 42}, "sub"),
        ({"sub": None}, "sub"),
        ({"sub": ["w"]}, "sub"),
        ({"iss": 1}, "iss"),
        ({"jti": 1}, "jti"),
        ({"aud": 1}, "aud"),
        ({"aud": []}, "aud"),
        ({"aud": ["ok", 2]}, "aud"),
    ],
)
def test_claim_types_are_checked(claims: dict[str, Any], name: str) -> None:
    payload = {"exp": NOW + 300, **claims}
    token = hs_token({"alg": "HS256"}, payload)
    assert reason(make_verifier(), token) == f"invalid claim {name!r}"


def test_overflowing_exp_is_refused() -> None:
    payload = b'{"exp": 1e400}'  # a JSON number that Python reads as inf
    assert reason(make_verifier(), hs_token({"alg": "HS256"}, payload)) == "invalid claim 'exp'"


def test_lone_surrogate_in_sub_is_refused() -> None:
    payload = b'{"exp": 1700000300, "sub": "\\ud800"}'
    assert reason(make_verifier(), hs_token({"alg": "HS256"}, payload)) == "invalid claim 'sub'"


@pytest.mark.parametrize(
    "payload",
    [
        b"[1, 2]",
        b'"a string"',
        b"null",
        b'{"exp": NaN}',
        b'{"exp": Infinity}',
        b'{"exp": 1, "exp": 1700000300}',
        b'{"exp": 1' + b"0" * 5000 + b"}",
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",  # UTF-8 BOM
        b"[" * 5000,
    ],
    ids=plain_id,
)
def test_malformed_claims(payload: bytes) -> None:
    assert reason(make_verifier(), hs_token({"alg": "HS256"}, payload)) == "malformed claims"


def test_unknown_claims_are_returned_untouched() -> None:
    extra = {"scope": ["a", "b"], "nested": {"x": 1}, "n": 1.5, "u": "\u00e9\U0001f600"}
    token = mint_token(SECRET, subject="w", now=NOW, claims=extra)
    assert make_verifier().verify(token).items() >= extra.items()


# --- hostile input -------------------------------------------------------------------


def hostile_tokens() -> list[str]:
    good = mint_token(SECRET, subject="w", now=NOW)
    h, p, s = good.split(".")
    return [
        "",
        ".",
        "..",
        "...",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "a.b.c.d.e",
        "a.b.c.d.e.f",
        f"{h}.{p}",
        f"{h}.{p}.{s}.",
        f".{p}.{s}",
        f"{h}..{s}",
        f"{h}.{p}.",
        f"{h}.{s}.{p}",
        f"{p}.{h}.{s}",
        f"{h}={p}.{s}",
        f"{h}.{p}.{s}==",
        f"{h}.{p}.{s[:-1]}",
        f"{h}.{p}.{s}A",
        f"{h[:-1]}.{p}.{s}",
        f" {good}",
        f"{good}\n",
        f"Bearer {good}",
        good.replace("-", "+").replace("_", "/"),
        "\u0000" * 10,
        "é.é.é",
        "\ud800.\udfff.x",
        "\uff45\uff59\uff2a.\uff45\uff59\uff2a.\uff45\uff59\uff2a",  # fullwidth "eyJ"
        f"{seg([1, 2])}.{p}.{s}",
        f"{seg('alg')}.{p}.{s}",
        f"{seg(None)}.{p}.{s}",
        f"{seg(123)}.{p}.{s}",
        f"{b64(b'{not json')}.{p}.{s}",
        f"{b64(NOT_UTF8)}.{p}.{s}",
        f"{b64(b'[' * 3000)}.{p}.{s}",
        f"{b64(HUGE_KID)}.{p}.{s}",
        f"{seg({'alg': 'HS256', 'kid': 1e308})}.{p}.{s}",
        f"{seg({'alg': 'HS256'})}.{p}.{b64(b'')}x",
        f"{seg({'alg': 'RS256'})}.{p}.{s}",
        f"{seg({'alg': 'HS256', 'enc': 'A256GCM'})}.{p}.{s}",
        f"{seg({'alg': 'dir', 'enc': 'A256GCM'})}.{p}.{s}.{s}.{s}",
        "eyJ.eyJ.eyJ",
        "=.=.=",
        "-.-.-",
        "_" * 1000 + "." + "_" * 1000 + "." + "_" * 1000,
        "A" * 5 + ".AAAA.AAAA",
        good * 2,
        good.upper(),
        good[::-1],
    ]


@pytest.mark.parametrize("token", hostile_tokens(), ids=plain_id)
def test_hostile_tokens_raise_only_authentication_error(token: str) -> None:
    with pytest.raises(AuthenticationError):
        make_verifier().verify(token)


@pytest.mark.parametrize("token", [None, b"a.b.c", 42, ["a", "b", "c"], {"t": 1}])
def test_non_str_tokens_raise_authentication_error(token: Any) -> None:
    assert reason(make_verifier(), token) == "malformed token"


def test_empty_token_is_missing() -> None:
    assert reason(make_verifier(), "") == "missing token"


def mutations(good: str, rng: random.Random) -> list[str]:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ é\x00"
    out: list[str] = []
    raw = good.encode()
    for _ in range(120):  # bit flips
        data = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        out.append(data.decode("latin-1"))
    for _ in range(60):  # truncations, from either end
        cut = rng.randrange(len(good))
        out.append(good[:cut] if rng.random() < 0.5 else good[cut:])
    parts = good.split(".")
    for _ in range(40):  # segment shuffles, drops and duplicates
        chosen = [rng.choice(parts) for _ in range(rng.choice([2, 3, 3, 4, 5]))]
        out.append(".".join(chosen))
    for _ in range(60):  # character substitutions and insertions
        chars = list(good)
        pos = rng.randrange(len(chars))
        if rng.random() < 0.5:
            chars[pos] = rng.choice(alphabet)
        else:
            chars.insert(pos, rng.choice(alphabet))
        out.append("".join(chars))
    for _ in range(60):  # random strings, some token-shaped
        n = rng.randint(0, 200)
        junk = "".join(rng.choice(alphabet) for _ in range(n))
        if rng.random() < 0.5:
            junk = ".".join(junk[i : i + n // 3 + 1] for i in range(0, n, n // 3 + 1))
        out.append(junk)
    for _ in range(40):  # valid base64 of random bytes in each segment
        segs = parts.copy()
        segs[rng.randrange(3)] = b64(rng.randbytes(rng.randint(0, 64)))
        out.append(".".join(segs))
    return [t for t in out if t != good]


def test_fuzzed_tokens_raise_only_authentication_error(rsa_key: RSAKey) -> None:
    rng = random.Random(20240611)
    cases = [
        (make_verifier(), mint_token(SECRET, subject="w", now=NOW)),
        (
            make_verifier(rsa_key, algorithms=["RS256"]),
            mint_token(rsa_key, subject="w", algorithm="RS256", now=NOW),
        ),
        (
            make_verifier(two_key_jwks()),
            mint_token(two_key_jwks(), subject="w", kid="a", now=NOW),
        ),
    ]
    rejected: list[tuple[str, AuthenticationError]] = []
    escaped: list[Exception] = []
    accepted: list[str] = []
    for verifier, good in cases:
        assert verifier.verify(good)["sub"] == "w"
        for token in mutations(good, rng):
            try:
                verifier.verify(token)
            except AuthenticationError as exc:
                rejected.append((token, exc))
            except Exception as exc:  # collected, reported below
                escaped.append(exc)
            else:
                accepted.append(token)
    assert escaped == []
    # Canonical base64 leaves a mutated token no second spelling of the signed content.
    assert accepted == []
    assert len(rejected) >= 1000
    assert not [t for t, exc in rejected if len(t) >= 8 and t in str(exc)]


# --- no leaks ------------------------------------------------------------------------


def chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def assert_no_leak(error: BaseException, token: str) -> None:
    secrets = [token, *(part for part in token.split(".") if len(part) >= 4)]
    assert error.__cause__ is None
    assert error.__context__ is None
    for link in chain(error):
        for text in (str(link), repr(link), *map(str, link.args)):
            for secret in secrets:
                assert secret not in text


def leak_cases(rsa_key: RSAKey) -> list[tuple[JWTVerifier, str]]:
    v = make_verifier()
    return [
        (v, "x" * 20_000),
        (v, hs_token({"alg": "HS256"}, good_claims(exp=NOW - 3600))),
        (v, hs_token({"alg": "HS256"}, good_claims(), b"wrong" * 10)),
        (v, hs_token({"alg": "HS512"}, good_claims(), b"k" * 64, hashlib.sha512)),
        (v, hs_token({"alg": "HS256", "jku": "https://evil"}, good_claims())),
        (v, hs_token({"alg": "HS256"}, b'{"exp": "soon"}')),
        (v, hs_token({"alg": "HS256"}, b"\xff not utf-8 \xfe")),
        (v, f"{b64(NOT_UTF8)}.{seg(good_claims())}.{b64(b'sig')}"),
        (v, f"{seg([1])}.{seg(good_claims())}.{b64(b'sig')}"),
        (v, "abc.def.gh!"),
        (make_verifier(two_key_jwks()), hs_token({"alg": "HS256", "kid": "zz"}, good_claims())),
        (make_verifier(rsa_key, algorithms=["RS256"]), forge_with_public_pem(rsa_key)),
        (make_verifier(audience="p"), mint_token(SECRET, subject="w", now=NOW, audience="q")),
    ]


def test_errors_never_contain_the_token(rsa_key: RSAKey) -> None:
    for verifier, token in leak_cases(rsa_key):
        assert_no_leak(rejection(verifier, token), token)


class _Boom:
    """A verify hook that fails in every way a buggy custom verifier might."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, token: str) -> Mapping[str, Any]:
        raise self.error


def test_unexpected_internal_errors_become_authentication_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verifier = make_verifier()
    token = mint_token(SECRET, subject="w", now=NOW)

    class Exploding:
        def verify(self, msg: bytes, sig: bytes, key: Any) -> bool:
            raise RuntimeError(f"crashed on {token}")

    monkeypatch.setitem(verifier._algorithms, "HS256", Exploding())
    error = rejection(verifier, token)
    assert str(error) == "invalid token"
    assert_no_leak(error, token)


# --- verify_token --------------------------------------------------------------------


async def test_verify_token_runs_a_jwt_verifier() -> None:
    token = mint_token(SECRET, subject="w", now=NOW)
    assert (await verify_token(make_verifier(), token))["sub"] == "w"
    with pytest.raises(AuthenticationError, match="token expired"):
        await verify_token(make_verifier(at=NOW + 3600), token)


# tests/conftest.py's time-limit wrapper does not combine with parametrize on coroutine
# tests, so the async tests below loop over their cases instead.


async def test_verify_token_missing_token() -> None:
    called: list[str] = []
    for token in (None, ""):
        with pytest.raises(AuthenticationError) as info:
            await verify_token(called.append, token)  # type: ignore[arg-type]
        assert str(info.value) == "missing token"
    assert not called


async def test_verify_token_non_str_token() -> None:
    with pytest.raises(AuthenticationError) as info:
        await verify_token(dict, b"a.b.c")  # type: ignore[arg-type]
    assert str(info.value) == "malformed token"


async def test_verify_token_sync_and_async_custom_verifiers() -> None:
    def sync_verifier(token: str) -> Mapping[str, Any]:
        return {"sub": token.upper()}

    async def async_verifier(token: str) -> Mapping[str, Any]:
        return {"sub": token[::-1]}

    assert await verify_token(sync_verifier, "abc") == {"sub": "ABC"}
    assert await verify_token(async_verifier, "abc") == {"sub": "cba"}


async def test_verify_token_copies_the_claims() -> None:
    claims = {"sub": "w"}
    result = await verify_token(lambda _: claims, "t")
    assert result == claims
    assert result is not claims
    assert type(result) is dict


async def test_verify_token_custom_errors_become_authentication_error() -> None:
    token = mint_token(SECRET, subject="w", now=NOW)
    errors: list[Exception] = [
        ValueError(f"bad token {token}"),
        KeyError(token),
        RuntimeError(token),
        ExceptionGroup("group", [ValueError(token)]),
    ]
    for error in errors:

        async def failing(tok: str, error: Exception = error) -> Mapping[str, Any]:
            raise error

        for verifier in (_Boom(error), failing):
            with pytest.raises(AuthenticationError) as info:
                await verify_token(verifier, token)
            assert str(info.value) == f"token rejected by verifier ({type(error).__name__})"
            assert_no_leak(info.value, token)


async def test_verify_token_passes_authentication_error_through() -> None:
    original = AuthenticationError("scope missing")
    with pytest.raises(AuthenticationError) as info:
        await verify_token(_Boom(original), "t")
    assert info.value is original


async def test_verify_token_refuses_non_mapping_results() -> None:
    for result in (None, "claims", ["sub", "w"], 42, {("sub",)}):

        async def odd(token: str, result: Any = result) -> Any:
            return result

        for verifier in (lambda _, result=result: result, odd):
            with pytest.raises(AuthenticationError) as info:
                await verify_token(verifier, "t")
            assert str(info.value) == "verifier returned no claims"


# --- mint_token ----------------------------------------------------------------------


def test_mint_token_sets_the_registered_claims() -> None:
    token = mint_token(
        SECRET,
        subject="w",
        now=NOW + 0.7,
        expires_in=60,
        issuer="i",
        audience="a",
        kid="k1",
        claims={"scope": "rpc"},
    )
    header = json.loads(part(token, 0))
    assert header == {"alg": "HS256", "typ": "JWT", "kid": "k1"}
    claims = make_verifier(audience="a").verify(token)
    assert claims == {
        "sub": "w",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 60,
        "iss": "i",
        "aud": "a",
        "scope": "rpc",
    }


def test_mint_token_fractional_lifetime() -> None:
    token = mint_token(SECRET, subject="w", now=NOW, expires_in=0.5)
    assert make_verifier().verify(token)["exp"] == NOW + 0.5


def test_mint_token_negative_lifetime_makes_an_expired_token() -> None:
    token = mint_token(SECRET, subject="w", now=NOW, expires_in=-3600)
    assert reason(make_verifier(), token) == "token expired"


@pytest.mark.parametrize("name", ["sub", "iat", "nbf", "exp"])
def test_mint_token_refuses_to_override_registered_claims(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        mint_token(SECRET, subject="w", claims={name: 1})


def test_mint_token_refuses_iss_and_aud_twice() -> None:
    with pytest.raises(ValueError, match="iss"):
        mint_token(SECRET, subject="w", issuer="a", claims={"iss": "b"})
    with pytest.raises(ValueError, match="aud"):
        mint_token(SECRET, subject="w", audience="a", claims={"aud": "b"})


@pytest.mark.parametrize("algorithm", ["none", "None", "HS999", "dir"])
def test_mint_token_refuses_bad_algorithms(algorithm: str) -> None:
    with pytest.raises(ValueError, match="unsupported algorithm"):
        mint_token(SECRET, subject="w", algorithm=algorithm)


def test_mint_token_refuses_keys_that_cannot_sign(rsa_key: RSAKey) -> None:
    with pytest.raises(ValueError, match="no key can sign"):
        mint_token(rsa_key.as_pem(private=False), subject="w", algorithm="RS256")
    with pytest.raises(ValueError, match="no key can sign"):
        mint_token(rsa_key, subject="w", algorithm="HS256")
    with pytest.raises(ValueError, match="no key can sign"):
        mint_token(b"k" * 32, subject="w", algorithm="HS512")


def test_mint_token_with_a_key_set() -> None:
    jwks = two_key_jwks()
    for several in (jwks, KeySet.import_key_set(jwks)):  # type: ignore[arg-type]
        with pytest.raises(ValueError) as info:
            mint_token(several, subject="w")
        assert str(info.value) == "several keys in the set could sign: pass kid to choose one"
    with pytest.raises(ValueError, match="no key can sign"):
        mint_token(jwks, subject="w", kid="zz")
    single = {"keys": [jwks["keys"][0]]}
    token = mint_token(single, subject="w", now=NOW)  # the sole key's kid goes in the header
    assert make_verifier(jwks).verify(token)["sub"] == "w"


@pytest.mark.parametrize(
    ("now", "expires_in"),
    [(float("nan"), 300.0), (NOW, float("inf")), (float("-inf"), 300.0), (NOW, float("nan"))],
)
def test_mint_token_refuses_non_finite_times(now: float, expires_in: float) -> None:
    # Either one alone is enough to refuse, with the reason (not a float error from later on).
    with pytest.raises(ValueError) as info:
        mint_token(SECRET, subject="w", now=now, expires_in=expires_in)
    assert str(info.value) == "now and expires_in must be finite"


def part(token: str, index: int) -> bytes:
    """The decoded bytes of one segment of a compact token (0 header, 1 payload)."""
    segment = token.split(".")[index]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def test_minted_tokens_are_compact_utf8_json() -> None:
    # What jose (the original's library) writes: no spaces, text as UTF-8, whole seconds as
    # integers. A longer spelling would still verify, but costs bytes in every handshake.
    token = mint_token(SECRET, subject="wörker-é", now=NOW + 0.75, claims={"scope": ["a", "b"]})
    assert part(token, 0) == b'{"alg":"HS256","typ":"JWT"}'
    assert (
        part(token, 1)
        == (
            '{"sub":"wörker-é","iat":1700000000,"nbf":1700000000,"exp":1700000300,'
            '"scope":["a","b"]}'
        ).encode()
    )
    fractional = mint_token(SECRET, subject="w", now=NOW, expires_in=0.5)
    assert b'"exp":1700000000.5}' in part(fractional, 1)


def test_mint_token_with_one_jwk_takes_the_kid_given() -> None:
    # A single JWK is not a set: kid is only a label for the header, it picks nothing.
    jwk = {"kty": "oct", "k": b64(b"j" * 32)}
    token = mint_token(jwk, subject="w", kid="label", now=NOW)
    assert json.loads(part(token, 0)) == {
        "alg": "HS256",
        "typ": "JWT",
        "kid": "label",
    }
    assert make_verifier(jwk).verify(token)["sub"] == "w"


def test_mint_token_with_a_one_key_keyset_names_its_kid() -> None:
    keys = KeySet.import_key_set({"keys": [two_key_jwks()["keys"][1]]})
    token = mint_token(keys, subject="w", now=NOW)
    assert json.loads(part(token, 0)) == {
        "alg": "HS256",
        "typ": "JWT",
        "kid": "b",
    }


def test_signatures_ending_in_any_character_verify() -> None:
    # An HS384 signature is 48 bytes, 64 base64url characters with no padding, so its last
    # character can be any of the 64: the padding stripped when encoding is "=" and nothing else.
    secret = b"k" * 48
    verifier = make_verifier(secret, algorithms=["HS384"])
    endings: set[str] = set()
    for i in range(2000):
        token = mint_token(secret, subject=f"w{i}", algorithm="HS384", now=NOW)
        assert verifier.verify(token)["sub"] == f"w{i}"
        endings.add(token[-1])
        if len(endings) == 64:
            break
    assert len(endings) == 64


def test_a_segment_one_character_past_a_multiple_of_four_is_refused() -> None:
    # No base64 string has that length: refused like any bad segment, never an internal error.
    token = mint_token(SECRET, subject="w", now=NOW)
    header, payload, signature = token.split(".")
    assert (len(header), len(signature)) == (36, 43)
    assert reason(make_verifier(), f"{header}A.{payload}.{signature}") == "malformed token"
    assert reason(make_verifier(), f"{header}.{payload}.{signature}AA") == "invalid signature"


def test_a_four_character_payload_is_decoded() -> None:
    # Three bytes of JSON: the shortest whole base64 quantum; it must reach the claims check.
    token = hs_token({"alg": "HS256"}, b"{ }")
    assert len(token.split(".")[1]) == 4
    assert reason(make_verifier(), token) == "missing claim 'exp'"


def test_mint_token_refuses_claims_json_cannot_carry() -> None:
    with pytest.raises(TypeError):
        mint_token(SECRET, subject="w", claims={"x": object()})
    with pytest.raises(ValueError):
        mint_token(SECRET, subject="w", claims={"x": float("nan")})
