"""Tokens (CONTRACT §3): verification with pyjwt and the claims every service relies on."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp
import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tocsin.schemas.alert import REGION_PATTERN, is_region

from .settings import Settings

log = logging.getLogger(__name__)

ASYMMETRIC = frozenset({"RS256", "ES256"})


class Role(StrEnum):
    VIEWER = "viewer"
    HEALTH_WORKER = "health_worker"
    ANALYST = "analyst"
    ADMIN = "admin"
    PUBLISHER = "publisher"


class Claims(BaseModel):
    """The claims tocsin reads; other claims (iat, iss, ...) pass through unchecked."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    sub: str = Field(min_length=1, max_length=128)
    exp: float
    roles: tuple[Role, ...] = ()
    regions: tuple[str, ...] = ()

    @field_validator("roles", mode="before")
    @classmethod
    def _known_roles(cls, value: object) -> object:
        """Roles tocsin does not know are ignored (CONTRACT §3): identity providers add
        their own (offline_access, uma_authorization, ...)."""
        if isinstance(value, list | tuple):
            known = {r.value for r in Role}
            return tuple(r for r in value if not isinstance(r, str) or r in known)
        return value

    @field_validator("regions")
    @classmethod
    def _regions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for code in value:
            if not is_region(code):
                raise ValueError(f"{code!r} is not a region code ({REGION_PATTERN})")
        return value

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    def receivable_regions(self) -> tuple[str, ...] | None:
        """Region prefixes this user may receive; None means all (admin)."""
        return None if self.is_admin else self.regions


class TokenError(Exception):
    """A token that must be refused; ``error`` is the short machine-readable reason."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


#: A JWKS document is read again this often, and on a token whose ``kid`` it lacks, but
#: then at most every REFETCH_SECONDS (a stream of made-up kids cannot hammer the IdP).
JWKS_REFRESH_SECONDS = 300.0
JWKS_REFETCH_SECONDS = 5.0
JWKS_TIMEOUT_SECONDS = 5.0


class Jwks:
    """The identity provider's signing keys, by ``kid``: fetched from ``url`` (aiohttp, not
    blocking the loop), parsed by PyJWT's PyJWKSet, refreshed every JWKS_REFRESH_SECONDS or
    on an unknown ``kid`` (rotation without a restart). When the endpoint is down or answers
    garbage the last good set is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at = 0.0  # monotonic, of the last good set
        self.tried_at = -JWKS_REFETCH_SECONDS  # monotonic, of the last attempt
        self.fetches = 0  # attempts, for tests and logs
        self.last_error: str | None = None
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        stale = now - self.fetched_at > JWKS_REFRESH_SECONDS
        if (kid not in self.keys or stale) and now - self.tried_at >= JWKS_REFETCH_SECONDS:
            await self.fetch()
        return self.keys.get(kid)

    async def fetch(self) -> None:
        async with self._lock:
            if time.monotonic() - self.tried_at < JWKS_REFETCH_SECONDS:
                return  # another token fetched meanwhile
            self.tried_at = time.monotonic()
            self.fetches += 1
            try:
                timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT_SECONDS)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    async with http.get(self.url) as resp:
                        resp.raise_for_status()
                        document = await resp.json(content_type=None)
                found = jwt.PyJWKSet.from_dict(document)
            except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("JWKS %s not read (the last good set is kept): %s", self.url, exc)
                return
            self.keys = {k.key_id: k for k in found.keys if k.key_id}
            self.fetched_at = time.monotonic()
            self.last_error = None


#: Tokens verified lately, kept with their claims: a device that reconnects with the token
#: it connected with (every few minutes on a flaky network, all at once after a gateway
#: restart) is not verified again. The oldest goes first past this many.
TOKEN_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Verified:
    """A token that passed verification: its claims, the key that verified it, and the
    JWKS ``kid`` it named (None: the configured secret or public key)."""

    claims: Claims
    key: Any
    kid: str | None


class TokenCache:
    """Verified tokens by their exact text (so by their signature too). A hit still has its
    ``exp`` checked against the clock, and a JWKS token's key must still be the one in the
    JWKS (a rotation drops it); bans are not the verifier's business (gateway/guard.py
    checks them on every handshake)."""

    def __init__(self, size: int = TOKEN_CACHE_SIZE) -> None:
        self.size = size
        self._entries: dict[str, Verified] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str) -> Verified | None:
        return self._entries.get(token)

    def put(self, token: str, verified: Verified) -> None:
        if self.size <= 0:
            return  # no cache
        if token not in self._entries and len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[token] = verified

    def drop(self, token: str) -> None:
        self._entries.pop(token, None)


