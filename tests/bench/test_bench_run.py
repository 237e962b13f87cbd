"""``tocsin bench`` end to end at a tiny size: every row of the table is measured and written.

The sizes are far below the targets; what is checked is that each phase delivers what it
sent (so a broken phase cannot print a plausible number) and that the report is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from tocsin.bench.run import Plan, run_bench, table
from tocsin.cli.bench import cmd_bench

TINY = Plan(
    connections=30,
    hold_seconds=1.5,
    targeted=3,
    devices=12,
    broadcasts=2,
    burst=5,
    bursts=1,
    catchup_runs=1,
    heartbeat=1,
    processes=1,
)


async def test_a_tiny_run_measures_every_row(tmp_path: Path) -> None:
    report = await run_bench(TINY, "tiny", tmp_path)
    r = report["results"]
    c = r["connections"]
    assert (c["ok"], c["failed"], c["open_after_hold"], c["closed_during_hold"]) == (30, 0, 30, 0)
    assert c["pings_answered"] >= 1  # heartbeats reached the load generator and were answered
    assert r["targeted"]["latency_ms"]["n"] == 3  # one device per targeted alert
    for side in ("tocsin", "ceiling"):
        assert r["broadcast"][side]["devices"] == 12
        assert r["broadcast"][side]["latency_ms"]["n"] == 12 * 2  # every device, every alert
        assert r["sustained"]["best"][side] > 0
    assert r["catchup"]["all_100_ms"]["n"] == 1
    assert r["scrapes"]["connections"] == 30 and r["scrapes"]["metrics_ms"]["n"] == 10
    assert r["scrapes"]["stats_ms"]["n"] == 10 and r["scrapes"]["stats_cold_ms"] > 0
    assert r["broadcast"]["p99_ratio"] is not None and r["sustained"]["ratio"] is not None
    assert set(report["cpu_percent_of_one_core"]) == {
        "connect",
        "hold",
        "scrapes",
        "targeted",
        "broadcast",
        "sustained",
        "catchup",
    }
    written = json.loads((tmp_path / "tiny.json").read_text())
    assert written["results"]["connections"]["ok"] == 30
    assert (tmp_path / "tiny.md").read_text().count("\n| ") >= 7
    for plot in report["plots"]:
        assert os.stat(plot).st_size > 10_000  # a drawn PNG, not an empty canvas
    assert "ratio" in table(report)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--connections", "1"], "--connections"),
        (["--connections", "0"], "--connections"),
        (["--devices", "-3"], "--devices"),
        (["--set", "CHECKPOINT_SECONDS=60"], "--set"),
        (["--set", "TOCSIN_CHECKPOINT_SECONDS"], "--set"),
        (["--targeted", "0"], "--targeted"),
        (["--hold", "-1"], "--hold"),
        (["--gateway-code", "/nonexistent"], "--gateway-code"),
    ],
)
def test_bad_flags_are_named_before_anything_starts(argv: list[str], flag: str) -> None:
    from tocsin.cli import build_parser
    from tocsin.cli.common import Fail

    args = build_parser().parse_args(["bench", "--quick", *argv])
    with pytest.raises(Fail) as caught:
        cmd_bench(args)
    assert caught.value.code == 2 and caught.value.message.startswith(f"{flag}:")


async def test_only_the_targeted_phase_with_its_parts(tmp_path: Path) -> None:
    plan = Plan(**(asdict(TINY) | {"targeted": 5}))
    report = await run_bench(plan, "tiny-targeted", tmp_path, only="targeted")
    r = report["results"]
    assert set(r) == {"connections", "targeted"}  # no scrapes, broadcast, sustained, catch-up
    assert set(report["cpu_percent_of_one_core"]) == {"connect", "hold", "targeted"}
    t = r["targeted"]
    assert t["latency_ms"]["n"] == 5
    assert t["parts_ms"]["pub_ack"]["n"] == 5
    assert t["parts_ms"]["pub_js"]["n"] == 5  # the orchestrator's own consumer saw each
    assert t["parts_ms"]["js_recv"]["n"] == 5
    assert set(t["waited_percent"]) >= {"gateway", "nats-server", "loadgen-0", "orchestrator"}
    assert set(t["gateway_gc_pauses"]) == {"0", "1", "2"}  # the gateway's, by generation
    assert all(g["collections"] >= g["over_5_ms"] >= 0 for g in t["gateway_gc_pauses"].values())
    for slow in t["slow"]:
        assert slow["ms"] > t["slow_ms"] and "gateway" in slow["ran_ms"]
    assert len(report["load_average"]["start"]) == 3
    text = table(report)
    assert "targeted alert among 30 online (5 alerts)" in text and "broadcast" not in text
    with pytest.raises(ValueError, match="only"):
        await run_bench(plan, "bad", tmp_path, only="broadcast")
