"""The device model: its position as a value, the decisions on it, its record's shape."""

from __future__ import annotations

import logging

import orjson
import pytest

from tocsin.gateway.device import Position, Record, checkpoint_due, record_due
from tocsin.schemas.subscription import Subscription


def test_a_position_resumes_after_its_floor() -> None:
    assert Position(41, 45).next_seq == 42
    assert Position().next_seq == 1


def test_decisions_on_a_position() -> None:
    assert checkpoint_due(floor=5, saved_floor=4)
    assert not checkpoint_due(floor=5, saved_floor=5)
    assert record_due(5, 4, since_recorded=1.0, refresh_seconds=100.0)  # floor moved
    assert record_due(5, 5, since_recorded=100.0, refresh_seconds=100.0)  # would expire
    assert not record_due(5, 5, since_recorded=99.0, refresh_seconds=100.0)


def test_the_stored_record_keeps_its_shape_and_reads_back() -> None:
    sub = Subscription.model_validate(
        {"groups": ["region:KE"], "filters": {"location_filter": {"regions": ["KE-30"]}}}
    )
    record = Record.new("ada", "phone").positioned(Position(7, 9), sub).owned_by("s1", "g1")
    body = record.body()
    assert set(body) == {"user", "client_id", "floor", "sent", "subscription", "owner", "gateway"}
    assert body["subscription"] == sub.as_dict()
    back = Record.parse("c", orjson.dumps(body))
    assert back == record and back is not None and back.position == Position(7, 9)
    assert not back.legacy


def test_a_record_of_an_older_version_has_no_owner_key_and_is_legacy() -> None:
    old = {"user": "ada", "client_id": "phone", "floor": 3, "subscription": {}}
    record = Record.parse("c", orjson.dumps(old))
    assert record is not None and record.legacy and record.owner is None
    assert record.position == Position(3, 0)
    assert not record.owned_by("s1", "g1").legacy


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "record"),
        (b'{"client_id": "phone", "floor": 1, "subscription": {}}', "user"),
        (b'{"user": "a", "client_id": "p", "floor": -1, "subscription": {}}', "floor"),
        (b'{"user": "a", "client_id": "p", "floor": 1, "owner": 5, "subscription": {}}', "owner"),
    ],
)
def test_an_unreadable_record_counts_as_none_and_the_log_names_the_field(
    body: bytes, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tocsin.gateway.device"):
        assert Record.parse("dev-consumer", body) is None
    assert "dev-consumer" in caplog.text and field in caplog.text
