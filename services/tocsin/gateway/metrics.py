"""``GET /metrics``: the gateway's metrics in the Prometheus text format, by prometheus_client.

One custom collector reads, at scrape time, the state the gateway keeps anyway: the
session registry (registry.py: open sessions, the totals of closed ones, the delivery,
handshake and catch-up histograms) and the figures of JetStream the stats cache
(stats.py). Nothing on the delivery path touches a prometheus_client object (no lock, no
label lookup per frame); prometheus_client does the exposition and the process metrics
(``process_*``).

The names are an interface (dashboards and alert rules use them): add, don't rename.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from tocsin.ingest.metrics import IngestCollector, IngestCounters
from tocsin.schemas import Close

from .handler import GATEWAY
from .registry import REASONS, Histogram, close_reason

if TYPE_CHECKING:
    from .context import Gateway

#: The classic text format, which generate_latest writes (prometheus_client 0.26 labels
#: it 1.0.0; the bytes are the same for these names).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MODES = ("catchup", "live")
ACK_MODES = ("client", "auto")
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("metrics_registry", CollectorRegistry)
#: What POST /api/v1/alerts stored and refused (the ingest service's counters, here too).
PUBLISHED: web.AppKey[IngestCounters] = web.AppKey("published", IngestCounters)


def setup(app: web.Application) -> None:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(GatewayCollector(app))
    registry.register(IngestCollector(app[PUBLISHED], with_nats=False))
    app[REGISTRY] = registry
    app.router.add_get("/metrics", metrics)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    await gw.stats.refresh_quietly()  # JetStream figures, cached (TOCSIN_STATS_CACHE_SECONDS)
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


class GatewayCollector(Collector):
    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        gw = self._app.get(GATEWAY)
        if gw is not None:  # before start-up: process metrics only
            yield from families(gw)


def _one(kind: str, name: str, help_text: str, value: float) -> Metric:
    family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return family(name, help_text, value=value)


def _family(
    kind: str, name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> Metric:
    rows = list(samples)
    labels = list(rows[0][0]) if rows else []
    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
        name, help_text, labels=labels
    )
    for values, value in rows:
        family.add_metric([values[k] for k in labels], value)
    return family


def _histogram(
    name: str, help_text: str, by: dict[str, Histogram] | Histogram, label: str = ""
) -> Metric:
    family = HistogramMetricFamily(name, help_text, labels=[label] if label else None)
    for value, h in by.items() if isinstance(by, dict) else [("", by)]:
        family.add_metric([value] if label else [], h.cumulative(), sum_value=h.sum)
    return family


def families(gw: Gateway) -> Iterator[Metric]:
    totals = gw.sessions.totals
    sessions = list(gw.sessions)
    by_mode: Counter[tuple[str, str]] = Counter((s.mode.value, s.device.ack_mode) for s in sessions)
    yield _one(
        "gauge",
        "tocsin_gateway_connections",
        "Open WebSocket connections being served (handshake done, session running).",
        len(sessions),
    )
    yield _family(
        "gauge",
        "tocsin_gateway_sessions",
        "Open sessions by mode (catchup: reading the device's queue; live: the shared feed) "
        "and ack_mode.",
        [
            ({"mode": mode, "ack_mode": ack}, by_mode[(mode, ack)])
            for mode in MODES
            for ack in ACK_MODES
        ],
    )
    yield _one(
        "gauge",
        "tocsin_gateway_inflight_alerts",
        "Alerts sent and not yet acknowledged, over all open sessions.",
        sum(len(s.window.items) for s in sessions),
    )
    yield _one(
        "counter",
        "tocsin_gateway_connections_opened_total",
        "Sessions started (connection_established sent).",
        totals.opened,
    )
    yield _family(
        "counter",
        "tocsin_gateway_connections_closed_total",
        "Sessions ended, by reason: the server's close code name (heartbeat_timeout, "
        "replaced, token_expired, going_away, backend_unavailable, ...) or client.",
        [
            ({"reason": r}, n)
            for r, n in sorted((dict.fromkeys(REASONS, 0) | totals.closes).items())
        ],
    )
    yield _one(
        "counter",
        "tocsin_gateway_heartbeat_closes_total",
        "Sessions closed with 4000 because the client was silent for two heartbeats.",
        totals.closes[close_reason(Close.HEARTBEAT_TIMEOUT)],
    )
    yield _one(
        "counter",
        "tocsin_gateway_alerts_sent_total",
        "Alert frames written to sockets, repeats after a reconnect included.",
        totals.sent + sum(s.sent for s in sessions),
    )
    yield _one(
        "counter",
        "tocsin_gateway_alerts_redelivered_total",
        "Alerts sent again (redelivered: true) after a reconnect: sent before and not acked.",
        totals.redelivered + sum(s.redelivered for s in sessions),
    )
    yield _one(
        "counter",
        "tocsin_gateway_acks_total",
        "Ack frames received from clients (ack_mode=client; each acks everything up to seq).",
        totals.acks + sum(s.acks for s in sessions),
    )
    yield _one(
        "counter",
        "tocsin_gateway_backlog_superseded_total",
        "Backlog alerts not sent because a later update or cancel replaced them "
        "(backlog_superseded frames).",
        totals.superseded,
    )
    yield _one(
        "gauge",
        "tocsin_gateway_nats_connected",
        "1 while the gateway's NATS connection is up.",
        int(gw.nc.is_connected),
    )
    yield _one(
        "gauge",
        "tocsin_gateway_background_tasks_running",
        "1 while the live feed and the ticker (pings, timeouts, checkpoints) run.",
        int(gw.background_tasks_running),
    )
    yield _one(
        "gauge",
        "tocsin_gateway_shutting_down",
        "1 once the gateway refuses new connections (SIGTERM).",
        int(gw.shutting_down),
    )
    yield _one(
        "counter",
        "tocsin_gateway_churn_collections_total",
        "Full garbage collections run after session churn (gateway/collector.py).",
        gw.collector.collections,
    )
    yield _histogram(
        "tocsin_gateway_gc_pause_seconds",
        "Garbage collections of the gateway process by generation (2: full), each a pause "
        "of its event loop (gateway/collector.py).",
        gw.collector.pauses,
        "generation",
    )
    yield _one(
        "counter",
        "tocsin_gateway_queues_rebuilt_total",
        "Device queues recreated from the device's DEVICES record: their NATS node did not "
        "answer, or they were missing (docs/operations.md §3).",
        gw.queues.rebuilt,
    )
    yield _family(
        "counter",
        "tocsin_gateway_device_claims_total",
        "Overlapping connections of one device (docs/architecture.md §9), by outcome: "
        "taken_over (a session here let its device go to a newer connection), superseded (a "
        "handshake here lost a race and closed 4009), busy (an older connection did not let "
        "go in time: 4503), lost (a session here found its device claimed by another).",
        [({"outcome": k}, v) for k, v in sorted(gw.owners.counts.items())],
    )
    yield _family(
        "gauge",
        "tocsin_gateway_info",
        "Always 1; instance is this process's gateway id (logs, consumer metadata).",
        [({"instance": gw.instance}, 1)],
    )
    timings = gw.sessions.timings
    yield _histogram(
        "tocsin_delivery_latency_seconds",
        "Append to ALERTS (the stream's timestamp) to the alert frame written to the socket, "
        "first sends only; path: live (the shared feed) or backlog (the device's queue).",
        {"live": timings.live, "backlog": timings.backlog},
        "path",
    )
    yield _histogram(
        "tocsin_gateway_handshake_seconds",
        "WebSocket request received to connection_established queued (claim, queue opened).",
        timings.handshake,
    )
    yield _histogram(
        "tocsin_gateway_catchup_seconds",
        "connection_established to live delivery (the backlog read), per connection.",
        timings.catchup,
    )
    yield _one(
        "gauge",
        "tocsin_gateway_healthy_connections",
        "Open connections that answered their last ping (or one a heartbeat old).",
        gw.sessions.healthy(time.monotonic()),
    )
    yield _one(
        "counter",
        "tocsin_gateway_rate_limit_warnings_total",
        "rate_limit_warning frames sent (client frames over TOCSIN_MAX_MESSAGES_PER_MINUTE).",
        gw.sessions.rate_limit_warnings,
    )
    queues, cluster = gw.stats.queues.value, gw.stats.cluster.value
    if queues is not None:
        yield _one(
            "gauge",
            "tocsin_offline_queued_messages",
            "Alerts not yet acknowledged, over every device queue (read from JetStream, "
            "cached TOCSIN_STATS_CACHE_SECONDS).",
            queues.total_queued_messages,
        )
        yield _one(
            "gauge",
            "tocsin_offline_queued_devices",
            "Devices with at least one alert not yet acknowledged.",
            queues.queued_devices,
        )
        yield _one(
            "gauge", "tocsin_device_consumers", "Device queues (durable consumers).", queues.devices
        )
    if cluster is not None:
        streams = cluster["streams"]
        yield _family(
            "gauge",
            "tocsin_stream_messages",
            "Messages in each of tocsin's streams.",
            [({"stream": k}, v["messages"]) for k, v in sorted(streams.items()) if "messages" in v],
        )
        if cluster.get("dlq_messages") is not None:
            yield _one(
                "gauge",
                "tocsin_dlq_messages",
                "Rejected engine events kept in the dead-letter stream.",
                cluster["dlq_messages"],
            )
