"""The verifier catches what it is there to catch: synthetic records, no processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .verifier import TAKEOVER_SECONDS, DeviceSpec, Overlap, Verifier

pytestmark = pytest.mark.chaos

KE = DeviceSpec("ann", "phone", ("KE",))
UG_HIGH = DeviceSpec("ben", "phone", ("UG",), groups=("level:high",), risk_threshold=0.5)


def body(
    alert_id: int, region: str, level: str = "high", risk: float | None = 0.9
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "alert_id": alert_id,
        "alert_level": level,
        "alert_type": "outbreak_risk",
        "priority": "urgent",
        "location": {"region": region},
    }
    if risk is not None:
        out["risk_score"] = risk
    return out


def frame(seq: int, b: dict[str, Any], redelivered: bool = False) -> dict[str, Any]:
    return {"type": "alert", "seq": seq, "redelivered": redelivered, "alert": b}


def scene() -> tuple[Verifier, list[dict[str, Any]]]:
    v = Verifier("synthetic")
    v.device_created(KE, 0.0)
    v.device_created(UG_HIGH, 0.0)
    bodies = [
        body(1, "KE-30"),  # ann
        body(2, "UG-102"),  # ben
        body(3, "KE"),  # ann
        body(4, "UG", level="low"),  # nobody: ben wants level:high
        body(5, "UG", risk=0.2),  # nobody: below ben's threshold
        body(6, "UG", level="emergency", risk=0.1),  # ben: emergency ignores the threshold
    ]
    for i, b in enumerate(bodies):
        v.record_publish(b, 1.0 + i)
    return v, bodies


def test_a_clean_run_passes() -> None:
    v, b = scene()
    for seq, x in [(1, b[0]), (3, b[2])]:
        v.record_frame(KE.key, frame(seq, x), 10.0)
    for seq, x in [(2, b[1]), (6, b[5])]:
        v.record_frame(UG_HIGH.key, frame(seq, x), 10.0)
    report = v.report({i + 1: i + 1 for i in range(6)})
    assert report.failures() == []
    assert (report.lost, report.dupes_raw, report.order_violations, report.misdeliveries) == (
        0,
        0,
        0,
        0,
    )
    assert report.expected == 4
    assert report.worst_delay == pytest.approx(9.0)  # alert 1: PubAck at 1.0, got at 10.0


def test_lost_duplicate_out_of_order_and_misdelivery_are_each_counted() -> None:
    v, b = scene()
    v.record_frame(KE.key, frame(3, b[2]), 5.0)
    v.record_frame(KE.key, frame(1, b[0]), 6.0)  # out of order: 1 after 3
    v.record_frame(KE.key, frame(1, b[0], redelivered=True), 7.0)  # a duplicate
    v.record_frame(UG_HIGH.key, frame(2, b[1]), 5.0)
    v.record_frame(UG_HIGH.key, frame(4, b[3]), 5.5)  # misdelivery: a low alert
    # ben never gets 6: lost
    report = v.report({i + 1: i + 1 for i in range(6)})
    assert report.lost == 1
    assert report.dupes_raw == 1
    assert report.dupes_after_dedupe == 0  # the client's dedupe by alert_id
    assert report.order_violations == 1
    assert report.misdeliveries == 1
    assert {p.split(" = ")[0] for p in report.failures()} == {
        "lost",
        "misdeliveries",
        "order_violations",
    }
    assert v.missing(UG_HIGH.key) == {6}


def test_alerts_before_a_device_existed_are_not_owed_to_it() -> None:
    v, _ = scene()
    late = DeviceSpec("cat", "phone", ("KE",))
    v.device_created(late, 2.5)  # after alert 1 and 2, before 3
    assert v.expected(late.key) == {3}


def test_a_frame_whose_seq_disagrees_with_the_stream_is_a_violation() -> None:
    v, b = scene()
    v.record_frame(KE.key, frame(1, b[0]), 5.0)
    v.record_frame(KE.key, frame(7, b[2]), 5.0)  # alert 3 is ALERTS seq 3, not 7
    report = v.report({i + 1: i + 1 for i in range(6)})
    assert report.order_violations == 1


def test_an_alert_never_published_is_a_misdelivery() -> None:
    v, _ = scene()
    v.record_frame(KE.key, frame(9, body(99, "KE")), 5.0)
    assert v.report().misdeliveries == 1


def test_delay_by_fault_window_and_the_json_line(tmp_path: Path) -> None:
    v, b = scene()
    fault = v.fault_start("gateway_kill", 2.5)
    v.fault_end(fault, 2.9)
    v.record_frame(KE.key, frame(1, b[0]), 1.5)  # before the fault: 0.5 s
    v.record_frame(KE.key, frame(3, b[2]), 8.0)  # PubAck at 3.0, within the recovery: 5 s
    report = v.report()
    assert report.worst_delay_by_fault == {"gateway_kill": pytest.approx(5.0)}
    assert report.faults == {"gateway_kill": 1}
    path = tmp_path / "chaos.jsonl"
    report.append_jsonl(path)
    report.append_jsonl(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["scenario"] == "synthetic"
    assert lines[0]["lost"] == 2  # ben never got 2 and 6
    assert "lost" in report.table()


def test_delay_per_phase_from_puback_and_first_attempt_and_the_publish_outage() -> None:
    v = Verifier("phases")
    v.device_created(KE, 0.0)
    v.phase("one_down", 0.0)
    v.record_publish(body(1, "KE"), 1.0)
    v.phase("two_down", 2.0)  # nothing PubAck'ed while the quorum is lost
    v.phase("healed", 6.0)
    v.record_publish(body(2, "KE"), 6.5, attempted_at=2.5)  # retried through the outage
    v.end_phase(9.0)
    v.record_frame(KE.key, frame(1, body(1, "KE")), 1.2)
    v.record_frame(KE.key, frame(2, body(2, "KE")), 7.0)
    report = v.report({1: 1, 2: 2})
    assert report.phases["one_down"] == [1, pytest.approx(0.2), pytest.approx(0.2)]
    assert report.phases["two_down"] == [0, 0.0, 0.0]
    assert report.phases["healed"] == [1, pytest.approx(0.5), pytest.approx(4.5)]
    assert report.publish_outage == pytest.approx(5.5)
    assert "phase two_down" in report.table()


# ------------------------------------------------------------ overlapping connections

#: A device whose token narrows between connections (a token refresh).
JO = DeviceSpec("jo", "phone", ("KE", "UG"), tokens=(("KE", "UG"), ("KE",)))
SEQS: dict[int | str, int] = {i: i for i in range(1, 10)}


def jo_scene() -> Verifier:
    v = Verifier("overlap")
    v.device_created(JO, 0.0)
    for i, region in enumerate(["KE-30", "UG-102", "KE", "UG", "KE-01"], start=1):
        v.record_publish(body(i, region), float(i))
    return v


def test_an_unflagged_repeat_is_counted_on_any_connection_unless_after_a_gateway_kill() -> None:
    v = jo_scene()
    a = v.open_connection(JO.key, ("KE", "UG"), 5.0)
    b = v.open_connection(JO.key, ("KE", "UG"), 5.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.0, a)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.1, b)  # again, unflagged
    v.record_frame(JO.key, frame(2, body(2, "UG-102")), 6.2, a)
    v.record_frame(JO.key, frame(2, body(2, "UG-102"), redelivered=True), 6.3, b)  # flagged
    report = v.report(SEQS)
    assert report.unflagged_repeats == 1
    assert "unflagged_repeats = 1" in report.failures()
    # the same repeat after a gateway kill is allowed (and counted apart)
    v = jo_scene()
    a = v.open_connection(JO.key, ("KE", "UG"), 5.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.0, a)
    v.fault_end(v.fault_start("gateway_kill", 6.5), 7.0)
    b = v.open_connection(JO.key, ("KE", "UG"), 7.1)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 7.2, b)
    report = v.report(SEQS)
    assert (report.unflagged_repeats, report.unflagged_repeats_after_kill) == (0, 1)
    # ... also when the first receipt came after the kill, on a connection opened before
    # it: a stalled reader takes in what the dead gateway wrote before it died
    v = jo_scene()
    a = v.open_connection(JO.key, ("KE", "UG"), 5.0)
    v.fault_end(v.fault_start("gateway_kill", 6.5), 7.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 7.3, a)
    b = v.open_connection(JO.key, ("KE", "UG"), 7.4)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 7.5, b)
    report = v.report(SEQS)
    assert (report.unflagged_repeats, report.unflagged_repeats_after_kill) == (0, 1)
    # ... and after a NATS restart (a newcomer claimed the device on a gateway back first)
    v = jo_scene()
    a = v.open_connection(JO.key, ("KE", "UG"), 5.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.0, a)
    v.fault_end(v.fault_start("nats_restart", 6.5), 6.7)
    b = v.open_connection(JO.key, ("KE", "UG"), 6.8)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.9, b)
    report = v.report(SEQS)
    assert (report.unflagged_repeats, report.unflagged_repeats_after_kill) == (0, 1)
    # ... however long after the heal the device's next connection reads the stale position
    # (a loaded machine), but once per kill: a second unflagged repeat with no kill between
    # is a fault
    v = jo_scene()
    a = v.open_connection(JO.key, ("KE", "UG"), 5.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.0, a)
    v.fault_end(v.fault_start("gateway_kill", 6.5), 7.0)
    b = v.open_connection(JO.key, ("KE", "UG"), 500.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 500.1, b)
    c = v.open_connection(JO.key, ("KE", "UG"), 501.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 501.1, c)
    report = v.report(SEQS)
    assert (report.unflagged_repeats, report.unflagged_repeats_after_kill) == (1, 1)
    assert any("before on" in e for e in report.examples)
    # ... and a second kill excuses the next one
    v.fault_end(v.fault_start("gateway_kill", 500.5), 500.8)
    report = v.report(SEQS)
    assert (report.unflagged_repeats, report.unflagged_repeats_after_kill) == (0, 2)
    # ... but not one received for the first time after the kill began
    v = jo_scene()
    v.fault_end(v.fault_start("gateway_kill", 5.5), 6.0)
    a = v.open_connection(JO.key, ("KE", "UG"), 6.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.1, a)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.2, a)
    assert v.report(SEQS).unflagged_repeats == 1


def test_an_alert_sent_twice_on_one_connection_is_a_fault_even_flagged() -> None:
    v = jo_scene()
    a = v.open_connection(JO.key, ("KE", "UG"), 5.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.0, a)
    v.record_frame(JO.key, frame(1, body(1, "KE-30"), redelivered=True), 7.0, a)  # resent
    b = v.open_connection(JO.key, ("KE", "UG"), 8.0)
    v.record_frame(JO.key, frame(1, body(1, "KE-30"), redelivered=True), 8.1, b)  # allowed
    report = v.report(SEQS)
    assert report.repeats_on_connection == 1 and report.unflagged_repeats == 0
    assert "repeats_on_connection = 1" in report.failures()
    assert any("sent twice on one connection" in e for e in report.examples)


def test_misdelivery_is_judged_against_the_token_of_the_connection() -> None:
    v = jo_scene()
    wide = v.open_connection(JO.key, ("KE", "UG"), 5.0)
    narrow = v.open_connection(JO.key, ("KE",), 5.0)
    v.record_frame(JO.key, frame(2, body(2, "UG-102")), 6.0, wide)  # its token allows it
    v.record_frame(JO.key, frame(2, body(2, "UG-102"), redelivered=True), 6.1, narrow)  # not
    v.record_frame(JO.key, frame(3, body(3, "KE")), 6.2, narrow)
    report = v.report(SEQS)
    assert report.misdeliveries == 1
    assert any("misdelivery: jo/phone #2" in e for e in report.examples)


def test_loss_counts_only_alerts_every_token_of_the_device_allows() -> None:
    v = jo_scene()
    wide = v.open_connection(JO.key, ("KE", "UG"), 0.5)
    v.connection_closed(wide, 2.5, 1000)
    narrow = v.open_connection(JO.key, ("KE",), 2.5)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 1.5, wide)
    v.record_frame(JO.key, frame(5, body(5, "KE-01")), 6.0, narrow)
    # never got: 2 (UG-102) and 4 (UG), allowed by KE,UG only: may be passed over;
    # 3 (KE), allowed by both tokens: lost
    assert v.expected(JO.key) == {1, 3, 5}
    report = v.report(SEQS)
    assert report.lost == 1
    assert v.missing(JO.key) == {3}
    # no connection skipped 3 within what it received (each got one alert): the device did
    assert report.connection_gaps == 0


def test_an_ack_that_settled_what_the_acking_connection_never_received() -> None:
    v = Verifier("split")
    spec = DeviceSpec("kim", "phone", ("KE",))
    v.device_created(spec, 0.0)
    for i in range(1, 6):
        v.record_publish(body(i, "KE"), float(i))
    acking = v.open_connection(spec.key, ("KE",), 5.0)
    silent = v.open_connection(spec.key, ("KE",), 5.0, acks=False)
    # two sessions read one queue: the backlog is split between them
    for seq in (1, 3, 5):
        v.record_frame(spec.key, frame(seq, body(seq, "KE")), 6.0, acking)
        v.record_ack(acking, seq)
    for seq in (2, 4):
        v.record_frame(spec.key, frame(seq, body(seq, "KE")), 6.0, silent)
    seqs: dict[int | str, int] = {i: i for i in range(1, 6)}
    report = v.report(seqs)
    assert report.lost == 0  # the device (the union) has them all
    assert report.connection_gaps == 3  # acking lacks 2, 4; silent lacks 3
    assert report.settled_unseen == 2  # acking's ack of 5 settled 2 and 4
    assert {"connection_gaps = 3", "settled_unseen = 2"} <= set(report.failures())
    # the device-level order is not judged for overlapping connections; per connection
    assert report.order_violations == 0 and report.connection_order == 0


def test_first_receipts_out_of_order_on_one_connection() -> None:
    v = jo_scene()
    a = v.open_connection(JO.key, ("KE",), 5.0)
    v.record_frame(JO.key, frame(3, body(3, "KE")), 6.0, a)
    v.record_frame(JO.key, frame(1, body(1, "KE-30")), 6.1, a)
    v.record_frame(JO.key, frame(3, body(3, "KE"), redelivered=True), 6.2, a)  # a resend
    assert v.report(SEQS).connection_order == 1


def test_overlaps_exactly_one_survives_the_others_closed_with_4009() -> None:
    v = jo_scene()
    ok = [v.open_connection(JO.key, ("KE", "UG"), 5.0) for _ in range(2)]
    v.connection_closed(ok[0], 5.1, 4009)
    v.record_overlap(Overlap("concurrent_connect", JO.key, [c.id for c in ok], 5.0, [ok[1].id]))
    both = [v.open_connection(JO.key, ("KE", "UG"), 6.0) for _ in range(2)]
    v.record_overlap(
        Overlap("concurrent_connect", JO.key, [c.id for c in both], 6.0, [c.id for c in both])
    )
    gone = [v.open_connection(JO.key, ("KE", "UG"), 7.0) for _ in range(2)]
    for c in gone:
        v.connection_closed(c, 7.1, 4009)
    v.record_overlap(Overlap("concurrent_connect", JO.key, [c.id for c in gone], 7.0, []))
    old, new = v.open_connection(JO.key, ("KE", "UG"), 8.0), v.open_connection(JO.key, ("KE",), 9)
    v.connection_closed(new, 9.1, 4009)  # the newer one lost: wrong
    v.record_overlap(Overlap("token_overlap", JO.key, [old.id, new.id], 9.0, [old.id], new.id))
    odd = [v.open_connection(JO.key, ("KE", "UG"), 10.0) for _ in range(2)]
    v.connection_closed(odd[0], 10.1, 1011)  # closed, but not as replaced
    v.record_overlap(
        Overlap("concurrent_connect", JO.key, [c.id for c in odd], 10.0, [odd[1].id], settled=11)
    )
    report = v.report(SEQS)
    assert report.overlaps == {"concurrent_connect": 4, "token_overlap": 1}
    assert report.overlap_violations == 4  # both open, none left, the wrong one, 1011
    assert report.replaced == 4


def test_a_takeover_that_waits_is_slow() -> None:
    v = jo_scene()
    fast = v.open_connection(JO.key, ("KE",), 5.0, prompt=True)
    v.connection_established(fast, 5.1)
    slow = v.open_connection(JO.key, ("KE",), 6.0, prompt=True)
    v.connection_established(slow, 6.0 + TAKEOVER_SECONDS + 3)  # waited out a timeout
    lost_race = v.open_connection(JO.key, ("KE",), 7.0, prompt=True)
    v.connection_closed(lost_race, 7.1, 4009)  # closed before it was established: fine
    never = v.open_connection(JO.key, ("KE",), 8.0, prompt=True)
    v.connection_closed(never, 20.0, 1011)  # never established, not replaced: slow
    together = v.open_connection(JO.key, ("KE",), 9.0)  # one of several at once: not judged
    v.connection_established(together, 19.0)
    report = v.report(SEQS)
    assert report.slow_takeovers == 2
    assert report.worst_takeover == pytest.approx(TAKEOVER_SECONDS + 3)
