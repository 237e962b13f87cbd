"""Chaos on a 3-node NATS cluster (issue 5): streams R3, device queues R1, 2 gateways
behind the proxy, the usual device profiles, while the engine publishes.

* ``node_kill``: ``kill -9`` the node holding the most device queues and stream leaders,
  make some of its devices reconnect (their queue is rebuilt on a live node from its
  ``DEVICES`` record, docs/operations.md §3), bring it back.
* ``quorum_loss``: the same, then, while it is still down, a second node: the streams lose
  their quorum and no PubAck comes (the engine retries the same ``alert_id``); then both
  come back on their stores.

After the heal and the drain nothing may be lost, misdelivered or out of order. The report
gives the worst delay per phase (all up / one down / two down / returning / healed, by
PubAck time;
and from the alert's first publish attempt), the publish outage, and the queues rebuilt.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from .harness import MODE, Outcome, node_kills, run_scenario
from .test_chaos import check, devices

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.timeout(MODE.timeout + 120),
]

SHORT = MODE.name == "short"
#: Three nodes, two gateways, ingest and the clients share the cores: a gentler rate.
CLUSTER_MODE = replace(MODE, rate=20.0 if SHORT else 15.0)
CYCLES = 1 if SHORT else max(1, MODE.faults // 2)
LEAD = 1.0 if SHORT else 5.0  # load before a node dies
AFTER = 1.5 if SHORT else 5.0  # load after the heal

BEHAVIOURS = {"bo/phone": "churn", "gus/phone": "never_ack"}


def cluster_checks(outcome: Outcome, kills: int) -> None:
    check(outcome)
    report = outcome.report
    assert report.faults.get("node_kill", 0) >= kills
    assert report.faults.get("reconnect_queue_node_down", 0) >= 1, "no device was made to"
    assert report.queues_rebuilt is not None


async def test_one_node_killed_and_returned(tmp_path: Path) -> None:
    outcome = await run_scenario(
        "cluster_node_kill",
        tmp_path,
        devices(BEHAVIOURS),
        [node_kills(CYCLES, second=False, lead=LEAD, one_down=5.0 if SHORT else 15.0, two_down=0)],
        gateways=2,
        use_proxy=True,
        cluster=True,
        mode=CLUSTER_MODE,
        load_after_faults=AFTER,
    )
    cluster_checks(outcome, 1)
    assert "quorum_loss" not in outcome.report.faults


async def test_two_nodes_killed_quorum_lost_then_both_returned(tmp_path: Path) -> None:
    outcome = await run_scenario(
        "cluster_quorum_loss",
        tmp_path,
        devices(BEHAVIOURS),
        [
            node_kills(
                CYCLES,
                second=True,
                lead=LEAD,
                one_down=3.0 if SHORT else 10.0,
                two_down=2.5 if SHORT else 8.0,
            )
        ],
        gateways=2,
        use_proxy=True,
        cluster=True,
        mode=CLUSTER_MODE,
        load_after_faults=AFTER,
    )
    cluster_checks(outcome, 2)
    report = outcome.report
    assert report.faults.get("quorum_loss", 0) >= 1
    # no PubAck while two of three nodes were down
    assert report.publish_outage >= 2.0
