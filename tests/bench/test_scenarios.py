"""``tocsin bench <scenario>``: each scenario end to end at a tiny size, and its command line.

The sizes are far below the command line's (the scenarios' ``Sizes``/``Options`` shrink what
the command line fixes); what is checked is that each phase delivered what it sent and
that the report has the rows it is read for, never how fast anything was. The replicas
scenario is checked one replica count at a time (R3, the one with Raft groups); its
node-loss phase waits out real election and reconnect timeouts (about a minute) and is run
by hand only (docs/benchmarks.md).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tocsin.bench.scenarios import (
    SCENARIOS,
    common,
    compression,
    deadlinks,
    delivery,
    ownership,
    peers,
    push,
    replicas,
    scale,
    storm,
    subscriptions,
)
from tocsin.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
WHEN = dt.datetime(2026, 12, 1, 12, 0)


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table right after the line starting with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        if not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the column names


async def test_delivery_sends_every_broadcast_to_every_device_on_both_paths(
    tmp_path: Path,
) -> None:
    sizes = delivery.Sizes(
        broadcasts=2, queued=5, catchup_repeats=2, resets=8, reset_concurrency=4, resets_serial=3
    )
    bench = delivery.DeliveryBench(3, sizes=sizes, gateway={"checkpoint_seconds": 0.2})
    results = await bench.run()

    assert results["aborted"] == [] and results["anomalies"] == []
    assert results["sessions_live"] == 3
    gateway, durables = results["broadcast"]
    for path in (gateway, durables):
        assert (path["broadcasts"], path["deliveries"], path["missing"]) == (2, 6, 0)
    assert results["extra_receipts"] == 0 and results["pull_errors"] == {}
    assert [r["pending"] for r in results["catch_up"]] == [5, 5]  # all queued, then all acked
    assert all("all_ms" in r for r in results["catch_up"])
    assert [(r["calls"], r["concurrency"]) for r in results["resets"]] == [(8, 4), (3, 1)]
    assert results["config"]["checkpoint_seconds"] == 0.2  # --set reached the gateway

    text = delivery.report(results, WHEN)
    assert [row[0] for row in table_rows(text, "## Broadcast latency")][-1] == (
        "ratio durables / gateway"
    )
    assert table_rows(text, "| from the start of the handshake to")[-1][0] == "all 5 alerts"
    phases = [row[0] for row in table_rows(text, "| phase | wall s")]
    assert "broadcasts via gateway (K=2, incl. settling)" in phases
    assert all(row[-1] == "ok" for row in table_rows(text, "| phase | wall s"))

    md = common.write_results(tmp_path, delivery.stem(WHEN, False, 3, False), text, results)
    assert md.name == "delivery-2026-12-01-d3.md"
    assert json.loads(md.with_suffix(".json").read_text())["broadcast"][0]["deliveries"] == 6


async def test_ownership_counts_the_operations_of_every_phase() -> None:
    opts = ownership.Options(label="t", devices=2, takeovers=1, rounds=1, seconds=30, warmup=1)
    data = await ownership.run(opts)

    phases = data["phases"]
    assert list(phases) == list(ownership.PHASES)
    for name, phase in phases.items():
        assert phase["failed"] == 0 and phase["stopped"] is None, (name, phase["errors"])
        assert phase["tap_agrees"], name  # the tap and the monitor saw the same operations
        assert phase["ops_sum_per_handshake"] > 0, name
    assert phases["new"]["handshakes"] == 2 and phases["known"]["handshakes"] == 2
    assert phases["takeover"]["handshakes"] == 1
    assert phases["takeover"]["first_close_codes"] == {"4009": 1}  # replaced, every time
    assert phases["backlog"]["ms"]["to the queued alert"]["n"] == 2  # each got its alert
    assert phases["concurrent"]["handshakes"] == 2  # a round of 20 over 2 devices: 2 distinct

    text = ownership.report(data)
    labels = [row[0] for row in table_rows(text, "## Handshake")]
    assert "takeover: to the first closed" in labels and "backlog: to the queued alert" in labels
    ops = table_rows(text, "## NATS operations per handshake")
    assert ops[-1][0] == "**all**" and len(ops[-1]) == 1 + len(ownership.PHASES)


def test_ownership_compare_still_reads_the_stored_runs() -> None:
    runs = sorted((REPO / "benchmarks" / "results").glob("ownership-2026-12-01-*.json"))
    assert len(runs) == 6
    text = ownership.compare(runs)
    assert text.splitlines()[2].startswith("| new | ")
    assert "| **all** | 8.00 / 8.00 / 8.00 → 8.00 / 8.00 / 8.00 |" in text


@pytest.mark.cluster
async def test_replicas_r3_creates_delivers_and_stops_a_node(tmp_path: Path) -> None:
    sizes = replicas.Sizes(
        concurrency=2,
        open_sample=2,
        idle_seconds=0.5,
        alerts=3,
        readers=2,
        start_seconds=0.2,
        settle_seconds=0.2,
    )
    aborted: list[str] = []
    run = await replicas.measure(tmp_path, 3, 4, aborted, sizes)

    assert aborted == []
    assert run["total_consumers"] == 6
    assert [run[k]["n"] for k in ("create_sequential", "create_concurrent", "create_open")] == [
        2,
        2,
        2,
    ]
    assert [v["consumers"] for v in run["after"]] == [6, 6, 6]  # R3: a copy on every node
    assert all(v["raft_consumer_groups"] == 6 for v in run["after"])
    d = run["delivery"]
    assert (d["consumers"], d["deliveries"], d["ack_floor_ok"]) == (2, 6, True)
    stop = run["graceful_stop"]
    assert stop["consumers_on_node"] == 6 and stop["sigterm_to_exit_s"] is not None

    results = {
        "config": {
            "server": "s",
            "nats_py": "n",
            "python": "p",
            "cores": 2,
            "commit": "c",
            "consumers": 4,
            "sizes": {
                "concurrency": 2,
                "open_sample": 2,
                "idle_seconds": 0.5,
                "alerts": 3,
                "readers": 2,
                "start_seconds": 0.2,
                "settle_seconds": 0.2,
            },
        },
        "runs": [run],
        "aborted": [],
    }
    text = replicas.report(results, WHEN)
    rows = {row[0]: row for row in table_rows(text, "## Cost")}
    assert rows["consumers hosted per node (/jsz)"][2] == "6 / 6 / 6"
    assert float(rows["create, 2 in flight: consumers/s"][2].replace(",", "")) > 0
    assert "M = 3 alerts, K = 2 readers" in text


async def test_subscriptions_changes_and_cohorts_deliver_everything() -> None:
    sizes = subscriptions.Sizes(rounds=2, k=2, micro_loops=5, micro_repeats=2)
    bench = subscriptions.SubBench(4, sizes=sizes)
    results = await bench.run()

    assert results["aborted"] == [] and results["anomalies"] == []
    for key in ("changes_idle", "changes_busy"):
        changes = results[key]
        assert changes["changes"] == 6 and changes["refused"] == {}, key
        assert {a: s["n"] for a, s in changes["by_action"].items()} == {
            "subscribe": 2,
            "update_filters": 2,
            "unsubscribe": 2,
        }
    rows = results["rows"]
    # A alone twice (k/2 each), B alone once (k), then both together (k).
    expected = {
        "cohortA alone": (2, 2),
        "cohortB alone": (2, 2),
        "cohortA with others": (2, 2),
        "cohortB with others": (2, 2),
        "all": (4, 2),
    }
    for name, (devices, broadcasts) in expected.items():
        row = rows[name]
        assert (row["devices"], row["broadcasts"], row["missing"]) == (devices, broadcasts, 0)
        assert row["deliveries"] == devices * broadcasts, name
    assert len(results["micro"]) == 8 and all(v["loops"] == 5 for v in results["micro"].values())

    text = subscriptions.report(results, WHEN)
    cohorts = [row[0] for row in table_rows(text, "## 2. Fine filter")]
    assert cohorts[:5] == [
        "A alone (A B B A)",
        "B alone",
        "A with B connected",
        "B with A connected",
        "A + B together: all devices",
    ]
    assert len(table_rows(text, "## 3. Micro")) == 8


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_each_scenario_has_its_own_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["bench", name, "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tocsin bench {name} ") and "--out" in out


def test_bench_without_a_scenario_is_the_table_run() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--devices", "5"])
    assert (args.scenario, args.quick, args.devices) == (None, True, 5)
    args = build_parser().parse_args(["bench", "subscriptions", "--quick", "--devices", "5"])
    assert (args.scenario, args.quick, args.devices) == ("subscriptions", False, None)
    assert args.scenario_argv == ["--quick", "--devices", "5"]


def test_table_options_before_a_scenario_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "delivery", "--devices", "1"]) == 2
    assert "--quick: options of the table run" in capsys.readouterr().err


def test_bad_scenario_options_are_named_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (
        ["--devices", "-1"],
        ["--set", "CHECKPOINT_SECONDS=1"],
        ["--set", "TOCSIN_NO=1"],
        ["--set", "TOCSIN_CHECKPOINT_SECONDS=soon"],
        ["--set", "TOCSIN_NAMESPACE=other"],  # the run's own
    ):
        with pytest.raises(SystemExit) as caught:
            main(["bench", "delivery", *argv])
        assert caught.value.code == 2
        assert "tocsin bench delivery: error:" in capsys.readouterr().err


def test_a_scenario_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tocsin.bench.scenarios.replicas", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "--skip-loss" in done.stdout


async def test_deadlinks_finds_every_vanished_peer_and_cuts_stuck_readers_only_when_bounded() -> (
    None
):
    """Counts, not times: with a bounded send buffer every half-open and every stuck socket
    is closed; with the kernel's autotuning the small burst fits and no stuck reader is."""
    results = await deadlinks.run(
        devices=3, alerts=40, alert_kib=7, heartbeat=0.5, send_buffers=[0, 32]
    )
    autotuned, bounded = results["runs"]
    for r in (autotuned, bounded):
        assert r["half_open"]["closed"] == 3
        fds = r["half_open"]["fds"]
        assert fds[1] >= fds[0] + 3 and fds[2] < fds[1]  # they held a socket each, let go
    assert bounded["stuck"]["closed"] == 3
    assert autotuned["stuck"]["closed"] == 0
    text = deadlinks.report(results, WHEN)
    rows = table_rows(text, "3 devices per phase")
    assert [r[0] for r in rows] == ["kernel autotuning"] * 2 + ["32 KiB"] * 2
    assert [r[2] for r in rows] == ["3/3", "0/3", "3/3", "3/3"]


