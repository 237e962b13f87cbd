"""Device records and claims: parsing, the claim's states, what nats-py must still offer."""

from __future__ import annotations

import orjson
import pytest

from tocsin.gateway.device import Record
from tocsin.gateway.ownership import Claim, Lost, State, Suspended
from tocsin.schemas.subscription import Subscription


def body(**fields: object) -> bytes:
    base: dict[str, object] = {
        "user": "ada",
        "client_id": "phone",
        "floor": 7,
        "sent": 9,
        "subscription": {"groups": ["region:KE-30"]},
        "owner": "s1",
        "gateway": "g1",
    }
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def test_a_record_round_trips() -> None:
    record = Record.parse("dev__ada__phone", body())
    assert record is not None
    assert (record.floor, record.sent, record.owner, record.gateway) == (7, 9, "s1", "g1")
    assert record.subscription == Subscription.model_validate({"groups": ["region:KE-30"]})
    assert not record.legacy
    assert Record.parse("x", orjson.dumps(record.body())) == record


def test_a_record_without_owner_is_free_and_legacy() -> None:
    """Written by a version before ownership: nobody owns it, and its sessions listen on
    the old per-device takeover subject."""
    record = Record.parse("x", body(owner=..., gateway=...))
    assert record is not None and record.owner is None and record.legacy
    assert not record.owned_by("s2", "g2").legacy


def test_a_claimed_but_never_opened_record_has_no_floor() -> None:
    record = Record.parse("x", body(floor=None))
    assert record is not None and record.floor is None


@pytest.mark.parametrize(
    "bad",
    [b"not json", body(floor="seven"), body(owner=5), body(gateway=["g"]), body(user=...)],
)
def test_an_unreadable_record_counts_as_none(bad: bytes) -> None:
    assert Record.parse("x", bad) is None


def test_releasing_drops_the_gateway_too() -> None:
    record = Record(user="ada", client_id="phone", floor=3).owned_by("s1", "g1")
    record = record.owned_by(None, "g1")
    assert record.owner is None and record.gateway is None


def test_a_claim_acts_only_while_owning() -> None:
    claim = Claim("dev__ada__phone", "s1", "g1", 5, None)
    assert claim.epoch == 5 and claim.usable.is_set()
    claim.check()
    claim._become(State.SUSPENDED)
    assert not claim.usable.is_set()
    with pytest.raises(Suspended):
        claim.check()
    claim._become(State.OWNING)
    claim.check()
    claim._become(State.LOST)
    with pytest.raises(Lost):
        claim.check()
    assert not claim.usable.is_set()
