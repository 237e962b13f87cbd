"""The alert model (CONTRACT §4) and every WebSocket frame (CONTRACT §6)."""

from __future__ import annotations

import json
import typing
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from tocsin.schemas import (
    Alert,
    AlertLevel,
    ClientFrame,
    Priority,
    ServerFrame,
    client_frame_adapter,
    is_region,
    region_contains,
    server_frame_adapter,
)

from . import CONTRACT_ALERT_JSON, client_frames, contract_alert, server_frames


def body(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(CONTRACT_ALERT_JSON)
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def invalid(doc: Any) -> set[str]:
    with pytest.raises(ValidationError) as info:
        Alert.model_validate(doc)
    return {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}


# ------------------------------------------------------------------------ alert


def test_contract_example_validates_verbatim() -> None:
    alert = contract_alert()
    assert alert.alert_id == 1042
    assert alert.alert_level is AlertLevel.HIGH
    assert alert.priority is Priority.URGENT
    assert alert.location.region == "KE-30"
    assert (alert.location.lat, alert.location.lon) == (-0.09, 34.77)
    assert alert.created_at == datetime(2026, 11, 25, 10, tzinfo=UTC)
    assert alert.msg_id == "1042"


def test_alert_levels_are_ordered() -> None:
    order = ["low", "medium", "high", "critical", "emergency"]
    assert [level.value for level in sorted(AlertLevel, key=lambda lv: lv.rank)] == order
    assert [AlertLevel(v).rank for v in order] == [0, 1, 2, 3, 4]
    assert AlertLevel.EMERGENCY.rank > AlertLevel.CRITICAL.rank > AlertLevel.LOW.rank


def test_priorities_are_ordered() -> None:
    order = ["low", "normal", "high", "urgent", "emergency"]
    assert [p.value for p in sorted(Priority, key=lambda p: p.rank)] == order
    assert [Priority(v).rank for v in order] == [0, 1, 2, 3, 4]


def test_priority_defaults_to_normal() -> None:
    assert Alert.model_validate(body(priority=None)).priority is Priority.NORMAL


@pytest.mark.parametrize("location", [{"region": "KE", "lat": 1.0}, {"region": "KE", "lon": 1.0}])
def test_half_a_point_is_rejected(location: dict[str, Any]) -> None:
    assert invalid(body(location=location)) == {"location"}


def test_region_without_point_is_fine() -> None:
    alert = Alert.model_validate(body(location={"region": "UG-102"}))
    assert alert.location.lat is None and alert.location.lon is None


@pytest.mark.parametrize(
    ("location", "field"),
    [
        ({"region": "KE", "lat": 91, "lon": 0}, "location.lat"),
        ({"region": "KE", "lat": 0, "lon": -181}, "location.lon"),
    ],
)
def test_point_out_of_range(location: dict[str, Any], field: str) -> None:
    assert field in invalid(body(location=location))


def test_alert_is_frozen() -> None:
    alert = contract_alert()
    with pytest.raises(ValidationError):
        alert.title = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        alert.location.region = "UG"  # type: ignore[misc]


def test_extra_fields_forbidden() -> None:
    assert invalid(body(severity="high")) == {"severity"}
    assert invalid(body(location={"region": "KE", "zip": "1"})) == {"location.zip"}


@pytest.mark.parametrize(
    "alert_id", [1, 1042, 2**53 - 1, "1042", "9007199254740993", "ext-1042", "a", "A.b:c_d-e"]
)
def test_alert_id_int_or_plain_string(alert_id: int | str) -> None:
    alert = Alert.model_validate(body(alert_id=alert_id))
    assert alert.alert_id == alert_id
    assert type(alert.alert_id) is type(alert_id)
    assert alert.msg_id == str(alert_id)


@pytest.mark.parametrize(
    "alert_id",
    # integers end at 2^53 - 1 (CONTRACT §4): larger ones are rounded by JavaScript and Dart
    [
        0,
        -1,
        2**53,
        2**63 - 1,
        False,
        "",
        "has space",
        "-leading",
        "_x",
        "a/b",
        "a*b",
        "é",
        "x" * 129,
        1.5,
    ],
)
def test_alert_id_rejects_anything_else(alert_id: Any) -> None:
    assert all(loc.startswith("alert_id") for loc in invalid(body(alert_id=alert_id)))
    with pytest.raises(ValidationError):
        Alert.model_validate_json(json.dumps(body(alert_id=alert_id)))


def test_alert_id_rejects_boolean() -> None:
    """JSON ``true`` is not an id: taken as 1 it is deduplicated against alert 1.

    The exported JSON Schema (integer | string) refuses it too.
    """
    with pytest.raises(ValidationError):
        Alert.model_validate_json(json.dumps(body(alert_id=True)))


def test_required_fields() -> None:
    assert invalid({}) >= {"alert_id", "alert_level", "alert_type", "title", "message", "location"}


def test_timestamps_need_a_zone() -> None:
    assert invalid(body(created_at="2026-11-25T10:00:00")) == {"created_at"}
    alert = Alert.model_validate(body(expiry_time="2026-11-26T12:00:00+02:00"))
    assert alert.expiry_time == datetime(2026, 11, 26, 10, tzinfo=UTC)


def test_is_expired() -> None:
    alert = contract_alert()
    assert not alert.is_expired(datetime(2026, 11, 26, 9, 59, tzinfo=UTC))
    assert alert.is_expired(datetime(2026, 11, 26, 10, 0, tzinfo=UTC))
    assert not Alert.model_validate(body(expiry_time=None)).is_expired()


@pytest.mark.parametrize(
    ("prefix", "region", "inside"),
    [
        ("KE", "KE", True),
        ("KE", "KE-30", True),
        ("KE-30", "KE-30", True),
        ("KE-3", "KE-30", False),
        ("KE-30", "KE", False),
        ("KE", "KEN", False),
        ("UG", "KE-30", False),
        ("UG-1", "UG-102", False),
    ],
)
def test_region_contains(prefix: str, region: str, inside: bool) -> None:
    assert region_contains(prefix, region) is inside


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        ("KE", True),
        ("KE-30", True),
        ("UG-102", True),
        ("GB-ENG", True),
        ("KE-3A", True),
        ("ke", False),
        ("KEN", False),
        ("KE-", False),
        ("KE-3000", False),
        ("K", False),
        ("KE-30\n", False),
        ("", False),
    ],
)
def test_is_region(code: str, valid: bool) -> None:
    assert is_region(code) is valid


