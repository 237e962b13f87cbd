"""Hypothesis against the entry points a hostile client reaches first (issue 11): the
client-frame parser and the token check. Bounded: a few hundred examples each."""

from __future__ import annotations

import base64
import json

import jwt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tocsin.core.auth import TokenError, TokenVerifier, mint_token
from tocsin.gateway.handler import parse_frame
from tocsin.schemas import Error

SECRET = "fuzz-secret-0123456789abcdef-0123456789"
VERIFIER = TokenVerifier(SECRET, None, leeway=10)
BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
frame_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "ack",
                "pong",
                "get_stats",
                "subscribe",
                "unsubscribe",
                "update_filters",
                "register_push",
                "x",
            ]
        )
    },
    optional={
        "seq": json_values,
        "ts": json_values,
        "groups": json_values,
        "filters": json_values,
        "extra": json_values,
    },
)


@BOUNDED
@given(st.one_of(st.text(max_size=300), frame_like.map(json.dumps), json_values.map(json.dumps)))
def test_any_text_gets_a_frame_or_an_error_that_names_what_is_wrong(text: str) -> None:
    frame, error = parse_frame(text)
    assert (frame is None) != (error is None)
    if error is not None:
        assert isinstance(error, Error) and error.detail
        assert error.code in {"invalid_json", "invalid_frame", "unknown_type", "frame_too_large"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@BOUNDED
@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit"]), json_values, max_size=4),
    payload=st.dictionaries(
        st.sampled_from(["sub", "exp", "roles", "regions", "iss", "aud", "nbf", "iat"]),
        json_values,
        max_size=8,
    ),
    signature=st.binary(max_size=64),
)
def test_any_token_is_refused_with_a_token_error_or_accepted(
    header: dict[str, object], payload: dict[str, object], signature: bytes
) -> None:
    token = ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature)]
    )
    try:
        VERIFIER.verify(token)
    except TokenError as exc:
        assert exc.error in {
            "malformed_token",
            "invalid_signature",
            "invalid_claims",
            "token_expired",
            "missing_token",
        }
    else:  # only a correct signature gets through, and that cannot be guessed
        raise AssertionError(f"accepted a forged token: {header} {payload}")


@BOUNDED
@given(
    payload=st.dictionaries(
        st.sampled_from(["sub", "exp", "roles", "regions", "nbf"]), json_values, max_size=5
    )
)
def test_signed_tokens_with_any_claims_are_accepted_or_refused_naming_the_claim(
    payload: dict[str, object],
) -> None:
    """Signed with the right key, bad claims still only ever give invalid_claims (or an
    expiry): never another exception."""
    try:
        token = jwt.encode(payload, SECRET, algorithm="HS256")
    except (TypeError, ValueError):
        return  # not encodable as a JWT at all
    try:
        claims = VERIFIER.verify(token)
    except TokenError as exc:
        assert exc.error in {"invalid_claims", "token_expired", "malformed_token"}, exc.error
    else:
        assert claims.sub and isinstance(claims.exp, float)


def test_a_good_token_still_passes() -> None:  # the property above is not vacuous
    assert VERIFIER.verify(mint_token(SECRET, "ok", regions=["KE"])).sub == "ok"
