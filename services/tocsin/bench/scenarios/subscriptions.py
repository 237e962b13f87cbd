"""Subscriptions benchmark: what a subscription change costs, and what the fine filter adds
to a broadcast per device (issue 3).

Run::

    tocsin bench subscriptions [--devices N] [--quick] [--out DIR]

(or ``python -m tocsin.bench.scenarios.subscriptions``). It shares with the delivery
scenario (:mod:`.common`): its own nats-server (temp store, loopback), topology under a
unique namespace, an in-process gateway, the WebSocket reader, the recorders, the bounded
phases and the CPU meter.

1. **Subscription change round trip.** One device (ack_mode=auto, token KE) sends, per
   round, ``subscribe`` [region:KE-30, level:high], ``update_filters`` (two filter sets,
   alternating) and ``unsubscribe`` of the same groups: every frame is a real change. Time
   from ``send_str`` to its ``subscription_response`` in the client task. Once with the
   device alone (NATS idle), once while the D broadcast devices are connected and alerts
   are broadcast to them back-to-back. The gateway's NATS client's ``request`` and
   ``DeviceQueues.subscribe`` are wrapped to count calls (observing, not changing).
2. **Fine filter on broadcast.** Cohort A (D/2 devices, token KE, no subscription) and
   cohort B (D/2, token KE, groups region:KE-30 + level:critical + type:flood and
   risk_threshold 0.5), all ack_mode=auto. Every broadcast is a KE-30 ``high`` alert with
   risk 0.8, so every device of both cohorts receives every one; B's are judged by
   ``Subscription.matches``, A's are not (``everything``). ``LiveFeed.dispatch`` of the
   running gateway is wrapped and timed (it is synchronous: the fan-out's whole cost).
   Each cohort alone, A B B A (K/2, K, K/2 broadcasts, one warm-up after each connect),
   gives clean per-cohort dispatch cost; then both together for K broadcasts give
   per-cohort latency under identical conditions (the feed's listener set interleaves
   the cohorts; the mean receipt rank shows neither goes first). A broadcast is sent when
   every device has the previous one or its deadline passed.
3. **Micro.** ``timeit`` of ``Subscription.matches`` (4 subscriptions), ``coarse_filters``
   (3) and ``Alert.model_validate_json``; best and median of 5 repeats.

Clients, gateway and publisher share one process and event loop; nats-server is a second
process; all over loopback on the same cores. Every phase is bounded (120 s) and reports an
abort instead of hanging. Results: stdout and ``benchmarks/results/subscriptions-<date>
[-quick].md`` (under the current directory, or ``--out``) with a JSON twin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import os
import platform
import statistics
import sys
import time
import timeit
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import nats
import orjson
from nats.js import JetStreamContext

from tocsin.core.coarse import coarse_filters
from tocsin.core.naming import Names
from tocsin.core.topology import apply_topology
from tocsin.gateway.local import LocalGateway, start_local_gateway
from tocsin.gateway.session import Mode
from tocsin.ingest.pipeline import append_alert
from tocsin.schemas import Alert
from tocsin.schemas.samples import alert_body
from tocsin.schemas.subscription import Subscription

from .common import (
    BROADCAST_DEADLINE,
    CONNECT_CONCURRENCY,
    Broadcast,
    InProcessBench,
    LocalNats,
    Meter,
    Recorder,
    WsDevice,
    close_devices,
    code_version,
    cpu_model,
    fmt,
    make_alert,
    out_option,
    parse_sets,
    percentile,
    progress,
    read_socket,
    run_and_write,
    server_version,
    set_option,
    wait_for,
    ws_params,
)

CHANGE_GROUPS = ["region:KE-30", "level:high"]
FILTER_SETS = [{"risk_threshold": 0.5}, {"risk_threshold": 0.7, "alert_types": ["flood"]}]
B_GROUPS = ["region:KE-30", "level:critical", "type:flood"]
SUB_B = Subscription.model_validate({"groups": B_GROUPS, "filters": {"risk_threshold": 0.5}})
MICRO_B = "matches: cohort B (3 groups + risk_threshold)"
CHANGE_DEADLINE = 10.0  # seconds for one subscription_response


def sub(groups: list[str], **filters: Any) -> Subscription:
    return Subscription.model_validate({"groups": groups, "filters": filters})


def broadcast_alert() -> Alert:
    return make_alert("KE-30", alert_level="high", risk_score=0.8)


# ---------------------------------------------------------------- observing the gateway


def api_kind(subject: str) -> str:
    if not subject.startswith("$JS.API."):
        return "other request"
    parts = subject.split(".")[2:]
    return ".".join(parts[:3] if parts[1:2] == ["DURABLE"] else parts[:2])


def observe(gw: LocalGateway) -> tuple[Counter[str], dict[int, float]]:
    """Count the gateway's NATS requests and DeviceQueues.subscribe calls; time each
    LiveFeed.dispatch (stream seq -> seconds). Wrappers around the running instance."""
    g, counts, dispatch = gw.gw, Counter[str](), dict[int, float]()
    request, subscribe, feed_dispatch = g.nc.request, g.queues.subscribe, g.feed.dispatch

    async def counted_request(subject: str, *args: Any, **kwargs: Any) -> Any:
        counts[api_kind(subject)] += 1
        return await request(subject, *args, **kwargs)

    async def counted_subscribe(*args: Any) -> None:
        counts["DeviceQueues.subscribe"] += 1
        await subscribe(*args)

    def timed_dispatch(live: Any) -> None:
        t = time.perf_counter()
        feed_dispatch(live)
        dispatch[live.seq] = time.perf_counter() - t

    g.nc.request = counted_request  # type: ignore[method-assign]
    g.queues.subscribe = counted_subscribe  # type: ignore[method-assign, assignment]
    g.feed.dispatch = timed_dispatch  # type: ignore[method-assign, assignment]
    return counts, dispatch


# ---------------------------------------------------------------- the changing device


class Changer:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.established = asyncio.Event()
        self.waiting: asyncio.Future[tuple[float, dict[str, Any]]] | None = None
        self.alerts = 0
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            t = time.perf_counter()
            frame = orjson.loads(msg.data)
            kind = frame["type"]
            if kind == "subscription_response" and self.waiting and not self.waiting.done():
                self.waiting.set_result((t, frame))
            elif kind == "alert":
                self.alerts += 1
            elif kind == "ping":
                await self.ws.send_str(orjson.dumps({"type": "pong", "ts": frame["ts"]}).decode())
            elif kind == "connection_established":
                self.established.set()

    async def change(self, frame: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        self.waiting = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        await self.ws.send_str(orjson.dumps(frame).decode())
        async with asyncio.timeout(CHANGE_DEADLINE):
            t, response = await self.waiting
        return t - t0, response


# ---------------------------------------------------------------- cohorts and broadcasts


@dataclass
class Cohort:
    name: str
    size: int
    subscription: Subscription
    groups: list[str]
    query: dict[str, str]
    rec: Recorder = field(default_factory=Recorder)
    devices: list[WsDevice] = field(default_factory=list)
    connects: int = 0  # fresh device ids per connect: no backlog to catch up on

    def sessions(self, gw: LocalGateway) -> list[Any]:
        return [s for s in gw.gw.sessions if s.device.user_id.startswith(f"{self.name}-")]


@dataclass
class Row:
    latencies: list[float] = field(default_factory=list)  # seconds
    ranks: list[float] = field(default_factory=list)  # mean receipt rank per broadcast, 0..1
    dispatch: list[float] = field(default_factory=list)  # seconds per broadcast
    broadcasts: int = 0
    missing: int = 0

    def summary(self, devices: int) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        per_device = [d * 1e6 / devices for d in self.dispatch]
        return {
            "devices": devices,
            "broadcasts": self.broadcasts,
            "deliveries": len(ms),
            "missing": self.missing,
            **{f"p{p}_ms": percentile(ms, p) for p in (50, 90, 99)},
            "max_ms": max(ms, default=float("nan")),
            "mean_rank": statistics.fmean(self.ranks) if self.ranks else float("nan"),
            "dispatch_ms_median": statistics.median(self.dispatch) * 1000
            if self.dispatch
            else float("nan"),
            "dispatch_us_per_device_median": statistics.median(per_device)
            if per_device
            else float("nan"),
            "dispatch_us_per_device_p90": percentile(per_device, 90),
            "dispatch_us_per_device_each": [round(x, 2) for x in per_device],
        }


async def must(check: Callable[[], bool], what: str, limit: float = 30) -> None:
    if not await wait_for(check, limit):
        raise RuntimeError(f"not within {limit:.0f} s: {what}")


@dataclass(frozen=True)
class Sizes:
    """What a run repeats besides D; the command line takes these from ``--quick`` (the
    tests shrink them)."""

    rounds: int = 100  # subscribe / update_filters / unsubscribe, idle and busy
    k: int = 40  # broadcasts per cohort step
    micro_loops: int | None = None  # calls per timeit repeat; None: timeit's autorange
    micro_repeats: int = 5

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        return cls(rounds=50, k=20) if quick else cls()


class SubBench(InProcessBench):
    def __init__(
        self,
        devices: int,
        quick: bool = False,
        sizes: Sizes | None = None,
        gateway: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(quick, gateway)
        self.devices = max(2, devices)
        self.sizes = sizes or Sizes.of(quick)
        self.rounds = self.sizes.rounds
        self.k = self.sizes.k

    async def bcast(
        self, js: JetStreamContext, names: Names, cohorts: list[Cohort], dispatch: dict[int, float]
    ) -> tuple[dict[str, list[float]], dict[str, float], float | None]:
        """One broadcast to ``cohorts``: latencies and mean receipt rank per cohort, and
        the dispatch time."""
        model = broadcast_alert()
        waits = {c.name: Broadcast(len(c.devices)) for c in cohorts}
        for c in cohorts:
            c.rec.open[model.alert_id] = waits[c.name]
        t0 = time.perf_counter()
        ack = await append_alert(js, names, model)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BROADCAST_DEADLINE):
                for b in waits.values():
                    await b.done.wait()
        for c in cohorts:
            del c.rec.open[model.alert_id]
        order = sorted((t, name) for name, b in waits.items() for t in b.times)
        ranks = {
            name: statistics.fmean(
                i / max(1, len(order) - 1) for i, (_, n) in enumerate(order) if n == name
            )
            if waits[name].times
            else float("nan")
            for name in waits
        }
        lat = {name: [t - t0 for t in b.times] for name, b in waits.items()}
        return lat, ranks, dispatch.pop(ack.seq, None)

    async def batch(
        self,
        js: JetStreamContext,
        names: Names,
        cohorts: list[Cohort],
        rows: dict[str, Row],
        dispatch: dict[int, float],
        k: int,
    ) -> None:
        together = len(cohorts) > 1
        await self.bcast(js, names, cohorts, dispatch)  # warm-up after a connect
        for _ in range(k):
            lat, ranks, took = await self.bcast(js, names, cohorts, dispatch)
            for c in cohorts:
                row = rows[f"{c.name} with others" if together else f"{c.name} alone"]
                row.broadcasts += 1
                row.latencies += lat[c.name]
                row.missing += len(c.devices) - len(lat[c.name])
                if together:
                    row.ranks.append(ranks[c.name])
                elif took is not None:
                    row.dispatch.append(took)
            if together:
                every = rows["all"]
                every.broadcasts += 1
                every.latencies += [x for c in cohorts for x in lat[c.name]]
                every.missing += sum(len(c.devices) - len(lat[c.name]) for c in cohorts)
                if took is not None:
                    every.dispatch.append(took)

    async def connect(self, http: aiohttp.ClientSession, gw: LocalGateway, c: Cohort) -> None:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        answered = c.rec.frames["subscription_response"]
        c.connects += 1

        async def one(i: int) -> None:
            async with gate:
                tok = self.token(f"{c.name}-{c.connects}-{i}", ("KE",))
                ws = await http.ws_connect(gw.ws_url, params={**ws_params(tok, "auto"), **c.query})
                established = asyncio.Event()
                c.devices.append(
                    WsDevice(ws, asyncio.create_task(read_socket(ws, c.rec, established)))
                )
                await asyncio.wait_for(established.wait(), 30)
                if c.groups:
                    await ws.send_str(
                        orjson.dumps({"type": "subscribe", "groups": c.groups}).decode()
                    )

        await asyncio.gather(*(one(i) for i in range(c.size)))
        await must(
            lambda: c.rec.frames["subscription_response"] >= answered + (c.size if c.groups else 0),
            f"cohort {c.name}: subscription responses",
        )
        await must(
            lambda: (
                len(ss := c.sessions(gw)) == c.size
                and all(s.mode is Mode.LIVE and s.subscription == c.subscription for s in ss)
            ),
            f"cohort {c.name}: {c.size} sessions live with their subscription",
        )

    async def disconnect(self, gw: LocalGateway, c: Cohort) -> None:
        await close_devices(c.devices)
        c.devices.clear()
        await must(lambda: not c.sessions(gw), f"cohort {c.name}: sessions ended")

    async def changes(
        self, http: aiohttp.ClientSession, gw: LocalGateway, counts: Counter[str]
    ) -> dict[str, Any]:
        params = ws_params(self.token("changer", ("KE",)), "auto")
        ws = await http.ws_connect(gw.ws_url, params=params)
        ch = Changer(ws)
        try:
            await asyncio.wait_for(ch.established.wait(), 30)
            before = counts.copy()
            times: dict[str, list[float]] = {
                "subscribe": [],
                "update_filters": [],
                "unsubscribe": [],
            }
            bad: Counter[str] = Counter()
            for i in range(self.rounds):
                frames: list[dict[str, Any]] = [
                    {"type": "subscribe", "groups": CHANGE_GROUPS},
                    {"type": "update_filters", "filters": FILTER_SETS[i % 2]},
                    {"type": "unsubscribe", "groups": CHANGE_GROUPS},
                ]
                for frame in frames:
                    took, response = await ch.change(frame)
                    times[frame["type"]].append(took)
                    if response["status"] != "ok" or response["action"] != frame["type"]:
                        bad[f"{frame['type']}: {response['status']} {response['detail']}"] += 1
            calls = counts - before
            n = sum(len(v) for v in times.values())
            return {
                "changes": n,
                "by_action": {
                    a: {
                        "n": len(v),
                        **{f"p{p}_ms": percentile([x * 1000 for x in v], p) for p in (50, 90, 99)},
                        "max_ms": max(v) * 1000,
                    }
                    for a, v in times.items()
                },
                "calls_per_change": {
                    k: v / n for k, v in sorted(calls.items()) if k != "CONSUMER.RESET"
                },
                "checkpoint_resets_meanwhile": calls["CONSUMER.RESET"],
                "refused": dict(bad),
                "alerts_received_by_changer": ch.alerts,
            }
        finally:
            await ws.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.reader, 10)
            await must(
                lambda: all(s.device.user_id != "changer" for s in gw.gw.sessions),
                "the changing device's session ended",
            )

    async def busy_changes(
        self,
        http: aiohttp.ClientSession,
        gw: LocalGateway,
        counts: Counter[str],
        js: JetStreamContext,
        names: Names,
        cohorts: list[Cohort],
        dispatch: dict[int, float],
    ) -> dict[str, Any]:
        stop = asyncio.Event()

        async def load() -> int:
            n = 0
            while not stop.is_set():
                await self.bcast(js, names, cohorts, dispatch)
                n += 1
            return n

        task = asyncio.create_task(load())
        t0 = time.perf_counter()
        try:
            out = await self.changes(http, gw, counts)
        finally:
            stop.set()
            out_n = await asyncio.wait_for(task, BROADCAST_DEADLINE + 5)
        out["broadcasts_meanwhile"] = out_n
        out["broadcasts_per_s"] = out_n / (time.perf_counter() - t0)
        return out

    async def measure(self, server: LocalNats) -> None:
        meter = Meter(server.pid)
        ns = f"bench{uuid.uuid4().hex[:8]}"
        settings = self.settings(server, ns)
        names = Names(ns)
        half = self.devices // 2
        a = Cohort("cohortA", half, Subscription(), [], {})
        b = Cohort("cohortB", self.devices - half, SUB_B, B_GROUPS, {"risk_threshold": "0.5"})
        self.results["config"] = c = {
            "devices": self.devices,
            "cohort_sizes": [a.size, b.size],
            "rounds": self.rounds,
            "k": self.k,
            "quick": self.quick,
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "python": platform.python_version(),
            "nats_server": server_version(),
            "aiohttp": aiohttp.__version__,
            "code": code_version(),
            "checkpoint_seconds": settings.checkpoint_seconds,
            "max_inflight": settings.max_inflight,
            "gateway_set": self.gateway_values,
            "sizes": asdict(self.sizes),
            "namespace": ns,
        }
        progress(f"machine: {c['cpus']} CPUs, Python {c['python']}, {c['nats_server']}")
        z = self.sizes
        self.results["micro"] = await self.phase(
            meter, "micro", asyncio.to_thread(micro, z.micro_loops, z.micro_repeats)
        )
        nc = await nats.connect(server.url, name="bench-publisher")
        js = nc.jetstream()
        await apply_topology(js, settings, names)
        gw = await start_local_gateway(settings)
        counts, dispatch = observe(gw)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        rows = {
            k: Row()
            for k in (
                "cohortA alone",
                "cohortB alone",
                "cohortA with others",
                "cohortB with others",
                "all",
            )
        }
        try:
            self.results["changes_idle"] = await self.phase(
                meter, "1. changes, gateway and NATS idle", self.changes(http, gw, counts)
            )
            k2 = self.k // 2
            steps: list[tuple[str, Any]] = [
                ("connect cohort A", lambda: self.connect(http, gw, a)),
                ("cohort A alone", lambda: self.batch(js, names, [a], rows, dispatch, k2)),
                ("disconnect cohort A", lambda: self.disconnect(gw, a)),
                ("connect cohort B", lambda: self.connect(http, gw, b)),
                ("cohort B alone", lambda: self.batch(js, names, [b], rows, dispatch, self.k)),
                ("disconnect cohort B", lambda: self.disconnect(gw, b)),
                ("connect cohort A", lambda: self.connect(http, gw, a)),
                ("cohort A alone", lambda: self.batch(js, names, [a], rows, dispatch, k2)),
                ("connect cohort B", lambda: self.connect(http, gw, b)),
                ("A + B together", lambda: self.batch(js, names, [a, b], rows, dispatch, self.k)),
            ]
            for name, step in steps:
                await self.phase(meter, f"2. {name}", step())
                if self.failed:
                    break
            else:
                self.results["changes_busy"] = await self.phase(
                    meter,
                    "1. changes during back-to-back broadcasts to A + B",
                    self.busy_changes(http, gw, counts, js, names, [a, b], dispatch),
                )
            for cohort in (a, b):
                await self.phase(meter, f"close cohort {cohort.name}", self.disconnect(gw, cohort))
        finally:
            self.results["rows"] = {
                k: r.summary(
                    a.size + b.size if k == "all" else (a if k.startswith(a.name) else b).size
                )
                for k, r in rows.items()
            }
            self.results["frames_other"] = {c.name: dict(c.rec.frames) for c in (a, b)}
            self.results["stray_receipts"] = a.rec.stray + b.rec.stray
            self.results["extra_receipts"] = a.rec.extra + b.rec.extra
            self.results["phases"] = {k: vars(v) for k, v in meter.phases.items()}
            await http.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(gw.stop(), 30)
            await nc.close()


# ---------------------------------------------------------------- micro


def per_call_us(fn: Callable[[], object], loops: int | None, repeats: int) -> dict[str, float]:
    """µs per call of ``fn``: best and median of ``repeats`` timings of ``loops`` calls
    (``None``: as many as timeit's autorange takes for 0.2 s)."""
    timer = timeit.Timer(fn)
    n = loops if loops is not None else timer.autorange()[0]
    runs = [t / n * 1e6 for t in timer.repeat(repeats, n)]
    return {"best_us": min(runs), "median_us": statistics.median(runs), "loops": n}


def micro(loops: int | None = None, repeats: int = 5) -> dict[str, dict[str, float]]:
    body = alert_body(
        "KE-30",
        location={"region": "KE-30", "lat": -0.09, "lon": 34.77},
        confidence_score=0.7,
        affected_population=120_000,
        action_required=True,
        created_at="2026-11-25T12:00:00Z",
        expiry_time="2036-11-25T12:00:00Z",
    )
    raw = orjson.dumps(body)
    a = Alert.model_validate_json(raw)
    claims = ("KE",)
    names = Names("bench")
    subs = {
        "matches: 1 group (region:KE-30)": sub(["region:KE-30"]),
        MICRO_B: SUB_B,
        "matches: near 50 km + alert_types": sub(
            [],
            location_filter={"near": {"lat": -0.1, "lon": 34.75, "radius_km": 50}},
            alert_types=["outbreak_risk", "flood"],
        ),
        "matches: level + priority groups, bbox + regions": sub(
            ["level:critical", "priority:urgent"],
            location_filter={"bbox": [33.9, -4.7, 41.9, 5.0], "regions": ["KE"]},
            risk_threshold=0.5,
        ),
    }
    out = {}
    for label, s in subs.items():
        assert s.matches(a, claims), label
        out[label] = per_call_us(functools.partial(s.matches, a, claims), loops, repeats)
    coarse = {
        "coarse_filters: cohort B": SUB_B,
        "coarse_filters: 12 regions + level:high": sub(
            [f"region:KE-{i}" for i in range(1, 12)] + ["region:UG", "level:high"]
        ),
        "coarse_filters: near + alert_types": subs["matches: near 50 km + alert_types"],
    }
    for label, s in coarse.items():
        n = len(coarse_filters(names, s, claims))
        out[f"{label} -> {n} subject{'s' * (n != 1)}"] = per_call_us(
            functools.partial(coarse_filters, names, s, claims), loops, repeats
        )
    out[f"Alert.model_validate_json ({len(raw)} bytes)"] = per_call_us(
        functools.partial(Alert.model_validate_json, raw), loops, repeats
    )
    return out


# ---------------------------------------------------------------- report


def report(results: dict[str, Any], when: dt.datetime) -> str:
    c = results["config"]
    out = [
        f"# tocsin subscriptions benchmark, {when:%Y-%m-%d %H:%M}",
        "",
        f"Machine: {c['cpus']} CPUs ({c['cpu_model']}), Python {c['python']}, "
        f"{c['nats_server']}, aiohttp {c['aiohttp']}; tocsin at {c['code']}. Clients, gateway "
        "and publisher in one process (one event loop), nats-server a second; loopback, same "
        "cores: compare rows, not machines.",
        "",
    ]

    def change_rows(label: str, r: dict[str, Any] | None) -> list[str]:
        if not r:
            return [f"| {label} | (not measured) | | | | | | |"]
        calls = ", ".join(f"{k} {v:.2f}" for k, v in r["calls_per_change"].items())
        return [
            f"| {label} | {a} | {s['n']} | {fmt(s['p50_ms'], 2)} | {fmt(s['p90_ms'], 2)} "
            f"| {fmt(s['p99_ms'], 2)} | {fmt(s['max_ms'], 2)} | {calls if i == 0 else ''} |"
            for i, (a, s) in enumerate(r["by_action"].items())
        ]

    idle, busy = results.get("changes_idle"), results.get("changes_busy")
    out += [
        "## 1. Subscription change: send -> subscription_response",
        "",
        f"{c['rounds']} rounds of subscribe {CHANGE_GROUPS} / update_filters (alternating "
        f"{FILTER_SETS[0]} and {FILTER_SETS[1]}) / unsubscribe; each is a real change.",
        "",
        "| gateway | action | n | p50 ms | p90 ms | p99 ms | max ms | calls per change |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *change_rows("idle: 1 device, nothing published", idle),
        *change_rows(f"busy: {c['devices']} devices + back-to-back broadcasts", busy),
        "",
    ]
    if busy:
        out += [
            f"While busy: {busy['broadcasts_meanwhile']} broadcasts "
            f"({fmt(busy['broadcasts_per_s'])}/s to {c['devices']} devices), "
            f"{busy['checkpoint_resets_meanwhile']} checkpoint resets (CONSUMER.RESET, not "
            "counted above).",
            "",
        ]
    rows = results.get("rows", {})
    if rows:
        ra, rb = rows["cohortA alone"], rows["cohortB alone"]
        wa, wb = rows["cohortA with others"], rows["cohortB with others"]

        def ratio(key: str, x: dict[str, Any], y: dict[str, Any], d: int = 2) -> str:
            return fmt(y[key] / x[key], d) + "x" if x[key] else "n/a"

        out += [
            "## 2. Fine filter on broadcast: publish -> alert frame in the client task",
            "",
            f"Cohort A: {ra['devices']} devices, no subscription. Cohort B: {rb['devices']} "
            f"devices, groups {B_GROUPS} + risk_threshold 0.5. Every alert (KE-30, high, "
            "risk 0.8) reaches every device of both. Dispatch = time inside the gateway's "
            "synchronous `LiveFeed.dispatch` (judging + enqueueing for every session).",
            "",
            "| cohort | devices | broadcasts | deliveries | missing | p50 ms | p90 ms | p99 ms "
            "| max ms | dispatch ms/broadcast | dispatch µs/device (median) | (p90) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, r in (
            ("A alone (A B B A)", ra),
            ("B alone", rb),
            ("A with B connected", wa),
            ("B with A connected", wb),
            ("A + B together: all devices", rows["all"]),
        ):
            out.append(
                f"| {label} | {r['devices']} | {r['broadcasts']} | {r['deliveries']:,} "
                f"| {r['missing']} | {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])} "
                f"| {fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | {fmt(r['dispatch_ms_median'], 3)} "
                f"| {fmt(r['dispatch_us_per_device_median'], 2)} "
                f"| {fmt(r['dispatch_us_per_device_p90'], 2)} |"
            )
        extra = rb["dispatch_us_per_device_median"] - ra["dispatch_us_per_device_median"]
        hot = results.get("micro", {}).get(MICRO_B, {}).get("best_us", float("nan"))
        out += [
            f"| **B / A alone** | | | | | {ratio('p50_ms', ra, rb)} | {ratio('p90_ms', ra, rb)} "
            f"| {ratio('p99_ms', ra, rb)} | {ratio('max_ms', ra, rb)} "
            f"| {ratio('dispatch_ms_median', ra, rb)} "
            f"| **{ratio('dispatch_us_per_device_median', ra, rb)}** "
            f"| {ratio('dispatch_us_per_device_p90', ra, rb)} |",
            f"| **B / A together** | | | | | {ratio('p50_ms', wa, wb)} "
            f"| {ratio('p90_ms', wa, wb)} | {ratio('p99_ms', wa, wb)} "
            f"| {ratio('max_ms', wa, wb)} | | | |",
            "",
            f"The fine filter adds {fmt(extra, 2)} µs of dispatch per device and broadcast "
            f"(B's `matches` in a hot loop: {fmt(hot, 2)} µs, section 3; the alert is parsed "
            "once per gateway, not per device). "
            f"Mean receipt rank together (0 = first, 1 = last): A {fmt(wa['mean_rank'], 2)}, "
            f"B {fmt(wb['mean_rank'], 2)}.",
            "",
        ]
    if results.get("micro"):
        out += [
            "## 3. Micro (timeit, one thread, µs per call)",
            "",
            "| call | best of 5 | median of 5 |",
            "|---|---:|---:|",
        ]
        out += [
            f"| {k} | {fmt(v['best_us'], 2)} | {fmt(v['median_us'], 2)} |"
            for k, v in results["micro"].items()
        ]
        out.append("")
    out += [
        "## Phases",
        "",
        "| phase | wall s | bench CPU s | nats CPU s | status |",
        "|---|---:|---:|---:|---|",
    ]
    out += [
        f"| {k} | {fmt(u['wall'], 2)} | {fmt(u['cpu'], 2)} | {fmt(u['nats_cpu'], 2)} "
        f"| {u['status']} |"
        for k, u in results.get("phases", {}).items()
    ]
    notes = [f"ABORTED {x}" for x in results["aborted"]] + results["anomalies"]
    for key in ("changes_idle", "changes_busy"):
        if (results.get(key) or {}).get("refused"):
            notes.append(f"{key}: refused changes {results[key]['refused']}")
    if results.get("stray_receipts") or results.get("extra_receipts"):
        notes.append(
            f"receipts after a deadline: {results['stray_receipts']}, duplicates: "
            f"{results['extra_receipts']}"
        )
    notes.append(f"warnings/errors logged in this process: {results.get('gateway_log_total', 0)}")
    notes += [f"  {n} x {m}" for m, n in results.get("gateway_log", {}).items()]
    nlog = results.get("nats_log", {})
    notes.append(f"nats-server log warnings/errors: {sum(nlog.values())}")
    notes += [f"  {n} x {m}" for m, n in nlog.items()]
    out += ["", "## Anomalies", ""]
    out += [f"- {n}" if not n.startswith("  ") else f"  - {n.strip()}" for n in notes]
    return "\n".join(out) + "\n"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Subscriptions benchmark: what a subscription change costs, and what the "
        "fine filter adds to a broadcast per device (docs/benchmarks.md).",
    )
    parser.add_argument("--devices", type=int, default=0, help="devices (default 300; quick 100)")
    parser.add_argument("--quick", action="store_true", help="100 devices, fewer rounds")
    set_option(parser)
    out_option(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not 0 <= args.devices <= 2_000:
        parser.error("--devices must be between 2 and 2,000")
    gateway = parse_sets(parser, args.set)
    default = 100 if args.quick else 300
    bench = SubBench(args.devices or default, quick=args.quick, gateway=gateway)

    def stem(when: dt.datetime) -> str:
        name = f"subscriptions-{when:%Y-%m-%d}" + ("-quick" if args.quick else "")
        return name + (f"-d{args.devices}" if args.devices and args.devices != default else "")

    return run_and_write(bench.run(), report, args.out, stem)


if __name__ == "__main__":
    sys.exit(main())