@dataclass(frozen=True)
class TokenVerifier:
    secret: str | None
    public_key: str | None
    leeway: float = 0.0
    issuer: str | None = None
    audience: str | None = None
    jwks: Jwks | None = None
    cache: TokenCache = field(default_factory=TokenCache, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        return cls(
            settings.jwt_secret,
            settings.jwt_public_key,
            settings.jwt_leeway_seconds,
            settings.jwt_issuer,
            settings.jwt_audience,
            Jwks(settings.jwt_jwks_url) if settings.jwt_jwks_url else None,
        )

    async def averify(self, token: str | None) -> Claims:
        """:meth:`verify`, with the key of an RS256/ES256 token looked up by its ``kid`` in
        the JWKS (``TOCSIN_JWT_JWKS_URL``), fetched if need be."""
        if self.jwks is None or not token:
            return self.verify(token)
        known = self.cache.get(token)
        if known is not None and known.kid is not None:
            jwk = await self.jwks.key(known.kid)  # refreshed as for any token of that kid
            if jwk is not None and jwk.key is known.key:
                return self._unexpired(token, known)
            self.cache.drop(token)  # its key rotated out (or was refreshed): verify anew
        header = self._header(token)
        if header.get("alg") not in ASYMMETRIC:
            return self.verify(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("invalid_signature", "the token names no key (kid) of the JWKS")
        jwk = await self.jwks.key(kid)
        if jwk is None:
            raise TokenError("invalid_signature", f"key {kid!r} is not in the JWKS")
        claims = self._decode(token, header, jwk.key)
        self.cache.put(token, Verified(claims, jwk.key, kid))
        return claims

    def _unexpired(self, token: str, known: Verified) -> Claims:
        """A cached token's claims, unless its ``exp`` has passed since (as jwt.decode
        judges it: with the leeway)."""
        if known.claims.exp <= time.time() - self.leeway:
            self.cache.drop(token)
            raise TokenError("token_expired", "the token's exp is in the past")
        self.cache.hits += 1
        return known.claims

    @staticmethod
    def _header(token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError("malformed_token", str(exc)) from None
        if not isinstance(header.get("alg"), str):  # found by tests/unit/test_fuzz.py
            raise TokenError("malformed_token", "header alg: expected a string")
        return header

    def verify(self, token: str | None, jwk_key: Any = None) -> Claims:
        if not token:
            raise TokenError("missing_token", "pass auth_token=... or Authorization: Bearer ...")
        known = self.cache.get(token) if jwk_key is None else None
        if known is not None and known.kid is None:  # verified with the configured key
            return self._unexpired(token, known)
        header = self._header(token)
        claims = self._decode(token, header, jwk_key)
        if jwk_key is None:
            self.cache.put(token, Verified(claims, None, None))
        return claims

    def _decode(self, token: str, header: dict[str, Any], jwk_key: Any) -> Claims:
        alg = header.get("alg")
        if jwk_key is not None and alg in ASYMMETRIC:
            key: Any = jwk_key
        elif alg == "HS256" and self.secret:
            key = self.secret
        elif alg in ASYMMETRIC and self.public_key:
            key = self.public_key
        else:
            raise TokenError("invalid_signature", f"algorithm {alg!r} is not accepted here")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={"require": ["sub", "exp"], "verify_aud": self.audience is not None},
                leeway=self.leeway,
                issuer=self.issuer,
                audience=self.audience,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token_expired", "the token's exp is in the past") from None
        except jwt.InvalidSignatureError:
            raise TokenError("invalid_signature", "signature verification failed") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError("invalid_claims", str(exc)) from None
        except jwt.InvalidIssuerError:
            raise TokenError("invalid_claims", f"claim iss: expected {self.issuer!r}") from None
        except jwt.InvalidAudienceError:
            raise TokenError("invalid_claims", f"claim aud: expected {self.audience!r}") from None
        except jwt.ImmatureSignatureError as exc:
            raise TokenError("invalid_claims", f"claim nbf/iat: {exc}") from None
        except jwt.PyJWTError as exc:
            raise TokenError("malformed_token", str(exc)) from None
        try:
            return Claims.model_validate(payload)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise TokenError("invalid_claims", f"claim {where}: {err['msg']}") from None


def mint_token(
    secret: str,
    sub: str,
    *,
    roles: list[str] | tuple[str, ...] = ("health_worker",),
    regions: list[str] | tuple[str, ...] = (),
    ttl_seconds: float = 3600,
    now: float | None = None,
) -> str:
    """An HS256 token, as ``tocsin token`` prints it (development and tests)."""
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": sub,
        "iat": issued,
        "exp": issued + int(ttl_seconds),
        "roles": list(roles),
        "regions": list(regions),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None