async def test_compression_measures_every_mode_and_compresses_only_where_negotiated() -> None:
    results = await compression.run(devices=4, alerts=3, heartbeat=1.0)
    modes = {m["mode"]: m for m in results["modes"]}
    assert list(modes) == [m[0] for m in compression.MODES]
    negotiated = {name: m["negotiated"] for name, m in modes.items()}
    assert negotiated == {
        "off, offered": 0,
        "on, offered": 4,
        "client, asked": 4,
        "off, not offered": 0,
    }
    for m in modes.values():
        assert m["burst"]["deliveries"] == 12 and m["reconnect"]["queued"] == compression.QUEUED
        assert m["burst"]["bytes_per_delivery"] > 0 and m["reconnect"]["bytes"] > 0
    # the same alerts, fewer bytes where frames were compressed (a count, not a speed)
    plain = modes["off, offered"]["burst"]["bytes_per_delivery"]
    assert modes["on, offered"]["burst"]["bytes_per_delivery"] < plain
    assert modes["off, not offered"]["burst"]["bytes_per_delivery"] == plain
    text = compression.report(results, WHEN)
    rows = table_rows(text, "4 devices, a burst")
    assert [r[0] for r in rows] == list(modes) and [r[1] for r in rows[:2]] == ["0/4", "4/4"]


