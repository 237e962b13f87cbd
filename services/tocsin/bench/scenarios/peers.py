"""tocsin beside what a team would otherwise run: Socket.IO 4 on Node.js, and the ceiling.

Three servers, each its own process on loopback, measured from ``/proc``: tocsin (one
``tocsin gateway`` process and nats-server: every server process of it), a Socket.IO 4.8
server on Node.js (``bench/socketio/server.js``: websocket transport, connection-state
recovery on, installed with ``npm ci`` on first use; skipped, and said so, without node),
and the ceiling (a bare aiohttp broadcaster, ``bench/ceiling.py``). The same load
generator drives all three: its clients speak tocsin's protocol to tocsin and the
ceiling, and Engine.IO v4 (open ``0{...}``, ping ``2`` / pong ``3``, events ``42[...]``)
to Socket.IO. Two client profiles: ``plain`` offers no compression; ``deflate`` offers
permessage-deflate in every handshake, as browsers do (each server decides whether to
accept; the table says how many did).

Per profile, D devices on each server, the servers taking turns in every phase:

* **connect**: D fresh devices (for tocsin each gets its own durable queue), time until
  all are established, and each server's RSS after minus before, per connection; tocsin
  again with the same D devices returning (after they closed);
* **broadcast**: K alerts one at a time per server, each waiting for every device,
  alternating T S C C S T ...; publish → receipt latency;
* **burst**: M alerts at once, clients acking (one cumulative ack per read, a Socket.IO
  ``ack`` event to the peer); deliveries/s until the last device has the last alert, and
  the server's CPU per delivery (from before the publish to the last receipt);
* **paced**: P broadcasts one second apart per server; the server's CPU over those P
  seconds and one more, per broadcast (what a broadcast costs with all it sets off later);
* **idle**: right after, with D devices held and nothing sent, each server's CPU over
  ``--idle`` seconds (tocsin's include the saves its devices' acks call for); with
  ``--settled S``, again from S seconds after the traffic, once those saves are done.

Timestamps: ``CLOCK_MONOTONIC`` in the publisher and in the clients (one clock).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats

from tocsin.core.naming import Names
from tocsin.core.supervisor import Child, free_port, port_open, stop_all
from tocsin.ingest.pipeline import append_alert
from tocsin.schemas import Alert

from .. import peers as peer
from ..loadgen import ClientSpec, LoadGen
from ..procs import Stack, Usage, usage
from ..run import make_alert, settle, summary
from .common import code_version, fmt, out_option, parse_sets, progress, run_and_write, set_option

WS_PATH = "/api/v1/alerts/ws"
HEARTBEAT = 15.0  # tocsin's and the ceiling's pings, Socket.IO's pingInterval
PROFILES = ("plain", "deflate")
REGION = "UG"


@dataclass
class Side:
    name: str  # tocsin, socketio, ceiling
    port: int
    gen: LoadGen
    pids: dict[str, int]  # every server process of it
    post: str | None  # the broadcast URL; None: tocsin (published to JetStream)
    online: int = 0
    out: dict[str, Any] = field(default_factory=dict)

    def usage(self) -> dict[str, Usage]:
        return {name: usage(pid) for name, pid in self.pids.items()}


class OpCounter:
    """A NATS connection of its own counting what the gateway asks of NATS, by kind
    (``$JS.API`` requests, record writes, slot writes): --connect-only's operations per
    connect. A copy of each reaches this subscriber too, for the runs compared alike."""

    def __init__(self, url: str, names: Names) -> None:
        from .ownership import Classifier

        self.url = url
        self.classify = Classifier(names)
        self.guard = f"$KV.{names.guard_bucket}."
        self.counts: Counter[str] = Counter()
        self.nc: Any = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.url, name="peers-ops")
        c = self.classify

        async def seen(msg: Any) -> None:
            if msg.subject.startswith(self.guard):
                removal = msg.headers and "KV-Operation" in msg.headers
                kind = f"slot {'purge marker' if removal else 'write'} ($KV GUARD publish)"
            else:
                kind = c.kind(msg.subject)
            self.counts[kind] += 1

        # Not tocsin.gateway.>: a subscriber there would answer takeovers' "no responders".
        for subject in ("$JS.API.>", c.records + ">", self.guard + "conn.>"):
            await self.nc.subscribe(subject, cb=seen, pending_msgs_limit=10_000_000)
        await self.nc.flush()

    async def snapshot(self) -> Counter[str]:
        assert self.nc is not None
        await self.nc.flush(timeout=30)
        await asyncio.sleep(0.1)  # the callbacks of what the flush let through
        return Counter(self.counts)

    async def stop(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


def cpu_between(a: dict[str, Usage], b: dict[str, Usage]) -> dict[str, float]:
    """CPU seconds of each process from ``a`` to ``b``."""
    return {p: b[p].cpu_seconds - a[p].cpu_seconds for p in a if p in b}


@dataclass
class Options:
    devices: int
    broadcasts: int
    burst: int
    bursts: int
    paced: int
    idle: float
    settled: float  # 0: no second idle window; else it starts this long after the traffic
    profiles: tuple[str, ...]
    gateway_env: dict[str, str]
    gateway_code: Path | None
    connect_only: bool = False  # tocsin's fresh and returning connects, NATS operations counted


class Peers:
    def __init__(self, o: Options) -> None:
        self.o = o
        self.results: dict[str, Any] = {
            "code": code_version(),
            "gateway_code": str(o.gateway_code) if o.gateway_code else "this tree",
            "node": peer.node_version(),
            "devices": o.devices,
            "heartbeat_seconds": HEARTBEAT,
            "gateway_settings": o.gateway_env,
            "load_before": os.getloadavg(),
            "connect_only": o.connect_only,
            "profiles": {},
        }

    async def run(self) -> dict[str, Any]:
        for profile in self.o.profiles:  # each on fresh servers: memory is not reused
            self.results["profiles"][profile] = await self.profile(profile)
        self.results["load_after"] = os.getloadavg()
        return self.results

    async def profile(self, profile: str) -> dict[str, Any]:
        o = self.o
        env = dict(o.gateway_env)
        if o.gateway_code is not None:
            env["PYTHONPATH"] = str(o.gateway_code)
        stack = Stack(
            heartbeat=HEARTBEAT,
            max_devices=o.devices + 1000,
            max_inflight=64,
            extra_env=env,
        )
        sio: Child | None = None
        gens: list[LoadGen] = []
        try:
            progress(f"peers [{profile}]: starting nats-server, gateway, ceiling, Socket.IO")
            stack.start()
            try:
                if o.connect_only:
                    raise peer.PeerUnavailable("--connect-only")
                folder = peer.prepare()
                sio_port = free_port()
                sio = Child(
                    "socketio",
                    peer.command(folder, "127.0.0.1", sio_port, HEARTBEAT),
                    dict(os.environ),
                    stack.dir / "socketio.log",
                ).start()
                sio.wait_ready(lambda: port_open("127.0.0.1", sio_port), 30, "listening")
            except peer.PeerUnavailable as exc:
                self.results["socketio_skipped"] = str(exc)
                progress(f"peers: Socket.IO skipped: {exc}")
            pids = stack.pids()
            sides = [
                Side(
                    "tocsin",
                    stack.gateway_port,
                    LoadGen("127.0.0.1", stack.gateway_port),
                    {"gateway": pids["gateway"], "nats-server": pids["nats-server"]},
                    None,
                )
            ]
            if sio is not None and sio.pid is not None:
                sides.append(
                    Side(
                        "socketio",
                        sio_port,
                        LoadGen("127.0.0.1", sio_port),
                        {"node": sio.pid},
                        f"http://127.0.0.1:{sio_port}/broadcast",
                    )
                )
            sides.append(
                Side(
                    "ceiling",
                    stack.ceiling_port,
                    LoadGen("127.0.0.1", stack.ceiling_port),
                    {"ceiling": pids["ceiling"]},
                    f"{stack.ceiling_http}/broadcast",
                )
            )
            if o.connect_only:
                sides = sides[:1]
            for s in sides:
                gens.append(s.gen)
                await s.gen.start()
            nc = await nats.connect(stack.nats.url if stack.nats else "")
            try:
                async with aiohttp.ClientSession() as http:
                    run = ProfileRun(self, stack, sides, profile, nc.jetstream(), http)
                    return await run.run()
            finally:
                await nc.close()
        finally:
            for g in gens:
                await g.stop()
            if sio is not None:
                stop_all([sio], 10)
            stack.stop()


class ProfileRun:
    def __init__(
        self,
        bench: Peers,
        stack: Stack,
        sides: list[Side],
        profile: str,
        js: Any,
        http: aiohttp.ClientSession,
    ) -> None:
        self.o = bench.o
        self.stack = stack
        self.sides = sides
        self.profile = profile
        self.js = js
        self.names = Names(stack.namespace)
        self.http = http
        self.ops: OpCounter | None = None
        self._specs: dict[str, list[ClientSpec]] = {}
        for s in sides:
            s.out = {}

    def specs(self, side: Side) -> list[ClientSpec]:
        """The same specs every time a side connects: a returning device presents the token
        it connected with before, as a real one does within its token's lifetime."""
        if side.name not in self._specs:
            self._specs[side.name] = self._new_specs(side)
        return self._specs[side.name]

    def _new_specs(self, side: Side) -> list[ClientSpec]:
        deflate = self.profile == "deflate"
        if side.name == "socketio":
            spec = ClientSpec(peer.WS_PATH, engineio=True, deflate=deflate)
            return [spec] * self.o.devices
        out = []
        for i in range(self.o.devices):
            tok = self.stack_token(f"{self.profile}-{side.name}-{i}")
            query = f"auth_token={tok}&client_id=bench&ack_mode=client"
            out.append(ClientSpec(f"{WS_PATH}?{query}", deflate=deflate))
        return out

    def stack_token(self, user: str) -> str:
        from tocsin.core.auth import mint_token

        return mint_token(self.stack.secret, user, regions=[REGION], ttl_seconds=24 * 3600)

    def order(self, n: int) -> list[Side]:
        """T S C C S T ...: every server as often first as last."""
        forward = self.sides
        pattern = [*forward, *reversed(forward)]
        return [pattern[i % len(pattern)] for i in range(n)]

    async def publish(self, side: Side, alerts: list[Alert]) -> dict[int, int]:
        if side.post is None:
            sent = {}
            for a in alerts:
                sent[int(a.alert_id)] = time.monotonic_ns()
                await append_alert(self.js, self.names, a)
            return sent
        sent = {int(a.alert_id): time.monotonic_ns() for a in alerts}
        if len(alerts) == 1:
            url, body = side.post, alerts[0].model_dump_json().encode()
        else:
            url = f"{side.post}?count={len(alerts)}"
            body = b"[" + b",".join(a.model_dump_json().encode() for a in alerts) + b"]"
        async with self.http.post(url, data=body) as r:
            r.raise_for_status()
            await r.read()
        return sent

    async def run(self) -> dict[str, Any]:
        o = self.o
        progress(f"peers [{self.profile}]: connecting {o.devices} devices to each server")
        for side in self.sides:
            await self.connect(side, "connect")
        tocsin = self.sides[0]
        # Returning devices: each has its queue and record now.
        await self.close(tocsin, "close")
        await self.connect(tocsin, "returning", rss=False)
        if o.connect_only:
            await self.close(tocsin, "close_returning")
            if self.ops is not None:
                await self.ops.stop()
            return {tocsin.name: tocsin.out}
        progress(f"peers [{self.profile}]: broadcasts")
        await self.broadcasts()
        progress(f"peers [{self.profile}]: bursts")
        await self.bursts()
        progress(f"peers [{self.profile}]: paced broadcasts")
        await self.paced()
        progress(f"peers [{self.profile}]: idle")
        await self.idle()
        out = {}
        for side in self.sides:
            side.out["closed"] = (await side.gen.status()).closed
            await side.gen.close_all()
            out[side.name] = side.out
        await asyncio.sleep(1.0)
        return out

    async def connect(self, side: Side, key: str, rss: bool = True) -> None:
        specs = self.specs(side)
        counting = self.o.connect_only and side.name == "tocsin"
        if counting and self.ops is None:
            self.ops = OpCounter(self.stack.nats.url if self.stack.nats else "", self.names)
            await self.ops.start()
        ops_before = await self.ops.snapshot() if counting and self.ops else None
        before = side.usage()
        t0 = time.monotonic()
        res = await side.gen.connect(specs, concurrency=256, timeout=300)
        seconds = time.monotonic() - t0
        await asyncio.sleep(0.5)
        after = side.usage()
        side.online = res.ok
        status = await side.gen.status()
        side.out[key] = {
            "ok": res.ok,
            "failures": res.failures,
            "seconds": round(seconds, 2),
            "per_second": round(res.ok / seconds, 1) if seconds else None,
            "handshake_ms": summary(res.established_ms),
            "cpu_seconds": {p: round(c, 2) for p, c in cpu_between(before, after).items()},
        }
        if ops_before is not None and self.ops is not None:
            # The handshakes' operations; a close's are counted at the next connect's start.
            ops = await self.ops.snapshot() - ops_before
            side.out[key]["nats_ops"] = dict(sorted(ops.items()))
            side.out[key]["nats_ops_per_connect"] = round(ops.total() / max(1, res.ok), 2)
        if rss:
            side.out["rss_kib_per_connection"] = {
                p: round((after[p].rss_bytes - before[p].rss_bytes) / 1024 / max(1, res.ok), 1)
                for p in after
            }
            side.out["rss_mib"] = {p: round(u.rss_bytes / 2**20, 1) for p, u in after.items()}
            side.out["deflate_accepted"] = status.deflate_accepted

    async def close(self, side: Side, key: str) -> None:
        """Every device of ``side`` closes; in --connect-only, what the closes cost."""
        counting = self.ops is not None and side.name == "tocsin"
        ops_before = await self.ops.snapshot() if counting and self.ops else None
        before = side.usage()
        await side.gen.close_all()
        await asyncio.sleep(1.0)
        if ops_before is None or self.ops is None:
            return
        # The gateway saves and lets go after the socket closed: wait until it is quiet.
        for _ in range(30):
            a = await self.ops.snapshot()
            await asyncio.sleep(0.5)
            if (await self.ops.snapshot()).total() == a.total():
                break
        after = side.usage()
        ops = await self.ops.snapshot() - ops_before
        side.out[key] = {
            "cpu_seconds": {p: round(c, 2) for p, c in cpu_between(before, after).items()},
            "nats_ops": dict(sorted(ops.items())),
            "nats_ops_per_connect": round(ops.total() / max(1, side.online), 2),
        }

    async def broadcasts(self) -> None:
        lat: dict[str, list[float]] = {s.name: [] for s in self.sides}
        missing = dict.fromkeys(lat, 0)

        async def one(side: Side, keep: bool) -> None:
            await side.gen.collect()
            start = await side.gen.received()
            sent = await self.publish(side, [make_alert(f"{REGION}-102")])
            got = await settle(side.gen, start + side.online, 30)
            missing[side.name] += max(0, start + side.online - got)
            receipts = await side.gen.collect()
            if keep:
                lat[side.name] += [
                    (r - sent[a]) / 1e6
                    for a, r in zip(receipts.alert_ids, receipts.recv_ns, strict=True)
                    if a in sent
                ]

        for side in self.sides:
            await one(side, keep=False)  # warm-up
        for side in self.order(len(self.sides) * self.o.broadcasts):
            await one(side, keep=True)
        for side in self.sides:
            side.out["broadcast"] = {
                "latency_ms": summary(lat[side.name]),
                "missing": missing[side.name],
            }

    async def bursts(self) -> None:
        rates: dict[str, list[float]] = {s.name: [] for s in self.sides}
        cpu: dict[str, list[dict[str, float]]] = {s.name: [] for s in self.sides}
        missing = dict.fromkeys(rates, 0)
        m = self.o.burst
        for side in self.order(len(self.sides) * self.o.bursts):
            await side.gen.collect()
            start = await side.gen.received()
            target = side.online * m
            alerts = [make_alert(f"{REGION}-102") for _ in range(m)]
            before = side.usage()
            t0 = time.monotonic_ns()
            sent = await self.publish(side, alerts)
            got = await settle(side.gen, start + target, 120)
            after = side.usage()
            missing[side.name] += max(0, start + target - got)
            receipts = await side.gen.collect()
            pairs = zip(receipts.alert_ids, receipts.recv_ns, strict=True)
            recv = [r for a, r in pairs if a in sent]
            if recv:
                rates[side.name].append(len(recv) / ((max(recv) - t0) / 1e9))
                used = cpu_between(before, after)
                cpu[side.name].append({p: 1e6 * c / len(recv) for p, c in used.items()})
            await asyncio.sleep(1.0)  # acks land, the next burst starts from quiet
        for side in self.sides:
            per = cpu[side.name]
            procs = per[0].keys() if per else ()
            us = {p: round(sum(x[p] for x in per) / len(per), 2) for p in procs}
            side.out["burst"] = {
                "alerts": m,
                "deliveries_per_second": [round(r) for r in rates[side.name]],
                "best": round(max(rates[side.name])) if rates[side.name] else 0,
                "cpu_us_per_delivery": us,
                "cpu_us_per_delivery_total": round(sum(us.values()), 2),
                "missing": missing[side.name],
            }

    async def paced(self) -> None:
        p = self.o.paced
        for side in self.sides:
            await side.gen.collect()
            start = await side.gen.received()
            before = side.usage()
            t0 = time.monotonic()
            for i in range(p):
                await self.publish(side, [make_alert(f"{REGION}-102")])
                await asyncio.sleep(max(0.0, t0 + i + 1 - time.monotonic()))
            await asyncio.sleep(1.0)
            after = side.usage()
            got = await settle(side.gen, start + side.online * p, 30)
            await side.gen.collect()
            used = cpu_between(before, after)
            ms = {k: round(1000 * c / p, 2) for k, c in used.items()}
            side.out["paced"] = {
                "broadcasts": p,
                "cpu_ms_per_broadcast": ms,
                "cpu_ms_per_broadcast_total": round(sum(ms.values()), 2),
                "missing": max(0, start + side.online * p - got),
            }

    async def idle(self) -> None:
        quiet = time.monotonic()  # the last traffic
        await asyncio.sleep(2.0)
        await self.idle_window("idle")
        if self.o.settled:
            await asyncio.sleep(max(0.0, quiet + self.o.settled - time.monotonic()))
            await self.idle_window("settled")

    async def idle_window(self, key: str) -> None:
        before = {s.name: s.usage() for s in self.sides}
        t0 = time.monotonic()
        await asyncio.sleep(self.o.idle)
        seconds = time.monotonic() - t0
        for side in self.sides:
            used = cpu_between(before[side.name], side.usage())
            pct = {k: round(100 * c / seconds, 2) for k, c in used.items()}
            side.out[key] = {
                "seconds": round(seconds, 1),
                "devices": side.online,
                "cpu_percent": pct,
                "cpu_percent_total": round(sum(pct.values()), 2),
            }


