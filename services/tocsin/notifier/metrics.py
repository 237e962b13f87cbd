"""The notifier's ``/metrics`` (prometheus_client) and ``/healthz``.

Served on ``TOCSIN_HTTP_HOST:TOCSIN_NOTIFIER_METRICS_PORT`` (0: not served), like the
ingest service's: plain counters the notifier adds to, exposed by one collector at scrape
time, with prometheus_client's process metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from tocsin.ingest.metrics import CONTENT_TYPE

#: Why a (device, alert) got no push; every reason is exported, zeros included.
SKIP_REASONS = (
    "below_level",  # the alert's level is under TOCSIN_PUSH_MIN_LEVEL (counted per alert)
    "expired",  # the alert expired before its push was due or sent
    "superseded",  # a later update or cancel (CAP) replaced the alert before its push
    "not_subscribed",  # the device's subscription or token does not select it
    "received",  # the device has it (acked, or written in ack_mode=auto)
    "unregistered",  # the device has no registration any more
    "already_sent",  # the ledger says it was pushed (a job delivered again)
)
#: Buckets of the append -> push request delay, seconds.
DELAY_BUCKETS = (0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600)


@dataclass
class NotifierCounters:
    sent: int = 0  # requests the endpoint accepted (2xx)
    failed: Counter[str] = field(default_factory=Counter)  # failed attempts, by reason
    retried: int = 0  # attempts that failed and were scheduled again
    dead_lettered: Counter[str] = field(default_factory=Counter)  # kept in PUSH_DLQ, by reason
    skipped: Counter[str] = field(default_factory=Counter)  # no push, by reason
    deferred: int = 0  # the device was online: looked at again later
    planned: int = 0  # (device, alert) jobs written to PUSH
    dropped: int = 0  # registrations removed after 404 UNREGISTERED
    delays: list[float] = field(default_factory=list)  # append -> request, seconds (bounded)
    _buckets: list[int] = field(default_factory=lambda: [0] * (len(DELAY_BUCKETS) + 1))
    _delay_sum: float = 0.0
    connected: Callable[[], bool] = lambda: False
    registrations: Callable[[], int] = lambda: 0
    token_refreshes: Callable[[], int] = lambda: 0

    def pushed(self, delay: float) -> None:
        self.sent += 1
        self._delay_sum += delay
        for i, bound in enumerate(DELAY_BUCKETS):
            if delay <= bound:
                self._buckets[i] += 1
                break
        else:
            self._buckets[-1] += 1
        if len(self.delays) < 100_000:
            self.delays.append(delay)


class NotifierCollector(Collector):
    def __init__(self, counters: NotifierCounters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        c = self.counters
        yield CounterMetricFamily(
            "tocsin_push_sent_total", "Push requests the endpoint accepted.", value=c.sent
        )
        failed = CounterMetricFamily(
            "tocsin_push_failed_total", "Push attempts that failed, by reason.", labels=["reason"]
        )
        for reason, n in sorted(c.failed.items()):
            failed.add_metric([reason], n)
        yield failed
        yield CounterMetricFamily(
            "tocsin_push_retried_total",
            "Failed attempts scheduled again (JetStream redelivery with backoff).",
            value=c.retried,
        )
        dead = CounterMetricFamily(
            "tocsin_push_dead_lettered_total",
            "Pushes kept in PUSH_DLQ, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(c.dead_lettered.items()):
            dead.add_metric([reason], n)
        yield dead
        skipped = CounterMetricFamily(
            "tocsin_push_skipped_total", "Pushes not sent, by reason.", labels=["reason"]
        )
        for reason in SKIP_REASONS:
            skipped.add_metric([reason], c.skipped[reason])
        yield skipped
        yield CounterMetricFamily(
            "tocsin_push_deferred_total",
            "Pushes due while the device was connected: looked at again later.",
            value=c.deferred,
        )
        yield CounterMetricFamily(
            "tocsin_push_registrations_dropped_total",
            "Registrations removed because FCM answered 404 UNREGISTERED.",
            value=c.dropped,
        )
        yield CounterMetricFamily(
            "tocsin_push_token_refreshes_total",
            "OAuth2 tokens minted from the service account.",
            value=c.token_refreshes(),
        )
        yield GaugeMetricFamily(
            "tocsin_push_registrations",
            "Devices with a push registration.",
            value=c.registrations(),
        )
        yield GaugeMetricFamily(
            "tocsin_notifier_nats_connected",
            "1 while the notifier's NATS connection is up.",
            value=int(c.connected()),
        )
        buckets = []
        total = 0
        for bound, n in zip([*map(str, DELAY_BUCKETS), "+Inf"], c._buckets, strict=True):
            total += n
            buckets.append((bound, total))
        yield HistogramMetricFamily(
            "tocsin_push_delay_seconds",
            "From the alert's append to ALERTS to its push request.",
            buckets=buckets,
            sum_value=c._delay_sum,
        )


def metrics_app(counters: NotifierCounters) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(NotifierCollector(counters))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "nats_connected": counters.connected()})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app
