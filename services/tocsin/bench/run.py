"""``tocsin bench``: every row of the performance table in one run, beside its ceiling.

One run starts its own nats-server, one gateway and the ceiling broadcaster (a bare aiohttp
fan-out that keeps nothing), each its own process, and drives them with the load
generator's worker processes (:mod:`tocsin.bench.loadgen`). Phases, in order:

1. **connections** – N devices connect, each with its own durable consumer, and are held
   with heartbeats; connect rate, drops, gateway RSS per connection, nats-server memory
   per durable.
2. **targeted** – with all N online, alerts for a region only one device holds:
   publish→receive latency, and per alert what it is made of (publish→PubAck, publish→
   JetStream's delivery to a consumer of the orchestrator's own, the CPU each process had
   and waited for meanwhile, from ``/proc/<pid>/task/*/schedstat``).
   ``only="targeted"`` stops the run here.
3. **broadcast** – D devices on tocsin and D on the ceiling, the same client code; K
   broadcasts alternate between the two so neither gains from going second.
4. **sustained** – the same D devices, client acks on: a burst of M alerts, deliveries/s
   until the last device has the last alert, alternating again.
5. **catch-up** – a device with 100 queued alerts reconnects: handshake to last alert.

Latency is measured on one clock (``CLOCK_MONOTONIC`` is system-wide): the publisher stamps
just before it publishes, each client when its frame is parsed. The load generator reports
its own CPU: on 2 cores it competes with what it measures.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
from nats.js.api import DeliverPolicy

from tocsin.core.auth import mint_token
from tocsin.core.embedded import server_binary
from tocsin.core.naming import Names
from tocsin.ingest.pipeline import append_alert
from tocsin.schemas import Alert

from .loadgen import ClientSpec, LoadGen
from .procs import Stack, Usage, usage

WS_PATH = "/api/v1/alerts/ws"


@dataclass(frozen=True)
class Plan:
    connections: int  # phase 1: devices held online, each with its own durable
    hold_seconds: float
    targeted: int  # alerts for the one device of its region
    devices: int  # phases 3-4: broadcast audience, on each side
    broadcasts: int  # per side
    burst: int  # phase 4: alerts per burst
    bursts: int  # per side
    catchup_runs: int
    heartbeat: float
    processes: int = 2  # load generator worker processes


PLANS = {
    "quick": Plan(
        connections=1000,
        hold_seconds=8,
        targeted=20,
        devices=500,
        broadcasts=8,
        burst=40,
        bursts=2,
        catchup_runs=5,
        heartbeat=4,
    ),
    "full": Plan(
        connections=10_000,
        hold_seconds=60,
        targeted=500,
        devices=2000,
        broadcasts=20,
        burst=100,
        bursts=3,
        catchup_runs=10,
        heartbeat=15,
    ),
}

#: Targets of issue 4; ``ratio`` rows compare with the ceiling of the same run.
TARGETS = {
    "connections": "10,000 held 60 s",
    "broadcast_p99_ratio": "≤ 1.5× ceiling",
    "sustained": "≥ 20,000/s and ≥ 0.7× ceiling",
    "targeted_p99_ms": "< 10 ms",
    "catchup_ms": "< 100 ms",
    "gateway_kib_per_connection": "< 30 KiB",
}


# ---------------------------------------------------------------------- small helpers
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values) if values else float("nan"),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values) if values else float("nan"),
    }


class Progress:
    """One status line on stderr, rewritten in place on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def __call__(self, label: str, done: float, total: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        width = 30
        filled = int(width * min(1.0, done / total)) if total else width
        bar = "#" * filled + "." * (width - filled)
        line = f"[{now - self.started:6.1f}s] {label:<28} [{bar}] {done:,.0f}/{total:,.0f}"
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            if force:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


_next_id = [int(time.time() * 1000) * 1000]


def make_alert(region: str, **extra: Any) -> Alert:
    _next_id[0] += 1
    body = {
        "alert_id": _next_id[0],
        "alert_level": "high",
        "alert_type": "outbreak_risk",
        "title": "Malaria outbreak risk rising",
        "message": "Risk model predicts a rise in cases over the next two weeks",
        "priority": "urgent",
        "location": {"region": region, "lat": -0.09, "lon": 34.77},
        "risk_score": 0.82,
    }
    body.update(extra)
    return Alert.model_validate(body)


# ---------------------------------------------------------------------- the run
@dataclass
class Run:
    plan: Plan
    stack: Stack
    gen: LoadGen
    progress: Progress
    results: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)  # raw data for the plots
    gc_before: dict[str, dict[str, float]] = field(default_factory=dict)  # after the connects

    def token(self, user: str, region: str) -> str:
        return mint_token(self.stack.secret, user, regions=[region], ttl_seconds=24 * 3600)

    def spec(self, user: str, region: str, client_id: str, ack: bool = True) -> ClientSpec:
        mode = "client" if ack else "auto"
        query = f"auth_token={self.token(user, region)}&client_id={client_id}&ack_mode={mode}"
        return ClientSpec(f"{WS_PATH}?{query}", ack=ack)

    # ------------------------------------------------------------------ accounting
    async def snapshot(self) -> dict[str, Usage]:
        out = dict(self.stack.usage())
        for i, u in enumerate(await self.gen.usage()):
            out[f"loadgen-{i}"] = Usage(u.cpu_seconds, u.rss_bytes)
        out["orchestrator"] = usage(os.getpid())
        return out

    async def phase(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        before = await self.snapshot()
        t0 = time.monotonic()
        await body()
        seconds = time.monotonic() - t0
        after = await self.snapshot()
        self.cpu[name] = {"seconds": round(seconds, 2)} | {
            proc: round(100 * (after[proc].cpu_seconds - before[proc].cpu_seconds) / seconds, 1)
            for proc in after
            if proc in before and seconds > 0
        }

    # ------------------------------------------------------------------ publishing
    async def publish_tocsin(self, js: Any, names: Names, alerts: list[Alert]) -> dict[int, int]:
        sent = {}
        for a in alerts:
            sent[int(a.alert_id)] = time.monotonic_ns()
            await append_alert(js, names, a)
        return sent

    async def publish_ceiling(
        self, http: aiohttp.ClientSession, alerts: list[Alert]
    ) -> dict[int, int]:
        sent = {int(a.alert_id): time.monotonic_ns() for a in alerts}
        body = b"[" + b",".join(a.model_dump_json().encode() for a in alerts) + b"]"
        url = f"{self.stack.ceiling_http}/broadcast" + (
            f"?count={len(alerts)}" if len(alerts) > 1 else ""
        )
        payload = body if len(alerts) > 1 else alerts[0].model_dump_json().encode()
        async with http.post(url, data=payload, headers={"Content-Type": "application/json"}) as r:
            r.raise_for_status()
            await r.read()
        return sent


def start_profiler(pid: int, path: Path) -> subprocess.Popen[bytes] | None:
    """py-spy, sampling ``pid`` from outside until stopped (collapsed stacks at ``path``)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print("--profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profiler(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def run_bench(
    plan: Plan,
    name: str,
    out_dir: Path,
    profile: bool = False,
    gateway_env: dict[str, str] | None = None,
    only: str | None = None,
) -> dict[str, Any]:
    """``only="targeted"``: connect, hold, targeted, and nothing after (the tail's loop)."""
    if only not in (None, "targeted"):
        raise ValueError(f"only: 'targeted' or None, got {only!r}")
    progress = Progress()
    load_before = os.getloadavg()
    stack = Stack(
        heartbeat=plan.heartbeat,
        max_devices=plan.connections + plan.devices + plan.catchup_runs + 1000,
        max_inflight=64,
        extra_env=gateway_env,
    )
    progress("starting nats, gateway, ceiling", 0, 1, force=True)
    try:
        stack.start()
    except BaseException:
        stack.stop()  # whatever did start, and the temporary directory
        raise
    os.makedirs(out_dir, exist_ok=True)
    # With only the targeted phase, the profile starts once the devices are connected: it
    # is then of what the gateway does while it holds them (heartbeats, ticker, saves).
    stacks = out_dir / f"{name}-gateway.stacks"
    spies: list[subprocess.Popen[bytes] | None] = []
    if profile and only is None:
        spies.append(start_profiler(stack.pids()["gateway"], stacks))
    gen = LoadGen("127.0.0.1", stack.gateway_port, processes=plan.processes)
    ceiling_gen = LoadGen("127.0.0.1", stack.ceiling_port, processes=plan.processes)
    await gen.start()
    await ceiling_gen.start()
    run = Run(plan, stack, gen, progress)
    names = Names(stack.namespace)
    nc = await nats.connect(stack.nats.url if stack.nats else "", max_reconnect_attempts=2)
    js = nc.jetstream()
    http = aiohttp.ClientSession()

    async def connected() -> None:
        if profile and only is not None:
            spies.append(start_profiler(stack.pids()["gateway"], stacks))
        # Read here, long before the targeted phase: a scrape of /metrics lists every
        # device queue from JetStream, which would disturb the alerts right after it.
        run.gc_before = await gc_pauses(http, stack.http)

    try:
        await _connections(run, connected)
        if only is None:
            await _scrapes(run, http)
        await _targeted(run, js, names, nats_url=stack.nats.url if stack.nats else "")
        if only is None:
            await _broadcast_and_sustained(run, ceiling_gen, js, names, http)
            await _catchup(run, js, names)
    finally:
        await http.close()
        await nc.close()
        for g in (gen, ceiling_gen):
            await g.stop()
        for spy in spies:
            stop_profiler(spy)
        stack.stop()
    report = {
        "name": name,
        "plan": asdict(plan),
        "machine": machine(),
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "only": only,
        "results": run.results,
        "cpu_percent_of_one_core": run.cpu,
        "targets": TARGETS,
        "gateway_settings": gateway_env or {},
    }
    write_report(report, run.series, out_dir)
    return report


async def _connections(run: Run, connected: Callable[[], Awaitable[None]] | None = None) -> None:
    plan, gen = run.plan, run.gen
    base = run.stack.usage()
    specs = [run.spec(f"u{i}", "KE", f"d{i}") for i in range(plan.connections - 1)]
    specs.append(run.spec("target", "TZ", "d-target"))
    result: dict[str, Any] = {}

    async def connect() -> None:
        t0 = time.monotonic()
        res = await gen.connect(specs, concurrency=256, timeout=600)
        result.update(
            ok=res.ok,
            failed=res.failed,
            failures=res.failures,
            connect_seconds=round(time.monotonic() - t0, 2),
            connects_per_second=round(res.ok / max(1e-9, res.seconds), 1),
            handshake_ms=summary(res.established_ms),
        )
        run.progress("connect", res.ok, len(specs), force=True)

    await run.phase("connect", connect)
    if connected is not None:
        await connected()
    held = run.stack.usage()

    async def hold() -> None:
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < plan.hold_seconds:
            run.progress("hold with heartbeats", elapsed, plan.hold_seconds)
            await asyncio.sleep(0.5)
        run.progress("hold with heartbeats", plan.hold_seconds, plan.hold_seconds, force=True)

    await run.phase("hold", hold)
    status = await gen.status()
    after = run.stack.usage()
    ok = result["ok"]
    result.update(
        open_after_hold=status.open,
        closed_during_hold=sum(status.closed.values()),
        close_codes=status.closed,
        pings_answered=status.pings_answered,
        gateway_rss_mib=round(after["gateway"].rss_bytes / 2**20, 1),
        gateway_kib_per_connection=round(
            (held["gateway"].rss_bytes - base["gateway"].rss_bytes) / 1024 / max(1, ok), 1
        ),
        nats_kib_per_durable=round(
            (held["nats-server"].rss_bytes - base["nats-server"].rss_bytes) / 1024 / max(1, ok), 1
        ),
        nats_rss_mib=round(after["nats-server"].rss_bytes / 2**20, 1),
    )
    run.results["connections"] = result


#: Scrapes of /metrics and of the stats per kind, with every connection held.
SCRAPES = 10


async def _scrapes(run: Run, http: aiohttp.ClientSession) -> None:
    """What an operator's scrapes cost with every connection open: ms per GET of /metrics
    and of the stats. The first stats read after the cache expired lists every device
    queue from JetStream (cold); the others reuse it (warm, TOCSIN_STATS_CACHE_SECONDS)."""
    admin = mint_token(run.stack.secret, "bench-admin", roles=["admin"], ttl_seconds=3600)
    headers = {"Authorization": f"Bearer {admin}"}

    async def timed(path: str) -> float:
        t0 = time.perf_counter()
        async with http.get(run.stack.http + path, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}")
        return (time.perf_counter() - t0) * 1000

    result: dict[str, Any] = {}

    async def body() -> None:
        cold = await timed("/api/v1/alerts/stats")
        warm = [await timed("/api/v1/alerts/stats") for _ in range(SCRAPES)]
        scrape = [await timed("/metrics") for _ in range(SCRAPES)]
        result.update(
            connections=run.results["connections"]["ok"],
            stats_cold_ms=round(cold, 1),
            stats_ms=summary(warm),
            metrics_ms=summary(scrape),
        )

    await run.phase("scrapes", body)
    run.results["scrapes"] = result


#: A targeted alert slower than this is listed with what it was made of.
TARGETED_SLOW_MS = 10.0


def sched(pid: int, all_threads: bool = False) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of ``pid``'s main thread, or of all
    its threads, from ``/proc/<pid>/task/<tid>/schedstat`` (0s where there is none)."""
    tids = os.listdir(f"/proc/{pid}/task") if all_threads else [str(pid)]
    ran = waited = 0
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except OSError:
            continue
        ran += int(fields[0])
        waited += int(fields[1])
    return ran, waited


def cpu_pressure_us() -> int:
    """The machine's ``some`` CPU stall so far (µs: some task waited for a CPU), or 0."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


async def gc_pauses(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, float]]:
    """The gateway's ``tocsin_gateway_gc_pause_seconds`` histogram: per generation, pauses
    at or below each bucket (``le=...``), ``count`` and ``sum``; empty without it."""
    out: dict[str, dict[str, float]] = {}
    try:
        async with http.get(f"{url}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return out
    for line in text.splitlines():
        if not line.startswith("tocsin_gateway_gc_pause_seconds"):
            continue
        name, _, value = line.rpartition(" ")
        generation = name.split('generation="', 1)[-1].split('"', 1)[0]
        if "_bucket" in name:
            key = "le=" + name.split('le="', 1)[1].split('"', 1)[0]
        elif "_count" in name:
            key = "count"
        elif "_sum" in name:
            key = "sum"
        else:
            continue
        out.setdefault(generation, {})[key] = float(value)
    return out


def gc_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Per generation: collections, their total ms, and those over 5 and 10 ms."""
    out = {}
    for gen, h in sorted(after.items()):
        b = before.get(gen, {})
        d = {k: v - b.get(k, 0.0) for k, v in h.items()}
        out[gen] = {
            "collections": d.get("count", 0.0),
            "ms": round(1000 * d.get("sum", 0.0), 1),
            "over_5_ms": d.get("count", 0.0) - d.get("le=0.005", 0.0),
            "over_10_ms": d.get("count", 0.0) - d.get("le=0.01", 0.0),
        }
    return out


async def _targeted(run: Run, js: Any, names: Names, nats_url: str = "") -> None:
    """Alerts for TZ-1, one at a time: publish→receipt of the one device, and its parts.

    Beside the gateway's ordered consumer on ALERTS the orchestrator has one of its own
    (on a connection of its own): publish→its delivery is nats-server's share and the
    orchestrator's, delivery→receipt the gateway's, loopback's and the load generator's.
    Each alert's window (just before the publish until the receipt was seen, polled every
    5 ms) also gets each process's CPU time and run-queue wait from schedstat."""
    plan = run.plan
    lat: list[float] = []
    parts: dict[str, list[float]] = {"pub_ack": [], "pub_js": [], "js_recv": []}
    slow: list[dict[str, Any]] = []
    pids = dict(run.stack.pids())
    pids.pop("ceiling", None)
    for i, pid in enumerate(run.gen.pids):
        pids[f"loadgen-{i}"] = pid
    pids["orchestrator"] = os.getpid()
    ran_total = {p: 0 for p in pids}
    waited_total = {p: 0 for p in pids}
    js_seen: dict[int, int] = {}
    probe = await nats.connect(nats_url, max_reconnect_attempts=2) if nats_url else None
    sample = make_alert("TZ-1")
    subject = names.alert_subject(
        sample.location.region, sample.alert_level.value, sample.alert_type
    )

    async def on_js(msg: Any) -> None:
        js_seen[msg.metadata.sequence.stream] = time.monotonic_ns()

    def snap() -> dict[str, tuple[int, int]]:
        return {p: sched(pid, all_threads=p == "nats-server") for p, pid in pids.items()}

    async def body() -> None:
        if probe is not None:
            await probe.jetstream().subscribe(
                subject, cb=on_js, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
            )
            await probe.flush()
        await run.gen.collect()
        for i in range(plan.targeted):
            start = await run.gen.received()
            s0, psi0 = snap(), cpu_pressure_us()
            alert = make_alert("TZ-1")
            t0 = time.monotonic_ns()
            ack = await append_alert(js, names, alert)
            t_ack = time.monotonic_ns()
            await settle(run.gen, start + 1, 10, poll=0.005)
            s1, psi1 = snap(), cpu_pressure_us()
            got, _ = await _lat(run.gen, {int(alert.alert_id): t0})
            lat.extend(got)
            t_js = js_seen.pop(ack.seq, 0)
            parts["pub_ack"].append((t_ack - t0) / 1e6)
            if t_js:
                parts["pub_js"].append((t_js - t0) / 1e6)
            if got and t_js:
                parts["js_recv"].append(got[0] - (t_js - t0) / 1e6)
            for p in pids:
                ran_total[p] += s1[p][0] - s0[p][0]
                waited_total[p] += s1[p][1] - s0[p][1]
            if got and got[0] > TARGETED_SLOW_MS:
                slow.append(
                    {
                        "at_ns": t0,
                        "ms": round(got[0], 2),
                        "pub_ack_ms": round((t_ack - t0) / 1e6, 2),
                        "pub_js_ms": round((t_js - t0) / 1e6, 2) if t_js else None,
                        "ran_ms": {p: round((s1[p][0] - s0[p][0]) / 1e6, 1) for p in pids},
                        "waited_ms": {p: round((s1[p][1] - s0[p][1]) / 1e6, 1) for p in pids},
                        "cpu_pressure_ms": round((psi1 - psi0) / 1000, 1),
                    }
                )
            run.progress("targeted", i + 1, plan.targeted)
        run.progress("targeted", plan.targeted, plan.targeted, force=True)

    load = os.getloadavg()
    try:
        await run.phase("targeted", body)
    finally:
        if probe is not None:
            await probe.close()
    async with aiohttp.ClientSession() as http:
        gc_after = await gc_pauses(http, run.stack.http)
    seconds = run.cpu["targeted"]["seconds"]
    run.results["targeted"] = {
        "online": run.results["connections"]["ok"],
        "latency_ms": summary(lat),
        "parts_ms": {k: summary(v) for k, v in parts.items()},
        "slow_ms": TARGETED_SLOW_MS,
        "slow": slow,
        "waited_percent": {
            p: round(100 * w / 1e9 / seconds, 1) if seconds else 0.0
            for p, w in waited_total.items()
        },
        # over the hold and the targeted phase: from the end of the connects to here
        "gateway_gc_pauses": gc_delta(run.gc_before, gc_after),
        "load_average": {"start": load, "end": os.getloadavg()},
    }
    run.series["targeted"] = lat


async def settle(
    gen: LoadGen, target: int, limit: float, stall: float = 10.0, poll: float = 0.02
) -> int:
    """Wait until ``gen`` has ``target`` alert frames in all, or nothing new came for
    ``stall`` seconds (lost, or clients closed: reported, never waited out), or ``limit``."""
    last, since = -1, time.monotonic()
    deadline = since + limit
    while True:
        got = await gen.received()
        now = time.monotonic()
        if got >= target or now > deadline:
            return got
        if got != last:
            last, since = got, now
        elif now - since > stall:
            return got
        await asyncio.sleep(poll)


async def _broadcast_and_sustained(
    run: Run, ceiling_gen: LoadGen, js: Any, names: Names, http: aiohttp.ClientSession
) -> None:
    plan = run.plan
    # Only the broadcast audience stays: idle devices would cost tocsin heartbeats the
    # ceiling does not have.
    await run.gen.close_all()
    d = plan.devices
    tocsin_specs = [run.spec(f"b{i}", "UG", "bench") for i in range(d)]
    ceiling_specs = [run.spec(f"c{i}", "UG", "bench") for i in range(d)]
    res_t = await run.gen.connect(tocsin_specs, concurrency=256, timeout=300)
    res_c = await ceiling_gen.connect(ceiling_specs, concurrency=256, timeout=300)
    run.progress("audience connected", res_t.ok + res_c.ok, 2 * d, force=True)
    sides = {"tocsin": (run.gen, res_t.ok), "ceiling": (ceiling_gen, res_c.ok)}
    bcast: dict[str, list[float]] = {"tocsin": [], "ceiling": []}
    missing = {"tocsin": 0, "ceiling": 0}
    last_device: dict[str, list[float]] = {"tocsin": [], "ceiling": []}

    async def one(side: str) -> None:
        gen, online = sides[side]
        await gen.collect()
        start = await gen.received()
        a = [make_alert("UG-102")]
        sent = (
            await run.publish_tocsin(js, names, a)
            if side == "tocsin"
            else await run.publish_ceiling(http, a)
        )
        missing[side] += max(0, start + online - await settle(gen, start + online, 30))
        got, _ = await _lat(gen, sent)
        bcast[side].extend(got)
        if got:
            last_device[side].append(max(got))

    async def broadcasts() -> None:
        for warm in ("tocsin", "ceiling"):
            await one(warm)
        for kept in (*bcast.values(), *last_device.values()):
            kept.clear()  # the warm-up broadcasts do not count
        order = ["tocsin", "ceiling", "ceiling", "tocsin"]
        for i in range(2 * plan.broadcasts):
            await one(order[i % 4])
            run.progress("broadcast (alternating)", i + 1, 2 * plan.broadcasts)
        run.progress("broadcast (alternating)", 2 * plan.broadcasts, 2 * plan.broadcasts, True)

    await run.phase("broadcast", broadcasts)
    run.results["broadcast"] = {
        side: {
            "devices": sides[side][1],
            "missing": missing[side],
            "connect_failures": (res_t if side == "tocsin" else res_c).failures,
            "latency_ms": summary(bcast[side]),
            "last_device_ms": summary(last_device[side]),
        }
        for side in sides
    }
    p99_t = run.results["broadcast"]["tocsin"]["latency_ms"]["p99"]
    p99_c = run.results["broadcast"]["ceiling"]["latency_ms"]["p99"]
    run.results["broadcast"]["p99_ratio"] = round(p99_t / p99_c, 2) if p99_c else None
    run.series["broadcast"] = bcast

    rates: dict[str, list[float]] = {"tocsin": [], "ceiling": []}
    lost = {"tocsin": 0, "ceiling": 0}
    timelines: dict[str, list[float]] = {}

    async def burst(side: str) -> None:
        gen, online = sides[side]
        await gen.collect()
        start = await gen.received()
        alerts = [make_alert("UG-102") for _ in range(plan.burst)]
        target = online * plan.burst
        t0 = time.monotonic_ns()
        if side == "tocsin":
            sent = await run.publish_tocsin(js, names, alerts)
        else:
            sent = await run.publish_ceiling(http, alerts)
        lost[side] += max(0, start + target - await settle(gen, start + target, 120))
        receipts = await gen.collect()
        recv = [r for a, r in zip(receipts.alert_ids, receipts.recv_ns, strict=True) if a in sent]
        if recv:
            seconds = (max(recv) - t0) / 1e9
            rates[side].append(len(recv) / seconds)
            timelines[side] = [(r - t0) / 1e9 for r in recv]

    async def sustained() -> None:
        order = ["tocsin", "ceiling", "ceiling", "tocsin"]
        total = 2 * plan.bursts
        for i in range(total):
            await burst(order[i % 4])
            run.progress("sustained bursts, acks on", i + 1, total)
        run.progress("sustained bursts, acks on", total, total, force=True)

    await run.phase("sustained", sustained)
    best = {side: max(v) if v else 0.0 for side, v in rates.items()}
    run.results["sustained"] = {
        "alerts_per_burst": plan.burst,
        "deliveries_per_second": {s: [round(x) for x in v] for s, v in rates.items()},
        "best": {s: round(v) for s, v in best.items()},
        "ratio": round(best["tocsin"] / best["ceiling"], 2) if best["ceiling"] else None,
        "missing": lost,
        "closed": {
            "tocsin": (await run.gen.status()).closed,
            "ceiling": (await ceiling_gen.status()).closed,
        },
    }
    run.series["sustained"] = timelines
    await run.gen.close_all()
    await ceiling_gen.close_all()


async def _lat(gen: LoadGen, sent: dict[int, int]) -> tuple[list[float], int]:
    receipts = await gen.collect()
    out, stray = [], 0
    for alert_id, recv in zip(receipts.alert_ids, receipts.recv_ns, strict=True):
        t0 = sent.get(alert_id)
        if t0 is None:
            stray += 1
        else:
            out.append((recv - t0) / 1e6)
    return out, stray


async def _catchup(run: Run, js: Any, names: Names) -> None:
    """In the orchestrator: one device, so the load generator's batching is not in the way."""
    plan = run.plan
    url = f"ws://127.0.0.1:{run.stack.gateway_port}{WS_PATH}"
    first, every = [], []

    async def body() -> None:
        async with aiohttp.ClientSession() as http:
            for i in range(plan.catchup_runs):
                params = {
                    "auth_token": run.token(f"away{i}", "RW"),
                    "client_id": "phone",
                    "ack_mode": "client",
                }
                async with http.ws_connect(url, params=params) as ws:
                    await ws.receive()  # connection_established: the queue exists now
                for _ in range(100):
                    await append_alert(js, names, make_alert("RW-1"))
                t0 = time.perf_counter()
                got = 0
                async with http.ws_connect(url, params=params) as ws:
                    async for msg in ws:
                        frame = orjson.loads(msg.data)
                        if frame["type"] != "alert":
                            continue
                        got += 1
                        if got == 1:
                            first.append((time.perf_counter() - t0) * 1000)
                        await ws.send_str(f'{{"type":"ack","seq":{frame["seq"]}}}')
                        if got == 100:
                            every.append((time.perf_counter() - t0) * 1000)
                            break
                run.progress("catch-up of 100", i + 1, plan.catchup_runs)
        run.progress("catch-up of 100", plan.catchup_runs, plan.catchup_runs, force=True)

    await run.phase("catchup", body)
    run.results["catchup"] = {"first_ms": summary(first), "all_100_ms": summary(every)}


# ---------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    try:
        version = subprocess.run(
            [server_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = "?"
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nats_server": version,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _fmt(summary_: dict[str, float]) -> str:
    return " / ".join(f"{summary_[k]:.1f}" for k in ("p50", "p90", "p99", "max") if k in summary_)


def table(report: dict[str, Any]) -> str:
    r = report["results"]
    c, t = r["connections"], r["targeted"]
    hold = report["plan"]["hold_seconds"]
    held = (
        f"{c['ok']:,} connected, {c['open_after_hold']:,} open after {hold:.0f} s "
        f"({c['failed']} failed, {c['closed_during_hold']} dropped)"
    )
    rows = [("connections, own durable each, held with heartbeats", TARGETS["connections"], held)]
    if "broadcast" in r:  # not in a run of only the targeted phase
        b, s = r["broadcast"], r["sustained"]
        d = b["tocsin"]["devices"]
        bcast = (
            f"tocsin {_fmt(b['tocsin']['latency_ms'])}; ceiling {_fmt(b['ceiling']['latency_ms'])};"
            f" p99 ratio {b['p99_ratio']}; missing {b['tocsin']['missing']} / "
            f"{b['ceiling']['missing']}"
        )
        best = s["best"]
        rate = (
            f"tocsin {best['tocsin']:,}/s; ceiling {best['ceiling']:,}/s; ratio {s['ratio']};"
            f" missing {s['missing']['tocsin']} / {s['missing']['ceiling']}"
        )
        rows += [
            (
                f"broadcast to {d:,}: p50 / p90 / p99 / max ms",
                TARGETS["broadcast_p99_ratio"],
                bcast,
            ),
            (f"sustained deliveries/s to {d:,}, acks on", TARGETS["sustained"], rate),
        ]
    n = t["latency_ms"]["n"]
    rows.append(
        (
            f"targeted alert among {t['online']:,} online ({n:,} alerts): p50 / p90 / p99 / max ms",
            TARGETS["targeted_p99_ms"],
            _fmt(t["latency_ms"]),
        )
    )
    labels = {
        "pub_ack": "publish → PubAck",
        "pub_js": "publish → a JetStream consumer of the orchestrator",
        "js_recv": "that delivery → the device's receipt",
    }
    for key, label in labels.items():
        if key in t.get("parts_ms", {}):
            rows.append(
                (
                    f"targeted, {label}: p50 / p90 / p99 / max ms",
                    "measured",
                    _fmt(t["parts_ms"][key]),
                )
            )
    if "slow" in t:
        rows.append(
            (
                f"targeted alerts over {t['slow_ms']:g} ms",
                "measured",
                f"{len(t['slow'])} of {n}; run-queue wait in the phase, % of its time: "
                + ", ".join(f"{p} {v}" for p, v in t["waited_percent"].items()),
            )
        )
    if t.get("gateway_gc_pauses"):
        rows.append(
            (
                "gateway garbage collections over the hold and the targeted phase",
                "measured",
                "; ".join(
                    f"gen {g}: {v['collections']:.0f} ({v['ms']} ms, {v['over_10_ms']:.0f} "
                    "over 10 ms)"
                    for g, v in t["gateway_gc_pauses"].items()
                ),
            )
        )
    if "catchup" in r:
        rows.append(
            (
                "reconnect catch-up of 100, all received: p50 / p90 / p99 / max ms",
                TARGETS["catchup_ms"],
                _fmt(r["catchup"]["all_100_ms"]),
            )
        )
    rows += [
        (
            "gateway RSS per connection",
            TARGETS["gateway_kib_per_connection"],
            f"{c['gateway_kib_per_connection']} KiB",
        ),
        ("nats-server memory per durable consumer", "measured", f"{c['nats_kib_per_durable']} KiB"),
    ]
    if "scrapes" in r:  # reports written before the scrapes phase have none
        sc = r["scrapes"]
        rows.append(
            (
                f"GET /metrics, {sc['connections']:,} connected: p50 / p90 / p99 / max ms",
                "measured",
                _fmt(sc["metrics_ms"]),
            )
        )
        rows.append(
            (
                f"GET stats, {sc['connections']:,} connected: cold; warm p50 / p99 ms",
                "measured",
                f"{sc['stats_cold_ms']}; {sc['stats_ms']['p50']:.1f} / {sc['stats_ms']['p99']:.1f}",
            )
        )
    if "load_average" in report:
        la = report["load_average"]
        rows.append(
            (
                "load average (1, 5, 15 min) at the start / end of the run",
                "measured",
                " / ".join(", ".join(f"{x:.2f}" for x in la[k]) for k in ("start", "end")),
            )
        )
    lines = ["| scenario | target | measured |", "|---|---|---|"]
    lines += [f"| {a} | {b_} | {m} |" for a, b_, m in rows]
    cpu = report["cpu_percent_of_one_core"]
    procs = sorted({p for row in cpu.values() for p in row} - {"seconds"})
    lines += ["", "CPU per phase, % of one core:", ""]
    lines.append("| phase | seconds | " + " | ".join(procs) + " |")
    lines.append("|---|---|" + "---|" * len(procs))
    for phase, row in cpu.items():
        cells = " | ".join(str(row.get(p, "")) for p in procs)
        lines.append(f"| {phase} | {row['seconds']} | {cells} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], series: dict[str, Any], out_dir: Path) -> None:
    os.makedirs(out_dir, exist_ok=True)
    stem = out_dir / report["name"]
    report["table"] = table(report)
    report["plots"] = plots(series, stem)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    m = report["machine"]
    head = (
        f"# tocsin bench — {report['name']}\n\n"
        f"{m['date']} · {m['cpus']} CPUs ({m['cpu_model']}) · Python {m['python']} · "
        f"{m['nats_server']}\n\n"
    )
    pics = "".join(f"\n![{Path(p).stem}]({Path(p).name})\n" for p in report["plots"])
    stem.with_suffix(".md").write_text(head + report["table"] + "\n" + pics)


def plots(series: dict[str, Any], stem: Path) -> list[str]:
    # An optional dependency (tocsin[bench]): imported by name, so that the package type-
    # checks where it is not installed (cmd_bench says how to add it before a run).
    importlib.import_module("matplotlib").use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    def save(kind: str, fig: Any, ax: Any, xlabel: str, ylabel: str) -> str:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = stem.parent / f"{stem.name}-{kind}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return str(path)

    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in (
        ("tocsin broadcast", series.get("broadcast", {}).get("tocsin", [])),
        ("ceiling broadcast", series.get("broadcast", {}).get("ceiling", [])),
        ("tocsin targeted", series.get("targeted", [])),
    ):
        if values:
            xs = sorted(values)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.set_xscale("log")
    out.append(
        save("latency-cdf", fig, ax, "publish → receive (ms, log)", "fraction of deliveries")
    )

    if not series.get("sustained"):  # a run of only the targeted phase
        return out
    fig, ax = plt.subplots(figsize=(7, 4))
    for side, times in series.get("sustained", {}).items():
        if not times:
            continue
        step = 0.05
        end = max(times)
        bins = [0] * (int(end / step) + 1)
        for x in times:
            bins[int(x / step)] += 1
        ax.plot([i * step for i in range(len(bins))], [b / step for b in bins], label=side)
    out.append(
        save(
            "throughput",
            fig,
            ax,
            "seconds since the first publish of a burst",
            "deliveries/s (50 ms bins)",
        )
    )
    return out
