"""Ownership benchmark: what claiming a device costs per WebSocket handshake
(docs/architecture.md §9).

Run::

    tocsin bench ownership --label new-1 [--devices 200]
    tocsin bench ownership --compare benchmarks/results/ownership-*.json

(or ``python -m tocsin.bench.scenarios.ownership``). It measures the ``tocsin`` it is part
of; the runs of 2026-12-01 compared the code before and after ownership with the script
this module was (``benchmarks/ownership.py`` before it moved here), run under a venv of
each version; ``--compare`` reads their JSON as it reads new ones.

One process: a nats-server of its own (``NatsServer``, loopback, temporary store), the
topology (``apply_topology``), one gateway in this process
(``tocsin.gateway.local.start_local_gateway``: ``create_app`` on an ``AppRunner``/``TCPSite``
at 127.0.0.1, default settings except a namespace and ``checkpoint_seconds=300``, so no
periodic save lands in a phase) and aiohttp WebSocket clients in the same event loop.
After a warm-up of 10 devices, each phase is bounded in count and in time (``--seconds``):

a. **new**: N devices (``--devices``, 200), one after the other: connect, wait for
   ``connection_established``, close, wait until the gateway has let the session go;
b. **known**: the same N devices again;
c. **takeover**: T devices (``--takeovers``, 50): connection A established, then a second
   connection B of the same device; B's time from connect to ``connection_established``
   and to A being closed (4009); then B closes;
d. **concurrent**: rounds of 20 known devices connecting at once (``--rounds``, 10);
e. **backlog**: one alert appended to ``ALERTS`` for all of them, then the N devices again,
   one after the other, each receiving and acking its queued alert before it closes (so the
   close saves a highest-sent sequence, which the two versions do differently).

The handshake time is from ``ws_connect`` to ``connection_established``. NATS traffic is
counted per phase and divided by its handshakes (a handshake = connect and close, so the
close's work is in it). A separate monitoring connection subscribes to ``$JS.API.>`` (one
count per API request, by API name), to the ``DEVICES`` record subjects (record writes are
plain JetStream publishes), to ``tocsin.gateway.>`` (takeover requests of the ownership
code), and, for the record, to ``$JS.ACK.>``, ``$JS.EVENT.>`` and ``_INBOX.>`` (replies).
It does **not** subscribe to ``tocsin.device.>`` (nor to ``>``), where the code before
ownership asks an older connection of the device to leave on every handshake: that request
relies on "no responders" when the device has no connection, and a subscriber there turns
each one into a wait of ``shutdown_grace_seconds`` (10 s; see ``--watch-device-subjects``).
Those requests, and as a cross-check everything else the gateway sends, are counted by a
tap on the gateway's own ``nats.aio.client.Client.publish``.
A phase's counts are read once the gateway has no session and the monitor has seen nothing
new for 100 ms. Before the phases, 2 s of idle traffic are counted as a baseline.

Everything shares the machine's cores with whatever else runs: compare runs made in the
same minutes. Results: stdout and ``benchmarks/results/ownership-<date>-<label>.md``
(under the current directory, or ``--out``) with a JSON twin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.aio.client
import orjson

import tocsin
from tocsin.core.naming import Names
from tocsin.core.topology import apply_topology
from tocsin.gateway.local import LocalGateway, start_local_gateway
from tocsin.ingest.pipeline import append_alert

from . import common
from .common import (
    LocalNats,
    code_version,
    gateway_settings,
    make_alert,
    new_secret,
    out_option,
    percentile,
    progress,
    run_and_write,
    server_version,
    token,
)

GATEWAY_CLIENT = "tocsin-gateway"  # the name create_app gives its NATS connection
CONNECT_TIMEOUT = 20.0  # longer than the default TOCSIN_TAKEOVER_SECONDS (15)
CONCURRENCY = 20
QUIET = 0.1
PHASES = ("new", "known", "takeover", "concurrent", "backlog")


# ---------------------------------------------------------------- counting NATS traffic
def api_name(subject: str) -> str:
    """``$JS.API.CONSUMER.INFO.S.C`` -> ``CONSUMER.INFO``; ``...STREAM.MSG.GET.S`` ->
    ``STREAM.MSG.GET``; ``$JS.API.INFO`` -> ``INFO``."""
    parts = subject.split(".")[2:]
    if (
        len(parts) > 2
        and parts[0] in ("STREAM", "CONSUMER")
        and parts[1]
        in (
            "MSG",
            "DURABLE",
            "LEADER",
            "PEER",
        )
    ):
        return ".".join(parts[:3])
    if len(parts) > 1 and parts[0] in ("STREAM", "CONSUMER", "DIRECT", "ACCOUNT", "META"):
        return ".".join(parts[:2])
    return parts[0] if parts else "?"


@dataclass
class Classifier:
    names: Names

    def __post_init__(self) -> None:
        prefix = f"{self.names.namespace}." if self.names.namespace else ""
        self.records = f"{prefix}tocsin.devices."
        self.device = f"{prefix}tocsin.device."
        self.gateway = f"{prefix}tocsin.gateway."
        self.alerts = f"{prefix}alerts."

    def kind(self, subject: str) -> str:
        if subject.startswith("$JS.API."):
            return f"JS {api_name(subject)}"
        if subject.startswith(self.records):
            return "record write (DEVICES publish)"
        if subject.startswith(self.gateway):
            return "takeover request tocsin.gateway.<instance>"
        if subject.startswith(self.device):
            return "takeover request tocsin.device.<consumer>"
        if subject.startswith("$JS.ACK."):
            return "JS ack"
        if subject.startswith("_INBOX."):
            return "reply (_INBOX)"
        if subject.startswith(self.alerts):  # a pull consumer's delivery keeps its subject
            return "alert delivered to a pull inbox"
        if subject.startswith("$JS.EVENT.ADVISORY."):
            return "advisory " + ".".join(subject.split(".")[3:5])
        return "other " + ".".join(subject.split(".")[:2])

    def is_op(self, kind: str) -> bool:
        """What the gateway asks of NATS (not replies, acks of alerts or advisories)."""
        return kind.startswith(("JS ", "record", "takeover")) and kind != "JS ack"


class Monitor:
    """A NATS connection of its own that counts what it sees, by kind."""

    def __init__(self, url: str, classifier: Classifier, watch_device: bool) -> None:
        self.url = url
        self.classify = classifier
        self.watch_device = watch_device
        self.counts: Counter[str] = Counter()
        self.nc: nats.aio.client.Client | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.url, name="ownership-monitor")
        c = self.classify
        # Not ">": a subscriber of tocsin.device.> is a responder there (module docstring).
        subjects = [
            "$JS.API.>",
            c.records + ">",
            c.gateway + ">",
            "$JS.ACK.>",
            "$JS.EVENT.>",
            "_INBOX.>",
        ]
        if self.watch_device:
            subjects.append(c.device + ">")

        async def seen(msg: Any) -> None:
            self.counts[c.kind(msg.subject)] += 1

        for subject in subjects:
            await self.nc.subscribe(subject, cb=seen, pending_msgs_limit=1_000_000)
        await self.nc.flush()

    async def stop(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


class Tap:
    """Counts every publish of the gateway's NATS connection (``Client.publish`` is what
    requests, JetStream calls and replies of nats-py all end in)."""

    def __init__(self, classifier: Classifier) -> None:
        self.classify = classifier
        self.counts: Counter[str] = Counter()
        self._original: Any = None

    def install(self) -> None:
        original = self._original = nats.aio.client.Client.publish
        tap = self

        async def publish(client: Any, subject: str, *args: Any, **kwargs: Any) -> None:
            if client.options.get("name") == GATEWAY_CLIENT:
                tap.counts[tap.classify.kind(subject)] += 1
            await original(client, subject, *args, **kwargs)

        nats.aio.client.Client.publish = publish  # type: ignore[method-assign, assignment]

    def remove(self) -> None:
        if self._original is not None:
            nats.aio.client.Client.publish = self._original  # type: ignore[method-assign]


# ---------------------------------------------------------------- clients
class Refused(Exception):
    """The socket closed before ``connection_established``."""


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "mean": sum(values) / len(values) if values else math.nan,
    }


@dataclass
class Bench:
    gateway: LocalGateway
    http: aiohttp.ClientSession
    monitor: Monitor
    tap: Tap
    seconds: float
    secret: str
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.gateway.ws_url

    def token(self, sub: str) -> str:
        if sub not in self.tokens:
            self.tokens[sub] = token(self.secret, sub, ("KE",))
        return self.tokens[sub]

    async def handshake(self, sub: str) -> tuple[aiohttp.ClientWebSocketResponse, float]:
        """Connect as device ``(sub, phone)``: the socket and ms to ``connection_established``."""
        params = {"auth_token": self.token(sub), "client_id": "phone", "ack_mode": "client"}
        start = time.perf_counter()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            ws = await self.http.ws_connect(self.url, params=params, autoping=True)
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    if orjson.loads(msg.data).get("type") == "connection_established":
                        return ws, (time.perf_counter() - start) * 1000
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    await ws.close()
                    raise Refused(f"closed {ws.close_code} before connection_established")

    def gateway_idle(self) -> bool:
        gw = self.gateway.gw
        owners = getattr(gw, "owners", None)  # the ownership code only
        return not gw.sessions and not (owners is not None and owners.holders)

    async def until_idle(self, timeout: float = 15.0) -> float:
        """Wait until the gateway let every session go: ms waited."""
        start = time.perf_counter()
        deadline = start + timeout
        while not self.gateway_idle():
            if time.perf_counter() > deadline:
                raise TimeoutError("the gateway still holds sessions")
            await asyncio.sleep(0.001)
        return (time.perf_counter() - start) * 1000

    async def settle(self) -> tuple[Counter[str], Counter[str]]:
        """Copies of both counters once the monitor has seen nothing new for QUIET s."""
        assert self.monitor.nc is not None
        deadline = time.monotonic() + 3
        last = -1
        while time.monotonic() < deadline:
            await self.monitor.nc.flush()
            total = sum(self.monitor.counts.values()) + sum(self.tap.counts.values())
            if total == last:
                break
            last = total
            await asyncio.sleep(QUIET)
        return Counter(self.monitor.counts), Counter(self.tap.counts)

    async def cycle(self, sub: str, alert: bool = False) -> tuple[float, float, float]:
        """Connect, established, [the queued alert, acked,] close, gateway idle: (handshake
        ms, ms to the alert, close-to-idle ms)."""
        start = time.perf_counter()
        ws, ms = await self.handshake(sub)
        to_alert = math.nan
        if alert:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                while True:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        await ws.close()
                        raise Refused(f"closed {ws.close_code} before the queued alert")
                    frame = orjson.loads(msg.data)
                    if frame.get("type") == "alert":
                        to_alert = (time.perf_counter() - start) * 1000
                        await ws.send_str(
                            orjson.dumps({"type": "ack", "seq": frame["seq"]}).decode()
                        )
                        break
        start = time.perf_counter()
        await ws.close()
        await self.until_idle()
        return ms, to_alert, (time.perf_counter() - start) * 1000


@dataclass
class Phase:
    name: str
    handshakes: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    times: dict[str, list[float]] = field(default_factory=dict)
    monitor: Counter[str] = field(default_factory=Counter)
    tap: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None
    seconds: float = 0.0

    def add(self, what: str, value: float) -> None:
        self.times.setdefault(what, []).append(value)

    def fail(self, exc: BaseException) -> None:
        self.failed += 1
        self.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1

    def result(self, classify: Classifier, per: int) -> dict[str, Any]:
        per = max(per, 1)
        seen = dict(self.monitor)
        device_kind = classify.kind(classify.device + "x")
        if device_kind not in seen and self.tap.get(device_kind):
            seen[device_kind] = self.tap[device_kind]  # not watched: the tap's count
        ops = {k: v for k, v in seen.items() if classify.is_op(k)}
        shared = {k for k in self.tap if classify.is_op(k) and k in self.monitor}
        return {
            "handshakes": self.handshakes,
            "counted_per": per,
            "failed": self.failed,
            "errors": dict(self.errors),
            "stopped": self.stopped,
            "seconds": round(self.seconds, 2),
            "ms": {k: summary(v) for k, v in self.times.items()},
            "ops_total": dict(sorted(ops.items())),
            "ops_per_handshake": {k: v / per for k, v in sorted(ops.items())},
            "ops_sum_per_handshake": sum(ops.values()) / per,
            "other_seen": {k: v for k, v in sorted(seen.items()) if not classify.is_op(k)},
            "tap_per_handshake": {k: v / per for k, v in sorted(self.tap.items())},
            "tap_agrees": all(self.tap[k] == self.monitor[k] for k in shared),
            **self.extra,
        }


def delta(after: Counter[str], before: Counter[str]) -> Counter[str]:
    out = Counter(after)
    out.subtract(before)
    return Counter({k: v for k, v in out.items() if v})


async def counted(bench: Bench, phase: Phase, body: Callable[[], Any]) -> None:
    """Run ``body`` and put the traffic it caused into ``phase``."""
    m0, t0 = await bench.settle()
    start = time.perf_counter()
    try:
        await body()
    finally:
        with contextlib.suppress(TimeoutError):
            await bench.until_idle()
        phase.seconds += time.perf_counter() - start
        m1, t1 = await bench.settle()
        phase.monitor += delta(m1, m0)
        phase.tap += delta(t1, t0)


async def sequential(bench: Bench, phase: Phase, subs: list[str], alert: bool = False) -> None:
    deadline = time.monotonic() + bench.seconds

    async def body() -> None:
        for sub in subs:
            if time.monotonic() > deadline:
                phase.stopped = f"time budget {bench.seconds:.0f} s"
                return
            try:
                ms, to_alert, leave = await bench.cycle(sub, alert)
            except (Refused, TimeoutError, aiohttp.ClientError) as exc:
                phase.fail(exc)
                with contextlib.suppress(TimeoutError):
                    await bench.until_idle()
                continue
            phase.handshakes += 1
            phase.add("handshake", ms)
            if alert:
                phase.add("to the queued alert", to_alert)
            phase.add("close to released", leave)

    await counted(bench, phase, body)


async def takeovers(bench: Bench, phase: Phase, subs: list[str]) -> None:
    """A established, then B of the same device: B's handshake and A's close."""
    deadline = time.monotonic() + bench.seconds
    codes: Counter[str] = Counter()
    window_monitor: Counter[str] = Counter()
    window_tap: Counter[str] = Counter()

    async def watch(ws: aiohttp.ClientWebSocketResponse, start: list[float]) -> float:
        async for _ in ws:
            pass
        return (time.perf_counter() - start[0]) * 1000

    async def body() -> None:
        nonlocal window_monitor, window_tap
        for sub in subs:
            if time.monotonic() > deadline:
                phase.stopped = f"time budget {bench.seconds:.0f} s"
                return
            first: aiohttp.ClientWebSocketResponse | None = None
            closed: asyncio.Task[float] | None = None
            try:
                first, _ = await bench.handshake(sub)
                start = [math.inf]
                closed = asyncio.create_task(watch(first, start))
                m0, t0 = await bench.settle()  # A's own record writes are not the takeover's
                start[0] = time.perf_counter()
                second, ms = await bench.handshake(sub)
                replaced = await asyncio.wait_for(closed, CONNECT_TIMEOUT)
                codes[str(first.close_code)] += 1
                m1, t1 = await bench.settle()
                window_monitor += delta(m1, m0)
                window_tap += delta(t1, t0)
                await second.close()
                await bench.until_idle()
            except (Refused, TimeoutError, aiohttp.ClientError) as exc:
                phase.fail(exc)
                if closed is not None:
                    closed.cancel()
                if first is not None:
                    await first.close()
                with contextlib.suppress(TimeoutError):
                    await bench.until_idle()
                continue
            phase.handshakes += 1
            phase.add("handshake", ms)
            phase.add("to the first closed", replaced)

    await counted(bench, phase, body)
    per = max(phase.handshakes, 1)
    classify = bench.monitor.classify
    seen = dict(window_monitor)
    device_kind = classify.kind(classify.device + "x")
    if device_kind not in seen and window_tap.get(device_kind):
        seen[device_kind] = window_tap[device_kind]
    window_ops = {k: v for k, v in seen.items() if classify.is_op(k)}
    phase.extra["first_close_codes"] = dict(codes)
    phase.extra["window_ops_per_takeover"] = {k: v / per for k, v in sorted(window_ops.items())}
    phase.extra["window_ops_sum_per_takeover"] = sum(window_ops.values()) / per


async def concurrent(bench: Bench, phase: Phase, subs: list[str], rounds: int) -> None:
    deadline = time.monotonic() + bench.seconds

    async def one(sub: str) -> None:
        try:
            ws, ms = await bench.handshake(sub)
        except (Refused, TimeoutError, aiohttp.ClientError) as exc:
            phase.fail(exc)
            return
        phase.handshakes += 1
        phase.add("handshake", ms)
        await ws.close()

    async def body() -> None:
        for r in range(rounds):
            if time.monotonic() > deadline:
                phase.stopped = f"time budget {bench.seconds:.0f} s"
                return
            batch = [subs[(r * CONCURRENCY + k) % len(subs)] for k in range(CONCURRENCY)]
            start = time.perf_counter()
            await asyncio.gather(*(one(s) for s in dict.fromkeys(batch)))
            phase.add("round, all established", (time.perf_counter() - start) * 1000)
            with contextlib.suppress(TimeoutError):
                await bench.until_idle()

    await counted(bench, phase, body)


# ---------------------------------------------------------------- the run
def package_version() -> dict[str, Any]:
    """Which tocsin this is: where it lives, its commit, and a digest of its sources."""
    root = Path(tocsin.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "package": str(root),
        "commit": code_version(),
        "sources_sha256": digest.hexdigest()[:16],
        "ownership": importlib.util.find_spec("tocsin.gateway.ownership") is not None,
    }


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "nats_server": server_version(),
        "nats_py": importlib.metadata.version("nats-py"),
        "aiohttp": importlib.metadata.version("aiohttp"),
        "cores": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0],
        **package_version(),
    }


@dataclass(frozen=True)
class Options:
    label: str = "run"
    devices: int = 200  # N, phases a and b
    takeovers: int = 50  # T, phase c (at most N)
    rounds: int = 10  # rounds of CONCURRENCY at once; 0: none
    seconds: float = 120  # time budget per phase
    namespace: str = "bench"
    watch_device_subjects: bool = False
    warmup: int = 10  # devices of the warm-up, twice each


async def run(opts: Options) -> dict[str, Any]:
    names = Names(opts.namespace)
    classify = Classifier(names)
    env = environment()
    phases = {name: Phase(name) for name in PHASES}
    idle: dict[str, int] = {}
    secret = new_secret()
    with LocalNats("tocsin-ownership-") as server:
        monitor = Monitor(server.url, classify, opts.watch_device_subjects)
        tap = Tap(classify)
        gateway: LocalGateway | None = None
        http: aiohttp.ClientSession | None = None
        try:
            settings = gateway_settings(
                server.url, opts.namespace, secret, server.dir / "data", checkpoint_seconds=300
            )
            await monitor.start()
            assert monitor.nc is not None
            await apply_topology(monitor.nc.jetstream(), settings, names)
            tap.install()  # before the gateway connects: its connection's publishes count
            gateway = await start_local_gateway(settings)
            http = aiohttp.ClientSession()
            bench = Bench(gateway, http, monitor, tap, opts.seconds, secret)

            warm = Phase("warm-up")
            await sequential(bench, warm, [f"warm{i}" for i in range(opts.warmup)])
            await sequential(bench, warm, [f"warm{i}" for i in range(opts.warmup)])
            if warm.failed:
                raise RuntimeError(f"warm-up failed: {dict(warm.errors)}")

            m0, _ = await bench.settle()
            await asyncio.sleep(2)
            m1, _ = await bench.settle()
            idle = dict(delta(m1, m0))

            devices = [f"dev{i:05d}" for i in range(opts.devices)]
            progress("new devices, one after the other")
            await sequential(bench, phases["new"], devices)
            progress("the same devices again")
            await sequential(bench, phases["known"], devices)
            progress("takeovers")
            await takeovers(bench, phases["takeover"], devices[: opts.takeovers])
            if opts.rounds:
                progress(f"{CONCURRENCY} concurrent handshakes x {opts.rounds}")
                await concurrent(bench, phases["concurrent"], devices, opts.rounds)
            progress("one alert queued for every device, then the same devices again")
            await append_alert(monitor.nc.jetstream(), names, make_alert("KE-30"))
            await sequential(bench, phases["backlog"], devices, alert=True)
        finally:
            if http is not None:
                await http.close()
            if gateway is not None:
                await gateway.stop()
            tap.remove()
            await monitor.stop()
    env["loadavg_end"] = os.getloadavg()[0]
    results = {}
    for name, phase in phases.items():
        if name == "concurrent" and not opts.rounds:
            continue
        results[name] = phase.result(classify, phase.handshakes)
    return {
        "label": opts.label,
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "environment": env,
        "parameters": {
            "devices": opts.devices,
            "takeovers": opts.takeovers,
            "concurrent": CONCURRENCY,
            "rounds": opts.rounds,
            "seconds_per_phase": opts.seconds,
            "namespace": opts.namespace,
            "checkpoint_seconds": 300,
            "watch_device_subjects": opts.watch_device_subjects,
        },
        "idle_2s": idle,
        "phases": results,
    }


# ---------------------------------------------------------------- output
def fmt(value: float, digits: int = 1) -> str:
    return common.fmt(float(value), digits, nan="—")


def report(data: dict[str, Any]) -> str:
    env, par, phases = data["environment"], data["parameters"], data["phases"]
    lines = [
        f"# tocsin ownership benchmark: {data['label']}, {data['date']}",
        "",
        f"tocsin at `{env['package']}` (commit {env['commit']}, sources "
        f"{env['sources_sha256']}, ownership module: {env['ownership']}); "
        f"{env['nats_server']}; nats-py {env['nats_py']}; aiohttp {env['aiohttp']}; "
        f"Python {env['python']}; {env['cores']} cores, load average "
        f"{env['loadavg_start']:.2f} → {env['loadavg_end']:.2f}. One gateway in-process with "
        f"its clients, nats-server on loopback. N = {par['devices']}, "
        f"T = {par['takeovers']} takeovers, {par['rounds']} rounds of "
        f"{par['concurrent']} concurrent handshakes.",
        "",
        "## Handshake, ms (connect → connection_established)",
        "",
        "| phase | n | failed | p50 | p90 | p99 | max | mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ph in phases.items():
        for what, s in ph["ms"].items():
            label = name if what == "handshake" else f"{name}: {what}"
            failed = ph["failed"] if what == "handshake" else ""
            lines.append(
                f"| {label} | {s['n']} | {failed} | {fmt(s['p50'])} | {fmt(s['p90'])} | "
                f"{fmt(s['p99'])} | {fmt(s['max'])} | {fmt(s['mean'])} |"
            )
    stops = [f"{n}: {p['stopped']}" for n, p in phases.items() if p["stopped"]]
    errors = [f"{n}: {p['errors']}" for n, p in phases.items() if p["errors"]]
    if stops or errors:
        lines += ["", "Stopped early / errors: " + "; ".join(stops + errors)]
    if "takeover" in phases:
        lines += ["", f"First connection's close codes: {phases['takeover']['first_close_codes']}"]
    kinds = sorted({k for p in phases.values() for k in p["ops_per_handshake"]})
    header = list(phases)
    lines += [
        "",
        "## NATS operations per handshake (connect + close), by kind",
        "",
        "| kind | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(header),
    ]
    for kind in kinds:
        row = [fmt(phases[p]["ops_per_handshake"].get(kind, 0.0), 2) for p in header]
        lines.append(f"| {kind} | " + " | ".join(row) + " |")
    lines.append(
        "| **all** | "
        + " | ".join(f"**{fmt(phases[p]['ops_sum_per_handshake'], 2)}**" for p in header)
        + " |"
    )
    if "takeover" in phases:
        t = phases["takeover"]
        lines += [
            "",
            "Takeover window only (second connect until it is established and the first is "
            f"closed): {fmt(t['window_ops_sum_per_takeover'], 2)} operations per takeover: "
            + ", ".join(f"{k} {v:.2f}" for k, v in t["window_ops_per_takeover"].items()),
        ]
    unseen = sorted(
        {k for p in phases.values() for k in p["tap_per_handshake"]}
        - {k for p in phases.values() for k in p["ops_per_handshake"]}
        - {k for p in phases.values() for k in p["other_seen"]}
    )
    lines += [
        "",
        "Seen besides (per handshake, not operations): "
        + "; ".join(
            f"{n}: "
            + (
                ", ".join(
                    f"{k} {v / max(p['counted_per'], 1):.2f}" for k, v in p["other_seen"].items()
                )
                or "nothing"
            )
            for n, p in phases.items()
        )
        + ". Sent by the gateway and not watched by the monitor: "
        + (", ".join(unseen) or "nothing")
        + ".",
    ]
    lines += [
        "",
        f"Idle 2 s before the phases: {data['idle_2s'] or 'nothing'}. Tap on the gateway's "
        "publishes agrees with the monitor on every kind both see: "
        + ", ".join(f"{n} {p['tap_agrees']}" for n, p in phases.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def compare(paths: list[Path]) -> str:
    """Before/after tables of runs labelled ``old*`` and ``new*``, in the order given."""
    runs = [json.loads(p.read_text()) for p in paths]
    old = [r for r in runs if r["label"].startswith("old")]
    new = [r for r in runs if r["label"].startswith("new")]
    if not old or not new:
        raise SystemExit("--compare needs runs labelled old* and new*")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    lines = [
        "| phase | old p50 | new p50 | ratio | old p99 | new p99 | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in PHASES:
        for what in (
            "handshake",
            "to the queued alert",
            "close to released",
            "to the first closed",
        ):
            cells = []
            for stat in ("p50", "p99"):
                o = [
                    r["phases"][phase]["ms"][what][stat]
                    for r in old
                    if phase in r["phases"] and what in r["phases"][phase]["ms"]
                ]
                n = [
                    r["phases"][phase]["ms"][what][stat]
                    for r in new
                    if phase in r["phases"] and what in r["phases"][phase]["ms"]
                ]
                if not o or not n:
                    break
                cells += [
                    " / ".join(fmt(v) for v in o),
                    " / ".join(fmt(v) for v in n),
                    f"{mean(n) / mean(o):.2f}×",
                ]
            if cells:
                label = phase if what == "handshake" else f"{phase}: {what}"
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| kind | " + " | ".join(f"{p} old → new" for p in PHASES) + " |"]
    lines.append("|---|" + "---:|" * len(PHASES))
    kinds = sorted({k for r in runs for p in r["phases"].values() for k in p["ops_per_handshake"]})

    def per(group: list[dict[str, Any]], phase: str, kind: str | None) -> str:
        values = []
        for r in group:
            p = r["phases"].get(phase)
            if p is not None:
                values.append(
                    p["ops_sum_per_handshake"]
                    if kind is None
                    else p["ops_per_handshake"].get(kind, 0.0)
                )
        return " / ".join(f"{v:.2f}" for v in values) if values else "—"

    for kind in [*kinds, None]:
        cells = [f"{per(old, p, kind)} → {per(new, p, kind)}" for p in PHASES]
        lines.append(f"| {kind or '**all**'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Ownership benchmark: what claiming a device costs per WebSocket "
        "handshake, in time and NATS operations (docs/benchmarks.md#ownership).",
    )
    d = Options()
    parser.add_argument("--label", default=d.label, help="old*/new*: ends up in the file names")
    parser.add_argument("--devices", type=int, default=d.devices, help="N, phases a and b")
    parser.add_argument("--takeovers", type=int, default=d.takeovers, help="T, phase c (at most N)")
    parser.add_argument(
        "--rounds", type=int, default=d.rounds, help=f"rounds of {CONCURRENCY} at once; 0: none"
    )
    parser.add_argument("--seconds", type=float, default=d.seconds, help="time budget per phase")
    parser.add_argument("--namespace", default=d.namespace)
    out_option(parser)
    parser.add_argument(
        "--watch-device-subjects",
        action="store_true",
        help="let the monitor subscribe to tocsin.device.> too (distorts the old code)",
    )
    parser.add_argument("--compare", type=Path, nargs="+", help="JSON results: print tables")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return 0
    if args.devices < 1 or args.devices > 100_000:
        parser.error("--devices: 1 to 100,000")
    opts = Options(
        label=args.label,
        devices=args.devices,
        takeovers=max(0, min(args.takeovers, args.devices)),
        rounds=max(0, min(args.rounds, 1000)),
        seconds=args.seconds,
        namespace=args.namespace,
        watch_device_subjects=args.watch_device_subjects,
    )
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return run_and_write(
        run(opts),
        lambda data, _when: report(data),
        args.out,
        lambda when: f"ownership-{when.date().isoformat()}-{opts.label}",
    )


if __name__ == "__main__":
    sys.exit(main())
