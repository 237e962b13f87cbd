"""Tokens from an identity provider (issue 11, CONTRACT §3): RS256/ES256 checked against a
JWKS served by a real local HTTP server that rotates its keys and goes down."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from nats.js import JetStreamContext

from tocsin.core.auth import JWKS_REFETCH_SECONDS, Jwks, TokenError, TokenVerifier
from tocsin.core.settings import Settings
from tocsin.core.supervisor import free_port

from ..support import Client, start_gateway

ISSUER = "https://id.example.org/realms/health"
AUDIENCE = "tocsin"


class Provider:
    """A JWKS endpoint on loopback: its keys can be rotated, and it can go down."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}  # kid -> private key
        self.published: list[str] = []  # kids in the document
        self.requests = 0
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def add(self, kid: str, kind: str = "rsa") -> None:
        if kind == "rsa":
            self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        self.published.append(kid)

    def rotate(self, kid: str) -> None:
        """Publish only ``kid`` (a new key): the old ones are gone from the document."""
        self.add(kid)
        self.published = [kid]

    def token(self, kid: str, sub: str = "nia", **claims: Any) -> str:
        key = self.keys[kid]
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        body = {
            "sub": sub,
            "exp": int(time.time()) + 600,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "regions": ["KE"],
            "roles": ["health_worker", "offline_access", "uma_authorization"],  # IdP roles
        } | claims
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    async def document(self, request: web.Request) -> web.Response:
        self.requests += 1
        keys = []
        for kid in self.published:
            public = self.keys[kid].public_key()
            if isinstance(public, rsa.RSAPublicKey):
                jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
                jwk["alg"] = "RS256"
            else:
                jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
                jwk["alg"] = "ES256"
            keys.append(jwk | {"kid": kid, "use": "sig"})
        return web.json_response({"keys": keys})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self.document)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    idp = Provider()
    idp.add("k1")
    await idp.start()
    yield idp
    await idp.stop()


def verifier(idp: Provider, **kw: Any) -> TokenVerifier:
    return TokenVerifier(
        None, None, leeway=10, issuer=ISSUER, audience=AUDIENCE, jwks=Jwks(idp.url), **kw
    )


def forget_last_fetch(v: TokenVerifier) -> None:
    """As if JWKS_REFETCH_SECONDS had passed since the last fetch (no sleeping)."""
    assert v.jwks is not None
    v.jwks.tried_at -= JWKS_REFETCH_SECONDS


async def test_a_provider_token_is_accepted_by_its_kid(provider: Provider) -> None:
    v = verifier(provider)
    claims = await v.averify(provider.token("k1"))
    assert claims.sub == "nia" and claims.regions == ("KE",)
    assert [r.value for r in claims.roles] == ["health_worker"]  # the IdP's own ignored
    assert provider.requests == 1
    await v.averify(provider.token("k1"))
    assert provider.requests == 1  # cached


@pytest.mark.parametrize(
    ("claims", "error", "named"),
    [
        ({"iss": "https://elsewhere.example"}, "invalid_claims", "iss"),
        ({"aud": "another-app"}, "invalid_claims", "aud"),
        ({"exp": int(time.time()) - 60}, "token_expired", "exp"),
    ],
)
async def test_issuer_audience_and_expiry_are_checked(
    provider: Provider, claims: dict[str, Any], error: str, named: str
) -> None:
    with pytest.raises(TokenError) as refused:
        await verifier(provider).averify(provider.token("k1", **claims))
    assert refused.value.error == error and named in refused.value.detail


async def test_a_little_clock_skew_is_allowed(provider: Provider) -> None:
    token = provider.token("k1", exp=int(time.time()) - 3, nbf=int(time.time()) + 3)
    assert (await verifier(provider).averify(token)).sub == "nia"


async def test_rotation_is_picked_up_without_a_restart(provider: Provider) -> None:
    v = verifier(provider)
    await v.averify(provider.token("k1"))
    provider.rotate("k2")
    forget_last_fetch(v)
    assert (await v.averify(provider.token("k2"))).sub == "nia"  # unknown kid: refetched
    assert provider.requests == 2


async def test_a_cached_token_of_a_key_rotated_out_is_refused(provider: Provider) -> None:
    v = verifier(provider)
    old = provider.token("k1")
    await v.averify(old)
    assert (await v.averify(old)).sub == "nia" and v.cache.hits == 1  # from the cache
    provider.rotate("k2")  # k1 is gone from the document
    forget_last_fetch(v)
    await v.averify(provider.token("k2"))  # unknown kid: the JWKS is read again
    with pytest.raises(TokenError) as refused:
        await v.averify(old)
    assert refused.value.error == "invalid_signature" and "k1" in refused.value.detail
    assert v.cache.hits == 1


async def test_made_up_kids_cannot_hammer_the_provider(provider: Provider) -> None:
    v = verifier(provider)
    await v.averify(provider.token("k1"))
    provider.add("k9")  # signed with a key the provider does not publish
    provider.published.remove("k9")
    forget_last_fetch(v)
    for _ in range(5):
        with pytest.raises(TokenError) as refused:
            await v.averify(provider.token("k9"))
        assert refused.value.error == "invalid_signature" and "k9" in refused.value.detail
    assert provider.requests == 2  # one refetch for five unknown kids within the interval


async def test_the_last_good_set_is_kept_while_the_provider_is_down(provider: Provider) -> None:
    v = verifier(provider)
    await v.averify(provider.token("k1"))
    await provider.stop()
    provider.add("k3")
    forget_last_fetch(v)
    with pytest.raises(TokenError):
        await v.averify(provider.token("k3"))  # unknown, and the provider is down
    assert v.jwks is not None and v.jwks.last_error is not None
    assert (await v.averify(provider.token("k1"))).sub == "nia"  # the kept set still works


async def test_es256_and_a_token_without_kid(provider: Provider) -> None:
    provider.add("ec1", kind="ec")
    v = verifier(provider)
    assert (await v.averify(provider.token("ec1"))).sub == "nia"
    key = provider.keys["k1"]
    bare = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, key, algorithm="RS256")
    with pytest.raises(TokenError) as refused:
        await v.averify(bare)
    assert refused.value.error == "invalid_signature" and "kid" in refused.value.detail


async def test_a_gateway_takes_provider_tokens(
    provider: Provider, make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    running = await start_gateway(
        make_settings(jwt_jwks_url=provider.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    )
    try:
        client = await Client.connect(running.ws_url, provider.token("k1", sub="idp-user"))
        hello = await client.next("connection_established")
        assert hello["user_id"] == "idp-user" and hello["regions"] == ["KE"]
        await client.close()
    finally:
        await running.stop()