async def test_push_sends_one_push_to_every_registered_device_per_alert() -> None:
    results = await push.run(devices=15, alerts=1, after=0.5, concurrency=4, notifiers=(1, 2))
    assert [(r["pushes"], r["duplicates"], r["missing"]) for r in results["per_alert"]] == [
        (15, 0, 0),
        (15, 0, 0),
    ]
    # one per notifier process that pushed (of the two, one may have taken every job)
    assert results["tokens_minted"] in (2, 3)
    rows = table_rows(push.report(results, WHEN), "15 registered offline devices")
    assert [r[:5] for r in rows] == [["1", "1", "15", "0", "0"], ["2", "1", "15", "0", "0"]]


async def test_storm_every_device_gets_its_backlog_after_each_restart() -> None:
    opts = storm.Options(devices=12, alerts=2, window=0.5, deadline=60, processes=1)
    results = await storm.run(opts)

    assert [r["signal"] for r in results["rounds"]] == ["term", "kill"]
    for r in results["rounds"]:
        assert (r["complete"], r["incomplete"]) == (12, 0), r["handshake_failures"]
        assert r["backlog_ms"]["n"] == 12 and r["all_live_seconds"] >= r["backlog_ms"]["p50"] / 1000
        assert r["attempts"] >= 12
        # every reconnect read its queue and its backlog: the counting saw them all
        calls = r["js_storm"]["counts"]
        assert calls["JS CONSUMER.INFO"] >= 12 and calls["JS CONSUMER.MSG.NEXT"] >= 12
    term, kill = results["rounds"]
    assert term["js_shutdown"]["counts"]["record write (DEVICES publish)"] == 12  # released
    assert "record write (DEVICES publish)" not in kill["js_shutdown"]["counts"]  # killed

    text = storm.report(results, WHEN)
    rows = table_rows(text, "# tocsin bench storm")
    assert [r[0] for r in rows] == ["term", "kill"] and {r[6] for r in rows} == {"12/12"}
    per = table_rows(text, "## JetStream per reconnect, storm")
    assert per[-2][0] == "**JS API calls (subscriber)**"