# ------------------------------------------------------------------------ frames


def _members(union: Any) -> set[type[BaseModel]]:
    inner = typing.get_args(union)[0]  # Annotated[A | B | ..., Field(...)]
    return set(typing.get_args(inner))


def test_examples_cover_every_frame_type() -> None:
    assert {type(f) for f in server_frames()} == _members(ServerFrame)
    assert {type(f) for f in client_frames()} == _members(ClientFrame)


@pytest.mark.parametrize("frame", server_frames(), ids=lambda f: f.type)
def test_server_frame_round_trips(frame: BaseModel) -> None:
    raw = frame.model_dump_json()
    assert json.loads(raw)["type"] == frame.type  # type: ignore[attr-defined]
    assert server_frame_adapter.validate_json(raw) == frame
    assert server_frame_adapter.validate_python(json.loads(raw)) == frame
    assert server_frame_adapter.dump_json(frame) == raw.encode()


@pytest.mark.parametrize("frame", client_frames(), ids=lambda f: f.type)
def test_client_frame_round_trips(frame: BaseModel) -> None:
    raw = frame.model_dump_json()
    assert client_frame_adapter.validate_json(raw) == frame
    assert client_frame_adapter.validate_python(json.loads(raw)) == frame


def test_alert_frame_carries_the_alert() -> None:
    frame = server_frame_adapter.validate_json(
        '{"type": "alert", "seq": 1, "alert": ' + CONTRACT_ALERT_JSON + "}"
    )
    assert frame.type == "alert"
    assert frame.alert == contract_alert()
    assert frame.redelivered is False


@pytest.mark.parametrize(
    "raw",
    ['{"type": "subscribe_all"}', '{"type": "alert", "seq": 1}', '{"type": ""}', '{"type": 1}'],
)
def test_unknown_client_type_is_rejected(raw: str) -> None:
    with pytest.raises(ValidationError) as info:
        client_frame_adapter.validate_json(raw)
    assert info.value.errors()[0]["type"] == "union_tag_invalid"


def test_missing_type_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        client_frame_adapter.validate_json('{"seq": 1}')
    assert info.value.errors()[0]["type"] == "union_tag_not_found"


@pytest.mark.parametrize("raw", ['{"type": "pong_pong"}', '{"type": "ack", "seq": 1}'])
def test_unknown_server_type_is_rejected(raw: str) -> None:
    with pytest.raises(ValidationError) as info:
        server_frame_adapter.validate_json(raw)
    assert info.value.errors()[0]["type"] == "union_tag_invalid"


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "ack"}',
        '{"type": "ack", "seq": 0}',
        '{"type": "ack", "seq": 1, "extra": true}',
        '{"type": "subscribe", "groups": []}',
        '{"type": "get_stats", "verbose": true}',
    ],
)
def test_wrong_fields_of_known_type_are_rejected(raw: str) -> None:
    with pytest.raises(ValidationError):
        client_frame_adapter.validate_json(raw)


def test_frames_are_frozen() -> None:
    frame = client_frames()[-1]
    with pytest.raises(ValidationError):
        frame.seq = 2
