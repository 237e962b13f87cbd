"""Delivery benchmark: tocsin's live path against per-device durable pull consumers.

Run::

    tocsin bench delivery [--devices N] [--quick] [--compress] [--out DIR]

(or ``python -m tocsin.bench.scenarios.delivery``). One run starts its own nats-server
(temp store, loopback), applies the topology under a unique namespace, starts an
in-process gateway and measures:

1. **Broadcast via the gateway.** D WebSocket clients (region KE, ``ack_mode=auto``) in
   this process; each alert is read once by the gateway's ordered consumer and fanned out
   in memory. Latency = ``perf_counter()`` when a client's reader task gets the frame
   minus ``perf_counter()`` just before the publish call.
2. **Broadcast via durables, no gateway.** D durable pull consumers (``ack_policy=all``,
   filter ``alerts.KE.>``, a second namespace), each long-polling ``fetch(1)`` in its own
   task and acking. Same latency definition. Both paths stay connected while the K
   broadcasts are sent to them *alternately* (A B B A ...), after one unmeasured warm-up
   broadcast each, so neither gains from running second. A broadcast is sent only when
   every device has the previous one (or its deadline passed) and the other path is
   quiet (gateway checkpoints written).
3. **Catch-up.** A fresh device connects once, disconnects, 100 alerts are queued for it,
   and it reconnects (``ack_mode=client``, acking each alert): time from the start of the
   handshake to ``connection_established``, to the first alert and to all 100.
4. **Checkpoint cost.** ``DeviceQueues.reset()`` (``$JS.API.CONSUMER.RESET``) on the
   phase-1 device consumers: 1,000 calls, 64 at a time, and 100 one at a time.
5. **CPU and memory per phase.** ``time.process_time()`` and ``VmRSS`` of this process
   (clients + gateway + publisher, all in one event loop) and of nats-server
   (``/proc/<pid>/stat``, ``/proc/<pid>/status``).

Reading the tables: "p50/p90/p99/max" are over all D x K deliveries; "last device" is,
per broadcast, the time until the last device had it (median over broadcasts); the ratio
row is durables / gateway; "CPU ms/broadcast" includes what each broadcast causes
afterwards (the gateway's checkpoint resets, the durables' acks). "Where the time goes"
splits a broadcast into PubAck, the gateway's live-feed dispatch and the first and last
receipt. The gateway is observed, not changed: ``LiveFeed.dispatch`` and
``DeviceQueues.reset`` of the running instance are wrapped to timestamp and count. CPU %
is of one core; the machine's cores are shared by the clients, the gateway and
nats-server, so absolute latencies include their contention: compare rows, not machines.
Every phase is bounded (120 s) and reports an abort instead of hanging. Results go to
stdout and to ``benchmarks/results/delivery-<date>[-quick].md`` (under the current
directory, or ``--out``) with a JSON twin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import nats
import nats.errors
import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tocsin.core.naming import Names
from tocsin.core.topology import apply_topology
from tocsin.gateway.local import LocalGateway, start_local_gateway
from tocsin.ingest.pipeline import append_alert

from .common import (
    BROADCAST_DEADLINE,
    CLIENT_ID,
    CONNECT_CONCURRENCY,
    Broadcast,
    InProcessBench,
    LocalNats,
    Meter,
    Recorder,
    WsDevice,
    close_devices,
    code_version,
    fmt,
    live_sessions,
    make_alert,
    out_option,
    parse_sets,
    percentile,
    read_socket,
    run_and_write,
    server_version,
    set_option,
    token,
    wait_for,
    ws_params,
)

FETCH_TIMEOUT = 30.0  # the long poll of the durable-consumer path
REGION = "KE"


@dataclass(frozen=True)
class Sizes:
    """What a run repeats; the command line always uses these defaults (the tests shrink
    them to run every phase in seconds)."""

    broadcasts: int = 20  # K per path, after one warm-up each
    queued: int = 100  # alerts waiting for a reconnecting device
    catchup_repeats: int = 10
    resets: int = 1_000
    reset_concurrency: int = 64
    resets_serial: int = 100


# ---------------------------------------------------------------- broadcasts


@dataclass
class PathStats:
    label: str
    latencies: list[float] = field(default_factory=list)
    lasts: list[float] = field(default_factory=list)
    missing: int = 0
    broadcasts: int = 0
    per_broadcast: list[tuple[float, float]] = field(default_factory=list)  # (p50, max) ms
    stages: dict[str, list[float]] = field(default_factory=dict)  # per broadcast, seconds
    cpu_ms: float = math.nan  # this process, per broadcast (settling included)
    nats_cpu_ms: float = math.nan

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {
            "path": self.label,
            "broadcasts": self.broadcasts,
            "deliveries": len(ms),
            "missing": self.missing,
            "p50_ms": percentile(ms, 50),
            "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99),
            "max_ms": max(ms, default=math.nan),
            "last_device_median_ms": statistics.median(self.lasts) * 1000
            if self.lasts
            else math.nan,
            "bench_cpu_ms_per_broadcast": self.cpu_ms,
            "nats_cpu_ms_per_broadcast": self.nats_cpu_ms,
            "per_broadcast_p50_max_ms": self.per_broadcast,
            "stages_ms": {
                k: {"median": statistics.median(v) * 1000, "max": max(v) * 1000}
                for k, v in self.stages.items()
                if v
            },
        }


async def broadcast(
    js: JetStreamContext,
    names: Names,
    rec: Recorder,
    expected: int,
    stats: PathStats | None,
    feed_times: dict[int, float] | None = None,
) -> None:
    """Publish one KE alert and wait until ``expected`` devices have it (or the deadline).

    ``feed_times`` (stream seq -> when the gateway's live feed dispatched it), if given,
    adds the stage "publish -> gateway feed" to ``stats``.
    """
    model = make_alert(REGION)
    b = Broadcast(expected)
    rec.open[model.alert_id] = b
    b.t0 = time.perf_counter()
    ack = await append_alert(js, names, model)
    t_ack = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(BROADCAST_DEADLINE):
            await b.done.wait()
    del rec.open[model.alert_id]
    if stats is None:
        return
    lat = [t - b.t0 for t in b.times]
    stats.broadcasts += 1
    stats.latencies.extend(lat)
    stats.missing += max(0, expected - len(lat))
    stages = {"PubAck returned": t_ack - b.t0}
    if feed_times is not None and ack.seq in feed_times:
        stages["gateway live feed dispatched it"] = feed_times.pop(ack.seq) - b.t0
    if lat:
        stats.lasts.append(max(lat))
        stats.per_broadcast.append(
            (round(percentile(lat, 50) * 1000, 1), round(max(lat) * 1000, 1))
        )
        stages["first device had it"] = min(lat)
        stages["last device had it"] = max(lat)
    for key, value in stages.items():
        stats.stages.setdefault(key, []).append(value)


# ---------------------------------------------------------------- WebSocket devices


# ---------------------------------------------------------------- WebSocket devices


async def connect_devices(
    http: aiohttp.ClientSession,
    gw: LocalGateway,
    secret: str,
    n: int,
    rec: Recorder,
    compress: int,
    devices: list[WsDevice],
    errors: Counter[str],
) -> None:
    """Connect ``n`` devices into ``devices`` (kept even if the phase is aborted)."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            try:
                ws = await http.ws_connect(
                    gw.ws_url,
                    params=ws_params(token(secret, f"live-{i}", (REGION,)), "auto"),
                    compress=compress,
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[f"connect: {type(exc).__name__}: {exc}"[:120]] += 1
                return
            established = asyncio.Event()
            devices.append(WsDevice(ws, asyncio.create_task(read_socket(ws, rec, established))))
            try:
                await asyncio.wait_for(established.wait(), 30)
            except TimeoutError:
                errors["no connection_established within 30 s"] += 1

    await asyncio.gather(*(one(i) for i in range(n)))


# ---------------------------------------------------------------- durable pull consumers


@dataclass
class Pullers:
    subs: list[Any]
    tasks: list[asyncio.Task[None]]
    errors: Counter[str] = field(default_factory=Counter)


async def start_pullers(
    js: JetStreamContext, names: Names, n: int, rec: Recorder, pullers: Pullers
) -> None:
    stream = names.alerts_stream
    [subject] = names.region_filters([REGION])
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def pull(psub: Any) -> None:
        while True:  # ended by cancellation at the end of the broadcast phase
            try:
                msgs = await psub.fetch(1, timeout=FETCH_TIMEOUT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return  # the run is over (or was stopped)
            except nats.errors.Error as exc:
                pullers.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.1)
                continue
            t = time.perf_counter()
            for msg in msgs:
                rec.hit(orjson.loads(msg.data)["alert_id"], t)
                await msg.ack()

    async def one(i: int) -> None:
        async with gate:
            name = f"raw-{i}"
            await js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=name,
                    ack_policy=AckPolicy.ALL,
                    deliver_policy=DeliverPolicy.NEW,
                    filter_subject=subject,
                    max_ack_pending=64,
                ),
            )
            psub = await js.pull_subscribe_bind(durable=name, stream=stream)
            pullers.subs.append(psub)
            pullers.tasks.append(asyncio.create_task(pull(psub)))

    await asyncio.gather(*(one(i) for i in range(n)))


