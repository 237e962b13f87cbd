"""The ingest service's ``/metrics`` (prometheus_client) and ``/healthz``.

Served on ``TOCSIN_HTTP_HOST:TOCSIN_INGEST_METRICS_PORT`` (0: not served) beside the
faststream app. The counters are plain integers the pipeline adds to; one collector
exposes them at scrape time, with prometheus_client's process metrics.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .pipeline import Reason

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class IngestCounters:
    accepted: int = 0  # alerts appended to ALERTS (first time)
    duplicates: int = 0  # appended again: ALERTS dropped the repeat by alert_id
    rejected: Counter[str] = field(default_factory=Counter)  # dead-lettered, by reason
    store_failures: int = 0  # NATS refused or timed out: the event is retried
    connected: Callable[[], bool] = lambda: False  # the service's NATS connection is up

    @property
    def nats_connected(self) -> bool:
        return self.connected()

    def stored(self, duplicate: bool) -> None:
        if duplicate:
            self.duplicates += 1
        else:
            self.accepted += 1

    def refused(self, reason: str) -> None:
        self.rejected[reason] += 1


class IngestCollector(Collector):
    """The ingest counters; the gateway registers one too, for ``POST /api/v1/alerts``
    (Prometheus tells the two apart by the scrape's job and instance)."""

    def __init__(self, counters: IngestCounters, with_nats: bool = True) -> None:
        self.counters = counters
        self.with_nats = with_nats

    def collect(self) -> Iterator[Metric]:
        c = self.counters
        yield CounterMetricFamily(
            "tocsin_ingest_alerts_accepted_total",
            "Engine events validated and appended to ALERTS.",
            value=c.accepted,
        )
        yield CounterMetricFamily(
            "tocsin_ingest_duplicates_total",
            "Events whose alert_id ALERTS already held (an engine retry): not stored again.",
            value=c.duplicates,
        )
        rejected = CounterMetricFamily(
            "tocsin_ingest_alerts_rejected_total",
            "Engine events kept in the dead-letter stream, by reason.",
            labels=["reason"],
        )
        for reason in Reason:
            rejected.add_metric([reason.value], c.rejected[reason.value])
        yield rejected
        yield CounterMetricFamily(
            "tocsin_ingest_store_failures_total",
            "Attempts to store an event that NATS refused or timed out (retried with backoff).",
            value=c.store_failures,
        )
        if self.with_nats:
            yield GaugeMetricFamily(
                "tocsin_ingest_nats_connected",
                "1 while the ingest service's NATS connection is up.",
                value=int(c.nats_connected),
            )


def metrics_app(counters: IngestCounters) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(IngestCollector(counters))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "nats_connected": counters.nats_connected})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def serve_metrics(counters: IngestCounters, host: str, port: int) -> web.AppRunner | None:
    """Start the metrics listener; None when ``port`` is 0."""
    return await serve(metrics_app(counters), host, port, "ingest", "TOCSIN_INGEST_METRICS_PORT")


async def serve(
    app: web.Application, host: str, port: int, service: str, setting: str
) -> web.AppRunner | None:
    """Serve a service's metrics ``app`` beside it (None when ``port`` is 0, or taken)."""
    if not port:
        return None
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:  # delivery matters more than its metrics: go on without them
        await runner.cleanup()
        log.error(
            "%s metrics not served: %s:%s: %s (set %s to a free port, or 0)",
            service,
            host,
            port,
            exc.strerror or exc,
            setting,
        )
        return None
    log.info("%s metrics on http://%s:%s/metrics", service, host, port)
    return runner
