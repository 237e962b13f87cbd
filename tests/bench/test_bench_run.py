"""``tocsin bench`` end to end at a tiny size: every row of the table is measured and written.

The sizes are far below the targets; what is checked is that each phase delivers what it
sent (so a broken phase cannot print a plausible number) and that the report is complete.
"""

from __future__ import annotations

import json
import os
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
    ],
)
def test_bad_flags_are_named_before_anything_starts(argv: list[str], flag: str) -> None:
    from tocsin.cli import build_parser
    from tocsin.cli.common import Fail

    args = build_parser().parse_args(["bench", "--quick", *argv])
    with pytest.raises(Fail) as caught:
        cmd_bench(args)
    assert caught.value.code == 2 and caught.value.message.startswith(f"{flag}:")
