"""``tocsin bench cap`` end to end, tiny: it measures both store paths and prints its tables."""

from __future__ import annotations

import datetime as dt

from tocsin.bench.scenarios import cap


async def test_cap_bench_measures_both_paths_and_reports() -> None:
    results = await cap.run(alerts=5, rounds=1)
    assert [(r["path"], r["n"]) for r in results["store"]] == [("append", 5), ("store", 5)]
    assert all(r["seconds"] > 0 for r in results["store"])
    text = cap.report(results, dt.datetime(2026, 12, 1, 12, 0))
    assert "store_alert (+ index)" in text and "Supersessions look-up" in text
    assert results["cap_in_ms"] > 0 and results["backlog_ns"]["with_check"] > 0