# ---------------------------------------------------------------- the report
LABELS = {"tocsin": "tocsin", "socketio": "Socket.IO", "ceiling": "ceiling (bare aiohttp)"}


def _parts(d: dict[str, float], digits: int = 1) -> str:
    if len(d) < 2:
        return ""
    return " (" + ", ".join(f"{k} {fmt(float(v), digits)}" for k, v in d.items()) + ")"


#: The rows of each profile's table: (label, cell of one server's results).
ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    (
        "time to accept every connection, fresh devices (s; per s)",
        lambda s: (
            f"{s['connect']['seconds']} s; {fmt(s['connect']['per_second'], 0)}/s"
            + (f" ({s['connect']['failures']})" if s["connect"]["failures"] else "")
        ),
    ),
    (
        "the same devices returning (s; per s)",
        lambda s: (
            f"{s['returning']['seconds']} s; {fmt(s['returning']['per_second'], 0)}/s"
            if "returning" in s
            else "—"
        ),
    ),
    (
        "handshake p50 / p99 ms, fresh",
        lambda s: (
            f"{fmt(s['connect']['handshake_ms']['p50'])} / "
            f"{fmt(s['connect']['handshake_ms']['p99'])}"
        ),
    ),
    (
        "server RSS per connection (KiB)",
        lambda s: (
            fmt(float(sum(s["rss_kib_per_connection"].values())))
            + _parts(s["rss_kib_per_connection"])
        ),
    ),
    (
        "compression accepted",
        lambda s: f"{s['deflate_accepted']:,} of {s['connect']['ok']:,}",
    ),
    (
        "broadcast p50 / p99 / max ms",
        lambda s: (
            " / ".join(fmt(s["broadcast"]["latency_ms"][k]) for k in ("p50", "p99", "max"))
            + (f" (missing {s['broadcast']['missing']})" if s["broadcast"]["missing"] else "")
        ),
    ),
    (
        "burst deliveries/s, acks on (best)",
        lambda s: (
            f"{s['burst']['best']:,}"
            + (f" (missing {s['burst']['missing']})" if s["burst"]["missing"] else "")
        ),
    ),
    (
        "server CPU per delivery in a burst (µs)",
        lambda s: (
            fmt(s["burst"]["cpu_us_per_delivery_total"]) + _parts(s["burst"]["cpu_us_per_delivery"])
        ),
    ),
    (
        "server CPU per paced broadcast (ms)",
        lambda s: (
            fmt(s["paced"]["cpu_ms_per_broadcast_total"])
            + _parts(s["paced"]["cpu_ms_per_broadcast"])
        ),
    ),
    (
        "idle right after, devices held (% of a core)",
        lambda s: fmt(s["idle"]["cpu_percent_total"], 2) + _parts(s["idle"]["cpu_percent"], 2),
    ),
    (
        "idle once settled (--settled s after the traffic; % of a core)",
        lambda s: (
            fmt(s["settled"]["cpu_percent_total"], 2) + _parts(s["settled"]["cpu_percent"], 2)
            if "settled" in s
            else "—"
        ),
    ),
]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def report(results: dict[str, Any], when: Any) -> str:
    lines = [
        f"# tocsin bench peers, {when:%Y-%m-%d %H:%M}",
        "",
        f"{results['devices']:,} devices per server; code {results['code']} (gateway: "
        f"{results['gateway_code']}); node {results['node']}; heartbeat / pingInterval "
        f"{results['heartbeat_seconds']:g} s; load average before "
        f"{', '.join(f'{x:.2f}' for x in results['load_before'])}, after "
        f"{', '.join(f'{x:.2f}' for x in results.get('load_after', ()))}.",
    ]
    if results.get("socketio_skipped"):
        lines += ["", f"Socket.IO: skipped: {results['socketio_skipped']}."]
    if results.get("connect_only"):
        return "\n".join(lines + connect_report(results)) + "\n"
    for profile, sides in results["profiles"].items():
        names = list(sides)
        offer = "offer permessage-deflate" if profile == "deflate" else "offer no compression"
        lines += [
            "",
            f"## Clients that {offer} ({profile})",
            "",
            "| figure | " + " | ".join(LABELS[n] for n in names) + " |",
            "|---|" + "---|" * len(names),
        ]

        for label, cell in ROWS:
            lines.append(f"| {label} | " + " | ".join(cell(sides[n]) for n in names) + " |")
        t = sides.get("tocsin")
        for other in ("socketio", "ceiling"):
            o = sides.get(other)
            if t is None or o is None:
                continue
            p99 = _ratio(t["broadcast"]["latency_ms"]["p99"], o["broadcast"]["latency_ms"]["p99"])
            rate = _ratio(t["burst"]["best"], o["burst"]["best"])
            cpu = _ratio(
                t["burst"]["cpu_us_per_delivery_total"], o["burst"]["cpu_us_per_delivery_total"]
            )
            paced = _ratio(
                t["paced"]["cpu_ms_per_broadcast_total"], o["paced"]["cpu_ms_per_broadcast_total"]
            )
            lines += [
                "",
                f"tocsin / {LABELS[other]}: broadcast p99 {p99}, burst deliveries/s {rate}, "
                f"CPU per delivery in a burst {cpu}, CPU per paced broadcast {paced}.",
            ]
    return "\n".join(lines) + "\n"