async def test_peers_drives_tocsin_socketio_and_the_ceiling_with_both_client_profiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Socket.IO runs where node is installed (npm ci into a folder of the test's own),
    and is reported as skipped, with the reason, where it cannot (no node, no npm, no
    registry to install from)."""
    monkeypatch.setenv("TOCSIN_BENCH_NODE_DIR", str(tmp_path / "socketio"))
    o = peers.Options(
        devices=6,
        broadcasts=1,
        burst=3,
        bursts=1,
        paced=2,
        idle=0.5,
        settled=0,
        profiles=peers.PROFILES,
        gateway_env={},
        gateway_code=None,
    )
    results = await peers.Peers(o).run()

    skipped = results.get("socketio_skipped")
    names = ["tocsin", "ceiling"] if skipped else ["tocsin", "socketio", "ceiling"]
    for profile in peers.PROFILES:
        sides = results["profiles"][profile]
        assert list(sides) == names
        for name, side in sides.items():
            assert side["connect"]["ok"] == 6, (name, side["connect"]["failures"])
            assert side["broadcast"]["missing"] == 0 and side["burst"]["missing"] == 0, name
            assert side["paced"]["missing"] == 0 and side["broadcast"]["latency_ms"]["n"] == 6
        assert sides["tocsin"]["returning"]["ok"] == 6
        accepted = {n: s["deflate_accepted"] for n, s in sides.items()}
        # tocsin compresses only for connections that also ask in their query (the
        # default TOCSIN_WS_COMPRESSION=client); bare aiohttp accepts every offer
        want = 6 if profile == "deflate" else 0
        assert accepted["tocsin"] == 0 and accepted["ceiling"] == want
    text = peers.report(results, WHEN)
    rows = table_rows(text, "## Clients that offer no compression")
    assert rows[0][0].startswith("time to accept") and len(rows[0]) == 1 + len(names)


def test_storm_options_are_checked_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, field in (
        (["--devices", "-1"], "--devices"),
        (["--signals", "term,stop"], "--signals"),
        (["--gateway-code", "/nonexistent"], "--gateway-code"),
    ):
        with pytest.raises(SystemExit) as caught:
            main(["bench", "storm", *argv])
        assert caught.value.code == 2
        assert f"error: {field}" in capsys.readouterr().err


async def test_scale_holds_every_step_on_both_gateways_and_reaches_every_device(
    tmp_path: Path,
) -> None:
    o = scale.Options(devices=40, step=20, gateways=2, workers=1, idle=0.5, broadcasts=1, limit=120)
    results = await scale.Scale(o).run()
    steps = results["steps"]
    assert [s["connections"] for s in steps] == [20, 40] and not results["aborted"]
    assert all(s["failed"] == 0 for s in steps), [s["failures"] for s in steps]
    # every process measured; the gateways' own counts add up to what the clients hold
    procs = {"gateway-1", "gateway-2", "nats-server", "loadgen-1"}
    assert set(steps[-1]["rss_mib"]) == procs and set(results["idle"]["cpu_percent"]) == procs
    assert sorted(steps[-1]["held_by_gateway"]) == ["gateway-1", "gateway-2"]
    assert sum(steps[-1]["held_by_gateway"].values()) == 40
    b = results["broadcast"]
    assert b["missing"] == 0 and b["latency_ms"]["n"] == 40
    assert set(results["fits"]["rss_kib_per_connection"]) == procs
    plot = tmp_path / "scale.png"
    text = scale.report(results, WHEN, plot)
    assert plot.stat().st_size > 0 and f"]({plot.name})" in text
    rows = table_rows(text, "## Connect steps")
    assert [r[0] for r in rows] == ["20", "40"] and rows[-1][-1].count("/") == 1


def test_scale_slope_is_least_squares() -> None:
    assert scale.slope([1, 2, 3, 4], [3, 5, 7, 9]) == 2
    assert math.isnan(scale.slope([5], [1]))


def test_scale_options_are_checked_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, field in (
        (["--workers", "0"], "--workers"),
        (["--gateways", "65"], "--gateways"),
        (["--devices", "2000000", "--workers", "1"], "--workers"),  # over open files
    ):
        with pytest.raises(SystemExit) as caught:
            main(["bench", "scale", *argv])
        assert caught.value.code == 2
        assert f"error: {field}" in capsys.readouterr().err
