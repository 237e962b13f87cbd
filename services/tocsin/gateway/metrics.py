"""``GET /metrics``: the gateway's counters in Prometheus text format (version 0.0.4).

Hand-written: a dozen families read from state the gateway keeps anyway. This module only
reads: the totals of connections that have closed are kept by the session registry
(registry.py, ``Gateway.sessions``), so the ``_total`` families never go down while the
process lives.

The names are an interface (dashboards and alert rules use them): add, don't rename.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from tocsin.schemas import Close

from .handler import GATEWAY
from .registry import REASONS, close_reason

if TYPE_CHECKING:
    from .context import Gateway

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MODES = ("catchup", "live")
ACK_MODES = ("client", "auto")


def _process_start_time() -> float:
    """Unix time this process started: from /proc on Linux, else when this module loaded."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_START = _process_start_time()


def setup(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)


async def metrics(request: web.Request) -> web.Response:
    text = render(request.app[GATEWAY])
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(gw: Gateway) -> str:
    totals = gw.sessions.totals
    sessions = list(gw.sessions)
    by_mode: Counter[tuple[str, str]] = Counter((s.mode.value, s.device.ack_mode) for s in sessions)
    out = Exposition()
    out.one(
        "tocsin_gateway_connections",
        "gauge",
        "Open WebSocket connections being served (handshake done, session running).",
        len(sessions),
    )
    out.family(
        "tocsin_gateway_sessions",
        "gauge",
        "Open sessions by mode (catchup: reading the device's queue; live: the shared feed) "
        "and ack_mode.",
        [
            ({"mode": mode, "ack_mode": ack}, by_mode[(mode, ack)])
            for mode in MODES
            for ack in ACK_MODES
        ],
    )
    out.one(
        "tocsin_gateway_inflight_alerts",
        "gauge",
        "Alerts sent and not yet acknowledged, over all open sessions.",
        sum(len(s.window.items) for s in sessions),
    )
    out.one(
        "tocsin_gateway_connections_opened_total",
        "counter",
        "Sessions started (connection_established sent).",
        totals.opened,
    )
    out.family(
        "tocsin_gateway_connections_closed_total",
        "counter",
        "Sessions ended, by reason: the server's close code name (heartbeat_timeout, "
        "replaced, token_expired, going_away, backend_unavailable, ...) or client.",
        [
            ({"reason": r}, n)
            for r, n in sorted((dict.fromkeys(REASONS, 0) | totals.closes).items())
        ],
    )
    out.one(
        "tocsin_gateway_heartbeat_closes_total",
        "counter",
        "Sessions closed with 4000 because the client was silent for two heartbeats.",
        totals.closes[close_reason(Close.HEARTBEAT_TIMEOUT)],
    )
    out.one(
        "tocsin_gateway_alerts_sent_total",
        "counter",
        "Alert frames written to sockets, resends included.",
        totals.sent + sum(s.sent for s in sessions),
    )
    out.one(
        "tocsin_gateway_alerts_redelivered_total",
        "counter",
        "Alerts sent again (redelivered: true): unacked resends and repeats after reconnect.",
        totals.redelivered + sum(s.redelivered for s in sessions),
    )
    out.one(
        "tocsin_gateway_acks_total",
        "counter",
        "Ack frames received from clients (ack_mode=client; each acks everything up to seq).",
        totals.acks + sum(s.acks for s in sessions),
    )
    out.one(
        "tocsin_gateway_nats_connected",
        "gauge",
        "1 while the gateway's NATS connection is up.",
        int(gw.nc.is_connected),
    )
    out.one(
        "tocsin_gateway_background_tasks_running",
        "gauge",
        "1 while the live feed and the ticker (pings, resends, checkpoints) run.",
        int(gw.background_tasks_running),
    )
    out.one(
        "tocsin_gateway_shutting_down",
        "gauge",
        "1 once the gateway refuses new connections (SIGTERM).",
        int(gw.shutting_down),
    )
    out.one(
        "tocsin_gateway_churn_collections_total",
        "counter",
        "Full garbage collections run after session churn (gateway/collector.py).",
        gw.collector.collections,
    )
    out.one(
        "tocsin_gateway_queues_rebuilt_total",
        "counter",
        "Device queues recreated from the device's DEVICES record: their NATS node did not "
        "answer, or they were missing (docs/operations.md §3).",
        gw.queues.rebuilt,
    )
    out.family(
        "tocsin_gateway_device_claims_total",
        "counter",
        "Overlapping connections of one device (docs/architecture.md §9), by outcome: "
        "taken_over (a session here let its device go to a newer connection), superseded (a "
        "handshake here lost a race and closed 4009), busy (an older connection did not let "
        "go in time: 4503), lost (a session here found its device claimed by another).",
        [({"outcome": k}, v) for k, v in sorted(gw.owners.counts.items())],
    )
    out.family(
        "tocsin_gateway_info",
        "gauge",
        "Always 1; instance is this process's gateway id (logs, consumer metadata).",
        [({"instance": gw.instance}, 1)],
    )
    out.one(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch, in seconds.",
        PROCESS_START,
    )
    return out.text()
