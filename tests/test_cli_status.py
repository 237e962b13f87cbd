"""``tocsin status``: known traffic on a real nats-server (alerts, device queues made by
real clients of a real gateway, dead letters) and the counts it reports, the gatherer of
the gateways' stats against responders the tests start, its one-line failures, and one
test against a real gateway's stats responder."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tocsin.cli import main
from tocsin.cli.common import redact
from tocsin.cli.status import (
    collect,
    device_of,
    render,
    stopped_tasks,
)
from tocsin.core.embedded import free_port
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.gateway.stats import gather_gateways
from tocsin.ingest.pipeline import Reason, Rejection, dead_letter

from .support import (
    Client,
    RunningGateway,
    alert,
    append,
    eventually,
    run_tocsin,
    start_gateway,
    token,
)
from .test_cli import clean_env, lines, tocsin

#: A process's deadline: it starts Python and imports tocsin before it connects.
PROCESS_DEADLINE = 30.0

#: The top-level keys of ``--json`` (docs/operations.md): added to, never renamed.
TOP_KEYS = {
    "schema",
    "generated_at",
    "namespace",
    "nats",
    "streams",
    "device_queues",
    "dlq",
    "gateways",
    "push",
    "warnings",
}
STREAM_KEYS = {
    "name",
    "exists",
    "messages",
    "bytes",
    "first_seq",
    "first_time",
    "last_seq",
    "last_time",
    "consumers",
    "replicas",
    "leader",
}


async def status(settings: Settings, *args: str, cwd: Path) -> tuple[int, str, str]:
    """``python -m tocsin status ARGS`` as a process of its own; this event loop stays free
    (an in-process gateway or a test's responder answers while it runs)."""
    return await run_tocsin(settings, "status", *args, cwd=cwd, timeout=PROCESS_DEADLINE)


async def status_json(settings: Settings, *args: str, cwd: Path) -> dict[str, Any]:
    code, out, err = await status(settings, "--json", *args, cwd=cwd)
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


@asynccontextmanager
async def responders(nats_url: str, subject: str, *bodies: bytes) -> AsyncIterator[None]:
    """One subscriber per body on ``subject``, each answering every request with its body,
    each on a connection of its own (as gateways are)."""
    conns = [await nats.connect(nats_url) for _ in bodies]
    try:
        for conn, body in zip(conns, bodies, strict=True):

            async def answer(msg: Msg, body: bytes = body) -> None:
                await msg.respond(body)

            await conn.subscribe(subject, cb=answer)
            await conn.flush()
        yield
    finally:
        for conn in conns:
            await conn.close()


def gateway_stats(instance: str, connections: int, healthy: bool = True) -> bytes:
    """A body shaped as the gateway's ``GET /api/v1/alerts/stats`` (gateway/stats.py)."""
    tasks = {name: {"running": True} for name in ("ticker", "live_feed")}
    if not healthy:
        tasks["live_feed"]["running"] = False
    return json.dumps(
        {
            "instance": instance,
            "active_connections": connections,
            "healthy_connections": connections,
            "avg_latency_ms": 2.5,
            "messages_sent": 40,
            "redelivered": 1,
            "acks": 39,
            "rate_limit_violations": 0,
            "system_health": {
                "nats_connected": healthy,
                "background_tasks_running": tasks,
                "all_background_tasks_running": healthy,
                "shutting_down": False,
            },
            "offline_queues": {"total_queued_messages": 5, "queued_devices": 2},
        }
    ).encode()


# --------------------------------------------------------------------------- known traffic


async def test_status_reports_exactly_the_traffic_it_was_given(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    tmp_path: Path,
) -> None:
    settings = make_settings()
    running = await start_gateway(settings)
    try:
        # Three devices, queues made by real clients at the live edge, then gone.
        for user, regions, client_id in (
            ("alice", ("KE",), "phone"),
            ("bob", ("KE-30",), "tablet"),
            ("carol", ("TZ",), "pager"),
        ):
            await Client.introduce(running.ws_url, token(user, regions), client_id=client_id)
        await eventually(lambda: len(running.gw.sessions) == 0, what="sessions closed")
    finally:
        await running.stop()
    # alice (KE) is owed 3, bob (KE-30) 2, carol (TZ) nothing; the UG alert is nobody's.
    acks = [await append(js, names, alert(region)) for region in ("KE-30", "KE-47", "KE-30")]
    acks.append(await append(js, names, alert("UG-102")))
    bad_alert = [{"field": "location.region", "message": "not a region code"}]
    await dead_letter(js, names, b"{not json", Rejection(Reason.INVALID_JSON, []))
    await dead_letter(js, names, b'{"x": 1}', Rejection(Reason.INVALID_ALERT, bad_alert))

    doc = await status_json(settings, "--top", "2", cwd=tmp_path)
    assert set(doc) == TOP_KEYS and doc["schema"] == "tocsin.status/1"
    assert doc["namespace"] == names.namespace

    streams = doc["streams"]
    assert list(streams) == ["alerts", "ingest", "dlq", "devices", "alert_index", "push_dlq"]
    assert all(set(s) == STREAM_KEYS and s["exists"] for s in streams.values())
    alerts = streams["alerts"]
    assert alerts["name"] == names.alerts_stream
    assert alerts["messages"] == 4
    assert (alerts["first_seq"], alerts["last_seq"]) == (acks[0].seq, acks[-1].seq)
    assert alerts["first_time"] <= alerts["last_time"] <= doc["generated_at"]
    assert alerts["bytes"] > 0 and alerts["consumers"] >= 3
    assert streams["dlq"]["name"] == names.dlq_stream and streams["dlq"]["messages"] == 2
    assert streams["ingest"]["messages"] == 0 and streams["ingest"]["first_seq"] is None
    assert streams["devices"]["messages"] == 3  # one record per device

    queues = doc["device_queues"]
    assert queues["stream"] == names.alerts_stream
    assert queues["devices"] == 3 and queues["devices_with_pending"] == 2
    assert (queues["pending_total"], queues["num_pending"], queues["num_ack_pending"]) == (5, 5, 0)
    assert queues["other_consumers"] == alerts["consumers"] - 3
    assert [
        (d["user"], d["client_id"], d["pending_total"], d["num_pending"], d["num_ack_pending"])
        for d in queues["top"]
    ] == [("alice", "phone", 3, 3, 0), ("bob", "tablet", 2, 2, 0)]
    assert queues["top"][0]["consumer"] == names.device_consumer("alice", "phone")
    assert all(d["last_active"] is not None and d["gateway"] is None for d in queues["top"])

    dlq = doc["dlq"]
    assert dlq["stream"] == names.dlq_stream and dlq["messages"] == 2
    assert dlq["by_reason"] == {"invalid_alert": 1, "invalid_json": 1}
    newest, oldest = dlq["latest"]
    assert (newest["reason"], newest["errors"]) == ("invalid_alert", bad_alert)
    assert newest["subject"] == names.dlq_subject("invalid_alert") and newest["bytes"] == 8
    assert (oldest["reason"], oldest["errors"]) == ("invalid_json", [])
    assert newest["seq"] > oldest["seq"] and newest["time"] >= oldest["time"]

    # The gateway was stopped: nobody answers, which is reported, not an error.
    gateways = doc["gateways"]
    assert gateways["subject"] == names.gateways_stats_subject
    assert (gateways["answered"], gateways["replies"]) == (0, [])
    assert any("no gateway answered" in w for w in doc["warnings"])
    assert any("2 dead-lettered" in w for w in doc["warnings"])

    # The same, for a person: no colour into a pipe, the devices most owed first.
    code, out, err = await status(settings, "--top", "2", cwd=tmp_path)
    assert code == 0, err
    assert "\x1b[" not in out
    text = lines(out)
    assert text[0].startswith("tocsin status") and names.namespace in text[0]
    table = [line for line in text if line.startswith("  ")]
    heading = next(i for i, line in enumerate(table) if line.split()[:2] == ["user", "client"])
    alice, bob = table[heading + 1].split(), table[heading + 2].split()
    assert alice[:5] == ["alice", "phone", "3", "3", "0"]
    assert bob[:5] == ["bob", "tablet", "2", "2", "0"]
    # Aligned: each column starts where its heading does.
    assert table[heading + 1].index("phone") == table[heading].index("client id")
    assert any("1 more (--top N)" in line for line in text)
    assert any(line.startswith("Dead letters  2 in " + names.dlq_stream) for line in text)
    assert any("invalid_alert" in line and "location.region" in line for line in table)


async def test_top_zero_lists_no_device_but_counts_them_all(
    settings: Settings, js: JetStreamContext, names: Names, nc: Nats
) -> None:
    running = await start_gateway(settings)
    try:
        await Client.introduce(running.ws_url, token("dora", ("KE",)))
    finally:
        await running.stop()
    await append(js, names, alert("KE-30"))
    doc = await collect(nc, names, top=0, wait=0.2)
    queues = doc["device_queues"]
    assert (queues["devices"], queues["pending_total"], queues["top"]) == (1, 1, [])


# --------------------------------------------------------------------------- gateways


async def test_gatherer_collects_every_gateways_answer(
    nats_url: str, names: Names, nc: Nats
) -> None:
    subject = names.gateways_stats_subject
    bodies = (gateway_stats("gw-b", 7), gateway_stats("gw-a", 5), b"not json")
    async with responders(nats_url, subject, *bodies):
        # Under load an answer can take seconds: wait long, stop at the third.
        found = await gather_gateways(nc, subject, wait=60.0, expect=3)
    assert found["subject"] == subject and found["wait_seconds"] == 60.0
    assert found["answered"] == 2 and found["unreadable"] == 1
    assert found["no_responders"] is False
    assert [r["instance"] for r in found["replies"]] == ["gw-a", "gw-b"]
    assert found["replies"][1] == json.loads(gateway_stats("gw-b", 7))


async def test_no_gateway_is_a_finding_and_ends_the_wait_at_once(names: Names, nc: Nats) -> None:
    """NATS answers "no responders" (503) when nobody listens: no need to wait it out."""
    found = await gather_gateways(nc, names.gateways_stats_subject, wait=60.0)
    assert found["no_responders"] is True  # the 503 ended it, not the 60 s
    assert (found["answered"], found["unreadable"], found["replies"]) == (0, 0, [])


async def test_status_shows_each_gateway_and_flags_an_unhealthy_one(
    settings: Settings, js: JetStreamContext, names: Names, nats_url: str, tmp_path: Path
) -> None:
    subject = names.gateways_stats_subject
    async with responders(
        nats_url, subject, gateway_stats("gw-1", 12), gateway_stats("gw-2", 3, False)
    ):
        doc = await status_json(settings, cwd=tmp_path)
        code, out, err = await status(settings, cwd=tmp_path)
    assert doc["gateways"]["answered"] == 2
    assert [r["active_connections"] for r in doc["gateways"]["replies"]] == [12, 3]
    assert "gateway gw-2 is not connected to NATS" in doc["warnings"]
    assert "gateway gw-2: background task(s) not running: live_feed" in doc["warnings"]
    assert not any("gw-1" in w or "no gateway" in w for w in doc["warnings"])
    assert code == 0, err
    text = lines(out)
    assert any(
        line.startswith("Gateways  2 answered") and "15 connections" in line for line in text
    )
    gw1 = next(line.split() for line in text if line.strip().startswith("gw-1"))
    gw2 = next(line.split() for line in text if line.strip().startswith("gw-2"))
    assert gw1 == ["gw-1", "12", "12", "2.5", "ms", "40", "1", "39", "0", "ok", "ok"]
    assert gw2[:3] == ["gw-2", "3", "3"] and gw2[-3:] == ["DOWN", "DOWN:", "live_feed"]


async def test_real_gateway_answers_the_stats_request(
    make_settings: Callable[..., Settings], js: JetStreamContext, tmp_path: Path
) -> None:
    """Against the gateway itself, not a stand-in: it must answer on
    ``Names.gateways_stats_subject`` with the body of ``GET /api/v1/alerts/stats``."""
    running: RunningGateway = await start_gateway(make_settings())
    try:
        client = await Client.connect(running.ws_url, token("erin", ("KE",)))
        await client.next("connection_established")
        try:
            doc = await status_json(running.settings, cwd=tmp_path)
            code, out, err = await status(running.settings, cwd=tmp_path)
        finally:
            await client.close()
    finally:
        await running.stop()
    replies = doc["gateways"]["replies"]
    assert [r.get("instance") for r in replies] == [running.gw.instance], doc["gateways"]
    assert replies[0]["active_connections"] == 1
    assert replies[0]["system_health"]["nats_connected"] is True
    assert stopped_tasks(replies[0]["system_health"]) == []
    assert not doc["warnings"], doc["warnings"]
    # The device's record names the gateway whose session holds it.
    [device] = doc["device_queues"]["top"]
    assert (device["user"], device["gateway"]) == ("erin", running.gw.instance)
    assert code == 0, err
    row = next(line.split() for line in lines(out) if line.strip().startswith(running.gw.instance))
    assert row[1:3] == ["1", "1"] and row[-2:] == ["ok", "ok"]


# --------------------------------------------------------------------------- failures


def test_unreachable_nats_is_one_line_and_exit_1(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://watch:s3cret-pw@127.0.0.1:{port}"
    out = tocsin("status", env=clean_env(TOCSIN_NATS_URL=url), cwd=tmp_path)
    assert out.returncode == 1  # as tocsin publish --via nats: NATS is not there
    [line] = lines(out.stderr)
    assert line.startswith("tocsin status: cannot connect to NATS")
    assert f"127.0.0.1:{port}" in line and "s3cret-pw" not in line
    assert out.stdout == ""


def test_unset_nats_url_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = tocsin("status", "--json", env=clean_env(), cwd=tmp_path)
    assert out.returncode == 2  # as tocsin gateway and ingest: a setting is missing
    [line] = lines(out.stderr)
    assert "TOCSIN_NATS_URL" in line and out.stdout == ""


@pytest.mark.parametrize(
    ("flags", "word"),
    [(["--top", "-1"], "--top"), (["--wait", "0"], "--wait"), (["--gateways", "0"], "--gateways")],
)
def test_bad_flags_exit_2(flags: list[str], word: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", *flags]) == 2
    [line] = lines(capsys.readouterr().err)
    assert line.startswith(f"tocsin status: {word}")


# --------------------------------------------------------------------------- pieces


def test_redact_drops_user_and_password_only() -> None:
    assert redact("nats://u:p@10.0.0.1:4222") == "nats://10.0.0.1:4222"
    assert redact("tls://token@nats.example:4443") == "tls://nats.example:4443"
    assert redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_a_hashed_device_queue_is_named_by_its_metadata() -> None:
    names = Names("x")
    long_user = "u" * 300
    name = names.device_consumer(long_user, "phone")
    assert name.startswith("devh__")
    info = {
        "name": name,
        "config": {"metadata": {"tocsin.user": long_user, "tocsin.client_id": "phone"}},
    }
    assert device_of(names, info) == (long_user, "phone")
    assert device_of(names, {"name": names.device_consumer("a b", "c")}) == ("a b", "c")
    assert device_of(names, {"name": "ingest", "config": {}}) is None


def test_colour_only_when_asked_and_never_from_the_data() -> None:
    doc: dict[str, Any] = {
        "schema": "tocsin.status/1",
        "generated_at": "2026-05-01T10:00:10.000Z",
        "namespace": "",
        "nats": {"url": "nats://127.0.0.1:4222"},
        "streams": {},
        "device_queues": {
            "stream": "ALERTS",
            "devices": 0,
            "devices_with_pending": 0,
            "pending_total": 0,
            "num_pending": 0,
            "num_ack_pending": 0,
            "other_consumers": 0,
            "unlisted_consumers": 0,
            "top": [
                {
                    "user": "mallory\x1b[2J",
                    "client_id": "phone",
                    "consumer": "dev__mallory_1b_5b2J__phone",
                    "pending_total": 0,
                    "num_pending": 0,
                    "num_ack_pending": 0,
                    "last_active": "2026-05-01T09:58:05.000Z",
                    "gateway": None,
                }
            ],
        },
        "dlq": {"stream": "INGEST_DLQ", "messages": 0, "by_reason": {}, "latest": []},
        "gateways": {
            "subject": "tocsin.gateways.stats",
            "wait_seconds": 1.0,
            "answered": 0,
            "unreadable": 0,
            "replies": [],
        },
        "warnings": ["no gateway answered on tocsin.gateways.stats within 1s"],
    }
    plain = render(doc)
    assert "\x1b" not in plain
    assert "mallory\\x1b[2J  phone" in plain and "2m5s ago" in plain
    coloured = render(doc, colour=True)
    assert "\x1b[1mtocsin status\x1b[0m" in coloured and "no namespace" in coloured
    assert "\x1b[2J" not in coloured
