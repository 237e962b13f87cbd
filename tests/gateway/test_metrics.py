"""GET /metrics on a real gateway: strict Prometheus text format, counters that move."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..support import (
    Client,
    RunningGateway,
    SilentClient,
    alert,
    append,
    eventually,
    start_gateway,
    token,
)

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
LABEL = re.compile(rf'({LABEL_NAME})="((?:[^"\\\n]|\\[\\"n])*)"')
SAMPLE = re.compile(rf"^({METRIC_NAME})(?:\{{(.*)\}})? (\S+)(?: (-?\d+))?$")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

#: The names docs/operations.md documents: renaming one breaks dashboards.
DOCUMENTED = {
    "tocsin_gateway_connections": "gauge",
    "tocsin_gateway_sessions": "gauge",
    "tocsin_gateway_inflight_alerts": "gauge",
    "tocsin_gateway_connections_opened_total": "counter",
    "tocsin_gateway_connections_closed_total": "counter",
    "tocsin_gateway_heartbeat_closes_total": "counter",
    "tocsin_gateway_alerts_sent_total": "counter",
    "tocsin_gateway_alerts_redelivered_total": "counter",
    "tocsin_gateway_acks_total": "counter",
    "tocsin_gateway_backlog_superseded_total": "counter",
    "tocsin_gateway_nats_connected": "gauge",
    "tocsin_gateway_background_tasks_running": "gauge",
    "tocsin_gateway_shutting_down": "gauge",
    "tocsin_gateway_churn_collections_total": "counter",
    "tocsin_gateway_gc_pause_seconds": "histogram",
    "tocsin_gateway_queues_rebuilt_total": "counter",
    "tocsin_gateway_device_claims_total": "counter",
    "tocsin_gateway_info": "gauge",
    "tocsin_delivery_latency_seconds": "histogram",
    "tocsin_gateway_handshake_seconds": "histogram",
    "tocsin_gateway_catchup_seconds": "histogram",
    "tocsin_gateway_healthy_connections": "gauge",
    "tocsin_gateway_rate_limit_warnings_total": "counter",
    "tocsin_offline_queued_messages": "gauge",
    "tocsin_offline_queued_devices": "gauge",
    "tocsin_device_consumers": "gauge",
    "tocsin_stream_messages": "gauge",
    "tocsin_dlq_messages": "gauge",
    # what POST /api/v1/alerts stored and refused (the ingest service's own names)
    "tocsin_ingest_alerts_accepted_total": "counter",
    "tocsin_ingest_duplicates_total": "counter",
    "tocsin_ingest_alerts_rejected_total": "counter",
    "tocsin_ingest_store_failures_total": "counter",
    # prometheus_client's process collector
    "process_start_time_seconds": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass
class Family:
    kind: str = "untyped"
    help: str | None = None
    samples: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)


def parse_value(text: str) -> float:
    if text in ("NaN", "+Inf", "-Inf"):
        return float(text.replace("+", ""))
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text):
        raise ValueError(f"not a sample value: {text!r}")
    return float(text)


def parse_labels(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    pairs, pos = [], 0
    while pos < len(text):
        m = LABEL.match(text, pos)
        if m is None:
            raise ValueError(f"bad label set: {text!r}")
        value = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e[1], e[1]), m[2])
        pairs.append((m[1], value))
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise ValueError(f"bad label set: {text!r}")
            pos += 1
    names = [name for name, _ in pairs]
    if len(names) != len(set(names)):
        raise ValueError(f"repeated label: {text!r}")
    return tuple(sorted(pairs))


def parse_exposition(text: str) -> dict[str, Family]:
    """Prometheus text format 0.0.4, strictly: every line a HELP, TYPE or sample; a family's
    HELP and TYPE at most once and before its samples; a family's lines together; no sample
    twice; counters named ``*_total``."""
    if not text.endswith("\n"):
        raise ValueError("the exposition must end with a newline")
    families: dict[str, Family] = {}
    finished: set[str] = set()
    current: str | None = None

    def enter(name: str) -> Family:
        nonlocal current
        if name != current:
            if name in finished:
                raise ValueError(f"{name}: its lines are not together")
            if current is not None:
                finished.add(current)
            current = name
        return families.setdefault(name, Family())

    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            if len(parts) < 4 or not re.fullmatch(METRIC_NAME, parts[2]):
                raise ValueError(f"bad comment line: {line!r}")
            family = enter(parts[2])
            if family.samples:
                raise ValueError(f"{parts[2]}: HELP/TYPE after its samples")
            if parts[1] == "HELP":
                if family.help is not None:
                    raise ValueError(f"{parts[2]}: two HELP lines")
                family.help = parts[3]
            else:
                if parts[3] not in TYPES or family.kind != "untyped":
                    raise ValueError(f"bad or repeated TYPE: {line!r}")
                family.kind = parts[3]
        elif line.startswith("#"):
            continue  # a plain comment
        else:
            m = SAMPLE.match(line)
            if m is None:
                raise ValueError(f"bad sample line: {line!r}")
            name, labels = m[1], parse_labels(m[2])
            for suffix in HISTOGRAM_SUFFIXES:  # a histogram's samples carry its name + suffix
                base = name.removesuffix(suffix)
                if base != name and families.get(base, Family()).kind == "histogram":
                    name, labels = base, (("", suffix), *labels)
                    break
            family = enter(name)
            if labels in family.samples:
                raise ValueError(f"{m[1]}: sample {labels} twice")
            family.samples[labels] = parse_value(m[3])
    for name, family in families.items():
        if family.kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"{name}: counter not named *_total")
        if family.kind == "histogram":
            check_histogram(name, family)
        if family.kind in ("counter", "gauge") and not family.samples:
            raise ValueError(f"{name}: no samples")
        if family.kind == "counter" and any(
            v < 0 or math.isnan(v) for v in family.samples.values()
        ):
            raise ValueError(f"{name}: counter below zero")
    return families


def check_histogram(name: str, family: Family) -> None:
    """Per label set: cumulative buckets ending in +Inf, which equals _count; a _sum."""
    series: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for labels, value in family.samples.items():
        suffix, rest = labels[0][1], labels[1:]
        if suffix == "_bucket":
            le = dict(rest)["le"]
            key = tuple(kv for kv in rest if kv[0] != "le")
            buckets.setdefault(key, []).append((parse_value(le), value))
        else:
            series.setdefault(rest, {})[suffix] = value
    for key, rows in buckets.items():
        rows.sort()
        counts = [c for _, c in rows]
        if rows[-1][0] != math.inf or counts != sorted(counts):
            raise ValueError(f"{name}{key}: buckets not cumulative up to +Inf")
        if series.get(key, {}).get("_count") != counts[-1] or "_sum" not in series.get(key, {}):
            raise ValueError(f"{name}{key}: _count is not the +Inf bucket, or no _sum")


def histogram_count(families: dict[str, Family], name: str, **labels: str) -> float:
    return families[name].samples[(("", "_count"), *sorted(labels.items()))]


@pytest.mark.parametrize(
    "text",
    [
        "a 1",  # no final newline
        "a 1\na 2\n",  # the same sample twice
        'a 1\nb 1\na{x="1"} 1\n',  # a family split
        "# TYPE a gauge\n# TYPE a gauge\na 1\n",
        "a 1\n# TYPE a gauge\n",
        "# TYPE a_total counter\na_total -1\n",
        "# TYPE a counter\na 1\n",
        'a{x="1",x="2"} 1\n',
        'a{x="1} 1\n',
        "a one\n",
        "a  1\n",
        "9a 1\n",
    ],
)
def test_the_parser_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        parse_exposition(text)


def test_the_parser_reads_escapes_and_special_values() -> None:
    families = parse_exposition(
        '# HELP a x\\ny\n# TYPE a gauge\na{l="q\\"b\\\\n\\n"} +Inf\na{l="2"} 1.5e3 1700000000\n'
    )
    assert families["a"].samples[(("l", 'q"b\\n\n'),)] == math.inf
    assert families["a"].samples[(("l", "2"),)] == 1500.0


async def scrape(http: str) -> dict[str, Family]:
    async with aiohttp.ClientSession() as session, session.get(f"{http}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse_exposition(await resp.text())


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    return families[name].samples[tuple(sorted(labels.items()))]


async def test_metrics_are_well_formed_and_name_what_is_documented(
    gateway: RunningGateway,
) -> None:
    families = await scrape(gateway.http)
    assert {name: f.kind for name, f in families.items()} == DOCUMENTED
    assert all(f.help for f in families.values())
    assert value(families, "tocsin_gateway_connections") == 0
    assert value(families, "tocsin_gateway_nats_connected") == 1
    assert value(families, "tocsin_gateway_background_tasks_running") == 1
    assert value(families, "tocsin_gateway_info", instance=gateway.gw.instance) == 1
    started = value(families, "process_start_time_seconds")
    assert time.time() - 3600 < started <= time.time()
    for mode in ("catchup", "live"):
        for ack_mode in ("client", "auto"):
            assert value(families, "tocsin_gateway_sessions", mode=mode, ack_mode=ack_mode) == 0


async def test_counters_follow_a_client_through_delivery_redelivery_ack_and_close(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    tok = token("mia", ("KE",))
    client = await Client.connect(gateway.ws_url, tok)
    await client.next("connection_established")
    sent = await append(js, names, alert("KE-30"))
    first = await client.next("alert")
    await client.close()  # unacked: it comes again on the next connection, flagged

    async def gone() -> bool:  # else the next one takes over from it: a close as replaced
        return value(await scrape(gateway.http), "tocsin_gateway_connections") == 0

    await eventually(gone, what="the first connection's session gone")
    client = await Client.connect(gateway.ws_url, tok)
    await client.next("connection_established")
    again = await client.next("alert")
    assert first["seq"] == again["seq"] == sent.seq and again["redelivered"] is True

    async def counted() -> bool:
        families = await scrape(gateway.http)
        return (
            value(families, "tocsin_gateway_alerts_sent_total") >= 2
            and value(families, "tocsin_gateway_alerts_redelivered_total") >= 1
            and value(families, "tocsin_gateway_inflight_alerts") == 1
        )

    await eventually(counted, what="sent and redelivered counted")
    families = await scrape(gateway.http)
    assert value(families, "tocsin_gateway_connections") == 1
    assert value(families, "tocsin_gateway_connections_opened_total") == 2
    assert value(families, "tocsin_gateway_sessions", mode="live", ack_mode="client") == 1
    assert value(families, "tocsin_gateway_acks_total") == 0

    await client.send({"type": "ack", "seq": sent.seq})

    async def acked() -> bool:
        families = await scrape(gateway.http)
        return (
            value(families, "tocsin_gateway_acks_total") == 1
            and value(families, "tocsin_gateway_inflight_alerts") == 0
        )

    await eventually(acked, what="the ack counted")
    before_close = await scrape(gateway.http)
    await client.close()

    async def closed() -> bool:
        return value(await scrape(gateway.http), "tocsin_gateway_connections") == 0

    await eventually(closed, what="the connection gone")
    after = await scrape(gateway.http)
    # A closed session's counts stay in the totals: counters never go down.
    for name, kind in DOCUMENTED.items():
        if kind == "counter" and name != "tocsin_gateway_connections_closed_total":
            for labels, old in before_close[name].samples.items():
                assert after[name].samples[labels] >= old, name
    assert value(after, "tocsin_gateway_alerts_sent_total") == value(
        before_close, "tocsin_gateway_alerts_sent_total"
    )
    assert value(after, "tocsin_gateway_acks_total") == 1
    assert value(after, "tocsin_gateway_connections_closed_total", reason="client") == 2
    assert value(after, "tocsin_gateway_heartbeat_closes_total") == 0


async def test_a_silent_client_counts_as_a_heartbeat_close(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    gateway = await start_gateway(make_settings(heartbeat_seconds=0.2))
    try:
        client = await SilentClient.connect(gateway.ws_url, token("noah", ("KE",)))
        await client.next("connection_established")
        assert await client.wait_closed() == 4000
        await client.session.close()

        async def counted() -> bool:
            families = await scrape(gateway.http)
            return value(families, "tocsin_gateway_heartbeat_closes_total") == 1

        await eventually(counted, what="the heartbeat close counted")
        families = await scrape(gateway.http)
        assert (
            value(families, "tocsin_gateway_connections_closed_total", reason="heartbeat_timeout")
            == 1
        )
        assert value(families, "tocsin_gateway_connections") == 0
    finally:
        await gateway.stop()
