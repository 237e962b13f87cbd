"""Token verification (CONTRACT §3): HS256 with the secret, RS256/ES256 with a public key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tocsin.core.auth import (
    Claims,
    Role,
    TokenCache,
    TokenError,
    TokenVerifier,
    bearer,
    mint_token,
)

SECRET = "unit-secret-0123456789abcdef-0123456789"
HS = TokenVerifier(SECRET, None)


def _pem(private: Any) -> tuple[bytes, str]:
    key = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, public.decode()


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, str]:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_keys() -> tuple[bytes, str]:
    return _pem(ec.generate_private_key(ec.SECP256R1()))


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "alice",
        "exp": int(time.time()) + 3600,
        "roles": ["health_worker"],
        "regions": ["KE", "UG-102"],
    }
    base.update(extra)
    return base


def refused(verifier: TokenVerifier, token: str | None) -> TokenError:
    with pytest.raises(TokenError) as info:
        verifier.verify(token)
    return info.value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token signed with any bytes (pyjwt refuses PEM keys as HMAC secrets)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


# ------------------------------------------------------------------------ HS256


def test_valid_hs256() -> None:
    token = mint_token(SECRET, "alice", roles=["analyst"], regions=["KE", "UG-102"])
    c = HS.verify(token)
    assert c.sub == "alice"
    assert c.roles == (Role.ANALYST,)
    assert c.regions == ("KE", "UG-102")
    assert c.exp > time.time()


def test_extra_claims_pass_through() -> None:
    token = jwt.encode(claims(iss="engine", aud_extra=[1, 2]), SECRET, algorithm="HS256")
    assert HS.verify(token).sub == "alice"


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(token: str | None) -> None:
    assert refused(HS, token).error == "missing_token"


def test_expired_token() -> None:
    token = mint_token(SECRET, "alice", ttl_seconds=60, now=time.time() - 3600)
    err = refused(HS, token)
    assert err.error == "token_expired"


def test_bad_signature() -> None:
    token = mint_token("another-secret-0123456789abcdef-01234567", "alice")
    assert refused(HS, token).error == "invalid_signature"


def test_tampered_payload() -> None:
    head, _, sig = mint_token(SECRET, "alice").split(".")
    body = _b64(json.dumps(claims(roles=["admin"])).encode())
    assert refused(HS, f"{head}.{body}.{sig}").error == "invalid_signature"


@pytest.mark.parametrize("token", ["abc", "not.a.jwt", "a.b", "....", "Bearer xyz"])
def test_malformed_token(token: str) -> None:
    assert refused(HS, token).error == "malformed_token"


@pytest.mark.parametrize("missing", ["sub", "exp"])
def test_missing_required_claim(missing: str) -> None:
    payload = claims()
    del payload[missing]
    err = refused(HS, jwt.encode(payload, SECRET, algorithm="HS256"))
    assert err.error == "invalid_claims"
    assert missing in err.detail


def test_bad_regions_claim_names_the_claim() -> None:
    err = refused(HS, jwt.encode(claims(regions=["KE", "kenya"]), SECRET, algorithm="HS256"))
    assert err.error == "invalid_claims"
    assert "regions" in err.detail
    assert "kenya" in err.detail


def test_bad_roles_claim_names_the_claim() -> None:
    err = refused(HS, jwt.encode(claims(roles="admin"), SECRET, algorithm="HS256"))
    assert err.error == "invalid_claims"
    assert "roles" in err.detail


def test_unknown_roles_are_ignored() -> None:
    """CONTRACT §3: identity providers add roles of their own; they grant nothing."""
    token = jwt.encode(
        claims(roles=["superuser", "offline_access", "analyst"]), SECRET, algorithm="HS256"
    )
    assert HS.verify(token).roles == (Role.ANALYST,)


def test_empty_sub_is_refused() -> None:
    err = refused(HS, jwt.encode(claims(sub=""), SECRET, algorithm="HS256"))
    assert err.error == "invalid_claims"
    assert "sub" in err.detail


def test_hs256_refused_without_secret(rsa_keys: tuple[bytes, str]) -> None:
    verifier = TokenVerifier(None, rsa_keys[1])
    assert refused(verifier, mint_token(SECRET, "alice")).error == "invalid_signature"


def test_public_key_is_no_hmac_secret(rsa_keys: tuple[bytes, str]) -> None:
    """Algorithm confusion: an HS256 token keyed with the (public) PEM must not pass."""
    forged = forge_hs256(claims(roles=["admin"]), rsa_keys[1].encode())
    for verifier in (TokenVerifier(None, rsa_keys[1]), TokenVerifier(SECRET, rsa_keys[1])):
        assert refused(verifier, forged).error == "invalid_signature"


# ------------------------------------------------------------------------ RS256 / ES256


@pytest.mark.parametrize(("alg", "keys"), [("RS256", "rsa_keys"), ("ES256", "ec_keys")])
def test_asymmetric_accepted_with_public_key(
    alg: str, keys: str, request: pytest.FixtureRequest
) -> None:
    private, public = request.getfixturevalue(keys)
    token = jwt.encode(claims(), private, algorithm=alg)
    c = TokenVerifier(SECRET, public).verify(token)
    assert c.sub == "alice" and c.regions == ("KE", "UG-102")
    assert TokenVerifier(None, public).verify(token).sub == "alice"


@pytest.mark.parametrize(("alg", "keys"), [("RS256", "rsa_keys"), ("ES256", "ec_keys")])
def test_asymmetric_refused_without_public_key(
    alg: str, keys: str, request: pytest.FixtureRequest
) -> None:
    private, _ = request.getfixturevalue(keys)
    token = jwt.encode(claims(), private, algorithm=alg)
    assert refused(HS, token).error == "invalid_signature"


def test_rs256_signed_by_another_key(rsa_keys: tuple[bytes, str]) -> None:
    other, _ = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    token = jwt.encode(claims(), other, algorithm="RS256")
    assert refused(TokenVerifier(None, rsa_keys[1]), token).error == "invalid_signature"


def test_expired_rs256(rsa_keys: tuple[bytes, str]) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 10), rsa_keys[0], algorithm="RS256")
    assert refused(TokenVerifier(None, rsa_keys[1]), token).error == "token_expired"


@pytest.mark.parametrize("alg", ["HS384", "HS512", "PS256"])
def test_other_algorithms_refused(alg: str, rsa_keys: tuple[bytes, str]) -> None:
    key: Any = rsa_keys[0] if alg.startswith("PS") else SECRET * 2
    token = jwt.encode(claims(), key, algorithm=alg)
    assert refused(TokenVerifier(SECRET, rsa_keys[1]), token).error == "invalid_signature"


def test_alg_none_refused(rsa_keys: tuple[bytes, str]) -> None:
    # alg "none" takes no key: PyJWT reads "" as None (its annotation has no None).
    token = jwt.encode(claims(roles=["admin"]), "", algorithm="none")
    for verifier in (HS, TokenVerifier(SECRET, rsa_keys[1]), TokenVerifier(None, None)):
        err = refused(verifier, token)
        assert err.error in {"invalid_signature", "malformed_token"}


# ------------------------------------------------------------------------ claims


def test_receivable_regions_admin_is_everything() -> None:
    admin = Claims(sub="root", exp=0, roles=(Role.ADMIN,), regions=("KE",))
    assert admin.is_admin
    assert admin.receivable_regions() is None


def test_receivable_regions_non_admin_is_token_regions() -> None:
    worker = Claims(sub="w", exp=0, roles=(Role.HEALTH_WORKER, Role.ANALYST), regions=("KE",))
    assert not worker.is_admin
    assert worker.receivable_regions() == ("KE",)
    assert Claims(sub="v", exp=0).receivable_regions() == ()


def test_roles_are_the_contract_roles() -> None:
    assert {r.value for r in Role} == {"viewer", "health_worker", "analyst", "admin", "publisher"}


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc ", "abc"),
        ("Bearer ", None),
        ("Basic abc", None),
        (None, None),
        ("", None),
    ],
)
def test_bearer(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


# ------------------------------------------------------------------------ the cache


def test_a_verified_token_is_taken_from_the_cache_and_still_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v = TokenVerifier(SECRET, None, leeway=5)
    token = mint_token(SECRET, "alice", ttl_seconds=60)
    first = v.verify(token)
    assert v.verify(token) is first and v.cache.hits == 1  # not decoded again
    # Past exp + leeway (the clock moved, not the test waiting): refused like any token.
    later = time.time() + 66
    monkeypatch.setattr("tocsin.core.auth.time.time", lambda: later)
    assert refused(v, token).error == "token_expired"
    assert v.cache.get(token) is None


def test_a_tampered_copy_of_a_cached_token_is_not_a_hit() -> None:
    v = TokenVerifier(SECRET, None)
    token = mint_token(SECRET, "alice")
    v.verify(token)
    head, _body, sig = token.split(".")
    other = _b64(json.dumps(claims(sub="mallory")).encode())
    assert refused(v, f"{head}.{other}.{sig}").error == "invalid_signature"
    assert v.cache.hits == 0


def test_the_cache_keeps_the_newest_tokens() -> None:
    cache = TokenCache(size=2)
    v = TokenVerifier(SECRET, None, cache=cache)
    tokens = [mint_token(SECRET, f"u{i}") for i in range(3)]
    for t in tokens:
        v.verify(t)
    assert len(cache) == 2 and cache.get(tokens[0]) is None and cache.get(tokens[2]) is not None


def test_a_cache_of_size_zero_keeps_nothing() -> None:
    v = TokenVerifier(SECRET, None, cache=TokenCache(size=0))
    token = mint_token(SECRET, "alice")
    assert v.verify(token).sub == v.verify(token).sub == "alice"
    assert len(v.cache) == 0 and v.cache.hits == 0
