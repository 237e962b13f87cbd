"""Ingest validation: every event becomes an Alert or a Rejection that says exactly why."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tocsin.core.topology import MAX_ALERT_BYTES
from tocsin.ingest.pipeline import Reason, Rejection, encode_alert, validate_event
from tocsin.schemas import DEFAULT_ALERT_TYPES, Alert

from ..schemas import CONTRACT_ALERT_JSON

ACCEPTED = frozenset(DEFAULT_ALERT_TYPES)
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC).timestamp()


def event(**changes: Any) -> dict[str, Any]:
    """The CONTRACT §4 example; ``None`` removes a field."""
    body: dict[str, Any] = json.loads(CONTRACT_ALERT_JSON)
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def check(body: Any, accepted: frozenset[str] = ACCEPTED) -> Alert | Rejection:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return validate_event(raw, accepted, now=NOW)


def rejected(body: Any, reason: Reason, accepted: frozenset[str] = ACCEPTED) -> Rejection:
    result = check(body, accepted)
    assert isinstance(result, Rejection), result
    assert result.reason is reason, result
    return result


def fields(rejection: Rejection) -> set[str]:
    return {e["field"] for e in rejection.errors}


def test_valid_alert() -> None:
    alert = check(event())
    assert isinstance(alert, Alert)
    assert alert.alert_id == 1042
    assert alert.location.region == "KE-30"
    assert alert.expiry_time == datetime(2026, 11, 26, 10, tzinfo=UTC)


def test_minimal_alert() -> None:
    body = {
        "alert_id": "ext-7",
        "alert_level": "low",
        "alert_type": "system_health",
        "title": "t",
        "message": "m",
        "location": {"region": "UG"},
    }
    alert = check(body)
    assert isinstance(alert, Alert)
    assert alert.priority == "normal"
    assert alert.expiry_time is None


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'{"alert_id": 1'])
def test_not_json(raw: bytes) -> None:
    r = rejected(raw, Reason.INVALID_JSON)
    assert "JSON" in r.detail


@pytest.mark.parametrize("raw", [b"[]", b"[{}]", b'"alert"', b"42", b"null", b"true"])
def test_json_but_not_an_object(raw: bytes) -> None:
    r = rejected(raw, Reason.INVALID_JSON)
    assert "object" in r.detail


def test_unknown_field_is_named() -> None:
    r = rejected(event(colour="red"), Reason.INVALID_ALERT)
    assert fields(r) == {"colour"}
    assert "colour" in r.detail


def test_unknown_location_field_is_named() -> None:
    r = rejected(event(location={"region": "KE", "city": "Homa Bay"}), Reason.INVALID_ALERT)
    assert fields(r) == {"location.city"}


@pytest.mark.parametrize("missing", ["alert_id", "alert_level", "alert_type", "title", "message"])
def test_missing_required_field_is_named(missing: str) -> None:
    r = rejected(event(**{missing: None}), Reason.INVALID_ALERT)
    assert fields(r) == {missing}


def test_missing_location_region_is_named() -> None:
    r = rejected(event(location={"lat": 1.0, "lon": 2.0}), Reason.INVALID_ALERT)
    assert fields(r) == {"location.region"}


def test_missing_location_is_named() -> None:
    r = rejected(event(location=None), Reason.INVALID_ALERT)
    assert fields(r) == {"location"}


def test_all_missing_fields_are_named_at_once() -> None:
    r = rejected({"location": {}}, Reason.INVALID_ALERT)
    assert fields(r) >= {
        "alert_id",
        "alert_level",
        "alert_type",
        "title",
        "message",
        "location.region",
    }


@pytest.mark.parametrize("region", ["ke", "KEN", "KE-", "KE-3000", "KE 30", "", "KE.30"])
def test_bad_region(region: str) -> None:
    r = rejected(event(location={"region": region}), Reason.INVALID_ALERT)
    assert fields(r) == {"location.region"}


@pytest.mark.parametrize("score", [1.01, -0.1, 7])
def test_risk_score_out_of_range(score: float) -> None:
    r = rejected(event(risk_score=score), Reason.INVALID_ALERT)
    assert fields(r) == {"risk_score"}


@pytest.mark.parametrize("score", [0, 0.0, 1, 1.0])
def test_risk_score_bounds_are_inclusive(score: float) -> None:
    assert isinstance(check(event(risk_score=score)), Alert)


def test_bad_alert_id_is_named_once_per_branch() -> None:
    r = rejected(event(alert_id="has space"), Reason.INVALID_ALERT)
    assert fields(r) == {"alert_id"}


def test_unknown_alert_type() -> None:
    r = rejected(event(alert_type="flood_watch"), Reason.UNKNOWN_TYPE)
    assert fields(r) == {"alert_type"}
    assert "flood_watch" in r.detail
    assert "alert_type" in r.detail


def test_configured_alert_type_is_accepted() -> None:
    alert = check(event(alert_type="flood_watch"), ACCEPTED | {"flood_watch"})
    assert isinstance(alert, Alert)
    assert alert.alert_type == "flood_watch"


def test_badly_formed_alert_type_is_invalid_not_unknown() -> None:
    r = rejected(event(alert_type="Flood Watch"), Reason.INVALID_ALERT, ACCEPTED | {"Flood Watch"})
    assert fields(r) == {"alert_type"}


def test_expired_alert() -> None:
    past = datetime.fromtimestamp(NOW, UTC) - timedelta(seconds=1)
    r = rejected(event(expiry_time=past.isoformat()), Reason.EXPIRED)
    assert fields(r) == {"expiry_time"}


def test_alert_expiring_now_is_expired() -> None:
    r = rejected(event(expiry_time=datetime.fromtimestamp(NOW, UTC).isoformat()), Reason.EXPIRED)
    assert fields(r) == {"expiry_time"}


def test_alert_expiring_later_is_accepted() -> None:
    later = datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=1)
    assert isinstance(check(event(expiry_time=later.isoformat())), Alert)


def test_expiry_uses_the_clock_when_now_is_not_given() -> None:
    raw = json.dumps(event(expiry_time="2000-01-01T00:00:00Z")).encode()
    result = validate_event(raw, ACCEPTED)
    assert isinstance(result, Rejection) and result.reason is Reason.EXPIRED


def test_too_large() -> None:
    raw = json.dumps(event()).encode()
    raw += b" " * (MAX_ALERT_BYTES + 1 - len(raw))
    assert len(raw) == MAX_ALERT_BYTES + 1
    r = rejected(raw, Reason.TOO_LARGE)
    assert str(MAX_ALERT_BYTES) in r.detail


def test_exactly_the_limit_is_not_too_large() -> None:
    raw = json.dumps(event()).encode()
    raw += b" " * (MAX_ALERT_BYTES - len(raw))  # trailing whitespace is still valid JSON
    assert isinstance(check(raw), Alert)


def test_too_large_is_checked_before_parsing() -> None:
    rejected(b"x" * (MAX_ALERT_BYTES + 1), Reason.TOO_LARGE)


@pytest.mark.parametrize("field", ["created_at", "expiry_time"])
def test_naive_datetime_rejected(field: str) -> None:
    r = rejected(event(**{field: "2027-01-01T10:00:00"}), Reason.INVALID_ALERT)
    assert fields(r) == {field}
    assert "time zone" in r.detail


def test_offset_datetime_is_normalised_to_utc() -> None:
    alert = check(event(created_at="2026-11-25T13:00:00+03:00"))
    assert isinstance(alert, Alert)
    assert alert.created_at == datetime(2026, 11, 25, 10, tzinfo=UTC)
    assert alert.created_at is not None and alert.created_at.utcoffset() == timedelta(0)


def test_rejection_json() -> None:
    r = rejected(event(colour="red", risk_score=3), Reason.INVALID_ALERT)
    doc = r.as_json()
    assert doc["error"] == "invalid_alert"
    assert {e["field"] for e in doc["errors"]} == {"colour", "risk_score"}
    assert "colour: " in doc["detail"] and "risk_score: " in doc["detail"]
    json.dumps(doc)  # serialisable as it is


def test_reasons_are_dlq_tokens() -> None:
    assert {r.value for r in Reason} == {
        "too_large",
        "invalid_json",
        "invalid_alert",
        "unknown_type",
        "expired",
        "invalid_cap",
    }
    assert all("." not in r.value and " " not in r.value for r in Reason)


# ------------------------------------------------------------------------ encode_alert


def test_encode_alert_round_trips_the_contract_example() -> None:
    alert = check(event())
    assert isinstance(alert, Alert)
    raw = encode_alert(alert)
    assert Alert.model_validate_json(raw) == alert
    assert validate_event(raw, ACCEPTED, now=NOW) == alert


def test_encode_alert_leaves_out_absent_fields() -> None:
    alert = check(event(risk_score=None, location={"region": "KE"}))
    assert isinstance(alert, Alert)
    doc = orjson.loads(encode_alert(alert))
    assert "risk_score" not in doc
    assert doc["location"] == {"region": "KE"}
    assert doc["created_at"] == "2026-11-25T10:00:00Z"


_STAMPS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def alerts(draw: st.DrawFn) -> dict[str, Any]:
    country = draw(st.sampled_from(["KE", "UG", "TZ"]))
    sub = draw(st.one_of(st.none(), st.from_regex(r"\A[A-Z0-9]{1,3}\Z")))
    body: dict[str, Any] = {
        "alert_id": draw(
            st.one_of(
                st.integers(1, 2**53 - 1), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z")
            )
        ),
        "alert_level": draw(st.sampled_from(["low", "medium", "high", "critical", "emergency"])),
        "alert_type": draw(st.sampled_from(DEFAULT_ALERT_TYPES)),
        "title": draw(st.text(min_size=1, max_size=40)),
        "message": draw(st.text(min_size=1, max_size=200)),
        "location": {"region": country if sub is None else f"{country}-{sub}"},
    }
    if draw(st.booleans()):
        body["location"]["lat"] = draw(st.floats(-90, 90))
        body["location"]["lon"] = draw(st.floats(-180, 180))
    optional = {
        "priority": st.sampled_from(["low", "normal", "high", "urgent", "emergency"]),
        "risk_score": st.floats(0, 1),
        "confidence_score": st.floats(0, 1),
        "affected_population": st.integers(0, 10**10),
        "action_required": st.booleans(),
        "action_url": st.from_regex(r"\Ahttps?://[a-z]{1,10}\.org/[a-z0-9]{0,10}\Z"),
        "created_at": _STAMPS.map(lambda d: d.isoformat()),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


@given(alerts())
def test_encode_alert_round_trips(body: dict[str, Any]) -> None:
    alert = validate_event(orjson.dumps(body), ACCEPTED, now=NOW)
    assert isinstance(alert, Alert), alert
    raw = encode_alert(alert)
    assert Alert.model_validate_json(raw) == alert
    assert encode_alert(Alert.model_validate_json(raw)) == raw  # canonical: a fixed point
