"""The verifier catches what it is there to catch: synthetic records, no processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .verifier import DeviceSpec, Verifier

pytestmark = pytest.mark.chaos

KE = DeviceSpec("ann", "phone", ("KE",))
UG_HIGH = DeviceSpec("ben", "phone", ("UG",), groups=("level:high",), risk_threshold=0.5)


def body(alert_id: int, region: str, level: str = "high", risk: float | None = 0.9) -> dict:
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


def frame(seq: int, b: dict, redelivered: bool = False) -> dict:
    return {"type": "alert", "seq": seq, "redelivered": redelivered, "alert": b}


def scene() -> tuple[Verifier, list[dict]]:
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