async def stop_pullers(pullers: Pullers) -> None:
    for task in pullers.tasks:
        task.cancel()
    await asyncio.gather(*pullers.tasks, return_exceptions=True)
    for psub in pullers.subs:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()


# ---------------------------------------------------------------- catch-up


async def catch_up_once(
    http: aiohttp.ClientSession,
    gw: LocalGateway,
    js: JetStreamContext,
    names: Names,
    tok: str,
    user: str,
    queued: int,
) -> dict[str, float]:
    consumer = names.device_consumer(user, CLIENT_ID)
    ws = await http.ws_connect(gw.ws_url, params=ws_params(tok, "client"), compress=0)
    async for msg in ws:
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"{user}: socket closed before connection_established")
        if orjson.loads(msg.data)["type"] == "connection_established":
            break
    await ws.close()
    if not await wait_for(lambda: all(s.consumer != consumer for s in gw.gw.sessions), 10):
        raise RuntimeError(f"the first session of {user} did not end")
    for _ in range(queued):
        await append_alert(js, names, make_alert(REGION))

    t0 = time.perf_counter()
    ws = await http.ws_connect(gw.ws_url, params=ws_params(tok, "client"), compress=0)
    out: dict[str, float] = {"handshake_ms": (time.perf_counter() - t0) * 1000}
    seen: set[int] = set()
    async for msg in ws:
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
        t = time.perf_counter()
        frame = orjson.loads(msg.data)
        if frame["type"] == "connection_established":
            out["established_ms"] = (t - t0) * 1000
            out["pending"] = frame["pending"]
        elif frame["type"] == "alert":
            if not seen:
                out["first_alert_ms"] = (t - t0) * 1000
            seen.add(frame["seq"])
            await ws.send_str(orjson.dumps({"type": "ack", "seq": frame["seq"]}).decode())
            if len(seen) == queued:
                out["all_ms"] = (t - t0) * 1000
                break
        elif frame["type"] == "ping":
            await ws.send_str(orjson.dumps({"type": "pong", "ts": frame["ts"]}).decode())
    await ws.close()
    if len(seen) < queued:
        raise RuntimeError(f"{user} got {len(seen)} of {queued} queued alerts")
    return out


