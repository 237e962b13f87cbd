"""Fault injection with the delivery verifier (issue 5).

Each scenario runs real processes on loopback (nats-server with file storage, the ingest
service, gateways), publishes through the ingest subject, and injects one kind of fault
while alerts flow; the mixed scenario injects all of them behind a 3-gateway proxy. After
the faults heal and every device drained, the verifier must find nothing lost, misdelivered
or out of order (tests/chaos/verifier.py). Short by default (``make test``);
``TOCSIN_CHAOS=long`` (``make chaos``) runs ``TOCSIN_CHAOS_SECONDS`` of load per scenario
with more devices and faults. ``TOCSIN_CHAOS_REPORT=path`` appends each scenario's figures
as a JSON line; ``TOCSIN_CHAOS_SEED`` replays a run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from .harness import MODE, Outcome, gateway_kills, ingest_kills, nats_restarts, run_scenario
from .verifier import DeviceSpec

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(MODE.timeout)]

#: A mix of tokens (regions, admin), groups, filters and both ack modes.
PROFILES = [
    DeviceSpec("amina", "phone", ("KE",)),
    DeviceSpec("amina", "tablet", ("KE",), ack_mode="auto", groups=("level:high",)),
    DeviceSpec("bo", "phone", ("UG-102",)),
    DeviceSpec("chen", "phone", ("KE-30", "UG"), groups=("region:KE-30", "level:critical")),
    DeviceSpec("dana", "desk", None, ack_mode="auto", groups=("level:high",), risk_threshold=0.5),
    DeviceSpec(
        "eli",
        "phone",
        ("KE",),
        alert_types=("outbreak_risk", "system_health"),
        location={"regions": ["KE-30"]},
    ),
    DeviceSpec(
        "fay",
        "phone",
        ("KE", "UG"),
        groups=("type:outbreak_risk",),
        location={"bbox": [33.0, -2.0, 36.0, 1.0]},
    ),
    DeviceSpec(
        "gus",
        "phone",
        ("UG",),
        groups=("priority:urgent",),
        location={"near": {"lat": 0.3, "lon": 32.6, "radius_km": 300.0}},
    ),
]


def devices(behaviours: dict[str, str] | None = None) -> list[DeviceSpec]:
    """The profiles (``MODE.copies`` of each); ``behaviours`` maps ``user/client`` to one."""
    behaviours = behaviours or {}
    out = []
    for copy in range(MODE.copies):
        for spec in PROFILES:
            suffix = f"-{copy}" if copy else ""
            behaviour = behaviours.get(spec.key, "steady")
            out.append(replace(spec, client_id=spec.client_id + suffix, behaviour=behaviour))
    return out


def check(outcome: Outcome) -> None:
    report = outcome.report
    assert report.published > 0
    assert report.expected > 0
    problems = report.failures()
    assert not problems, f"{report.scenario}: {problems}\n{report.table()}"


async def test_gateway_kill_behind_a_proxy(tmp_path: Path) -> None:
    outcome = await run_scenario(
        "gateway_kill",
        tmp_path,
        devices(),
        [gateway_kills(MODE.faults + 1)],
        gateways=2,
        use_proxy=True,
    )
    check(outcome)
    assert outcome.report.faults["gateway_kill"] == MODE.faults + 1


async def test_ingest_kill(tmp_path: Path) -> None:
    outcome = await run_scenario("ingest_kill", tmp_path, devices(), [ingest_kills(MODE.faults)])
    check(outcome)


async def test_nats_restart(tmp_path: Path) -> None:
    outcome = await run_scenario("nats_restart", tmp_path, devices(), [nats_restarts(MODE.faults)])
    check(outcome)


async def test_clients_drop_and_reconnect_at_random(tmp_path: Path) -> None:
    churn = {k: "churn" for k in ("amina/phone", "bo/phone", "chen/phone", "eli/phone")}
    outcome = await run_scenario("client_churn", tmp_path, devices(churn), [])
    check(outcome)
    assert outcome.report.faults.get("client_drop", 0) >= 2


async def test_clients_that_never_ack_still_get_everything(tmp_path: Path) -> None:
    never = {"chen/phone": "never_ack", "gus/phone": "never_ack"}
    outcome = await run_scenario("never_ack", tmp_path, devices(never), [])
    check(outcome)
    v = outcome.verifier
    laggards = {k for k, s in v.devices.items() if s.behaviour == "never_ack"}
    # they were sent everything, and what they never acked came again
    assert any(r.redelivered for k in laggards for r in v.receipts[k])


async def test_a_slow_reader_blocks_nobody(tmp_path: Path) -> None:
    pause = 4.0 if MODE.name == "short" else 15.0
    outcome = await run_scenario(
        "slow_client", tmp_path, devices({"amina/phone": "slow"}), [], pause_seconds=pause
    )
    check(outcome)
    assert outcome.report.faults.get("slow_client", 0) >= 1
    bystanders = outcome.report.bystander_worst_delay
    assert bystanders is not None and bystanders < pause, "a stalled reader delayed others"


async def test_mixed_faults_behind_three_gateways(tmp_path: Path) -> None:
    behaviours = {
        "amina/phone": "churn",
        "bo/phone": "churn",
        "chen/phone": "never_ack",
        "eli/phone": "slow",
    }
    outcome = await run_scenario(
        "mixed",
        tmp_path,
        devices(behaviours),
        [gateway_kills(MODE.faults + 1), ingest_kills(MODE.faults), nats_restarts(MODE.faults)],
        gateways=3,
        use_proxy=True,
        pause_seconds=2.0 if MODE.name == "short" else 8.0,
    )
    check(outcome)
