"""Tokens (CONTRACT §3): verification with pyjwt and the claims every service relies on."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tocsin.schemas.alert import REGION_PATTERN, is_region

from .settings import Settings


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


@dataclass(frozen=True)
class TokenVerifier:
    secret: str | None
    public_key: str | None
    leeway: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        return cls(settings.jwt_secret, settings.jwt_public_key)

    def verify(self, token: str | None) -> Claims:
        if not token:
            raise TokenError("missing_token", "pass auth_token=... or Authorization: Bearer ...")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError("malformed_token", str(exc)) from None
        alg = header.get("alg")
        if alg == "HS256" and self.secret:
            key: str = self.secret
        elif alg in {"RS256", "ES256"} and self.public_key:
            key = self.public_key
        else:
            raise TokenError("invalid_signature", f"algorithm {alg!r} is not accepted here")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={"require": ["sub", "exp"]},
                leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token_expired", "the token's exp is in the past") from None
        except jwt.InvalidSignatureError:
            raise TokenError("invalid_signature", "signature verification failed") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError("invalid_claims", str(exc)) from None
        except jwt.PyJWTError as exc:
            raise TokenError("malformed_token", str(exc)) from None
        try:
            return Claims.model_validate(payload)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise TokenError("invalid_claims", f"claim {field}: {err['msg']}") from None


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