# ---------------------------------------------------------------- checkpoints


async def reset_cost(
    gw: LocalGateway,
    js: JetStreamContext,
    names: Names,
    consumers: list[str],
    calls: int,
    concurrency: int,
) -> dict[str, float]:
    last = (await js.stream_info(names.alerts_stream)).state.last_seq
    gate = asyncio.Semaphore(concurrency)
    times: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            t = time.perf_counter()
            await gw.gw.queues.reset(consumers[i % len(consumers)], last + 1)
            times.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    wall = time.perf_counter() - t0
    ms = [x * 1000 for x in times]
    return {
        "calls": calls,
        "concurrency": concurrency,
        "wall_s": wall,
        "resets_per_s": calls / wall,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
    }


# ---------------------------------------------------------------- the run


class DeliveryBench(InProcessBench):
    def __init__(
        self,
        devices: int,
        quick: bool = False,
        compress: bool = False,
        sizes: Sizes = Sizes(),
        gateway: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(quick, gateway)
        self.devices = devices
        self.compress = 15 if compress else 0
        self.sizes = sizes

    async def measure(self, server: LocalNats) -> None:
        meter = Meter(server.pid)
        ns = f"bench{uuid.uuid4().hex[:8]}"
        settings = self.settings(server, ns)
        raw_settings = settings.model_copy(update={"namespace": f"{ns}raw"})
        names, raw_names = Names(ns), Names(raw_settings.namespace)
        d = self.devices
        self.results["config"] = {
            "devices": d,
            "broadcasts": self.sizes.broadcasts,
            "sizes": asdict(self.sizes),
            "namespace": ns,
            "quick": self.quick,
            "ws_compression": bool(self.compress),
            "checkpoint_seconds": settings.checkpoint_seconds,
            "max_inflight": settings.max_inflight,
            "heartbeat_seconds": settings.heartbeat_seconds,
            "offline_queue_max": settings.offline_queue_max,
            "gateway_set": self.gateway_values,
            "fetch_timeout_s": FETCH_TIMEOUT,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "nats_server": server_version(),
            "aiohttp": aiohttp.__version__,
            "code": code_version(),
        }
        nc = await nats.connect(server.url, name="bench-publisher")
        pull_nc = await nats.connect(server.url, name="bench-durables")
        js = nc.jetstream()
        await apply_topology(js, settings, names)
        await apply_topology(js, raw_settings, raw_names)
        gw = await start_local_gateway(settings)
        resets = count_resets(gw)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        rec = Recorder()
        devices: list[WsDevice] = []
        pullers = Pullers([], [])
        connect_errors: Counter[str] = Counter()
        try:
            await self.phase(
                meter,
                f"connect {d} WebSockets",
                connect_devices(
                    http, gw, self.secret, d, rec, self.compress, devices, connect_errors
                ),
            )
            await self.phase(
                meter,
                "wait until sessions are live",
                wait_for(lambda: live_sessions(gw) >= len(devices), 60),
            )
            live = live_sessions(gw)
            self.results["sessions_live"] = live
            if live < d:
                self.results["anomalies"].append(f"only {live} of {d} sessions went live")
            if connect_errors:
                self.results["anomalies"].append(f"connect errors: {dict(connect_errors)}")
            await self.phase(
                meter,
                f"create {d} durables + pull tasks",
                start_pullers(pull_nc.jetstream(), raw_names, d, rec, pullers),
            )
            if devices and pullers.tasks:
                await self.broadcasts(
                    meter, gw, js, names, raw_names, rec, resets, len(devices), len(pullers.tasks)
                )
            self.results["pull_errors"] = dict(pullers.errors)
            self.results["frames_other"] = dict(rec.frames)
            self.results["stray_receipts"], self.results["extra_receipts"] = rec.stray, rec.extra
            await self.phase(meter, "stop pull tasks", stop_pullers(pullers))
            await self.phase(
                meter, f"close {len(devices)} WebSockets (positions saved)", close_devices(devices)
            )
            z = self.sizes
            self.results["catch_up"] = await self.phase(
                meter, f"catch-up x{z.catchup_repeats}", self.catch_ups(http, gw, js, names)
            )
            consumers = [names.device_consumer(f"live-{i}", CLIENT_ID) for i in range(d)]
            self.results["resets"] = [
                await self.phase(
                    meter,
                    f"checkpoints: {z.resets:,} resets, {z.reset_concurrency} at a time",
                    reset_cost(gw, js, names, consumers, z.resets, z.reset_concurrency),
                ),
                await self.phase(
                    meter,
                    f"checkpoints: {z.resets_serial} resets, one at a time",
                    reset_cost(gw, js, names, consumers, z.resets_serial, 1),
                ),
            ]
        finally:
            self.results["phases"] = {k: vars(v) for k, v in meter.phases.items()}
            await stop_pullers(pullers)  # done already, unless the run was cut short
            await http.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(gw.stop(), 30)
            await nc.close()
            await pull_nc.close()

    async def broadcasts(
        self,
        meter: Meter,
        gw: LocalGateway,
        js: JetStreamContext,
        names: Names,
        raw_names: Names,
        rec: Recorder,
        resets: Counter[str],
        n_ws: int,
        n_pull: int,
    ) -> None:
        """K broadcasts per path, alternating A B B A ..., after one warm-up broadcast each."""
        gateway = PathStats(f"tocsin gateway: 1 ordered consumer -> {n_ws} WebSockets")
        durable = PathStats(f"{n_pull} durable pull consumers, fetch(1) long-poll, no gateway")

        async def settle_gateway() -> None:  # this broadcast's positions are journaled
            journal, sessions = gw.gw.journal, gw.gw.sessions
            if not await wait_for(lambda: not journal.snapshot(sessions), 5):
                self.results["anomalies"].append("gateway positions not journaled within 5 s")
            await asyncio.sleep(0.1)

        async def settle_durables() -> None:  # acks sent, long polls re-armed
            await asyncio.sleep(0.1)

        paths: dict[str, tuple[Names, int, PathStats, Callable[[], Awaitable[None]]]] = {
            "gateway": (names, n_ws, gateway, settle_gateway),
            "durables": (raw_names, n_pull, durable, settle_durables),
        }
        order = ["gateway", "durables"]  # the warm-up, not measured
        k = self.sizes.broadcasts
        for i in range(k):
            order += ["gateway", "durables"] if i % 4 in (0, 3) else ["durables", "gateway"]
        before = resets["n"]
        feed_times = time_feed(gw)

        async def rounds() -> None:
            for n, kind in enumerate(order):
                warm = n < 2
                target, expected, stats, settle = paths[kind]
                start = meter.snap()
                await broadcast(
                    js,
                    target,
                    rec,
                    expected,
                    None if warm else stats,
                    feed_times if kind == "gateway" else None,
                )
                await settle()
                meter.add(
                    "warm-up (1 broadcast per path)"
                    if warm
                    else f"broadcasts via {kind} (K={k}, incl. settling)",
                    start,
                )

        await self.bounded(f"{len(order)} broadcasts, alternating paths", rounds())
        for kind, (_, _, stats, _) in paths.items():
            usage = meter.phases.get(f"broadcasts via {kind} (K={k}, incl. settling)")
            if usage and stats.broadcasts:
                stats.cpu_ms = usage.cpu * 1000 / stats.broadcasts
                stats.nats_cpu_ms = usage.nats_cpu * 1000 / stats.broadcasts
        self.results["broadcast"] = [gateway.summary(), durable.summary()]
        self.results["checkpoint_resets_during_broadcasts"] = resets["n"] - before

    async def catch_ups(
        self, http: aiohttp.ClientSession, gw: LocalGateway, js: JetStreamContext, names: Names
    ) -> list[dict[str, float]]:
        runs = []
        for i in range(self.sizes.catchup_repeats):
            user = f"catchup-{i}"
            tok = self.token(user, (REGION,))
            runs.append(await catch_up_once(http, gw, js, names, tok, user, self.sizes.queued))
        return runs


def count_resets(gw: LocalGateway) -> Counter[str]:
    """Count the gateway's consumer resets (checkpoints) by wrapping its queue object."""
    queues = gw.gw.queues
    original = queues.reset
    counter: Counter[str] = Counter()

    async def counted(consumer: str, seq: int) -> int:
        counter["n"] += 1
        return await original(consumer, seq)

    queues.reset = counted  # type: ignore[method-assign]
    return counter


def time_feed(gw: LocalGateway) -> dict[int, float]:
    """When the gateway's live feed dispatches each alert (stream seq -> perf_counter)."""
    feed = gw.gw.feed
    original = feed.dispatch
    times: dict[int, float] = {}

    def timed(alert: Any) -> None:
        times[alert.seq] = time.perf_counter()
        original(alert)

    feed.dispatch = timed  # type: ignore[method-assign]
    return times


# ---------------------------------------------------------------- report


def report(results: dict[str, Any], when: dt.datetime) -> str:
    c = results["config"]
    out = [
        f"# tocsin delivery benchmark, {when:%Y-%m-%d %H:%M}",
        "",
        f"D = {c['devices']} devices (region KE), K = {c['broadcasts']} broadcasts per path "
        f"(+1 warm-up each, paths alternated). {c['nats_server']}, Python {c['python']}, "
        f"aiohttp {c['aiohttp']}, {c['cpus']} CPUs, tocsin at {c['code']}. "
        "WebSocket compression: "
        f"{'on' if c['ws_compression'] else 'off'}. Gateway settings: checkpoint every "
        f"{c['checkpoint_seconds']} s, max_inflight {c['max_inflight']}, offline_queue_max "
        f"{c['offline_queue_max']}.",
        "",
        "**The WebSocket clients, the gateway and the publisher run in ONE Python process "
        "(one event loop); nats-server is a second process. All share the same "
        f"{c['cpus']} cores over loopback**, so latencies include client-side work and "
        "contention. Compare rows, not machines.",
        "",
    ]
    if "broadcast" in results:
        g, r = results["broadcast"]
        out += [
            "## Broadcast latency (publish call -> frame/message in the client task)",
            "",
            "| path | deliveries | missing | p50 ms | p90 ms | p99 ms | max ms "
            "| last device, median ms | CPU ms/broadcast: bench | nats |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in (g, r):
            out.append(
                f"| {s['path']} | {s['deliveries']:,} | {s['missing']} | {fmt(s['p50_ms'])} "
                f"| {fmt(s['p90_ms'])} | {fmt(s['p99_ms'])} | {fmt(s['max_ms'])} "
                f"| {fmt(s['last_device_median_ms'])} | {fmt(s['bench_cpu_ms_per_broadcast'], 0)} "
                f"| {fmt(s['nats_cpu_ms_per_broadcast'], 0)} |"
            )
        ratio = {
            k: r[k] / g[k] if g[k] else math.nan
            for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "last_device_median_ms")
        }
        out += [
            f"| ratio durables / gateway | | | {fmt(ratio['p50_ms'], 2)}x "
            f"| {fmt(ratio['p90_ms'], 2)}x | {fmt(ratio['p99_ms'], 2)}x "
            f"| {fmt(ratio['max_ms'], 2)}x | {fmt(ratio['last_device_median_ms'], 2)}x | | |",
            "",
            "CPU per broadcast includes settling: for the gateway, one checkpoint reset per "
            "device (broadcasts are spaced beyond TOCSIN_CHECKPOINT_SECONDS); for the "
            "durables, the acks and re-armed long polls.",
            "",
        ]
        out += [
            "Where the time goes (per broadcast, from the publish call):",
            "",
            "| stage | gateway median ms | gateway max ms | durables median ms | durables max ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for stage in g["stages_ms"]:
            gs, rs = g["stages_ms"][stage], r["stages_ms"].get(stage)
            out.append(
                f"| {stage} | {fmt(gs['median'])} | {fmt(gs['max'])} "
                f"| {fmt(rs['median']) if rs else ''} | {fmt(rs['max']) if rs else ''} |"
            )
        out += [
            "",
            "The clients share the gateway's event loop, so a client task runs only after the "
            "gateway's sender tasks have written their frames (and the publisher's PubAck "
            "waits for both): for the gateway, *first device* is close to *last device* and "
            "includes the client-side receive work of all D sockets.",
            "",
            f"Sessions live before the first broadcast: {results.get('sessions_live')}. "
            f"Gateway checkpoint resets during the broadcasts: "
            f"{results.get('checkpoint_resets_during_broadcasts')}.",
            "",
        ]
    runs = results.get("catch_up") or []
    queued = c.get("sizes", {}).get("queued", Sizes.queued)
    if runs:
        out += [
            f"## Catch-up: {queued} queued alerts, ack_mode=client, each acked "
            f"({len(runs)} fresh devices)",
            "",
            "| from the start of the handshake to | median ms | max ms |",
            "|---|---:|---:|",
        ]
        for key, label in (
            ("handshake_ms", "WebSocket upgrade done"),
            ("established_ms", "connection_established"),
            ("first_alert_ms", "first alert"),
            ("all_ms", f"all {queued} alerts"),
        ):
            vals = [r[key] for r in runs if key in r]
            out.append(f"| {label} | {fmt(statistics.median(vals))} | {fmt(max(vals))} |")
        pend = sorted({r.get("pending") for r in runs})
        out += ["", f"`pending` in connection_established: {pend}.", ""]
    resets = [r for r in results.get("resets") or [] if r]
    if resets:
        out += [
            "## Checkpoint cost: DeviceQueues.reset() ($JS.API.CONSUMER.RESET)",
            "",
            "| calls | concurrency | wall s | resets/s | p50 ms/call | p99 ms/call | max ms |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in resets:
            out.append(
                f"| {r['calls']:,} | {r['concurrency']} | {fmt(r['wall_s'], 2)} "
                f"| {fmt(r['resets_per_s'], 0)} | {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} "
                f"| {fmt(r['max_ms'], 2)} |"
            )
        out.append("")
    out += [
        "## CPU and memory per phase",
        "",
        "bench = this process (clients + gateway + publisher); CPU % is of one core "
        f"(max {100 * (c['cpus'] or 1)} %). RSS at the end of the phase. The broadcast "
        "rows include the waits between broadcasts: compare their CPU seconds, not CPU %.",
        "",
        "| phase | wall s | bench CPU s | bench CPU % | nats CPU s | nats CPU % "
        "| bench RSS MB | nats RSS MB | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, u in results.get("phases", {}).items():
        wall = u["wall"] or math.nan
        out.append(
            f"| {name} | {fmt(u['wall'], 2)} | {fmt(u['cpu'], 2)} "
            f"| {fmt(100 * u['cpu'] / wall, 0)} "
            f"| {fmt(u['nats_cpu'], 2)} | {fmt(100 * u['nats_cpu'] / wall, 0)} "
            f"| {fmt(u['rss_mb'], 0)} | {fmt(u['nats_rss_mb'], 0)} | {u['status']} |"
        )
    gcs = results.get("gc_pauses") or {}
    if gcs:
        out += [
            "",
            "Garbage-collector pauses in this process over the whole run: "
            + ", ".join(
                f"{g} {v['count']} x, {fmt(v['total_ms'], 0)} ms in all, longest "
                f"{fmt(v['max_ms'], 0)} ms"
                for g, v in gcs.items()
            )
            + ".",
        ]
    out += ["", "## Anomalies", ""]
    notes = [f"ABORTED {a}" for a in results["aborted"]] + results["anomalies"]
    if results.get("stray_receipts") or results.get("extra_receipts"):
        notes.append(
            f"receipts after a broadcast's deadline: {results['stray_receipts']}, "
            f"duplicates: {results['extra_receipts']}"
        )
    if results.get("frames_other"):
        notes.append(f"other frames seen by broadcast clients: {results['frames_other']}")
    if results.get("pull_errors"):
        notes.append(f"durable fetch errors: {results['pull_errors']}")
    total = results.get("gateway_log_total", 0)
    notes.append(f"warnings/errors logged in this process (gateway included): {total}")
    notes += [f"  {n} x {msg}" for msg, n in results.get("gateway_log", {}).items()]
    nlog = results.get("nats_log", {})
    notes.append(f"nats-server log warnings/errors: {sum(nlog.values())}")
    notes += [f"  {n} x {msg}" for msg, n in nlog.items()]
    out += [f"- {n}" if not n.startswith("  ") else f"  - {n.strip()}" for n in notes]
    return "\n".join(out) + "\n"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Delivery benchmark: tocsin's live path against per-device durable pull "
        "consumers, catch-up of 100 queued alerts and checkpoint cost (docs/benchmarks.md).",
    )
    parser.add_argument("--devices", type=int, default=0, help="devices (default 500; quick 200)")
    parser.add_argument("--quick", action="store_true", help="200 devices")
    parser.add_argument(
        "--compress",
        action="store_true",
        help="let clients negotiate permessage-deflate (browsers always do)",
    )
    set_option(parser)
    out_option(parser)
    return parser


def stem(when: dt.datetime, quick: bool, devices: int, compress: bool) -> str:
    """``delivery-<date>[-quick][-d<N>][-deflate]``: -d only for a size not the default."""
    out = f"delivery-{when:%Y-%m-%d}" + ("-quick" if quick else "")
    if devices != (200 if quick else 500):
        out += f"-d{devices}"
    return out + ("-deflate" if compress else "")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not 0 <= args.devices <= 10_000:
        parser.error("--devices must be between 1 and 10,000")
    gateway = parse_sets(parser, args.set)
    devices = args.devices or (200 if args.quick else 500)
    bench = DeliveryBench(devices, quick=args.quick, compress=args.compress, gateway=gateway)
    return run_and_write(
        bench.run(),
        report,
        args.out,
        lambda when: stem(when, args.quick, devices, args.compress),
    )


if __name__ == "__main__":
    sys.exit(main())