CONNECT_PHASES = (
    ("connect", "fresh devices connect"),
    ("close", "they close"),
    ("returning", "the same devices return"),
    ("close_returning", "they close"),
)


def connect_report(results: dict[str, Any]) -> list[str]:
    """--connect-only: per phase, time, CPU of each process and NATS operations, per device."""
    lines: list[str] = []
    for profile, sides in results["profiles"].items():
        t = sides["tocsin"]
        n = max(1, t["connect"]["ok"])
        lines += [
            "",
            f"## tocsin connects ({profile}, {t['connect']['ok']:,} devices)",
            "",
            "| phase | seconds (per s) | handshake p50 / p99 ms | CPU ms per device: gateway, "
            "nats-server | NATS operations per device |",
            "|---|---|---|---|---|",
        ]
        kinds: set[str] = set()
        for key, label in CONNECT_PHASES:
            ph = t.get(key)
            if ph is None:
                continue
            kinds |= set(ph.get("nats_ops", {}))
            cpu = ph["cpu_seconds"]
            rate = (
                f"{ph['seconds']} s ({fmt(ph['per_second'], 0)}/s)"
                + (f", {ph['failures']}" if ph.get("failures") else "")
                if "seconds" in ph
                else "—"
            )
            hs = ph.get("handshake_ms")
            lines.append(
                f"| {label} | {rate} | "
                + (f"{fmt(hs['p50'])} / {fmt(hs['p99'])}" if hs else "—")
                + f" | {fmt(cpu.get('gateway', 0) * 1000 / n, 2)}, "
                f"{fmt(cpu.get('nats-server', 0) * 1000 / n, 2)} | "
                f"{ph.get('nats_ops_per_connect', '—')} |"
            )
        lines += ["", "| operation | " + " | ".join(k for k, _ in CONNECT_PHASES) + " |"]
        lines.append("|---|" + "---|" * len(CONNECT_PHASES))
        for kind in sorted(kinds):
            cells = [
                fmt(t[k]["nats_ops"].get(kind, 0) / n, 2) if k in t else "—"
                for k, _ in CONNECT_PHASES
            ]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="tocsin beside Socket.IO 4 (Node.js) and the bare ceiling, the same "
        "clients, two client profiles (docs/benchmarks.md).",
    )
    parser.add_argument("--devices", type=int, default=0, help="per server (default 2,000)")
    parser.add_argument("--quick", action="store_true", help="500 devices, fewer rounds")
    parser.add_argument("--broadcasts", type=int, default=0, help="per server (default 10)")
    parser.add_argument("--burst", type=int, default=50, help="alerts per burst (default 50)")
    parser.add_argument("--bursts", type=int, default=2, help="per server (default 2)")
    parser.add_argument("--paced", type=int, default=10, help="paced broadcasts per server")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the idle phase")
    parser.add_argument(
        "--settled",
        type=float,
        default=0.0,
        help="a second idle window this many seconds after the traffic, once the saves it "
        "set off are done (tocsin: 65 covers TOCSIN_QUEUE_SAVE_SECONDS and the record "
        "rewrites); default 0: none",
    )
    parser.add_argument(
        "--profiles", default=",".join(PROFILES), help="plain,deflate (default: both)"
    )
    parser.add_argument(
        "--gateway-code",
        type=Path,
        default=None,
        help="the services directory of another tree: its gateway and ceiling are measured",
    )
    parser.add_argument(
        "--connect-only",
        action="store_true",
        help="tocsin alone: fresh devices connect, close, return and close again; CPU and "
        "NATS operations per device for each (no Socket.IO, no broadcasts)",
    )
    set_option(parser)
    out_option(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    profiles = tuple(p for p in args.profiles.split(",") if p)
    if not profiles or any(p not in PROFILES for p in profiles):
        parser.error(f"--profiles: a comma-separated list of {', '.join(PROFILES)}")
    devices = args.devices or (500 if args.quick else 2_000)
    if not 1 <= devices <= 10_000:
        parser.error("--devices must be between 1 and 10,000")
    sets = parse_sets(parser, args.set)
    env = {f"TOCSIN_{k.upper()}": str(v) for k, v in sets.items()}
    o = Options(
        devices=devices,
        broadcasts=args.broadcasts or (4 if args.quick else 10),
        burst=args.burst,
        bursts=args.bursts,
        paced=args.paced,
        idle=args.idle,
        settled=args.settled,
        profiles=profiles,
        gateway_env=env,
        gateway_code=args.gateway_code.resolve() if args.gateway_code else None,
        connect_only=args.connect_only,
    )
    return run_and_write(
        Peers(o).run(),
        report,
        args.out,
        lambda when: (
            f"peers-{when:%Y-%m-%d-%H%M}-d{devices}" + ("-connect" if args.connect_only else "")
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
